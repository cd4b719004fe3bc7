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
TensorFlow's eager import of Keras, which no scorer uses. On a worker without GPUs it is lean
(:func:`lean_tensorflow`): only the modules a CPU scorer uses, not TensorFlow's whole API. It also
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
import importlib.util
import operator
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = [
    "KERAS_PACKAGES",
    "LEAN_API",
    "MODULE",
    "TASK_MODULES",
    "WAIT_FOR_LOGGING_S",
    "collection_paused",
    "console_is_stderr",
    "dask_setup",
    "import_tensorflow",
    "keras_left_out",
    "lean_tensorflow",
    "logging_set",
    "skip_final_collection",
]

#: Whether this process's TensorFlow is imported lean: a worker without GPUs (:func:`dask_setup`).
_lean_here = False

#: What a worker's ``preload`` names to load this module (local clusters, SLURM jobs, the one-job
#: script's tasks).
MODULE = __name__

#: Set on a worker once the run's logging settings apply there.
logging_set = threading.Event()
#: Longest the import waits for them [s].
WAIT_FOR_LOGGING_S = 10.0
#: Set where this process's file descriptor 2 is the command line's console (the ``buzzdask``
#: command, below ``--debug``): TensorFlow's native start-up lines are kept off it there
#: (:func:`import_tensorflow`). Workers send that descriptor to the run's log instead.
console_is_stderr = threading.Event()
#: absl's lines from before its logging is set up: TensorFlow's libraries write them as they
#: load ("oneDNN custom operations are on", "Could not find cuda drivers"), before any setting is
#: read, ``TF_CPP_MIN_LOG_LEVEL`` included.
_NATIVE_START_LINE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\)|[IW]\d{4} "
)


def dask_setup(worker: Any) -> None:
    """Dask's preload hook: import TensorFlow in a daemon thread, lean on a worker without GPUs."""
    global _lean_here
    skip_final_collection()
    # Whichever comes first, this import or a scorer's own, is lean.
    _lean_here = worker is not None and not worker.state.total_resources.get("GPU")
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


def import_tensorflow(*, freeze: bool = False, lean: bool | None = None) -> ModuleType:
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
    lean : bool, optional
        Import only what a CPU scorer uses (:func:`lean_tensorflow`), where TensorFlow loads
        no plugins. Only for a process buzzdask started, as ``freeze``. Default: in a worker
        without GPUs that :func:`dask_setup` set up, else not.
    """
    if lean is None:
        lean = _lean_here
    with _IMPORT_LOCK, collection_paused(), _native_start_off_console():
        if "tensorflow" not in sys.modules and lean and not _plugins():
            lean_tensorflow()
        with keras_left_out():
            import tensorflow  # the lean one, where it was made
        if freeze:
            gc.freeze()
    return tensorflow


# Held while TensorFlow is imported, lean or whole, or a lean one completed: another thread
# waits for it, the importing thread goes on (re-entrant).
_IMPORT_LOCK = threading.RLock()


@contextmanager
def _native_start_off_console() -> Iterator[None]:
    """TensorFlow's native start-up lines kept off the console while it is imported in the block.

    Only where :data:`console_is_stderr` is set and TensorFlow is not imported yet: file
    descriptor 2 then goes to a temporary file during the block, and whatever else was written
    there meanwhile (this process's own lines, an error) goes to the console after it. Where
    the run's logging sent descriptor 2 to its log meanwhile (a watch's first pass began), it
    stays there, and those lines go to the log.
    """
    if not console_is_stderr.is_set() or "tensorflow" in sys.modules:
        yield
        return
    sys.stderr.flush()
    console = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            if os.path.sameopenfile(2, caught.fileno()):
                os.dup2(console, 2)
            os.close(console)
            caught.seek(0)
            others = b"".join(line for line in caught if not _NATIVE_START_LINE.match(line))
            if others:
                os.write(2, others)


#: What a CPU scorer uses of TensorFlow's API (``tf.config.threading...``), and where it lies
#: in TensorFlow's own modules: a lean import (:func:`lean_tensorflow`) imports only these.
LEAN_API: dict[str, tuple[str, str]] = {
    "__version__": ("tensorflow.python.framework.versions", "__version__"),
    "constant": ("tensorflow.python.framework.constant_op", "constant"),
    "float32": ("tensorflow.python.framework.dtypes", "float32"),
    "saved_model.load": ("tensorflow.python.saved_model.load", "load"),
    "experimental.dlpack.from_dlpack": ("tensorflow.python.dlpack.dlpack", "from_dlpack"),
    "errors.ResourceExhaustedError": (
        "tensorflow.python.framework.errors_impl",
        "ResourceExhaustedError",
    ),
    **{
        f"config.{name}": ("tensorflow.python.framework.config", name.rpartition(".")[2])
        for name in (
            "list_physical_devices",
            "threading.set_intra_op_parallelism_threads",
            "threading.set_inter_op_parallelism_threads",
            "experimental.enable_tensor_float_32_execution",
        )
    },
}


def lean_tensorflow() -> ModuleType:
    """``tensorflow`` with only :data:`LEAN_API` imported; the rest of it on first use.

    ``import tensorflow`` runs TensorFlow's ``__init__.py``, which imports its whole public API:
    about 2,100 modules, as many files read from a cluster's shared file system as each worker
    starts. A CPU scorer uses a dozen functions of it (:data:`LEAN_API`), which lie in about
    1,100: the import takes 0.9-1.0 CPU-s here instead of 1.3-1.4, and a fresh process that
    imports, loads YAMNet and embeds 10 s spends 2.4-3.2 CPU-s instead of 3.5-4.1. This imports
    those, with TensorFlow's 2.x behaviour (eager execution) turned on as its ``__init__.py``
    does, under a ``tensorflow`` package whose ``__init__.py`` has not run. The functions are
    TensorFlow's own: a scorer's activations are the same to the bit. Any other name of
    ``tensorflow`` (``tf.keras``, ``tf.config.set_visible_devices``), from any code in the
    process, runs the ``__init__.py`` there and then and is looked up in the whole API. Where
    TensorFlow's modules lie otherwise (another version) the ``__init__.py`` runs at once: the
    import is then a whole one.

    Returns
    -------
    ModuleType
        The ``tensorflow`` now in :data:`sys.modules`.
    """
    spec = importlib.util.find_spec("tensorflow")
    if spec is None:
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")
    with _IMPORT_LOCK:
        module = importlib.util.module_from_spec(spec)
        module.__class__ = _LeanTensorFlow
        sys.modules["tensorflow"] = module
        try:
            found = {
                name: getattr(importlib.import_module(where), attribute)
                for name, (where, attribute) in LEAN_API.items()
            }
            importlib.import_module("tensorflow.python.compat.v2_compat").enable_v2_behavior()
        except (ImportError, AttributeError):
            try:
                _complete(module)
            except BaseException:
                del sys.modules["tensorflow"]  # as a failed import leaves it
                raise
            return module
        parts: dict[str, _LeanPart] = {}
        for name, value in found.items():
            *path, leaf = name.split(".")
            owner: Any = module
            for depth in range(len(path)):
                prefix = ".".join(path[: depth + 1])
                if prefix not in parts:
                    parts[prefix] = _LeanPart(prefix)
                    setattr(owner, path[depth], parts[prefix])
                owner = parts[prefix]
            setattr(owner, leaf, value)
    return module


class _LeanTensorFlow(ModuleType):
    """A lean ``tensorflow`` (:func:`lean_tensorflow`): a name it lacks completes it first."""

    def __getattr__(self, name: str) -> Any:
        _complete(self)
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'tensorflow' has no attribute {name!r}") from None


class _LeanPart:
    """``tf.config`` and the like in a lean ``tensorflow``: a name it lacks is the whole API's."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # copy, pickle and the like probe for these
            raise AttributeError(name)
        module = sys.modules["tensorflow"]
        _complete(module)
        return operator.attrgetter(f"{self._path}.{name}")(module)


_completed: set[int] = set()


def _complete(module: ModuleType) -> None:
    """Run TensorFlow's ``__init__.py`` in a lean ``module``, once (:func:`lean_tensorflow`).

    Its API replaces the lean one's names. A name looked up while it runs (by the
    ``__init__.py`` itself) is one it lacks so far: :class:`AttributeError`, as in any import.
    """
    with _IMPORT_LOCK:
        if id(module) in _completed:
            return
        _completed.add(id(module))
        assert module.__spec__ is not None and module.__spec__.loader is not None
        with collection_paused(), keras_left_out():
            module.__spec__.loader.exec_module(module)


def _plugins() -> bool:
    """Whether TensorFlow's ``__init__.py`` would load device plugins or kernel libraries here.

    As it looks for them: ``TF_PLUGGABLE_DEVICE_LIBRARY_PATH``, a ``tensorflow-plugins``
    directory among the site-packages, or ``tensorflow/core/kernels``. A lean import
    (:func:`lean_tensorflow`) would leave them out: the import is then a whole one.
    """
    if os.environ.get("TF_PLUGGABLE_DEVICE_LIBRARY_PATH"):
        return True
    spec = importlib.util.find_spec("tensorflow")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if any(os.path.isdir(os.path.join(location, "core", "kernels")) for location in locations):
        return True
    site_dirs = {path for path in sys.path if "site-packages" in path}
    site_dirs.update(os.path.dirname(location) for location in locations)
    return any(os.path.isdir(os.path.join(path, "tensorflow-plugins")) for path in site_dirs)


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
