"""``buzzdask status``: where a run stands, read from its output (real runs, real locks)."""

from __future__ import annotations

import getpass
import json

import pytest

from buzzdask import InputError, OutputConflictError
from buzzdask.cli import EXIT_ERROR, EXIT_OK, main
from buzzdask.lock import OutputLock
from buzzdask.status import run_status
from buzzdask.write import OutputLayout
from tests.conftest import held_by_another_thread, requires_ffmpeg

pytestmark = requires_ffmpeg

FRAME = 15360
CHUNK_S = 2 * 0.96


def _set_status(output, **keys) -> None:
    metadata = json.loads((output / "buzzdask.json").read_text())
    (output / "buzzdask.json").write_text(json.dumps({**metadata, **keys}))


def test_a_finished_run_with_a_failed_file(run, make_audio, tmp_path, capsys):
    make_audio("a.wav", n_samples=5 * FRAME)
    (tmp_path / "audio" / "junk.mp3").write_text("not audio\n")
    result = run(tmp_path / "audio", chunk_seconds=CHUNK_S)
    # The log's last word says how the run ended (it stopped at the last chunk written).
    last = (result.output / "buzzdask.log").read_text().splitlines()[-1]
    assert " INFO buzzdask: finished: 1/2 files (1 failed), 5 s of audio in " in last
    (status,) = run_status(result.output)
    assert (status.state, status.files, status.files_done, status.frames) == ("complete", 2, 1, 5)
    assert status.failed == ["junk.mp3"] and status.command == "analyze"
    assert main(["status", str(result.output)]) == EXIT_OK
    assert capsys.readouterr().out == (
        f"{result.output}: complete\n"
        "  model_tiny: 1 of 2 files done, 1 failed, 5 frames (5 s of audio)\n"
        "  1 file not scored, or not to the end (errors.parquet says why): the same buzzdask "
        "analyze "
        "command with --resume tries it again (a file that is broken, once fixed or replaced)\n"
    )


def test_running_stopped_killed_and_starting(run, make_audio, tmp_path, capsys):
    """Running: a live process holds the output (from a login node, during the job). Killed
    outright: buzzdask.json says running and nothing holds it."""
    make_audio("a.wav", n_samples=5 * FRAME)
    make_audio("b.wav", n_samples=2 * FRAME, seed=1)
    output = run(tmp_path / "audio", chunk_seconds=CHUNK_S).output
    # The last chunk of a.wav was never journalled: the run was killed before it.
    layout = OutputLayout(output)
    layout.record_removed([("a.wav", 2)])
    _set_status(output, status="running")

    lock = OutputLock(output, started="2026-06-01T05:30:00+00:00", stale_s=120)
    with held_by_another_thread(lock):
        (running,) = run_status(output)
    assert running.state == "running"
    assert (
        running.holder is not None
        and f", since 2026-06-01T05:30:00+00:00, by {getpass.getuser()}, running "
        in (running.holder)
    )
    assert "; last sign of life " in running.holder
    assert running.describe().endswith(f"  its log: {output / 'buzzdask.log'}")

    (killed,) = run_status(output)
    assert (killed.state, killed.files_done, killed.frames) == ("stopped", 1, 6)
    assert killed.unfinished == ["a.wav"]
    assert killed.describe().splitlines() == [
        f"{output}: stopped without a word (killed outright: kill -9, a lost node, a time "
        "limit's last signal; no process holds it)",
        "  model_tiny: 1 of 2 files done, 6 frames (6 s of audio)",
        "  next: the same buzzdask analyze command with --resume finishes it",
    ]

    _set_status(output, status="interrupted", stopped_by="SIGTERM")
    (interrupted,) = run_status(output)
    assert interrupted.describe().splitlines()[0] == f"{output}: interrupted (SIGTERM)"

    # Starting: nothing written yet, but a live run holds it.
    starting = tmp_path / "starting"
    starting.mkdir()
    (starting / "buzzdask.log").write_text("")
    with held_by_another_thread(OutputLock(starting, started="now", stale_s=120)):
        (started,) = run_status(starting)
    assert started.state == "starting"
    assert started.describe().splitlines()[1] == f"  its log: {starting / 'buzzdask.log'}"
    with pytest.raises(InputError, match=r"holds no results yet: its run is starting, or"):
        run_status(starting)
    # Every output said, one that holds no run too (exit 1).
    capsys.readouterr()
    assert main(["status", str(tmp_path / "nowhere"), str(output)]) == EXIT_ERROR
    said = capsys.readouterr()
    assert "does not exist" in said.err and said.out.startswith(f"{output}: interrupted")


def test_an_unfinished_file_whose_audio_is_gone_is_not_said_to_resume(run, make_audio, tmp_path):
    """A resume keeps its results and cannot finish it: status said a resume would."""
    make_audio("a.wav", n_samples=5 * FRAME)
    output = run(tmp_path / "audio", chunk_seconds=CHUNK_S).output
    OutputLayout(output).record_removed([("a.wav", 2)])  # killed before its last chunk
    (tmp_path / "audio" / "a.wav").unlink()
    (status,) = run_status(output)
    assert status.missing == ["a.wav"]
    assert status.describe().splitlines()[2:] == [
        "  1 file not scored to the end whose audio is not found any more (a.wav): no resume "
        f"finishes it; to drop its results, delete its folder under {output / 'scores'} and "
        "resume"
    ]


def test_a_run_of_several_heads_says_each(run, make_audio, tmp_path, tiny_model):
    from tests.conftest import CLASSES
    from tests.model_fixtures import build_tiny_head

    other = build_tiny_head(tmp_path / "model_other", classes=CLASSES, seed=3)
    make_audio("a.wav", n_samples=3 * FRAME)
    result = run(tmp_path / "audio", model=[tiny_model, other])
    statuses = run_status(tmp_path / "results")
    assert [(s.output.name, s.state, s.frames) for s in statuses] == [
        ("model_other", "complete", 3),
        ("model_tiny", "complete", 3),
    ]
    assert set(result) == {"model_tiny", "model_other"}
    # While the run of both holds their folder: one head is running too, its log the run's;
    # and a resume of that head alone (it wrote beside the run, each chunk twice) is refused.
    root = tmp_path / "results"
    with held_by_another_thread(OutputLock(root, started="now", stale_s=120)):
        (head,) = run_status(root / "model_other")
        assert head.state == "running" and head.log == root / "buzzdask.log"
        with pytest.raises(OutputConflictError, match=rf"output {root} is in use by another"):
            run(tmp_path / "audio", model=other, output=root / "model_other", on_conflict="resume")


def test_a_season_of_files_is_counted_alike_on_both_sides(tmp_path):
    from buzzdask.status import RunStatus

    status = RunStatus(
        tmp_path, "interrupted", "model_general_v3", tmp_path / "buzzdask.log",
        stopped_by="Ctrl-C", files=3004, files_done=3000, frames=6000, audio_s=5760.0,
    )  # fmt: skip
    assert "model_general_v3: 3,000 of 3,004 files done, 6,000 frames" in status.describe()
