"""Where a local cluster's CPU time went: per process and per thread, read from ``/proc``.

The operating system's accounting, through psutil, not buzzdask's own counters. Read in the
process that started the cluster, after ``analyze`` returns and before the cluster closes:

- **ffmpeg and ffprobe**: the CPU time of the children each worker has reaped (``cutime`` and
  ``cstime``: workers start no other processes), plus those the client ran (ffmpeg checks).
- **TensorFlow in the scorers**: the threads of a scorer's worker that Python did not start
  (not in its ``threading.enumerate()``): TensorFlow's inter- and intra-op pools, which run the
  embedder and the head. Other native pools (Arrow's, OpenBLAS's) would be counted here too;
  ``threads`` lists the busiest threads by their kernel names (``tf_Compute``...), so a reader
  can see which ran. The Python side of a score call (laying out the batch waveform, the
  actor's bookkeeping) and the model load's Python part count under the rest of the worker.
- **the rest of each worker**: its own CPU time less the above, split into its event loop
  and its other threads. A worker process runs its event loop on its main thread, so
  ``event_loop_s`` holds the process's start-up (imports) as well as receiving and sending
  data and the worker protocol. The other threads are its task threads (reading ffmpeg's
  pipe, writing partitions, the scorer's construction: TensorFlow's import and the model
  load) and any thread that has exited.
- **the scheduler**: the event-loop thread it runs on in the client's process (a
  ``LocalCluster`` keeps it there). The nannies and the client's own comms share that loop,
  so they count here too, and so does the task-stream plugin the benchmark adds.
- **the client**: the rest of the client's process (buzzdask's ``analyze``: the chunk loop, the
  ledger and journal, its lock's heartbeat; Dask's (de)serialisation threads).
- **other processes**: any other descendant (multiprocessing's resource tracker).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import psutil

__all__ = ["cluster_cpu", "loop_threads", "own_snapshot", "thread_cpu"]

_TOP_THREADS = 6  # busiest threads listed per process


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of each live thread of ``pid``, with its kernel name.

    Returns
    -------
    dict of thread id -> (name, seconds)
        The name is ``/proc/<pid>/task/<tid>/comm`` (TensorFlow names its threads ``tf_...``;
        others inherit ``python``).
    """
    threads: dict[int, tuple[str, float]] = {}
    for thread in psutil.Process(pid).threads():
        try:
            name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text(encoding="utf-8").strip()
        except OSError:  # the thread exited between the two reads
            continue
        threads[thread.id] = (name, thread.user_time + thread.system_time)
    return threads


def loop_threads() -> dict[str, Any]:
    """Run on a server's event loop (``client.run``, ``run_on_scheduler``): who its threads are.

    Returns
    -------
    dict
        ``pid``, ``loop`` (the event loop's thread id) and ``python`` (the ids of the threads
        Python started, with their Python names).
    """
    return {
        "pid": os.getpid(),
        "loop": threading.get_native_id(),
        "python": {t.native_id: t.name for t in threading.enumerate()},
    }


def own_snapshot() -> dict[str, Any]:
    """This process's CPU time and its threads', taken before the cluster starts."""
    times = psutil.Process().cpu_times()
    return {
        "cpu_s": times.user + times.system,
        "children_s": times.children_user + times.children_system,
        "threads": thread_cpu(os.getpid()),
    }


def cluster_cpu(client: Any, before: dict[str, Any], scorer_pids: set[int]) -> dict[str, Any]:
    """The CPU time of this process (since ``before``) and of every descendant (since it started).

    Parameters
    ----------
    client : distributed.Client
        Connected to a ``LocalCluster`` started in this process after ``before``.
    before : dict
        :func:`own_snapshot` from before the cluster started.
    scorer_pids : set of int
        The processes of the workers holding a scorer.

    Returns
    -------
    dict
        ``categories`` (seconds: ``ffmpeg_ffprobe``, ``tensorflow_in_scorers``,
        ``workers_rest``, ``scheduler``, ``client``, ``other_processes`` and their ``total``),
        ``workers`` (per worker: the same split, its event loop and busiest threads) and
        ``client_process`` (its loop and main thread).
    """
    scheduler = client.run_on_scheduler(loop_threads)
    workers = {info["pid"]: info for info in client.run(loop_threads).values()}
    me = psutil.Process()
    times = me.cpu_times()
    threads = thread_cpu(me.pid)
    own_s = times.user + times.system - before["cpu_s"]
    client_children_s = times.children_user + times.children_system - before["children_s"]
    scheduler_s = _since(threads, before["threads"], scheduler["loop"])
    per_worker = [_worker(info, scorer=pid in scorer_pids) for pid, info in workers.items()]
    others = [
        p for p in me.children(recursive=True) if p.pid not in workers and p.ppid() not in workers
    ]
    other_s = sum(_process_s(p) for p in others)
    categories = {
        "ffmpeg_ffprobe": sum(w["ffmpeg_ffprobe_s"] for w in per_worker) + client_children_s,
        "tensorflow_in_scorers": sum(w["tensorflow_s"] for w in per_worker),
        "workers_rest": sum(w["rest_s"] for w in per_worker),
        "scheduler": scheduler_s,
        "client": own_s - scheduler_s,
        "other_processes": other_s,
    }
    categories["total"] = sum(categories.values())
    return {
        "categories": categories,
        "workers": per_worker,
        "client_process": {
            "pid": me.pid,
            "cpu_s": own_s,
            "reaped_children_s": client_children_s,
            "scheduler_loop_s": scheduler_s,
            "main_thread_s": _since(threads, before["threads"], threading.main_thread().native_id),
            "threads": _top(threads, set(scheduler["python"])),
        },
        "other_processes": [
            {"pid": p.pid, "name": _name(p), "cpu_s": _process_s(p)} for p in others
        ],
    }


def _worker(info: dict[str, Any], *, scorer: bool) -> dict[str, Any]:
    """One worker's split: reaped ffmpeg/ffprobe, native (TensorFlow) threads, the rest."""
    process = psutil.Process(info["pid"])
    times = process.cpu_times()
    threads = thread_cpu(info["pid"])
    python = set(info["python"])
    native_s = sum(cpu for tid, (_, cpu) in threads.items() if tid not in python)
    own_s = times.user + times.system
    tensorflow_s = native_s if scorer else 0.0
    loop_s = threads.get(info["loop"], ("", 0.0))[1]
    return {
        "pid": info["pid"],
        "scorer": scorer,
        "total_s": own_s + times.children_user + times.children_system,
        "ffmpeg_ffprobe_s": times.children_user + times.children_system,
        "tensorflow_s": tensorflow_s,
        "rest_s": own_s - tensorflow_s,
        "event_loop_s": loop_s,
        "native_threads_s": native_s,
        "other_python_threads_s": own_s - native_s - loop_s,
        "threads": _top(threads, python),
    }


def _since(
    now: dict[int, tuple[str, float]], before: dict[int, tuple[str, float]], tid: int
) -> float:
    """Thread ``tid``'s CPU seconds since ``before`` (all of it if it started since)."""
    return now.get(tid, ("", 0.0))[1] - before.get(tid, ("", 0.0))[1]


def _top(threads: dict[int, tuple[str, float]], python: set[int]) -> list[list[Any]]:
    """The busiest threads: ``[kernel name, "python" or "native", seconds]``."""
    rows = sorted(threads.items(), key=lambda item: -item[1][1])[:_TOP_THREADS]
    return [
        [name, "python" if tid in python else "native", round(cpu, 3)] for tid, (name, cpu) in rows
    ]


def _process_s(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline()[:3]) or process.name()
    except psutil.NoSuchProcess:
        return "?"
