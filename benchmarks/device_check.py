"""The GPU checks (fidelity, scorer speed per batch size, ``analyze`` against the decode bound)
and the node's decode side (decode scaling over the cores, loopback transfer).

Run by ``benchmarks/device-check`` on a machine with a GPU (it installs what is missing first);
``python -m benchmarks.device_check --allow-cpu --quick`` runs the same code on a CPU, which is
how the test suite keeps it working, and ``--without-tensorflow`` runs only the parts that need
no TensorFlow (a machine it cannot reach). ``--print-batch-script CONFIG`` prints a SLURM job that
runs it on a GPU node of a cluster (an OSC GPU node: :func:`batch_script`). One JSON record under
``benchmarks/results/``:

- ``scorer``: the device the scorer recorded, TensorFloat-32 as TensorFlow reports it.
- ``fidelity``: per file (the shared testbuzz.mp3 and a generated stereo MP3), the largest
  difference between the GPU scorer's activations and a CPU scorer's (TF32 off; target 1e-4),
  and the drift with TF32 on, for the record.
- ``batch_sweep``: frames per second of the scorer at batch sizes 256 to 8192.
- ``decode_scaling``: buzzdask's chunk decoding in 1 to all-cores processes at once: realtime
  factor, audio seconds per CPU second, and the cores kept busy.
- ``loopback``: decoded chunks moved between two Dask worker processes of the machine (what a
  scorer worker receives from the decode workers of its node).
- ``analyze``: a generated MP3 corpus analysed with the machine's cores decoding and one GPU
  scorer, against the decode bound (cores x one ffmpeg's rate; aim: 80 %).
- ``projection``: minutes for the 67 GB (about 1,160 audio hours) experiment on one node with
  ``--node-cores`` decode cores and ``--node-gpus`` GPUs, from the measured rates.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from dask.utils import parse_bytes

from benchmarks.corpus import build_corpus
from benchmarks.long_files import SPEC  # YAMNet's frames: the decode side needs no model files
from benchmarks.report import describe_machine, write_record
from benchmarks.stages import (
    chunk_tasks,
    cores,
    cpu_seconds,
    decoded_frames,
    measured,
)
from buzzdask.errors import ParameterError

__all__ = ["batch_script", "main"]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_HOURS = 1160.0  # the seed's 67 GB of 128 kb/s MP3s
#: The projection's node unless given or printed for a configuration's: a GPU node of OSC
#: Cardinal (osc-cardinal.yaml: 96 cores, 4 GPUs), less a core per GPU for its scorer.
CARDINAL_NODE = {"node_cores": 92, "node_gpus": 4}
#: What the checks with TensorFlow read from the shared data directory (``--shared``).
SHARED_MODEL = "data/models/model_general_v3"
SHARED_EMBEDDER = "models/yamnet/saved_model_wholehop"
SHARED_RECORDING = "data/audio_in/testbuzz.mp3"
#: Flags of this module a batch job's check runs with, as given to ``--print-batch-script``.
FORWARDED_FLAGS = ("allow_cpu", "quick", "without_tensorflow")
FIDELITY_TARGET = 1e-4


def _options(shared: Path, batch_frames: int) -> dict[str, Any]:
    """A scorer's options as buzzdask gives them, at ``batch_frames`` (a GPU's calls)."""
    from buzzdask.models import resolve_model
    from buzzdask.settings import load_settings

    model = resolve_model(
        shared / SHARED_MODEL,
        embedder=str(shared / SHARED_EMBEDDER),
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


def _warm_decode_worker() -> None:
    """Pay a decode process's imports before the clock starts (buzzdask's workers pay them once)."""
    import buzzdask.decode  # noqa: F401


def _timed_chunk(task: tuple[Any, ...]) -> tuple[int, float]:
    """One chunk decoded as buzzdask's task does: its frames and its CPU-s (ffmpeg's too)."""
    started = cpu_seconds()
    frames = decoded_frames(*task)
    return frames, cpu_seconds() - started


def _wait_a_moment(_: int) -> None:
    time.sleep(0.2)


def decode_scaling(
    files: list[str], *, process_counts: list[int], chunks_per_process: int
) -> dict[str, Any]:
    """buzzdask's chunk decoding with 1 to all cores' worth of processes at once.

    Each count decodes ``chunks_per_process`` chunks per process (the corpus' chunks in turn,
    repeated as needed), in a pool started and warmed before the clock starts; counts are
    measured up and then down, and each entry keeps the faster of its two. One ffmpeg keeps
    more than one core busy (its demuxer, decoder and filters run in threads), so the node's
    rate is read with every core busy, not as one process's times the cores.

    Returns
    -------
    dict
        ``runs``: per count, ``processes``, ``chunks``, ``audio_s``, ``wall_s``, ``cpu_s``,
        ``realtime_factor`` (audio s per wall s), ``audio_s_per_cpu_s`` and ``cores_busy``
        (CPU s per wall s); ``audio_s_per_cpu_s_one_process``: one ffmpeg's rate per CPU
        second (the decode bound's per-core rate); ``per_core_rtf_all_cores``: the realtime
        factor with as many processes as cores, per core.
    """
    from buzzdask.decode import probe_audio

    tasks = chunk_tasks({"files": files}, SPEC, [probe_audio(path) for path in files])
    spawn = multiprocessing.get_context("spawn")
    runs: dict[int, dict[str, Any]] = {}
    for processes in [*process_counts, *reversed(process_counts)]:
        work = [tasks[i % len(tasks)] for i in range(processes * chunks_per_process)]
        with spawn.Pool(processes, initializer=_warm_decode_worker) as pool:
            pool.map(_wait_a_moment, range(processes), chunksize=1)  # every process is up
            started = time.perf_counter()
            done = pool.map(_timed_chunk, work, chunksize=1)
            wall_s = time.perf_counter() - started
        audio_s = sum(frames for frames, _ in done) * SPEC.hop_length / SPEC.sample_rate
        cpu_s = sum(cpu for _, cpu in done)
        run = {
            "processes": processes,
            "chunks": len(work),
            "audio_s": audio_s,
            "wall_s": wall_s,
            "cpu_s": cpu_s,
            "realtime_factor": audio_s / wall_s,
            "audio_s_per_cpu_s": audio_s / cpu_s,
            "cores_busy": cpu_s / wall_s,
        }
        if processes not in runs or wall_s < runs[processes]["wall_s"]:
            runs[processes] = run
    most = runs[max(process_counts)]
    return {
        "runs": [runs[count] for count in process_counts],
        "audio_s_per_cpu_s_one_process": runs[1]["audio_s_per_cpu_s"],
        "per_core_rtf_all_cores": most["realtime_factor"] / most["processes"],
    }


def _audio_like(n_samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n_samples, dtype=np.float32)


def _n_bytes(array: np.ndarray) -> int:
    return int(array.nbytes)


def loopback_transfer(*, arrays: int, seconds_per_array: float) -> dict[str, Any]:
    """Decoded chunks moved from one Dask worker process to another on this machine.

    ``arrays`` chunks of ``seconds_per_array`` of 16 kHz float32 audio are made on one worker,
    then each is used by a task on the other: the time from their submission to the last
    result is what a scorer worker waits to receive them from a decode worker of its node.
    """
    from distributed import Client, LocalCluster, wait

    n_samples = int(seconds_per_array * 16000)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        sender, receiver = sorted(client.scheduler_info()["workers"])
        made = [
            client.submit(_audio_like, n_samples, seed, workers=[sender], pure=False)
            for seed in range(arrays)
        ]
        wait(made)
        started = time.perf_counter()
        moved = client.gather([client.submit(_n_bytes, m, workers=[receiver]) for m in made])
        wall_s = time.perf_counter() - started
    return {
        "arrays": arrays,
        "bytes": sum(moved),
        "wall_s": wall_s,
        "bytes_per_s": sum(moved) / wall_s,
        "audio_s_per_s": arrays * seconds_per_array / wall_s,
    }


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
                    shared / SHARED_MODEL,
                    output=out,
                    client=client,
                    embedder=str(shared / SHARED_EMBEDDER),
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
    """Run every check and write the record; exit 2 when no GPU is seen (unless ``--allow-cpu``).

    With ``--print-batch-script``, print the job script that runs them instead
    (:func:`batch_script`); exit 3 when the configuration cannot make one.
    """
    args = _parser().parse_args(argv)
    if args.print_batch_script:
        try:
            print(batch_script(args), end="")
        except ParameterError as error:
            print(f"device-check: {error}", file=sys.stderr)
            return 3
        return 0
    record: dict[str, Any] = {
        "command": "python -m benchmarks.device_check " + " ".join(argv or sys.argv[1:]),
        "machine": describe_machine(),
    }
    gpu = False
    if not args.without_tensorflow:
        if missing := _missing_shared(args.shared):
            print(f"device-check: {missing}", file=sys.stderr)
            return 3
        import tensorflow as tf

        record["tensorflow"] = tf.__version__
        record["gpus"] = [d.name for d in tf.config.list_physical_devices("GPU")]
        gpu = bool(record["gpus"])
        if not gpu and not args.allow_cpu:
            print(
                "device-check: TensorFlow sees no GPU (install tensorflow[and-cuda])",
                file=sys.stderr,
            )
            return 2
    sizes = _sizes(args.quick)
    # The generated corpora and results go with the check: hours of MP3 on a node's /tmp.
    with tempfile.TemporaryDirectory(prefix="buzzdask-device-") as scratch:
        work = Path(scratch)
        generated = build_corpus(sizes["corpus_hours"], work / "corpus", jobs=cores())
        corpus = [str(p) for p in generated if p.suffix == ".mp3"]  # what the lab's recorders write
        scaling = decode_scaling(
            corpus,
            process_counts=_process_counts(cores()),
            chunks_per_process=sizes["chunks_per_process"],
        )
        record["decode_scaling"] = scaling
        record["loopback"] = loopback_transfer(
            arrays=sizes["loopback_arrays"], seconds_per_array=sizes["loopback_seconds"]
        )
        gpu_rate = None
        if not args.without_tensorflow:
            # The corpus' first file is a stereo 44.1 kHz MP3 (benchmarks.corpus.PATTERN).
            stereo = build_corpus(sizes["stereo_hours"], work / "stereo", jobs=cores())[0]
            files = [str(args.shared / SHARED_RECORDING), str(stereo)]
            record["fidelity"] = fidelity(args.shared, files)
            record["batch_sweep"] = batch_sweep(args.shared, sizes["batches"], sizes["frames"])
            run = analyze_on_node(args.shared, corpus, gpu=gpu, out=work / "results")
            bound = scaling["audio_s_per_cpu_s_one_process"] * cores()
            record["analyze"] = {
                **run,
                "decode_bound_rtf": bound,
                "fraction_of_bound": run["realtime_factor"] / bound,
            }
            gpu_rate = max(record["batch_sweep"]["frames_per_second"].values()) * 0.96  # audio s/s
    record["projection"] = projection(
        scaling,
        record["loopback"],
        gpu_rate,
        node_cores=args.node_cores or CARDINAL_NODE["node_cores"],
        node_gpus=args.node_gpus or CARDINAL_NODE["node_gpus"],
    )
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kind = "device-decode" if args.without_tensorflow else "device" if gpu else "device-cpu"
    path = write_record(record, args.out, f"{stamp}-{kind}")
    shown = ("decode_scaling", "loopback", "fidelity", "analyze", "projection")
    print(json.dumps({k: record[k] for k in shown if k in record}, indent=1))
    print(f"device-check: wrote {path}")
    return 0


def projection(
    scaling: dict[str, Any],
    loopback: dict[str, Any],
    scorer_rtf_per_gpu: float | None,
    *,
    node_cores: int,
    node_gpus: int,
) -> dict[str, Any]:
    """Minutes for the seed's experiment on one node, from the measured rates.

    The node decodes at the per-core rate measured with every core of this machine busy; with
    no GPU scorer measured (``scorer_rtf_per_gpu`` None), the minutes are the decode side's
    alone and ``scorer_rtf_per_gpu_needed`` says what each GPU must score to keep up.
    """
    decode_rtf = scaling["per_core_rtf_all_cores"] * node_cores
    node_rtf = decode_rtf
    if scorer_rtf_per_gpu is not None:
        node_rtf = min(decode_rtf, scorer_rtf_per_gpu * node_gpus)
    audio_s = EXPERIMENT_HOURS * 3600
    return {
        "experiment_audio_hours": EXPERIMENT_HOURS,
        "node_cores": node_cores,
        "node_gpus": node_gpus,
        "decode_rtf_per_core": scaling["per_core_rtf_all_cores"],
        "scorer_rtf_per_gpu": scorer_rtf_per_gpu,
        "scorer_rtf_per_gpu_needed": decode_rtf / node_gpus,
        # Each GPU's worker receives its share of the decoded audio over loopback.
        "loopback_minutes_per_scorer": audio_s / node_gpus / loopback["audio_s_per_s"] / 60,
        "minutes": audio_s / node_rtf / 60,
        "bound_by": (
            "decode (no GPU scorer measured)"
            if scorer_rtf_per_gpu is None
            else "decode"
            if node_rtf == decode_rtf
            else "scorer"
        ),
    }


def batch_script(args: argparse.Namespace) -> str:
    """An sbatch script that runs ``benchmarks/device-check`` on a GPU node of a SLURM cluster.

    For a cluster the device machines are not (an OSC GPU node): the job asks for one GPU and
    the cores and memory of the configuration's GPU worker job (``--print-batch-script
    osc-cardinal``: 8 cores, 72 GiB), or with ``--whole-node`` for the whole node its GPU
    partition declares. It runs this checkout's ``benchmarks/device-check`` with the Python
    running this command (a venv with ``buzzdask[gpu]``), the shared data of ``--shared`` and
    the record written to ``--out``; the projection's node is the partition's (its cores less a
    core per GPU's scorer, and its GPUs) unless ``--node-cores`` and ``--node-gpus`` are given.

    Parameters
    ----------
    args : argparse.Namespace
        This module's parsed command line: ``print_batch_script`` (a configuration of
        ``cluster_configs/`` or its path), ``account``, ``walltime``, ``whole_node``, ``shared``,
        ``out``, ``node_cores``, ``node_gpus`` and :data:`FORWARDED_FLAGS`.

    Returns
    -------
    str
        The script; submit it with ``sbatch``.

    Raises
    ------
    ParameterError
        For a configuration that is not SLURM, a missing account where one is required,
        ``--whole-node`` where the configuration declares no node of its GPU partition, or a
        shared data directory without what the checks with TensorFlow read.
    """
    # Here, not at the top: the decode side runs where dask-jobqueue is not installed.
    from buzzdask.cluster.batch import job_section, one_node_job_head
    from buzzdask.cluster.configs import load_slurm_config, node_size
    from buzzdask.cluster.options import JobOptions

    entry = load_slurm_config(args.print_batch_script)
    options = JobOptions(account=args.account, walltime=args.walltime)
    options.require_account(entry, ("gpu",))
    section = job_section(entry["gpu-config"], options.overrides("gpu"))
    node = node_size(entry, section["queue"])
    if not args.without_tensorflow and (missing := _missing_shared(args.shared)):
        raise ParameterError(missing)  # before the job waits in the queue for a GPU
    if not args.whole_node:
        cores, memory, gpus = section["cores"], parse_bytes(section["memory"]), 1
    elif node is None:
        raise ParameterError(
            f"{entry['name']} declares no node of partition {section['queue']!r} "
            "(buzzdask.clusters.<name>.nodes): --whole-node needs its size"
        )
    else:
        cores, memory, gpus = node.cores, node.memory, node.gpus
    lines = one_node_job_head(
        section, job_name="buzzdask-device-check", cores=cores, memory=memory, gpus=gpus
    )
    # The partition's node, less a core per GPU for its scorer, as CARDINAL_NODE.
    projected = (
        {"node_cores": node.cores - node.gpus, "node_gpus": node.gpus} if node else CARDINAL_NODE
    )
    check = [
        *("bash", "benchmarks/device-check"),
        *("--node-cores", str(args.node_cores or projected["node_cores"])),
        *("--node-gpus", str(args.node_gpus or projected["node_gpus"])),
        *(f"--{flag.replace('_', '-')}" for flag in FORWARDED_FLAGS if getattr(args, flag)),
    ]
    return (
        "\n".join(
            [
                *lines,
                f"cd {shlex.quote(str(REPO))}",
                # The venv this was printed from: device-check installs nothing where it has all.
                f"export PYTHON={shlex.quote(sys.executable)}",
                f"export BUZZDASK_SHARED_DIR={shlex.quote(str(args.shared.resolve()))}",
                f"export OUT={shlex.quote(str(args.out.resolve()))}",
                shlex.join(check),
            ]
        )
        + "\n"
    )


def _missing_shared(shared: Path) -> str | None:
    """What the checks with TensorFlow need and ``shared`` lacks, said in a line; else None."""
    missing = [
        name
        for name in (SHARED_MODEL, SHARED_EMBEDDER, SHARED_RECORDING)
        if not (shared / name).exists()
    ]
    if not missing:
        return None
    return (
        f"the shared data directory {shared} (--shared, BUZZDASK_SHARED_DIR) lacks "
        f"{', '.join(missing)}: the buzzdetect model, YAMNet and the recording the GPU checks "
        "score (or run --without-tensorflow)"
    )


def _process_counts(n_cores: int) -> list[int]:
    """1, 2, 4 ... up to the cores, and the cores themselves."""
    counts = [1 << i for i in range(n_cores.bit_length()) if 1 << i < n_cores]
    return [*counts, n_cores]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__)
    shared = os.environ.get("BUZZDASK_SHARED_DIR", str(REPO.parent / "shared"))
    parser.add_argument("--shared", type=Path, default=Path(shared), help="shared data directory")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (a dry run)")
    parser.add_argument("--quick", action="store_true", help="small sizes (for the test suite)")
    parser.add_argument(
        "--without-tensorflow",
        action="store_true",
        help="only the checks that need no TensorFlow: decode scaling, loopback, projection",
    )
    parser.add_argument(
        "--node-cores",
        type=int,
        help="decode cores of the projection's node (default: a Cardinal GPU node's 92)",
    )
    parser.add_argument(
        "--node-gpus", type=int, help="GPUs of the projection's node (default: Cardinal's 4)"
    )
    job = parser.add_argument_group("a SLURM job instead (an OSC GPU node)")
    job.add_argument(
        "--print-batch-script",
        metavar="CONFIG",
        help="print an sbatch script that runs the check on a GPU node of this configuration "
        "(osc-cardinal, osc-ascend, osc-pitzer, local-slurm or a file), and exit",
    )
    job.add_argument("--account", help="SLURM account / OSC project, e.g. PAS1234")
    job.add_argument("--walltime", help="HH:MM:SS of the job (default: the configuration's)")
    job.add_argument(
        "--whole-node",
        action="store_true",
        help="ask for the whole node (all its cores and GPUs) instead of one GPU's share",
    )
    return parser


def _sizes(quick: bool) -> dict[str, Any]:
    """Corpora, batch sizes, sweep frames, decode and loopback work: the check's or a dry run's."""
    if quick:
        return {
            "stereo_hours": 0.02,
            "corpus_hours": 0.05,
            "batches": [256, 512],
            "frames": 300,
            "chunks_per_process": 2,
            "loopback_arrays": 4,
            "loopback_seconds": 60.0,
        }
    return {
        "stereo_hours": 0.25,
        "corpus_hours": 8.0,
        "batches": [256, 512, 1024, 2048, 4096, 8192],
        "frames": 16384,
        "chunks_per_process": 6,
        "loopback_arrays": 64,
        "loopback_seconds": 600.0,
    }


if __name__ == "__main__":
    raise SystemExit(main())
