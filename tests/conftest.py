"""Shared fixtures: real ffmpeg, real Dask worker processes, tiny real SavedModels, shared data.

The shared data (a real recording, the lab's model, the rebuilt YAMNet) is found through one
path: ``$BUZZDASK_SHARED_DIR``, else ``../shared`` beside the repository. Tests that need it
skip with the reason when it is absent; with ``BUZZDASK_REQUIRE_SHARED=1`` (CI) they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("BUZZDASK_SHARED_DIR", REPO.parent / "shared")).resolve()
CLASSES = ["ins_buzz", "ambient_noise", "mech_plane"]
HAS_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None
#: The command as users run it: the console script pip installed beside this Python. Its worker
#: processes (spawned) import it as their main module before anything else, which those of
#: ``python -m buzzdask`` do not: the import order differs (it once decided how errors pickled).
BUZZDASK = str(Path(sys.executable).with_name("buzzdask"))


def _require(
    condition: bool, reason: str, *, strict_env: str | None = None
) -> pytest.MarkDecorator:
    if strict_env and os.environ.get(strict_env) == "1" and not condition:
        raise RuntimeError(f"{strict_env}=1 but: {reason}")
    return pytest.mark.skipif(not condition, reason=reason)


requires_ffmpeg = _require(HAS_FFMPEG, "ffmpeg/ffprobe not on PATH (apt-get install ffmpeg)")
requires_shared = _require(
    (SHARED_DIR / "data" / "golden" / "testbuzz.json").is_file()
    and (SHARED_DIR / "models" / "yamnet" / "saved_model_wholehop").is_dir(),
    f"shared data not found at {SHARED_DIR} (set BUZZDASK_SHARED_DIR)",
    strict_env="BUZZDASK_REQUIRE_SHARED",
)
requires_rclone = _require(
    shutil.which("rclone") is not None, "rclone not on PATH (apt-get install rclone)"
)


@dataclass(frozen=True)
class RcloneRemote:
    """rclone serving ``root`` over WebDAV on 127.0.0.1, the stand-in for SharePoint/OneDrive.

    ``config`` defines the remotes ``sharepoint`` (right password), ``wrongpass`` and
    ``offline`` (a port nothing listens on); ``flags`` points rclone at it and keeps retries short.
    """

    root: Path
    config: Path
    flags: tuple[str, ...]


@pytest.fixture(scope="session")
def rclone_remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneRemote]:
    base = tmp_path_factory.mktemp("rclone")
    root = base / "served"
    root.mkdir()
    config = base / "rclone.conf"
    port, closed_port = _free_port(), _free_port()
    server = subprocess.Popen(
        [
            *("rclone", "serve", "webdav", str(root), "--addr", f"127.0.0.1:{port}"),
            *("--user", "lab", "--pass", "bees", "--config", str(config)),
            # Files appear on the remote as tests write them (no directory cache).
            *("--dir-cache-time", "0s"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for name, url, options in [
            ("sharepoint", f"http://127.0.0.1:{port}", ["user=lab", "pass=bees"]),
            ("wrongpass", f"http://127.0.0.1:{port}", ["user=lab", "pass=wasps"]),
            ("offline", f"http://127.0.0.1:{closed_port}", []),
        ]:
            subprocess.run(
                [
                    *("rclone", "config", "create", name, "webdav", f"url={url}"),
                    *options,
                    *("--config", str(config)),
                ],
                check=True,
                capture_output=True,
            )
        wait_until(
            lambda: _listening(port), timeout_s=30, failure=f"rclone serve is not on port {port}"
        )
        yield RcloneRemote(
            root=root,
            config=config,
            flags=("--config", str(config), "--low-level-retries", "1", "--retries", "1"),
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YAMNet-shaped SavedModel (YAMNet's own framing, 0.96 s patch hop)."""
    from tests.model_fixtures import build_tiny_yamnet

    return build_tiny_yamnet(tmp_path_factory.mktemp("tiny_yamnet"), patch_hop_seconds=0.96)


@pytest.fixture(scope="session")
def tiny_embedder_halfhop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like TF Hub's YAMNet: 0.48 s patch hop."""
    from tests.model_fixtures import build_tiny_yamnet

    return build_tiny_yamnet(tmp_path_factory.mktemp("tiny_yamnet_half"), patch_hop_seconds=0.48)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A buzzdetect-format model directory with a tiny head over 1024-d embeddings."""
    from tests.model_fixtures import build_tiny_head

    return build_tiny_head(tmp_path_factory.mktemp("models") / "model_tiny", classes=CLASSES)


@pytest.fixture(scope="session")
def dask_client() -> Iterator[object]:
    """A real local cluster of two worker processes, shared by the session."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def wait_until(
    condition: Callable[[], object],
    *,
    timeout_s: float,
    failure: str | Callable[[], str],
    interval_s: float = 0.05,
) -> None:
    """Call ``condition`` every ``interval_s`` until it is true; after ``timeout_s`` [s], fail.

    The failure is a :class:`TimeoutError` saying ``failure`` (a callable gives the message
    as it is then: a future's status, say). A timeout is a bug's symptom, not a slow machine's:
    each caller's is far above what the wait takes here under load.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            message = failure() if callable(failure) else failure
            raise TimeoutError(f"{message} (waited {timeout_s} s)")
        time.sleep(interval_s)


def assert_same_frames(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same rows, names and times; activations equal to 1e-5.

    TensorFlow's sums depend on how frames were batched into embedder calls (which varies
    with timing), at the 1e-6 level; the golden test holds the real model to 7e-6.
    """
    pd.testing.assert_frame_equal(actual, expected, check_exact=False, rtol=0, atol=1e-5)


@contextmanager
def held_by_another_thread(lock: AbstractContextManager[object]) -> Iterator[None]:
    """Hold ``lock`` (an output's, a folder's) in another thread for the block: to this thread,
    another command's hold (a lock knows the threads that hold it)."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(60)
        yield
    finally:
        release.set()
        holder.join()


def when_scoring_started(scores: Path, action: Callable[[], object]) -> threading.Thread:
    """Run ``action`` in a thread once the first partition lands in ``scores``: mid-run.

    Join the returned thread after the run.
    """

    def wait_then_act() -> None:
        wait_until(
            lambda: scores.exists() and any(scores.rglob("*.parquet")),
            timeout_s=60,
            failure=f"no partition in {scores}",
        )
        action()

    thread = threading.Thread(target=wait_then_act)
    thread.start()
    return thread


@dataclass(frozen=True)
class Kill:
    """What a :class:`MidRunKiller` saw when it struck.

    Attributes
    ----------
    tasks : list of str
        Keys of the tasks it waited for that the victim held (empty for a client).
    written : int
        Partitions in the output.
    """

    tasks: list[str]
    written: int


class MidRunKiller:
    """Signal a process from a thread, around a run, once the run is provably under way.

    It strikes while some but not all of the run's ``total`` partitions are written and, for a
    worker, ``in_flight()`` lists tasks the victim holds. Leaving the ``with`` block normally
    fails the test if it never struck: a kill that came after the run proves nothing.

    Parameters
    ----------
    pid : int
        The victim process.
    scores : Path
        The output's partitions (``OUTPUT/scores``).
    total : int > 0
        Partitions of the whole run.
    in_flight : callable, optional
        ``in_flight() -> list of str``: keys of the victim's tasks of the kind that matters.
    signal_number : int
        The signal: SIGKILL, or SIGINT for a Ctrl-C.
    whole_group : bool
        Send it to the victim's whole process group (its workers and ffmpeg too), as a
        terminal sends Ctrl-C; the victim leads the group (``start_new_session``).

    Attributes
    ----------
    kill : Kill or None
        What it saw when it struck; ``None`` until then.
    """

    def __init__(
        self,
        pid: int,
        scores: Path,
        *,
        total: int,
        in_flight: Callable[[], list[str]] | None = None,
        signal_number: int = signal.SIGKILL,
        whole_group: bool = False,
    ) -> None:
        self.pid = pid
        self.scores = scores
        self.total = total
        self.in_flight = in_flight
        self.signal_number = signal_number
        self.whole_group = whole_group
        self.kill: Kill | None = None
        self._over = threading.Event()
        self._thread = threading.Thread(target=self._wait_then_kill, daemon=True)

    def __enter__(self) -> MidRunKiller:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self._over.set()
        self._thread.join()
        if kind is None and self.kill is None:
            pytest.fail(f"the run ended before pid {self.pid} could be killed mid-run")

    def written(self) -> int:
        """Partitions in the output (written under a hidden name, then renamed into place)."""
        return sum(1 for _ in self.scores.rglob("*.parquet")) if self.scores.exists() else 0

    def _due(self, written: int) -> list[str] | None:
        """The victim's tasks that matter (none for a client), or ``None`` while not due."""
        if not 0 < written < self.total:
            return None
        if self.in_flight is None:
            return []
        return self.in_flight() or None

    def _wait_then_kill(self) -> None:
        while not self._over.is_set():
            if self._due(self.written()) is not None:
                # Stopped, the victim can finish nothing more: once the scheduler has heard of
                # what it finished before, the tasks still listed are those it holds when killed.
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(0.1)
                written = self.written()
                tasks = self._due(written)
                if tasks is not None:
                    (os.killpg if self.whole_group else os.kill)(self.pid, self.signal_number)
                    if self.signal_number != signal.SIGKILL:
                        os.kill(self.pid, signal.SIGCONT)  # to handle the signal
                    self.kill = Kill(tasks=tasks, written=written)
                    return
                os.kill(self.pid, signal.SIGCONT)
            time.sleep(0.02)


#: Python that prints the thread counts of its process's BLAS pools (numpy's OpenBLAS): ``[1]``.
BLAS_THREADS_REPORT = (
    "import numpy, threadpoolctl\n"
    "pools = threadpoolctl.threadpool_info()\n"
    "print(sorted({pool['num_threads'] for pool in pools if pool['user_api'] == 'blas'}))\n"
)


def in_a_fresh_interpreter(
    script: str, *, timeout: float = 300, env: dict[str, str] | None = None
) -> list[str]:
    """The lines ``script`` prints, run by a new Python process (which must succeed).

    ``env``: the process's whole environment (default: this one's).
    """
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
        env=env,
    )
    return done.stdout.splitlines()


def run_benchmark(module: str, *args: str) -> None:
    """``python -m <module> <args>`` from the repository's root; a failure shows its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def ffmpeg_failing_on(directory: Path, name: str) -> Path:
    """An executable ``directory/ffmpeg``: the real ffmpeg, but for any command naming ``name``,
    which it fails (exit 1, no message) as a file ffmpeg cannot decode would."""
    from buzzdask.ffmpeg_tools import find_ffmpeg

    wrapper = directory / "ffmpeg"
    real = find_ffmpeg().ffmpeg
    wrapper.write_text(f'#!/bin/sh\ncase "$*" in *{name}*) exit 1 ;; esac\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """16-bit PCM WAV; ``samples`` has shape (n,) or (n, channels) in [-1, 1]."""
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as stream:
        stream.setnchannels(data.shape[1])
        stream.setsampwidth(2)
        stream.setframerate(rate)
        stream.writeframes(pcm.tobytes())
    return path


def field_like(n_samples: int, rate: int, channels: int = 1, *, seed: int = 0) -> np.ndarray:
    """Noise plus tones and a buzz-like burst, different in every channel: shape (n, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / rate
    columns = []
    for channel in range(channels):
        tone = 0.2 * np.sin(2 * np.pi * (220 + 170 * channel) * t)
        buzz = (
            0.3
            * np.sign(np.sin(2 * np.pi * (180 + 40 * channel) * t))
            * (np.sin(2 * np.pi * 0.2 * t) > 0.5)
        )
        columns.append(tone + buzz + 0.1 * (channel + 1) * rng.standard_normal(n_samples))
    return np.clip(np.stack(columns, axis=1), -0.99, 0.99)


@pytest.fixture
def run(dask_client, tiny_embedder, tiny_model, tmp_path):
    """analyze() on the session's cluster with the tiny models."""
    import buzzdask

    def run_analyze(paths, *, output=None, embedder=None, model=None, **options):
        options.setdefault("progress", False)
        return buzzdask.analyze(
            paths,
            model or tiny_model,
            output=output or tmp_path / "results",
            client=dask_client,
            embedder=str(embedder or tiny_embedder),
            **options,
        )

    return run_analyze


def write_audio(
    root: Path, name: str, *, n_samples: int, rate: int = 16000, channels: int = 1, seed: int = 0
) -> Path:
    """A generated recording with an exact number of samples, in any format ffmpeg writes."""
    target = root / name
    target.parent.mkdir(parents=True, exist_ok=True)
    wav = target if target.suffix == ".wav" else target.with_name(f".{target.stem}.src.wav")
    write_wav(wav, field_like(n_samples, rate, channels, seed=seed), rate)
    if wav != target:
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(target)], check=True)
        wav.unlink()
    return target


def zero_a_stretch(path: Path, *, n_bytes: int = 3000) -> Path:
    """Zero ``n_bytes`` a third of the way into ``path``: an MP3's frames lost mid-file, which
    ffmpeg decodes around and reports ("Header missing")."""
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third : third + n_bytes] = bytes(n_bytes)
    path.write_bytes(data)
    return path


@pytest.fixture
def make_audio(tmp_path: Path) -> Callable[..., Path]:
    """Write a generated recording with an exact number of samples, in any format ffmpeg writes."""

    def make(name: str, *, directory: Path | None = None, **options: Any) -> Path:
        return write_audio(directory or tmp_path / "audio", name, **options)

    return make


SIGINT_AS_IN_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def start_as_in_a_terminal(command: Sequence[str]) -> subprocess.Popen[str]:
    """Start ``command`` in a session of its own, its stderr piped, as a terminal starts it.

    Ctrl-C not ignored, whatever this test run inherited (a shell's background job ignores it,
    and its children with it); exec keeps the pid, which leads the session's process group.
    """
    env = {
        **os.environ,
        "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0",
        # Each thread's stack on SIGABRT: what a command that hangs waits for (communicate).
        "PYTHONFAULTHANDLER": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-c", SIGINT_AS_IN_A_TERMINAL, *command],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def communicate(process: subprocess.Popen[str], *, timeout_s: float) -> str:
    """The stderr of ``process`` (from :func:`start_as_in_a_terminal`) once it has ended.

    One still running after ``timeout_s`` [s] hangs: it is aborted, and the test fails with
    the end of its stderr, where Python's fault handler has put each thread's stack.
    """
    try:
        return process.communicate(timeout=timeout_s)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        stderr = process.communicate(timeout=60)[1]
        pytest.fail(f"still running after {timeout_s} s; its stacks:\n{stderr[-12000:]}")


def signal_client_mid_run(
    command: Sequence[str],
    *,
    output: Path,
    total: int,
    signal_number: int = signal.SIGKILL,
    whole_group: bool = False,
) -> tuple[MidRunKiller, subprocess.CompletedProcess[str]]:
    """Run ``command`` (a client analysing into ``output``) and signal it mid-run.

    The client runs in a session of its own with its local cluster; :class:`MidRunKiller`
    signals it once at least one of the ``total`` chunks is journalled (so a resume provably
    skips it) and before all are, then any of its worker processes left are killed. Returns
    the killer and the finished process, its stderr captured.
    """
    process = start_as_in_a_terminal(command)
    journal = output / "journal.jsonl"
    with MidRunKiller(
        process.pid,
        output / "scores",
        total=total,
        in_flight=lambda: journal.read_text().splitlines() if journal.exists() else [],
        signal_number=signal_number,
        whole_group=whole_group,
    ) as killer:
        stderr = communicate(process, timeout_s=300)
    with contextlib.suppress(ProcessLookupError):  # none left when its cluster was threads
        os.killpg(process.pid, signal.SIGKILL)  # its local cluster's orphaned worker processes
    assert killer.kill is not None and 0 < killer.kill.written < total
    return killer, subprocess.CompletedProcess(command, process.returncode, stderr=stderr)


def kill_client_mid_run(script: str, *args: object, output: Path, total: int) -> MidRunKiller:
    """Run ``script`` (``python -c``) with :func:`signal_client_mid_run`: SIGKILL, mid-run."""
    command = [sys.executable, "-c", script, *(str(arg) for arg in args)]
    killer, done = signal_client_mid_run(command, output=output, total=total)
    assert done.returncode == -signal.SIGKILL, done.stderr
    return killer


SLURM_SCRIPTS = SHARED_DIR / "slurm"
requires_slurm = _require(
    os.geteuid() == 0 and (SLURM_SCRIPTS / "start-local-slurm.sh").is_file(),
    f"a local SLURM needs root and {SLURM_SCRIPTS}/start-local-slurm.sh",
    strict_env="BUZZDASK_REQUIRE_SLURM",
)


def run_batch_job(
    script: str, directory: Path, *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    """Submit ``script`` (written to ``directory/job.sh``) with ``sbatch --wait``; its log.

    Submitted from ``cwd`` (default: this process's directory) with ``env`` (default: this
    process's); fails the test, with the log's end, unless the job succeeds within 600 s.
    """
    path, log = directory / "job.sh", directory / "job.out"
    path.write_text(script)
    done = subprocess.run(
        ["sbatch", "--wait", "-o", str(log), str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )
    output = log.read_text() if log.exists() else done.stderr
    assert done.returncode == 0, output[-3000:]
    return output


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[dict[str, str]]:
    """A real single-node SLURM (cpu and gpu partitions, 2 fake GPUs) for the whole session.

    Started by ../shared/slurm/start-local-slurm.sh unless already running; stopped at the end
    only if this session started it. Yields the variables it exports (``SLURM_CONF``...).
    """
    started = subprocess.run(
        ["bash", str(SLURM_SCRIPTS / "start-local-slurm.sh")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if started.returncode != 0:
        pytest.fail(f"start-local-slurm.sh failed:\n{started.stderr}", pytrace=False)
    env = dict(
        line.removeprefix("export ").split("=", 1)
        for line in started.stdout.splitlines()
        if line.startswith("export ")
    )
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # sbatch/squeue run by dask-jobqueue inherit SLURM_CONF
    try:
        yield env
    finally:
        if "already running" not in started.stderr:
            subprocess.run(["bash", str(SLURM_SCRIPTS / "stop-local-slurm.sh")], check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
