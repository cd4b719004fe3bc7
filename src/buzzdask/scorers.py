"""The client's side of the scorer actors: start, placement, refresh, loss and re-creation.

One :class:`ScorerPool` serves an analysis (actors with a head) and a training (actors without
one, for embeddings). It decides which workers hold an actor (every GPU worker, else up to
``cpu_scorer_workers`` CPU workers, whose cores the actors on one host split), which workers
decode, when a failed score task means its actor was lost, and how to go on without it. The
actor itself is :class:`buzzdask.score.Scorer`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future, wait

from buzzdask.errors import BuzzdaskError, ClusterError, ScorerError, ScorerMisplacedError
from buzzdask.frames import FrameSpec
from buzzdask.progress import format_count, logger
from buzzdask.score import submit_scorer
from buzzdask.session import (
    has_gpu,
    is_running,
    live_workers,
    raise_if_stopped,
    scorer_hosts,
    scorers_per_host,
    task_key,
    tensorflow_version,
)
from buzzdask.settings import Settings

__all__ = [
    "REFRESH_EVERY_S",
    "ScorerOptions",
    "ScorerPool",
    "decode_workers",
    "free_stranded_tasks",
]

#: Seconds between looks for workers that joined (to hold a scorer) or left.
REFRESH_EVERY_S = 5.0


def free_stranded_tasks(dask_scheduler: Any) -> int:
    """Free the tasks placed loosely on workers that have all left to run on any worker.

    Run on the scheduler (``Client.run_on_scheduler``). Dask (2026.8) offers a worker that
    joins only the ``no-worker`` tasks whose worker restrictions name it, loose ones
    (``allow_other_workers``) included: when every decode worker went at once (SLURM jobs at
    their time limit) and replacements joined, the decode tasks placed on the lost ones waited
    for them forever (strict restrictions do so by design: dask/distributed#7346). Returns
    how many were freed.
    """
    present = dask_scheduler.workers.keys()
    stranded = [
        task
        for task in dask_scheduler.unrunnable
        if task.loose_restrictions
        and task.worker_restrictions
        and not task.worker_restrictions & present
    ]
    for task in stranded:
        task.worker_restrictions = None
    if stranded:
        dask_scheduler.transitions(
            {task.key: "processing" for task in stranded},
            stimulus_id=f"buzzdask-free-stranded-{time.time()}",
        )
    return len(stranded)


@dataclass(frozen=True)
class ScorerOptions:
    """What every actor of a pool is started with (see :class:`buzzdask.score.Scorer`).

    Parameters
    ----------
    head_path : tuple of str, str or None
        The heads' SavedModels; ``None`` for embeddings only.
    embedder_handle : str or None
        ``None``: heads only, on stored embeddings of ``embedding_size`` values.
    spec : FrameSpec
    n_classes : int or tuple of int
        Classes of each head.
    batch_frames : int > 0
    cpu_call_frames : int > 0 or None
        On a CPU, the most frames per embedder call (``None``: ``batch_frames``).
    intra_op_threads, inter_op_threads : int or None
        TensorFlow's thread pools (``None``: its default, or a share of the host's cores).
    key_prefix : str
        Task-key prefix the dashboard shows (``"scorer"``, ``"embedder"``).
    """

    head_path: tuple[str, ...] | str | None
    embedder_handle: str | None
    spec: FrameSpec
    n_classes: tuple[int, ...] | int
    batch_frames: int
    cpu_call_frames: int | None = None
    embedding_size: int | None = None
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    key_prefix: str = "scorer"


def decode_workers(
    workers: Mapping[str, Mapping[str, Any]],
    scorers: set[str] | frozenset[str],
    *,
    score_slots: int,
) -> list[str] | None:
    """Workers that decode (``None``: every worker).

    Those without a scorer or a GPU, and GPU workers with more threads than their score tasks
    take (``score_slots``): a GPU job's spare cores decode beside its scorer. Decode tasks
    prefer these workers, so they never take the slot a GPU worker's scorer needs; loosely, so
    a run whose decode workers all left still finishes. Where every worker scores (CPU only),
    decoding goes everywhere.
    """
    decoders = sorted(
        address
        for address, worker in workers.items()
        if (worker.get("nthreads", 1) > score_slots if has_gpu(worker) else address not in scorers)
    )
    return decoders or None


class ScorerPool:
    """Scorer actors on a cluster, followed as workers join and leave.

    Parameters
    ----------
    client : distributed.Client
    options : ScorerOptions
    cpu_scorer_workers : int >= 1 or None
        Without GPU workers, how many workers hold an actor (``None``: every worker).
    ping_seconds : float > 0 [s]
        How long an actor has to answer before it counts as lost.
    restart_seconds : float > 0 [s]
        How long to wait for a worker to restart the last actor on.
    check_gpus : bool
        Whether actors on workers that declare GPUs check that TensorFlow sees them.
    score_slots : int >= 1
        Threads a scorer's worker keeps for score tasks; a GPU worker with more also decodes.

    Attributes
    ----------
    scorers : dict of str -> actor
        Actors that are up, by worker address.
    starting : dict of str -> Future
        Actors submitted and not yet up.
    deferred : list of str
        CPU workers to hold a scorer once the first is up and work is waiting
        (:meth:`start_deferred`): a short run loads the model once.
    gpu : bool
        Whether the actors run on GPU workers.
    decode_threads : int
        Threads of the workers that decode (as of the last look at the cluster).
    restarts, lost : int
        Actors started on workers that joined or replaced lost ones; actors lost.
    tensorflow_version : str
        TensorFlow's version on the first actor's worker.
    """

    def __init__(
        self,
        client: Client,
        *,
        options: ScorerOptions,
        cpu_scorer_workers: int | None,
        ping_seconds: float,
        restart_seconds: float,
        check_gpus: bool = True,
        score_slots: int = 2,
    ) -> None:
        self.client = client
        self.check_gpus = check_gpus
        self.score_slots = score_slots
        self.options = options
        self.cpu_scorer_workers = cpu_scorer_workers
        self.ping_seconds = ping_seconds
        self.restart_seconds = restart_seconds
        self.scorers: dict[str, Any] = {}
        self.starting: dict[str, Future] = {}
        self.deferred: list[str] = []
        # Held: once an actor's future is released, Dask forgets the actor and its tasks fail.
        self._actor_futures: dict[str, Future] = {}
        self.gpu = False
        self.decode_workers: list[str] | None = None
        self.decode_threads = 1
        self._workers_seen: set[str] = set()
        self._workers_left = False
        self.restarts = 0
        self._restarting: set[str] = set()  # submitted as restarts: counted once they are up
        self._refused: set[str] = set()  # workers a scorer could not start on: not tried again
        self.lost = 0
        self.tensorflow_version = "unknown"
        self._on_ready: Callable[[], None] | None = None
        self._next_refresh = time.monotonic() + REFRESH_EVERY_S

    @classmethod
    def from_settings(
        cls,
        client: Client,
        settings: Settings,
        *,
        head_path: tuple[str, ...] | str | None,
        embedder_handle: str | None,
        spec: FrameSpec,
        n_classes: tuple[int, ...] | int,
        key_prefix: str,
        cpu_scorer_workers: int | None,
        embedding_size: int | None = None,
    ) -> ScorerPool:
        """A pool of actors for one model, with the batch, thread and loss settings of a run."""
        options = ScorerOptions(
            head_path=head_path,
            embedder_handle=embedder_handle,
            spec=spec,
            n_classes=n_classes,
            embedding_size=embedding_size,
            batch_frames=settings.batch_frames,
            cpu_call_frames=settings.cpu_call_frames,
            intra_op_threads=settings.tf_intra_op_threads,
            inter_op_threads=settings.tf_inter_op_threads,
            key_prefix=key_prefix,
        )
        return cls(
            client,
            options=options,
            cpu_scorer_workers=cpu_scorer_workers,
            ping_seconds=settings.scorer_ping_seconds,
            restart_seconds=settings.scorer_restart_seconds,
            check_gpus=settings.check_gpus,
            score_slots=settings.score_tasks_per_actor,
        )

    def release(self) -> None:
        """Let go of every actor, at a run's end or its interruption; each takes its model.

        Cancelled, not only forgotten: a handle Dask's actor made for a call holds itself in
        a reference cycle, which would keep a model on a user's own cluster until Python's
        collector ran.
        """
        futures = [*self._actor_futures.values(), *self.starting.values()]
        self.scorers.clear()
        self.starting.clear()
        self._actor_futures.clear()
        self.deferred.clear()
        if futures:
            with suppress(Exception):  # a client closing, or gone: its actors go with it
                self.client.cancel(futures)

    # -- start -------------------------------------------------------------------------------
    def start(self, *, on_ready: Callable[[], None] | None = None) -> dict[str, Future]:
        """Submit one actor per GPU worker, else one now and the other CPU workers' later.

        Loading the model takes seconds: the caller decodes meanwhile and calls
        :meth:`started` as each returned future finishes. ``on_ready()`` is called once, when
        the first actor is up: the model is known to load. Without GPUs, the workers after the
        first (up to ``cpu_scorer_workers``) are :attr:`deferred`: loading TensorFlow and the
        model costs each about 5 CPU-seconds, more than a short run's whole scoring, and the
        first loads faster alone.
        """
        self._on_ready = on_ready
        workers = self._live_workers()
        if not workers:  # a cluster whose jobs are still queued, or whose workers died
            address = self.client.scheduler_info()["address"]
            # A notebook's interrupt stops a LocalCluster's workers for good: not a silent wait.
            logger.warning(
                "the cluster at %s has no worker: waiting up to %g s for one to join",
                address,
                self.restart_seconds,
            )
            try:
                self.client.wait_for_workers(1, timeout=self.restart_seconds)
            except TimeoutError:
                raise ClusterError(
                    f"no worker joined the cluster at {address} within {self.restart_seconds:g} "
                    "s (buzzdask.scorer-restart-seconds): start some (dask worker ADDRESS), see "
                    "why its jobs wait (squeue -u $USER), or start a notebook's LocalCluster "
                    "again (an interrupt of its kernel stops its workers)"
                ) from None
            workers = self._live_workers()
        hosts = scorer_hosts(workers, cpu_workers=self.cpu_scorer_workers)
        self.gpu = has_gpu(workers[hosts[0]])
        if not self.gpu:
            logger.info("no GPU workers: scoring on up to %d CPU worker(s)", len(hosts))
            hosts, self.deferred = hosts[:1], hosts[1:]
        futures = self._submit(hosts, workers)
        self._update_decode_workers(workers)
        return futures

    def start_deferred(self) -> dict[str, Future]:
        """Submit the :attr:`deferred` actors (on those of their workers still alive)."""
        workers = self._live_workers()
        hosts = [address for address in self.deferred if address in workers]
        self.deferred = []
        futures = self._submit(hosts, workers) if hosts else {}
        if hosts:
            logger.info("work is waiting: starting scorers on %s too", ", ".join(hosts))
        self._update_decode_workers(workers)
        return futures

    def _submit(self, hosts: list[str], workers: Mapping[str, Any]) -> dict[str, Future]:
        """Actors for ``hosts`` (of ``workers``), held in :attr:`starting` until :meth:`started`.

        An actor on a worker that declares GPUs checks that TensorFlow sees them.
        """
        # CPU scorers on one host split its cores; a GPU worker's scorer has its own device.
        shares = {} if self.gpu else scorers_per_host([*self.scorers, *hosts, *self.deferred])
        options = self.options
        futures = {
            address: submit_scorer(
                self.client,
                address,
                key=task_key(options.key_prefix),
                share_cores=shares.get(address, 1),
                gpus=self._declared_gpus(workers[address]),
                worker=address,
                intra_op_threads=options.intra_op_threads,
                inter_op_threads=options.inter_op_threads,
                head_path=options.head_path,
                embedder_handle=options.embedder_handle,
                spec=options.spec,
                n_classes=options.n_classes,
                batch_frames=options.batch_frames,
                cpu_call_frames=options.cpu_call_frames,
                embedding_size=options.embedding_size,
            )
            for address in hosts
        }
        self._actor_futures.update(futures)
        self.starting.update(futures)
        return futures

    def _declared_gpus(self, worker: Mapping[str, Any]) -> int:
        """GPUs TensorFlow must see in an actor on ``worker`` (0: no check)."""
        return int(worker.get("resources", {}).get("GPU", 0)) if self.check_gpus else 0

    def started(self, address: str) -> dict[str, Future]:
        """The actor submitted on ``address`` is up; or it failed, and others go on if any.

        Returns
        -------
        dict of str -> Future
            An actor submitted in place of this one if its worker left (SIGKILL, a SLURM job
            ended) or was paused before it was up, and it was the last: the caller waits on it
            as on any other, and calls this again once it is done. Empty otherwise.

        Raises
        ------
        ModelError
            From the actor's construction, before any scorer is up: the model cannot be used.
        ScorerError
            If it was the last scorer and it could not start, or a worker declares GPUs that
            TensorFlow does not see before any scorer is up.
        """
        future = self.starting.pop(address)
        restart = address in self._restarting
        self._restarting.discard(address)
        try:
            actor = future.result()
        except Exception as error:
            if isinstance(error, ScorerMisplacedError):
                # Its worker left (or paused) before it was up: the task ran on another one.
                self._forget(address)
                return self._go_on_without(address)
            self._actor_futures.pop(address, None)
            # The model or a declared GPU refused before any scorer was up: refused for the
            # run. Once one is (a worker joining mid-run on a node without a visible GPU, or
            # that cannot read the model), it is that worker's problem.
            if isinstance(error, BuzzdaskError) and not self.scorers:
                raise
            if not (self.scorers or self.starting):
                raise ScorerError(f"could not start the scorer on {address}: {error}") from error
            logger.warning("no scorer on %s (%s): the others go on", address, error)
            self._refused.add(address)  # or each look at the cluster would try it again
            return {}
        self.scorers[address] = actor
        self.restarts += restart
        if self._on_ready is not None:
            ready, self._on_ready = self._on_ready, None
            ready()
        if self.tensorflow_version == "unknown":
            versions = self.client.run(tensorflow_version, workers=[address])
            self.tensorflow_version = str(versions.popitem()[1])
        return {}

    # -- placement ---------------------------------------------------------------------------
    def _live_workers(self) -> dict[str, Any]:
        return live_workers(self.client)

    def _update_decode_workers(self, workers: Mapping[str, Any]) -> None:
        self.decode_workers = decode_workers(
            workers, {*self.scorers, *self.starting}, score_slots=self.score_slots
        )
        decoding = self.decode_workers if self.decode_workers is not None else list(workers)
        self.decode_threads = max(1, sum(int(workers[a].get("nthreads", 1)) for a in decoding))
        # Once any worker has left, at each look: tasks may be stranded after it (a decode task
        # that became ready while no worker was left).
        self._workers_left = self._workers_left or bool(self._workers_seen - set(workers))
        self._workers_seen = set(workers)
        if self._workers_left:
            freed = self.client.run_on_scheduler(free_stranded_tasks)
            if freed:
                logger.warning(
                    "%s placed on workers that have all left go to the others",
                    format_count(freed, "task"),
                )

    def decodes(self, address: str) -> bool:
        """Whether the worker ``address`` takes decode tasks (as of the last look)."""
        return self.decode_workers is None or address in self.decode_workers

    def decode_placement(self) -> dict[str, Any]:
        """``submit`` keywords placing a probe or decode task (loosely) on the decode workers."""
        if self.decode_workers is None:
            return {}
        return {"workers": self.decode_workers, "allow_other_workers": True}

    def holders(self, futures: list[Future]) -> dict[str, list[str]]:
        """Workers holding each future's data, where that can decide which scorer gets it.

        Asked once per pass over the queue: one scheduler round trip, not one per group.
        """
        if not futures or self.gpu or len(self.scorers) < 2:
            return {}
        return dict(self.client.who_has(futures))

    # -- loss --------------------------------------------------------------------------------
    def alive(self, address: str) -> bool:
        """Whether the actor on ``address`` still answers (its worker may have died or retired)."""
        actor = self.scorers.get(address)
        if actor is None:
            return False
        try:
            actor.stats().result(timeout=self.ping_seconds)
        except Exception:
            return False
        return True

    def was_lost(self, address: str) -> bool:
        """After a failed score task: was its actor lost? If so, it has been replaced."""
        if address not in self.scorers:  # lost earlier, already replaced
            return True
        if self.alive(address):
            return False
        self.replace(address)
        return True

    def replace(self, address: str) -> None:
        """Go on without the lost actor on ``address``, or start a new one if it was the last.

        A GPU run waits for a GPU worker (a SLURM cluster replaces retired jobs); otherwise any
        live worker will do. Workers that join later get actors from :meth:`refresh`.

        Raises
        ------
        ScorerError
            If no suitable worker arrives within ``restart_seconds``.
        """
        self._forget(address)
        futures = self._go_on_without(address)
        # Waited for: chunks are re-sent to it as soon as this returns.
        while futures:
            raise_if_stopped()  # a Ctrl-C dropped in a finaliser: the workers may be gone
            ((host, future),) = futures.items()
            try:
                wait(future, timeout=REFRESH_EVERY_S)
            except TimeoutError:
                if host not in self._live_workers():
                    # Its worker died too as the model loaded, with no other there: Dask never
                    # runs such a task again (no-worker), so it is given up and submitted anew.
                    self.starting.pop(host, None)
                    self._restarting.discard(host)
                    self._forget(host)
                    futures = self._go_on_without(host)
                continue
            futures = self.started(host)

    def _go_on_without(self, address: str) -> dict[str, Future]:
        """The actor submitted in place of the lost one on ``address`` if it was the last."""
        workers = self._live_workers()
        # Scorers whose workers left with it (a job of several workers cancelled, a node down)
        # are lost too: not "other scorers" that go on.
        lost = [address, *(other for other in self.scorers if other not in workers)]
        for other in lost[1:]:
            self._forget(other)
        one = len(lost) == 1
        said = f"scorer on {address} was" if one else f"scorers on {', '.join(lost)} were"
        # One still loading on a worker that left is not counted: it will not come up there.
        others = len(self.scorers) + sum(host in workers for host in self.starting)
        if others:
            logger.warning("%s lost: %d other scorer(s) go on", said, others)
            self._update_decode_workers(workers)
            return {}
        workers, host = self._wait_for_replacement(said)
        logger.warning("%s lost: restarting %s on %s", said, "it" if one else "one", host)
        self._restarting.add(host)
        futures = self._submit([host], workers)
        self._update_decode_workers(workers)
        return futures

    def _wait_for_replacement(self, said: str) -> tuple[dict[str, Any], str]:
        """Live workers and the one to restart the lost scorer on (waits for one to arrive).

        ``said``: whose loss (``"scorer on ADDRESS was"``), for the lines that say the wait.
        """
        deadline = time.monotonic() + self.restart_seconds
        waiting = False
        while True:
            raise_if_stopped()  # a Ctrl-C dropped in a finaliser ended the workers too
            workers = self._live_workers()
            candidates = sorted(
                a for a, w in workers.items() if is_running(w) and (not self.gpu or has_gpu(w))
            )
            if candidates:
                # Prefer a worker that decodes nothing yet, so decoding keeps its workers.
                return workers, candidates[-1]
            kind = "GPU worker" if self.gpu else "worker"
            if not waiting:  # a job's replacement may wait in the queue: not a silent hang
                waiting = True
                logger.warning(
                    "%s lost: waiting up to %g s for a %s to restart it on "
                    "(buzzdask.scorer-restart-seconds)",
                    said,
                    self.restart_seconds,
                    kind,
                )
            if time.monotonic() > deadline:
                after = (
                    "run the training again: the embeddings made so far are in its cache"
                    if self.options.head_path is None  # an embedder alone: a training's
                    else "finish the run with a resume (--resume; in Python on_conflict='resume')"
                )
                raise ScorerError(
                    f"the {said} lost and no {kind} came to restart it on within "
                    f"buzzdask.scorer-restart-seconds; {after}"
                )
            time.sleep(1.0)

    def _forget(self, address: str) -> None:
        """Count the actor on ``address`` as lost and release it."""
        self.scorers.pop(address, None)
        future = self._actor_futures.pop(address, None)
        self.lost += 1
        if future is not None:
            # Cancelled, as in release(): a handle of it in a reference cycle would otherwise
            # keep its key on a user's client.
            with suppress(Exception):
                self.client.cancel([future])

    # -- follow the cluster ------------------------------------------------------------------
    def refresh(self, *, finished: bool = False) -> dict[str, Future]:
        """Follow the cluster: drop scorers whose workers left, start some on workers that joined.

        A worker joins when a SLURM job replaces a lost one, when adapt or scale adds one, or
        when a nanny restarts a killed one. At most every few seconds while running; returns
        the actors submitted, for the caller to wait on. ``finished``: the run is over;
        departed scorers are only counted as lost.
        """
        now = time.monotonic()
        if now < self._next_refresh and not finished:
            return {}
        self._next_refresh = now + REFRESH_EVERY_S
        workers = self._live_workers()
        departed = [a for a in self.scorers if a not in workers]
        for address in departed:
            if finished:
                self._forget(address)
            elif address in self.scorers:  # not forgotten with one replaced before it
                self.replace(address)
        if finished:
            return {}
        if departed:  # a replacement waits for its scorer: workers may have come and gone since
            workers = self._live_workers()
        new = self._joined(workers)
        futures = self._submit(new, workers) if new else {}
        if new:
            logger.info("starting scorers on workers that joined: %s", ", ".join(new))
            self._restarting.update(new)
        # CPU workers that joined a GPU run (scale, adapt, replacements) decode too.
        self._update_decode_workers(workers)
        return futures

    def _joined(self, workers: Mapping[str, Any]) -> list[str]:
        """Workers without an actor that should get one."""
        taken = {*self.scorers, *self.starting, *self.deferred, *self._refused}
        # Not a paused worker (its memory is full): Dask would run the actor's task elsewhere.
        free = [a for a in sorted(workers) if a not in taken and is_running(workers[a])]
        if self.gpu:
            return [a for a in free if has_gpu(workers[a])]
        limit = self.cpu_scorer_workers
        room = len(free) if limit is None else limit - len(taken)
        return free[: max(0, room)]

    def stats(self) -> list[dict[str, Any]]:
        """Each actor's counters, or why they cannot be had.

        Its worker died, or did not answer within :attr:`ping_seconds` (stopped: a suspended
        job, a node hung on its file system).
        """
        stats: list[dict[str, Any]] = []
        for address, actor in self.scorers.items():
            try:
                counters = actor.stats().result(timeout=self.ping_seconds)
            except TimeoutError:
                silent = f"no answer within {self.ping_seconds:g} s"
                stats.append({"worker": address, "error": silent})
            except Exception as error:  # the actor's worker is gone; the run still reports
                stats.append({"worker": address, "error": f"{type(error).__name__}: {error}"})
            else:
                stats.append({"worker": address, "gpu_worker": self.gpu, **counters})
        return stats
