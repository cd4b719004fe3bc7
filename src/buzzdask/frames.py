"""Frame geometry: where each scored frame starts, how long it is, what it reads.

All positions are integers in samples at the embedder's sample rate, so frame starts are exact:
``start[i] = i * hop_length / sample_rate`` seconds.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from buzzdask.errors import ParameterError

__all__ = ["FrameSpec", "seconds_to_samples"]


def seconds_to_samples(seconds: float, sample_rate: int, *, name: str) -> int:
    """Convert a duration to a whole number of samples, refusing inexact values.

    Parameters
    ----------
    seconds : float >= 0 [s]
        The duration.
    sample_rate : int > 0 [Hz]
        Samples per second.
    name : str
        The option's name, for the error message.

    Returns
    -------
    int >= 0 [samples]

    Raises
    ------
    ParameterError
        If ``seconds * sample_rate`` is not (within 1e-6) a whole number.
    """
    exact = seconds * sample_rate
    samples = round(exact)
    if seconds < 0 or abs(exact - samples) > 1e-6:
        raise ParameterError(
            f"{name}={seconds!r} s is not a whole number of samples at {sample_rate} Hz "
            f"({exact:.6g} samples); use a multiple of 1/{sample_rate} s"
        )
    return samples


@dataclass(frozen=True)
class FrameSpec:
    """How audio at the embedder's rate is cut into scored frames.

    Parameters
    ----------
    sample_rate : int > 0 [Hz]
        The embedder's input rate.
    frame_length : int > 0 [samples]
        One scored frame (YAMNet: 0.96 s = 15360 samples).
    hop_length : int > 0 [samples]
        Distance between frame starts.
    context : int >= 0 [samples]
        Audio after a frame's end that the embedder also reads (YAMNet: 15 ms = 240 samples).
    """

    sample_rate: int
    frame_length: int
    hop_length: int
    context: int

    def __post_init__(self) -> None:
        if self.sample_rate <= 0 or self.frame_length <= 0 or self.hop_length <= 0:
            raise ParameterError(f"sample rate, frame length and hop must be positive: {self!r}")
        if self.context < 0:
            raise ParameterError(f"context={self.context} must be >= 0")

    @classmethod
    def from_seconds(
        cls,
        *,
        sample_rate: int,
        frame_length_s: float,
        frame_hop_s: float,
        context_s: float,
    ) -> FrameSpec:
        """Build a spec from durations in seconds (each must be a whole number of samples)."""
        # A user's option: said as the other options are (a string from a notebook too).
        real = isinstance(frame_hop_s, numbers.Real) and not isinstance(frame_hop_s, bool)
        if not real or not 0 < frame_hop_s < math.inf:
            raise ParameterError(f"frame_hop_s={frame_hop_s!r} must be a number > 0 [s]")
        return cls(
            sample_rate=sample_rate,
            frame_length=seconds_to_samples(frame_length_s, sample_rate, name="frame_length_s"),
            hop_length=seconds_to_samples(frame_hop_s, sample_rate, name="frame_hop_s"),
            context=seconds_to_samples(context_s, sample_rate, name="context_s"),
        )

    @property
    def frame_length_s(self) -> float:
        """One frame's duration [s]."""
        return self.frame_length / self.sample_rate

    @property
    def hop_s(self) -> float:
        """Distance between frame starts [s]: ``start[i] = i * hop_s``."""
        return self.hop_length / self.sample_rate

    @property
    def window(self) -> int:
        """Samples one frame reads: ``frame_length + context``."""
        return self.frame_length + self.context

    def n_complete_frames(self, n_samples: int) -> int:
        """Frames that fit whole in ``n_samples`` of audio.

        The last frame that would overrun the end is dropped, never padded:
        ``n = 0 if n_samples < frame_length else 1 + (n_samples - frame_length) // hop_length``.
        """
        if n_samples < self.frame_length:
            return 0
        return 1 + (n_samples - self.frame_length) // self.hop_length

    def span(self, n_frames: int) -> int:
        """Samples needed to score ``n_frames`` consecutive frames, context included."""
        return 0 if n_frames <= 0 else (n_frames - 1) * self.hop_length + self.window

    def frames_per_chunk(self, chunk_seconds: float) -> int:
        """Whole hops in ``chunk_seconds`` (at least one), so chunks start on frame starts."""
        if chunk_seconds <= 0:
            raise ParameterError(f"chunk_seconds={chunk_seconds!r} must be > 0")
        # Rounded, not cut: 32.16 s (67 hops of 0.48 s) is 514559.99... samples in floats.
        return max(1, round(chunk_seconds * self.sample_rate) // self.hop_length)
