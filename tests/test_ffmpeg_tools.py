"""ffmpeg with no module: the system's if it has soxr, else imageio-ffmpeg's; ffprobe optional."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pandas as pd
import pytest

import buzzdask
from buzzdask import DecodeError, ParameterError, decode_file, probe_audio
from buzzdask.ffmpeg_tools import FFmpegTools, find_ffmpeg
from tests.conftest import CLASSES, field_like, requires_ffmpeg, write_wav

pytestmark = requires_ffmpeg

WHEEL = os.path.realpath(imageio_ffmpeg.get_ffmpeg_exe())


@pytest.fixture(scope="module")
def system() -> FFmpegTools:
    """The system ffmpeg and ffprobe (Debian's, with soxr)."""
    tools = find_ffmpeg()
    assert tools.source == "system" and tools.ffprobe is not None
    return tools


@pytest.fixture(scope="module")
def wheel() -> FFmpegTools:
    return find_ffmpeg(ffmpeg=WHEEL)


@pytest.fixture
def no_ffmpeg_path(tmp_path: Path) -> dict[str, str]:
    """This environment with a PATH that holds neither ffmpeg nor ffprobe."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return {**os.environ, "PATH": str(empty)}


def test_system_ffmpeg_first(system: FFmpegTools) -> None:
    assert system.ffmpeg == os.path.abspath(shutil.which("ffmpeg") or "")
    assert system.ffprobe == os.path.join(os.path.dirname(system.ffmpeg), "ffprobe")
    version = subprocess.run([system.ffmpeg, "-version"], capture_output=True, text=True).stdout
    assert version.startswith(f"ffmpeg version {system.version} ")


def test_without_ffmpeg_on_path_the_wheel_is_used(monkeypatch, no_ffmpeg_path) -> None:
    monkeypatch.setenv("PATH", no_ffmpeg_path["PATH"])
    tools = find_ffmpeg()
    assert tools.source == "imageio-ffmpeg"
    assert os.path.realpath(tools.ffmpeg) == WHEEL and os.path.isabs(tools.ffmpeg)
    assert tools.ffprobe is None  # the wheel has none: ffmpeg probes
    assert tools.version == imageio_ffmpeg.get_ffmpeg_version()
    assert tools.as_metadata() == {
        "path": tools.ffmpeg,
        "version": tools.version,
        "source": "imageio-ffmpeg",
        "ffprobe": None,
    }


def test_a_configured_executable_is_checked(tmp_path: Path) -> None:
    missing = str(tmp_path / "bin" / "ffmpeg")
    with pytest.raises(ParameterError, match=r"buzzdask.ffmpeg='.*/bin/ffmpeg' is neither an exec"):
        find_ffmpeg(ffmpeg=missing)
    with pytest.raises(ParameterError, match=r"buzzdask.ffprobe='no-such-ffprobe' is neither"):
        find_ffmpeg(ffprobe="no-such-ffprobe")
    # A real executable that is not ffmpeg.
    with pytest.raises(ParameterError, match=r"does not answer as ffmpeg; set it to an ffmpeg"):
        find_ffmpeg(ffmpeg=sys.executable)
    # Another program as ffprobe (ffmpeg itself, mixed up): every file it probed failed, each
    # as if it were not audio.
    for not_ffprobe in (sys.executable, "ffmpeg"):
        with pytest.raises(ParameterError, match=r"does not answer as ffprobe; set it to an ffp"):
            find_ffmpeg(ffprobe=not_ffprobe)
    configured = find_ffmpeg(ffmpeg="ffmpeg", ffprobe="ffprobe")
    assert configured.source == "configured" and os.path.isabs(configured.ffmpeg)
    assert configured.ffprobe == shutil.which("ffprobe")


def test_a_missing_configured_ffmpeg_fails_before_any_work(
    tmp_path: Path, tiny_model: Path, tiny_embedder: Path
) -> None:
    import dask.config

    audio = write_wav(tmp_path / "a.wav", field_like(16000 * 3, 16000), 16000)
    output = tmp_path / "results"
    with (
        dask.config.set({"buzzdask.ffmpeg": str(tmp_path / "nope" / "ffmpeg")}),
        pytest.raises(ParameterError, match=r"buzzdask.ffmpeg='.*nope/ffmpeg' is neither"),
    ):
        buzzdask.analyze(audio, tiny_model, output=output, embedder=str(tiny_embedder))
    assert not output.exists()


# Formats field recordings come in, and channel layouts ffmpeg names or counts.
FORMATS = [
    ("stereo.mp3", 44100, 2),
    ("mono.wav", 16000, 1),
    ("stereo.flac", 48000, 2),
    ("stereo.m4a", 44100, 2),
    ("stereo.ogg", 44100, 2),
    ("mono.opus", 48000, 1),
    ("three.wav", 32000, 3),
    ("six.wav", 48000, 6),
]


@pytest.mark.parametrize(("name", "rate", "channels"), FORMATS)
def test_probing_without_ffprobe_equals_ffprobe(
    make_audio, system: FFmpegTools, wheel: FFmpegTools, name: str, rate: int, channels: int
) -> None:
    path = make_audio(name, n_samples=rate * 7 + 321, rate=rate, channels=channels)
    with_ffprobe = probe_audio(path, tools=system)
    without = probe_audio(path, tools=dataclasses.replace(system, ffprobe=None))
    assert (with_ffprobe.sample_rate, with_ffprobe.channels) == (rate, channels)
    # ffmpeg prints the duration to 0.01 s (rounded): everything else is the same.
    assert dataclasses.replace(without, duration_s=with_ffprobe.duration_s) == with_ffprobe
    assert without.duration_s == pytest.approx(with_ffprobe.duration_s, abs=0.005 + 1e-9)
    # The wheel's ffmpeg (9.x) reads the same stream; its duration estimate may differ a little.
    by_wheel = probe_audio(path, tools=wheel)
    assert by_wheel.duration_s == pytest.approx(with_ffprobe.duration_s, abs=0.05)
    assert dataclasses.replace(by_wheel, duration_s=with_ffprobe.duration_s) == with_ffprobe


def bad_files(directory: Path, make_audio) -> dict[str, Path]:
    """Files that are not usable audio, as tests/test_analyze.py makes them."""
    good = make_audio("good.mp3", n_samples=4 * 44100, rate=44100, channels=2).read_bytes()
    files = {
        "not audio": directory / "not_audio.mp3",
        "truncated header": directory / "truncated_header.mp3",
        "image": directory / "image.png",
        "video only": directory / "video.mp4",
    }
    files["not audio"].write_text("a text file with an audio extension\n" * 50)
    files["truncated header"].write_bytes(b"\x00" * 64 + good[len(good) // 2 :][:200])
    for key, source in [("image", "color=c=red:s=16x16:d=1"), ("video only", "testsrc=d=1")]:
        encode = ("ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-frames:v", "1")
        subprocess.run([*encode, str(files[key])], check=True)
    return files


def test_bad_files_give_the_same_reasons(
    tmp_path: Path, make_audio, system: FFmpegTools, wheel: FFmpegTools
) -> None:
    files = bad_files(tmp_path, make_audio)
    (tmp_path / "empty.mp3").write_bytes(b"")
    files["empty"] = tmp_path / "empty.mp3"
    expected = {
        "not audio": "cannot read it as audio",
        "truncated header": "cannot read it as audio",
        "image": "no audio stream",
        "video only": "no audio stream",
        "empty": "empty file",
    }
    for key, path in files.items():
        reasons = []
        for tools in (system, dataclasses.replace(system, ffprobe=None), wheel):
            with pytest.raises(DecodeError) as raised:
                probe_audio(path, tools=tools)
            assert raised.value.path == str(path)
            assert expected[key] in raised.value.reason, (key, tools)
            # The reason names the tool that tried: ffprobe, or ffmpeg without it.
            reasons.append(raised.value.reason.replace("ffprobe", "ffmpeg"))
        assert len(set(reasons)) == 1, (key, reasons)


def test_a_copy_cut_short_probes_the_same(make_audio, system: FFmpegTools) -> None:
    path = make_audio("long.mp3", n_samples=10 * 44100, rate=44100, channels=2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 6 // 10])
    with_ffprobe = probe_audio(path, tools=system)
    without = probe_audio(path, tools=dataclasses.replace(system, ffprobe=None))
    assert dataclasses.replace(without, duration_s=with_ffprobe.duration_s) == with_ffprobe


@pytest.mark.parametrize(
    ("name", "rate", "channels"),
    [("stereo.mp3", 44100, 2), ("mono.wav", 22050, 1), ("stereo.flac", 48000, 2)],
)
def test_the_wheel_decodes_as_the_system_ffmpeg(
    make_audio, system: FFmpegTools, wheel: FFmpegTools, name: str, rate: int, channels: int
) -> None:
    path = make_audio(name, n_samples=rate * 6 + 99, rate=rate, channels=channels)
    expected = decode_file(path, sample_rate=16000, tools=system)
    decoded = decode_file(path, sample_rate=16000, tools=wheel)
    assert len(decoded) == len(expected)
    np.testing.assert_allclose(decoded, expected, rtol=0, atol=1e-6)


ANALYZE = """
import sys
import buzzdask
audio, model, embedder, output = sys.argv[1:]
result = buzzdask.analyze(audio, model, output=output, embedder=embedder, progress=False)
assert result.ok, result.errors
"""


def test_analyze_without_ffmpeg_on_path_equals_the_system_ffmpeg(
    tmp_path: Path, make_audio, dask_client, tiny_model: Path, tiny_embedder: Path, no_ffmpeg_path
) -> None:
    """The client and its local workers find no ffmpeg on PATH: the wheel's decodes."""
    audio = tmp_path / "audio"
    # One chunk (600 s) per run, scored in one embedder call: nothing depends on timing.
    make_audio("stereo.mp3", n_samples=44100 * 20 + 7, rate=44100, channels=2, directory=audio)
    env = {
        **no_ffmpeg_path,
        "DASK_BUZZDASK__LOCAL_CLUSTER__N_WORKERS": "1",
        "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0",
    }
    wheel_output = tmp_path / "wheel"
    answer = subprocess.run(
        [
            *(sys.executable, "-c", textwrap.dedent(ANALYZE)),
            *(str(audio), str(tiny_model), str(tiny_embedder), str(wheel_output)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert answer.returncode == 0, answer.stderr[-3000:]
    system = buzzdask.analyze(
        audio,
        tiny_model,
        output=tmp_path / "system",
        client=dask_client,
        embedder=str(tiny_embedder),
        progress=False,
    )

    recorded = json.loads((wheel_output / "buzzdask.json").read_text())["ffmpeg"]
    assert recorded["source"] == "imageio-ffmpeg" and recorded["ffprobe"] is None
    assert os.path.realpath(recorded["path"]) == WHEEL
    assert recorded["version"] == imageio_ffmpeg.get_ffmpeg_version()
    assert system.metadata["ffmpeg"] == find_ffmpeg().as_metadata()
    assert system.metadata["ffmpeg"]["source"] == "system"

    columns = ["file", "start", "end", *(f"activation_{c}" for c in CLASSES)]
    by_wheel = pd.read_parquet(wheel_output / "scores", partitioning=None)[columns]
    by_system = system.to_pandas()[columns]
    assert len(by_system) >= 19
    pd.testing.assert_frame_equal(
        by_wheel.sort_values(["file", "start"], ignore_index=True),
        by_system,
        check_exact=False,
        rtol=0,
        atol=1e-6,
    )
