"""Decoding audio: probe, plan frame-aligned chunks, decode a chunk sample-exactly.

The executables are those of :func:`buzzdask.ffmpeg_tools.find_ffmpeg`: given by the caller (the
client resolves them once for a run), or found on this machine. A plain WAV, or an MP3 with a
Xing/Info header, is probed in process, from its header (:mod:`buzzdask.wav`,
:mod:`buzzdask.mp3`); other files by ffprobe,
or without ffprobe (the ``imageio-ffmpeg`` wheel has none) from ffmpeg's own report of its input.

The samples handed to the embedder are made exactly as buzzdetect's training pipeline made them:
the **mean** of the channels, then **soxr** resampling to the embedder's rate, as float32. A plain
``ffmpeg -ac 1 -ar 16000`` is not that (it mixes stereo to (L+R)/sqrt(2) and resamples otherwise).
ffmpeg does it with the filter chain of :func:`preprocess_filters`. A plain PCM WAV of one or two
channels (what field recorders write) is decoded in process instead: its samples read with
:func:`buzzdask.wav.iter_wav_samples`, their mean, then the same libsoxr through the ``soxr``
package. The result is the same, bit for bit (tested), without an ffmpeg process per chunk.

A chunk is decoded with margins on both sides (the decoder and the resampler need them to settle)
starting at an instant that lies on both the input and the output sample grids, so its samples
equal those of a whole-file decode: results do not depend on the chunking. A codec that cannot
seek exactly (AAC, Vorbis, Opus) is decoded once per node, whole, into a node-local copy that
its chunks slice (:mod:`buzzdask.pcm_cache`): the same samples, in one decoding pass.

Chunks are planned from the probed duration, an estimate; no chunk is open-ended, so one that is
far too short cannot make a chunk outgrow the memory budget (:func:`plan_chunks`,
:func:`chunks_after`).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import functools
import hashlib
import io
import logging
import math
import os
import re
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral
from stat import S_ISREG
from typing import BinaryIO

import ffmpeg
import numpy as np
import soxr
from dask.utils import format_bytes

from buzzdask import pcm_cache
from buzzdask.buffers import ReusedArrays, aligned_empty
from buzzdask.errors import DecodeError, DecoderStopped, ParameterError
from buzzdask.ffmpeg_tools import FFmpegTools, find_ffmpeg
from buzzdask.frames import FrameSpec
from buzzdask.mp3 import Mp3Header, read_mp3_header
from buzzdask.wav import WavHeader, iter_wav_samples, read_wav_header

__all__ = [
    "OUTPUT_FRAME_SAMPLES",
    "PREPROCESSING",
    "AudioInfo",
    "ChunkPlan",
    "DecodedChunk",
    "chunks_after",
    "decode_chunk",
    "decode_file",
    "estimated_frames",
    "expected_frames",
    "length_is_exact",
    "plan_chunks",
    "preprocess_filters",
    "probe_audio",
    "readable_stat",
    "release_decoded_copy",
    "seeks_exactly",
    "uses_decoded_copy",
]

logger = logging.getLogger(__name__)

# decode_chunk's default, buzzdask.seekable-codecs' too (which runs take).
_SEEKABLE = ("mp3", "flac", "wavpack", "pcm_*")
_STDERR_TAIL = 600  # characters of ffmpeg's message kept in errors
_PIPE_BYTES = 1 << 20  # ffmpeg stdout pipe capacity asked for (Linux allows 1 MiB unprivileged)

#: Decoded chunks' arrays (10 minutes at 16 kHz: 38 MB; a 30-second file's 1.9 MB), reused
#: once nothing holds them; not :func:`decode_file`'s, a whole file's. Unused ones are kept up
#: to 256 MiB: the six or seven 10-minute chunks a worker holds at its busiest (decoding, queued,
#: scoring), as a score task of short files lets go of 16 at once. Fewer, and the pool let go
#: of arrays it needed again a moment later, each faulted in afresh.
_DECODED = ReusedArrays(min_bytes=256 << 10, max_bytes=256 << 20, max_idle_bytes=256 << 20)

# ffmpeg's report of its input (``ffmpeg -i FILE``), read when there is no ffprobe.
_INPUT = re.compile(r"^Input #0, ", re.MULTILINE)
_DURATION = re.compile(r"^\s+Duration: (?:(\d+):(\d\d):(\d\d(?:\.\d+)?)|N/A)", re.MULTILINE)
# "  Stream #0:1[0x2](eng): Audio: aac (LC) (mp4a / 0x6134706D), 44100 Hz, stereo, fltp, ..."
_AUDIO_STREAM = re.compile(
    r"^\s+Stream #0:\d+\S*: Audio: (?P<codec>[^\s,]+)(?P<rest>.*)$", re.MULTILINE
)
_RATE_LAYOUT = re.compile(r", (?P<rate>\d+) Hz, (?P<layout>[^,]+)")
_ANY_STREAM = re.compile(r"^\s+Stream #0:\d+", re.MULTILINE)
_N_CHANNELS = re.compile(r"^(\d+) channels\b")  # a layout without a name: "3 channels (FL+FR+LFE)"


@dataclass(frozen=True)
class AudioInfo:
    """What probing says of a file's first audio stream.

    Parameters
    ----------
    path : str
        The file.
    codec : str
        ffmpeg's codec name (``"mp3"``, ``"pcm_s16le"``...).
    sample_rate : int > 0 [Hz]
    channels : int > 0
    duration_s : float or None [s]
        An estimate (not trusted for frame counts: an MP3's is off where the encoder wrote no
        Xing header and the bitrate changes); to 0.01 s when probed without ffprobe (ffmpeg
        reports it so). Exact for a WAV, and for an MP3 whose LAME header gives the encoder's
        delay and padding.
    size_bytes : int
    mtime_ns : int
    sha256 : str or None
        The content hash, where an embedding store needs it (read by the probe task).
    declared_duration_s : float or None [s]
        What a WAV's or an MP3's header declares, where the file holds less (a copy or a
        recording cut short: ``duration_s`` is what it holds); ``None`` otherwise.
    duration_is_the_streams : bool
        Whether ``duration_s`` is the audio stream's own; ``False`` where it is the container's
        (the longest stream's: a Matroska file with video, or a second audio stream, declares
        no length per stream), which the audio may fall short of without damage.
    """

    path: str
    codec: str
    sample_rate: int
    channels: int
    duration_s: float | None
    size_bytes: int
    mtime_ns: int
    sha256: str | None = None
    declared_duration_s: float | None = None
    duration_is_the_streams: bool = True


@dataclass(frozen=True)
class ChunkPlan:
    """One decode task: frames ``first_frame ... first_frame + n_frames - 1`` of a file.

    Fewer frames come back where the real end of the audio falls inside the chunk, none when it
    lies before the chunk. ``n_frames=None`` runs to the real end of the audio, however far
    (training's wanted frames use it; :func:`plan_chunks` never does, so that no chunk outgrows
    the memory budget when a duration estimate is short).
    """

    index: int
    first_frame: int
    n_frames: int | None


@dataclass
class DecodedChunk:
    """Decoded samples of one chunk, ready for the scorer.

    Parameters
    ----------
    samples : np.ndarray [shape=(n_samples,), dtype=float32]
        Mono audio at the embedder's rate from the chunk's first frame start on;
        ``n_samples <= spec.span(n_frames)`` (shorter only at the end of the file, where the
        embedder's context past the last frame is zero, as in a whole-file computation).
    first_frame : int >= 0
        Index of the first frame in the file.
    n_frames : int >= 0
        Complete frames in this chunk (a frame overrunning the end of the file is dropped).
    messages : str
        What ffmpeg reported while decoding (damaged frames), empty when clean.
    """

    samples: np.ndarray
    first_frame: int
    n_frames: int
    messages: str = ""


def probe_audio(path: str | os.PathLike[str], *, tools: FFmpegTools | None = None) -> AudioInfo:
    """Read a file's first audio stream parameters: a plain WAV's or MP3's header, else ffprobe's.

    Without ffprobe, ffmpeg's report of the input is read instead.

    Parameters
    ----------
    path : str or path-like
    tools : FFmpegTools, optional
        The executables; default: :func:`~buzzdask.ffmpeg_tools.find_ffmpeg` on this machine.

    Returns
    -------
    AudioInfo
        The same either way, but for ``duration_s``: ffmpeg reports it rounded to 0.01 s, a
        WAV header gives it exactly (and the real length of a WAV cut short), an MP3's header
        as ffmpeg will decode it where a LAME header gives the delay and padding.

    Raises
    ------
    DecodeError
        If the file is empty, unreadable, not audio, or has no audio stream.
    """
    path = os.path.expanduser(os.fspath(path))  # "~/..." as pandas and the shell take it
    stat = readable_stat(path)
    header: WavHeader | Mp3Header | None = read_wav_header(path) or read_mp3_header(path)
    if header is not None:  # most field recordings: no process to start
        codec, sample_rate, channels = header.codec, header.sample_rate, header.channels
        duration_s: float | None = header.duration_s
        declared_duration_s = header.declared_duration_s
        streams = True
    else:
        tools = tools or find_ffmpeg()
        read = _ffprobe_stream if tools.ffprobe is not None else _ffmpeg_stream
        codec, sample_rate, channels, duration_s, streams = read(
            path, tools.ffprobe or tools.ffmpeg
        )
        declared_duration_s = None
    if sample_rate <= 0 or channels <= 0:
        raise DecodeError(path, f"invalid audio stream ({sample_rate} Hz, {channels} channels)")
    return AudioInfo(
        path=path,
        codec=codec,
        sample_rate=sample_rate,
        channels=channels,
        duration_s=duration_s,
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        declared_duration_s=declared_duration_s,
        duration_is_the_streams=streams,
    )


# Codec, sample rate, channels, duration [s], and whether that duration is the stream's own.
_Stream = tuple[str, int, int, float | None, bool]


def readable_stat(path: str) -> os.stat_result:
    """The ``os.stat`` of a file that can be read.

    Parameters
    ----------
    path : str

    Returns
    -------
    os.stat_result

    Raises
    ------
    DecodeError
        Saying what keeps it from being read: ``"cannot read the file: "`` and the system's
        reason (``No such file or directory``...), ``"not a regular file"``, ``"empty file (0
        bytes)"`` or ``"permission denied"``.
    """
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DecodeError(path, f"cannot read the file: {error.strerror}") from None
    if not S_ISREG(stat.st_mode):
        raise DecodeError(path, "not a regular file")
    if stat.st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise DecodeError(path, "permission denied")
    return stat


#: ffmpeg's exit status when it stops on SIGINT or SIGTERM (it catches both, and says nothing
#: of it at ``-loglevel error``).
_FFMPEG_SIGNALLED = 255
#: Signals that stop ffmpeg from outside (a job's end, Ctrl-C, the out-of-memory killer, a
#: closed terminal), unlike those of a crash (SIGSEGV, SIGABRT...), which the file may cause.
_STOPPING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP})


def _decode_failure(path: str, messages: str, returncode: int) -> DecodeError:
    """The error for a failed ffmpeg: the file's own problem where it has one now.

    A file moved, deleted or emptied after it was probed (a sync tool, a scratch purge, a
    transfer starting over) is said so, not as a decoding failure; an ffmpeg killed by a
    signal (the kernel's out-of-memory killer, a job's end) says which, having written nothing
    about it.
    """
    try:
        readable_stat(path)
    except DecodeError as problem:
        return problem
    if returncode < 0:
        name = _signal_name(-returncode)
        cause = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        # Stopped from outside, it decodes next time; a crash (SIGSEGV...) would crash again.
        stopped = -returncode in _STOPPING_SIGNALS
        return (DecoderStopped if stopped else DecodeError)(
            path, f"ffmpeg was killed by {name}{cause}", messages
        )
    if returncode == _FFMPEG_SIGNALLED and not messages:
        # What a job's end (SIGTERM to every process of a SLURM job) or a Ctrl-C that reached
        # the workers leaves, though the file itself decodes.
        return DecoderStopped(path, "ffmpeg was stopped by SIGINT or SIGTERM (Ctrl-C, a job's end)")
    return DecodeError(path, "ffmpeg failed to decode", messages)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _ffprobe_stream(path: str, ffprobe: str) -> _Stream:
    """The first audio stream, as ffprobe describes it."""
    try:
        probe = ffmpeg.probe(path, cmd=ffprobe, v="error")
    except ffmpeg.Error as error:
        raise DecodeError(path, "ffprobe cannot read it as audio", _tail(error.stderr)) from None
    except OSError as error:
        raise DecodeError(path, f"cannot run {ffprobe!r}: {error}") from None
    streams = [s for s in probe.get("streams", []) if s.get("codec_type") == "audio"]
    if not streams:
        raise DecodeError(path, "no audio stream")
    stream = streams[0]
    try:
        sample_rate = int(stream["sample_rate"])
        channels = int(stream["channels"])
    except (KeyError, ValueError):
        raise DecodeError(path, "audio stream without a sample rate or channel count") from None
    duration = stream.get("duration") or probe.get("format", {}).get("duration")
    try:
        duration_s = float(duration) if duration not in (None, "N/A") else None
    except ValueError:
        duration_s = None
    own = "duration" in stream or len(probe.get("streams", [])) == 1
    return str(stream.get("codec_name", "unknown")), sample_rate, channels, duration_s, own


def _ffmpeg_stream(path: str, ffmpeg_cmd: str) -> _Stream:
    """The first audio stream, as ``ffmpeg -i`` reports it (it opens the input as ffprobe does).

    ffmpeg exits 1 here whatever the file ("At least one output file must be specified"): the
    input was read when its report is there.
    """
    try:
        answer = subprocess.run(
            [ffmpeg_cmd, "-nostdin", "-hide_banner", "-i", path],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
    except OSError as error:
        raise DecodeError(path, f"cannot run {ffmpeg_cmd!r}: {error}") from None
    report = answer.stderr.decode("utf-8", errors="replace")
    opened = _INPUT.search(report)
    if opened is None:
        raise DecodeError(path, "ffmpeg cannot read it as audio", _tail(answer.stderr))
    report = report[opened.start() :]
    stream = _AUDIO_STREAM.search(report)
    if stream is None:
        raise DecodeError(path, "no audio stream")
    rate_layout = _RATE_LAYOUT.search(stream["rest"])
    channels = None if rate_layout is None else _channel_count(rate_layout["layout"], ffmpeg_cmd)
    if rate_layout is None or channels is None:
        raise DecodeError(path, "audio stream without a sample rate or channel count")
    duration = _DURATION.search(report)
    duration_s = None
    if duration is not None and duration[1] is not None:
        duration_s = int(duration[1]) * 3600 + int(duration[2]) * 60 + float(duration[3])
    own = len(_ANY_STREAM.findall(report)) == 1  # else the container's: the longest stream's
    return stream["codec"], int(rate_layout["rate"]), channels, duration_s, own


def _channel_count(layout: str, ffmpeg_cmd: str) -> int | None:
    """Channels of a layout as ffmpeg prints it: ``"stereo"``, ``"5.1(side)"``, ``"3 channels"``."""
    unnamed = _N_CHANNELS.match(layout)
    if unnamed is not None:
        return int(unnamed[1])
    return _layouts(ffmpeg_cmd).get(layout.strip())


@functools.lru_cache(maxsize=4)
def _layouts(ffmpeg_cmd: str) -> dict[str, int]:
    """The named channel layouts of ``ffmpeg_cmd`` and their channel counts (``-layouts``).

    Its table, not a copy: newer versions name more layouts (``5.1.2``, ``binaural``...).
    """
    listing = subprocess.run(
        [ffmpeg_cmd, "-nostdin", "-hide_banner", "-layouts"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    ).stdout.decode("utf-8", errors="replace")
    # "NAME DECOMPOSITION" rows after "Standard channel layouts:", e.g. "5.1  FL+FR+FC+LFE+BL+BR"
    counts = {}
    for line in listing.partition("Standard channel layouts:")[2].splitlines():
        words = line.split()
        if len(words) == 2 and words[0] != "NAME":
            counts[words[0]] = words[1].count("+") + 1
    return counts


def plan_chunks(info: AudioInfo, spec: FrameSpec, *, frames_per_chunk: int) -> list[ChunkPlan]:
    """Cut a file into chunks of ``frames_per_chunk`` frames covering its estimated duration.

    Chunk ``i`` starts at frame ``i * frames_per_chunk``. The plan depends only on the file's
    probed duration and the settings, so a rerun (resume) plans the same chunks. The duration
    is an estimate (an MP3 without a Xing/VBRI header is timed from its first frame's bitrate,
    and can be off several times over), so:

    - the last chunk holds one frame more than the others: when it comes back full, the audio
      went on past the estimate (the frame past the estimate is there), and the chunks of
      :func:`chunks_after` follow; an exact estimate never fills it;
    - chunks past the real end come back with no frames.

    Returns
    -------
    list of ChunkPlan
        At least one; ``n_frames == frames_per_chunk``, the last ``frames_per_chunk + 1``.
    """
    n_chunks = max(1, math.ceil((estimated_frames(info, spec) or 0) / frames_per_chunk))
    return [
        ChunkPlan(
            index=i,
            first_frame=i * frames_per_chunk,
            n_frames=frames_per_chunk + (i == n_chunks - 1),
        )
        for i in range(n_chunks)
    ]


def estimated_frames(info: AudioInfo, spec: FrameSpec) -> int | None:
    """Whole frames in the file by its estimated duration (``None``: no estimate)."""
    if info.duration_s is None:
        return None
    return spec.n_complete_frames(int(info.duration_s * spec.sample_rate))


def expected_frames(info: AudioInfo, plan: ChunkPlan, spec: FrameSpec) -> int | None:
    """Frames ``plan`` should come back with by the file's estimated duration.

    A 30-second file's one chunk is planned for a whole chunk of frames but holds 31: this is
    what it adds to a score task. ``plan.n_frames`` where the estimate says nothing: no
    estimate, or a chunk past it (the audio went on past the estimate).
    """
    estimated = estimated_frames(info, spec)
    if estimated is None or plan.first_frame >= estimated:
        return plan.n_frames
    left = estimated - plan.first_frame
    return left if plan.n_frames is None else min(plan.n_frames, left)


def chunks_after(
    plan: ChunkPlan, n_frames: int, *, frames_per_chunk: int, count: int = 1
) -> list[ChunkPlan]:
    """The chunks that follow the last one of a file when it came back full.

    The audio went on past its estimated duration: ``count`` more chunks follow (those past
    the real end come back empty). A chunk that came back short ended the audio: none follow.

    Parameters
    ----------
    plan : ChunkPlan
        The file's last chunk so far.
    n_frames : int >= 0
        The frames it came back with.
    frames_per_chunk : int > 0
    count : int >= 1
        Chunks to add.

    Returns
    -------
    list of ChunkPlan
        ``plan.index + k`` for ``k = 1 ... count``, each of ``frames_per_chunk`` frames, the
        first right after ``plan``; empty unless ``n_frames == plan.n_frames``.
    """
    # More than n_frames: an open-ended last chunk of an earlier version, which read to the end.
    if plan.n_frames is None or n_frames != plan.n_frames:
        return []
    after = plan.first_frame + plan.n_frames
    return [
        ChunkPlan(
            index=plan.index + k,
            first_frame=after + (k - 1) * frames_per_chunk,
            n_frames=frames_per_chunk,
        )
        for k in range(1, count + 1)
    ]


#: The model's training preprocessing, as recorded in run metadata and fingerprints; the ffmpeg
#: filter chain of :func:`preprocess_filters` implements it, and so does the in-process decoding
#: of plain WAVs, to the same bits (so the text, which outputs and stores are checked by, stays).
PREPROCESSING = (
    "mean of channels, then soxr resampling to the embedder's rate (ffmpeg pan + aresample)"
)


#: Samples per frame that leaves ffmpeg's filters (``p=0``: the last one is not padded). An MP3
#: decodes in frames of 1,152 samples, each handed from thread to thread in ffmpeg 7 and later
#: (filters, encoder, muxer): in frames of about a second, the imageio-ffmpeg wheel's ffmpeg 9
#: (OSC's) decoded MP3 in ``analyze`` for 11 % less CPU, to the same bytes (README).
OUTPUT_FRAME_SAMPLES = 16384


def preprocess_filters(channels: int, sample_rate: int) -> str:
    """The ffmpeg ``-af`` chain that reproduces buzzdetect's preprocessing.

    Float samples, the mean of the channels (``pan`` with weight ``1/channels`` each: ffmpeg's
    own downmix weighs surround channels differently and mixes stereo to (L+R)/sqrt(2)), then
    soxr resampling (a no-op when the input is already at ``sample_rate``), then the samples
    regrouped into frames of :data:`OUTPUT_FRAME_SAMPLES` (the same samples, none added).

    Parameters
    ----------
    channels : int > 0
        Channels of the input stream.
    sample_rate : int > 0 [Hz]
        The embedder's rate.

    Returns
    -------
    str
        For stereo: ``"aformat=sample_fmts=flt,pan=mono|c0=0.5*c0+0.5*c1,"``
        ``"aresample=osr=16000:resampler=soxr,asetnsamples=n=16384:p=0"``.
    """
    filters = ["aformat=sample_fmts=flt"]
    if channels > 1:
        weight = repr(1.0 / channels)
        filters.append("pan=mono|c0=" + "+".join(f"{weight}*c{i}" for i in range(channels)))
    filters.append(f"aresample=osr={sample_rate}:resampler=soxr")
    filters.append(f"asetnsamples=n={OUTPUT_FRAME_SAMPLES}:p=0")
    return ",".join(filters)


def decode_file(
    path: str | os.PathLike[str],
    *,
    sample_rate: int,
    tools: FFmpegTools | None = None,
) -> np.ndarray:
    """Decode a whole file to mono float32 at ``sample_rate`` with the model's preprocessing.

    Parameters
    ----------
    path : str or path-like
    sample_rate : int > 0 [Hz]
    tools : FFmpegTools, optional
        The executables; default: :func:`~buzzdask.ffmpeg_tools.find_ffmpeg` on this machine.

    Returns
    -------
    np.ndarray [shape=(n_samples,), dtype=float32]

    Raises
    ------
    ParameterError
        ``sample_rate`` is not a whole number > 0.
    DecodeError
        The file is missing, empty, holds no audio stream, or ffmpeg cannot decode it.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, Integral) or sample_rate <= 0:
        raise ParameterError(f"sample_rate={sample_rate!r} must be an integer > 0 [Hz]")
    info = probe_audio(path, tools=tools)
    header = _in_process_header(info)
    if header is not None:
        return _decode_wav(info, header, sample_rate=sample_rate, start=0, stop=None)
    samples, _ = _run_ffmpeg(
        info, sample_rate=sample_rate, ffmpeg_cmd=(tools or find_ffmpeg()).ffmpeg
    )
    return samples


def decode_chunk(
    info: AudioInfo,
    chunk: ChunkPlan,
    *,
    spec: FrameSpec,
    margin_s: float = 0.5,
    seekable_codecs: tuple[str, ...] = _SEEKABLE,
    ffmpeg_cmd: str | None = None,
    copy_directory: str | None = None,
) -> DecodedChunk:
    """Decode the samples one chunk's frames need, sample-exactly.

    Parameters
    ----------
    info : AudioInfo
        From :func:`probe_audio`.
    chunk : ChunkPlan
        Which frames.
    spec : FrameSpec
        Frame geometry at the embedder's rate.
    margin_s : float >= 0 [s]
        Audio decoded before and after the chunk and thrown away.
    seekable_codecs : tuple of str
        Codec name patterns whose input seeking is sample-exact. A file of any other codec
        that does not fit in this one chunk is decoded once per node, whole, into a node-local
        float32 copy that its chunks slice (:mod:`buzzdask.pcm_cache`): one decoding pass per
        file, not one from the start per chunk. Without room for the copy, the chunk is decoded
        from the start of the file and trimmed (the same samples, slower for late chunks).
    ffmpeg_cmd : str, optional
        The ffmpeg executable (built with libsoxr); default: that of
        :func:`~buzzdask.ffmpeg_tools.find_ffmpeg` on this machine.
    copy_directory : str, optional
        Node-local directory of those copies; default ``$TMPDIR``, else the system's temporary
        directory. :func:`release_decoded_copy` removes a file's copy.

    Returns
    -------
    DecodedChunk
        ``n_frames < chunk.n_frames`` only where the real end of the audio falls in the chunk
        (0 for a chunk wholly past it: a duration estimate that was too long).

    Raises
    ------
    DecodeError
        If ffmpeg fails, the file cannot be read (gone, moved, emptied since its probe), or the
        audio holds samples that are not finite numbers. :class:`DecoderStopped`, a subclass,
        if ffmpeg was stopped by a signal from outside (a job's end): not the file's fault.
    """
    rate = spec.sample_rate
    first_sample = chunk.first_frame * spec.hop_length
    stop = None if chunk.n_frames is None else first_sample + spec.span(chunk.n_frames)
    header = _in_process_header(info)
    # ffmpeg is looked for only where it decodes: a folder of WAVs never needs it.
    ffmpeg_cmd = ffmpeg_cmd or ("" if header is not None else find_ffmpeg().ffmpeg)
    if header is None and uses_decoded_copy(
        info, chunk, spec=spec, margin_s=margin_s, seekable_codecs=seekable_codecs
    ):
        copied = pcm_cache.read_span(
            _copy_key(info, sample_rate=rate, ffmpeg_cmd=ffmpeg_cmd),
            directory=copy_directory,
            start=first_sample,
            stop=stop,
            make=functools.partial(_decode_to_file, info, sample_rate=rate, ffmpeg_cmd=ffmpeg_cmd),
            size_hint=None if info.duration_s is None else 4 * math.ceil(info.duration_s * rate),
            name=info.path,
        )
        if copied is not None:
            from_copy = _chunk_of(copied[0], chunk, spec=spec, stop=stop, messages=copied[1])
            return _finite(info, from_copy, spec=spec)
    margin = round(margin_s * rate)
    input_seek = header is not None or seeks_exactly(info.codec, seekable_codecs)
    # Start on an instant that is a whole number of input samples, output samples and
    # microseconds (ffmpeg's time unit), so the resampler's phase matches the whole-file decode.
    grid = math.gcd(math.gcd(info.sample_rate, rate) if input_seek else rate, 10**6)
    step = rate // grid
    start = max(0, first_sample - margin) // step * step
    if header is not None:
        decoded = _decode_wav(
            info,
            header,
            sample_rate=rate,
            start=start,
            stop=None if stop is None else stop + margin,
            empty=_DECODED.empty,
        )
        messages = ""
    else:
        decoded, messages = _run_ffmpeg(
            info,
            sample_rate=rate,
            start=Fraction(start, rate),
            duration=None if stop is None else Fraction(stop + margin - start, rate),
            input_seek=input_seek,
            ffmpeg_cmd=ffmpeg_cmd,
            empty=_DECODED.empty,
        )
    samples = decoded[first_sample - start : None if stop is None else stop - start]
    result = _chunk_of(samples, chunk, spec=spec, stop=stop, messages=messages)
    if header is not None and _INTEGER_PCM.match(info.codec):
        return result  # integer samples, read here, resample to finite ones only
    return _finite(info, result, spec=spec)


#: Codecs of integer samples (``pcm_s16le``, ``pcm_u8``...), as probed.
_INTEGER_PCM = re.compile(r"pcm_[su]\d")


def _finite(info: AudioInfo, decoded: DecodedChunk, *, spec: FrameSpec) -> DecodedChunk:
    """``decoded``, if its samples are all finite; else the :class:`DecodeError` saying where.

    A NaN or an infinity (damaged float audio, or a sample format ffmpeg reads as another:
    a WAVE_FORMAT_EXTENSIBLE header of 24 valid bits in 32) reaches YAMNet's log-mel front end
    as a constant: the frame would be scored as if it held audio.
    """
    samples = decoded.samples
    # One pass, vectorised: a sum is finite where every sample is (but for sums past 3e38).
    if math.isfinite(np.add.reduce(samples)):
        return decoded
    bad = np.flatnonzero(~np.isfinite(samples))
    if not bad.size:
        return decoded
    first = decoded.first_frame * spec.hop_length + int(bad[0])
    raise DecodeError(
        info.path,
        f"NaN or infinite samples from {first / spec.sample_rate:.2f} s on (damaged float audio, "
        "or a sample format ffmpeg misreads): not scored",
    )


def _in_process_header(info: AudioInfo) -> WavHeader | None:
    """The WAV header of a file decoded in process: PCM of one or two channels, as probed.

    More channels go through ffmpeg, whose ``pan`` sums them in an order of its own; but not
    where ffmpeg misreads the file (:attr:`WavHeader.ffmpeg_misreads`).
    """
    if not info.codec.startswith("pcm_"):
        return None
    header = read_wav_header(info.path)
    if header is None or (header.codec, header.sample_rate, header.channels) != (
        info.codec,
        info.sample_rate,
        info.channels,
    ):
        return None
    return header if info.channels <= 2 or header.ffmpeg_misreads else None


def _decode_wav(
    info: AudioInfo,
    header: WavHeader,
    *,
    sample_rate: int,
    start: int,
    stop: int | None,
    empty: Callable[[int], np.ndarray] = aligned_empty,
) -> np.ndarray:
    """The preprocessing chain, in process: samples ``start`` to ``stop`` at ``sample_rate``.

    ``start`` lies on the input's sample grid (:func:`decode_chunk` sees to it); ``stop=None``
    runs to the end of the file, where soxr's last output sample is ffmpeg's. The file's blocks
    go through one soxr stream (:func:`~buzzdask.wav.iter_wav_samples`), whose output is a
    whole-array ``soxr.resample``'s to the bit, so only the output is ever held whole, in an
    array from ``empty`` (aligned, as :func:`~buzzdask.buffers.aligned_empty`'s).
    """
    in_rate = header.sample_rate
    in_start = start * in_rate // sample_rate
    in_stop = header.n_samples if stop is None else -(-stop * in_rate // sample_rate)
    n_in = max(0, min(in_stop, header.n_samples) - in_start)
    resampler = (
        None
        if in_rate == sample_rate
        else soxr.ResampleStream(in_rate, sample_rate, 1, dtype="float32", quality="HQ")
    )
    # soxr makes round(n_in * sample_rate / in_rate) samples in all: written into one array as
    # they come, not gathered and joined (38 MB less to fault in and copy per 10-minute chunk).
    samples = empty(-(-n_in * sample_rate // in_rate))
    filled = 0
    try:
        blocks = iter_wav_samples(info.path, header, start=in_start, stop=in_stop)
        for piece in _resampled(blocks, header.channels, resampler):
            samples[filled : filled + len(piece)] = piece
            filled += len(piece)
    except OSError as error:
        raise DecodeError(info.path, f"cannot read the file: {error.strerror}") from None
    return samples[:filled]


def _resampled(
    blocks: Iterator[np.ndarray], channels: int, resampler: soxr.ResampleStream | None
) -> Iterator[np.ndarray]:
    """The mean of each block's channels through ``resampler``, then what it still holds."""
    read = 0
    for block in blocks:
        # The mean of two float32 channels is pan's 0.5*c0+0.5*c1 to the bit (halving is exact).
        mono = block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32)
        read += len(mono)
        yield mono if resampler is None else resampler.resample_chunk(mono)
    if resampler is not None and read:
        yield resampler.resample_chunk(np.zeros(0, np.float32), last=True)


def _chunk_of(
    samples: np.ndarray, chunk: ChunkPlan, *, spec: FrameSpec, stop: int | None, messages: str
) -> DecodedChunk:
    """The chunk's frames in ``samples`` (decoded from its first frame's start, up to ``stop``)."""
    first_sample = chunk.first_frame * spec.hop_length
    if stop is not None and first_sample + len(samples) >= stop:
        n_frames = chunk.n_frames or 0
    else:
        # The end of the file fell inside this chunk: count what was really decoded.
        total = first_sample + len(samples)
        n_frames = max(0, spec.n_complete_frames(total) - chunk.first_frame)
        if chunk.n_frames is not None:
            n_frames = min(n_frames, chunk.n_frames)
        samples = samples[: spec.span(n_frames)]
    return DecodedChunk(
        samples=np.ascontiguousarray(samples),
        first_frame=chunk.first_frame,
        n_frames=n_frames,
        messages=messages,
    )


def uses_decoded_copy(
    info: AudioInfo,
    chunk: ChunkPlan,
    *,
    spec: FrameSpec,
    margin_s: float = 0.5,
    seekable_codecs: tuple[str, ...] = _SEEKABLE,
) -> bool:
    """Whether :func:`decode_chunk` reads this chunk from the file's node-local decoded copy.

    It does for a codec that cannot seek exactly, unless the chunk starts at the beginning of
    the file and reaches its (estimated) end: decoding it directly is then one pass already.
    """
    if seeks_exactly(info.codec, seekable_codecs):
        return False
    if chunk.first_frame > 0:
        return True
    if chunk.n_frames is None:
        return False
    margin = round(margin_s * spec.sample_rate)
    return info.duration_s is None or math.ceil(
        info.duration_s * spec.sample_rate
    ) + margin > spec.span(chunk.n_frames)


def release_decoded_copy(
    info: AudioInfo,
    *,
    spec: FrameSpec,
    ffmpeg_cmd: str | None = None,
    copy_directory: str | None = None,
    **decode_options: object,
) -> bool:
    """Remove this node's decoded copy of a file (run on every worker once its chunks are done).

    Parameters
    ----------
    info, spec, ffmpeg_cmd, copy_directory
        As given to :func:`decode_chunk`.
    **decode_options
        :func:`decode_chunk`'s other keywords, ignored: a caller may pass all of them.

    Returns
    -------
    bool
        Whether no copy is left on this node (False while a task is making one).
    """
    key = _copy_key(
        info, sample_rate=spec.sample_rate, ffmpeg_cmd=ffmpeg_cmd or find_ffmpeg().ffmpeg
    )
    return pcm_cache.remove(key, directory=copy_directory)


def length_is_exact(codec: str) -> bool:
    """Whether a file of ``codec`` is as long as probed: PCM, whose length is its data's size.

    Other codecs' durations are estimates, an MP3's sometimes several times too short.
    """
    return codec.startswith("pcm_")


def seeks_exactly(codec: str, seekable_codecs: tuple[str, ...]) -> bool:
    """Whether input seeking in ``codec`` is sample-exact (it matches a ``seekable_codecs``)."""
    return any(fnmatch.fnmatchcase(codec, pattern) for pattern in seekable_codecs)


def _copy_key(info: AudioInfo, *, sample_rate: int, ffmpeg_cmd: str) -> str:
    """Names a file's decoded copy on this node: the file as probed, and how it is decoded.

    The host name keeps copies apart when the directory is shared between nodes by mistake.
    """
    identity = repr(
        (
            os.path.abspath(info.path),
            info.size_bytes,
            info.mtime_ns,
            preprocess_filters(info.channels, sample_rate),
            ffmpeg_cmd,
        )
    )
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return f"{socket.gethostname()}-{digest}"


def _decode_to_file(info: AudioInfo, target: str, *, sample_rate: int, ffmpeg_cmd: str) -> str:
    """Decode the whole file to raw float32 at ``target`` (ffmpeg writes it); its messages."""
    # Its first chunk waits for the whole file (minutes for hours of AAC): -v says why.
    size = (
        ""
        if info.duration_s is None
        else f" of {format_bytes(round(4 * sample_rate * info.duration_s))}"
    )
    logger.info(
        "decoding %s whole into a node-local copy%s, which its chunks are read from: "
        "its codec cannot seek exactly",
        info.path,
        size,
    )
    command = _command(info, target, sample_rate=sample_rate, ffmpeg_cmd=ffmpeg_cmd)
    with tempfile.TemporaryFile() as stderr_file:
        try:
            returncode = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_file
            ).returncode
        except OSError as error:
            raise DecodeError(info.path, f"cannot run {ffmpeg_cmd!r}: {error}") from None
        messages = _tail_of_file(stderr_file)
    # ffmpeg 5.1 exits 0 when its last write, at the trailer, fails (the disk filled at the
    # end): the copy would be short by up to its 32 KiB buffer, and frames silently lost.
    if returncode != 0 or "Error writing trailer" in messages:
        raise _decode_failure(info.path, messages, returncode)
    return messages


def _command(
    info: AudioInfo,
    target: str,
    *,
    sample_rate: int,
    start: Fraction = Fraction(0),
    duration: Fraction | None = None,
    input_seek: bool = True,
    ffmpeg_cmd: str,
) -> list[str]:
    """The ffmpeg command decoding ``info.path`` with the preprocessing chain to ``target``.

    With ``input_seek``, ffmpeg seeks to ``start`` in the input; without, it decodes from the
    start and keeps the samples from ``start`` on by their count (``atrim``), as a whole-file
    decode's samples are sliced: not by their timestamps (``-ss`` on the output), which a stream
    whose timestamps jump (a looped or re-encoded AAC) puts elsewhere, shifting every later
    chunk.
    """
    seek: dict[str, str] = {}
    filters = preprocess_filters(info.channels, sample_rate)
    if input_seek:
        if start > 0:
            seek["ss"] = _timestamp(start)
        if duration is not None:
            seek["t"] = _timestamp(duration, round_up=True)
    else:
        first = math.ceil(start * sample_rate)
        trim = [f"start_sample={first}"] if first else []
        if duration is not None:
            trim.append(f"end_sample={first + math.ceil(duration * sample_rate)}")
        if trim:
            filters += ",atrim=" + ":".join(trim)
    output = (
        ffmpeg.input(info.path, **seek)
        .output(
            target,
            map="0:a:0",
            af=filters,
            format="f32le",
            acodec="pcm_f32le",
            # Whole 32 KiB writes rather than one per 4 KiB packet: 7x fewer reads and wake-ups.
            flush_packets=0,
        )
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
    )
    return list(output.compile(cmd=ffmpeg_cmd))


def _run_ffmpeg(
    info: AudioInfo,
    *,
    sample_rate: int,
    start: Fraction = Fraction(0),
    duration: Fraction | None = None,
    input_seek: bool = True,
    ffmpeg_cmd: str,
    empty: Callable[[int], np.ndarray] = aligned_empty,
) -> tuple[np.ndarray, str]:
    """Run ffmpeg with the preprocessing chain; return the samples and its messages.

    The samples lie in an array from ``empty`` (see :func:`_read_samples`).
    """
    command = _command(
        info,
        "pipe:",
        sample_rate=sample_rate,
        start=start,
        duration=duration,
        input_seek=input_seek,
        ffmpeg_cmd=ffmpeg_cmd,
    )
    seconds = duration if duration is not None else info.duration_s
    expected = None if seconds is None else math.ceil(seconds * sample_rate)
    # stderr goes to a file: read after exit, it can never fill a pipe and stall ffmpeg.
    with tempfile.TemporaryFile() as stderr_file:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr_file,
                bufsize=0,
            )
        except OSError as error:
            raise DecodeError(info.path, f"cannot run {ffmpeg_cmd!r}: {error}") from None
        with process:
            assert isinstance(process.stdout, io.RawIOBase)  # bufsize=0: unbuffered
            samples = _read_samples(process.stdout, expected, empty=empty)
            returncode = process.wait()
        messages = _tail_of_file(stderr_file)
    if returncode != 0:
        raise _decode_failure(info.path, messages, returncode)
    return samples, messages


def _read_samples(
    pipe: io.RawIOBase,
    expected: int | None,
    *,
    empty: Callable[[int], np.ndarray] = aligned_empty,
) -> np.ndarray:
    """float32 samples from ffmpeg's stdout, read straight into one array.

    One copy from the pipe, in reads of up to a megabyte: reading it through
    ``communicate()`` (32 KiB reads, then a join) cost a quarter of a WAV chunk's decode.

    Parameters
    ----------
    pipe : binary file
        ffmpeg's unbuffered stdout.
    expected : int or None
        Samples expected (the buffer grows past it if need be).
    empty : callable
        Makes an uninitialised aligned float32 array of a given length: ``aligned_empty``, or
        a pool's (:class:`~buzzdask.buffers.ReusedArrays`).

    Returns
    -------
    np.ndarray [shape=(n_samples,), dtype=float32]
    """
    with contextlib.suppress(AttributeError, OSError):  # Linux only; the default also works
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    buffer = empty(max(expected or 0, _PIPE_BYTES // 4) + 1)
    filled = 0
    while True:
        if filled == buffer.nbytes:
            grown = empty(2 * len(buffer))
            grown[: len(buffer)] = buffer
            buffer = grown
        read = pipe.readinto(buffer.data.cast("B")[filled:])
        if not read:
            break
        filled += read
    samples = buffer[: filled // 4]
    # Hand back an array its own size when the estimate was far off (a whole-file decode).
    if samples.nbytes < buffer.nbytes // 2:
        buffer = empty(len(samples))
        buffer[:] = samples
        samples = buffer
    return samples.astype(np.float32, copy=False)


def _tail_of_file(file: BinaryIO) -> str:
    """The last messages written to ``file`` (damaged audio can make ffmpeg write megabytes)."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - 4 * _STDERR_TAIL))
    return _tail(file.read())


def _timestamp(seconds: Fraction, *, round_up: bool = False) -> str:
    """Seconds as ffmpeg's ``S.ffffff`` (it counts microseconds), exact or rounded up."""
    micros = seconds * 10**6
    whole = math.ceil(micros) if round_up else math.floor(micros)
    return f"{whole // 10**6}.{whole % 10**6:06d}"


def _tail(stderr: bytes | None) -> str:
    text = (stderr or b"").decode("utf-8", errors="replace").strip()
    return text[-_STDERR_TAIL:]
