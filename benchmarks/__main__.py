"""``python -m benchmarks``: measure buzzdask's throughput against its stage limits.

On one generated corpus, in one run: the decode stage alone (1 and N ffmpeg processes), ffmpeg
preprocessing variants, the model stage alone (a sweep of batch sizes and TensorFlow threads),
a sequential single-process analyzer, and ``buzzdask.analyze`` on a local cluster. Writes
``<out>/<UTC time>-<host>.json`` and a ``.png`` plot of the realtime factors.

The bound on N cores is ``B = N / (c_decode + c_model)``, with each stage's cost measured alone
in core-seconds per audio second (``c = N / realtime factor`` of the stage using all N cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpus import build_corpus, default_cache_dir, plan_corpus
from benchmarks.measure import REPO, run_stage
from benchmarks.report import describe_machine, plot, table, write_record

#: Model-stage configurations swept: Scorer options (batch_frames, TensorFlow thread pools).
#: The first, TensorFlow's thread choice at the former default batch of 4096, is the reference
#: the model stage's speed-up is measured against; batch 1024 is buzzdask's default now.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "TF default, batch 4096": {"batch_frames": 4096},
    "batch 1024 (default)": {"batch_frames": 1024},
    "batch 256": {"batch_frames": 256},
    "batch 1024, intra 2 inter 1": {
        "batch_frames": 1024,
        "intra_op_threads": 2,
        "inter_op_threads": 1,
    },
    "batch 1024, 1 thread": {"batch_frames": 1024, "intra_op_threads": 1, "inter_op_threads": 1},
}

#: buzzdask.analyze configurations: local-cluster shape plus ``buzzdask.*`` config keys.
#: ``None`` for n_workers/threads means buzzdask's own defaults (2 workers, every core each).
ANALYZE_CONFIGS: dict[str, dict[str, Any]] = {
    # A scorer on each of the 2 workers, TensorFlow's threads split between them.
    "buzzdask, defaults": {},
    # The former default: one scorer using every core, the other worker only decodes.
    "buzzdask, 1 scorer": {"cpu-scorer-workers": 1},
}


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, run every stage, write the JSON record and the plot."""
    args = _parser().parse_args(argv)
    n_cores = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    shared = Path(
        args.shared_dir or os.environ.get("BUZZDASK_SHARED_DIR") or REPO.parent / "shared"
    )
    model_dir = shared / "data" / "models" / "model_general_v3"
    embedder = shared / "models" / "yamnet" / "saved_model_wholehop"
    if not model_dir.is_dir() or not embedder.is_dir():
        raise SystemExit(f"benchmarks: shared data not found under {shared} (--shared-dir)")
    cache_dir = Path(args.cache_dir).expanduser()
    files = [str(p) for p in build_corpus(args.hours, cache_dir, jobs=n_cores)]
    work_dir = cache_dir / "work"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    common = {"files": files, "model": str(model_dir), "embedder": str(embedder)}

    def stage(name: str, label: str, **params: Any) -> dict[str, Any]:
        print(f"benchmarks: {label} ...", flush=True)
        result = run_stage(name, {**common, "work_dir": str(work_dir), **params})
        if "realtime_factor" in result:
            print(f"benchmarks:   {result['realtime_factor']:.0f}x realtime", flush=True)
        return result

    results: dict[str, Any] = {}
    results["decode"] = {
        f"{workers} ffmpeg": stage("decode", f"decode, {workers} ffmpeg", workers=workers)
        for workers in sorted({1, n_cores})
    }
    results["ffmpeg_settings"] = stage(
        "ffmpeg_settings", "ffmpeg settings", files=_one_per_format(files), seconds=600
    )
    results["model"] = _model_sweep(stage, work_dir, args, n_cores)
    _, best_model = _best_model(results["model"])
    results["baseline"] = stage(
        "baseline", "sequential baseline", batch_frames=best_model["batch_frames"]
    )
    results["analyze"] = {
        label: stage("analyze", label, settings=_cluster_settings(settings, n_cores))
        for label, settings in ANALYZE_CONFIGS.items()
    }
    if args.slurm:
        try:
            results["slurm_decode"] = stage(
                "slurm_decode",
                "decode on the local SLURM",
                slurm_dir=str(shared / "slurm"),
                worker_counts=[1, 2],
            )
        except RuntimeError as error:  # no root, no SLURM packages: keep the rest of the run
            print(f"benchmarks: local SLURM skipped: {error}", flush=True)
            results["slurm_decode"] = {"error": str(error)}
    shutil.rmtree(work_dir, ignore_errors=True)

    record = _record(results, n_cores=n_cores, files=files, hours=args.hours)
    record["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    record["started"] = started
    record["command"] = "python -m benchmarks " + " ".join(argv or [])
    out_dir = Path(args.out)
    stem = f"{started}-{record['machine']['host']}"
    json_path = write_record(record, out_dir, stem)
    plot(record, out_dir / f"{stem}.png")
    print(table(record))
    print(f"benchmarks: wrote {json_path} and {stem}.png")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--hours", type=float, default=8.0, help="corpus size (default 8 h)")
    parser.add_argument(
        "--cache-dir",
        default=str(default_cache_dir()),
        help="corpus cache and scratch space (default ~/.cache/buzzdask-bench)",
    )
    parser.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results"), help="where results go"
    )
    parser.add_argument(
        "--shared-dir", help="shared data (default $BUZZDASK_SHARED_DIR, else ../shared)"
    )
    parser.add_argument(
        "--model-seconds",
        type=float,
        default=1200.0,
        help="pre-decoded audio each model-stage configuration scores (default 1200 s)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per model configuration"
    )
    parser.add_argument(
        "--no-slurm",
        dest="slurm",
        action="store_false",
        help="skip decode scaling on the local SLURM (it needs root: ../shared/slurm)",
    )
    return parser


def _one_per_format(files: list[str]) -> list[str]:
    """The largest file of each extension (MP3 44.1 kHz stereo, WAV 48 kHz mono).

    The largest, so ffmpeg's own start-up (tens of ms) does not weigh on its cost per second.
    """
    chosen: dict[str, str] = {}
    for path in sorted(files, key=os.path.getsize, reverse=True):
        chosen.setdefault(Path(path).suffix, path)
    return list(chosen.values())


def _model_sweep(
    stage: Any, work_dir: Path, args: argparse.Namespace, n_cores: int
) -> dict[str, Any]:
    """Every model configuration on the same pre-decoded audio; activations checked equal.

    Each result gets ``cores_used`` (the intra-op pool, else every core) and its cost
    ``core_s_per_audio_s = cores_used / realtime factor``.
    """
    results: dict[str, Any] = {}
    reference = None
    for label, options in MODEL_CONFIGS.items():
        save = work_dir / f"activations-{len(results)}.npy"
        result = stage(
            "model",
            f"model stage, {label}",
            seconds=args.model_seconds,
            repeats=args.repeats,
            save=str(save),
            **options,
        )
        activations = np.load(save)
        if reference is None:
            reference = activations
        result["max_abs_diff_vs_default"] = float(np.max(np.abs(activations - reference)))
        result["cores_used"] = min(n_cores, options.get("intra_op_threads") or n_cores)
        result["core_s_per_audio_s"] = result["cores_used"] / result["realtime_factor"]
        results[label] = {**options, **result}
    return results


def _best_model(models: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The fastest model configuration among those using every core (c_model's definition)."""
    full = {
        k: v
        for k, v in models.items()
        if v["cores_used"] == max(m["cores_used"] for m in models.values())
    }
    return max(full.items(), key=lambda item: item[1]["realtime_factor"])


def _cluster_settings(settings: dict[str, Any], n_cores: int) -> dict[str, Any]:
    """buzzdask's local-cluster defaults (2 workers, every core each) unless overridden."""
    return {"n_workers": 2, "threads_per_worker": n_cores, **settings}


def _record(
    results: dict[str, Any], *, n_cores: int, files: list[str], hours: float
) -> dict[str, Any]:
    """The run's JSON record: results, the bound, targets, and one headline row per config."""
    decode_all = results["decode"][f"{n_cores} ffmpeg"]
    models = results["model"]
    default_label, default_model = next(iter(models.items()))
    best_label, best_model = _best_model(models)
    c_decode = n_cores / decode_all["realtime_factor"]
    c_model = n_cores / best_model["realtime_factor"]
    bound = n_cores / (c_decode + c_model)
    rows = [
        _row("sequential baseline (1 process)", results["baseline"]),
        *(_row(f"decode only, {k}", v) for k, v in results["decode"].items()),
        _row(f"model only, {default_label}", default_model),
        _row(f"model only, best: {best_label}", best_model),
        *(_row(k, v) for k, v in results["analyze"].items()),
        *(
            _row(f"decode only, local SLURM, {k}", v)
            for k, v in results.get("slurm_decode", {}).get("configurations", {}).items()
        ),
    ]
    best_analyze = max(results["analyze"].values(), key=lambda r: r["realtime_factor"])
    return {
        "machine": describe_machine(),
        "corpus": {
            "hours": sum(f.seconds for f in plan_corpus(hours)) / 3600,
            "files": [Path(p).name for p in files],
        },
        "bound": {
            "cores": n_cores,
            "c_decode_core_s_per_audio_s": c_decode,
            "c_model_core_s_per_audio_s": c_model,
            "realtime_factor": bound,
        },
        "targets": {
            "buzzdask_fraction_of_bound": best_analyze["realtime_factor"] / bound,
            "buzzdask_over_baseline": best_analyze["realtime_factor"]
            / results["baseline"]["realtime_factor"],
            "model_best_over_tf_default": best_model["realtime_factor"]
            / default_model["realtime_factor"],
        },
        "start_up": {
            label: {
                "cluster_start_s": result["cluster_start_s"],
                # The actor's construction task: TensorFlow import and model load.
                "scorer_load_s": result["split_s"].get("scorer_compute"),
                "first_score_task_s": result["split_s"].get("first_score_task_at"),
                "first_chunk_written_s": result["first_chunk_s"],
            }
            for label, result in results["analyze"].items()
        }
        | {
            # sbatch until the jobs' Dask workers are connected.
            f"local SLURM, {label}": {"jobs_up_s": result["jobs_up_s"]}
            for label, result in results.get("slurm_decode", {}).get("configurations", {}).items()
        },
        "rows": rows,
        "results": results,
    }


def _row(label: str, result: dict[str, Any]) -> dict[str, Any]:
    rss = [p["peak_rss_bytes"] for p in result.get("peak_rss_per_process", [])]
    return {
        "label": label,
        "realtime_factor": result["realtime_factor"],
        "cpu_util": result["cpu_util"],
        "wall_s": result["wall_s"],
        "largest_rss_bytes": max(rss) if rss else None,
    }


if __name__ == "__main__":
    main()
