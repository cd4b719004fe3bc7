"""Watch mode: files arriving by rclone while the analysis runs give the one-shot result."""

from __future__ import annotations

import _thread
import json
import shutil
import signal
import subprocess
import threading
import time

import dask
import pandas as pd
import pytest

import buzzdask
import buzzdask.logs
from buzzdask import InputError, ModelError, OutputConflictError, ParameterError, watch
from buzzdask.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from buzzdask.rclone import FAILED_MARKER, transfer
from tests.conftest import (
    BUZZDASK,
    assert_same_frames,
    requires_ffmpeg,
    requires_rclone,
    wait_until,
)

pytestmark = [requires_ffmpeg, requires_rclone]
FRAME = 15360


def journal_keys(output) -> list[tuple[str, int]]:
    lines = (output / "journal.jsonl").read_text().splitlines()
    return [(entry["file"], entry["chunk"]) for entry in map(json.loads, lines)]


def _watch_a_transfer(rclone_remote, folder, dest, rate, model, output, **options):
    """Watch ``dest`` while, in a thread, ``folder`` of the remote is transferred into it at
    ``rate`` (rclone's --bwlimit), two files a batch."""
    arriving = threading.Thread(
        target=transfer,
        args=(f"sharepoint:{folder}", dest),
        kwargs={"batch_size": 2, "rclone_flags": (*rclone_remote.flags, "--bwlimit", rate)},
    )
    arriving.start()
    try:
        return watch(dest, model, output=output, poll_seconds=0.2, **options)
    finally:
        arriving.join()


def test_files_arriving_during_the_analysis_give_the_one_shot_rows(
    rclone_remote, make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    remote = rclone_remote.root / "arriving"
    (remote / "a_bad.mp3").parent.mkdir(parents=True)
    (remote / "a_bad.mp3").write_text("not audio\n" * 200)  # fails in every pass, reported once
    for seed, name in enumerate(["b.wav", "site1/c.wav", "site1/d.mp3", "site2/e.wav", "f.flac"]):
        make_audio(name, n_samples=3 * FRAME + 700 * seed, seed=seed, directory=remote)
    dest = tmp_path / "dest"
    dest.mkdir()
    # What rclone >= 1.63 writes while copying: never analysed (it would fail to decode).
    (dest / "g.wav.5f2a9c1e.partial").write_bytes(b"RIFF" + b"\0" * 4000)
    options = {"embedder": str(tiny_embedder), "chunk_seconds": 1.0, "progress": False}

    # About 100 kB per file at 60 kB/s, two files per batch: batches land seconds apart.
    watched = _watch_a_transfer(
        rclone_remote, "arriving", dest, "60k", tiny_model, tmp_path / "watched",
        client=dask_client, idle_timeout_s=60, **options,
    )  # fmt: skip
    one_shot = buzzdask.analyze(
        dest, tiny_model, output=tmp_path / "one_shot", client=dask_client, **options
    )

    passes = watched.summary["watch"]["passes"]
    assert watched.summary["watch"]["stopped"] == "marker"
    # The analysis began before the last batch arrived.
    assert len(passes) >= 2 and 0 < passes[0]["files"] < 6
    assert_same_frames(watched.to_pandas(), one_shot.to_pandas())
    keys = journal_keys(watched.output)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(journal_keys(one_shot.output))
    assert watched.summary["chunks_written"] == one_shot.summary["chunks_written"]
    assert watched.summary["frames"] == one_shot.summary["frames"]
    columns = ["file", "chunk", "stage", "reason"]
    assert watched.errors[columns].equals(one_shot.errors[columns])
    assert list(watched.errors.file) == ["a_bad.mp3"]
    on_disk = pd.read_parquet(watched.output / "errors.parquet")
    assert list(on_disk.file) == ["a_bad.mp3"]
    metadata = json.loads((watched.output / "buzzdask.json").read_text())
    assert metadata["summary"]["watch"]["passes"] == passes


def test_a_batch_still_copying_is_not_idleness(
    rclone_remote, make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    """The transfer hides a batch until it is whole; one that takes longer than the idle
    timeout to copy does not end the watch with the results part-way."""
    remote = rclone_remote.root / "slow"
    for seed, name in enumerate(["a.wav", "b.wav"]):
        make_audio(name, n_samples=6 * FRAME, seed=seed, directory=remote)  # 184 kB each
    dest = tmp_path / "dest"
    dest.mkdir()
    watched = _watch_a_transfer(
        rclone_remote, "slow", dest, "50k", tiny_model, tmp_path / "watched",
        client=dask_client, idle_timeout_s=2, embedder=str(tiny_embedder), progress=False,
    )  # fmt: skip
    assert watched.summary["watch"]["stopped"] == "marker"
    assert len(watched.to_pandas()) == 12


def test_a_transfer_still_running_is_not_idleness(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    """rclone may wait before it writes anything (listing a large remote, throttled,
    retrying): while the transfer holds its destination, the idle timeout does not run."""
    from buzzdask.lock import OutputLock

    dest = tmp_path / "dest"
    held = threading.Event()

    def a_transfer_that_waits() -> None:
        with OutputLock(dest, started="now", stale_s=120):
            held.set()
            time.sleep(3)
            make_audio("a.wav", n_samples=2 * FRAME, directory=dest)
            (dest / ".transfer-complete").write_text("{}\n")

    waiting = threading.Thread(target=a_transfer_that_waits)
    waiting.start()
    held.wait(30)
    try:
        watched = watch(
            dest,
            tiny_model,
            output=tmp_path / "out",
            client=dask_client,
            poll_seconds=0.1,
            idle_timeout_s=1,
            embedder=str(tiny_embedder),
            progress=False,
        )
    finally:
        waiting.join()
    assert watched.summary["watch"]["stopped"] == "marker"
    assert len(watched.to_pandas()) == 2


def test_idle_timeout_ends_a_watch_without_marker(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    make_audio("a.wav", n_samples=2 * FRAME)
    timing = {"buzzdask.watch.poll-seconds": 0.1, "buzzdask.watch.idle-timeout-seconds": 0.5}
    with dask.config.set(timing):
        watched = buzzdask.watch(
            tmp_path / "audio",
            tiny_model,
            output=tmp_path / "out",
            client=dask_client,
            embedder=str(tiny_embedder),
            progress=False,
        )
    assert watched.summary["watch"]["stopped"] == "idle timeout"
    assert len(watched.summary["watch"]["passes"]) == 1
    assert len(watched.to_pandas()) == 2
    # Its speed is the analysis's: the idle wait before the end is not in it.
    summary = watched.summary
    assert summary["analysing_seconds"] == summary["watch"]["passes"][0]["wall_seconds"]
    assert summary["wall_seconds"] >= summary["analysing_seconds"] + 0.5
    assert summary["realtime_factor"] == pytest.approx(
        summary["audio_hours"] * 3600 / summary["analysing_seconds"]
    )

    with pytest.raises(InputError, match="did not appear"):
        watch(
            tmp_path / "never",
            tiny_model,
            output=tmp_path / "out2",
            client=dask_client,
            embedder=str(tiny_embedder),
            poll_seconds=0.1,
            idle_timeout_s=0.3,
        )


def test_a_watch_holds_its_output_between_passes(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path, caplog
):
    """Its output says complete after each pass; between passes a second run (a job
    resubmitted) was let in, and an export took half-copied files as whole recordings."""
    from buzzdask.lock import current_holder

    audio, output = tmp_path / "audio", tmp_path / "out"
    make_audio("a.wav", n_samples=2 * FRAME)
    options = {"client": dask_client, "embedder": str(tiny_embedder), "progress": False}
    seen: dict[str, object] = {}

    def between_passes() -> None:
        try:
            buzzdask.analyze(audio, tiny_model, output=output, on_conflict="resume", **options)
        except OutputConflictError as refused:
            seen["refused"] = str(refused)
        with caplog.at_level("WARNING", logger="buzzdask"):
            buzzdask.export(output, format="csv", dest=tmp_path / "csv")
        make_audio("b.wav", n_samples=2 * FRAME, seed=1)
        (audio / ".transfer-complete").touch()

    passes_locks: set[str] = set()

    def held_after_the_first_pass() -> bool:
        metadata, holder = output / "buzzdask.json", current_holder(output)
        if holder is None or not metadata.is_file():
            return False
        if json.loads(metadata.read_text())["status"] != "complete":
            passes_locks.add(holder.token)
            return False
        return holder.token not in passes_locks  # the watch's hold, not the pass's own lock

    thread = threading.Thread(target=lambda: _when(held_after_the_first_pass, between_passes))
    thread.start()
    try:
        watched = watch(audio, tiny_model, output=output, poll_seconds=0.1, **options)
    finally:
        thread.join()
    assert watched.summary["watch"]["stopped"] == "marker"
    assert "is in use by another buzzdask run" in str(seen["refused"])
    assert "a run still writes to it" in caplog.text
    assert current_holder(output) is None  # let go as the watch ended
    # The watch's own pass took its hold as its own: the file arriving later is analysed.
    assert len(watched.summary["watch"]["passes"]) == 2
    assert len(watched.to_pandas()) == 4


def _when(condition, then) -> None:
    """``then()`` once ``condition()`` holds (two minutes at most)."""
    deadline = time.monotonic() + 120
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    then()


def _watch_while(path, then, audio, model, **options):
    """Watch ``audio``; in a thread, ``then()`` once ``path`` exists (a file the first pass
    writes)."""

    thread = threading.Thread(target=lambda: _when(path.exists, then))
    thread.start()
    try:
        return watch(audio, model, poll_seconds=0.1, idle_timeout_s=60, **options)
    finally:
        thread.join()


def _watch_a_file_and_junk(make_audio, tmp_path, then, model, client, embedder):
    """Watch ``tmp_path/audio`` (a.wav, 2 frames, and junk.mp3, not audio) into
    ``tmp_path/out``; ``then()`` once the first pass has ended."""
    make_audio("a.wav", n_samples=2 * FRAME)
    (tmp_path / "audio" / "junk.mp3").write_text("not audio\n" * 100)
    return _watch_while(
        tmp_path / "out" / "errors.parquet",  # the first pass's end
        then,
        tmp_path / "audio",
        model,
        output=tmp_path / "out",
        client=client,
        embedder=str(embedder),
        progress=False,
    )


def test_files_gone_or_rewritten_between_passes(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    """A file that failed and was then removed is no failure of the watch; a file analysed,
    then rewritten longer, counts once in the watch's frames and audio (as in its dataset)."""
    audio, output = tmp_path / "audio", tmp_path / "out"

    def change() -> None:
        (audio / "junk.mp3").unlink()
        make_audio("a.wav", n_samples=4 * FRAME, seed=1)
        (audio / ".transfer-complete").write_text("{}\n")

    watched = _watch_a_file_and_junk(
        make_audio, tmp_path, change, tiny_model, dask_client, tiny_embedder
    )
    assert len(watched.summary["watch"]["passes"]) == 2
    assert watched.ok and watched.errors.empty, watched.errors
    assert pd.read_parquet(output / "errors.parquet").empty
    assert len(watched.to_pandas()) == watched.summary["frames"] == 4
    assert watched.summary["audio_hours"] == pytest.approx(4 * 0.96 / 3600)
    # Its log tells the passes from resumes, and says how the watch ended.
    log = (output / "buzzdask.log").read_text().splitlines()
    assert any(line.endswith("INFO buzzdask: watch: pass 2 over 1 file") for line in log)
    assert " INFO buzzdask: the watch ended: " in log[-1]


def test_a_file_failing_in_every_pass_is_said_once(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path, caplog
):
    """A season's one corrupt file, seen again by each pass of the watch: its failure line was
    said once a pass, the only lines of a batch job's log, each looking like news."""

    def arrive() -> None:
        make_audio("b.wav", n_samples=2 * FRAME, seed=1)
        (tmp_path / "audio" / ".transfer-complete").write_text("{}\n")

    with caplog.at_level("WARNING", logger="buzzdask"):
        watched = _watch_a_file_and_junk(
            make_audio, tmp_path, arrive, tiny_model, dask_client, tiny_embedder
        )
    assert len(watched.summary["watch"]["passes"]) == 2
    assert list(watched.errors.file) == ["junk.mp3"]
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed: junk")]
    assert len(said) == 1, said


def test_a_resumed_watch_counts_what_it_wrote_of_files_replaced_or_removed_since(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    """A recording uploaded again (corrected, same length) and one removed since the earlier
    run: the watch's frames were the change in the output's size (0, then negative) and its
    "done before" counted the chunk it redid."""
    audio, output = tmp_path / "audio", tmp_path / "out"
    options = {"client": dask_client, "embedder": str(tiny_embedder), "progress": False}
    for seed, name in enumerate(("a.wav", "b.wav", "c.wav")):
        make_audio(name, n_samples=3 * FRAME, seed=seed)
    buzzdask.analyze(audio, tiny_model, output=output, **options)
    make_audio("b.wav", n_samples=3 * FRAME, seed=7)
    (audio / "c.wav").unlink()
    (audio / ".transfer-complete").write_text("{}\n")
    watched = watch(
        audio, tiny_model, output=output, on_conflict="resume", poll_seconds=0.1, **options
    )
    summary = watched.summary
    assert (summary["frames"], summary["chunks_skipped_resume"]) == (3, 2)
    assert summary["audio_hours"] == pytest.approx(3 * 0.96 / 3600)
    assert len(watched.to_pandas()) == 9  # c.wav's kept: not found is no withdrawal


@pytest.mark.parametrize("transfer_s", [0.5, 0.0], ids=["past-the-pass", "within-the-pass"])
def test_marker_left_by_an_earlier_transfer(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path, capsys, transfer_s
):
    """The watch says the marker is there already; a transfer that starts during the first
    pass removes it, and the watch follows that transfer to its own marker (written again
    before the pass ended, for a short transfer: new, not the one the pass began with)."""
    audio, output = tmp_path / "audio", tmp_path / "out"
    make_audio("old.wav", n_samples=40 * FRAME)
    marker = audio / ".transfer-complete"
    marker.write_text("{}\n")

    def new_transfer() -> None:
        marker.unlink()  # as buzzdask.rclone.transfer does first
        make_audio("new.wav", n_samples=3 * FRAME, seed=1)
        time.sleep(transfer_s)
        marker.write_text("{}\n")

    watched = _watch_while(
        # During the first pass: its first score task's chunks written, 19 more tasks to come
        # (in one task, the whole pass could end before the transfer starts).
        output / "journal.jsonl",
        new_transfer,
        audio,
        tiny_model,
        output=output,
        client=dask_client,
        embedder=str(tiny_embedder),
        chunk_seconds=1.0,
        batch_frames=2,
    )
    assert watched.summary["watch"]["stopped"] == "marker"
    assert sorted(watched.to_pandas().file.unique()) == ["new.wav", "old.wav"]
    out = capsys.readouterr().out
    assert f"buzzdask: {marker} is there already (written " in out
    assert f"buzzdask: the watch ended: {marker} says the transfer is complete" in out


def test_a_transfer_that_stopped_short_ends_the_watch(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path, capsys
):
    """What arrived is analysed, and the watch ends: not after its idle timeout (an hour)."""
    make_audio("a.wav", n_samples=2 * FRAME)
    failed = tmp_path / "audio" / FAILED_MARKER
    failed.write_text(json.dumps({"stopped": "cannot copy from teams:R: remote unreachable"}))
    watched = watch(
        tmp_path / "audio",
        tiny_model,
        output=tmp_path / "out",
        client=dask_client,
        embedder=str(tiny_embedder),
        poll_seconds=0.1,
        idle_timeout_s=3600,
    )
    assert watched.summary["watch"]["stopped"] == "transfer failed"
    assert len(watched.to_pandas()) == 2
    said = capsys.readouterr().out
    # Said as the watch starts too: a failed transfer's mark left from an earlier one.
    assert f"buzzdask: {failed} is there already (written " in said
    assert "the mark of a transfer failed): the watch analyses what is there and ends" in said
    assert f"the watch ended: {failed} says the transfer stopped short (cannot copy " in said
    # Before any file arrived (Ctrl-C in the first batch): why, not "no audio files there".
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / FAILED_MARKER).write_text(json.dumps({"stopped": "interrupted"}))
    with pytest.raises(InputError, match=r"before any file arrived: .* short \(interrupted\): run"):
        watch(
            tmp_path / "empty",
            tiny_model,
            output=tmp_path / "out2",
            client=dask_client,
            embedder=str(tiny_embedder),
            poll_seconds=0.1,
        )


def test_what_the_first_pass_would_refuse_is_refused_before_the_watch(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path, capsys
):
    """Before a cluster starts or any file arrives: a model not found, an output that holds
    results (an earlier watch, restarted without resume), a resume with other settings."""
    options = {"poll_seconds": 0.1, "idle_timeout_s": 600, "embedder": str(tiny_embedder)}
    with pytest.raises(ModelError, match="model_tpyo"):
        watch(tmp_path / "empty", "model_tpyo", output=tmp_path / "o", **options)
    make_audio("a.wav", n_samples=2 * FRAME)
    done = buzzdask.analyze(
        tmp_path / "audio",
        tiny_model,
        output=tmp_path / "o",
        client=dask_client,
        embedder=str(tiny_embedder),
        progress=False,
    )
    assert done.ok
    with pytest.raises(OutputConflictError, match="already holds results"):
        watch(tmp_path / "empty", tiny_model, output=tmp_path / "o", **options)
    # A resume of it with other settings, restarted by a job script edited meanwhile.
    with pytest.raises(OutputConflictError, match=r"settings differ \(chunk_seconds: 600"):
        watch(
            tmp_path / "empty",
            tiny_model,
            output=tmp_path / "o",
            on_conflict="resume",
            chunk_seconds=300.0,
            **options,
        )
    # A misspelt option of analyze: said before the watch starts, not after its first pass.
    with pytest.raises(ParameterError, match=r"analyze does not take: \['framehop'\]"):
        watch(tmp_path / "empty", tiny_model, output=tmp_path / "new", framehop=0.48, **options)
    assert "started a local Dask cluster" not in capsys.readouterr().out


def test_cli_watch(make_audio, dask_client, tiny_embedder, tiny_model, tmp_path):
    make_audio("a.wav", n_samples=2 * FRAME)
    (tmp_path / "audio" / ".transfer-complete").write_text("{}\n")
    arguments = [BUZZDASK, "analyze", str(tmp_path / "audio"), "--watch"]
    arguments += ["--model", str(tiny_model), "--embedder", str(tiny_embedder)]
    arguments += ["--output", str(tmp_path / "out"), "--no-progress", "--poll", "0.1"]
    arguments += ["--scheduler", dask_client.scheduler.address]
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_OK, done.stderr
    assert "1/1 files" in done.stdout and " s of it analysing (" in done.stdout
    # Without the bar too (a job's log): what the watch waits for, and why it ended.
    assert "buzzdask: watching " in done.stdout and "buzzdask: the watch ended: " in done.stdout
    assert len(pd.read_parquet(tmp_path / "out" / "scores", partitioning=None)) == 2

    twice = subprocess.run(
        [*arguments[:3], str(tmp_path), *arguments[3:]], capture_output=True, text=True
    )
    assert twice.returncode == EXIT_USAGE
    assert "exactly one INPUT directory" in twice.stderr
    without = [a for a in arguments if a != "--watch"]  # --poll is still there
    no_watch = subprocess.run(without, capture_output=True, text=True)
    assert no_watch.returncode == EXIT_USAGE
    assert "--poll applies to --watch only" in no_watch.stderr

    # Ended by a transfer that stopped short: a script must not take it for the whole set.
    (tmp_path / "audio" / ".transfer-complete").unlink()
    (tmp_path / "audio" / FAILED_MARKER).write_text('{"stopped": "interrupted"}\n')
    short = subprocess.run([*arguments, "--resume"], capture_output=True, text=True, timeout=300)
    assert short.returncode == EXIT_ERROR, short.stderr
    assert "transfer" in short.stdout


def test_a_file_still_being_copied_holds_back_no_other(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path
):
    """``cp``/``scp`` straight to the name: the file grows at every look. A file already whole
    beside it is analysed meanwhile (it waited for the whole folder to settle)."""
    audio = tmp_path / "audio"
    make_audio("whole.wav", n_samples=2 * FRAME)
    data = make_audio("growing.wav", n_samples=8 * FRAME, directory=tmp_path / "src").read_bytes()
    output = tmp_path / "out"
    analysed_while_copying: list[bool] = []

    def copy_slowly() -> None:
        piece = len(data) // 250 + 1  # about 10 s, a piece between any two looks
        with (audio / "growing.wav").open("wb") as stream:
            for start in range(0, len(data), piece):
                stream.write(data[start : start + piece])
                stream.flush()
                time.sleep(0.04)
                journal = output / "journal.jsonl"
                if journal.exists() and '"whole.wav"' in journal.read_text():
                    analysed_while_copying.append(True)

    options = {"client": dask_client, "embedder": str(tiny_embedder), "chunk_seconds": 1.0}
    copying = threading.Thread(target=copy_slowly)
    copying.start()
    try:
        watched = watch(
            audio,
            tiny_model,
            output=output,
            poll_seconds=0.1,
            idle_timeout_s=2,
            progress=False,
            **options,
        )
    finally:
        copying.join()
    assert analysed_while_copying
    one_shot = buzzdask.analyze(
        audio, tiny_model, output=tmp_path / "one_shot", progress=False, **options
    )
    assert_same_frames(watched.to_pandas(), one_shot.to_pandas())
    assert watched.errors.empty, watched.errors


def test_a_watch_stopped_between_passes_says_so(
    make_audio, dask_client, tiny_embedder, tiny_model, tmp_path, capsys, monkeypatch
):
    """Each pass ends "complete"; Ctrl-C while the watch waits for more files leaves the
    output "interrupted" (it stayed "complete", whatever was still on its way)."""
    make_audio("a.wav", n_samples=2 * FRAME)
    output = tmp_path / "out"
    arguments = [BUZZDASK, "analyze", str(tmp_path / "audio"), "--watch", "--poll", "0.1"]
    arguments += ["--model", str(tiny_model), "--embedder", str(tiny_embedder)]
    arguments += ["--output", str(output), "--scheduler", dask_client.scheduler.address]
    watching = subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metadata = output / "buzzdask.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        metadata.exists() and json.loads(metadata.read_text())["status"] == "complete"
    ):
        time.sleep(0.1)
    watching.send_signal(signal.SIGINT)
    _, stderr = watching.communicate(timeout=120)
    assert watching.returncode == EXIT_INTERRUPTED, stderr
    stopped = json.loads(metadata.read_text())
    assert (stopped["status"], stopped["stopped_by"]) == ("interrupted", "Ctrl-C")

    # In Python (a notebook's Interrupt between passes): the way on is said, as a pass says it.
    def interrupt_once_complete() -> None:
        wait_until(
            lambda: metadata.exists() and json.loads(metadata.read_text())["status"] == "complete",
            timeout_s=120,
            failure="the first pass never ended",
        )
        time.sleep(0.3)  # waiting for more files now
        _thread.interrupt_main()

    shutil.rmtree(output)
    # As in a notebook's kernel: no command of this process has set up the console.
    monkeypatch.setattr(buzzdask.logs, "_configured", [])
    interrupter = threading.Thread(target=interrupt_once_complete, daemon=True)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        watch(
            tmp_path / "audio",
            tiny_model,
            output=output,
            client=dask_client,
            embedder=str(tiny_embedder),
            poll_seconds=0.1,
            idle_timeout_s=120,  # not an hour, should the interrupt never come
            progress=False,
        )
    interrupter.join()
    assert json.loads(metadata.read_text())["status"] == "interrupted"
    said = capsys.readouterr().err
    assert "the watch was interrupted (Ctrl-C) between passes: what was written to " in said
    assert f"output={str(output)!r} and on_conflict='resume' goes on" in said
