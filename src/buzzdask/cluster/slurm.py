"""A dask-jobqueue SLURMCluster with two kinds of worker jobs on one scheduler.

CPU workers decode; GPU workers (one SLURM job per GPU, ``--resources GPU=1``) hold the scorer
actors. Workers retire before their job's walltime (``--lifetime``); the cluster submits a job of
the same kind for every worker that leaves, so a run longer than one walltime completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from tornado.ioloop import PeriodicCallback

from buzzdask import preload
from buzzdask.cluster._jobqueue import SLURMCluster, SLURMJob
from buzzdask.errors import ClusterError
from buzzdask.session import worker_environment
from buzzdask.slurm_jobs import ENDED, ENDING, squeue

logger = logging.getLogger(__name__)

__all__ = [
    "LMOD_INIT",
    "SCORER_PRELOAD",
    "BuzzdaskSLURMCluster",
    "job_prologue",
    "job_script",
    "scorer_worker_args",
    "worker_exports",
]

SCHEDULER_PLACEHOLDER = "tcp://<scheduler-address>:8786"
# Lmod's own start-up file on OSC's nodes (OSC's OnDemand apps source it where no login shell
# ran); a job whose environment already has ``module`` skips it.
LMOD_INIT = "type module >/dev/null 2>&1 || source /etc/profile.d/lmod.sh"
#: Worker arguments of the jobs whose workers hold a scorer: TensorFlow's import starts as the
#: worker does (:mod:`buzzdask.preload`), not when the run creates its actor.
SCORER_PRELOAD = ("--preload", preload.MODULE)


class _Job(SLURMJob):
    """A SLURM worker job that keeps sbatch's refusal, so waiting can report it.

    It runs in the environment of the process that submits it, wherever that is: a login
    shell or a notebook of an OnDemand session (see :func:`job_prologue`).
    """

    # The workers need the client's environment (its Python's libraries, PATH for ffmpeg, DASK_*
    # settings). sbatch exports it unless SBATCH_EXPORT says otherwise (OnDemand submits its
    # own jobs with it set to NONE); the command line beats that variable and any #SBATCH line.
    # sbatch ignores SLURM_EXPORT_ENV (srun's), which OSC's apps set to ALL in their sessions.
    submit_command = "sbatch --export=ALL"
    submit_error: Exception | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        logs = log_directory(kwargs.get("config_name") or self.config_name, kwargs)
        if logs is not None:
            kwargs["log_directory"] = logs
        super().__init__(*args, **kwargs)
        self._job_script_prologue = job_prologue(self._job_script_prologue)
        if logs is not None and self.job_header:
            # dask-jobqueue writes the path unquoted: sbatch refused "logs dir/..." in a line.
            name = self.job_name or "worker"
            for flag, suffix in (("-e", "err"), ("-o", "out")):
                path = f"{logs}/{name}-%J.{suffix}"
                self.job_header = self.job_header.replace(
                    f"#SBATCH {flag} {path}\n", f"#SBATCH {flag} {shlex.quote(path)}\n"
                )

    async def start(self) -> None:
        try:
            await super().start()
        except Exception as error:
            self.submit_error = error
            self.status = Status.failed  # so closing the cluster accepts a job that never ran
            # Reported in one line (BuzzdaskSLURMCluster.wait_for_workers_by_kind).
            error.__dict__[_REPORTED] = True
            raise


def log_directory(config_name: str, job_kwargs: Mapping[str, Any]) -> str | None:
    """Where a worker job's logs go, ``~`` expanded.

    dask-jobqueue takes ``~/logs`` (``--log-directory=~/logs``, or a ``jobqueue.yaml``'s) as a
    folder named ``~`` in the working directory, and made it there.
    """
    logs = job_kwargs.get("log_directory") or dask.config.get(
        f"jobqueue.{config_name}.log-directory", None
    )
    return None if logs is None else os.path.expanduser(str(logs))


_ENDED_LOOK_S = 10.0  # between looks for jobs that ended before their worker arrived
_ENDED_OR_ENDING = ENDED | {ENDING}  # no worker will come from it
# When a start still waiting for its workers says so (a queued job: minutes on a busy cluster,
# with nothing on the console otherwise), then how often again [s].
_WAITING_SAID_S = (30.0, 300.0)
_REPORTED = "_buzzdask_reported"  # the mark on an error buzzdask reports itself


class _ReportedElsewhere(logging.Filter):
    """Drops tornado's copy of a rejected job's error, which buzzdask reports itself.

    Its traceback, once per job, came before the one line that says it all: ``sbatch rejected
    the ... worker job: <sbatch's message>``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not getattr(error, _REPORTED, False)


# Dask's cluster starts each job in a task whose failure tornado logs with its traceback.
logging.getLogger("tornado.application").addFilter(_ReportedElsewhere())


def job_prologue(lines: Sequence[str]) -> list[str]:
    """A job script's prologue, made to work whether or not ``module`` came with the job.

    OSC's OnDemand apps export the ``module`` shell function (``BASH_FUNC_module%%``) to the
    sessions they start, and the job inherits it from there as from a login shell; a notebook
    started otherwise has none. A prologue calling ``module`` starts Lmod itself when the
    function is missing. The workers get the settings of those buzzdask starts locally
    (:func:`worker_exports`).

    Parameters
    ----------
    lines : sequence of str
        The configuration's ``job-script-prologue``.

    Returns
    -------
    list of str
        :func:`worker_exports`, then ``lines``, after :data:`LMOD_INIT` if one of them calls
        ``module``.
    """
    calls_module = any(line.split()[:1] == ["module"] for line in lines)
    return [*worker_exports(), *([LMOD_INIT] if calls_module else []), *lines]


def worker_exports() -> list[str]:
    """``export`` lines of :func:`buzzdask.session.worker_environment`, for a job script.

    A variable the job already has (from the submitting shell, or the user's own settings)
    keeps its value.
    """
    return [f'export {name}="${{{name}:-{value}}}"' for name, value in worker_environment().items()]


def scorer_worker_args(config_name: str, given: Sequence[str] | None = None) -> list[str]:
    """The worker arguments of a scorer job: its section's (or ``given``), with the preload.

    On a cluster's own file system a worker's ``import tensorflow`` takes seconds (it reads
    thousands of files); started with the worker, it overlaps the run's planning and probing
    instead of delaying its first score, and a replacement job's scorer starts sooner too.

    Parameters
    ----------
    config_name : str
        The ``jobqueue.<config_name>`` section of the jobs.
    given : sequence of str, optional
        Worker arguments overriding the section's ``worker-extra-args``.

    Returns
    -------
    list of str
        Those arguments, then :data:`SCORER_PRELOAD` unless they already preload buzzdask's.
    """
    if given is None:
        given = dask.config.get(f"jobqueue.{config_name}.worker-extra-args", None) or []
    args = list(given)
    return args if SCORER_PRELOAD[1] in args else [*args, *SCORER_PRELOAD]


def job_script(config_name: str, **job_kwargs: Any) -> str:
    """The batch script of one worker job, without starting a scheduler.

    Parameters
    ----------
    config_name : str
        The ``jobqueue.<config_name>`` section.
    **job_kwargs
        Overrides of that section (``account``, ``walltime``, ``cores``...).
    """
    logs = log_directory(config_name, job_kwargs)
    # dask-jobqueue makes the folder as it defines a job; a script only read needs none.
    made = []
    while logs is not None and logs and not os.path.exists(logs):
        made.append(logs)
        logs = os.path.dirname(logs.rstrip("/")) or None
    try:
        return _Job(
            scheduler=SCHEDULER_PLACEHOLDER, name="buzzdask", config_name=config_name, **job_kwargs
        ).job_script()
    finally:
        with contextlib.suppress(OSError):
            for folder in made:  # the deepest first
                os.rmdir(folder)


class _DecodeWorkersAdaptive(Adaptive):
    """Adaptive scaling of the CPU (decode) workers; the GPU workers keep their number."""

    cluster: BuzzdaskSLURMCluster

    # distributed annotates plan/requested/observed as sets of WorkerState, but Adaptive's own
    # properties return the cluster's worker names, as these do.
    @property
    def plan(self) -> set[str]:  # type: ignore[override]
        return self.cluster.plan - self.cluster.gpu_worker_names

    @property
    def requested(self) -> set[str]:  # type: ignore[override]
        return self.cluster.requested - self.cluster.gpu_worker_names

    @property
    def observed(self) -> set[str]:  # type: ignore[override]
        return self.cluster.observed - self.cluster.gpu_worker_names

    async def target(self) -> int:
        # The scheduler counts every worker; the GPU ones are not ours to add or remove.
        return max(0, await super().target() - len(self.cluster.gpu_worker_names))

    async def workers_to_close(self, target: int) -> list[str]:
        # The scheduler may well pick an idle GPU worker: rank them all, keep the CPU ones.
        gpu = self.cluster.gpu_worker_names
        ranked = [name for name in await super().workers_to_close(0) if name not in gpu]
        return ranked[: max(0, len(self.plan) - target)]


class BuzzdaskSLURMCluster(SLURMCluster):
    """SLURMCluster whose jobs are CPU decode workers or GPU scorer workers.

    Parameters
    ----------
    gpu_config_name : str
        The ``jobqueue`` section of the GPU worker jobs (``--gpus-per-node=1`` and
        ``--resources GPU=1`` in it). Their workers hold the scorers and start importing
        TensorFlow as they start (:func:`scorer_worker_args`).
    gpu_job_kwargs : mapping, optional
        Overrides of that section.
    keepalive_interval : str, default: "5s"
        How often lost workers (retired, walltime, ``scancel``) are replaced by new jobs.
    **kwargs
        :class:`dask_jobqueue.SLURMCluster` options of the CPU worker jobs (``config_name``...).

    Notes
    -----
    ``scale(jobs=n)`` sets the number of CPU worker jobs and leaves the GPU ones alone;
    ``scale(gpus=n)`` sets the GPU worker jobs (one GPU each); ``adapt(minimum_jobs=...,
    maximum_jobs=...)`` scales the CPU jobs with the load.
    """

    job_cls = _Job

    def __init__(
        self,
        *,
        gpu_config_name: str,
        gpu_job_kwargs: Mapping[str, Any] | None = None,
        keepalive_interval: str = "5s",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        shared = {k: self._job_kwargs[k] for k in ("interface", "protocol", "security")}
        gpu_options = {**shared, "config_name": gpu_config_name, **(gpu_job_kwargs or {})}
        gpu_options["worker_extra_args"] = scorer_worker_args(
            gpu_config_name, gpu_options.get("worker_extra_args")
        )
        self._gpu_spec = {"cls": self.job_cls, "options": gpu_options}
        self._gpu_names: set[str] = set()
        self._gpu_count = 0
        # Jobs some worker of which has joined, by name (a replacement job takes the name of
        # the one it replaces: the job itself tells them apart), and since when none is there.
        # Weakly: Dask's check at close that every job it made was closed counts those alive.
        self._jobs_joined: dict[str, weakref.ref[Any]] = {}
        self._jobs_gone_since: dict[str, float] = {}
        keepalive = PeriodicCallback(
            self._replace_lost_workers, parse_timedelta(keepalive_interval) * 1000
        )
        self.periodic_callbacks["buzzdask-keepalive"] = keepalive
        assert self.loop is not None  # the cluster has started its event loop
        self.loop.add_callback(keepalive.start)

    # -- scaling -------------------------------------------------------------------------------
    # JobQueueCluster.scale's signature (jobs after n), which already differs from SpecCluster's.
    def scale(  # type: ignore[override]
        self,
        n: int | None = None,
        jobs: int = 0,
        memory: str | None = None,
        cores: int | None = None,
        *,
        gpus: int | None = None,
    ) -> Any:
        """Set the number of CPU worker jobs (``n`` workers or ``jobs``) and of GPU jobs."""
        # In one step on the event loop: SpecCluster.scale schedules _correct_state there, and
        # it must never see worker_spec while the GPU jobs are held out of it, or it closes
        # them (seen when scale was called from another thread mid-run).
        return self.sync(self._scale_now, n, jobs, memory, cores, gpus)

    def _scale_now(
        self, n: int | None, jobs: int, memory: str | None, cores: int | None, gpus: int | None
    ) -> Any:
        if gpus is not None:
            self._gpu_count = gpus
        gpu_specs = {name: self.worker_spec.pop(name) for name in list(self._gpu_names)}
        try:
            result = super().scale(n, jobs=jobs, memory=memory, cores=cores)
        finally:
            self.worker_spec.update(gpu_specs)
        self._scale_gpu(self._gpu_count)
        return result

    def _scale_gpu(self, n: int) -> None:
        for name in sorted(self._gpu_names, reverse=True)[: max(0, len(self._gpu_names) - n)]:
            self._gpu_names.discard(name)
            del self.worker_spec[name]
        index = 0
        while len(self._gpu_names) < n:
            name = f"{self._name}-gpu-{index}"
            if name not in self._gpu_names:
                self._gpu_names.add(name)
                self.worker_spec[name] = self._gpu_spec
            index += 1
        assert self.loop is not None
        self.loop.add_callback(self._correct_state)

    @property
    def gpu_worker_names(self) -> set[str]:
        """Names of the GPU worker jobs (in ``worker_spec``)."""
        return set(self._gpu_names)

    def adapt(self, *args: Any, **kwargs: Any) -> Adaptive:
        """Scale the CPU (decode) jobs with the load, as :meth:`SLURMCluster.adapt`.

        ``minimum_jobs``/``maximum_jobs`` count CPU jobs; the GPU jobs stay as
        ``scale(gpus=...)`` set them.
        """
        return super().adapt(*args, Adaptive=_DecodeWorkersAdaptive, **kwargs)

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self._name}-cpu-{worker_number}"

    def _replace_lost_workers(self) -> None:
        # A worker that left (lifetime, walltime, scancel) stays in worker_spec but not in
        # self.workers; correcting the state submits a new job under its name and kind.
        if self.status != Status.running:
            return
        self._forget_jobs_gone()
        if set(self.worker_spec) - set(self.workers):
            self._correct_state()

    def _forget_jobs_gone(self) -> None:
        """Drop from ``self.workers`` the jobs whose workers have all left.

        Dask drops a job when a worker of the job's name leaves: the workers of a job of
        several processes are named ``<job>-0``, ``<job>-1``, so a cancelled one stayed, and
        no job ever replaced it (the run waited out ``scorer-restart-seconds``). After
        ``distributed.deploy.lost-worker-timeout``, as Dask waits for a worker of its own.
        """
        present = [str(w.get("name")) for w in self.scheduler_info.get("workers", {}).values()]
        grace_s = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
        now = time.monotonic()
        for name, job in list(self.workers.items()):
            joined = self._jobs_joined.get(name)
            if any(worker == name or _numbered(worker, name) for worker in present):
                self._jobs_joined[name] = weakref.ref(job)
                self._jobs_gone_since.pop(name, None)
            elif joined is not None and joined() is job:  # not a replacement still queued
                if now - self._jobs_gone_since.setdefault(name, now) >= grace_s:
                    del self._jobs_joined[name], self._jobs_gone_since[name]
                    self._futures.add(asyncio.ensure_future(self.workers.pop(name).close()))

    async def _close(self) -> None:
        # SpecCluster closes by scaling to 0, which only counts CPU jobs here.
        self._gpu_count = 0
        self._scale_gpu(0)
        await super()._close()

    # -- waiting -------------------------------------------------------------------------------
    def wait_for_workers_by_kind(self, *, gpus: int, cpu_workers: int, timeout: float) -> None:
        """Block until ``gpus`` GPU workers and ``cpu_workers`` CPU workers have arrived.

        After ``timeout`` seconds, a run that has some of each kind it asked for goes on with
        them, with a warning naming each job still missing (a busy cluster: they join the run
        when SLURM starts them).

        Raises
        ------
        ClusterError
            At once with sbatch's own message if it rejected a job; after ``timeout`` seconds
            with each missing job's squeue state and log file, when no worker of a kind asked
            for has arrived.
        """
        began = time.monotonic()
        deadline = began + timeout
        next_look = began + _ENDED_LOOK_S
        next_said = began + _WAITING_SAID_S[0]
        while True:
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + _ENDED_LOOK_S
                self._refuse_kinds_whose_jobs_all_ended(gpus=gpus, cpu_workers=cpu_workers)
            if next_said <= time.monotonic() < deadline:
                next_said = time.monotonic() + _WAITING_SAID_S[1]
                have_gpu, have_cpu = self._arrived()
                self._warn_with_jobs(
                    "waiting for the worker jobs: %s%d/%d CPU workers after %.0f s (waiting up "
                    "to %g s). Jobs:",
                    f"{have_gpu}/{gpus} GPU and " if gpus else "",
                    have_cpu,
                    cpu_workers,
                    time.monotonic() - began,
                    timeout,
                )
            rejected = [
                (name, job.submit_error)
                for name, job in list(self.workers.items())
                if getattr(job, "submit_error", None) is not None
            ]
            if rejected:
                name, error = rejected[0]
                kind = "GPU" if name in self._gpu_names else "CPU"
                raise ClusterError(f"sbatch rejected the {kind} worker job: {_stderr(error)}")
            have_gpu, have_cpu = self._arrived()
            if have_gpu >= gpus and have_cpu >= cpu_workers:
                return
            if time.monotonic() > deadline:
                arrived = (
                    f"after {timeout:g} s, {have_gpu}/{gpus} GPU and {have_cpu}/{cpu_workers} "
                    "CPU workers have arrived"
                )
                if (have_gpu or not gpus) and have_cpu:
                    self._warn_with_jobs(
                        "%s: going on with them; the others join the run once SLURM starts "
                        "them. Jobs:",
                        arrived,
                    )
                    return
                raise ClusterError(f"{arrived}. Jobs:\n" + self._job_report())
            time.sleep(0.5)

    def _refuse_kinds_whose_jobs_all_ended(self, *, gpus: int, cpu_workers: int) -> None:
        """Raise where every job of a kind asked for ended before any of its workers arrived.

        A job that cannot start its worker (a prologue that fails, a venv the compute node
        cannot see) ends in a second; waiting out the timeout (30 minutes) would say nothing.
        """
        have_gpu, have_cpu = self._arrived()
        for kind, wanted, have in (("GPU", gpus, have_gpu), ("CPU", cpu_workers, have_cpu)):
            names = [
                name
                for name in self.workers
                if (name in self._gpu_names) == (kind == "GPU")
                and getattr(self.workers[name], "job_id", None)
            ]
            if not wanted or have or not names:
                continue
            ids = [self.workers[name].job_id for name in names]
            queued = _queued_job_ids(ids)
            if queued is not None and not queued & set(ids):
                raise ClusterError(
                    f"every {kind} worker job ended before its worker started (a job script "
                    "prologue that fails, a Python or venv the compute node cannot see?). "
                    "Jobs:\n" + self._job_report()
                )

    def _arrived(self) -> tuple[int, int]:
        workers = self.scheduler_info.get("workers", {}).values()
        gpu = sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) > 0)
        return gpu, len(workers) - gpu

    def _warn_with_jobs(self, message: str, *args: Any) -> None:
        """``message``, then each job's line as a record of its own.

        The console writes each record on one line (:class:`buzzdask.progress.OneLineFormatter`).
        """
        logger.warning(message, *args)
        for line in self._job_report().splitlines():
            logger.warning("%s", line)

    def _job_report(self) -> str:
        lines = []
        for name, job in sorted(self.workers.items()):
            job_id = getattr(job, "job_id", None)
            state = _squeue_state(job_id) if job_id else "not submitted"
            if job.log_directory:
                log = f"{job.log_directory}/{job.job_name or 'worker'}-{job_id}.err"
            else:
                log = f"slurm-{job_id}.out in the submitting directory"
            lines.append(f"  {name}: job {job_id} {state}; log: {log}")
        return "\n".join(lines)


def _numbered(worker_name: str, job: str) -> bool:
    """Whether ``worker_name`` is one of a job of several processes' (``<job>-0``, ``<job>-1``)."""
    number = worker_name.removeprefix(f"{job}-")
    return number != worker_name and number.isdigit()


def _stderr(error: Exception) -> str:
    """The words of sbatch itself, out of dask-jobqueue's "Command exited..." error."""
    text = str(error)
    match = re.search(r"stderr:\s*(.*)", text, flags=re.DOTALL)
    return (match.group(1) if match else text).strip()


def _queued_job_ids(job_ids: Sequence[str]) -> set[str] | None:
    """Those of ``job_ids`` SLURM still holds (pending or running); None if squeue fails."""
    try:
        out = squeue(job_ids, ["-o", "%i %T"])
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None  # squeue itself failed: nothing known
    # squeue lists a job named by its id for a while after it ended (MinJobAge).
    listed = (line.split() for line in out.stdout.splitlines())
    return {
        fields[0] for fields in listed if len(fields) == 2 and fields[1] not in _ENDED_OR_ENDING
    }


def _squeue_state(job_id: str) -> str:
    """``PENDING (Resources)``-like state of a job, or why it cannot be had."""
    try:
        out = squeue([job_id], ["-o", "%T|%r"])
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"state unknown ({error})"
    state, _, reason = out.stdout.strip().partition("|")
    if not state:
        return "no longer in squeue (ended: read its log)"
    return f"{state} ({reason})" if reason and reason != "None" else state
