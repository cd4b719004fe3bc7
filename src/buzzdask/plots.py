"""Pictures of a run: detection rate over the time of day per group, activation of one recording.

Figures are built with matplotlib's object interface (:class:`matplotlib.figure.Figure`, no
``pyplot``): nothing touches a display or a global figure list, so they draw the same in a
notebook, in a batch job and on a compute node. matplotlib is imported only when a plot is made.
Each shows itself as a PNG where it is a notebook cell's value, ``%matplotlib inline`` or not.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import timedelta
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from buzzdask.errors import OutputConflictError, ParameterError
from buzzdask.inputs import as_list, user_path
from buzzdask.lock import destination_held
from buzzdask.recording_time import (
    TimeFormat,
    check_start_options,
    recording_starts,
    said_once,
)
from buzzdask.results import Run, open_run
from buzzdask.summaries import By, Summary, bin_width, resolve_summary, summarize, width_label
from buzzdask.thresholds import detected
from buzzdask.write import atomic_path, remove_stale_temporaries

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_activation", "plot_daily_activity", "plot_run"]

_SUMMED = ("bin_datetime", "bin_filetime", "frames")
_MAX_LEGEND = 12  # more groups than this are drawn without a legend
_DISTINCT_COLOURS = 10  # matplotlib's default cycle


def _group_columns(summary: pd.DataFrame) -> list[str]:
    return [
        column
        for column in summary.columns
        if column not in _SUMMED and not column.startswith(("detections_", "detectionrate_"))
    ]


def _rate_class(summary: pd.DataFrame, class_name: str | None) -> str:
    classes = [
        c.removeprefix("detections_") for c in summary.columns if c.startswith("detections_")
    ]
    if class_name is None:
        if not classes:
            raise ParameterError("the summary has no detections_<class> column to plot")
        return classes[0]
    if class_name not in classes:
        raise ParameterError(f"class_name={class_name!r} is not in the summary; it has {classes}")
    return class_name


#: A time's UTC offset as a summary's CSV writes it (``2024-06-01 06:00:00-04:00``).
_OFFSET = r"(?:[+-]\d\d:?\d\d|Z)$"


def _as_times(column: pd.Series) -> pd.Series:
    """``bin_datetime`` as times; from text (a CSV read back), the clock time it writes.

    The offset is left off: a summer's and a winter's (-04:00, -05:00) share no column, and
    the clock time is what is drawn.
    """
    if pd.api.types.is_datetime64_any_dtype(column):
        return column
    try:
        text = column.astype("string").str.replace(_OFFSET, "", regex=True)
        return pd.to_datetime(text, format="ISO8601")
    except (ValueError, TypeError):
        raise ParameterError(
            "the summary's bin_datetime column holds no times (it reads "
            f"{column.dropna().iloc[0]!r})"
        ) from None


def plot_daily_activity(
    summary: pd.DataFrame, *, class_name: str | None = None, title: str | None = None
) -> Figure:
    """Detection rate over the time of day, a line per group (site, folder, file).

    Bins of every day are pooled by their clock time (buzzr's ``commontime``): the rate at
    06:00 is the detections of all 06:00 bins over their frames. Rows of untimed recordings
    are left out (the figure says how many); a summary with only untimed rows is drawn against
    the time since the file start instead.

    Parameters
    ----------
    summary : pandas.DataFrame
        A table from :func:`buzzdask.summaries.summarize`, or its CSV read back
        (``pd.read_csv``).
    class_name : str, optional
        The class whose rate is drawn; default the summary's first.
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ParameterError
        ``summary`` is no such table (an output's path: :func:`plot_run` takes that), or
        ``class_name`` is not one of its classes.
    """
    from matplotlib.figure import Figure

    if not isinstance(summary, pd.DataFrame) or "bin_datetime" not in summary:
        given = (
            "a DataFrame without a bin_datetime column"
            if isinstance(summary, pd.DataFrame)
            else f"a {type(summary).__name__}"
        )
        raise ParameterError(
            f"summary must be a table of summarize(output), not {given}; plot_run(output) "
            "draws an output's plots"
        )
    summary = summary.assign(bin_datetime=_as_times(summary["bin_datetime"]))
    name = _rate_class(summary, class_name)
    detections = f"detections_{name}"
    groups = _group_columns(summary)
    timed = summary[summary["bin_datetime"].notna()]
    untimed_rows = len(summary) - len(timed)
    # The bin width, where the summary says it.
    width = summary.attrs.get("bin")
    if width and len(timed):
        _refuse_days(bin_width(width))
    if len(timed):
        clock = timed["bin_datetime"].dt
        x = clock.hour + clock.minute / 60 + clock.second / 3600
        zone = getattr(timed["bin_datetime"].dt, "tz", None)
        # Without a zone, the clock each recorder wrote (UTC for an AudioMoth left at it).
        xlabel = f"time of day (h, {zone if zone is not None else 'as the recorders wrote it'})"
        rows, unit_s = timed, 3600
    else:
        span = float(summary["bin_filetime"].max()) if len(summary) else 0.0
        unit, size = ("s", 1) if span < 600 else ("min", 60) if span < 3 * 3600 else ("h", 3600)
        x = summary["bin_filetime"] / size
        xlabel = f"time since the start of the file ({unit}; no start times known)"
        rows, unit_s = summary, size
    data = rows.assign(_x=x.to_numpy())
    keys = [*groups, "_x"] if groups else ["_x"]
    pooled = data.groupby(keys, sort=True, dropna=False)[["frames", detections]].sum()
    pooled["rate"] = pooled[detections] / pooled["frames"]
    pooled = pooled.reset_index()

    figure = _shown_in_notebooks(Figure(figsize=(8, 4), layout="constrained"))
    axes = figure.add_subplot()
    lines = pooled.groupby(groups, sort=True) if groups else [("all recordings", pooled)]
    if len(lines) > _DISTINCT_COLOURS:  # matplotlib's 10 colours came round again
        axes.set_prop_cycle(color=_many_colours())
    # Bins of 7 minutes fall at other clock times each day, closer together pooled than one bin.
    step = bin_width(width).total_seconds() / unit_s if width else _bin_step(pooled["_x"])
    handles, texts = [], []
    for label, line in lines:
        text = " / ".join(map(str, label)) if isinstance(label, tuple) else str(label)
        x, rate = _broken_at_gaps(line["_x"], line["rate"], step)
        (handle,) = axes.plot(x, rate, marker=".", linewidth=1, label=text)
        handles.append(handle)
        texts.append(text)
    if len(timed):
        axes.set_xlim(0, 24)
        axes.set_xticks(np.arange(0, 25, 3))
    else:  # to the end of the last bin (one bin at 0 was drawn from -0.04 to 0.04)
        last = float(np.nan_to_num(pooled["_x"].max()))
        axes.set_xlim(0, last + (step if math.isfinite(step) else 1.0))
    # From 0, with room above the highest point (autoscaling a narrow band, 0.65-0.68, left it
    # half cut off at the top edge), and a little below 0: rates of 0 are points on the axis.
    highest = float(np.nan_to_num(pooled["rate"].max()))
    top = min(1.05, highest * 1.1) if highest > 0 else 1.0
    axes.set_ylim(-0.03 * top, top)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(f"detection rate, {name}")
    span_text = "over the day" if len(timed) else "over the recording"
    model = summary.attrs.get("model")
    # Which threshold: a PNG beside a summary of another (--dest shared) does not say it.
    threshold = summary.attrs.get("thresholds", {}).get(name)
    above = "" if threshold is None else f" > {threshold:g}"
    heading = (
        title
        or f"{name}{above}{f' ({model})' if model else ''}: detections per frame {span_text}"
        + (f", by {', '.join(groups)}" if groups else "")
    )
    if untimed_rows and len(timed):
        heading += f"\n({untimed_rows} bin(s) of recordings without a start time not shown)"
    if summary.attrs.get("run_complete") is False:
        # A stopped run's picture is read as the results: say it is not all of them.
        partial = len(summary.attrs.get("unfinished_files", []))
        heading += (
            "\n(the run has not finished: "
            + (f"{partial} recording(s) analysed in part; " if partial else "")
            + "rates of the frames written so far)"
        )
    if groups and len(handles) > _MAX_LEGEND:
        heading += f"\n({len(handles)} lines, too many to name: group by a higher folder level)"
    axes.set_title(heading, fontsize="medium")
    if groups and len(handles) <= _MAX_LEGEND:
        # Given explicitly: matplotlib leaves out labels starting with "_" (a folder "_old").
        # One group too: its name, and that its rates of 0 are a recorded site's.
        axes.legend(handles, texts, fontsize="small", loc="best")
    axes.grid(alpha=0.3)
    return figure


def _refuse_days(width: pd.Timedelta) -> None:
    """Refuse bins of a day or more over the time of day.

    Each day's total would be drawn at its bin's start, midnight: read as buzzing at midnight.
    """
    if width >= pd.Timedelta(days=1):
        raise ParameterError(
            f"bins of {width_label(width)} have no time of day to draw them at: plot bins "
            "shorter than a day (e.g. 1h); summarize --bin 1d gives the daily totals"
        )


def _many_colours() -> list[Any]:
    """Twenty colours that tell apart up to :data:`_MAX_LEGEND` lines (matplotlib's tab20)."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    return [tab20(index) for index in range(tab20.N)]


def _bin_step(x: pd.Series) -> float:
    """The width of the pooled bins on the x axis, guessed: the smallest distance between two."""
    distances = np.diff(np.unique(x.to_numpy(dtype=np.float64)))
    return float(distances.min()) if len(distances) else math.inf


def _broken_at_gaps(x: pd.Series, y: pd.Series, step: float) -> tuple[np.ndarray, np.ndarray]:
    """``x``, ``y`` with a NaN point wherever bins are missing, so the line breaks there.

    A bin with no frames is no row of the summary: without the break, a line drawn from 07:00
    to 18:00 would show rates over hours nothing recorded.
    """
    x_values, y_values = x.to_numpy(dtype=np.float64), y.to_numpy(dtype=np.float64)
    gaps = np.flatnonzero(np.diff(x_values) > 1.5 * step) + 1
    return (np.insert(x_values, gaps, np.nan), np.insert(y_values, gaps, np.nan))


def _shown_in_notebooks(figure: Figure) -> Figure:
    """``figure``, shown as a PNG where it is a notebook cell's value (IPython's ``_repr_png_``).

    Without pyplot nothing registers a Figure's picture with the notebook (``%matplotlib
    inline`` does): a cell showed ``<Figure size 800x400 with 1 Axes>`` alone.
    """
    figure._repr_png_ = _PNG(figure)  # type: ignore[attr-defined]
    return figure


class _PNG:
    """A figure's PNG bytes, when called; a class of this module, so the figure still pickles."""

    def __init__(self, figure: Figure) -> None:
        self.figure = figure

    def __call__(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png")
        return buffer.getvalue()


def plot_activation(
    output: str | os.PathLike[str] | Run,
    recording: str,
    *,
    class_name: str | None = None,
    precision: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    model: str | os.PathLike[str] | None = None,
    time_format: TimeFormat | None = None,
    tz: str | None = None,
    read_metadata: bool = True,
) -> Figure:
    """One recording's activation over time, the threshold drawn and the detections marked.

    Parameters
    ----------
    output : path-like or Run
    recording : str
        Its relative name, as in the ``file`` column.
    class_name : str, optional
        Default: the first thresholded class, else the model's first class.
    precision, thresholds, model : optional
        As in :func:`buzzdask.summaries.summarize`; default the run's own thresholds. Without
        any, no threshold is drawn.
    time_format, tz, read_metadata : optional
        As in :func:`buzzdask.recording_time.recording_starts`: with a known start the x axis
        is clock time, else seconds from the start of the file.

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    InputError
        If ``recording`` has no scores in the run (its names are as in the ``file`` column).
    ParameterError
        A class the run lacks, or thresholds as :func:`buzzdask.summaries.summarize` refuses.
    """
    from matplotlib.figure import Figure

    run = output if isinstance(output, Run) else open_run(output)
    values = _thresholds(run, precision=precision, thresholds=thresholds, model=model)
    name = class_name or (next(iter(values)) if values else run.classes[0])
    if name not in run.classes:
        raise ParameterError(f"class_name={name!r} is not a class of the run: {run.classes}")
    column = f"activation_{name}"
    frames = run.recording_frames(recording, columns=["start", column])
    starts = recording_starts(
        [recording],
        root=run.input_root,
        time_format=time_format,
        tz=tz,
        read_metadata=read_metadata,
    )
    origin = starts["start"].iloc[0]
    if pd.isna(origin):
        x: Any = frames["start"]
        xlabel = "seconds from the start of the file"
    else:
        x = origin + pd.to_timedelta(frames["start"], unit="s")
        # The date too: a recording across midnight ticks 23:59, 00:00 and nothing else.
        clock = str(tz) if tz else "as the recorder wrote it"
        xlabel = f"time ({clock}), from {origin:%Y-%m-%d %H:%M:%S}"

    figure = _shown_in_notebooks(Figure(figsize=(9, 3.5), layout="constrained"))
    axes = figure.add_subplot()
    axes.plot(x, frames[column], linewidth=0.8, color="0.3", label=column)
    threshold = values.get(name)
    if threshold is not None:
        hits = detected(frames[column].to_numpy(), threshold)
        axes.axhline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}")
        axes.plot(
            np.asarray(x)[hits],
            frames[column].to_numpy()[hits],
            linestyle="none",
            marker="o",
            markersize=3,
            color="tab:red",
            label=f"detections ({int(hits.sum())} of {len(hits)} frames)",
        )
    axes.set_xlabel(xlabel)
    axes.set_ylabel(column)
    heading = f"{recording}: {name} ({run.model['name']}) per frame"
    if recording in run.unfinished_recordings():
        heading += "\n(not analysed to its end: the frames written so far)"
    axes.set_title(heading, fontsize="medium")
    axes.legend(fontsize="small", loc="best")
    axes.grid(alpha=0.3)
    if not pd.isna(origin):
        figure.autofmt_xdate()
    return figure


def _thresholds(
    run: Run,
    *,
    precision: float | None,
    thresholds: Mapping[str, float] | None,
    model: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    if precision is None and not thresholds and not run.thresholds:
        return {}
    return resolve_summary(
        run, bin="1min", by=None, precision=precision, thresholds=thresholds, model=model
    ).thresholds


def plot_run(
    output: str | os.PathLike[str] | Run,
    *,
    bin: str | timedelta | pd.Timedelta = "5min",
    by: By = 1,
    precision: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    model: str | os.PathLike[str] | None = None,
    recordings: str | Sequence[str] | None = None,
    dest: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    time_format: TimeFormat | None = None,
    tz: str | None = None,
    read_metadata: bool = True,
    dpi: float = 120,
) -> list[Path]:
    """Write a run's pictures as PNG files (what ``buzzdask plot`` does).

    Writes, under ``dest`` (default ``<output>/summaries``, beside the summaries):
    ``detection-rate-<class>-<label>.png`` per thresholded class (:func:`plot_daily_activity`
    of ``summarize(output, bin=bin, by=by, ...)``; ``label`` as the summary's, e.g.
    ``bins-5min-by-level_1``) and ``activation-<recording>-<class>.png`` per recording asked
    for (default: the first recording) and thresholded class (:func:`plot_activation`);
    ``<recording>`` is its relative name, extension kept, with ``/`` and other characters
    unsafe in a file name as ``_`` (``activation-siteA_0601.mp3-ins_buzz.png``), and a short
    hash added where two names would meet or one is too long.

    Parameters
    ----------
    output : path-like or Run
    bin, by, precision, thresholds, model, time_format, tz, read_metadata
        As in :func:`buzzdask.summaries.summarize` (``by`` defaults to the top folder, ``1``).
    recordings : str or sequence of str, optional
        Relative names whose activation is drawn.
    dest : path-like, optional
    overwrite : bool, default: False
        Replace existing PNG files of the same names; otherwise they are an error. A file
        another run's or recording's plot (its PNG says what it shows) is an error either
        way; this run's own plot of the first recording, drawn unasked, is drawn again.
    dpi : float > 0, default: 120

    Returns
    -------
    list of Path
        The files written.

    Raises
    ------
    InputError
        ``output`` is not a buzzdask output, or holds no scores yet.
    ParameterError
        A bad option (``dpi``, ``bin``, ``by``...) or a recording without scores.
    OutputConflictError
        A file exists and ``overwrite`` is False, or it is another run's or recording's plot
        (checked before anything is drawn).
    """
    if isinstance(dpi, bool) or not isinstance(dpi, Real) or not 0 < dpi < math.inf:
        raise ParameterError(f"dpi={dpi!r} must be a number > 0")
    check_start_options(time_format=time_format, tz=tz)
    run = output if isinstance(output, Run) else open_run(output)
    settings = resolve_summary(
        run, bin=bin, by=by, precision=precision, thresholds=thresholds, model=model
    )
    _refuse_days(settings.width)
    folder = user_path(dest) if dest is not None else run.output / "summaries"
    chosen = as_list(recordings) if recordings is not None else run.recordings()[:1]
    known = run.recordings()
    scored = set(known)
    missing = [name for name in chosen if name not in scored]
    if missing and run.layout.errors.exists():
        # Not a misspelling: its reason is in errors.parquet (as Run.failed_recordings reads it).
        errors = pd.read_parquet(run.layout.errors, columns=["file", "reason", "kept"])
        failed = errors["file"].isin(missing) & ~errors["kept"].astype(bool)
        reasons = errors[failed].drop_duplicates("file")
        if len(reasons):
            said = "; ".join(f"{row.file}: {row.reason}" for row in reasons.itertuples())
            raise ParameterError(f"recordings that failed have no scores to plot ({said})")
    if missing:
        # Names as the file column gives them (relative to the input, with their folders).
        meant = difflib.get_close_matches(missing[0], known, n=3) or known[:3]
        raise ParameterError(
            f"recordings {missing} have no scores in {run.output}; names are as in its file "
            f"column, e.g. {', '.join(map(repr, meant))}"
        )
    planned: dict[Path, tuple[str, str]] = {}
    parts, classes = _file_parts(chosen), _file_parts(list(settings.thresholds))
    for name in settings.thresholds:
        planned[folder / f"detection-rate-{classes[name]}-{settings.label}.png"] = ("daily", name)
        for recording in chosen:
            planned[folder / f"activation-{parts[recording]}-{classes[name]}.png"] = (
                recording,
                name,
            )
    # The first recording's, drawn unasked: this run's picture of it is drawn again, so that
    # plotting other bins into the same folder needs no --overwrite.
    unasked = (
        set() if recordings is not None else {p for p, (w, _) in planned.items() if w != "daily"}
    )
    with destination_held(folder):
        _refuse_existing(planned, run, overwrite=overwrite, unasked=unasked)
        remove_stale_temporaries(planned)
        _plot_all(planned, run, by, settings, time_format, tz, read_metadata, dpi)
    return list(planned)


#: The PNG text key naming what a plot shows (:func:`_identity`).
_PNG_KEY = "buzzdask"


def _identity(run: Run, what: str, class_name: str) -> dict[str, str]:
    """What a plot file shows: the run, its head, the recording (or ``"daily"``), the class."""
    return {
        "output": str(run.output.resolve()),
        "model": str(run.model["name"]),
        "plot": what,
        "class": class_name,
    }


def _drawn_for(path: Path) -> dict[str, str] | None:
    """What an existing plot file shows, from its PNG text; None where it does not say."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(_PNG_KEY)
        drawn = json.loads(text) if text else None
    except (OSError, ValueError):  # not a PNG, cut short
        return None
    return drawn if isinstance(drawn, dict) else None


def _refuse_existing(
    planned: Mapping[Path, tuple[str, str]], run: Run, *, overwrite: bool, unasked: set[Path]
) -> None:
    """Refuse plot files in the way of ``planned``, before anything is drawn.

    Another run's or recording's plot always; others unless ``overwrite``, but for this run's
    own plot of a recording drawn ``unasked``.
    """
    drawn = {path: _drawn_for(path) for path in planned if path.exists()}
    others = [
        f"{path} ({_described(shown)})"
        for path, shown in drawn.items()
        if shown is not None and shown != _identity(run, *planned[path])
    ]
    if others:
        # Names meet (two heads' plots into one --dest, site/a.wav and site_a.wav asked for in
        # two calls): --overwrite is meant for a run's own earlier pictures.
        raise OutputConflictError(
            f"plot files of another run or recording are in the way: {', '.join(others)}; "
            "they are not replaced, even with overwrite=True (--overwrite): choose another "
            "dest (--dest)"
        )
    existing = [str(path) for path, shown in drawn.items() if path not in unasked or shown is None]
    if existing and not overwrite:
        raise OutputConflictError(
            f"plot files already exist: {', '.join(existing)}; pass overwrite=True "
            "(--overwrite) to replace them, or another dest (--dest)"
        )


def _described(shown: Mapping[str, str]) -> str:
    what = "the detection rate" if shown.get("plot") == "daily" else repr(shown.get("plot"))
    return f"{what}, {shown.get('class')}, of {shown.get('output')} ({shown.get('model')})"


def _plot_all(
    planned: Mapping[Path, tuple[str, str]],
    run: Run,
    by: By,
    settings: Summary,
    time_format: TimeFormat | None,
    tz: str | None,
    read_metadata: bool,
    dpi: float,
) -> None:
    summary = summarize(
        run,
        bin=settings.width,
        by=by,
        thresholds=settings.thresholds,
        write=False,
        time_format=time_format,
        tz=tz,
        read_metadata=read_metadata,
    )
    # The summary has said what it had to about start times; each plot would say it again.
    with said_once():
        _draw(planned, run, summary, settings.thresholds, time_format, tz, read_metadata, dpi)


def _draw(
    planned: Mapping[Path, tuple[str, str]],
    run: Run,
    summary: pd.DataFrame,
    thresholds: Mapping[str, float],
    time_format: TimeFormat | None,
    tz: str | None,
    read_metadata: bool,
    dpi: float,
) -> None:
    for path, (what, name) in planned.items():
        if what == "daily":
            figure = plot_daily_activity(summary, class_name=name)
        else:
            figure = plot_activation(
                run,
                what,
                class_name=name,
                thresholds=thresholds,
                time_format=time_format,
                tz=tz,
                read_metadata=read_metadata,
            )
        # Whole or not at all: a stop mid-write left a PNG cut short under its own name.
        shown = json.dumps(_identity(run, what, name))
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=dpi, format="png", metadata={_PNG_KEY: shown})


def _safe(text: str) -> str:
    """A name as part of a file name: ``site/a.wav`` -> ``site_a.wav``.

    Letters of any script stay (``蜜蜂/1.wav`` -> ``蜜蜂_1.wav``).
    """
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "recording"


def _file_parts(names: Sequence[str]) -> dict[str, str]:
    """Each name's (a recording's, a class's) part of its plots' file names, one of its own.

    Names that would write the same file (``site/a.wav`` and ``site_a.wav``, classes ``bee/fly``
    and ``bee_fly``), or one too long for a file name, take a short hash of the whole name, so
    no plot replaces another.
    """
    parts = {name: _safe(name) for name in names}
    counts = Counter(parts.values())
    for name, part in parts.items():
        if counts[part] > 1 or len(part.encode()) > _LONGEST_PART:
            digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
            shortened = part.encode()[: _LONGEST_PART - 9].decode(errors="ignore")
            parts[name] = f"{shortened}-{digest}"
    return parts


# Bytes of a recording's name in a plot's file name: the rest ("activation-", the class, ".png")
# stays within the 255 bytes of a file name.
_LONGEST_PART = 160
