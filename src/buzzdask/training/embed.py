"""Training's work on the cluster: probe and hash the files, embed the frames the cache lacks.

The frames are embedded exactly as an analysis embeds them, by the same chunk loop
(:mod:`buzzdask.pipeline`): :func:`~buzzdask.decode.decode_chunk` tasks on the CPU workers and a
:class:`~buzzdask.score.Scorer` actor (started without a head) on the scoring worker. Each
embedded chunk goes straight into the :class:`~buzzdask.store.EmbeddingStore`, so a
failed run keeps what it embedded.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from distributed import Client

from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    decode_chunk,
    estimated_frames,
    expected_frames,
    probe_audio,
)
from buzzdask.errors import BuzzdaskError, DecodeError, InputError, ScorerError, without_chain
from buzzdask.ffmpeg_tools import FFmpegTools
from buzzdask.frames import FrameSpec
from buzzdask.models import EmbedderSpec
from buzzdask.pipeline import ChunkJob, ChunkPipeline, chunk_label
from buzzdask.progress import format_count, logger
from buzzdask.score import embed_chunks
from buzzdask.scorers import ScorerPool
from buzzdask.session import task_key
from buzzdask.settings import Settings
from buzzdask.store import EmbeddingStore, file_sha256
from buzzdask.training.labels import TrainingFile, cite_rows

__all__ = ["embed_missing", "inspect_files"]


def _inspect(path: str, *, tools: FFmpegTools) -> tuple[AudioInfo, str] | DecodeError:
    """Probe task: the file's audio parameters and content hash (a bad file is an answer)."""
    try:
        return probe_audio(path, tools=tools), file_sha256(path)
    except DecodeError as error:
        return without_chain(error)


def inspect_files(client: Client, files: list[TrainingFile], *, tools: FFmpegTools) -> None:
    """Probe and hash every file on the cluster; set each file's ``info`` and ``sha256``.

    A file of an ambient folder that no label names and that cannot be read is taken out of
    ``files``, with a warning naming it: a folder of everything ambient holds what it holds.

    Raises
    ------
    InputError
        Naming every labelled file that cannot be probed or gives no duration estimate (and
        its label rows).
    """
    futures = [
        client.submit(
            _inspect,
            f.path,
            tools=tools,
            key=task_key("inspect"),
            pure=False,
        )
        for f in files
    ]
    unreadable: list[str] = []
    skipped: list[str] = []
    for item, answer in zip(files, client.gather(futures), strict=True):
        if isinstance(answer, DecodeError):
            problem = answer.reason
        elif answer[0].duration_s is None:
            problem = "no duration estimate (the file gives none)"
        else:
            item.info, item.sha256 = answer
            continue
        if item.all_ambient and not len(item.segments):
            skipped.append(f"{item.path}: {problem}")  # its name is relative to one of several
        else:
            where = f" ({cite_rows(item.segments)})" if len(item.segments) else ""
            unreadable.append(f"{item.name}: {problem}{where}")
    if unreadable:
        raise InputError(f"cannot train on unreadable audio: {'; '.join(unreadable)}")
    if skipped:
        logger.warning(
            "%s of the ambient folders cannot be read, left out: %s",
            format_count(len(skipped), "file"),
            "; ".join(skipped),
        )
        files[:] = [item for item in files if item.info is not None]


def embed_missing(
    client: Client,
    files: list[TrainingFile],
    cache: EmbeddingStore,
    *,
    embedder: EmbedderSpec,
    spec: FrameSpec,
    frames_per_chunk: int,
    settings: Settings,
) -> dict[str, int]:
    """Embed the wanted frames the cache lacks into the cache.

    The chunk loop and the scorer actors are an analysis' own (:mod:`buzzdask.pipeline`,
    :mod:`buzzdask.scorers`), with actors started without a head.

    Parameters
    ----------
    client : distributed.Client
    files : list of TrainingFile
        Probed, with their wanted frames set.
    cache : EmbeddingStore
    embedder : EmbedderSpec
    spec : FrameSpec
        The embedder's frame geometry.
    frames_per_chunk : int > 0
        Most frames per decode task.
    settings : Settings
        The memory budget, batch size, decoding and scorer settings.

    Returns
    -------
    dict
        ``frames_cached`` (wanted frames found in the cache), ``frames_embedded``,
        ``embedder_calls``.

    Raises
    ------
    DecodeError, ModelError
        From a chunk that cannot be decoded or an embedder that cannot be loaded.
    ScorerError
        For any other failure to embed.
    """
    jobs, frames_cached = _missing_chunks(
        files, cache, spec=spec, frames_per_chunk=frames_per_chunk
    )
    stats = {"frames_cached": frames_cached, "frames_embedded": 0, "embedder_calls": 0}
    if not jobs:
        return stats
    logger.info("embedding %d chunks of %d files", len(jobs), len({j.name for j in jobs}))
    pool = ScorerPool.from_settings(
        client,
        settings,
        head_path=None,
        embedder_handle=embedder.handle,
        spec=spec,
        n_classes=0,
        key_prefix="embedder",
        cpu_scorer_workers=1,  # one embedder; the other workers decode
    )
    pool.start()
    pipeline = ChunkPipeline.from_settings(
        client,
        pool,
        settings,
        spec=spec,
        frames_per_chunk=frames_per_chunk,
        decode=decode_chunk,
        score=embed_chunks,
        score_prefix="embed",
        on_result=functools.partial(_store, cache, stats),
        on_failure=_failed,
    )
    for job in jobs:
        pipeline.enqueue(job)
    pipeline.run()
    stats["embedder_calls"] = sum(int(s.get("embedder_calls", 0)) for s in pool.stats())
    return stats


def _missing_chunks(
    files: list[TrainingFile], cache: EmbeddingStore, *, spec: FrameSpec, frames_per_chunk: int
) -> tuple[list[ChunkJob], int]:
    """The chunks to decode for the wanted frames the cache lacks, and how many it holds."""
    jobs: list[ChunkJob] = []
    frames_cached = 0
    for item in files:
        cached = cache.load(item.sha256)
        missing = cached.missing(item.frames)
        frames_cached += int(np.isin(item.frames, cached.frames).sum())
        if len(missing):
            assert item.info is not None and item.info.duration_s is not None
            plans = _chunk_plans(
                missing,
                n_estimated=estimated_frames(item.info, spec) or 0,
                frames_per_chunk=frames_per_chunk,
                spec=spec,
            )
            jobs.extend(
                ChunkJob(
                    item.path,
                    item.info,
                    plan,
                    chunk_label(item.name, plan, spec),
                    item,
                    expected_frames=expected_frames(item.info, plan, spec),
                )
                for plan in plans
            )
    return jobs, frames_cached


def _chunk_plans(
    missing: np.ndarray, *, n_estimated: int, frames_per_chunk: int, spec: FrameSpec
) -> list[ChunkPlan]:
    """Decode tasks covering ``missing`` frames: runs (small gaps bridged), cut into chunks.

    A run reaching the estimated last frame ends in an open chunk (``n_frames=None``), which
    decodes to the real end of the file: the probed duration is only an estimate.
    """
    gap = max(1, spec.frame_length // spec.hop_length)  # bridged: cheaper than a new ffmpeg
    breaks = np.flatnonzero(np.diff(missing) > gap + 1) + 1
    plans: list[ChunkPlan] = []
    for run in np.split(missing, breaks):
        first, last = int(run[0]), int(run[-1])
        for start in range(first, last + 1, frames_per_chunk):
            n_frames = min(frames_per_chunk, last + 1 - start)
            is_open = start + n_frames >= n_estimated
            plans.append(ChunkPlan(len(plans), start, None if is_open else n_frames))
    return plans


def _store(cache: EmbeddingStore, stats: dict[str, int], job: ChunkJob, result: Any) -> None:
    """Write one embedded chunk into the cache (``result`` from :func:`embed_chunks`)."""
    first_frame, embeddings, messages = result
    item: TrainingFile = job.owner
    if messages:
        logger.warning("%s: ffmpeg reported damaged audio: %s", item.name, messages)
    reached_end = job.plan.n_frames is None or len(embeddings) < job.plan.n_frames
    cache.store(item.sha256, first_frame, embeddings, at_end=reached_end)
    stats["frames_embedded"] += len(embeddings)


def _failed(job: ChunkJob, error: BaseException, stage: str) -> None:
    """Training needs every wanted frame: the first chunk that fails ends it."""
    if isinstance(error, BuzzdaskError):  # DecodeError names the file; ModelError the embedder
        raise error
    raise ScorerError(f"embedding failed: {type(error).__name__}: {error}") from error
