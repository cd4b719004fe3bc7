"""Where log lines go: a quiet console, ``OUTPUT/buzzdask.log``, and the workers' lines.

Verbosity, the same in every process (client, local and SLURM workers):

- 0 (default): the console shows buzzdask's warnings and errors; TensorFlow's C++ log, absl,
  gRPC and Dask's own loggers show errors at most (TensorFlow's C++ nothing below FATAL).
- 1 (``-v``): also buzzdask's per-chunk lines, and the others' warnings (Dask's nannies),
  but for warnings that ask nothing of a user (bokeh's about the dashboard's hosts).
- 2 (``--debug``): everything, at INFO and below.

Below 2, the workers of a local cluster buzzdask started send their stderr (TensorFlow's C++ lines
as it loads: oneDNN, ``cudart_stub``) to the run's log instead of the console; where there is
no run's log (training), to ``os.devnull`` (:func:`quiet_workers`).

Whatever the verbosity, each run's ``buzzdask.log`` gets buzzdask's INFO lines from the client
and, forwarded as they happen, from the workers.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import logging
import multiprocessing
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import WorkerPlugin

from buzzdask import preload
from buzzdask.errors import BuzzdaskError
from buzzdask.progress import OneLineFormatter, TqdmHandler, console_lines, logger

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "STARTED_CLUSTERS",
    "WorkerLogging",
    "check_main_guard",
    "configure_console",
    "quiet_environment",
    "run_log",
]

# Read by TensorFlow's C++ and gRPC when they load, so set before TensorFlow is imported and
# before worker processes start (they inherit it); a value the user set is kept.
_ENVIRONMENT = {
    "TF_CPP_MIN_LOG_LEVEL": ("3", "1", "0"),
    "GRPC_VERBOSITY": ("ERROR", "ERROR", "INFO"),
}
# Python loggers of the libraries buzzdask runs, by verbosity.
_THIRD_PARTY = ("distributed", "absl", "tensorflow", "h5py", "bokeh", "tornado")
_THIRD_PARTY_LEVEL = (logging.ERROR, logging.WARNING, logging.INFO)
# Loggers at ERROR below --debug: their warnings ask nothing of a user. bokeh's says that Dask's
# dashboard takes connections from any host, which is how Dask configures it.
_UNACTIONABLE = ("bokeh.server.util",)
_BUZZDASK_LEVEL = (logging.WARNING, logging.INFO, logging.DEBUG)
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s%(where)s: %(message)s"

_configured: list[int] = []  # the verbosity configure_console chose, if it ran
#: The local clusters buzzdask started in this process: their workers' stderr is the run's to
#: route (a cluster of the caller's own is left as it was).
STARTED_CLUSTERS: weakref.WeakSet[Any] = weakref.WeakSet()


def quiet_environment(verbosity: int | None = None) -> None:
    """Silence TensorFlow, absl, gRPC and Dask in this process and in workers it starts.

    Parameters
    ----------
    verbosity : {0, 1, 2}, optional
        See the module's docstring; default: the command line's (:func:`configure_console`),
        else 0. Environment variables the user set are left alone.
    """
    if verbosity is None:
        verbosity = _configured[-1] if _configured else 0
    for name, values in _ENVIRONMENT.items():
        os.environ.setdefault(name, values[verbosity])
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(_THIRD_PARTY_LEVEL[verbosity])
    for name in _UNACTIONABLE:
        logging.getLogger(name).setLevel(logging.ERROR if verbosity < 2 else logging.NOTSET)
    worker_lines = logging.getLogger("distributed.worker")
    if verbosity < 2:
        worker_lines.addFilter(_TASK_FAILURES)  # once: a Filterer keeps one of each
    else:
        worker_lines.removeFilter(_TASK_FAILURES)


class _TaskFailures(logging.Filter):
    """Drop Dask's "Compute Failed" lines, a traceback each, where workers log to this process.

    Workers that are threads of this process (a re-scoring's local cluster) log there: each
    failed task is buzzdask's to report, once and in words (a row in the errors, or the run's
    error), not as Dask's task dump before it. ``--debug`` keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


_TASK_FAILURES = _TaskFailures()


def console_configured() -> bool:
    """Whether the command line set up the console (:func:`configure_console`).

    Its commands say a stop themselves; the Python API's calls say it in their own words.
    """
    return bool(_configured)


def configure_console(verbosity: int) -> None:
    """The command line's console: buzzdask's lines at ``verbosity``, the others quiet.

    Parameters
    ----------
    verbosity : {0, 1, 2}
        0 (default), 1 (``-v``) or 2 (``--debug``); see the module's docstring.
    """
    _configured.append(verbosity)
    quiet_environment(verbosity)
    console_lines(_BUZZDASK_LEVEL[verbosity])
    if verbosity < 2:
        preload.console_is_stderr.set()


class _WhereFilter(logging.Filter):
    """Fill ``%(where)s``: `` [worker ADDRESS]`` on a line forwarded from a worker."""

    def filter(self, record: logging.LogRecord) -> bool:
        worker = getattr(record, "worker", None)
        record.where = f" [worker {worker}]" if worker else ""
        return True


class WorkerLogging(WorkerPlugin):
    """On each worker: the client's quiet libraries, and buzzdask's INFO lines handled (forwarded).

    Made on the client, it carries the client's settings (environment, library log level).
    Registered before the scorers load TensorFlow, so its environment applies there too: SLURM
    workers, started by their job script, get the client's verbosity this way.
    """

    name = "buzzdask-logging"

    def __init__(self, *, stderr: Path | None = None) -> None:
        self.environment = {name: os.environ[name] for name in _ENVIRONMENT if name in os.environ}
        self.level = logging.getLogger(_THIRD_PARTY[0]).getEffectiveLevel()
        self.stderr = stderr

    def setup(self, worker: Any) -> None:
        """Apply the client's settings in this worker process; send its fd 2 to ``stderr``."""
        if self.stderr is not None:
            # TensorFlow's C++ logs as its libraries load, before any setting is read
            # (oneDNN, cudart_stub): only the file descriptor can keep it off the console.
            log = os.open(self.stderr, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            os.dup2(log, 2)
            os.close(log)
        os.environ.update(self.environment)
        for name in _THIRD_PARTY:
            logging.getLogger(name).setLevel(self.level)
        logger.setLevel(logging.INFO)
        preload.logging_set.set()  # TensorFlow may load now (where preloaded)


class _RunLogFile(logging.FileHandler):
    """The run's log file, which stops at the first line it cannot write (a full disk).

    ``logging`` would print a traceback on the console for that line and every later one; one
    line says it instead, and the run goes on (or stops on its own error).
    """

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        error = sys.exc_info()[1]
        sys.stderr.write(f"buzzdask: cannot write {self.baseFilename} any more ({error})\n")

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # what it still held could not be written either
            self.failed = True


class _ToRoot(logging.Handler):
    """Hands records on to the root logger's handlers, as propagation would, from its level."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def append_to_run_log(path: Path, message: str) -> None:
    """One INFO line at the end of a run's log, once the run's handler is closed.

    Its last word (how it ended), which the command prints after the log's lines.
    """
    with suppress(OSError):  # a disk full, the output gone: the command says it anyway
        handler = _RunLogFile(path, encoding="utf-8", errors="backslashreplace")
        handler.setFormatter(OneLineFormatter(_FILE_FORMAT))
        handler.addFilter(_WhereFilter())
        try:
            handler.handle(logger.makeRecord(logger.name, logging.INFO, "", 0, message, (), None))
        finally:
            handler.close()


@contextmanager
def run_log(
    path: Path, client: Client, *, timeout_s: float, verbose: bool = False
) -> Iterator[logging.Handler]:
    """Log the run into ``path``: the client's buzzdask lines and the workers' (forwarded).

    Workers' lines are forwarded as they are logged (``Client.forward_logging``), not fetched at
    the end (``get_worker_logs``): what was logged before a crash of the client or a worker is
    already in the file, which is flushed line by line. An exception leaving the block is
    written with its traceback (to the file only: the caller reports it).

    Parameters
    ----------
    path : Path
        The log file (appended to: a resumed run continues it).
    client : distributed.Client
        The run's client; its workers get :class:`WorkerLogging` and forward buzzdask's lines.
    timeout_s : float > 0 [s]
        How long the workers have to take the run's plugins (:class:`WorkerLogging`, Dask's
        log forwarding). A worker that does not answer (stopped: a suspended job, a node hung
        on its file system) would otherwise hold the run up until Dask gives it up
        (``worker-ttl``, minutes); it takes the plugins when it answers.
    verbose : bool, default: False
        With no console handler configured (the Python API), show buzzdask's INFO lines on
        stderr for the run, not only its warnings.

    Yields
    ------
    logging.Handler
        The log file's: lines said before it opened go to it alone (they were on the console).

    Notes
    -----
    Workers of a local cluster buzzdask started (:data:`STARTED_CLUSTERS`) write to this
    process's console: but with ``--debug``, their stderr goes to ``path`` too (TensorFlow's
    C++ lines). A cluster of the caller's own is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name that is not UTF-8 (an old card's) is written escaped, not the end of the log.
    handler = _RunLogFile(path, encoding="utf-8", errors="backslashreplace")
    handler.setLevel(logging.INFO)
    handler.setFormatter(OneLineFormatter(_FILE_FORMAT))
    handler.addFilter(_WhereFilter())
    handlers: list[logging.Handler] = [handler]
    # The console that the logger's last resort would have been; not beside a handler of the
    # caller's own (a notebook's logging.basicConfig), which would print each line twice.
    if not logger.hasHandlers():
        handlers.append(TqdmHandler(level=_BUZZDASK_LEVEL[int(verbose)]))
        handlers[-1].setFormatter(OneLineFormatter("buzzdask: %(message)s"))
    old_propagate = logger.propagate
    old_level = logger.level
    if old_propagate:
        # The logger goes to INFO for the run's file. Only what the caller's root handlers
        # showed before (a notebook's logging.basicConfig: warnings) reaches them, and none
        # reaches a root handler that appears during the run: TensorFlow's first log line
        # (a SavedModel loaded in this process: a re-scoring's threads, a training's save)
        # calls logging.basicConfig, which then printed every line as "INFO:buzzdask:...".
        logger.propagate = False
        if logging.getLogger().handlers:
            shown = logger.getEffectiveLevel()
            handlers.append(_ToRoot(level=min(shown, _BUZZDASK_LEVEL[int(verbose)])))
    logger.setLevel(min(logging.INFO, old_level or logging.WARNING))
    for added in handlers:
        logger.addHandler(added)
    # Only a cluster buzzdask started: a user's own keeps its workers' stderr where it was.
    local = getattr(client, "cluster", None) in STARTED_CLUSTERS
    quiet = local and not (_configured and _configured[-1] == 2)
    # Workers in this process (a cluster of threads) log through these handlers already.
    if not str(getattr(client.scheduler, "address", "")).startswith("inproc://"):
        plugin = WorkerLogging(stderr=path if quiet else None)
        _on_every_worker(
            timeout_s,
            functools.partial(client.register_plugin, plugin),
            functools.partial(client.forward_logging, "buzzdask", level=logging.INFO),
        )
    try:
        yield handler
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as the command raises it
        why = str(stop) or "Ctrl-C"
        handler.handle(
            logger.makeRecord(
                logger.name, logging.WARNING, __file__, 0, "run interrupted (%s)", (why,), None
            )
        )
        if not _configured:  # the Python API (a notebook's Interrupt): the CLI says it itself
            said = logger.makeRecord(
                logger.name,
                logging.WARNING,
                __file__,
                0,
                "interrupted (%s): what was written to %s is kept; the same call with "
                "output=%r and on_conflict='resume' finishes the run",
                (why, path.parent, str(path.parent)),
                None,
            )
            for console in handlers[1:]:
                console.handle(said)
        raise
    except BaseException as error:
        handler.handle(
            logger.makeRecord(
                logger.name, logging.ERROR, __file__, 0, "run failed: %r", (error,), sys.exc_info()
            )
        )
        raise
    finally:
        for added in handlers:
            logger.removeHandler(added)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        handler.close()


def quiet_workers(client: Client, *, timeout_s: float) -> None:
    """The client's quiet settings on its workers, for work without a run log (training).

    The workers of a local cluster share the command's console: below ``--debug`` (where
    :func:`configure_console` ran), their stderr goes to ``os.devnull`` instead, as a run's goes
    to its log: TensorFlow's native start-up lines, and each worker's traceback of the Ctrl-C a
    terminal sends them too. buzzdask's own lines reach the client all the same (forwarded).

    Parameters
    ----------
    client : distributed.Client
    timeout_s : float > 0 [s]
        How long the workers have to take the plugin (as :func:`run_log`'s).
    """
    if str(getattr(client.scheduler, "address", "")).startswith("inproc://"):
        return  # workers in this process: its own settings apply
    local = getattr(client, "cluster", None) in STARTED_CLUSTERS
    quiet = local and preload.console_is_stderr.is_set()
    plugin = WorkerLogging(stderr=Path(os.devnull) if quiet else None)
    _on_every_worker(timeout_s, functools.partial(client.register_plugin, plugin))


def _on_every_worker(timeout_s: float, *registrations: Callable[[], object]) -> None:
    """Run each of ``registrations`` (a worker plugin's), all at once, waiting ``timeout_s``.

    The scheduler holds a plugin from the start and sends it to every worker at once: the
    workers that answer take it at once, the others when they do (or when they join), whether
    or not this still waits. An error from a registration that ended is raised.
    """
    done: list[concurrent.futures.Future[object]] = []
    for registration in registrations:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        # Daemon threads: one still waiting on a stopped worker must not hold up the
        # interpreter's exit.
        threading.Thread(
            target=_resolve, args=(future, registration), name="buzzdask-plugin", daemon=True
        ).start()
        done.append(future)
    finished, waiting = concurrent.futures.wait(done, timeout=timeout_s)
    for future in finished:
        future.result()
    if waiting:
        logger.warning(
            "a worker has not answered for %g s (stopped?): the run goes on; its log lines "
            "follow once it answers",
            timeout_s,
        )


def _resolve(future: concurrent.futures.Future[object], call: Callable[[], object]) -> None:
    try:
        future.set_result(call())
    except BaseException as error:
        future.set_exception(error)


def check_main_guard() -> None:
    """Refuse to start a local cluster from a script's top level without a ``__main__`` guard.

    Worker processes are spawned: each imports the script again, which without the guard
    would start a cluster of its own (hundreds of lines, then ``Nanny failed to start``).

    Raises
    ------
    BuzzdaskError
        Called from a spawned process's import of the script, or from module-level code of the
        running script that is not under ``if __name__ == "__main__":``.
    """
    if multiprocessing.parent_process() is not None and "__mp_main__" in sys.modules:
        raise BuzzdaskError(_GUARD_FIX.format(script=sys.modules["__mp_main__"].__file__))
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and not (
        main is not None and frame.f_globals is vars(main) and frame.f_code.co_name == "<module>"
    ):
        frame = frame.f_back
    # multiprocessing's spawn does not run a package's __main__ again (python -m buzzdask).
    spec_name = getattr(getattr(main, "__spec__", None), "name", "")
    if frame is None or script is None or spec_name.endswith("__main__"):
        return
    try:
        tree = ast.parse(Path(script).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return
    if not any(_guards(node, frame.f_lineno) for node in tree.body):
        raise BuzzdaskError(_GUARD_FIX.format(script=script))


_GUARD_FIX = (
    "{script} starts a local Dask cluster at its top level: put the call under "
    "'if __name__ == \"__main__\":' (the cluster's worker processes import the script again), "
    "or pass client= a Client of a cluster started elsewhere"
)


def _guards(node: ast.stmt, line: int) -> bool:
    """Whether ``node`` is an ``if`` testing ``__name__ == "__main__"`` that holds ``line``.

    The comparison may be part of the test (``if __name__ == "__main__" and args:``).
    """
    if not isinstance(node, ast.If):
        return False
    inside = node.lineno <= line <= (node.end_lineno or node.lineno)
    return inside and any(_is_main_test(test) for test in ast.walk(node.test))


def _is_main_test(test: ast.AST) -> bool:
    if not isinstance(test, ast.Compare) or not all(isinstance(op, ast.Eq) for op in test.ops):
        return False
    sides = [test.left, *test.comparators]
    names = {s.id for s in sides if isinstance(s, ast.Name)}
    values = {s.value for s in sides if isinstance(s, ast.Constant)}
    return names == {"__name__"} and values == {"__main__"}
