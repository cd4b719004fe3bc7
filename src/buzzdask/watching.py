"""Watch mode: analyse a directory while files are still arriving in it.

The watch looks at the directory every ``poll_seconds``. When complete files have appeared or
changed since the last pass, it runs :func:`buzzdask.analyze` on the whole directory again
into the same output, resuming after the first pass. The resume journal skips every chunk already
written (same relative name, size and modification time), so every file is scored exactly once
and the rows equal those of one analysis of the finished directory. The directory is always passed
whole, so every pass computes the same root and the same relative names.

A file counts as complete when it is unchanged between two looks, or once the transfer-complete
marker is there. Files that :func:`buzzdask.rclone.transfer` is still copying are hidden
(``.buzzdask-incoming/``), and newer rclone versions write ``*.partial`` names; an analysis skips
both. The watch ends at the marker (written by the transfer after its last file) or after
``idle_timeout_s`` without new files.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from distributed import Client

from buzzdask.analysis import AnalysisResult, analyze
from buzzdask.errors import InputError, ParameterError
from buzzdask.inputs import discover, user_path
from buzzdask.progress import logger
from buzzdask.session import connect
from buzzdask.settings import load_settings
from buzzdask.write import OnConflict, OutputLayout, errors_table, write_errors, write_json

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
        it). Default ``buzzdask.watch.idle-timeout-seconds`` (null there: only the marker).
    **analyze_options
        The other keywords of :func:`buzzdask.analyze` (embedder, chunk_seconds, thresholds...).

    Returns
    -------
    AnalysisResult
        The output of all passes. ``errors`` holds each file's rows from the last pass that
        worked on it. ``summary`` adds up the passes (``chunks_written``, ``frames``,
        ``audio_hours``; ``wall_seconds`` from the start of the watch) and has a ``watch`` entry:
        ``stopped`` (``"marker"`` or ``"idle timeout"``) and ``passes`` (per pass: ``files``,
        ``chunks_written``, ``wall_seconds``).

    Raises
    ------
    InputError
        If ``directory`` has not appeared when the watch ends.
    ParameterError
        If ``directory`` is not one directory or a timing is not positive.
    BuzzdaskError
        Whatever the first pass of :func:`buzzdask.analyze` raises before any work.

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

    with connect(client, local=settings.local_cluster) as connected:
        passes = _Passes(root, model, output, connected, on_conflict, analyze_options)
        previous: _Snapshot | None = None
        stopped: str | None = None
        analysed: _Snapshot | None = None
        last_change = time.monotonic()
        while True:
            finished = marker_path.exists()  # before the listing: the marker comes last
            snapshot = _snapshot(root, extensions)
            if snapshot != previous:
                last_change = time.monotonic()
            stable, previous = snapshot == previous, snapshot
            stopped = (
                "marker"
                if finished
                else "idle timeout"
                if time.monotonic() - last_change >= idle
                else None
            )
            # Nothing to analyse yet is not a pass, unless the watch ends with nothing done.
            worth_a_pass = bool(snapshot) or (stopped is not None and not passes.results)
            if (
                snapshot is not None
                and snapshot != analysed
                and worth_a_pass
                and (stable or stopped)
            ):
                passes.run(len(snapshot))
                analysed = snapshot
                last_change = time.monotonic()  # busy analysing is not idle
                if not stopped:
                    continue  # look again at once: files may have arrived during the pass
            if stopped:
                break
            time.sleep(poll)
    if not passes.results:
        raise InputError(f"{root} did not appear before the watch ended ({stopped})")
    return passes.combine(stopped=stopped, wall=time.monotonic() - started)


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

    def run(self, n_files: int) -> None:
        entries_before = len(OutputLayout(self.output).journal_entries())
        logger.info("watch: pass %d over %d files", len(self.results) + 1, n_files)
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
        new_entries = OutputLayout(result.output).journal_entries()[entries_before:]
        written = {entry["file"] for entry in new_entries}
        for file in written | set(result.errors.file):
            self.errors[file] = result.errors[result.errors.file == file]
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
        audio_hours = sum(s["audio_hours"] for s in summaries)
        summary = {
            **last.summary,
            "chunks_written": sum(s["chunks_written"] for s in summaries),
            "chunks_skipped_resume": summaries[0]["chunks_skipped_resume"],
            "frames": sum(s["frames"] for s in summaries),
            "audio_hours": audio_hours,
            "wall_seconds": wall,
            "realtime_factor": audio_hours * 3600 / wall if wall > 0 else None,
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
