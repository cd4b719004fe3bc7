"""Time bins (buzzr's bin_directory semantics) and plots, on a real run of a site/date tree.

One analysis (real ffmpeg, real Dask workers, the tiny models) of recordings named as AudioMoth
and the lab's Sony recorders write them, one timed only by its AudioMoth comment and one without
any time; every binned table is checked against a plain pandas computation on all its frames.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import pickle
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from buzzdask import OutputConflictError, ParameterError, export
from buzzdask.cli import EXIT_ERROR, EXIT_OK, main
from buzzdask.plots import plot_activation, plot_daily_activity, plot_run
from buzzdask.results import open_run
from buzzdask.summaries import summarize
from tests.conftest import field_like, held_by_another_thread, requires_ffmpeg, write_wav
from tests.wav_metadata import add_metadata, audiomoth_comment

pytestmark = requires_ffmpeg

RATE = 16000
# name -> (seconds of audio, start time it should get or None)
TREE = {
    # One AudioMoth's consecutive files: both feed the 06:00 bin.
    "siteA/2024-06-01/20240601_055830.WAV": (130, "2024-06-01 05:58:30"),
    "siteA/2024-06-01/20240601_060040.WAV": (100, "2024-06-01 06:00:40"),
    # The lab's Sony recorder (buzzr's YYMMDD_HHMM), as MP3.
    "siteB/230809_0600.mp3": (90, "2023-08-09 06:00:00"),
    # No time in the name or the file: binned by offset, listed.
    "siteB/notime.wav": (70, None),
    # Timed by its AudioMoth comment only (local clock, UTC-4).
    "siteC/deep/rec.wav": (61, "2024-06-02 04:59:31"),
    # At the top of the tree: no folder at level 1.
    "loose_20240601_053000.wav": (30, "2024-06-01 05:30:00"),
}


@pytest.fixture(scope="module")
def lab_run(dask_client, tiny_embedder, tiny_model, tmp_path_factory):
    import buzzdask

    base = tmp_path_factory.mktemp("summaries")
    audio = base / "audio"
    for seed, (name, (seconds, _)) in enumerate(TREE.items()):
        target = audio / name
        target.parent.mkdir(parents=True, exist_ok=True)
        wav = target if target.suffix.lower() == ".wav" else target.with_suffix(".src.wav")
        write_wav(wav, field_like(seconds * RATE, RATE, seed=seed), RATE)
        if wav != target:
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(target)], check=True)
            wav.unlink()
    add_metadata(
        audio / "siteC/deep/rec.wav", comment=audiomoth_comment("04:59:31 02/06/2024", "UTC-4")
    )
    result = buzzdask.analyze(
        audio,
        tiny_model,
        output=base / "run",
        client=dask_client,
        embedder=str(tiny_embedder),
        progress=False,
    )
    assert result.ok, result.errors
    frames = open_run(result.output).frames().compute()
    # A threshold that is itself an activation: the frames equal to it show the > rule.
    values = np.sort(frames["activation_ins_buzz"].to_numpy(dtype=np.float64))
    threshold = float(values[len(values) // 2])
    return result.output, frames.reset_index(drop=True), threshold


def expected_bins(frames, *, width, by, thresholds, tz=None):
    """buzzr's bin_directory, spelled out in pandas over every frame."""
    starts = {name: pd.Timestamp(start) if start else pd.NaT for name, (_, start) in TREE.items()}
    data = frames.copy()
    origin = data["file"].map(starts).astype("datetime64[ns]")
    if tz is not None:
        origin = origin.dt.tz_localize(tz)
    data["bin_datetime"] = (origin + pd.to_timedelta(data["start"], unit="s")).dt.floor(width)
    width_s = pd.Timedelta(width).total_seconds()
    data["bin_filetime"] = np.where(
        origin.isna(), np.floor(data["start"] / width_s) * width_s, np.nan
    )
    parts = data["file"].str.split("/")
    groups = []
    if by == "file":
        groups = ["file"]
    elif by is not None:
        for level in [by] if isinstance(by, int) else by:
            column = f"level_{level}"
            data[column] = parts.map(lambda p, k=level: p[k - 1] if k < len(p) else ".")
            groups.append(column)
    data["frames"] = 1
    for name, value in thresholds.items():
        data[f"detections_{name}"] = (data[f"activation_{name}"] > value).astype("int64")
    keys = [*groups, "bin_datetime", "bin_filetime"]
    sums = ["frames", *(f"detections_{name}" for name in thresholds)]
    table = data.groupby(keys, dropna=False)[sums].sum().reset_index()
    for name in thresholds:
        table[f"detectionrate_{name}"] = table[f"detections_{name}"] / table["frames"]
    table = table.sort_values(keys, ignore_index=True)
    for column in groups:
        table[column] = table[column].astype("string")
    return table


def assert_bins(actual, expected):
    actual = actual.sort_values(list(expected.columns[:-1]), ignore_index=True)
    pd.testing.assert_frame_equal(actual, expected, check_dtype=False)


@pytest.mark.parametrize("by", ["file", 1, [1, 2], None])
def test_bins_match_plain_pandas(lab_run, tmp_path, by):
    output, frames, threshold = lab_run
    thresholds = {"ins_buzz": threshold, "mech_plane": 0.0}
    table = summarize(output, bin="1min", by=by, thresholds=thresholds, dest=tmp_path)
    assert_bins(table, expected_bins(frames, width="1min", by=by, thresholds=thresholds))
    assert table["frames"].sum() == len(frames)
    assert table.attrs["untimed_files"] == ["siteB/notime.wav"]
    if by is None:  # "all", as the command line spells it, is the same
        everything = summarize(output, bin="1min", by="all", thresholds=thresholds, write=False)
        pd.testing.assert_frame_equal(everything, table)
    if by == [1, 2]:  # a level given twice counts once (it crashed)
        twice = summarize(output, bin="1min", by=[1, 2, 1], thresholds=thresholds, write=False)
        pd.testing.assert_frame_equal(twice, table)


def test_bins_semantics(lab_run, tmp_path):
    output, frames, threshold = lab_run
    table = summarize(
        output, bin="1min", by="file", thresholds={"ins_buzz": threshold}, write=False
    )
    # buzzr's column names (R/VARIABLES.R: PREFIX_DETECTION, PREFIX_DETECTIONRATE, COL_FRAMES).
    assert list(table.columns) == [
        "file",
        "bin_datetime",
        "bin_filetime",
        "frames",
        "detections_ins_buzz",
        "detectionrate_ins_buzz",
    ]
    # Strictly greater: frames equal to the threshold are not detections.
    ties = int((frames["activation_ins_buzz"] == np.float32(threshold)).sum())
    assert ties >= 1
    above = int((frames["activation_ins_buzz"] > threshold).sum())
    assert table["detections_ins_buzz"].sum() == above
    # Wall-clock bins: the AudioMoth file that starts at 05:58:30 fills half of its first bin.
    first = table[table["file"] == "siteA/2024-06-01/20240601_055830.WAV"].iloc[0]
    assert first["bin_datetime"] == pd.Timestamp("2024-06-01 05:58")
    assert first["frames"] == 32  # starts 0, 0.96, ... 29.76 s fall before 05:59:00
    # The comment-timed file, and the untimed one by offset (from 0 s, one row per minute).
    comment = table[table["file"] == "siteC/deep/rec.wav"]
    assert comment["bin_datetime"].iloc[0] == pd.Timestamp("2024-06-02 04:59")
    untimed = table[table["file"] == "siteB/notime.wav"]
    assert untimed["bin_datetime"].isna().all()
    assert untimed["bin_filetime"].tolist() == [0.0, 60.0]
    # By site: consecutive files of one recorder share the 06:00 bin.
    sites = summarize(output, bin="1min", by=1, thresholds={"ins_buzz": threshold}, write=False)
    six = sites[(sites["level_1"] == "siteA") & (sites["bin_datetime"] == "2024-06-01 06:00")]
    assert len(six) == 1
    in_six = frames[
        frames["file"].str.startswith("siteA/")
        & (
            frames["file"].map({n: pd.Timestamp(s or "NaT") for n, (_, s) in TREE.items()})
            + pd.to_timedelta(frames["start"], unit="s")
        ).between("2024-06-01 06:00", "2024-06-01 06:00:59.999")
    ]
    assert six["frames"].iloc[0] == len(in_six) > 0
    assert in_six["file"].nunique() == 2


def test_time_zone_and_the_runs_own_thresholds(lab_run, tmp_path, dask_client, tiny_model, caplog):
    output, frames, threshold = lab_run
    thresholds = {"ins_buzz": threshold}
    zoned = summarize(
        output, bin="5min", by=1, thresholds=thresholds, tz="America/New_York", write=False
    )
    assert str(zoned["bin_datetime"].dt.tz) == "America/New_York"
    assert_bins(
        zoned,
        expected_bins(frames, width="5min", by=1, thresholds=thresholds, tz="America/New_York"),
    )
    # Day bins in a zone start at midnight UTC, as buzzr's; a zone without summer time.
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        summarize(output, bin="1d", by=1, thresholds=thresholds, tz="EST", write=False)
    assert "bins of 1d are counted from 1970-01-01 UTC, as buzzr's are" in caplog.text
    assert "for local days or hours, use 1h bins and sum them" in caplog.text
    assert "tz='EST' is a fixed offset all year" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        summarize(output, bin="1d", by=1, thresholds=thresholds, tz="UTC", write=False)
    assert "counted from 1970-01-01 UTC" not in caplog.text  # its midnight is UTC's
    # Hours in a half-hour zone start at :30 past (its half hours on its round times).
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        summarize(
            output, bin="30min", by=1, thresholds=thresholds, tz="America/St_Johns", write=False
        )
        assert "counted from 1970-01-01 UTC" not in caplog.text
        half = summarize(
            output, bin="1h", by=1, thresholds=thresholds, tz="America/St_Johns", write=False
        )
    assert (half["bin_datetime"].dropna().dt.minute == 30).all()
    assert "not from local midnight in America/St_Johns, so they do not start" in caplog.text
    assert "use 30min bins and sum them" in caplog.text
    # The AudioMoth comment said UTC-4 (EDT): its clock time is kept, now as New York time.
    naive = summarize(output, bin="5min", by=1, thresholds=thresholds, write=False)
    timed = naive["bin_datetime"].notna()
    assert (
        zoned.loc[timed, "bin_datetime"].dt.tz_localize(None) == naive.loc[timed, "bin_datetime"]
    ).all()


def test_files_written_and_never_overwritten_silently(lab_run, tmp_path):
    output, _, threshold = lab_run
    dest = tmp_path / "out"
    table = summarize(output, bin="2min", by=1, thresholds={"ins_buzz": threshold}, dest=dest)
    paths = {
        kind: dest / name
        for kind, name in [
            ("parquet", "bins-2min-by-level_1.parquet"),
            ("csv", "bins-2min-by-level_1.csv"),
            ("files", "bins-2min-by-level_1-files.csv"),
        ]
    }
    assert table.attrs["paths"] == {kind: str(path) for kind, path in paths.items()}
    back = pd.read_parquet(paths["parquet"])
    pd.testing.assert_frame_equal(back, table.assign(), check_dtype=False, check_like=False)
    csv = pd.read_csv(paths["csv"])
    assert list(csv.columns) == list(table.columns)
    assert csv["frames"].tolist() == table["frames"].tolist()
    listing = pd.read_csv(paths["files"]).set_index("file")
    assert listing.loc["siteC/deep/rec.wav", "source"] == "AudioMoth comment"
    assert listing.loc["siteB/230809_0600.mp3", "source"] == "name %y%m%d_%H%M"
    assert listing.loc["siteB/notime.wav", "problem"] == "no time in the name"
    # The zone each start was written in: the comment's, none for a name without one.
    assert listing.loc["siteC/deep/rec.wav", "clock"] == "UTC-04:00"
    assert pd.isna(listing.loc["siteB/230809_0600.mp3", "clock"])
    with pytest.raises(OutputConflictError, match="overwrite=True"):
        summarize(output, bin="2min", by=1, thresholds={"ins_buzz": threshold}, dest=dest)
    summarize(output, bin="2min", by=1, thresholds={"ins_buzz": 0.0}, dest=dest, overwrite=True)
    assert pd.read_parquet(paths["parquet"])["detections_ins_buzz"].sum() == int(
        (lab_run[1]["activation_ins_buzz"] > 0.0).sum()
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"bin": "often"}, "is not a duration"),
        ({"bin": "-5min"}, "must be a positive duration"),
        ({"bin": "5"}, r"bin='5' has no unit: give one, e.g. '5min' \(buzzr's binwidth"),
        ({"bin": 20}, "bin=20 has no unit"),
        ({"bin": "0"}, r"bin='0' must be a positive duration"),  # not "e.g. '0min'"
        ({"by": "site"}, "must be 'file', a folder level"),
        ({"by": 0}, "folder levels are integers >= 1"),
        ({"thresholds": {"wasp": 1.0}}, "unknown class"),
        ({"thresholds": 0.5}, "must map class names to activations"),
        # The run's own class, no other head's value as its own.
        ({}, r"no thresholds: the run has none of its own; give thresholds=\{'ins_buzz': VALUE"),
        ({"thresholds": {"ins_buzz": 0.0}, "tz": "Nowhere/Land"}, "not a time zone"),
        ({"thresholds": {"ins_buzz": 0.0}, "time_format": "%y%Q"}, "%Q is not supported"),
        # No date: every recording on 1900-01-01, "2024" read as 20:24.
        ({"thresholds": {"ins_buzz": 0.0}, "time_format": "%H%M"}, "names no date"),
        ({"thresholds": {"ins_buzz": 0.0}, "time_format": "%y%d_%H"}, "names no date"),
        ({"thresholds": {"ins_buzz": 0.0}, "bin": "inf"}, "must be a positive duration"),
    ],
)
def test_bad_options_fail_before_reading(lab_run, options, message):
    output, _, _ = lab_run
    with pytest.raises(ParameterError, match=message):
        summarize(output, write=False, **options)


def test_cli_summarize(lab_run, tmp_path, capsys):
    output, frames, threshold = lab_run
    dest = tmp_path / "cli"
    argv = ["summarize", str(output), "--bin", "1min", "--by", "1,2", "--dest", str(dest)]
    argv += ["--threshold", f"ins_buzz={threshold!r}"]
    assert main(argv) == EXIT_OK
    out, err = capsys.readouterr()
    assert "bins-1min-by-level_1-level_2.parquet" in out
    # The summary's warning, once, as one of the command's lines.
    untimed = "buzzdask: 1 recording(s) without a known start time, binned by offset"
    assert untimed in err and err.count("siteB/notime.wav") == 1
    # Each one's reason, and where all of them are listed.
    assert "siteB/notime.wav (no time in the name" in err
    assert "(each one's reason: " in err and "bins-1min-by-level_1-level_2-files.csv)" in err
    written = pd.read_parquet(dest / "bins-1min-by-level_1-level_2.parquet")
    assert_bins(
        written,
        expected_bins(frames, width="1min", by=[1, 2], thresholds={"ins_buzz": threshold}),
    )
    assert main(argv) == EXIT_ERROR  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    # A mistyped zone is said first, not after --overwrite was added for nothing.
    assert main([*argv, "--tz", "America/New_Yrok"]) == EXIT_ERROR
    assert "--overwrite" not in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == EXIT_OK


def test_plots(lab_run, tmp_path, capsys):
    from matplotlib.figure import Figure

    output, _, threshold = lab_run
    summary = summarize(output, bin="1min", by=1, thresholds={"ins_buzz": threshold}, write=False)
    figure = plot_daily_activity(summary)
    assert isinstance(figure, Figure)
    # A notebook cell whose value it is shows it, without pyplot or %matplotlib inline.
    assert figure._repr_png_().startswith(b"\x89PNG")
    (axes,) = figure.axes
    # One line per site folder (the top-level file is the "." group).
    assert sorted(line.get_label() for line in axes.get_lines()) == [
        ".",
        "siteA",
        "siteB",
        "siteC",
    ]
    assert "not shown" in axes.get_title()  # the untimed file's bins
    assert axes.get_xlabel() == "time of day (h, as the recorders wrote it)"
    # Which head, and which threshold.
    heading = f"ins_buzz > {threshold:g} ({summary.attrs['model']}): detections"
    assert heading in axes.get_title()
    # Recorders on at dawn and dusk only: the line breaks over the hours between, and a
    # folder named "_control" keeps its place in the legend (matplotlib drops "_" labels).
    day = pd.Timestamp("2024-06-01")
    hours = [5, 5.25, 5.5, 18, 18.25]
    crafted = pd.DataFrame(
        {
            "level_1": ["_control"] * 5 + ["siteA"] * 5,
            "bin_datetime": [day + pd.Timedelta(hours=h) for h in hours] * 2,
            "bin_filetime": np.nan,
            "frames": 10,
            "detections_ins_buzz": [1, 2, 3, 4, 5] * 2,
        }
    )
    crafted["detectionrate_ins_buzz"] = crafted["detections_ins_buzz"] / crafted["frames"]
    (axes,) = plot_daily_activity(crafted).axes
    # The highest rate, 0.5, not at the edge; rates of 0 drawn above the lower one.
    assert axes.get_ylim() == (pytest.approx(-0.0165), pytest.approx(0.55))
    for line in axes.get_lines():
        assert np.isnan(line.get_xdata()).tolist() == [False] * 3 + [True] + [False] * 2
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["_control", "siteA"]
    # Its CSV read back in a new session: text, with a summer's and a winter's offset. The clock
    # times the text says are drawn (a raw pandas error came).
    text = [
        f"{time:%Y-%m-%d %H:%M:%S}{offset}"
        for time, offset in zip(crafted["bin_datetime"], ["-04:00", "-05:00"] * 5, strict=True)
    ]
    (read_back,) = plot_daily_activity(crafted.assign(bin_datetime=text)).axes
    for drawn, expected in zip(read_back.get_lines(), axes.get_lines(), strict=True):
        np.testing.assert_array_equal(drawn.get_xdata(), expected.get_xdata())
    with pytest.raises(ParameterError, match=r"bin_datetime column holds no times .*'noon'"):
        plot_daily_activity(crafted.assign(bin_datetime="noon"))
    # 7-minute bins on two days fall at other clock times each day: no break between them.
    seven = [pd.Timestamp(day) + pd.Timedelta(minutes=7 * k) for day in ("2024-06-01 06:00",
             "2024-06-02 06:00") for k in range(20)]  # fmt: skip
    bins = pd.DataFrame({"bin_datetime": pd.to_datetime(seven), "bin_filetime": np.nan})
    bins = bins.assign(frames=10, detections_ins_buzz=1, detectionrate_ins_buzz=0.1)
    bins.attrs["bin"] = "7min"
    (axes,) = plot_daily_activity(bins).axes
    assert not np.isnan(axes.get_lines()[0].get_xdata()).any()
    untimed = plot_daily_activity(summary[summary["bin_datetime"].isna()])
    assert untimed.axes[0].get_xlabel().startswith("time since the start of the file (s")
    activation = plot_activation(
        output,
        "siteA/2024-06-01/20240601_055830.WAV",
        thresholds={"ins_buzz": threshold},
    )
    assert activation.axes[0].get_xlabel() == (
        "time (as the recorder wrote it), from 2024-06-01 05:58:30"
    )
    labels = [line.get_label() for line in activation.axes[0].get_lines()]
    assert f"threshold {threshold:g}" in labels
    assert activation._repr_png_().startswith(b"\x89PNG")
    # Built in a Dask task or a process pool, a figure pickles and comes back whole.
    assert pickle.loads(pickle.dumps(activation))._repr_png_().startswith(b"\x89PNG")
    written = plot_run(output, bin="1min", thresholds={"ins_buzz": threshold}, dest=tmp_path)
    assert sorted(path.name for path in written) == [
        "activation-loose_20240601_053000.wav-ins_buzz.png",
        "detection-rate-ins_buzz-bins-1min-by-level_1.png",
    ]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputConflictError, match="plot files already exist"):
        plot_run(output, bin="1min", thresholds={"ins_buzz": threshold}, dest=tmp_path)
    # A recording named without its folders: the names it has, the closest first.
    with pytest.raises(ParameterError, match=r"as in its file column, e\.g\. 'siteB/notime\.wav'"):
        plot_run(output, thresholds={"ins_buzz": threshold}, recordings=["notime.wav"])
    with pytest.raises(ParameterError, match=r"recordings \['notime\.wav'\] have no"):
        plot_run(output, thresholds={"ins_buzz": threshold}, recordings="notime.wav")
    # Before anything is summarized or any folder made (matplotlib's ValueError came last).
    with pytest.raises(ParameterError, match=r"dpi=0 must be a number > 0"):
        plot_run(output, thresholds={"ins_buzz": threshold}, dpi=0, dest=tmp_path / "none")
    assert not (tmp_path / "none").exists()
    # The command: every recording asked for, into the summaries folder by default.
    argv = ["plot", str(output), "--threshold", f"ins_buzz={threshold!r}"]
    argv += ["--recording", "siteB/notime.wav", "--recording", "siteC/deep/rec.wav"]
    assert main(argv) == EXIT_OK
    pngs = sorted(path.name for path in (output / "summaries").glob("*.png"))
    assert pngs == [
        "activation-siteB_notime.wav-ins_buzz.png",
        "activation-siteC_deep_rec.wav-ins_buzz.png",
        "detection-rate-ins_buzz-bins-5min-by-level_1.png",
    ]
    assert "wrote" in capsys.readouterr().out


def test_an_unfinished_run_is_said_so(lab_run, tmp_path, caplog):
    # A run stopped by Ctrl-C or a walltime kill: buzzdask.json still says "running".
    output, frames, threshold = lab_run
    partial = tmp_path / "partial"
    shutil.copytree(output, partial)
    metadata = json.loads((partial / "buzzdask.json").read_text())
    (partial / "buzzdask.json").write_text(json.dumps({**metadata, "status": "running"}))
    with caplog.at_level("WARNING", logger="buzzdask"):
        table = summarize(partial, thresholds={"ins_buzz": threshold}, write=False)
        export(partial, format="csv", dest=tmp_path / "csv")
    assert table["frames"].sum() == len(frames)
    assert [m for m in caplog.messages if "not finished" in m] == [
        f"{partial}: the run has not finished (it was stopped: analyze with --resume, "
        f"on_conflict='resume' in Python, finishes it); {doing} the frames written so far"
        for doing in ("summarizing", "exporting")
    ]
    # Still running (its lock's holder alive): a resume would be refused, so none is offered.
    from buzzdask.lock import OutputLock

    caplog.clear()
    analysing = OutputLock(partial, started="2026-06-01T05:30:00+00:00", stale_s=120)
    with held_by_another_thread(analysing), caplog.at_level("WARNING", logger="buzzdask"):
        summarize(partial, thresholds={"ins_buzz": threshold}, write=False)
    (message,) = [m for m in caplog.messages if str(partial) in m]
    assert message.startswith(f"{partial}: the run is still running (host ")
    assert f", since 2026-06-01T05:30:00+00:00, by {getpass.getuser()}, running " in message
    assert message.endswith(f" in {os.getcwd()}); summarizing the frames written so far")
    # Its files say which recordings' bins count frames short of their end: the warning is
    # gone once the terminal is (a recording stopped before its last chunk was journalled).
    journal = (partial / "journal.jsonl").read_text().splitlines()
    cut = json.loads(journal[-1])["file"]
    (partial / "journal.jsonl").write_text("\n".join(journal[:-1]) + "\n")
    dest = tmp_path / "summaries"
    table = summarize(partial, thresholds={"ins_buzz": threshold}, dest=dest)
    listing = pd.read_csv(dest / "bins-5min-by-file-files.csv").set_index("file")
    assert listing["complete"].to_dict() == {name: name != cut for name in listing.index}
    record = json.loads(
        pq.read_schema(dest / "bins-5min-by-file.parquet").metadata[b"buzzdask_summary"]
    )
    assert (record["run_complete"], record["unfinished_files"]) == (False, [cut])
    assert table.attrs["unfinished_files"] == [cut]
    whole = summarize(output, thresholds={"ins_buzz": threshold}, write=False)
    assert whole.attrs["run_complete"] and whole.attrs["unfinished_files"] == []


def test_plots_say_what_they_show(lab_run, tmp_path):
    """What a PI reads off a figure: a site with no detection is there, at 0; a stopped run's
    rates are said to be partial; days have no time of day; sites told apart by colour."""
    output, _, threshold = lab_run
    thresholds = {"ins_buzz": threshold}
    day = pd.Timestamp("2024-06-01 06:00")
    quiet = pd.DataFrame(
        {"level_1": "siteQ", "bin_datetime": [day, day + pd.Timedelta(hours=1)]}
    ).assign(bin_filetime=np.nan, frames=10, detections_ins_buzz=0, detectionrate_ins_buzz=0.0)
    (axes,) = plot_daily_activity(quiet).axes
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["siteQ"]
    assert axes.get_ylim()[0] < 0  # its points of 0 above the axis' edge
    # Eleven sites: eleven colours (matplotlib's ten came round again, two sites alike).
    eleven = pd.concat([quiet.assign(level_1=f"site{k:02d}") for k in range(11)])
    (axes,) = plot_daily_activity(eleven).axes
    assert len({line.get_color() for line in axes.get_lines()}) == 11
    many = pd.concat([quiet.assign(level_1=f"site{k:02d}") for k in range(13)])
    (axes,) = plot_daily_activity(many).axes
    assert axes.get_legend() is None and "13 lines, too many to name" in axes.get_title()
    # Day bins drawn at their start would be buzzing at midnight.
    with pytest.raises(ParameterError, match=r"bins of 1d have no time of day to draw them at"):
        plot_run(output, bin="1d", thresholds=thresholds, dest=tmp_path / "days")
    # Untimed recordings: from 0 to the end of the last bin (a bin at 0 was drawn at +-0.04 s).
    summary = summarize(output, bin="5min", by=1, thresholds=thresholds, write=False)
    (axes,) = plot_daily_activity(summary[summary["bin_datetime"].isna()]).axes
    assert axes.get_xlim() == (0, 300)
    # A stopped run: the rates, and a recording's activation, of the frames written so far.
    partial = tmp_path / "partial"
    shutil.copytree(output, partial)
    metadata = json.loads((partial / "buzzdask.json").read_text())
    (partial / "buzzdask.json").write_text(json.dumps({**metadata, "status": "interrupted"}))
    journal = (partial / "journal.jsonl").read_text().splitlines()
    cut = json.loads(journal[-1])["file"]
    (partial / "journal.jsonl").write_text("\n".join(journal[:-1]) + "\n")
    stopped = summarize(partial, thresholds=thresholds, write=False)
    (axes,) = plot_daily_activity(stopped).axes
    said = "(the run has not finished: 1 recording(s) analysed in part; rates of the frames"
    assert said in axes.get_title()
    (axes,) = plot_activation(partial, cut, thresholds=thresholds).axes
    assert "(not analysed to its end: the frames written so far)" in axes.get_title()
    (axes,) = plot_activation(output, cut, thresholds=thresholds).axes
    assert "not analysed to its end" not in axes.get_title()


def test_a_plot_replaces_only_its_own_run_and_recordings(lab_run, tmp_path):
    """Two heads' plots into one folder, or site/a.wav's and site_a.wav's in two calls, share
    file names: --overwrite replaced the other's without a word."""
    output, _, threshold = lab_run
    thresholds = {"ins_buzz": threshold}
    dest = tmp_path / "plots"
    first = plot_run(output, bin="1min", thresholds=thresholds, dest=dest)
    # Other bins into the same folder: the first recording's activation, drawn unasked, is
    # this run's own: drawn again, not in the way.
    again = plot_run(output, bin="10min", thresholds=thresholds, dest=dest)
    assert [p.name for p in again if p.name.startswith("activation")] == [
        p.name for p in first if p.name.startswith("activation")
    ]
    other = tmp_path / "other_season"
    shutil.copytree(output, other)
    before = {path: path.read_bytes() for path in dest.iterdir()}
    with pytest.raises(OutputConflictError, match="plot files of another run or recording") as no:
        plot_run(other, bin="1min", thresholds=thresholds, dest=dest, overwrite=True)
    assert f"the detection rate, ins_buzz, of {output.resolve()} (" in str(no.value)
    assert {path: path.read_bytes() for path in dest.iterdir()} == before
    # Its own, with --overwrite: replaced.
    plot_run(output, bin="1min", thresholds=thresholds, dest=dest, overwrite=True)


def test_a_failed_recordings_plot_says_why_it_has_none(run, make_audio, tmp_path):
    make_audio("20240601_060000.wav", n_samples=3 * 15360)
    (tmp_path / "audio" / "20240601_070000.WAV").write_text("not audio")
    result = run(tmp_path / "audio", thresholds={"ins_buzz": 0.0})
    with pytest.raises(ParameterError) as refused:
        plot_run(result, recordings=["20240601_070000.WAV"], dest=tmp_path / "plots")
    # Not "have no scores ... e.g. '20240601_060000.wav'", as a misspelt name hears.
    assert str(refused.value).startswith(
        "recordings that failed have no scores to plot (20240601_070000.WAV: "
    )
    assert "cannot read it as audio" in str(refused.value)


def test_plots_of_classes_named_alike_are_one_each(run, make_audio, tmp_path):
    """A trained head's classes bee/fly and bee_fly: one file name, and one class's plots were
    gone without a word."""
    from tests.model_fixtures import build_tiny_head

    head = build_tiny_head(tmp_path / "model_flies", classes=["bee/fly", "bee_fly"], seed=2)
    make_audio("20240601_060000.wav", n_samples=3 * 15360)
    thresholds = {"bee/fly": 0.0, "bee_fly": 0.0}
    result = run(tmp_path / "audio", model=head, thresholds=thresholds)
    written = plot_run(result, bin="1min", dest=tmp_path / "plots")
    assert len(written) == len(set(written)) == 4
    assert all(path.is_file() for path in written)


def test_plot_file_names_are_one_per_recording():
    from buzzdask.plots import _file_parts

    long = "site/" + "x" * 240 + ".wav"
    parts = _file_parts(["蜜蜂/1.wav", "花园/1.wav", "site/a.wav", "site_a.wav", "b.wav", long])
    assert parts["蜜蜂/1.wav"] == "蜜蜂_1.wav" and parts["花园/1.wav"] == "花园_1.wav"
    assert parts["b.wav"] == "b.wav"
    # Two names that would write one file, and one too long for a file name: a hash each.
    assert re.fullmatch(r"site_a\.wav-[0-9a-f]{8}", parts["site/a.wav"])
    assert re.fullmatch(r"site_a\.wav-[0-9a-f]{8}", parts["site_a.wav"])
    assert parts["site/a.wav"] != parts["site_a.wav"]
    assert re.fullmatch(r"site_x+-[0-9a-f]{8}", parts[long]) and len(parts[long]) == 160
    assert len(set(parts.values())) == len(parts)
