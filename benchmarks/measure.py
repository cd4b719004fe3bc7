"""Run one stage in a fresh process and sample the memory of its whole process tree.

psutil reads the resident memory of the stage process and all its descendants (Dask workers,
ffmpeg) every ``interval`` seconds. Each process's peak is kept; ffmpeg processes, short-lived
and many, are summarised by the largest one seen. The sum over the tree at each sample is kept
too, as a time series (``tree_rss``): what the machine must hold for the whole run. It is a sum
of resident set sizes, so pages shared between processes (TensorFlow's libraries in two
workers) count once per process: an upper bound of the tree's own memory, and an ffmpeg that
lives between two samples is missed. A child caught between its fork and its ``exec`` (same
command line as its parent) is not counted: its pages are all its parent's, and counting them
would count a 1.8 GB worker twice each time it starts an ffmpeg.

Before the process starts, the stage's input files are read through once, so that every stage
finds them in the page cache. On a VM whose memory balloon shrinks the cache, whichever stage
read a corpus first otherwise paid its disk reads: decoding 8 h of 1-hour WAVs in one process
took 1.7 s of system time with the files out of the cache, 0.35 s with them in it (one ``analyze``
of them, likely out of the cache, spent 4.6 s of system time decoding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

__all__ = ["run_stage", "shared_models", "warm_page_cache"]

REPO = Path(__file__).resolve().parents[1]


def shared_models(shared_dir: str | None) -> tuple[Path, Path, Path]:
    """The shared data (``--shared-dir``), the lab's model and the rebuilt YAMNet in it.

    Default: ``$BUZZDASK_SHARED_DIR``, else ``../shared`` beside the repository.

    Returns
    -------
    (shared directory, model directory, embedder directory)
    """
    shared = Path(shared_dir or os.environ.get("BUZZDASK_SHARED_DIR") or REPO.parent / "shared")
    model = shared / "data" / "models" / "model_general_v3"
    embedder = shared / "models" / "yamnet" / "saved_model_wholehop"
    if not model.is_dir() or not embedder.is_dir():
        raise SystemExit(f"benchmarks: shared data not found under {shared} (--shared-dir)")
    return shared, model, embedder


def run_stage(
    name: str,
    params: dict[str, Any],
    *,
    module: str = "benchmarks.stages",
    interval: float = 0.1,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run stage ``name`` of ``module`` with ``params`` in a new Python process.

    Parameters
    ----------
    name : str
        A key of the module's ``STAGES`` (:data:`benchmarks.stages.STAGES`,
        :data:`benchmarks.corun.STAGES`).
    params : dict
        JSON-ready parameters of the stage.
    module : str
        The module whose ``STAGES`` holds the stage (run by :func:`benchmarks.stages.main`).
    interval : float > 0 [s]
        Memory sampling period.
    timeout : float > 0 [s]
        Longest the stage may run.

    Returns
    -------
    dict
        The stage's own record, plus ``process_wall_s`` (interpreter start-up included),
        ``peak_rss_per_process`` (list of ``{"pid", "name", "peak_rss_bytes", "cpu_s"}``, largest
        first; ``cpu_s`` is the CPU time last seen, so it misses at most ``interval``) and
        ``tree_rss`` (``peak_bytes``: the largest sum over the process tree at one sample;
        ``series``: ``[seconds since start, bytes]``, at most :data:`_SERIES_POINTS` points,
        each the largest sum in its time bin), and ``page_cache`` (:func:`warm_page_cache` of
        ``params["files"]``, read before the stage started).

    Raises
    ------
    RuntimeError
        If the stage process fails; the message ends with its stderr.
    """
    page_cache = warm_page_cache(params.get("files", []))
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as scratch:
        result_path = Path(scratch) / "result.json"
        params_path = Path(scratch) / "params.json"
        params_path.write_text(json.dumps(params), encoding="utf-8")
        # This checkout's buzzdask, not the one the venv has installed (an editable install may
        # point at another checkout: a worktree benchmarked with the main one's venv).
        sources = os.pathsep.join([str(REPO / "src"), str(REPO)])
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": sources}
        started = time.perf_counter()
        # Run with -c, not -m: a worker process that multiprocessing spawns (the local cluster's)
        # imports the parent's main module again, which a notebook or the command line would not
        # make it do (the command's main module is its small script).
        launcher = f"import sys; from benchmarks.stages import main; from {module} import STAGES; "
        launcher += "main(sys.argv[1:], STAGES)"
        process = subprocess.Popen(
            [sys.executable, "-c", launcher, name, f"@{params_path}", result_path],
            cwd=REPO,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peaks: dict[int, tuple[str, int, float]] = {}
        tree: list[tuple[float, int]] = []
        done = threading.Event()
        sampler = threading.Thread(
            target=_sample, args=(process.pid, peaks, tree, done, interval), daemon=True
        )
        sampler.start()
        try:
            _, stderr = process.communicate(timeout=timeout)
        finally:
            done.set()
            sampler.join()
        wall = time.perf_counter() - started
        if process.returncode != 0:
            raise RuntimeError(f"stage {name} failed ({process.returncode}):\n{stderr[-3000:]}")
        record = json.loads(result_path.read_text(encoding="utf-8"))
    record["process_wall_s"] = wall
    record["page_cache"] = page_cache
    record["peak_rss_per_process"] = _summarise(peaks)
    record["tree_rss"] = {
        "peak_bytes": max((rss for _, rss in tree), default=0),
        "interval_s": interval,
        "series": _downsample(tree, _SERIES_POINTS),
    }
    return record


def warm_page_cache(paths: list[str], *, block_bytes: int = 16 * 2**20) -> dict[str, float]:
    """Read ``paths`` through once, so that the next reader finds them in the page cache.

    Parameters
    ----------
    paths : list of str
        Files; a directory or a missing path is skipped (the stage reports it, not this).
    block_bytes : int > 0
        Bytes per read, into one reused buffer.

    Returns
    -------
    dict
        ``files`` and ``bytes`` read, and ``read_s``, the wall seconds it took: far more than
        ``bytes`` at memory speed means the files were not in the cache.
    """
    buffer = bytearray(block_bytes)
    files = read = 0
    started = time.perf_counter()
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as stream:
                while count := stream.readinto(buffer):
                    read += count
        except (IsADirectoryError, FileNotFoundError):
            continue
        files += 1
    return {"files": files, "bytes": read, "read_s": time.perf_counter() - started}


#: Points kept of each stage's tree-RSS series (a 60 s stage sampled every 0.1 s has 600).
_SERIES_POINTS = 200


def _sample(
    root: int,
    peaks: dict[int, tuple[str, int, float]],
    tree: list[tuple[float, int]],
    done: threading.Event,
    interval: float,
) -> None:
    """Until ``done``: each process's largest RSS and last CPU time, and the tree's RSS sum."""
    try:
        parent = psutil.Process(root)
    except psutil.NoSuchProcess:
        return
    started = time.perf_counter()
    while not done.is_set():
        try:
            processes = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        command_lines: dict[int, list[str]] = {}
        for process in processes:
            try:
                with process.oneshot():
                    rss = process.memory_info().rss
                    name = process.name()
                    times = process.cpu_times()
                    command_lines[process.pid] = process.cmdline()
                    parent_pid = process.ppid()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if command_lines.get(parent_pid) == command_lines[process.pid]:
                continue  # forked, not yet exec'd: its parent's pages
            total += rss
            peak = max(rss, peaks.get(process.pid, ("", 0, 0.0))[1])
            peaks[process.pid] = (name, peak, times.user + times.system)
        tree.append((time.perf_counter() - started, total))
        done.wait(interval)


def _downsample(series: list[tuple[float, int]], points: int) -> list[list[float]]:
    """At most ``points`` of ``series``: the largest value of each of ``points`` equal bins."""
    if len(series) <= points:
        return [[round(t, 2), rss] for t, rss in series]
    size = -(-len(series) // points)
    bins = (series[i : i + size] for i in range(0, len(series), size))
    return [[round(b[0][0], 2), max(rss for _, rss in b)] for b in bins]


def _summarise(peaks: dict[int, tuple[str, int, float]]) -> list[dict[str, Any]]:
    ffmpeg = [(pid, rss, cpu) for pid, (name, rss, cpu) in peaks.items() if name.startswith("ff")]
    rows = [
        {"pid": pid, "name": name, "peak_rss_bytes": rss, "cpu_s": cpu}
        for pid, (name, rss, cpu) in peaks.items()
        if not name.startswith("ff")
    ]
    if ffmpeg:
        pid, rss, _ = max(ffmpeg, key=lambda item: item[1])
        rows.append(
            {
                "pid": pid,
                "name": f"ffmpeg (largest of {len(ffmpeg)}; cpu_s: all seen)",
                "peak_rss_bytes": rss,
                "cpu_s": sum(cpu for _, _, cpu in ffmpeg),
            }
        )
    return sorted(rows, key=lambda row: -row["peak_rss_bytes"])
