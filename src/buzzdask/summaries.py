"""Activity in time bins: frames and detections per group and bin, as buzzr's ``bin_directory``.

Semantics, those of buzzr (``call_detections``, ``floor_start``, ``bin``, ``bin_directory``):

- a frame is a detection when ``activation > threshold`` (strictly;
  :func:`buzzdask.thresholds.detected`, the rule of every buzzdask output);
- a frame belongs to the bin its **start** falls in. When the recording's start time is known
  (:mod:`buzzdask.recording_time`), ``time = recording start + start`` and
  ``bin_datetime = floor(time / width) * width``, counted from 1970-01-01 00:00 (UTC for times
  in a time zone), as buzzr's ``floor_date(..., "<seconds>aseconds")``: bins of a width dividing
  an hour start on the clock's round minutes in any whole-hour time zone (a warning says where
  they do not: days, or hours in a half-hour zone), and bins of consecutive files of one
  recorder line up. Otherwise ``bin_filetime = floor(start / width) *
  width`` seconds from the start of the file, and the file is listed as untimed;
- per group and bin: ``frames`` (frames whose start is in the bin), ``detections_<class>`` (their
  detections) and ``detectionrate_<class> = detections_<class> / frames``. Frames of different
  files in the same group and bin add up (buzzr bins per file, then bins again across files).

The dataset is read with dask.dataframe, partition by partition (one chunk file each), and only
``file``, ``start`` and the needed ``activation_<class>`` columns; each partition is reduced to
its bins before anything is combined, so memory stays that of a chunk plus the bins.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from buzzdask.errors import OutputConflictError, ParameterError
from buzzdask.inputs import first_names, user_path
from buzzdask.recording_time import TimeFormat, check_start_options, recording_starts
from buzzdask.results import Run, open_run
from buzzdask.thresholds import COMPARISON, METRICS_CLASS, choose_thresholds, detected

__all__ = [
    "By",
    "Summary",
    "bin_width",
    "group_values",
    "summarize",
    "summary_paths",
    "width_label",
]

logger = logging.getLogger(__name__)

#: Grouping: a folder level of the relative path (1 = the top folder, e.g. the site), several
#: levels, ``"file"`` (each recording alone) or ``None`` (everything together).
By = int | Sequence[int] | str | None

_BIN_NS = "_bin_ns"  # bin start as int64 nanoseconds (NaT's value when untimed) while reducing
_NAT = np.iinfo(np.int64).min  # the int64 value of NaT
_NO_FOLDER = "."  # the level value of a file that has no folder at that level


@dataclass(frozen=True)
class Summary:
    """The settings of one summary, resolved and checked before any work.

    Attributes
    ----------
    width : pandas.Timedelta
        Bin width (> 0, whole milliseconds).
    group_columns : tuple of str
        ``("level_1",)``, ``("file",)``... (empty: one group).
    levels : tuple of int
        Folder levels grouped on (1-based), or empty.
    by_file : bool
    thresholds : dict of class -> float
    """

    width: pd.Timedelta
    group_columns: tuple[str, ...]
    levels: tuple[int, ...]
    by_file: bool
    thresholds: dict[str, float]

    @property
    def label(self) -> str:
        """File-name stem: ``bins-5min-by-level_1``, ``bins-1h-by-file``, ``bins-5min-all``."""
        grouping = "-by-" + "-".join(self.group_columns) if self.group_columns else "-all"
        return f"bins-{width_label(self.width)}{grouping}"


_DAY_UNIT = re.compile(r"(\d)\s*d(?![a-z])")


def bin_width(bin: str | timedelta | pd.Timedelta) -> pd.Timedelta:
    """A bin width from ``"5min"``, ``"1h"``, ``"90s"`` or a timedelta.

    Raises
    ------
    ParameterError
        Not a duration (a number without a unit included), not positive, or not whole
        milliseconds.

    Examples
    --------
    >>> bin_width("5min")
    Timedelta('0 days 00:05:00')
    """
    if isinstance(bin, (int, float)) or (isinstance(bin, str) and _is_number(bin)):
        if not np.isfinite(float(bin)) or float(bin) <= 0:
            raise ParameterError(f"bin={bin!r} must be a positive duration, e.g. '5min'")
        # pandas reads a bare number as nanoseconds; buzzr's binwidth is a number of minutes.
        raise ParameterError(
            f"bin={bin!r} has no unit: give one, e.g. '{bin}min' (buzzr's binwidth is in "
            "minutes), '30s' or '1h'"
        )
    try:
        # buzzr's and the README's "1d": pandas 3 deprecates the lower-case day unit.
        width = pd.Timedelta(_DAY_UNIT.sub(r"\1D", bin) if isinstance(bin, str) else bin)
    except (ValueError, TypeError):
        raise ParameterError(
            f"bin={bin!r} is not a duration; use e.g. '5min', '20min', '1h', '30s'"
        ) from None
    if pd.isna(width) or width <= pd.Timedelta(0):
        raise ParameterError(f"bin={bin!r} must be a positive duration, e.g. '5min'")
    if width.value % 1_000_000:
        raise ParameterError(f"bin={bin!r} must be a whole number of milliseconds")
    return width


def _aligned_width(tz: Any, width: pd.Timedelta) -> pd.Timedelta | None:
    """The widest bins (an hour at most) on ``tz``'s round times, where ``width``'s are not.

    Bins are counted from 1970-01-01 UTC: days start at the zone's offset, hours at :30 past in
    a half-hour zone, in winter or summer. None where bins of ``width`` start on round times.
    """
    offsets = [
        pd.Timedelta(pd.Timestamp(day, tz=tz).utcoffset()).value
        for day in ("2024-01-15", "2024-07-15")
    ]
    if all(offset % width.value == 0 for offset in offsets):
        return None
    return pd.Timedelta(math.gcd(pd.Timedelta(hours=1).value, *offsets))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def width_label(width: pd.Timedelta) -> str:
    """A bin width as summaries' file names and records spell it: ``"5min"``, ``"1d"``."""
    seconds, milliseconds = divmod(width.value // 1_000_000, 1000)
    if milliseconds:
        return f"{width.value // 1_000_000}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _levels(by: By) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
    if by is None or by == "all":  # "all", as the command line spells it
        return (), (), False
    if isinstance(by, str):
        if by == "file":
            return ("file",), (), True
        raise ParameterError(
            f"by={by!r} must be 'file', a folder level (1 = the top folder), a list of levels, "
            "or 'all' (None)"
        )
    levels = (by,) if isinstance(by, (int, np.integer)) else tuple(by)
    if not levels or not all(
        isinstance(level, (int, np.integer)) and not isinstance(level, bool) and level >= 1
        for level in levels
    ):
        raise ParameterError(f"by={by!r}: folder levels are integers >= 1 (1 = the top folder)")
    levels = tuple(dict.fromkeys(int(level) for level in levels))  # "1,1": level 1 once
    return tuple(f"level_{level}" for level in levels), levels, False


def group_values(relative: str, *, levels: Sequence[int], by_file: bool) -> tuple[str, ...]:
    """The group one recording belongs to.

    Parameters
    ----------
    relative : str
        The recording's relative name (``"siteA/2024-06-01/20240601_053000.WAV"``).
    levels : sequence of int >= 1
        Folder levels: ``1`` -> ``"siteA"``, ``2`` -> ``"2024-06-01"``; ``"."`` for a file with
        no folder at that level.
    by_file : bool
        The group is the file itself.

    Examples
    --------
    >>> group_values("siteA/d1/x.wav", levels=[1, 2], by_file=False)
    ('siteA', 'd1')
    >>> group_values("x.wav", levels=[1], by_file=False)
    ('.',)
    """
    if by_file:
        return (relative,)
    folders = PurePosixPath(relative).parts[:-1]
    return tuple(folders[level - 1] if level <= len(folders) else _NO_FOLDER for level in levels)


def summary_paths(dest: str | os.PathLike[str], label: str) -> dict[str, Path]:
    """Where a summary is written: ``<label>.parquet``, ``<label>.csv``, ``<label>-files.csv``."""
    folder = user_path(dest)
    return {
        "parquet": folder / f"{label}.parquet",
        "csv": folder / f"{label}.csv",
        "files": folder / f"{label}-files.csv",
    }


def summarize(
    output: str | os.PathLike[str] | Run,
    *,
    bin: str | timedelta | pd.Timedelta = "5min",
    by: By = "file",
    precision: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    model: str | os.PathLike[str] | None = None,
    dest: str | os.PathLike[str] | None = None,
    write: bool = True,
    overwrite: bool = False,
    time_format: TimeFormat | None = None,
    tz: str | None = None,
    read_metadata: bool = True,
) -> pd.DataFrame:
    """Frames, detections and detection rates per group and time bin (buzzr's ``bin``).

    Parameters
    ----------
    output : path-like or Run
        An analysis output (finished or partial).
    bin : str or timedelta, default: "5min"
        Bin width (``"5min"``, ``"1h"``...).
    by : int, sequence of int, "file", "all" or None, default: "file"
        Groups: folder level(s) of the relative path (``1`` = top folder, e.g. the site),
        each recording alone, or everything together (``"all"`` or None; untimed files then
        share offset bins). A recording with no folder at a level (directly in the input
        folder, or a level deeper than its path) is in the group ``"."`` there.
    precision : float in (0, 1), optional
        Thresholds from the model's test metrics (:func:`buzzdask.thresholds.choose_thresholds`).
    thresholds : mapping of class -> float, optional
        Thresholds per class. Without ``precision`` or ``thresholds``, those the run was
        analysed with.
    model : path-like, optional
        The model directory whose metrics serve ``precision``; default the run's, as recorded
        (give it where the results were copied to another machine).
    dest : path-like, optional
        Folder for the files; default ``<output>/summaries``.
    write : bool, default: True
        Write ``<label>.parquet``, ``<label>.csv`` and ``<label>-files.csv`` (each recording's
        start, where it came from, or why it is unknown, and whether it is ``complete``: scored
        to its end) under ``dest``, where ``label`` is e.g. ``bins-5min-by-level_1``.
    overwrite : bool, default: False
        Replace files of the same label; otherwise their presence is an error.
    time_format : str or sequence of str, optional
        How names spell start times (:mod:`buzzdask.recording_time`).
    tz : str, optional
        IANA time zone for ``bin_datetime``; default naive local clock time.
    read_metadata : bool, default: True
        Read AudioMoth comments / GUANO timestamps from the input WAV files when reachable.

    Returns
    -------
    pandas.DataFrame [shape=(n_group_bins, ...)]
        Columns: the group columns (``level_<k>`` or ``file``), ``bin_datetime``
        (datetime64[ns], NaT for untimed files), ``bin_filetime`` (float64 [s] from the file's
        start, NaN for timed files), ``frames`` (int64), then per thresholded class
        ``detections_<class>`` (int64) and ``detectionrate_<class>`` (float64), sorted by
        group and bin. ``attrs``: ``untimed_files`` (list of str), ``run_complete`` (bool),
        ``unfinished_files`` (list of str: recordings whose frames stop short of their end, a
        run stopped or a file failed), ``thresholds``, ``bin``, ``paths`` (what was written).

    Raises
    ------
    ParameterError
        A bad option, or no thresholds at all (neither given nor in the run).
    InputError
        ``output`` is not a buzzdask output or holds no frames yet.
    OutputConflictError
        The files exist and ``overwrite`` is False.
    """
    check_start_options(time_format=time_format, tz=tz)
    run = output if isinstance(output, Run) else open_run(output)
    settings = resolve_summary(
        run, bin=bin, by=by, precision=precision, thresholds=thresholds, model=model
    )
    run.warn_if_unfinished("summarizing")
    paths = summary_paths(dest if dest is not None else run.output / "summaries", settings.label)
    if write and not overwrite:
        _refuse_existing(paths)
    starts = recording_starts(
        run.recordings(),
        root=run.input_root,
        time_format=time_format,
        tz=tz,
        read_metadata=read_metadata,
    )
    # Bins of a recording not yet scored to its end count only its frames so far: marked in
    # the files' listing, which outlives the warning said now.
    unfinished = run.unfinished_recordings()
    starts["complete"] = ~starts.index.isin(unfinished)
    table = compute_bins(run, settings, starts=starts["start"], tz=tz)
    untimed = starts.index[starts["start"].isna()].tolist()
    if untimed:
        logger.warning(
            "%d recording(s) without a known start time, binned by offset from the file "
            "start: %s%s",
            len(untimed),
            first_names(
                [f"{name} ({starts.at[name, 'problem']})" for name in untimed],
                shown=10,
                separator="; ",
            ),
            f" (each one's reason: {paths['files']})" if write else "",
        )
    aligned = None if tz is None else _aligned_width(tz, settings.width)
    if aligned is not None:
        # As buzzr's: counted from 1970-01-01 UTC, so a zone's days start at its offset.
        logger.warning(
            "bins of %s are counted from 1970-01-01 UTC, as buzzr's are, not from local "
            "midnight in %s, so they do not start on its round times: for local days or hours, "
            "use %s bins and sum them",
            width_label(settings.width),
            tz,
            width_label(aligned),
        )
    table.attrs.update(
        # Which head: its files' names and columns are the same for every head.
        model=run.model["name"],
        untimed_files=untimed,
        run_complete=run.complete,
        unfinished_files=unfinished,
        thresholds=dict(settings.thresholds),
        bin=width_label(settings.width),
        paths={},
    )
    if write:
        from buzzdask.lock import destination_held
        from buzzdask.write import remove_stale_temporaries

        with destination_held(paths["parquet"].parent):
            if not overwrite:  # again: another summarize may have written them meanwhile
                _refuse_existing(paths)
            remove_stale_temporaries(paths.values())
            _write(table, starts, paths, settings=settings, tz=tz, time_format=time_format)
        table.attrs["paths"] = {kind: str(path) for kind, path in paths.items()}
    return table


def resolve_summary(
    run: Run,
    *,
    bin: str | timedelta | pd.Timedelta,
    by: By,
    precision: float | None,
    thresholds: Mapping[str, float] | None,
    model: str | os.PathLike[str] | None = None,
) -> Summary:
    """Check a summary's options against the run; nothing is read but metadata.

    The metrics of ``model`` (default the run's) serve a ``precision``.
    """
    width = bin_width(bin)
    columns, levels, by_file = _levels(by)
    metrics = run.metrics_model(model, precision=precision)
    if precision is None and not thresholds:
        values = run.thresholds
        if not values:
            # Its head's class, and a value its own tests chose: model_general_v3's -1.2
            # is no other head's.
            first = METRICS_CLASS if METRICS_CLASS in run.classes else run.classes[0]
            raise ParameterError(
                f"no thresholds: the run has none of its own; give thresholds={{'{first}': "
                f"VALUE}} (--threshold {first}=VALUE), an activation this head's tests chose "
                "(model_general_v3's ins_buzz: -1.2), or precision=0.95 (--precision 0.95) "
                "where its model directory holds tests/metrics.csv"
            )
    else:
        values = choose_thresholds(
            model_dir=metrics,
            classes=run.classes,
            precision=precision,
            thresholds=thresholds,
            model_name=run.model["name"],
        ).values
    return Summary(
        width=width,
        group_columns=columns,
        levels=levels,
        by_file=by_file,
        thresholds=dict(values),
    )


def compute_bins(
    run: Run,
    settings: Summary,
    *,
    starts: Mapping[str, Any] | pd.Series,
    tz: str | None = None,
) -> pd.DataFrame:
    """The binned table (see :func:`summarize`), from the run's dataset with dask.

    Parameters
    ----------
    run : Run
    settings : Summary
    starts : mapping or Series of relative name -> Timestamp (NaT/None when unknown)
        Recording start times, naive or all in ``tz``.
    tz : str, optional
        The zone the aware ``starts`` are in.
    """
    classes = list(settings.thresholds)
    start_ns = {
        str(name): pd.Timestamp(value).value
        for name, value in dict(starts).items()
        if value is not None and not pd.isna(value)
    }
    meta = _empty_partial(settings.group_columns, classes)
    frames = run.frames(columns=["file", "start", *(f"activation_{c}" for c in classes)])
    partials = frames.map_partitions(
        _bin_partition,
        start_ns=start_ns,
        settings=settings,
        width_ns=int(settings.width.value),
        thresholds=settings.thresholds,
        meta=meta,
    ).compute()
    return _finish(partials, settings, classes=classes, tz=tz)


def _empty_partial(group_columns: Sequence[str], classes: Sequence[str]) -> pd.DataFrame:
    columns: dict[str, pd.Series] = {name: pd.Series([], dtype="string") for name in group_columns}
    columns[_BIN_NS] = pd.Series([], dtype="int64")
    columns["bin_filetime"] = pd.Series([], dtype="float64")
    columns["frames"] = pd.Series([], dtype="int64")
    for name in classes:
        columns[f"detections_{name}"] = pd.Series([], dtype="int64")
    return pd.DataFrame(columns)


def _bin_partition(
    partition: pd.DataFrame,
    *,
    start_ns: Mapping[str, int],
    settings: Summary,
    width_ns: int,
    thresholds: Mapping[str, float],
) -> pd.DataFrame:
    """One partition's frames reduced to (group, bin) counts; runs on a dask worker."""
    group_columns = settings.group_columns
    empty = _empty_partial(group_columns, list(thresholds))
    columns: dict[str, list[Any]] = {name: [] for name in empty.columns}
    files = partition["file"].to_numpy()
    # A partition is one chunk of one file; splitting by file keeps any other layout correct.
    for name in pd.unique(files):
        rows = files == name
        start = partition["start"].to_numpy(dtype=np.float64)[rows]
        origin = start_ns.get(str(name))
        if origin is not None:
            # Whole nanoseconds from 1970-01-01 (UTC when zoned), floored like buzzr's aseconds.
            time_ns = origin + np.rint(start * 1e9).astype(np.int64)
            bins, inverse = np.unique((time_ns // width_ns) * width_ns, return_inverse=True)
            columns[_BIN_NS].append(bins)
            columns["bin_filetime"].append(np.full(len(bins), np.nan))
        else:
            width_s = width_ns / 1e9
            bins, inverse = np.unique(np.floor(start / width_s) * width_s, return_inverse=True)
            columns[_BIN_NS].append(np.full(len(bins), _NAT, dtype=np.int64))
            columns["bin_filetime"].append(bins)
        columns["frames"].append(np.bincount(inverse, minlength=len(bins)))
        for class_name, threshold in thresholds.items():
            hits = detected(partition[f"activation_{class_name}"].to_numpy()[rows], threshold)
            columns[f"detections_{class_name}"].append(
                np.bincount(inverse, weights=hits, minlength=len(bins)).astype(np.int64)
            )
        values = group_values(str(name), levels=settings.levels, by_file=settings.by_file)
        for column, value in zip(group_columns, values, strict=True):
            columns[column].append(np.full(len(bins), value, dtype=object))
    if not columns["frames"]:
        return empty
    table = pd.DataFrame({name: np.concatenate(parts) for name, parts in columns.items()})
    return table.astype(empty.dtypes.to_dict())


def _finish(
    partials: pd.DataFrame, settings: Summary, *, classes: Sequence[str], tz: str | None
) -> pd.DataFrame:
    keys = [*settings.group_columns, _BIN_NS, "bin_filetime"]
    counts = ["frames", *(f"detections_{name}" for name in classes)]
    table = (
        partials.groupby(keys, dropna=False, sort=False)[counts]
        .sum()
        .reset_index()
        .sort_values(keys, kind="stable", ignore_index=True)
    )
    bins = pd.Series(table[_BIN_NS].to_numpy(dtype=np.int64).view("datetime64[ns]"))
    if tz is not None:
        bins = bins.dt.tz_localize("UTC").dt.tz_convert(tz)
    table.insert(table.columns.get_loc(_BIN_NS), "bin_datetime", bins)
    table = table.drop(columns=_BIN_NS)
    table["frames"] = table["frames"].astype("int64")
    for name in classes:
        column = f"detections_{name}"
        table[column] = table[column].astype("int64")
    for name in classes:
        table[f"detectionrate_{name}"] = table[f"detections_{name}"] / table["frames"]
    for column in settings.group_columns:
        table[column] = table[column].astype("string")
    return table


def _refuse_existing(paths: Mapping[str, Path]) -> None:
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing:
        raise OutputConflictError(
            f"summary files already exist: {', '.join(existing)}; pass overwrite=True "
            "(--overwrite) to replace them, or another dest (--dest)"
        )


def _write(
    table: pd.DataFrame,
    starts: pd.DataFrame,
    paths: Mapping[str, Path],
    *,
    settings: Summary,
    tz: str | None,
    time_format: TimeFormat | None,
) -> None:
    import pyarrow as pa

    from buzzdask.write import write_table

    record = {
        "model": table.attrs.get("model"),
        "bin": width_label(settings.width),
        "by": list(settings.group_columns),
        "thresholds": settings.thresholds,
        "comparison": f"activation {COMPARISON} threshold",
        "tz": tz,
        "time_format": time_format,
        "untimed_files": table.attrs.get("untimed_files", []),
        "run_complete": table.attrs.get("run_complete"),
        "unfinished_files": table.attrs.get("unfinished_files", []),
    }
    plain = table.copy()
    plain.attrs = {}
    arrow = pa.Table.from_pandas(plain, preserve_index=False)
    arrow = arrow.replace_schema_metadata(
        {**(arrow.schema.metadata or {}), b"buzzdask_summary": json.dumps(record, default=str)}
    )
    write_table(arrow, paths["parquet"])
    _write_text(paths["csv"], plain.to_csv(index=False))
    listing = starts.reset_index()
    _write_text(paths["files"], listing.to_csv(index=False))


def _write_text(path: Path, text: str) -> None:
    """Write atomically (a hidden temporary name, then a rename), as the Parquet files."""
    from buzzdask.write import atomic_path

    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
