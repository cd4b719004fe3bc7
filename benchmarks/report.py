"""The machine's description, the JSON record of a run, and its plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

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
    """The headline rows as a Markdown table (what the README's Performance section shows)."""
    lines = [
        "| configuration | realtime factor | CPU use | wall (s) | largest process RSS |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in record["rows"]:
        rss = row.get("largest_rss_bytes")
        lines.append(
            f"| {row['label']} | {row['realtime_factor']:.0f}x | {row['cpu_util']:.0%} "
            f"| {row['wall_s']:.1f} | {'' if rss is None else f'{rss / 2**20:.0f} MiB'} |"
        )
    bound = record["bound"]
    lines.append(
        f"| bound B = N / (c_decode + c_model), N = {bound['cores']} | "
        f"{bound['realtime_factor']:.0f}x | | | |"
    )
    return "\n".join(lines)


def plot(record: dict[str, Any], path: Path) -> Path:
    """Bar chart of the realtime factor per configuration, with the bound B as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    labels = [row["label"] for row in rows]
    values = [row["realtime_factor"] for row in rows]
    axes.barh(labels, values, color="tab:blue")
    for y, value in enumerate(values):
        axes.text(value, y, f" {value:.0f}x", va="center", fontsize=8)
    bound = record["bound"]["realtime_factor"]
    axes.axvline(bound, color="tab:red", linestyle="--", label=f"bound B = {bound:.0f}x")
    axes.axvline(0.9 * bound, color="tab:orange", linestyle=":", label="90 % of B")
    axes.invert_yaxis()
    axes.set_xlabel("realtime factor (audio seconds per wall second)")
    machine = record["machine"]
    axes.set_title(
        f"buzzdask, {record['corpus']['hours']:.1f} h corpus, {machine['cores_available']} cores "
        f"({machine['cpu']})",
        fontsize=9,
    )
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
