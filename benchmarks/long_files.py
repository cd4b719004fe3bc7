"""``python -m benchmarks.long_files``: decode cost per audio hour of one long m4a against an MP3.

An MP3 seeks sample-exactly: each chunk decodes only its own audio. AAC (m4a) cannot: buzzdask
decodes such a file once per node into a node-local float32 copy that its chunks slice
(:mod:`buzzdask.pcm_cache`), instead of decoding each chunk from the start of the file (which
grew with the square of the length). This measures both on generated ``--hours``-long files
(44.1 kHz stereo, 128 kb/s, pink noise and tones like the main corpus): the ffmpeg CPU time of
decoding every chunk as buzzdask's decode task does, one after the other in this process, per
audio hour, beside one plain whole-file decode of the same file.

Writes ``<out>/<UTC time>-<host>-long-files.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from benchmarks.corpus import default_cache_dir
from benchmarks.measure import REPO
from buzzdask.decode import (
    chunks_after,
    decode_chunk,
    decode_file,
    plan_chunks,
    probe_audio,
    release_decoded_copy,
)
from buzzdask.frames import FrameSpec
from buzzdask.settings import load_settings

__all__ = ["build_long_file", "measure_file", "main"]

_PIECE_S = 600  # encoded once, then repeated by stream copy: a 6-hour file in seconds
_CODECS = {"mp3": ["-c:a", "libmp3lame", "-b:a", "128k"], "m4a": ["-c:a", "aac", "-b:a", "128k"]}
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
    fmt : {"mp3", "m4a"}
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


def main(argv: list[str] | None = None) -> None:
    """Build (or reuse) the two long files, measure both, print and record the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_files", description=__doc__)
    parser.add_argument("--hours", type=float, default=6.0, help="length of each file (6)")
    parser.add_argument(
        "--chunk-seconds", type=float, default=None, help="default: buzzdask.chunk-seconds"
    )
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    directory = Path(args.cache_dir).expanduser() / "long-files"
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results = []
    scratch = tempfile.mkdtemp(prefix="bench-long-files-")
    try:
        for fmt in ("m4a", "mp3"):
            print(f"benchmarks: {args.hours:g} h {fmt} ...", flush=True)
            path = build_long_file(fmt, args.hours, directory)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{started}-{platform.node()}-long-files.json"
    record.write_text(json.dumps({"started": started, "results": results}, indent=2) + "\n")
    print(f"benchmarks: wrote {record}")


if __name__ == "__main__":
    main()
