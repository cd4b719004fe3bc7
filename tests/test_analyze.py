"""End to end on real parts: ffmpeg, a LocalCluster of worker processes, tiny real SavedModels."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import buzzdask
from buzzdask import ClusterError, InputError, ModelError, OutputConflictError, ParameterError
from buzzdask.cli import EXIT_INTERRUPTED, EXIT_TERMINATED
from buzzdask.errors import ScorerError
from buzzdask.write import OutputLayout
from tests.conftest import (
    BUZZDASK,
    CLASSES,
    MidRunKiller,
    assert_same_frames,
    ffmpeg_failing_on,
    kill_client_mid_run,
    requires_ffmpeg,
    signal_client_mid_run,
    wait_until,
    zero_a_stretch,
)
from tests.reference import reference_activations

pytestmark = requires_ffmpeg
FRAME = 15360  # samples in one 0.96 s frame at 16 kHz
KILL_CHUNKS = 90  # partitions of kill_corpus: three 30-frame files in 1-frame chunks
# Small score tasks and few chunks decoded ahead keep the workers decoding and scoring, and
# partitions landing, throughout a killed run: a kill has many moments to land mid-run.
KILL_PACING = {"batch_frames": 4, "memory_budget": "2MiB"}


def activations(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"activation_{c}" for c in CLASSES]].to_numpy()


AWKWARD = {
    "one_frame.wav": FRAME,
    "one_short_of_two.wav": 2 * FRAME - 1,
    "several_chunks_plus_partial.wav": 11 * FRAME + 5000,
    "context_cut.wav": 3 * FRAME + 100,  # last frame complete, its 15 ms context past the end
}


@pytest.mark.parametrize(
    ("frame_hop_s", "chunk_seconds", "embedder_fixture"),
    [
        (0.96, 2.0, "tiny_embedder"),
        (0.96, 3.5, "tiny_embedder"),  # not a multiple of the hop
        (0.96, 600, "tiny_embedder"),
        (0.96, 2.0, "tiny_embedder_halfhop"),  # TF Hub's 0.48 s patch hop, scored every 2nd patch
        (0.48, 1.5, "tiny_embedder_halfhop"),
        (0.5, 2.0, "tiny_embedder"),  # hop off the embedder's patch grid: frames scored alone
    ],
)
def test_equals_whole_file_reference(
    run, make_audio, tiny_model, request, tmp_path, frame_hop_s, chunk_seconds, embedder_fixture
):
    embedder = request.getfixturevalue(embedder_fixture)
    for seed, (name, n_samples) in enumerate(AWKWARD.items()):
        make_audio(name, n_samples=n_samples, seed=seed)
    result = run(
        tmp_path / "audio",
        embedder=embedder,
        frame_hop_s=frame_hop_s,
        chunk_seconds=chunk_seconds,
        batch_frames=5,
    )
    assert result.ok, result.errors
    frame = result.to_pandas()
    for name in AWKWARD:
        starts, expected = reference_activations(
            tmp_path / "audio" / name, embedder=embedder, model=tiny_model, frame_hop_s=frame_hop_s
        )
        rows = frame[frame.file == name]
        assert len(rows) == len(starts) > 0, name
        np.testing.assert_array_equal(rows.start.to_numpy(), starts)
        np.testing.assert_allclose(rows.end - rows.start, 0.96)
        np.testing.assert_allclose(activations(rows), expected, atol=1e-5, rtol=0)


def test_a_notebooks_mistakes_in_reading_results_are_said(run, make_audio, tmp_path, tiny_model):
    """Buzzdask's own errors, not a FileNotFoundError from pyarrow or a KeyError from dask."""
    make_audio("short.wav", directory=tmp_path / "few", n_samples=FRAME - 1)
    nothing = run(tmp_path / "few", output=tmp_path / "nothing")
    for read in (nothing.to_pandas, nothing.to_dask):
        with pytest.raises(InputError, match=r"holds no scored frames \(nothing under scores/\)"):
            read()
    make_audio("a.wav", n_samples=3 * FRAME)
    result = run(tmp_path / "audio", output=tmp_path / "some")
    opened = buzzdask.open_run(result.output)
    shown = f"Run(output={str(result.output)!r}, status='complete', model='model_tiny')"
    assert repr(opened) == shown
    assert list(opened.frames(columns="start").compute().columns) == ["start"]  # not s, t, a...
    with pytest.raises(ParameterError, match=r"columns \['activation_ins_buz'\] are not in"):
        opened.frames(columns=["activation_ins_buz"])
    with pytest.raises(ParameterError, match=r"columns \['nope'\] are not in the run's scores"):
        opened.recording_frames("a.wav", columns=["file", "nope"])
    with pytest.raises(ParameterError, match="not a str; plot_run\\(output\\) draws"):
        buzzdask.plot_daily_activity(str(result.output))  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"time_format=5 must be a strptime format"):
        buzzdask.summarize(result.output, write=False, time_format=5)  # type: ignore[arg-type]
    (tmp_path / "notes.txt").write_text("field notes")
    for write in (buzzdask.summarize, functools.partial(buzzdask.export, format="csv")):
        with pytest.raises(OutputConflictError, match=r"notes\.txt exists and is not a directory"):
            write(result.output, dest=tmp_path / "notes.txt", thresholds={"ins_buzz": 0.0})
    with pytest.raises(ParameterError, match=r"^output=5 must be a path"):
        buzzdask.open_run(5)  # type: ignore[arg-type]
    config = tiny_model / "config_model.json"
    with pytest.raises(ModelError, match=f"is a file: give the model's directory.*{tiny_model}"):
        buzzdask.resolve_model(config)


def test_output_reads_back_everywhere(run, make_audio, tmp_path):
    make_audio("site1/a.wav", n_samples=5 * FRAME)
    make_audio("site2/deep/b.flac", n_samples=4 * 44100 + 9, rate=44100, channels=2)
    result = run(tmp_path / "audio", thresholds={"ins_buzz": 0.0}, chunk_seconds=2.0)
    pandas_frame = result.to_pandas()
    assert sorted(pandas_frame.file.unique()) == ["site1/a.wav", "site2/deep/b.flac"]
    assert (result.dataset / "site1" / "a.wav" / "chunk-000000.parquet").is_file()
    dask_frame = dd.read_parquet(result.dataset).compute()
    assert len(dask_frame) == len(pandas_frame) == 5 + 4
    assert len(pd.read_parquet(result.dataset)) == len(pandas_frame)
    assert pandas_frame["activation_ins_buzz"].dtype == np.float32
    assert (pandas_frame["detections_ins_buzz"] == (pandas_frame["activation_ins_buzz"] >= 0)).all()

    metadata = json.loads((result.output / "buzzdask.json").read_text())
    assert metadata["status"] == "complete"
    assert metadata["classes"] == CLASSES
    assert metadata["frame_length_s"] == metadata["frame_hop_s"] == 0.96
    assert metadata["sample_rate"] == 16000
    assert len(metadata["model"]["sha256"]) == 64
    assert {"buzzdask", "dask", "numpy", "soxr", "mutagen", "tensorflow"} <= set(
        metadata["versions"]
    )
    assert metadata["scoring"]["batch_frames"] == 512  # a setting that moves scores by 1e-6
    assert metadata["started"] <= metadata["finished"]
    schema_metadata = pq.read_schema(next(result.dataset.rglob("*.parquet"))).metadata
    assert (
        json.loads(schema_metadata[b"buzzdask"])["model"]["sha256"] == metadata["model"]["sha256"]
    )
    assert result.summary["files_done"] == 2
    assert result.summary["realtime_factor"] > 0
    assert all(peak > 0 for peak in result.summary["peak_rss_bytes"].values())


def test_bad_files_are_reported_and_the_rest_finish(run, make_audio, tmp_path):
    audio = tmp_path / "audio"
    make_audio("good.wav", n_samples=4 * FRAME)
    make_audio("good.mp3", n_samples=4 * 44100, rate=44100, channels=2)
    make_audio("too_short.wav", n_samples=FRAME - 1)
    (audio / "empty.mp3").write_bytes(b"")
    (audio / "not_audio.mp3").write_text("a text file with an audio extension\n" * 50)
    good = (audio / "good.mp3").read_bytes()
    (audio / "truncated_header.mp3").write_bytes(b"\x00" * 64 + good[len(good) // 2 :][:200])
    os.symlink(audio / "missing.wav", audio / "broken_link.wav")
    # A site's folder on another disk, not mounted: not "other suffix (siteB)".
    os.symlink(tmp_path / "unmounted" / "siteB", audio / "siteB")
    (audio / "folder.mp3").mkdir()
    make_audio("zero_samples.wav", n_samples=0)  # a valid header and no audio
    make_audio("long.mp3", n_samples=10 * 44100, rate=44100, channels=2, seed=3)
    long = (audio / "long.mp3").read_bytes()
    (audio / "truncated.mp3").write_bytes(long[: len(long) * 6 // 10])  # a copy cut short
    (audio / "long.mp3").unlink()
    whole = make_audio("cut.wav", n_samples=10 * FRAME, seed=4).read_bytes()
    (audio / "cut.wav").write_bytes(whole[: len(whole) // 2])  # a recording cut short
    (audio / "stub.wav").write_bytes(whole[: 44 + FRAME])  # cut to half a frame
    # Frames lost mid-file: ffmpeg decodes around them and says so.
    zero_a_stretch(make_audio("damaged.mp3", n_samples=4 * 44100, rate=44100, channels=2))
    os.symlink(audio / "loop_b.wav", audio / "loop_a.wav")
    os.symlink(audio / "loop_a.wav", audio / "loop_b.wav")
    (audio / "sub").mkdir()
    os.symlink(audio, audio / "sub" / "back_to_top")  # a directory loop
    # A name from an old memory card (latin-1 bytes): no text for a Parquet column or a log.
    (audio / os.fsdecode(b"caf\xe9.wav")).write_bytes((audio / "good.wav").read_bytes())
    # Folders pandas and pyarrow take for metadata ("_..."): the result reads them all the same.
    (audio / "_pilot").mkdir()
    (audio / "_pilot" / "good.wav").write_bytes((audio / "good.wav").read_bytes())

    result = run(audio)

    errors = result.errors.set_index("file")
    assert set(errors.index) == {
        "too_short.wav",
        "empty.mp3",
        "not_audio.mp3",
        "truncated_header.mp3",
        "broken_link.wav",
        "siteB",
        "zero_samples.wav",
        "loop_a.wav",
        "loop_b.wav",
        "truncated.mp3",
        "cut.wav",
        "stub.wav",
        "damaged.mp3",
        "caf\\xe9.wav",
    }
    # One row a file: cut to less than a frame is a failure that says it was cut, not a
    # "kept" row beside a failed one.
    assert not result.errors["file"].duplicated().any()
    assert errors.loc["stub.wav", "reason"] == (
        "audio shorter than one frame (0.96 s); cut short: its header declares 9.6 s, the file "
        "holds 0.5 s"
    )
    # How short: a file of 0.96 s less a sample is not an empty one.
    assert (
        errors.loc["too_short.wav", "reason"] == "0.959 s of audio, shorter than one frame (0.96 s)"
    )
    assert errors.loc["zero_samples.wav", "reason"] == "audio shorter than one frame (0.96 s)"
    assert "empty file" in errors.loc["empty.mp3", "reason"]
    assert "cannot read it as audio" in errors.loc["not_audio.mp3", "reason"]
    assert "broken symlink" in errors.loc["broken_link.wav", "reason"]
    assert "broken symlink" in errors.loc["siteB", "reason"]
    assert errors.loc["loop_a.wav", "reason"] == "symlink loop"
    assert errors.loc["caf\\xe9.wav", "reason"].startswith("its name is not UTF-8 text")
    # Files cut short are analysed, with a row that says so (their headers declare more).
    assert errors.loc["truncated.mp3", "reason"].startswith(
        "cut short: its header declares 10.0 s, the file holds 6.0 s"
    )
    assert errors.loc["cut.wav", "reason"] == (
        "cut short: its header declares 9.6 s, the file holds 4.8 s (analysed what it holds)"
    )
    assert errors.loc["damaged.mp3", "reason"] == (
        "ffmpeg reported damaged audio (decoded what it could)"
    )
    assert "Header missing" in errors.loc["damaged.mp3", "detail"]
    assert errors.loc["damaged.mp3", "chunk"] == 0
    # Their frames are written: kept, not failed.
    assert set(errors.index[errors.kept]) == {"truncated.mp3", "cut.wav", "damaged.mp3"}
    frame = result.to_pandas()
    # A copy cut short keeps the frames it holds (about 6 of 10 s); the rest are not invented.
    assert set(frame.file) == {
        "good.wav",
        "good.mp3",
        "truncated.mp3",
        "cut.wav",
        "damaged.mp3",
        "_pilot/good.wav",
    }
    assert len(frame) == len(result.to_dask())
    assert (frame.file == "cut.wav").sum() == 4  # the header's 44 bytes short of a fifth
    assert 4 <= (frame.file == "truncated.mp3").sum() <= 7
    assert 3 <= (frame.file == "damaged.mp3").sum() <= 4
    assert result.summary["files_failed"] == 11
    assert result.summary["files_skipped"] == 1  # sub/back_to_top: the input folder, walked once
    # The table on disk is the result's, typed alike (a chunk is 3, not 3.0, beside a null).
    on_disk = pd.read_parquet(result.output / "errors.parquet")
    pd.testing.assert_frame_equal(on_disk, result.errors)
    assert on_disk.chunk.dtype == "Int64" and on_disk.kept.dtype == bool


def test_a_resume_keeps_the_rows_of_damaged_audio_it_skips(run, make_audio, tmp_path):
    """ffmpeg's report of damaged audio is journalled with its chunk: a run that resumes (after
    a crash, a walltime kill) writes the row again for the chunk it skips, never losing it."""
    make_audio("good.wav", n_samples=2 * FRAME)
    zero_a_stretch(make_audio("damaged.mp3", n_samples=4 * 44100, rate=44100, channels=2))
    first = run(tmp_path / "audio")
    assert first.errors.file.tolist() == ["damaged.mp3"] and first.errors.kept.all()
    resumed = run(tmp_path / "audio", on_conflict="resume")
    assert resumed.summary["chunks_written"] == 0
    pd.testing.assert_frame_equal(resumed.errors, first.errors)
    pd.testing.assert_frame_equal(pd.read_parquet(resumed.output / "errors.parquet"), first.errors)


def test_short_recordings_are_decoded_several_to_a_task(run, make_audio, tmp_path, dask_client):
    from distributed import get_task_stream

    for index in range(20):
        make_audio(f"site/{index:02d}.wav", n_samples=3 * FRAME + 99, seed=index)
    with get_task_stream(dask_client) as stream:
        grouped = run(tmp_path / "audio", batch_frames=16)
    decode_tasks = [t for t in stream.data if str(t["key"]).startswith("decode-")]
    # The first alone (its partition comes early), then up to five files (15 frames) to a task
    # from each probe task's files (1, 2, 4, 8 and 5 of them): 6 tasks, not 20.
    assert len(decode_tasks) <= 6
    # One file to a task (a batch of one frame) scores the same frames.
    alone = run(tmp_path / "audio", batch_frames=1, output=tmp_path / "alone")
    frame = grouped.to_pandas()
    assert frame.groupby("file").size().to_dict() == {f"site/{i:02d}.wav": 3 for i in range(20)}
    assert_same_frames(frame, alone.to_pandas())


def test_memory_budget_bounds_decoded_audio_in_flight(run, make_audio, tmp_path):
    for seed in range(4):
        make_audio(f"f{seed}.wav", n_samples=8 * FRAME, seed=seed)
    # One 2-frame chunk with its margins is about 0.2 MB of float32: allow two at a time.
    result = run(tmp_path / "audio", chunk_seconds=2.0, memory_budget="420kB")
    assert len(result.to_pandas()) == 32
    summary = result.summary
    assert 0 < summary["peak_decoded_bytes_in_flight"] <= summary["memory_budget_bytes"] == 420_000
    unbounded = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "unbounded")
    assert unbounded.summary["peak_decoded_bytes_in_flight"] > 420_000
    assert_same_frames(unbounded.to_pandas(), result.to_pandas())


def test_a_budget_under_one_chunk_warns_and_goes_one_at_a_time(run, make_audio, tmp_path, caplog):
    for seed in range(2):
        make_audio(f"f{seed}.wav", n_samples=4 * FRAME, seed=seed)
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = run(tmp_path / "audio", chunk_seconds=2.0, memory_budget="1kB")
    assert "memory budget 0.98 kiB holds less than one chunk of decoded audio" in caplog.text
    assert caplog.text.count("holds less than one chunk") == 1  # said once
    assert re.search(
        r"for f[01]\.wav \[[0-9.]+–[0-9.]+ s\]\): chunks go one at a time", caplog.text
    )
    assert result.ok and len(result.to_pandas()) == 8
    # One chunk at a time: the one a file's length says it holds (2 frames and the context).
    assert result.summary["peak_decoded_bytes_in_flight"] < 2 * 4 * (2 * FRAME + 240 + 16000)
    # Short recordings' chunks count what they hold: a budget far under a whole chunk of
    # 600 s holds several of them, and nothing is said.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        short = run(tmp_path / "audio", memory_budget="1MB", output=tmp_path / "short")
    assert short.ok and "holds less than one chunk" not in caplog.text


def test_conflict_is_detected_before_work(run, make_audio, tmp_path, caplog):
    make_audio("a.wav", n_samples=3 * FRAME)
    first = run(tmp_path / "audio", chunk_seconds=1.0)
    before = {p: p.stat().st_mtime_ns for p in first.output.rglob("*")}
    with pytest.raises(OutputConflictError, match="already holds results"):
        run(tmp_path / "audio", chunk_seconds=1.0)
    assert {p: p.stat().st_mtime_ns for p in first.output.rglob("*")} == before

    resumed = run(tmp_path / "audio", chunk_seconds=1.0, on_conflict="resume")
    assert resumed.summary["chunks_written"] == 0
    assert resumed.summary["chunks_skipped_resume"] == 3
    assert_same_frames(resumed.to_pandas(), first.to_pandas())

    with pytest.raises(OutputConflictError, match="thresholds"):
        run(tmp_path / "audio", chunk_seconds=1.0, on_conflict="resume", thresholds={"ins_buzz": 1})

    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        fresh = run(tmp_path / "audio", chunk_seconds=1.0, on_conflict="new")
    assert fresh.output != first.output and fresh.output.name.startswith("results-")
    assert_same_frames(fresh.to_pandas(), first.to_pandas())
    # Where it went, should it stop before its result says: a resume names that directory.
    assert f"writing to {fresh.output} (new, beside {first.output}, which" in caplog.text
    assert "which is not empty" in (fresh.output / "buzzdask.log").read_text()
    # The command line's advice after a stop: not the same command (--new again).
    from buzzdask import cli

    args = ["analyze", str(tmp_path / "none"), "--model", "m", "--output", "o", "--new"]
    assert cli.main(args) == cli.EXIT_ERROR
    assert "with --resume and --output set to the directory named above" in cli._stopping["after"]


def test_resume_finishes_an_interrupted_run(run, make_audio, tmp_path):
    make_audio("a.wav", n_samples=6 * FRAME)
    make_audio("b.wav", n_samples=4 * FRAME, seed=1)
    complete = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "complete")
    partial = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "partial")
    # Simulate a kill: b.wav's partitions and journal lines are lost.
    for path in (partial.dataset / "b.wav").iterdir():
        path.unlink()
    journal = partial.output / "journal.jsonl"
    kept = [line for line in journal.read_text().splitlines() if '"b.wav"' not in line]
    journal.write_text("\n".join(kept) + "\n")
    resumed = run(
        tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "partial", on_conflict="resume"
    )
    assert resumed.summary["chunks_written"] == 2
    assert_same_frames(resumed.to_pandas(), complete.to_pandas())
    # A notebook cell's value says what the resume wrote and what it found written.
    skipped = resumed.summary["chunks_skipped_resume"]
    assert f"2/2 files, 4 frames ({skipped} chunks done before), 0 error rows" in repr(resumed)
    # buzzdask.json keeps the invocation before, as it had recorded itself.
    [earlier] = resumed.metadata["earlier_runs"]
    assert earlier["status"] == "complete" and earlier["started"] == partial.metadata["started"]
    assert earlier["chunks_written"] == partial.summary["chunks_written"]
    # Each invocation starts its lines in the run's log: which one wrote what is told apart.
    log = (partial.output / "buzzdask.log").read_text()
    assert log.count("buzzdask.analysis: starting an analysis on ") == 1
    assert log.count("buzzdask.analysis: resuming an analysis on ") == 1
    # Resume into an output no run has written: a start.
    fresh = run(
        tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "fresh", on_conflict="resume"
    )
    assert (
        "buzzdask.analysis: starting an analysis on " in (fresh.output / "buzzdask.log").read_text()
    )


def test_an_ffmpeg_stopped_mid_decode_is_decoded_again(run, make_audio, tmp_path, caplog):
    """A job's end or a Ctrl-C that reaches only the workers stops a decoding ffmpeg (it exits
    255 and says nothing): not the file's fault, so the chunk is decoded again, not failed."""
    import dask

    from buzzdask.ffmpeg_tools import find_ffmpeg

    make_audio("a.mp3", n_samples=6 * FRAME)
    make_audio("b.mp3", n_samples=4 * FRAME, seed=1)
    complete = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "complete")
    tools = find_ffmpeg()
    stopped = tmp_path / "stopped"
    wrapper = tmp_path / "ffmpeg"
    # The real ffmpeg; its first decode (-i), read at the audio's pace, gets a SIGTERM.
    wrapper.write_text(
        f'#!/bin/sh\ncase " $* " in *" -i "*) ;; *) exec {tools.ffmpeg} "$@" ;; esac\n'
        f"if mkdir {stopped} 2>/dev/null; then\n"
        f'  {tools.ffmpeg} -re "$@" & pid=$!\n  sleep 0.5\n  kill -TERM $pid\n'
        "  wait $pid\n  exit $?\nfi\n"
        f'exec {tools.ffmpeg} "$@"\n'
    )
    wrapper.chmod(0o755)
    with (
        dask.config.set({"buzzdask.ffmpeg": str(wrapper), "buzzdask.ffprobe": tools.ffprobe}),
        caplog.at_level(logging.WARNING, logger="buzzdask"),
    ):
        result = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "out")
    assert stopped.exists()
    assert result.ok, result.errors
    assert "ffmpeg was stopped by SIGINT or SIGTERM (Ctrl-C, a job's end); decoding it again" in (
        caplog.text
    )
    assert_same_frames(result.to_pandas(), complete.to_pandas())


def test_a_file_failing_in_every_chunk_is_one_console_line(run, make_audio, tmp_path, caplog):
    """Each chunk is a row, but the same reason for the same file is shown once (a file
    deleted mid-run had filled the console's 20 lines alone)."""
    import dask

    from buzzdask.ffmpeg_tools import find_ffmpeg

    make_audio("good.mp3", n_samples=6 * FRAME)
    make_audio("bad.mp3", n_samples=6 * FRAME, seed=1)
    tools = find_ffmpeg()
    wrapper = ffmpeg_failing_on(tmp_path, "bad.mp3")
    with (
        dask.config.set({"buzzdask.ffmpeg": str(wrapper), "buzzdask.ffprobe": tools.ffprobe}),
        caplog.at_level(logging.INFO, logger="buzzdask"),
    ):
        result = run(tmp_path / "audio", chunk_seconds=2.0)
    assert sorted(result.errors["chunk"]) == [0, 1, 2]
    assert set(result.errors["reason"]) == {"ffmpeg failed to decode"}
    said = [r for r in caplog.records if r.getMessage().startswith("failed: bad.mp3")]
    assert [r.levelno for r in said].count(logging.WARNING) == 1 and len(said) == 3
    assert result.summary["files_done"] == 1


def test_paths_from_a_notebook_expand_home_as_pandas_does(run, make_audio, tmp_path, monkeypatch):
    """``"~/..."`` is the user's home (a folder named ``~`` before), and ``..`` is taken off."""
    monkeypatch.setenv("HOME", str(tmp_path))
    make_audio("site/a.wav", n_samples=2 * FRAME)
    result = run("~/audio", output="~/elsewhere/../results")
    assert result.ok, result.errors
    assert result.output == tmp_path / "results" and result.summary["files_done"] == 1
    run_read = buzzdask.open_run("~/results")
    assert run_read.complete and run_read.recordings() == ["site/a.wav"]
    table = buzzdask.summarize("~/results", thresholds={"ins_buzz": 0.0}, dest="~/summaries")
    written = [Path(path) for path in table.attrs["paths"].values()]
    assert written and all(path.parent == tmp_path / "summaries" for path in written)
    assert not (tmp_path / "~").exists() and not Path("~").exists()
    assert result.metadata["inputs"]["paths"] == [str(tmp_path / "audio")]  # as it resolved
    assert buzzdask.probe_audio("~/audio/site/a.wav").duration_s == 2 * FRAME / 16000
    assert len(buzzdask.decode_file("~/audio/site/a.wav", sample_rate=16000)) == 2 * FRAME
    # An output folder named with what fsspec reads as URL chaining or a glob is a folder.
    odd = Path(shutil.copytree(result.output, tmp_path / "run::2024 [*]"))
    assert len(buzzdask.open_run(odd).frames().compute()) == 2
    assert buzzdask.summarize(odd, thresholds={"ins_buzz": 0.0}, dest=tmp_path / "s2").shape[0]


def test_inputs_given_as_a_generator_are_recorded(run, make_audio, tmp_path):
    files = [str(make_audio(name, n_samples=2 * FRAME)) for name in ("a.wav", "b.wav")]
    result = run((tmp_path / "audio").glob("*.wav"))  # scanned, then recorded: used up once
    assert sorted(result.metadata["inputs"]["paths"]) == files
    assert result.summary["files_done"] == 2


def test_errors_before_any_work(run, make_audio, tmp_path, tiny_embedder):
    from tests.model_fixtures import build_tiny_head

    make_audio("a.wav", n_samples=2 * FRAME)
    with pytest.raises(InputError, match="not found"):
        run(tmp_path / "nowhere")
    with pytest.raises(InputError, match="must be a path or a list of paths, not None"):
        run(None)
    with pytest.raises(InputError, match=r"must be paths \(str or pathlib.Path\), not 3"):
        run([tmp_path / "audio", 3])
    with pytest.raises(InputError, match="an input path is empty"):
        run("")  # os.environ.get("AUDIO", ""): not the current directory
    with pytest.raises(ModelError, match="not found"):
        run(tmp_path / "audio", model=tmp_path / "no_model")
    with pytest.raises(ParameterError, match="keep_embeddings='' is empty"):
        run(tmp_path / "audio", keep_embeddings="")
    with pytest.raises(ParameterError, match="keep_embeddings=None must be True, False or a"):
        run(tmp_path / "audio", keep_embeddings=None)
    with pytest.raises(ParameterError, match=r"model must be a model directory .* not NoneType"):
        buzzdask.analyze(tmp_path / "audio", None, output=tmp_path / "o", progress=False)
    with pytest.raises(ParameterError, match="output='' is empty"):
        buzzdask.analyze(tmp_path / "audio", tmp_path / "no_model", output="", progress=False)
    with pytest.raises(ParameterError, match="unknown class"):
        run(tmp_path / "audio", thresholds={"frog": 0.0})
    with pytest.raises(ParameterError, match=r"thresholds=0\.5 must map class names"):
        run(tmp_path / "audio", thresholds=0.5)
    narrow = build_tiny_head(tmp_path / "narrow", classes=CLASSES, embedding_size=16)
    with pytest.raises(ModelError, match="1024-d embeddings but the head"):
        run(tmp_path / "audio", model=narrow, output=tmp_path / "narrow_out")
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "narrow_out" / "scores").exists()


def test_local_cluster_is_started_when_no_client(
    make_audio, tmp_path, tiny_embedder, tiny_model, capsys
):
    import dask

    make_audio("a.wav", n_samples=2 * FRAME)
    with dask.config.set({"buzzdask.local-cluster.dashboard-address": ":0"}):
        result = buzzdask.analyze(
            tmp_path / "audio",
            tiny_model,
            output=tmp_path / "out",
            embedder=str(tiny_embedder),
            progress=False,
            verbose=True,
        )
    assert len(result.to_pandas()) == 2
    assert "dashboard" in capsys.readouterr().out


def _assert_same_frames(
    result: buzzdask.AnalysisResult, reference: buzzdask.AnalysisResult
) -> None:
    frame = result.to_pandas()
    assert not frame.duplicated(["file", "start"]).any()
    assert_same_frames(frame, reference.to_pandas())


@pytest.fixture
def kill_corpus(make_audio, tmp_path, tiny_embedder, tiny_model):
    """Three 30-frame files and their uninterrupted analysis (1-frame chunks: many tasks)."""
    for seed in range(3):
        make_audio(f"f{seed}.wav", n_samples=30 * FRAME, seed=seed)
    options = {
        "model": tiny_model,
        "embedder": str(tiny_embedder),
        "chunk_seconds": 1.0,
        "progress": False,
    }
    reference = buzzdask.analyze(tmp_path / "audio", output=tmp_path / "ref", **options)
    return tmp_path / "audio", options, reference


@pytest.mark.parametrize(
    ("victim", "cpu_scorers"), [("scorer", 1), ("decoder", 1), ("one of two scorers", None)]
)
def test_worker_killed_mid_run_loses_nothing(kill_corpus, tmp_path, victim, cpu_scorers):
    """SIGKILL a worker process mid-run: the one holding the only actor (re-created on a live
    worker), a decoding one, or one of two workers that both decode and score (the other
    scorer goes on). The kill lands while the victim holds score (or decode) tasks and chunks
    are still to be written; the chunks it held are re-sent or recomputed, and the same run
    finishes with every frame exactly once."""
    import dask
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    kind = "decode" if victim == "decoder" else "score"  # the tasks it must hold when killed
    with (
        dask.config.set({"buzzdask.cpu-scorer-workers": cpu_scorers}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        # With one scorer it goes to the first worker in address order, decoding to the other.
        workers = sorted(client.scheduler_info()["workers"])
        target = workers[1] if victim == "decoder" else workers[0]
        pid = client.run(os.getpid, workers=[target])[target]

        def in_flight() -> list[str]:
            keys = client.processing(workers=[target])[target]
            return [key for key in keys if key.startswith(f"{kind}-")]

        with MidRunKiller(
            pid, tmp_path / "out" / "scores", total=KILL_CHUNKS, in_flight=in_flight
        ) as killer:
            result = buzzdask.analyze(
                audio, output=tmp_path / "out", client=client, **options, **KILL_PACING
            )
        # Nothing of the run's left on the user's cluster: a scorer's model, a decoded chunk.
        wait_until(lambda: not client.futures, timeout_s=10, failure=lambda: str(client.futures))
    assert killer.kill is not None and killer.kill.tasks
    assert 0 < killer.kill.written < KILL_CHUNKS
    assert result.ok, result.errors
    summary = result.summary
    # The score tasks a killed scorer held failed with it: their chunks went to a live scorer.
    assert summary["chunks_resent"] >= 1 if kind == "score" else summary["chunks_resent"] == 0
    if victim == "scorer":
        assert (summary["scorers_lost"], summary["scorer_restarts"]) == (1, 1)
    elif victim == "decoder":
        assert (summary["scorers_lost"], summary["scorer_restarts"]) == (0, 0)
    else:
        # Not waited for; the nanny's replacement worker may join in time to get a scorer.
        assert summary["scorers_lost"] == 1
        assert summary["scorer_restarts"] in (0, 1)
        assert target not in {s["worker"] for s in summary["scorers"]}
    _assert_same_frames(result, reference)


def _kill_once(pid: int, ready: Callable[[], bool]) -> tuple[threading.Thread, threading.Event]:
    """SIGKILL ``pid`` from a thread as soon as ``ready()``; the thread and its "killed" event
    (set it to stop the thread without a kill)."""
    return _kill_when(lambda: pid if ready() else None)


def _kill_when(victim: Callable[[], int | None]) -> tuple[threading.Thread, threading.Event]:
    """SIGKILL the process ``victim()`` names from a thread, as soon as it names one; the
    thread and its "killed" event (set it to stop the thread without a kill)."""
    killed = threading.Event()

    def kill_when_ready() -> None:
        while not killed.is_set():
            pid = victim()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    return killer, killed


def _score_sent(dask_scheduler: Any) -> bool:
    return any(str(key).startswith("score-") for key in dask_scheduler.tasks)


def _scorers_up(dask_scheduler: Any) -> int:
    """Scorer actors loaded (their tasks done)."""
    return sum(
        str(key).startswith("scorer-") and task.state == "memory"
        for key, task in dask_scheduler.tasks.items()
    )


def _loading_scorers(dask_scheduler: Any) -> list[str]:
    """Workers of the scorer actors that are still loading."""
    return [
        task.processing_on.address
        for key, task in dask_scheduler.tasks.items()
        if str(key).startswith("scorer-") and task.processing_on is not None
    ]


def test_worker_killed_while_its_scorer_loads_loses_nothing(kill_corpus, tmp_path):
    """SIGKILL the worker of the only scorer while the scorer is still loading (before any
    chunk could be scored): the run starts one on a live worker and finishes, every frame
    exactly once, instead of waiting for the dead worker."""
    import dask
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    with (
        dask.config.set({"buzzdask.cpu-scorer-workers": 1}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        # The one scorer goes to the first worker in address order.
        target = sorted(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[target])[target]
        killer, killed = _kill_once(
            pid,
            lambda: any(
                key.startswith("scorer-")
                for key in client.processing(workers=[target]).get(target, [])
            ),
        )
        result = buzzdask.analyze(
            audio, output=tmp_path / "out", client=client, **options, **KILL_PACING
        )
        killed.set()
        killer.join()
    assert result.ok, result.errors
    summary = result.summary
    assert (summary["scorers_lost"], summary["scorer_restarts"]) == (1, 1)
    assert target not in {s["worker"] for s in summary["scorers"]}
    _assert_same_frames(result, reference)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kills", [1, 2], ids=["once", "again-as-its-scorer-loads"])
def test_the_only_worker_killed_as_scoring_starts_loses_nothing(kill_corpus, tmp_path, kills):
    """A laptop's one worker SIGKILLed once a score task is sent to it (it waits there for its
    decoded audio and the scorer): its nanny starts another, the scorer starts there, and the
    run finishes, every frame once. The score task had the lost actor as a dependency, and
    Dask left it waiting on it for good: the run hung without a word.

    Killed again while the new scorer loads (a laptop short of memory): its task, placed on a
    worker that left with no other there, is one Dask never runs again; it hung the run too,
    until the wait for it looked at the cluster."""
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        (target,) = client.scheduler_info()["workers"]
        pid = client.run(os.getpid)[target]
        killers = [_kill_once(pid, lambda: client.run_on_scheduler(_score_sent))]
        if kills == 2:

            def the_next_worker_as_its_scorer_loads() -> int | None:
                if not killers[0][1].is_set():
                    return None
                others = [a for a in client.run_on_scheduler(_loading_scorers) if a != target]
                return client.run(os.getpid, workers=others[:1]).get(others[0]) if others else None

            killers.append(_kill_when(the_next_worker_as_its_scorer_loads))
        result = buzzdask.analyze(
            audio, output=tmp_path / "out", client=client, **options, **KILL_PACING
        )
        for killer, killed in killers:
            assert killed.is_set()
            killer.join()
    assert result.ok, result.errors
    assert result.summary["scorers_lost"] == kills
    _assert_same_frames(result, reference)


@pytest.mark.timeout(300)
def test_both_scorers_killed_at_once_are_said_lost_together(kill_corpus, tmp_path):
    """Both workers of a cluster SIGKILLed at once, each with a scorer (as when a SLURM job of
    several workers is cancelled): the first loss said "1 other scorer(s) go on" of the scorer
    lost with it. Both count as lost, one is restarted, and the run finishes, every frame
    once."""
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())

        def both_once_scoring() -> int | None:
            if not client.run_on_scheduler(_score_sent) or client.run_on_scheduler(_scorers_up) < 2:
                return None
            os.kill(pids[0], signal.SIGKILL)
            return pids[1]

        killer, killed = _kill_when(both_once_scoring)
        result = buzzdask.analyze(
            audio, output=tmp_path / "out", client=client, **options, **KILL_PACING
        )
        assert killed.is_set()
        killer.join()
    assert result.ok, result.errors
    assert result.summary["scorers_lost"] == 2
    log = (tmp_path / "out" / "buzzdask.log").read_text()
    # Said together where the scheduler has heard of both deaths as the first is handled; it
    # may still list the other worker for a moment (a loaded machine), which is then said
    # lost on its own, next: either way, one restart, not "go on" with no scorer left.
    together = r"scorers on \S+, \S+ were lost: restarting one on "
    in_turn = r"was lost: 1 other scorer\(s\) go on(.|\n)*was lost: restarting it on "
    assert re.search(together, log) or re.search(in_turn, log), log
    _assert_same_frames(result, reference)


def test_a_cluster_closed_mid_run_is_said_and_recorded_and_a_resume_finishes(kill_corpus, tmp_path):
    """The user's cluster goes (closed from the notebook, its SLURM job ended) while the run
    writes: a ClusterError that says so, the output marked failed, and a resume completes it."""
    import threading

    from distributed import Client, LocalCluster

    from buzzdask import ClusterError

    audio, options, reference = kill_corpus
    scores = tmp_path / "out" / "scores"
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):

        def close_once_a_partition_lands() -> None:
            wait_until(
                lambda: any(scores.rglob("*.parquet")),
                timeout_s=120,
                failure="no partition written",
                interval_s=0.01,
            )
            cluster.close()

        closer = threading.Thread(target=close_once_a_partition_lands, daemon=True)
        closer.start()
        with pytest.raises(ClusterError, match="the Dask scheduler is gone"):
            buzzdask.analyze(
                audio, output=tmp_path / "out", client=client, **options, **KILL_PACING
            )
        closer.join()
    metadata = json.loads((tmp_path / "out" / "buzzdask.json").read_text())
    assert metadata["status"] == "failed"
    assert metadata["stopped_by"].startswith("ClusterError: the Dask scheduler is gone")
    resumed = buzzdask.analyze(audio, output=tmp_path / "out", on_conflict="resume", **options)
    # (What it trusts depends on where the close fell: partitions whose score task's answer
    # never reached the client were not journalled, and are done again.)
    assert resumed.ok
    assert resumed.metadata["earlier_runs"][-1]["status"] == "failed"
    _assert_same_frames(resumed, reference)


def test_one_run_at_a_time_on_a_users_client(kill_corpus, tmp_path):
    """A second run on the client while one runs (a notebook's two threads) is refused at once,
    and leaves no output; an asynchronous client is refused too."""
    import asyncio
    import threading

    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus

    def stealing_runs(dask_scheduler: object) -> bool:
        return "stealing" in dask_scheduler.periodic_callbacks  # type: ignore[attr-defined]

    with (
        LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        assert client.run_on_scheduler(stealing_runs)  # Dask's default
        results: list[object] = []
        first = threading.Thread(
            target=lambda: results.append(
                buzzdask.analyze(
                    audio, output=tmp_path / "first", client=client, **options, **KILL_PACING
                )
            )
        )
        first.start()
        wait_until(
            (tmp_path / "first" / "journal.jsonl").exists, timeout_s=120, failure="no journal"
        )
        # Work stealing, on in a user's cluster, is paused while a run holds it: it moved a
        # scorer being started onto another worker, and Dask then dropped a worker for good.
        assert not client.run_on_scheduler(stealing_runs)
        with pytest.raises(ParameterError, match="another buzzdask run is on this client now"):
            buzzdask.analyze(audio, output=tmp_path / "second", client=client, **options)
        first.join()
        assert not (tmp_path / "second").exists()
        _assert_same_frames(results[0], reference)
        assert client.run_on_scheduler(stealing_runs)  # as it was
        # The client is free again once the run ends.
        again = buzzdask.analyze(audio, output=tmp_path / "again", client=client, **options)
        assert again.ok

    async def asynchronous() -> None:
        async with Client(cluster_address, asynchronous=True) as async_client:
            with pytest.raises(ParameterError, match=r"client is asynchronous"):
                buzzdask.analyze(audio, output=tmp_path / "async", client=async_client, **options)

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        cluster_address = cluster.scheduler_address
        asyncio.run(asynchronous())
    assert not (tmp_path / "async").exists()


class _Latch:
    """An actor whose call returns once a task has run :func:`_release`.

    They meet through files in ``directory``: the workers are processes of their own.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def score(self, chunks: list[str]) -> list[str]:
        (self.directory / "called").touch()
        wait_until(
            (self.directory / "released").exists,
            timeout_s=60,
            failure="no task released the call: the worker's thread was held",
            interval_s=0.01,
        )
        return chunks


def _release(directory: str) -> None:
    (Path(directory) / "released").touch()


def test_a_score_task_waiting_on_an_actor_elsewhere_leaves_its_worker_thread(tmp_path) -> None:
    """A score task that runs away from its actor (its worker died: Dask ran it elsewhere) waits
    through the actor's handle; that wait may need a task queued on its own worker (Dask runs the
    lost actor's task again, and the handle waits for it), so it must not hold the thread."""
    from distributed import Client, LocalCluster

    from buzzdask.score import _call

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        actor_worker, task_worker = sorted(client.scheduler_info()["workers"])
        latch = client.submit(_Latch, str(tmp_path), actor=True, workers=[actor_worker]).result()
        waiting = client.submit(_call, latch, "score", ["a", "b"], workers=[task_worker])
        # A task that fails before it calls the actor shows its own error, not a timeout.
        wait_until(
            lambda: (tmp_path / "called").exists() or waiting.done(),
            timeout_s=60,
            failure=lambda: f"the actor was not called: {waiting.status}",
            interval_s=0.01,
        )
        assert (tmp_path / "called").exists(), waiting.result()
        # The task worker's only thread was the waiting task's: this one needs it back.
        released = client.submit(_release, str(tmp_path), workers=[task_worker])
        assert waiting.result(timeout=90) == ["a", "b"]
        released.result(timeout=5)


def _only_on(address: str) -> int:
    """A task that fails anywhere but on ``address`` (as a score task run away from its actor)."""
    from distributed import get_worker

    if get_worker().address != address:
        raise ScorerError("its scorer was lost with its worker")
    return 1


def _finished_then_lost(client: Any, *, allow_other_workers: bool) -> Any:
    """A task of :func:`_only_on` that finished, then lost its worker (SIGKILL) before its
    result was read."""
    holder = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[holder])[holder]
    future = client.submit(
        _only_on, holder, workers=[holder], allow_other_workers=allow_other_workers
    )
    wait_until(future.done, timeout_s=60, failure="the task did not finish")
    os.kill(pid, signal.SIGKILL)
    return future


@pytest.mark.parametrize("attempt", range(3))
def test_a_result_lost_as_it_is_read_is_an_outcome_and_leaves_no_future(attempt) -> None:
    """A score task finished, then its worker died before the result was read: Dask computes it
    again, elsewhere, where it fails. That error is the chunk's outcome, and the task's future
    goes as soon as the loop lets go of it (it stayed on the user's cluster, held by Dask's own
    frames in a reference cycle, until Python's garbage collector ran). Repeated: the kill and
    the read race."""
    from distributed import Client, LocalCluster

    from buzzdask.pipeline import outcome

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        future = _finished_then_lost(client, allow_other_workers=True)
        result = outcome(future)
        del future  # the client lets go of its key in its own thread
        assert isinstance(result, ScorerError), result
        wait_until(lambda: not client.futures, timeout_s=10, failure=lambda: str(client.futures))


def test_a_result_lost_that_cannot_be_computed_again_is_not_waited_for_good() -> None:
    """A score task runs only beside its actor: lost with the actor's worker as it is read,
    Dask's recompute waits for that worker for good, and so did the run (CI, a SLURM job of
    the scorer scancelled). Read with a time limit, the loop gets control back to ask whether
    the scorer lives (:meth:`ChunkPipeline._results`)."""
    from distributed import Client, LocalCluster

    from buzzdask.pipeline import outcome

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        future = _finished_then_lost(client, allow_other_workers=False)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            outcome(future, timeout_s=2)
        assert time.monotonic() - started < 30


def test_the_scorer_starts_on_a_running_worker_not_a_paused_one(kill_corpus, tmp_path):
    """A worker paused (its memory full) as the run starts does not get the scorer: Dask would
    run the actor's task elsewhere, where it refuses to load. The scorer goes to the running
    worker, and nothing counts as lost. (A worker lost while its scorer loads:
    test_worker_killed_while_its_scorer_loads_loses_nothing.)"""
    import dask
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    with (
        dask.config.set({"buzzdask.cpu-scorer-workers": 1}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        # The one scorer would go to the first worker in address order.
        paused, running = sorted(client.scheduler_info()["workers"])
        _pause(client, paused)
        result = buzzdask.analyze(audio, output=tmp_path / "out", client=client, **options)
    assert result.ok, result.errors
    assert [s["worker"] for s in result.summary["scorers"]] == [running]
    assert (result.summary["scorers_lost"], result.summary["scorer_restarts"]) == (0, 0)
    _assert_same_frames(result, reference)


def test_a_stopped_worker_holds_up_neither_the_start_nor_the_end_of_a_run(kill_corpus, tmp_path):
    """A worker that does not answer (its job suspended, its node hung on a file system): the
    run's start gives every worker its log plugins, its end asks every worker its peak memory,
    and each would wait for it until Dask gave it up (``worker-ttl``, 300 s). Each waits
    ``scorer-ping-seconds``, the log says so, and the summary has the other worker's memory.
    (Stopped while paused, so that it holds no task: a worker stopped mid-task is Dask's to
    give up.)"""
    import dask
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    with (
        dask.config.set({"buzzdask.cpu-scorer-workers": 1, "buzzdask.scorer-ping-seconds": 1}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        stopped, running = sorted(client.scheduler_info()["workers"])
        _pause(client, stopped)
        pid = client.run(os.getpid, workers=[stopped])[stopped]
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = buzzdask.analyze(audio, output=tmp_path / "out", client=client, **options)
            took = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
    assert result.ok, result.errors
    assert took < 120, took  # not a speed: waiting for the stopped worker takes worker-ttl
    assert list(result.summary["peak_rss_bytes"]) == [running]
    assert [s["worker"] for s in result.summary["scorers"]] == [running]
    log = (tmp_path / "out" / "buzzdask.log").read_text()
    assert "a worker has not answered for 1 s" in log
    assert f"no answer within 1 s from {stopped}: peak memory left out" in log
    _assert_same_frames(result, reference)


def test_a_cluster_without_workers_is_said_so(
    make_audio, tmp_path, tiny_embedder, tiny_model, caplog
):
    """Its jobs still queued, or its workers stopped by a notebook's interrupt: said as the
    wait begins, then a ClusterError after scorer-restart-seconds (Dask's own
    WorkerStartTimeoutError after a fixed 300 s)."""
    from distributed import Client, LocalCluster

    make_audio("a.wav", n_samples=3 * 15360)
    with (
        dask.config.set({"buzzdask.scorer-restart-seconds": 2}),
        LocalCluster(n_workers=0, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        pytest.raises(ClusterError, match=r"no worker joined the cluster at tcp://.* within 2 s"),
    ):
        buzzdask.analyze(
            tmp_path / "audio",
            tiny_model,
            output=tmp_path / "out",
            client=client,
            embedder=str(tiny_embedder),
            progress=False,
        )
    assert "has no worker: waiting up to 2 s for one to join" in caplog.text


def test_a_stopped_scorer_is_reported_not_waited_for(tiny_embedder, tiny_model):
    """The run's end asks each scorer its counters: one whose worker has stopped answering
    gets ``scorer-ping-seconds``, and the summary says why its counters are missing."""
    from distributed import Client, LocalCluster

    from buzzdask.models import resolve_model
    from buzzdask.scorers import ScorerPool
    from buzzdask.settings import load_settings

    model = resolve_model(tiny_model, embedder=str(tiny_embedder))
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        pool = ScorerPool.from_settings(
            client,
            replace(load_settings(), scorer_ping_seconds=1),
            head_path=model.path,
            embedder_handle=model.embedder.handle,
            spec=model.embedder.frame_spec(),
            n_classes=len(model.classes),
            key_prefix="scorer",
            cpu_scorer_workers=1,
        )
        ((address, future),) = pool.start().items()
        future.result(timeout=120)
        pool.started(address)
        assert pool.stats()[0]["frames_scored"] == 0
        pid = client.run(os.getpid)[address]
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            stats = pool.stats()
            took = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
    assert stats == [{"worker": address, "error": "no answer within 1 s"}]
    assert took < 60, took  # not a speed: waiting for the stopped worker takes worker-ttl


def _pause(client, address: str) -> None:
    """Pause a worker as its memory being full would: Dask gives it no task."""
    from distributed.core import Status

    def pause(dask_worker) -> None:
        dask_worker.memory_manager.memory_pause_fraction = False  # or its monitor resumes it
        dask_worker.status = Status.paused

    client.run(pause, workers=[address])
    wait_until(
        lambda: client.scheduler_info()["workers"][address]["status"] == "paused",
        timeout_s=30,
        failure=f"the scheduler never saw {address} paused",
        interval_s=0.01,
    )


def test_every_cpu_worker_scores_with_its_share_of_the_cores(kill_corpus, tmp_path):
    """Without GPUs each worker holds a scorer once work waits for one (small score tasks
    here), with TensorFlow's threads split between the two scorers of this host; results are
    those of any other layout."""
    from distributed import Client, LocalCluster

    audio, options, reference = kill_corpus
    with (
        LocalCluster(n_workers=2, threads_per_worker=2, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        result = buzzdask.analyze(
            audio, output=tmp_path / "out", client=client, **options, **KILL_PACING
        )
        pools = client.run(_tensorflow_threads)
    scorers = result.summary["scorers"]
    assert sorted(s["worker"] for s in scorers) == sorted(pools)
    # Which scorer gets which chunk depends on timing; together they scored each frame once.
    assert sum(s["frames_scored"] for s in scorers) == result.summary["frames"]
    # Batches of 4 frames leave one embedder call at a time, its operations on the host's half.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert set(pools.values()) == {(share, 1)}
    _assert_same_frames(result, reference)


def test_a_short_run_loads_the_model_once(run, make_audio, tmp_path):
    """One scorer is enough for one short file: the second worker's is never started."""
    make_audio("short.wav", n_samples=7 * FRAME)
    result = run(tmp_path / "audio")
    assert result.ok, result.errors
    assert len(result.summary["scorers"]) == 1


def _tensorflow_threads() -> tuple[int, int]:
    import tensorflow as tf

    threading = tf.config.threading
    return (
        threading.get_intra_op_parallelism_threads(),
        threading.get_inter_op_parallelism_threads(),
    )


def test_client_killed_mid_run_resume_completes(kill_corpus, tmp_path):
    """SIGKILL the process running analyze() with chunks written and chunks to go; a resume
    finishes the output exactly once, the same frames as an uninterrupted run."""
    audio, options, reference = kill_corpus
    script = (
        "import sys, buzzdask\n"
        "buzzdask.analyze(sys.argv[1], sys.argv[2], output=sys.argv[3], embedder=sys.argv[4],"
        f" chunk_seconds=1.0, progress=False, **{KILL_PACING!r})\n"
    )
    output = tmp_path / "out"
    killer = kill_client_mid_run(
        script,
        audio,
        options["model"],
        output,
        options["embedder"],
        output=output,
        total=KILL_CHUNKS,
    )
    # Its workers may finish what they held after the client died, not the whole run.
    written = killer.written()
    assert 0 < written < KILL_CHUNKS
    journaled = len(OutputLayout(output).read_journal())
    assert journaled >= 1
    # Exported meanwhile for buzzr: a recording not analysed to its end is buzzdetect's
    # partial result (which buzzr leaves out by default), never a whole one.
    lengths = reference.to_pandas().groupby("file").size()

    def partial_exported(overwrite: bool) -> list[Path]:
        exported = buzzdask.export(output, format="buzzdetect", overwrite=overwrite).files
        partial = [path for path in exported if path.name.endswith("_buzzpart.csv")]
        for path in exported:
            if path not in partial:
                rows = len(pd.read_csv(path))
                assert rows == lengths[path.name.replace("_buzzdetect.csv", ".wav")]
        return partial

    partial = partial_exported(overwrite=False)
    assert partial
    outside = tmp_path / "for_buzzr"  # a folder of exports for buzzr, beside the output
    buzzdask.export(output, format="buzzdetect", dest=outside)
    # A resume given one recording (a whole one where there is one) marks the run complete;
    # the partial ones it did not name stay partial for buzzr.
    names = {path.name.split("_buzz")[0] for path in partial}
    named = min({f"f{seed}" for seed in range(3)} - names or names)
    buzzdask.analyze(audio / f"{named}.wav", output=output, on_conflict="resume", **options)
    assert buzzdask.open_run(output).complete
    assert partial_exported(overwrite=True)
    journaled = len(OutputLayout(output).read_journal())

    resumed = buzzdask.analyze(audio, output=output, on_conflict="resume", **options)
    assert resumed.ok, resumed.errors
    # Workers write the partitions and the client journals them: a chunk written but not yet
    # journaled when the client died is scored again (its partition replaced atomically).
    assert resumed.summary["chunks_skipped_resume"] == journaled
    _assert_same_frames(resumed, reference)
    # The export replaced: every recording whole, the partial files gone.
    replaced = buzzdask.export(output, format="buzzdetect", overwrite=True).files
    whole = [f"f{seed}_buzzdetect.csv" for seed in range(3)]
    assert sorted(p.name for p in replaced[0].parent.glob("*.csv")) == whole
    # Moved (copied off the cluster) and exported again beside it: the partial files go.
    moved = output.rename(tmp_path / "moved")
    buzzdask.export(moved, format="buzzdetect", dest=outside, overwrite=True)
    assert sorted(p.name for p in outside.glob("*.csv")) == whole


@pytest.mark.parametrize(
    ("launcher", "signal_number", "exit_code", "said"),
    [
        ((BUZZDASK,), signal.SIGINT, EXIT_INTERRUPTED, "interrupted"),
        (
            (BUZZDASK,),
            signal.SIGTERM,
            EXIT_TERMINATED,
            "stopped by SIGTERM (a job's time limit, or scancel)",
        ),
        # Its cluster module imports dask_jobqueue, whose import took Ctrl-C over (exit 0).
        (
            (sys.executable, "-m", "buzzdask.cluster"),
            signal.SIGINT,
            EXIT_INTERRUPTED,
            "interrupted",
        ),
    ],
    ids=["sigint", "sigterm", "cluster-sigint"],
)
def test_ctrl_c_mid_run_ends_the_command_cleanly_and_a_resume_completes(
    kill_corpus, tmp_path, launcher, signal_number, exit_code, said
):
    """Ctrl-C (SIGINT to the command's whole process group, as a terminal sends it: its
    workers and ffmpeg too), or SIGTERM to the group (as SLURM sends it to a job's processes at
    its time limit), with chunks written and chunks to go: the command says what it left,
    without a traceback, and exits 130 (143); --resume finishes the output exactly once. The
    same through ``python -m buzzdask.cluster ... analyze`` (a local cluster)."""
    audio, options, reference = kill_corpus
    output = tmp_path / "out"
    command = [
        *launcher,
        *("analyze", str(audio), "--output", str(output), "--no-progress"),
        *("--model", str(options["model"]), "--embedder", options["embedder"]),
        *("--chunk-seconds", "1", "--batch-frames", str(KILL_PACING["batch_frames"])),
        *("--memory-budget", str(KILL_PACING["memory_budget"])),
    ]
    # SIGINT to the whole group, once a chunk is journalled (the client journals what the
    # workers wrote): a resume provably skips something.
    _, done = signal_client_mid_run(
        command,
        output=output,
        total=KILL_CHUNKS,
        signal_number=signal_number,
        whole_group=True,
    )
    stderr = done.stderr
    assert done.returncode == exit_code, stderr
    assert f"buzzdask: {said}; what was written is kept" in stderr
    assert "Traceback" not in stderr
    # The run's log says it was stopped, not that it failed.
    log = (output / "buzzdask.log").read_text()
    stop = "SIGTERM" if signal_number == signal.SIGTERM else "Ctrl-C"
    assert f"WARNING buzzdask: run interrupted ({stop})" in log and "run failed" not in log, log
    # And its buzzdask.json: interrupted, not "running" as a run killed outright stays.
    stopped = json.loads((output / "buzzdask.json").read_text())
    assert (stopped["status"], stopped["stopped_by"]) == ("interrupted", stop)
    assert stopped["finished"] >= stopped["started"]

    journaled = len(OutputLayout(output).read_journal())
    assert 1 <= journaled < KILL_CHUNKS

    resumed = buzzdask.analyze(audio, output=output, on_conflict="resume", **options)
    assert resumed.ok, resumed.errors
    assert resumed.summary["chunks_skipped_resume"] == journaled
    (earlier,) = resumed.metadata["earlier_runs"]
    assert (earlier["status"], earlier["stopped_by"]) == ("interrupted", stop)
    # With what it wrote before the stop (a summary of the stopped run, not "null").
    assert earlier["chunks_written"] == journaled
    assert earlier["frames"] > 0 and earlier["wall_seconds"] > 0
    assert "stopped_by" not in resumed.metadata  # this run finished
    _assert_same_frames(resumed, reference)


def test_a_ctrl_c_python_drops_in_a_finaliser_still_stops_the_run(
    kill_corpus, dask_client, tmp_path, monkeypatch
):
    """A Ctrl-C that lands as a finaliser runs (a Dask future's ``__del__``, many a second):
    Python drops its KeyboardInterrupt, with an "Exception ignored in" traceback. A terminal's
    Ctrl-C ends the local cluster's workers too, and the run went on waiting for them, asleep,
    for good. It stops at the loop's next turn instead, without that traceback, keeping what
    it wrote; a resume completes it."""
    from buzzdask.ledger import FileLedger

    said: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", said.append)  # where Python prints them

    audio, options, reference = kill_corpus
    scored = FileLedger.scored

    class Finalised:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)

    def interrupted_in_a_finaliser(self, job, result):
        monkeypatch.setattr(FileLedger, "scored", scored)  # once
        Finalised()  # collected at once: the KeyboardInterrupt lands in its __del__
        return scored(self, job, result)

    monkeypatch.setattr(FileLedger, "scored", interrupted_in_a_finaliser)
    output = tmp_path / "out"
    # Ctrl-C as Python sets it up, whatever this test run inherited (a background job's
    # shell ignores it).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            buzzdask.analyze(audio, output=output, client=dask_client, **options, **KILL_PACING)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert not said
    journaled = len(OutputLayout(output).read_journal())
    assert 1 <= journaled < KILL_CHUNKS
    resumed = buzzdask.analyze(
        audio, output=output, client=dask_client, on_conflict="resume", **options
    )
    assert resumed.summary["chunks_skipped_resume"] == journaled
    _assert_same_frames(resumed, reference)


def test_a_stop_as_the_run_ends_is_recorded_as_a_stop(
    dask_client, make_audio, tiny_model, tiny_embedder, tmp_path, monkeypatch, capsys
):
    """SIGTERM (a job's time limit) once every chunk is written, as the run closes: its
    buzzdask.json says it was stopped (it said "running", as a run killed outright), and a
    resume completes it."""
    from buzzdask import analysis
    from buzzdask.cli import main
    from buzzdask.status import run_status

    audio = make_audio("a.wav", n_samples=3 * FRAME)
    measured = analysis.peak_rss_by_worker

    def stopped_meanwhile(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return measured(*args, **kwargs)

    monkeypatch.setattr(analysis, "peak_rss_by_worker", stopped_meanwhile)
    output = tmp_path / "out"
    command = [
        *("analyze", str(audio), "--model", str(tiny_model), "--output", str(output)),
        *("--embedder", str(tiny_embedder), "--no-progress", "--chunk-seconds", "1"),
        *("--scheduler", dask_client.scheduler.address),
    ]
    assert main(command) == EXIT_TERMINATED
    assert "stopped by SIGTERM" in capsys.readouterr().err
    metadata = json.loads((output / "buzzdask.json").read_text())
    assert (metadata["status"], metadata["stopped_by"]) == ("interrupted", "SIGTERM")
    # Not "--resume finishes it": there is nothing left to analyse.
    (status,) = run_status(output)
    said = status.describe()
    assert "next: the same buzzdask analyze command with --resume records it complete" in said
    monkeypatch.setattr(analysis, "peak_rss_by_worker", measured)
    assert main([*command, "--resume"]) == 0
    assert "nothing left to analyse (3 chunks done before)" in capsys.readouterr().out
    assert json.loads((output / "buzzdask.json").read_text())["status"] == "complete"


def test_node_local_staging_gives_the_same_frames(run, make_audio, tmp_path):
    """With staging, each decode reads a copy on the worker's local disk: same frames."""
    import dask

    make_audio("a.mp3", n_samples=5 * FRAME)
    make_audio("b.wav", n_samples=3 * FRAME, seed=1)
    in_place = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "in_place")
    local_disk = tmp_path / "node-local"
    settings = {"buzzdask.staging.enabled": True, "buzzdask.staging.directory": str(local_disk)}
    with dask.config.set(settings):
        staged = run(tmp_path / "audio", chunk_seconds=2.0, output=tmp_path / "staged")
    assert staged.ok, staged.errors
    assert local_disk.is_dir()  # the workers staged their copies there
    assert_same_frames(staged.to_pandas(), in_place.to_pandas())


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (96000, 6)])
def test_odd_rates_and_channel_counts_are_analysed(
    run, tmp_path, tiny_embedder, tiny_model, rate, channels
):
    """8 kHz mono (old recorders) and 96 kHz 6-channel audio are inputs, not errors: chunked
    results equal a whole-file reference built from an independent soxr decode."""
    soxr = pytest.importorskip("soxr")
    from tests.conftest import field_like, write_wav

    source = field_like(7 * rate + 321, rate, channels, seed=channels)
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "odd.wav", source, rate)
    pcm = np.round(source * 32767) / 32768  # what the 16-bit file holds
    waveform = soxr.resample(pcm.mean(axis=1), rate, 16000, quality="HQ").astype(np.float32)
    result = run(tmp_path / "audio", chunk_seconds=2.0)
    assert result.ok, result.errors
    frame = result.to_pandas()
    # Chunked equals whole-file decoding (resampled chunks differ from the whole-file decode
    # by float32 rounding, <= 4e-7 per sample, which the tiny model's log-mel amplifies)...
    starts, whole = reference_activations(
        tmp_path / "audio" / "odd.wav", embedder=tiny_embedder, model=tiny_model
    )
    np.testing.assert_array_equal(frame.start.to_numpy(), starts)
    np.testing.assert_allclose(activations(frame), whole, atol=1e-4, rtol=1e-4)
    # ...which is the mean-then-soxr input (the python soxr flushes the stream's last
    # milliseconds a little differently: 1e-4 on the last frame of the 96 kHz file).
    _, independent = reference_activations(waveform, embedder=tiny_embedder, model=tiny_model)
    np.testing.assert_allclose(activations(frame), independent, atol=3e-4, rtol=0)


def _as_any_user() -> list[str]:
    """The command prefix under which file modes apply: as root, without the capabilities that
    let it ignore them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop the DAC capabilities")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"]


@pytest.mark.parametrize("case", ["output read-only", "journal read-only", "new beside"])
def test_an_output_that_cannot_be_written_is_one_line(
    run, make_audio, tmp_path, tiny_embedder, tiny_model, case
):
    """A labmate's results, a read-only mount: one line naming the output and why, not a
    traceback; and nothing started."""
    make_audio("a.wav", n_samples=3 * FRAME)
    output = tmp_path / "shared" / "out"
    if case == "output read-only":
        output.mkdir(parents=True)
        locked = output
    else:
        run(tmp_path / "audio", output=output)
        locked = output / "journal.jsonl" if case == "journal read-only" else output.parent
    mode = locked.stat().st_mode
    locked.chmod(0o555 if locked.is_dir() else 0o444)
    flag = {"journal read-only": "--resume", "new beside": "--new"}.get(case, "--no-progress")
    command = [
        *_as_any_user(),
        *(BUZZDASK, "analyze", str(tmp_path / "audio"), "--output", str(output), flag),
        *("--model", str(tiny_model), "--embedder", str(tiny_embedder), "--no-progress"),
    ]
    env = {**os.environ, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        locked.chmod(mode)  # so pytest can clean up
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    [line] = [line for line in done.stderr.splitlines() if "error:" in line]
    if case == "new beside":
        assert line.startswith(f"buzzdask: error: cannot create output {output}-"), line
        assert line.endswith("(Permission denied); choose another --output"), line
    else:
        problem = (
            "journal.jsonl: Permission denied"
            if case != "output read-only"
            else ("Permission denied")
        )
        assert line == (
            f"buzzdask: error: cannot write in output {output} ({problem}); give yourself "
            "write access to it or choose another --output"
        )


def test_unreadable_file_and_folder_are_reported(make_audio, tmp_path, tiny_embedder, tiny_model):
    """Permissions: a file and a folder the user may not read are reported, the rest finish.

    Root reads everything, so as root the run drops the capabilities that let it ignore file
    modes (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) and meets the modes as any user would.
    """
    make_audio("good.wav", n_samples=3 * FRAME)
    make_audio("locked.wav", n_samples=3 * FRAME, seed=1).chmod(0)
    make_audio("closed/inner.wav", n_samples=3 * FRAME, seed=2)
    (tmp_path / "audio" / "closed").chmod(0)
    command = [
        *_as_any_user(),
        *(BUZZDASK, "analyze", str(tmp_path / "audio")),
        *("--model", str(tiny_model), "--embedder", str(tiny_embedder)),
        *("--output", str(tmp_path / "out"), "--no-progress"),
    ]
    env = {**os.environ, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        (tmp_path / "audio" / "closed").chmod(0o755)  # so pytest can clean up
    assert done.returncode == 3, done.stderr
    errors = pd.read_parquet(tmp_path / "out" / "errors.parquet").set_index("file")
    assert errors.loc["locked.wav", "reason"] == "permission denied"
    assert "cannot list directory: Permission denied" in errors.loc["closed", "reason"]
    assert "buzzdask: failed: locked.wav: permission denied" in done.stderr
    frame = pd.read_parquet(tmp_path / "out" / "scores", partitioning=None)
    assert set(frame.file) == {"good.wav"} and len(frame) == 3


def test_nothing_is_written_outside_the_output(run, make_audio, tmp_path, caplog):
    """Inputs named with "..", given as absolute paths from two folders, or with odd
    characters all land under output/scores, named after the input; nothing else changes."""
    odd_names = ["site=A/räume #1.wav", "-rf .wav", "100% buzz;'x'.wav"]
    for seed, name in enumerate(odd_names):
        make_audio(name, n_samples=2 * FRAME, seed=seed)
    make_audio("elsewhere.wav", n_samples=2 * FRAME, directory=tmp_path / "other")
    inputs = [
        tmp_path / "audio" / "site=A" / ".." / "-rf .wav",  # ".." in the given path
        (tmp_path / "audio").absolute(),
        (tmp_path / "other" / "elsewhere.wav").absolute(),
    ]
    before = {p for p in tmp_path.rglob("*") if "results" not in p.parts}
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = run(inputs)
    assert result.ok, result.errors
    # pd.read_parquet(scores) would add a "site" column: said, with how to read them.
    assert (
        "1 recording(s) whose names plain Parquet readers misread (audio/site=A/räume #1.wav)"
        in caplog.text
    )
    assert "result.to_pandas(), to_dask(), buzzdask.open_run(output).frames() or" in caplog.text
    # The plain reader as the warning gives it: every recording, no column from a name.
    said = "pd.read_parquet(OUTPUT/'scores', partitioning=None, ignore_prefixes=['.'])"
    assert said in caplog.text
    plain = pd.read_parquet(result.dataset, partitioning=None, ignore_prefixes=["."])
    assert list(plain.columns) == list(result.to_pandas().columns) and len(plain) == 8
    after = {p for p in tmp_path.rglob("*") if "results" not in p.parts}
    assert after == before
    # Names are relative to the inputs' common folder; "-rf .wav" counted once.
    frame = result.to_pandas()
    assert sorted(frame.file.unique()) == sorted(
        ["audio/" + n for n in odd_names] + ["other/elsewhere.wav"]
    )
    written = sorted(p.relative_to(result.dataset) for p in result.dataset.rglob("*.parquet"))
    assert all(".." not in p.parts for p in written) and len(written) == 4


def test_memory_budget_holds_with_many_small_and_a_few_long_files(
    run, make_audio, tmp_path, dask_client
):
    """Mixed load: the decoded audio in flight never exceeds the budget, and the peak resident
    memory of every worker process is measured and reported."""
    for seed in range(12):
        make_audio(f"short/{seed}.wav", n_samples=2 * FRAME, seed=seed)
    for seed in range(2):
        make_audio(f"long/{seed}.flac", n_samples=180 * 16000, seed=seed)  # 11.5 MB decoded
    # One 30 s chunk with margins is about 2 MB of float32: at most two in flight.
    result = run(tmp_path / "audio", chunk_seconds=30.0, memory_budget="5MB")
    assert result.ok, result.errors
    assert len(result.to_pandas()) == 12 * 2 + 2 * int(180 / 0.96)
    summary = result.summary
    assert 0 < summary["peak_decoded_bytes_in_flight"] <= summary["memory_budget_bytes"]
    workers = set(dask_client.scheduler_info()["workers"])
    assert set(summary["peak_rss_bytes"]) == workers
    assert all(peak > 0 for peak in summary["peak_rss_bytes"].values())


def test_workers_write_the_partitions_and_the_client_only_journals(
    run, make_audio, tmp_path, monkeypatch
):
    """A client on a login node does none of the output's I/O: every partition comes from a
    worker process; the client writes only the journal, buzzdask.json and errors.parquet."""
    import buzzdask.write

    written_here: list[str] = []
    write_table = buzzdask.write.write_table

    def record_then_write(table, path):
        written_here.append(str(path))
        write_table(table, path)

    monkeypatch.setattr(buzzdask.write, "write_table", record_then_write)
    make_audio("site/a.wav", n_samples=5 * FRAME)
    make_audio("site/b.wav", n_samples=3 * FRAME + 7, seed=1)
    result = run(tmp_path / "audio", chunk_seconds=2 * 0.96)
    assert result.ok and result.summary["frames"] == 8
    assert [Path(p).name for p in written_here] == ["errors.parquet"]
    partitions = sorted(result.dataset.rglob("chunk-*.parquet"))
    assert (
        len(partitions) == 5
        and len(result.output.joinpath("journal.jsonl").read_text().splitlines()) == 5
    )
