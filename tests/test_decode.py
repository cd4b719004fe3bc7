"""Decoding reproduces buzzdetect's preprocessing, and chunked decodes equal the whole file."""

import functools
import io
import subprocess
import threading
import tracemalloc
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from buzzdask import DecodeError, decode_file, probe_audio
from buzzdask.buffers import SAMPLE_ALIGNMENT
from buzzdask.decode import (
    _read_samples,
    _run_ffmpeg,
    chunks_after,
    decode_chunk,
    plan_chunks,
    preprocess_filters,
)
from buzzdask.errors import DecoderStopped, ParameterError
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.staging import decode_chunk_staged
from tests.conftest import field_like, requires_ffmpeg, write_wav
from tests.test_frames import spec

pytestmark = requires_ffmpeg


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def soxr_mean(channels: np.ndarray, rate: int) -> np.ndarray:
    soxr = pytest.importorskip("soxr")
    return soxr.resample(channels.mean(axis=1), rate, 16000, quality="HQ").astype(np.float32)


def test_a_sample_rate_that_is_not_a_positive_integer_is_refused(tmp_path: Path) -> None:
    # Before: ZeroDivisionError, soxr's ValueError or a TypeError, after the file was probed.
    path = write_wav(tmp_path / "x.wav", np.zeros(800), 8000)
    for rate in (0, -1, 16000.5, True):
        with pytest.raises(ParameterError, match=rf"sample_rate={rate!r} must be an integer > 0"):
            decode_file(path, sample_rate=rate)  # type: ignore[arg-type]
    assert len(decode_file(path, sample_rate=np.int64(16000))) == 1600


@pytest.mark.parametrize(
    ("channels", "rate"), [(2, 44100), (4, 48000), (1, 32000), (1, 8000), (6, 96000)]
)
def test_mean_of_channels_then_soxr(tmp_path: Path, channels: int, rate: int) -> None:
    source = field_like(5 * rate + 123, rate, channels, seed=channels)
    path = write_wav(tmp_path / "x.wav", source, rate)
    pcm = np.round(source * 32767) / 32768  # what the 16-bit file holds, as soundfile reads it
    expected = soxr_mean(pcm, rate)
    decoded = decode_file(path, sample_rate=16000)
    assert len(decoded) == len(expected)
    assert relative_rms(decoded, expected) <= 1e-5


def test_plain_ffmpeg_downmix_is_not_the_model_input(tmp_path: Path) -> None:
    """Guards the rule: `-ac 1 -ar 16000` gives different samples than the model was trained on."""
    rate = 44100
    source = field_like(3 * rate, rate, 2, seed=7)
    path = write_wav(tmp_path / "stereo.wav", source, rate)
    plain = np.frombuffer(
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-i",
                str(path),
                "-ac",
                "1",
                "-ar",
                "16000",
                "-f",
                "f32le",
                "-",
            ],
            capture_output=True,
            check=True,
        ).stdout,
        np.float32,
    )
    expected = soxr_mean(np.round(source * 32767) / 32768, rate)
    n = min(len(plain), len(expected))
    assert relative_rms(plain[:n], expected[:n]) > 0.05
    assert relative_rms(decode_file(path, sample_rate=16000), expected) <= 1e-5


def test_input_at_model_rate_is_not_resampled(tmp_path: Path) -> None:
    source = field_like(40000, 16000, 1, seed=3)[:, 0]
    path = write_wav(tmp_path / "mono16k.wav", source, 16000)
    decoded = decode_file(path, sample_rate=16000)
    np.testing.assert_array_equal(decoded, (np.round(source * 32767) / 32768).astype(np.float32))


def test_filter_chain_names_the_rule() -> None:
    assert preprocess_filters(2, 16000) == (
        "aformat=sample_fmts=flt,pan=mono|c0=0.5*c0+0.5*c1,aresample=osr=16000:resampler=soxr,"
        "asetnsamples=n=16384:p=0"
    )
    assert "pan" not in preprocess_filters(1, 16000)


@pytest.mark.parametrize("suffix", [".wav", ".mp3", ".flac", ".ogg", ".m4a"])
@pytest.mark.parametrize("frames_per_chunk", [1, 3, 7])
def test_chunks_equal_the_whole_file(make_audio, suffix: str, frames_per_chunk: int) -> None:
    path = make_audio(f"long{suffix}", n_samples=44100 * 12 + 777, rate=44100, channels=2)
    info = probe_audio(path)
    whole = decode_file(path, sample_rate=16000)
    frame_spec = spec()
    total = 0
    plans = deque(plan_chunks(info, frame_spec, frames_per_chunk=frames_per_chunk))
    while plans:
        plan = plans.popleft()
        chunk = decode_chunk(info, plan, spec=frame_spec, seekable_codecs=("mp3", "flac", "pcm_*"))
        if not plans:  # the estimate may be short: a full last chunk is followed by more
            plans.extend(chunks_after(plan, chunk.n_frames, frames_per_chunk=frames_per_chunk))
        first = plan.first_frame * frame_spec.hop_length
        reference = whole[first : first + len(chunk.samples)]
        assert len(chunk.samples) == len(reference)
        if len(reference):
            assert relative_rms(chunk.samples, reference) <= 1e-5, plan
        total += chunk.n_frames
    assert total == frame_spec.n_complete_frames(len(whole))


@pytest.mark.parametrize("suffix", [".wav", ".mp3"])
@pytest.mark.parametrize("rate", [44100, 48000])
def test_chunks_start_where_the_scorer_reads_them_in_place(
    make_audio, suffix: str, rate: int
) -> None:
    # In process (WAV) and from ffmpeg (MP3): TensorFlow takes such a buffer without a copy.
    path = make_audio(f"aligned{suffix}", n_samples=rate * 6, rate=rate, channels=2)
    info = probe_audio(path)
    for plan in plan_chunks(info, spec(), frames_per_chunk=2):
        chunk = decode_chunk(info, plan, spec=spec())
        assert chunk.samples.ctypes.data % SAMPLE_ALIGNMENT == 0, plan


@pytest.mark.parametrize("expected", [None, 10, 300_000])
def test_samples_read_past_the_estimate_stay_whole_and_aligned(expected: int | None) -> None:
    # More than the estimate (a whole-file decode, or a probed length too short) grows the buffer.
    sent = np.arange(1_000_003, dtype=np.float32)
    with subprocess.Popen(
        ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
    ) as process:
        assert process.stdin is not None and isinstance(process.stdout, io.RawIOBase)
        stdin = process.stdin

        def send() -> None:
            with stdin:
                stdin.write(sent.tobytes())

        writer = threading.Thread(target=send)
        writer.start()
        samples = _read_samples(process.stdout, expected)
        writer.join()
    np.testing.assert_array_equal(samples, sent)
    assert samples.ctypes.data % SAMPLE_ALIGNMENT == 0


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"this is not audio at all" * 40, "cannot read it as audio")],
)
def test_unreadable_files_name_the_file_and_reason(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "bad.mp3"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as raised:
        probe_audio(path)
    assert raised.value.path == str(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="cannot read the file"):
        probe_audio(tmp_path / "nope.wav")


@pytest.mark.parametrize("suffix", [".wav", ".mp3"])
@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("delete", "cannot read the file: No such file or directory"),
        ("empty", "empty file (0 bytes)"),
    ],
)
def test_a_file_changed_after_its_probe_is_said_so(
    make_audio, suffix: str, change: str, reason: str
) -> None:
    """Moved, deleted or emptied mid-run (a sync tool, a scratch purge): not "failed to decode"."""
    path = make_audio(f"gone{suffix}", n_samples=16000 * 3)
    info = probe_audio(path)
    if change == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(DecodeError) as raised:
        decode_chunk(info, plan_chunks(info, spec(), frames_per_chunk=2)[0], spec=spec())
    assert (raised.value.path, raised.value.reason, raised.value.stderr) == (str(path), reason, "")


# The real ffmpeg, reading at the audio's own pace (-re) so that it is still decoding.
_SIGNALLED_FFMPEG = (
    '#!/bin/sh\nffmpeg -re "$@" & pid=$!\nsleep 0.5\nkill -{signal} $pid\nwait $pid\nexit $?\n'
)


@pytest.mark.parametrize(
    ("script", "reason", "stopped"),
    [
        # The kernel's out-of-memory killer leaves ffmpeg no last words.
        ("#!/bin/sh\nkill -KILL $$\n", "ffmpeg was killed by SIGKILL (out of memory?)", True),
        # ffmpeg catches SIGINT and SIGTERM (a job's end) and exits 255 without a word.
        *[
            (_SIGNALLED_FFMPEG.format(signal=name), "ffmpeg was stopped by SIGINT or SIGTERM", True)
            for name in ("INT", "TERM")
        ],
        # A crash, which the file may cause: not decoded again.
        ("#!/bin/sh\nkill -SEGV $$\n", "ffmpeg was killed by SIGSEGV", False),
    ],
    ids=["SIGKILL", "SIGINT", "SIGTERM", "SIGSEGV"],
)
@pytest.mark.parametrize("staged", [False, True], ids=["in-place", "staged"])
def test_an_ffmpeg_stopped_by_a_signal_says_so(
    make_audio, tmp_path: Path, script: str, reason: str, stopped: bool, staged: bool
) -> None:
    """The error names the signal; stopped from outside, it is not the file's fault (the run
    decodes it again), from a node-local copy too."""
    path = make_audio("a.mp3", n_samples=16000 * 3)
    info = probe_audio(path)
    wrapper = tmp_path / "ffmpeg"
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    decode = (
        functools.partial(decode_chunk_staged, staging_directory=str(tmp_path / "local"))
        if staged
        else decode_chunk
    )
    with pytest.raises(DecodeError) as raised:
        decode(
            info,
            plan_chunks(info, spec(), frames_per_chunk=3)[0],
            spec=spec(),
            ffmpeg_cmd=str(wrapper),
        )
    assert raised.value.path == str(path) and raised.value.reason.startswith(reason)
    assert isinstance(raised.value, DecoderStopped) == stopped


def _generated_wav(path: Path, *, codec: str, channels: int, rate: int, n_samples: int) -> Path:
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-y", "-f", "lavfi"),
            *("-i", f"anoisesrc=r={rate}:a=0.3,aformat=channel_layouts={channels}c"),
            *("-af", f"atrim=end_sample={n_samples}", "-c:a", codec, str(path)),
        ],
        check=True,
    )
    return path


@pytest.mark.parametrize(
    ("codec", "channels", "rate"),
    [
        ("pcm_s16le", 1, 48000),  # AudioMoth
        ("pcm_s16le", 2, 44100),  # Song Meter
        ("pcm_u8", 1, 32000),
        ("pcm_s24le", 2, 48000),
        ("pcm_s32le", 1, 22050),
        ("pcm_f32le", 2, 96000),
        ("pcm_f64le", 1, 44100),
        ("pcm_s16le", 1, 16000),  # at the model's rate: not resampled
    ],
)
def test_plain_wavs_decode_in_process_to_ffmpegs_bits(
    tmp_path: Path, codec: str, channels: int, rate: int
) -> None:
    """A WAV is read and resampled in process: ffmpeg's chain to the bit, and no ffmpeg started."""
    path = _generated_wav(
        tmp_path / "a.wav", codec=codec, channels=channels, rate=rate, n_samples=13 * rate + 777
    )
    info = probe_audio(path)
    by_ffmpeg, _ = _run_ffmpeg(info, sample_rate=16000, ffmpeg_cmd=find_ffmpeg().ffmpeg)
    whole = decode_file(path, sample_rate=16000)
    np.testing.assert_array_equal(whole, by_ffmpeg)
    frame_spec = spec()
    frames = 0
    for plan in plan_chunks(info, frame_spec, frames_per_chunk=3):
        chunk = decode_chunk(info, plan, spec=frame_spec, ffmpeg_cmd="/no/such/ffmpeg")
        first = plan.first_frame * frame_spec.hop_length
        np.testing.assert_allclose(
            chunk.samples, whole[first : first + len(chunk.samples)], atol=1e-6
        )
        frames += chunk.n_frames
    assert frames == frame_spec.n_complete_frames(len(whole))


def test_a_wav_chunk_never_holds_its_input_whole(tmp_path: Path) -> None:
    """A high-rate WAV's input goes to the resampler block by block: memory is the output's.

    Twenty seconds of 192 kHz stereo (a bat detector's): 15 MB of samples, 31 MB as floats,
    1.3 MB of output; reading it whole, as before, allocated those 46 MB at once.
    """
    path = _generated_wav(
        tmp_path / "bat.wav", codec="pcm_s16le", channels=2, rate=192000, n_samples=20 * 192000
    )
    info = probe_audio(path)
    (plan,) = plan_chunks(info, spec(), frames_per_chunk=100)
    tracemalloc.start()
    try:
        chunk = decode_chunk(info, plan, spec=spec(), ffmpeg_cmd="/no/such/ffmpeg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chunk.n_frames == 20
    input_floats = 20 * 192000 * 2 * 4
    assert peak < 4 * chunk.samples.nbytes + 2**20 < input_floats / 4


def test_a_wav_cut_short_decodes_what_it_holds_as_ffmpeg_does(tmp_path: Path) -> None:
    path = _generated_wav(
        tmp_path / "cut.wav", codec="pcm_s16le", channels=2, rate=44100, n_samples=9 * 44100
    )
    path.write_bytes(path.read_bytes()[:-4001])  # the recorder stopped mid-sample
    info = probe_audio(path)
    by_ffmpeg, _ = _run_ffmpeg(info, sample_rate=16000, ffmpeg_cmd=find_ffmpeg().ffmpeg)
    np.testing.assert_array_equal(decode_file(path, sample_rate=16000), by_ffmpeg)


def test_wavs_of_more_channels_go_through_ffmpeg(tmp_path: Path) -> None:
    path = _generated_wav(
        tmp_path / "six.wav", codec="pcm_s16le", channels=6, rate=48000, n_samples=48000 * 3
    )
    info = probe_audio(path)
    (plan,) = plan_chunks(info, spec(), frames_per_chunk=10)
    with pytest.raises(DecodeError, match="cannot run"):
        decode_chunk(info, plan, spec=spec(), ffmpeg_cmd="/no/such/ffmpeg")
