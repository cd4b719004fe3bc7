"""The analysis graph: decode tasks on CPU workers, score tasks on scorer actors, Parquet.

Probe and decode tasks run on CPU workers, score tasks beside the scorer actors, and Parquet
partitions are written on the client as results come back.

The client drives the graph incrementally (``as_completed``) instead of submitting everything
at once, so the decoded audio in flight stays under a memory budget and a 1,000-hour run holds
no more than that.
"""

from __future__ import annotations

import os
import platform
import resource
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.base
import distributed
import pandas as pd
from dask.utils import parse_bytes
from distributed import Client, Future, LocalCluster, as_completed

from buzzdask import config
from buzzdask.decode import AudioInfo, ChunkPlan, decode_chunk, plan_chunks, probe_audio
from buzzdask.errors import BuzzdaskError, DecodeError, ParameterError, ScorerError
from buzzdask.frames import FrameSpec
from buzzdask.inputs import InputFile, discover
from buzzdask.models import ModelSpec, resolve_model
from buzzdask.progress import Progress, logger
from buzzdask.score import Scorer, score_chunks
from buzzdask.write import (
    ERROR_COLUMNS,
    OnConflict,
    OutputLayout,
    frames_table,
    prepare_output,
    utc_now,
    write_errors,
    write_json,
    write_table,
)

__all__ = ["AnalysisResult", "analyze"]

PREPROCESSING = (
    "mean of channels, then soxr resampling to the embedder's rate (ffmpeg pan + aresample)"
)


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
        import dask.dataframe as dd

        return dd.read_parquet(self.dataset, dataset={"partitioning": None})


@dataclass
class _FileState:
    input: InputFile
    info: AudioInfo | None = None
    chunks: int = 0
    chunks_done: int = 0
    frames: int = 0
    failed: bool = False


@dataclass
class _Chunk:
    file: _FileState
    plan: ChunkPlan


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
        Adds ``detection_<class>`` columns: ``activation >= threshold``.
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
        Before any work starts, for a missing input, an unusable model, a bad option or an
        output that already holds results.

    Notes
    -----
    A file that cannot be read (corrupt, empty, not audio, shorter than one frame) does not stop
    the run: it is reported in ``result.errors`` and ``errors.parquet``, and every other file
    finishes. The last frame of a file, if it would overrun the end, is dropped, never padded.
    """
    started_wall = time.perf_counter()
    started = utc_now()
    spec_model = resolve_model(model, embedder=embedder)
    spec = spec_model.embedder.frame_spec(frame_hop_s)
    frames_per_chunk = spec.frames_per_chunk(float(config.get("chunk-seconds", chunk_seconds)))
    thresholds = dict(thresholds or {})
    unknown = sorted(set(thresholds) - set(spec_model.classes))
    if unknown:
        raise ParameterError(
            f"thresholds for unknown class(es) {unknown}; the model's classes are "
            f"{list(spec_model.classes)}"
        )
    budget = parse_bytes(config.get("memory-budget", memory_budget))
    batch = int(config.get("batch-frames", batch_frames))
    if batch <= 0:
        raise ParameterError(f"batch_frames={batch} must be a positive integer")
    root, inputs = discover(paths, extensions=config.get("extensions"))
    fingerprint = _fingerprint(spec_model, spec, frames_per_chunk, thresholds)
    layout = prepare_output(output, on_conflict=on_conflict, fingerprint=fingerprint)
    done = layout.read_journal() if on_conflict == "resume" else {}

    metadata: dict[str, Any] = {
        "status": "running",
        "started": started,
        "host": platform.node(),
        "model": spec_model.as_metadata(),
        "embedder": spec_model.embedder.handle,
        "preprocessing": PREPROCESSING,
        "classes": list(spec_model.classes),
        "sample_rate": spec.sample_rate,
        "frame_length_s": spec.frame_length / spec.sample_rate,
        "frame_hop_s": spec.hop_length / spec.sample_rate,
        "frame_context_s": spec.context / spec.sample_rate,
        "chunk_seconds": frames_per_chunk * spec.hop_length / spec.sample_rate,
        "thresholds": thresholds,
        "versions": _versions(),
        "inputs": {
            "root": root,
            "paths": [
                os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)
            ],
            "files": len(inputs),
        },
        "fingerprint": fingerprint,
    }
    own_cluster = None
    if client is None:
        own_cluster = _start_local_cluster()
        client = Client(own_cluster)
        print(f"buzzdask: started a local Dask cluster; dashboard: {client.dashboard_link}")
    elif isinstance(client, str):
        client = Client(client)
    run = _Run(
        client=client,
        model=spec_model,
        spec=spec,
        layout=layout,
        frames_per_chunk=frames_per_chunk,
        thresholds=thresholds,
        budget=budget,
        batch_frames=batch,
        done=done,
        metadata=metadata,
    )
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        write_json(layout.metadata, metadata)
        run.start_scorers()
        metadata["versions"]["tensorflow"] = run.tensorflow_version
        run.execute(inputs, progress=Progress(enabled=progress, verbose=verbose))
        peak_rss = _peak_rss(client)
        scorer_stats = run.scorer_stats()
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    wall = time.perf_counter() - started_wall
    audio_s = run.frames_written * spec.hop_length / spec.sample_rate
    summary = {
        "files": len(inputs),
        "files_done": sum(1 for f in run.files.values() if not f.failed),
        "files_failed": sum(1 for f in run.files.values() if f.failed),
        "chunks_written": run.chunks_written,
        "chunks_skipped_resume": run.chunks_skipped,
        "frames": run.frames_written,
        "audio_hours": audio_s / 3600,
        "wall_seconds": wall,
        "realtime_factor": audio_s / wall if wall > 0 else None,
        "peak_rss_bytes": peak_rss,
        "memory_budget_bytes": budget,
        "peak_decoded_bytes_in_flight": run.peak_in_flight_bytes,
        "scorers": scorer_stats,
    }
    metadata.update(status="complete", finished=utc_now(), summary=summary)
    errors = pd.DataFrame(run.errors, columns=ERROR_COLUMNS)
    write_errors(layout.errors, run.errors)
    write_json(layout.metadata, metadata)
    return AnalysisResult(
        output=layout.root,
        dataset=layout.scores,
        summary=summary,
        errors=errors,
        metadata=metadata,
    )


class _Run:
    """State of one analysis on the client."""

    def __init__(
        self,
        *,
        client: Client,
        model: ModelSpec,
        spec: FrameSpec,
        layout: OutputLayout,
        frames_per_chunk: int,
        thresholds: dict[str, float],
        budget: int,
        batch_frames: int,
        done: dict[tuple[str, int], dict[str, Any]],
        metadata: dict[str, Any],
    ) -> None:
        self.client = client
        self.model = model
        self.spec = spec
        self.layout = layout
        self.frames_per_chunk = frames_per_chunk
        self.thresholds = thresholds
        self.budget = budget
        self.batch_frames = batch_frames
        self.done = done
        self.partition_metadata = {
            k: metadata[k] for k in ("model", "embedder", "preprocessing", "fingerprint", "started")
        }
        self.margin_s = float(config.get("decode-margin-seconds"))
        # Budget unit: one chunk's decoded float32 samples, context and margins included.
        margin = round(self.margin_s * spec.sample_rate)
        self.chunk_nbytes = 4 * (spec.span(frames_per_chunk) + 2 * margin)
        self.seekable = tuple(config.get("seekable-codecs"))
        self.ffmpeg = str(config.get("ffmpeg"))
        self.ffprobe = str(config.get("ffprobe"))
        self.tasks_per_scorer = int(config.get("score-tasks-per-actor"))
        self.files: dict[str, _FileState] = {}
        self.errors: list[dict[str, Any]] = []
        self.scorers: list[tuple[str, Any]] = []
        self._actor_futures: list[Future] = []
        self.tensorflow_version = "unknown"
        self.frames_written = 0
        self.chunks_written = 0
        self.chunks_skipped = 0
        self.peak_in_flight_bytes = 0

    # -- scorers -------------------------------------------------------------------------------
    def start_scorers(self) -> None:
        """One scorer actor per GPU worker, else one on a CPU worker; loads the model there."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            self.client.wait_for_workers(1, timeout=300)
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        gpu = sorted(a for a, w in workers.items() if w.get("resources", {}).get("GPU", 0) > 0)
        if gpu:
            hosts = gpu
        else:
            hosts = sorted(workers)[:1]
            logger.info("no GPU workers: scoring on CPU worker %s", hosts[0])
        self.scorer_workers = set(hosts)
        decoders = sorted(set(workers) - self.scorer_workers)
        self.decode_workers = decoders or None
        futures = [
            self.client.submit(
                Scorer,
                head_path=self.model.path,
                embedder_handle=self.model.embedder.handle,
                spec=self.spec,
                n_classes=len(self.model.classes),
                batch_frames=self.batch_frames,
                intra_op_threads=config.get("tf-intra-op-threads"),
                inter_op_threads=config.get("tf-inter-op-threads"),
                actor=True,
                workers=[address],
                allow_other_workers=False,
                key=_key("scorer", address, self.model.sha256),
            )
            for address in hosts
        ]
        try:
            actors = self.client.gather(futures)
        except BuzzdaskError:  # ModelError from the actor's __init__, before any decode
            raise
        except Exception as error:
            raise ScorerError(f"could not start the scorer: {error}") from error
        # Hold the actor futures: once released, Dask forgets the actors and their tasks fail.
        self._actor_futures = futures
        self.scorers = list(zip(hosts, actors, strict=True))
        self.tensorflow_version = str(
            self.client.run(_tensorflow_version, workers=hosts[:1]).popitem()[1]
        )

    def scorer_stats(self) -> list[dict[str, Any]]:
        """Each actor's counters (or why they cannot be had: its worker died)."""
        stats = []
        for address, actor in self.scorers:
            try:
                stats.append({"worker": address, **actor.stats().result()})
            except Exception as error:  # the actor's worker is gone; the run still reports
                stats.append({"worker": address, "error": f"{type(error).__name__}: {error}"})
        return stats

    # -- the loop ------------------------------------------------------------------------------
    def execute(self, inputs: list[InputFile], *, progress: Progress) -> None:
        """Probe, decode, score and write every file; record per-file errors."""
        client = self.client
        pending = as_completed()
        kinds: dict[str, tuple[str, Any]] = {}
        for item in inputs:
            state = self.files[item.relative] = _FileState(input=item)
            if item.problem:
                self._fail(state, None, "discover", item.problem, "")
                continue
            future = client.submit(
                _probe,
                item.path,
                ffprobe=self.ffprobe,
                key=_key("probe", item.path),
                workers=self.decode_workers,
                allow_other_workers=True,
                pure=False,
            )
            kinds[future.key] = ("probe", state)
            pending.add(future)

        todo: deque[_Chunk] = deque()
        decoded: deque[tuple[_Chunk, Future]] = deque()
        in_flight_bytes = 0
        scoring: dict[str, int] = {address: 0 for address, _ in self.scorers}

        def submit_more() -> None:
            nonlocal in_flight_bytes
            while todo and (
                in_flight_bytes == 0 or in_flight_bytes + self.chunk_nbytes <= self.budget
            ):
                chunk = todo.popleft()
                in_flight_bytes += self.chunk_nbytes
                self.peak_in_flight_bytes = max(self.peak_in_flight_bytes, in_flight_bytes)
                assert chunk.file.info is not None
                logger.info("decoding %s", self._label(chunk))
                future = client.submit(
                    decode_chunk,
                    chunk.file.info,
                    chunk.plan,
                    spec=self.spec,
                    margin_s=self.margin_s,
                    seekable_codecs=self.seekable,
                    ffmpeg_cmd=self.ffmpeg,
                    key=_key("decode", chunk.file.input.relative, chunk.plan),
                    workers=self.decode_workers,
                    allow_other_workers=True,
                    pure=False,
                )
                kinds[future.key] = ("decode", chunk)
                pending.add(future)
            while decoded:
                address, actor = min(self.scorers, key=lambda s: scoring[s[0]])
                if scoring[address] >= self.tasks_per_scorer:
                    break
                group: list[tuple[_Chunk, Future]] = []
                frames = 0
                while decoded and (
                    not group or frames + self.frames_per_chunk <= self.batch_frames
                ):
                    group.append(decoded.popleft())
                    frames += self.frames_per_chunk
                for chunk, _ in group:
                    logger.info("scoring %s", self._label(chunk))
                future = client.submit(
                    score_chunks,
                    actor,
                    *[f for _, f in group],
                    key=_key("score", [f.key for _, f in group]),
                    workers=[address],
                    # Loose: if the actor's worker dies the task runs elsewhere and fails
                    # (reported, redone by resume) instead of waiting forever for that worker.
                    allow_other_workers=True,
                    pure=False,
                )
                scoring[address] += 1
                kinds[future.key] = ("score", (address, group))
                pending.add(future)

        for future in pending:
            kind, payload = kinds.pop(future.key)
            if kind == "probe":
                self._probed(payload, future, todo, progress)
            elif kind == "decode":
                if future.status == "error":
                    in_flight_bytes -= self.chunk_nbytes
                    self._chunk_failed(payload, future.exception(), "decode")
                else:
                    decoded.append((payload, future))
            else:
                address, group = payload
                scoring[address] -= 1
                results = _outcome(future)
                if isinstance(results, BaseException):
                    for chunk, _ in group:
                        self._chunk_failed(chunk, results, "score")
                else:
                    for (chunk, _), result in zip(group, results, strict=True):
                        self._write(chunk, *result, progress=progress)
                in_flight_bytes -= self.chunk_nbytes * len(group)
            del future
            submit_more()
        progress.close()

    # -- steps ---------------------------------------------------------------------------------
    def _probed(
        self, state: _FileState, future: Future, todo: deque[_Chunk], progress: Progress
    ) -> None:
        info = _outcome(future)
        if not isinstance(info, AudioInfo):
            self._fail(state, None, "probe", *_describe(info))
            return
        state.info = info
        plans = plan_chunks(info, self.spec, frames_per_chunk=self.frames_per_chunk)
        state.chunks = len(plans)
        if info.duration_s:
            progress.expect(info.duration_s / 3600)
        for plan in plans:
            entry = self.done.get((state.input.relative, plan.index))
            if (
                entry
                and entry.get("size") == info.size_bytes
                and entry.get("mtime_ns") == info.mtime_ns
            ):
                path = self.layout.partition(state.input.relative, plan.index)
                if entry["frames"] == 0 or path.exists():
                    self.chunks_skipped += 1
                    progress.advance(self._hours(entry["frames"]))
                    state.chunks_done += 1
                    state.frames += entry["frames"]
                    continue
            todo.append(_Chunk(file=state, plan=plan))
        self._maybe_finished(state)

    def _write(
        self,
        chunk: _Chunk,
        first_frame: int,
        activations: Any,
        messages: str,
        *,
        progress: Progress,
    ) -> None:
        state = chunk.file
        relative = state.input.relative
        n_frames = len(activations)
        if n_frames:
            table = frames_table(
                relative,
                first_frame,
                activations,
                spec=self.spec,
                classes=self.model.classes,
                thresholds=self.thresholds,
                metadata=self.partition_metadata,
            )
            write_table(table, self.layout.partition(relative, chunk.plan.index))
        assert state.info is not None
        self.layout.append_journal(
            {
                "file": relative,
                "chunk": chunk.plan.index,
                "frames": n_frames,
                "size": state.info.size_bytes,
                "mtime_ns": state.info.mtime_ns,
            }
        )
        if messages:
            self.errors.append(
                {
                    "file": relative,
                    "chunk": chunk.plan.index,
                    "stage": "decode",
                    "reason": "ffmpeg reported damaged audio (decoded what it could)",
                    "detail": messages,
                }
            )
        self.chunks_written += 1
        self.frames_written += n_frames
        state.chunks_done += 1
        state.frames += n_frames
        progress.advance(self._hours(n_frames))
        self._maybe_finished(state)

    def _chunk_failed(self, chunk: _Chunk, error: BaseException, stage: str) -> None:
        reason, detail = _describe(error)
        chunk.file.chunks_done += 1
        self._fail(chunk.file, chunk.plan.index, stage, reason, detail)
        self._maybe_finished(chunk.file)

    def _fail(
        self, state: _FileState, chunk: int | None, stage: str, reason: str, detail: str
    ) -> None:
        state.failed = True
        logger.warning(
            "failed: %s%s: %s",
            state.input.relative,
            "" if chunk is None else f" chunk {chunk}",
            reason,
        )
        self.errors.append(
            {
                "file": state.input.relative,
                "chunk": chunk,
                "stage": stage,
                "reason": reason,
                "detail": detail,
            }
        )

    def _maybe_finished(self, state: _FileState) -> None:
        if state.chunks_done == state.chunks and not state.failed and state.frames == 0:
            seconds = self.spec.frame_length / self.spec.sample_rate
            self._fail(state, None, "decode", f"audio shorter than one frame ({seconds:g} s)", "")

    def _hours(self, n_frames: int) -> float:
        return n_frames * self.spec.hop_length / self.spec.sample_rate / 3600

    def _label(self, chunk: _Chunk) -> str:
        rate = self.spec.sample_rate
        start = chunk.plan.first_frame * self.spec.hop_length / rate
        if chunk.plan.n_frames is None:
            return f"{chunk.file.input.relative} [{start:.2f}–end s]"
        end = start + self.spec.span(chunk.plan.n_frames) / rate
        return f"{chunk.file.input.relative} [{start:.2f}–{end:.2f} s]"


def _probe(path: str, *, ffprobe: str) -> AudioInfo | DecodeError:
    """Probe task: a file that is not audio is an answer, not a failure (no worker traceback)."""
    try:
        return probe_audio(path, ffprobe=ffprobe)
    except DecodeError as error:
        return error


def _outcome(future: Future) -> Any:
    """The task's result, or its exception, without raising.

    A finished result can still be lost before it is fetched (its worker died); Dask then
    recomputes it, which may fail: that is an outcome too, reported per chunk.
    """
    try:
        return future.result()
    except Exception as error:
        return error


def _key(prefix: str, *parts: Any) -> str:
    """A unique task key; the dashboard groups tasks by ``prefix`` (decode, score...)."""
    return f"{prefix}-{dask.base.tokenize(*parts, uuid.uuid4().hex)}"


def _describe(error: BaseException) -> tuple[str, str]:
    if isinstance(error, DecodeError):
        return error.reason, error.stderr
    return f"{type(error).__name__}: {error}", ""


def _fingerprint(
    model: ModelSpec, spec: FrameSpec, frames_per_chunk: int, thresholds: Mapping[str, float]
) -> dict[str, Any]:
    from buzzdask import __version__

    return {
        "model_sha256": model.sha256,
        "embedder": model.embedder.handle,
        "embedder_sha256": model.embedder.sha256,
        "preprocessing": PREPROCESSING,
        "sample_rate": spec.sample_rate,
        "frame_length": spec.frame_length,
        "frame_hop": spec.hop_length,
        "frame_context": spec.context,
        "frames_per_chunk": frames_per_chunk,
        "thresholds": dict(sorted(thresholds.items())),
        "buzzdask_version": __version__,
    }


def _versions() -> dict[str, str]:
    import pyarrow

    from buzzdask import __version__

    return {
        "buzzdask": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
    }


def _tensorflow_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)


def _peak_rss_bytes() -> dict[str, int]:
    """Peak resident memory of this worker process and of its largest finished child (ffmpeg)."""
    return {
        "worker": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "largest_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
    }


def _peak_rss(client: Client) -> dict[str, dict[str, int]]:
    # A worker that died during the run has no answer; the others still report.
    return client.run(_peak_rss_bytes, on_error="ignore")


def _start_local_cluster() -> LocalCluster:
    """Worker processes: one holds the scorer, the others decode (at least one of each)."""
    cores = os.cpu_count() or 1
    n_workers = config.get("local-cluster.n-workers") or 2
    threads = config.get("local-cluster.threads-per-worker") or cores
    return LocalCluster(
        n_workers=int(n_workers),
        threads_per_worker=int(threads),
        processes=True,
        dashboard_address=config.get("local-cluster.dashboard-address"),
    )
