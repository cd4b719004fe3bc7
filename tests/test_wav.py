"""WAV headers read in process say what ffprobe says, exactly; anything else is left to ffprobe."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from buzzdask.decode import _ffprobe_stream, probe_audio
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.wav import read_wav_header
from tests.conftest import requires_ffmpeg

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
    ],
)
def test_header_says_what_ffprobe_says(tmp_path: Path, codec: str, channels: int, extra) -> None:
    path = _ffmpeg_wav(tmp_path / "a.wav", "-c:a", codec, *extra, channels=channels)
    header = read_wav_header(path)
    assert header is not None
    assert header.n_samples == N_SAMPLES
    ffprobe = find_ffmpeg().ffprobe
    assert ffprobe is not None
    probed_codec, rate, probed_channels, duration_s = _ffprobe_stream(str(path), ffprobe)
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


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("rf64", lambda p: _ffmpeg_wav(p, "-c:a", "pcm_s16le", "-rf64", "always")),
        ("adpcm", lambda p: _ffmpeg_wav(p, "-c:a", "adpcm_ms")),
        ("mp3 named .wav", lambda p: _ffmpeg_wav(p, "-c:a", "libmp3lame", "-f", "mp3")),
        ("header only", lambda p: p.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")),
    ],
)
def test_anything_else_is_left_to_ffprobe(tmp_path: Path, name: str, make) -> None:
    path = tmp_path / "other.wav"
    make(path)
    assert read_wav_header(path) is None
