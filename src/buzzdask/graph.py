"""The analysis graph: decode tasks on CPU workers, score tasks on scorer actors, Parquet.

Probe and decode tasks run on CPU workers, score tasks beside the scorer actors, and Parquet
partitions are written on the client as results come back.

The client drives the graph incrementally (``as_completed``) instead of submitting everything
at once, so the decoded audio in flight stays under a memory budget and a 1,000-hour run holds
no more than that.
"""

from __future__ import annotations

import functools
import os
import platform
import resource
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from dask.utils import parse_bytes
from distributed import Client, Future, as_completed, wait

from buzzdask import config
from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    DecodedChunk,
    decode_chunk,
    plan_chunks,
    probe_audio,
)
from buzzdask.errors import BuzzdaskError, DecodeError, ParameterError, ScorerError
from buzzdask.frames import FrameSpec
from buzzdask.inputs import InputFile, discover
from buzzdask.models import ModelSpec, resolve_model
from buzzdask.progress import Progress, logger
from buzzdask.score import score_chunks, submit_scorer
from buzzdask.session import (
    connect,
    has_gpu,
    package_versions,
    scorer_hosts,
    scorers_per_host,
    task_key,
)
from buzzdask.transfer import decode_chunk_staged
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

#: Seconds between looks for workers that joined (to hold a scorer) or left.
REFRESH_EVERY_S = 5.0

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
    score_attempts: int = 0


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
    watch: bool = False,
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
    watch : bool, default: False
        ``paths`` is one directory files are still arriving in: analyse them as they arrive,
        until the transfer-complete marker or the idle timeout (:func:`buzzdask.watch.watch`).

    Returns
    -------
    AnalysisResult

    Raises
    ------
    InputError, ModelError, ParameterError, OutputConflictError
        Before any result is written, for a missing input, an unusable model, a bad option or an
        output that already holds results.

    Notes
    -----
    A file that cannot be read (corrupt, empty, not audio, shorter than one frame) does not stop
    the run: it is reported in ``result.errors`` and ``errors.parquet``, and every other file
    finishes. The last frame of a file, if it would overrun the end, is dropped, never padded.
    """
    if watch:  # the same keywords, pass after pass, until the transfer is complete
        from buzzdask.watch import watch as watch_directory

        return watch_directory(
            paths, model, output=output, client=client, embedder=embedder,
            frame_hop_s=frame_hop_s, chunk_seconds=chunk_seconds, thresholds=thresholds,
            on_conflict=on_conflict, memory_budget=memory_budget, batch_frames=batch_frames,
            progress=progress, verbose=verbose,
        )  # fmt: skip
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
        "versions": package_versions(),
        "inputs": {
            "root": root,
            "paths": [
                os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)
            ],
            "files": len(inputs),
        },
        "fingerprint": fingerprint,
    }
    with connect(client) as connected:
        run = _Run(
            client=connected,
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
        layout.root.mkdir(parents=True, exist_ok=True)
        write_json(layout.metadata, metadata)
        run.start_scorers()
        run.execute(inputs, progress=Progress(enabled=progress, verbose=verbose))
        run.refresh_scorers(finished=True)
        metadata["versions"]["tensorflow"] = run.tensorflow_version
        peak_rss = _peak_rss(connected)
        scorer_stats = run.scorer_stats()
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
        "scorer_restarts": run.scorer_restarts,
        "scorers_lost": run.scorers_lost,
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
        self.decode: Callable[..., DecodedChunk] = decode_chunk
        if config.get("staging.enabled"):
            # Each decode reads a node-local copy: spares the shared parallel file system.
            self.decode = functools.partial(
                decode_chunk_staged,
                staging_directory=config.get("staging.directory"),
                keep_files=int(config.get("staging.keep-files")),
            )
        self.tasks_per_scorer = int(config.get("score-tasks-per-actor"))
        self.files: dict[str, _FileState] = {}
        self.errors: list[dict[str, Any]] = []
        self.scorers: dict[str, Any] = {}
        self._actor_futures: dict[str, Future] = {}
        self._starting: dict[str, Future] = {}  # actors submitted, not yet up
        self.gpu_scoring = False
        limit = config.get("cpu-scorer-workers")
        self.cpu_scorer_workers = None if limit is None else max(1, int(limit))
        self.decode_workers: list[str] | None = None
        self.scorer_restarts = 0
        self.scorers_lost = 0
        self._next_refresh = time.monotonic() + REFRESH_EVERY_S
        self.score_attempts = int(config.get("score-attempts"))
        self.tensorflow_version = "unknown"
        self.frames_written = 0
        self.chunks_written = 0
        self.chunks_skipped = 0
        self.peak_in_flight_bytes = 0

    # -- scorers -------------------------------------------------------------------------------
    def start_scorers(self) -> None:
        """Submit one scorer actor per GPU worker, else per CPU worker (``cpu-scorer-workers``).

        Loading the model takes seconds: :meth:`execute` probes and decodes meanwhile and
        scores with each actor as soon as it is up.
        """
        workers = self._live_workers()
        if not workers:
            self.client.wait_for_workers(1, timeout=300)
            workers = self._live_workers()
        hosts = scorer_hosts(workers, cpu_workers=self.cpu_scorer_workers)
        self.gpu_scoring = has_gpu(workers[hosts[0]])
        if not self.gpu_scoring:
            logger.info("no GPU workers: scoring on %d CPU worker(s)", len(hosts))
        self._submit_actors(hosts)
        self._update_decode_workers(workers)

    def _submit_actors(self, hosts: list[str]) -> dict[str, Future]:
        """Actors for ``hosts``, held in ``_starting`` until :meth:`_scorer_started`."""
        # CPU scorers on one host split its cores; a GPU worker's scorer has its own device.
        shares = {} if self.gpu_scoring else scorers_per_host([*self.scorers, *hosts])
        futures = {
            address: submit_scorer(
                self.client,
                address,
                key=task_key("scorer", address, self.model.sha256),
                share_cores=shares.get(address, 1),
                head_path=self.model.path,
                embedder_handle=self.model.embedder.handle,
                spec=self.spec,
                n_classes=len(self.model.classes),
                batch_frames=self.batch_frames,
            )
            for address in hosts
        }
        # Hold the actor futures: once released, Dask forgets the actors and their tasks fail.
        self._actor_futures.update(futures)
        self._starting.update(futures)
        return futures

    def _scorer_started(self, address: str) -> None:
        """The actor submitted on ``address`` is up; or it failed, and others go on if any.

        Raises
        ------
        ModelError
            From the actor's construction: the model cannot be used anywhere.
        ScorerError
            If it was the last scorer and it could not start.
        """
        future = self._starting.pop(address)
        try:
            actor = future.result()
        except BuzzdaskError:
            raise
        except Exception as error:
            self._actor_futures.pop(address, None)
            if not (self.scorers or self._starting):
                raise ScorerError(f"could not start the scorer on {address}: {error}") from error
            logger.warning("no scorer on %s (%s): the others go on", address, error)
            return
        self.scorers[address] = actor
        if self.tensorflow_version == "unknown":
            versions = self.client.run(_tensorflow_version, workers=[address])
            self.tensorflow_version = str(versions.popitem()[1])

    def _live_workers(self) -> dict[str, Any]:
        return dict(self.client.scheduler_info(n_workers=-1)["workers"])

    def _update_decode_workers(self, workers: Mapping[str, Any]) -> None:
        # Decode tasks prefer workers without a scorer or a GPU, so they never take a GPU
        # worker's slot; loosely, so that a run whose decode workers all left still finishes.
        # Where every worker scores (CPU only), decoding goes everywhere.
        decoders = sorted(
            address
            for address, worker in workers.items()
            if address not in self.scorers and address not in self._starting and not has_gpu(worker)
        )
        self.decode_workers = decoders or None

    def _decode_placement(self) -> dict[str, Any]:
        """``submit`` keywords placing a probe or decode task (loosely) on the decode workers."""
        if self.decode_workers is None:
            return {}
        return {"workers": self.decode_workers, "allow_other_workers": True}

    def scorer_alive(self, address: str) -> bool:
        """Whether the actor on ``address`` still answers (its worker may have died or retired)."""
        actor = self.scorers.get(address)
        if actor is None:
            return False
        try:
            actor.stats().result(timeout=float(config.get("scorer-ping-seconds")))
        except Exception:
            return False
        return True

    def replace_scorer(self, address: str) -> None:
        """Go on without the lost actor on ``address``, or start a new one if it was the last.

        A GPU run waits for a GPU worker (a SLURM cluster replaces retired jobs); otherwise any
        live worker will do. Workers that join later get actors from :meth:`refresh_scorers`.

        Raises
        ------
        ScorerError
            If no suitable worker arrives within ``buzzdask.scorer-restart-seconds``.
        """
        self._forget_scorer(address)
        if self.scorers or self._starting:
            others = len(self.scorers) + len(self._starting)
            logger.warning("scorer on %s was lost: %d other scorer(s) go on", address, others)
            self._update_decode_workers(self._live_workers())
            return
        deadline = time.monotonic() + float(config.get("scorer-restart-seconds"))
        while True:
            workers = self._live_workers()
            candidates = sorted(a for a, w in workers.items() if not self.gpu_scoring or has_gpu(w))
            if candidates:
                break
            if time.monotonic() > deadline:
                kind = "GPU worker" if self.gpu_scoring else "worker"
                raise ScorerError(
                    f"the scorer on {address} was lost and no {kind} was free to replace it "
                    "within buzzdask.scorer-restart-seconds; finish with on_conflict='resume'"
                )
            time.sleep(1.0)
        # Prefer a worker that decodes nothing yet, so decoding keeps its workers.
        host = candidates[-1]
        logger.warning("scorer on %s was lost: restarting it on %s", address, host)
        wait(self._submit_actors([host])[host])
        self._scorer_started(host)
        self.scorer_restarts += 1
        self._update_decode_workers(workers)

    def _forget_scorer(self, address: str) -> None:
        """Count the actor on ``address`` as lost and release it."""
        self.scorers.pop(address, None)
        self._actor_futures.pop(address, None)
        self.scorers_lost += 1

    def refresh_scorers(self, *, finished: bool = False) -> dict[str, Future]:
        """Follow the cluster: drop scorers whose workers left, start some on workers that joined.

        A worker joins when a SLURM job replaces a lost one, when adapt or scale adds one, or
        when a nanny restarts a killed one. At most every few seconds while running; returns
        the actors submitted, for :meth:`execute` to wait on. ``finished``: the run is over;
        departed scorers are only counted as lost.
        """
        now = time.monotonic()
        if now < self._next_refresh and not finished:
            return {}
        self._next_refresh = now + REFRESH_EVERY_S
        workers = self._live_workers()
        for address in [a for a in self.scorers if a not in workers]:
            if finished:
                self._forget_scorer(address)
            else:
                self.replace_scorer(address)
        if finished:
            return {}
        free = [a for a in sorted(workers) if a not in self.scorers and a not in self._starting]
        if self.gpu_scoring:
            new = [a for a in free if has_gpu(workers[a])]
        else:
            limit = self.cpu_scorer_workers
            room = len(free) if limit is None else limit - len(self.scorers) - len(self._starting)
            new = free[: max(0, room)]
        futures = self._submit_actors(new) if new else {}
        if new:
            logger.info("starting scorers on workers that joined: %s", ", ".join(new))
            self.scorer_restarts += len(new)
        # CPU workers that joined a GPU run (scale, adapt, replacements) decode too.
        self._update_decode_workers(workers)
        return futures

    def scorer_stats(self) -> list[dict[str, Any]]:
        """Each actor's counters (or why they cannot be had: its worker died)."""
        stats = []
        for address, actor in self.scorers.items():
            try:
                stats.append(
                    {"worker": address, "gpu_worker": self.gpu_scoring, **actor.stats().result()}
                )
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
                key=task_key("probe", item.path),
                **self._decode_placement(),
                pure=False,
            )
            kinds[future.key] = ("probe", state)
            pending.add(future)

        def wait_for_actors(futures: Mapping[str, Future]) -> None:
            for address, future in futures.items():
                kinds[future.key] = ("scorer", address)
                pending.add(future)

        wait_for_actors(self._starting)
        todo: deque[_Chunk] = deque()
        decoded: deque[tuple[_Chunk, Future]] = deque()
        in_flight_bytes = 0
        scoring: defaultdict[str, int] = defaultdict(int)  # score tasks queued per actor

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
                    self.decode,
                    chunk.file.info,
                    chunk.plan,
                    spec=self.spec,
                    margin_s=self.margin_s,
                    seekable_codecs=self.seekable,
                    ffmpeg_cmd=self.ffmpeg,
                    key=task_key("decode", chunk.file.input.relative, chunk.plan),
                    **self._decode_placement(),
                    pure=False,
                )
                kinds[future.key] = ("decode", chunk)
                pending.add(future)
            held = self._holders(decoded)
            while decoded and self.scorers:
                free = [a for a in self.scorers if scoring[a] < self.tasks_per_scorer]
                if not free:
                    break
                ranked = sorted(free, key=scoring.__getitem__)
                address, group = self._next_group(decoded, ranked, held)
                actor = self.scorers[address]
                for chunk, _ in group:
                    logger.info("scoring %s", self._label(chunk))
                future = client.submit(
                    score_chunks,
                    actor,
                    *[f for _, f in group],
                    key=task_key("score", [f.key for _, f in group]),
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
            if kind == "scorer":
                if payload in self._starting:
                    self._scorer_started(payload)
            elif kind == "probe":
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
                if isinstance(results, BaseException) and self._scorer_lost(address):
                    # Re-send what the lost actor held; Dask recomputes any decoded array
                    # that died with its worker.
                    for chunk, chunk_future in reversed(group):
                        chunk.score_attempts += 1
                        if chunk.score_attempts < self.score_attempts:
                            decoded.appendleft((chunk, chunk_future))
                        else:
                            in_flight_bytes -= self.chunk_nbytes
                            self._chunk_failed(chunk, results, "score")
                elif isinstance(results, BaseException):
                    in_flight_bytes -= self.chunk_nbytes * len(group)
                    for chunk, _ in group:
                        self._chunk_failed(chunk, results, "score")
                else:
                    in_flight_bytes -= self.chunk_nbytes * len(group)
                    for (chunk, _), result in zip(group, results, strict=True):
                        self._write(chunk, *result, progress=progress)
            del future
            wait_for_actors(self.refresh_scorers())
            submit_more()
        progress.close()

    def _holders(self, decoded: deque[tuple[_Chunk, Future]]) -> dict[str, list[str]]:
        """Workers holding each decoded chunk, where that can decide which scorer gets it.

        Asked once per pass over the queue: one scheduler round trip, not one per group.
        """
        if not decoded or self.gpu_scoring or len(self.scorers) < 2:
            return {}
        return dict(self.client.who_has([f for _, f in decoded]))

    def _next_group(
        self,
        decoded: deque[tuple[_Chunk, Future]],
        free: list[str],
        held: Mapping[str, Sequence[str]],
    ) -> tuple[str, list[tuple[_Chunk, Future]]]:
        """The next scorer (of ``free``, least busy first) and the decoded chunks it gets.

        Chunks already on a free scorer's worker (``held``: workers by chunk key) go to that
        scorer: where CPU workers both decode and score, most chunks then cross no network.
        """
        address = next(
            (a for a in free if any(a in held.get(f.key, ()) for _, f in decoded)), free[0]
        )
        ordered = sorted(decoded, key=lambda item: address not in held.get(item[1].key, ()))
        group = ordered[: max(1, self.batch_frames // self.frames_per_chunk)]
        for item in group:
            decoded.remove(item)
        return address, group

    def _scorer_lost(self, address: str) -> bool:
        """After a failed score task: was its actor lost? If so, it has been replaced."""
        if address not in self.scorers:  # lost earlier, already replaced
            return True
        if self.scorer_alive(address):
            return False
        self.replace_scorer(address)
        return True

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


def _tensorflow_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)


def _peak_rss_bytes() -> int:
    """Peak resident memory of this worker process (ffmpeg runs in its own processes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss(client: Client) -> dict[str, int]:
    # A worker that died during the run has no answer; the others still report.
    return client.run(_peak_rss_bytes, on_error="ignore")
