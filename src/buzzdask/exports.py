"""Exporting a run's frames to the files the lab's other tools read.

Formats (``format=``):

``"buzzdetect"``
    One CSV per recording, exactly as buzzdetect writes it, so buzzr (``read_directory``,
    ``bin_directory``) reads the export as it reads buzzdetect's own results. Recording
    ``site/day/230809_0000.wav`` becomes ``DEST/site/day/230809_0000_buzzdetect.csv`` (the
    extension dropped, as buzzdetect's ``build_ident``). Columns ``start`` then
    ``activation_<class>`` in the model's order; or, with thresholds (buzzdetect's detection
    mode), ``start`` then ``detections_<class>`` as 0/1. Written as buzzdetect's writer does
    (``src/write/formatting.py`` and ``worker.py``): activations rounded with ``numpy.round``
    to the model's ``digits_results`` in float32, ``start`` rounded to the frame length's
    decimals (``digits_time``, 2 for YAMNet), pandas' CSV text with an unquoted header, newline
    (LF) line ends, rows sorted by ``start``.
``"csv"``
    One combined ``frames.csv``: ``file, start, end[, time], activation_<class>...,
    detections_<class>...``, numbers as in ``"buzzdetect"``; ``time`` (the frame's wall-clock
    start) when a recording start is known (:mod:`buzzdask.recording_time`), blank otherwise.
``"raven"``
    One Raven Pro selection table per recording (``<stem>.Table.1.selections.txt``,
    tab-separated) listing its detection events (:mod:`buzzdask.events`): ``Selection, View,
    Channel, Begin Time (s), End Time (s), Low Freq (Hz), High Freq (Hz), Class, Peak
    Activation, Mean Activation, Frames``; a recording without events gets the header alone.

Every format reads one recording's partitions at a time, so memory is bounded by the longest
recording, never the dataset. Nothing is written if any target already exists (unless
``overwrite=True``), and each file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from buzzdask.errors import InputError, OutputConflictError, ParameterError
from buzzdask.events import stored_recording_events
from buzzdask.inputs import as_list, first_names, user_path
from buzzdask.lock import destination_held
from buzzdask.progress import format_count
from buzzdask.recording_time import check_start_options, recording_starts
from buzzdask.results import Run, open_run
from buzzdask.thresholds import ThresholdChoice, choose_thresholds, detected
from buzzdask.write import (
    ACTIVATION_PREFIX,
    DETECTION_PREFIX,
    NAME_MAX,
    atomic_path,
    remove_stale_temporaries,
    write_json,
)

__all__ = [
    "BUZZDETECT_TAG",
    "BUZZPART_TAG",
    "RAVEN_COLUMNS",
    "ExportFormat",
    "ExportResult",
    "buzzdetect_name",
    "buzzdetect_table",
    "export",
    "raven_name",
]

logger = logging.getLogger(__name__)

ExportFormat = Literal["buzzdetect", "csv", "raven"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)

# buzzdetect's src/config.py: SUFFIX_RESULT_COMPLETE; buzzr's VARIABLES.R: TAG_RESULTS.
BUZZDETECT_TAG = "_buzzdetect"
# buzzdetect's SUFFIX_RESULT_PARTIAL, buzzr's TAG_PARTIAL: a recording not analysed to its end.
BUZZPART_TAG = "_buzzpart"
COMBINED_NAME = "frames.csv"
#: In an export's folder while its files are written: left behind, it marks a stopped export.
UNFINISHED = ".buzzdask-export-unfinished"
#: The files the exports into a ``dest`` wrote, by run (JSON), in that ``dest``.
WRITTEN = ".buzzdask-export.json"
RAVEN_SUFFIX = ".Table.1.selections.txt"
#: What makes a directory a run's output (a listed run without it has moved, or is gone).
RUN_FILE = "buzzdask.json"
RAVEN_COLUMNS = [
    "Selection",
    "View",
    "Channel",
    "Begin Time (s)",
    "End Time (s)",
    "Low Freq (Hz)",
    "High Freq (Hz)",
    "Class",
    "Peak Activation",
    "Mean Activation",
    "Frames",
]
RAVEN_TIME_DECIMALS = 6  # Raven shows times to the microsecond; hides float sums' last bits


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote.

    Attributes
    ----------
    format : {"buzzdetect", "csv", "raven"}
    dest : Path
        The directory written into.
    files : list of Path
        The files written, in recording order.
    thresholds : ThresholdChoice
        The thresholds used and their origin (empty: activations only).
    untimed : list of str
        Recordings whose start time is unknown (``"csv"``: their ``time`` is blank).
    """

    format: str
    dest: Path
    files: list[Path]
    thresholds: ThresholdChoice
    untimed: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # A notebook cell's value: not every file's path.
        chosen = self.thresholds.values
        thresholds = f"thresholds {chosen}" if chosen else "no thresholds"
        untimed = f", {len(self.untimed)} untimed" if self.untimed else ""
        return (
            f"ExportResult({self.format}: {format_count(len(self.files), 'file')} in "
            f"{os.fspath(self.dest)!r}, "
            f"{thresholds}{untimed})"
        )


def buzzdetect_name(relative: str, *, partial: bool = False) -> PurePosixPath:
    """A recording's buzzdetect result file, relative to the export (extension dropped).

    ``partial``: a recording not analysed to its end gets buzzdetect's name for a partial
    result, which buzzr's ``read_directory`` leaves out unless ``include_partial = TRUE``.

    >>> buzzdetect_name("soybean/9/230809_0000.mp3").as_posix()
    'soybean/9/230809_0000_buzzdetect.csv'
    >>> buzzdetect_name("soybean/9/230809_0000.mp3", partial=True).as_posix()
    'soybean/9/230809_0000_buzzpart.csv'
    """
    path = PurePosixPath(relative)
    return path.with_name(path.stem + (BUZZPART_TAG if partial else BUZZDETECT_TAG) + ".csv")


def raven_name(relative: str) -> PurePosixPath:
    """A recording's Raven selection table, relative to the export.

    >>> raven_name("soybean/9/230809_0000.mp3").as_posix()
    'soybean/9/230809_0000.Table.1.selections.txt'
    """
    path = PurePosixPath(relative)
    return path.with_name(path.stem + RAVEN_SUFFIX)


def time_digits(frame_length_s: float) -> int:
    """Decimals of ``start`` in buzzdetect's CSVs (its ``digits_time``): 2 for a 0.96 s frame."""
    for digits in range(10):
        if round(frame_length_s, digits) == frame_length_s:
            return digits
    return 9


def _buzzdetect_values(activations: Any, digits: int | None) -> np.ndarray:
    """Activations as buzzdetect's CSV holds them, as float64.

    buzzdetect rounds its float32 activations (``np.round``, still float32), appends them to a
    partial CSV, reads that back (float64) and writes the sorted final file: the final text is
    float64's repr of pandas' float32 text. The same path here gives the same bytes
    (``0.96``, never ``0.9599999785423279``).

    Parameters
    ----------
    activations : array_like [shape=(n_frames, n_classes)]
        Every column in one text round trip: one per column cost a recording 23 ms at 13
        classes, more than analysing a 30-second file.
    digits : int or None
        Decimals to round to (None: not rounded).

    Returns
    -------
    numpy.ndarray [shape=(n_frames, n_classes), dtype=float64]
    """
    values = np.asarray(activations, dtype=np.float32)
    if digits is not None:
        values = np.round(values, digits)
    if not values.size:
        return values.astype(np.float64)
    text = pd.DataFrame(values).to_csv(index=False, header=False, lineterminator="\n")
    return pd.read_csv(io.StringIO(text), header=None, dtype="float64").to_numpy()


def buzzdetect_table(
    frames: pd.DataFrame,
    *,
    classes: Sequence[str],
    thresholds: Mapping[str, float],
    digits_results: int | None,
    frame_length_s: float,
) -> pd.DataFrame:
    """One recording's buzzdetect result table, sorted by ``start``.

    Parameters
    ----------
    frames : pandas.DataFrame [shape=(n_frames, n_columns)]
        The recording's frames (``start`` and ``activation_<class>``).
    classes : sequence of str
        The activation columns to keep, in the model's order (ignored with ``thresholds``).
    thresholds : mapping of class -> float
        Non-empty: buzzdetect's detection mode, ``detections_<class> = activation > threshold``
        as 0/1 for each class given, and no activation columns.
    digits_results : int or None
        Decimals of the activations (the model's ``digits_results``; None: not rounded).
    frame_length_s : float > 0 [s]
        ``start`` is rounded to its decimals (buzzdetect's ``digits_time``).

    Returns
    -------
    pandas.DataFrame [shape=(n_frames, 1 + n_columns)]
    """
    ordered = frames.sort_values("start", kind="stable", ignore_index=True)
    table = {"start": np.round(ordered["start"].to_numpy(np.float64), time_digits(frame_length_s))}
    if thresholds:
        for name, threshold in thresholds.items():
            hits = detected(ordered[f"{ACTIVATION_PREFIX}{name}"].to_numpy(), threshold)
            table[f"{DETECTION_PREFIX}{name}"] = hits.astype(np.int64)
    else:
        columns = [f"{ACTIVATION_PREFIX}{name}" for name in classes]
        values = _buzzdetect_values(ordered[columns].to_numpy(), digits_results)
        table.update(zip(columns, values.T, strict=True))
    return pd.DataFrame(table)


def _csv_text(table: pd.DataFrame, *, header: bool = True, sep: str = ",") -> str:
    # pandas' own CSV text, as buzzdetect's to_csv(index=False); "\n" whatever the platform.
    return str(table.to_csv(index=False, header=header, sep=sep, lineterminator="\n"))


def _write_text(path: Path, chunks: Iterator[str] | Sequence[str]) -> None:
    """Write text atomically (:func:`buzzdask.write.atomic_path`)."""
    with (
        atomic_path(path) as temporary,
        temporary.open("w", encoding="utf-8", newline="") as stream,
    ):
        for chunk in chunks:
            stream.write(chunk)


def _selected_classes(run: Run, classes: Sequence[str] | str | None) -> list[str] | None:
    if classes is None:
        return None
    asked = as_list(classes)
    unknown = [name for name in asked if name not in run.classes]
    if unknown or not asked:
        raise ParameterError(
            f"classes={asked!r}: unknown {unknown}; the run's classes are {list(run.classes)}"
        )
    return [name for name in run.classes if name in asked]  # model order


def _check_free(
    targets: Sequence[Path],
    *,
    dest: Path,
    overwrite: bool,
    earlier: Sequence[Path] = (),
    stopped: bool = False,
) -> None:
    """Refuse, unless ``overwrite``, when a target or a file of ``earlier`` exists.

    ``stopped``: the run's earlier export into ``dest`` stopped before it finished.
    """
    existing = [path for path in [*targets, *earlier] if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        why = f": an earlier export into {dest} stopped before it finished" if stopped else ""
        # Week 2 of a season: what the refusal holds back is the new recordings.
        new = sum(not path.exists() for path in targets)
        adds = f"; {new} of the {len(targets)} files would be new" if new else ""
        raise OutputConflictError(
            f"export file {existing[0]} already exists{more}{why}{adds}; pass overwrite=True "
            f"(--overwrite) to replace the export, or choose another dest (--dest)"
        )


@contextmanager
def _files_written(
    targets: Sequence[Path], dest: Path, *, overwrite: bool, run: Run
) -> Iterator[None]:
    """Check that ``targets`` are free, then mark ``dest`` unfinished until they are written.

    Each file is written whole, but a stopped export would leave some of them: its marker
    tells the next export that the set is not complete. The set is listed in ``dest``
    (:data:`WRITTEN`), by run: an export of the same run that replaces it (``overwrite``)
    removes the files no longer among its targets (a resume redid recordings under other
    names, finished a partial one, the input was cut), which buzzr would otherwise still read,
    and without ``overwrite`` their being there is a conflict. A file another run's export
    wrote is never replaced: both runs' recordings would go by one name; nor is one of another
    format of the same run (its CSVs beside its Raven tables). Runs are listed by
    their output directory relative to ``dest``, so that an output moved or copied with its
    export inside is still the same run. A listed run whose output is no longer there (moved
    elsewhere) claims nothing: its files of the recordings exported now go as this run's do.
    """
    with destination_held(dest):
        yield from _files_written_held(targets, dest, overwrite=overwrite, run=run)


def _files_written_held(
    targets: Sequence[Path], dest: Path, *, overwrite: bool, run: Run
) -> Iterator[None]:
    """:func:`_files_written`'s work, ``dest`` held: no other export checks it meanwhile."""
    listed = _listed(dest)
    here = os.path.realpath(run.output)
    # Both real: ".." in a key must climb out of dest's real folder, not out of a link to it.
    this_run = os.path.relpath(here, os.path.realpath(dest))
    mine = [key for key in listed if _listed_run(dest, key) == here]
    names = {_one_name(path.relative_to(dest).as_posix()) for path in targets}
    formats = {_format_of(path.name) for path in targets}
    gone = {
        key: [name for name in files if _one_name(name) in names]
        for key, files in listed.items()
        if key not in mine and not os.path.exists(os.path.join(_listed_run(dest, key), RUN_FILE))
    }
    earlier = {
        dest / name
        for files in [*(listed[key] for key in mine), *gone.values()]
        for name in files
        if ".." not in name and _format_of(name) in formats
    }
    _check_not_others(targets, dest=dest, listed=listed, mine=mine)
    stopped = _unfinished(dest)
    _check_free(
        targets,
        dest=dest,
        overwrite=overwrite,
        earlier=sorted(earlier - set(targets)),
        stopped=stopped is None or this_run in stopped,
    )
    remove_stale_temporaries(targets)
    # By run: another run's export finishing there says nothing of this one's files.
    _mark_unfinished(dest, {*(stopped or ()), this_run})
    yield
    removed = sorted(earlier - set(targets))
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:  # buzzr would have read them: said where the user sees it
        logger.warning(
            "removed %s of the earlier export, of recordings %s no longer holds under those "
            "names: %s",
            format_count(len(removed), "file"),
            run.output,
            first_names([path.relative_to(dest).as_posix() for path in removed], shown=5),
        )
    others = [name for key in mine for name in listed[key] if _format_of(name) not in formats]
    for key in mine:
        del listed[key]
    for key, superseded in gone.items():
        listed[key] = [name for name in listed[key] if name not in superseded]
        if not listed[key]:
            del listed[key]
    listed[this_run] = [*others, *(p.relative_to(dest).as_posix() for p in targets)]
    write_json(dest / WRITTEN, listed)
    _mark_unfinished(dest, (_unfinished(dest) or set()) - {this_run})


def _unfinished(dest: Path) -> set[str] | None:
    """The runs whose export into ``dest`` stopped before it finished (:data:`UNFINISHED`).

    None: a marker that names none (an earlier buzzdask's, or cut short): of any run.
    """
    try:
        named = json.loads((dest / UNFINISHED).read_text(encoding="utf-8"))["runs"]
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(run) for run in named} if isinstance(named, list) else None


def _mark_unfinished(dest: Path, runs: set[str]) -> None:
    """Name ``runs`` in ``dest``'s :data:`UNFINISHED`; none: remove it."""
    if runs:
        write_json(dest / UNFINISHED, {"runs": sorted(runs)})
    else:
        (dest / UNFINISHED).unlink(missing_ok=True)


def _check_not_others(
    targets: Sequence[Path], *, dest: Path, listed: Mapping[str, list[str]], mine: Sequence[str]
) -> None:
    """Refuse targets another run's export wrote, where that run's output is still there.

    A recording's partial and whole result (``_buzzpart``, ``_buzzdetect``) are one name to
    buzzr, which reads both with ``include_partial = TRUE``.
    """
    names = {_one_name(path.relative_to(dest).as_posix()): path for path in targets}
    for key, files in listed.items():
        taken = sorted(
            names[name].relative_to(dest).as_posix()
            for name in names.keys() & {_one_name(file) for file in files}
        )
        other = _listed_run(dest, key)
        if key in mine or not taken or not os.path.exists(os.path.join(other, RUN_FILE)):
            continue
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise OutputConflictError(
            f"export file {dest / taken[0]}{more} holds the export of another run, "
            f"{other}: recordings of both runs would go by one name (each "
            "run's names start at the folder it analysed), and overwrite=True (--overwrite) "
            "does not replace another run's files; export each run into its own dest (--dest)"
        )


def _format_of(name: str) -> str:
    """The format whose export wrote the file ``name``."""
    if name.endswith(RAVEN_SUFFIX):
        return "raven"
    if name.endswith((f"{BUZZDETECT_TAG}.csv", f"{BUZZPART_TAG}.csv")):
        return "buzzdetect"
    return "csv"


def _one_name(name: str) -> str:
    """An export file's name with a partial result named as the whole one."""
    partial = f"{BUZZPART_TAG}.csv"
    return name.removesuffix(partial) + f"{BUZZDETECT_TAG}.csv" if name.endswith(partial) else name


def _listed_run(dest: Path, key: str) -> str:
    """The real path of a run listed in ``dest``'s :data:`WRITTEN` (relative, or absolute)."""
    return os.path.realpath(os.path.join(os.path.realpath(dest), key))


def _listed(dest: Path) -> dict[str, list[str]]:
    """The files each run's export into ``dest`` wrote, by the run's output directory."""
    try:
        listed = json.loads((dest / WRITTEN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(listed, dict):
        return {}
    return {str(k): [str(n) for n in v] for k, v in listed.items() if isinstance(v, list)}


def _check_unique(
    recordings: Sequence[str], name: Callable[[str], PurePosixPath], dest: Path, *, scores: Path
) -> None:
    """Refuse recordings that would write one export file in ``dest``, before any is written.

    ``scores`` is the run's dataset folder: a recording renamed and analysed again by a resume
    leaves its results under its old name there until they are deleted.

    buzzdetect drops the extension (``a.wav`` and ``a.mp3``). Names that differ only in letter
    case or Unicode spelling (``Rec.mp3``, ``rec.mp3``) are one file where ``dest`` is
    case-blind (macOS, Windows): refused there, and said elsewhere, where they are two files
    until the export is copied to such a disk or OneDrive.
    """
    seen: dict[PurePosixPath, str] = {}
    folded: dict[str, str] = {}
    meeting: list[tuple[str, str]] = []
    for relative in recordings:
        target = name(relative)
        if len(target.name.encode()) > NAME_MAX:
            raise ParameterError(
                f"{relative!r} would export to a file name of {len(target.name.encode())} bytes, "
                f"more than a file system takes ({NAME_MAX}): {_renamed(scores, relative)}, "
                "or export --format csv (one file for all)"
            )
        key = unicodedata.normalize("NFC", str(target)).lower()
        if key in folded:
            meeting.append((folded[key], relative))
        folded[key] = relative
        if target in seen:
            _refuse_shared(seen[target], relative, target, "in extension", scores=scores)
        seen[target] = relative
    if meeting and _case_blind(dest):
        first, second = meeting[0]
        differing = f"in letter case, which {dest} does not tell"
        _refuse_shared(first, second, name(second), differing, scores=scores)
    if meeting:
        logger.warning(
            "%d pair(s) of recordings export to files whose names differ only in letter case "
            "or Unicode spelling: %s. Copied to macOS, Windows or OneDrive, one file of each "
            "pair replaces the other; if the export goes there, %s",
            len(meeting),
            first_names([f"{a} and {b}" for a, b in meeting], shown=3, separator="; "),
            _renamed(scores, meeting[0][1]),
        )


def _refuse_shared(
    first: str, second: str, target: PurePosixPath, differing: str, *, scores: Path
) -> None:
    raise ParameterError(
        f"{first!r} and {second!r} would both export to {target} (names that differ only "
        f"{differing}): {_renamed(scores, second)} (or the other), export them from separate "
        "runs, or export --format csv (one file for all)"
    )


def _renamed(scores: Path, recording: str) -> str:
    """How to give ``recording`` another name in the run's results (``scores``: its dataset)."""
    return (
        f"rename {recording!r}, delete its results under its old name ({scores / recording}) "
        "and analyse again with --resume (only it is redone)"
    )


def _case_blind(folder: Path) -> bool:
    """Whether names in ``folder`` (or the nearest folder above it that exists) ignore case."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:
        return False
    try:
        with tempfile.NamedTemporaryFile(prefix=".buzzdask-Case-", dir=existing) as probe:
            swapped = Path(probe.name).with_name(Path(probe.name).name.swapcase())
            return swapped.exists()
    except OSError:  # not writable: the export will say so
        return False


def export(
    output: str | os.PathLike[str],
    *,
    format: ExportFormat,
    dest: str | os.PathLike[str] | None = None,
    classes: Sequence[str] | str | None = None,
    precision: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    model: str | os.PathLike[str] | None = None,
    gap_frames: int = 0,
    min_frames: int = 1,
    time_format: str | Sequence[str] | None = None,
    tz: str | None = None,
    read_metadata: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Export a run's frames as buzzdetect CSVs, one combined CSV, or Raven selection tables.

    Parameters
    ----------
    output : path-like
        A buzzdask output directory (finished, or partial: what is written so far).
    format : {"buzzdetect", "csv", "raven"}
        See :mod:`buzzdask.exports`.
    dest : path-like, optional
        Directory to write into; default ``output / "export" / format``.
    classes : sequence of str, optional
        Only these classes' columns (activations; detections and events of those among them
        with a threshold); default all, in the model's order.
    precision : float in (0, 1), optional
        Detection thresholds from the model's ``tests/metrics.csv``, as buzzdetect
        (:func:`buzzdask.thresholds.thresholds_for_precision`; ``ins_buzz`` only).
    thresholds : mapping of class -> float, optional
        Detection thresholds given directly (not with ``precision``). A detection is
        ``activation > threshold``. Default for ``"csv"`` and ``"raven"``: the run's own.
        With either, ``"buzzdetect"`` writes buzzdetect's detection mode.
    model : path-like, optional
        The model directory whose metrics serve ``precision``; default the run's (as recorded
        in ``buzzdask.json``).
    gap_frames : int >= 0, default: 0
        ``"raven"``: most sub-threshold frames inside one event (:mod:`buzzdask.events`).
    min_frames : int >= 1, default: 1
        ``"raven"``: fewest frames per event.
    time_format : str or sequence of str, optional
        ``"csv"``: how recording start times are written in file names
        (:func:`buzzdask.recording_time.recording_starts`).
    tz : str, optional
        ``"csv"``: IANA time zone of the recording times; default naive local clock time.
    read_metadata : bool, default: True
        ``"csv"``: read start times from AudioMoth comments and GUANO timestamps of WAV files
        (and the comments of FLAC files made from them).
    overwrite : bool, default: False
        Replace export files that already exist (otherwise an error, before writing anything).

    Returns
    -------
    ExportResult

    Raises
    ------
    InputError
        ``output`` is not a buzzdask output, or holds no scores yet.
    ParameterError, ModelError
        A bad option (or one the format does not use), an unknown class, a threshold for a
        class not exported, a precision the model's metrics cannot give, or a ``"raven"``
        export without thresholds; before anything is written.
    OutputConflictError
        An export file already exists and ``overwrite`` is False.
    """
    if format not in FORMATS:
        raise ParameterError(f"format={format!r} is not one of {FORMATS}")
    _refuse_unused_options(
        format,
        csv={"time_format": time_format, "tz": tz, "read_metadata": not read_metadata},
        raven={"gap_frames": gap_frames != 0, "min_frames": min_frames != 1},
    )
    check_start_options(time_format=time_format, tz=tz)
    run = open_run(output)
    recordings = run.recordings()
    if not recordings:
        raise InputError(
            f"{run.output} holds no scored frames{'' if run.complete else ' yet'}: nothing to "
            "export"
        )
    run.warn_if_unfinished("exporting")
    failed = set(run.failed_recordings())
    without_frames = sorted(failed.difference(recordings))
    if without_frames:
        logger.warning(
            "%d input file(s) failed before any frame was written and have nothing to export "
            "(%s says why): %s",
            len(without_frames),
            run.layout.errors,
            first_names(without_frames, shown=5),
        )
    # Those failed besides (a file cut short that then failed to decode) are said above.
    damaged = sorted(set(run.damaged_recordings()).intersection(recordings) - failed)
    if damaged:
        # Exported like the others (as buzzdetect does): only this says they cover less.
        logger.warning(
            "%d recording(s) were damaged or cut short (%s says how): their exports hold the "
            "frames that could be read: %s",
            len(damaged),
            run.layout.errors,
            first_names(damaged, shown=5),
        )
    selected = _selected_classes(run, classes)
    choice = choose_thresholds(
        model_dir=run.metrics_model(model, precision=precision),
        classes=run.classes,
        precision=precision,
        thresholds=thresholds,
        model_name=run.model["name"],
    )
    if choice.source == "none" and format != "buzzdetect" and run.thresholds:
        choice = ThresholdChoice(
            values={n: run.thresholds[n] for n in run.classes if n in run.thresholds},
            source="given",
        )
    values = choice.values
    if selected is not None and values:
        values = {name: value for name, value in values.items() if name in selected}
        left_out = [name for name in choice.values if name not in values]
        # The run's own thresholds of classes left out are simply not used; given ones are.
        if left_out and (precision is not None or thresholds):
            raise ParameterError(
                f"thresholds for {left_out}, not among the classes exported ({selected}): "
                "add them to classes= (--classes) or leave their thresholds out"
            )
        unthresholded = [name for name in selected if name not in values]
        if values and unthresholded and format == "buzzdetect":
            # buzzdetect's detection mode writes detections only: such a class would vanish.
            raise ParameterError(
                f"no threshold for {unthresholded}, asked in classes= (--classes): a buzzdetect "
                "export with thresholds writes detections only; give their thresholds too or "
                "leave them out of classes"
            )
        if not values and format != "csv":
            raise ParameterError(
                f"no threshold for the classes asked ({selected}); thresholds are given for "
                f"{list(choice.values)}"
            )
    target = user_path(dest) if dest is not None else run.output / "export" / format
    if format == "raven" and not values:
        raise ParameterError(
            "a Raven export lists detection events: pass precision= or thresholds= "
            "(--precision or --threshold CLASS=VALUE)"
        )
    writer: dict[str, Callable[..., tuple[list[Path], list[str]]]] = {
        "buzzdetect": _export_buzzdetect,
        "csv": _export_csv,
        "raven": _export_raven,
    }
    files, untimed = writer[format](
        run,
        recordings,
        target,
        classes=selected if selected is not None else list(run.classes),
        thresholds=values,
        overwrite=overwrite,
        gap_frames=gap_frames,
        min_frames=min_frames,
        time_format=time_format,
        tz=tz,
        read_metadata=read_metadata,
    )
    chosen = ThresholdChoice(
        values=values,
        source=choice.source,
        precision=choice.precision,
        metrics=choice.metrics,
        rows=choice.rows,
    )
    return ExportResult(format=format, dest=target, files=files, thresholds=chosen, untimed=untimed)


#: Export keywords whose flag is not their name in dashes.
_FLAGS = {"read_metadata": "--no-metadata"}


def _refuse_unused_options(format: str, **options_of: dict[str, object]) -> None:
    """An option given to a format that does not use it is an error, not silently nothing."""
    for owner, options in options_of.items():
        given = [name for name, value in options.items() if value not in (None, False)]
        if given and format != owner:
            flags = [_FLAGS.get(name, "--" + name.replace("_", "-")) for name in given]
            raise ParameterError(
                f"{', '.join(given)} applies to format={owner!r} only, not {format!r} "
                f"(CLI: {', '.join(flags)})"
            )


def _export_buzzdetect(
    run: Run,
    recordings: Sequence[str],
    dest: Path,
    *,
    classes: Sequence[str],
    thresholds: Mapping[str, float],
    overwrite: bool,
    **_: Any,
) -> tuple[list[Path], list[str]]:
    _check_unique(recordings, buzzdetect_name, dest, scores=run.dataset)
    unfinished = set(run.unfinished_recordings())
    if unfinished:
        logger.warning(
            "%d recording(s) not analysed to their end are exported as partial results "
            "(<name>%s.csv, which buzzr reads only with include_partial = TRUE): %s",
            len(unfinished),
            BUZZPART_TAG,
            first_names(sorted(unfinished), shown=5),
        )
    targets = [
        dest.joinpath(*buzzdetect_name(relative, partial=relative in unfinished).parts)
        for relative in recordings
    ]
    needed = list(thresholds) if thresholds else list(classes)
    columns = ["start", *(f"{ACTIVATION_PREFIX}{name}" for name in needed)]
    with _files_written(targets, dest, overwrite=overwrite, run=run):
        for relative, path in zip(recordings, targets, strict=True):
            table = buzzdetect_table(
                run.recording_frames(relative, columns=columns),
                classes=classes,
                thresholds=thresholds,
                digits_results=run.digits_results,
                frame_length_s=run.frame_length_s,
            )
            _write_text(path, [_csv_text(table)])
    return targets, []


def _starts(
    run: Run,
    recordings: Sequence[str],
    *,
    time_format: Any,
    tz: str | None,
    read_metadata: bool,
) -> dict[str, pd.Timestamp | None]:
    table = recording_starts(
        recordings,
        root=run.input_root,
        time_format=time_format,
        tz=tz,
        read_metadata=read_metadata,
    )
    return {
        str(name): (None if pd.isna(start) else pd.Timestamp(start))
        for name, start in table["start"].items()
    }


def _export_csv(
    run: Run,
    recordings: Sequence[str],
    dest: Path,
    *,
    classes: Sequence[str],
    thresholds: Mapping[str, float],
    overwrite: bool,
    time_format: Any,
    tz: str | None,
    read_metadata: bool,
    **_: Any,
) -> tuple[list[Path], list[str]]:
    path = dest / COMBINED_NAME
    with _files_written([path], dest, overwrite=overwrite, run=run):
        starts = _starts(
            run, recordings, time_format=time_format, tz=tz, read_metadata=read_metadata
        )
        _write_text(path, _combined_csv(run, recordings, starts, classes, thresholds))
    return [path], [name for name in recordings if starts.get(name) is None]


def _combined_csv(
    run: Run,
    recordings: Sequence[str],
    starts: Mapping[str, pd.Timestamp | None],
    classes: Sequence[str],
    thresholds: Mapping[str, float],
) -> Iterator[str]:
    """``frames.csv``'s text, a recording at a time."""
    # buzzdetect's decimals, and the hop's where it has more (0.125 s): start and end exact.
    digits = max(time_digits(run.frame_length_s), time_digits(run.frame_hop_s))
    needed = [name for name in run.classes if name in classes or name in thresholds]
    columns = ["file", "start", "end", *(f"{ACTIVATION_PREFIX}{name}" for name in needed)]
    for number, relative in enumerate(recordings):
        frames = run.recording_frames(relative, columns=columns)
        table: dict[str, Any] = {
            "file": frames["file"].astype("string"),
            "start": np.round(frames["start"].to_numpy(np.float64), digits),
            "end": np.round(frames["end"].to_numpy(np.float64), digits),
        }
        # Blank where the start is unknown, even for every recording: the columns stay the
        # documented ones whatever the names.
        start = starts.get(relative)
        table["time"] = (
            start + pd.to_timedelta(frames["start"].to_numpy(np.float64), unit="s")
            if start is not None
            else pd.Series(pd.NaT, index=frames.index)
        )
        kept = [f"{ACTIVATION_PREFIX}{name}" for name in classes]
        values = _buzzdetect_values(frames[kept].to_numpy(), run.digits_results)
        table.update(zip(kept, values.T, strict=True))
        for name, threshold in thresholds.items():
            hits = detected(frames[f"{ACTIVATION_PREFIX}{name}"].to_numpy(), threshold)
            table[f"{DETECTION_PREFIX}{name}"] = hits.astype(np.int64)
        yield _csv_text(pd.DataFrame(table), header=number == 0)


def _raven_value(value: float, digits: int | None) -> float:
    return float(value if digits is None else round(float(value), digits))


def _export_raven(
    run: Run,
    recordings: Sequence[str],
    dest: Path,
    *,
    thresholds: Mapping[str, float],
    overwrite: bool,
    gap_frames: int,
    min_frames: int,
    **_: Any,
) -> tuple[list[Path], list[str]]:
    _check_unique(recordings, raven_name, dest, scores=run.dataset)
    targets = [dest.joinpath(*raven_name(relative).parts) for relative in recordings]
    nyquist = run.sample_rate / 2  # the embedder hears nothing above it
    with _files_written(targets, dest, overwrite=overwrite, run=run):
        for relative, path in zip(recordings, targets, strict=True):
            _write_raven(run, relative, path, thresholds, gap_frames, min_frames, nyquist)
    return targets, []


def _write_raven(
    run: Run,
    relative: str,
    path: Path,
    thresholds: Mapping[str, float],
    gap_frames: int,
    min_frames: int,
    nyquist: float,
) -> None:
    """One recording's Raven selection table."""
    events = stored_recording_events(
        run, relative, thresholds, gap_frames=gap_frames, min_frames=min_frames
    ).sort_values(["start", "class"], kind="stable", ignore_index=True)
    digits = run.digits_results
    table = pd.DataFrame(
        {
            "Selection": np.arange(1, len(events) + 1),
            "View": "Spectrogram 1",
            "Channel": 1,
            "Begin Time (s)": np.round(events["start"].to_numpy(), RAVEN_TIME_DECIMALS),
            "End Time (s)": np.round(events["end"].to_numpy(), RAVEN_TIME_DECIMALS),
            "Low Freq (Hz)": 0.0,
            "High Freq (Hz)": float(nyquist),
            "Class": events["class"].astype(str).to_numpy(),
            "Peak Activation": [_raven_value(v, digits) for v in events["peak_activation"]],
            "Mean Activation": [_raven_value(v, digits) for v in events["mean_activation"]],
            "Frames": events["frames"].to_numpy(),
        },
        columns=RAVEN_COLUMNS,
    )
    _write_text(path, [_csv_text(table, sep="\t")])
