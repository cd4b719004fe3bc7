"""Start a buzzdask cluster from a configuration of ``cluster_configs/``.

>>> client = buzzdask.cluster.start("osc-cardinal", account="PAS1234", gpus=2, cpu_workers=8)
>>> buzzdask.analyze("field_audio/", "general_v3", output="results/", client=client)
>>> client.shutdown()  # cancels the worker jobs

``python -m buzzdask.cluster`` does the same from a shell (see :mod:`buzzdask.cluster.__main__`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from distributed import Client

from buzzdask import config
from buzzdask.cluster.configs import available_configs, load_cluster_config
from buzzdask.cluster.slurm import BuzzdaskSLURMCluster, job_script
from buzzdask.errors import ParameterError
from buzzdask.session import no_work_stealing, start_local_cluster

__all__ = [
    "BuzzdaskSLURMCluster",
    "available_configs",
    "dashboard_hints",
    "job_scripts",
    "load_cluster_config",
    "start",
]


def start(
    name: str | os.PathLike[str] = "local",
    *,
    account: str | None = None,
    gpus: int = 0,
    cpu_workers: int = 1,
    walltime: str | None = None,
    queue: str | None = None,
    gpu_queue: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    log_directory: str | None = None,
    job_kwargs: Mapping[str, Any] | None = None,
    gpu_job_kwargs: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> Client:
    """Start the cluster of a configuration and return a client once its workers are up.

    Parameters
    ----------
    name : str or path-like, default: "local"
        A configuration of ``cluster_configs/`` (``"osc-cardinal"``, ``"osc-ascend"``,
        ``"osc-pitzer"``, ``"local-slurm"``, ``"local"``) or the path of such a YAML file.
    account : str, optional
        SLURM account (OSC project, e.g. ``"PAS1234"``) of every job.
    gpus : int >= 0, default: 0
        GPU worker jobs, one GPU each, each holding a scorer actor. With 0 every CPU worker
        holds a scorer (each job needs memory for TensorFlow then).
    cpu_workers : int > 0, default: 1
        CPU (decode) worker jobs; for ``"local"``, decoding worker processes.
    walltime : str, optional
        ``HH:MM:SS`` of every job. Keep ``--lifetime`` in the configuration below it.
    queue, gpu_queue : str, optional
        Partitions of the CPU and of the GPU jobs.
    cores, memory : optional
        Cores and memory (``"32GiB"``) of each CPU job.
    log_directory : str, optional
        Where the jobs' ``.out``/``.err`` logs go.
    job_kwargs, gpu_job_kwargs : mapping, optional
        Any other ``jobqueue`` option of the CPU or GPU jobs (``job_extra_directives``...).
    timeout : float > 0 [s], optional
        How long to wait for the workers (default ``buzzdask.cluster-wait-seconds``).

    Returns
    -------
    distributed.Client
        Connected to the new cluster (``client.cluster``); ``client.shutdown()`` stops it.

    Raises
    ------
    ParameterError
        For an unknown configuration or a bad count.
    ClusterError
        With sbatch's own message if it rejects a job, or the jobs' squeue states and log
        files if the workers do not arrive in time.
    """
    if gpus < 0 or cpu_workers < 1:
        raise ParameterError(f"gpus={gpus} must be >= 0 and cpu_workers={cpu_workers} >= 1")
    entry = load_cluster_config(name)
    timeout = float(config.get("cluster-wait-seconds", timeout))
    if entry["kind"] == "local":
        if gpus:
            raise ParameterError(
                f"gpus={gpus}: a local cluster uses this machine's GPU, if any, by itself"
            )
        cluster = start_local_cluster(
            n_workers=1 + cpu_workers,
            threads_per_worker=entry.get("threads-per-worker"),
            dashboard_address=entry.get("dashboard-address"),
        )
        return Client(cluster)
    cpu_options, gpu_options = _job_options(
        account=account,
        walltime=walltime,
        queue=queue,
        gpu_queue=gpu_queue,
        cores=cores,
        memory=memory,
        log_directory=log_directory,
        job_kwargs=job_kwargs,
        gpu_job_kwargs=gpu_job_kwargs,
    )
    with no_work_stealing():  # the scheduler runs here, in this process
        slurm = BuzzdaskSLURMCluster(
            config_name=entry["cpu-config"],
            gpu_config_name=entry["gpu-config"],
            gpu_job_kwargs=gpu_options,
            **cpu_options,
        )
    try:
        slurm.scale(jobs=cpu_workers, gpus=gpus)
        processes = slurm._dummy_job.worker_processes
        slurm.wait_for_workers_by_kind(
            gpus=gpus, cpu_workers=cpu_workers * processes, timeout=timeout
        )
    except BaseException:
        slurm.close()
        raise
    return Client(slurm)


def job_scripts(
    name: str | os.PathLike[str],
    **options: Any,
) -> dict[str, str]:
    """The batch scripts :func:`start` would submit, without submitting or starting anything.

    Parameters
    ----------
    name : str or path-like
        A SLURM configuration (see :func:`start`).
    **options
        The job options of :func:`start` (``account``, ``walltime``, ``queue``...).

    Returns
    -------
    dict
        ``{"cpu": script, "gpu": script}``.
    """
    entry = load_cluster_config(name)
    if entry["kind"] != "slurm":
        raise ParameterError(f"{entry['name']!r} is a {entry['kind']} cluster: it has no jobs")
    cpu_options, gpu_options = _job_options(**options)
    return {
        "cpu": job_script(entry["cpu-config"], **cpu_options),
        "gpu": job_script(entry["gpu-config"], **gpu_options),
    }


def dashboard_hints(client: Client, name: str | os.PathLike[str] = "local") -> list[str]:
    """How to reach the dashboard: its link, an ssh tunnel and OnDemand's proxy form."""
    link = client.dashboard_link
    hints = [f"dashboard: {link}"]
    entry = load_cluster_config(name)
    parsed = urlparse(link)
    if entry.get("login-host") and parsed.hostname and parsed.port:
        hints.append(
            f"  from your computer: ssh -N -L {parsed.port}:{parsed.hostname}:{parsed.port} "
            f"{getpass.getuser()}@{entry['login-host']}, then open "
            f"http://localhost:{parsed.port}/status"
        )
    if entry.get("dashboard-proxy") and parsed.hostname and parsed.port:
        proxy = entry["dashboard-proxy"].format(host=parsed.hostname, port=parsed.port)
        hints.append(f"  from OnDemand (Jupyter on a compute node): {proxy}")
    return hints


def _job_options(
    *,
    account: str | None = None,
    walltime: str | None = None,
    queue: str | None = None,
    gpu_queue: str | None = None,
    cores: int | None = None,
    memory: str | None = None,
    log_directory: str | None = None,
    job_kwargs: Mapping[str, Any] | None = None,
    gpu_job_kwargs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword overrides of the CPU and GPU ``jobqueue`` sections; unset ones keep the YAML."""
    common = {"account": account, "walltime": walltime, "log_directory": log_directory}
    cpu = {**common, "queue": queue, "cores": cores, "memory": memory, **(job_kwargs or {})}
    gpu = {**common, "queue": gpu_queue, **(gpu_job_kwargs or {})}
    return (
        {k: v for k, v in cpu.items() if v is not None},
        {k: v for k, v in gpu.items() if v is not None},
    )
