"""The measured configurations, each run in a fresh process by :mod:`benchmarks.measure`.

A fresh process per configuration keeps TensorFlow's thread pools (fixed when TensorFlow starts)
and the memory peaks of one configuration out of the next. Each stage times its own work with
:func:`measured`: wall time and the CPU time of the process and of every child it reaped
(ffmpeg, Dask worker processes), so CPU use is counted even when other jobs share the machine.
``buzzdask.analyze`` has its own module (:mod:`benchmarks.analyze_stage`), and so has the
co-run of both stages (:mod:`benchmarks.corun`).

Run one stage by hand::

    python -m benchmarks.stages decode '{"files": [...], "workers": 2, ...}' result.json
    python -m benchmarks.stages decode @params.json result.json
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
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
from buzzdask.session import peak_rss_bytes
from buzzdask.settings import load_settings
from buzzdask.write import frames_table, write_table

__all__ = [
    "STAGES",
    "chunk_tasks",
    "cpu_seconds",
    "decode_corpus",
    "decoded_frames",
    "groups_of",
    "make_scorer",
    "measured",
    "model_and_frames",
    "predecoded",
    "save_activations",
    "warm_decoder",
]


def cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of every child it has reaped."""
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
    wall, cpu = time.perf_counter(), cpu_seconds()
    yield record
    record["wall_s"] = time.perf_counter() - wall
    record["cpu_s"] = cpu_seconds() - cpu
    record["cpu_util"] = record["cpu_s"] / (record["wall_s"] * cores())
    if record.get("audio_s"):
        record["realtime_factor"] = record["audio_s"] / record["wall_s"]


def model_and_frames(params: dict[str, Any]) -> tuple[ModelSpec, FrameSpec]:
    """The model of ``params["model"]`` on ``params["embedder"]``, and its frame geometry."""
    model = resolve_model(params["model"], embedder=params["embedder"])
    return model, model.embedder.frame_spec()


def make_scorer(params: dict[str, Any], model: ModelSpec, spec: FrameSpec) -> Any:
    """A :class:`~buzzdask.score.Scorer` (not an actor) with the options in ``params``.

    Its calls on a CPU hold at most ``params["cpu_call_frames"]`` frames, buzzdask's
    ``cpu-call-frames`` where not given (``None``: whole batches).
    """
    from buzzdask.score import Scorer

    return Scorer(
        head_path=model.path,
        embedder_handle=model.embedder.handle,
        spec=spec,
        n_classes=len(model.classes),
        batch_frames=params["batch_frames"],
        cpu_call_frames=params.get("cpu_call_frames", load_settings().cpu_call_frames),
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
    buzzdask's probing, chunking, margins and preprocessing, as its tasks do. Its cost,
    ``core_s_per_audio_s``, is the CPU time of this process and of every ffmpeg and ffprobe it
    ran, per audio second.
    """
    _, spec = model_and_frames(params)
    warm_decoder(params, spec)
    with measured() as record, ThreadPoolExecutor(params["workers"]) as pool:
        n_frames, chunks = decode_corpus(params, spec, pool)
        record["audio_s"] = n_frames * spec.hop_length / spec.sample_rate
    record.update(
        workers=params["workers"],
        chunks=chunks,
        frames=n_frames,
        core_s_per_audio_s=record["cpu_s"] / record["audio_s"],
    )
    return record


def warm_decoder(params: dict[str, Any], spec: FrameSpec) -> None:
    """Pay this process's one-time costs before measuring: decode the first chunk once.

    The first probe finds ffmpeg and checks what it can do (a few ffmpeg runs), and the first
    decode is dearer than the next ones (imports, and memory the allocator has not reused
    yet): 0.35 CPU-s against 0.20 s for a 6-minute WAV measured here. A stage's cost is its
    steady cost per audio second. Counted in, these would weigh on a small corpus, and on the
    decode stage alone more than on the co-run's decode side, which goes round the corpus
    several times. buzzdask's workers pay them once each, within buzzdask's CPU time.
    """
    info = probe_audio(params["files"][0])
    plan = plan_chunks(info, spec, frames_per_chunk=_frames_per_chunk(params, spec))[0]
    decode_chunk(info, plan, spec=spec)


def decode_corpus(
    params: dict[str, Any],
    spec: FrameSpec,
    pool: ThreadPoolExecutor,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Probe every file of ``params["files"]``, then decode each of its chunks, on ``pool``.

    ``on_chunk(frames so far)`` is called after each chunk, in chunk order.

    Returns
    -------
    frames : int
        Frames decoded.
    chunks : int
        Chunks decoded.
    """
    infos = list(pool.map(probe_audio, params["files"]))
    tasks = chunk_tasks(params, spec, infos)
    n_frames = 0
    for frames in pool.map(lambda task: decoded_frames(*task), tasks):
        n_frames += frames
        if on_chunk is not None:
            on_chunk(n_frames)
    return n_frames, len(tasks)


def chunk_tasks(
    params: dict[str, Any], spec: FrameSpec, infos: list[Any]
) -> list[tuple[Any, ChunkPlan, FrameSpec, float, tuple[str, ...]]]:
    """Arguments of :func:`decoded_frames` for every chunk buzzdask would decode."""
    frames_per_chunk = _frames_per_chunk(params, spec)
    settings = load_settings()
    margin_s = settings.decode_margin_seconds
    seekable = settings.seekable_codecs
    return [
        (info, plan, spec, margin_s, seekable)
        for info in infos
        for plan in plan_chunks(info, spec, frames_per_chunk=frames_per_chunk)
    ]


def decoded_frames(
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
    _, spec = model_and_frames(params)
    results: dict[str, Any] = {}
    for n_workers in params["worker_counts"]:
        started = time.perf_counter()
        client = buzzdask.cluster.start(
            "local-slurm", gpus=0, cpu_workers=n_workers, log_directory=params["work_dir"]
        )
        jobs_up_s = time.perf_counter() - started
        try:
            cpu_before = client.run(cpu_seconds)
            with measured() as record:
                infos = client.gather(client.map(probe_audio, params["files"], pure=False))
                tasks = chunk_tasks(params, spec, infos)
                futures = [client.submit(decoded_frames, *task, pure=False) for task in tasks]
                n_frames = sum(client.gather(futures))
                record["audio_s"] = n_frames * spec.hop_length / spec.sample_rate
            cpu_after = client.run(cpu_seconds)
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
    _, spec = model_and_frames(params)
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


def predecoded(
    params: dict[str, Any], spec: FrameSpec
) -> tuple[list[DecodedChunk], list[tuple[int, int, int]]]:
    """``seconds`` of corpus audio decoded up front, cut into chunks as buzzdask cuts them.

    Returns
    -------
    chunks : list of DecodedChunk
    origins : list of (file index in ``params["files"]``, first frame, frames)
        Where each chunk's frames are in the sequential baseline's output.
    """
    frames_per_chunk = _frames_per_chunk(params, spec)
    wanted = spec.n_complete_frames(round(params["seconds"] * spec.sample_rate))
    chunks: list[DecodedChunk] = []
    origins: list[tuple[int, int, int]] = []
    for index, path in enumerate(params["files"]):
        info = probe_audio(path)
        for plan in plan_chunks(info, spec, frames_per_chunk=frames_per_chunk):
            if wanted <= 0:
                return chunks, origins
            chunk = decode_chunk(info, plan, spec=spec)
            chunks.append(chunk)
            origins.append((index, chunk.first_frame, chunk.n_frames))
            wanted -= chunk.n_frames
    return chunks, origins


def save_activations(path: str, activations: list[np.ndarray], origins: list[Any]) -> None:
    """Chunks' activations and their origins (see :func:`predecoded`), for the equality check."""
    np.savez(path, activations=np.concatenate(activations), origins=np.asarray(origins))


def groups_of(chunks: list[DecodedChunk], batch_frames: int) -> list[list[DecodedChunk]]:
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

    Scores the same chunks ``passes`` times after one warm-up pass and reports every pass; the
    record's own numbers are the median pass by CPU time. Its cost, ``core_s_per_audio_s``, is
    that pass's CPU time (every TensorFlow thread) per audio second; loading the model is not
    part of it (``load_cpu_s``). Saves the activations and their origins to ``save`` if given.
    """
    model_spec, spec = model_and_frames(params)
    chunks, origins = predecoded(params, spec)
    with measured() as start:
        scorer = make_scorer(params, model_spec, spec)
    groups = groups_of(chunks, params["batch_frames"])
    audio_s = sum(c.n_frames for c in chunks) * spec.hop_length / spec.sample_rate
    with measured(audio_s) as warm_up:
        activations = [a for group in groups for a in scorer.score(group)]
    passes = []
    for _ in range(params["passes"]):
        with measured(audio_s) as record:
            for group in groups:
                scorer.score(group)
        passes.append(record)
    if params.get("save"):
        save_activations(params["save"], activations, origins)
    median = sorted(passes, key=lambda r: r["cpu_s"])[(len(passes) - 1) // 2]
    return {
        **median,
        "core_s_per_audio_s": median["cpu_s"] / audio_s,
        "passes": passes,
        "warm_up": warm_up,
        "start_up_s": start["wall_s"],
        "load_cpu_s": start["cpu_s"],
        "native_hop": scorer.native_hop,
    }


def baseline(params: dict[str, Any]) -> dict[str, Any]:
    """A sequential single-process analyzer: per file, decode it whole, score it, write it.

    No overlap between decoding and scoring; the model is loaded once (start-up included).
    Writes ``<output>/<file index:04d>.parquet``, the reference every other configuration's
    activations are checked against.
    """
    model_spec, spec = model_and_frames(params)
    output = Path(params["output"])
    output.mkdir(parents=True, exist_ok=True)
    split = {"start_up": 0.0, "decode": 0.0, "score": 0.0, "write": 0.0}
    n_frames = 0
    with measured() as record:
        with _split(split, "start_up"):
            scorer = make_scorer(params, model_spec, spec)
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
                    metadata_json="{}",
                )
                write_table(table, output / f"{index:04d}.parquet")
            n_frames += frames
        record["audio_s"] = n_frames * spec.hop_length / spec.sample_rate
    record["split_s"] = split
    record["frames"] = n_frames
    record["peak_rss_bytes"] = peak_rss_bytes()
    return record


@contextmanager
def _split(split: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    split[name] += time.perf_counter() - started


def cli_short_file(params: dict[str, Any]) -> dict[str, Any]:
    """The ``buzzdask analyze`` command on one short file, end to end, as a user runs it.

    From starting the command (its interpreter included) until it exits: it starts its own
    local cluster, loads the scorers, writes the output and shuts the cluster down. CPU time is
    the command's and its descendants' (reaped by then).
    """
    output = Path(params["output"])
    executable = Path(sys.executable).with_name("buzzdask")
    command = [str(executable)] if executable.is_file() else [sys.executable, "-m", "buzzdask"]
    command += [
        *("analyze", params["file"], "--model", params["model"]),
        *("--embedder", params["embedder"], "--output", str(output), "--no-progress"),
    ]
    with measured(probe_audio(params["file"]).duration_s) as record:
        finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
    record["command"] = command
    return record


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "decode": decode,
    "ffmpeg_settings": ffmpeg_settings,
    "model": model,
    "baseline": baseline,
    "slurm_decode": slurm_decode,
    "cli_short_file": cli_short_file,
}


def main(
    argv: list[str], stages: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = STAGES
) -> None:
    """``python -m benchmarks.stages NAME PARAMS RESULT_PATH``: run one of ``stages``.

    ``PARAMS`` is JSON, or ``@`` and the path of a JSON file: a thousand file paths would come
    near Linux's limit on one command-line argument (128 KiB).
    """
    name, params, result_path = argv
    if params.startswith("@"):
        params = Path(params[1:]).read_text(encoding="utf-8")
    result = stages[name](json.loads(params))
    Path(result_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1:])
