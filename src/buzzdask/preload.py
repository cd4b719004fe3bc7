"""A Dask preload for the worker processes of the local clusters buzzdask starts.

It starts importing TensorFlow early, in a thread of its own. A worker would otherwise begin
that import (about 2 s) only when its scorer actor is created: after the client has planned
the run and probed the first files. The actor's own ``import tensorflow`` then waits for this
one (Python's import lock) instead of starting over.

The import waits for the run's :class:`~buzzdask.logs.WorkerLogging` (registered as soon as
the client connects), as a scorer's own import would: TensorFlow reads its log settings as it
loads and writes its start-up lines to file descriptor 2, which that plugin sets for the run.
Without it (another client), the import starts after :data:`WAIT_FOR_LOGGING_S`.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["WAIT_FOR_LOGGING_S", "dask_setup", "logging_set"]

#: Set on a worker once the run's logging settings apply there.
logging_set = threading.Event()
#: Longest the import waits for them [s].
WAIT_FOR_LOGGING_S = 10.0


def dask_setup(worker: Any) -> None:
    """Dask's preload hook: import TensorFlow in a daemon thread (``worker`` is unused)."""
    threading.Thread(
        target=_import_tensorflow, name="buzzdask-import-tensorflow", daemon=True
    ).start()


def _import_tensorflow() -> None:
    logging_set.wait(WAIT_FOR_LOGGING_S)
    import tensorflow  # noqa: F401
