"""The GPU checks: fidelity, scorer speed per batch size, and ``analyze`` against the decode bound.

Run by ``benchmarks/device-check`` on a machine with a GPU (it installs what is missing first);
``python -m benchmarks.device_check --allow-cpu --quick`` runs the same code on a CPU, which is
how the test suite keeps it working. One JSON record under ``benchmarks/results/``:

- ``scorer``: the device the scorer recorded, TensorFloat-32 as TensorFlow reports it.
- ``fidelity``: per file (the shared testbuzz.mp3 and a generated stereo MP3), the largest
  difference between the GPU scorer's activations and a CPU scorer's (TF32 off; target 1e-4),
  and the drift with TF32 on, for the record.
- ``batch_sweep``: frames per second of the scorer at batch sizes 256 to 8192.
- ``analyze``: a generated MP3 corpus analysed with the machine's cores decoding and one GPU
  scorer, against the decode bound (cores x one ffmpeg's rate; aim: 80 %).
- ``projection``: hours for the 67 GB (about 1,160 audio hours) experiment on one node with
  ``--node-cores`` decode cores and ``--node-gpus`` GPUs, from the measured rates.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.corpus import build_corpus
from benchmarks.report import describe_machine, write_record
from benchmarks.stages import cores, measured

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_HOURS = 1160.0  # the seed's 67 GB of 128 kb/s MP3s
FIDELITY_TARGET = 1e-4


def _options(shared: Path, batch_frames: int) -> dict[str, Any]:
    """A scorer's options as buzzdask gives them, at ``batch_frames`` (a GPU's calls)."""
    from buzzdask.models import resolve_model
    from buzzdask.settings import load_settings

    model = resolve_model(
        shared / "data/models/model_general_v3",
        embedder=str(shared / "models/yamnet/saved_model_wholehop"),
    )
    return {
        "head_path": model.path,
        "embedder_handle": model.embedder.handle,
        "spec": model.embedder.frame_spec(),
        "n_classes": len(model.classes),
        "batch_frames": batch_frames,
        "cpu_call_frames": load_settings().cpu_call_frames,
    }


def _whole_file(path: str, spec: Any) -> Any:
    from buzzdask.decode import DecodedChunk, decode_file

    samples = decode_file(path, sample_rate=spec.sample_rate)
    return DecodedChunk(
        samples=samples, first_frame=0, n_frames=spec.n_complete_frames(len(samples))
    )


def _activations(shared: str, files: list[str], *, hide_gpus: bool) -> list[np.ndarray]:
    """Every file's activations from a fresh scorer (in a fresh process: TensorFlow's devices)."""
    if hide_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    from buzzdask.score import Scorer

    options = _options(Path(shared), 1024)
    scorer = Scorer(**options)
    return [scorer.score([_whole_file(f, options["spec"])])[0] for f in files]


def _in_process(function: Any, *args: Any, **kwargs: Any) -> Any:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(function, *args, **kwargs).result()


def fidelity(shared: Path, files: list[str]) -> dict[str, Any]:
    """GPU scorer against a CPU scorer, TF32 off (as buzzdask runs) and on (for the record)."""
    import tensorflow as tf

    from buzzdask.score import Scorer

    cpu = _in_process(_activations, str(shared), files, hide_gpus=True)
    options = _options(shared, 1024)
    scorer = Scorer(**options)
    chunks = [_whole_file(f, options["spec"]) for f in files]
    device_record = {
        "device": scorer.device,
        "tensor_float_32": bool(tf.config.experimental.tensor_float_32_execution_enabled()),
    }
    strict = [scorer.score([chunk])[0] for chunk in chunks]
    tf.config.experimental.enable_tensor_float_32_execution(True)
    loose = [scorer.score([chunk])[0] for chunk in chunks]
    tf.config.experimental.enable_tensor_float_32_execution(False)
    per_file = {
        Path(f).name: {
            "frames": len(c),
            "max_abs_diff_tf32_off": float(np.abs(s - c).max()),
            "max_abs_diff_tf32_on": float(np.abs(loose_file - c).max()),
        }
        for f, c, s, loose_file in zip(files, cpu, strict, loose, strict=True)
    }
    worst = max(entry["max_abs_diff_tf32_off"] for entry in per_file.values())
    return {
        "scorer": device_record,
        "files": per_file,
        "target": FIDELITY_TARGET,
        "within_target": worst <= FIDELITY_TARGET,
    }


def batch_sweep(shared: Path, batch_sizes: list[int], n_frames: int) -> dict[str, Any]:
    """Frames per second of one scorer per batch size, on the same noise (after a warm-up).

    Also the most frames of its embedder calls: the whole batch on a GPU, on a CPU at most
    ``cpu-call-frames``.
    """
    from buzzdask.decode import DecodedChunk
    from buzzdask.score import Scorer

    rates, call_frames = {}, {}
    for batch in batch_sizes:
        options = _options(shared, batch)
        spec = options["spec"]
        rng = np.random.default_rng(0)
        samples = (0.1 * rng.standard_normal(spec.span(n_frames))).astype(np.float32)
        chunk = DecodedChunk(samples=samples, first_frame=0, n_frames=n_frames)
        scorer = Scorer(**options)
        scorer.score([chunk])  # warm-up: graph tracing and GPU memory
        started = time.perf_counter()
        scorer.score([chunk])
        rates[str(batch)] = n_frames / (time.perf_counter() - started)
        call_frames[str(batch)] = scorer.call_frames
    return {"frames": n_frames, "frames_per_second": rates, "call_frames": call_frames}


def decode_rate_per_core(path: str) -> float:
    """Audio seconds one ffmpeg decodes per CPU second (buzzdask's filter chain)."""
    from buzzdask.decode import decode_file, probe_audio

    info = probe_audio(path)
    with measured() as record:
        decode_file(path, sample_rate=16000)
    return float(info.duration_s or 0.0) / record["cpu_s"]


def analyze_on_node(shared: Path, files: list[str], *, gpu: bool, out: Path) -> dict[str, Any]:
    """``analyze`` with every core decoding and one scorer worker (declaring a GPU if ``gpu``)."""
    from distributed import Client, LocalCluster

    # Its module imported here, not on first use inside the measured time.
    from buzzdask import analyze as buzzdask_analyze

    n_cores = cores()
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=max(1, n_cores - 1), dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        scorer_worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address),
                *("--nthreads", "2", "--no-dashboard"),
                *(["--resources", "GPU=1"] if gpu else []),
            ]
        )
        try:
            client.wait_for_workers(2, timeout=120)
            with measured() as record:
                result = buzzdask_analyze(
                    files,
                    shared / "data/models/model_general_v3",
                    output=out,
                    client=client,
                    embedder=str(shared / "models/yamnet/saved_model_wholehop"),
                    progress=False,
                    on_conflict="new",
                )
                record["audio_s"] = result.summary["audio_hours"] * 3600
        finally:
            scorer_worker.terminate()
            scorer_worker.wait(timeout=60)
    record["scorers"] = result.summary["scorers"]
    record["files_failed"] = result.summary["files_failed"]
    return record


def main(argv: list[str] | None = None) -> int:
    """Run every check and write the record; exit 2 when no GPU is seen (unless ``--allow-cpu``)."""
    args = _parser().parse_args(argv)
    import tensorflow as tf

    record: dict[str, Any] = {
        "command": "python -m benchmarks.device_check " + " ".join(argv or sys.argv[1:]),
        "machine": describe_machine(),
        "tensorflow": tf.__version__,
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
    }
    gpu = bool(record["gpus"])
    if not gpu and not args.allow_cpu:
        print(
            "device-check: TensorFlow sees no GPU (install tensorflow[and-cuda])", file=sys.stderr
        )
        return 2
    sizes = _sizes(args.quick)
    work = Path(tempfile.mkdtemp(prefix="buzzdask-device-"))
    # The corpus' first file is a stereo 44.1 kHz MP3 (benchmarks.corpus.PATTERN).
    stereo = build_corpus(sizes["stereo_hours"], work / "stereo", jobs=cores())[0]
    files = [str(args.shared / "data/audio_in/testbuzz.mp3"), str(stereo)]
    record["fidelity"] = fidelity(args.shared, files)
    record["batch_sweep"] = batch_sweep(args.shared, sizes["batches"], sizes["frames"])
    generated = build_corpus(sizes["corpus_hours"], work / "corpus", jobs=cores())
    corpus = [str(p) for p in generated if p.suffix == ".mp3"]  # what the lab's recorders write
    per_core = decode_rate_per_core(corpus[0])
    run = analyze_on_node(args.shared, corpus, gpu=gpu, out=work / "results")
    bound = per_core * cores()
    record["analyze"] = {
        **run,
        "decode_bound_rtf": bound,
        "fraction_of_bound": run["realtime_factor"] / bound,
    }
    gpu_rate = max(record["batch_sweep"]["frames_per_second"].values()) * 0.96  # audio s / s
    node_rate = min(per_core * args.node_cores, gpu_rate * args.node_gpus)
    record["projection"] = {
        "experiment_audio_hours": EXPERIMENT_HOURS,
        "node_cores": args.node_cores,
        "node_gpus": args.node_gpus,
        "decode_rtf_per_core": per_core,
        "scorer_rtf_per_gpu": gpu_rate,
        "minutes": EXPERIMENT_HOURS * 60 / node_rate,
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = write_record(record, args.out, f"{stamp}-{'device' if gpu else 'device-cpu'}")
    print(json.dumps({k: record[k] for k in ("fidelity", "analyze", "projection")}, indent=1))
    print(f"device-check: wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__)
    shared = os.environ.get("BUZZDASK_SHARED_DIR", str(REPO.parent / "shared"))
    parser.add_argument("--shared", type=Path, default=Path(shared), help="shared data directory")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run)")
    parser.add_argument("--quick", action="store_true", help="small sizes (for the test suite)")
    parser.add_argument("--node-cores", type=int, default=92, help="decode cores of one node")
    parser.add_argument("--node-gpus", type=int, default=4, help="GPUs of one node")
    return parser


def _sizes(quick: bool) -> dict[str, Any]:
    """Corpus hours, batch sizes and sweep frames: the real check's, or a CPU dry run's."""
    if quick:
        return {"stereo_hours": 0.02, "corpus_hours": 0.05, "batches": [256, 512], "frames": 300}
    return {
        "stereo_hours": 0.25,
        "corpus_hours": 8.0,
        "batches": [256, 512, 1024, 2048, 4096, 8192],
        "frames": 16384,
    }


if __name__ == "__main__":
    raise SystemExit(main())
