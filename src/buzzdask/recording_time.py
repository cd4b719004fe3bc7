"""When each recording started: from the recorder's metadata in the file, or from its name.

Three sources, each only trusted when it says exactly one time:

- **AudioMoth's WAV comment** (``LIST/INFO/ICMT``), written by its firmware as
  ``Recorded at 05:30:00 01/06/2024 (UTC-4) by AudioMoth ...``: the clock time (day before
  month) and the time zone it was configured with (``(UTC)``, ``(UTC+1)``, ``(UTC-5:30)``).
- **GUANO** metadata (a ``guan`` chunk of ``Key: value`` lines): ``Timestamp:`` in ISO 8601, with
  or without a UTC offset.
- **The file name**, searched with strptime formats as buzzr's ``file_start_time`` does. Without
  ``time_format``, the recorders the lab meets: AudioMoth ``20240601_053000`` (``%Y%m%d_%H%M%S``),
  the lab's Sony recorders ``230809_0000`` (``%y%m%d_%H%M``, buzzr's example format) and
  ``2023-08-09_00-00-00`` (``%Y-%m-%d_%H-%M-%S``, from buzzr's time vignette). These built-in
  formats only match whole digit runs, so AudioMoth's ``20230809_060030`` is not also read as
  Sony's ``230809_0600``. A zone written right after their time (``20240601_053000-0400``,
  ``...Z``, ``..._UTC``) is read with it. A user's ``time_format`` is searched anywhere in the
  name, as buzzr does.

A name that no format matches, or that two formats read as different times, has no start
(``None``; buzzr returns ``NA`` with a warning): callers list such files, nothing is guessed.

Time zones: by default times are **naive local clock times**, as recorders write them (metadata
that carries an offset gives its own clock reading; where recordings' starts are written in
different zones, :func:`recording_starts` warns that they are not on one clock; where all are
written in UTC, an AudioMoth's default, it warns that the hours of the day are UTC's). With ``tz``
(e.g. ``"America/New_York"``) naive times are localized to that zone and times with an offset
are converted to it; a clock time that the zone skips or repeats (daylight saving changes) then
has no start.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import pandas as pd

from buzzdask.errors import ParameterError
from buzzdask.inputs import as_list, first_names
from buzzdask.wav import MOST_CHUNKS, RIFF_FORMS

__all__ = [
    "DEFAULT_TIME_FORMATS",
    "TimeFormat",
    "TimeParser",
    "recording_start",
    "recording_starts",
    "start_from_metadata",
    "start_from_name",
]

logger = logging.getLogger(__name__)

#: A strptime format (``"%y%m%d_%H%M"``), a regular expression with named groups ``year``,
#: ``month``, ``day`` (and optionally ``hour``, ``minute``, ``second``), or several of either.
TimeFormat = str | Sequence[str]

#: The formats tried on names without a ``time_format``: AudioMoth, the lab's Sony recorders.
DEFAULT_TIME_FORMATS = ("%Y%m%d_%H%M%S", "%y%m%d_%H%M", "%Y-%m-%d_%H-%M-%S")

# strptime directives -> what they match in a name (buzzr's time_specs.R, restricted to the
# directives Python's strptime knows; locale-dependent ones like %c are refused).
_DIRECTIVES = {
    "Y": r"\d{4}",
    "y": r"\d{2}",
    "m": r"\d{2}",
    "d": r"\d{2}",
    "H": r"\d{2}",
    "I": r"\d{2}",
    "M": r"\d{2}",
    "S": r"\d{2}",
    "j": r"\d{3}",
    "f": r"\d{1,6}",
    "z": r"(?:Z|[+-]\d{2}:?\d{2})",
    "b": r"[A-Za-z]{3}",
    "B": r"[A-Za-z]+",
    "a": r"[A-Za-z]{3}",
    "A": r"[A-Za-z]+",
    "p": r"(?:AM|PM|am|pm)",
    "%": "%",
}
_GROUPS_REQUIRED = ("year", "month", "day")
_GROUPS_OPTIONAL = ("hour", "minute", "second")

# AudioMoth firmware: sprintf("Recorded at %02d:%02d:%02d %02d/%02d/%04d (UTC", ...) followed by
# the configured offset ("%d" hours, ":%02d" minutes when set) and ")".
_AUDIOMOTH = re.compile(
    r"Recorded at (?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2}) "
    r"(?P<day>\d{2})/(?P<month>\d{2})/(?P<year>\d{4}) "
    r"\(UTC(?:(?P<sign>[+-])(?P<oh>\d{1,2})(?::(?P<om>\d{2}))?)?\)"
)
_METADATA_LIMIT = 1 << 20  # a comment or GUANO chunk bigger than 1 MiB is not metadata
# Names carry minutes at least; a name and metadata this far apart are two different clocks.
_DISAGREEMENT = timedelta(minutes=1)


@dataclass(frozen=True)
class _NamePattern:
    label: str
    regex: re.Pattern[str]
    strptime: str | None  # None: a regex with named groups


class TimeParser:
    """Compiled ``time_format``: reads start times from names.

    Parameters
    ----------
    time_format : str or sequence of str, optional
        See :data:`TimeFormat`; ``None`` uses :data:`DEFAULT_TIME_FORMATS`.

    Raises
    ------
    ParameterError
        A format with an unknown directive, a regex that does not compile or lacks the
        ``year``, ``month`` and ``day`` groups.
    """

    def __init__(self, time_format: TimeFormat | None = None) -> None:
        self.explicit = time_format is not None
        formats = (
            DEFAULT_TIME_FORMATS
            if time_format is None
            else (time_format,)
            if isinstance(time_format, str)
            else tuple(time_format)
            if isinstance(time_format, (list, tuple))
            else ()
        )
        if not formats or not all(isinstance(f, str) and f for f in formats):
            raise ParameterError(
                f"time_format={time_format!r} must be a strptime format such as "
                "'%y%m%d_%H%M', a regex with named groups (?P<year>...), or a list of them"
            )
        self.patterns = tuple(_compile(f, bounded=not self.explicit) for f in formats)

    def parse(self, name: str) -> tuple[datetime | None, str]:
        """The time in ``name`` (its last path component, without suffix), and where it came from.

        Returns
        -------
        time : datetime or None
            Naive, or aware when the format carries an offset (``%z``).
        how : str
            The format that matched, or why there is no time.
        """
        # As R's tools::file_path_sans_ext (buzzr): only an alphanumeric suffix is dropped, so
        # "S1_2024.06.01-05h30" keeps its dots.
        stem = re.sub(r"\.[A-Za-z0-9]+$", "", PurePosixPath(name).name)
        found: dict[datetime, str] = {}
        impossible: list[str] = []
        for pattern in self.patterns:
            match = pattern.regex.search(stem)
            if match is None:
                continue
            time = _read_match(match, pattern)
            label = pattern.label
            if time is not None and not self.explicit:
                time, label = _with_zone_after(time, label, stem[match.end() :])
            if time is not None:
                found.setdefault(time, label)
            else:
                impossible.append(f"{match.group(0)!r} as {pattern.label} is no real time")
        if not found:
            return None, "; ".join(impossible) or "no time in the name"
        if len(found) > 1:
            labels = ", ".join(f"{label} -> {time}" for time, label in found.items())
            return None, f"formats disagree ({labels})"
        ((time, label),) = found.items()
        return time, f"name {label}"


def _compile(time_format: str, *, bounded: bool) -> _NamePattern:
    if "(?P<" in time_format:
        try:
            regex = re.compile(time_format)
        except re.error as error:
            raise ParameterError(
                f"time_format={time_format!r} is not a valid regex: {error}"
            ) from None
        missing = [group for group in _GROUPS_REQUIRED if group not in regex.groupindex]
        if missing:
            raise ParameterError(
                f"time_format={time_format!r} lacks the named groups {missing}: a regex needs "
                "(?P<year>...), (?P<month>...), (?P<day>...) and may have hour, minute, second"
            )
        return _NamePattern(label=time_format, regex=regex, strptime=None)
    if "%" not in time_format:
        raise ParameterError(
            f"time_format={time_format!r} has no strptime directive (e.g. '%y%m%d_%H%M') and "
            "no named regex group (e.g. '(?P<year>\\d{4})(?P<month>\\d{2})(?P<day>\\d{2})')"
        )
    parts, position = [], 0
    for directive in re.finditer(r"%(.?)", time_format):
        parts.append(re.escape(time_format[position : directive.start()]))
        code = directive.group(1)
        if code not in _DIRECTIVES:
            raise ParameterError(
                f"time_format={time_format!r}: %{code} is not supported; use "
                + " ".join(f"%{c}" for c in _DIRECTIVES)
            )
        parts.append(_DIRECTIVES[code])
        position = directive.end()
    codes = set(re.findall(r"%(.?)", time_format))
    if not (codes & {"Y", "y"} and ("j" in codes or ("d" in codes and codes & {"m", "b", "B"}))):
        # strptime would give each time without a date on 1900-01-01, binned on that day.
        raise ParameterError(
            f"time_format={time_format!r} names no date: it needs a year (%Y or %y) and a "
            "month and day (%m%d) or a day of the year (%j), e.g. '%y%m%d_%H%M'"
        )
    parts.append(re.escape(time_format[position:]))
    pattern = "".join(parts)
    if bounded:
        pattern = rf"(?<!\d){pattern}(?!\d)"
    return _NamePattern(label=time_format, regex=re.compile(pattern), strptime=time_format)


#: A zone written right after a built-in format's time: ``Z``, ``_UTC``, ``-0400``, ``+05:30``.
_ZONE_AFTER = re.compile(
    r"(?:(?P<utc>Z|[_-]?UTC)|(?P<sign>[+-])(?P<hours>\d{2}):?(?P<minutes>00|30|45))"
    r"(?![A-Za-z0-9])"
)


def _with_zone_after(time: datetime, label: str, rest: str) -> tuple[datetime, str]:
    """``time`` in the zone written right after it in a name (``20240601_053000-0400``).

    Read by the built-in formats, which would otherwise drop it unseen; a user's
    ``time_format`` says itself whether its names carry one (``%z``).
    """
    zone = _ZONE_AFTER.match(rest)
    if zone is None:
        return time, label
    if zone["utc"]:
        return time.replace(tzinfo=timezone.utc), f"{label}{zone['utc']}"
    offset = timedelta(hours=int(zone["hours"]), minutes=int(zone["minutes"]))
    if offset > timedelta(hours=14):  # no zone is further from UTC: not an offset
        return time, label
    sign = -1 if zone["sign"] == "-" else 1
    return time.replace(tzinfo=timezone(sign * offset)), f"{label}%z"


def _read_match(match: re.Match[str], pattern: _NamePattern) -> datetime | None:
    """The time a match spells, or None when it is no real time (month 13, day 32...)."""
    try:
        if pattern.strptime is not None:
            return datetime.strptime(match.group(0), pattern.strptime)
        fields = match.groupdict()
        year = int(fields["year"])
        hour, minute, second = (int(fields.get(name) or 0) for name in _GROUPS_OPTIONAL)
        return datetime(
            year + 2000 if len(fields["year"]) == 2 else year,
            int(fields["month"]),
            int(fields["day"]),
            hour,
            minute,
            second,
        )
    except (ValueError, TypeError):
        return None


#: Zone names that are fixed offsets all year, though named like the regions' clocks.
_WITHOUT_SUMMER_TIME = {
    "EST": "America/New_York",
    "MST": "America/Denver",
    "HST": "Pacific/Honolulu",
}

#: ``GMT-5`` and the like: POSIX names, whose sign is the reverse of the offset's.
_POSIX_OFFSET = re.compile(r"(?i)(?:gmt|utc)([+-])(\d{1,2}):?(\d\d)?")


def check_tz(tz: str | None) -> None:
    """Refuse a ``tz`` that is not a time zone, before anything is read.

    Raises
    ------
    ParameterError
        ``tz`` is neither a zone's name nor a :class:`datetime.tzinfo` (pandas would take a
        number for seconds east of UTC), or names no zone.
    """
    if tz is None or isinstance(tz, tzinfo):
        return
    if not isinstance(tz, str):
        raise ParameterError(
            f"tz={tz!r} is not a time zone's name: use an IANA name such as 'America/New_York' "
            "or 'UTC' (a fixed offset: 'UTC-04:00')"
        )
    try:
        pd.Timestamp("2000-01-01").tz_localize(tz)
    except Exception:  # zoneinfo and pandas raise several kinds, none of them telling
        raise ParameterError(
            f"tz={tz!r} is not a time zone{_closest_zones(tz)}; use an IANA name such as "
            "'America/New_York' or 'UTC' (a fixed offset: 'UTC-04:00')"
        ) from None


def check_start_options(*, time_format: TimeFormat | None, tz: str | None) -> None:
    """Refuse a bad ``time_format`` or ``tz`` before a command reads or refuses anything else.

    Raises
    ------
    ParameterError
        As :class:`TimeParser` and :func:`check_tz` do.
    """
    TimeParser(time_format)
    check_tz(tz)


def _closest_zones(name: str) -> str:
    """``" (did you mean 'America/New_York'?)"`` for a misspelled zone name, else ``""``."""
    import zoneinfo

    posix = _POSIX_OFFSET.fullmatch(name)
    if posix and int(posix[2]) <= (12 if posix[1] == "-" else 14):  # the zones' offsets
        # Not 'GMT-0' (UTC), which the spelling is closest to.
        offset = f"UTC{posix[1]}{int(posix[2]):02d}:{posix[3] or '00'}"
        return f" (did you mean {offset!r}, or better the recorders' region?)"
    zones = {zone.lower(): zone for zone in zoneinfo.available_timezones()}
    key = name.lower().replace(" ", "_")
    meant = [zones[key]] if key in zones else []
    meant = meant or [zones[z] for z in difflib.get_close_matches(key, zones, n=2, cutoff=0.8)]
    return f" (did you mean {' or '.join(map(repr, meant))}?)" if meant else ""


def _in_zone(time: datetime, tz: str | None) -> tuple[pd.Timestamp | None, str]:
    """Apply the time-zone rule of this module; a problem in words when the time is lost."""
    stamp = pd.Timestamp(time)
    if tz is None:
        # Clock time as the recorder wrote it, whatever offset it named.
        return (stamp.tz_localize(None) if stamp.tzinfo is not None else stamp), ""
    if stamp.tzinfo is not None:
        return stamp.tz_convert(tz), ""
    localized = stamp.tz_localize(tz, ambiguous="NaT", nonexistent="NaT")
    if pd.isna(localized):
        # Which of the two tells a user how to fix the names: a skipped time is a clock error.
        skipped = pd.isna(stamp.tz_localize(tz, ambiguous=True, nonexistent="NaT"))
        if skipped:
            return None, f"{stamp} is skipped in {tz} (its clocks go forward then)"
        return None, f"{stamp} is repeated in {tz} (its clocks go back then: which is not known)"
    return localized, ""


def start_from_name(
    name: str, *, time_format: TimeFormat | None = None, tz: str | None = None
) -> pd.Timestamp | None:
    """The start time spelled in a file name, or None.

    Parameters
    ----------
    name : str
        A file name or path; only its last component, without suffix, is searched.
    time_format : str or sequence of str, optional
        See :data:`TimeFormat`; default :data:`DEFAULT_TIME_FORMATS`.
    tz : str, optional
        IANA time zone; default naive local clock time.

    Examples
    --------
    >>> start_from_name("soybean/9/230809_0000.mp3")
    Timestamp('2023-08-09 00:00:00')
    >>> start_from_name("20240601_053000.WAV", tz="America/New_York")
    Timestamp('2024-06-01 05:30:00-0400', tz='America/New_York')
    >>> start_from_name("site-A_0600.wav") is None
    True
    """
    check_tz(tz)
    time, _ = TimeParser(time_format).parse(name)
    return None if time is None else _in_zone(time, tz)[0]


def start_from_metadata(
    path: str | os.PathLike[str], *, tz: str | None = None
) -> pd.Timestamp | None:
    """The start time a WAV file's own metadata states (AudioMoth comment or GUANO), or None.

    A FLAC's comment counts as a WAV's (a FLAC made from an AudioMoth WAV keeps it). Anything
    else, or a file that cannot be read, gives None.

    Parameters
    ----------
    path : path-like
    tz : str, optional
        IANA time zone; default naive clock time as written.
    """
    check_tz(tz)
    try:
        time, _ = _metadata_time(Path(path))
    except OSError:
        return None
    return None if time is None else _in_zone(time, tz)[0]


def recording_start(
    path: str | os.PathLike[str],
    *,
    time_format: TimeFormat | None = None,
    tz: str | None = None,
    read_metadata: bool = True,
) -> pd.Timestamp | None:
    """When a recording started, or None when neither its metadata nor its name says.

    Without ``time_format`` the file's metadata is preferred (it carries seconds and a time
    zone), then the name; with ``time_format`` the name is preferred: the user has said how the
    names are written (they may have been corrected after a clock error).

    Parameters
    ----------
    path : path-like
        The audio file (it need not exist when ``read_metadata=False``).
    time_format : str or sequence of str, optional
        See :data:`TimeFormat`; default :data:`DEFAULT_TIME_FORMATS`.
    tz : str, optional
        IANA time zone, e.g. ``"America/New_York"``; default naive local clock time.
    read_metadata : bool, default: True
        Read the AudioMoth comment or GUANO timestamp of a WAV file (a FLAC's comment).

    Returns
    -------
    pandas.Timestamp or None
        Naive without ``tz``, in ``tz`` with it.

    Raises
    ------
    ParameterError
        A bad ``time_format`` or ``tz``.
    """
    table = recording_starts(
        [str(path)], time_format=time_format, tz=tz, read_metadata=read_metadata
    )
    start = table["start"].iloc[0]
    return None if pd.isna(start) else pd.Timestamp(start)


def recording_starts(
    names: str | Iterable[str],
    *,
    root: str | os.PathLike[str] | None = None,
    time_format: TimeFormat | None = None,
    tz: str | None = None,
    read_metadata: bool = True,
) -> pd.DataFrame:
    """Start times of many recordings: one row per name, in order.

    Parameters
    ----------
    names : str or iterable of str
        A file name or path, or several; with ``root``, paths relative to it (the ``file``
        column of a run).
    root : path-like, optional
        Where the relative ``names`` are, to read their metadata. Files that are not there are
        timed by name alone.
    time_format, tz, read_metadata
        As in :func:`recording_start`.

    Returns
    -------
    pandas.DataFrame
        Index ``file`` (the names as given); columns ``start`` (datetime64[ns], naive or in
        ``tz``; NaT when unknown), ``source`` (``"AudioMoth comment"``, ``"GUANO Timestamp"``,
        ``"name <format>"``; missing when unknown), ``clock`` (the zone the source wrote the
        start in: ``"UTC"``, ``"UTC-04:00"``; missing where it names none, as most names) and
        ``problem`` (why the start is unknown).

    Raises
    ------
    ParameterError
        A bad ``time_format`` or ``tz``.
    """
    check_tz(tz)
    if isinstance(tz, str) and tz in _WITHOUT_SUMMER_TIME:  # a zone object may not hash
        logger.warning(
            "tz=%r is a fixed offset all year, without daylight saving time: recordings of the "
            "summer months come out an hour off their local clock; for the region's clock, "
            "give e.g. %r",
            tz,
            _WITHOUT_SUMMER_TIME[tz],
        )
    parser = TimeParser(time_format)
    names = as_list(names)
    starts: list[pd.Timestamp | None] = []
    sources: list[str | None] = []
    written_in: list[str | None] = []
    problems: list[str | None] = []
    clocks: dict[str, list[str]] = {}
    unread: list[str] = []
    disagreeing: list[str] = []
    for name in names:
        # os.path's: a name such as "~20240601_0600.wav" stays itself (Path's raises).
        path = Path(os.path.expanduser(Path(root) / name if root is not None else name))
        found = _start(name, path, parser, read_metadata=read_metadata)
        clock = _clock(found.time) if found.time is not None else ""
        if found.time is not None:
            clocks.setdefault(clock, []).append(name)
        if found.unread:
            unread.append(f"{name} ({found.unread})")
        start, lost = (None, "") if found.time is None else _in_zone(found.time, tz)
        if start is not None and found.from_name is not None:
            # Compared where the starts end up: in ``tz``, an AudioMoth on UTC names its files
            # hours from its comment's local time, and buzzr reads the names in that zone.
            named, _ = _in_zone(found.from_name, tz)
            if named is not None and abs(start - named) >= _DISAGREEMENT:
                disagreeing.append(
                    f"{name} ({found.source} {start:%Y-%m-%d %H:%M:%S}, "
                    f"name {named:%Y-%m-%d %H:%M:%S})"
                )
        starts.append(start)
        sources.append(found.source if start is not None else None)
        written_in.append(clock or None if start is not None else None)
        problems.append(None if start is not None else (lost or found.problem))
    if tz is None and len(clocks) > 1:
        _warn_mixed_clocks(clocks)
    elif tz is None and list(clocks) == ["UTC"]:
        logger.warning(
            "recording start times are written in UTC (%s): without a time zone (--tz, tz=) "
            "they are taken as written, so hours of the day are UTC's, not the field's; give "
            "the recorders' zone, e.g. --tz America/New_York (or --tz UTC to keep UTC)",
            first_names(clocks["UTC"], shown=2),
        )
    if unread:
        logger.warning(
            "%d WAV or FLAC recording(s) could not be read for the start time in their metadata "
            "(AudioMoth comment, GUANO), so they are timed by their names alone, which may say "
            "another time: %s. Run this where the audio is (the run's input folder, as "
            "analysed) for the times their recorders wrote",
            len(unread),
            first_names(unread, shown=3, separator="; "),
        )
    if disagreeing:
        logger.warning(
            "%d recording(s) whose metadata and name give different start times%s, the "
            "metadata's taken: %s. buzzr, which reads names, bins them at the names' times; "
            "give --time-format (time_format=) to take the names' instead",
            len(disagreeing),
            "" if tz is None else f" in {tz}",
            first_names(disagreeing, shown=3, separator="; "),
        )
    dtype = "datetime64[ns]" if tz is None else pd.DatetimeTZDtype("ns", tz)
    return pd.DataFrame(
        {
            "start": pd.Series(starts, dtype=dtype),
            "source": pd.Series(sources, dtype="string"),
            "clock": pd.Series(written_in, dtype="string"),
            "problem": pd.Series(problems, dtype="string"),
        }
    ).set_axis(pd.Index(names, name="file", dtype="string"))


@contextmanager
def said_once() -> Iterator[None]:
    """Within the block, start times' warnings are not logged (a caller has logged them once)."""
    quiet = logging.Filter(f"{logger.name}.none")  # passes no record of this logger
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _clock(time: datetime) -> str:
    """The zone a start was written in: ``"UTC-04:00"``, ``"UTC"``, or ``""`` when it names none."""
    offset = time.utcoffset()
    if offset is None:
        return ""
    if not offset:
        return "UTC"
    sign, size = ("-", -offset) if offset < timedelta(0) else ("+", offset)
    hours, seconds = divmod(int(size.total_seconds()), 3600)
    return f"UTC{sign}{hours:02d}:{seconds // 60:02d}"


def _warn_mixed_clocks(clocks: dict[str, list[str]]) -> None:
    """Without a time zone, starts written in different zones are not on one clock: say so."""
    groups = [
        f"{len(files)} {clock or 'with no zone'} ({first_names(files, shown=2)})"
        for clock, files in sorted(clocks.items(), key=lambda item: -len(item[1]))
    ]
    logger.warning(
        "recording start times are written on different clocks: %s. Without a time zone "
        "(--tz, tz=) each is taken as written, so they may be hours apart: give the recorders' "
        "zone, e.g. --tz America/New_York (times with a zone are converted to it)",
        "; ".join(groups),
    )


class _Found(NamedTuple):
    """A recording's start as :func:`_start` found it, and what a user should hear about."""

    time: datetime | None
    source: str | None
    problem: str  # why there is no start
    unread: str = ""  # why a WAV's metadata could not be read
    from_name: datetime | None = None  # the name's start, where the metadata's was taken


def _start(name: str, path: Path, parser: TimeParser, *, read_metadata: bool) -> _Found:
    from_name, how = parser.parse(name)
    if parser.explicit and from_name is not None:
        return _Found(from_name, how, "")
    if read_metadata:
        try:
            from_metadata, source = _metadata_time(path)
        except OSError as error:
            # Moved, unmounted or copied off without the audio: the name alone may be off by
            # the recorder's time zone or clock correction, so the caller says so.
            unread = error.strerror or type(error).__name__
            if from_name is not None:
                return _Found(from_name, how, "", unread=unread)
            return _Found(None, None, how, unread=unread)
        if from_metadata is not None:
            return _Found(from_metadata, source, "", from_name=from_name)
    if from_name is not None:
        return _Found(from_name, how, "")
    return _Found(None, None, how)


# -- WAV metadata --------------------------------------------------------------------------------


def _metadata_time(path: Path) -> tuple[datetime | None, str]:
    """AudioMoth's comment or GUANO's timestamp of a RIFF/WAVE file, or a FLAC's comment.

    A FLAC made from an AudioMoth WAV keeps its comment (ffmpeg copies it).

    Raises
    ------
    OSError
        The file cannot be read.
    """
    reader = _METADATA_READERS.get(path.suffix.lower())
    if reader is None:
        return None, ""
    chunks = reader(path)
    comment = chunks.get("ICMT")
    if comment:
        time = _audiomoth_time(comment)
        if time is not None:
            return time, "AudioMoth comment"
    guano = chunks.get("guan")
    if guano:
        time = _guano_time(guano)
        if time is not None:
            return time, "GUANO Timestamp"
    return None, ""


def _text_chunks(path: Path) -> dict[str, str]:
    """The ``ICMT`` comment and ``guan`` text of a WAV file (keys present when found).

    Walks the chunk headers, seeking past the audio, so a long recording costs a few reads.
    """
    found: dict[str, str] = {}
    with path.open("rb") as stream:
        header = stream.read(12)
        if len(header) < 12 or header[:4] not in RIFF_FORMS or header[8:12] != b"WAVE":
            return found
        for _ in range(MOST_CHUNKS):
            head = stream.read(8)
            if len(head) < 8:
                return found
            chunk_id, size = head[:4], struct.unpack("<I", head[4:])[0]
            padded = size + (size & 1)  # chunks are word-aligned
            if chunk_id == b"LIST" and size <= _METADATA_LIMIT:
                found.update(_info_chunk(stream.read(padded)))
            elif chunk_id == b"guan" and size <= _METADATA_LIMIT:
                found["guan"] = _decode(stream.read(size))
                stream.seek(padded - size, os.SEEK_CUR)
            elif chunk_id == b"data" and size == 0xFFFFFFFF:
                return found  # RF64's real size is elsewhere: nothing more to find cheaply
            else:
                stream.seek(padded, os.SEEK_CUR)
    return found


def _flac_comments(path: Path) -> dict[str, str]:
    """A FLAC file's ``COMMENT`` (or ``DESCRIPTION``, as ffmpeg writes a WAV's), as ``ICMT``.

    From the Vorbis comment block, among the metadata blocks before the audio.
    """
    with path.open("rb") as stream:
        if stream.read(4) != b"fLaC":
            return {}
        while True:
            head = stream.read(4)
            if len(head) < 4:
                return {}
            size = int.from_bytes(head[1:], "big")
            if head[0] & 0x7F == _VORBIS_COMMENT and size <= _METADATA_LIMIT:
                return _vorbis_comment(stream.read(size))
            if head[0] & 0x80:  # the last metadata block: the audio follows
                return {}
            stream.seek(size, os.SEEK_CUR)


def _vorbis_comment(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        position = 4 + struct.unpack_from("<I", body)[0]  # past the vendor string
        (count,) = struct.unpack_from("<I", body, position)
        position += 4
        for _ in range(count):
            (size,) = struct.unpack_from("<I", body, position)
            name, _, value = body[position + 4 : position + 4 + size].partition(b"=")
            fields.setdefault(name.decode("ascii", "replace").upper(), _decode(value))
            position += 4 + size
    except struct.error:  # cut short: what was read
        pass
    comment = fields.get("COMMENT") or fields.get("DESCRIPTION")
    return {"ICMT": comment} if comment else {}


def _info_chunk(body: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    if body[:4] != b"INFO":
        return found
    position = 4
    while position + 8 <= len(body):
        sub_id, size = (
            body[position : position + 4],
            struct.unpack("<I", body[position + 4 : position + 8])[0],
        )
        if sub_id == b"ICMT":
            found["ICMT"] = _decode(body[position + 8 : position + 8 + size])
        position += 8 + size + (size & 1)
    return found


_VORBIS_COMMENT = 4  # FLAC's metadata block type

_METADATA_READERS: dict[str, Callable[[Path], dict[str, str]]] = {
    ".wav": _text_chunks,
    ".wave": _text_chunks,
    ".flac": _flac_comments,
}


def _decode(raw: bytes) -> str:
    # GUANO is UTF-8; older writers used latin-1 (guano-py falls back the same way).
    raw = raw.split(b"\x00", 1)[0]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _audiomoth_time(comment: str) -> datetime | None:
    match = _AUDIOMOTH.search(comment)
    if match is None:
        return None
    fields = {key: int(match[key]) for key in ("year", "month", "day", "hour", "minute", "second")}
    hours, minutes = int(match["oh"] or 0), int(match["om"] or 0)
    offset = timedelta(hours=hours, minutes=minutes) * (-1 if match["sign"] == "-" else 1)
    try:
        return datetime(**fields, tzinfo=timezone(offset))
    except ValueError:
        return None


def _guano_time(text: str) -> datetime | None:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Timestamp":
            return _iso_time(value.strip())
    return None


def _iso_time(value: str) -> datetime | None:
    """GUANO's ISO 8601 timestamp, leniently as guano-py reads it (``Z``, ``+0100``, a space)."""
    value = value.replace(" ", "T", 1)
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    value = re.sub(r"([+-]\d{2})(\d{2})$", r"\1:\2", value)  # "-0500" -> "-05:00"
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
