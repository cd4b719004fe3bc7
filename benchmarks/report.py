"""The machine's description, the JSON record of a run, and its plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

from benchmarks.summary import METRICS

__all__ = ["describe_machine", "plot", "table", "write_record"]


def describe_machine() -> dict[str, Any]:
    """CPU model, cores (total and available to this process), memory, software versions."""
    import dask
    import distributed

    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    ffmpeg = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=False)
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model or platform.processor(),
        "cores_total": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "ffmpeg": ffmpeg.stdout.splitlines()[0] if ffmpeg.stdout else "unknown",
        "dask": dask.__version__,
        "distributed": distributed.__version__,
    }


def write_record(record: dict[str, Any], out_dir: Path, stem: str) -> Path:
    """Write ``out_dir / f"{stem}.json"`` and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return path


def table(record: dict[str, Any]) -> str:
    """The headline rows per corpus and the targets, as Markdown (the README's tables)."""
    lines: list[str] = []
    for name, corpus in record["corpus"]["corpora"].items():
        bound = record["bounds"][name]
        lines += [
            "",
            f"**{name}**: {corpus['description']}, {corpus['hours']:.2f} h, "
            f"{corpus['files']} files (medians of {record['targets'][name]['rounds']} rounds)",
            "",
            "| configuration | realtime factor (min–max) | CPU-ms per audio s | CPU use "
            "| wall (s) | largest process RSS | tree RSS peak |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in (r for r in record["rows"] if r["corpus"] == name):
            low, high = row["realtime_factor_spread"]
            lines.append(
                f"| {row['label'].split(': ', 1)[1]} | {row['realtime_factor']:.0f}x "
                f"({low:.0f}–{high:.0f}) | {row['core_s_per_audio_s'] * 1e3:.3f} "
                f"| {row['cpu_util']:.0%} | {row['wall_s']:.1f} | {_mib(row['largest_rss_bytes'])} "
                f"| {_mib(row['tree_rss_peak_bytes'])} |"
            )
        corun = bound["corun"]
        lines += [
            f"| bound B = N / (c_decode + c_model), CPU time, N = {bound['cores']} "
            f"| {bound['realtime_factor']:.0f}x | {_cost_ms(bound)} | | | | |",
            f"| co-run bound B₂ (decode beside the model) | {corun['realtime_factor']:.0f}x "
            f"| {_cost_ms(corun)} | | | | |",
            f"| earlier B (stages' wall-clock speeds) | {bound['wall_realtime_factor']:.0f}x "
            "| | | | | |",
        ]
        if "paired_corun" in bound:
            paired = bound["paired_corun"]
            cost = corun["c_decode_core_s_per_audio_s"] + paired["c_model_core_s_per_audio_s"]
            lines.append(
                f"| paired bound B₂ᵖ (calls side by side "
                f"{paired['calls_side_by_side_over_one']:.3f}× one) "
                f"| {paired['realtime_factor']:.0f}x | {cost * 1e3:.3f} | | | | |"
            )
    lines += ["", *_targets_table(record["targets"])]
    return "\n".join(lines)


def _targets_table(targets: dict[str, Any]) -> list[str]:
    """The targets: per corpus (median, min–max over the rounds), start-up and memory."""
    corpora = {
        name: values
        for name, values in targets.items()
        if isinstance(values, dict) and "realtime_factor" in values
    }
    first = next(iter(corpora.values()))
    label = first["configuration"]
    metrics = [m for m in METRICS if m in first]  # a run without the 7-second file has fewer
    lines = [
        f"| corpus ({label}) | " + " | ".join(metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for name, values in corpora.items():
        cells = [
            f"{values[m]:.2f} ({values['spread'][m][0]:.2f}–{values['spread'][m][1]:.2f})"
            if m != "realtime_factor"
            else f"{values[m]:.0f}x"
            for m in metrics
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    start = targets["start_up"]
    small = targets.get("small-files", {}).get("small_files_over_wav_realtime_factor")
    lines += [
        "",
        f"- first partition written: {start['first_partition_s']:.1f} s after the start "
        f"(goal {targets['goals']['first_partition_s']} s)",
    ]
    if "cli_short_file_s" in start:
        lines.append(
            f"- `buzzdask analyze` on a 7-second file: {start['cli_short_file_s']:.1f} s end to "
            f"end (goal {targets['goals']['cli_short_file_s']} s)"
        )
    if "fixed_cost" in start:
        fixed = start["fixed_cost"]
        lines.append(
            f"- a run's fixed cost (`analyze()` on a 7-second file): "
            f"{fixed['wall_s']['median']:.1f} s, {fixed['cpu_s']['median']:.1f} CPU-s "
            "(taken off in the `_without_fixed` columns)"
        )
    if small is not None:
        lines.append(
            f"- small files' realtime factor over the 1-hour WAVs': {small:.2f} "
            f"(goal {targets['goals']['small_files_over_wav_realtime_factor']})"
        )
    peak = targets["memory"]["peak_tree_rss_bytes"]
    if peak is not None:
        lines.append(
            f"- process tree's peak RSS, defaults, MP3 corpus: {peak / 1e9:.2f} GB "
            f"(goal {targets['goals']['peak_tree_rss_bytes']})"
        )
    return lines


def _cost_ms(bound: dict[str, Any]) -> str:
    """``c_decode + c_model`` in CPU-milliseconds per audio second."""
    cost = bound["c_decode_core_s_per_audio_s"] + bound["c_model_core_s_per_audio_s"]
    return f"{cost * 1e3:.3f}"


def _mib(value: float | None) -> str:
    return "" if not value else f"{value / 2**20:.0f} MiB"


def plot(record: dict[str, Any], path: Path) -> Path:
    """Bar charts of the realtime factor per configuration, one per corpus, with B, B₂ (and B₂ᵖ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["corpus"]["corpora"])
    counts = [sum(1 for r in record["rows"] if r["corpus"] == n) for n in names]
    figure, panels = plt.subplots(
        len(names),
        1,
        figsize=(8, 0.4 * sum(counts) + 1.4 * len(names)),
        gridspec_kw={"height_ratios": counts},
        squeeze=False,
    )
    for axes, name in zip(panels[:, 0], names, strict=True):
        rows = [r for r in record["rows"] if r["corpus"] == name]
        values = [r["realtime_factor"] for r in rows]
        errors = [
            [v - r["realtime_factor_spread"][0] for v, r in zip(values, rows, strict=True)],
            [r["realtime_factor_spread"][1] - v for v, r in zip(values, rows, strict=True)],
        ]
        axes.barh(
            [r["label"].split(": ", 1)[1] for r in rows], values, xerr=errors, color="tab:blue"
        )
        for y, value in enumerate(values):
            axes.text(value, y, f" {value:.0f}x", va="center", fontsize=7)
        bound = record["bounds"][name]
        corun = bound["corun"]["realtime_factor"]
        axes.axvline(bound["realtime_factor"], color="tab:red", linestyle="--", label="B")
        axes.axvline(corun, color="tab:purple", linestyle="--", label="B₂ (co-run)")
        axes.axvline(0.9 * corun, color="tab:orange", linestyle=":", label="90 % of B₂")
        if "paired_corun" in bound:
            paired = bound["paired_corun"]["realtime_factor"]
            axes.axvline(paired, color="tab:gray", linestyle="-.", label="B₂ᵖ (calls paired)")
        axes.invert_yaxis()
        axes.tick_params(labelsize=7)
        axes.set_title(f"{name}: {record['corpus']['corpora'][name]['description']}", fontsize=8)
        axes.legend(fontsize=7, loc="lower right")
    panels[-1, 0].set_xlabel("realtime factor (audio seconds per wall second; bars: min–max)")
    machine = record["machine"]
    figure.suptitle(f"buzzdask, {machine['cores_available']} cores ({machine['cpu']})", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.985))  # room for the machine's line above
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
