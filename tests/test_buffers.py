"""Aligned sample arrays, and decoded chunks' arrays reused only once nothing holds them."""

import gc
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from buzzdask import decode_file, probe_audio
from buzzdask.buffers import SAMPLE_ALIGNMENT, ReusedArrays, aligned_empty
from buzzdask.decode import _DECODED, decode_chunk, plan_chunks
from tests.conftest import requires_ffmpeg
from tests.test_frames import spec

N_SAMPLES = 100_000  # 400 kB: inside the pools below


def pool(*, max_idle_bytes: int = 1 << 24, max_slack: float = 0.25) -> ReusedArrays:
    return ReusedArrays(
        min_bytes=1 << 16, max_bytes=1 << 24, max_idle_bytes=max_idle_bytes, max_slack=max_slack
    )


@pytest.mark.parametrize("n_samples", [1, 15, 16, 1001])
def test_aligned_empty(n_samples: int) -> None:
    samples = aligned_empty(n_samples)
    assert (samples.shape, samples.dtype) == ((n_samples,), np.float32)
    assert samples.ctypes.data % SAMPLE_ALIGNMENT == 0


@pytest.mark.parametrize("n_samples", [N_SAMPLES, N_SAMPLES + 1, N_SAMPLES + 15])
def test_an_array_nothing_holds_is_handed_out_again_aligned(n_samples: int) -> None:
    arrays = pool()
    first = arrays.empty(n_samples)
    address = first.ctypes.data
    del first
    again = arrays.empty(n_samples)
    assert again.ctypes.data == address
    assert (again.shape, again.dtype) == ((n_samples,), np.float32)
    assert again.ctypes.data % SAMPLE_ALIGNMENT == 0
    assert len(arrays) == 1


@pytest.mark.parametrize(
    "holder",
    [
        pytest.param(lambda a: a[10:][5:], id="a view of a view"),
        pytest.param(lambda a: a.reshape(2, -1)[1], id="a reshaped row"),
        pytest.param(memoryview, id="a memoryview"),
        pytest.param(lambda a: np.frombuffer(memoryview(a), np.float32), id="frombuffer"),
        pytest.param(lambda a: a.__dlpack__(), id="a DLPack capsule"),
    ],
)
def test_an_array_is_not_handed_out_while_anything_holds_it(holder: Callable[..., object]) -> None:
    arrays = pool()
    first = arrays.empty(N_SAMPLES)
    first[:] = 7.0
    held = holder(first)
    address = first.ctypes.data
    del first
    second = arrays.empty(N_SAMPLES)
    assert second.ctypes.data != address
    second[:] = 0.0
    del held
    gc.collect()
    assert arrays.empty(N_SAMPLES).ctypes.data == address  # free once the holder is gone


def test_an_array_tensorflow_holds_is_not_handed_out() -> None:
    # The scorer hands chunks to TensorFlow through DLPack, without a copy.
    tf = pytest.importorskip("tensorflow")
    arrays = pool()
    first = arrays.empty(N_SAMPLES)
    first[:] = np.arange(N_SAMPLES, dtype=np.float32)
    address = first.ctypes.data
    tensor = tf.experimental.dlpack.from_dlpack(first.__dlpack__())
    del first
    other = arrays.empty(N_SAMPLES)
    other[:] = -1.0
    np.testing.assert_array_equal(tensor.numpy(), np.arange(N_SAMPLES, dtype=np.float32))
    del tensor
    gc.collect()
    assert arrays.empty(N_SAMPLES).ctypes.data == address  # TensorFlow let it go


def test_small_and_huge_arrays_are_not_kept() -> None:
    arrays = ReusedArrays(min_bytes=1 << 16, max_bytes=1 << 20, max_idle_bytes=1 << 24)
    for n_samples in (10, (1 << 16) // 4 - 1, (1 << 20) // 4 + 1):
        samples = arrays.empty(n_samples)
        assert len(samples) == n_samples and samples.ctypes.data % SAMPLE_ALIGNMENT == 0
    assert len(arrays) == 0


def test_a_shorter_request_takes_a_free_array_within_the_slack() -> None:
    arrays = pool(max_slack=0.25)
    full = arrays.empty(N_SAMPLES)
    address = full.ctypes.data
    del full
    assert arrays.empty(N_SAMPLES // 2).ctypes.data != address  # too short: a new array
    last_chunk = arrays.empty(int(N_SAMPLES * 0.9))
    assert last_chunk.ctypes.data == address
    assert len(arrays) == 2


def test_a_longer_request_within_the_rounding_takes_the_same_array() -> None:
    # A file's first chunk lacks the margin before it: the next chunk, a little longer, takes
    # the first one's array rather than one of its own.
    arrays = pool()
    first_chunk = arrays.empty(N_SAMPLES)
    address = first_chunk.ctypes.data
    del first_chunk
    next_chunk = arrays.empty(N_SAMPLES + 1000)
    assert next_chunk.ctypes.data == address
    assert len(arrays) == 1


def test_an_array_serves_its_own_request_again_whatever_the_slack() -> None:
    arrays = pool(max_slack=0.0)  # rounded up, the array holds more than n * (1 + 0)
    first = arrays.empty(N_SAMPLES + 1)
    address = first.ctypes.data
    del first
    assert arrays.empty(N_SAMPLES + 1).ctypes.data == address
    assert len(arrays) == 1


def test_unused_arrays_are_kept_up_to_max_idle_bytes() -> None:
    one_array = pool().empty(N_SAMPLES).base.nbytes
    arrays = pool(max_idle_bytes=2 * one_array + 1000)  # two arrays' worth, not three
    in_flight = [arrays.empty(N_SAMPLES) for _ in range(6)]
    assert len(arrays) == 6
    del in_flight
    kept = arrays.empty(N_SAMPLES)
    assert len(arrays) == 3  # the one handed out and two unused
    del kept


def test_threads_never_share_an_array() -> None:
    arrays = pool()
    failures: list[str] = []
    start = threading.Barrier(4)

    def work(value: float) -> None:
        start.wait()
        for _ in range(200):
            samples = arrays.empty(N_SAMPLES)
            samples[:] = value
            time.sleep(0.001)  # the others' turn to take an array
            if not (samples == value).all():
                failures.append(f"thread {value}: another thread wrote into its array")

    threads = [threading.Thread(target=work, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(arrays) <= 4 + (1 << 24) // (4 * N_SAMPLES)


@requires_ffmpeg
@pytest.mark.parametrize("suffix", [".wav", ".mp3"])
def test_a_decoded_chunk_held_is_never_overwritten_by_the_next(
    make_audio: Callable[..., Path], suffix: str
) -> None:
    # Chunks of 96 s (6 MB at 16 kHz): inside the decoder's pool, as 10-minute chunks are.
    path = make_audio(f"long{suffix}", n_samples=48000 * 320, rate=48000, channels=1)
    info = probe_audio(path)
    plans = plan_chunks(info, spec(), frames_per_chunk=100)[1:3]  # decoded with both margins
    assert [plan.n_frames for plan in plans] == [100, 100]
    held = decode_chunk(info, plans[0], spec=spec())
    kept = held.samples.copy()
    for _ in range(3):
        decode_chunk(info, plans[1], spec=spec())
    np.testing.assert_array_equal(held.samples, kept)
    del held
    again = decode_chunk(info, plans[0], spec=spec())
    np.testing.assert_array_equal(again.samples, kept)


@requires_ffmpeg
def test_a_whole_file_decode_is_not_held(make_audio: Callable[..., Path]) -> None:
    # A notebook's decode_file of a long recording must not keep its array alive afterwards.
    path = make_audio("whole.wav", n_samples=48000 * 120, rate=48000, channels=1)
    held_before = len(_DECODED)
    samples = decode_file(path, sample_rate=16000)
    assert len(samples) == 16000 * 120
    assert len(_DECODED) == held_before
