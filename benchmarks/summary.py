"""From the rounds' records to the bounds, the targets and the headline rows of a run's record.

Every configuration runs once per round, in the same order (A, B, C, A, B, C...), so that the
machine's drift over minutes falls on all of them alike. Ratios (buzzdask against a bound or the
baseline) are taken within a round, between measurements minutes apart, then summarised over
the rounds: the median, with the smallest and largest value as the spread.

**The bound B**, per corpus and round: each stage's cost is its CPU time per audio second
(user + system of every process of the stage, ffmpeg and ffprobe included), in its cheapest
configuration by that measure (the 1-thread scorer included); on N cores
``B = N / (c_decode + c_model)``. **The co-run bound B₂** is :mod:`benchmarks.corun`'s.
``wall_realtime_factor`` keeps the earlier records' B (from the stages' wall-clock speeds using
every core) for comparison.

**The paired bound B₂ᵖ** (not a target): B₂ with its model side's cost as a run's embedder calls
pay where decoding does not keep them company. B₂'s model side runs one call beside the decoding;
where decoding is less of the work than the model, what is left of the model's runs with the
calls side by side, at the cost per frame the ``pairing`` stage measures
(:func:`benchmarks.corun.pairing`, ratio ``r``). With ``f = min(1, c₂_decode / c₂_model)``, the
model's share that decoding can keep company on two cores:
``c₂ᵖ_model = c₂_model · (f + (1 - f) · r)`` and ``B₂ᵖ = N / (c₂_decode + c₂ᵖ_model)``.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["GOALS", "bounds", "median_record", "rows", "spread", "start_up", "targets"]

#: The targets of issue 20, for a reader of the record (reported, never asserted).
GOALS: dict[str, str] = {
    "cpu_over_corun_stages": "<= 1.1 on each corpus (start-up included)",
    "fraction_of_corun_bound": ">= 0.9 on each corpus",
    "small_files_over_wav_realtime_factor": ">= 0.8",
    "first_partition_s": "<= 5",
    "cli_short_file_s": "<= 6",
    "peak_tree_rss_bytes": "<= 2.5e9 (at defaults, MP3 corpus)",
}

#: The per-corpus target metrics, in the record's order.
METRICS = (
    "fraction_of_bound",
    "fraction_of_corun_bound",
    "cpu_over_stages",
    "cpu_over_corun_stages",
    "over_baseline",
    "realtime_factor",
    "cpu_over_corun_stages_without_fixed",
    "fraction_of_corun_bound_without_fixed",
    "cpu_over_paired_corun_stages",
    "fraction_of_paired_corun_bound",
)


def spread(values: Iterable[float]) -> dict[str, float]:
    """``median``, ``min`` and ``max`` of ``values``."""
    items = list(values)
    return {"median": statistics.median(items), "min": min(items), "max": max(items)}


def median_record(records: list[dict[str, Any]], key: str = "realtime_factor") -> dict[str, Any]:
    """The record whose ``key`` is the median (the lower one of an even count)."""
    return sorted(records, key=lambda r: r[key])[(len(records) - 1) // 2]


def round_costs(one: dict[str, Any], cores: int) -> dict[str, Any]:
    """One round of one corpus: each stage's cheapest cost, B, B₂, B₂ᵖ and the earlier wall B.

    B₂ᵖ (``paired_corun_bound``, ``c2p_model`` and ``calls_side_by_side_over_one``) only where
    the round measured the pairing.
    """
    decode_label, decode = _cheapest(one["decode"])
    model_label, model = _cheapest(one["model"])
    c_decode, c_model = decode["core_s_per_audio_s"], model["core_s_per_audio_s"]
    corun = one["corun"]
    full = [m for m in one["model"].values() if m["cores_used"] == cores]
    wall_decode = one["decode"][f"{cores} at a time"]["realtime_factor"]
    wall_model = max(m["realtime_factor"] for m in full) if full else float("nan")
    costs = {
        "c_decode": c_decode,
        "c_decode_configuration": decode_label,
        "c_model": c_model,
        "c_model_configuration": model_label,
        "bound": cores / (c_decode + c_model),
        "c2_decode": corun["c_decode_core_s_per_audio_s"],
        "c2_model": corun["c_model_core_s_per_audio_s"],
        "corun_bound": corun["realtime_factor"],
        "wall_bound": cores / (cores / wall_decode + cores / wall_model),
    }
    if "pairing" in one:  # records before 2026-12-04 have none
        c2_decode, c2_model, ratio = costs["c2_decode"], costs["c2_model"], one["pairing"]["ratio"]
        kept_company = min(1.0, c2_decode / c2_model)
        c2p_model = c2_model * (kept_company + (1 - kept_company) * ratio)
        costs.update(
            calls_side_by_side_over_one=ratio,
            c2p_model=c2p_model,
            paired_corun_bound=cores / (c2_decode + c2p_model),
        )
    return costs


def bounds(rounds: list[dict[str, Any]], cores: int) -> dict[str, Any]:
    """A corpus's B and B₂ over its rounds (medians; ``spread`` holds min and max)."""
    costs = [round_costs(one, cores) for one in rounds]

    def summary(key: str) -> dict[str, float]:
        return spread(c[key] for c in costs)

    def most_often(key: str) -> str:
        return Counter(c[key] for c in costs).most_common(1)[0][0]

    c2d, c2m = summary("c2_decode")["median"], summary("c2_model")["median"]
    cd, cm = summary("c_decode")["median"], summary("c_model")["median"]
    result: dict[str, Any] = {
        "cores": cores,
        "method": "cpu_time",
        "c_decode_core_s_per_audio_s": cd,
        "c_decode_configuration": most_often("c_decode_configuration"),
        "c_model_core_s_per_audio_s": cm,
        "c_model_configuration": most_often("c_model_configuration"),
        "realtime_factor": summary("bound")["median"],
        "corun": {
            "c_decode_core_s_per_audio_s": c2d,
            "c_model_core_s_per_audio_s": c2m,
            "realtime_factor": summary("corun_bound")["median"],
            # How much each stage cost more beside the other than alone.
            "decode_over_alone": c2d / cd,
            "model_over_alone": c2m / cm,
        },
        "wall_realtime_factor": summary("wall_bound")["median"],
        "spread": {k: summary(k) for k in ("bound", "corun_bound", "c_decode", "c_model")},
        "per_round": costs,
    }
    if all("paired_corun_bound" in c for c in costs):
        result["paired_corun"] = {
            "c_model_core_s_per_audio_s": summary("c2p_model")["median"],
            "realtime_factor": summary("paired_corun_bound")["median"],
            "calls_side_by_side_over_one": summary("calls_side_by_side_over_one")["median"],
        }
        result["spread"]["paired_corun_bound"] = summary("paired_corun_bound")
    return result


def targets(
    corpora: dict[str, list[dict[str, Any]]],
    cores: int,
    label: str,
    fixed: list[dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per corpus: buzzdask's configuration ``label`` against B, B₂ (and B₂ᵖ) and the baseline.

    Each metric is computed within each round, then summarised: the median, and its
    ``spread`` over the rounds. ``small-files`` also holds
    ``small_files_over_wav_realtime_factor`` when the ``wav`` corpus ran in the same rounds.

    ``fixed`` holds each round's ``analyze()`` on a 7-second file, measured as the corpora's
    runs are: what a run costs whatever its audio (the cluster's start, TensorFlow's import,
    the model's load). With it, ``cpu_over_corun_stages_without_fixed`` and
    ``fraction_of_corun_bound_without_fixed`` compare a corpus's run to B₂ after taking off
    that run's CPU-seconds and its wall seconds (of the same round): what buzzdask adds per
    audio second, which a longer corpus would approach. They are not targets.
    """
    per_round: dict[str, list[dict[str, float]]] = {}
    for name, rounds in corpora.items():
        per_round[name] = []
        for index, one in enumerate(rounds):
            costs = round_costs(one, cores)
            run = one["analyze"][label]
            cpu = run["core_s_per_audio_s"]
            corun_cost = costs["c2_decode"] + costs["c2_model"]
            metrics = {
                "fraction_of_bound": run["realtime_factor"] / costs["bound"],
                "fraction_of_corun_bound": run["realtime_factor"] / costs["corun_bound"],
                "cpu_over_stages": cpu / (costs["c_decode"] + costs["c_model"]),
                "cpu_over_corun_stages": cpu / corun_cost,
                "over_baseline": run["realtime_factor"] / one["baseline"]["realtime_factor"],
                "realtime_factor": run["realtime_factor"],
            }
            if "paired_corun_bound" in costs:
                metrics["cpu_over_paired_corun_stages"] = cpu / (
                    costs["c2_decode"] + costs["c2p_model"]
                )
                metrics["fraction_of_paired_corun_bound"] = (
                    run["realtime_factor"] / costs["paired_corun_bound"]
                )
            if fixed:
                short = fixed[index]
                audio_s, wall_s = run["audio_s"], run["wall_s"] - short["wall_s"]
                metrics["cpu_over_corun_stages_without_fixed"] = (
                    (run["cpu_s"] - short["cpu_s"]) / audio_s / corun_cost
                )
                # NaN where a corpus is too short to outlast the 7-second file's run.
                metrics["fraction_of_corun_bound_without_fixed"] = (
                    audio_s / wall_s / costs["corun_bound"] if wall_s > 0 else math.nan
                )
            per_round[name].append(metrics)
    if "small-files" in per_round and "wav" in per_round:
        for small, wav in zip(per_round["small-files"], per_round["wav"], strict=True):
            small["small_files_over_wav_realtime_factor"] = (
                small["realtime_factor"] / wav["realtime_factor"]
            )
    result: dict[str, dict[str, Any]] = {}
    for name, values in per_round.items():
        summaries = {key: spread(v[key] for v in values) for key in values[0]}
        result[name] = {key: s["median"] for key, s in summaries.items()}
        result[name].update(
            configuration=label,
            rounds=len(values),
            spread={key: [s["min"], s["max"]] for key, s in summaries.items()},
        )
    return result


def start_up(
    corpora: dict[str, list[dict[str, Any]]],
    cli: list[dict[str, Any]],
    label: str,
    fixed: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Start-up targets: the first partition (each corpus, ``label``), the short-file command.

    ``first_partition_s`` is the largest of the corpora's medians: the target holds for each.
    ``fixed_cost``: the wall and CPU seconds of ``fixed``, ``analyze()`` on a 7-second file
    (:func:`targets`).
    """
    first = {
        name: spread(one["analyze"][label]["first_chunk_s"] for one in rounds)
        for name, rounds in corpora.items()
    }
    result: dict[str, Any] = {
        "first_partition_s": max(s["median"] for s in first.values()),
        "first_partition_s_by_corpus": first,
    }
    if cli:
        command = spread(r["wall_s"] for r in cli)
        result.update(cli_short_file_s=command["median"], cli_short_file_s_spread=command)
    if fixed:
        result["fixed_cost"] = {
            "wall_s": spread(r["wall_s"] for r in fixed),
            "cpu_s": spread(r["cpu_s"] for r in fixed),
            "measured": "analyze() on a 7-second file on a fresh local cluster, measured as "
            "the corpora's runs are (the cluster's start until its partitions are written)",
        }
    return result


def rows(corpora: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Headline rows: per corpus and configuration, medians over the rounds."""
    table = []
    for name, rounds in corpora.items():
        configurations: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "sequential baseline (1 process)": lambda one: one["baseline"],
            **{f"decode only, {k}": _pick("decode", k) for k in rounds[0]["decode"]},
            **{f"model only, {k}": _pick("model", k) for k in rounds[0]["model"]},
            **{k: _pick("analyze", k) for k in rounds[0]["analyze"]},
        }
        for label, pick in configurations.items():
            records = [pick(one) for one in rounds]
            table.append(_row(name, label, records))
    return table


def _pick(stage: str, label: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda one: one[stage][label]


def _row(corpus: str, label: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's medians over the rounds (``largest_rss_bytes``: one process)."""

    def median(key: str) -> float:
        return statistics.median(r[key] for r in records)

    largest = [
        max((p["peak_rss_bytes"] for p in r.get("peak_rss_per_process", [])), default=0)
        for r in records
    ]
    rtf = spread(r["realtime_factor"] for r in records)
    return {
        "corpus": corpus,
        "label": f"{corpus}: {label}",
        "realtime_factor": rtf["median"],
        "realtime_factor_spread": [rtf["min"], rtf["max"]],
        "core_s_per_audio_s": statistics.median(
            r.get("core_s_per_audio_s", r["cpu_s"] / r["audio_s"]) for r in records
        ),
        "cpu_util": median("cpu_util"),
        "wall_s": median("wall_s"),
        "largest_rss_bytes": statistics.median(largest) if any(largest) else None,
        "tree_rss_peak_bytes": max(r.get("tree_rss", {}).get("peak_bytes", 0) for r in records),
    }


def _cheapest(records: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The configuration with the least CPU time per audio second."""
    return min(records.items(), key=lambda item: item[1]["core_s_per_audio_s"])
