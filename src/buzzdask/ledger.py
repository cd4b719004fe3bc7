"""What happened to each input file of an analysis: chunks to do and done, frames, errors.

:class:`FileLedger` turns a probed file into the chunks still to do (a resume skips those its
journal records), journals each chunk a worker scored and wrote, and reports every problem
once, per file: a file that fails does not stop the others.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from buzzdask.decode import AudioInfo, plan_chunks
from buzzdask.errors import DecodeError
from buzzdask.frames import FrameSpec
from buzzdask.inputs import InputFile
from buzzdask.pipeline import ChunkJob, chunk_label
from buzzdask.progress import Progress, logger
from buzzdask.write import OutputLayout, PartitionWriter

__all__ = ["FileLedger", "FileState", "describe"]


@dataclass
class FileState:
    """One input file's progress through an analysis."""

    input: InputFile
    info: AudioInfo | None = None
    chunks: int = 0
    chunks_done: int = 0
    frames: int = 0
    failed: bool = False


def describe(error: BaseException) -> tuple[str, str]:
    """``(reason, detail)`` of an error, for the errors table."""
    if isinstance(error, DecodeError):
        return error.reason, error.stderr
    return f"{type(error).__name__}: {error}", ""


class FileLedger:
    """Per-file bookkeeping and output of one analysis.

    Parameters
    ----------
    layout : OutputLayout
    spec : FrameSpec
    classes : sequence of str
    thresholds : mapping of class -> float
    partition_metadata : mapping
        Stored in every partition's schema.
    frames_per_chunk : int > 0
    done : mapping of (file, chunk) -> journal entry
        Chunks an earlier run finished (empty unless resuming).
    progress : Progress
    """

    def __init__(
        self,
        *,
        layout: OutputLayout,
        spec: FrameSpec,
        classes: Sequence[str],
        thresholds: Mapping[str, float],
        partition_metadata: Mapping[str, Any],
        frames_per_chunk: int,
        done: Mapping[tuple[str, int], Mapping[str, Any]],
        progress: Progress,
    ) -> None:
        self.layout = layout
        self.spec = spec
        self.classes = tuple(classes)
        self.thresholds = dict(thresholds)
        self.partition_metadata = dict(partition_metadata)
        self.frames_per_chunk = frames_per_chunk
        self.done = done
        self.progress = progress
        self.files: dict[str, FileState] = {}
        self.errors: list[dict[str, Any]] = []
        self.frames_written = 0
        self.chunks_written = 0
        self.chunks_skipped = 0

    def add(self, item: InputFile) -> FileState | None:
        """Track an input file; ``None`` when discovery already found it unusable."""
        state = self.files[item.relative] = FileState(input=item)
        if item.problem:
            self._fail(state, None, "discover", item.problem, "")
            return None
        return state

    def probed(self, state: FileState, answer: AudioInfo | BaseException) -> list[ChunkJob]:
        """The chunks of a probed file still to do (those a resume finds done are skipped)."""
        if not isinstance(answer, AudioInfo):
            self._fail(state, None, "probe", *describe(answer))
            return []
        state.info = answer
        plans = plan_chunks(answer, self.spec, frames_per_chunk=self.frames_per_chunk)
        state.chunks = len(plans)
        if answer.duration_s:
            self.progress.expect(answer.duration_s / 3600)
        relative = state.input.relative
        jobs = []
        for plan in plans:
            frames = self._frames_done(state, plan.index)
            if frames is None:
                label = chunk_label(relative, plan, self.spec)
                jobs.append(ChunkJob(relative, answer, plan, label=label, owner=state))
                continue
            self.chunks_skipped += 1
            self.progress.advance(self._hours(frames))
            state.chunks_done += 1
            state.frames += frames
        self._maybe_finished(state)
        return jobs

    def _frames_done(self, state: FileState, chunk_index: int) -> int | None:
        """Frames of a chunk an earlier run wrote (same file size and time), else ``None``."""
        assert state.info is not None
        entry = self.done.get((state.input.relative, chunk_index))
        if (
            not entry
            or entry.get("size") != state.info.size_bytes
            or entry.get("mtime_ns") != state.info.mtime_ns
        ):
            return None
        path = self.layout.partition(state.input.relative, chunk_index)
        return int(entry["frames"]) if entry["frames"] == 0 or path.exists() else None

    def writer(self) -> PartitionWriter:
        """What score tasks write partitions with, on the workers."""
        return PartitionWriter(
            output=str(self.layout.root),
            spec=self.spec,
            classes=self.classes,
            thresholds=tuple(self.thresholds.items()),
            metadata_json=json.dumps(self.partition_metadata, sort_keys=True),
        )

    @staticmethod
    def targets(jobs: list[ChunkJob]) -> list[tuple[str, int]]:
        """Where the partitions of a score task's chunks go: (input name, chunk index)."""
        return [(job.name, job.plan.index) for job in jobs]

    def scored(self, job: ChunkJob, result: tuple[int, int, str]) -> None:
        """Journal a chunk a worker scored and wrote (``result`` from ``score_chunks``)."""
        _, n_frames, messages = result
        state: FileState = job.owner
        relative = state.input.relative
        assert state.info is not None
        self.layout.record_chunk(
            relative,
            job.plan.index,
            frames=n_frames,
            size=state.info.size_bytes,
            mtime_ns=state.info.mtime_ns,
        )
        logger.info("written %s: %d frames", job.label, n_frames)
        if messages:
            self.errors.append(
                {
                    "file": relative,
                    "chunk": job.plan.index,
                    "stage": "decode",
                    "reason": "ffmpeg reported damaged audio (decoded what it could)",
                    "detail": messages,
                }
            )
        self.chunks_written += 1
        self.frames_written += n_frames
        state.chunks_done += 1
        state.frames += n_frames
        self.progress.advance(self._hours(n_frames))
        self._maybe_finished(state)

    def chunk_failed(self, job: ChunkJob, error: BaseException, stage: str) -> None:
        """A chunk could not be decoded or scored: its file is reported failed."""
        state: FileState = job.owner
        state.chunks_done += 1
        self._fail(state, job.plan.index, stage, *describe(error))
        self._maybe_finished(state)

    @property
    def files_failed(self) -> int:
        """Files with at least one problem."""
        return sum(1 for state in self.files.values() if state.failed)

    def _fail(
        self, state: FileState, chunk: int | None, stage: str, reason: str, detail: str
    ) -> None:
        state.failed = True
        where = "" if chunk is None else f" chunk {chunk}"
        logger.warning("failed: %s%s: %s", state.input.relative, where, reason)
        self.errors.append(
            {
                "file": state.input.relative,
                "chunk": chunk,
                "stage": stage,
                "reason": reason,
                "detail": detail,
            }
        )

    def _maybe_finished(self, state: FileState) -> None:
        if state.chunks_done == state.chunks and not state.failed and state.frames == 0:
            seconds = self.spec.frame_length / self.spec.sample_rate
            self._fail(state, None, "decode", f"audio shorter than one frame ({seconds:g} s)", "")

    def _hours(self, n_frames: int) -> float:
        return n_frames * self.spec.hop_length / self.spec.sample_rate / 3600
