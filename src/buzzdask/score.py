"""The scorer actor: holds the embedder and the head once per scoring worker.

Decoded chunks reach it through :func:`score_chunks`, a task placed on the actor's worker, so
Dask moves each array from the decoding worker straight to the scorer (or not at all, when the
worker that decoded it also scores), and the task calls the actor in process and writes the
chunks' partitions there: the client only receives frame counts. The actor
batches frames across chunks: frame runs are laid out on the embedder's own patch grid in one
waveform, so one embedder call scores many chunks, and every frame still sees exactly the
samples it would see in a whole-file computation.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import dask.system
import numpy as np
from distributed import Client, Future, Worker, WorkerPlugin, get_worker, secede
from distributed.utils import sync

from buzzdask.buffers import SAMPLE_ALIGNMENT, aligned_empty
from buzzdask.decode import DecodedChunk
from buzzdask.errors import BuzzdaskWarning, ModelError, ScorerError, ScorerMisplacedError
from buzzdask.frames import FrameSpec
from buzzdask.models import head_weights, load_embedder, load_head
from buzzdask.preload import import_tensorflow
from buzzdask.store import EmbeddingStore, StoredChunk
from buzzdask.write import PartitionWriter

__all__ = [
    "MIN_CALL_PATCHES",
    "ChunkTarget",
    "ChunkWriter",
    "EmbedderThreads",
    "Scorer",
    "embed_chunks",
    "embedder_threads",
    "prepare_devices",
    "score_chunks",
    "submit_scorer",
]


#: Fewest embedder patches a parallel embedder call is sized for (:func:`embedder_threads`).
MIN_CALL_PATCHES = 32

#: Seconds a call waits for a lane before it looks again without being woken (a safety net:
#: :class:`_TaskEnds` wakes it as a task of its worker stops running).
LANE_POLL_S = 0.1
#: Seconds between a score task's looks at whether the scorer of another worker it waits on is
#: still held (:func:`_call`).
LOST_SCORER_LOOK_S = 5.0


class EmbedderThreads(NamedTuple):
    """How a scorer runs its embedder: calls side by side, and TensorFlow's thread pools."""

    parallel_calls: int
    intra_op: int | None
    inter_op: int | None


def embedder_threads(
    *,
    cores: int,
    batch_frames: int,
    intra_op_threads: int | None,
    inter_op_threads: int | None,
    shared: bool,
    on_gpu: bool,
) -> EmbedderThreads:
    """The embedder's layout on ``cores`` CPU cores (a scorer's share of its host's).

    On a CPU, by default, a score task's frames go to the embedder in parallel calls, one per
    core, each run single-threaded: on two cores, two such calls scored 1.2-1.3x as many
    frames a second as one call spread over both, at 0.8x its CPU per frame (README,
    Performance; the benchmarks' model stage: 0.9-1.2x, corpus by corpus). Each call is
    still given at least :data:`MIN_CALL_PATCHES` patches of the task's ``batch_frames``;
    where that leaves fewer calls than cores, their operations share all the cores. A GPU,
    or thread pools set in the configuration, keep one call at a time; scorers sharing a host
    then divide its cores.

    Parameters
    ----------
    cores : int >= 1
        The cores this scorer may use.
    batch_frames : int >= 1
        Most patches per task's batch (``buzzdask.batch-frames``).
    intra_op_threads, inter_op_threads : int or None
        ``buzzdask.tf-intra-op-threads`` and ``tf-inter-op-threads``.
    shared : bool
        Other scorers share the host (``cores`` is this one's share).
    on_gpu : bool
        TensorFlow will run the embedder on a GPU.
    """
    if intra_op_threads is None and not on_gpu:
        calls = max(1, min(cores, batch_frames // MIN_CALL_PATCHES))
        return EmbedderThreads(calls, 1 if calls == cores else cores, inter_op_threads or calls)
    if shared:
        return EmbedderThreads(1, intra_op_threads or cores, inter_op_threads or cores)
    return EmbedderThreads(1, intra_op_threads, inter_op_threads)


@dataclass
class _FrameRun:
    """Consecutive frames of one chunk placed in a batch waveform.

    ``samples`` run from the first frame's start to the padded end of the run's waveform, or to
    the chunk's end where that comes first (a half made after running out of GPU memory,
    :func:`_halves`, to its last frame's end). What they leave of the padded length is zeros.
    """

    chunk: int
    first: int
    n_frames: int
    samples: np.ndarray


class Scorer:
    """Dask actor scoring decoded chunks with an embedder and one or more heads.

    Parameters
    ----------
    head_path : str, sequence of str, or None
        Directory of a head SavedModel (``serving_default``: embeddings -> activations), or of
        several heads that score the same embeddings (their activations side by side, in this
        order). ``None``: no head; the actor only gives embeddings (:meth:`embed`, training).
    embedder_handle : str or None
        Local SavedModel directory of the embedder (waveform -> scores, embeddings, ...),
        as :func:`~buzzdask.models.resolve_embedder` gives it.
        ``None``: no embedder; the heads score stored embeddings only (a re-scoring).
    spec : FrameSpec
        Frame geometry; the hop may differ from the embedder's own patch hop.
    n_classes : int or sequence of int
        Columns each head must give (ignored without a head).
    batch_frames : int > 0
        Most embedder patches per call.
    cpu_call_frames : int > 0, optional
        On a CPU, the most patches per call (``buzzdask.cpu-call-frames``), below
        ``batch_frames``: YAMNet's intermediate arrays for a few dozen patches stay in the
        caches, for hundreds they do not. A GPU always takes calls of ``batch_frames``.
    embedding_size : int, optional
        Without an embedder: the size of the stored embeddings the heads take.
    intra_op_threads, inter_op_threads : int, optional
        TensorFlow thread pools (default: parallel one-thread embedder calls on a CPU, see
        :func:`embedder_threads`).
    share_cores : int >= 1
        Scorers sharing this host's cores: this one uses this process's cores divided by
        ``share_cores``, so that its TensorFlow does not contend with the others'.
    gpus : int >= 0
        GPUs the worker declares (its Dask resource ``GPU``): TensorFlow must see exactly these,
        checked before the model loads. 0: none is required (TensorFlow uses what it sees).
    worker : str
        The address of the worker it is meant for, also named in messages. Built on another
        (Dask ran its task elsewhere: that worker had left or was paused), it refuses: no
        score task would reach it there.

    Raises
    ------
    ScorerError
        If the worker declares GPUs and TensorFlow does not see exactly that many.
    ScorerMisplacedError
        If it is built on a worker other than ``worker``.
    ModelError
        If the embedder's output size does not match a head's input, or a head's output
        does not match its class list.

    Notes
    -----
    TensorFloat-32 is off: on Ampere and later GPUs TensorFlow would otherwise round the
    convolutions' and matrix products' inputs to 10-bit mantissas, far beyond this project's
    1e-4 fidelity to the lab's model. GPU memory grows as needed, and a batch that runs out of
    it is split in halves and run again (:attr:`oom_splits` counts them), never lost.
    """

    def __init__(
        self,
        *,
        head_path: str | Sequence[str] | None,
        embedder_handle: str | None,
        spec: FrameSpec,
        n_classes: int | Sequence[int],
        batch_frames: int,
        cpu_call_frames: int | None = None,
        embedding_size: int | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        share_cores: int = 1,
        gpus: int = 0,
        worker: str = "",
    ) -> None:
        self._worker: Worker | None
        try:
            self._worker = get_worker()
            here = self._worker.address
        except ValueError:  # built outside a worker: a notebook, a benchmark
            self._worker = None
            here = worker
        if worker and here != worker:
            raise ScorerMisplacedError(f"the scorer meant for {worker} reached {here}")
        head_paths = (head_path,) if isinstance(head_path, str) else tuple(head_path or ())
        classes = (n_classes,) if isinstance(n_classes, int) else tuple(n_classes)
        classes = classes if head_paths else ()
        # Heads with NumPy weights and no embedder (a re-scoring) need no TensorFlow at all.
        self._tf: Any = None
        self.device = "CPU (NumPy heads)"
        # Embedder calls side by side (embedder_threads), or one at a time without this pool.
        self.parallel_calls = 1
        self._calls_pool: ThreadPoolExecutor | None = None
        #: The most patches per embedder call.
        self.call_frames = max(1, int(batch_frames))
        if embedder_handle or any(head_weights(path) is None for path in head_paths):
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            tf = import_tensorflow()  # where no preload imported it already

            on_gpu = bool(gpus or tf.config.list_physical_devices("GPU"))
            threads = embedder_threads(
                cores=max(1, dask.system.cpu_count() // share_cores),
                batch_frames=batch_frames,
                intra_op_threads=intra_op_threads,
                inter_op_threads=inter_op_threads,
                shared=share_cores > 1,
                on_gpu=on_gpu,
            )
            if cpu_call_frames is not None and not on_gpu:
                self.call_frames = min(self.call_frames, max(1, int(cpu_call_frames)))
            _set_threads(
                tf,
                threads.intra_op,
                threads.inter_op,
                configured=intra_op_threads is not None or inter_op_threads is not None,
            )
            self.parallel_calls = threads.parallel_calls
            if self.parallel_calls > 1:
                self._calls_pool = ThreadPoolExecutor(
                    self.parallel_calls, thread_name_prefix="buzzdask-embed"
                )
            # Before the model loads: a worker without its GPU stops the run here, not later.
            self.device = prepare_devices(tf, gpus=gpus, worker=worker)
            self._tf = tf
        self.spec = spec
        self._heads = [load_head(path) for path in head_paths]
        self._embedder = load_embedder(embedder_handle) if embedder_handle else None
        if self._embedder is None:
            if embedding_size is None:
                raise ModelError("a scorer without an embedder needs the stored embedding size")
            self.embedding_size = embedding_size
            self.native_hop = spec.hop_length
        else:
            self.embedding_size = self._measure_embedder(str(embedder_handle))
        for (score, head_input), path, n_head_classes in zip(
            self._heads, head_paths, classes, strict=True
        ):
            if head_input not in (-1, self.embedding_size):
                source = f"embedder {embedder_handle!r}" if embedder_handle else "the store"
                raise ModelError(
                    f"{source} gives {self.embedding_size}-d embeddings but the head in {path} "
                    f"expects {head_input}-d input"
                )
            n_outputs = score(np.zeros((1, self.embedding_size), np.float32)).shape[1]
            if n_outputs != n_head_classes:
                raise ModelError(
                    f"head in {path} gives {n_outputs} outputs but its config lists "
                    f"{n_head_classes} classes"
                )
        self.n_classes = sum(classes) if self._heads else 0
        self.frames_scored = 0
        self.frames_embedded = 0
        self.seconds_scoring = 0.0
        self.calls = 0
        #: Calls of the pool run alone because the worker's other tasks held its other cores.
        self.calls_beside_tasks = 0
        self.oom_splits = 0
        # Score tasks call in from the worker's threads (see _call). They hand their embedder
        # calls to the pool one task after the other; without a pool (a GPU: one call at a
        # time), they make them one task after the other.
        self._lock = threading.Lock()
        # Calls and tasks may end side by side; a call waits on it for a lane (_gated_runs).
        self._counters = threading.Condition()
        self._tasks_scoring = 0
        self._calls_running = 0
        self._busy_since = 0.0
        if self._calls_pool is not None and self._worker is not None:
            sync(self._worker.loop, _watch_task_ends, self._worker, self)

    def _measure_embedder(self, handle: str) -> int:
        """Check the embedder gives one frame per window; its embedding size and patch hop."""
        spec = self.spec
        try:
            one = self._embed(np.zeros(spec.window, np.float32))
        except Exception as error:  # no (waveform) -> (scores, embeddings, ...) call: a head?
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ModelError(
                f"embedder {handle!r} cannot embed audio ({type(error).__name__}: "
                f"{first_line}); an embedder takes a waveform and returns embeddings, as "
                "YAMNet does: is it a model's head, or another SavedModel?"
            ) from None
        if one.shape[0] != 1:
            raise ModelError(
                f"embedder {handle!r} gives {one.shape[0]} frames for one "
                f"{spec.window}-sample window; frame length or context is misconfigured"
            )
        # The embedder's own patch hop, measured: patches for a window plus two frames.
        n_patches = self._frames_of(spec.window + 2 * spec.frame_length)
        self.native_hop = (2 * spec.frame_length) // max(1, n_patches - 1)
        # A window shorter than the embedder's also gives one frame (padded), and each frame's
        # scores would then be of other audio than its own: the embedder's next frame comes one
        # sample past its window (padded to whole patches, as YAMNet) or a patch hop past it.
        if self._frames_of(spec.window + 1) != 2 and (
            self._frames_of(spec.window + self.native_hop - 1) != 1
            or self._frames_of(spec.window + self.native_hop) != 2
        ):
            raise ModelError(
                f"embedder {handle!r} reads more than {spec.window} samples "
                f"({spec.window / spec.sample_rate:g} s at {spec.sample_rate} Hz) for one frame, "
                "its frame length and context as configured (frame-length-seconds and "
                "frame-context-seconds of its buzzdask.embedders entry): every frame would be "
                "scored on other audio than its own; set them to the embedder's (YAMNet: 0.96 "
                "and 0.015)"
            )
        # Frames on the patch grid come from one contiguous call; others are scored one by one.
        self._stride = (
            spec.hop_length // self.native_hop if spec.hop_length % self.native_hop == 0 else None
        )
        return int(one.shape[1])

    def _frames_of(self, samples: int) -> int:
        """Frames the embedder gives for ``samples`` samples of silence."""
        return int(self._embed(np.zeros(samples, np.float32)).shape[0])

    def _embed(self, waveform: np.ndarray) -> np.ndarray:
        assert self._embedder is not None
        return self._embedder(self._tensor(waveform))[1].numpy()

    def _tensor(self, waveform: np.ndarray) -> Any:
        """``waveform`` (float32) as a tensor: on a CPU, its own buffer where TensorFlow takes it.

        TensorFlow copies a NumPy array into a tensor of its own (``tf.constant``), but takes a
        buffer aligned for its kernels as it is, through DLPack: a 10-minute chunk's calls then
        copy nothing. The tensor holds the array while it lives; TensorFlow writes only into
        buffers no one else holds, so the chunk's samples stay as they were.
        """
        if (
            self.device == "CPU"
            and waveform.ctypes.data % SAMPLE_ALIGNMENT == 0
            and waveform.flags.c_contiguous
            and waveform.flags.writeable
        ):
            return self._tf.experimental.dlpack.from_dlpack(waveform.__dlpack__())
        return self._tf.constant(waveform, dtype=self._tf.float32)

    def score(self, chunks: Sequence[DecodedChunk | StoredChunk]) -> list[np.ndarray]:
        """Score decoded chunks, or stored embeddings, with every head.

        Parameters
        ----------
        chunks : sequence of DecodedChunk or StoredChunk

        Returns
        -------
        list of np.ndarray [shape=(chunk.n_frames, n_classes), dtype=float32]
            Raw head activations, one array per chunk, in order; with several heads, their
            columns side by side in the heads' order.

        Raises
        ------
        ModelError
            If the actor was started without a head, or a decoded chunk reaches an actor
            started without an embedder.
        """
        return [activations for _, activations in self.score_and_embed(chunks)]

    def score_and_embed(
        self, chunks: Sequence[DecodedChunk | StoredChunk]
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`score`, with each chunk's embeddings: ``(embeddings, activations)`` per chunk.

        A stored chunk's embeddings are the ones it brought.
        """
        if not self._heads:
            raise ModelError("this scorer has no head (started for embeddings only)")
        with self._scoring():
            decoded = [c for c in chunks if isinstance(c, DecodedChunk)]
            fresh = iter(self._batched(decoded) if decoded else [])
            embeddings = [
                next(fresh)
                if isinstance(c, DecodedChunk)
                else c.embeddings.reshape(c.n_frames, self.embedding_size)
                for c in chunks
            ]
            stacked = np.concatenate(embeddings)
            # One call per head for the whole task: a head costs next to nothing per frame.
            activations = np.concatenate(
                [score(stacked).astype(np.float32, copy=False) for score, _ in self._heads]
                if len(stacked)
                else [np.zeros((0, self.n_classes), np.float32)],
                axis=1,
            )
            bounds = np.cumsum([len(e) for e in embeddings])[:-1]
        with self._counters:
            self.frames_embedded += sum(c.n_frames for c in decoded)
            self.frames_scored += len(stacked)
        return list(zip(embeddings, np.split(activations, bounds), strict=True))

    def embed(self, chunks: list[DecodedChunk]) -> list[np.ndarray]:
        """Embed decoded chunks (the same batching as :meth:`score`, without the heads).

        Parameters
        ----------
        chunks : list of DecodedChunk

        Returns
        -------
        list of np.ndarray [shape=(chunk.n_frames, embedding_size), dtype=float32]
            The embedder's output for each frame, one array per chunk, in order.
        """
        with self._scoring():
            results = self._batched(chunks)
        with self._counters:
            self.frames_embedded += sum(len(r) for r in results)
        return results

    @contextmanager
    def _scoring(self) -> Iterator[None]:
        """A task scores in the block: :attr:`seconds_scoring` counts time with one or more."""
        with self._counters:
            if not self._tasks_scoring:
                self._busy_since = time.perf_counter()
            self._tasks_scoring += 1
        try:
            yield
        finally:
            with self._counters:
                self._tasks_scoring -= 1
                if not self._tasks_scoring:
                    self.seconds_scoring += time.perf_counter() - self._busy_since

    def _batched(self, chunks: list[DecodedChunk]) -> list[np.ndarray]:
        """Frames of ``chunks`` through the embedder in batches: their embeddings, per chunk."""
        if self._embedder is None:
            raise ModelError(
                "this scorer has no embedder (started to re-score stored embeddings only)"
            )
        batches = self._call_batches(chunks)
        embedded: Iterable[list[tuple[_FrameRun, np.ndarray]]]
        with self._lock:
            if self._calls_pool is None:
                embedded = [self._embedded_runs(batch) for batch in batches]
            else:
                # Queued behind the calls of the task before (the pool takes them in order), not
                # after them: its last call no longer runs alone on one core while the other
                # waits for the next task.
                calls = [self._calls_pool.submit(self._gated_runs, b) for b in batches]
                embedded = (call.result() for call in calls)
        pieces: list[list[tuple[int, np.ndarray]]] = [[] for _ in chunks]
        for runs in embedded:
            for run, outputs in runs:
                pieces[run.chunk].append((run.first, outputs))
        results: list[np.ndarray] = []
        for chunk_pieces in pieces:
            ordered = [a for _, a in sorted(chunk_pieces, key=_first)]
            results.append(
                np.concatenate(ordered)
                if ordered
                else np.zeros((0, self.embedding_size), np.float32)
            )
        return results

    def _call_batches(self, chunks: list[DecodedChunk]) -> list[list[_FrameRun]]:
        """The task's frames in runs, and the runs in embedder calls (batches).

        A call holds at most :attr:`call_frames` patches. With parallel calls, the task's patches
        are shared evenly between a multiple of ``parallel_calls`` calls, so that all of them
        are busy; a chunk cut into runs pads each run on its own, so the calls grow, patch by
        patch, until the runs fit that many (a 10-minute chunk on two cores, in calls of up to
        96: eight calls of up to 79 frames, not a ninth for what is left over).
        """
        call_patches = self.call_frames
        calls = 0
        if self._calls_pool is not None:
            patches = sum(self._padded_length(c.n_frames) // self.native_hop for c in chunks)
            if not patches:  # files shorter than one frame: nothing to embed
                return []
            batches = -(-patches // self.call_frames)
            calls = -(-batches // self.parallel_calls) * self.parallel_calls
            call_patches = min(self.call_frames, max(MIN_CALL_PATCHES, -(-patches // calls)))
        while True:
            planned = list(self._batches(self._runs(chunks, call_patches), call_patches))
            if len(planned) <= calls or call_patches >= self.call_frames:
                return planned
            call_patches += 1

    def _batches(self, runs: list[_FrameRun], call_patches: int) -> Iterator[list[_FrameRun]]:
        """Consecutive ``runs`` packed into batches of at most ``call_patches`` patches."""
        batch: list[_FrameRun] = []
        batch_patches = 0
        for run in runs:
            patches = self._padded_length(run.n_frames) // self.native_hop
            if batch and batch_patches + patches > call_patches:
                yield batch
                batch, batch_patches = [], 0
            batch.append(run)
            batch_patches += patches
        if batch:
            yield batch

    def stats(self) -> dict[str, Any]:
        """Counters since the actor started: frames, embedder calls, seconds spent scoring.

        Also the embedder calls it runs side by side and the most frames of one, how many of
        them ran alone beside the worker's other tasks (:meth:`_lanes`), its device and its
        process.
        """
        return {
            "frames_scored": self.frames_scored,
            "frames_embedded": self.frames_embedded,
            "embedder_calls": self.calls,
            "parallel_calls": self.parallel_calls,
            "calls_beside_tasks": self.calls_beside_tasks,
            "call_frames": self.call_frames,
            "seconds_scoring": self.seconds_scoring,
            "native_hop": self.native_hop,
            "device": self.device,
            "oom_splits": self.oom_splits,
            "pid": os.getpid(),
        }

    def _padded_length(self, n_frames: int) -> int:
        span = self.spec.span(n_frames)
        return -(-span // self.native_hop) * self.native_hop

    def _runs(self, chunks: list[DecodedChunk], call_patches: int) -> list[_FrameRun]:
        spec = self.spec
        if self._stride is None:
            run_frames = 1
        else:
            # Largest run whose padded waveform fits one call: the n with
            # window + (n - 1) * hop <= call_patches * native_hop.
            run_frames = max(
                1, (call_patches * self.native_hop - spec.window) // spec.hop_length + 1
            )
        runs = []
        for index, chunk in enumerate(chunks):
            for first in range(0, chunk.n_frames, run_frames):
                n_frames = min(run_frames, chunk.n_frames - first)
                start = first * spec.hop_length
                samples = chunk.samples[start : start + self._padded_length(n_frames)]
                runs.append(_FrameRun(index, first, n_frames, samples))
        return runs

    def _lanes(self) -> int:
        """Embedder calls that may run side by side now: a core each, less the worker's tasks.

        Each task running on this worker (a decode: ffmpeg's pipe or in-process PCM) holds a
        core; a second call there would only take turns with it, and two one-thread calls
        side by side cost 5-11 % more CPU per frame than one alone (README, Performance). Score
        tasks secede (:func:`_call`), so they do not count.
        """
        running = len(self._worker.state.executing) if self._worker is not None else 0
        return max(1, self.parallel_calls - running)

    def _lane_free(self) -> bool:
        return self._calls_running < self._lanes()

    def _task_ended(self) -> None:
        """A task of the worker stopped running: calls waiting for its core look again."""
        with self._counters:
            self._counters.notify_all()

    def _gated_runs(self, batch: list[_FrameRun]) -> list[tuple[_FrameRun, np.ndarray]]:
        """:meth:`_embedded_runs` in a free lane (see :meth:`_lanes`); from the calls pool."""
        with self._counters:
            while not self._counters.wait_for(self._lane_free, LANE_POLL_S):
                pass
            self._calls_running += 1
            if self._calls_running == 1 and self._lanes() < self.parallel_calls:
                self.calls_beside_tasks += 1
        try:
            return self._embedded_runs(batch)
        finally:
            with self._counters:
                self._calls_running -= 1
                self._counters.notify_all()

    def _embedded_runs(self, batch: list[_FrameRun]) -> list[tuple[_FrameRun, np.ndarray]]:
        """Each run of ``batch`` with its embeddings; out of GPU memory, in two halves instead."""
        try:
            outputs = self._batch_outputs(batch)
        except self._tf.errors.ResourceExhaustedError:
            halves = _halves(batch, self.spec)
            if halves is None:  # one frame does not fit: nothing smaller to try
                raise
            with self._counters:
                self.oom_splits += 1
            return [piece for half in halves for piece in self._embedded_runs(half)]
        with self._counters:
            self.calls += 1
        ends = np.cumsum([run.n_frames for run in batch])
        return list(zip(batch, np.split(outputs, ends[:-1]), strict=True))

    def _batch_outputs(self, batch: list[_FrameRun]) -> np.ndarray:
        """The runs of ``batch`` laid out on the patch grid in one waveform, embedded.

        A lone run with its whole padded waveform in its chunk is embedded where it lies: what
        follows its last frame's window reaches only patches that are thrown away.
        """
        lengths = [self._padded_length(run.n_frames) for run in batch]
        stride = self._stride or 1
        if len(batch) == 1 and len(batch[0].samples) == lengths[0]:
            waveform = batch[0].samples
        else:
            waveform = aligned_empty(sum(lengths))
            offset = 0
            for run, length in zip(batch, lengths, strict=True):
                end = offset + len(run.samples)
                waveform[offset:end] = run.samples
                # Past the end of the file the embedder's context is zero, as in a whole-file
                # call.
                waveform[end : offset + length] = 0.0
                offset += length
        first_patches = np.cumsum([0, *lengths[:-1]]) // self.native_hop
        rows = [
            first + stride * np.arange(run.n_frames)
            for first, run in zip(first_patches, batch, strict=True)
        ]
        return self._embed(waveform)[np.concatenate(rows)].astype(np.float32, copy=False)


class _TaskEnds(WorkerPlugin):
    """Tells a scorer when a task of its worker stops running (its core is free again).

    The worker calls :meth:`transition` on its event loop. It holds the scorer weakly: a
    scorer released by its run leaves this plugin idle, not its model in memory, until the
    next scorer on the worker removes it (:func:`_watch_task_ends`).
    """

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = weakref.ref(scorer)

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        scorer = self.scorer()
        if start == "executing" and scorer is not None:
            scorer._task_ended()


async def _watch_task_ends(worker: Worker, scorer: Scorer) -> None:
    """Add ``scorer``'s :class:`_TaskEnds` to ``worker``, removing those of released scorers."""
    for name, plugin in list(worker.plugins.items()):
        if isinstance(plugin, _TaskEnds) and plugin.scorer() is None:
            await worker.plugin_remove(name)
    await worker.plugin_add(_TaskEnds(scorer), name=f"buzzdask-lanes-{id(scorer)}")


def _first(piece: tuple[int, np.ndarray]) -> int:
    return piece[0]


def _halves(
    batch: list[_FrameRun], spec: FrameSpec
) -> tuple[list[_FrameRun], list[_FrameRun]] | None:
    """``batch`` in two smaller batches (a lone run cut between frames); ``None`` for one frame."""
    if len(batch) > 1:
        middle = len(batch) // 2
        return batch[:middle], batch[middle:]
    run = batch[0]
    if run.n_frames < 2:
        return None
    first_frames = run.n_frames // 2
    offset = first_frames * spec.hop_length
    return (
        [_FrameRun(run.chunk, run.first, first_frames, run.samples[: spec.span(first_frames)])],
        [
            _FrameRun(
                run.chunk,
                run.first + first_frames,
                run.n_frames - first_frames,
                run.samples[offset : offset + spec.span(run.n_frames - first_frames)],
            )
        ],
    )


def prepare_devices(tf: Any, *, gpus: int, worker: str) -> str:
    """Set TensorFlow up before it runs anything; describe the device it will score on.

    TensorFloat-32 off and GPU memory growth on; with ``gpus > 0`` (the worker declares them),
    TensorFlow must see exactly that many GPUs.

    Returns
    -------
    str
        ``"GPU:0 NVIDIA H100 80GB HBM3"`` (the first GPU's name) or ``"CPU"``.

    Raises
    ------
    ScorerError
        If the worker declares GPUs TensorFlow does not see (one line: the worker, what
        TensorFlow sees, ``CUDA_VISIBLE_DEVICES`` and the likely fix).
    """
    tf.config.experimental.enable_tensor_float_32_execution(False)
    visible = tf.config.list_physical_devices("GPU")
    if gpus and len(visible) != gpus:
        cuda = "" if tf.test.is_built_with_cuda() else ", built without CUDA"
        raise ScorerError(
            f"worker {worker or '?'} declares GPU={gpus} but TensorFlow {tf.__version__}{cuda} "
            f"sees {len(visible)} GPU(s) {[d.name for d in visible]} with CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}; install TensorFlow with CUDA "
            "in the workers' environment (pip install 'buzzdask[gpu]') or start the worker "
            "without --resources GPU (a test cluster's GPUs that are no GPUs: "
            "DASK_BUZZDASK__CHECK_GPUS=false where the run starts, as local-slurm sets it)"
        )
    for device in visible:
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except RuntimeError:  # an earlier actor in this process already started the GPU
            pass
    if not visible:
        return "CPU"
    details = tf.config.experimental.get_device_details(visible[0])
    return f"GPU:0 {details.get('device_name', visible[0].name)}"


def _set_threads(
    tf: Any, intra_op_threads: int | None, inter_op_threads: int | None, *, configured: bool
) -> None:
    """Size TensorFlow's thread pools, unless an earlier actor in this process already ran it.

    TensorFlow fixes its pools when it first runs; a later actor in the same worker (another
    analysis on the same cluster) keeps them rather than failing to start, with a warning
    where the pools were ``configured`` (not this module's defaults).
    """
    setters = [
        (tf.config.threading.set_intra_op_parallelism_threads, intra_op_threads),
        (tf.config.threading.set_inter_op_parallelism_threads, inter_op_threads),
    ]
    for setter, threads in setters:
        if not threads:
            continue
        try:
            setter(threads)
        except RuntimeError as error:
            if configured:
                warnings.warn(
                    f"TensorFlow's threads are already fixed in this worker: {error}",
                    BuzzdaskWarning,
                    stacklevel=3,
                )


def submit_scorer(client: Client, address: str, *, key: str, **options: Any) -> Future:
    """Start a :class:`Scorer` actor on the worker ``address``.

    ``options`` are the :class:`Scorer` parameters. Hold the returned future for as long as
    the actor is used: once it is released, Dask forgets the actor.
    """
    return client.submit(
        Scorer,
        **options,
        actor=True,
        workers=[address],
        # Loose: if that worker dies (or is paused) before the actor is up, the task fails on
        # another (Scorer stays where it was meant to be) instead of waiting for it forever.
        allow_other_workers=True,
        key=key,
    )


class ChunkTarget(NamedTuple):
    """Where one chunk's results go.

    Attributes
    ----------
    name : str
        The input's relative name (the partitions' ``file``).
    chunk_index : int
    audio_sha256 : str or None
        The audio's content hash, where embeddings are kept.
    planned_frames : int or None
        Frames the chunk was planned with: fewer came back when the audio ended inside it.
    """

    name: str
    chunk_index: int
    audio_sha256: str | None = None
    planned_frames: int | None = None


@dataclass(frozen=True)
class ChunkWriter:
    """Writes a scored chunk where it was scored: a partition per head, and its embeddings.

    Parameters
    ----------
    heads : tuple of PartitionWriter
        One per head, in the order of the scorer's activation columns.
    store : EmbeddingStore or None
        Where freshly computed embeddings are kept (``None``: not kept).
    """

    heads: tuple[PartitionWriter, ...]
    store: EmbeddingStore | None = None

    def write(
        self,
        target: ChunkTarget,
        chunk: DecodedChunk | StoredChunk,
        embeddings: np.ndarray | None,
        activations: np.ndarray,
    ) -> int:
        """Write one chunk's partitions (none without frames) and embeddings; its frame count."""
        column = 0
        for head in self.heads:
            width = len(head.classes)
            head.write(
                target.name,
                target.chunk_index,
                chunk.first_frame,
                activations[:, column : column + width],
            )
            column += width
        # What came from the store is there already.
        if self.store is not None and isinstance(chunk, DecodedChunk) and target.audio_sha256:
            assert embeddings is not None
            self.store.store(
                target.audio_sha256,
                chunk.first_frame,
                embeddings,
                at_end=target.planned_frames is None or chunk.n_frames < target.planned_frames,
            )
        return chunk.n_frames


def score_chunks(
    scorer: Any,
    *chunks: DecodedChunk | StoredChunk,
    targets: Sequence[ChunkTarget],
    writer: ChunkWriter,
) -> list[tuple[int, int, str]]:
    """Task run on the scorer's worker: score the chunks Dask brought here, write their results.

    Parameters
    ----------
    scorer : actor
    *chunks : DecodedChunk or StoredChunk
    targets : sequence of ChunkTarget
        Where each chunk's results go, in the order of ``chunks``.
    writer : ChunkWriter

    Returns
    -------
    list of (first_frame, n_frames, ffmpeg messages)
        One per chunk, for the client's journal: the activations stay on the worker.
    """
    if writer.store is None:
        scored = [(None, a) for a in _call(scorer, "score", list(chunks))]
    else:
        scored = _call(scorer, "score_and_embed", list(chunks))
    return [
        (chunk.first_frame, writer.write(target, chunk, embeddings, activations), chunk.messages)
        for chunk, (embeddings, activations), target in zip(chunks, scored, targets, strict=True)
    ]


def embed_chunks(scorer: Any, *chunks: DecodedChunk) -> list[tuple[int, np.ndarray, str]]:
    """Task run on the scorer's worker: the embeddings of the chunks Dask brought here.

    Returns
    -------
    list of (first_frame, embeddings [shape=(n_frames, embedding_size)], ffmpeg messages)
    """
    embeddings = _call(scorer, "embed", list(chunks))
    return [(c.first_frame, e, c.messages) for c, e in zip(chunks, embeddings, strict=True)]


def _call(scorer: Any, method: str, chunks: list[Any]) -> list[Any]:
    """``scorer.<method>(chunks)``: in process when the actor lives on this task's worker.

    Through the actor handle, the worker would send the chunks to itself over a socket (a
    38 MB copy each way per 10-minute chunk); the task runs where the actor is unless that
    worker died, and then the handle's call fails and the chunks are re-sent.

    Either way the task leaves its worker thread while it waits: for its embedder calls
    (TensorFlow's threads, or the task before it on a GPU) that thread could decode. Through
    the handle of an actor whose worker died, Dask's call waits for the actor to be up again,
    which a lost actor never is: every :data:`LOST_SCORER_LOOK_S` the task asks the scheduler
    whether its actor is still held, and fails if not (:class:`ScorerError`).
    """
    try:
        worker = get_worker()
    except ValueError:  # not in a worker: no thread to leave, no actor in process
        worker = None
    if worker is None:
        return getattr(scorer, method)(chunks).result()
    secede()
    instance = worker.state.actors.get(scorer.key)
    if isinstance(instance, Scorer):
        return getattr(instance, method)(chunks)
    call = getattr(scorer, method)(chunks)
    while True:
        try:
            return call.result(timeout=LOST_SCORER_LOOK_S)
        except TimeoutError:
            held = sync(worker.loop, worker.scheduler.who_has, keys=[scorer.key])
            if not held.get(scorer.key):
                raise ScorerError(f"the scorer {scorer.key} was lost with its worker") from None
