"""What SLURM says of a job: ``squeue``, read where a command needs a job's state.

Kept apart from :mod:`buzzdask.cluster` (which imports dask-jobqueue): the output lock asks
whether the job of a run on another node has ended, in every command that meets its lock.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

__all__ = ["ENDED", "ENDING", "current_job", "ended_state", "squeue"]

#: SLURM's states of a job that has ended: its processes are gone.
ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
#: The state of a job whose processes are being stopped (they may still be running).
ENDING = "COMPLETING"


def squeue(
    job_ids: Sequence[str], arguments: Sequence[str], *, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    """``squeue``'s lines for ``job_ids``, without a header.

    Parameters
    ----------
    job_ids : sequence of str
    arguments : sequence of str
        The rest of squeue's arguments: the format (``["-o", "%i %T"]``), ``-t all`` for jobs
        that ended too (for as long as SLURM keeps them, ``MinJobAge``).
    timeout_s : float > 0 [s]

    Raises
    ------
    OSError, subprocess.TimeoutExpired
        Where squeue cannot be run, or does not answer within ``timeout_s``.
    """
    command = ["squeue", "-h", "-j", ",".join(job_ids), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


def current_job() -> tuple[str, str] | None:
    """The SLURM job this process runs in: its id and its cluster's name; None outside one.

    Only a process slurmd started (a batch script, an ``srun`` step, and what they start): SLURM
    ends it with its job. A shell of ``salloc`` on a login node has the job's variables too, but
    what runs there outlives the job.
    """
    job_id, cluster = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_CLUSTER_NAME")
    on_its_node = bool(os.environ.get("SLURMD_NODENAME"))
    return (job_id, cluster) if job_id and cluster and on_its_node else None


def ended_state(job_id: str, cluster: str, *, timeout_s: float = 10) -> str | None:
    """The state a job of ``cluster`` ended in (``"TIMEOUT"``), if SLURM here says it ended.

    None where it runs or is ending (``COMPLETING``), where this machine's SLURM does not know
    it (another cluster's, or forgotten since), where the job of that id here is another
    cluster's, and where squeue cannot be run or does not answer: nothing known.
    """
    try:
        arguments = ["-t", "all", "-O", "State:40,Cluster:200"]
        out = squeue([job_id], arguments, timeout_s=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1] == cluster and fields[0] in ENDED:
            return fields[0]
    return None
