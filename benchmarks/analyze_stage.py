"""The ``analyze`` stage: ``buzzdask.analyze`` on a fresh local cluster, read from outside.

Run as stage ``analyze`` of this module (:func:`benchmarks.measure.run_stage` with
``module="benchmarks.analyze_stage"``). Its CPU time is read per process and per thread
(:mod:`benchmarks.cpu_split`) before the cluster closes; its time split comes from Dask's task
stream.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.stages import cores, main, measured
from buzzdask.settings import load_settings

__all__ = ["STAGES", "analyze", "rescore"]


def analyze(params: dict[str, Any]) -> dict[str, Any]:
    """``buzzdask.analyze`` on a fresh local cluster, its start-up included.

    The cluster is the one ``analyze()`` starts when given no client
    (:func:`buzzdask.session.start_local_cluster`: its workers, threads and scheduler settings),
    started here so that its processes can be read before it closes. Wall time runs from
    starting it until ``analyze`` returns with every partition written; shutting the cluster
    down afterwards is not part of the analysis. CPU time is this process's since the start
    plus every descendant's since it started (workers, their ffmpeg and ffprobe), split by
    :func:`benchmarks.cpu_split.cluster_cpu` (``cpu_split``).

    ``settings`` holds ``buzzdask.*`` config keys without their prefix (``cpu-scorer-workers``,
    ``local-cluster.n-workers``...) and full ``distributed.*`` keys. The dashboard takes a free
    port (``local-cluster.dashboard-address: ":0"``) unless set. ``inputs`` (default ``files``)
    is what ``analyze`` is given: files, or the small-files corpus's directory. The time split
    comes from Dask's task stream (decode compute, transfers to the scorer, score tasks) and
    the actors' own counters (seconds scoring).

    ``model`` may be a list of heads (one run, ``output/<model name>/`` each; the figures are
    the first head's summary, which every head shares); ``keep_embeddings`` (default false) is
    passed on (:mod:`benchmarks.heads`).
    """
    import dask
    from distributed import Client, get_task_stream

    from benchmarks.cpu_split import cluster_cpu, own_snapshot

    # Its module imported here, not on first use inside the measured time.
    from buzzdask import analyze as buzzdask_analyze
    from buzzdask.session import start_local_cluster

    config = {"local-cluster.dashboard-address": ":0", **params["settings"]}
    output, models = Path(params["output"]), params["model"]
    several, first_chunk, started_epoch = _watch_output(output, models)
    with dask.config.set(
        {k if k.startswith("distributed.") else f"buzzdask.{k}": v for k, v in config.items()}
    ):
        before = own_snapshot()
        with measured() as record:
            local = load_settings().local_cluster
            cluster = start_local_cluster(local)
            client = Client(cluster)
            record["cluster_start_s"] = time.time() - started_epoch
            # Its scorers, as analyze() places them on the local cluster it starts itself.
            scorers = {"buzzdask.cpu-scorer-workers": local.scorers}
            with get_task_stream(client) as stream, dask.config.set(scorers):
                returned = buzzdask_analyze(
                    params.get("inputs", params["files"]),
                    models,
                    output=output,
                    client=client,
                    embedder=params["embedder"],
                    keep_embeddings=params.get("keep_embeddings", False),
                    progress=False,
                )
            results = returned if several else {"": returned}
            result = next(iter(results.values()))
            record["audio_s"] = result.summary["audio_hours"] * 3600
        summary = result.summary
        split = cluster_cpu(client, before, {s["pid"] for s in summary["scorers"] if "pid" in s})
        workers = client.scheduler_info()["workers"].values()
        client.close()
        cluster.close()
    record["cpu_s"] = split["categories"]["total"]
    record["cpu_util"] = record["cpu_s"] / (record["wall_s"] * cores())
    record.update(
        settings=params["settings"],
        cluster={"workers": len(workers), "threads": [w["nthreads"] for w in workers]},
        errors=sum(len(r.errors) for r in results.values()),
        heads=len(results),
        chunks_written=summary["chunks_written"],
        chunks_from_store=summary.get("chunks_from_store"),
        core_s_per_audio_s=record["cpu_s"] / record["audio_s"],
        cpu_split=split,
        first_chunk_s=first_chunk.get("seen", float("nan")) - started_epoch,
        analyze_wall_s=summary["wall_seconds"],
        peak_rss_bytes=summary["peak_rss_bytes"],
        scorers=summary["scorers"],
        scorers_lost=summary["scorers_lost"],
        scorer_restarts=summary["scorer_restarts"],
        chunks_resent=summary["chunks_resent"],
        split_s=_task_split(stream.data, summary, started_epoch),
    )
    return record


def _watch_output(output: Path, models: str | list[str]) -> tuple[bool, dict[str, float], float]:
    """Start watching for the run's first partition: whether ``models`` are several heads,
    the dict :func:`_watch_first_chunk` fills, and the time the watch started (epoch s).

    Several heads each write ``output/<model name>/``; the first one's journal is watched.
    """
    several = isinstance(models, list)
    journal = (output / Path(models[0]).resolve().name if several else output) / "journal.jsonl"
    first_chunk: dict[str, float] = {}
    started_epoch = time.time()
    threading.Thread(target=_watch_first_chunk, args=(journal, first_chunk), daemon=True).start()
    return several, first_chunk, started_epoch


def _watch_first_chunk(journal: Path, seen: dict[str, float]) -> None:
    """Note when the first chunk is journaled (scored and written): the start-up latency.

    The journal line follows the partition's rename: this is the first partition written, and
    read by buzzdask, a few milliseconds late at most (the poll).
    """
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


def rescore(params: dict[str, Any]) -> dict[str, Any]:
    """``buzzdask.rescore`` of ``params["store"]`` as a user runs it: no client given.

    A re-scoring starts its own local cluster (threads in this process, TensorFlow imported
    meanwhile), so everything it costs is this process's: wall time from the call until it
    returns (its cluster's start and close included), CPU time from ``getrusage``. The fields
    a task stream would give an analysis are NaN here.
    """
    import dask

    # Its module imported here, not on first use inside the measured time.
    from buzzdask import rescore as buzzdask_rescore

    config = {"local-cluster.dashboard-address": ":0", **params["settings"]}
    output, models = Path(params["output"]), params["model"]
    several, first_chunk, started_epoch = _watch_output(output, models)
    with dask.config.set({f"buzzdask.{k}": v for k, v in config.items()}), measured() as record:
        returned = buzzdask_rescore(
            params["store"], models, output=output, embedder=params["embedder"], progress=False
        )
        results = returned if several else {"": returned}
        summary = next(iter(results.values())).summary
        record["audio_s"] = summary["audio_hours"] * 3600
    nan = float("nan")
    record.update(
        settings=params["settings"],
        cluster={"workers": 1, "threads": "in this process"},
        cluster_start_s=nan,
        errors=sum(len(r.errors) for r in results.values()),
        heads=len(results),
        chunks_written=summary["chunks_written"],
        chunks_from_store=summary["chunks_from_store"],
        core_s_per_audio_s=record["cpu_s"] / record["audio_s"],
        first_chunk_s=first_chunk.get("seen", nan) - started_epoch,
        analyze_wall_s=summary["wall_seconds"],
        peak_rss_bytes=summary["peak_rss_bytes"],
        scorers=summary["scorers"],
        split_s={"actor_scoring": sum(s["seconds_scoring"] for s in summary["scorers"])},
    )
    return record


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "analyze": analyze,
    "rescore": rescore,
}


if __name__ == "__main__":
    main(sys.argv[1:], STAGES)
