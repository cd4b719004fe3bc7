"""Aligned float32 sample arrays, and decoded chunks' arrays reused once nothing holds them.

A decoded 10-minute chunk is 38 MB of float32, more than glibc's malloc keeps for reuse
(anything over 32 MiB is mapped afresh, whatever its settings: ``mallopt(3)``). Each new array is
then mapped from the operating system and every page of it faulted in and zeroed before a
sample is written; on a virtual machine whose host takes the guest's free memory back (free page
reporting) that first touch costs more. In a worker, where chunks wait to be scored while others
are decoded, ``perf`` put 0.8 CPU-s of an 8-hour WAV run in that zeroing; a plain loop that
decodes and drops one chunk at a time, which gets back the pages it just gave, paid a tenth as
much per audio hour. :class:`ReusedArrays` keeps decoded chunks' arrays and hands each one out
again once nothing refers to it.
"""

from __future__ import annotations

import itertools
import sys
import threading

import numpy as np

__all__ = ["SAMPLE_ALIGNMENT", "ReusedArrays", "aligned_empty"]

#: Bytes on whose boundary decoded samples start (:func:`aligned_empty`): the scorer hands such
#: a buffer to TensorFlow as it is, through DLPack (TensorFlow, built for AVX-512, needs this
#: alignment of it), where ``tf.constant`` would copy it (:class:`buzzdask.score.Scorer`).
SAMPLE_ALIGNMENT = 64
_SPARE = SAMPLE_ALIGNMENT // 4  # float32 samples an owner holds beyond its capacity, to align


def aligned_empty(n_samples: int) -> np.ndarray:
    """An uninitialised float32 array whose data starts on a :data:`SAMPLE_ALIGNMENT` boundary.

    Parameters
    ----------
    n_samples : int >= 0

    Returns
    -------
    np.ndarray [shape=(n_samples,), dtype=float32]
    """
    return _aligned_view(np.empty(n_samples + _SPARE, np.float32), n_samples)


def _aligned_view(owner: np.ndarray, n_samples: int) -> np.ndarray:
    skip = (-owner.ctypes.data % SAMPLE_ALIGNMENT) // 4
    return owner[skip : skip + n_samples]


class ReusedArrays:
    """Aligned float32 arrays (as :func:`aligned_empty`) whose memory is reused when they die.

    The pool keeps each array it hands out, and hands its memory out again once no array,
    view, memoryview or DLPack tensor refers to it (every one of them holds a reference to the
    array that owns the data, which the pool counts: CPython's reference counts). Only arrays of
    ``min_bytes`` to ``max_bytes`` are kept, and at each call unused ones of at most
    ``max_idle_bytes`` in all beyond the one handed out: what the pool holds is what is in use,
    what was let go since its last call, and those.
    An array it makes holds up to a sixteenth of the request's power of two more than asked
    (at most 6.25 %), so that requests a little apart share one.

    Parameters
    ----------
    min_bytes, max_bytes : int > 0 [bytes]
        Sizes of array kept for reuse.
    max_idle_bytes : int >= 0 [bytes]
        Unused arrays kept between calls, in all; others are let go.
    max_slack : float >= 0
        An unused array serves a request of ``n`` samples if it holds at most ``n * (1 +
        max_slack)``: the last, shorter chunk of a file may take a whole chunk's array.
    """

    def __init__(
        self, *, min_bytes: int, max_bytes: int, max_idle_bytes: int, max_slack: float = 0.25
    ) -> None:
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.max_idle_bytes = max_idle_bytes
        self.max_slack = max_slack
        self._owners: list[np.ndarray] = []
        self._lock = threading.Lock()
        # What the count reads for an array only the pool's list holds, measured, not assumed:
        # interpreters differ in the references they take for a call (Python 3.14 takes fewer).
        self._unused_references = _references([np.empty(0, np.float32)], 0)

    def empty(self, n_samples: int) -> np.ndarray:
        """What :func:`aligned_empty` gives, in an unused array's memory where one fits.

        Outside the pool's sizes, :func:`aligned_empty`'s own array, which the pool does not keep.
        """
        if not self.min_bytes <= 4 * n_samples <= self.max_bytes:
            return aligned_empty(n_samples)
        with self._lock:
            idle = [i for i in range(len(self._owners)) if self._unused(i)]
            # An array made for this very request (rounded up) always serves it again.
            most = max(_capacity(n_samples), n_samples * (1 + self.max_slack))
            fitting = [i for i in idle if n_samples <= len(self._owners[i]) - _SPARE <= most]
            chosen = min(fitting, key=lambda i: len(self._owners[i]), default=None)
            if chosen is None:
                self._owners.append(np.empty(_capacity(n_samples) + _SPARE, np.float32))
                chosen = len(self._owners) - 1
            samples = _aligned_view(self._owners[chosen], n_samples)
            others = [i for i in idle if i != chosen]
            held = itertools.accumulate(self._owners[i].nbytes for i in others)
            let_go = [
                i for i, total in zip(others, held, strict=True) if total > self.max_idle_bytes
            ]
            for i in sorted(let_go, reverse=True):
                del self._owners[i]
        return samples

    def __len__(self) -> int:
        """Arrays held, in use or not."""
        return len(self._owners)

    def _unused(self, index: int) -> bool:
        # Every view of the array, however derived, refers to it (numpy's ``base`` is the array
        # that owns the data), and so does every memoryview or DLPack capsule of those.
        return _references(self._owners, index) == self._unused_references


def _capacity(n_samples: int) -> int:
    """``n_samples`` rounded up to a sixteenth of its power of two (at most 6.25 % more).

    A file's first chunk has no margin before it and its others two, so their lengths differ
    by a few thousand samples: one capacity serves both.
    """
    grain = max(1, (1 << max(0, n_samples.bit_length() - 1)) // 16)
    return -(-n_samples // grain) * grain


def _references(owners: list[np.ndarray], index: int) -> int:
    return sys.getrefcount(owners[index])
