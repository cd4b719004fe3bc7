"""Watch mode: analyse a directory while files are still arriving in it.

The watch looks at the directory every ``poll_seconds``. When complete files have appeared or
changed since the last pass, it runs :func:`buzzdask.analyze` on the whole directory again
into the same output, resuming after the first pass. The resume journal skips every chunk already
written (same relative name, size and modification time), so every file is scored exactly once
and the rows equal those of one analysis of the finished directory. The directory is always passed
whole, so every pass computes the same root and the same relative names.

A file counts as complete when it is unchanged between two looks, or once the transfer-complete
marker is there. A pass starts as soon as one file is complete and not analysed as it is now,
whatever the others do: a file still copied straight to its name (``cp``, ``scp``) holds back
no other, and is analysed as far as it goes, then again once it changed. Files that
:func:`buzzdask.rclone.transfer` is still copying are hidden
(``.buzzdask-incoming/``), and newer rclone versions write ``*.partial`` names; an analysis skips
both. The watch ends at the marker (written by the transfer after its last file), at the one a
transfer that stopped short writes (:data:`buzzdask.rclone.FAILED_MARKER`), or after
``idle_timeout_s`` without new files.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from distributed import Client

from buzzdask.analysis import (
    AnalysisResult,
    analyze,
    plan_run,
    refuse_other_settings,
    say_stopped_after_the_end,
)
from buzzdask.errors import InputError, ParameterError
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.inputs import discover, user_path
from buzzdask.ledger import ProblemLines, problem_lines
from buzzdask.lock import OutputLock, live_holder
from buzzdask.logs import append_to_run_log, console_configured, quiet_workers
from buzzdask.progress import format_count, logger
from buzzdask.rclone import FAILED_MARKER, INCOMING
from buzzdask.session import connect
from buzzdask.settings import load_settings
from buzzdask.write import (
    OnConflict,
    OutputLayout,
    errors_table,
    refuse_results,
    utc_now,
    write_errors,
    write_json,
)

__all__ = ["watch"]

# (size, mtime_ns) of each audio file, by relative name; None while the directory is missing.
_Snapshot = dict[str, tuple[int, int] | None]


def watch(
    directory: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    client: Client | str | None = None,
    on_conflict: OnConflict = "error",
    marker: str | None = None,
    poll_seconds: float | None = None,
    idle_timeout_s: float | None = None,
    **analyze_options: Any,
) -> AnalysisResult:
    """Analyse the audio under ``directory`` as it arrives, until the transfer is complete.

    Parameters
    ----------
    directory : path-like, or a sequence of one
        The directory files arrive in (e.g. a :func:`~buzzdask.rclone.transfer` destination).
        It may not exist yet.
    model : str or path-like
        As for :func:`buzzdask.analyze`.
    output : path-like
        Output directory, shared by every pass.
    client : distributed.Client or str, optional
        One cluster for every pass. Default: a local cluster started and closed here.
    on_conflict : {"error", "resume", "new"}, default: "error"
        For the first pass; later passes resume into the output the first one used.
    marker : str, optional
        Name of the file in ``directory`` that ends the watch. Default ``buzzdask.watch.marker``.
    poll_seconds : float > 0 [s], optional
        Time between looks. Default ``buzzdask.watch.poll-seconds``.
    idle_timeout_s : float > 0 [s], optional
        End after this long without new or changed files (``math.inf``: only the marker ends
        it). Default ``buzzdask.watch.idle-timeout-seconds`` (3600; set it to null for only
        the marker).
    **analyze_options
        The other keywords of :func:`buzzdask.analyze` (embedder, chunk_seconds, thresholds...).

    Returns
    -------
    AnalysisResult
        The output of all passes. ``errors`` holds each file's rows from the last pass that
        worked on it, for files still there. ``summary`` has what the watch added to the output
        (``frames``, ``audio_hours``: a file analysed while it grew counts once), the chunks the
        passes wrote (``chunks_written``), ``wall_seconds`` from the start of the watch,
        ``analysing_seconds`` (the passes' time, without the waits for files) and the
        ``realtime_factor`` over it, and a ``watch`` entry: ``stopped`` (``"marker"``,
        ``"transfer failed"`` or ``"idle timeout"``) and ``passes`` (per pass: ``files``,
        ``chunks_written``, ``wall_seconds``).

    Raises
    ------
    InputError
        If ``directory`` has not appeared when the watch ends, or a transfer into it stopped
        short before any file arrived.
    ParameterError
        If ``directory`` is not one directory or a timing is not positive, or an option is
        not one of analyze's.
    BuzzdaskError
        Whatever the first pass of :func:`buzzdask.analyze` raises before any work: a model not
        found, an embedder out of reach, an output holding results (without ``on_conflict``)
        are refused before the watch starts, not when the first file arrives.

    Notes
    -----
    A file that fails (not audio, damaged beyond decoding) is tried again in each later pass, as
    a resume does, and reported once.
    """
    started = time.monotonic()
    never = idle_timeout_s == math.inf  # only the marker ends the watch
    settings = load_settings(
        watch={
            "marker": marker,
            "poll_seconds": poll_seconds,
            "idle_timeout_seconds": None if never else idle_timeout_s,
        }
    )
    poll = settings.watch.poll_seconds
    idle = settings.watch.idle_timeout_seconds
    idle = math.inf if never or idle is None else idle
    if not isinstance(directory, (str, os.PathLike)):
        if len(directory) != 1:
            raise ParameterError(f"watch needs exactly one directory, got {len(directory)} paths")
        directory = directory[0]
    if not isinstance(model, (str, os.PathLike)):
        # Each pass's results are followed in one output; several heads would need one each.
        raise ParameterError("watch takes one model; run several heads with analyze")
    root = user_path(directory)
    if root.exists() and not root.is_dir():
        raise ParameterError(f"watch needs a directory; {root} is not one")
    marker_path = root / settings.watch.marker
    extensions = list(settings.extensions)
    _check_first_pass(model, output=output, on_conflict=on_conflict, options=analyze_options)
    # Without the bar too (--no-progress in a job's log): what the watch waits for, why it ended.
    _announce(root, marker_path, poll=poll, idle=idle)

    with connect(client, local=settings.local_cluster) as connected, ExitStack() as hold:
        # Before the first pass's run log: TensorFlow loads on the workers meanwhile, and its
        # start-up lines are kept off the console as a pass's are.
        quiet_workers(connected, timeout_s=settings.scorer_ping_seconds)
        passes = _Passes(root, model, output, connected, on_conflict, analyze_options)
        passes.hold_output(hold, stale_s=settings.lock_stale_seconds)
        once_a_watch = problem_lines.set(ProblemLines())
        try:
            with _stop_recorded(passes):
                stopped = _watch_passes(
                    root,
                    marker_path,
                    extensions,
                    passes,
                    poll=poll,
                    idle=idle,
                    lock_stale_s=settings.lock_stale_seconds,
                )
        finally:
            problem_lines.reset(once_a_watch)
    if not passes.results and stopped == "transfer failed":
        said = _ended(stopped, root=root, marker=marker_path)
        raise InputError(f"the watch ended before any file arrived: {said}")
    if not passes.results:
        raise InputError(f"{root} did not appear before the watch ended ({stopped})")
    said = _ended(stopped, root=root, marker=marker_path, analysed=True)
    print(f"buzzdask: the watch ended: {said}")
    # The log's last word too: each pass's lines read as resumes without it.
    append_to_run_log(OutputLayout(passes.output).root / "buzzdask.log", f"the watch ended: {said}")
    return passes.combine(stopped=stopped, wall=time.monotonic() - started)


@contextmanager
def _stop_recorded(passes: _Passes) -> Iterator[None]:
    """A stop between passes (Ctrl-C, SIGTERM) said in the output's ``buzzdask.json``.

    Each pass marks its output complete as it ends; stopped between passes, the watch is not
    (files may be cut short, or on their way): ``"interrupted"``, as a stop during a pass says.
    """
    try:
        yield
    except KeyboardInterrupt as stop:
        if passes.started:  # its output's status, "complete" as a pass ends, is the watch's
            why = str(stop) or "Ctrl-C"
            if say_stopped_after_the_end(OutputLayout(passes.output), why) and not (
                console_configured()
            ):
                # A notebook's Interrupt between passes: the way on, as a pass would say it.
                print(
                    f"buzzdask: the watch was interrupted ({why}) between passes: what was "
                    f"written to {passes.output} is kept; the same call with "
                    f"output={os.fspath(passes.output)!r} and on_conflict='resume' goes on",
                    file=sys.stderr,
                )
        raise


def _watch_passes(
    root: Path,
    marker_path: Path,
    extensions: list[str],
    passes: _Passes,
    *,
    poll: float,
    idle: float,
    lock_stale_s: float,
) -> str:
    """Look, and analyse in passes, until something ends the watch; return what did."""
    previous: _Snapshot | None = None
    analysed: _Snapshot | None = None
    copying: list[tuple[str, int, int]] = []
    last_change = time.monotonic()
    while True:
        # Before the listing: the markers come last.
        ended_by = {"marker": marker_path, "transfer failed": root / FAILED_MARKER}
        markers = {reason: _file_state(path) for reason, path in ended_by.items()}
        finished, failed = markers["marker"] is not None, markers["transfer failed"] is not None
        snapshot = _snapshot(root, extensions)
        # A batch being copied is hidden until whole, maybe for longer than the idle timeout
        # (twenty day-long WAVs from a throttled SharePoint), and rclone may wait before it
        # writes (listing, throttled, retrying): while a transfer runs, the watch is not idle.
        copying, was_copying = _being_copied(root), copying
        if snapshot != previous or copying != was_copying or _transfer_running(root, lock_stale_s):
            last_change = time.monotonic()
        stable, previous_look, previous = snapshot == previous, previous, snapshot
        stopped = (
            "marker"
            if finished
            else "transfer failed"
            if failed
            else "idle timeout"
            if time.monotonic() - last_change >= idle
            else None
        )
        # Nothing to analyse yet is not a pass, unless the watch ends with nothing done (to
        # say there is no audio there), except where the transfer stopped short: it says why.
        ended_empty = stopped not in (None, "transfer failed") and not passes.results
        worth_a_pass = bool(snapshot) or ended_empty
        if (
            snapshot is not None
            and snapshot != analysed
            and worth_a_pass
            and (stable or stopped or _settled_anew(snapshot, previous_look, analysed))
        ):
            passes.run(snapshot)
            analysed = snapshot
            last_change = time.monotonic()  # busy analysing is not idle
            if stopped in ended_by and _file_state(ended_by[stopped]) != markers[stopped]:
                # A transfer began during the pass: its marker is gone, or new (a short
                # transfer that ended meanwhile): what it brought is not analysed yet.
                stopped = None
            if not stopped:
                continue  # look again at once: files may have arrived during the pass
        if stopped:
            return stopped
        time.sleep(poll)


def _transfer_running(root: Path, stale_s: float) -> bool:
    """Whether a live ``buzzdask transfer`` holds ``root`` (:func:`buzzdask.rclone.transfer`)."""
    return live_holder(root, stale_s=stale_s) is not None


def _being_copied(root: Path) -> list[tuple[str, int, int]]:
    """What ``buzzdask transfer`` is copying into ``root``: name, size, modification time."""
    found = []
    for folder, _, names in os.walk(root / INCOMING):
        for name in names:
            path = os.path.join(folder, name)
            try:
                status = os.stat(path)
            except OSError:  # renamed into place meanwhile
                continue
            found.append((path, status.st_size, status.st_mtime_ns))
    return sorted(found)


def _file_state(path: Path) -> tuple[int, int] | None:
    """A file's identity and modification time; None when it is not there."""
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns


def _settled_anew(
    snapshot: _Snapshot, previous: _Snapshot | None, analysed: _Snapshot | None
) -> bool:
    """Whether a file is unchanged between two looks and not analysed as it is now.

    A pass waits for no other file: one copied straight to its name (``cp``, ``scp``) while
    the rest of a folder arrives does not hold back the files already whole.
    """
    return any(
        state is not None
        and previous is not None
        and previous.get(name) == state
        and (analysed or {}).get(name) != state
        for name, state in snapshot.items()
    )


def _ended(stopped: str, *, root: Path, marker: Path, analysed: bool = False) -> str:
    """Why the watch ended, in words; ``analysed``: after a pass."""
    if stopped == "marker":
        return f"{marker} says the transfer is complete"
    if stopped == "transfer failed":
        failed = root / FAILED_MARKER
        try:
            why = json.loads(failed.read_text(encoding="utf-8")).get("stopped", "")
        except (OSError, ValueError):
            why = ""
        after = (
            "what arrived is analysed; run the transfer again, and the watch with --resume"
            if analysed
            else "run the transfer again, and the watch"
        )
        return f"{failed} says the transfer stopped short{f' ({why})' if why else ''}: {after}"
    return "no new or changed file within the idle timeout"


def _check_first_pass(
    model: str | os.PathLike[str],
    *,
    output: str | os.PathLike[str],
    on_conflict: OnConflict,
    options: dict[str, Any],
) -> None:
    """Refuse at once what the first pass would refuse before any work.

    A model not found, an embedder out of reach, a threshold for no class, an output that holds
    results, a resume with other settings: found before the cluster starts and the first file
    arrives (hours later, perhaps, on a SLURM allocation), as a plain analysis finds them.
    """
    # What each pass gives analyze itself is not an option here.
    accepted = set(inspect.signature(analyze).parameters) - {"paths", "model", "output", "client"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ParameterError(
            f"watch() got option(s) analyze does not take: {unknown}; it takes "
            f"{sorted(accepted - {'on_conflict'})}"
        )
    settings = load_settings(chunk_seconds=options.get("chunk_seconds"))
    plan = plan_run(
        model,
        settings,
        embedder=options.get("embedder"),
        frame_hop_s=options.get("frame_hop_s"),
        thresholds=options.get("thresholds"),
        precision=options.get("precision"),
        ffmpeg=find_ffmpeg(ffmpeg=settings.ffmpeg, ffprobe=settings.ffprobe),
        store=False,
        output=output,
    )
    if on_conflict == "error":
        refuse_results(OutputLayout(user_path(output)))
    elif on_conflict == "resume":
        refuse_other_settings(plan, output)


def _announce(root: Path, marker: Path, *, poll: float, idle: float) -> None:
    """What the watch waits for, and what ends it (a marker already there ends it at once)."""
    ends = f"at {marker.name}, which buzzdask transfer writes after its last file"
    if math.isfinite(idle):
        ends += f", or after {idle:g} s without a new or changed file"
    print(
        f"buzzdask: watching {root}: a file is analysed once unchanged between two looks "
        f"{poll:g} s apart; the watch ends {ends}"
    )
    for found, said in ((marker, ""), (root / FAILED_MARKER, ", the mark of a transfer failed")):
        if found.exists():
            written = datetime.fromtimestamp(found.stat().st_mtime).isoformat(" ", "seconds")
            print(
                f"buzzdask: {found} is there already (written {written}{said}): the watch "
                "analyses what is there and ends, unless a transfer starts meanwhile (it "
                "removes the marker)"
            )


class _Passes:
    """The analyses of one watch, and each file's errors from the last pass that touched it."""

    def __init__(
        self,
        root: Path,
        model: str | os.PathLike[str],
        output: str | os.PathLike[str],
        client: Client,
        on_conflict: OnConflict,
        options: dict[str, Any],
    ) -> None:
        self.root = root
        self.model = model
        self.output = output
        self.client = client
        self.on_conflict = on_conflict
        self.options = options
        self.results: list[AnalysisResult] = []
        self.errors: dict[str, pd.DataFrame] = {}
        # The output's chunks before the first pass (a watch resuming an earlier one).
        self.chunks_before: dict[tuple[str, int], dict[str, Any]] = {}
        self.started = False  # a pass began: from its end on, a stop is the watch's to say
        self._hold: ExitStack | None = None
        self._stale_s = 0.0

    def hold_output(self, hold: ExitStack, *, stale_s: float) -> None:
        """Hold the output's lock in ``hold`` from the first pass's end on.

        Between passes, another run (a job resubmitted) is then refused, and an export hears
        that this one still writes (its files may be cut short, or on their way).
        """
        self._hold, self._stale_s = hold, stale_s

    def run(self, snapshot: _Snapshot) -> None:
        """One pass over the files of ``snapshot``; errors of files no longer there are dropped."""
        if not self.results:
            if self.on_conflict == "resume":
                self.chunks_before = OutputLayout(self.output).read_journal()
        entries_before = len(OutputLayout(self.output).journal_entries())
        said = f"watch: pass {len(self.results) + 1} over {format_count(len(snapshot), 'file')}"
        logger.info("%s", said)
        if self.results:  # in the run's log too, which the first pass opens (or an earlier run)
            append_to_run_log(OutputLayout(self.output).root / "buzzdask.log", said)
        self.started = True
        result = analyze(
            self.root,
            self.model,
            output=self.output,
            client=self.client,
            on_conflict=self.on_conflict,
            **self.options,
        )
        if result.output != OutputLayout(self.output).root:  # on_conflict="new" chose a sibling
            entries_before = 0
        self.output, self.on_conflict = result.output, "resume"
        if self._hold is not None and not self.results:  # the first pass's end
            self._hold.enter_context(
                OutputLock(result.output, started=utc_now(), stale_s=self._stale_s)
            )
        new_entries = OutputLayout(result.output).journal_entries()[entries_before:]
        written = {entry["file"] for entry in new_entries}
        for file in written | set(result.errors.file):
            self.errors[file] = result.errors[result.errors.file == file]
        # Gone (removed, renamed mid-pass): a failure there is no longer news.
        self.errors = {file: rows for file, rows in self.errors.items() if file in snapshot}
        self.results.append(result)

    def combine(self, *, stopped: str, wall: float) -> AnalysisResult:
        last = self.results[-1]
        errors = [frame for frame in self.errors.values() if not frame.empty]
        table = (
            pd.concat(errors, ignore_index=True).sort_values(
                "file", kind="stable", ignore_index=True
            )
            if errors
            else errors_table([])
        )
        summaries = [result.summary for result in self.results]
        # What the watch wrote that the output still holds: a file analysed while it grew, then
        # again whole, counts once; a chunk of a file replaced since, as new; a removed file's,
        # not at all.
        chunks = OutputLayout(last.output).read_journal()
        added = [entry for key, entry in chunks.items() if self.chunks_before.get(key) != entry]
        frames = sum(int(entry["frames"]) for entry in added)
        audio_hours = frames * last.metadata["frame_hop_s"] / 3600
        # The speed of the analysis, not of the arrivals: waiting for files is not counted.
        analysing = sum(s["wall_seconds"] for s in summaries)
        summary = {
            **last.summary,
            "chunks_written": sum(s["chunks_written"] for s in summaries),
            "chunks_skipped_resume": len(chunks) - len(added),
            "frames": frames,
            "audio_hours": audio_hours,
            "wall_seconds": wall,
            "analysing_seconds": analysing,
            "realtime_factor": audio_hours * 3600 / analysing if analysing > 0 else None,
            "peak_decoded_bytes_in_flight": max(
                s["peak_decoded_bytes_in_flight"] for s in summaries
            ),
            "watch": {
                "stopped": stopped,
                "passes": [
                    {
                        "files": s["files"],
                        "chunks_written": s["chunks_written"],
                        "wall_seconds": s["wall_seconds"],
                    }
                    for s in summaries
                ],
            },
        }
        metadata = {**last.metadata, "summary": summary}
        layout = OutputLayout(last.output)
        write_errors(layout.errors, table.to_dict("records"))
        write_json(layout.metadata, metadata)
        return AnalysisResult(
            output=last.output,
            dataset=last.dataset,
            summary=summary,
            errors=table,
            metadata=metadata,
        )


def _snapshot(root: Path, extensions: list[str]) -> _Snapshot | None:
    if not root.is_dir():
        return None
    _, files = discover(root, extensions=extensions)
    snapshot: _Snapshot = {}
    for item in files:
        try:
            status = os.stat(item.path)
            snapshot[item.relative] = (status.st_size, status.st_mtime_ns)
        except OSError:
            snapshot[item.relative] = None  # broken link: analyze reports it
    return snapshot
