"""WAV headers read in process say what ffprobe says, exactly; anything else is left to ffprobe."""

from __future__ import annotations

import functools
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from buzzdask.decode import _ffprobe_stream, decode_chunk, decode_file, plan_chunks, probe_audio
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.ledger import _cut_short
from buzzdask.wav import WavHeader, iter_wav_samples, read_wav_header
from tests.conftest import field_like, requires_ffmpeg
from tests.test_frames import spec

pytestmark = requires_ffmpeg
N_SAMPLES = 7 * 48000 + 321


def _ffmpeg_wav(path: Path, *options: str, rate: int = 48000, channels: int = 1) -> Path:
    """A generated WAV of ``N_SAMPLES`` samples, written by ffmpeg with ``options``."""
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-y", "-f", "lavfi"),
            *("-i", f"anoisesrc=r={rate}:a=0.1,aformat=channel_layouts={channels}c"),
            *("-af", f"atrim=end_sample={N_SAMPLES}", *options, str(path)),
        ],
        check=True,
    )
    return path


@pytest.mark.parametrize(
    ("codec", "channels", "extra"),
    [
        ("pcm_s16le", 1, ()),
        ("pcm_u8", 1, ()),
        ("pcm_s24le", 2, ()),
        ("pcm_s32le", 1, ()),
        ("pcm_f32le", 1, ()),
        ("pcm_f64le", 2, ()),
        ("pcm_s16le", 6, ()),  # WAVE_FORMAT_EXTENSIBLE
        ("pcm_s16le", 1, ("-metadata", "comment=Recorded at 05:30:00 by AudioMoth 24A")),  # LIST
        ("pcm_s24le", 2, ("-rf64", "always")),  # RF64: its sizes in a ds64 chunk
    ],
)
def test_header_says_what_ffprobe_says(tmp_path: Path, codec: str, channels: int, extra) -> None:
    path = _ffmpeg_wav(tmp_path / "a.wav", "-c:a", codec, *extra, channels=channels)
    header = read_wav_header(path)
    assert header is not None
    assert header.n_samples == N_SAMPLES
    ffprobe = find_ffmpeg().ffprobe
    assert ffprobe is not None
    probed_codec, rate, probed_channels, duration_s, the_streams = _ffprobe_stream(
        str(path), ffprobe
    )
    assert the_streams
    assert (header.codec, header.sample_rate, header.channels) == (
        probed_codec,
        rate,
        probed_channels,
    )
    assert header.duration_s == pytest.approx(duration_s, abs=1e-6)
    assert probe_audio(path).duration_s == N_SAMPLES / 48000  # exact, from the header


def test_a_wav_cut_short_has_its_real_length(tmp_path: Path) -> None:
    path = _ffmpeg_wav(tmp_path / "cut.wav", "-c:a", "pcm_s16le")
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) - 2 * 1000])  # 1,000 samples lost off the end
    header = read_wav_header(path)
    assert header is not None and header.n_samples == N_SAMPLES - 1000
    # What its header declares is kept: the run reports the file as cut short.
    assert header.declared_samples == N_SAMPLES
    probed = probe_audio(path)
    assert (probed.duration_s, probed.declared_duration_s) == (
        (N_SAMPLES - 1000) / 48000,
        N_SAMPLES / 48000,
    )
    path.write_bytes(whole)
    assert read_wav_header(path) == replace(header, n_samples=N_SAMPLES, declared_samples=None)


def _bits_in_s32_wav(
    path: Path,
    samples: np.ndarray,
    rate: int,
    *,
    valid_bits: int,
    extensible: bool,
    before_data: bytes = b"",
) -> Path:
    """Values of ``valid_bits`` bits in 32-bit words, behind a WAVE_FORMAT_EXTENSIBLE header
    that says so, or a plain one (32-bit PCM); ``before_data``: more chunks."""
    channels = samples.shape[1]
    words = np.round(samples * 2 ** (valid_bits - 1)).astype("<i4") << (32 - valid_bits)
    align = 4 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, 32)
    if extensible:
        fmt = struct.pack("<H", 0xFFFE) + fmt[2:] + struct.pack("<HHI", 22, valid_bits, 0)
        fmt += struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")  # PCM
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + before_data
    body += b"data" + struct.pack("<I", words.nbytes) + words.tobytes()
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.mark.parametrize(
    ("channels", "valid_bits", "before_data"),
    [
        (2, 24, b""),
        (4, 24, b""),
        (4, 16, b""),  # ffmpeg: twice as many 16-bit samples
        (4, 20, b""),
        # A large bext past the first 64 KiB read: the data chunk is looked for beyond it.
        (2, 16, b"bext" + struct.pack("<I", 90_001) + bytes(90_002)),
    ],
)
def test_fewer_valid_bits_than_stored_are_read_here_whatever_the_channels(
    tmp_path, channels, valid_bits, before_data
) -> None:
    """ffmpeg takes its codec from the valid bits (24 in 32 as 24-bit float: NaNs and noise;
    16 in 32 as 16-bit, twice the length): such a file is read in process for any channel
    count, to the samples ffmpeg gives the same words under a plain header."""
    samples = np.repeat(field_like(3 * 44100, 44100)[:, :1], channels, axis=1) * 0.5
    made = functools.partial(_bits_in_s32_wav, samples=samples, rate=44100, valid_bits=valid_bits)
    extensible = made(tmp_path / "ext.wav", extensible=True, before_data=before_data)
    header = read_wav_header(extensible)
    assert header is not None and (header.codec, header.valid_bits) == ("pcm_s32le", valid_bits)
    assert header.ffmpeg_misreads and header.n_samples == 3 * 44100
    assert probe_audio(extensible).duration_s == 3.0
    got = decode_file(extensible, sample_rate=16000)
    expected = decode_file(made(tmp_path / "plain.wav", extensible=False), sample_rate=16000)
    assert np.isfinite(got).all() and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 4])
def test_a_wav_past_4_gib_whose_size_wrapped_is_read_whole(tmp_path, channels) -> None:
    """A writer that kept the data size in 32 bits: the file holds 4 GiB more than it says.
    (A sparse file: its audio is silence, and takes no disk.)"""
    rate, align = 48000, 2 * channels
    true_bytes = 2**32 + rate * align * 10  # ten seconds past the wrap
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * align, align, 16)
    head = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt
    head += b"data" + struct.pack("<I", true_bytes % 2**32)
    path = tmp_path / "long.wav"
    with path.open("wb") as file:
        file.write(b"RIFF" + struct.pack("<I", (len(head) + true_bytes) % 2**32) + head)
        file.truncate(8 + len(head) + true_bytes)
    info = probe_audio(path)
    assert info.duration_s == pytest.approx(true_bytes / align / rate)
    header = read_wav_header(path)
    assert header is not None and header.wrapped and header.declared_samples is None
    last = plan_chunks(info, spec(), frames_per_chunk=4)[-1]  # read in process, past the wrap
    decoded = decode_chunk(info, last, spec=spec())
    frames = spec().n_complete_frames(true_bytes // align // 3)  # at 16 kHz
    assert decoded.first_frame + decoded.n_frames == frames and not decoded.samples.any()


def _ffmpeg_floats(path: Path, channels: int) -> np.ndarray:
    """ffmpeg's own float32 samples of ``path`` (``aformat=sample_fmts=flt``), interleaved."""
    pcm = subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-i", str(path), "-af", "aformat=sample_fmts=flt"),
            *("-f", "f32le", "-c:a", "pcm_f32le", "-"),
        ],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(pcm, np.float32).reshape(-1, channels)


@pytest.mark.parametrize(
    ("codec", "channels", "cut_bytes"),
    [("pcm_s24le", 2, 0), ("pcm_u8", 1, 0), ("pcm_s16le", 2, 4001), ("pcm_f64le", 1, 0)],
)
@pytest.mark.parametrize("block_samples", [1, 1000, 1 << 16])
def test_samples_in_blocks_are_ffmpegs_floats(
    tmp_path: Path, codec: str, channels: int, cut_bytes: int, block_samples: int
) -> None:
    """Blocks of any size join into ffmpeg's float samples, to the bit, a file cut short too."""
    path = _ffmpeg_wav(tmp_path / "a.wav", "-c:a", codec, channels=channels)
    if cut_bytes:  # the recorder stopped mid-sample
        path.write_bytes(path.read_bytes()[:-cut_bytes])
    header = read_wav_header(path)
    assert header is not None
    expected = _ffmpeg_floats(path, channels)
    start, stop = 12345, 3 * 48000 + 7
    blocks = list(
        iter_wav_samples(path, header, start=start, stop=stop, block_samples=block_samples)
    )
    assert all(1 <= len(b) <= block_samples and b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), expected[start:stop])
    whole = np.concatenate(list(iter_wav_samples(path, header, block_samples=block_samples)))
    np.testing.assert_array_equal(whole, expected)
    assert list(iter_wav_samples(path, header, start=len(expected) + 5)) == []  # past the end


def test_rf64_is_read_as_riff_is(tmp_path: Path) -> None:
    """RF64 (a Zoom's or Sound Devices' file past 4 GiB): ffmpeg's floats, a cut said cut."""
    path = _ffmpeg_wav(tmp_path / "a.wav", "-c:a", "pcm_s24le", "-rf64", "always", channels=2)
    header = read_wav_header(path)
    assert header is not None and (header.n_samples, header.declared_samples) == (N_SAMPLES, None)
    samples = np.concatenate(list(iter_wav_samples(path, header)))
    np.testing.assert_array_equal(samples, _ffmpeg_floats(path, 2))
    path.write_bytes(path.read_bytes()[: -2 * 3 * 1000])  # 1,000 samples lost off the end
    probed = probe_audio(path)
    assert probed.declared_duration_s == N_SAMPLES / 48000
    # Said with the decimals that tell the two lengths apart (7.0 of 7.0 s said nothing).
    assert _cut_short(probed) == "cut short: its header declares 7.01 s, the file holds 6.99 s"
    cut = read_wav_header(path)
    assert cut is not None and cut.declared_samples == N_SAMPLES
    assert cut.n_samples == N_SAMPLES - 1000


@pytest.mark.parametrize("channels", [1, 4])
def test_an_rf64_its_writer_never_sized_is_read_to_its_end(tmp_path: Path, channels) -> None:
    """ffmpeg's own RF64 to a pipe (ds64 sizes 0, data 0xFFFFFFFF), as a recorder stopped
    mid-file leaves one: what it holds, where ffmpeg decodes nothing (any channel count)."""
    plain = _ffmpeg_wav(tmp_path / "plain.wav", "-c:a", "pcm_s16le", channels=channels)
    piped = tmp_path / "piped.wav"
    with piped.open("wb") as out:
        subprocess.run(
            [
                *("ffmpeg", "-v", "error", "-i", str(plain), "-c:a", "pcm_s16le"),
                *("-rf64", "always", "-f", "wav", "-"),
            ],
            stdout=out,
            check=True,
        )
    assert piped.read_bytes()[:4] == b"RF64"
    header = read_wav_header(piped)
    assert header is not None and header.rf64 and header.ffmpeg_misreads
    assert (header.n_samples, header.declared_samples) == (N_SAMPLES, None)
    assert probe_audio(piped).duration_s == N_SAMPLES / 48000
    np.testing.assert_array_equal(
        decode_file(piped, sample_rate=16000), decode_file(plain, sample_rate=16000)
    )


def test_the_walk_to_the_data_chunk_gives_up_after_so_many_chunks(tmp_path: Path) -> None:
    """A chain misaligned (an odd chunk without its pad byte, then silence) would be walked 8
    bytes at a time through the whole file, for each chunk: left to ffprobe after so many."""
    from buzzdask.wav import MOST_CHUNKS

    path = _ffmpeg_wav(tmp_path / "a.wav", "-c:a", "pcm_s16le")
    whole = path.read_bytes()
    data = whole.index(b"data")

    def with_chunks_before_data(count: int) -> WavHeader | None:
        path.write_bytes(whole[:data] + b"junk\x00\x00\x00\x00" * count + whole[data:])
        return read_wav_header(path)

    few = with_chunks_before_data(100)
    assert few is not None and few.n_samples == N_SAMPLES
    assert with_chunks_before_data(MOST_CHUNKS) is None


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("adpcm", lambda p: _ffmpeg_wav(p, "-c:a", "adpcm_ms")),
        ("mp3 named .wav", lambda p: _ffmpeg_wav(p, "-c:a", "libmp3lame", "-f", "mp3")),
        ("header only", lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")),
    ],
)
def test_anything_else_is_left_to_ffprobe(tmp_path: Path, name: str, make) -> None:
    path = tmp_path / "other.wav"
    make(path)
    assert read_wav_header(path) is None
