"""``analyze()``: score every frame of the audio under some paths and write partitioned Parquet.

Probe and decode tasks run on CPU workers, score tasks beside the scorer actors
(:mod:`buzzdask.scorers`), driven by the chunk loop of :mod:`buzzdask.pipeline`; each scored
chunk becomes one Parquet partition (:mod:`buzzdask.ledger`, :mod:`buzzdask.write`). This
module checks everything before any work starts and records what the run was: the fingerprint
a resume must match, the metadata and the summary.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from distributed import Client

from buzzdask.dashboard_page import RunPublisher
from buzzdask.decode import PREPROCESSING, AudioInfo, decode_chunk, probe_audio
from buzzdask.errors import DecodeError
from buzzdask.ffmpeg_tools import FFmpegTools, find_ffmpeg
from buzzdask.frames import FrameSpec
from buzzdask.inputs import InputFile, describe_skipped, scan
from buzzdask.ledger import FileLedger, FileState
from buzzdask.lock import OutputLock, refuse_if_in_use
from buzzdask.logs import quiet_environment, run_log
from buzzdask.models import ModelSpec, resolve_model
from buzzdask.pipeline import ChunkPipeline, outcome
from buzzdask.progress import Progress
from buzzdask.results import read_frames
from buzzdask.resume import ResumeCheck, check_resume
from buzzdask.score import score_chunks
from buzzdask.scorers import ScorerPool
from buzzdask.session import connect, package_versions, task_key
from buzzdask.settings import Settings, load_settings
from buzzdask.staging import decode_chunk_staged
from buzzdask.thresholds import ThresholdChoice, choose_thresholds
from buzzdask.write import (
    ERROR_COLUMNS,
    OnConflict,
    prepare_output,
    utc_now,
    write_errors,
    write_json,
)

__all__ = ["AnalysisResult", "analyze"]

logger = logging.getLogger(__name__)
_Item = TypeVar("_Item")

#: Most files one probe task reads: a WAV's header takes microseconds, an ffprobe 0.05 CPU-s.
PROBES_PER_TASK = 32


@dataclass
class AnalysisResult:
    """Handle on an analysis' output.

    Attributes
    ----------
    output : Path
        The output directory.
    dataset : Path
        The partitioned Parquet dataset (``output / "scores"``).
    summary : dict
        Files done and failed, audio hours, wall time, realtime factor, peak memory per worker.
    errors : pandas.DataFrame
        One row per problem (columns file, chunk, stage, reason, detail).
    metadata : dict
        The run metadata written to ``buzzdask.json``.
    """

    output: Path
    dataset: Path
    summary: dict[str, Any]
    errors: pd.DataFrame
    metadata: dict[str, Any] = field(repr=False)

    @property
    def ok(self) -> bool:
        """True when every file was analysed without error."""
        return self.errors.empty

    def to_pandas(self) -> pd.DataFrame:
        """All frames, sorted by file and start."""
        # No hive partitioning: an input folder named "site=A" is a name, not a column.
        frame = pd.read_parquet(self.dataset, partitioning=None)
        return frame.sort_values(["file", "start"], ignore_index=True)

    def to_dask(self) -> Any:
        """All frames as a dask DataFrame (one partition per chunk file)."""
        return read_frames(self.dataset)


@dataclass(frozen=True)
class _Plan:
    """Everything an analysis was asked to do, checked before any work starts."""

    model: ModelSpec
    spec: FrameSpec
    frames_per_chunk: int
    thresholds: ThresholdChoice
    settings: Settings
    ffmpeg: FFmpegTools


def analyze(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    client: Client | str | None = None,
    embedder: str | None = None,
    frame_hop_s: float | None = None,
    chunk_seconds: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    precision: float | None = None,
    on_conflict: OnConflict = "error",
    memory_budget: int | str | None = None,
    batch_frames: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> AnalysisResult:
    """Score every frame of the audio under ``paths`` and write partitioned Parquet.

    Parameters
    ----------
    paths : path-like or sequence of path-like
        Audio files and directories (walked recursively for known extensions).
    model : str or path-like
        A buzzdetect model directory, or its name in ``buzzdask.model-dirs``.
    output : path-like
        Output directory (see :mod:`buzzdask.write` for its layout).
    client : distributed.Client or str, optional
        The cluster to use (a client or a scheduler address). Default: a local cluster of
        worker processes, started and closed here.
    embedder : str, optional
        Embedder handle (TF Hub URL or local SavedModel directory) overriding the configured one.
    frame_hop_s : float > 0 [s], optional
        Distance between frame starts; default one whole frame (0.96 s for YAMNet).
        ``start[i] = i * frame_hop_s``.
    chunk_seconds : float > 0 [s], optional
        Audio per decode task, rounded down to whole hops. Results do not depend on it.
    thresholds : mapping of class -> float, optional
        Adds ``detection_<class>`` columns: ``activation > threshold``, as buzzdetect and buzzr.
    precision : float in (0, 1), optional
        Instead of ``thresholds``: the thresholds the model's ``tests/metrics.csv`` gives for
        this precision, as buzzdetect computes them (:func:`buzzdask.thresholds_for_precision`).
    on_conflict : {"error", "resume", "new"}, default: "error"
        When ``output`` already holds results: refuse, finish that run (skipping every chunk it
        completed), or write into a new timestamped sibling directory.
    memory_budget : int or str, optional
        Most decoded audio in flight, in bytes or as ``"1GiB"``.
    batch_frames : int > 0, optional
        Most frames per embedder call.
    progress : bool, default: True
        Show a progress bar of audio hours.
    verbose : bool, default: False
        Log "decoding <file> [start–end]" and "scoring <file> [start–end]" per chunk.

    Returns
    -------
    AnalysisResult

    Raises
    ------
    InputError, ModelError, ParameterError, OutputConflictError
        Before any result is written, for a missing input, an unusable model, a bad option or an
        output that already holds results.

    See Also
    --------
    buzzdask.watch : the same, on a directory files are still arriving in.

    Notes
    -----
    A file that cannot be read (corrupt, empty, not audio, shorter than one frame) does not stop
    the run: it is reported in ``result.errors`` and ``errors.parquet``, and every other file
    finishes. The last frame of a file, if it would overrun the end, is dropped, never padded.
    """
    started_wall = time.perf_counter()
    quiet_environment()  # before the model's check loads TensorFlow here
    settings = load_settings(
        chunk_seconds=chunk_seconds, memory_budget=memory_budget, batch_frames=batch_frames
    )
    # Inputs first: a mistyped or empty folder is reported in a second, before any model loads.
    found = scan(paths, extensions=settings.extensions)
    found.require_audio()
    if found.visible_skipped:  # hidden names (.DS_Store, a watch's marker) are not news
        logger.warning(
            "not audio under %s: %s", found.root, describe_skipped(found.visible_skipped)
        )
    root, inputs = found.root, found.files
    plan = _plan(
        model,
        settings,
        embedder=embedder,
        frame_hop_s=frame_hop_s,
        thresholds=thresholds,
        precision=precision,
    )
    fingerprint = _fingerprint(plan)
    if on_conflict != "new":  # a new run goes elsewhere when another holds the output
        refuse_if_in_use(Path(output), stale_s=settings.lock_stale_seconds)
    layout = prepare_output(
        output, on_conflict=on_conflict, fingerprint=fingerprint, options=_options(plan)
    )
    metadata = _metadata(plan, paths=paths, root=root, n_files=len(inputs))
    with (
        OutputLock(layout.root, started=metadata["started"], stale_s=settings.lock_stale_seconds),
        connect(client, local=settings.local_cluster) as connected,
        run_log(layout.log, connected, verbose=verbose),
    ):
        resumed = (
            check_resume(layout, fingerprint=fingerprint, input_root=root)
            if on_conflict == "resume"
            else ResumeCheck()
        )
        ledger = FileLedger(
            layout=layout,
            spec=plan.spec,
            classes=plan.model.classes,
            thresholds=plan.thresholds.values,
            partition_metadata={
                k: metadata[k]
                for k in ("model", "embedder", "preprocessing", "fingerprint", "started")
            },
            frames_per_chunk=plan.frames_per_chunk,
            done=resumed.done,
            progress=Progress(
                enabled=progress,
                verbose=verbose,
                files=len(inputs),
                publish=RunPublisher(
                    connected,
                    {
                        "output": str(layout.root),
                        "model": plan.model.name,
                        "host": platform.node(),
                    },
                ),
            ),
        )
        # buzzdask.json once a scorer has loaded the model: a run that cannot start leaves
        # nothing but its log in the output.
        started = functools.partial(write_json, layout.metadata, metadata)
        with ledger.stops_when_output_full():
            pool, pipeline = _run(
                connected,
                plan,
                ledger,
                inputs,
                on_scorer_ready=started,
                # The local cluster started here has its own (a laptop holds one model).
                scorer_workers=(
                    settings.local_cluster.scorers
                    if client is None
                    else settings.cpu_scorer_workers
                ),
            )
        metadata["versions"]["tensorflow"] = pool.tensorflow_version
        run_stats = {
            "peak_rss_bytes": _peak_rss(connected),
            "peak_decoded_bytes_in_flight": pipeline.budget.peak_bytes,
            "chunks_resent": pipeline.resent,
            "scorers": pool.stats(),
            "scorer_restarts": pool.restarts,
            "scorers_lost": pool.lost,
            "resume": resumed.as_summary(),
        }
    summary = _summary(
        ledger,
        plan,
        n_files=len(inputs),
        n_skipped=len(found.visible_skipped),
        wall=time.perf_counter() - started_wall,
        **run_stats,
    )
    metadata.update(status="complete", finished=utc_now(), summary=summary)
    with ledger.stops_when_output_full():
        write_errors(layout.errors, ledger.errors)
        write_json(layout.metadata, metadata)
    return AnalysisResult(
        output=layout.root,
        dataset=layout.scores,
        summary=summary,
        errors=pd.DataFrame(ledger.errors, columns=ERROR_COLUMNS),
        metadata=metadata,
    )


def _plan(
    model: str | os.PathLike[str],
    settings: Settings,
    *,
    embedder: str | None,
    frame_hop_s: float | None,
    thresholds: Mapping[str, float] | None,
    precision: float | None,
) -> _Plan:
    """Resolve the model and frame geometry and check the thresholds (or the precision's)."""
    spec_model = resolve_model(model, embedder=embedder, settings=settings)
    spec = spec_model.embedder.frame_spec(frame_hop_s)
    choice = choose_thresholds(
        model_dir=spec_model.path,
        classes=spec_model.classes,
        precision=precision,
        thresholds=thresholds,
    )
    ffmpeg = find_ffmpeg(ffmpeg=settings.ffmpeg, ffprobe=settings.ffprobe)
    return _Plan(
        model=spec_model,
        spec=spec,
        frames_per_chunk=spec.frames_per_chunk(settings.chunk_seconds),
        thresholds=choice,
        # Decode tasks run the ffmpeg found here, by its absolute path, on every node.
        settings=settings.with_overrides(ffmpeg=ffmpeg.ffmpeg),
        ffmpeg=ffmpeg,
    )


def _run(
    client: Client,
    plan: _Plan,
    ledger: FileLedger,
    inputs: list[InputFile],
    *,
    on_scorer_ready: Callable[[], None],
    scorer_workers: int | None,
) -> tuple[ScorerPool, ChunkPipeline]:
    """Start the scorers, then probe, decode, score and write every file.

    Without GPUs, up to ``scorer_workers`` workers hold a scorer (None: every worker).
    """
    settings, spec = plan.settings, plan.spec
    pool = ScorerPool.from_settings(
        client,
        settings,
        head_path=plan.model.path,
        embedder_handle=plan.model.embedder.handle,
        spec=spec,
        n_classes=len(plan.model.classes),
        key_prefix="scorer",
        key_token=plan.model.sha256,
        cpu_scorer_workers=scorer_workers,
    )
    pool.start(on_ready=on_scorer_ready)
    pipeline = ChunkPipeline.from_settings(
        client,
        pool,
        settings,
        spec=spec,
        frames_per_chunk=plan.frames_per_chunk,
        decode=_decoder(settings),
        score=functools.partial(score_chunks, writer=ledger.writer()),
        score_prefix="score",
        on_result=ledger.scored,
        on_failure=ledger.chunk_failed,
        score_keywords=lambda jobs: {"targets": ledger.targets(jobs)},
    )
    states = [state for item in inputs if (state := ledger.add(item)) is not None]
    for batch in probe_batches(states, most=PROBES_PER_TASK):
        paths = [state.input.path for state in batch]
        pipeline.submit(
            probe_task,
            paths,
            plan.ffmpeg,
            key=task_key("probe", *paths),
            then=functools.partial(_probed, ledger, pipeline, batch),
        )
    try:
        pipeline.run()
    finally:  # the bar and the dashboard page end with the run, however it ends
        ledger.progress.close()
    pool.refresh(finished=True)
    return pool, pipeline


def probe_batches(items: Sequence[_Item], *, most: int) -> Iterator[list[_Item]]:
    """``items`` in batches of 1, 2, 4... up to ``most``.

    The first file decodes at once, and a folder of short recordings costs one probe task per
    ``most`` files, not one each.
    """
    size, start = 1, 0
    while start < len(items):
        yield list(items[start : start + size])
        start += size
        size = min(2 * size, most)


def _probed(
    ledger: FileLedger, pipeline: ChunkPipeline, batch: list[FileState], future: Any
) -> None:
    answers = outcome(future)
    if isinstance(answers, BaseException):  # the task itself failed: so did each probe
        answers = [answers] * len(batch)
    for state, answer in zip(batch, answers, strict=True):
        for job in ledger.probed(state, answer):
            pipeline.enqueue(job)


def _decoder(settings: Settings) -> Any:
    """The decode task: in place, or from a node-local copy (spares the parallel file system)."""
    if not settings.staging.enabled:
        return decode_chunk
    return functools.partial(
        decode_chunk_staged,
        staging_directory=settings.staging.directory,
        keep_files=settings.staging.keep_files,
    )


def probe_task(paths: Sequence[str], tools: FFmpegTools) -> list[AudioInfo | DecodeError]:
    """Probe task: a file that is not audio is an answer, not a failure (no worker traceback)."""
    answers: list[AudioInfo | DecodeError] = []
    for path in paths:
        try:
            answers.append(probe_audio(path, tools=tools))
        except DecodeError as error:
            answers.append(error)
    return answers


def _fingerprint(plan: _Plan) -> dict[str, Any]:
    """The settings that change results: a resume must match them."""
    from buzzdask import __version__

    model, spec = plan.model, plan.spec
    return {
        "model_sha256": model.sha256,
        # A TF Hub copy's path depends on the machine's cache; its URL and content do not.
        "embedder": model.embedder.source or model.embedder.handle,
        "embedder_sha256": model.embedder.sha256,
        "preprocessing": PREPROCESSING,
        "sample_rate": spec.sample_rate,
        "frame_length": spec.frame_length,
        "frame_hop": spec.hop_length,
        "frame_context": spec.context,
        "frames_per_chunk": plan.frames_per_chunk,
        "thresholds": dict(sorted(plan.thresholds.values.items())),
        "buzzdask_version": __version__,
        # Builds differ in duration estimates (chunk plans) and AAC's last samples.
        "ffmpeg_version": plan.ffmpeg.version,
        "probe": "ffprobe" if plan.ffmpeg.ffprobe else "ffmpeg",
    }


def _options(plan: _Plan) -> dict[str, Any]:
    """The run's options, resolved, by their keyword: what a resume with other ones should pass."""
    spec = plan.spec
    return {
        "model": str(plan.model.path),
        "embedder": plan.model.embedder.handle,
        "frame_hop_s": spec.hop_length / spec.sample_rate,
        "chunk_seconds": plan.frames_per_chunk * spec.hop_length / spec.sample_rate,
        "thresholds": dict(sorted(plan.thresholds.values.items())),
        "precision": plan.thresholds.precision,
    }


def _metadata(
    plan: _Plan,
    *,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    root: str,
    n_files: int,
) -> dict[str, Any]:
    """``buzzdask.json`` of a run that starts now."""
    spec, model = plan.spec, plan.model
    given = [paths] if isinstance(paths, (str, os.PathLike)) else paths
    return {
        "status": "running",
        "started": utc_now(),
        "host": platform.node(),
        "model": model.as_metadata(),
        "embedder": model.embedder.handle,
        "preprocessing": PREPROCESSING,
        "classes": list(model.classes),
        "sample_rate": spec.sample_rate,
        "frame_length_s": spec.frame_length / spec.sample_rate,
        "frame_hop_s": spec.hop_length / spec.sample_rate,
        "frame_context_s": spec.context / spec.sample_rate,
        "chunk_seconds": plan.frames_per_chunk * spec.hop_length / spec.sample_rate,
        # The values, how they compare, and the precision and metrics rows they came from.
        "thresholds": plan.thresholds.as_metadata(),
        "versions": package_versions(),
        "ffmpeg": plan.ffmpeg.as_metadata(),
        "inputs": {"root": root, "paths": [os.fspath(p) for p in given], "files": n_files},
        "fingerprint": _fingerprint(plan),
        "options": _options(plan),
    }


def _summary(
    ledger: FileLedger, plan: _Plan, *, n_files: int, n_skipped: int, wall: float, **run_stats: Any
) -> dict[str, Any]:
    """Files, frames, audio hours, wall time and realtime factor, plus ``run_stats``.

    ``n_skipped`` counts what the input directories hold besides audio and hidden names.
    """
    spec = plan.spec
    audio_s = ledger.frames_written * spec.hop_length / spec.sample_rate
    return {
        "files": n_files,
        "files_done": len(ledger.files) - ledger.files_failed,
        "files_failed": ledger.files_failed,
        "files_skipped": n_skipped,
        "chunks_written": ledger.chunks_written,
        "chunks_skipped_resume": ledger.chunks_skipped,
        # Chunks sent again because their scorer was lost (each is still written once).
        "chunks_resent": run_stats["chunks_resent"],
        "frames": ledger.frames_written,
        "audio_hours": audio_s / 3600,
        "wall_seconds": wall,
        "realtime_factor": audio_s / wall if wall > 0 else None,
        "peak_rss_bytes": run_stats["peak_rss_bytes"],
        "memory_budget_bytes": plan.settings.memory_budget,
        "peak_decoded_bytes_in_flight": run_stats["peak_decoded_bytes_in_flight"],
        "scorers": run_stats["scorers"],
        "scorer_restarts": run_stats["scorer_restarts"],
        "scorers_lost": run_stats["scorers_lost"],
        # What a resume found it could trust, and removed (zeros for a run not resumed).
        "resume": run_stats["resume"],
    }


def _peak_rss_bytes() -> int:
    """Peak resident memory of this worker process (ffmpeg runs in its own processes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss(client: Client) -> dict[str, int]:
    # A worker that died during the run has no answer; the others still report.
    return client.run(_peak_rss_bytes, on_error="ignore")
