"""Detection events: runs of frames over a class's threshold, merged across short gaps.

Computed one recording at a time (:func:`recording_events` on that recording's frames), so a
run of any size needs the memory of its longest recording only; :func:`run_events` loops over a
run's recordings.

Rules, per file and class, on frames sorted by ``start``:

- a frame is a detection when :func:`buzzdask.thresholds.detected` says so
  (``activation > threshold``);
- frame ``i`` is the frame starting at ``start = i * frame_hop_s`` (its index is recovered from
  ``start``, so frames missing from the dataset, e.g. a failed chunk, count as non-detections);
- two detections belong to one event when at most ``gap_frames`` frames lie between them;
- an event spans its first to its last detection: ``frames`` frames, ``detections`` of them over
  the threshold; events shorter than ``min_frames`` frames are dropped;
- ``start`` is its first frame's start, ``end`` its last frame's end (seconds from the start of
  the file); ``peak_activation`` and ``mean_activation`` are over the event's frames present in
  the dataset; ``time`` is ``recording start + start`` when the recording's start is known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from buzzdask.errors import ParameterError
from buzzdask.thresholds import detected

__all__ = ["EVENT_COLUMNS", "recording_events", "run_events", "stored_recording_events"]

EVENT_COLUMNS = [
    "file",
    "class",
    "start",
    "end",
    "time",
    "frames",
    "detections",
    "peak_activation",
    "mean_activation",
]


def _check_counts(gap_frames: int, min_frames: int) -> None:
    if isinstance(gap_frames, bool) or not isinstance(gap_frames, (int, np.integer)):
        raise ParameterError(f"gap_frames={gap_frames!r} must be an integer >= 0")
    if gap_frames < 0:
        raise ParameterError(f"gap_frames={gap_frames!r} must be >= 0")
    if isinstance(min_frames, bool) or not isinstance(min_frames, (int, np.integer)):
        raise ParameterError(f"min_frames={min_frames!r} must be an integer >= 1")
    if min_frames < 1:
        raise ParameterError(f"min_frames={min_frames!r} must be >= 1")


def _empty(time_dtype: Any) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "file": pd.Series([], dtype="string"),
            "class": pd.Series([], dtype="string"),
            "start": pd.Series([], dtype="float64"),
            "end": pd.Series([], dtype="float64"),
            "time": pd.Series([], dtype=time_dtype),
            "frames": pd.Series([], dtype="int64"),
            "detections": pd.Series([], dtype="int64"),
            "peak_activation": pd.Series([], dtype="float32"),
            "mean_activation": pd.Series([], dtype="float64"),
        }
    )


def recording_events(
    frames: pd.DataFrame,
    thresholds: Mapping[str, float],
    *,
    frame_hop_s: float,
    frame_length_s: float,
    gap_frames: int = 0,
    min_frames: int = 1,
    recording_start: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """The detection events of one recording.

    Parameters
    ----------
    frames : pandas.DataFrame [shape=(n_frames, n_columns)]
        One recording's frames: ``file``, ``start`` [s] and ``activation_<class>`` for each
        class in ``thresholds`` (any order; sorted here).
    thresholds : mapping of class -> float
        The classes to find events for, and their thresholds.
    frame_hop_s : float > 0 [s]
        Distance between frame starts: ``start[i] = i * frame_hop_s``.
    frame_length_s : float > 0 [s]
        One frame's length: an event ends at its last frame's ``start + frame_length_s``.
    gap_frames : int >= 0, default: 0
        Most frames below the threshold inside one event (0: only consecutive frames merge).
    min_frames : int >= 1, default: 1
        Fewest frames an event spans (first to last detection, gap frames included).
    recording_start : pandas.Timestamp, optional
        When the recording started: fills ``time`` (NaT otherwise).

    Returns
    -------
    pandas.DataFrame [shape=(n_events, 9)]
        Columns :data:`EVENT_COLUMNS`, sorted by class (in ``thresholds`` order) then start.
    """
    _check_counts(gap_frames, min_frames)
    if frame_hop_s <= 0 or frame_length_s <= 0:
        raise ParameterError(
            f"frame_hop_s={frame_hop_s!r} and frame_length_s={frame_length_s!r} must be > 0"
        )
    time_dtype = (
        "datetime64[ns]"
        if recording_start is None or recording_start.tzinfo is None
        else pd.DatetimeTZDtype("ns", recording_start.tzinfo)
    )
    if frames.empty or not thresholds:
        return _empty(time_dtype)
    files = frames["file"].unique()
    if len(files) != 1:
        raise ParameterError(f"recording_events takes one recording's frames, not {len(files)}")
    ordered = frames.sort_values("start", kind="stable", ignore_index=True)
    starts = ordered["start"].to_numpy(dtype=np.float64)
    index = np.rint(starts / frame_hop_s).astype(np.int64)
    pieces = []
    for name, threshold in thresholds.items():
        column = f"activation_{name}"
        if column not in ordered.columns:
            raise ParameterError(f"no {column} column in the frames of {files[0]!r}")
        activation = ordered[column].to_numpy()
        hits = np.flatnonzero(detected(activation, threshold))
        if hits.size == 0:
            continue
        # A new event starts where the next detection is more than gap_frames frames away.
        breaks = np.flatnonzero(np.diff(index[hits]) > gap_frames + 1) + 1
        first = hits[np.concatenate(([0], breaks))]
        last = hits[np.concatenate((breaks - 1, [hits.size - 1]))]
        counts = np.diff(np.concatenate(([0], breaks, [hits.size])))
        spans = index[last] - index[first] + 1
        keep = spans >= min_frames
        first, last, counts, spans = first[keep], last[keep], counts[keep], spans[keep]
        if first.size == 0:
            continue
        # Rows first..last are the event's frames present in the dataset (sorted by start).
        sums = np.concatenate(([0.0], np.cumsum(activation, dtype=np.float64)))
        peaks = np.array([activation[a : b + 1].max() for a, b in zip(first, last, strict=True)])
        event_start = starts[first]
        pieces.append(
            pd.DataFrame(
                {
                    "file": pd.Series([files[0]] * first.size, dtype="string"),
                    "class": pd.Series([name] * first.size, dtype="string"),
                    "start": event_start,
                    "end": starts[last] + frame_length_s,
                    "time": _times(event_start, recording_start, time_dtype),
                    "frames": spans.astype(np.int64),
                    "detections": counts.astype(np.int64),
                    "peak_activation": peaks.astype(activation.dtype, copy=False),
                    "mean_activation": (sums[last + 1] - sums[first]) / (last - first + 1),
                }
            )
        )
    if not pieces:
        return _empty(time_dtype)
    return pd.concat(pieces, ignore_index=True)[EVENT_COLUMNS]


def _times(seconds: np.ndarray, start: pd.Timestamp | None, dtype: Any) -> pd.Series:
    if start is None:
        return pd.Series(pd.NaT, index=range(len(seconds)), dtype=dtype)
    return pd.Series(start + pd.to_timedelta(seconds, unit="s"), dtype=dtype)


def stored_recording_events(
    run: Any,
    relative: str,
    thresholds: Mapping[str, float],
    *,
    gap_frames: int = 0,
    min_frames: int = 1,
    recording_start: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """:func:`recording_events` of one recording of an opened run, reading only its columns.

    Parameters
    ----------
    run : buzzdask.results.Run
    relative : str
        The recording, as in the ``file`` column.
    thresholds, gap_frames, min_frames, recording_start
        As in :func:`recording_events`.
    """
    columns = ["file", "start", *(f"activation_{name}" for name in thresholds)]
    return recording_events(
        run.recording_frames(relative, columns=columns),
        thresholds,
        frame_hop_s=run.frame_hop_s,
        frame_length_s=run.frame_length_s,
        gap_frames=gap_frames,
        min_frames=min_frames,
        recording_start=recording_start,
    )


def run_events(
    run: Any,
    thresholds: Mapping[str, float],
    *,
    gap_frames: int = 0,
    min_frames: int = 1,
    recordings: Sequence[str] | None = None,
    starts: Mapping[str, pd.Timestamp | None] | pd.Series | None = None,
) -> pd.DataFrame:
    """Detection events of every recording of a run, read one recording at a time.

    Parameters
    ----------
    run : buzzdask.results.Run
        An opened output (:func:`buzzdask.results.open_run`).
    thresholds : mapping of class -> float
        The classes to find events for (see :func:`buzzdask.thresholds.resolve_thresholds`).
    gap_frames, min_frames : int
        As in :func:`recording_events`.
    recordings : sequence of str, optional
        Only these recordings (relative names); default all with scores.
    starts : mapping or pandas.Series of relative name -> pandas.Timestamp, optional
        Recording start times (the ``start`` column of
        :func:`buzzdask.recording_time.recording_starts`): fill ``time``.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`EVENT_COLUMNS`, sorted by file, class and start.
    """
    _check_counts(gap_frames, min_frames)
    unknown = sorted(set(thresholds) - set(run.classes))
    if unknown:
        raise ParameterError(f"unknown class(es) {unknown}; the run's classes are {run.classes}")
    # A mapping or recording_starts' Series: no truth value asked of either.
    known = {name: _known(start) for name, start in ({} if starts is None else starts).items()}
    # Untimed recordings' NaT take the zone of the timed ones: one datetime column, not objects.
    zone = next((start.tz for start in known.values() if start is not None and start.tz), None)
    pieces = [
        _in_zone(
            stored_recording_events(
                run,
                relative,
                thresholds,
                gap_frames=gap_frames,
                min_frames=min_frames,
                recording_start=known.get(relative),
            ),
            zone,
        )
        for relative in (run.recordings() if recordings is None else recordings)
    ]
    pieces = [piece for piece in pieces if not piece.empty]
    if not pieces:
        return _empty("datetime64[ns]" if zone is None else pd.DatetimeTZDtype("ns", zone))
    return pd.concat(pieces, ignore_index=True)[EVENT_COLUMNS]


def _in_zone(events: pd.DataFrame, zone: Any) -> pd.DataFrame:
    if zone is not None and events["time"].dt.tz is None:
        events["time"] = events["time"].dt.tz_localize(zone)
    return events


def _known(start: Any) -> pd.Timestamp | None:
    return None if start is None or pd.isna(start) else pd.Timestamp(start)
