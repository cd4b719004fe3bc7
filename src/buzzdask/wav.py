"""Plain WAV files read in process: the header instead of ffprobe, the samples instead of ffmpeg.

Field recorders (AudioMoth and most others) write PCM WAV. Its header says everything probing
needs: codec, rate, channels and exactly how many samples there are. Reading it in process costs
microseconds where an ffprobe process costs about 0.05 CPU-seconds, which for a folder of
30-second recordings is a fifth of the whole per-file cost. Its samples are read the same way
(:func:`iter_wav_samples`), converted to float exactly as ffmpeg converts them, so a 30-second
file costs no ffmpeg process either. RF64 and BW64 (past 4 GiB) are read as RIFF is. Anything
this module does not recognise (compressed WAV, a damaged header) gives ``None``: the caller
asks ffprobe and ffmpeg.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "BLOCK_SAMPLES",
    "MOST_CHUNKS",
    "RIFF_FORMS",
    "WavHeader",
    "iter_wav_samples",
    "read_wav_header",
]

_PCM, _FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
#: ffmpeg's codec names, by (format, bits per sample).
_CODECS = {
    (_PCM, 8): "pcm_u8",
    (_PCM, 16): "pcm_s16le",
    (_PCM, 24): "pcm_s24le",
    (_PCM, 32): "pcm_s32le",
    (_FLOAT, 32): "pcm_f32le",
    (_FLOAT, 64): "pcm_f64le",
}
_HEADER_BYTES = 1 << 16  # the chunks before "data" (fmt, LIST/INFO, bext, guan) most often fit
#: The RIFF forms of WAV files: plain, and those past 4 GiB (their sizes in a ds64 chunk).
RIFF_FORMS = (b"RIFF", b"RF64", b"BW64")
#: Chunks looked at before "data": a handful in a recorder's file. A chain misaligned by a
#: writer's missing pad byte would otherwise step 8 bytes at a time through the whole file.
MOST_CHUNKS = 10_000
_FMT = struct.Struct("<HHIIHH")  # format, channels, rate, byte rate, block align, bits
#: Samples per channel in a block of :func:`iter_wav_samples`: 128 KiB of 16-bit mono. Blocks
#: of 16 Ki samples cost more CPU per chunk (Python's per-block work); 64 Ki to 256 Ki the same.
BLOCK_SAMPLES = 1 << 16


@dataclass(frozen=True)
class WavHeader:
    """What a WAV header says of its audio.

    Attributes
    ----------
    codec : str
        ffmpeg's name for the sample format (``"pcm_s16le"``...).
    sample_rate : int > 0 [Hz]
    channels : int > 0
    n_samples : int >= 0
        Samples per channel in the file: the data chunk's, or fewer when the file was cut short.
    data_offset : int >= 0 [bytes]
        Where the first sample lies in the file.
    declared_samples : int or None
        Samples per channel the data chunk declares, where the file holds fewer (a copy or a
        recording cut short); ``None`` when it holds them all.
    valid_bits : int or None
        Bits of each sample that hold audio, where a WAVE_FORMAT_EXTENSIBLE header says fewer
        than are stored (24 in 32, 20 in 24); ``None`` otherwise. ffmpeg reads 24 in 32 as
        24-bit float (``pcm_f24le``) and 16 in 32 as twice as many 16-bit samples: only this
        module reads those right (:attr:`ffmpeg_misreads`).
    wrapped : bool
        The data chunk's 32-bit size wrapped past 4 GiB (its writer kept only the low bits):
        ``n_samples`` counts what the file holds, which ffmpeg would cut at the size written.
    rf64 : bool
        An RF64 or BW64 file. ffmpeg takes the sizes of its ``ds64`` chunk only where that is
        the first chunk, even over a data chunk's own 32-bit size, and decodes nothing where a
        writer left them 0 (ffmpeg's own RF64 to a pipe): ``n_samples`` is then what the file
        holds.
    """

    codec: str
    sample_rate: int
    channels: int
    n_samples: int
    data_offset: int = 0
    declared_samples: int | None = None
    valid_bits: int | None = None
    wrapped: bool = False
    rf64: bool = False

    @property
    def duration_s(self) -> float:
        """``n_samples / sample_rate`` [s]."""
        return self.n_samples / self.sample_rate

    @property
    def ffmpeg_misreads(self) -> bool:
        """Whether ffmpeg would decode other samples than these.

        Valid bits (:attr:`valid_bits`) in fewer bytes than each sample is stored in (24 or 16
        in 32), a size that :attr:`wrapped`, or :attr:`rf64`: the file is then read in process,
        whatever its channel count.
        """
        if self.wrapped or self.rf64:
            return True
        if self.valid_bits is None:
            return False
        stored, count = _STORED[self.codec]
        # ffmpeg takes its codec from the valid bits: 24 in 32 as 24-bit float, 16 in 32 as
        # 16-bit samples, twice as many. Where they fill the bytes stored (20 in 24), it is right.
        return -(-self.valid_bits // 8) < stored.itemsize * count

    @property
    def declared_duration_s(self) -> float | None:
        """``declared_samples / sample_rate`` [s], where the file holds fewer."""
        return None if self.declared_samples is None else self.declared_samples / self.sample_rate


def read_wav_header(path: str | os.PathLike[str]) -> WavHeader | None:
    """The header of a RIFF/WAVE file of PCM or float samples; ``None`` for anything else.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    WavHeader or None
        ``None`` when the file is not such a WAV or its header is damaged.
    """
    try:
        with open(path, "rb", buffering=0) as stream:
            return _read_header(stream, os.fstat(stream.fileno()).st_size)
    except (OSError, struct.error):  # struct: a file that shrank while it was read
        return None


def _read_header(stream: BinaryIO, size: int) -> WavHeader | None:
    """:func:`read_wav_header` of an open file of ``size`` bytes."""
    head, base = stream.read(_HEADER_BYTES), 0  # head: the file's bytes from offset base on
    if len(head) < 12 or head[:4] not in RIFF_FORMS or head[8:12] != b"WAVE":
        return None
    rf64 = head[:4] != b"RIFF"
    fmt: tuple[int, ...] | None = None
    data_size_64: int | None = None
    offset = 12
    for _ in range(MOST_CHUNKS):
        if offset + 8 > size:
            return None
        if offset + 8 > base + len(head):  # chunks past the first read (a large bext)
            head, base = _read_at(stream, offset), offset
        chunk_id = head[offset - base : offset - base + 4]
        chunk_size = struct.unpack_from("<I", head, offset - base + 4)[0]
        body = offset + 8
        if chunk_id in (b"fmt ", b"ds64") and body + chunk_size > base + len(head):
            head, base = _read_at(stream, offset), offset
        whole = body + chunk_size <= base + len(head)
        if chunk_id == b"fmt " and chunk_size >= _FMT.size and whole:
            fmt = _fmt(head, body - base, chunk_size)
        elif chunk_id == b"ds64" and chunk_size >= 24 and whole:
            # RF64 and BW64 (files past 4 GiB): the data chunk's real size, in 64 bits.
            data_size_64 = struct.unpack_from("<Q", head, body - base + 8)[0]
        elif chunk_id == b"data":
            if rf64 and chunk_size == 0xFFFFFFFF:
                # Its size in ds64; 0 there (or no ds64): a writer that never came back to it.
                chunk_size = data_size_64 or size - body
            elif chunk_size in (0, 0xFFFFFFFF):  # a writer that never came back to fill it in
                return None
            return _header(
                fmt, data_bytes=chunk_size, held_bytes=size - body, data_offset=body, rf64=rf64
            )
        offset = body + chunk_size + (chunk_size & 1)  # chunks are word-aligned
    return None


def _read_at(stream: BinaryIO, offset: int) -> bytes:
    stream.seek(offset)
    return stream.read(_HEADER_BYTES)


def _fmt(head: bytes, at: int, chunk_size: int) -> tuple[int, ...]:
    """The ``fmt `` chunk's fields at ``at`` (and an extensible header's valid bits)."""
    fmt = _FMT.unpack_from(head, at)
    if fmt[0] == _EXTENSIBLE and chunk_size >= 26:
        # The real format is the first two bytes of the sub-format GUID; the bits that hold
        # audio come after the size of the extension.
        valid_bits = struct.unpack_from("<H", head, at + 18)[0]
        return (struct.unpack_from("<H", head, at + 24)[0], *fmt[1:], valid_bits)
    return fmt


def _header(
    fmt: tuple[int, ...] | None,
    *,
    data_bytes: int,
    held_bytes: int,
    data_offset: int,
    rf64: bool,
) -> WavHeader | None:
    """The header from a ``fmt `` chunk's fields, the data chunk's length and the bytes after it."""
    if fmt is None:
        return None
    format_tag, channels, sample_rate, _, block_align, bits, *extensible = fmt
    codec = _CODECS.get((format_tag, bits))
    if codec is None or channels <= 0 or sample_rate <= 0 or block_align != channels * bits // 8:
        return None
    # A size kept in 32 bits by its writer wraps past 4 GiB: the file holds 4 GiB (or 8...)
    # more than it says. Where it does, the size is what it holds, to the wrap.
    wraps = max(held_bytes - data_bytes, 0) // 2**32
    data_bytes += wraps * 2**32
    declared = data_bytes // block_align
    held = max(min(data_bytes, held_bytes), 0) // block_align
    return WavHeader(
        codec=codec,
        sample_rate=sample_rate,
        channels=channels,
        n_samples=held,
        data_offset=data_offset,
        declared_samples=declared if declared > held else None,
        valid_bits=extensible[0] if extensible and 0 < extensible[0] < bits else None,
        wrapped=wraps > 0,
        rf64=rf64,
    )


#: How each codec's samples are stored: numpy's type, and how many of it make one sample.
_STORED: dict[str, tuple[np.dtype[Any], int]] = {
    "pcm_u8": (np.dtype("u1"), 1),
    "pcm_s16le": (np.dtype("<i2"), 1),
    "pcm_s24le": (np.dtype("u1"), 3),
    "pcm_s32le": (np.dtype("<i4"), 1),
    "pcm_f32le": (np.dtype("<f4"), 1),
    "pcm_f64le": (np.dtype("<f8"), 1),
}
#: What ffmpeg subtracts from each integer sample, and multiplies it by, on its way to float.
_TO_FLOAT = {
    "pcm_u8": (np.float32(128.0), np.float32(2.0**-7)),
    "pcm_s16le": (np.float32(0.0), np.float32(2.0**-15)),
    "pcm_s24le": (np.float32(0.0), np.float32(2.0**-31)),  # read shifted into 32 bits
    "pcm_s32le": (np.float32(0.0), np.float32(2.0**-31)),
}


def iter_wav_samples(
    path: str | os.PathLike[str],
    header: WavHeader,
    *,
    start: int = 0,
    stop: int | None = None,
    block_samples: int = BLOCK_SAMPLES,
) -> Iterator[np.ndarray]:
    """Samples ``start`` to ``stop`` of each channel, in blocks, as float32 as ffmpeg makes them.

    ffmpeg's conversion to float (``aformat=sample_fmts=flt``) scales integers by a power of two
    (``2**-7`` around 128 for 8 bits, ``2**-15`` for 16, ``2**-31`` for 32 and for 24 bits
    shifted into 32) and rounds 64-bit floats: the same arithmetic here gives the same bits.
    Read block by block, a chunk's input never lies in memory whole: ten minutes of 48 kHz mono
    were 58 MB of samples and 115 MB of floats before resampling, of 384 kHz stereo (a bat
    detector's) 0.9 and 1.8 GB, none of it counted in the memory budget.

    Parameters
    ----------
    path : str or path-like
    header : WavHeader
        The file's, from :func:`read_wav_header`.
    start, stop : int >= 0
        Samples per channel (``stop=None``: to the end; past the end reads less).
    block_samples : int > 0
        Most samples per channel in one block.

    Yields
    ------
    np.ndarray [shape=(n_samples, channels), dtype=float32]
        ``1 <= n_samples <= block_samples``; nothing for an empty range.

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    stop = header.n_samples if stop is None else min(stop, header.n_samples)
    dtype, per_sample = _STORED[header.codec]
    values_per_frame = header.channels * per_sample  # a frame: one sample of every channel
    frame_bytes = values_per_frame * dtype.itemsize
    with open(path, "rb") as stream:
        stream.seek(header.data_offset + start * frame_bytes)
        position = start
        while position < stop:
            wanted = min(block_samples, stop - position)
            raw = stream.read(wanted * frame_bytes)
            n_frames = len(raw) // frame_bytes  # a file cut short ends mid-frame
            if n_frames == 0:
                return
            stored = np.frombuffer(raw, dtype=dtype, count=n_frames * values_per_frame)
            yield _to_float(stored, header)
            position += n_frames
            if n_frames < wanted:
                return


def _to_float(stored: np.ndarray, header: WavHeader) -> np.ndarray:
    """Stored values of whole frames as float32 ``(n_samples, channels)``, as ffmpeg makes them."""
    if _STORED[header.codec][1] == 3:
        # As ffmpeg does: each 24-bit sample becomes the top three bytes of a 32-bit one.
        shifted = np.zeros((len(stored) // 3, 4), dtype="u1")
        shifted[:, 1:] = stored.reshape(-1, 3)
        stored = shifted.view("<i4").ravel()
    if header.codec not in _TO_FLOAT:
        return stored.astype(np.float32).reshape(-1, header.channels)
    offset, scale = _TO_FLOAT[header.codec]
    # One pass over the samples where it can (each cast to float32, then scaled in float32).
    if offset:
        samples = np.subtract(stored, offset, dtype=np.float32)
        samples *= scale
    else:
        samples = np.multiply(stored, scale, dtype=np.float32)
    return samples.reshape(-1, header.channels)
