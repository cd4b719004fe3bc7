"""The scorer's speed settings (batch size, TensorFlow thread pools) leave its results alone.

The benchmarks (``python -m benchmarks``) sweep these settings on the real YAMNet; here the tiny
fixtures check that each tuned scorer gives the activations of the default one to 1e-4.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from buzzdask.decode import DecodedChunk
from buzzdask.frames import FrameSpec
from tests.conftest import CLASSES, field_like

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


def _score(embedder: str, head: str, **options: Any) -> list[np.ndarray]:
    """Score the test chunks with a scorer built with ``options`` (module level: picklable)."""
    from buzzdask.score import Scorer

    scorer = Scorer(
        head_path=head,
        embedder_handle=embedder,
        spec=SPEC,
        n_classes=len(CLASSES),
        **{"batch_frames": DEFAULT_BATCH_FRAMES, **options},
    )
    return scorer.score(_chunks())


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
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert pools == (share, share)
    assert warned
    _assert_equal(activations, default_activations)
