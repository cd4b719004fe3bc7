"""The chunk loop on the client: admission under the memory budget, dispatch, completion, retries.

The client drives decode and score tasks incrementally (``as_completed``) instead of submitting
everything at once, so the decoded audio in flight stays under a memory budget and a 1,000-hour
run holds no more than that. Short recordings are decoded several to a task
(:func:`decode_several`), a score task's worth at a time: a folder of 30-second files then
costs the scheduler one decode task per 16 files, not one per file; chunks read back from an
embedding store go together alike. :class:`ChunkPipeline` holds the loop's state; its
decisions are the plain functions beside it (:class:`Budget`,
:func:`budget_bytes`, :func:`free_scorers`, :func:`next_group`, :func:`short_chunks`,
:func:`split_failed_group`), tested without a cluster. What happens to a
finished chunk (a Parquet partition, an embedding cache entry) is the caller's ``on_result``.
"""

from __future__ import annotations

import functools
import itertools
import time
import traceback
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from dask.utils import format_bytes
from distributed import Client, Future, as_completed

from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    DecodedChunk,
    length_is_exact,
    probe_audio,
    release_decoded_copy,
    seeks_exactly,
)
from buzzdask.errors import (
    DecodeError,
    DecoderStopped,
    ScorerError,
    as_task_answer,
    without_chain,
)
from buzzdask.ffmpeg_tools import FFmpegTools
from buzzdask.frames import FrameSpec
from buzzdask.progress import logger
from buzzdask.scorers import REFRESH_EVERY_S, ScorerPool
from buzzdask.session import raise_if_stopped, stops_remembered, task_key
from buzzdask.settings import Settings
from buzzdask.store import STORED_CODEC, StoredChunk, StoredRef, file_sha256, load_stored

__all__ = [
    "Budget",
    "ChunkJob",
    "ChunkPipeline",
    "budget_bytes",
    "chunk_label",
    "chunk_nbytes",
    "decode_several",
    "decode_slots",
    "free_scorers",
    "group_bytes",
    "next_group",
    "outcome",
    "probe_task",
    "score_picked",
    "short_chunks",
    "split_failed_group",
    "useful_bytes",
]

_Item = TypeVar("_Item")


@dataclass(eq=False)
class ChunkJob:
    """One chunk to decode and score.

    Attributes
    ----------
    name : str
        The file's name in messages and task keys.
    info : AudioInfo
    plan : ChunkPlan
    label : str
        ``"<name> [start–end s]"``, for the "decoding"/"scoring" lines.
    owner : object
        The caller's record of the file (given back in ``on_result`` and ``on_failure``).
    attempts : int
        Tries of this chunk that a lost scorer or a stopped ffmpeg ended.
    scorer : str or None
        The address of the scorer that scored it (set before ``on_result``).
    stored : StoredRef or None
        Where its embeddings are stored: read back (:func:`buzzdask.store.load_stored`)
        instead of decoded.
    expected_frames : int or None
        Frames it should come back with by the file's estimated duration
        (:func:`buzzdask.decode.expected_frames`): what it adds to a score task. ``None``:
        ``plan.n_frames``.
    slot : int or None
        Its place in the list its decode task returned (:func:`decode_several`); ``None``
        when the task decoded it alone.
    decode_alone : bool
        Decode it in a task of its own: a task decoding it with others failed as a whole.
    """

    name: str
    info: AudioInfo
    plan: ChunkPlan
    label: str
    owner: Any = None
    attempts: int = 0
    scorer: str | None = None
    stored: StoredRef | None = None
    expected_frames: int | None = None
    slot: int | None = None
    decode_alone: bool = False

    def frames(self, *, default: int) -> int:
        """Frames it should hold: expected, else planned, else ``default`` (an open end)."""
        if self.expected_frames is not None:
            return self.expected_frames
        return self.plan.n_frames or default

    def whole_file(self) -> bool:
        """Whether it is its file's only chunk: the first, and the file ends inside it."""
        planned, expected = self.plan.n_frames, self.expected_frames
        if self.plan.index != 0 or planned is None or expected is None:
            return False
        return expected < planned


def chunk_label(
    name: str, plan: ChunkPlan, spec: FrameSpec, *, duration_s: float | None = None
) -> str:
    """``"<name> [start–end s]"``, in seconds of the file.

    The frames' own audio, without the context the embedder reads past the last one: one
    chunk ends where the next starts. ``end`` for an open last chunk, and for one reaching past
    the file's estimated ``duration_s`` (a one-chunk file reads "[0.00–end s]", not the chunk
    length; so does an empty one's).
    """
    start = plan.first_frame * spec.hop_length / spec.sample_rate
    end = (
        None
        if plan.n_frames is None
        else start + max(spec.span(plan.n_frames) - spec.context, 0) / spec.sample_rate
    )
    if end is None or (duration_s is not None and start <= duration_s < end):
        return f"{name} [{start:.2f}–end s]"
    return f"{name} [{start:.2f}–{end:.2f} s]"


def chunk_nbytes(spec: FrameSpec, frames_per_chunk: int, margin_s: float) -> int:
    """The budget's unit: one chunk's decoded float32 samples, context and margins included.

    ``4 * (span(frames_per_chunk) + 2 * round(margin_s * sample_rate))`` bytes.
    """
    margin = round(margin_s * spec.sample_rate)
    return 4 * (spec.span(frames_per_chunk) + 2 * margin)


@dataclass
class Budget:
    """Decoded audio in flight, in bytes.

    Parameters
    ----------
    limit_bytes : int >= 0 [bytes]
        Most decoded audio in flight (``buzzdask.memory-budget``); one chunk is always
        admitted, however large.
    chunk_bytes : int > 0 [bytes]
        A whole chunk's decoded float32 samples, context and margins included: what a chunk
        counts unless it is known to hold less (:func:`budget_bytes`).
    useful_bytes : int or None [bytes]
        What keeps the cluster busy (:func:`useful_bytes`): the budget holds no more, as more
        only costs memory. ``None``: up to ``limit_bytes``.
    """

    limit_bytes: int
    chunk_bytes: int
    useful_bytes: int | None = None
    in_flight_bytes: int = 0
    peak_bytes: int = 0

    def admits(self, nbytes: int) -> bool:
        """Whether a chunk of ``nbytes`` fits (or nothing is in flight)."""
        limit = min(self.limit_bytes, self.useful_bytes or self.limit_bytes)
        return self.in_flight_bytes == 0 or self.in_flight_bytes + nbytes <= limit

    def take(self, nbytes: int) -> None:
        """Count a chunk of ``nbytes`` submitted for decoding."""
        self.in_flight_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.in_flight_bytes)

    def release(self, nbytes: int) -> None:
        """Count ``nbytes`` done with (scored, or failed)."""
        self.in_flight_bytes -= nbytes


def budget_bytes(job: ChunkJob, spec: FrameSpec, *, chunk_bytes: int, margin_s: float) -> int:
    """The decoded audio ``job`` counts in the budget.

    A whole chunk's (``chunk_bytes``), unless the file's length is exact
    (:func:`~buzzdask.decode.length_is_exact`) and the chunk holds less: a folder of 30-second
    recordings then has hundreds of files in flight, not a few dozen. A lossy file's estimate
    can be short several times over: its chunks count whole.
    """
    if job.expected_frames is None or not length_is_exact(job.info.codec):
        return chunk_bytes
    # One frame more than expected, as a file's last planned chunk holds (plan_chunks).
    return min(chunk_bytes, chunk_nbytes(spec, job.expected_frames + 1, margin_s))


def group_bytes(job: ChunkJob, *, nbytes: int, most_frames: int) -> int:
    """The budget's count of a score task of chunks like ``job`` (which counts ``nbytes``).

    As many as fit ``most_frames`` (:func:`next_group`), one at least: with 512, a 10-minute
    chunk (626 frames) is a group of its own, 30-second files (31 frames) go 16 to a group.
    """
    return nbytes * max(1, most_frames // max(1, job.frames(default=most_frames)))


def useful_bytes(
    *, decode_threads: int, scorers: int, tasks_per_scorer: int, chunk_bytes: int, group_bytes: int
) -> int:
    """Decoded audio in flight that keeps every decode thread and scorer busy.

    A chunk per decode thread (the next group forms from them), and per scorer its queued score
    tasks (a group each, :func:`group_bytes`). One local worker of two threads, 10-minute
    chunks: about 150 MB, where a 1 GiB budget let decoding run 0.8 GB ahead of the scorer.
    """
    return decode_threads * chunk_bytes + scorers * tasks_per_scorer * group_bytes


def decode_slots(*, decode_threads: int, loading: int, first_score_out: bool) -> int | None:
    """Decode tasks to have out at most, on the way to the run's first partition.

    A CPU scorer loads in a thread of a worker that decodes (``loading``: scorers doing so,
    of ``decode_threads`` in all): a decode task queued there beyond the threads left took the
    thread its construction freed, and the first score task waited for that decode to end
    (0.25–0.7 s). Then, with the first score task on such a worker (``first_score_out``),
    none is sent, so that TensorFlow has the cores to itself until it is back. ``None``: as
    many as the budget admits.
    """
    if first_score_out:
        return 0
    if loading:
        return max(0, decode_threads - loading)
    return None


def free_scorers(load: Mapping[str, int], scorers: Iterable[str], *, most: int) -> list[str]:
    """Scorers with fewer than ``most`` score tasks queued, least busy first."""
    free = [address for address in scorers if load.get(address, 0) < most]
    return sorted(free, key=lambda address: load.get(address, 0))


def next_group(
    decoded: Sequence[tuple[ChunkJob, Future]],
    free: Sequence[str],
    held: Mapping[Any, Sequence[str]],
    *,
    most_frames: int,
) -> tuple[str, list[tuple[ChunkJob, Future]]]:
    """The next scorer (of ``free``, least busy first) and the decoded chunks it gets.

    Chunks already on a free scorer's worker (``held``: workers by chunk key) go to that
    scorer: where CPU workers both decode and score, most chunks then cross no network. A
    group holds chunks up to ``most_frames`` frames in all (at least one chunk): the 30-second
    files of a recorder go to a scorer dozens at a time, in one task and full batches.

    Parameters
    ----------
    decoded : sequence of (ChunkJob, future)
        Decoded chunks waiting, oldest first.
    free : sequence of str, non-empty
    held : mapping of future key -> worker addresses
    most_frames : int > 0
        Most frames in one group, counted as expected (:meth:`ChunkJob.frames`).
    """
    address = next((a for a in free if any(a in held.get(f.key, ()) for _, f in decoded)), free[0])
    ordered = sorted(decoded, key=lambda item: address not in held.get(item[1].key, ()))
    group: list[tuple[ChunkJob, Future]] = []
    frames = 0
    for item in ordered:
        n_frames = item[0].frames(default=most_frames)  # open-ended: a group of its own
        if group and frames + n_frames > most_frames:
            break
        group.append(item)
        frames += n_frames
    return address, group


def short_chunks(todo: Sequence[ChunkJob], *, most_frames: int) -> int:
    """How many chunks at the head of ``todo`` one decode (or load) task takes (one at least).

    Short recordings, each decoded whole in one chunk (:meth:`ChunkJob.whole_file`), go
    together, up to ``most_frames`` frames in all, which is one score task's group
    (:func:`next_group`): 30-second files 16 to a task at 512. So do chunks read back from the
    store, whose frames are known, one kind to a task. A chunk of a longer file to decode,
    one of the other kind, one that must be taken alone (:attr:`ChunkJob.decode_alone`) or
    one of ``most_frames`` frames or more stops the count: the chunks of one file keep a task
    each, so that they decode side by side.
    """
    total = 0
    stored = bool(todo) and todo[0].stored is not None
    for count, job in enumerate(todo):
        frames = job.frames(default=most_frames)
        together = job.plan.n_frames is not None if stored else job.whole_file()
        alone = job.decode_alone or frames >= most_frames or (job.stored is not None) != stored
        if alone or not together or total + frames > most_frames:
            return max(1, count)
        total += frames
    return max(1, len(todo))


def probe_task(
    paths: Sequence[str], tools: FFmpegTools, content_hash: bool = False
) -> list[AudioInfo | DecodeError]:
    """Probe task: a file that is not audio is an answer, not a failure (no worker traceback).

    ``content_hash``: also read each file's SHA-256, which keys the embedding store.
    """
    answers: list[AudioInfo | DecodeError] = []
    for path in paths:
        try:
            info = probe_audio(path, tools=tools)
            if content_hash:
                info = replace(info, sha256=_content_hash(path))
            answers.append(info)
        except DecodeError as error:
            answers.append(without_chain(error))
    return answers


def _content_hash(path: str) -> str:
    """The file's SHA-256; a file gone or unreadable since its probe is that file's error."""
    try:
        return file_sha256(path)
    except OSError as error:  # moved by a sync tool meanwhile: not its batch's 31 others
        raise DecodeError(path, f"cannot read the file: {error.strerror}") from None


def decode_several(
    decode: Callable[..., DecodedChunk | StoredChunk],
    chunks: Sequence[tuple[Any, ...]],
    **options: Any,
) -> list[DecodedChunk | StoredChunk | Exception]:
    """Decode (or load) task of several chunks: ``decode(*chunk, **options)`` for each, in order.

    ``chunk`` is ``(info, plan)`` for a decode, ``(ref,)`` for :func:`~buzzdask.store.load_stored`.
    A chunk that fails gives its exception in its place (the score task hands it back,
    :func:`score_picked`), so the others' audio is not lost with it.
    """
    decoded: list[DecodedChunk | StoredChunk | Exception] = []
    for arguments in chunks:
        try:
            decoded.append(decode(*arguments, **options))
        except Exception as error:
            decoded.append(as_task_answer(error))
    return decoded


class ScorerRef:
    """A scorer actor's handle, passed to a score task as a value and not as a dependency.

    Given as an argument, the actor makes its key a dependency of the task. When the actor's
    worker dies the key errs, and Dask (2026.8) sends a task then waiting on it (for its
    decoded audio, recomputed after the same death) back to waiting for good: the run hung.
    Held in this, the actor is no dependency: the task runs, finds the actor gone and fails,
    and its chunks go to the scorer that replaces it.
    """

    __slots__ = ("actor",)

    def __init__(self, actor: Any) -> None:
        self.actor = actor


def score_picked(
    score: Callable[..., list[Any]],
    scorer: ScorerRef,
    *decoded: Any,
    picks: Sequence[tuple[int, int | None]],
    per_chunk: Mapping[str, Sequence[Any]],
) -> list[Any] | ScorerError:
    """Score task: ``score(scorer, *chunks, **per_chunk)`` for the chunks ``picks`` names.

    Parameters
    ----------
    score : callable
        The pipeline's ``score``.
    scorer : ScorerRef
    *decoded : DecodedChunk, StoredChunk or list
        The decode tasks' results; a list from :func:`decode_several`.
    picks : sequence of (int, int or None)
        Each chunk of the group: its decode task's place in ``decoded`` and its slot in that
        task's list (``None``: the result itself).
    per_chunk : mapping of str -> sequence
        Keywords of ``score`` with one value per chunk, in the order of ``picks``.

    Returns
    -------
    list or ScorerError
        ``score``'s result of each chunk, in order; a chunk whose decoding failed gives its
        exception instead (it is not scored). Its scorer lost, the :class:`ScorerError`:
        handed back, not raised, as the chunk loop re-sends the chunks (raised, each worker
        logged Dask's "Compute Failed" traceback of it, on a user's cluster too).
    """
    chunks = [decoded[task] if slot is None else decoded[task][slot] for task, slot in picks]
    results: list[Any] = list(chunks)
    good = [i for i, chunk in enumerate(chunks) if not isinstance(chunk, Exception)]
    if good:
        keywords = {name: [values[i] for i in good] for name, values in per_chunk.items()}
        try:
            scored = score(scorer.actor, *[chunks[i] for i in good], **keywords)
        except ScorerError as error:
            return without_chain(error)
        for i, result in zip(good, scored, strict=True):
            results[i] = result
    return results


def split_failed_group(
    group: Sequence[tuple[ChunkJob, _Item]], *, scorer_lost: bool, most_attempts: int
) -> tuple[list[tuple[ChunkJob, _Item]], list[tuple[ChunkJob, _Item]]]:
    """After a failed score task: the chunks to send again and those that failed.

    A chunk whose scorer was lost is sent again until it has been lost with ``most_attempts``
    scorers (``attempts`` counts them); a task that failed on a live scorer fails its chunks.
    """
    if not scorer_lost:
        return [], list(group)
    retry: list[tuple[ChunkJob, _Item]] = []
    failed: list[tuple[ChunkJob, _Item]] = []
    for item in group:
        item[0].attempts += 1
        (retry if item[0].attempts < most_attempts else failed).append(item)
    return retry, failed


def outcome(future: Future, *, timeout_s: float | None = None) -> Any:
    """The task's result, or its exception, without raising.

    A finished result can still be lost before it is fetched (its worker died); Dask then
    recomputes it, which may fail: that is an outcome too, reported per chunk.

    Raises
    ------
    TimeoutError
        If neither is there within ``timeout_s`` seconds: lost, and computed again, which can
        wait for good (on an actor that died with the worker).
    """
    try:
        # Not raised: a raise would add this frame, which holds the future, to the error that
        # the future's own state keeps (a lost scorer's chunks and actors stayed on a user's
        # cluster with it, until the client closed). Gathered with "skip" for the same reason:
        # a result lost after it finished is recomputed, and an error of the recompute raised
        # through Dask's own frames stayed with them in a reference cycle until Python's
        # garbage collector ran, minutes later, with the future.
        error = future.exception(timeout=timeout_s)
        if error is not None:
            return error
        client = future.client
        gathered = client.sync(_gathered, client, future, callback_timeout=timeout_s)
        return gathered[0] if gathered else future.exception(timeout=timeout_s)
    except TimeoutError:
        raise
    except Exception as error:
        return error.with_traceback(None)


async def _gathered(client: Client, future: Future) -> list[Any]:
    # Awaited in the client's loop so that the gather can time out, as ``Future.result`` can.
    return await client.gather([future], errors="skip", asynchronous=True)


class ChunkPipeline:
    """Decode tasks on the decode workers, score tasks beside the actors of a :class:`ScorerPool`.

    Parameters
    ----------
    client : distributed.Client
    pool : ScorerPool
        Started (:meth:`ScorerPool.start`); actors still starting are waited for in :meth:`run`.
    decode : callable
        ``decode(info, plan, spec=spec, **decode_options) -> DecodedChunk``, run on a worker (a
        chunk whose embeddings are stored is read back instead, :attr:`ChunkJob.stored`).
    spec : FrameSpec
    decode_options : mapping
        With ``margin_s``, the seconds decoded past each end (counted in the budget).
    score : callable
        ``score(actor, *decoded, **score_keywords(jobs)) -> list of results``, run on the actor's
        worker (:func:`buzzdask.score.score_chunks` or :func:`~buzzdask.score.embed_chunks`).
    score_prefix : str
        Task-key prefix of the score tasks (the dashboard groups by it).
    budget : Budget
    group_frames : int > 0
        Most frames in one score task (as planned; one chunk at least).
    tasks_per_scorer : int > 0
        Score tasks queued per actor, so transfers overlap scoring.
    score_attempts : int > 0
        Scorers a chunk may lose, or ffmpegs stopped by a signal as they decode it, before it
        is reported failed.
    on_result : callable
        ``on_result(job, result)`` for each scored chunk, ``result`` one item of ``score``'s list.
        It may return more chunks of the file to decode (its audio went on past the estimate).
    on_failure : callable
        ``on_failure(job, error, stage)``, ``stage`` ``"decode"`` (``"load"`` for a chunk read
        back from the embedding store) or ``"score"``; it may raise to end the run.
    score_keywords : callable, optional
        ``score_keywords(jobs) -> dict``: keywords of ``score`` for a group of chunks, each a
        list with one value per chunk (where their results go); none by default.
    recording : callable, optional
        ``recording()``: a context entered around the ``on_result`` calls of one score task's
        chunks, so that the caller can write what it records of them at once
        (:meth:`buzzdask.ledger.FileLedger.recording`); none by default.

    Attributes
    ----------
    resent : int
        Chunks sent to a scorer again because the one they were sent to was lost.
    """

    def __init__(
        self,
        client: Client,
        pool: ScorerPool,
        *,
        decode: Callable[..., DecodedChunk],
        spec: FrameSpec,
        decode_options: Mapping[str, Any],
        score: Callable[..., list[Any]],
        score_prefix: str,
        budget: Budget,
        group_frames: int,
        tasks_per_scorer: int,
        score_attempts: int,
        on_result: Callable[[ChunkJob, Any], Iterable[ChunkJob] | None],
        on_failure: Callable[[ChunkJob, BaseException, str], None],
        score_keywords: Callable[[list[ChunkJob]], dict[str, Any]] | None = None,
        recording: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> None:
        self.client = client
        self.score_keywords = score_keywords
        self.recording = recording
        self.pool = pool
        self.decode = decode
        self.spec = spec
        self.decode_options = {"spec": spec, **decode_options}
        self.margin_s = float(decode_options.get("margin_s", 0.0))
        self.score = score
        self.score_prefix = score_prefix
        self.budget = budget
        self.group_frames = max(1, group_frames)
        self.tasks_per_scorer = tasks_per_scorer
        self.score_attempts = score_attempts
        self.on_result = on_result
        self.on_failure = on_failure
        # On the run's client's loop: it need not be the default client (set_as_default=False).
        self._pending = as_completed(loop=client.loop)
        self._handlers: dict[Any, Callable[[Future], None]] = {}  # by task key
        self._todo: deque[ChunkJob] = deque()
        self._decoded: deque[tuple[ChunkJob, Future]] = deque()
        self._load: defaultdict[str, int] = defaultdict(int)  # score tasks queued per actor
        self._open: Counter[str] = Counter()  # chunks enqueued and not yet done with, per file
        # Whether a decode task and a score task were submitted.
        self._decode_sent = False
        self._said_under_one_chunk = False
        self._score_sent = False
        self._decoding = 0  # decode (and load) tasks out
        # The run's first score task is out, on a worker that decodes.
        self._first_score_out = False
        self.resent = 0

    @classmethod
    def from_settings(
        cls,
        client: Client,
        pool: ScorerPool,
        settings: Settings,
        *,
        spec: FrameSpec,
        frames_per_chunk: int,
        decode: Callable[..., DecodedChunk],
        score: Callable[..., list[Any]],
        score_prefix: str,
        on_result: Callable[[ChunkJob, Any], Iterable[ChunkJob] | None],
        on_failure: Callable[[ChunkJob, BaseException, str], None],
        score_keywords: Callable[[list[ChunkJob]], dict[str, Any]] | None = None,
        recording: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> ChunkPipeline:
        """A pipeline with the budget, batching, decoding and retry settings of a run."""
        # A file's last planned chunk holds one frame more (decode.plan_chunks).
        chunk_bytes = chunk_nbytes(spec, frames_per_chunk + 1, settings.decode_margin_seconds)
        return cls(
            client,
            pool,
            decode=decode,
            spec=spec,
            decode_options={
                "margin_s": settings.decode_margin_seconds,
                "seekable_codecs": settings.seekable_codecs,
                "ffmpeg_cmd": settings.ffmpeg,
                # Decoded copies of files that cannot seek go where staged copies do.
                "copy_directory": settings.staging.directory,
            },
            score=score,
            score_prefix=score_prefix,
            budget=Budget(limit_bytes=settings.memory_budget, chunk_bytes=chunk_bytes),
            group_frames=settings.batch_frames,
            tasks_per_scorer=settings.score_tasks_per_actor,
            score_attempts=settings.score_attempts,
            on_result=on_result,
            on_failure=on_failure,
            score_keywords=score_keywords,
            recording=recording,
        )

    def submit(
        self, function: Callable[..., Any], *args: Any, key: str, then: Callable[[Future], None]
    ) -> None:
        """Run ``function(*args)`` on a decode worker; ``then(future)`` once it is done."""
        future = self.client.submit(
            function, *args, key=key, **self.pool.decode_placement(), pure=False
        )
        self._track(future, then)

    def enqueue(self, job: ChunkJob) -> None:
        """Add a chunk to decode when the budget admits it."""
        self._open[job.info.path] += 1
        self._todo.append(job)

    def run(self) -> None:
        """Until every submitted task and enqueued chunk is done.

        Interrupted (Ctrl-C, a notebook's interrupt), it lets go of every task and scorer
        before the exception leaves: the traceback a notebook keeps holds this pipeline, and
        with it decoded audio and the scorers' models on the cluster.
        """
        try:
            with stops_remembered():
                self._loop()
        except BaseException as error:
            # The loop's frame, and the finished ones it called, stay in the traceback (a
            # notebook keeps the last one): without their futures.
            traceback.clear_frames(error.__traceback__)
            self._release()
            raise

    def _loop(self) -> None:
        self._track_actors(self.pool.starting)
        self._submit_more()
        while not self._pending.is_empty():
            # A Ctrl-C dropped in a future's finaliser: its workers may be gone with it.
            raise_if_stopped()
            # Woken without a finished task too: the cluster may have changed under tasks
            # that can no longer finish (every worker lost at once, see the pool's refresh).
            future = _next_finished(self._pending, timeout_s=REFRESH_EVERY_S)
            if future is not None:
                self._handlers.pop(future.key)(future)
                del future
            self._track_actors(self.pool.refresh())
            self._submit_more()
            if self.pool.deferred and self.pool.scorers and self._a_group_waits():
                # The first scorer is up and a whole score task waits: the others pay off.
                self._track_actors(self.pool.start_deferred())

    def _release(self) -> None:
        futures = [*self._pending.futures, *(future for _, future in self._decoded)]
        self._pending.clear()
        self._decoded.clear()
        self._handlers.clear()
        self.pool.release()
        try:
            self.client.cancel(futures)
        except Exception as error:  # a client already closing: its futures go with it
            logger.debug("could not cancel the run's tasks: %s", error)

    # -- tracking ----------------------------------------------------------------------------
    def _track(self, future: Future, then: Callable[[Future], None]) -> None:
        self._handlers[future.key] = then
        self._pending.add(future)

    def _track_actors(self, futures: Mapping[str, Future]) -> None:
        for address, future in futures.items():
            self._track(future, functools.partial(self._actor_up, address))

    def _actor_up(self, address: str, future: Future) -> None:
        if address in self.pool.starting:  # not already given up on by a replacement
            # One submitted in its place if its worker left while it loaded.
            self._track_actors(self.pool.started(address))

    def _a_group_waits(self) -> bool:
        """Whether chunks of a whole score task (``group_frames``) wait for a free scorer."""
        waiting = itertools.chain(self._todo, (job for job, _ in self._decoded))
        frames = itertools.accumulate(job.frames(default=self.group_frames) for job in waiting)
        return any(total >= self.group_frames for total in frames)

    def _nbytes(self, job: ChunkJob) -> int:
        return budget_bytes(
            job,
            self.spec,
            chunk_bytes=self.budget.chunk_bytes,
            margin_s=self.margin_s,
        )

    # -- dispatch ----------------------------------------------------------------------------
    def _submit_more(self) -> None:
        # Score tasks first: one reaches its worker before the decode tasks sent with it.
        held = self.pool.holders([f for _, f in self._decoded])
        while self._decoded and self.pool.scorers:
            free = free_scorers(self._load, self.pool.scorers, most=self.tasks_per_scorer)
            if not free:
                break
            # The run's first score task holds one chunk: a folder of short recordings has its
            # first partitions written while TensorFlow warms up, not after 16 files.
            most_frames = self.group_frames if self._score_sent else 1
            address, group = next_group(self._decoded, free, held, most_frames=most_frames)
            for item in group:
                self._decoded.remove(item)
            self._score(address, group)
        if self._todo:
            # Groups like the next chunk waiting: a folder of short files and one of long ones
            # queue different amounts of audio per score task.
            head = self._todo[0]
            self.budget.useful_bytes = useful_bytes(
                decode_threads=self.pool.decode_threads,
                # One scorer's queue at least while the first loads: decoding fills the core
                # that TensorFlow's import leaves idle, and the first score tasks wait for none.
                scorers=max(1, len(self.pool.scorers)),
                tasks_per_scorer=self.tasks_per_scorer,
                chunk_bytes=self.budget.chunk_bytes,
                group_bytes=group_bytes(
                    head, nbytes=self._nbytes(head), most_frames=self.group_frames
                ),
            )
        slots = decode_slots(
            decode_threads=self.pool.decode_threads,
            loading=sum(self.pool.decodes(address) for address in self.pool.starting),
            first_score_out=self._first_score_out,
        )
        while (
            self._todo
            and (slots is None or self._decoding < slots)
            and self.budget.admits(nbytes := self._nbytes(self._todo[0]))
        ):
            # The run's first decode task holds one chunk, as its first score task does.
            most = (
                short_chunks(self._todo, most_frames=self.group_frames) if self._decode_sent else 1
            )
            jobs = [self._todo.popleft()]
            self.budget.take(nbytes)
            if nbytes > self.budget.limit_bytes:
                self._budget_under_one_chunk(jobs[0], nbytes)
            while len(jobs) < most and self.budget.admits(nbytes := self._nbytes(self._todo[0])):
                jobs.append(self._todo.popleft())
                self.budget.take(nbytes)
            self._decode(jobs)

    def _budget_under_one_chunk(self, job: ChunkJob, nbytes: int) -> None:
        """Say, once, that a chunk came that the budget cannot hold: it goes alone."""
        if self._said_under_one_chunk:
            return
        self._said_under_one_chunk = True
        # Stored embeddings count as the decoded audio they stand for: no chunk-seconds there.
        stored = job.stored is not None or job.info.codec == STORED_CODEC
        logger.warning(
            "memory budget %s holds less than one chunk of decoded audio (%s for %s): chunks "
            "go one at a time, decoding waits on scoring; raise memory-budget%s",
            format_bytes(self.budget.limit_bytes),
            format_bytes(nbytes),
            job.label,
            "" if stored else " or lower chunk-seconds",
        )

    def _decode(self, jobs: list[ChunkJob]) -> None:
        self._decode_sent = True
        self._decoding += 1
        future: Future
        if len(jobs) > 1:
            for slot, job in enumerate(jobs):
                _log_taking(job)
                job.slot = slot
            decode: Callable[..., DecodedChunk | StoredChunk]
            chunks: list[tuple[Any, ...]]
            if jobs[0].stored is not None:  # short_chunks groups one kind
                prefix, decode, options = "load", load_stored, {}
                chunks = [(job.stored,) for job in jobs]
            else:
                prefix, decode, options = "decode", self.decode, self.decode_options
                chunks = [(job.info, job.plan) for job in jobs]
            future = self.client.submit(
                decode_several,
                decode,
                chunks,
                **options,
                key=task_key(prefix),
                **self.pool.decode_placement(),
                pure=False,
            )
            self._track(future, functools.partial(self._several_decoded, jobs))
            return
        (job,) = jobs
        job.slot = None
        if job.stored is not None:
            _log_taking(job)
            future = self.client.submit(
                load_stored,
                job.stored,
                key=task_key("load"),
                **self.pool.decode_placement(),
                pure=False,
            )
            self._track(future, functools.partial(self._decoded_done, job))
            return
        _log_taking(job)
        future = self.client.submit(
            self.decode,
            job.info,
            job.plan,
            **self.decode_options,
            key=task_key("decode"),
            **self.pool.decode_placement(),
            pure=False,
        )
        self._track(future, functools.partial(self._decoded_done, job))

    def _score(self, address: str, group: list[tuple[ChunkJob, Future]]) -> None:
        for job, _ in group:
            logger.info("scoring %s", job.label)
        # Each decode task once, however many of its chunks the group holds.
        futures = list({f.key: f for _, f in group}.values())
        task = {f.key: i for i, f in enumerate(futures)}
        future = self.client.submit(
            score_picked,
            self.score,
            ScorerRef(self.pool.scorers[address]),
            *futures,
            picks=[(task[f.key], job.slot) for job, f in group],
            per_chunk=self.score_keywords([job for job, _ in group]) if self.score_keywords else {},
            key=task_key(self.score_prefix),
            workers=[address],
            # Loose: if the actor's worker dies the task runs elsewhere and fails (reported,
            # redone by resume) instead of waiting forever for that worker.
            allow_other_workers=True,
            # Before the decode tasks queued on its worker: it leaves the worker's threads to
            # them once it runs (score._call), and the scorer waits for nothing else.
            priority=1,
            pure=False,
        )
        self._load[address] += 1
        if not self._score_sent:
            self._first_score_out = self.pool.decodes(address)
        self._score_sent = True
        self._track(future, functools.partial(self._scored, address, group))

    # -- completion --------------------------------------------------------------------------
    def _decoded_done(self, job: ChunkJob, future: Future) -> None:
        self._decoding -= 1
        if future.status != "error":
            self._decoded.append((job, future))
            return
        self.budget.release(self._nbytes(job))
        self._not_decoded(job, future.exception())

    def _several_decoded(self, jobs: list[ChunkJob], future: Future) -> None:
        self._decoding -= 1
        if future.status != "error":
            self._decoded.extend((job, future) for job in jobs)
            return
        # Not one file's error (each is caught in the task): its worker died, for instance.
        # Each chunk is decoded alone instead, so that one that kills workers fails alone.
        logger.warning(
            "%s %d chunks in one task failed (%s); taking them one by one",
            "reading" if jobs[0].stored is not None else "decoding",
            len(jobs),
            future.exception(),
        )
        for job in reversed(jobs):
            self.budget.release(self._nbytes(job))
            job.decode_alone = True
            self._todo.appendleft(job)

    def _not_decoded(self, job: ChunkJob, error: BaseException) -> None:
        """A chunk's decode (or load) failed; its bytes are no longer in the budget."""
        if job.stored is not None and job.info.codec != STORED_CODEC:
            # A damaged store does not fail audio that is at hand: it is decoded instead.
            logger.warning(
                "%s: its stored embeddings cannot be read (%s); decoding it instead",
                job.label,
                error,
            )
            job.stored = None
            self._todo.appendleft(job)
            return
        if isinstance(error, DecoderStopped):
            job.attempts += 1
            if job.attempts < self.score_attempts:
                logger.warning("%s: %s; decoding it again", job.label, error.reason)
                self._todo.appendleft(job)
                return
        # A chunk read back from the embedding store was not decoded: its stage is "load".
        stage = "decode" if job.stored is None else "load"
        self.on_failure(job, error, stage)
        self._chunk_over(job)

    def _scored(self, address: str, group: list[tuple[ChunkJob, Future]], future: Future) -> None:
        self._load[address] -= 1
        self._first_score_out = False
        results = self._results(address, future)
        if not isinstance(results, BaseException):
            self.budget.release(sum(self._nbytes(job) for job, _ in group))
            with self.recording():
                for (job, _), result in zip(group, results, strict=True):
                    if isinstance(result, Exception):  # decoded with others, and failed alone
                        self._not_decoded(job, result)
                        continue
                    job.scorer = address
                    for more in self.on_result(job, result) or ():
                        self.enqueue(more)
                    self._chunk_over(job)
            return
        # Re-send what a lost actor held; Dask recomputes any decoded array that died with it.
        retry, failed = split_failed_group(
            group, scorer_lost=self.pool.was_lost(address), most_attempts=self.score_attempts
        )
        self._decoded.extendleft(reversed(retry))
        self.resent += len(retry)
        self.budget.release(sum(self._nbytes(job) for job, _ in failed))
        for job, _ in failed:
            self.on_failure(job, results, "score")
            self._chunk_over(job)

    def _results(self, address: str, future: Future) -> Any:
        """What the score task on ``address`` returned, or its error, or a :class:`ScorerError`.

        Its result can be lost with the scorer's worker before it is read, or as it is read:
        Dask then computes it again, which can wait for good (on the actor that died, or on
        decode tasks stranded with dead workers) and would hold up this loop, which replaces
        them. Its chunks go to the scorer in its place instead.
        """
        lost = ScorerError(f"the result of {future.key} was lost with its worker")
        if not future.done():
            return lost
        while True:
            try:
                return outcome(future, timeout_s=self.pool.ping_seconds)
            except TimeoutError:
                if self.pool.was_lost(address):
                    return lost
                raise_if_stopped()  # a live scorer computes it again: waited for

    def _chunk_over(self, job: ChunkJob) -> None:
        """A chunk is scored or failed; after a file's last, its decoded copies go."""
        path = job.info.path
        self._open[path] -= 1
        if self._open[path] > 0:
            return
        del self._open[path]
        if job.info.codec != STORED_CODEC and not seeks_exactly(
            job.info.codec, self.decode_options.get("seekable_codecs", ())
        ):
            # Each node that decoded the file whole holds a copy (an hour: 230 MB): remove it
            # now, not at the end of the run. Not waited for: it only deletes files.
            self.client.run(_release_copy, job.info, **self.decode_options, wait=False)


def _next_finished(pending: as_completed, *, timeout_s: float) -> Future | None:
    """The next finished future of ``pending``; ``None`` if none finished within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pending.has_ready():
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        with pending.thread_condition:  # notified as a future finishes
            pending.thread_condition.wait(timeout=min(left, 0.1))
    return next(pending)


def _log_taking(job: ChunkJob) -> None:
    """The chunk's "decoding [chunk]" line, or "reading stored embeddings of [chunk]"."""
    if job.stored is None:
        logger.info("decoding %s", job.label)
    else:
        logger.info("reading stored embeddings of %s", job.label)


async def _release_copy(info: AudioInfo, **decode_options: Any) -> None:
    """:func:`release_decoded_copy` on a worker; a coroutine, as ``run(wait=False)`` requires."""
    release_decoded_copy(info, **decode_options)
