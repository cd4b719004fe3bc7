import re

import pytest

from buzzdask import FrameSpec, ParameterError


def spec(hop_s: float = 0.96) -> FrameSpec:
    return FrameSpec.from_seconds(
        sample_rate=16000, frame_length_s=0.96, frame_hop_s=hop_s, context_s=0.015
    )


def test_samples_are_exact() -> None:
    s = spec()
    assert (s.frame_length, s.hop_length, s.context, s.window) == (15360, 15360, 240, 15600)


@pytest.mark.parametrize(
    ("n_samples", "expected"),
    [(0, 0), (15359, 0), (15360, 1), (2 * 15360 - 1, 1), (2 * 15360, 2), (10 * 15360 + 7, 10)],
)
def test_last_partial_frame_is_dropped(n_samples: int, expected: int) -> None:
    assert spec().n_complete_frames(n_samples) == expected


def test_hop_other_than_frame_length() -> None:
    s = spec(0.5)
    assert s.hop_length == 8000
    assert s.n_complete_frames(15360 + 8000) == 2
    assert s.span(3) == 2 * 8000 + 15600


def test_inexact_hop_is_refused_with_its_name() -> None:
    with pytest.raises(ParameterError, match=r"frame_hop_s=0\.12345"):
        spec(0.12345)


@pytest.mark.parametrize("hop_s", [0.0, -0.96, float("nan"), float("inf"), "0.48", True])
def test_a_hop_of_nothing_is_refused_as_options_are(hop_s: float) -> None:
    message = re.escape(f"frame_hop_s={hop_s!r} must be a number > 0 [s]")
    with pytest.raises(ParameterError, match=f"^{message}$"):
        spec(hop_s)


@pytest.mark.parametrize(
    ("seconds", "frames"), [(0.5, 1), (0.96, 1), (10.0, 10), (9.7, 10), (600, 625)]
)
def test_chunks_are_whole_hops(seconds: float, frames: int) -> None:
    assert spec().frames_per_chunk(seconds) == frames


@pytest.mark.parametrize("hop_s", [0.48, 0.096, 0.96])
def test_chunks_of_a_whole_number_of_hops_keep_every_hop(hop_s: float) -> None:
    # --chunk-seconds 32.16 (67 hops of 0.48 s) gave 66: the product in floats is a hair short.
    assert [spec(hop_s).frames_per_chunk(round(k * hop_s, 6)) for k in range(1, 3001)] == list(
        range(1, 3001)
    )


def test_chunk_seconds_must_be_positive() -> None:
    with pytest.raises(ParameterError, match="chunk_seconds"):
        spec().frames_per_chunk(0)


def test_an_embedder_s_inexact_frame_is_refused_naming_its_settings() -> None:
    """A sample-rate of 22050 for YAMNet: 'context_s=0.015 s ...' named no setting."""
    from buzzdask.models import EmbedderSpec

    embedder = EmbedderSpec("yamnet_k2", "/models/yamnet", 22050, 0.96, 0.015)
    with pytest.raises(ParameterError) as refused:
        embedder.frame_spec()
    assert str(refused.value) == (
        "buzzdask.embedders.yamnet_k2.frame-context-seconds=0.015 s is not a whole number of "
        "samples at 22050 Hz (330.75 samples); use a multiple of 1/22050 s, or another "
        "buzzdask.embedders.yamnet_k2.sample-rate"
    )
    assert EmbedderSpec("yamnet_k2", "/m", 16000, 0.96, 0.015).frame_spec().context == 240
