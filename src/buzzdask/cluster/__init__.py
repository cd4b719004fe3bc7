"""Start a buzzdask cluster from a configuration of ``cluster_configs/``.

>>> client = buzzdask.cluster.start("osc-cardinal", account="PAS1234", gpus=2, cpu_workers=8)
>>> buzzdask.analyze("audio_in/", "general_v3", output="results/2024", client=client)
>>> client.shutdown()  # cancels the worker jobs

``python -m buzzdask.cluster`` does the same from a shell (see :mod:`buzzdask.cluster.__main__`).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from typing import Any

from distributed import Client
from distributed.core import Status

from buzzdask.cluster.configs import (
    available_configs,
    load_cluster_config,
    load_slurm_config,
    worker_counts,
)
from buzzdask.cluster.options import ACCOUNT_PLACEHOLDER, JobOptions, job_kinds
from buzzdask.cluster.slurm import BuzzdaskSLURMCluster, job_script, scorer_worker_args
from buzzdask.dashboard import local_dashboard_lines
from buzzdask.dashboard_page import add_page
from buzzdask.errors import ParameterError
from buzzdask.session import lean_dask, start_local_cluster
from buzzdask.settings import load_settings

logger = logging.getLogger(__name__)

#: The SLURM clusters :func:`start` made in this process (the keepalive holds each alive).
_STARTED: weakref.WeakSet[BuzzdaskSLURMCluster] = weakref.WeakSet()

__all__ = [
    "BuzzdaskSLURMCluster",
    "JobOptions",
    "available_configs",
    "dashboard_hints",
    "job_scripts",
    "load_cluster_config",
    "start",
]


def start(
    name: str | os.PathLike[str] = "local",
    *,
    gpus: int | None = None,
    cpu_workers: int | None = None,
    timeout: float | None = None,
    **job_options: Any,
) -> Client:
    """Start the cluster of a configuration and return a client once its workers are up.

    Parameters
    ----------
    name : str or path-like, default: "local"
        A configuration of ``cluster_configs/`` (``"osc-cardinal"``, ``"osc-ascend"``,
        ``"osc-pitzer"``, ``"local-slurm"``, ``"local"``) or the path of such a YAML file.
    gpus : int >= 0, optional
        GPU worker jobs, one GPU each, each holding a scorer actor. With 0 every CPU worker
        holds a scorer (each job needs memory for TensorFlow then). Default: the
        configuration's ``gpus``, else 0.
    cpu_workers : int > 0, optional
        CPU (decode) worker jobs; for ``"local"``, decoding worker processes. Default: the
        configuration's ``cpu-workers``, else 1.
    timeout : float > 0 [s], optional
        How long to wait for the workers (default ``buzzdask.cluster-wait-seconds``).
    **job_options
        The fields of :class:`JobOptions`, overriding the configuration's worker jobs:
        ``account="PAS1234"``, ``walltime``, ``queue``, ``gpu_queue``, ``memory``... A
        ``"local"`` cluster has no jobs and ignores them.

    Returns
    -------
    distributed.Client
        Connected to the new cluster (``client.cluster``); ``client.shutdown()`` stops it.
        Its dashboard has the buzzdask page already (:func:`~buzzdask.dashboard_page.add_page`).
        A SLURM cluster an earlier ``start`` in this process left running is closed first, with
        a warning: a notebook cell run again would otherwise leave its jobs in the queue, each
        one replaced as it ends, for as long as the kernel lives.

    Raises
    ------
    ParameterError
        For an unknown configuration or a bad count, for a whole-node layout
        (``osc-cardinal-node``: one batch job, :func:`~buzzdask.cluster.batch.batch_script`),
        or, before any job is submitted, when the configuration requires an account (the OSC
        ones) and none is given.
    TypeError
        For a keyword that is not a job option.
    ClusterError
        With sbatch's own message if it rejects a job, or the jobs' squeue states and log
        files if the workers do not arrive in time.
    """
    options = JobOptions(**job_options)
    entry = load_cluster_config(name)
    given = cpu_workers
    gpus, cpu_workers = worker_counts(entry, gpus=gpus, cpu_workers=cpu_workers)
    if cpu_workers < 1:  # a batch job's GPU workers decode too; these jobs' do not
        asked = (
            f"cpu_workers={cpu_workers} (--cpu-workers)"
            if given is not None
            else f"cpu-workers: {cpu_workers} in cluster configuration {entry['name']!r}"
        )
        raise ParameterError(
            f"{asked} must be >= 1: a cluster's workers without a GPU decode the audio"
        )
    local = {
        "n_workers": 1 + cpu_workers,
        "threads_per_worker": entry.get("threads-per-worker"),
        "dashboard_address": entry.get("dashboard-address"),
    }
    settings = load_settings(cluster_wait_seconds=timeout, local_cluster=local)
    wait_s = settings.cluster_wait_seconds
    if entry["kind"] == "local":
        if gpus:
            raise ParameterError(
                f"gpus={gpus}: a local cluster uses this machine's GPU, if any, by itself"
            )
        return _with_page(Client(start_local_cluster(settings.local_cluster)))
    _refuse_whole_node(entry)
    options.require_account(entry, job_kinds(gpus))
    cpu_job_kwargs = options.overrides("cpu", section=entry["cpu-config"])
    if not gpus:  # every CPU worker holds a scorer, as the GPU workers otherwise do
        cpu_job_kwargs["worker_extra_args"] = scorer_worker_args(
            entry["cpu-config"], cpu_job_kwargs.get("worker_extra_args")
        )
    # First: its jobs could hold what the new ones need (a per-user GPU limit) and keep them
    # queued. A start that then fails leaves none: the cell is run again, fixed.
    _close_earlier_clusters()
    with lean_dask():  # the scheduler runs here, in this process
        slurm = BuzzdaskSLURMCluster(
            config_name=entry["cpu-config"],
            gpu_config_name=entry["gpu-config"],
            gpu_job_kwargs=options.overrides("gpu", section=entry["gpu-config"]),
            **cpu_job_kwargs,
        )
    try:
        slurm.scale(jobs=cpu_workers, gpus=gpus)
        processes = slurm._dummy_job.worker_processes
        slurm.wait_for_workers_by_kind(
            gpus=gpus, cpu_workers=cpu_workers * processes, timeout=wait_s
        )
    except BaseException:
        slurm.close()
        raise
    _STARTED.add(slurm)
    return _with_page(Client(slurm))


def _close_earlier_clusters() -> None:
    """Close the SLURM clusters earlier :func:`start` calls in this process left running."""
    for earlier in list(_STARTED):
        _STARTED.discard(earlier)
        if earlier.status in (Status.closing, Status.closed):
            continue
        logger.warning(
            "closing the SLURM cluster an earlier buzzdask.cluster.start() in this process "
            "left running (%s): one at a time, or its jobs would stay queued as long as this "
            "process lives",
            ", ".join(f"job {job_id}" for job_id in _job_ids(earlier)) or "no job",
        )
        earlier.close()


def _job_ids(cluster: BuzzdaskSLURMCluster) -> list[str]:
    return sorted(
        str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)
    )


def _with_page(client: Client) -> Client:
    add_page(client)
    return client


def job_scripts(
    name: str | os.PathLike[str], *, gpus: int | None = None, **job_options: Any
) -> dict[str, str]:
    """The batch scripts :func:`start` would submit, without submitting or starting anything.

    Parameters
    ----------
    name : str or path-like
        A SLURM configuration (see :func:`start`).
    gpus : int >= 0, optional
        GPU workers of the run. 0: the CPU worker job alone, which then holds the scorers and
        preloads TensorFlow, as ``start(gpus=0)`` submits it. Default: both jobs, as a run
        with GPU workers submits them.
    **job_options
        The fields of :class:`JobOptions` (``account``, ``walltime``, ``queue``...).

    Returns
    -------
    dict
        ``{"cpu": script, "gpu": script}`` (``"cpu"`` alone with ``gpus=0``). Where the
        configuration requires an account and none is given, the scripts show
        ``-A <PROJECT>``: they are for reading (:func:`start` refuses to submit without one),
        and sbatch would refuse that line rather than charge a default project.

    Raises
    ------
    ParameterError
        For a configuration without worker jobs of its own: ``"local"``, a whole-node layout.
    """
    options = JobOptions(**job_options)
    entry = load_slurm_config(name)
    _refuse_whole_node(entry)
    kinds = job_kinds(gpus)
    scripts: dict[str, str] = {}
    for kind in kinds:
        overrides = options.overrides(kind, section=entry[f"{kind}-config"])
        if options.missing_accounts(entry, (kind,)):
            overrides["account"] = ACCOUNT_PLACEHOLDER
        if kind == "gpu" or gpus == 0:  # the scorers' jobs, as start submits them
            overrides["worker_extra_args"] = scorer_worker_args(
                entry[f"{kind}-config"], overrides.get("worker_extra_args")
            )
        scripts[kind] = job_script(entry[f"{kind}-config"], **overrides)
    return scripts


def _refuse_whole_node(entry: Mapping[str, Any]) -> None:
    """Refuse worker jobs of their own for a layout that is one whole node in one batch job.

    Raises
    ------
    ParameterError
        Naming ``--print-batch-script`` and the system's configuration (``extends``).
    """
    if entry.get("whole-node"):
        raise ParameterError(
            f"{entry['name']} is one whole node in one batch job: print its script with "
            f"--print-batch-script (buzzdask.cluster.batch.batch_script), or use --config "
            f"{entry.get('extends', '<system>')} for worker jobs of their own"
        )


def dashboard_hints(client: Client, name: str | os.PathLike[str] = "local") -> list[str]:
    """How to reach the dashboard of a cluster whose scheduler runs in this process.

    Parameters
    ----------
    client : distributed.Client
        Connected to the cluster (from :func:`start`).
    name : str or path-like, default: "local"
        Its configuration: ``login-host`` gives the ssh tunnel, ``dashboard-proxy`` the
        OnDemand link.

    Returns
    -------
    list of str
        Lines to print: the link by this node's name and real port, an ssh tunnel from your
        computer, OnDemand's proxy (see :func:`buzzdask.dashboard.dashboard_links`).
    """
    entry = load_cluster_config(name)
    return local_dashboard_lines(
        client, proxy=entry.get("dashboard-proxy"), login_host=entry.get("login-host")
    )
