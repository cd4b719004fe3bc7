"""The job options: keyword overrides of a configuration's worker jobs, defined once.

:func:`buzzdask.cluster.start`, :func:`~buzzdask.cluster.job_scripts`,
:func:`~buzzdask.cluster.batch.batch_script` and the flags of ``python -m buzzdask.cluster`` all
take the fields of :class:`JobOptions`; a new option is one more field here.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["JobOptions"]

JobKind = Literal["cpu", "gpu"]


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
        ``HH:MM:SS`` of every job. Keep ``--lifetime`` in the configuration below it.
    queue, gpu_queue : str, optional
        Partitions of the CPU and of the GPU jobs.
    cores : int > 0, optional
        Cores of each CPU job.
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

    def overrides(self, kind: JobKind) -> dict[str, Any]:
        """The ``jobqueue`` keywords of the ``kind`` worker jobs that these options set.

        Parameters
        ----------
        kind : {"cpu", "gpu"}
            CPU (decode) or GPU (scorer) worker jobs.

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
        return {k: v for k, v in {**chosen, **(extra or {})}.items() if v is not None}

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
