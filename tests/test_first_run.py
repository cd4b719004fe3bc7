"""A first run as a new user makes it, through the CLI: no audio is an error, and no dead ends."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time

import pandas as pd
import pytest

import buzzdask
from buzzdask import InputError, OutputConflictError
from buzzdask.cli import EXIT_ERROR, EXIT_FILES_FAILED, EXIT_OK
from buzzdask.inputs import describe_skipped, scan
from buzzdask.progress import format_audio
from tests.conftest import CLASSES, requires_ffmpeg
from tests.test_cli import buzzdask_cli

FRAME = 15360
CLUSTER_LINE = "started a local Dask cluster"


def timed_cli(*args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = buzzdask_cli(*args)
    return time.perf_counter() - started, done


@pytest.mark.parametrize("folder", ["empty", "mistyped", "text_only"])
def test_no_audio_fails_fast_before_any_cluster(tmp_path, tiny_model, tiny_embedder, folder):
    audio = tmp_path / "audio"
    audio.mkdir()
    if folder == "text_only":
        for name in ("a.txt", "b.txt", "notes.md", ".DS_Store", "c.wav.partial"):
            (audio / name).write_text("not audio")
    given = tmp_path / "audoi" if folder == "mistyped" else audio
    seconds, done = timed_cli(
        "analyze", str(given),
        "--model", str(tiny_model),
        "--embedder", str(tiny_embedder),
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == EXIT_ERROR, done.stderr
    assert seconds < 10
    assert CLUSTER_LINE not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
    if folder == "mistyped":
        assert f"input path(s) not found: {given}" in done.stderr
        return
    assert f"no audio files in {audio}" in done.stderr
    assert ".wav" in done.stderr and "buzzdask.extensions" in done.stderr
    if folder == "text_only":
        assert "5 skipped: 3 other suffix (a.txt, b.txt, notes.md)" in done.stderr
        assert "1 hidden (.DS_Store)" in done.stderr
        assert "1 partial transfer (c.wav.partial)" in done.stderr
    else:
        assert "they hold no files" in done.stderr


@requires_ffmpeg
def test_other_files_beside_audio_are_counted(run, make_audio, tmp_path, caplog):
    make_audio("a.wav", n_samples=2 * FRAME)
    (tmp_path / "audio" / "field notes.txt").write_text("rain at 10:00")
    (tmp_path / "audio" / ".DS_Store").write_text("")  # hidden: not news
    (tmp_path / "audio" / "README.md").write_text("# audio_in/\n")  # as buzzdask init writes
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = run(tmp_path / "audio")
    assert result.ok and len(result.to_pandas()) == 2
    assert result.summary["files_skipped"] == 1
    assert "1 skipped: 1 other suffix (field notes.txt)" in caplog.text
    # Said before the run's log opened: its log keeps it too.
    log = (result.output / "buzzdask.log").read_text()
    assert f"not analysed under {tmp_path / 'audio'}: 1 skipped: 1 other suffix (field" in log


def test_a_file_named_beside_its_folder_is_not_skipped(tmp_path):
    # A video named on the command line with its folder was analysed, and also reported as
    # "not analysed ... 1 skipped: 1 other suffix" (and counted in files_skipped).
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "camera.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("rain")
    found = scan([tmp_path, tmp_path / "camera.mp4"], extensions=[".wav"])
    assert [f.relative for f in found.files] == ["a.wav", "camera.mp4"]
    assert [s.relative for s in found.skipped] == ["notes.txt"]


@requires_ffmpeg
def test_results_written_among_the_inputs_are_not_news(
    run, make_audio, tiny_model, tmp_path, caplog
):
    """An --output inside the input folder: its files are not listed as skipped on a resume,
    nor in a later run's output beside it (one model or several)."""
    make_audio("site/a.wav", n_samples=2 * FRAME)
    audio = tmp_path / "audio"
    run(audio, output=audio / "results")
    other = shutil.copytree(tiny_model, tmp_path / "model_other")
    run(audio, output=audio / "by-model", model=[tiny_model, other])  # a directory per model
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        resumed = run(audio, output=audio / "results", on_conflict="resume")
    assert resumed.ok and resumed.summary["files"] == 1
    assert resumed.summary["chunks_skipped_resume"] == 1
    assert resumed.summary["files_skipped"] == 0
    assert "skipped" not in caplog.text


@requires_ffmpeg
def test_a_failed_start_leaves_an_output_the_right_command_reuses(
    make_audio, dask_client, tiny_model, tiny_embedder, tmp_path
):
    from tests.model_fixtures import build_tiny_head

    make_audio("a.wav", n_samples=3 * FRAME)
    narrow = build_tiny_head(tmp_path / "narrow", classes=CLASSES, embedding_size=16)
    out = tmp_path / "out"
    args = [
        "analyze", str(tmp_path / "audio"),
        "--embedder", str(tiny_embedder),
        "--output", str(out),
        "--scheduler", dask_client.scheduler.address,
        "--no-progress",
    ]  # fmt: skip
    failed = buzzdask_cli(*args, "--model", str(narrow))
    assert failed.returncode == EXIT_ERROR
    assert "embeddings but the head" in failed.stderr
    # Caught as the scorer loaded the model: the output holds the run's log and nothing else.
    assert [p.name for p in out.iterdir()] == ["buzzdask.log"]
    assert "embeddings but the head" in (out / "buzzdask.log").read_text()

    # The right model and another chunk size: nothing was scored, so both are fine.
    right = buzzdask_cli(*args, "--model", str(tiny_model), "--chunk-seconds", "1")
    assert right.returncode == EXIT_OK, right.stderr
    assert "reusing" not in right.stderr
    assert "1/1 files" in right.stdout
    assert len(pd.read_parquet(out / "scores", partitioning=None)) == 3

    again = buzzdask_cli(*args, "--model", str(tiny_model), "--chunk-seconds", "1")
    assert again.returncode == EXIT_ERROR
    assert "already holds results of a finished run (3 chunks); pass --new" in again.stderr
    assert "--resume" in again.stderr and "--new" in again.stderr and "--output" in again.stderr
    assert "on_conflict" not in again.stderr

    differ = buzzdask_cli(
        *args, "--model", str(tiny_model), "--resume", "--threshold", "ins_buzz=1"
    )
    assert differ.returncode == EXIT_ERROR
    assert "chunk_seconds: 0.96 before, 600.0 now" in differ.stderr
    assert "thresholds: {} before, {'ins_buzz': 1.0} now" in differ.stderr
    assert "pass --new instead of --resume" in differ.stderr
    assert "--chunk-seconds 0.96 without --threshold" in differ.stderr
    assert "on_conflict" not in differ.stderr

    with pytest.raises(OutputConflictError) as python:
        buzzdask.analyze(
            tmp_path / "audio",
            tiny_model,
            output=out,
            client=dask_client,
            embedder=str(tiny_embedder),
            on_conflict="resume",
            progress=False,
        )
    assert "pass on_conflict='new' instead of on_conflict='resume'" in str(python.value)
    assert "chunk_seconds=0.96" in str(python.value)
    assert "--" not in str(python.value).replace(str(out), "")


@requires_ffmpeg
@pytest.mark.parametrize("on_conflict", ["error", "resume"])
def test_an_output_without_chunks_is_reused_whatever_its_settings(
    make_audio, dask_client, tiny_model, tiny_embedder, tmp_path, caplog, on_conflict
):
    make_audio("a.wav", n_samples=2 * FRAME)
    out = tmp_path / "out"
    out.mkdir()
    # What a run that failed as its scorers started leaves: metadata, no journal, no partition.
    started = {"status": "running", "fingerprint": {"frames_per_chunk": 1}, "options": {}}
    (out / "buzzdask.json").write_text(json.dumps(started))
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = buzzdask.analyze(
            tmp_path / "audio",
            tiny_model,
            output=out,
            client=dask_client,
            embedder=str(tiny_embedder),
            on_conflict=on_conflict,
            progress=False,
        )
    assert result.output == out and len(result.to_pandas()) == 2
    assert f"reusing {out}" in caplog.text


def test_no_audio_in_python_is_an_input_error(tmp_path, tiny_model, tiny_embedder):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "readme.txt").write_text("")
    with pytest.raises(InputError, match=r"no audio files in .*1 readme \(readme.txt\)"):
        buzzdask.analyze(
            tmp_path / "audio", tiny_model, output=tmp_path / "out", embedder=str(tiny_embedder)
        )
    assert not (tmp_path / "out").exists()
    # Only a link whose recording is gone (unmounted card): said at once, no cluster started.
    (tmp_path / "audio" / "rec.wav").symlink_to(tmp_path / "card" / "rec.wav")
    with pytest.raises(InputError, match=r"no readable audio file in .*: rec\.wav: broken symlink"):
        buzzdask.analyze(
            tmp_path / "audio", tiny_model, output=tmp_path / "out", embedder=str(tiny_embedder)
        )
    assert not (tmp_path / "out").exists()


@requires_ffmpeg
def test_the_bar_ends_at_exactly_the_audio_analysed(
    make_audio, dask_client, tiny_model, tiny_embedder, tmp_path
):
    make_audio("good.wav", n_samples=6 * FRAME)
    # Its header promises 12 frames, the data holds 4: the probe overestimates.
    cut = make_audio("cut.wav", n_samples=12 * FRAME)
    cut.write_bytes(cut.read_bytes()[: 44 + 2 * 4 * FRAME + 100])
    (tmp_path / "audio" / "broken.mp3").write_bytes(b"ID3 and nothing else")
    out = tmp_path / "out"
    done = buzzdask_cli(
        "analyze", str(tmp_path / "audio"),
        "--model", str(tiny_model),
        "--embedder", str(tiny_embedder),
        "--output", str(out),
        "--scheduler", dask_client.scheduler.address,
        "--chunk-seconds", "1",
    )  # fmt: skip
    assert done.returncode == EXIT_FILES_FAILED, done.stderr
    # Not a terminal: the bar's numbers as lines, the last at the end; no redraws.
    assert "\r" not in done.stderr
    bars = [
        line for line in done.stderr.splitlines() if line.startswith("buzzdask: ") and "%| " in line
    ]
    last = bars[-1]
    summary = json.loads((out / "buzzdask.json").read_text())["summary"]
    analysed = format_audio(summary["audio_hours"] * 3600)
    assert analysed == "10 s"  # 6 + 4 frames of 0.96 s
    assert last.startswith("buzzdask: 100%| "), bars
    assert f"| 2/3 files (1 failed), {analysed}/{analysed} audio, " in last
    assert re.search(r"audio, [\d.,]+x realtime$", last.rstrip()), last
    # The final line counts the failed file as the bar does.
    final = r"2/3 files \(1 failed\), 10 s of audio in \d+\.\d s \([\d.,]+x realtime\)"
    assert re.search(final, done.stdout)


def test_a_folder_reached_twice_is_walked_once_by_its_own_path(tmp_path):
    # A by-site view of date folders (symlinks), and a link back to the top: no failures.
    audio = tmp_path / "audio"
    (audio / "2026-06-01").mkdir(parents=True)
    (audio / "2026-06-01" / "rec1.mp3").write_bytes(b"ID3")
    (audio / "by_site").mkdir()
    (audio / "by_site" / "siteA").symlink_to("../2026-06-01", target_is_directory=True)
    (audio / "by_site" / "back").symlink_to(audio, target_is_directory=True)
    found = scan(audio, extensions=[".mp3"])
    assert [(f.relative, f.problem) for f in found.files] == [("2026-06-01/rec1.mp3", None)]
    assert describe_skipped(found.visible_skipped) == (
        "2 skipped: 1 link to the input folder, walked once (by_site/back/), "
        "1 link to 2026-06-01/, walked once (by_site/siteA/)"
    )


def test_a_pipe_named_like_audio_in_a_folder_is_reported(tmp_path):
    # As when it is named itself: not left out without a word.
    (tmp_path / "audio").mkdir()
    os.mkfifo(tmp_path / "audio" / "pipe.mp3")
    (tmp_path / "audio" / "pipe_link.mp3").symlink_to(tmp_path / "audio" / "pipe.mp3")
    found = scan(tmp_path / "audio", extensions=[".mp3"])
    assert [(f.relative, f.problem) for f in found.files] == [
        ("pipe.mp3", "not a regular file"),
        ("pipe_link.mp3", "not a regular file"),
    ]


def test_the_same_recording_by_two_paths_is_analysed_once_by_its_own(tmp_path):
    # A link to a recording beside the others, a folder given again through a link to it, a
    # folder inside another given too: each file once, under its own name; the links listed.
    audio = tmp_path / "audio"
    for site in ("siteA", "siteB"):
        (audio / site).mkdir(parents=True)
        (audio / site / "rec.mp3").write_bytes(b"ID3" + site.encode())
    (audio / "siteB" / "from_A.mp3").symlink_to(audio / "siteA" / "rec.mp3")
    (audio / "siteA_alias").symlink_to(audio / "siteA", target_is_directory=True)
    (tmp_path / "audio_link").symlink_to(audio, target_is_directory=True)
    given = [audio / "siteA_alias", audio, audio / "siteB", tmp_path / "audio_link" / "siteB"]
    found = scan(given, extensions=[".mp3"])
    assert found.root == str(tmp_path)
    assert [f.relative for f in found.files] == ["audio/siteA/rec.mp3", "audio/siteB/rec.mp3"]
    assert [(s.relative, s.reason) for s in found.skipped] == [
        ("audio/siteA_alias/", "link to audio/siteA/, walked once"),
        ("audio/siteB/from_A.mp3", "link to a recording analysed under another name"),
        ("audio_link/siteB/", "link to audio/siteB/, walked once"),
    ]
    # Whatever the inputs' order, and where each path goes through a link: the path with
    # the fewest links (a folder reached through one beats a file that is one), then the name.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "fav.mp3").symlink_to(audio / "siteA" / "rec.mp3")
    for given in (
        [tmp_path / "notes", tmp_path / "audio_link" / "siteA"],
        [tmp_path / "audio_link" / "siteA", tmp_path / "notes"],
    ):
        found = scan(given, extensions=[".mp3"])
        assert [f.relative for f in found.files] == ["audio_link/siteA/rec.mp3"]
        assert [s.relative for s in found.skipped] == ["notes/fav.mp3"]
    # Two links alike: the first by name, and the other is said to be skipped.
    for name in ("l2.mp3", "l1.mp3"):
        (tmp_path / "notes" / name).symlink_to(audio / "siteB" / "rec.mp3")
    found = scan(tmp_path / "notes", extensions=[".mp3"])
    assert [f.relative for f in found.files] == ["fav.mp3", "l1.mp3"]
    assert describe_skipped(found.skipped) == (
        "1 skipped: 1 link to a recording analysed under another name (l2.mp3)"
    )
    # Named alone, a link is analysed by its name: there is no other path to prefer.
    alone = scan(audio / "siteB" / "from_A.mp3", extensions=[".mp3"])
    assert [f.relative for f in alone.files] == ["from_A.mp3"] and not alone.skipped
