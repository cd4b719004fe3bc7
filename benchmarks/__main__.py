"""``python -m benchmarks``: measure buzzdask's throughput against its stage limits.

On three generated corpora (:data:`benchmarks.corpus.CORPORA`: 15-minute MP3s, 1-hour WAVs,
30-second WAVs in site/date folders), each reported on its own, and in rounds (every
configuration once per round, so the machine's drift falls on all alike): the decode stage alone
(1 and N chunks at a time, as buzzdask decodes them: ffmpeg processes, or plain WAVs read in
process), the model stage alone (a sweep of batch sizes and TensorFlow threads), both stages at
once as plain processes (:mod:`benchmarks.corun`), the scorer's calls side by side against one
at a time (:func:`benchmarks.corun.pairing`), a sequential single-process analyzer, and
``buzzdask.analyze`` on a fresh local cluster; then, once per round, the ``buzzdask analyze``
command on a 7-second file and ``buzzdask.analyze`` on it (what any run costs: the corpora's
figures are also given without it, :func:`benchmarks.summary.targets`). ffmpeg preprocessing
variants (and decode scaling on the local SLURM) run once. Every configuration's activations
are checked equal to the sequential baseline's (:mod:`benchmarks.outputs`). Writes
``<out>/<UTC time>-<host>.json`` and a ``.png`` plot of the realtime factors.

The bound on N cores is ``B = N / (c_decode + c_model)``, with each stage's cost its CPU time
per audio second in its cheapest configuration; the co-run bound ``B₂`` keeps the two stages'
interference, and the paired bound ``B₂ᵖ`` adds what embedder calls side by side cost
(:mod:`benchmarks.summary`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks.corpus import CORPORA, build_named_corpus, default_cache_dir, plan_named_corpus
from benchmarks.measure import REPO, run_stage, shared_models
from benchmarks.outputs import check_analyze, check_baseline, check_chunks
from benchmarks.record import build_record
from benchmarks.report import plot, table, write_record

#: This machine's cores: TensorFlow's own intra-op pool (its default) has one thread per core.
CORES = len(os.sched_getaffinity(0))

#: Scorer options for embedder calls of the whole batch, as before ``cpu-call-frames``.
WHOLE_CALLS: dict[str, Any] = {"cpu_call_frames": None}

#: Model-stage configurations swept: Scorer options (batch_frames, TensorFlow thread pools, the
#: most frames per embedder call on a CPU: buzzdask's ``cpu-call-frames`` unless given,
#: :data:`WHOLE_CALLS` for whole batches). The first, TensorFlow's thread choice at the former
#: default batch of 4096, is the reference the model stage's speed-up is measured against;
#: batch 512 is buzzdask's default now, whose embedder calls (of up to ``cpu-call-frames`` since
#: 2026-12-02, "whole calls" before) run side by side, one thread each (the scorer's default on
#: a CPU since 2026-12-01); "one call, every core" is the default before it. The other batch
#: sizes are swept in whole calls: in calls of up to ``cpu-call-frames`` they would repeat the
#: default's.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "TF default, batch 4096": {"batch_frames": 4096, "intra_op_threads": CORES, **WHOLE_CALLS},
    "batch 512 (default)": {"batch_frames": 512},
    "batch 512, whole calls": {"batch_frames": 512, **WHOLE_CALLS},
    "batch 512, one call, every core": {"batch_frames": 512, "intra_op_threads": CORES},
    "batch 1024": {"batch_frames": 1024, **WHOLE_CALLS},
    "batch 256": {"batch_frames": 256, **WHOLE_CALLS},
    "batch 1024, intra 2 inter 1": {
        "batch_frames": 1024,
        "intra_op_threads": 2,
        "inter_op_threads": 1,
        **WHOLE_CALLS,
    },
    "batch 1024, 1 thread": {
        "batch_frames": 1024,
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        **WHOLE_CALLS,
    },
    "batch 512, 1 thread": {"batch_frames": 512, "intra_op_threads": 1, "inter_op_threads": 1},
    "batch 512, 1 thread, whole calls": {
        "batch_frames": 512,
        "intra_op_threads": 1,
        "inter_op_threads": 1,
        **WHOLE_CALLS,
    },
}

#: ``--model-sweep short``: the candidates for the cheapest model stage by CPU time
#: (parallel one-thread calls, one call on TensorFlow's own threads, one thread), at
#: buzzdask's batch in its calls and in whole calls (the records before 2026-12-02), for
#: quick runs.
SHORT_SWEEP = (
    "batch 512 (default)",
    "batch 512, whole calls",
    "batch 512, one call, every core",
    "batch 512, 1 thread",
    "batch 512, 1 thread, whole calls",
)

#: buzzdask.analyze configurations: ``buzzdask.*`` config keys (without the prefix) on the local
#: cluster ``analyze()`` starts (one worker of every core, unless a key says otherwise).
ANALYZE_CONFIGS: dict[str, dict[str, Any]] = {
    # One worker process that decodes and scores (local-cluster.n-workers: null).
    "buzzdask, defaults": {},
    # The former default: two worker processes, one of them scoring, the other only decoding.
    "buzzdask, 2 workers (one scores)": {"local-cluster.n-workers": 2},
}

#: The configuration the targets are read from: what a user gets.
TARGET_CONFIG = "buzzdask, defaults"

Stage = Callable[..., dict[str, Any]]


def main(argv: list[str] | None = None) -> None:
    """Build the corpora, run every configuration in rounds, write the JSON record and the plot."""
    args = _parser().parse_args(argv)
    n_cores = CORES
    load_start = os.getloadavg()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    shared, model_dir, embedder = shared_models(args.shared_dir)
    cache_dir = Path(args.cache_dir).expanduser()
    corpora = {
        name: build_named_corpus(
            name, cache_dir, hours=args.hours, small_files=args.small_files, jobs=n_cores
        )
        for name in args.corpora
    }
    work_dir = cache_dir / "work"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    common = {"model": str(model_dir), "embedder": str(embedder), "work_dir": str(work_dir)}

    def stage(name: str, label: str, module: str = "benchmarks.stages", **params: Any) -> Any:
        print(f"benchmarks: {label} ...", flush=True)
        result = run_stage(name, {**common, **params}, module=module)
        if "realtime_factor" in result:
            cost = result.get("core_s_per_audio_s") or result["cpu_s"] / result["audio_s"]
            print(
                f"benchmarks:   {result['realtime_factor']:.0f}x realtime, "
                f"{cost * 1e3:.3f} CPU-ms per audio second",
                flush=True,
            )
        return result

    all_files = [str(p) for _, files in corpora.values() for p in files]
    results: dict[str, Any] = {
        "ffmpeg_settings": stage(
            "ffmpeg_settings", "ffmpeg settings", files=_one_per_format(all_files), seconds=600
        ),
        "corpora": {name: [] for name in corpora},
        "cli_short_file": [],
        "analyze_short_file": [],
    }
    short_file = str(shared / "data" / "audio_in" / "testbuzz.mp3")
    for round_index in range(args.repeats):
        for name, (root, paths) in corpora.items():
            files = [str(p) for p in paths]
            inputs = [str(root)] if name == "small-files" else files
            results["corpora"][name].append(
                _round(stage, name, files, inputs, args, n_cores, work_dir, round_index)
            )
        for key, label, stage_name, params in _short_file_runs(args, short_file):
            output = work_dir / f"{key}-{round_index}"
            results[key].append(
                stage(stage_name, f"round {round_index + 1}: {label}", output=str(output), **params)
            )
            shutil.rmtree(output, ignore_errors=True)
    if args.slurm:
        try:
            results["slurm_decode"] = stage(
                "slurm_decode",
                "decode on the local SLURM",
                files=[str(p) for p in next(iter(corpora.values()))[1]],
                slurm_dir=str(shared / "slurm"),
                worker_counts=[1, 2],
            )
        except RuntimeError as error:  # no root, no SLURM packages: keep the rest of the run
            print(f"benchmarks: local SLURM skipped: {error}", flush=True)
            results["slurm_decode"] = {"error": str(error)}
    shutil.rmtree(work_dir, ignore_errors=True)

    record = build_record(
        results,
        cores=n_cores,
        corpora={
            name: (root, paths, _hours(name, args)) for name, (root, paths) in corpora.items()
        },
        tf_default=next(iter(MODEL_CONFIGS)),
        target=TARGET_CONFIG,
    )
    record["load_average_1min"] = {"start": load_start[0], "end": os.getloadavg()[0]}
    record["started"] = started
    # As typed: main() run as the module gets no argv and parses the interpreter's.
    options = sys.argv[1:] if argv is None else argv
    record["command"] = "python -m benchmarks " + " ".join(options)
    out_dir = Path(args.out)
    stem = f"{started}-{record['machine']['host']}"
    json_path = write_record(record, out_dir, stem)
    plot(record, out_dir / f"{stem}.png")
    print(table(record))
    print(f"benchmarks: wrote {json_path} and {stem}.png")


def _round(
    stage: Stage,
    name: str,
    files: list[str],
    inputs: list[str],
    args: argparse.Namespace,
    n_cores: int,
    work_dir: Path,
    round_index: int,
) -> dict[str, Any]:
    """Every configuration once on one corpus; every output checked against the baseline's.

    The first round's baseline output is the corpus's reference until the run ends; every
    other output is checked as soon as it is written (a failed check stops the run), then
    removed.
    """
    title = f"round {round_index + 1}, {name}"
    scratch = work_dir / f"{name}-{round_index}"
    scratch.mkdir()
    reference = work_dir / f"{name}-reference"
    one: dict[str, Any] = {
        "decode": {
            f"{workers} at a time": stage(
                "decode", f"{title}: decode, {workers} at a time", files=files, workers=workers
            )
            for workers in sorted({1, n_cores})
        },
        "model": _model_sweep(stage, title, files, scratch, args, n_cores, round_index),
    }
    cheapest = min(one["model"].values(), key=lambda m: m["core_s_per_audio_s"])
    batching = {
        key: cheapest[key] for key in ("batch_frames", "cpu_call_frames") if key in cheapest
    }
    baseline_dir = reference if round_index == 0 else scratch / "baseline"
    one["baseline"] = stage(
        "baseline",
        f"{title}: sequential baseline",
        files=files,
        output=str(baseline_dir),
        **batching,
    )
    if round_index:
        one["baseline"]["max_abs_diff_vs_baseline"] = check_baseline(
            f"{title}: baseline", baseline_dir, reference, len(files)
        )
    for label, result in one["decode"].items():
        if result["frames"] != one["baseline"]["frames"]:
            raise AssertionError(
                f"{title}: decode, {label} gave {result['frames']} frames, the baseline "
                f"{one['baseline']['frames']}"
            )
    for label, result in one["model"].items():
        result["max_abs_diff_vs_baseline"] = check_chunks(
            f"{title}: model, {label}", Path(result.pop("saved")), reference
        )
    one["corun"] = stage(
        "corun",
        f"{title}: co-run, decode beside the model, no Dask",
        module="benchmarks.corun",
        files=files,
        seconds=args.model_seconds,
        batch_frames=1024,
        decode_workers=max(1, n_cores // 2),
        model_threads=max(1, n_cores - n_cores // 2),
        min_seconds=args.corun_seconds,
        save=str(scratch / "corun.npz"),
    )
    one["corun"]["max_abs_diff_vs_baseline"] = check_chunks(
        f"{title}: co-run", scratch / "corun.npz", reference
    )
    one["pairing"] = stage(
        "pairing",
        f"{title}: embedder calls side by side against one at a time",
        module="benchmarks.corun",
        files=files,
        seconds=args.pairing_seconds,
        passes=args.pairing_passes,
        **MODEL_CONFIGS["batch 512 (default)"],  # buzzdask's scorer as it runs
    )
    if one["pairing"]["max_abs_diff"] > 1e-5:
        raise AssertionError(f"{title}: calls side by side changed the activations")
    analyzed: dict[str, Any] = {}
    for label, settings in _rotated(ANALYZE_CONFIGS, round_index):
        output = scratch / f"analyze-{len(analyzed)}"
        result = stage(
            "analyze",
            f"{title}: {label}",
            module="benchmarks.analyze_stage",
            files=files,
            inputs=inputs,
            settings=settings,
            output=str(output),
        )
        result["max_abs_diff_vs_baseline"] = check_analyze(
            f"{title}: {label}", output, files, reference
        )
        analyzed[label] = result
    one["analyze"] = {label: analyzed[label] for label in ANALYZE_CONFIGS}
    shutil.rmtree(scratch)
    return one


def _short_file_runs(
    args: argparse.Namespace, short_file: str
) -> list[tuple[str, str, str, dict[str, Any]]]:
    """Each round's runs on the 7-second file: (results key, label, stage, its parameters)."""
    runs: list[tuple[str, str, str, dict[str, Any]]] = []
    if args.cli:
        label = "the buzzdask command on a 7-second file"
        runs.append(("cli_short_file", label, "cli_short_file", {"file": short_file}))
    if args.fixed_cost:
        label = "analyze() on a 7-second file (a run's fixed cost)"
        params = {"module": "benchmarks.analyze_stage", "files": [short_file], "settings": {}}
        runs.append(("analyze_short_file", label, "analyze", params))
    return runs


def _rotated(configurations: Mapping[str, Any], round_index: int) -> list[tuple[str, Any]]:
    """The configurations' items, starting at the ``round_index``-th (modulo their number).

    Each round runs them in another order (A B C, B C A, C A B ...), so that no configuration
    always runs first after another stage, or always last, while the machine drifts.
    """
    items = list(configurations.items())
    start = round_index % len(items) if items else 0
    return items[start:] + items[:start]


def _corpora_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in CORPORA]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown corpus {unknown or value!r}: choose among {', '.join(CORPORA)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--corpora",
        type=_corpora_list,
        default=list(CORPORA),
        help=f"corpora to run, comma-separated (default {','.join(CORPORA)})",
    )
    parser.add_argument(
        "--hours", type=float, default=8.0, help="audio in the mp3 and wav corpora (default 8 h)"
    )
    parser.add_argument(
        "--small-files",
        type=int,
        default=1000,
        help="30-second files in the small-files corpus (default 1000)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="rounds: every configuration runs once per round, interleaved (default 3)",
    )
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
        help="pre-decoded audio the model stage and the co-run's model side score (default 1200)",
    )
    parser.add_argument(
        "--model-sweep",
        choices=("full", "short"),
        default="full",
        help="model-stage configurations: all of MODEL_CONFIGS, or the default batch in "
        "parallel calls, on TensorFlow's threads and on one thread, each in buzzdask's calls "
        "and in whole calls (default full)",
    )
    parser.add_argument(
        "--model-passes",
        type=int,
        default=3,
        help="timed passes in each model-stage process; the median counts (default 3)",
    )
    parser.add_argument(
        "--pairing-seconds",
        type=float,
        default=600.0,
        help="pre-decoded audio scored with embedder calls side by side and one at a time "
        "(default 600)",
    )
    parser.add_argument(
        "--pairing-passes",
        type=int,
        default=5,
        help="pairs of passes, one each way, their order alternating (default 5)",
    )
    parser.add_argument(
        "--corun-seconds",
        type=float,
        default=20.0,
        help="least seconds both co-run sides overlap (the decode side repeats the corpus)",
    )
    parser.add_argument(
        "--no-cli",
        dest="cli",
        action="store_false",
        help="skip timing the buzzdask command on a 7-second file",
    )
    parser.add_argument(
        "--no-fixed-cost",
        dest="fixed_cost",
        action="store_false",
        help="skip analyze() on a 7-second file, which each corpus's figures without a "
        "run's fixed cost subtract",
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
        chosen.setdefault(Path(path).suffix.lower(), path)
    return list(chosen.values())


def _hours(name: str, args: argparse.Namespace) -> float:
    """Audio hours of one corpus, from its plan."""
    planned = plan_named_corpus(name, hours=args.hours, small_files=args.small_files)
    return sum(f.seconds for f in planned) / 3600


def _model_sweep(
    stage: Stage,
    title: str,
    files: list[str],
    scratch: Path,
    args: argparse.Namespace,
    n_cores: int,
    round_index: int,
) -> dict[str, Any]:
    """Every model configuration on the same pre-decoded audio of the corpus.

    In :func:`_rotated` order (round ``round_index``), reported in :data:`MODEL_CONFIGS`' order.
    Each result gets ``cores_used`` (the intra-op pool, else every core),
    ``wall_core_s_per_audio_s = cores_used / realtime factor`` (the earlier records' cost) and
    ``saved``, its activations for :func:`benchmarks.outputs.check_chunks`.
    """
    results: dict[str, Any] = {}
    sweep = {
        label: options
        for label, options in MODEL_CONFIGS.items()
        if args.model_sweep == "full" or label in SHORT_SWEEP
    }
    for label, options in _rotated(sweep, round_index):
        save = scratch / f"model-{len(results)}.npz"
        result = stage(
            "model",
            f"{title}: model stage, {label}",
            files=files,
            seconds=args.model_seconds,
            passes=args.model_passes,
            save=str(save),
            **options,
        )
        result["cores_used"] = min(n_cores, options.get("intra_op_threads") or n_cores)
        result["wall_core_s_per_audio_s"] = result["cores_used"] / result["realtime_factor"]
        results[label] = {**options, **result, "saved": str(save)}
    return {label: results[label] for label in sweep}


if __name__ == "__main__":
    main()
