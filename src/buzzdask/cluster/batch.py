"""One-batch-job mode: scheduler, client and workers as the tasks of a single ``sbatch`` job.

For users who cannot keep a login-node process alive for the whole run. The batch script
(:func:`batch_script`) asks for one node's worth of the partition at most (:func:`plan_batch_job`)
and runs ``srun python -m buzzdask.cluster --in-job ...``; in each task dask-jobqueue's
:class:`~dask_jobqueue.slurm.SLURMRunner` picks a role by ``SLURM_PROCID``: task 0 is the
scheduler, task 1 runs the analysis, tasks 2 .. 1+gpus are GPU workers (one GPU each,
``resources={"GPU": 1}``) and the rest decode. A layout with ``whole-node: true``
(``osc-cardinal-node``) asks for the whole node and gives the decode workers all that the GPU
workers leave of it.

The tasks share one node (``--nodes=1``) and talk over loopback (127.0.0.1): decoded audio goes
from a decode worker to a scorer through the kernel, never a network interface.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import dask.config
from dask.utils import format_bytes, parse_bytes
from distributed import Scheduler, SchedulerPlugin, Status

from buzzdask import preload
from buzzdask.cluster.configs import (
    NodeSize,
    hyphenated,
    load_slurm_config,
    node_size,
    worker_counts,
)
from buzzdask.cluster.options import JobOptions
from buzzdask.cluster.slurm import job_prologue
from buzzdask.errors import ParameterError
from buzzdask.settings import load_settings

__all__ = [
    "BatchPlan",
    "EndsWithItsClient",
    "WorkerShare",
    "batch_script",
    "job_section",
    "one_node_job_head",
    "plan_batch_job",
    "run_in_job",
]

FIRST_WORKER_RANK = 2  # SLURMRunner: rank 0 scheduler, rank 1 client
# The scheduler and the client mostly wait on the network: one core and a little memory.
RESERVED_CORES = 1
RESERVED_MEMORY = 2 * 2**30  # [bytes]
# All tasks run on one node, and nothing off it needs the scheduler or the workers: listening on
# loopback keeps them (unauthenticated) off the network. The dashboard (":0") listens everywhere,
# for OnDemand's proxy and ssh tunnels.
LOOPBACK = "127.0.0.1"
# The name of the client task's Client: its id, on the scheduler, starts "Client-<name>-".
JOB_CLIENT_NAME = "buzzdask-job"


@dataclass(frozen=True)
class WorkerShare:
    """What one worker task of the batch job gets.

    Attributes
    ----------
    threads : int > 0
        Its Dask threads (``nthreads``).
    memory : int > 0 [bytes]
        Its Dask memory limit.
    """

    threads: int
    memory: int


@dataclass(frozen=True)
class BatchPlan:
    """What the batch job asks SLURM for, and how its worker tasks share it.

    Attributes
    ----------
    cores : int > 0
        ``RESERVED_CORES + gpus * gpu.threads + cpu_workers * cpu.threads``; a whole node's
        cores for a whole-node job (the scheduler and the client keep what does not divide).
    memory : int > 0 [bytes]
        ``RESERVED_MEMORY + gpus * gpu.memory + cpu_workers * cpu.memory``; a whole node's
        memory within its default per core for a whole-node job.
    gpu, cpu : WorkerShare
        One GPU worker task, one CPU worker task.
    """

    cores: int
    memory: int
    gpu: WorkerShare
    cpu: WorkerShare


def plan_batch_job(
    node: NodeSize | None,
    *,
    gpus: int,
    cpu_workers: int,
    gpu: WorkerShare,
    cpu: WorkerShare,
    where: str,
    whole_node: bool = False,
) -> BatchPlan:
    """Share one node between the scheduler, the client and the workers of a batch job.

    The scheduler and the client take ``RESERVED_CORES`` and ``RESERVED_MEMORY``. Each GPU
    worker keeps the cores and memory of its job section (``gpu``). The CPU workers share the
    cores left: ``cpu.threads[i] = min(cpu.threads, (node.cores - RESERVED_CORES -
    gpus * gpu.threads) // cpu_workers)``, with the section's memory per core:
    ``cpu.memory[i] = cpu.memory * cpu.threads[i] / cpu.threads``.

    A ``whole_node`` job asks for all the node's cores and its memory within the default per
    core, ``usable = min(node.memory, node.cores * node.memory_per_core)`` (more would be
    charged as more cores), and its CPU workers share all the GPU workers leave, whatever their
    section's size: ``cpu.threads[i] = (node.cores - RESERVED_CORES - gpus * gpu.threads) //
    cpu_workers``, ``cpu.memory[i] = (usable - RESERVED_MEMORY - gpus * gpu.memory) //
    cpu_workers``.

    Parameters
    ----------
    node : NodeSize or None
        One node of the job's partition; ``None`` (undeclared): the sections' sizes, unchecked.
    gpus, cpu_workers : int >= 0
        GPU and CPU worker tasks; at least one in all.
    gpu, cpu : WorkerShare
        The cores and memory of one GPU and one CPU worker job of the configuration.
    where : str
        The node's name in messages (``"partition 'gpu' of osc-cardinal"``).
    whole_node : bool, default: False
        Ask for the whole node (``node`` must be declared).

    Returns
    -------
    BatchPlan

    Raises
    ------
    ParameterError
        When the workers do not fit the node: more GPUs than it has, less than one core per
        CPU worker, or more memory than it has; the message gives the numbers. For a
        ``whole_node`` job whose node is not declared.
    """
    if gpus < 0 or cpu_workers < 0 or gpus + cpu_workers < 1:
        raise ParameterError(
            f"gpus={gpus}, cpu_workers={cpu_workers}: a batch job needs at least one worker "
            "and no negative count"
        )
    if node is None:
        if whole_node:
            raise ParameterError(
                f"a whole-node job needs the size of one node of {where}: declare it under "
                "buzzdask.clusters.<name>.nodes.<partition> (see osc-nodes.yaml)"
            )
        return _added_up(gpus, cpu_workers, gpu, _in_mib(cpu))
    if gpus > node.gpus:
        raise ParameterError(
            f"{gpus} GPU workers do not fit one node of {where}: it has {node.gpus} GPUs"
        )
    gpu_cores = gpus * gpu.threads
    left = node.cores - RESERVED_CORES - gpu_cores
    threads = cpu.threads
    if cpu_workers:
        shared = max(left, 0) // cpu_workers
        threads = shared if whole_node else min(threads, shared)
    if left < 0 or threads < 1:
        raise ParameterError(
            f"{gpus} GPU and {cpu_workers} CPU workers do not fit one node of {where} "
            f"({node.cores} cores): the scheduler and client take {RESERVED_CORES}, the GPU "
            f"workers {gpu_cores} ({gpu.threads} each), which leaves {max(left, 0)} for the "
            "CPU workers, at least 1 each. Ask for fewer workers, or leave out "
            "--print-batch-script to run the workers as jobs of their own"
        )
    if whole_node:
        usable = min(node.memory, node.cores * node.memory_per_core)
        spare = max(usable - RESERVED_MEMORY - gpus * gpu.memory, 0)
        share = WorkerShare(threads, spare // max(cpu_workers, 1))
    else:
        usable = node.memory
        share = WorkerShare(threads, cpu.memory * threads // cpu.threads)
    plan = _added_up(gpus, cpu_workers, gpu, _in_mib(share))
    if plan.memory > usable:
        raise ParameterError(
            f"{gpus} GPU and {cpu_workers} CPU workers need {format_bytes(plan.memory)} "
            f"(with {format_bytes(RESERVED_MEMORY)} for the scheduler and client); one node of "
            f"{where} has {format_bytes(usable)}. Ask for fewer workers or less memory "
            "per worker (--memory)"
        )
    return replace(plan, cores=node.cores, memory=usable) if whole_node else plan


def _in_mib(share: WorkerShare) -> WorkerShare:
    """``share`` with its memory in whole MiB, as the script passes it."""
    return WorkerShare(share.threads, share.memory // 2**20 * 2**20)


def _added_up(gpus: int, cpu_workers: int, gpu: WorkerShare, cpu: WorkerShare) -> BatchPlan:
    """The plan asking for what the workers' shares and the scheduler's and client's add up to."""
    return BatchPlan(
        cores=RESERVED_CORES + gpus * gpu.threads + cpu_workers * cpu.threads,
        memory=RESERVED_MEMORY + gpus * gpu.memory + cpu_workers * cpu.memory,
        gpu=gpu,
        cpu=cpu,
    )


def batch_script(
    name: str | os.PathLike[str],
    command: Sequence[str],
    *,
    gpus: int | None = None,
    cpu_workers: int | None = None,
    **job_options: Any,
) -> str:
    """The sbatch script running ``command`` (``analyze ...``) on a cluster inside one job.

    The job asks for one node of the partition: ``RESERVED_CORES`` and ``RESERVED_MEMORY``
    for the scheduler and the client, and what :func:`plan_batch_job` gives the workers, never
    more than the configuration's node of that partition (``buzzdask.clusters.<name>.nodes``);
    with ``whole-node: true`` in the configuration's entry, the whole node.
    Its log directory is made now, as an absolute path, since SLURM opens the log before the
    script runs and fails silently on a missing directory.

    Parameters
    ----------
    name : str or path-like
        A SLURM configuration of ``cluster_configs/`` or its path: its sections give the cores
        and memory of the workers, the partitions, module lines and log directory.
    command : sequence of str
        ``buzzdask`` command line arguments, e.g. ``["analyze", "audio/", "--model", ...]``.
    gpus, cpu_workers : int >= 0, optional
        GPU worker tasks (one GPU each) and CPU (decode) worker tasks (default: the
        configuration's ``gpus`` and ``cpu-workers``, else 0 and 1: :func:`worker_counts`).
    **job_options
        The fields of :class:`~buzzdask.cluster.options.JobOptions`, over the configuration's
        sections; the GPU section's account, walltime, partition and log directory apply when
        ``gpus`` > 0, else the CPU section's.

    Returns
    -------
    str
        The script; submit it with ``sbatch``.

    Raises
    ------
    ParameterError
        For a configuration that is not SLURM, a missing account where one is required,
        workers that do not fit one node (:func:`plan_batch_job`), or the size of a CPU job
        (``cores``, ``memory``) given for a whole node, whose CPU workers share what is left.
    """
    options = JobOptions(**job_options)
    entry = load_slurm_config(name)
    whole_node = bool(entry.get("whole-node"))
    if whole_node and (options.cores or options.memory):
        raise ParameterError(
            f"{entry['name']} fills one node: its decode workers share the cores and memory the "
            "GPU workers leave, so --cores and --memory do not apply; change their number "
            "(--cpu-workers) instead"
        )
    gpus, cpu_workers = worker_counts(entry, gpus=gpus, cpu_workers=cpu_workers)
    options.require_account(entry, ("gpu",) if gpus else ("cpu",))
    cpu_overrides = options.overrides("cpu")
    cpu_overrides.update(options.sized_memory(entry["cpu-config"], cpu_overrides))
    cpu = job_section(entry["cpu-config"], cpu_overrides)
    gpu = job_section(entry["gpu-config"], options.overrides("gpu"))
    main = gpu if gpus else cpu
    plan = plan_batch_job(
        node_size(entry, main["queue"]),
        gpus=gpus,
        cpu_workers=cpu_workers,
        gpu=WorkerShare(gpu["cores"], parse_bytes(gpu["memory"])),
        cpu=WorkerShare(cpu["cores"], parse_bytes(cpu["memory"])),
        where=f"partition {main['queue']!r} of {entry['name']}",
        whole_node=whole_node,
    )
    lines = one_node_job_head(
        main, job_name="buzzdask", cores=plan.cores, memory=plan.memory, gpus=gpus
    )
    # The tasks load the configuration again: a name, or a file by its absolute path (the job may
    # start in another directory).
    config = entry["name"] if str(name) == entry["name"] else os.path.abspath(name)
    in_job = [
        *(sys.executable, "-m", "buzzdask.cluster", "--config", config),
        *("--gpus", str(gpus), "--in-job"),
        *("--worker-threads", f"{plan.gpu.threads},{plan.cpu.threads}"),
        *("--worker-memory", f"{plan.gpu.memory // 2**20}MiB,{plan.cpu.memory // 2**20}MiB"),
        *command,
    ]
    tasks = FIRST_WORKER_RANK + gpus + cpu_workers
    # The step takes all the job's cores; its tasks share them unbound (--overcommit: the
    # scheduler and the client share one), each worker running the threads it is given.
    srun = f"srun --ntasks={tasks} --cpus-per-task=1 --overcommit --cpu-bind=none "
    lines.append(srun + shlex.join(in_job))
    return "\n".join(lines) + "\n"


def job_section(name: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``jobqueue.<name>`` with :meth:`JobOptions.overrides` (underscored keywords) applied."""
    # A DASK_JOBQUEUE__... variable gives job_extra_directives, kept so by dask.config.
    return {**hyphenated(dask.config.get(f"jobqueue.{name}")), **hyphenated(overrides)}


# Directives of a worker job's section that one_node_job_head sets for the whole node itself.
_SET_ABOVE = (
    r"(-[JpAtNncoeG](?![A-Za-z-])|--(job-name|partition|account|time|nodes|ntasks|cpus-per-task|mem|"
    r"mem-per-cpu|gpus|gpus-per-node|gres|chdir|output|error)\b)"
)


def one_node_job_head(
    section: Mapping[str, Any], *, job_name: str, cores: int, memory: int, gpus: int
) -> list[str]:
    """An sbatch script's lines up to its command: one task of ``cores`` on one node.

    Its directives (partition, account, walltime, log directory and the other
    ``job-extra-directives`` from ``section``), then the ``DASK_*`` settings of this process,
    the workers' environment and ``section``'s prologue
    (:func:`~buzzdask.cluster.slurm.job_prologue`).
    The log directory is made now, as an absolute path, since SLURM opens the log before the
    script runs and fails silently on a missing directory.

    Parameters
    ----------
    section : mapping
        A ``jobqueue`` section (:func:`job_section`): ``queue``, ``account``, ``walltime``,
        ``log-directory``, ``job-script-prologue``.
    job_name : str
        The job's name; its log is ``<job_name>-<job id>.out``.
    cores : int > 0
    memory : int > 0 [bytes]
    gpus : int >= 0
        Of the node, for the one task.

    Returns
    -------
    list of str
        The lines, the last one empty.
    """
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH -J {job_name}",
        *([f"#SBATCH -p {section['queue']}"] if section["queue"] else []),
        *([f"#SBATCH -A {section['account']}"] if section["account"] else []),
        f"#SBATCH -t {section['walltime']}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cores}",
        f"#SBATCH --mem={memory // 2**20}M",
        *([f"#SBATCH --gpus-per-node={gpus}"] if gpus else []),
        # Where it was printed: the command's relative paths mean what they meant there,
        # wherever sbatch is run from.
        f"#SBATCH --chdir={shlex.quote(os.getcwd())}",
    ]
    if section["log-directory"]:
        logs = os.path.abspath(os.path.expanduser(section["log-directory"]))
        os.makedirs(logs, exist_ok=True)
        lines.append(f"#SBATCH -o {shlex.quote(f'{logs}/{job_name}-%j.out')}")
    # The section's own (a --qos, --constraint, --mail-type the site needs), less those of
    # the one task on one node set above.
    lines += [
        f"#SBATCH {directive}"
        for directive in section.get("job-extra-directives") or []
        if not re.match(_SET_ABOVE, directive.strip())
    ]
    return [
        *lines,
        # The settings it was checked with: sbatch under SBATCH_EXPORT=NONE (OnDemand sets it)
        # starts the job without them, and the variable beats any #SBATCH --export line.
        *(
            f"export {name}={shlex.quote(value)}"
            for name, value in sorted(os.environ.items())
            if name.startswith("DASK_")
        ),
        # The workers' settings, and Lmod for a prologue's module lines, as in a worker job.
        *job_prologue(section["job-script-prologue"]),
        # A job submitted from a notebook's job (OnDemand Jupyter) inherits its SLURM_* variables:
        # its per-CPU memory clashes with this job's --mem in srun, and an inherited
        # SLURM_EXPORT_ENV=NONE would start the tasks with an empty environment.
        "unset SLURM_MEM_PER_CPU SLURM_MEM_PER_GPU",
        "export SLURM_EXPORT_ENV=ALL",
        "",
    ]


class EndsWithItsClient(SchedulerPlugin):
    """The scheduler task of a one-batch job ends some time after the job's client is gone.

    The client task stops the others itself when it ends; killed outright (the OOM killer, a
    ``kill -9``), it cannot, and the scheduler and worker tasks would hold the node (and its
    GPUs) until the walltime. Once the client named :data:`JOB_CLIENT_NAME` has left for
    ``grace_s`` (time to reconnect after a blip), the scheduler closes, and its workers with it.

    Parameters
    ----------
    grace_s : float > 0 [s]
        ``buzzdask.client-lost-seconds``.
    """

    name = "buzzdask-ends-with-its-client"

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._closing: asyncio.Future[None] | None = None

    @staticmethod
    def _job_clients(clients: Iterable[str]) -> list[str]:
        prefix = f"Client-{JOB_CLIENT_NAME}-"
        return [client for client in clients if client.startswith(prefix)]

    def remove_client(self, scheduler: Scheduler, client: str) -> None:
        """Look again in ``grace_s`` when the job's client has left."""
        if self._job_clients([client]):
            asyncio.get_running_loop().call_later(self.grace_s, self._end_if_gone, scheduler)

    def _end_if_gone(self, scheduler: Scheduler) -> None:
        if not self._job_clients(scheduler.clients) and scheduler.status == Status.running:
            print(
                f"buzzdask: the job's client task has been gone for {self.grace_s:g} s (killed?): "
                "the scheduler and worker tasks end",
                file=sys.stderr,
                flush=True,
            )
            # Kept: the loop holds only a weak reference to a task.
            self._closing = asyncio.ensure_future(
                scheduler.close(reason="buzzdask: the job's client is gone")
            )


def run_in_job(
    command: Sequence[str],
    *,
    gpus: int,
    gpu: WorkerShare,
    cpu: WorkerShare,
    entry: Mapping[str, Any],
    scheduler_file: str | None = None,
) -> int:
    """Play this task's part in a one-batch-job run (see the module docstring); run under ``srun``.

    Parameters
    ----------
    command : sequence of str
        The ``buzzdask`` command the client task runs.
    gpus : int >= 0
        GPU worker tasks (ranks 2 .. 1+gpus).
    gpu, cpu : WorkerShare
        Threads and memory limit of a GPU and of a CPU worker task (:func:`plan_batch_job`).
    entry : mapping
        The configuration's ``buzzdask.clusters`` entry (its dashboard proxy and login host).
    scheduler_file : str, optional
        Where the scheduler's address is shared (default: in the job's ``$TMPDIR``).

    Returns
    -------
    int
        The client task: the ``buzzdask`` command's exit code. Other tasks return 0 once the
        client has finished and closed the scheduler.
    """
    from distributed import Client

    from buzzdask import cli
    from buzzdask.cluster._jobqueue import SLURMRunner
    from buzzdask.dashboard import local_dashboard_lines
    from buzzdask.session import lean_dask

    rank = int(os.environ.get("SLURM_PROCID", "-1"))
    if rank < 0:
        raise ParameterError("--in-job runs as a task of a SLURM job step (srun)")
    gpu_index = rank - FIRST_WORKER_RANK
    share = gpu if 0 <= gpu_index < gpus else cpu
    # The tasks are not bound to cores: the planned threads keep the workers within the job's.
    worker_options: dict[str, Any] = {
        "nthreads": share.threads,
        "memory_limit": share.memory,
        "host": LOOPBACK,
    }
    if os.environ.get("TMPDIR"):
        worker_options["local_directory"] = os.environ["TMPDIR"]
    if gpu_index >= 0 and (gpu_index < gpus or not gpus):
        # It holds a scorer (without GPUs, every worker does): TensorFlow's import starts now.
        worker_options["preload"] = [preload.MODULE]
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
    # The runner stops its scheduler and worker tasks by sending itself SIGINT, to this handler
    # (dask_jobqueue.runner's, which buzzdask.cluster._jobqueue takes back at import).
    signal.signal(signal.SIGINT, lambda *_: sys.exit())
    try:
        with (
            lean_dask(),  # this task's scheduler (rank 0) or worker
            SLURMRunner(
                scheduler_file=scheduler_file,
                worker_options=worker_options,
                scheduler_options={
                    # A free port: other jobs' dashboards may share the node.
                    "dashboard_address": ":0",
                    "host": LOOPBACK,
                    "plugins": [EndsWithItsClient(load_settings().client_lost_seconds)],
                },
            ) as runner,
            Client(runner, name=JOB_CLIENT_NAME) as client,
        ):
            client.wait_for_workers(runner.n_workers)  # tasks minus scheduler and client
            print(f"buzzdask: job {job_id}, scheduler at {runner.scheduler_address}", flush=True)
            for line in local_dashboard_lines(
                client, proxy=entry.get("dashboard-proxy"), login_host=entry.get("login-host")
            ):
                print(f"buzzdask: {line}", flush=True)
            return cli.main(list(command), client=client)
    except KeyboardInterrupt:  # SLURMRunner ends the scheduler and worker tasks with SIGINT
        return 0
