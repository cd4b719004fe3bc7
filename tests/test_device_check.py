"""``benchmarks/device-check`` as far as a CPU can run it: every stage, on small sizes.

On a machine with a GPU the same code measures the GPU scorer; here a dry run (``--allow-cpu``)
proves the script and its record work, so the first session lent a GPU only has to run it. On a
machine that TensorFlow cannot reach (no package index), it measures the decode side alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_ffmpeg, requires_shared, requires_slurm, run_batch_job

REPO = Path(__file__).resolve().parents[1]
pytestmark = [requires_ffmpeg, requires_shared, pytest.mark.shared_data]


def _device_check(*args: str, shared: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    """Run the check with its temporary files under ``scratch`` (made here)."""
    scratch.mkdir()
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--shared", str(shared), *args],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_dry_run_on_the_cpu_writes_the_whole_record(shared_dir, tmp_path):
    scratch = tmp_path / "tmp"
    done = _device_check(
        "--allow-cpu", "--quick", "--out", str(tmp_path), shared=shared_dir, scratch=scratch
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(scratch.glob("buzzdask-*"))  # the generated corpora went with the check
    (path,) = tmp_path.glob("*-device-cpu.json")
    record = json.loads(path.read_text())
    fidelity = record["fidelity"]
    assert fidelity["scorer"] == {"device": "CPU", "tensor_float_32": False}
    assert set(fidelity["files"]) >= {"testbuzz.mp3"} and len(fidelity["files"]) == 2
    assert fidelity["within_target"]  # a CPU against a CPU: equal
    assert set(record["batch_sweep"]["frames_per_second"]) == {"256", "512"}
    # A CPU's calls: buzzdask.yaml's cpu-call-frames.
    assert record["batch_sweep"]["call_frames"] == {"256": 96, "512": 96}
    run = record["analyze"]
    assert run["files_failed"] == 0 and run["realtime_factor"] > 0
    assert 0 < run["fraction_of_bound"]
    _assert_decode_side(record)
    assert record["projection"]["bound_by"] in {"decode", "scorer"}
    assert record["projection"]["scorer_rtf_per_gpu"] > 0


def _assert_decode_side(record: dict) -> None:
    scaling = record["decode_scaling"]
    counts = [run["processes"] for run in scaling["runs"]]
    assert counts[0] == 1 and counts[-1] == len(os.sched_getaffinity(0))  # one to every core
    for run in scaling["runs"]:
        assert run["chunks"] == 2 * run["processes"]  # --quick: two chunks per process
        assert run["audio_s"] > 0 and run["realtime_factor"] > 0 and run["cores_busy"] > 0
    assert scaling["per_core_rtf_all_cores"] > 0
    loopback = record["loopback"]
    assert loopback["bytes"] == 4 * 60 * 16000 * 4  # four minutes of 16 kHz float32
    assert loopback["bytes_per_s"] > 0
    assert record["projection"]["minutes"] > 0
    assert record["projection"]["scorer_rtf_per_gpu_needed"] > 0


def _path_without_ffmpeg(directory: Path) -> str:
    """A ``PATH`` of one directory: links to every command of this one's but ffmpeg and ffprobe."""
    directory.mkdir()
    for entry in os.environ["PATH"].split(os.pathsep):
        folder = Path(entry)
        if not folder.is_dir():
            continue
        for command in folder.iterdir():
            link = directory / command.name
            if command.name not in {"ffmpeg", "ffprobe"} and not link.exists():
                link.symlink_to(command)
    return str(directory)


def test_without_tensorflow_or_a_package_index_it_measures_the_decode_side(shared_dir, tmp_path):
    """What a lent machine with no TensorFlow and no network gets from the shell script; with
    no ffmpeg on PATH either (an OSC node), it uses buzzdask's (the imageio-ffmpeg wheel's).
    Nor does it need dask-jobqueue, which is not among the wheels carried to a lent machine."""
    no_tensorflow = tmp_path / "no-tensorflow"
    no_tensorflow.mkdir()
    for hidden in ("tensorflow", "dask_jobqueue"):
        (no_tensorflow / f"{hidden}.py").write_text(f"raise ImportError('no {hidden} here')\n")
    out = tmp_path / "out"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    done = subprocess.run(
        ["bash", "benchmarks/device-check", "--quick"],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PYTHONPATH": str(no_tensorflow),
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on the discard port
            "OUT": str(out),
            "TMPDIR": str(scratch),
            "BUZZDASK_SHARED_DIR": str(shared_dir),
            "PATH": _path_without_ffmpeg(tmp_path / "bin"),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no TensorFlow and no package index" in done.stderr
    assert "no ffmpeg on PATH: using " in done.stderr and "imageio_ffmpeg" in done.stderr
    assert not list(scratch.glob("buzzdask-*"))
    (path,) = out.glob("*-device-decode.json")
    record = json.loads(path.read_text())
    assert "tensorflow" not in record and "fidelity" not in record
    _assert_decode_side(record)
    assert record["projection"]["scorer_rtf_per_gpu"] is None
    assert record["projection"]["bound_by"] == "decode (no GPU scorer measured)"


def test_without_a_gpu_it_stops_and_says_so(shared_dir, tmp_path):
    out = tmp_path / "out"
    done = _device_check("--out", str(out), shared=shared_dir, scratch=tmp_path / "tmp")
    assert done.returncode == 2
    assert "sees no GPU" in done.stderr
    assert not out.exists() and not list((tmp_path / "tmp").glob("buzzdask-*"))


def _print_batch_script(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--print-batch-script", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_batch_script_for_an_osc_gpu_node(shared_dir, tmp_path):
    """The job an OSC user submits to run the check where the device machines cannot."""
    shared = ("--shared", str(shared_dir), "--out", str(tmp_path / "results"))
    one_gpu = _print_batch_script("osc-cardinal", "--account", "PAS1234", *shared, cwd=tmp_path)
    assert one_gpu.returncode == 0, one_gpu.stderr
    lines = one_gpu.stdout.splitlines()
    # The GPU worker job's share of a Cardinal GPU node: one H100, 8 cores, 72 GiB.
    for directive in ("-p gpu", "-A PAS1234", "--cpus-per-task=8", "--mem=73728M"):
        assert f"#SBATCH {directive}" in lines
    assert "#SBATCH --gpus-per-node=1" in lines
    # Its log directory exists before sbatch opens the log.
    logs = tmp_path / "buzzdask-logs"
    assert f"#SBATCH -o {logs}/buzzdask-device-check-%j.out" in lines and logs.is_dir()
    assert f"cd {REPO}" in lines and f"export PYTHON={sys.executable}" in lines
    assert f"export BUZZDASK_SHARED_DIR={shared_dir.resolve()}" in lines
    assert f"export OUT={tmp_path / 'results'}" in lines
    # The projection's node is the partition's: 96 cores less one per GPU's scorer, 4 GPUs.
    assert lines[-1] == "bash benchmarks/device-check --node-cores 92 --node-gpus 4"
    syntax = subprocess.run(["bash", "-n"], input=one_gpu.stdout, text=True, capture_output=True)
    assert syntax.returncode == 0, syntax.stderr

    whole = _print_batch_script(
        "osc-ascend", "--account", "PAS1234", "--whole-node", "--quick", *shared, cwd=tmp_path
    )
    assert whole.returncode == 0, whole.stderr
    ascend = whole.stdout.splitlines()
    assert "#SBATCH --cpus-per-task=88" in ascend and "#SBATCH --gpus-per-node=4" in ascend
    assert ascend[-1] == "bash benchmarks/device-check --node-cores 84 --node-gpus 4 --quick"

    # Refused before the job would queue for a GPU: no account, no jobs, no shared data.
    no_account = _print_batch_script("osc-cardinal", *shared, cwd=tmp_path)
    assert no_account.returncode == 3 and "need an account" in no_account.stderr
    # A configuration without nodes: the projection's is a Cardinal GPU node's.
    test_slurm = _print_batch_script("local-slurm", *shared, cwd=tmp_path)
    assert test_slurm.returncode == 0, test_slurm.stderr
    assert test_slurm.stdout.endswith(" --node-cores 92 --node-gpus 4\n")
    local = _print_batch_script("local", *shared, cwd=tmp_path)
    assert local.returncode == 3 and "it has no jobs" in local.stderr
    elsewhere = ("--shared", str(tmp_path), "--account", "PAS1234")
    no_data = _print_batch_script("osc-cardinal", *elsewhere, cwd=tmp_path)
    assert no_data.returncode == 3
    assert "lacks data/models/model_general_v3, models/yamnet" in no_data.stderr
    # The decode side reads none of it.
    decode_side = _print_batch_script(
        "osc-cardinal", *elsewhere, "--without-tensorflow", cwd=tmp_path
    )
    assert decode_side.returncode == 0, decode_side.stderr
    assert decode_side.stdout.endswith(" --without-tensorflow\n")


@requires_slurm
@pytest.mark.slurm
def test_batch_script_runs_the_check_in_a_slurm_job(local_slurm, shared_dir, tmp_path):
    """The printed script, submitted to a real SLURM's GPU partition (fake GPUs, so the decode
    side alone), writes its record where it was told."""
    out = tmp_path / "results"
    printed = _print_batch_script(
        "local-slurm",
        *("--without-tensorflow", "--quick", "--shared", str(shared_dir), "--out", str(out)),
        cwd=tmp_path,
    )
    assert printed.returncode == 0, printed.stderr
    run_batch_job(printed.stdout, tmp_path)
    (path,) = out.glob("*-device-decode.json")
    record = json.loads(path.read_text())
    assert record["decode_scaling"]["per_core_rtf_all_cores"] > 0
    assert record["loopback"]["bytes_per_s"] > 0
    assert record["projection"]["minutes"] > 0
