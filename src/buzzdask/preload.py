"""A Dask preload for the workers that will hold a scorer, in the clusters buzzdask starts.

Local clusters' scorer workers, SLURM GPU worker jobs (and CPU ones with ``--gpus 0``,
:func:`buzzdask.cluster.slurm.scorer_worker_args`) and the one-job script's GPU tasks (every
worker task without GPUs).

It starts importing TensorFlow early, in a thread of its own, after the modules the worker's
tasks use (:data:`TASK_MODULES`). A worker would otherwise begin
that import (about 2 s) only when its scorer actor is created: after the client has planned
the run and probed the first files. The actor's own ``import tensorflow`` then waits for this
one (Python's import lock) instead of starting over.

The import waits for the run's :class:`~buzzdask.logs.WorkerLogging` (registered as soon as
the client connects), as a scorer's own import would: TensorFlow reads its log settings as it
loads and writes its start-up lines to file descriptor 2, which that plugin sets for the run.
Without it (another client, or a SLURM worker that joined before any run), the import starts
after :data:`WAIT_FOR_LOGGING_S`.

The import (:func:`import_tensorflow`) runs with Python's garbage collector paused and without
TensorFlow's eager import of Keras, which no scorer uses. It also
spares the worker Python's last garbage collection as its process exits
(:func:`skip_final_collection`): with TensorFlow loaded, that collection took about 1 s of every
local cluster's close, after the work was done.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = [
    "KERAS_PACKAGES",
    "TASK_MODULES",
    "WAIT_FOR_LOGGING_S",
    "collection_paused",
    "dask_setup",
    "import_tensorflow",
    "keras_left_out",
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


#: What a scorer worker's tasks import, before TensorFlow. A worker imports no more of buzzdask
#: (``import buzzdask`` imports its public names' modules on first use), nor pandas
#: (partitions are built from their buffers, :func:`buzzdask.write.numeric_array`).
TASK_MODULES = ("buzzdask.pipeline", "buzzdask.score")


def _import_tensorflow() -> None:
    # The task modules first: while the client plans the run, before any task needs them.
    for name in TASK_MODULES:
        importlib.import_module(name)
    logging_set.wait(WAIT_FOR_LOGGING_S)
    import_tensorflow(freeze=True)


def import_tensorflow(*, freeze: bool = False) -> ModuleType:
    """``import tensorflow`` as a scorer needs it: the collector paused, Keras left out.

    See :func:`collection_paused` and :func:`keras_left_out`: together 0.7-1 s less on a
    scorer's start here. A TensorFlow already imported, or being imported by another thread, is
    returned as it is, once that import has finished.

    Parameters
    ----------
    freeze : bool
        Then move every object the process holds out of the collector's reach (:func:`gc.freeze`),
        before it runs again. The import leaves about 360,000 that live as long as the process,
        and the first three collections after it walked them all again (0.35-0.45 CPU-s here).
        Only for a process buzzdask started (the preload of its workers): in a user's process,
        garbage awaiting collection would be kept for good.
    """
    with collection_paused(), keras_left_out():
        import tensorflow

        if freeze:
            gc.freeze()
    return tensorflow


#: Keras's packages, which ``import tensorflow`` imports whole (Keras 2 with
#: ``TF_USE_LEGACY_KERAS``, else Keras 3) only to register their optimizers for SavedModels.
KERAS_PACKAGES = ("tf_keras", "keras")


@contextmanager
def keras_left_out(packages: Sequence[str] = KERAS_PACKAGES) -> Iterator[None]:
    """Imports of ``packages`` fail with :class:`ImportError` in the block; finding them works.

    ``import tensorflow`` imports Keras in a ``try`` that passes over an ``ImportError``: inside
    this block TensorFlow loads without it. Keras 2 took 0.3 s of a 1.5 s import here, and it
    imports pandas. Scorers load their embedder and heads with ``tf.saved_model.load``, which
    needs no Keras: ``model_general_v3``'s activations are the same to the bit. After the block
    ``tf.keras`` and ``import tf_keras`` load Keras as usual, on first use. A package already
    imported is left as it is. The finder is process-wide: for the block, every thread's import
    of these packages fails.
    """
    finder = _Refuse(packages)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


class _Refuse(importlib.abc.MetaPathFinder):
    """A finder whose specs of ``packages`` are the real ones, with a loader that refuses.

    TensorFlow looks up where Keras lies (``importlib.util.find_spec``) as it builds its API;
    only executing the package fails.
    """

    def __init__(self, packages: Sequence[str]) -> None:
        self.packages = frozenset(packages)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.packages:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None:
            spec.loader = _Refused()
        return spec


class _Refused(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        raise ImportError(f"{module.__name__} is left out while TensorFlow is imported")


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
