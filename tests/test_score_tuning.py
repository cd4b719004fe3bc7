"""The scorer's speed settings (batch size, TensorFlow thread pools) leave its results alone.

The benchmarks (``python -m benchmarks``) sweep these settings on the real YAMNet; here the tiny
fixtures check that each tuned scorer gives the activations of the default one to 1e-4.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest

from buzzdask.buffers import aligned_empty
from buzzdask.decode import DecodedChunk
from buzzdask.frames import FrameSpec
from buzzdask.score import MIN_CALL_PATCHES
from tests.conftest import (
    CLASSES,
    assert_same_frames,
    field_like,
    requires_ffmpeg,
    wait_until,
)

SPEC = FrameSpec.from_seconds(
    sample_rate=16000, frame_length_s=0.96, frame_hop_s=0.96, context_s=0.015
)
DEFAULT_BATCH_FRAMES = 512  # buzzdask.yaml's batch-frames
TOLERANCE = 1e-4


def _chunks() -> list[DecodedChunk]:
    """Three chunks as the decoder hands them over: 20 and 20 frames, then 7 at the file's end."""
    samples = field_like(SPEC.span(47) + 1000, SPEC.sample_rate, seed=3)[:, 0].astype(np.float32)
    chunks = []
    for first, n_frames in ((0, 20), (20, 20), (40, 7)):
        start = first * SPEC.hop_length
        piece = samples[start : start + SPEC.span(n_frames)]
        chunks.append(DecodedChunk(samples=piece, first_frame=first, n_frames=n_frames))
    return chunks


def _scorer_options(embedder: str, head: str, **options: Any) -> dict[str, Any]:
    """Scorer keywords for the test's frames: ``options``, default batch otherwise."""
    return {
        "head_path": head,
        "embedder_handle": embedder,
        "spec": SPEC,
        "n_classes": len(CLASSES),
        "batch_frames": DEFAULT_BATCH_FRAMES,
        **options,
    }


def _scorer(embedder: str, head: str, **options: Any) -> Any:
    """A scorer of the test's frames built with ``options`` (default batch otherwise)."""
    from buzzdask.score import Scorer

    return Scorer(**_scorer_options(embedder, head, **options))


def _score(embedder: str, head: str, **options: Any) -> list[np.ndarray]:
    """Score the test chunks with a scorer built with ``options`` (module level: picklable)."""
    return _scorer(embedder, head, **options).score(_chunks())


def _score_with_threads(
    embedder: str, head: str, *, intra: int, inter: int, share_cores: int = 1
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Score with TensorFlow thread pools set; also return the pools TensorFlow reports."""
    import tensorflow as tf

    activations = _score(
        embedder,
        head,
        batch_frames=1024,
        intra_op_threads=intra or None,
        inter_op_threads=inter or None,
        share_cores=share_cores,
    )
    threading = tf.config.threading
    pools = (
        threading.get_intra_op_parallelism_threads(),
        threading.get_inter_op_parallelism_threads(),
    )
    return activations, pools


def _assert_equal(tuned: list[np.ndarray], default: list[np.ndarray]) -> None:
    assert [a.shape for a in tuned] == [a.shape for a in default]
    for tuned_chunk, default_chunk in zip(tuned, default, strict=True):
        np.testing.assert_allclose(tuned_chunk, default_chunk, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def default_activations(tiny_embedder: Path, tiny_model: Path) -> list[np.ndarray]:
    return _score(str(tiny_embedder), str(tiny_model))


@pytest.mark.parametrize("batch_frames", [1, 8, 256, 4096])
def test_batch_size_leaves_activations_unchanged(
    tiny_embedder: Path,
    tiny_model: Path,
    default_activations: list[np.ndarray],
    batch_frames: int,
) -> None:
    tuned = _score(str(tiny_embedder), str(tiny_model), batch_frames=batch_frames)
    _assert_equal(tuned, default_activations)


@pytest.mark.parametrize(("intra", "inter"), [(1, 1), (2, 1)])
def test_thread_pools_leave_activations_unchanged(
    tiny_embedder: Path,
    tiny_model: Path,
    default_activations: list[np.ndarray],
    intra: int,
    inter: int,
) -> None:
    # TensorFlow fixes its thread pools when it starts: the tuned scorer needs a fresh process.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        tuned, pools = pool.submit(
            _score_with_threads, str(tiny_embedder), str(tiny_model), intra=intra, inter=inter
        ).result()
    assert pools == (intra, inter)
    _assert_equal(tuned, default_activations)


def _imports_tensorflow_hub(embedder: str, head: str) -> bool:
    """Whether starting a scorer imported ``tensorflow_hub`` (module level: picklable)."""
    import sys

    _scorer(embedder, head)
    return "tensorflow_hub" in sys.modules


def test_a_scorer_starts_without_tensorflow_hub(tiny_embedder: Path, tiny_model: Path) -> None:
    # Workers get the embedder as a local directory; the hub's import (0.2-0.5 s) would delay
    # every run's first results. A fresh process: this one may have imported it already.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        assert not pool.submit(
            _imports_tensorflow_hub, str(tiny_embedder), str(tiny_model)
        ).result()


def _score_sharing_cores(
    embedder: str, head: str
) -> tuple[list[np.ndarray], tuple[int, int], bool]:
    """Score with ``share_cores=2``, then start a scorer asking for other pools in the same
    process (TensorFlow has fixed them): its activations, the pools, and whether it warned."""
    import warnings

    from buzzdask import BuzzdaskWarning

    _, pools = _score_with_threads(embedder, head, intra=0, inter=0, share_cores=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _score(embedder, head, intra_op_threads=pools[0] + 1)
    return again, pools, any(issubclass(w.category, BuzzdaskWarning) for w in caught)


def test_scorers_sharing_a_host_split_its_cores(
    tiny_embedder: Path, tiny_model: Path, default_activations: list[np.ndarray]
) -> None:
    """Two scorers on one host: each sizes TensorFlow's pools to half this process's cores.
    A later scorer in the same worker keeps the pools TensorFlow fixed, with a warning."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        activations, pools, warned = pool.submit(
            _score_sharing_cores, str(tiny_embedder), str(tiny_model)
        ).result()
    # Each its share of the cores, as one-thread embedder calls side by side (batch 1024).
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert pools == (1, share)
    assert warned
    _assert_equal(activations, default_activations)


@pytest.mark.parametrize(
    ("cores", "batch_frames", "configured", "shared", "on_gpu", "expected"),
    [
        (2, 512, (None, None), False, False, (2, 1, 2)),  # a call per core, one thread each
        (1, 512, (None, None), False, False, (1, 1, 1)),
        (48, 512, (None, None), False, False, (16, 48, 16)),  # calls of 32 patches, all cores
        (8, 64, (None, 3), False, False, (2, 8, 3)),
        (8, 512, (2, None), False, False, (1, 2, None)),  # configured pools: one call at a time
        (8, 512, (None, None), False, True, (1, None, None)),  # a GPU: TensorFlow's own
        (4, 512, (None, None), True, True, (1, 4, 4)),  # GPU scorers sharing the host's cores
    ],
)
def test_embedder_threads(cores, batch_frames, configured, shared, on_gpu, expected) -> None:
    from buzzdask.score import embedder_threads

    threads = embedder_threads(
        cores=cores,
        batch_frames=batch_frames,
        intra_op_threads=configured[0],
        inter_op_threads=configured[1],
        shared=shared,
        on_gpu=on_gpu,
    )
    assert threads == expected


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_embedder_calls_run_side_by_side_on_a_cpu(
    tiny_embedder: Path, tiny_model: Path, default_activations: list[np.ndarray]
) -> None:
    """By default a CPU scorer splits a task's frames into one-thread embedder calls on all its
    cores at once, and the activations stay those of one call at a time."""
    scorer = _scorer(str(tiny_embedder), str(tiny_model))
    assert scorer.parallel_calls == min(len(os.sched_getaffinity(0)), 16)
    embed = scorer._embed
    lock, second_in = threading.Lock(), threading.Event()
    running, most_running, threads = [0], [0], set()

    def embed_waiting_for_another(waveform: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            most_running[0] = max(most_running[0], running[0])
            threads.add(threading.current_thread().name)
            alone = running[0] == 1
        if alone:
            second_in.wait(timeout=10)  # one call at a time would wait here in vain
        else:
            second_in.set()
        try:
            return embed(waveform)
        finally:
            with lock:
                running[0] -= 1

    scorer._embed = embed_waiting_for_another  # type: ignore[method-assign]
    activations = scorer.score(_chunks())  # 20, 20 and 7 frames: batches of 21 and 29 patches
    assert most_running[0] == 2
    assert len(threads) == 2 and all(name.startswith("buzzdask-embed") for name in threads)
    assert scorer.stats()["embedder_calls"] == 2
    _assert_equal(activations, default_activations)


class _FirstCallWaitsForASecond:
    """``scorer``'s embedder, its first call held until a second call starts beside it.

    ``first_saw_second`` gets ``True`` if one did within 30 s: calls one at a time would
    leave the first waiting in vain.
    """

    def __init__(self, scorer: Any) -> None:
        self._embed = scorer._embed
        self._lock = threading.Lock()
        self.first_in, self.second_in = threading.Event(), threading.Event()
        self.first_saw_second: list[bool] = []
        scorer._embed = self

    def __call__(self, waveform: np.ndarray) -> np.ndarray:
        with self._lock:
            first = not self.first_in.is_set()
            self.first_in.set()
        if first:
            self.first_saw_second.append(self.second_in.wait(timeout=30))
        else:
            self.second_in.set()
        return self._embed(waveform)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_task_s_calls_start_beside_the_last_call_of_the_task_before(
    tiny_embedder: Path, tiny_model: Path, default_activations: list[np.ndarray]
) -> None:
    """Two score tasks at once (as the worker runs them): the second's calls queue behind the
    first's, not behind its end, so a core left free by the first's last call takes the next
    task's first. Each task gets its own activations; the counters add up, and the seconds
    scoring count the time with a task in it, not each task's."""
    scorer = _scorer(str(tiny_embedder), str(tiny_model))
    # The first task's only call: the next task's would wait for it in vain.
    calls = _FirstCallWaitsForASecond(scorer)
    chunks = _chunks()
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as tasks:
        first_task = tasks.submit(scorer.score, chunks[2:])  # 7 frames: one call
        assert calls.first_in.wait(timeout=10)
        second_task = tasks.submit(scorer.score, chunks[:2])
        activations = first_task.result() + second_task.result()
    elapsed = time.perf_counter() - started
    assert calls.first_saw_second == [True]
    _assert_equal(activations, [default_activations[i] for i in (2, 0, 1)])
    stats = scorer.stats()
    assert stats["frames_scored"] == stats["frames_embedded"] == 47
    assert stats["embedder_calls"] == 3
    assert 0 < stats["seconds_scoring"] <= elapsed


@pytest.fixture
def worker_in_process() -> Iterator[tuple[Any, Any]]:
    """A client and its one worker of two threads, in this process: a test reaches the actor."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        (worker,) = cluster.workers.values()
        yield client, worker


def _scorer_actor(client: Any, embedder: Path, head: Path) -> Any:
    """A scorer actor (default options) started on the client's worker; its future."""
    from buzzdask.score import Scorer

    future = client.submit(Scorer, **_scorer_options(str(embedder), str(head)), actor=True)
    future.result()
    return future


#: Set by and for :func:`_hold_a_core`, a task of an in-process worker (tasks are pickled).
_CORE_HELD, _CORE_RELEASED = threading.Event(), threading.Event()


def _hold_a_core() -> None:
    """A task standing in for a decode: it runs until the test lets it end."""
    _CORE_HELD.set()
    _CORE_RELEASED.wait(timeout=30)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_task_running_on_the_worker_keeps_its_core_from_the_embedder(
    tiny_embedder: Path,
    tiny_model: Path,
    default_activations: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    worker_in_process: tuple[Any, Any],
) -> None:
    """While another task (a decode) runs on the scorer's worker, a task's embedder calls run
    one at a time, and the stats count the one run alone; as that task ends, the worker wakes
    the call waiting for its core (not the safety net's poll, here a minute) and the two run
    side by side. The activations stay those of one call at a time. (A worker in this
    process: the test reaches the actor.)"""
    import buzzdask.score

    monkeypatch.setattr(buzzdask.score, "LANE_POLL_S", 60.0)
    _CORE_HELD.clear()
    _CORE_RELEASED.clear()
    client, worker = worker_in_process
    # Held to the end: a released actor future has its worker forget the actor (a race that
    # once lost the lookup below).
    actor = _scorer_actor(client, tiny_embedder, tiny_model)
    scorer = worker.state.actors[actor.key]
    assert scorer.parallel_calls == 2 == scorer._lanes()
    calls = _FirstCallWaitsForASecond(scorer)
    task = client.submit(_hold_a_core, pure=False)
    assert _CORE_HELD.wait(timeout=30)
    assert scorer._lanes() == 1
    with ThreadPoolExecutor(1) as caller:
        scoring = caller.submit(scorer.score, _chunks())  # 20, 20 and 7 frames: two calls
        assert calls.first_in.wait(timeout=30)
        assert not calls.second_in.wait(timeout=0.5)  # the second call waits for a core
        _CORE_RELEASED.set()
        activations = scoring.result(timeout=60)
    task.result()
    assert calls.first_saw_second == [True]
    assert scorer.stats()["calls_beside_tasks"] == 1
    assert scorer.stats()["embedder_calls"] == 2
    assert scorer._lanes() == 2
    _assert_equal(activations, default_activations)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_released_scorer_leaves_no_plugin_behind(
    tiny_embedder: Path, tiny_model: Path, worker_in_process: tuple[Any, Any]
) -> None:
    """Each CPU scorer watches its worker's tasks through a plugin; the next scorer on the
    worker removes the plugin of one its run released (another analysis on the cluster)."""
    import gc

    from buzzdask.score import _TaskEnds

    client, worker = worker_in_process

    def watching() -> list[Any]:
        return [p.scorer() for p in worker.plugins.values() if isinstance(p, _TaskEnds)]

    first = _scorer_actor(client, tiny_embedder, tiny_model)
    assert watching() == [worker.state.actors[first.key]]
    first.release()
    del first
    wait_until(
        lambda: not worker.state.actors,
        timeout_s=10,
        failure="the released actor stayed on its worker",
        interval_s=0.01,
    )
    gc.collect()
    assert watching() == [None]
    second = _scorer_actor(client, tiny_embedder, tiny_model)
    assert watching() == [worker.state.actors[second.key]]


def test_aligned_runs_are_embedded_in_place(tiny_embedder: Path, tiny_model: Path) -> None:
    """An aligned chunk's runs reach TensorFlow without a copy and score the bits a copy
    scores; the chunk's samples stay as they were. What follows a run's last window (the
    chunk's next samples in place) changes no activation: each frame alone, zeros after it,
    scores the same."""
    scorer = _scorer(str(tiny_embedder), str(tiny_model), cpu_call_frames=8)
    source = field_like(SPEC.span(40), SPEC.sample_rate, seed=7)[:, 0].astype(np.float32)
    aligned = aligned_empty(len(source))
    aligned[:] = source
    shifted = np.empty(len(source) + 1, np.float32)[1:]  # 4 bytes past malloc's alignment
    shifted[:] = source
    in_place_tensor, copied_tensor = scorer._tensor(aligned), scorer._tensor(shifted)
    aligned[0] = shifted[0] = 5.0  # seen only through a tensor that holds the array itself
    held = 5.0 if scorer.device == "CPU" else source[0]  # a GPU's input is copied there anyway
    assert (float(in_place_tensor[0]), float(copied_tensor[0])) == (held, source[0])
    aligned[0] = shifted[0] = source[0]

    (in_place,) = scorer.score([DecodedChunk(samples=aligned, first_frame=0, n_frames=40)])
    (copied,) = scorer.score([DecodedChunk(samples=shifted, first_frame=0, n_frames=40)])
    np.testing.assert_array_equal(in_place, copied)
    np.testing.assert_array_equal(aligned, source)
    alone = scorer.score(
        [
            DecodedChunk(samples=source[start : start + SPEC.span(1)], first_frame=i, n_frames=1)
            for i, start in enumerate(range(0, 40 * SPEC.hop_length, SPEC.hop_length))
        ]
    )
    _assert_equal([in_place], [np.concatenate(alone)])


@pytest.mark.parametrize("n_frames", [31, 626])
def test_a_chunk_takes_one_embedder_call_per_core_at_most(
    tiny_embedder: Path, tiny_model: Path, n_frames: int
) -> None:
    """A 10-minute chunk (626 frames) is split evenly between the parallel calls, nothing left
    over for a call of its own; a 30-second file (31 frames) goes in one call."""
    scorer = _scorer(str(tiny_embedder), str(tiny_model))
    samples = field_like(SPEC.span(n_frames), SPEC.sample_rate, seed=5)[:, 0].astype(np.float32)
    scorer.score([DecodedChunk(samples=samples, first_frame=0, n_frames=n_frames)])
    expected = 1 if n_frames < 2 * MIN_CALL_PATCHES else scorer.parallel_calls
    assert scorer.stats()["embedder_calls"] == expected


def test_a_chunk_shorter_than_one_frame_makes_no_embedder_call(
    tiny_embedder: Path, tiny_model: Path
) -> None:
    """Half a frame of audio (a file too short) scores to no frames, with no embedder call,
    also where calls run side by side (it divided by zero there)."""
    scorer = _scorer(str(tiny_embedder), str(tiny_model))
    samples = field_like(SPEC.span(1) // 2, SPEC.sample_rate, seed=6)[:, 0].astype(np.float32)
    (activations,) = scorer.score([DecodedChunk(samples=samples, first_frame=0, n_frames=0)])
    assert activations.shape == (0, len(CLASSES))
    assert scorer.stats()["embedder_calls"] == 0


@pytest.mark.parametrize(
    ("batch_frames", "cpu_call_frames", "call_frames"), [(512, 8, 8), (512, 29, 29), (16, 96, 16)]
)
def test_cpu_calls_hold_at_most_cpu_call_frames(
    tiny_embedder: Path,
    tiny_model: Path,
    default_activations: list[np.ndarray],
    batch_frames: int,
    cpu_call_frames: int,
    call_frames: int,
) -> None:
    """On a CPU a task's frames go to the embedder in calls of at most ``cpu-call-frames``
    patches (never more than ``batch-frames``); the activations stay those of whole calls."""
    scorer = _scorer(
        str(tiny_embedder),
        str(tiny_model),
        batch_frames=batch_frames,
        cpu_call_frames=cpu_call_frames,
    )
    assert scorer.call_frames == scorer.stats()["call_frames"] == call_frames
    calls = scorer._call_batches(_chunks())
    patches = [
        sum(scorer._padded_length(run.n_frames) // scorer.native_hop for run in call)
        for call in calls
    ]
    assert max(patches) <= call_frames < sum(patches)  # the 50 patches in several calls
    _assert_equal(scorer.score(_chunks()), default_activations)
    assert scorer.stats()["embedder_calls"] == len(calls)


@requires_ffmpeg
def test_a_run_s_scorers_take_cpu_call_frames(run, make_audio, tmp_path: Path) -> None:
    """``buzzdask.cpu-call-frames`` reaches the run's scorers and changes no activation."""
    make_audio("audio/a.wav", n_samples=SPEC.span(40))
    frames = {}
    for cpu_call_frames in (4, None):
        with dask.config.set({"buzzdask.cpu-call-frames": cpu_call_frames}):
            result = run(tmp_path / "audio", output=tmp_path / f"calls-{cpu_call_frames}")
        (scorer,) = result.summary["scorers"]
        assert scorer["call_frames"] == (cpu_call_frames or DEFAULT_BATCH_FRAMES)
        frames[cpu_call_frames] = pd.read_parquet(result.dataset)
    assert len(frames[4]) == 40
    assert_same_frames(frames[4], frames[None])


@pytest.mark.filterwarnings("ignore:TensorFlow's threads are already fixed")  # this process's
def test_configured_threads_keep_one_embedder_call_at_a_time(
    tiny_embedder: Path, tiny_model: Path
) -> None:
    scorer = _scorer(str(tiny_embedder), str(tiny_model), intra_op_threads=1)
    scorer.score(_chunks())
    assert scorer.parallel_calls == 1
    assert scorer.stats()["embedder_calls"] == 1  # the 50 patches in one batch


@pytest.mark.parametrize(
    ("frame_length", "context"),
    [(8000, 240), (SPEC.frame_length, 0)],
    ids=["frames-of-0.5-s", "no-context"],
)
@pytest.mark.parametrize("patch_hop", ["whole-hop", "half-hop"])
def test_a_window_shorter_than_the_embedder_s_is_refused(
    tiny_embedder: Path,
    tiny_embedder_halfhop: Path,
    tiny_model: Path,
    frame_length: int,
    context: int,
    patch_hop: str,
) -> None:
    """The embedder pads it to its own and gives one frame all the same: every frame was then
    scored on other audio than its own, in a run that looked complete."""
    from buzzdask.errors import ModelError

    embedder = tiny_embedder if patch_hop == "whole-hop" else tiny_embedder_halfhop
    spec = FrameSpec(SPEC.sample_rate, frame_length, frame_length, context)
    with pytest.raises(ModelError, match=rf"reads more than {frame_length + context} samples \("):
        _scorer(str(embedder), str(tiny_model), spec=spec)
    # As configured by default, both are taken.
    for embedder in (tiny_embedder, tiny_embedder_halfhop):
        assert _scorer(str(embedder), str(tiny_model)).native_hop in (7680, 15360)
