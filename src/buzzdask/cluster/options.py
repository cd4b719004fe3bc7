"""The job options: keyword overrides of a configuration's worker jobs, defined once.

:func:`buzzdask.cluster.start`, :func:`~buzzdask.cluster.job_scripts`,
:func:`~buzzdask.cluster.batch.batch_script` and the flags of ``python -m buzzdask.cluster`` all
take the fields of :class:`JobOptions`; a new option is one more field here.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dask.config
from dask.utils import format_bytes

from buzzdask.errors import ParameterError
from buzzdask.settings import byte_count

__all__ = [
    "ACCOUNT_PLACEHOLDER",
    "JobOptions",
    "job_kinds",
    "lifetime_within",
    "walltime_seconds",
]

JobKind = Literal["cpu", "gpu"]

# What a printed job script shows for a missing account: sbatch would refuse it, not charge a
# default project.
ACCOUNT_PLACEHOLDER = "<PROJECT>"


def job_kinds(gpus: int | None) -> tuple[JobKind, ...]:
    """The worker jobs a run submits: CPU jobs, and GPU jobs unless ``gpus`` is 0."""
    return ("cpu",) if gpus == 0 else ("cpu", "gpu")


#: Least memory of a worker job: a worker with its chunks in flight (a scorer's TensorFlow,
#: about 1 GB, takes more).
_LEAST_JOB_MEMORY = 2**30


def _memory_for_cores(section: str, cores: int | None) -> str | None:
    """A CPU job's memory for ``cores`` other than its section's: the section's per core.

    Whole GiB, rounded down, as sbatch's ``--mem`` reads them: at most the share the section's
    memory gives each of its cores (the OSC sections' lie within their partition's default).
    ``None`` where ``cores`` is the section's own, or the section gives no sizes.
    """
    configured_cores = dask.config.get(f"jobqueue.{section}.cores", None)
    configured_memory = dask.config.get(f"jobqueue.{section}.memory", None)
    if cores is None or not configured_cores or not configured_memory or cores == configured_cores:
        return None
    gib = byte_count(configured_memory) * cores // configured_cores // 2**30
    return f"{max(gib, _LEAST_JOB_MEMORY // 2**30)}GiB"


def walltime_seconds(walltime: str) -> int:
    """Seconds of a SLURM time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``.

    Raises
    ------
    ParameterError
        If ``walltime`` is none of these.
    """
    days, _, clock = walltime.rpartition("-")
    try:
        fields = [int(part) for part in clock.split(":")]
        day_s = int(days) * 86400 if days else 0
    except ValueError:
        fields, day_s = [], 0
    if walltime.startswith("-"):  # "-5": no day count, and no time either
        fields = []
    # Without days the fields are [[HH:]MM:]SS read from the minutes; with days, HH[:MM[:SS]].
    units = (3600, 60, 1) if days else {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}.get(len(fields))
    if not fields or units is None or len(fields) > len(units) or min(fields) < 0:
        raise ParameterError(
            f"walltime={walltime!r} is not a SLURM time limit such as '01:00:00' (HH:MM:SS), "
            "'90' (minutes) or '1-12:00:00' (days-HH:MM:SS)"
        )
    return day_s + sum(value * unit for value, unit in zip(fields, units, strict=False))


def lifetime_within(args: Sequence[str], walltime: str) -> list[str]:
    """Worker arguments whose ``--lifetime`` (and stagger) end before ``walltime``.

    The configurations retire workers at 55 of a job's 60 minutes, give or take 2 (a stagger of
    4): so the same margin below any walltime, a sixth of it for short ones. Arguments without
    ``--lifetime`` are returned as they are.
    """
    args = list(args)
    if "--lifetime" not in args:
        return args
    limit_s = walltime_seconds(walltime)
    margin_s = min(300, limit_s // 6)
    fitted = {
        "--lifetime": _duration(limit_s - margin_s),
        "--lifetime-stagger": _duration(margin_s * 4 // 5),
    }
    for flag, value in fitted.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def _duration(seconds: int) -> str:
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def _option(
    flag_help: str | None,
    *,
    jobs: tuple[JobKind, ...] = ("cpu", "gpu"),
    key: str | None = None,
    flag_type: Callable[[str], Any] = str,
) -> Any:
    """A :class:`JobOptions` field, default ``None``.

    Parameters
    ----------
    flag_help : str or None
        Help of its command-line flag (``--log-directory`` for ``log_directory``);
        ``None``: no flag.
    jobs : tuple of {"cpu", "gpu"}
        The worker jobs it overrides.
    key : str, optional
        Its ``jobqueue`` keyword, if not the field's name.
    flag_type : callable
        Converts the flag's text.
    """
    metadata = {"help": flag_help, "jobs": jobs, "key": key, "type": flag_type}
    return dataclasses.field(default=None, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class JobOptions:
    """Overrides of the worker jobs' ``jobqueue`` sections; ``None`` keeps the configuration's.

    Attributes
    ----------
    account : str, optional
        SLURM account (OSC project, e.g. ``"PAS1234"``) of every job.
    walltime : str, optional
        ``HH:MM:SS`` of every job. Workers given ``--lifetime`` (the OSC configurations)
        retire before it (:func:`lifetime_within`).
    queue, gpu_queue : str, optional
        Partitions of the CPU and of the GPU jobs.
    cores : int > 0, optional
        Cores of each CPU job. Without ``memory``, the section's memory goes with them, in
        whole GiB: its memory per core (within the partition's default: SLURM charges the
        cores a job's memory would take otherwise).
    memory : str, optional
        Memory of each CPU job (``"32GiB"``).
    log_directory : str, optional
        Where the jobs' ``.out``/``.err`` logs go.
    job_kwargs, gpu_job_kwargs : mapping, optional
        Any other ``jobqueue`` option of the CPU or GPU jobs (``job_extra_directives``...).
    """

    account: str | None = _option("SLURM account / OSC project, e.g. PAS1234")
    walltime: str | None = _option("HH:MM:SS of every job")
    queue: str | None = _option("partition of the CPU jobs", jobs=("cpu",))
    gpu_queue: str | None = _option("partition of the GPU jobs", jobs=("gpu",), key="queue")
    cores: int | None = _option("cores of each CPU job", jobs=("cpu",), flag_type=int)
    memory: str | None = _option("memory of each CPU job, e.g. 32GiB", jobs=("cpu",))
    log_directory: str | None = _option("where the jobs' logs go")
    job_kwargs: Mapping[str, Any] | None = _option(None, jobs=())
    gpu_job_kwargs: Mapping[str, Any] | None = _option(None, jobs=())

    def __post_init__(self) -> None:
        # Checked as given, before a job script is written: sbatch would take "--cpus-per-task=0"
        # or a memory it cannot read only to fail later, in the queue.
        if self.cores is not None and (isinstance(self.cores, bool) or self.cores < 1):
            raise ParameterError(f"cores={self.cores!r} (--cores) must be an integer >= 1")
        if self.memory is not None and (
            str(self.memory).strip().isdigit() or byte_count(self.memory) < _LEAST_JOB_MEMORY
        ):
            # A bare number is bytes to Dask (and a traceback in dask-jobqueue); "32" meant GB.
            raise ParameterError(
                f"memory={self.memory!r} (--memory) must be a size with its unit, at least "
                f"{format_bytes(_LEAST_JOB_MEMORY)}, such as '32GiB'"
            )
        if self.walltime is not None:
            walltime_seconds(self.walltime)
        for name in ("account", "queue", "gpu_queue", "log_directory"):
            value = getattr(self, name)
            # "--queue $PARTITION" with it unset: "#SBATCH -p " and the job refused in the queue.
            if value is not None and not str(value).strip():
                flag = "--" + name.replace("_", "-")
                raise ParameterError(f"{name}={value!r} ({flag}) is empty")

    @staticmethod
    def sized_memory(section: str, overrides: Mapping[str, Any]) -> dict[str, str]:
        """``{"memory": ...}`` for CPU jobs of ``--cores`` without ``--memory``, else ``{}``.

        Their section's memory per core (:func:`_memory_for_cores`): the section's whole
        memory on fewer cores would be charged by OSC as more cores.
        """
        if "memory" in overrides:
            return {}
        memory = _memory_for_cores(section, overrides.get("cores"))
        return {} if memory is None else {"memory": memory}

    def overrides(self, kind: JobKind, *, section: str | None = None) -> dict[str, Any]:
        """The ``jobqueue`` keywords of the ``kind`` worker jobs that these options set.

        Parameters
        ----------
        kind : {"cpu", "gpu"}
            CPU (decode) or GPU (scorer) worker jobs.
        section : str, optional
            Their ``jobqueue.<section>``: with ``walltime`` set, its workers' ``--lifetime``
            is fitted below it (:func:`lifetime_within`); where it gives no ``python``, this
            one, quoted for the job script.

        Returns
        -------
        dict
            Keyword overrides for dask-jobqueue; an unset option keeps the configuration's value.
        """
        chosen = {
            option.metadata["key"] or option.name: getattr(self, option.name)
            for option in dataclasses.fields(self)
            if kind in option.metadata["jobs"]
        }
        extra = self.job_kwargs if kind == "cpu" else self.gpu_job_kwargs
        overrides = {k: v for k, v in {**chosen, **(extra or {})}.items() if v is not None}
        if kind == "cpu" and section is not None:
            overrides.update(self.sized_memory(section, overrides))
        if section is not None and dask.config.get(f"jobqueue.{section}.python", None) is None:
            # dask-jobqueue would write this Python into the job script unquoted: a venv in a
            # folder with a space ("My Project") would be cut there, and no worker would start.
            overrides.setdefault("python", shlex.quote(sys.executable))
        if section is not None:
            # Given or configured (a user's jobqueue.yaml): workers of 4-hour jobs retiring
            # at 55 minutes would send a new job into the queue every hour. A lifetime given
            # with the job's own arguments stays, unless a walltime is given too.
            walltime = overrides.get("walltime") or (
                None
                if "worker_extra_args" in overrides
                else dask.config.get(f"jobqueue.{section}.walltime", None)
            )
            args = overrides.get("worker_extra_args") or dask.config.get(
                f"jobqueue.{section}.worker-extra-args", None
            )
            if walltime and args and "--lifetime" in args:
                overrides["worker_extra_args"] = lifetime_within(args, str(walltime))
        return overrides

    def missing_accounts(
        self, entry: Mapping[str, Any], kinds: Iterable[JobKind] = ("cpu", "gpu")
    ) -> list[str]:
        """The ``jobqueue`` sections whose jobs would carry no account where one is required.

        Parameters
        ----------
        entry : mapping
            A configuration's entry (:func:`~buzzdask.cluster.configs.load_cluster_config`);
            ``account-required: true`` (the OSC configurations) makes an account necessary.
        kinds : iterable of {"cpu", "gpu"}
            The worker jobs to be submitted.

        Returns
        -------
        list of str
            Section names (``"osc-cardinal-gpu"``); empty when every job has its account.
        """
        if not entry.get("account-required"):
            return []
        return [
            entry[f"{kind}-config"]
            for kind in kinds
            if not (
                self.overrides(kind).get("account")
                or dask.config.get(f"jobqueue.{entry[f'{kind}-config']}.account", None)
            )
        ]

    def require_account(
        self, entry: Mapping[str, Any], kinds: Iterable[JobKind] = ("cpu", "gpu")
    ) -> None:
        """Refuse, before any job is written or submitted, jobs that need an account and lack it.

        Raises
        ------
        ParameterError
            Naming the flag (``--account``), the keyword and the configuration keys.
        """
        missing = self.missing_accounts(entry, kinds)
        if missing:
            keys = " and ".join(f"jobqueue.{section}.account" for section in missing)
            raise ParameterError(
                f"{entry['name']} jobs need an account (your OSC project, e.g. PAS1234) and "
                f"none was given: pass --account PAS1234 (account='PAS1234' in Python), or set "
                f"{keys} in ~/.config/dask/jobqueue.yaml"
            )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add a flag per option that has one (``--gpu-queue`` for ``gpu_queue``)."""
        for option in dataclasses.fields(cls):
            if option.metadata["help"] is not None:
                parser.add_argument(
                    "--" + option.name.replace("_", "-"),
                    type=option.metadata["type"],
                    help=option.metadata["help"],
                )

    @classmethod
    def keywords(cls, args: argparse.Namespace) -> dict[str, Any]:
        """The options given by the flags of :meth:`add_arguments`, as keywords of ``start``."""
        return {
            option.name: getattr(args, option.name)
            for option in dataclasses.fields(cls)
            if option.metadata["help"] is not None
        }
