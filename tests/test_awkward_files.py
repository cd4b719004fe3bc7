"""Files whose duration estimate is wrong, and long files of codecs that cannot seek exactly.

MP3s without a Xing/VBRI header are timed from their first frame's bitrate: made here by
concatenating CBR streams of different bitrates, the estimate is several times too short or too
long. AAC (m4a) and Vorbis (ogg) cannot seek sample-exactly: each node decodes such a file once
into a decoded copy that its chunks slice. Every analysis is compared with one made in a single
chunk: the same frames, starts exact, none lost or read twice.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import buzzdask
from buzzdask import pcm_cache
from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    chunks_after,
    decode_chunk,
    decode_file,
    plan_chunks,
    probe_audio,
)
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.frames import FrameSpec
from buzzdask.inputs import InputFile
from buzzdask.ledger import FileLedger, HeadOutput
from buzzdask.progress import Progress
from buzzdask.write import OutputLayout, PartitionWriter
from tests.conftest import (
    assert_same_frames,
    field_like,
    requires_ffmpeg,
    wait_until,
    write_wav,
)
from tests.test_frames import spec

pytestmark = requires_ffmpeg

HOP_S = 0.96  # the tiny embedder's frame hop
ONE_CHUNK = 86_400.0  # chunk_seconds of the reference runs: every file in one chunk


def _mp3_of_parts(
    tmp_path: Path, name: str, parts: list[tuple[float, str]], *, seed: int = 0
) -> Path:
    """An MP3 without a Xing header: CBR parts of (seconds, bitrate) one after the other.

    Without the header the demuxer estimates the duration from the first frame's bitrate and
    the file's size; parts of other bitrates make that estimate wrong. Not below 96 kb/s: LAME
    then cuts the band the embedder's top mel bins hold, whose logs turn decoding's 1e-7
    rounding (a chunk's resampler starts mid-stream) into 1e-4 in activations.
    """
    rate = 44100
    target = tmp_path / "audio" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    pieces = []
    for i, (seconds, bitrate) in enumerate(parts):
        wav = write_wav(
            tmp_path / f".{name}.{i}.wav",
            field_like(int(seconds * rate), rate, 2, seed=seed + i),
            rate,
        )
        piece = tmp_path / f".{name}.{i}.mp3"
        subprocess.run(
            [
                *("ffmpeg", "-v", "error", "-y", "-i", str(wav), "-c:a", "libmp3lame"),
                *("-b:a", bitrate, "-write_xing", "0", "-id3v2_version", "0", str(piece)),
            ],
            check=True,
        )
        pieces.append(piece.read_bytes())
    target.write_bytes(b"".join(pieces))
    return target


def _frames(result: buzzdask.AnalysisResult) -> pd.DataFrame:
    frame = result.to_pandas()
    assert not frame.duplicated(["file", "start"]).any()
    return frame


def _assert_same_run(chunked: buzzdask.AnalysisResult, whole: buzzdask.AnalysisResult) -> None:
    """Same frames as the one-chunk run, starts exactly ``i * hop``, no error."""
    assert chunked.ok, chunked.errors
    assert whole.ok, whole.errors
    got, expected = _frames(chunked), _frames(whole)
    assert_same_frames(got, expected)
    np.testing.assert_array_equal(got["start"], expected["start"])  # exactly
    frame_spec = spec()
    for _, starts in got.groupby("file")["start"]:
        index = np.arange(len(starts))
        np.testing.assert_array_equal(
            starts, index * frame_spec.hop_length / frame_spec.sample_rate
        )


def _partition_rows(result: buzzdask.AnalysisResult) -> list[int]:
    return [pq.read_metadata(path).num_rows for path in sorted(result.dataset.rglob("*.parquet"))]


# -- plans --------------------------------------------------------------------------------------
def test_plans_are_bounded_and_follow_ons_continue_them() -> None:
    frame_spec = spec()
    info = AudioInfo("x.mp3", "mp3", 44100, 2, 10 * 0.96, 1, 1)
    plans = plan_chunks(info, frame_spec, frames_per_chunk=4)
    # The last chunk reads one frame past the estimate: full, it shows the audio goes on.
    assert plans == [ChunkPlan(0, 0, 4), ChunkPlan(1, 4, 4), ChunkPlan(2, 8, 5)]
    unknown = AudioInfo("x", "mp3", 8000, 1, None, 1, 1)
    assert plan_chunks(unknown, frame_spec, frames_per_chunk=4) == [ChunkPlan(0, 0, 5)]
    assert chunks_after(plans[-1], 2, frames_per_chunk=4) == []  # frames 8, 9: as estimated
    assert chunks_after(plans[-1], 5, frames_per_chunk=4, count=2) == [
        ChunkPlan(3, 13, 4),
        ChunkPlan(4, 17, 4),
    ]
    assert chunks_after(ChunkPlan(2, 8, None), 9, frames_per_chunk=4) == []
    assert chunks_after(plans[-1], 9, frames_per_chunk=4) == []  # an older open chunk: the end
    # An exact estimate that is a whole number of chunks does not fill the last one.
    exact = AudioInfo("x.wav", "pcm_s16le", 16000, 1, (7 * 15360 + 15360) / 16000, 1, 1)
    assert plan_chunks(exact, frame_spec, frames_per_chunk=4)[-1] == ChunkPlan(1, 4, 5)


def _ledger(tmp_path: Path, *, frames_per_chunk: int, done: dict[Any, Any]) -> FileLedger:
    layout = OutputLayout(tmp_path / "out")
    layout.root.mkdir(parents=True, exist_ok=True)
    writer = PartitionWriter(
        output=str(layout.root), spec=spec(), classes=("a",), thresholds=(), metadata_json="{}"
    )
    return FileLedger(
        heads=[HeadOutput(layout, writer, done)],
        spec=spec(),
        frames_per_chunk=frames_per_chunk,
        progress=Progress(enabled=False, verbose=False, files=1),
    )


def test_ledger_adds_chunks_while_the_last_comes_back_full(tmp_path: Path) -> None:
    """A file 4x longer than estimated: chunks follow in growing batches, totals corrected."""
    frame_spec = spec()
    seconds_per_frame = frame_spec.hop_length / frame_spec.sample_rate
    info = AudioInfo("a.mp3", "mp3", 44100, 2, 5 * seconds_per_frame, 1, 1)
    real_frames = 21
    ledger = _ledger(tmp_path, frames_per_chunk=2, done={})
    state = ledger.add(InputFile("a.mp3", "a.mp3"))
    assert state is not None
    todo = ledger.probed(state, info)
    assert [job.plan.index for job in todo] == [0, 1, 2]
    batches = []
    while todo:
        job = todo.pop(0)
        first = job.plan.first_frame
        n_frames = max(0, min(job.plan.n_frames or 0, real_frames - first))
        more = ledger.scored(job, (first, n_frames, ""))
        assert all(m.plan.n_frames == 2 for m in more)
        if more:
            batches.append(len(more))
            # The total reaches the end of every chunk queued: the bar is not at 100 % while
            # they are scored.
            queued_end_s = (more[-1].plan.first_frame + 2) * seconds_per_frame
            assert ledger.progress.audio_expected_s == pytest.approx(queued_end_s)
        todo += more
        if todo:
            assert ledger.progress.files_done == 0  # not done while chunks follow
    assert batches == [3, 6]  # doubling (capped at MOST_FOLLOW_ONS); chunk 11 came back empty
    assert state.frames == real_frames and not state.failed
    assert state.chunks == state.chunks_done == 12
    assert ledger.progress.audio_expected_s == pytest.approx(real_frames * seconds_per_frame)
    assert ledger.errors == []

    # A resume finds the follow-on chunks in the journal and redoes only what is missing.
    entries = [json.loads(line) for line in ledger.layout.journal.read_text().splitlines()]
    done = {(e["file"], e["chunk"]): e for e in entries if e["chunk"] != 9}
    for entry in done.values():
        if entry["frames"]:
            path = ledger.layout.partition("a.mp3", entry["chunk"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    resumed = _ledger(tmp_path, frames_per_chunk=2, done=done)
    state = resumed.add(InputFile("a.mp3", "a.mp3"))
    assert state is not None
    todo = resumed.probed(state, info)
    assert [job.plan.index for job in todo] == [9]
    assert resumed.scored(todo[0], (todo[0].plan.first_frame, 2, "")) == []
    assert state.frames == real_frames and state.chunks_done == state.chunks


def test_a_file_probed_long_that_decodes_to_nothing_is_said_damaged(tmp_path: Path) -> None:
    """Not "19.9 s of audio, shorter than one frame": its probe and its decoder disagree."""
    info = AudioInfo("a.wav", "pcm_s16le", 48000, 4, 19.896, 1, 1)
    ledger = _ledger(tmp_path, frames_per_chunk=100, done={})
    state = ledger.add(InputFile("a.wav", "a.wav"))
    assert state is not None
    (job,) = ledger.probed(state, info)
    ledger.scored(job, (0, 0, ""))
    assert [error["reason"] for error in ledger.errors] == [
        "decoded to less than one frame (0.96 s), though probed as 19.90 s of audio"
    ]


# -- MP3s whose duration estimate is wrong --------------------------------------------------------
@pytest.mark.parametrize(
    ("parts", "estimate"),
    [
        # 320 kb/s first: timed from it, the 96 kb/s rest looks 3.3x shorter than it is.
        ([(6.0, "320k"), (30.0, "96k")], "short"),
        # 96 kb/s first: the 320 kb/s rest looks 3.3x longer than it is.
        ([(6.0, "96k"), (30.0, "320k")], "long"),
    ],
)
def test_mp3_with_a_wrong_duration_estimate(
    run, tmp_path: Path, parts: list[tuple[float, str]], estimate: str
) -> None:
    path = _mp3_of_parts(tmp_path, f"{estimate}.mp3", parts)
    info = probe_audio(path)
    real_s = len(decode_file(path, sample_rate=16000)) / 16000
    assert info.duration_s is not None
    # The premise: ffprobe's estimate is far off.
    assert (info.duration_s < real_s / 2) if estimate == "short" else (info.duration_s > real_s * 2)

    chunk_seconds = 4 * HOP_S
    chunked = run(tmp_path / "audio", chunk_seconds=chunk_seconds, output=tmp_path / "chunked")
    whole = run(tmp_path / "audio", chunk_seconds=ONE_CHUNK, output=tmp_path / "whole")
    _assert_same_run(chunked, whole)
    assert len(_frames(chunked)) == spec().n_complete_frames(round(real_s * 16000))
    # No chunk outgrew its length: a short estimate no longer leaves one chunk to read the rest.
    assert max(_partition_rows(chunked)) <= 4 + 1  # the planned last chunk: one frame more
    assert chunked.summary["audio_hours"] == pytest.approx(len(_frames(chunked)) * HOP_S / 3600)


def test_mp3_short_estimate_resumes(run, tmp_path: Path) -> None:
    """A run killed after the follow-on chunks: resume redoes exactly what is missing."""
    _mp3_of_parts(tmp_path, "short.mp3", [(4.0, "320k"), (24.0, "96k")])
    chunk_seconds = 2 * HOP_S
    complete = run(tmp_path / "audio", chunk_seconds=chunk_seconds, output=tmp_path / "complete")
    partial = run(tmp_path / "audio", chunk_seconds=chunk_seconds, output=tmp_path / "partial")
    journal = partial.output / "journal.jsonl"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    last = max(e["chunk"] for e in entries if e["frames"])
    lost = {last, last - 3}  # follow-on chunks: the planned ones cover 2 frames or so
    for entry in entries:
        if entry["chunk"] in lost:
            (partial.dataset / "short.mp3" / f"chunk-{entry['chunk']:06d}.parquet").unlink()
    journal.write_text("".join(json.dumps(e) + "\n" for e in entries if e["chunk"] not in lost))
    resumed = run(
        tmp_path / "audio",
        chunk_seconds=chunk_seconds,
        output=tmp_path / "partial",
        on_conflict="resume",
    )
    assert resumed.summary["chunks_written"] == 2
    _assert_same_run(resumed, complete)


# -- codecs that cannot seek exactly ------------------------------------------------------------
def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the ffmpegs a worker ran)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _own_decode_cpu_s(path: Path) -> float:
    before = _children_cpu_s()
    decode_file(path, sample_rate=16000)
    return _children_cpu_s() - before


@pytest.mark.parametrize("suffix", [".m4a", ".ogg"])
def test_unseekable_codec_is_decoded_once(
    run, dask_client, make_audio, tmp_path: Path, suffix: str
) -> None:
    import dask

    path = make_audio(f"long{suffix}", n_samples=44100 * 240 + 321, rate=44100, channels=2)
    node = tmp_path / "node-local"
    chunk_seconds = 8 * HOP_S  # 32 chunks: decoding each from the start would cost ~16 passes
    with dask.config.set({"buzzdask.staging.directory": str(node)}):
        before = sum(dask_client.run(_children_cpu_s).values())
        chunked = run(tmp_path / "audio", chunk_seconds=chunk_seconds, output=tmp_path / "chunked")
        used = sum(dask_client.run(_children_cpu_s).values()) - before
        whole = run(tmp_path / "audio", chunk_seconds=ONE_CHUNK, output=tmp_path / "whole")
    _assert_same_run(chunked, whole)
    one_pass = min(_own_decode_cpu_s(path) for _ in range(2))
    # One decoding pass (and the probe), far from the 16 of decoding each chunk from the start.
    assert used < 2.5 * one_pass + 0.3, (used, one_pass)
    assert max(_partition_rows(chunked)) <= 8 + 1
    # The decoded copy is removed once the file's chunks are done (asked for, not waited on).
    wait_until(
        lambda: not any(p.is_file() for p in node.rglob("*")),
        timeout_s=10,
        failure=lambda: f"decoded copies left: {[p.name for p in node.rglob('*')]}",
        interval_s=0.1,
    )


@pytest.mark.parametrize(("suffix", "codec"), [(".m4a", "aac"), (".ogg", "libvorbis")])
def test_without_room_for_a_copy_chunks_are_the_whole_files_samples(
    make_audio, tmp_path: Path, suffix: str, codec: str, caplog
) -> None:
    """A recording looped and re-encoded: its timestamps jump, and its decoded samples number
    fewer than its timestamps say. Chunks decoded from the start (no room for a decoded copy)
    are cut by sample count, as the copy is: not by timestamp, which shifted every chunk after
    the first."""
    short = make_audio("short.mp3", n_samples=44100 * 5, rate=44100, channels=2)
    path = tmp_path / f"looped{suffix}"
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-stream_loop", "-1", "-i", str(short)),
            *("-t", "40", "-c:a", codec, str(path)),
        ],
        check=True,
    )
    info = probe_audio(path)
    whole = decode_file(path, sample_rate=16000)
    no_room = tmp_path / "a-file"
    no_room.write_text("")  # the copies' directory cannot be made under it
    plans = plan_chunks(info, spec(), frames_per_chunk=10)
    assert len(plans) >= 4
    with caplog.at_level(logging.INFO, logger="buzzdask"):
        for plan in plans:
            decoded = decode_chunk(info, plan, spec=spec(), copy_directory=str(no_room / "copies"))
            first = plan.first_frame * spec().hop_length
            got = decoded.samples
            np.testing.assert_array_equal(got, whole[first : first + len(got)])
            assert decoded.n_frames == min(10, spec().n_complete_frames(len(whole) - first))
        # Said once for the file, with why: each chunk costs a decode from the start.
        [said] = [r for r in caplog.records if "no decoded copy" in r.getMessage()]
        assert said.levelno == logging.WARNING
        assert said.getMessage().startswith(f"{path}: no decoded copy in {no_room / 'copies'}")
        assert "(Not a directory): each of its chunks is decoded from the file's start" in (
            said.getMessage()
        )
        # With room, the copy is made, and -v says so (its first chunk waits for it).
        decode_chunk(info, plans[1], spec=spec(), copy_directory=str(tmp_path / "room"))
    [making] = [r for r in caplog.records if "whole into a node-local copy" in r.getMessage()]
    assert making.getMessage().startswith(f"decoding {path} whole into a node-local copy of ")


def test_a_copy_no_task_here_can_lock_is_not_waited_for(tmp_path: Path, caplog) -> None:
    """A lock that cannot be opened (another user's folder; here, a directory in its place)
    read as one held by a task making the copy: each chunk waited for it, forever, silently."""
    copies = Path(pcm_cache.copy_directory(str(tmp_path)))
    (copies / "key.lock").mkdir(parents=True)
    made: list[str] = []
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        for start in (0, 100):
            span = pcm_cache.read_span(
                "key", directory=str(tmp_path), start=start, stop=start + 100,
                make=made.append, name="long.m4a",
            )  # fmt: skip
            assert span is None  # the caller decodes its chunk from the file's start
    assert not made
    [said] = [r.getMessage() for r in caplog.records if "no decoded copy" in r.getMessage()]
    assert said.startswith(f"long.m4a: no decoded copy in {copies} (Is a directory): each")


def test_copies_left_by_a_worker_killed_with_its_run_are_removed(make_audio, tmp_path) -> None:
    """A worker ended by Dask's os._exit (its client killed) runs no atexit and leaves its
    decoded copy; the next copy made on the node removes it."""
    first = make_audio("first.m4a", n_samples=44100 * 6, rate=44100, channels=2)
    second = make_audio("second.m4a", n_samples=44100 * 6, rate=44100, channels=2, seed=1)
    node = tmp_path / "node"
    made_then_killed = (
        "import os, sys\n"
        "from buzzdask.decode import decode_chunk, plan_chunks, probe_audio\n"
        "from buzzdask.frames import FrameSpec\n"
        "spec = FrameSpec.from_seconds(sample_rate=16000, frame_length_s=0.96, frame_hop_s=0.96,"
        " context_s=0.015)\n"
        "info = probe_audio(sys.argv[1])\n"
        "plan = plan_chunks(info, spec, frames_per_chunk=2)[1]\n"
        "decode_chunk(info, plan, spec=spec, copy_directory=sys.argv[2])\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", made_then_killed, str(first), str(node)], check=True)
    left = sorted(p.name for p in node.rglob("*") if p.is_file())
    assert [name for name in left if name.endswith(".f32")], left  # the copy outlived its maker
    copies = next(p.parent for p in node.rglob("*.f32"))
    # Not ours, or odd: passed over, not read (a FIFO's read would block).
    (copies / "binary.lock").write_bytes(b"\xff\xfe\x00")
    os.mkfifo(copies / "pipe.lock")
    info = probe_audio(second)
    decode_chunk(
        info,
        plan_chunks(info, spec(), frames_per_chunk=2)[1],
        spec=spec(),
        copy_directory=str(node),
    )
    assert not set(left) & {p.name for p in copies.iterdir()}, left
    assert {p.name for p in copies.iterdir()} >= {"binary.lock", "pipe.lock"}
    assert len(list(copies.glob("*.f32"))) == 1  # the second file's


def _decode_chunks(args: tuple[str, list[ChunkPlan], str]) -> tuple[list[np.ndarray], float]:
    """In a separate process: decode some chunks; their samples and the ffmpeg CPU it used."""
    path, plans, directory = args
    info = probe_audio(path)
    before = _children_cpu_s()
    samples = [
        decode_chunk(info, plan, spec=spec(), copy_directory=directory).samples for plan in plans
    ]
    return samples, _children_cpu_s() - before


def test_processes_share_one_decoded_copy_per_node(make_audio, tmp_path: Path) -> None:
    """Chunks of one file decoded by 3 processes at once: one decode, exact samples."""
    path = make_audio("shared.m4a", n_samples=44100 * 240, rate=44100, channels=2)
    frame_spec: FrameSpec = spec()
    plans = plan_chunks(probe_audio(path), frame_spec, frames_per_chunk=20)
    whole = decode_file(path, sample_rate=16000)
    one_pass = min(_own_decode_cpu_s(path) for _ in range(2))
    jobs = [(str(path), plans[i::3], str(tmp_path / "node")) for i in range(3)]
    pool = multiprocessing.get_context("spawn").Pool(3)
    try:
        answers = pool.map(_decode_chunks, jobs)
    finally:
        pool.close()  # the processes exit normally (not terminated): their exit clean-up runs
        pool.join()
    cpu = sum(used for _, used in answers)
    assert cpu < 1.7 * one_pass, (cpu, one_pass)
    for (_, group, _), (samples, _) in zip(jobs, answers, strict=True):
        for plan, got in zip(group, samples, strict=True):
            first = plan.first_frame * frame_spec.hop_length
            np.testing.assert_array_equal(got, whole[first : first + len(got)])
    # Each process removed what it made when it exited.
    assert [p for p in (tmp_path / "node").rglob("*") if p.is_file()] == []


def test_decoded_copy_failure_is_reported_by_every_waiting_chunk(tmp_path: Path) -> None:
    """A file ffmpeg cannot decode: the chunk that tried and those after it get the error."""
    from buzzdask.errors import DecodeError

    calls: list[str] = []

    def make(target: str) -> str:
        calls.append(target)
        raise DecodeError("x.m4a", "ffmpeg failed to decode", "moov atom not found")

    for _ in range(2):
        with pytest.raises(DecodeError, match="moov atom"):
            pcm_cache.read_span(
                "k", directory=str(tmp_path), start=0, stop=10, make=make, size_hint=None
            )
    assert len(calls) == 1
    assert pcm_cache.remove("k", directory=str(tmp_path))
    # One folder per user: a shared /tmp's first user's refused the next user's copies.
    assert list((tmp_path / f"buzzdask-pcm-{os.getuid()}").iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a full disk)")
def test_a_disk_filled_while_a_copy_is_made_fails_no_file(tmp_path: Path, caplog) -> None:
    """Copies made side by side can fill the disk: the chunk is decoded directly instead (a
    file failed, and its recorded failure failed the file's every later chunk on the node)."""
    from buzzdask import decode, pcm_cache
    from buzzdask.ffmpeg_tools import find_ffmpeg

    path = tmp_path / "x.m4a"
    subprocess.run(
        [*("ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=3:r=44100", str(path))],
        check=True,
    )
    info = probe_audio(path)
    # decode.py's own maker (real ffmpeg); 3 s of copy fill ffmpeg's buffer only at its end,
    # where ffmpeg 5.1 exits 0 though the write failed.
    make = functools.partial(
        decode._decode_to_file, info, sample_rate=16000, ffmpeg_cmd=find_ffmpeg().ffmpeg
    )
    stem = tmp_path / f"buzzdask-pcm-{os.getuid()}" / "k"
    stem.parent.mkdir()
    (stem.parent / "k.partial").symlink_to("/dev/full")  # writes: ENOSPC
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        answer = pcm_cache.read_span(
            "k", directory=str(tmp_path), start=0, stop=10, make=make, name=str(path)
        )
    assert answer is None  # the caller decodes the chunk directly
    assert f"{path}: no decoded copy" in caplog.text and "no space left on device" in caplog.text
    assert not (stem.parent / "k.failed").exists() and not (stem.parent / "k.f32").exists()
    # Room again: the next chunk makes the copy, the whole file's samples.
    answer = pcm_cache.read_span("k", directory=str(tmp_path), start=0, stop=None, make=make)
    assert answer is not None
    np.testing.assert_array_equal(answer[0], decode_file(path, sample_rate=16000))
    assert pcm_cache.remove("k", directory=str(tmp_path))


def test_a_decoded_copy_whose_ffmpeg_was_stopped_is_made_again(tmp_path: Path) -> None:
    """A stopped ffmpeg (a job's end) is not the file's fault: the next chunk tries again."""
    from buzzdask import pcm_cache
    from buzzdask.errors import DecoderStopped

    def stopped(target: str) -> str:
        raise DecoderStopped("x.m4a", "ffmpeg was stopped by SIGINT or SIGTERM")

    def decodes(target: str) -> str:
        np.arange(10, dtype=np.float32).tofile(target)
        return ""

    with pytest.raises(DecoderStopped):
        pcm_cache.read_span(
            "k", directory=str(tmp_path), start=0, stop=10, make=stopped, size_hint=None
        )
    answer = pcm_cache.read_span(
        "k", directory=str(tmp_path), start=0, stop=10, make=decodes, size_hint=None
    )
    assert answer is not None
    np.testing.assert_array_equal(answer[0], np.arange(10, dtype=np.float32))
    assert pcm_cache.remove("k", directory=str(tmp_path))


@pytest.mark.parametrize("channels", [1, 4])  # read in process; decoded by ffmpeg
def test_nan_or_infinite_samples_fail_their_chunk(run, tmp_path: Path, channels: int) -> None:
    """Float audio holding a NaN (or an infinity) is not scored as if it held sound: its chunk
    is reported, saying where, and the file's other chunks are scored."""
    rate, n = 16000, 8 * 15360
    samples = np.repeat(field_like(n, rate)[:, :1], channels, axis=1).astype("<f4")
    samples[3 * rate, 0] = np.nan  # at 3 s: the second chunk of two frames
    samples[int(6.0 * rate) :, :] = np.inf  # the fourth chunk on
    raw = tmp_path / "samples.f32"
    samples.tofile(raw)
    audio = tmp_path / "audio"
    audio.mkdir()
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-f", "f32le", "-ar", str(rate), "-ac", str(channels)),
            *("-i", str(raw), "-c:a", "pcm_f32le", str(audio / "float.wav")),
        ],
        check=True,
    )
    result = run(audio, chunk_seconds=2 * HOP_S)
    errors = result.errors.set_index("chunk")
    assert sorted(errors.index) == [1, 3], errors
    assert errors.loc[1, "reason"].startswith("NaN or infinite samples from 3.00 s on")
    assert errors.loc[3, "reason"].startswith("NaN or infinite samples from 6.00 s on")
    assert errors.loc[1, "reason"].endswith(
        " s on (damaged float audio, or a sample format ffmpeg misreads): not scored"
    )
    starts = result.to_pandas()["start"].to_numpy()
    np.testing.assert_allclose(starts, np.array([0, 1, 4, 5]) * HOP_S)


# -- containers that declare their length -------------------------------------------------------
def test_a_flac_damaged_inside_says_where_frames_were_lost(run, make_audio, tmp_path) -> None:
    """ffmpeg drops a FLAC's damaged stretch without a word: the chunk holding it comes back
    short while the chunks after it decode, which is no end of the audio but a gap."""
    flac = make_audio("damaged.flac", n_samples=30 * 44100, rate=44100, channels=2, seed=5)
    data = bytearray(flac.read_bytes())
    middle = len(data) // 2  # 15 s in: inside chunk 1 of 10 s chunks
    data[middle : middle + 40_000] = np.random.default_rng(0).bytes(40_000)
    flac.write_bytes(bytes(data))
    store = tmp_path / "store"
    result = run(flac.parent, chunk_seconds=10.0, keep_embeddings=store)
    gaps = result.errors[result.errors["reason"].str.startswith("decoded short inside the file")]
    assert gaps["chunk"].tolist() == [1] and gaps["kept"].all(), result.errors
    assert re.fullmatch(
        r"decoded short inside the file: chunk 1 gave \d+ of its 10 frames while audio after it "
        r"decoded \(damaged audio the decoder dropped: its frames after the damage sit up to "
        r"\d\.\d\d s early; analysed what it holds\)",
        gaps["reason"].iloc[0],
    )
    frames = result.to_pandas()
    assert (frames["start"] >= 20.0).any()  # the chunk after the gap was scored
    # A resume that finds the chunks written says so again; a run served by the store it kept
    # took the short chunk for the end of the audio, and lost every frame after it.
    again = run(
        flac.parent,
        chunk_seconds=10.0,
        keep_embeddings=store,
        on_conflict="resume",
        output=result.output,
    )
    assert again.errors["reason"].tolist() == result.errors["reason"].tolist()
    stored = run(flac.parent, chunk_seconds=10.0, keep_embeddings=store, output=tmp_path / "re")
    assert stored.summary["chunks_from_store"] == 4
    assert stored.errors["reason"].tolist() == result.errors["reason"].tolist()
    assert_same_frames(stored.to_pandas(), frames)


def test_a_short_chunk_in_a_store_is_no_end_of_the_audio(tmp_path, tiny_embedder) -> None:
    """A chunk that came back short is stored as ending the audio (``-end``): damage a decoder
    dropped ends it too. The frames after it are served only where a decode of them says so:
    a run killed after such a chunk, resumed with the store, served the rest as empty."""
    from buzzdask.models import resolve_embedder
    from buzzdask.store import EmbeddingStore

    embedder = resolve_embedder("yamnet_k2", handle=str(tiny_embedder))
    store = EmbeddingStore(tmp_path, embedder=embedder, spec=embedder.frame_spec())
    rows = np.ones((10, 4), np.float32)
    store.store("flac", 0, rows, at_end=False)
    store.store("flac", 10, rows[:9], at_end=True)  # the damaged chunk
    assert store.frames_of("flac", 10, 10) == 9  # its own decode's end
    assert store.frames_of("flac", 20, 10) is None  # unknown: decoded again
    store.store("flac", 20, rows, at_end=False)
    store.store("flac", 30, rows[:1], at_end=True)
    assert [store.frames_of("flac", first, 10) for first in (0, 10, 20, 30)] == [10, 9, 10, 1]
    assert store.file_frames("flac") == 31
    # Chunked otherwise (one chunk of the whole file), the stored frames have a hole: decode.
    assert store.frames_of("flac", 0, 1000) is None
    # Past an end whose decodes reached it (an over-estimated MP3): served as empty.
    store.store("mp3", 0, rows[:4], at_end=True)
    store.store("mp3", 10, rows[:0], at_end=True)
    assert store.frames_of("mp3", 10, 10) == 0 and store.file_frames("mp3") == 4


def test_a_first_audio_stream_shorter_than_its_container_is_not_cut_short(
    run, make_audio, tmp_path: Path
) -> None:
    """Matroska declares no length per stream: the container's is its longest stream's (a
    second audio stream, a trail camera's video). A first stream shorter than that was said
    "decoded short ... cut short or damaged", and the run exited 3."""
    first = make_audio(".first.wav", n_samples=3 * 16000, seed=1)
    second = make_audio(".second.wav", n_samples=7 * 16000, seed=2)
    both = tmp_path / "audio" / "two-streams.mka"
    subprocess.run(
        [
            *("ffmpeg", "-v", "error", "-y", "-i", str(first), "-i", str(second)),
            *("-map", "0:a", "-map", "1:a", "-c:a", "flac", str(both)),
        ],
        check=True,
    )
    result = run(both)
    assert result.errors.empty, result.errors
    assert len(result.to_pandas()) == 3  # the first stream's
    # Probed with ffprobe or, without one, from ffmpeg's report (the imageio wheel's ffmpeg).
    tools = find_ffmpeg()
    for probe_with in (tools, dataclasses.replace(tools, ffprobe=None)):
        info = probe_audio(both, tools=probe_with)
        assert info.duration_s == pytest.approx(7.0, abs=0.05)
        assert not info.duration_is_the_streams


def test_flac_and_m4a_cut_short_say_so(run, make_audio, tmp_path: Path) -> None:
    """A FLAC's STREAMINFO and an MP4's moov declare the length: a copy cut short decodes what
    it holds, in frames at their true times, with one row saying how much is missing."""
    audio = tmp_path / "audio"
    for name in ("whole.flac", "cut.flac"):
        make_audio(name, n_samples=12 * 16000, seed=1)
    for name in ("whole.m4a", "cut.m4a"):  # moov first, as phones write it: readable when cut
        source = make_audio(f".{name}.wav", n_samples=12 * 16000, seed=2)
        subprocess.run(
            [
                *("ffmpeg", "-v", "error", "-y", "-i", str(source), "-c:a", "aac"),
                *("-movflags", "+faststart", str(audio / name)),
            ],
            check=True,
        )
        source.unlink()
    for name in ("cut.flac", "cut.m4a"):
        data = (audio / name).read_bytes()
        (audio / name).write_bytes(data[: len(data) * 4 // 10])
    result = run(audio, chunk_seconds=4 * HOP_S)
    errors = result.errors
    assert set(errors["file"]) == {"cut.flac", "cut.m4a"} and errors["kept"].all(), errors
    short = errors[errors["reason"].str.startswith("decoded short")].set_index("file")["reason"]
    frames = result.to_pandas()
    for name in ("cut.flac", "cut.m4a"):  # one such row each, beside ffmpeg's damage rows
        starts = frames.loc[frames["file"] == name, "start"].sort_values().to_numpy()
        assert 2 <= len(starts) <= 7  # about 40 % of the 12 frames
        assert short[name] == (
            f"decoded short: its header declares 12.0 s, decoding gave {len(starts)} frames "
            f"({len(starts) * HOP_S:.1f} s; cut short or damaged; analysed what it holds)"
        )
        np.testing.assert_allclose(starts, np.arange(len(starts)) * HOP_S)
