"""dask-jobqueue's classes, imported without its change to Ctrl-C.

Importing ``dask_jobqueue.runner`` (``dask_jobqueue.slurm`` does) replaces the importing
process's SIGINT handler with ``sys.exit()``: Ctrl-C in ``python -m buzzdask.cluster ...
analyze`` then ended the run with exit code 0 and no word of what it left, and a notebook's
"interrupt kernel" would end the kernel. Python's handler is put back here; the one-job mode's
runner, which stops its tasks with that handler, sets it itself
(:func:`buzzdask.cluster.batch.run_in_job`).
"""

from __future__ import annotations

import signal

_before = signal.getsignal(signal.SIGINT)

from dask_jobqueue import SLURMCluster  # noqa: E402
from dask_jobqueue.slurm import SLURMJob, SLURMRunner  # noqa: E402

if _before is not None and signal.getsignal(signal.SIGINT) is not _before:
    signal.signal(signal.SIGINT, _before)

__all__ = ["SLURMCluster", "SLURMJob", "SLURMRunner"]
