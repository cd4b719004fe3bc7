"""One-batch-job mode: scheduler, client and workers as the tasks of a single ``sbatch`` job.

For users who cannot keep a login-node process alive for the whole run. The batch script
(:func:`batch_script`) runs ``srun python -m buzzdask.cluster --in-job ...``; in each task
dask-jobqueue's :class:`~dask_jobqueue.slurm.SLURMRunner` picks a role by ``SLURM_PROCID``:
task 0 is the scheduler, task 1 runs the analysis, tasks 2 .. 1+gpus are GPU workers (one GPU
each, ``resources={"GPU": 1}``) and the rest decode.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import dask.config
from dask.utils import parse_bytes

from buzzdask.cluster.configs import load_cluster_config
from buzzdask.cluster.options import JobOptions
from buzzdask.errors import ParameterError

__all__ = ["batch_script", "run_in_job"]

FIRST_WORKER_RANK = 2  # SLURMRunner: rank 0 scheduler, rank 1 client


def batch_script(
    name: str | os.PathLike[str],
    command: Sequence[str],
    *,
    gpus: int = 0,
    cpu_workers: int = 1,
    **job_options: Any,
) -> str:
    """The sbatch script running ``command`` (``analyze ...``) on a cluster inside one job.

    Parameters
    ----------
    name : str or path-like
        A SLURM configuration of ``cluster_configs/``: its sections give the cores and memory
        of the workers, the partitions, module lines and log directory.
    command : sequence of str
        ``buzzdask`` command line arguments, e.g. ``["analyze", "audio/", "--model", ...]``.
    gpus, cpu_workers : int
        GPU worker tasks (one GPU each) and CPU (decode) worker tasks.
    **job_options
        The fields of :class:`~buzzdask.cluster.options.JobOptions`. Of them ``account``,
        ``walltime`` and the partition (``gpu_queue`` when ``gpus`` > 0, else ``queue``) apply
        to the job; the workers' cores, memory and the log directory come from the
        configuration's sections.

    Returns
    -------
    str
        The script; submit it with ``sbatch``.
    """
    options = JobOptions(**job_options)
    entry = load_cluster_config(name)
    if entry["kind"] != "slurm":
        raise ParameterError(f"{entry['name']!r} is a {entry['kind']} cluster: it has no jobs")
    cpu = dask.config.get(f"jobqueue.{entry['cpu-config']}")
    gpu = dask.config.get(f"jobqueue.{entry['gpu-config']}")
    main = gpu if gpus else cpu
    account = options.account or main["account"]
    queue = (options.gpu_queue if gpus else options.queue) or main["queue"]
    tasks = FIRST_WORKER_RANK + gpus + cpu_workers
    memory = cpu_workers * parse_bytes(cpu["memory"]) + gpus * parse_bytes(gpu["memory"])
    memory += 2 * 2**30  # scheduler and client
    lines = [
        "#!/usr/bin/env bash",
        "#SBATCH -J buzzdask",
        f"#SBATCH -p {queue}",
        *([f"#SBATCH -A {account}"] if account else []),
        f"#SBATCH -t {options.walltime or main['walltime']}",
        "#SBATCH --nodes=1",
        f"#SBATCH --ntasks={tasks}",
        f"#SBATCH --cpus-per-task={cpu['cores']}",
        f"#SBATCH --mem={memory // 2**20}M",
        *([f"#SBATCH --gpus-per-node={gpus}"] if gpus else []),
    ]
    if main["log-directory"]:
        lines.append(f"#SBATCH -o {main['log-directory']}/buzzdask-%j.out")
    lines += [*main["job-script-prologue"], ""]
    in_job = [
        *(sys.executable, "-m", "buzzdask.cluster", "--config", entry["name"]),
        *("--gpus", str(gpus), "--in-job", *command),
    ]
    lines.append("srun " + shlex.join(in_job))
    return "\n".join(lines) + "\n"


def run_in_job(command: Sequence[str], *, gpus: int, scheduler_file: str | None = None) -> int:
    """Play this task's part in a one-batch-job run (see the module docstring); run under ``srun``.

    Returns
    -------
    int
        The client task: the ``buzzdask`` command's exit code. Other tasks return 0 once the
        client has finished and closed the scheduler.
    """
    from dask_jobqueue.slurm import SLURMRunner
    from distributed import Client

    from buzzdask import cli
    from buzzdask.session import no_work_stealing

    rank = int(os.environ.get("SLURM_PROCID", "-1"))
    if rank < 0:
        raise ParameterError("--in-job runs as a task of a SLURM job step (srun)")
    worker_options: dict[str, Any] = {"nthreads": len(os.sched_getaffinity(0))}
    if os.environ.get("TMPDIR"):
        worker_options["local_directory"] = os.environ["TMPDIR"]
    gpu_index = rank - FIRST_WORKER_RANK
    if 0 <= gpu_index < gpus:
        # One GPU per GPU worker, chosen among the job's own (SLURM sets the list).
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
        if gpu_index < len(visible) and visible[gpu_index]:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[gpu_index]
        worker_options["resources"] = {"GPU": 1}
    job_id = os.environ.get("SLURM_JOB_ID", "0")
    # All tasks share one node (--nodes=1), so the job's node-local $TMPDIR serves them all.
    scheduler_file = scheduler_file or os.path.join(
        os.environ.get("TMPDIR") or os.environ.get("SLURM_SUBMIT_DIR", "."),
        f".buzzdask-scheduler-{job_id}.json",
    )
    try:
        with (
            no_work_stealing(),  # this task's scheduler, if it is rank 0
            SLURMRunner(
                scheduler_file=scheduler_file,
                worker_options=worker_options,
                scheduler_options={"dashboard_address": ":8787"},
            ) as runner,
            Client(runner) as client,
        ):
            client.wait_for_workers(runner.n_workers)  # tasks minus scheduler and client
            print(f"buzzdask: dashboard: {client.dashboard_link} (job {job_id})", flush=True)
            return cli.main(list(command), client=client)
    except KeyboardInterrupt:  # SLURMRunner ends the scheduler and worker tasks with SIGINT
        return 0
