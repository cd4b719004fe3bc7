"""The run's live numbers: the progress bar's totals, its units, and the dashboard page's HTML."""

from __future__ import annotations

import os

import pytest

from buzzdask import progress as progress_module
from buzzdask.dashboard_page import render_page
from buzzdask.progress import Progress, format_audio, format_count, format_factor


def test_a_run_that_ends_early_is_stopped_not_finished():
    # Ctrl-C, a scorer that cannot be replaced: the dashboard page must not say "finished".
    published = []
    progress = Progress(enabled=False, verbose=False, files=2, publish=published.append)
    progress.expect("a.wav", 60.0)
    progress.advance("a.wav", 30.0)
    progress.close(stopped=True)
    assert published[-1]["status"] == "stopped"
    # The bar and its line stay at the share done, not 100 % of what was done.
    assert published[-1]["audio_expected_s"] == 60.0 and published[-1]["audio_left_s"] == 30.0
    assert progress.describe().startswith("0/2 files, 30 s/60 s audio, ")
    assert "&mdash; stopped</h2>" in render_page([{**published[-1], "output": "out"}])


def test_page_gives_the_time_left_as_the_bar_does():
    # Raw seconds ("7,384 s") read badly for a run of hours.
    progress = Progress(enabled=False, verbose=False, files=1)
    page = render_page([{**progress.snapshot(), "output": "out", "eta_s": 7384.2}])
    assert "<td class=''>2:03:04</td>" in page


def test_totals_are_corrected_as_files_finish_and_end_at_the_audio_analysed():
    published = []
    progress = Progress(enabled=True, verbose=False, files=3, publish=published.append)
    progress.error("bad.mp3", "ffprobe cannot read it as audio")
    progress.finished("bad.mp3", failed=True)  # failed at its probe: it adds nothing
    progress.expect("short.mp3", 100.0)  # the probe overestimates: 40 s are really there
    progress.expect("long.mp3", 100.0)  # it underestimates: 130 s
    progress.advance("short.mp3", 40.0, scorer="tcp://w1", frames=41)
    progress.finished("short.mp3", failed=False)
    assert progress.audio_expected_s == 140.0
    progress.advance("long.mp3", 90.0, scorer="tcp://w1", frames=93)
    progress.advance("long.mp3", 40.0, scorer="tcp://w2", frames=41)
    assert progress.audio_expected_s == 170.0  # never below what is done
    progress.finished("long.mp3", failed=False)
    progress.finished("long.mp3", failed=False)  # once only
    progress.close()

    # As the final line and buzzdask.json count them (the bar said 3/3, the line 2/3).
    assert (progress.files_done, progress.files_failed) == (2, 1)
    assert progress.audio_expected_s == progress.audio_done_s == 170.0
    last = published[-1]
    assert last["status"] == "finished"
    assert last["audio_done_s"] == 170.0 and last["audio_left_s"] == 0.0
    assert {address: s["frames"] for address, s in last["scorers"].items()} == {
        "tcp://w1": 134,
        "tcp://w2": 41,
    }
    assert last["errors"][0]["file"] == "bad.mp3"
    assert progress.describe().startswith("2/3 files (1 failed), 2.8 min/2.8 min audio, ")
    assert "left" not in progress.describe()


def test_a_log_gets_a_line_a_minute_not_a_bar(capsys, monkeypatch):
    """stderr a file (a batch job's log, here pytest's capture): lines, never a redraw."""
    monkeypatch.setattr(progress_module, "PROGRESS_LINE_INTERVAL_S", 0.0)
    progress = Progress(enabled=True, verbose=False, files=2)
    progress.expect("a.wav", 60.0)
    progress.expect("b.wav", 60.0)
    progress.advance("a.wav", 30.0)
    progress.advance("a.wav", 30.0)
    progress.finished("a.wav", failed=False)
    monkeypatch.setattr(progress_module, "PROGRESS_LINE_INTERVAL_S", 3600.0)
    progress.advance("b.wav", 30.0)  # within the interval: no line
    progress.advance("b.wav", 30.0)
    progress.finished("b.wav", failed=False)
    progress.close()  # the last numbers, whatever the interval
    lines = capsys.readouterr().err
    assert "\r" not in lines
    shown = [line.split(", ")[0] for line in lines.splitlines()]
    assert "buzzdask:  25%| 0/2 files" in shown, lines
    assert shown[-2:] == ["buzzdask:  50%| 1/2 files", "buzzdask: 100%| 2/2 files"], lines


def test_a_run_whose_every_file_failed_ends_at_100_percent(capsys):
    # A log's last line: the run is done, none of its audio was there to analyse.
    progress = Progress(enabled=True, verbose=False, files=1)
    progress.error("a.txt", "ffprobe cannot read it as audio")
    progress.finished("a.txt", failed=True)
    progress.close()
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("buzzdask: 100%| 0/1 files (1 failed)")


@pytest.mark.parametrize(
    ("failed", "stopped", "style"),
    [(False, False, "success"), (True, False, "warning"), (False, True, "danger")],
)
def test_the_notebook_bar_is_green_only_when_every_file_was_analysed(
    monkeypatch, failed, stopped, style
):
    """tqdm's notebook bar (in Jupyter, tqdm.auto's) ends green once full: a run that
    finished with a failed file is orange, a stopped one red."""
    notebook = pytest.importorskip("tqdm.notebook")
    pytest.importorskip("ipywidgets")
    monkeypatch.setattr(progress_module, "tqdm", notebook.tqdm)
    progress = Progress(enabled=True, verbose=False, files=2)
    progress.expect("a.wav", 60.0)
    progress.expect("b.wav", 60.0)
    progress.advance("a.wav", 60.0)
    progress.finished("a.wav", failed=False)
    if not stopped:
        progress.advance("b.wav", 0.0 if failed else 60.0)
        progress.finished("b.wav", failed=failed)
    progress.close(stopped=stopped)
    assert progress._bar.container.children[1].bar_style == style


def test_a_failed_file_takes_its_unanalysed_audio_out_of_the_total():
    progress = Progress(enabled=False, verbose=False, files=2)
    progress.expect("a.wav", 600.0)
    progress.expect("b.wav", 600.0)
    progress.advance("a.wav", 120.0)
    progress.finished("a.wav", failed=True)  # a chunk failed after 2 of 10 minutes
    assert progress.audio_expected_s == 720.0


def test_an_estimate_given_again_replaces_the_first():
    progress = Progress(enabled=False, verbose=False, files=2)
    progress.expect("a.wav", 100.0)
    progress.expect("b.wav", 50.0)
    progress.expect("a.wav", 60.0)
    assert progress.audio_expected_s == 110.0 and progress.audio_left_s == 110.0
    progress.advance("a.wav", 60.0)
    progress.finished("a.wav", failed=False)
    assert progress.audio_expected_s == 110.0 and progress.audio_left_s == 50.0


def test_resumed_audio_counts_as_done_but_not_in_the_realtime_factor():
    progress = Progress(enabled=False, verbose=False, files=1)
    progress.expect("a.wav", 3600.0)
    progress.advance("a.wav", 1800.0, resumed=True)
    assert progress.audio_done_s == 1800.0
    assert progress.realtime_factor is None and progress.eta_s() is None


def test_time_left_is_read_from_the_rate_after_the_start_up(monkeypatch):
    """A long AAC's first chunk waits a minute for its whole decoded copy: the time left is
    read from the rate once chunks flow, not from one that counts that minute."""
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    progress = Progress(enabled=False, verbose=False, files=1)
    progress.expect("six_hours.m4a", 6 * 3600.0)
    now[0] += 60.0  # the copy, then the first 10-minute chunk
    progress.advance("six_hours.m4a", 600.0)
    now[0] += 2.0  # too soon after it to tell: none (the rate so far said 17 min, not 36 s)
    progress.advance("six_hours.m4a", 600.0)
    assert progress.eta_s() is None
    assert "left" not in progress.describe()
    for _ in range(4):  # then a chunk a second
        now[0] += 1.0
        progress.advance("six_hours.m4a", 600.0)
    # 3000 s of audio in the 6 s since the first chunk: 36 s left, not the 5 min of the
    # rate since the start.
    assert progress.eta_s() == pytest.approx((6 * 3600 - 3600) * 6 / 3000)
    assert progress.realtime_factor == pytest.approx(3600 / 66)  # the run's own, start-up in


@pytest.mark.parametrize(
    ("seconds", "total", "text"),
    [
        (7.0, None, "7 s"),
        (7.0, 3600.0, "0.1 min"),
        (750.0, None, "12.5 min"),
        (5400.0, None, "90.0 min"),
        (9000.0, None, "2.50 h"),
        (3600.0 * 1160, None, "1,160 h"),
        (3600.0 * 12, 3600.0 * 1160, "12 h"),
    ],
)
def test_audio_reads_well_from_seconds_to_thousands_of_hours(seconds, total, text):
    assert format_audio(seconds, total_s=total) == text


@pytest.mark.parametrize(
    ("factor", "text"),
    [
        (0.4213, "0.42x"),
        (1.0, "1.00x"),
        (9.996, "10.0x"),
        (12.34, "12.3x"),
        (99.96, "100x"),
        (291.6, "292x"),
        (4321.0, "4,321x"),
    ],
)
def test_realtime_factor_has_three_significant_figures_at_most(factor, text):
    assert format_factor(factor) == text


@pytest.mark.parametrize(
    ("count", "text"), [(0, "0 chunks"), (1, "1 chunk"), (2, "2 chunks"), (12000, "12,000 chunks")]
)
def test_counts_say_one_chunk_not_one_chunks(count, text):
    assert format_count(count, "chunk") == text
    batches = text.replace("chunks", "batches").replace("chunk", "batch")
    assert format_count(count, "batch", "batches") == batches


def test_page_escapes_what_it_shows():
    progress = Progress(enabled=False, verbose=False, files=1)
    progress.error("<script>alert(1)</script>.wav", "not audio & worse")
    page = render_page([{"output": "/runs/a<b>", **progress.snapshot()}])
    assert "<script>alert" not in page and "&lt;script&gt;" in page
    assert "not audio &amp; worse" in page and "/runs/a&lt;b&gt;" in page
    assert "No buzzdask run" in render_page([])


def test_page_of_a_stopped_run_gives_no_time_left_and_its_chart_its_own_span():
    from buzzdask.dashboard_page import _sparkline

    progress = Progress(enabled=False, verbose=False, files=2)
    progress.expect("a.wav", 600.0)
    progress.expect("b.wav", 600.0)
    progress.advance("a.wav", 600.0)
    progress.close(stopped=True)
    assert progress.snapshot()["status"] == "stopped"
    assert progress.snapshot()["eta_s"] is None
    # The history kept is the last points of a long run: its axis starts where they do.
    chart = _sparkline([[6602.0, 310.0], [7200.0, 320.0]])
    assert ">6,602 s</text>" in chart and ">0 s</text>" not in chart


def test_file_names_with_control_characters_stay_on_one_line():
    import logging

    from buzzdask.progress import OneLineFormatter, one_line

    name = "good\nline\r\x1b[31m\tred.wav"
    assert one_line(f"failed: {name}") == "failed: good\\nline\\r\\x1b[31m\tred.wav"
    record = logging.LogRecord("buzzdask", logging.WARNING, "x", 1, "failed: %s", (name,), None)
    assert OneLineFormatter("buzzdask: %(message)s").format(record) == (
        "buzzdask: failed: good\\nline\\r\\x1b[31m\tred.wav"
    )
    assert one_line("snow: café, 蜂.wav") == "snow: café, 蜂.wav"  # letters are no controls


def test_the_realtime_factor_counts_from_the_run_s_start():
    """The bar said 273x, the final line a moment later 216x: the bar's clock started once the
    cluster and the model were up, the summary's as analyze() was called."""
    import time

    progress = Progress(enabled=False, verbose=False, files=1, started=time.monotonic() - 10.0)
    progress.advance("a.wav", 100.0)
    assert progress.realtime_factor == pytest.approx(10.0, rel=0.05)


def test_files_not_probed_yet_count_as_long_as_the_others():
    """A resume's finished files come first, each with its chunks done: the bar said 100 %
    until the other files' probes came back."""
    progress = Progress(enabled=False, verbose=False, files=4)
    progress.expect("a.wav", 60.0)
    progress.advance("a.wav", 60.0, resumed=True)
    progress.finished("a.wav", failed=False)
    assert progress.audio_expected_s == 240.0 and progress.audio_left_s == 180.0
    for name in ("b.wav", "c.wav", "d.wav"):
        progress.expect(name, 30.0)
    assert progress.audio_expected_s == 150.0


def test_a_terminal_of_no_width_gets_the_lines_a_log_gets():
    """tqdm draws nothing in a terminal 0 columns wide (some CI and container pseudo-terminals,
    `script` without a size): nothing was shown between the dashboard link and the last line."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    ask = "from buzzdask.progress import _interactive; print(_interactive())"
    main_fd, terminal = pty.openpty()  # a fresh one has no size: 0 rows, 0 columns
    try:
        answers = []
        for rows, columns in ((0, 0), (24, 80)):
            fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
            done = subprocess.run(
                [sys.executable, "-c", ask], stderr=terminal, capture_output=False,
                stdout=subprocess.PIPE, text=True, timeout=60, check=True,
            )  # fmt: skip
            answers.append(done.stdout.strip())
    finally:
        os.close(main_fd)
        os.close(terminal)
    assert answers == ["False", "True"]
