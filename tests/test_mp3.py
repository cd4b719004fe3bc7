"""MP3 headers read in process say what ffprobe says; anything else is left to ffprobe."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pytest

from buzzdask.decode import _ffprobe_stream, decode_file, probe_audio
from buzzdask.errors import DecodeError
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.mp3 import read_mp3_header
from tests.conftest import requires_ffmpeg, requires_shared

pytestmark = requires_ffmpeg
SECONDS = 7.3


def _mp3(path: Path, *options: str, rate: int = 44100, channels: int = 2) -> Path:
    """Noise encoded by ffmpeg's LAME with ``options`` (``-f mp3`` whatever the name)."""
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-y", "-f", "lavfi"),
            *("-i", f"anoisesrc=r={rate}:a=0.1:d={SECONDS},aformat=channel_layouts={channels}c"),
            *("-c:a", "libmp3lame", *options, "-f", "mp3", str(path)),
        ],
        check=True,
    )
    return path


def _ffprobe(path: Path) -> tuple[str, int, int, float | None]:
    ffprobe = find_ffmpeg().ffprobe
    assert ffprobe is not None
    codec, rate, channels, duration_s, the_streams = _ffprobe_stream(str(path), ffprobe)
    assert the_streams  # one stream: the duration is its own
    return codec, rate, channels, duration_s


#: Sample rate, channels and LAME's options: MPEG-1, 2 and 2.5, mono and stereo, CBR and VBR.
ENCODINGS = pytest.mark.parametrize(
    ("rate", "channels", "options"),
    [
        (44100, 2, ("-b:a", "128k")),  # the lab's recorders
        (48000, 2, ("-b:a", "192k", "-metadata", "title=Bees", "-id3v2_version", "3")),
        (32000, 1, ("-q:a", "4")),  # VBR
        (22050, 1, ("-b:a", "64k")),  # MPEG-2
        (8000, 1, ("-b:a", "16k")),  # MPEG-2.5
        (11025, 2, ("-b:a", "32k", "-id3v2_version", "0")),
    ],
)


@ENCODINGS
def test_header_says_what_ffprobe_says(
    tmp_path: Path, rate: int, channels: int, options: tuple[str, ...]
) -> None:
    path = _mp3(tmp_path / "a.mp3", *options, rate=rate, channels=channels)
    header = read_mp3_header(path)
    assert header is not None
    codec, probed_rate, probed_channels, duration_s = _ffprobe(path)
    assert (header.codec, header.sample_rate, header.channels) == (
        codec,
        probed_rate,
        probed_channels,
    )
    assert header.duration_s == pytest.approx(duration_s, abs=1e-5)
    # No process: probing works with executables that do not exist.
    tools = dataclasses.replace(
        find_ffmpeg(), ffprobe="/nonexistent/ffprobe", ffmpeg="/nonexistent"
    )
    probed = probe_audio(path, tools=tools)
    assert (probed.codec, probed.sample_rate, probed.channels) == (codec, rate, channels)
    assert probed.duration_s == header.duration_s
    assert probed.declared_duration_s is None  # the whole stream is there


@ENCODINGS
def test_an_mp3_cut_short_says_what_its_header_declares(
    tmp_path: Path, rate: int, channels: int, options: tuple[str, ...]
) -> None:
    """A copy cut short: its Xing/Info header's byte count says how much is missing. The
    length it holds is in proportion: an estimate, within a few frames (72 ms each at 8 kHz)
    of what ffmpeg decodes."""
    path = _mp3(tmp_path / "a.mp3", *options, rate=rate, channels=channels)
    whole = read_mp3_header(path)
    assert whole is not None and whole.declared_duration_s is None
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 6 // 10])
    cut = read_mp3_header(path)
    assert cut is not None and cut.declared_duration_s == whole.duration_s
    decoded_s = len(decode_file(path, sample_rate=rate)) / rate
    assert cut.duration_s == pytest.approx(decoded_s, abs=0.25)
    assert probe_audio(path).declared_duration_s == whole.duration_s


@requires_shared
def test_a_lame_header_gives_the_decoded_length(shared_dir: Path) -> None:
    """LAME's delay and padding are taken off: the length ffmpeg decodes, to the sample."""
    path = shared_dir / "data" / "audio_in" / "testbuzz.mp3"
    header = read_mp3_header(path)
    assert header is not None and (header.sample_rate, header.channels) == (32000, 1)
    decoded = decode_file(path, sample_rate=32000)
    assert header.duration_s == len(decoded) / 32000
    _, _, _, ffprobe_s = _ffprobe(path)
    assert ffprobe_s is not None and ffprobe_s > header.duration_s  # ffprobe keeps the padding


def _id3v2(payload_bytes: int, *, footer: bool) -> bytes:
    """An ID3v2.4 tag of zero padding, its size syncsafe, with or without a footer."""
    size = bytes((payload_bytes >> shift) & 0x7F for shift in (21, 14, 7, 0))
    flags = 0x10 if footer else 0
    tag = b"ID3\x04\x00" + bytes([flags]) + size + bytes(payload_bytes)
    return tag + (b"3DI\x04\x00" + bytes([flags]) + size if footer else b"")


def test_audio_after_stacked_id3_tags_and_a_footer(tmp_path: Path) -> None:
    """Some players write two ID3v2 tags; a v2.4 tag may end with a footer."""
    plain = _mp3(tmp_path / "plain.mp3", "-b:a", "128k", "-id3v2_version", "0")
    tagged = tmp_path / "tagged.mp3"
    tagged.write_bytes(_id3v2(300, footer=True) + _id3v2(129, footer=False) + plain.read_bytes())
    assert read_mp3_header(tagged) == read_mp3_header(plain)
    assert read_mp3_header(plain) is not None
    np.testing.assert_array_equal(
        decode_file(tagged, sample_rate=16000), decode_file(plain, sample_rate=16000)
    )


def _mp2(path: Path) -> None:
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=r=44100:d={SECONDS}"),
            *("-c:a", "mp2", "-f", "mp2", str(path)),
        ],
        check=True,
    )


def _adts(path: Path) -> None:
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=r=44100:d={SECONDS}"),
            *("-c:a", "aac", "-f", "adts", str(path)),
        ],
        check=True,
    )


@pytest.mark.parametrize(
    ("name", "make", "codec"),
    [
        # Without a Xing/Info header the duration is an estimate: ffprobe's, as before.
        ("CBR without a Xing header", lambda p: _mp3(p, "-b:a", "128k", "-write_xing", "0"), "mp3"),
        ("VBR without a Xing header", lambda p: _mp3(p, "-q:a", "7", "-write_xing", "0"), "mp3"),
        ("MP2", _mp2, "mp2"),
        ("AAC in ADTS", _adts, "aac"),
        (
            "frame sync, then noise",
            lambda p: p.write_bytes(b"\xff\xfb\x90\x64" + bytes(range(256)) * 64),
            None,
        ),
        ("text", lambda p: p.write_text("not audio\n" * 500), None),
    ],
)
def test_anything_else_is_left_to_ffprobe(
    tmp_path: Path, name: str, make, codec: str | None
) -> None:
    path = tmp_path / "other.mp3"
    make(path)
    assert read_mp3_header(path) is None
    if codec is None:  # ffprobe says why, as it always did
        with pytest.raises(DecodeError, match="ffprobe cannot read it as audio"):
            probe_audio(path)
        return
    probed = probe_audio(path)
    assert probed.codec == codec
    assert probed.duration_s == _ffprobe(path)[3]
