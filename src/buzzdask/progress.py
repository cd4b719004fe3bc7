"""A run's live numbers on the client: the progress bar, the ``-v`` lines, the dashboard feed.

:class:`Progress` counts audio seconds expected and done, files finished and failed, and frames
per scorer. The bar's total starts from the probes' duration estimates and is corrected as each
file finishes (to the audio it really held, or to what was analysed before it failed), so a
finished run ends at exactly 100 %. :meth:`Progress.snapshot` is what the buzzdask page of the
Dask dashboard shows (:mod:`buzzdask.dashboard_page`).
"""

from __future__ import annotations

import errno
import io
import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = [
    "ETA_SETTLE_S",
    "PROBLEMS_SHOWN",
    "PROGRESS_LINE_INTERVAL_S",
    "Progress",
    "TqdmHandler",
    "console_outlives_its_reader",
    "format_audio",
    "format_count",
    "format_duration",
    "format_factor",
    "logger",
]

logger = logging.getLogger("buzzdask")

#: Problems (a file failed, cut short, damaged) on the console: as they happen, and listed again
#: when a run ends. The run's log and errors.parquet have them all.
PROBLEMS_SHOWN = 20

#: Seconds between progress lines where stderr is a file (a batch job's log), not a terminal.
PROGRESS_LINE_INTERVAL_S = 60.0
#: Seconds of steady running after the first audio is written before the time left is read
#: from them alone: the start-up (a minute, for a long AAC decoded whole first) left out.
ETA_SETTLE_S = 5.0

# Latest errors kept for the dashboard page, and the realtime-factor history's length.
_ERRORS_KEPT = 20
_HISTORY_KEPT = 600


class TqdmHandler(logging.Handler):
    """Print log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record to stderr, clear of the bar."""
        tqdm.write(self.format(record), file=sys.stderr)


#: What writing to a console no one reads any more raises: its pipe's reader ended (``| head``,
#: a ``tee`` killed with the terminal) or its terminal closed.
_READER_GONE = (errno.EPIPE, errno.EIO)


class _ConsoleStream:
    """A standard stream whose reader may go while a run goes on (``| head``, a closed terminal).

    The first write that finds no reader points the stream's file descriptor at
    ``os.devnull``: that write and every later one (Python's own flush at exit too) go nowhere,
    instead of raising from whichever log line or bar redraw comes next and stopping the run.
    The run's log (``buzzdask.log``) keeps every line.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            self._reader_gone(error)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            self._reader_gone(error)

    def _reader_gone(self, error: OSError) -> None:
        if error.errno not in _READER_GONE:
            raise error
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), self._stream.fileno())

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ...
        return getattr(self._stream, name)


@contextmanager
def console_outlives_its_reader() -> Iterator[None]:
    """Standard output and error whose reader going away does not stop the command.

    Python raises :class:`BrokenPipeError` on the next write once a pipe's reader has gone:
    from a log line mid-run, that stopped a whole analysis (``buzzdask analyze ... | head``).
    Only the process's own streams are wrapped; a notebook's or a test's capture stays as it is.
    """
    saved = sys.stdout, sys.stderr
    if type(sys.stdout) is io.TextIOWrapper:
        sys.stdout = _ConsoleStream(sys.stdout)
    if type(sys.stderr) is io.TextIOWrapper:
        sys.stderr = _ConsoleStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


# C0 controls but the tab, DEL and C1: a file name holding a newline or an escape sequence
# would split a log line or recolour the terminal.
_CONTROLS = {
    code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if code != 0x09
} | {0x0A: "\\n", 0x0D: "\\r"}


def one_line(text: str) -> str:
    r"""``text`` with its control characters escaped (``"a\nb"`` -> ``"a\\nb"``)."""
    return text.translate(_CONTROLS)


class OneLineFormatter(logging.Formatter):
    """Each record's message on one line, its control characters escaped (:func:`one_line`).

    A traceback, which follows the message, keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.message)
        return super().formatMessage(record)


def console_lines(level: int) -> None:
    """Lines of the buzzdask loggers from ``level`` up on the console, as ``buzzdask: ...``.

    Through :class:`TqdmHandler`, clear of a progress bar. Once per process: a handler set
    before (``main()`` run again) is replaced.
    """
    for old in [h for h in logger.handlers if isinstance(h, TqdmHandler)]:
        logger.removeHandler(old)
    handler = TqdmHandler(level=level)
    handler.setFormatter(OneLineFormatter("buzzdask: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


def format_audio(seconds: float, *, total_s: float | None = None) -> str:
    """An amount of audio in the unit that reads well for ``total_s`` (default ``seconds``).

    >>> format_audio(42.0), format_audio(750.0), format_audio(9000.0), format_audio(4.2e6)
    ('42 s', '12.5 min', '2.50 h', '1,167 h')
    """
    scale = max(seconds, total_s or 0.0)
    if scale < 120:
        return f"{seconds:.0f} s"
    if scale < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if scale < 1000 * 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 3600:,.0f} h"


def format_count(count: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun, singular for one (``plural`` where it is not ``noun + "s"``).

    >>> format_count(1, "chunk"), format_count(12000, "chunk"), format_count(2, "batch", "batches")
    ('1 chunk', '12,000 chunks', '2 batches')
    """
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def format_factor(factor: float | None) -> str:
    """A realtime factor with three significant figures at most (``0.42x``, ``12.3x``, ``1,234x``).

    >>> format_factor(0.4213), format_factor(12.34), format_factor(291.6), format_factor(None)
    ('0.42x', '12.3x', '292x', '-')
    """
    if factor is None:
        return "-"
    # Compared as rounded: 99.96 is "100x", not "100.0x".
    if round(factor, 2) < 10:
        return f"{factor:.2f}x"
    if round(factor, 1) < 100:
        return f"{factor:.1f}x"
    return f"{factor:,.0f}x"


class Progress:
    """Audio analysed, files finished and frames per scorer, shown as a tqdm bar.

    Parameters
    ----------
    enabled : bool
        Show the bar (tqdm's notebook bar in Jupyter, where ipywidgets is installed). Where
        stderr is not a terminal (a batch job's log), a line every
        :data:`PROGRESS_LINE_INTERVAL_S` and one at the end instead: a bar there is a redraw
        every half second, thousands an hour, in one line of the log.
    verbose : bool
        Log a line per chunk stage at INFO (a handler is added if the ``buzzdask`` logger has none).
    files : int >= 0
        Input files of the run (the files bar's total).
    publish : callable, optional
        ``publish(snapshot)``, called at most every ``publish_interval_s`` and once at the end:
        the dashboard page's feed.
    publish_interval_s : float >= 0 [s], default: 1.0
    started : float, optional [s]
        When the run began (``time.monotonic()``), for its realtime factor: the one the run's
        summary gives, start-up included. Default: now.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        verbose: bool,
        files: int = 0,
        publish: Callable[[Mapping[str, Any]], None] | None = None,
        publish_interval_s: float = 1.0,
        started: float | None = None,
    ) -> None:
        self.files_total = files
        self.files_done = 0
        self.files_failed = 0
        self.audio_done_s = 0.0
        self.audio_skipped_s = 0.0  # done by an earlier run (resume): not in the rate
        # When this run first wrote audio, and how much it had then: the time left is read
        # from the rate since, without the start-up's seconds (cluster, TensorFlow, a copy).
        self._first_written: tuple[float, float] | None = None
        self._expected: dict[str, float] = {}
        # Their sum, kept as they change: summed at every event, a run of 20,000 files spent
        # 12 CPU-s here (the sum's cost grows with the files, and so do the events).
        self._expected_total = 0.0
        self._done: dict[str, float] = {}
        self._finished: set[str] = set()
        self._scorer_frames: Counter[str] = Counter()
        self._errors: deque[dict[str, str]] = deque(maxlen=_ERRORS_KEPT)
        self._history: deque[tuple[float, float]] = deque(maxlen=_HISTORY_KEPT)
        self._started = time.monotonic() if started is None else started
        self._started_wall = time.time() - (time.monotonic() - self._started)
        self._publish = publish
        self._publish_interval_s = publish_interval_s
        self._published = 0.0
        self._status = "running"  # then "finished" or "stopped" (closed)
        self._lines = enabled and not _interactive()
        self._line_shown = time.monotonic()
        self._bar = tqdm(
            total=0.0,
            disable=not enabled or self._lines,
            dynamic_ncols=True,
            mininterval=0.5,
            bar_format="{percentage:3.0f}%|{bar}| {desc}",
        )
        self._handler: logging.Handler | None = None
        if verbose:
            logger.setLevel(logging.INFO)
            if not logger.handlers:
                self._handler = TqdmHandler()
                self._handler.setFormatter(OneLineFormatter("%(message)s"))
                logger.addHandler(self._handler)
        self._show()

    # -- what the run reports ----------------------------------------------------------------
    def expect(self, name: str, audio_s: float) -> None:
        """A file's probed duration (an estimate, corrected when the file finishes)."""
        self._set_expected(name, audio_s)
        self._show()

    def advance(
        self,
        name: str,
        audio_s: float,
        *,
        scorer: str | None = None,
        frames: int = 0,
        resumed: bool = False,
    ) -> None:
        """Audio of ``name`` scored and written (``resumed``: by an earlier run)."""
        self._done[name] = self._done.get(name, 0.0) + audio_s
        self.audio_done_s += audio_s
        if resumed:
            self.audio_skipped_s += audio_s
        elif self._first_written is None:
            self._first_written = (time.monotonic(), self.audio_done_s - self.audio_skipped_s)
        if scorer is not None:
            self._scorer_frames[scorer] += frames
        self._show(update=audio_s)

    def finished(self, name: str, *, failed: bool) -> None:
        """A file is done: its total becomes the audio analysed (idempotent)."""
        if name in self._finished:
            return
        self._finished.add(name)
        # Done or failed, as the run's summary counts them: "6/7 files (1 failed)".
        self.files_done += not failed
        self.files_failed += failed
        self._set_expected(name, self._done.get(name, 0.0))
        self._show()

    def error(self, name: str, reason: str) -> None:
        """A problem with a file, for the dashboard page's latest errors."""
        self._errors.append({"file": name, "reason": reason, "at": _clock()})
        self._show()

    def _set_expected(self, name: str, audio_s: float) -> None:
        self._expected_total += audio_s - self._expected.get(name, 0.0)
        self._expected[name] = audio_s

    # -- what is shown -----------------------------------------------------------------------
    @property
    def audio_expected_s(self) -> float:
        """The run's audio: estimates for files not yet finished, the truth for the others."""
        if self._status == "finished":  # exactly, without the sums' rounding
            return self.audio_done_s
        return max(self._estimated_total(), self.audio_done_s)

    @property
    def audio_left_s(self) -> float:
        """Audio not yet done: estimates for files not yet finished (also once closed)."""
        return max(self._estimated_total() - self.audio_done_s, 0.0)

    def _estimated_total(self) -> float:
        """The files' durations, with files not yet probed taken as long as the others.

        A resume's finished files come first, each with its chunks done: the bar showed 100 %
        until the others' probes said how long they are.
        """
        heard_of = len(self._expected)
        if 0 < heard_of < self.files_total and self._status == "running":
            return self._expected_total * self.files_total / heard_of
        return self._expected_total

    @property
    def realtime_factor(self) -> float | None:
        """Audio analysed by this run per wall second since it started."""
        elapsed = time.monotonic() - self._started
        analysed = self.audio_done_s - self.audio_skipped_s
        return analysed / elapsed if elapsed > 0 and analysed > 0 else None

    def eta_s(self) -> float | None:
        """Seconds left at the rate since this run first wrote audio (None: not known yet).

        None until that rate has :data:`ETA_SETTLE_S` behind it (the realtime factor so far
        counts the start-up: 13 hours left, read from a run's first seconds, for a run of 45 s),
        and once the run has ended.
        """
        if self._status != "running" or self._first_written is None:
            return None  # finished or stopped: nothing left to wait for; or nothing to tell
        since, written = self._first_written
        elapsed = time.monotonic() - since
        analysed = self.audio_done_s - self.audio_skipped_s - written
        if elapsed < ETA_SETTLE_S or analysed <= 0:
            return None
        return self.audio_left_s * elapsed / analysed

    def describe(self) -> str:
        """The text beside the bar: files, audio, realtime factor and time left."""
        total = self.audio_expected_s
        failed = f" ({self.files_failed} failed)" if self.files_failed else ""
        eta = self.eta_s()
        left = "" if eta is None else f", {format_duration(eta)} left"
        return (
            f"{self.files_done}/{self.files_total} files{failed}, "
            f"{format_audio(self.audio_done_s, total_s=total)}"
            f"/{format_audio(total)} audio, "
            f"{format_factor(self.realtime_factor)} realtime{left}"
        )

    def snapshot(self) -> dict[str, Any]:
        """The numbers of the dashboard page (plain JSON types)."""
        elapsed = time.monotonic() - self._started
        return {
            "status": self._status,
            "started": self._started_wall,
            "elapsed_s": elapsed,
            "files": self.files_total,
            "files_done": self.files_done,
            "files_failed": self.files_failed,
            "audio_done_s": self.audio_done_s,
            "audio_expected_s": self.audio_expected_s,
            "audio_left_s": max(self.audio_expected_s - self.audio_done_s, 0.0),
            "realtime_factor": self.realtime_factor,
            "eta_s": self.eta_s(),
            "history": [list(point) for point in self._history],
            "scorers": {
                address: {
                    "frames": frames,
                    "frames_per_s": frames / elapsed if elapsed > 0 else None,
                }
                for address, frames in sorted(self._scorer_frames.items())
            },
            "errors": list(self._errors),
        }

    def close(self, *, stopped: bool = False) -> None:
        """End the bar at the audio analysed, publish the last numbers, clean up.

        ``stopped``: the run ended before its work did (an error, Ctrl-C); the bar stays at the
        share done (not 100 %) and the dashboard page says ``"stopped"``, not ``"finished"``.
        """
        self._status = "stopped" if stopped else "finished"
        self._bar.total = self.audio_expected_s
        self._bar.n = self.audio_done_s
        self._bar.set_description_str(self.describe(), refresh=False)
        self._bar.refresh()
        self._bar.close()
        if self.files_failed and not stopped and hasattr(self._bar, "disp"):
            # tqdm's notebook bar turns green once full; with failed files, orange instead (a
            # stopped run's bar, short of full, is red already).
            self._bar.disp(bar_style="warning", check_delay=False)
        if self._lines:
            self._line()
        self._send(force=True)
        if self._handler is not None:
            logger.removeHandler(self._handler)

    def _show(self, *, update: float = 0.0) -> None:
        self._bar.total = self.audio_expected_s
        self._bar.set_description_str(self.describe(), refresh=False)
        self._bar.update(update)  # redraws at most every ``mininterval``, even for 0
        if self._lines and time.monotonic() - self._line_shown >= PROGRESS_LINE_INTERVAL_S:
            self._line()
        self._send()

    def _line(self) -> None:
        """The bar's numbers as one line of the log."""
        self._line_shown = time.monotonic()
        total = self.audio_expected_s
        if total:
            percent = 100 * min(self.audio_done_s / total, 1.0)
        else:  # every file failed before any audio: a finished run is done all the same
            percent = 100.0 if self._status == "finished" else 0.0
        print(f"buzzdask: {percent:3.0f}%| {self.describe()}", file=sys.stderr, flush=True)

    def _send(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._published < self._publish_interval_s:
            return
        self._published = now
        factor = self.realtime_factor
        if factor is not None:
            self._history.append((now - self._started, factor))
        if self._publish is not None:
            self._publish(self.snapshot())


def _interactive() -> bool:
    """Whether the bar is seen as it redraws: a terminal, or a notebook's widget or output.

    Not a terminal of no width (some CI and container pseudo-terminals): tqdm draws nothing
    there, and the lines a log gets are what is left to see.
    """
    widget = any(base.__module__ == "tqdm.notebook" for base in tqdm.__mro__)
    kernel = type(sys.stderr).__module__.startswith("ipykernel")
    return widget or kernel or (sys.stderr.isatty() and _columns() > 0)


def _columns() -> int:
    """The width of the terminal stderr is (0 where it has none, or says none)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):  # not a file descriptor (a wrapped stream)
        return 0


def format_duration(seconds: float) -> str:
    """A time span as a clock shows it: ``1:02:03`` or ``2:03``.

    >>> format_duration(3723.4), format_duration(123)
    ('1:02:03', '2:03')
    """
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _clock() -> str:
    return time.strftime("%H:%M:%S")
