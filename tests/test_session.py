"""The local cluster buzzdask starts: one worker that decodes and scores, lean Dask settings,
and TensorFlow imported early only where a worker will score; workers that import only what
their tasks use; processes that end without Python's last garbage collection; native thread
pools held to one thread where the workers are threads of this process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import dask
import pytest
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_info, threadpool_limits

from buzzdask import ClusterError, ParameterError
from buzzdask.logs import WorkerLogging
from buzzdask.session import connect, start_local_cluster, worker_environment
from buzzdask.settings import LocalClusterSettings
from tests.conftest import in_a_fresh_interpreter, wait_until, write_audio


def _settings(**changes: object) -> LocalClusterSettings:
    options: dict = {"n_workers": None, "threads_per_worker": None, "scorers": 1}
    options.update(changes)
    return LocalClusterSettings(dashboard_address=None, **options)


def _tensorflow_loaded() -> bool:
    return "tensorflow" in sys.modules


def _numpy_asks_for_huge_pages() -> bool:
    try:
        from numpy._core.multiarray import _get_madvise_hugepage
    except ImportError:  # numpy < 2 (pyproject allows 1.26)
        from numpy.core.multiarray import _get_madvise_hugepage

    return bool(_get_madvise_hugepage())


def test_one_worker_with_lean_dask_that_imports_tensorflow_once_logging_is_set(
    monkeypatch,
) -> None:
    from distributed import Client

    # A variable already in this process's environment wins; a nanny of Dask's defaults, started
    # earlier in this process, leaves its own trim threshold there.
    for name in worker_environment():
        monkeypatch.delenv(name, raising=False)
    with start_local_cluster(_settings()) as cluster, Client(cluster) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        assert client.run(lambda: dask.config.get("distributed.worker.profile.enabled")) == {
            address: False for address in client.scheduler_info()["workers"]
        }
        assert cluster.scheduler.extensions.get("stealing") is None
        # glibc reads its settings at the worker process's start, from the nanny's environment.
        assert set(client.run(os.getenv, "MALLOC_MMAP_THRESHOLD_").values()) == {"16777216"}
        assert set(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values()) == {"33554432"}
        # numpy, as it was imported there, read that it asks for no huge pages.
        assert set(client.run(_numpy_asks_for_huge_pages).values()) == {False}
        # TensorFlow in the workers imports tf_keras; this process keeps its own Keras.
        assert set(client.run(os.getenv, "TF_USE_LEGACY_KERAS").values()) == {"1"}
        assert "TF_USE_LEGACY_KERAS" not in os.environ
        # The import waits for the run's logging settings, as a scorer's own import would.
        time.sleep(1.0)
        assert not any(client.run(_tensorflow_loaded).values())
        client.register_plugin(WorkerLogging())
        wait_until(
            lambda: all(client.run(_tensorflow_loaded).values()),
            timeout_s=60,
            failure="TensorFlow was never imported",
            interval_s=0.2,
        )


def test_workers_that_only_decode_do_not_import_tensorflow() -> None:
    with start_local_cluster(_settings(n_workers=2, threads_per_worker=1)) as cluster:
        assert [spec["options"].get("preload") for spec in cluster.worker_spec.values()] == [
            [],
            [],
        ]
    with start_local_cluster(_settings(n_workers=2, threads_per_worker=1, scorers=None)) as cluster:
        assert {str(spec["options"].get("preload")) for spec in cluster.worker_spec.values()} == {
            "['buzzdask.preload']"
        }


def _blas_threads() -> frozenset[int]:
    pools = threadpool_info()
    return frozenset(pool["num_threads"] for pool in pools if pool["user_api"] == "blas")


def test_a_local_cluster_of_threads_runs_native_pools_on_one_thread() -> None:
    assert _blas_threads(), "no BLAS library loaded (numpy has one)"
    # Whatever this machine's cores, the pools hold two threads before and after.
    with threadpool_limits(limits=2):
        before = _blas_threads()
        with connect(None, local=_settings(), processes=False) as client:
            assert _blas_threads() == {1}
            # The worker's threads are this process's: they see the same pools.
            assert set(client.run(_blas_threads).values()) == {frozenset({1})}
        assert _blas_threads() == before
        # Worker processes get theirs from Dask's nanny (OPENBLAS_NUM_THREADS=1); this process
        # keeps its own.
        with connect(None, local=_settings(threads_per_worker=1), processes=True) as client:
            assert set(client.run(_blas_threads).values()) == {frozenset({1})}
            assert _blas_threads() == before


def test_a_local_cluster_takes_the_cores_this_process_may_use() -> None:
    """A SLURM job (an OnDemand notebook) given 1 core of a node: a thread, not one per core."""
    script = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from buzzdask.session import start_local_cluster\n"
        "from buzzdask.settings import LocalClusterSettings\n"
        "settings = LocalClusterSettings(n_workers=None, threads_per_worker=None, scorers=1,"
        " dashboard_address=None)\n"
        "with start_local_cluster(settings, processes=False) as cluster:\n"
        "    print([w.nthreads for w in cluster.scheduler.workers.values()], os.cpu_count() > 1)"
    )
    assert in_a_fresh_interpreter(script)[-1] == "[1] True"


def test_a_dashboard_port_in_use_is_no_warning() -> None:
    # A shared login node: another user's cluster holds the port; the dashboard line gives
    # the one Dask picks instead.
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = replace(_settings(), dashboard_address=f":{port}")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            with connect(None, local=settings, processes=False) as client:
                assert client.dashboard_link and f":{port}/" not in client.dashboard_link


#: Modules a worker process never needs: the client's planning and extras, pandas, and Keras.
CLIENT_SIDE_MODULES = (
    "buzzdask.analysis",
    "buzzdask.exports",
    "buzzdask.plots",
    "buzzdask.training",
    "matplotlib",
    "pandas",
    "tf_keras",
    "keras",
)


def test_a_worker_imports_only_what_its_tasks_use(tiny_embedder, tiny_model, tmp_path) -> None:
    from distributed import Client

    import buzzdask
    from tests.conftest import SHARED_DIR

    with start_local_cluster(_settings()) as cluster, Client(cluster) as client:
        result = buzzdask.analyze(
            [SHARED_DIR / "data" / "audio_in" / "testbuzz.mp3"],
            tiny_model,
            output=tmp_path / "out",
            client=client,
            embedder=str(tiny_embedder),
            progress=False,
        )
        assert result.summary["frames"] > 0
        # A function pickled by value: by reference, the worker would import this test module,
        # and with it the tests' pandas.
        loaded = client.run(lambda names=CLIENT_SIDE_MODULES: sorted(set(names) & set(sys.modules)))
        assert list(loaded.values()) == [[]]
        # A worker without GPUs imported TensorFlow lean (buzzdask.preload.lean_tensorflow).
        kinds = client.run(
            lambda: (
                type(sys.modules["tensorflow"]).__name__,
                "tensorflow._api.v2.math" in sys.modules,
            )
        )
        assert list(kinds.values()) == [("_LeanTensorFlow", False)]


def test_analyze_imports_pandas_only_once_its_cluster_starts() -> None:
    # Everything imported before the local cluster's worker is spawned delays the run's start;
    # pandas (0.2 s) only makes the results' tables (buzzdask.analysis.import_in_background).
    names = "import sys, buzzdask.cli, buzzdask.analysis; print('pandas' in sys.modules)"
    assert in_a_fresh_interpreter(names, timeout=120) == ["False"]


def test_importing_buzzdask_leaves_its_public_names_to_first_use() -> None:
    names = "import buzzdask, sys; print(sorted(set(sys.modules) & {'pandas', 'pyarrow'}))"
    assert in_a_fresh_interpreter(names, timeout=120) == ["[]"]
    import buzzdask

    for name in buzzdask.__all__:
        assert getattr(buzzdask, name) is not None, name
    assert set(buzzdask.__all__) <= set(dir(buzzdask))
    assert buzzdask.analyze is __import__("buzzdask.analysis").analysis.analyze
    # The modules the README names after `import buzzdask` alone.
    names = (
        "import buzzdask; print(buzzdask.settings.load_settings().chunk_seconds, buzzdask.cluster)"
    )
    assert in_a_fresh_interpreter(names, timeout=120)[0].startswith(
        "600.0 <module 'buzzdask.cluster'"
    )


def _exit_with_a_witness(code: str) -> list[str]:
    """What ``code`` prints in a fresh interpreter whose first ``atexit`` handler, which runs
    last, prints whether the collector was frozen by then."""
    witness = (
        "import atexit, gc\natexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))"
    )
    return in_a_fresh_interpreter(f"{witness}\n{code}", timeout=120)


def test_a_worker_preload_skips_the_final_collection_at_exit() -> None:
    done = _exit_with_a_witness("from buzzdask import preload; preload.dask_setup(None)")
    assert done == ["frozen True"]
    assert _exit_with_a_witness("import buzzdask.preload") == ["frozen False"]


def test_the_command_line_skips_the_final_collection_at_exit(tmp_path) -> None:
    done = _exit_with_a_witness(f"from buzzdask.cli import main; main(['init', {str(tmp_path)!r}])")
    *created, witness = done
    assert witness == "frozen True"
    assert created[0] == f"created {tmp_path / 'audio_in' / 'README.md'}"


# A notebook's own cluster and client (not the default one), used for a run and then for its
# own work; a run interrupted as a notebook interrupts (SIGINT in the kernel's main thread),
# its traceback kept as the notebook keeps its last.
_OWN_CLUSTER = """
import os, signal, sys, threading, time
from pathlib import Path
from distributed import Client, LocalCluster
import buzzdask


def talk():
    print("WORKER AFTER THE RUN", file=sys.stderr, flush=True)


def interrupt_once(journal):
    while not journal.exists():
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    audio, model, embedder, out = sys.argv[1:5]
    cluster = LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=None)
    client = Client(cluster, set_as_default=False)
    options = {"client": client, "embedder": embedder, "progress": False}
    print("finished", buzzdask.analyze(audio, model, output=f"{out}/a", **options).ok)
    client.submit(talk, pure=False).result()
    threading.Thread(target=interrupt_once, args=(Path(f"{out}/b/journal.jsonl"),)).start()
    try:
        buzzdask.analyze(audio, model, output=f"{out}/b", chunk_seconds=1.0, **options)
    except KeyboardInterrupt:
        kept = sys.exc_info()[2]
        print("interrupted")
    time.sleep(1)
    print("held", sorted(key for keys in client.has_what().values() for key in keys))
    client.close()
    cluster.close()
"""


def test_a_users_own_cluster_is_left_as_it_was(tiny_model, tiny_embedder, tmp_path) -> None:
    """A client that is not the default one runs; its workers' stderr stays the user's; an
    interrupted run leaves no decoded audio, task or scorer on the cluster."""
    audio = write_audio(tmp_path, "a.wav", n_samples=40 * 15360)
    script = tmp_path / "own_cluster.py"
    script.write_text(_OWN_CLUSTER)
    done = subprocess.run(
        [sys.executable, script, audio, tiny_model, tiny_embedder, tmp_path / "out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.splitlines() == ["finished True", "interrupted", "held []"], done.stderr
    assert "WORKER AFTER THE RUN" in done.stderr
    assert "WORKER AFTER THE RUN" not in (tmp_path / "out" / "a" / "buzzdask.log").read_text()
    # The cell says what the interrupt left, as the command line does (the log alone did).
    assert (
        f"buzzdask: interrupted (Ctrl-C): what was written to {tmp_path / 'out' / 'b'} is kept; "
        f"the same call with output='{tmp_path / 'out' / 'b'}' and on_conflict='resume' "
        "finishes the run"
    ) in done.stderr


_LOGGING_CONFIGURED = """
import logging, sys
import buzzdask

if __name__ == "__main__":
    audio, model, embedder, out, level = sys.argv[1:6]
    logging.basicConfig(level=level)
    buzzdask.analyze(audio, model, output=out, embedder=embedder, progress=False)
"""


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_a_notebooks_own_logging_gets_each_line_once(
    tiny_model, tiny_embedder, tmp_path, level
) -> None:
    """Each line once, and only those of the level the notebook asked for (a training's save
    configures logging as ``basicConfig()`` does): the run's INFO lines are for its log file."""
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "empty.wav").write_bytes(b"")
    write_audio(tmp_path / "audio", "a.wav", n_samples=2 * 15360)
    script = tmp_path / "configured.py"
    script.write_text(_LOGGING_CONFIGURED)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, script, tmp_path / "audio", tiny_model, tiny_embedder, out, level],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("empty.wav: empty file") == 1, done.stderr
    assert done.stderr.count("decoding a.wav") == (level == "INFO"), done.stderr
    assert "buzzdask: decoding a.wav" in (out / "buzzdask.log").read_text()


def test_a_client_that_is_no_client_nor_address_is_refused():
    cases = {
        123: r"client=123 must be a distributed\.Client, a scheduler address",
        "": r"the scheduler address is empty",
        "abc": r"scheduler address 'abc': missing port number",
    }
    for client, message in cases.items():
        with pytest.raises(ParameterError, match=message), connect(client, local=_settings()):
            pass
    # A client whose cluster was closed (a notebook's cluster cell run again).
    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        closed = Client(cluster)
    try:
        with (
            pytest.raises(ClusterError, match="the client given is closed: its cluster was"),
            connect(closed, local=_settings()),
        ):
            pass
    finally:
        closed.close()
    # Nothing there, or a TLS address without TLS: a traceback of Dask's, after 30 s.
    unreachable = {
        "tcp://127.0.0.1:1": r"cannot reach the scheduler at tcp://127\.0\.0\.1:1: .*is it running",
        "tls://127.0.0.1:1": r"cannot reach the scheduler at tls://127\.0\.0\.1:1: ",
    }
    for client, message in unreachable.items():
        with (
            dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
            pytest.raises(ClusterError, match=message),
            connect(client, local=_settings()),
        ):
            pass


def test_signals_as_a_cluster_starts_or_closes_wait_for_it():
    import signal

    from buzzdask.session import signals_deferred

    reached_end = False
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # delivered meanwhile: held
        reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Stopping already: the second Ctrl-C is dropped, the close goes on to its end.
    with signals_deferred(stopping=True):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)


def test_peak_rss_is_in_bytes_on_linux_and_macos(monkeypatch) -> None:
    """``ru_maxrss`` is kilobytes on Linux, bytes on macOS (which cannot run here: its word)."""
    import resource

    from buzzdask.session import peak_rss_bytes

    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert 0.5 * kilobytes * 1024 < peak_rss_bytes() < 2 * kilobytes * 1024
    monkeypatch.setattr(sys, "platform", "darwin")
    assert 0.5 * kilobytes < peak_rss_bytes() < 2 * kilobytes


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_python_drops_is_raised_at_the_check(number):
    """Raised inside a finaliser (a Dask future's __del__), Python drops the exception: a
    training went on to write its model and exit 0. The handler it had raises it again."""
    from buzzdask.session import stops_remembered

    class Stop(Exception):
        pass

    def stopping(signal_number, frame):
        raise Stop(signal_number)

    class Finalised:
        def __del__(self) -> None:
            signal.raise_signal(number)

    before = signal.signal(number, stopping)
    try:
        with stops_remembered() as raise_if_stopped:
            Finalised()  # collected at once: the signal's exception lands in its __del__
            signal.signal(number, signal.SIG_IGN)  # the handler it had, whatever is set now
            with pytest.raises(Stop):
                raise_if_stopped()
        assert signal.getsignal(number) is stopping
        with stops_remembered() as raise_if_stopped:
            raise_if_stopped()  # nothing came: nothing raised
    finally:
        signal.signal(number, before)
