"""Recording start times from names (buzzr's, AudioMoth's, a user's) and from WAV metadata."""

from __future__ import annotations

import subprocess
import wave
import zoneinfo

import dateutil.tz
import numpy as np
import pandas as pd
import pytest

from buzzdask import ParameterError
from buzzdask.recording_time import (
    recording_start,
    recording_starts,
    start_from_metadata,
    start_from_name,
)
from tests.conftest import requires_ffmpeg, write_wav
from tests.wav_metadata import add_metadata, audiomoth_comment


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # buzzr's example data (inst/extdata) and its tests: the lab's Sony recorders.
        ("soybean/9/230809_0000_buzzdetect.csv", "2023-08-09 00:00:00"),
        ("chicory/1_104/250704_0000.mp3", "2025-07-04 00:00:00"),
        ("path/240727_1430.wav", "2024-07-27 14:30:00"),
        # AudioMoth, with and without its upper-case suffix, and with a site prefix (Song Meter).
        ("20240601_053000.WAV", "2024-06-01 05:30:00"),
        ("siteA/2024-06-01/20240601_053012.wav", "2024-06-01 05:30:12"),
        ("SM4A_20240601_053000.wav", "2024-06-01 05:30:00"),
        # buzzr's time vignette's third example.
        ("2023-08-09_06-15-00.flac", "2023-08-09 06:15:00"),
    ],
)
def test_built_in_name_formats(name, expected):
    assert start_from_name(name) == pd.Timestamp(expected)


# name, its start in UTC, its source, and its start as written (without a zone).
_ZONES_AFTER = [
    ("20260601_235930-0400.wav", "06-02 03:59:30", "%Y%m%d_%H%M%S%z", "06-01 23:59:30"),
    ("REC_20260601_235930+05:30.wav", "06-01 18:29:30", "%Y%m%d_%H%M%S%z", "06-01 23:59:30"),
    ("20260602_035930Z.WAV", "06-02 03:59:30", "%Y%m%d_%H%M%SZ", "06-02 03:59:30"),
    ("20260602_035930_UTC.WAV", "06-02 03:59:30", "%Y%m%d_%H%M%S_UTC", "06-02 03:59:30"),
    ("260601_2359-0400.mp3", "06-02 03:59", "%y%m%d_%H%M%z", "06-01 23:59"),
    # No zone: a take number, an offset no zone has, a word that starts with Z.
    ("20260601_235930-0001.wav", "06-01 23:59:30", "%Y%m%d_%H%M%S", "06-01 23:59:30"),
    ("20260601_235930-1500.wav", "06-01 23:59:30", "%Y%m%d_%H%M%S", "06-01 23:59:30"),
    ("20260601_235930Zeta.wav", "06-01 23:59:30", "%Y%m%d_%H%M%S", "06-01 23:59:30"),
]


@pytest.mark.parametrize(("name", "in_utc", "source", "as_written"), _ZONES_AFTER)
def test_a_zone_written_after_a_built_in_formats_time_is_read(name, in_utc, source, as_written):
    """Read as --time-format '%Y%m%d_%H%M%S%z' would: not dropped unseen, hours off in a zone."""
    table = recording_starts([name], tz="UTC", read_metadata=False)
    assert table["start"].tolist() == [pd.Timestamp(f"2026-{in_utc}", tz="UTC")]
    assert table["source"].tolist() == [f"name {source}"]
    # Without a zone, a start is the clock time as written, whatever zone it names.
    assert start_from_name(name) == pd.Timestamp(f"2026-{as_written}")


def test_audiomoth_seconds_are_not_also_read_as_a_sony_name():
    # buzzr warns that %y%m%d_%H%M matches inside "20230809_060030" (06:00, not 06:00:30); the
    # built-in formats only take whole digit runs, so AudioMoth names have one reading.
    assert start_from_name("20230809_060030.WAV") == pd.Timestamp("2023-08-09 06:00:30")


@pytest.mark.parametrize(
    "name",
    [
        "no_date_here.wav",  # buzzr's test: no match
        "site-A_0600.wav",  # a time without a date
        "20241301_053000.WAV",  # month 13
        "231332_0000.mp3",  # not a real date
        "2023080_0600.wav",  # a digit short
        "20230809_0600301.wav",  # a digit too many
    ],
)
def test_names_without_a_time(name):
    assert start_from_name(name) is None
    table = recording_starts([name], read_metadata=False)
    assert pd.isna(table.loc[name, "start"])
    # A name that looks like a time but is none says so (a typo to fix, not a missing time).
    impossible = {
        "20241301_053000.WAV": "'20241301_053000' as %Y%m%d_%H%M%S is no real time",
        "231332_0000.mp3": "'231332_0000' as %y%m%d_%H%M is no real time",
    }
    assert table.loc[name, "problem"] == impossible.get(name, "no time in the name")


def test_names_that_two_formats_read_differently_have_no_time():
    name = "20230809_060030_then_230810_0700.wav"
    assert start_from_name(name) is None
    (problem,) = recording_starts([name], read_metadata=False)["problem"]
    assert problem.startswith("formats disagree")
    # The same reading twice is one time (buzzr: duplicates are not a conflict).
    assert start_from_name("x.wav", time_format=["%y%m%d", "%y%m%d"]) is None
    assert start_from_name("230809.wav", time_format=["%y%m%d", "%y%m%d"]) == pd.Timestamp(
        "2023-08-09"
    )


def test_user_strptime_format_is_searched_anywhere_as_buzzr_does():
    # buzzr's vignette: extra characters around the time do not matter.
    name = "tmp_230809_1359_corrected_bad_time_whoops.wav"
    assert start_from_name(name, time_format="%y%m%d_%H%M") == pd.Timestamp("2023-08-09 13:59")
    # buzzr's conflict example: %y%m%d and %y%d%m read "230809" differently.
    assert start_from_name("230809.wav", time_format=["%y%m%d", "%y%d%m"]) is None
    assert start_from_name("a_2024-06-01T0530.wav", time_format="%Y-%m-%dT%H%M") == pd.Timestamp(
        "2024-06-01 05:30"
    )


def test_user_regex_with_named_groups():
    pattern = (
        r"(?P<day>\d{2})\.(?P<month>\d{2})\.(?P<year>\d{2,4})-(?P<hour>\d{2})h(?P<minute>\d{2})"
    )
    assert start_from_name("S1_01.06.2024-05h30.wav", time_format=pattern) == pd.Timestamp(
        "2024-06-01 05:30"
    )
    assert start_from_name("S1_01.06.24-05h30.wav", time_format=pattern) == pd.Timestamp(
        "2024-06-01 05:30"
    )
    assert start_from_name("S1_41.06.24-05h30.wav", time_format=pattern) is None


@pytest.mark.parametrize(
    ("time_format", "message"),
    [
        ("%Q%m", "%Q is not supported"),
        ("%c", "%c is not supported"),
        ("230809", "has no strptime directive"),
        (r"(?P<year>\d{4})(?P<month>\d{2})", r"lacks the named groups \['day'\]"),
        (r"(?P<year>\d{4}", "not a valid regex"),
        ("", "must be a strptime format"),
        ([], "must be a strptime format"),
    ],
)
def test_bad_user_patterns(time_format, message):
    with pytest.raises(ParameterError, match=message):
        start_from_name("20240601_053000.wav", time_format=time_format)
    with pytest.raises(ParameterError, match=message):
        recording_starts(["a.wav"], time_format=time_format)


def test_time_zone_localizes_names_and_rejects_unknown_zones():
    start = start_from_name("20240601_053000.WAV", tz="America/New_York")
    assert start == pd.Timestamp("2024-06-01 05:30", tz="America/New_York")
    table = recording_starts(["20240601_053000.WAV", "x.wav"], tz="UTC", read_metadata=False)
    assert str(table["start"].dtype) == "datetime64[ns, UTC]"
    # 02:30 on 10 March 2024 does not exist in New York, 01:30 on 3 November is there twice:
    # no start, with which it is (a skipped time is a clock error; a repeated one, ambiguous).
    skipped, repeated = recording_starts(
        ["20240310_023000.WAV", "20241103_013000.WAV"], tz="America/New_York", read_metadata=False
    )["problem"]
    assert skipped == (
        "2024-03-10 02:30:00 is skipped in America/New_York (its clocks go forward then)"
    )
    assert repeated == (
        "2024-11-03 01:30:00 is repeated in America/New_York (its clocks go back then: which "
        "is not known)"
    )
    with pytest.raises(ParameterError, match=r"'Mars/Olympus' is not a time zone; use an IANA"):
        start_from_name("20240601_053000.WAV", tz="Mars/Olympus")
    with pytest.raises(ParameterError, match=r"not a time zone \(did you mean 'America/New_York'"):
        recording_starts(["x.wav"], tz="america/newyork")
    with pytest.raises(ParameterError, match=r"'UTC-4' is not .*a fixed offset: 'UTC-04:00'"):
        recording_starts(["x.wav"], tz="UTC-4")
    # Not 'GMT-0' (UTC), the closest spelling; a number is not read as seconds east of UTC.
    with pytest.raises(ParameterError, match=r"'GMT-5' is not a time zone \(did you mean 'UTC-05"):
        recording_starts(["x.wav"], tz="GMT-5")
    with pytest.raises(ParameterError, match=r"tz=-5 is not a time zone's name"):
        recording_starts(["x.wav"], tz=-5)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"'GMT-99' is not a time zone; use"):
        recording_starts(["x.wav"], tz="GMT-99")  # no zone is 99 hours off: no suggestion
    with pytest.raises(
        ParameterError, match=r"'GMT\+5:30' is not a time zone \(did you mean 'UTC\+05:30'"
    ):
        recording_starts(["x.wav"], tz="GMT+5:30")
    # A zone object, as a notebook may hold one, is a zone.
    for zone in (zoneinfo.ZoneInfo("America/New_York"), dateutil.tz.gettz("America/New_York")):
        (start,) = recording_starts(["20240601_053000.WAV"], tz=zone, read_metadata=False)["start"]
        assert start == pd.Timestamp("2024-06-01 05:30", tz="America/New_York")
    assert start_from_name("20240601_053000.WAV", tz="UTC-04:00") == pd.Timestamp(
        "2024-06-01 05:30-04:00"
    )


def _wav(path, seconds=0.5):
    write_wav(path, np.zeros(int(8000 * seconds)), 8000)
    return path


@pytest.mark.parametrize(
    ("zone", "clock", "expected_naive", "expected_utc"),
    [
        ("UTC", "05:30:00 01/06/2024", "2024-06-01 05:30:00", "2024-06-01 05:30:00"),
        ("UTC-4", "01:30:15 01/06/2024", "2024-06-01 01:30:15", "2024-06-01 05:30:15"),
        ("UTC+5:30", "11:00:00 01/06/2024", "2024-06-01 11:00:00", "2024-06-01 05:30:00"),
        ("UTC-0:30", "05:00:00 01/06/2024", "2024-06-01 05:00:00", "2024-06-01 05:30:00"),
    ],
)
def test_audiomoth_comment(tmp_path, zone, clock, expected_naive, expected_utc):
    path = add_metadata(_wav(tmp_path / "NONAME.WAV"), comment=audiomoth_comment(clock, zone))
    # The file is still a WAV that readers accept.
    with wave.open(str(path)) as stream:
        assert stream.getnframes() == 4000
    assert start_from_metadata(path) == pd.Timestamp(expected_naive)
    assert recording_start(path, tz="UTC") == pd.Timestamp(expected_utc, tz="UTC")
    (source,) = recording_starts([str(path)])["source"]
    assert source == "AudioMoth comment"


@requires_ffmpeg
def test_a_flac_made_from_an_audiomoth_wav_keeps_its_start(tmp_path):
    """AudioMoth WAVs compressed to FLAC (ffmpeg writes the comment as DESCRIPTION; the flac
    tool, with --tag, as COMMENT): their names are UTC, and were read as local clock time."""
    wav = add_metadata(
        _wav(tmp_path / "20241103_055900.WAV"),
        comment=audiomoth_comment("05:59:00 03/11/2024", "UTC"),
    )
    flac = tmp_path / "20241103_055900.flac"
    subprocess.run(["ffmpeg", "-v", "error", "-i", wav, flac], check=True)
    assert b"DESCRIPTION=Recorded at 05:59:00" in flac.read_bytes()[:4096]
    starts = recording_starts([flac.name], root=tmp_path, tz="America/New_York")
    # 01:59 EDT, the first of the night's two 01:59s, as the name alone (05:59 EST) was not.
    assert starts["start"].iloc[0] == pd.Timestamp("2024-11-03 05:59", tz="UTC")
    assert starts["source"].iloc[0] == "AudioMoth comment"
    # A COMMENT field, a FLAC without one, and a file that only carries the suffix.
    tagged = tmp_path / "tagged.flac"
    comment = audiomoth_comment("04:00:00 01/06/2024", "UTC-4")
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-i",
            wav,
            "-map_metadata",
            "-1",
            "-metadata",
            f"comment={comment}",
            tagged,
        ],
        check=True,
    )
    assert start_from_metadata(tagged) == pd.Timestamp("2024-06-01 04:00")
    bare = tmp_path / "bare.flac"
    subprocess.run(["ffmpeg", "-v", "error", "-i", wav, "-map_metadata", "-1", bare], check=True)
    assert start_from_metadata(bare) is None
    (tmp_path / "text.flac").write_text("not audio")
    assert start_from_metadata(tmp_path / "text.flac") is None


@pytest.mark.parametrize(
    ("stamp", "expected_naive", "expected_ny"),
    [
        ("2024-06-01T05:30:00-04:00", "2024-06-01 05:30:00", "2024-06-01 05:30:00"),
        ("2024-06-01T09:30:00Z", "2024-06-01 09:30:00", "2024-06-01 05:30:00"),
        ("2024-06-01 09:30:00+0000", "2024-06-01 09:30:00", "2024-06-01 05:30:00"),
        # No offset: local time, localized like a name.
        ("2024-06-01T05:30:00", "2024-06-01 05:30:00", "2024-06-01 05:30:00"),
    ],
)
def test_guano_timestamp(tmp_path, stamp, expected_naive, expected_ny):
    guano = f"GUANO|Version: 1.0\nMake: Wildlife Acoustics\nTimestamp: {stamp}\nSamplerate: 8000\n"
    path = add_metadata(_wav(tmp_path / "rec.wav"), guano=guano)
    assert start_from_metadata(path) == pd.Timestamp(expected_naive)
    assert recording_start(path, tz="America/New_York") == pd.Timestamp(
        expected_ny, tz="America/New_York"
    )
    assert recording_starts([str(path)])["source"].iloc[0] == "GUANO Timestamp"
    # A BW64 (the broadcast form past 4 GiB, read for its audio as RIFF is): its start too.
    path.write_bytes(b"BW64" + path.read_bytes()[4:])
    assert start_from_metadata(path) == pd.Timestamp(expected_naive)


def test_metadata_and_name_precedence(tmp_path):
    # Metadata first (seconds, zone), unless the user said how the names are written.
    path = add_metadata(
        _wav(tmp_path / "20240601_000000.WAV"),
        comment=audiomoth_comment("05:30:07 01/06/2024", "UTC"),
    )
    assert recording_start(path) == pd.Timestamp("2024-06-01 05:30:07")
    assert recording_start(path, read_metadata=False) == pd.Timestamp("2024-06-01 00:00:00")
    assert recording_start(path, time_format="%Y%m%d_%H%M%S") == pd.Timestamp("2024-06-01")
    # A name the user's format does not fit falls back to the metadata.
    assert recording_start(path, time_format="%y-%m-%d") == pd.Timestamp("2024-06-01 05:30:07")


def test_unreadable_or_plain_files_fall_back_to_the_name(tmp_path):
    plain = _wav(tmp_path / "230809_0600.wav")
    assert recording_start(plain) == pd.Timestamp("2023-08-09 06:00")
    broken = tmp_path / "20240601_053000.wav"
    broken.write_bytes(b"RIFF\x00\x00")
    assert recording_start(broken) == pd.Timestamp("2024-06-01 05:30")
    assert recording_start(tmp_path / "missing" / "20240601_053000.wav") == pd.Timestamp(
        "2024-06-01 05:30"
    )
    assert start_from_metadata(broken) is None


def test_recording_starts_reads_metadata_under_root(tmp_path, monkeypatch):
    (tmp_path / "siteC").mkdir()
    add_metadata(
        _wav(tmp_path / "siteC" / "rec.wav"),
        comment=audiomoth_comment("06:00:00 02/06/2024", "UTC+1"),
    )
    names = ["siteC/rec.wav", "siteB/230809_0600.mp3", "siteB/notime.wav"]
    table = recording_starts(names, root=tmp_path)
    assert list(table.index) == names
    assert table["start"].tolist()[:2] == [
        pd.Timestamp("2024-06-02 06:00"),
        pd.Timestamp("2023-08-09 06:00"),
    ]
    assert pd.isna(table["start"].iloc[2])
    assert table["source"].tolist()[:2] == ["AudioMoth comment", "name %y%m%d_%H%M"]
    assert pd.isna(table["source"].iloc[2])
    # From a notebook: a root under "~" (its metadata went unread), one name as text.
    monkeypatch.setenv("HOME", str(tmp_path))
    one = recording_starts("siteC/rec.wav", root="~")
    assert one["start"].tolist() == [pd.Timestamp("2024-06-02 06:00")]
    assert one["source"].tolist() == ["AudioMoth comment"]
    # A name starting with "~" that is no home (Path.expanduser raised): timed by its name.
    odd = recording_starts(["~20240601_060000.wav"])
    assert odd["start"].tolist() == [pd.Timestamp("2024-06-01 06:00")]


def test_starts_on_different_clocks_are_warned_of_without_a_zone(tmp_path, caplog):
    # An AudioMoth left at its default (UTC) beside a Song Meter named in local time.
    add_metadata(
        _wav(tmp_path / "moth.WAV"), comment=audiomoth_comment("09:30:00 01/06/2024", "UTC")
    )
    _wav(tmp_path / "SM4_20240601_053000.wav")
    names = ["moth.WAV", "SM4_20240601_053000.wav"]
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        naive = recording_starts(names, root=tmp_path)
    assert (
        naive["start"].tolist() == pd.to_datetime(["2024-06-01 09:30", "2024-06-01 05:30"]).tolist()
    )
    (message,) = caplog.messages
    assert "written on different clocks: 1 UTC (moth.WAV); 1 with no zone (SM4_" in message
    assert "--tz America/New_York" in message
    # What each was written in, listed beside its start (a summary's <label>-files.csv).
    assert naive["clock"].tolist() == ["UTC", pd.NA]
    # With the zone given, one clock and no warning; nor when every start shares a zone that
    # is the recorders' own (UTC-4: an AudioMoth set to the field's standard time).
    caplog.clear()
    add_metadata(
        _wav(tmp_path / "local.WAV"), comment=audiomoth_comment("05:30:00 01/06/2024", "UTC-4")
    )
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        zoned = recording_starts(names, root=tmp_path, tz="America/New_York")
        local = recording_starts(["local.WAV"], root=tmp_path)
    assert zoned["start"].nunique() == 1 and not caplog.messages
    assert zoned["clock"].tolist() == ["UTC", pd.NA] and local["clock"].tolist() == ["UTC-04:00"]


def test_starts_all_written_in_utc_are_warned_of_without_a_zone(tmp_path, caplog):
    """An AudioMoth left at its default clock, UTC: without --tz its hours of the day are
    UTC's (bees at 3 a.m. in Ohio), which the user should hear before reading a plot."""
    add_metadata(
        _wav(tmp_path / "20240601_093000.WAV"),
        comment=audiomoth_comment("09:30:00 01/06/2024", "UTC"),
    )
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        naive = recording_starts(["20240601_093000.WAV"], root=tmp_path)
    assert naive["start"].tolist() == [pd.Timestamp("2024-06-01 09:30")]
    (message,) = caplog.messages
    assert message.startswith("recording start times are written in UTC (20240601_093000.WAV)")
    assert "hours of the day are UTC's, not the field's" in message
    assert "--tz America/New_York (or --tz UTC to keep UTC)" in message
    caplog.clear()
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        kept = recording_starts(["20240601_093000.WAV"], root=tmp_path, tz="UTC")
    assert kept["start"].tolist() == [pd.Timestamp("2024-06-01 09:30", tz="UTC")]
    assert not caplog.messages


def test_audio_out_of_reach_is_timed_by_name_with_a_warning(tmp_path, caplog):
    # Results copied off the cluster without the audio: the names are all that is left, and
    # an AudioMoth left at UTC names its files in UTC while its comment says so: say it.
    add_metadata(
        _wav(tmp_path / "20240601_093000.WAV"),
        comment=audiomoth_comment("09:30:00 01/06/2024", "UTC"),
    )
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        here = recording_starts(["20240601_093000.WAV"], root=tmp_path, tz="America/New_York")
    assert here["start"].iloc[0] == pd.Timestamp("2024-06-01 05:30", tz="America/New_York")
    # buzzr, given the same zone, would read the name's 09:30 as New York's.
    (message,) = caplog.messages
    assert message.startswith(
        "1 recording(s) whose metadata and name give different start times in "
        "America/New_York, the metadata's taken: 20240601_093000.WAV (AudioMoth comment "
        "2024-06-01 05:30:00, name 2024-06-01 09:30:00)"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        moved = recording_starts(
            ["20240601_093000.WAV", "notime.wav", "230809_0600.mp3"],
            root=tmp_path / "moved",
            tz="America/New_York",
        )
    assert moved["start"].iloc[0] == pd.Timestamp("2024-06-01 09:30", tz="America/New_York")
    assert moved["source"].iloc[0] == "name %Y%m%d_%H%M%S"
    (message,) = caplog.messages
    assert message.startswith("2 WAV or FLAC recording(s) could not be read for the start time")
    assert "20240601_093000.WAV (No such file or directory); notime.wav (No such" in message
    assert "Run this where the audio is" in message
    assert "230809_0600.mp3" not in message  # no metadata is read from an MP3 anyway


def test_metadata_and_name_that_disagree_are_warned_of(tmp_path, caplog):
    add_metadata(
        _wav(tmp_path / "20240601_060000.WAV"),
        comment=audiomoth_comment("06:10:00 01/06/2024", "UTC+1"),
    )
    add_metadata(
        _wav(tmp_path / "20240601_070000.WAV"),  # seconds apart: the same clock
        comment=audiomoth_comment("07:00:30 01/06/2024", "UTC+1"),
    )
    names = ["20240601_060000.WAV", "20240601_070000.WAV"]
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        table = recording_starts(names, root=tmp_path)
    assert (
        table["start"].tolist()
        == pd.to_datetime(["2024-06-01 06:10", "2024-06-01 07:00:30"], format="ISO8601").tolist()
    )
    (message,) = caplog.messages
    assert message == (
        "1 recording(s) whose metadata and name give different start times, the metadata's "
        "taken: 20240601_060000.WAV (AudioMoth comment 2024-06-01 06:10:00, name 2024-06-01 "
        "06:00:00). buzzr, which reads names, bins them at the names' times; give "
        "--time-format (time_format=) to take the names' instead"
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="buzzdask.recording_time"):
        recording_starts(names, root=tmp_path, time_format="%Y%m%d_%H%M%S")
        recording_starts(names, root=tmp_path, read_metadata=False)
    assert not caplog.messages
