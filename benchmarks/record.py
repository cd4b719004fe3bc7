"""A run's JSON record, from the rounds' results (see ``benchmarks/results/README.md``).

The record keeps the earlier records' keys and adds, per corpus, the CPU-time bound and the
co-run bound (``bounds``), the targets (``targets``: per corpus, start-up and memory, with
``goals`` naming each target), so that a reader can check every target from the file alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import summary
from benchmarks.corpus import CORPORA
from benchmarks.report import describe_machine

__all__ = ["build_record"]


def build_record(
    results: dict[str, Any],
    *,
    cores: int,
    corpora: dict[str, tuple[Path, list[Path], float]],
    tf_default: str,
    target: str,
) -> dict[str, Any]:
    """The run's JSON record: bounds, targets, start-up, rows, every result.

    The earlier records' keys stay (``bound``, ``targets``' first three keys, ``results``'
    ``decode``/``model``/``baseline``/``analyze``): they describe the first corpus run, with
    the record of its median round.
    """
    rounds: dict[str, list[dict[str, Any]]] = results["corpora"]
    first = next(iter(rounds))
    bounds = {name: summary.bounds(one, cores) for name, one in rounds.items()}
    fixed = results.get("analyze_short_file", [])
    targets: dict[str, Any] = summary.targets(rounds, cores, target, fixed)
    best_over_default = (
        summary.spread(
            max(m["realtime_factor"] for m in one["model"].values() if m["cores_used"] == cores)
            / one["model"][tf_default]["realtime_factor"]
            for one in rounds[first]
        )["median"]
        if tf_default in rounds[first][0]["model"]
        else None  # --model-sweep short
    )
    targets.update(
        start_up=summary.start_up(rounds, results["cli_short_file"], target, fixed),
        memory=_memory(rounds, target),
        goals=summary.GOALS,
        buzzdask_fraction_of_bound=targets[first]["fraction_of_bound"],
        buzzdask_over_baseline=targets[first]["over_baseline"],
        model_best_over_tf_default=best_over_default,
    )
    legacy = {
        "baseline": summary.median_record([one["baseline"] for one in rounds[first]]),
        **{
            stage: {
                label: summary.median_record([one[stage][label] for one in rounds[first]])
                for label in rounds[first][0][stage]
            }
            for stage in ("decode", "model", "analyze")
        },
    }
    return {
        "machine": describe_machine(),
        "corpus": {
            "hours": sum(hours for _, _, hours in corpora.values()),
            "files": [
                str(p.relative_to(root)) for root, paths, _ in corpora.values() for p in paths
            ],
            "corpora": {
                name: {
                    "description": CORPORA[name][2],
                    "hours": hours,
                    "files": len(paths),
                    "root": str(root),
                }
                for name, (root, paths, hours) in corpora.items()
            },
        },
        "bound": {**bounds[first], "corpus": first},
        "bounds": bounds,
        "targets": targets,
        "start_up": _start_up(results, rounds, list(rounds[first][0]["analyze"])),
        "rows": summary.rows(rounds),
        "results": {**results, **legacy},
    }


def _memory(rounds: dict[str, list[dict[str, Any]]], target: str) -> dict[str, Any]:
    """The whole process tree's peak RSS at defaults on the MP3 corpus: the worst round."""
    if "mp3" not in rounds:
        return {"peak_tree_rss_bytes": None, "note": "the mp3 corpus did not run"}
    peaks = [one["analyze"][target]["tree_rss"]["peak_bytes"] for one in rounds["mp3"]]
    return {
        "peak_tree_rss_bytes": max(peaks),
        "per_round": peaks,
        "configuration": f"mp3: {target}",
        "measured": "sum of the RSS of every process of the tree (client and scheduler, "
        "workers, ffmpeg), sampled every 0.1 s from outside; shared pages count per process",
    }


def _start_up(
    results: dict[str, Any], rounds: dict[str, list[dict[str, Any]]], labels: list[str]
) -> dict[str, Any]:
    """Start-up times per corpus and analyze configuration (medians), the command, SLURM."""
    table: dict[str, Any] = {}
    for name, one_corpus in rounds.items():
        for label in labels:
            runs = [one["analyze"][label] for one in one_corpus]
            table[f"{name}: {label}"] = {
                key: summary.spread(value(r) for r in runs)["median"]
                for key, value in {
                    "cluster_start_s": lambda r: r["cluster_start_s"],
                    # The actor's construction task: TensorFlow import and model load.
                    "scorer_load_s": lambda r: r["split_s"].get("scorer_compute", float("nan")),
                    "first_score_task_s": lambda r: r["split_s"].get(
                        "first_score_task_at", float("nan")
                    ),
                    "first_chunk_written_s": lambda r: r["first_chunk_s"],
                }.items()
            }
    if results["cli_short_file"]:
        table["buzzdask analyze, 7-second file"] = summary.spread(
            r["wall_s"] for r in results["cli_short_file"]
        )
    # sbatch until the jobs' Dask workers are connected.
    for label, result in results.get("slurm_decode", {}).get("configurations", {}).items():
        table[f"local SLURM, {label}"] = {"jobs_up_s": result["jobs_up_s"]}
    return table
