"""What happened to each input file of an analysis: chunks to do and done, frames, errors.

:class:`FileLedger` turns a probed file into the chunks still to do (a resume skips those every
head's journal records; the embedding store serves those it holds without decoding), journals
each chunk a worker scored and wrote, once per head, and reports every problem once, per file: a
file that fails does not stop the others.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    chunks_after,
    estimated_frames,
    expected_frames,
    plan_chunks,
)
from buzzdask.errors import DecodeError
from buzzdask.frames import FrameSpec
from buzzdask.inputs import InputFile
from buzzdask.pipeline import ChunkJob, chunk_label
from buzzdask.progress import PROBLEMS_SHOWN, Progress, format_count, logger
from buzzdask.score import ChunkTarget, ChunkWriter
from buzzdask.store import STORED_CODEC, EmbeddingStore
from buzzdask.write import (
    OutputLayout,
    PartitionWriter,
    is_output_full,
    is_output_refused,
    output_full_error,
    output_refused_error,
)

__all__ = ["FileLedger", "FileState", "HeadOutput", "ProblemLines", "describe", "problem_lines"]

#: Most chunks added at once after a file's last chunk came back full (its duration estimate was
#: short). Each time, as many as the file has so far, up to this: a file far longer than its
#: estimate is not read one chunk at a time, and at most this many chunks past its real end
#: (cheap: they decode nothing) are asked for.
MOST_FOLLOW_ONS = 8
#: Codecs whose container declares the length exactly (FLAC's STREAMINFO, an MP4's moov): one
#: that decodes a frame or more shorter was cut short (or lost audio) after that was written.
DECLARED_LENGTH_CODECS = ("flac", "alac", "aac")


@dataclass
class ProblemLines:
    """The problem lines said on the console: their (file, reason) pairs, and how many."""

    said: set[tuple[str, str]] = field(default_factory=set)
    shown: int = 0


#: Problem lines shared by the analyses of one watch (its passes), where set: a file that fails
#: in every pass is said once, not once a pass; unset, each analysis says its own.
problem_lines: ContextVar[ProblemLines | None] = ContextVar("problem_lines", default=None)


@dataclass
class FileState:
    """One input file's progress through an analysis."""

    input: InputFile
    info: AudioInfo | None = None
    chunks: int = 0
    chunks_done: int = 0
    frames: int = 0
    failed: bool = False
    #: Chunks that came back short of their plan, with (frames, planned frames).
    short_chunks: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: The last chunk that gave frames (-1: none yet).
    last_chunk_with_frames: int = -1


@dataclass(frozen=True)
class HeadOutput:
    """Where one head's results go: its output directory and partition writer.

    Parameters
    ----------
    layout : OutputLayout
    writer : PartitionWriter
    done : mapping of (file, chunk) -> journal entry
        Chunks an earlier run finished and a resume verified (empty unless resuming).
    """

    layout: OutputLayout
    writer: PartitionWriter
    done: Mapping[tuple[str, int], Mapping[str, Any]]


def describe(error: BaseException) -> tuple[str, str]:
    """``(reason, detail)`` of an error, for the errors table."""
    if isinstance(error, DecodeError):
        return error.reason, error.stderr
    return f"{type(error).__name__}: {error}", ""


class FileLedger:
    """Per-file bookkeeping and output of one analysis.

    Parameters
    ----------
    heads : sequence of HeadOutput
        One per head, in the order the scorers give their activations.
    spec : FrameSpec
    frames_per_chunk : int > 0
    progress : Progress
    store : EmbeddingStore, optional
        Where embeddings are kept; chunks it holds whole are read from it, not decoded.
    exact_plans : bool
        Whether the chunk plans given are the files' real ones (a re-scoring's, from the
        store's catalog): no chunks are added past the last.
    """

    def __init__(
        self,
        *,
        heads: Sequence[HeadOutput],
        spec: FrameSpec,
        frames_per_chunk: int,
        progress: Progress,
        store: EmbeddingStore | None = None,
        exact_plans: bool = False,
    ) -> None:
        self.heads = tuple(heads)
        self.layout = self.heads[0].layout
        self.spec = spec
        self.frames_per_chunk = frames_per_chunk
        self.store = store
        self.exact_plans = exact_plans
        self.progress = progress
        self.files: dict[str, FileState] = {}
        self.errors: list[dict[str, Any]] = []
        self._problems = problem_lines.get() or ProblemLines()
        self.frames_written = 0
        self.chunks_written = 0
        self.chunks_skipped = 0
        self.chunks_from_store = 0

    def add(self, item: InputFile) -> FileState | None:
        """Track an input file; ``None`` when discovery already found it unusable."""
        state = self.files[item.relative] = FileState(input=item)
        if item.problem:
            self._fail(state, None, "discover", item.problem, "")
            self.progress.finished(item.relative, failed=True)
            return None
        return state

    def probed(self, state: FileState, answer: AudioInfo | BaseException) -> list[ChunkJob]:
        """The chunks of a probed file still to do (those a resume finds done are skipped)."""
        relative = state.input.relative
        if not isinstance(answer, AudioInfo):
            self._fail(state, None, "probe", *describe(answer))
            self.progress.finished(relative, failed=True)
            return []
        cut = _cut_short(answer)
        if cut and (answer.duration_s or 0.0) >= self.spec.frame_length_s:
            # Kept, as damaged audio is: the frames it holds are real; the row says what is not.
            # (Less than a frame fails below, and says it was cut.)
            reason = f"{cut} (analysed what it holds)"
            self._row(relative, None, "probe", reason, "", kept=True, line=f"{relative}: {reason}")
        return self.planned(
            state, answer, plan_chunks(answer, self.spec, frames_per_chunk=self.frames_per_chunk)
        )

    def planned(
        self, state: FileState, info: AudioInfo, plans: Sequence[ChunkPlan]
    ) -> list[ChunkJob]:
        """The chunks of ``plans`` still to do, for a file whose parameters are ``info``."""
        relative = state.input.relative
        state.info = info
        state.chunks = len(plans)
        self.progress.expect(relative, info.duration_s or 0.0)
        jobs = [job for plan in plans if (job := self._job(state, plan)) is not None]
        # An earlier run may have found audio past the estimate: the chunks it added follow.
        jobs += self._follow_ons(state, plans[-1], self._frames_done(state, plans[-1].index))
        self._maybe_finished(state)
        return jobs

    def _job(self, state: FileState, plan: ChunkPlan) -> ChunkJob | None:
        """The chunk to decode, or ``None`` when an earlier run wrote it (counted done here)."""
        assert state.info is not None
        relative = state.input.relative
        frames = self._frames_done(state, plan.index)
        if frames is None:
            label = chunk_label(relative, plan, self.spec, duration_s=state.info.duration_s)
            job = ChunkJob(
                relative,
                state.info,
                plan,
                label=label,
                owner=state,
                expected_frames=expected_frames(state.info, plan, self.spec),
            )
            sha256 = state.info.sha256
            if self.store is not None and sha256 is not None:
                stored = self.store.frames_of(
                    sha256, plan.first_frame, plan.n_frames or self.frames_per_chunk
                )
                if stored is not None:
                    job.stored = self.store.ref(sha256, plan.first_frame, plan.n_frames)
            return job
        # Damaged audio an earlier run wrote still is: its row goes in this run's table too.
        damaged = self.heads[0].done[(relative, plan.index)].get("damaged")
        if damaged:
            label = chunk_label(relative, plan, self.spec, duration_s=state.info.duration_s)
            self._damaged(relative, plan.index, label, damaged)
        self.chunks_skipped += 1
        self.progress.advance(relative, self._seconds(frames), resumed=True)
        _note_frames(state, plan, frames)  # a gap it left is this run's row too
        state.chunks_done += 1
        state.frames += frames
        return None

    def _follow_ons(
        self, state: FileState, plan: ChunkPlan, n_frames: int | None
    ) -> list[ChunkJob]:
        """The chunks after ``plan`` when it is the file's last so far and came back full.

        The duration estimate was short (an MP3 without a Xing header): the audio may go on.
        ``n_frames`` is what ``plan`` came back with (``None``: not back yet). Chunks an earlier
        run wrote are skipped; when the last of those is full too, more follow.
        """
        assert state.info is not None
        jobs: list[ChunkJob] = []
        while not self.exact_plans and n_frames is not None and plan.index == state.chunks - 1:
            more = chunks_after(
                plan,
                n_frames,
                frames_per_chunk=self.frames_per_chunk,
                count=min(state.chunks, MOST_FOLLOW_ONS),
            )
            if not more:
                break
            state.chunks += len(more)
            # Up to the end of the chunks queued (those past the audio come back empty and the
            # total shrinks then): not their first, which held the bar at 100 % for hours of a
            # day-long file estimated at a few.
            reached = self._seconds(more[-1].first_frame + (more[-1].n_frames or 0))
            logger.info(
                "%s goes on past its estimated duration (%.1f s): %d more chunks",
                state.input.relative,
                state.info.duration_s or 0.0,
                len(more),
            )
            self.progress.expect(state.input.relative, max(state.info.duration_s or 0.0, reached))
            jobs += [job for follow in more if (job := self._job(state, follow)) is not None]
            plan = more[-1]
            n_frames = self._frames_done(state, plan.index)
        return jobs

    def _frames_done(self, state: FileState, chunk_index: int) -> int | None:
        """Frames of a chunk an earlier run wrote for every head, else ``None``.

        ``done`` holds only verified chunks (:func:`buzzdask.resume.check_resume`); the file
        is compared once more, as probed, in case it changed since. A chunk some head lacks
        (one added to the run) is scored again for all.
        """
        assert state.info is not None
        key = (state.input.relative, chunk_index)
        frames = set()
        for head in self.heads:
            entry = head.done.get(key)
            if (
                not entry
                or entry.get("size") != state.info.size_bytes
                or entry.get("mtime_ns") != state.info.mtime_ns
            ):
                return None
            frames.add(int(entry["frames"]))
        return frames.pop() if len(frames) == 1 else None

    def writer(self) -> ChunkWriter:
        """What score tasks write partitions (and kept embeddings) with, on the workers."""
        return ChunkWriter(heads=tuple(head.writer for head in self.heads), store=self.store)

    @staticmethod
    def targets(jobs: list[ChunkJob]) -> list[ChunkTarget]:
        """Where the results of a score task's chunks go."""
        return [
            ChunkTarget(job.name, job.plan.index, job.info.sha256, job.plan.n_frames)
            for job in jobs
        ]

    def scored(self, job: ChunkJob, result: tuple[int, int, str]) -> list[ChunkJob]:
        """Journal a chunk a worker scored and wrote (``result`` from ``score_chunks``).

        Returns
        -------
        list of ChunkJob
            Chunks to decode after it: the file's last chunk came back full, so its audio may
            go on past the estimated duration (empty almost always).
        """
        _, n_frames, messages = result
        state: FileState = job.owner
        relative = state.input.relative
        assert state.info is not None
        # The audio ended in it (it came back short of its plan), or a re-scoring's catalog
        # says it is the file's last: what tells an export that the file is whole.
        plan = job.plan
        ends = plan.n_frames is None or n_frames != plan.n_frames
        _note_frames(state, plan, n_frames)
        for head in self.heads:
            head.layout.record_chunk(
                relative,
                plan.index,
                frames=n_frames,
                size=state.info.size_bytes,
                mtime_ns=state.info.mtime_ns,
                ends=ends
                or (self.exact_plans and not state.failed and plan.index == state.chunks - 1),
                damaged=messages,
            )
        # A re-scoring's chunks came from the catalog: it reads the store, never adds to it.
        sha256 = state.info.sha256
        if self.store is not None and sha256 is not None and state.info.codec != STORED_CODEC:
            self.store.record(
                [
                    {
                        "file": relative,
                        "path": state.input.path,
                        "sha256": sha256,
                        "size": state.info.size_bytes,
                        "mtime_ns": state.info.mtime_ns,
                        "duration_s": state.info.duration_s,
                        "chunk": job.plan.index,
                        "first_frame": job.plan.first_frame,
                        "frames": n_frames,
                        "frames_per_chunk": self.frames_per_chunk,
                    }
                ]
            )
        if n_frames:
            logger.info("written %s: %s", job.label, format_count(n_frames, "frame"))
        else:  # no partition: "written ...: 0 frames" read as if one were
            logger.info("no whole frame in %s: nothing written", job.label)
        if messages:
            self._damaged(relative, job.plan.index, job.label, messages)
        self.chunks_written += 1
        self.chunks_from_store += job.stored is not None
        self.frames_written += n_frames
        more = self._follow_ons(state, job.plan, n_frames)  # before the file can count as done
        state.chunks_done += 1
        state.frames += n_frames
        self.progress.advance(relative, self._seconds(n_frames), scorer=job.scorer, frames=n_frames)
        self._maybe_finished(state)
        return more

    def file_failed(self, state: FileState, stage: str, reason: str) -> None:
        """Report a whole file's problem that does not stop its chunks: the file is failed.

        A re-scoring's store that lacks some of its chunks, for instance.
        """
        self._fail(state, None, stage, reason, "")

    def chunk_failed(self, job: ChunkJob, error: BaseException, stage: str) -> None:
        """A chunk could not be decoded or scored: its file is reported failed.

        Unless its partition could not be written for a full output: that stops the run
        (:meth:`stops_when_output_full`), every later chunk would fail the same way. (A full
        node-local disk while decoding, staging or caching a copy, fails only its file.)
        """
        if stage == "score" and (
            is_output_full(error) or is_output_refused(error, self.layout.root)
        ):
            raise error  # the output's problem, not the file's: stops the run
        state: FileState = job.owner
        state.chunks_done += 1
        self._fail(state, job.plan.index, stage, *describe(error))
        self._maybe_finished(state)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Chunks :meth:`scored` in the block go into each head's journal together, as it ends.

        The pipeline records one score task's chunks in one block
        (:meth:`buzzdask.write.OutputLayout.journal_held`).
        """
        with ExitStack() as held:
            for head in self.heads:
                held.enter_context(head.layout.journal_held())
            yield

    @contextmanager
    def stops_when_output_full(self) -> Iterator[None]:
        """Turn a full output, or a write refused there, into the error that stops the run.

        :class:`~buzzdask.errors.OutputFullError` (the space still needed) and
        :class:`~buzzdask.errors.OutputPermissionError` (the file, its owner), raised by a worker
        writing a partition, or here writing the journal or metadata: each names the output and
        how to go on.
        """
        try:
            yield
        except OSError as error:
            if is_output_refused(error, self.layout.root):
                raise output_refused_error(self.layout.root, error) from error
            if not is_output_full(error):
                raise
            raise output_full_error(
                self.layout,
                error,
                audio_done_s=self.progress.audio_done_s,
                audio_left_s=self.progress.audio_left_s,
            ) from error

    @property
    def files_failed(self) -> int:
        """Files with at least one problem."""
        return sum(1 for state in self.files.values() if state.failed)

    def _fail(
        self, state: FileState, chunk: int | None, stage: str, reason: str, detail: str
    ) -> None:
        state.failed = True
        relative = state.input.relative
        where = "" if chunk is None else f" chunk {chunk}"
        self.progress.error(relative, reason)
        line = f"failed: {relative}{where}: {reason}"
        self._row(relative, chunk, stage, reason, detail, kept=False, line=line)

    def _damaged(self, relative: str, chunk: int, label: str, messages: str) -> None:
        """A chunk ffmpeg decoded but reported damage in: its frames are kept, with a row."""
        damaged = "ffmpeg reported damaged audio (decoded what it could)"
        line = f"{label}: {damaged}"
        self._row(relative, chunk, "decode", damaged, messages, kept=True, line=line)

    def _row(
        self,
        file: str,
        chunk: int | None,
        stage: str,
        reason: str,
        detail: str,
        *,
        kept: bool,
        line: str,
    ) -> None:
        """A row of the errors table (:data:`buzzdask.write.ERROR_COLUMNS`), and its ``line``.

        ``kept``: the frames were written all the same (damaged audio, a file cut short). The
        first :data:`~buzzdask.progress.PROBLEMS_SHOWN` lines are warnings, on the console as
        they happen; the others go to the run's log only (INFO), so that a folder of ten
        thousand bad files does not bury the console. So does the line of another chunk of a
        file that a shown line gave the same reason for (a file deleted mid-run). A kept row's
        line starts ``warning:``, as its line when the run ends does (a failed one's ``failed:``).
        """
        if kept:
            line = f"warning: {line}"
        problems = self._problems
        if (file, reason) in problems.said:
            logger.info("%s", line)
        elif problems.shown < PROBLEMS_SHOWN:
            problems.shown += 1
            problems.said.add((file, reason))
            logger.warning("%s", line)
        else:
            if problems.shown == PROBLEMS_SHOWN:
                problems.shown += 1
                logger.warning(
                    "more than %d problems: the others go to the run's log (buzzdask.log) as "
                    "they happen, not here; errors.parquet lists every one when the run ends",
                    PROBLEMS_SHOWN,
                )
            logger.info("%s", line)
        self.errors.append(
            {
                "file": file,
                "chunk": chunk,
                "stage": stage,
                "reason": reason,
                "detail": detail,
                "kept": kept,
            }
        )

    def _maybe_finished(self, state: FileState) -> None:
        if state.chunks_done < state.chunks:
            return
        if not state.failed and state.frames == 0:
            seconds = self.spec.frame_length_s
            cut = _cut_short(state.info) if state.info is not None else ""
            # How short, as probed: a 0.95-s file is not an empty one.
            length = state.info.duration_s if state.info is not None else None
            if length and length >= seconds and not cut:
                # Probed long enough, decoded to less: damage, a misread header, or an estimate
                # (an MP3 without its header's length) too long. Not "1.5 s, shorter than 0.96".
                reason = (
                    f"decoded to less than one frame ({seconds:g} s), though probed as "
                    f"{length:.2f} s of audio"
                )
            else:
                # In whole ms, rounded down: 0.96 s less a sample reads 0.959 s, not 0.96 s.
                held = (
                    f"{math.floor(length * 1000) / 1000:g} s of audio, "
                    if length and not cut
                    else "audio "
                )
                reason = f"{held}shorter than one frame ({seconds:g} s)" + (
                    f"; {cut}" if cut else ""
                )
            self._fail(state, None, "decode", reason, "")
        elif not state.failed and state.info is not None:
            self._check_gaps(state)
            self._check_decoded_length(state, state.info)
        self.progress.finished(state.input.relative, failed=state.failed)

    def _check_gaps(self, state: FileState) -> None:
        """A row per chunk that came back short while audio after it decoded.

        Not the end of the audio, then, but damage inside it that the decoder dropped (a FLAC's,
        of which ffmpeg says nothing): that chunk's frames after the damage sit early.
        """
        relative = state.input.relative
        for index, (frames, planned) in sorted(state.short_chunks.items()):
            if index >= state.last_chunk_with_frames:
                continue
            reason = (
                f"decoded short inside the file: chunk {index} gave {frames} of its {planned} "
                "frames while audio after it decoded (damaged audio the decoder dropped: its "
                f"frames after the damage sit up to {self._seconds(planned - frames):.2f} s "
                "early; analysed what it holds)"
            )
            self._row(
                relative, index, "decode", reason, "", kept=True, line=f"{relative}: {reason}"
            )

    def _check_decoded_length(self, state: FileState, info: AudioInfo) -> None:
        """A row for a file whose container declares more audio than it decoded to."""
        declared = estimated_frames(info, self.spec)
        # A container's length (the longest stream's) says nothing of this stream's end.
        of_the_stream = info.codec in DECLARED_LENGTH_CODECS and info.duration_is_the_streams
        if not of_the_stream or declared is None:
            return
        # A frame of slack: encoders' priming and padding samples (AAC: up to 2112).
        if state.frames + 1 >= declared:
            return
        relative = state.input.relative
        reason = (
            f"decoded short: its header declares {info.duration_s or 0.0:.1f} s, decoding gave "
            f"{state.frames} frames ({self._seconds(state.frames):.1f} s; cut short or damaged; "
            "analysed what it holds)"
        )
        self._row(relative, None, "decode", reason, "", kept=True, line=f"{relative}: {reason}")

    def _seconds(self, n_frames: int) -> float:
        return n_frames * self.spec.hop_length / self.spec.sample_rate


def _note_frames(state: FileState, plan: ChunkPlan, n_frames: int) -> None:
    """Keep what :meth:`FileLedger._check_gaps` needs of a chunk that came back (or was written)."""
    if plan.n_frames is not None and n_frames < plan.n_frames:
        state.short_chunks[plan.index] = (n_frames, plan.n_frames)
    if n_frames:
        state.last_chunk_with_frames = max(state.last_chunk_with_frames, plan.index)


def _cut_short(info: AudioInfo) -> str:
    """What a file cut short holds against what its header declares; ``""`` for a whole one."""
    if info.declared_duration_s is None:
        return ""
    declared, held = info.declared_duration_s, info.duration_s or 0.0
    # Tenths, or as many more decimals as tell the two apart (39.79 of 39.8 s, not 39.8 of 39.8).
    decimals = next((d for d in (1, 2, 3) if f"{declared:.{d}f}" != f"{held:.{d}f}"), 6)
    return (
        f"cut short: its header declares {declared:.{decimals}f} s, "
        f"the file holds {held:.{decimals}f} s"
    )
