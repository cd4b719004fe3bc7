"""The co-run bound B₂: both stages at once, as plain processes, without Dask.

One process decodes the corpus with buzzdask's decode (``decode_workers`` ffmpeg at a time:
one core's share on two cores) while another scores pre-decoded audio of the same corpus with
the scorer on ``model_threads`` TensorFlow threads (the other core's share). Each slows the
other (caches, memory bandwidth), which no scheduler can remove; nothing a scheduler adds
(tasks, transfers, partitions, journal) is there. Each side's cost is its CPU time per audio
second while both ran, and on N cores ``B₂ = N / (c₂_decode + c₂_model)``.

The model side loads the model and scores its audio once (the warm-up; its activations are kept
for the equality check), the decode side sets up, then both start together. The decode side
decodes the whole corpus, again until ``min_seconds`` have passed, then stops; the model side
scores its chunks round and round until told to stop. Each notes ``(time, CPU seconds, audio
seconds)`` after every chunk (decode) or batch of chunks (model), and each cost is taken between
the first and the last of its notes that fall while the other side ran. The processes are not
pinned to cores: the operating system places them, as it places buzzdask's workers.

Run as stage ``corun`` of this module (:func:`benchmarks.measure.run_stage` with
``module="benchmarks.corun"``); it starts its two sides as ``corun_decode`` and ``corun_model``.

B₂'s model side runs one embedder call at a time beside the decoding. A run on N cores runs its
calls side by side wherever decoding leaves the cores to TensorFlow: on the WAVs, where decoding
is a tenth of the work, most of the time. Stage ``pairing`` measures what that costs per frame
(:func:`pairing`), and :func:`benchmarks.summary.round_costs` makes the paired bound of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stages import (
    cores,
    cpu_seconds,
    decode_corpus,
    groups_of,
    main,
    make_scorer,
    measured,
    model_and_frames,
    predecoded,
    save_activations,
    warm_decoder,
)

__all__ = ["STAGES", "corun", "pairing"]

_POLL_S = 0.01  # how often a side looks for the go and stop files


def corun(params: dict[str, Any]) -> dict[str, Any]:
    """Both sides at once; their costs over the time they overlapped, and ``B₂``.

    Parameters
    ----------
    params : dict
        The model stage's and the decode stage's parameters (``files``, ``model``,
        ``embedder``, ``seconds``, ``batch_frames``, ``work_dir``), plus ``decode_workers``,
        ``model_threads``, ``min_seconds`` and ``save`` (the model side's activations).

    Returns
    -------
    dict
        ``decode`` and ``model`` (each side's cost ``core_s_per_audio_s`` over the overlap,
        its audio, CPU and wall seconds there, its realtime factor there, and its record),
        ``realtime_factor`` (B₂ on this machine's cores) and ``window_s``.
    """
    scratch = Path(tempfile.mkdtemp(prefix="corun-", dir=params["work_dir"]))
    (scratch / "params.json").write_text(json.dumps({**params, "scratch": str(scratch)}))
    sides: dict[str, subprocess.Popen[bytes]] = {}
    for side in ("model", "decode"):
        stderr = (scratch / f"{side}.stderr").open("wb")  # a pipe could fill while we wait
        sides[side] = subprocess.Popen(
            [
                *(sys.executable, "-m", "benchmarks.corun", f"corun_{side}"),
                *(f"@{scratch / 'params.json'}", str(scratch / f"{side}.json")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        stderr.close()
    try:
        for side, process in sides.items():
            _wait_for(scratch / f"ready-{side}", process, scratch / f"{side}.stderr")
        (scratch / "go").touch()
        _finish(sides["decode"], scratch / "decode.stderr")
        (scratch / "stop").touch()
        _finish(sides["model"], scratch / "model.stderr")
    finally:
        for process in sides.values():
            if process.poll() is None:
                process.kill()
    decode = json.loads((scratch / "decode.json").read_text(encoding="utf-8"))
    model = json.loads((scratch / "model.json").read_text(encoding="utf-8"))
    end = decode["notes"][-1][0]
    costs = {
        "decode": _cost(decode["notes"], decode["notes"][0][0], end),
        "model": _cost(model["notes"], decode["notes"][0][0], end),
    }
    c_decode, c_model = (costs[side]["core_s_per_audio_s"] for side in ("decode", "model"))
    return {
        "decode": {**costs["decode"], "workers": params["decode_workers"], "record": decode},
        "model": {**costs["model"], "threads": params["model_threads"], "record": model},
        "c_decode_core_s_per_audio_s": c_decode,
        "c_model_core_s_per_audio_s": c_model,
        # Both stages' cost per audio second, what buzzdask's own is measured against.
        "core_s_per_audio_s": c_decode + c_model,
        "cores": cores(),
        "realtime_factor": cores() / (c_decode + c_model),
        "window_s": end - decode["notes"][0][0],
    }


def decode_side(params: dict[str, Any]) -> dict[str, Any]:
    """The decode side: the decode stage's work, round the corpus until ``min_seconds``."""
    _, spec = model_and_frames(params)
    warm_decoder(params, spec)
    seconds_per_frame = spec.hop_length / spec.sample_rate
    notes: list[list[float]] = []
    passes = 0
    audio_s = 0.0
    with ThreadPoolExecutor(params["decode_workers"]) as pool:
        _ready_and_wait(Path(params["scratch"]), "decode")
        started = time.monotonic()
        notes.append([started, cpu_seconds(), 0.0])
        while passes == 0 or time.monotonic() - started < params["min_seconds"]:
            done_s = audio_s

            def note(frames: int, done_s: float = done_s) -> None:
                notes.append([time.monotonic(), cpu_seconds(), done_s + frames * seconds_per_frame])

            frames, chunks = decode_corpus(params, spec, pool, on_chunk=note)
            audio_s += frames * seconds_per_frame
            passes += 1
    return {"notes": notes, "passes": passes, "frames_per_pass": frames, "chunks_per_pass": chunks}


def model_side(params: dict[str, Any]) -> dict[str, Any]:
    """The model side: the model stage's scorer on the corpus's chunks, until told to stop."""
    model_spec, spec = model_and_frames(params)
    chunks, origins = predecoded(params, spec)
    threads = params["model_threads"]
    scorer = make_scorer(
        {**params, "intra_op_threads": threads, "inter_op_threads": threads}, model_spec, spec
    )
    groups = groups_of(chunks, params["batch_frames"])
    # The warm-up pass: TensorFlow's first calls trace and allocate, and its output is checked.
    save_activations(params["save"], [a for g in groups for a in scorer.score(g)], origins)
    audio = [sum(c.n_frames for c in g) * spec.hop_length / spec.sample_rate for g in groups]
    scratch = Path(params["scratch"])
    _ready_and_wait(scratch, "model")
    notes = [[time.monotonic(), cpu_seconds(), 0.0]]
    passes = 0
    while not (scratch / "stop").exists():
        for group, group_s in zip(groups, audio, strict=True):
            scorer.score(group)
            notes.append([time.monotonic(), cpu_seconds(), notes[-1][2] + group_s])
            if (scratch / "stop").exists():
                break
        passes += 1
    return {"notes": notes, "passes": passes, "threads": threads}


def _cost(notes: list[list[float]], start: float, end: float) -> dict[str, float]:
    """CPU seconds per audio second between the first and last note within ``[start, end]``."""
    inside = [n for n in notes if start <= n[0] <= end]
    if len(inside) < 2:
        raise RuntimeError(
            f"co-run: the model side finished {len(inside)} batch(es) while the decode side ran "
            f"({end - start:.1f} s); raise --corun-seconds"
        )
    (t0, cpu0, audio0), (t1, cpu1, audio1) = inside[0], inside[-1]
    return {
        "core_s_per_audio_s": (cpu1 - cpu0) / (audio1 - audio0),
        "audio_s": audio1 - audio0,
        "cpu_s": cpu1 - cpu0,
        "wall_s": t1 - t0,
        "realtime_factor": (audio1 - audio0) / (t1 - t0),
    }


def _ready_and_wait(scratch: Path, side: str) -> None:
    """Say this side is ready, then wait for the go."""
    (scratch / f"ready-{side}").touch()
    while not (scratch / "go").exists():
        time.sleep(_POLL_S)


def _wait_for(path: Path, process: subprocess.Popen[bytes], stderr: Path) -> None:
    """Wait until ``path`` exists; fail with the side's stderr if the side ends first."""
    while not path.exists():
        if process.poll() is not None:
            _failed(process, stderr)
        time.sleep(_POLL_S)


def _finish(process: subprocess.Popen[bytes], stderr: Path) -> None:
    if process.wait() != 0:
        _failed(process, stderr)


def _failed(process: subprocess.Popen[bytes], stderr: Path) -> None:
    tail = stderr.read_text(encoding="utf-8", errors="replace")[-3000:]
    raise RuntimeError(f"co-run side {process.args[3]} failed ({process.returncode}):\n{tail}")


def pairing(params: dict[str, Any]) -> dict[str, Any]:
    """One scorer's embedder calls side by side against one at a time, on the same audio.

    buzzdask's CPU scorer (its defaults: ``batch_frames``, one-thread calls, one per core) scores
    ``seconds`` of the corpus's pre-decoded audio in ``passes`` pairs of passes, one pass with
    its calls side by side and one with one call at a time, the order alternating (A B, B A,
    A B...) so that the machine's drift falls on both. One process and one model for both, so
    that only the calls' company differs.

    Returns
    -------
    dict
        ``parallel_calls`` (calls side by side: the cores), ``one_call`` and ``side_by_side``
        (each pass's CPU-seconds per audio second, every thread of the process), ``ratios``
        (side by side over one call, pair by pair), ``ratio`` (their median; 1.0 where the
        scorer runs one call at a time anyway) and ``max_abs_diff`` (between the two modes'
        activations: the calls' sizes differ, their frames' activations must not).
    """
    model_spec, spec = model_and_frames(params)
    chunks, _ = predecoded(params, spec)
    scorer = make_scorer(params, model_spec, spec)
    side_by_side = scorer.parallel_calls
    groups = groups_of(chunks, params["batch_frames"])
    audio_s = sum(c.n_frames for c in chunks) * spec.hop_length / spec.sample_rate

    def one_pass(calls: int) -> tuple[float, np.ndarray]:
        # The scorer's public count of calls side by side: one makes its calls take turns.
        scorer.parallel_calls = calls
        with measured(audio_s) as record:
            activations = [a for group in groups for a in scorer.score(group)]
        return record["cpu_s"] / audio_s, np.concatenate(activations)

    _, reference = one_pass(side_by_side)  # the warm-up: TensorFlow's first calls allocate
    costs: dict[str, list[float]] = {"one_call": [], "side_by_side": []}
    max_abs_diff = 0.0
    modes = {"one_call": 1, "side_by_side": side_by_side}
    order = list(modes)
    for _ in range(params["passes"] if side_by_side > 1 else 0):
        for mode in order:
            cost, activations = one_pass(modes[mode])
            costs[mode].append(cost)
            max_abs_diff = max(max_abs_diff, float(np.max(np.abs(activations - reference))))
        order.reverse()  # A B, then B A: neither mode always runs first
    ratios = [b / a for a, b in zip(costs["one_call"], costs["side_by_side"], strict=True)]
    return {
        "parallel_calls": side_by_side,
        **costs,
        "ratios": ratios,
        "ratio": float(np.median(ratios)) if ratios else 1.0,
        "audio_s": audio_s,
        "max_abs_diff": max_abs_diff,
    }


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "corun": corun,
    "corun_decode": decode_side,
    "corun_model": model_side,
    "pairing": pairing,
}


if __name__ == "__main__":
    main(sys.argv[1:], STAGES)
