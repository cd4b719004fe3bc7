"""``python -m benchmarks.long_files``: single very long files, decoded and analysed.

**Decode cost** (the default): per audio hour, of one long m4a against an MP3.

An MP3 seeks sample-exactly: each chunk decodes only its own audio. AAC (m4a) cannot: buzzdask
decodes such a file once per node into a node-local float32 copy that its chunks slice
(:mod:`buzzdask.pcm_cache`), instead of decoding each chunk from the start of the file (which
grew with the square of the length). This measures both on generated ``--hours``-long files
(44.1 kHz stereo, 128 kb/s, pink noise and tones like the main corpus): the ffmpeg CPU time of
decoding every chunk as buzzdask's decode task does, one after the other in this process, per
audio hour, beside one plain whole-file decode of the same file.

Writes ``<out>/<UTC time>-<host>-long-files.json`` and prints a table.

**Analysis** (``--analyze``): ``buzzdask.analyze`` of one 24-hour WAV and one 24-hour MP3 (and a
1-hour file of each, the reference), each alone on a fresh ``LocalCluster`` of 2 worker
processes with 1 thread each, under a set memory budget (256 MiB), with the real model
(``model_general_v3`` on the reconstructed YAMNet, whole hop, from the shared data). A thread
here reads the resident memory of every worker process and of its children (ffmpeg) from
outside, with psutil, every 0.5 s: memory is measured by the operating system, not by buzzdask's
own budget counter (``peak_decoded_bytes_in_flight``, recorded beside it). If memory grew with
the length of the file, the 24-hour peaks would exceed the 1-hour ones, and the second half of a
run would peak above its first half. Then every frame start is read back from the output: the
frame count must be that of the whole file decoded in one piece with the same preprocessing
(``FrameSpec.n_complete_frames``: the last partial frame is dropped), and the starts exactly
``i * hop / sample_rate``, without gap or duplicate.

The WAV is 16-bit **16 kHz mono**: 2.8 GB for 24 hours. At the field recorders' 44.1 kHz stereo
it would be 15 GB, past the 4 GiB a RIFF WAV can address (recorders split their files, or
write RF64), and more disk than a benchmark should take. It needs no resampling. The MP3 is
128 kb/s 44.1 kHz stereo (1.4 GB), decoded and resampled as recorders' files are. A WAV chunk's
ffmpeg lives less than a second, so 0.5 s sampling misses some of them: ffmpeg's peak is a lower
bound (tens of MiB, against GiB for a worker).

Writes ``<out>/<UTC time>-<host>-long-files-analyze.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.corpus import default_cache_dir
from benchmarks.measure import REPO, shared_models
from benchmarks.report import describe_machine
from buzzdask.decode import (
    chunks_after,
    decode_chunk,
    decode_file,
    plan_chunks,
    preprocess_filters,
    probe_audio,
    release_decoded_copy,
)
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.frames import FrameSpec
from buzzdask.settings import load_settings

__all__ = [
    "RssSampler",
    "build_long_file",
    "measure_analysis",
    "measure_file",
    "whole_file_frames",
    "main",
]

_PIECE_S = 600  # encoded once, then repeated by stream copy: a 6-hour file in seconds
_CODECS = {
    "mp3": ["-c:a", "libmp3lame", "-b:a", "128k"],
    "m4a": ["-c:a", "aac", "-b:a", "128k"],
    # 16 kHz mono: a 24-hour file fits a RIFF WAV (under 4 GiB); see the module's docstring.
    "wav": ["-c:a", "pcm_s16le", "-ar", "16000", "-ac", "1"],
}
_TRACE_POINTS = 60  # the JSON record keeps at most this many (time, RSS sum) points per run
#: YAMNet's framing at 16 kHz (frame 0.96 s, hop 0.96 s, 15 ms context).
SPEC = FrameSpec(sample_rate=16000, frame_length=15360, hop_length=15360, context=240)


def _children_cpu_s() -> float:
    """CPU seconds of the ffmpeg processes this process ran and reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build_long_file(fmt: str, hours: float, directory: Path) -> Path:
    """A ``hours``-long file: a 10-minute piece encoded once, repeated by stream copy (cached).

    Parameters
    ----------
    fmt : {"mp3", "m4a", "wav"}
        128 kb/s 44.1 kHz stereo (mp3, m4a), or 16-bit 16 kHz mono (wav).
    hours : float > 0 [h]
    directory : Path
        Where the file is kept between runs.
    """
    target = directory / f"long-{fmt}-{hours:g}h.{fmt}"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    piece = directory / f".piece-{_PIECE_S}s.{fmt}"
    if not piece.is_file():
        rate, seconds = 44100, _PIECE_S
        noise = [f"anoisesrc=d={seconds}:c=pink:r={rate}:a=0.05:seed={s}" for s in (1, 2)]
        graph = (
            f"{noise[0]}[n1];{noise[1]}[n2];sine=f=220:r={rate}:d={seconds},volume=0.1[t1];"
            f"sine=f=180:r={rate}:d={seconds},volume=0.2,tremolo=f=0.2:d=0.9[t2];"
            "[n1][t1]amix=inputs=2:normalize=0[l];[n2][t2]amix=inputs=2:normalize=0[r];"
            "[l][r]amerge=inputs=2[out]"
        )
        partial = piece.with_name(f".partial{piece.name}")
        subprocess.run(
            [
                *("ffmpeg", "-nostdin", "-v", "error", "-y", "-filter_complex", graph),
                *("-map", "[out]", *_CODECS[fmt], str(partial)),
            ],
            check=True,
        )
        partial.replace(piece)
    repeats = max(1, round(hours * 3600 / _PIECE_S))
    listing = directory / f".list-{fmt}.txt"
    listing.write_text("".join(f"file '{piece.name}'\n" for _ in range(repeats)))
    partial = target.with_name(f".partial{target.name}")
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0"),
            *("-i", str(listing), "-c", "copy", str(partial)),
        ],
        check=True,
    )
    partial.replace(target)
    return target


def measure_file(path: Path, *, chunk_seconds: float, copy_directory: str) -> dict[str, Any]:
    """Decode every chunk of ``path`` as buzzdask's decode task does; then the file whole.

    Returns
    -------
    dict
        ``audio_hours``, ``chunks``, ``chunked_cpu_s`` and ``chunked_wall_s`` (every chunk),
        ``whole_cpu_s`` (one plain decode), and both per audio hour.
    """
    settings = load_settings(chunk_seconds=chunk_seconds)
    frames_per_chunk = SPEC.frames_per_chunk(settings.chunk_seconds)
    options: dict[str, Any] = {
        "spec": SPEC,
        "margin_s": settings.decode_margin_seconds,
        "seekable_codecs": settings.seekable_codecs,
        "copy_directory": copy_directory,
    }
    info = probe_audio(path)
    plans = deque(plan_chunks(info, SPEC, frames_per_chunk=frames_per_chunk))
    n_frames = n_chunks = 0
    cpu, wall = _children_cpu_s(), time.perf_counter()
    while plans:
        plan = plans.popleft()
        chunk = decode_chunk(info, plan, **options)
        n_frames += chunk.n_frames
        n_chunks += 1
        if not plans:
            plans.extend(chunks_after(plan, chunk.n_frames, frames_per_chunk=frames_per_chunk))
    chunked_cpu, chunked_wall = _children_cpu_s() - cpu, time.perf_counter() - wall
    release_decoded_copy(info, **options)
    cpu = _children_cpu_s()
    decode_file(path, sample_rate=SPEC.sample_rate)
    whole_cpu = _children_cpu_s() - cpu
    hours = n_frames * SPEC.hop_length / SPEC.sample_rate / 3600
    return {
        "file": path.name,
        "codec": info.codec,
        "audio_hours": hours,
        "chunk_seconds": settings.chunk_seconds,
        "chunks": n_chunks,
        "chunked_cpu_s": chunked_cpu,
        "chunked_wall_s": chunked_wall,
        "whole_cpu_s": whole_cpu,
        "chunked_cpu_s_per_audio_hour": chunked_cpu / hours,
        "whole_cpu_s_per_audio_hour": whole_cpu / hours,
    }


def whole_file_frames(path: Path) -> tuple[int, int]:
    """Samples and complete frames of ``path`` decoded in one piece with buzzdask's preprocessing.

    The reference of the frame check: ffmpeg's float32 output is counted as it streams (24 hours
    are 5.5 GB at 16 kHz), not kept.

    Returns
    -------
    n_samples : int [samples at SPEC.sample_rate]
    n_frames : int
        ``SPEC.n_complete_frames(n_samples)``: the last partial frame is dropped.
    """
    info = probe_audio(path)
    command = [
        *(find_ffmpeg().ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0"),
        *("-af", preprocess_filters(info.channels, SPEC.sample_rate), "-f", "f32le", "pipe:"),
    ]
    n_bytes = 0
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as process:
        assert process.stdout is not None
        while block := process.stdout.read(1 << 20):
            n_bytes += len(block)
    if process.returncode != 0:
        raise RuntimeError(f"ffmpeg could not decode {path} (exit {process.returncode})")
    return n_bytes // 4, SPEC.n_complete_frames(n_bytes // 4)


class RssSampler:
    """Resident memory of worker processes and their children, read from outside by psutil.

    A context manager: a thread reads, every ``interval`` seconds, the RSS of each worker
    process, the sum over its children (ffmpeg), and this process's own (the client, with
    ``LocalCluster``'s scheduler).

    Parameters
    ----------
    workers : dict of str -> int
        Worker address to process id (``client.run(os.getpid)``).
    interval : float > 0 [s]
    """

    def __init__(self, workers: dict[str, int], interval: float) -> None:
        self._workers = {address: psutil.Process(pid) for address, pid in workers.items()}
        self._client = psutil.Process()
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        #: (seconds since start, client RSS, {address: (worker RSS, its children's RSS)})
        self.samples: list[tuple[float, int, dict[str, tuple[int, int]]]] = []
        self.largest_child_bytes = 0
        self.children_seen: set[int] = set()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        started = time.perf_counter()
        while not self._done.is_set():
            row: dict[str, tuple[int, int]] = {}
            for address, process in self._workers.items():
                try:
                    own = process.memory_info().rss
                    children = process.children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                row[address] = (own, sum(self._child_rss(child) for child in children))
            rss = self._client.memory_info().rss
            self.samples.append((time.perf_counter() - started, rss, row))
            self._done.wait(self._interval)

    def _child_rss(self, child: psutil.Process) -> int:
        try:
            rss = int(child.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0
        self.children_seen.add(child.pid)
        self.largest_child_bytes = max(self.largest_child_bytes, rss)
        return rss

    def summary(self) -> dict[str, Any]:
        """Peaks per worker and of their sum, over the whole run and each half; a short trace.

        Returns
        -------
        dict
            ``samples``, ``peak_worker_rss_bytes`` (per address: the worker process alone),
            ``peak_worker_with_children_rss_bytes`` (per address), ``peak_sum_rss_bytes`` (all
            workers and children at one sample), ``peak_sum_first_half_bytes`` and
            ``peak_sum_second_half_bytes`` (by time), ``peak_client_rss_bytes``,
            ``largest_child_rss_bytes``, ``children_seen``, and ``trace`` (at most
            ``_TRACE_POINTS`` pairs of seconds and the largest sum in MiB since the last pair).
        """
        times = [t for t, _, _ in self.samples]
        sums = [sum(own + kids for own, kids in row.values()) for _, _, row in self.samples]
        half = times[-1] / 2 if times else 0.0
        per_worker: dict[str, int] = {}
        with_children: dict[str, int] = {}
        for _, _, row in self.samples:
            for address, (own, kids) in row.items():
                per_worker[address] = max(per_worker.get(address, 0), own)
                with_children[address] = max(with_children.get(address, 0), own + kids)
        step = max(1, -(-len(sums) // _TRACE_POINTS))
        return {
            "samples": len(self.samples),
            "interval_s": self._interval,
            "peak_worker_rss_bytes": per_worker,
            "peak_worker_with_children_rss_bytes": with_children,
            "peak_sum_rss_bytes": max(sums, default=0),
            "peak_sum_first_half_bytes": max(
                (v for t, v in zip(times, sums, strict=True) if t < half), default=0
            ),
            "peak_sum_second_half_bytes": max(
                (v for t, v in zip(times, sums, strict=True) if t >= half), default=0
            ),
            "peak_client_rss_bytes": max((rss for _, rss, _ in self.samples), default=0),
            "largest_child_rss_bytes": self.largest_child_bytes,
            "children_seen": len(self.children_seen),
            "trace": [
                [
                    round(times[min(i + step, len(times)) - 1], 1),
                    round(max(sums[i : i + step]) / 2**20),
                ]
                for i in range(0, len(sums), step)
            ],
        }


def measure_analysis(
    path: Path,
    *,
    model: Path,
    embedder: Path,
    memory_budget: str,
    chunk_seconds: float | None,
    interval: float,
    work_dir: Path,
) -> dict[str, Any]:
    """``buzzdask.analyze`` of ``path`` alone on a fresh 2-worker ``LocalCluster``, sampled.

    Parameters
    ----------
    path : Path
        One long audio file.
    model, embedder : Path
        The model directory and the embedder's SavedModel.
    memory_budget : str
        ``buzzdask.analyze``'s ``memory_budget`` (``"256MiB"``).
    chunk_seconds : float > 0 [s] or None
        ``buzzdask.analyze``'s ``chunk_seconds`` (None: ``buzzdask.chunk-seconds``, 600).
    interval : float > 0 [s]
        RSS sampling period (:class:`RssSampler`).
    work_dir : Path
        Where the output is written, then removed.

    Returns
    -------
    dict
        The file, the run's own summary figures (wall, realtime factor, budget, its peak of
        decoded bytes in flight, each worker's ``ru_maxrss``), ``rss`` (:meth:`RssSampler.summary`)
        and ``frames``: the count against :func:`whole_file_frames` and the starts' check.
    """
    from distributed import Client, LocalCluster

    # Its module imported here, not on first use inside the measured time.
    from buzzdask import analyze as buzzdask_analyze

    info = probe_audio(path)
    n_samples, expected = whole_file_frames(path)
    scratch = Path(tempfile.mkdtemp(prefix="bench-long-analyze-", dir=work_dir))
    try:
        with (
            LocalCluster(
                n_workers=2,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster) as client,
        ):
            with RssSampler(client.run(os.getpid), interval) as sampler:
                result = buzzdask_analyze(
                    str(path),
                    str(model),
                    output=scratch / "out",
                    client=client,
                    embedder=str(embedder),
                    memory_budget=memory_budget,
                    chunk_seconds=chunk_seconds,
                    progress=False,
                )
        starts = np.sort(result.to_dask()["start"].compute().to_numpy())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    exact = np.arange(len(starts), dtype=np.int64) * SPEC.hop_length / SPEC.sample_rate
    steps = np.diff(starts)
    summary = result.summary
    return {
        "file": path.name,
        "codec": info.codec,
        "input_sample_rate": info.sample_rate,
        "input_channels": info.channels,
        "size_bytes": info.size_bytes,
        "audio_hours": summary["audio_hours"],
        "chunks": summary["chunks_written"],
        "errors": len(result.errors),
        "wall_s": summary["wall_seconds"],
        "realtime_factor": summary["realtime_factor"],
        "memory_budget_bytes": summary["memory_budget_bytes"],
        "peak_decoded_bytes_in_flight": summary["peak_decoded_bytes_in_flight"],
        "buzzdask_peak_rss_bytes": summary["peak_rss_bytes"],
        "rss": sampler.summary(),
        "frames": {
            "whole_file_samples": n_samples,
            "expected": expected,
            "written": len(starts),
            "in_summary": summary["frames"],
            "starts_exact": bool(np.array_equal(starts, exact)),
            "duplicate_starts": int(len(starts) - len(np.unique(starts))),
            "smallest_step_s": float(steps.min()) if len(steps) else None,
            "largest_step_s": float(steps.max()) if len(steps) else None,
            "last_start_s": float(starts[-1]) if len(starts) else None,
            "ok": len(starts) == expected == summary["frames"]
            and bool(np.array_equal(starts, exact)),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Build (or reuse) the long files, measure them, print and record the figures."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.long_files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--analyze", action="store_true", help="run buzzdask.analyze on a WAV and an MP3"
    )
    parser.add_argument(
        "--hours", type=float, default=None, help="length of each file (6; --analyze: 24)"
    )
    parser.add_argument(
        "--chunk-seconds", type=float, default=None, help="default: buzzdask.chunk-seconds"
    )
    parser.add_argument(
        "--reference-hours", type=float, default=1.0, help="--analyze: the short file (1)"
    )
    parser.add_argument("--memory-budget", default="256MiB", help="--analyze: (256MiB)")
    parser.add_argument(
        "--interval", type=float, default=0.5, help="--analyze: RSS sampling period in s (0.5)"
    )
    parser.add_argument("--shared-dir", default=None, help="default: $BUZZDASK_SHARED_DIR")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    directory = Path(args.cache_dir).expanduser() / "long-files"
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if args.analyze:
        record = _analyze(args, directory)
        suffix = "long-files-analyze"
    else:
        record = {"results": _decode(args, directory)}
        suffix = "long-files"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{started}-{platform.node()}-{suffix}.json"
    path.write_text(json.dumps({"started": started, **record}, indent=2) + "\n")
    print(f"benchmarks: wrote {path}")


def _decode(args: argparse.Namespace, directory: Path) -> list[dict[str, Any]]:
    """The decode cost of an m4a and an MP3 of ``args.hours`` (6); prints the table."""
    hours = args.hours or 6.0
    results = []
    scratch = tempfile.mkdtemp(prefix="bench-long-files-")
    try:
        for fmt in ("m4a", "mp3"):
            print(f"benchmarks: {hours:g} h {fmt} ...", flush=True)
            path = build_long_file(fmt, hours, directory)
            results.append(
                measure_file(path, chunk_seconds=args.chunk_seconds, copy_directory=scratch)
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{'file':<22}{'chunks':>7}{'chunked CPU-s/h':>17}{'whole CPU-s/h':>15}")
    for row in results:
        print(
            f"{row['file']:<22}{row['chunks']:>7}{row['chunked_cpu_s_per_audio_hour']:>17.2f}"
            f"{row['whole_cpu_s_per_audio_hour']:>15.2f}"
        )
    return results


def _analyze(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """``measure_analysis`` of a WAV and an MP3, reference length then ``args.hours`` (24)."""
    _, model, embedder = shared_models(args.shared_dir)
    hours = args.hours or 24.0
    load_start = os.getloadavg()[0]
    results = []
    print(
        f"{'file':<20}{'chunks':>7}{'wall s':>8}{'RTF':>6}{'workers MiB':>13}{'sum':>6}"
        f"{'1st/2nd half':>14}{'client':>7}{'in flight':>10}{'frames':>14}",
        flush=True,
    )
    for fmt in ("wav", "mp3"):
        for length in (args.reference_hours, hours):
            row = measure_analysis(
                build_long_file(fmt, length, directory),
                model=model,
                embedder=embedder,
                memory_budget=args.memory_budget,
                chunk_seconds=args.chunk_seconds,
                interval=args.interval,
                work_dir=directory,
            )
            results.append(row)
            print(_analysis_line(row), flush=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True
    ).stdout.splitlines()
    return {
        "machine": describe_machine(),
        "commit": commit,
        "src_uncommitted": [line[3:] for line in changed if line],
        "load_average_1min": [load_start, os.getloadavg()[0]],
        "model": f"{model.name} on YAMNet (reconstructed), {embedder.name}",
        "cluster": "LocalCluster, 2 worker processes, 1 thread each",
        "memory_budget": args.memory_budget,
        "chunk_seconds": args.chunk_seconds or load_settings().chunk_seconds,
        "results": results,
    }


def _analysis_line(row: dict[str, Any]) -> str:
    """One run of :func:`measure_analysis` as a table row (MiB; worker peaks with children)."""
    rss, frames, mib = row["rss"], row["frames"], 2**20
    workers = "/".join(
        f"{v / mib:.0f}" for v in rss["peak_worker_with_children_rss_bytes"].values()
    )
    halves = "/".join(
        f"{rss[k] / mib:.0f}" for k in ("peak_sum_first_half_bytes", "peak_sum_second_half_bytes")
    )
    return (
        f"{row['file']:<20}{row['chunks']:>7}{row['wall_s']:>8.1f}{row['realtime_factor']:>6.0f}"
        f"{workers:>13}{rss['peak_sum_rss_bytes'] / mib:>6.0f}{halves:>14}"
        f"{rss['peak_client_rss_bytes'] / mib:>7.0f}"
        f"{row['peak_decoded_bytes_in_flight'] / mib:>10.0f}{frames['written']:>8}"
        f"{'ok' if frames['ok'] else 'WRONG':>6}"
    )


if __name__ == "__main__":
    main()
