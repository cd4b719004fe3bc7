"""The local cluster buzzdask starts: one worker that decodes and scores, lean Dask settings,
and TensorFlow imported early only where a worker will score."""

from __future__ import annotations

import os
import sys
import time

import dask

from buzzdask.logs import WorkerLogging
from buzzdask.session import WORKER_MALLOC, start_local_cluster
from buzzdask.settings import LocalClusterSettings


def _settings(**changes: object) -> LocalClusterSettings:
    options: dict = {"n_workers": None, "threads_per_worker": None, "scorers": 1}
    options.update(changes)
    return LocalClusterSettings(dashboard_address=None, **options)


def _tensorflow_loaded() -> bool:
    return "tensorflow" in sys.modules


def test_one_worker_with_lean_dask_that_imports_tensorflow_once_logging_is_set(
    monkeypatch,
) -> None:
    from distributed import Client

    # A variable already in this process's environment wins; a nanny of Dask's defaults, started
    # earlier in this process, leaves its own trim threshold there.
    for name in WORKER_MALLOC:
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
        # The import waits for the run's logging settings, as a scorer's own import would.
        time.sleep(1.0)
        assert not any(client.run(_tensorflow_loaded).values())
        client.register_plugin(WorkerLogging())
        deadline = time.monotonic() + 60
        while not all(client.run(_tensorflow_loaded).values()):
            assert time.monotonic() < deadline, "TensorFlow was never imported"
            time.sleep(0.2)


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
