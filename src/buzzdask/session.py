"""Where work runs, for analyze, train and watch alike.

The caller's cluster or a local one started for one call; which workers hold scorer actors;
task keys the dashboard groups by; the package versions recorded with every result.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.metadata
import logging
import platform
import resource
import signal
import sys
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from typing import Any

import dask
import distributed
from distributed import Client, LocalCluster
from distributed.comm import get_address_host, parse_address
from threadpoolctl import threadpool_limits
from tornado import web

from buzzdask.dashboard import local_dashboard_lines
from buzzdask.errors import ClusterError, ParameterError
from buzzdask.logs import STARTED_CLUSTERS, check_main_guard, quiet_environment
from buzzdask.preload import MODULE as SCORER_PRELOAD_MODULE
from buzzdask.settings import LocalClusterSettings

__all__ = [
    "connect",
    "has_gpu",
    "is_running",
    "lean_dask",
    "live_workers",
    "package_versions",
    "peak_rss_by_worker",
    "peak_rss_bytes",
    "scorer_hosts",
    "scorers_per_host",
    "start_local_cluster",
    "task_key",
    "tensorflow_version",
    "worker_environment",
]

logger = logging.getLogger(__name__)


@contextmanager
def connect(
    client: Client | str | None, *, local: LocalClusterSettings, processes: bool = True
) -> Iterator[Client]:
    """The client to run on: ``client`` itself, one for a scheduler address, or a local cluster.

    A client made here (for an address, or with its local cluster, sized by ``local``, of
    worker processes unless ``processes`` is false) is closed on exit; the caller's own client
    is left open. A local cluster of threads in this process runs, while it lasts, with the
    native thread pools (BLAS, OpenMP) this process holds limited to one thread each, as
    Dask's nanny limits a worker process's (``OPENBLAS_NUM_THREADS=1`` and the like,
    ``distributed.nanny.pre-spawn-environ``): the worker's threads are the parallelism. A
    NumPy head's product on more threads left OpenBLAS's other threads spinning 0.1 s after
    each, on every core: re-scoring 1,000 30-second files took 15.2-15.6 CPU-s against
    9.9-10.4 with one thread, on two cores.
    """
    if isinstance(client, Client):
        if client.status in ("closing", "closed"):
            # Its cluster closed (a notebook's cluster cell run again, a scheduler job that
            # ended): Dask's own errors said so in its internals' words.
            raise ClusterError(
                f"the client given is {client.status}: its cluster was closed or lost; start "
                "one again and pass its new client"
            )
        with _one_run_at_a_time(client), _no_work_stealing(client):
            yield client
    elif isinstance(client, str):
        with _connected(client) as connected, _no_work_stealing(connected):
            yield connected
    elif client is not None:
        raise ParameterError(
            f"client={client!r} must be a distributed.Client, a scheduler address such as "
            "'tcp://10.0.0.5:8786', or None (a local cluster)"
        )
    else:
        stack = ExitStack()
        try:
            # A Ctrl-C (or SIGTERM) as the cluster starts takes effect once it is up, so that
            # it is closed whole: cut off half-started, Dask's exit hook printed tracebacks.
            with signals_deferred():
                cluster = stack.enter_context(start_local_cluster(local, processes=processes))
                started = stack.enter_context(Client(cluster))
            stack.enter_context(nullcontext() if processes else threadpool_limits(limits=1))
            print("buzzdask: started a local Dask cluster")
            if local.dashboard_address is not None:
                for line in local_dashboard_lines(started):
                    print(f"buzzdask: {line}")
            yield started
        finally:
            # A second Ctrl-C while it closes would leave it to Dask's exit hook (10 s).
            with signals_deferred(stopping=sys.exc_info()[1] is not None):
                stack.close()


#: The user's clients a run of this process is on, with the thread it runs in and how deep
#: (a watch's passes run on the client the watch holds): two runs on one client at once took
#: each other's scorers, and a worker with them.
_CLIENTS_IN_USE: dict[int, tuple[int, int]] = {}
_CLIENTS_LOCK = threading.Lock()


@contextmanager
def _one_run_at_a_time(client: Client) -> Iterator[None]:
    """Hold ``client`` for one run; refuse an asynchronous client, and a second run at once."""
    if client.asynchronous:
        raise ParameterError(
            "client is asynchronous (Client(asynchronous=True)), which buzzdask cannot wait on: "
            "give a client made without asynchronous=True, or a scheduler address"
        )
    thread = threading.get_ident()
    with _CLIENTS_LOCK:
        holder, depth = _CLIENTS_IN_USE.get(id(client), (thread, 0))
        if holder != thread:
            raise ParameterError(
                "another buzzdask run is on this client now (from another thread): run them one "
                "after the other, or give each a client of its own cluster"
            )
        _CLIENTS_IN_USE[id(client)] = (thread, depth + 1)
    try:
        yield
    finally:
        with _CLIENTS_LOCK:
            if depth:
                _CLIENTS_IN_USE[id(client)] = (thread, depth)
            else:
                del _CLIENTS_IN_USE[id(client)]


@contextmanager
def _no_work_stealing(client: Client) -> Iterator[None]:
    """Dask's work stealing paused on ``client``'s scheduler while a run holds it.

    Stealing moves a task placed loosely on a busy worker to an idle one. A scorer's actor so
    moved refuses to start there (:class:`~buzzdask.errors.ScorerMisplacedError`), and Dask
    (2026.8) then loses track of the actor and drops a worker of the user's cluster for good;
    decode tasks so moved onto a scorer's worker compete with TensorFlow (:data:`LEAN_DASK`).
    Started again as the run ends, if it ran before.
    """
    paused = client.run_on_scheduler(_pause_stealing)
    try:
        yield
    finally:
        if paused:
            with suppress(Exception):  # a cluster closed meanwhile: nothing to start again
                client.run_on_scheduler(_resume_stealing)


async def _pause_stealing(dask_scheduler: Any) -> bool:
    """Stop the scheduler's work stealing; whether it was running."""
    stealing = dask_scheduler.extensions.get("stealing")
    if stealing is None or "stealing" not in dask_scheduler.periodic_callbacks:
        return False
    await stealing.stop()
    return True


async def _resume_stealing(dask_scheduler: Any) -> None:
    await dask_scheduler.extensions["stealing"].start()


#: The handlers a :func:`stops_remembered` block replaced, and the stops it received.
_REMEMBERING: dict[int, Callable[[int, Any], Any]] = {}
_RECEIVED: list[int] = []


@contextmanager
def stops_remembered() -> Iterator[Callable[[], None]]:
    """Ctrl-C and SIGTERM remembered as they come; yields :func:`raise_if_stopped`.

    Python drops an exception raised inside a finaliser (a Dask future's ``__del__``): a
    training stopped there went on to write its model, and one whose workers the same Ctrl-C
    had ended waited for them for good. :func:`raise_if_stopped`, called where stopping early
    saves work and in the loops that wait on the cluster, calls again the handler the signal
    had (Ctrl-C's KeyboardInterrupt, the command line's SIGTERM). Only in the main thread, and
    only for signals handled in Python (an ignored one stays ignored); a block inside another
    is the outer one's. The stop dropped is not printed as Python's "Exception ignored in"
    traceback: it is raised again.
    """
    if threading.current_thread() is not threading.main_thread() or _REMEMBERING:
        yield raise_if_stopped
        return
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if callable(handler):
            _REMEMBERING[number] = handler
            signal.signal(number, functools.partial(_remembered, handler))
    unraisable_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unless_a_stop, unraisable_hook)
    try:
        yield raise_if_stopped
    finally:
        sys.unraisablehook = unraisable_hook
        for held, handler in _REMEMBERING.items():
            signal.signal(held, handler)
        _REMEMBERING.clear()
        _RECEIVED.clear()


def raise_if_stopped() -> None:
    """Raise a Ctrl-C or SIGTERM that came in a :func:`stops_remembered` block, once.

    Nothing where none came, outside such a block, or in another thread: a stop not dropped
    has raised already, and is on its way out past the callers.
    """
    if _RECEIVED and threading.current_thread() is threading.main_thread():
        number = _RECEIVED[0]
        _RECEIVED.clear()
        _REMEMBERING[number](number, None)


def _remembered(handler: Callable[[int, Any], Any], number: int, frame: Any) -> None:
    _RECEIVED.append(number)
    handler(number, frame)


def _unless_a_stop(hook: Callable[[Any], object], unraisable: Any) -> None:
    """``hook(unraisable)``, unless it is a remembered stop's (Ctrl-C's, SIGTERM's)."""
    if not (_RECEIVED and isinstance(unraisable.exc_value, KeyboardInterrupt)):
        hook(unraisable)


@contextmanager
def signals_deferred(*, stopping: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM held until the block ends, then delivered (in the main thread).

    Parameters
    ----------
    stopping : bool, default: False
        The process is stopping already (an exception is on its way): a signal that came
        meanwhile is dropped, not delivered again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    held = {number: handler for number, handler in previous.items() if handler is not None}
    for number in held:
        signal.signal(number, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)
        if received and not stopping:
            signal.raise_signal(received[0])


def _connected(address: str) -> Client:
    """A client of the scheduler at ``address``; an address that is none, a ParameterError."""
    if not address.strip():
        raise ParameterError(
            "the scheduler address is empty: give one such as 'tcp://10.0.0.5:8786' "
            "(--scheduler, client=), or none for a local cluster"
        )
    # Read before a Client is made: a Client that fails to start leaves its threads behind.
    try:
        if parse_address(address)[0] != "inproc":  # another process' has no host to read
            get_address_host(address)
    except ValueError as error:  # "missing port number", an unknown protocol
        raise ParameterError(f"scheduler address {address!r}: {error}") from None
    try:
        return Client(address)
    except (OSError, TypeError) as error:  # nothing there (a timeout); tls:// without TLS
        raise ClusterError(
            f"cannot reach the scheduler at {address}: {error} (is it running, and is this "
            "its address? `python -m buzzdask.cluster` prints it)"
        ) from None


def start_local_cluster(settings: LocalClusterSettings, *, processes: bool = True) -> LocalCluster:
    """One worker process that decodes and holds the scorer, unless configured otherwise.

    ``settings`` are ``buzzdask.local-cluster.*``: workers (null: 1), threads per worker
    (null: every core), dashboard address. One process on one machine: decoded
    audio never crosses a socket, ffmpeg runs in processes of its own anyway, and plain WAVs
    are resampled in threads that let go of the GIL. The worker processes inherit
    :func:`~buzzdask.logs.quiet_environment`'s settings and :func:`lean_dask`'s; where each will
    hold a scorer, they start importing TensorFlow at once (:mod:`buzzdask.preload`).

    ``processes=False``: the worker's threads run in this process instead, which starts in a
    fraction of the time; for work that decodes nothing (a re-scoring), where a worker process
    would isolate nothing and only cost its start.

    Raises
    ------
    BuzzdaskError
        Called from a script's top level without a ``__main__`` guard (see
        :func:`~buzzdask.logs.check_main_guard`).
    """
    if processes:
        check_main_guard()
    quiet_environment()
    n_workers = (settings.n_workers or 1) if processes else 1
    # Only where every worker will hold a scorer: a decode-only worker never needs TensorFlow.
    all_score = settings.scorers is None or settings.scorers >= n_workers
    with lean_dask(), warnings.catch_warnings():
        # Taken by another cluster (a shared login node): Dask picks a free port, and the
        # dashboard line that follows gives it; its three-line warning only alarms.
        warnings.filterwarnings("ignore", message=r"Port \d+ is already in use")
        cluster = LocalCluster(
            n_workers=n_workers,
            # The cores this process may use (a SLURM job's share of a node), not the node's.
            threads_per_worker=settings.threads_per_worker or dask.system.cpu_count(),
            processes=processes,
            dashboard_address=settings.dashboard_address,
            # The dashboard's server listens at once; its pages come on the first visit.
            scheduler_kwargs={"dashboard": False},
            preload=[SCORER_PRELOAD_MODULE] if processes and all_score else [],
        )
    STARTED_CLUSTERS.add(cluster)
    if settings.dashboard_address is not None:
        _DashboardPages(cluster).build_on_first_visit()
    return cluster


class _DashboardPages:
    """The Dask dashboard's pages (``/status`` ...) of a started cluster, built on first visit.

    The scheduler would build them as it starts, before its first worker process is spawned,
    importing bokeh (0.3 CPU-s, 0.5 s), which a run whose dashboard nobody opens never needs.
    Until the first visit, a path the scheduler's own handlers do not serve (its
    ``/info``, ``/health``, buzzdask's ``/buzzdask`` page) leads here: bokeh is imported in a
    thread, the pages are added on the scheduler's event loop as the scheduler adds them, and
    the visitor is sent on to the address asked for. From then on, a path that is no page gets
    Dask's 404.
    """

    def __init__(self, cluster: LocalCluster) -> None:
        self.scheduler = cluster.scheduler
        self.prefix = cluster.scheduler_spec["options"].get("http_prefix", "/")
        self.first_visits = web.Application([(r".*", _FirstVisit, {"pages": self})])
        self._built: asyncio.Future[bool] | None = None

    def build_on_first_visit(self) -> None:
        if self.scheduler is not None:
            self.scheduler.http_application.add_application(self.first_visits)

    async def build(self) -> bool:
        """Build the pages, once however many visits ask at once; False without bokeh."""
        if self._built is None:
            self._built = asyncio.ensure_future(self._build())
        return await asyncio.shield(self._built)

    async def _build(self) -> bool:
        assert self.scheduler is not None
        application = self.scheduler.http_application
        try:
            dashboard = await asyncio.get_running_loop().run_in_executor(
                None, importlib.import_module, "distributed.dashboard.scheduler"
            )
        except ImportError as error:  # bokeh is a dependency; a broken install still runs
            logger.warning("no Dask dashboard pages: %s", error)
            return False
        else:
            dashboard.connect(
                application, self.scheduler.http_server, self.scheduler, prefix=self.prefix
            )
            return True
        finally:
            application.applications.remove(self.first_visits)


class _FirstVisit(web.RequestHandler):
    def initialize(self, pages: _DashboardPages) -> None:
        self.pages = pages

    async def get(self) -> None:
        if not await self.pages.build():
            raise web.HTTPError(404)
        self.redirect(self.request.uri or "/")


#: glibc's malloc in the worker processes buzzdask starts. Dask's nanny sets a 64 KiB trim
#: threshold, which also fixes glibc's mmap threshold at 128 KiB: every array of a 30-second
#: recording (raw, float, resampled) was then a fresh mapping whose every page faulted in, and
#: returned to the system when freed. Up to 16 MiB they now come from the heap and are reused:
#: on two cores, 1,000 such files took 4.5 s less system CPU (2.7 million page faults fewer) and
#: about 0.13 GB more peak memory; a 10-minute chunk (38 MB) is still mapped and given back.
WORKER_MALLOC: dict[str, int] = {
    "MALLOC_MMAP_THRESHOLD_": 16 * 2**20,
    "MALLOC_TRIM_THRESHOLD_": 32 * 2**20,
}

#: numpy's requests for transparent huge pages, off in the worker processes buzzdask starts
#: (numpy reads this as it is imported, so it is set before the process starts). numpy asks
#: for huge pages for every array of 4 MiB or more, a decoded chunk among them. On a VM whose
#: host takes back the memory its guest has had free for a moment (free page reporting, as on
#: the benchmarks' machine), writing a new 200 MB array cost 1.7-2.0 s of system CPU in huge
#: pages and 0.06-0.09 s in 4 KiB ones; elsewhere the difference is small, as the decoded
#: arrays are reused (:mod:`buzzdask.buffers`), and a kernel that gives every process huge
#: pages (``always``) still does.
WORKER_HUGEPAGES: dict[str, str] = {"NUMPY_MADVISE_HUGEPAGE": "0"}

#: Environment of the worker processes buzzdask starts, set before anything imports TensorFlow.
#: Should a worker's TensorFlow load Keras (scorers leave it out of the import,
#: :func:`buzzdask.preload.import_tensorflow`, and load SavedModels, no Keras model), it is then
#: tf_keras (Keras 2) rather than Keras 3, whose import also loads matplotlib and IPython where
#: they are installed: about 0.6 s more.
WORKER_ENVIRON: dict[str, str] = {"TF_USE_LEGACY_KERAS": "1"}

#: Dask settings of the schedulers and workers buzzdask starts. No work stealing: it moved
#: decode tasks onto the scorer's worker, where ffmpeg then competed with TensorFlow (209x ->
#: 291x realtime on two cores with it off). Dask's own periodic work, slowed or off: the
#: workers' statistical profiler (a thread sampling every thread's stack every 10 ms), the
#: memory and system monitors (psutil every 0.1 s and 0.5 s) and the event loop's watchdog
#: (every 20 ms). Together about 3 % of a run's CPU on two cores (benchmarks/); the dashboard
#: keeps its task stream and progress, not its profile page.
LEAN_DASK: dict[str, Any] = {
    "distributed.scheduler.work-stealing": False,
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "1s",
}


@contextmanager
def lean_dask() -> Iterator[None]:
    """Schedulers and local workers started inside this block take :data:`LEAN_DASK`.

    Their nannies also give the worker processes :data:`WORKER_MALLOC` and
    :data:`WORKER_HUGEPAGES` (before a process starts, as glibc and numpy read them then) and
    :data:`WORKER_ENVIRON`. A variable already in this process's environment wins, as does the
    trim threshold a nanny of Dask's defaults, started earlier in this process, leaves there.
    """
    nanny = {
        **{
            f"distributed.nanny.pre-spawn-environ.{name}": v
            for name, v in {**WORKER_MALLOC, **WORKER_HUGEPAGES}.items()
        },
        **{f"distributed.nanny.environ.{name}": v for name, v in WORKER_ENVIRON.items()},
    }
    with dask.config.set({**LEAN_DASK, **nanny}):
        yield


def worker_environment() -> dict[str, str]:
    """What a job script's workers need in their environment to run as local workers do.

    Dask's nanny's own variables (``distributed.nanny.pre-spawn-environ``: one thread for
    OpenMP, MKL and OpenBLAS), then :data:`WORKER_MALLOC`, :data:`WORKER_HUGEPAGES`,
    :data:`WORKER_ENVIRON` and :data:`LEAN_DASK`'s settings (as the ``DASK_*`` variables Dask
    reads). Local workers take them from this process's Dask configuration; a SLURM job's
    workers read their own, so a job script exports these. The one-batch-job mode's workers
    have no nanny (:mod:`buzzdask.cluster.batch`): without these, numpy's OpenBLAS there
    starts a thread per core of the job, each spinning about 0.1 s as numpy is imported and
    again after each product of a NumPy head (:func:`connect`). At the 0.1 CPU-s a thread
    measured on two cores, that is some 85 CPU-s at the start of a whole Cardinal GPU node's
    nine tasks, and 9.5 after each product in a scorer.
    """
    nanny = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    worker_variables = {**nanny, **WORKER_MALLOC, **WORKER_HUGEPAGES, **WORKER_ENVIRON}
    environment = {name: str(value) for name, value in worker_variables.items()}
    for key, value in LEAN_DASK.items():
        path = key.upper().replace("-", "_").split(".")
        environment["DASK_" + "__".join(path)] = str(value)
    return environment


def has_gpu(worker: Mapping[str, Any]) -> bool:
    """Whether a worker (an entry of ``scheduler_info()["workers"]``) declares a GPU resource."""
    return worker.get("resources", {}).get("GPU", 0) > 0


def is_running(worker: Mapping[str, Any]) -> bool:
    """Whether a worker (as the scheduler describes it) takes tasks: not paused, not closing."""
    return worker.get("status", "running") == "running"


def scorer_hosts(
    workers: Mapping[str, Mapping[str, Any]], *, cpu_workers: int | None = 1
) -> list[str]:
    """Workers for scorer actors: every GPU worker, else the first ``cpu_workers`` by address.

    Running CPU workers come before paused ones (their memory full): Dask would run a paused
    worker's actor task on another worker, where the scorer refuses to load.
    ``cpu_workers=None``: every worker (a CPU-only cluster scores on all of them).
    """
    gpu = sorted(address for address, worker in workers.items() if has_gpu(worker))
    return gpu or sorted(workers, key=lambda a: (not is_running(workers[a]), a))[:cpu_workers]


def scorers_per_host(addresses: Sequence[str]) -> dict[str, int]:
    """How many of the scorer ``addresses`` share each one's host (they split its cores)."""
    hosts = {address: get_address_host(address) for address in addresses}
    counts = Counter(hosts.values())
    return {address: counts[host] for address, host in hosts.items()}


def task_key(prefix: str) -> str:
    """A unique task key; the dashboard groups tasks by ``prefix`` (decode, score...).

    Random: a task submitted again after a failure must not share the first one's key, and a
    hash of the task's arguments beside it would tell no more.
    """
    return f"{prefix}-{uuid.uuid4().hex}"


def live_workers(client: Client) -> dict[str, dict[str, Any]]:
    """The scheduler's workers now, by address (``scheduler_info()["workers"]``).

    Raises
    ------
    ClusterError
        If the scheduler is gone (its cluster closed, its job ended): a client that lost it
        answers with nothing.
    """
    info = client.scheduler_info(n_workers=-1)
    if "workers" not in info:
        raise ClusterError(
            "the Dask scheduler is gone (its cluster closed, or its job ended); what was written "
            "is kept: resume to finish"
        )
    return dict(info["workers"])


def peak_rss_by_worker(client: Client, *, timeout_s: float) -> dict[str, int]:
    """Peak resident memory of each worker process [bytes] (ffmpeg runs in its own processes).

    A worker that died during the run, or does not answer within ``timeout_s`` [s] (stopped:
    a suspended job, a node hung on its file system), has no answer; the others still report.
    """
    try:
        return client.run(peak_rss_bytes, on_error="ignore", callback_timeout=timeout_s)
    except TimeoutError:
        pass  # one worker holds the whole broadcast up: each is asked alone, all at once
    workers = list(live_workers(client))
    ask = functools.partial(_peak_rss_of, client, timeout_s=timeout_s)
    with ThreadPoolExecutor(max_workers=max(1, min(len(workers), 32))) as pool:
        answers = dict(zip(workers, pool.map(ask, workers), strict=True))
    silent = sorted(address for address, rss in answers.items() if rss is None)
    if silent:
        logger.warning(
            "no answer within %g s from %s: peak memory left out", timeout_s, ", ".join(silent)
        )
    return {address: rss for address, rss in answers.items() if rss is not None}


def _peak_rss_of(client: Client, address: str, *, timeout_s: float) -> int | None:
    try:
        answer = client.run(
            peak_rss_bytes, workers=[address], on_error="ignore", callback_timeout=timeout_s
        )
    except TimeoutError:
        return None
    return answer.get(address)


def peak_rss_bytes() -> int:
    """Peak resident memory of the process that runs it [bytes] (a worker's, run there).

    ``ru_maxrss`` counts kilobytes on Linux, bytes on macOS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def tensorflow_version() -> str:
    """TensorFlow's version in this process: the loaded module's, else the installed one's.

    Not imported here: a scorer with NumPy heads only never loads it.
    """
    module = sys.modules.get("tensorflow")
    if module is not None:
        return str(module.__version__)
    for distribution in ("tensorflow", "tensorflow-cpu", "tensorflow-macos"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def package_versions() -> dict[str, str]:
    """Versions recorded in results' metadata (TensorFlow's comes from the scorer's worker)."""
    import pyarrow

    from buzzdask import __version__

    return {
        "buzzdask": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": importlib.metadata.version("numpy"),
        # Read without importing pandas (0.2 s), which a decode-only worker never needs.
        "pandas": importlib.metadata.version("pandas"),
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
        # It resamples plain WAVs (decoded in process); ffmpeg's own is in "ffmpeg".
        "soxr": importlib.metadata.version("soxr"),
        # It reads MP3 headers, whose durations plan the chunks.
        "mutagen": importlib.metadata.version("mutagen"),
    }
