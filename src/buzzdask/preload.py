"""A Dask preload for the workers that will hold a scorer, in the clusters buzzdask starts.

Local clusters' scorer workers, SLURM GPU worker jobs (and CPU ones with ``--gpus 0``,
:func:`buzzdask.cluster.slurm.scorer_worker_args`) and the one-job script's GPU tasks (every
worker task without GPUs).

It starts importing TensorFlow early, in a thread of its own. A worker would otherwise begin
that import (about 2 s) only when its scorer actor is created: after the client has planned
the run and probed the first files. The actor's own ``import tensorflow`` then waits for this
one (Python's import lock) instead of starting over.

The import waits for the run's :class:`~buzzdask.logs.WorkerLogging` (registered as soon as
the client connects), as a scorer's own import would: TensorFlow reads its log settings as it
loads and writes its start-up lines to file descriptor 2, which that plugin sets for the run.
Without it (another client, or a SLURM worker that joined before any run), the import starts
after :data:`WAIT_FOR_LOGGING_S`.

The import runs with Python's garbage collector paused (:func:`collection_paused`). It also
spares the worker Python's last garbage collection as its process exits
(:func:`skip_final_collection`): with TensorFlow loaded, that collection took about 1 s of every
local cluster's close, after the work was done.
"""

from __future__ import annotations

import atexit
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "WAIT_FOR_LOGGING_S",
    "collection_paused",
    "dask_setup",
    "logging_set",
    "skip_final_collection",
]

#: Set on a worker once the run's logging settings apply there.
logging_set = threading.Event()
#: Longest the import waits for them [s].
WAIT_FOR_LOGGING_S = 10.0


def dask_setup(worker: Any) -> None:
    """Dask's preload hook: import TensorFlow in a daemon thread (``worker`` is unused)."""
    skip_final_collection()
    threading.Thread(
        target=_import_tensorflow, name="buzzdask-import-tensorflow", daemon=True
    ).start()


def _import_tensorflow() -> None:
    logging_set.wait(WAIT_FOR_LOGGING_S)
    with collection_paused():
        import tensorflow  # noqa: F401


@contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, if it was on (:func:`gc.disable`).

    For imports that create many objects which live as long as the process. ``import
    tensorflow`` creates about 340,000, and each full collection during the import walks all of
    those made so far: four of them took 0.4-0.7 s of a 1.6-1.9 s import here (1.2-1.3 s
    without). Cycles left by the block are collected by the next collections, as usual. The
    collector is process-wide: another thread's garbage waits as well, for as long as the block.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def skip_final_collection() -> None:
    """At this process's exit, skip Python's last garbage collection (:func:`gc.freeze`).

    Everything is still torn down and every ``atexit`` handler registered before this call runs
    after it (logging's flush among them); only the collector's last pass over the whole heap
    is left out: about 1 s with TensorFlow loaded, 0.3 s for the command line's pandas, Dask
    and pyarrow. For a process about to end whose files are written and closed. Calling it
    again changes nothing.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
