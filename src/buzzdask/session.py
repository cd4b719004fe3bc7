"""Where work runs, for analyze, train and watch alike.

The caller's cluster or a local one started for one call; which workers hold scorer actors;
task keys the dashboard groups by; the package versions recorded with every result.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import dask
import dask.base
import distributed
import pandas as pd
from distributed import Client, LocalCluster
from distributed.comm import get_address_host

from buzzdask.dashboard import local_dashboard_lines
from buzzdask.logs import check_main_guard, quiet_environment
from buzzdask.settings import LocalClusterSettings

__all__ = [
    "connect",
    "has_gpu",
    "no_work_stealing",
    "package_versions",
    "scorer_hosts",
    "scorers_per_host",
    "start_local_cluster",
    "task_key",
    "tensorflow_version",
]


@contextmanager
def connect(
    client: Client | str | None, *, local: LocalClusterSettings, processes: bool = True
) -> Iterator[Client]:
    """The client to run on: ``client`` itself, one for a scheduler address, or a local cluster.

    A client made here (for an address, or with its local cluster, sized by ``local``, of
    worker processes unless ``processes`` is false) is closed on exit; the caller's own client
    is left open.
    """
    if isinstance(client, Client):
        yield client
    elif isinstance(client, str):
        with Client(client) as connected:
            yield connected
    else:
        with (
            start_local_cluster(local, processes=processes) as cluster,
            Client(cluster) as started,
        ):
            print("buzzdask: started a local Dask cluster")
            if local.dashboard_address is not None:
                for line in local_dashboard_lines(started):
                    print(f"buzzdask: {line}")
            yield started


def start_local_cluster(settings: LocalClusterSettings, *, processes: bool = True) -> LocalCluster:
    """Worker processes that each decode and hold a scorer (2 unless configured).

    ``settings`` are ``buzzdask.local-cluster.*``: workers (null: 2), threads per worker
    (null: every core; decode threads only wait on ffmpeg), dashboard address. The worker
    processes inherit :func:`~buzzdask.logs.quiet_environment`'s settings.

    ``processes=False``: one worker of threads in this process instead, which starts in a
    fraction of the time; for work that decodes nothing (a re-scoring), where a worker process
    would isolate nothing and only cost its start.

    Raises
    ------
    BuzzdaskError
        Called from a script's top level without a ``__main__`` guard (see
        :func:`~buzzdask.logs.check_main_guard`).
    """
    if processes:
        check_main_guard()
    quiet_environment()
    with no_work_stealing():
        return LocalCluster(
            n_workers=(settings.n_workers or 2) if processes else 1,
            threads_per_worker=settings.threads_per_worker or os.cpu_count() or 1,
            processes=processes,
            dashboard_address=settings.dashboard_address,
        )


@contextmanager
def no_work_stealing() -> Iterator[None]:
    """Schedulers started inside this block do not steal tasks between workers.

    Stealing moves decode tasks (loosely restricted to the decode workers) onto the scorer's
    worker, where ffmpeg then competes with TensorFlow: measured 209x -> 291x realtime on
    two cores with it off (benchmarks/).
    """
    with dask.config.set({"distributed.scheduler.work-stealing": False}):
        yield


def has_gpu(worker: Mapping[str, Any]) -> bool:
    """Whether a worker (an entry of ``scheduler_info()["workers"]``) declares a GPU resource."""
    return worker.get("resources", {}).get("GPU", 0) > 0


def scorer_hosts(
    workers: Mapping[str, Mapping[str, Any]], *, cpu_workers: int | None = 1
) -> list[str]:
    """Workers for scorer actors: every GPU worker, else the first ``cpu_workers`` by address.

    ``cpu_workers=None``: every worker (a CPU-only cluster scores on all of them).
    """
    gpu = sorted(address for address, worker in workers.items() if has_gpu(worker))
    return gpu or sorted(workers)[:cpu_workers]


def scorers_per_host(addresses: Sequence[str]) -> dict[str, int]:
    """How many of the scorer ``addresses`` share each one's host (they split its cores)."""
    hosts = {address: get_address_host(address) for address in addresses}
    counts = Counter(hosts.values())
    return {address: counts[host] for address, host in hosts.items()}


def task_key(prefix: str, *parts: Any) -> str:
    """A unique task key; the dashboard groups tasks by ``prefix`` (decode, score...)."""
    return f"{prefix}-{dask.base.tokenize(*parts, uuid.uuid4().hex)}"


def tensorflow_version() -> str:
    """TensorFlow's version in this process: the loaded module's, else the installed one's.

    Not imported here: a scorer with NumPy heads only never loads it.
    """
    module = sys.modules.get("tensorflow")
    if module is not None:
        return str(module.__version__)
    for distribution in ("tensorflow", "tensorflow-cpu", "tensorflow-macos"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def package_versions() -> dict[str, str]:
    """Versions recorded in results' metadata (TensorFlow's comes from the scorer's worker)."""
    import pyarrow

    from buzzdask import __version__

    return {
        "buzzdask": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }
