"""Run one stage in a fresh process and sample the memory of its whole process tree.

psutil reads the resident memory of the stage process and all its descendants (Dask workers,
ffmpeg) every ``interval`` seconds. Each process's peak is kept; ffmpeg processes, short-lived
and many, are summarised by the largest one seen.
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

__all__ = ["run_stage"]

REPO = Path(__file__).resolve().parents[1]


def run_stage(
    name: str, params: dict[str, Any], *, interval: float = 0.1, timeout: float = 3600
) -> dict[str, Any]:
    """Run ``benchmarks.stages`` stage ``name`` with ``params`` in a new Python process.

    Parameters
    ----------
    name : str
        A key of :data:`benchmarks.stages.STAGES`.
    params : dict
        JSON-ready parameters of the stage.
    interval : float > 0 [s]
        Memory sampling period.
    timeout : float > 0 [s]
        Longest the stage may run.

    Returns
    -------
    dict
        The stage's own record, plus ``process_wall_s`` (interpreter start-up included) and
        ``peak_rss_per_process`` (list of ``{"pid", "name", "peak_rss_bytes", "cpu_s"}``, largest
        first; ``cpu_s`` is the CPU time last seen, so it misses at most ``interval``).

    Raises
    ------
    RuntimeError
        If the stage process fails; the message ends with its stderr.
    """
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as scratch:
        result_path = Path(scratch) / "result.json"
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.stages", name, json.dumps(params), result_path],
            cwd=REPO,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        peaks: dict[int, tuple[str, int, float]] = {}
        done = threading.Event()
        sampler = threading.Thread(
            target=_sample, args=(process.pid, peaks, done, interval), daemon=True
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
    record["peak_rss_per_process"] = _summarise(peaks)
    return record


def _sample(
    root: int, peaks: dict[int, tuple[str, int, float]], done: threading.Event, interval: float
) -> None:
    """Keep each process's largest resident set size and last CPU time until ``done`` is set."""
    try:
        parent = psutil.Process(root)
    except psutil.NoSuchProcess:
        return
    while not done.is_set():
        try:
            processes = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                with process.oneshot():
                    rss = process.memory_info().rss
                    name = process.name()
                    times = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            peak = max(rss, peaks.get(process.pid, ("", 0, 0.0))[1])
            peaks[process.pid] = (name, peak, times.user + times.system)
        done.wait(interval)


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
