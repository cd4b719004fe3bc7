"""The measured configurations, each run in a fresh process by :mod:`benchmarks.measure`.

A fresh process per configuration keeps TensorFlow's thread pools (fixed when TensorFlow starts)
and the memory peaks of one configuration out of the next. Each stage times its own work with
:func:`measured`: wall time and the CPU time of the process and of every child it reaped
(ffmpeg, Dask worker processes), so CPU use is counted even when other jobs share the machine.

Run one stage by hand::

    python -m benchmarks.stages decode '{"files": [...], "workers": 2, ...}' result.json
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from buzzdask.decode import (
    ChunkPlan,
    DecodedChunk,
    decode_chunk,
    decode_file,
    plan_chunks,
    preprocess_filters,
    probe_audio,
)
from buzzdask.frames import FrameSpec
from buzzdask.models import ModelSpec, resolve_model
from buzzdask.settings import load_settings
from buzzdask.write import frames_table, write_table

__all__ = ["STAGES", "measured"]


def cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextmanager
def measured(audio_s: float | None = None) -> Iterator[dict[str, Any]]:
    """Time a block: fills ``wall_s``, ``cpu_s`` (this process + reaped children), ``cpu_util``.

    ``cpu_util`` is CPU seconds over ``wall_s`` times the cores available (1.0: every core busy).
    Set ``record["audio_s"]`` inside the block (or pass it) to get ``realtime_factor``.
    """
    record: dict[str, Any] = {} if audio_s is None else {"audio_s": audio_s}
    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield record
    record["wall_s"] = time.perf_counter() - wall
    record["cpu_s"] = _cpu_seconds() - cpu
    record["cpu_util"] = record["cpu_s"] / (record["wall_s"] * cores())
    if record.get("audio_s"):
        record["realtime_factor"] = record["audio_s"] / record["wall_s"]


def _model(params: dict[str, Any]) -> tuple[ModelSpec, FrameSpec]:
    model = resolve_model(params["model"], embedder=params["embedder"])
    return model, model.embedder.frame_spec()


def _scorer(params: dict[str, Any], model: ModelSpec, spec: FrameSpec) -> Any:
    from buzzdask.score import Scorer

    return Scorer(
        head_path=model.path,
        embedder_handle=model.embedder.handle,
        spec=spec,
        n_classes=len(model.classes),
        batch_frames=params["batch_frames"],
        intra_op_threads=params.get("intra_op_threads"),
        inter_op_threads=params.get("inter_op_threads"),
        **params.get("scorer_options", {}),
    )


def _frames_per_chunk(params: dict[str, Any], spec: FrameSpec) -> int:
    settings = load_settings(chunk_seconds=params.get("chunk_seconds"))
    return spec.frames_per_chunk(settings.chunk_seconds)


def decode(params: dict[str, Any]) -> dict[str, Any]:
    """The decode stage alone: every chunk of the corpus through buzzdask's ffmpeg decode.

    ``workers`` ffmpeg processes run at once (threads here only wait on their pipes), with
    buzzdask's chunking, margins and preprocessing, as its decode tasks do.
    """
    _, spec = _model(params)
    with measured() as record, ThreadPoolExecutor(params["workers"]) as pool:
        infos = list(pool.map(probe_audio, params["files"]))
        tasks = _chunk_tasks(params, spec, infos)
        n_frames = sum(pool.map(lambda task: _decoded_frames(*task), tasks))
        record["audio_s"] = n_frames * spec.hop_length / spec.sample_rate
    record.update(workers=params["workers"], chunks=len(tasks))
    return record


def _chunk_tasks(
    params: dict[str, Any], spec: FrameSpec, infos: list[Any]
) -> list[tuple[Any, ChunkPlan, FrameSpec, float, tuple[str, ...]]]:
    """Arguments of :func:`_decoded_frames` for every chunk buzzdask would decode."""
    frames_per_chunk = _frames_per_chunk(params, spec)
    settings = load_settings()
    margin_s = settings.decode_margin_seconds
    seekable = settings.seekable_codecs
    return [
        (info, plan, spec, margin_s, seekable)
        for info in infos
        for plan in plan_chunks(info, spec, frames_per_chunk=frames_per_chunk)
    ]


def _decoded_frames(
    info: Any, plan: ChunkPlan, spec: FrameSpec, margin_s: float, seekable: tuple[str, ...]
) -> int:
    """Decode one chunk as buzzdask's decode task does; only its frame count leaves."""
    return decode_chunk(info, plan, spec=spec, margin_s=margin_s, seekable_codecs=seekable).n_frames


def slurm_decode(params: dict[str, Any]) -> dict[str, Any]:
    """Decode throughput on the local SLURM of ``../shared/slurm``, per count of CPU jobs.

    For each of ``worker_counts``: ``buzzdask.cluster.start("local-slurm", gpus=0,
    cpu_workers=n)`` (one 1-core worker per job), then every chunk of the corpus through
    buzzdask's decode on those workers; the arrays stay there, frame counts come back. CPU
    time is the workers' own (ffmpeg included), read from the workers before and after.
    Also ``jobs_up_s``: from ``start()`` until the jobs' workers are connected. The records
    are under ``configurations``, by label.
    """
    import buzzdask.cluster

    _start_local_slurm(Path(params["slurm_dir"]))
    _, spec = _model(params)
    results: dict[str, Any] = {}
    for n_workers in params["worker_counts"]:
        started = time.perf_counter()
        client = buzzdask.cluster.start(
            "local-slurm", gpus=0, cpu_workers=n_workers, log_directory=params["work_dir"]
        )
        jobs_up_s = time.perf_counter() - started
        try:
            cpu_before = client.run(_cpu_seconds)
            with measured() as record:
                infos = client.gather(client.map(probe_audio, params["files"], pure=False))
                tasks = _chunk_tasks(params, spec, infos)
                futures = [client.submit(_decoded_frames, *task, pure=False) for task in tasks]
                n_frames = sum(client.gather(futures))
                record["audio_s"] = n_frames * spec.hop_length / spec.sample_rate
            cpu_after = client.run(_cpu_seconds)
        finally:
            client.cluster.close()
            client.close()
        record["cpu_s"] = sum(cpu_after[w] - cpu_before.get(w, 0.0) for w in cpu_after)
        record["cpu_util"] = record["cpu_s"] / (record["wall_s"] * min(n_workers, cores()))
        record.update(workers=n_workers, chunks=len(tasks), jobs_up_s=jobs_up_s)
        results[f"{n_workers} CPU job{'s' if n_workers > 1 else ''}"] = record
    return {"configurations": results}


def _start_local_slurm(scripts: Path) -> None:
    """Start ../shared/slurm's SLURM unless it runs already (idempotent), and use it."""
    started = subprocess.run(
        ["bash", str(scripts / "start-local-slurm.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    for line in started.stdout.splitlines():
        if line.startswith("export "):
            key, value = line.removeprefix("export ").split("=", 1)
            os.environ[key] = value


def ffmpeg_settings(params: dict[str, Any]) -> dict[str, Any]:
    """ffmpeg's cost per audio second for preprocessing variants, one process at a time.

    Variants: buzzdask's chain (soxr), the same with ``-threads 1``, ffmpeg's default resampler
    instead of soxr, and decoding alone (no downmix, no resampling). Output goes to /dev/null,
    so only ffmpeg's CPU time is counted.
    """
    _, spec = _model(params)
    seconds = params["seconds"]
    results: dict[str, Any] = {}
    for path in params["files"]:
        info = probe_audio(path)
        chain = preprocess_filters(info.channels, spec.sample_rate)
        variants = {
            "soxr (buzzdask)": ["-af", chain],
            "soxr, -threads 1": ["-threads", "1", "-af", chain],
            "default resampler (swr)": ["-af", chain.replace(":resampler=soxr", "")],
            "decode only": ["-af", "aformat=sample_fmts=flt"],
        }
        per_file: dict[str, Any] = {}
        for name, options in variants.items():
            command = ["ffmpeg", "-nostdin", "-v", "error", "-t", str(seconds), "-i", path]
            with measured(audio_s=min(seconds, info.duration_s or seconds)) as record:
                subprocess.run([*command, *options, "-f", "f32le", "-y", os.devnull], check=True)
            record["core_s_per_audio_s"] = record["cpu_s"] / record["audio_s"]
            per_file[name] = record
        results[f"{info.codec} {info.sample_rate} Hz {info.channels} ch"] = per_file
    return {"variants": results}


def _predecoded(params: dict[str, Any], spec: FrameSpec) -> list[DecodedChunk]:
    """``seconds`` of corpus audio decoded up front, cut into chunks as buzzdask cuts them."""
    frames_per_chunk = _frames_per_chunk(params, spec)
    wanted = spec.n_complete_frames(round(params["seconds"] * spec.sample_rate))
    chunks: list[DecodedChunk] = []
    for path in params["files"]:
        info = probe_audio(path)
        for plan in plan_chunks(info, spec, frames_per_chunk=frames_per_chunk):
            if wanted <= 0:
                return chunks
            chunk = decode_chunk(info, plan, spec=spec)
            chunks.append(chunk)
            wanted -= chunk.n_frames
    return chunks


def _groups(chunks: list[DecodedChunk], batch_frames: int) -> list[list[DecodedChunk]]:
    """Chunks grouped as buzzdask's client groups them into score tasks (up to a batch each)."""
    groups: list[list[DecodedChunk]] = []
    frames = 0
    for chunk in chunks:
        if groups and frames + chunk.n_frames <= batch_frames:
            groups[-1].append(chunk)
            frames += chunk.n_frames
        else:
            groups.append([chunk])
            frames = chunk.n_frames
    return groups


def model(params: dict[str, Any]) -> dict[str, Any]:
    """The model stage alone: the scorer (embedder + head) on pre-decoded chunks.

    Scores the same chunks ``repeats`` times after one warm-up pass and reports every pass
    (the best is the least disturbed by other jobs). Saves the activations to ``save`` if given.
    """
    model_spec, spec = _model(params)
    chunks = _predecoded(params, spec)
    with measured() as start:
        scorer = _scorer(params, model_spec, spec)
    groups = _groups(chunks, params["batch_frames"])
    audio_s = sum(c.n_frames for c in chunks) * spec.hop_length / spec.sample_rate
    with measured(audio_s) as warm_up:
        activations = [a for group in groups for a in scorer.score(group)]
    passes = []
    for _ in range(params["repeats"]):
        with measured(audio_s) as record:
            for group in groups:
                scorer.score(group)
        passes.append(record)
    if params.get("save"):
        np.save(params["save"], np.concatenate(activations))
    best = max(passes, key=lambda r: r["realtime_factor"])
    return {
        **best,
        "passes": passes,
        "warm_up": warm_up,
        "start_up_s": start["wall_s"],
        "native_hop": scorer.native_hop,
    }


def baseline(params: dict[str, Any]) -> dict[str, Any]:
    """A sequential single-process analyzer: per file, decode it whole, score it, write it.

    No overlap between decoding and scoring; the model is loaded once (start-up included).
    """
    model_spec, spec = _model(params)
    output = Path(tempfile.mkdtemp(prefix="bench-baseline-", dir=params["work_dir"]))
    split = {"start_up": 0.0, "decode": 0.0, "score": 0.0, "write": 0.0}
    n_frames = 0
    with measured() as record:
        with _split(split, "start_up"):
            scorer = _scorer(params, model_spec, spec)
        for index, path in enumerate(params["files"]):
            with _split(split, "decode"):
                samples = decode_file(path, sample_rate=spec.sample_rate)
                frames = spec.n_complete_frames(len(samples))
                chunk = DecodedChunk(samples[: spec.span(frames)], first_frame=0, n_frames=frames)
            with _split(split, "score"):
                (activations,) = scorer.score([chunk])
            with _split(split, "write"):
                table = frames_table(
                    Path(path).name,
                    0,
                    activations,
                    spec=spec,
                    classes=model_spec.classes,
                    thresholds={},
                    metadata={},
                )
                write_table(table, output / f"{index:04d}.parquet")
            n_frames += frames
        record["audio_s"] = n_frames * spec.hop_length / spec.sample_rate
    record["split_s"] = split
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return record


@contextmanager
def _split(split: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    split[name] += time.perf_counter() - started


def analyze(params: dict[str, Any]) -> dict[str, Any]:
    """``buzzdask.analyze`` on a fresh LocalCluster, its start-up included.

    Wall time runs from starting the cluster until ``analyze`` returns with every partition
    written; shutting the cluster down afterwards is not part of the analysis. CPU time is this
    process's plus each worker's own since it started (its ffmpeg children included).

    ``settings`` holds the local cluster's ``n_workers``/``threads_per_worker``, ``buzzdask.*``
    config keys without their prefix (``tf-intra-op-threads``, ``score-tasks-per-actor``...)
    and full ``distributed.*`` keys (``distributed.scheduler.work-stealing``). The
    time split comes from Dask's task stream (decode compute, transfers to the scorer, score
    tasks) and the actor's own counter (seconds scoring).
    """
    import dask
    from distributed import Client, LocalCluster, get_task_stream

    import buzzdask

    settings = dict(params["settings"])
    cluster_options = {k: settings.pop(k) for k in ("n_workers", "threads_per_worker")}
    output = Path(tempfile.mkdtemp(prefix="bench-analyze-", dir=params["work_dir"])) / "out"
    first_chunk: dict[str, float] = {}
    started_epoch = time.time()
    watcher = threading.Thread(
        target=_watch_first_chunk, args=(output / "journal.jsonl", first_chunk), daemon=True
    )
    watcher.start()
    with (
        dask.config.set(
            {k if k.startswith("distributed.") else f"buzzdask.{k}": v for k, v in settings.items()}
        ),
        measured() as record,
    ):
        cluster = LocalCluster(
            **cluster_options, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        )
        client = Client(cluster)
        record["cluster_start_s"] = time.time() - started_epoch
        with get_task_stream(client) as stream:
            result = buzzdask.analyze(
                params["files"],
                params["model"],
                output=output,
                client=client,
                embedder=params["embedder"],
                progress=False,
            )
        record["audio_s"] = result.summary["audio_hours"] * 3600
        workers_cpu_s = sum(client.run(_cpu_seconds).values())
    client.close()
    cluster.close()
    record["cpu_s"] += workers_cpu_s
    record["cpu_util"] = record["cpu_s"] / (record["wall_s"] * cores())
    summary = result.summary
    record.update(
        settings=params["settings"],
        errors=len(result.errors),
        first_chunk_s=first_chunk.get("seen", float("nan")) - started_epoch,
        analyze_wall_s=summary["wall_seconds"],
        peak_rss_bytes=summary["peak_rss_bytes"],
        scorers=summary["scorers"],
        split_s=_task_split(stream.data, summary, started_epoch),
    )
    return record


def _watch_first_chunk(journal: Path, seen: dict[str, float]) -> None:
    """Note when the first chunk is journaled (scored and written): the start-up latency."""
    while True:
        if journal.is_file() and journal.stat().st_size > 0:
            seen["seen"] = time.time()
            return
        time.sleep(0.02)


def _task_split(
    tasks: list[dict[str, Any]], summary: dict[str, Any], started_epoch: float
) -> dict[str, Any]:
    """Seconds per kind of work, summed over tasks, from Dask's task stream records.

    Keys are ``<task prefix>_<action>``; work done on the scorer's own worker is also counted
    under ``on_scorer_worker`` (decode or probe tasks there compete with TensorFlow).
    """
    totals: dict[str, float] = {}
    on_scorer: dict[str, float] = {}
    scorer_workers = {s.get("worker") for s in summary["scorers"]}
    first_score = last_score = None
    for task in tasks:
        prefix = str(task["key"]).split("-", 1)[0]
        for part in task["startstops"]:
            name = f"{prefix}_{part['action']}"
            seconds = part["stop"] - part["start"]
            totals[name] = totals.get(name, 0.0) + seconds
            if task.get("worker") in scorer_workers:
                on_scorer[name] = on_scorer.get(name, 0.0) + seconds
            if prefix == "score" and part["action"] == "compute":
                first_score = min(first_score or part["start"], part["start"])
                last_score = max(last_score or part["stop"], part["stop"])
    scoring = sum(s.get("seconds_scoring", 0.0) for s in summary["scorers"])
    split: dict[str, Any] = {k: round(v, 3) for k, v in sorted(totals.items())}
    split["on_scorer_worker"] = {k: round(v, 3) for k, v in sorted(on_scorer.items())}
    split["actor_scoring"] = scoring
    if first_score is not None and last_score is not None:
        split["first_score_task_at"] = first_score - started_epoch
        # Between the first and last score task, time the actors were not scoring: they
        # waited for decoded audio (or for a transfer).
        busy = len(summary["scorers"]) * (last_score - first_score)
        split["scorer_idle_while_running"] = busy - scoring
    return split


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "decode": decode,
    "ffmpeg_settings": ffmpeg_settings,
    "model": model,
    "baseline": baseline,
    "analyze": analyze,
    "slurm_decode": slurm_decode,
}


def main(argv: list[str]) -> None:
    """``python -m benchmarks.stages NAME PARAMS_JSON RESULT_PATH``: run one stage."""
    name, params, result_path = argv
    result = STAGES[name](json.loads(params))
    Path(result_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
