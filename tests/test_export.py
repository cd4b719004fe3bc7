"""Exports of real runs: buzzdetect CSVs read back as buzzr reads them, combined CSV, Raven tables.

One analysis of a nested site/recorder tree (buzzr- and AudioMoth-named recordings, one without a
time) is shared by the module's read-only tests; the tests that need their own model or input
run their own.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import buzzdask
from buzzdask import InputError, ModelError, OutputConflictError, ParameterError
from buzzdask.cli import EXIT_ERROR, EXIT_OK, main
from buzzdask.events import recording_events, run_events
from buzzdask.exports import RAVEN_COLUMNS
from buzzdask.summaries import summarize
from tests.conftest import (
    CLASSES,
    field_like,
    held_by_another_thread,
    requires_ffmpeg,
    requires_shared,
    write_wav,
)

pytestmark = requires_ffmpeg
FRAME = 15360  # samples in one 0.96 s frame at 16 kHz
GENERAL_V3_METRICS = Path("data/models/model_general_v3/tests/metrics.csv")

# relative name -> (samples, seed); the names carry buzzr's and AudioMoth's start times.
TREE = {
    "soybean/9/230809_0000.wav": (9 * FRAME + 700, 1),
    "soybean/9/230809_0005.flac": (4 * FRAME, 2),  # extension dropped in the export's name
    "mustard/am1/20240601_053000.wav": (6 * FRAME + 10, 3),
    "mustard/am1/notes.wav": (3 * FRAME, 4),  # no time in its name
}
STARTS = {
    "soybean/9/230809_0000.wav": datetime(2023, 8, 9, 0, 0),
    "soybean/9/230809_0005.flac": datetime(2023, 8, 9, 0, 5),
    "mustard/am1/20240601_053000.wav": datetime(2024, 6, 1, 5, 30),
}


@pytest.fixture(scope="module")
def tree_run(dask_client, tiny_embedder, tiny_model, tmp_path_factory):
    """analyze() of the TREE on the session's cluster (chunks of 2 frames: several partitions)."""
    root = tmp_path_factory.mktemp("export") / "audio"
    for relative, (samples, seed) in TREE.items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        wav = target.with_suffix(".wav")
        write_wav(wav, field_like(samples, 16000, seed=seed), 16000)
        if target != wav:
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(target)], check=True)
            wav.unlink()
    result = buzzdask.analyze(
        root,
        tiny_model,
        output=root.parent / "results",
        client=dask_client,
        embedder=str(tiny_embedder),
        chunk_seconds=2.0,
        progress=False,
    )
    assert result.ok
    return result


def frames_of(result) -> pd.DataFrame:
    return result.to_pandas()


def as_buzzdetect(value: float) -> float:
    """A float32 activation as buzzdetect's CSV holds it: np.round to 2 in float32, its text."""
    return float(str(np.float32(np.round(np.float32(value), 2))))


def a_rounded_threshold(frame: pd.DataFrame, name: str = "ins_buzz") -> float:
    """A threshold equal to a rounded activation that occurs: ties decide '>' against '>='."""
    values = np.sort(frame[f"activation_{name}"].map(as_buzzdetect).unique())
    return float(values[len(values) // 2])


# -- buzzr, re-implemented from its R sources (R/files.R, R/results.R, R/time.R) -----------------


def buzzr_list_results(dir_results: Path) -> list[Path]:
    """list_results: every file whose name without extension ends in the tag."""
    return sorted(
        p for p in dir_results.rglob("*") if p.is_file() and p.stem.endswith("_buzzdetect")
    )


def buzzr_ident(path: Path, dir_results: Path) -> str:
    """get_ident: path minus extension, tag and results directory."""
    sans = path.with_suffix("").as_posix()
    sans = re.sub("_buzzdetect$", "", sans)
    return re.sub("^/", "", sans.removeprefix(dir_results.as_posix()))


def buzzr_file_start_time(path: Path, posix_format: str) -> datetime | None:
    """file_start_time: the format, as a regex of digits, searched in the base name."""
    pattern = re.sub(r"%[yHMdmS]", lambda m: r"\d{2}", posix_format).replace("%Y", r"\d{4}")
    match = re.search(pattern, path.with_suffix("").name)
    return datetime.strptime(match.group(0), posix_format) if match else None


def buzzr_bin_directory(
    dir_results: Path, thresholds: dict[str, float], posix_formats: list[str], binwidth: int
) -> pd.DataFrame:
    """bin_directory(dir_results, thresholds, posix_formats, return_ident = TRUE, binwidth)."""
    pieces = []
    for path in buzzr_list_results(dir_results):
        results = pd.read_csv(path).rename(columns={"start": "start_filetime"})  # fread
        starts = {buzzr_file_start_time(path, f) for f in posix_formats} - {None}
        if len(starts) != 1:
            continue  # NA start: R's floor_date puts these in an NA bin; not compared here
        start = starts.pop()
        results.insert(0, "ident", buzzr_ident(path, dir_results))
        results["start_datetime"] = start + pd.to_timedelta(results.pop("start_filetime"), "s")
        for name, threshold in thresholds.items():  # call_detections: `>`
            results[f"detections_{name}"] = results.pop(f"activation_{name}") > threshold
        results = results.drop(columns=[c for c in results if c.startswith("activation_")])
        results["bin_datetime"] = results.pop("start_datetime").dt.floor(f"{binwidth}min")
        results["frames"] = 1
        pieces.append(results)
    table = pd.concat(pieces, ignore_index=True)
    return table.groupby(["ident", "bin_datetime"], as_index=False).sum(numeric_only=True)


# -- tests ---------------------------------------------------------------------------------------


def test_buzzdetect_export_mirrors_the_tree_with_buzzdetect_bytes(tree_run):
    result = buzzdask.export(tree_run.output, format="buzzdetect")
    dest = tree_run.output / "export" / "buzzdetect"
    assert result.dest == dest and result.format == "buzzdetect"
    assert sorted(p.relative_to(dest).as_posix() for p in result.files) == [
        "mustard/am1/20240601_053000_buzzdetect.csv",
        "mustard/am1/notes_buzzdetect.csv",
        "soybean/9/230809_0000_buzzdetect.csv",
        "soybean/9/230809_0005_buzzdetect.csv",
    ]
    frames = frames_of(tree_run)
    one = frames[frames["file"] == "soybean/9/230809_0005.flac"].sort_values("start")
    # buzzdetect: pandas to_csv(index=False) of float64 read back from its partial file.
    expected = "start," + ",".join(f"activation_{c}" for c in CLASSES) + "\n"
    for row in one.itertuples(index=False):
        values = [repr(as_buzzdetect(getattr(row, f"activation_{c}"))) for c in CLASSES]
        expected += ",".join([repr(round(row.start, 2)), *values]) + "\n"
    written = (dest / "soybean/9/230809_0005_buzzdetect.csv").read_bytes()
    assert written == expected.encode()
    assert [line.split(",")[0] for line in written.decode().splitlines()[1:]] == [
        "0.0",
        "0.96",
        "1.92",
        "2.88",
    ]
    for path in result.files:  # two decimals at most, never 0.9600000000000001
        for line in path.read_text().splitlines()[1:]:
            assert all(re.fullmatch(r"-?\d+(\.\d{1,2})?", cell) for cell in line.split(","))


def test_buzzr_reads_the_export_as_buzzdetect_results(tree_run, tmp_path):
    dest = tmp_path / "for_buzzr"
    buzzdask.export(tree_run.output, format="buzzdetect", classes=["ins_buzz"], dest=dest)
    frames = frames_of(tree_run)
    threshold = a_rounded_threshold(frames)
    formats = ["%y%m%d_%H%M", "%Y%m%d_%H%M%S"]
    binned = buzzr_bin_directory(dest, {"ins_buzz": threshold}, formats, binwidth=5)

    # The same bins straight from the Parquet frames, as buzzr would see buzzdetect's own CSVs.
    frames = frames[frames["file"].isin(STARTS)].copy()
    frames["ident"] = frames["file"].str.replace(r"\.[^./]+$", "", regex=True)
    frames["bin_datetime"] = (
        frames["file"].map(STARTS) + pd.to_timedelta(frames["start"].round(2), "s")
    ).dt.floor("5min")
    frames["detections_ins_buzz"] = frames["activation_ins_buzz"].map(as_buzzdetect) > threshold
    frames["frames"] = 1
    expected = frames.groupby(["ident", "bin_datetime"], as_index=False)[
        ["detections_ins_buzz", "frames"]
    ].sum()
    pd.testing.assert_frame_equal(
        binned.astype({"detections_ins_buzz": "int64"}).reset_index(drop=True),
        expected.astype({"detections_ins_buzz": "int64"}).reset_index(drop=True),
    )
    assert set(binned["ident"]) == {
        "soybean/9/230809_0000",
        "soybean/9/230809_0005",
        "mustard/am1/20240601_053000",
    }
    assert binned["detections_ins_buzz"].sum() > 0  # the comparison was exercised


def test_detection_mode_writes_buzzdetect_detections(tree_run):
    frames = frames_of(tree_run)
    threshold = float(frames["activation_mech_plane"].median())
    result = buzzdask.export(
        tree_run.output,
        format="buzzdetect",
        dest=tree_run.output / "detections",
        thresholds={"mech_plane": threshold},
    )
    assert result.thresholds.values == {"mech_plane": threshold}
    path = tree_run.output / "detections/mustard/am1/20240601_053000_buzzdetect.csv"
    written = pd.read_csv(path)
    assert list(written.columns) == ["start", "detections_mech_plane"]
    one = frames[frames["file"] == "mustard/am1/20240601_053000.wav"].sort_values("start")
    assert written["detections_mech_plane"].tolist() == [
        int(float(a) > threshold) for a in one["activation_mech_plane"]
    ]
    assert set(written["detections_mech_plane"]) == {0, 1}


@pytest.mark.shared_data
@requires_shared
def test_precision_threshold_equals_buzzdetect_on_general_v3(shared_dir, monkeypatch):
    if not (shared_dir / GENERAL_V3_METRICS).is_file():
        pytest.skip(f"{shared_dir / GENERAL_V3_METRICS} not found")
    model = shared_dir / GENERAL_V3_METRICS.parents[1]
    with (shared_dir / GENERAL_V3_METRICS).open(newline="") as stream:
        rows = [(float(r["threshold"]), float(r["precision"])) for r in csv.DictReader(stream)]
    for precision in (0.85, 0.9, 0.95, 0.99):
        # buzzdetect's calculate_threshold: mean threshold where |precision - p| <= 0.01 / 2.
        near = [t for t, p in rows if abs(p - precision) <= 0.01 / 2]
        assert near, precision
        expected = sum(near) / len(near)
        got = buzzdask.thresholds_for_precision(model, precision)
        assert got == {"ins_buzz": pytest.approx(expected, abs=1e-12)}
    assert buzzdask.thresholds_for_precision(model, 0.95)["ins_buzz"] == pytest.approx(-1.205)
    with pytest.raises(ParameterError, match=r"precision=0\.6 is not in .*metrics\.csv.*0\.59"):
        buzzdask.thresholds_for_precision(model, 0.6)
    for bad in (0, 1, 1.5, "high"):
        with pytest.raises(ParameterError, match="precision="):
            buzzdask.thresholds_for_precision(model, bad)  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match=r"ins_buzz.* only"):
        buzzdask.thresholds_for_precision(model, 0.95, classes=["mech_plane"])
    # A notebook's "~/models/..." and one class as text (read as ['i', 'n', 's', ...]).
    monkeypatch.setenv("HOME", str(model.parent))
    expected = buzzdask.thresholds_for_precision(model, 0.95)
    assert (
        buzzdask.thresholds_for_precision(f"~/{model.name}", 0.95, classes="ins_buzz") == expected
    )


def test_precision_export_uses_the_models_metrics(run, make_audio, tiny_model, tmp_path, caplog):
    model = tmp_path / "model_with_metrics"
    shutil.copytree(tiny_model, model)
    result = run(make_audio("site/230809_0600.wav", n_samples=8 * FRAME), model=model)
    frames = result.to_pandas()
    low, high = np.quantile(frames["activation_ins_buzz"], [0.3, 0.7])
    (model / "tests").mkdir()
    (model / "tests/metrics.csv").write_text(
        '"threshold","precision","sensitivity","fpr"\n'
        f"{high + 1},1,0.01,0\n{high},0.953,0.2,0.01\n{low},0.948,0.3,0.02\n{low - 1},0.5,0.9,0.5\n"
    )
    exported = buzzdask.export(result.output, format="buzzdetect", precision=0.95)
    threshold = (high + low) / 2
    assert exported.thresholds.values == {"ins_buzz": pytest.approx(threshold)}
    metadata = exported.thresholds.as_metadata()
    assert metadata["precision"] == 0.95 and len(metadata["rows"]) == 2
    assert metadata["comparison"] == "activation > threshold"
    written = pd.read_csv(exported.files[0])
    assert list(written.columns) == ["start", "detections_ins_buzz"]
    expected = (frames["activation_ins_buzz"].astype("float64") > threshold).astype(int)
    assert written["detections_ins_buzz"].tolist() == expected.tolist()

    # analyze() takes the same precision: its detection columns and buzzdask.json say so.
    again = run(
        result.output.parent / "audio", output=tmp_path / "again", model=model, precision=0.95
    )
    frame = again.to_pandas()
    assert frame["detections_ins_buzz"].tolist() == expected.astype(bool).tolist()
    recorded = again.metadata["thresholds"]
    assert recorded["values"] == {"ins_buzz": pytest.approx(threshold)}
    assert recorded["precision"] == 0.95 and recorded["comparison"] == "activation > threshold"
    assert again.metadata["options"]["precision"] == 0.95
    with pytest.raises(ModelError, match="no test metrics"):
        run(result.output.parent / "audio", output=tmp_path / "none", precision=0.95)
    assert not (tmp_path / "none").exists()

    with pytest.raises(ParameterError, match=r"precision=0\.7 is not in .*metrics\.csv"):
        buzzdask.export(result.output, format="buzzdetect", precision=0.7, overwrite=True)
    with pytest.raises(ParameterError, match="either precision or thresholds"):
        buzzdask.export(result.output, format="csv", precision=0.95, thresholds={"ins_buzz": 0.0})

    # Results copied to a laptop: the run's model path is not there; --model names the copy.
    moved = model.rename(tmp_path / "model_copied")
    with pytest.raises(ModelError, match=r"directory .*model_with_metrics not found.*--model"):
        summarize(result.output, precision=0.95, write=False)
    summary = summarize(result.output, precision=0.95, model=moved, write=False)
    assert summary.attrs["thresholds"] == {"ins_buzz": pytest.approx(threshold)}
    with pytest.raises(ParameterError, match=r"model_copied serves the test metrics of a prec"):
        summarize(result.output, model=moved, write=False)  # it served nothing, silently
    # Another model's metrics: said, since they describe another head.
    other = tmp_path / "other_model"
    shutil.copytree(moved, other)
    (other / "variables" / "variables.index").write_bytes(b"another head")
    with caplog.at_level("WARNING", logger="buzzdask"):
        summarize(result.output, precision=0.95, model=other, write=False)
    assert f"{other} is not the model {result.output} was analysed with" in caplog.text
    argv = ["--precision", "0.95", "--model", str(moved)]
    assert main(["export", str(result.output), "--format", "raven", *argv]) == EXIT_OK
    assert main(["plot", str(result.output), "--dest", str(tmp_path / "plots"), *argv]) == EXIT_OK


def test_errors_before_anything_is_written(tree_run, tmp_path):
    with pytest.raises(
        ModelError, match=r"no test metrics \(.*tests/metrics\.csv not found\)"
    ) as no:
        buzzdask.export(tree_run.output, format="buzzdetect", precision=0.95, dest=tmp_path / "x")
    # No value of another head's (model_general_v3's -1.2) offered for this one.
    assert "(thresholds={'ins_buzz': VALUE} or --threshold ins_buzz=VALUE;" in str(no.value)
    with pytest.raises(ParameterError, match=r"unknown \['ins_bzz'\]"):
        buzzdask.export(tree_run.output, format="csv", classes=["ins_bzz"], dest=tmp_path / "x")
    with pytest.raises(ParameterError, match="Raven export lists detection events"):
        buzzdask.export(tree_run.output, format="raven", dest=tmp_path / "x")
    with pytest.raises(ParameterError, match="format='tsv'"):
        buzzdask.export(tree_run.output, format="tsv", dest=tmp_path / "x")  # type: ignore[arg-type]
    # Options the format does not use, and a threshold for a class left out, are not ignored.
    with pytest.raises(ParameterError, match=r"tz applies to format='csv' only, not 'buzzdetect'"):
        buzzdask.export(
            tree_run.output, format="buzzdetect", tz="Mars/Olympus", dest=tmp_path / "x"
        )
    with pytest.raises(
        ParameterError,
        match=r"time_format, read_metadata applies to format='csv' only, not 'raven' "
        r"\(CLI: --time-format, --no-metadata\)",
    ):
        buzzdask.export(
            tree_run.output,
            format="raven",
            thresholds={"ins_buzz": 0.0},
            time_format="%y",
            read_metadata=False,
            dest=tmp_path / "x",
        )
    with pytest.raises(ParameterError, match=r"gap_frames applies to .*'raven' only.*--gap-frames"):
        buzzdask.export(tree_run.output, format="csv", gap_frames=2, dest=tmp_path / "x")
    with pytest.raises(ParameterError, match=r"thresholds for \['mech_plane'\], not among the"):
        buzzdask.export(
            tree_run.output,
            format="csv",
            classes="ins_buzz",
            thresholds={"mech_plane": -2.0},
            dest=tmp_path / "x",
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="not a buzzdask output"):
        buzzdask.export(tmp_path, format="csv")
    # Every file failed (or none is written yet): as Run.frames, summarize and plot say it.
    unscored = tmp_path / "unscored"
    shutil.copytree(tree_run.output, unscored, ignore=shutil.ignore_patterns("*.parquet"))
    with pytest.raises(InputError, match="holds no scored frames: nothing to export"):
        buzzdask.export(unscored, format="csv", dest=tmp_path / "x")  # finished: no "yet"
    metadata = json.loads((unscored / "buzzdask.json").read_text())
    (unscored / "buzzdask.json").write_text(json.dumps({**metadata, "status": "running"}))
    with pytest.raises(InputError, match="holds no scored frames yet: nothing to export"):
        buzzdask.export(unscored, format="csv", dest=tmp_path / "x")
    with pytest.raises(InputError, match="does not exist"):
        buzzdask.open_run(tmp_path / "missing")
    # Metadata that is no text (a traceback's UnicodeDecodeError), and a run stopped before
    # its first chunk (only its log): said so, not "pass the directory given to analyze".
    (unscored / "buzzdask.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(InputError, match=r"buzzdask\.json: invalid JSON"):
        buzzdask.open_run(unscored)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "buzzdask.log").write_text("buzzdask: stopped by SIGTERM\n")
    with pytest.raises(InputError, match="its run is starting, or stopped before it wrote any"):
        buzzdask.open_run(stopped)


def test_recording_names_too_long_for_an_export_file_are_refused_first():
    from buzzdask.exports import _check_unique, buzzdetect_name

    fits = "site/" + "蜂" * 80 + ".wav"  # "蜂" * 80 + "_buzzdetect.csv": 255 bytes
    scores = Path("out/scores")
    _check_unique([fits], buzzdetect_name, Path("."), scores=scores)
    with pytest.raises(ParameterError, match=r"would export to a file name of 258 bytes, more"):
        _check_unique(
            [fits, "site/" + "蜂" * 81 + ".wav"], buzzdetect_name, Path("."), scores=scores
        )


def test_recordings_that_would_share_an_export_file(caplog, tmp_path, monkeypatch):
    from buzzdask import exports
    from buzzdask.exports import _check_unique, buzzdetect_name

    scores = tmp_path / "out" / "scores"

    def check_unique(names: list[str]) -> None:
        _check_unique(names, buzzdetect_name, tmp_path, scores=scores)

    check_unique(["site/rec.mp3", "site/rec2.mp3"])
    # buzzdetect drops the extension: one file here too, refused before anything is written.
    # (How to rename one is tried end to end below.)
    advice = rf"rename 'site/rec.wav', delete its results under its old name \({scores}/site/"
    with pytest.raises(ParameterError, match=rf"would both export to .*: {advice}rec.wav\) and"):
        check_unique(["site/rec.mp3", "site/rec.wav"])
    # Two files here (this file system tells case), one on macOS, Windows or OneDrive: said.
    # "réc" composed and decomposed (NFD, as macOS spells names) too; "ß" is not "ss" there.
    names = ["site/rec.mp3", "site/Rec.mp3", "r\u00e9c.mp3", "re\u0301c.mp3", "ß.mp3", "ss.mp3"]
    assert not exports._case_blind(tmp_path / "not" / "yet")  # probed where it exists
    assert not list(tmp_path.iterdir())  # the probe is gone
    with caplog.at_level(logging.WARNING, logger="buzzdask.exports"):
        check_unique(names)
    assert "2 pair(s) of recordings export to files whose names differ only in letter case" in (
        caplog.text
    )
    assert "site/rec.mp3 and site/Rec.mp3; r\u00e9c.mp3 and re\u0301c.mp3." in caplog.text
    # Exported onto a case-blind disk (a Mac's, an exFAT card: none can be made here), one
    # would replace the other: refused.
    monkeypatch.setattr(exports, "_case_blind", lambda folder: True)
    with pytest.raises(ParameterError, match=r"differ only in letter case, which .* does not"):
        check_unique(names)


@requires_ffmpeg
def test_a_recording_renamed_as_an_export_clash_says_is_exported(run, make_audio, tmp_path):
    """a.wav and a.mp3 both export to a_buzzdetect.csv: the advice given, followed, works."""
    make_audio("a.wav", directory=tmp_path / "audio" / "pair", n_samples=3 * FRAME)
    make_audio("a.mp3", directory=tmp_path / "audio" / "pair", n_samples=3 * FRAME, seed=1)
    out = tmp_path / "out"
    run(tmp_path / "audio", output=out)
    with pytest.raises(
        ParameterError, match=r"would both export to pair/a_buzzdetect\.csv"
    ) as told:
        buzzdask.export(out, format="buzzdetect", dest=tmp_path / "csv")
    stale = out / "scores" / "pair" / "a.wav"
    assert f"rename 'pair/a.wav', delete its results under its old name ({stale})" in str(
        told.value
    )
    (tmp_path / "audio" / "pair" / "a.wav").rename(tmp_path / "audio" / "pair" / "a_wav.wav")
    shutil.rmtree(stale)
    resumed = run(tmp_path / "audio", output=out, on_conflict="resume")
    assert resumed.ok and resumed.summary["chunks_written"] == 1  # a_wav.wav alone
    exported = buzzdask.export(out, format="buzzdetect", dest=tmp_path / "csv")
    names = sorted(path.relative_to(tmp_path / "csv").as_posix() for path in exported.files)
    assert names == ["pair/a_buzzdetect.csv", "pair/a_wav_buzzdetect.csv"]


def test_a_recording_cut_short_is_exported_and_said_to_be(run, make_audio, tmp_path, caplog):
    """A recorder that died mid-file: its frames are exported as buzzdetect would, and said."""
    cut = make_audio("cut.wav", directory=tmp_path / "audio", n_samples=5 * FRAME)
    make_audio("whole.wav", directory=tmp_path / "audio", n_samples=3 * FRAME, seed=1)
    cut.write_bytes(cut.read_bytes()[: -2 * 2 * FRAME])  # its last two frames lost
    out = tmp_path / "out"
    result = run(tmp_path / "audio", output=out)
    assert buzzdask.open_run(out).damaged_recordings() == ["cut.wav"]
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        exported = buzzdask.export(out, format="buzzdetect", dest=tmp_path / "csv")
    assert len(exported.files) == 2
    assert (
        f"1 recording(s) were damaged or cut short ({result.output / 'errors.parquet'} says "
        "how): their exports hold the frames that could be read: cut.wav"
    ) in caplog.text
    assert len(pd.read_csv(tmp_path / "csv" / "cut_buzzdetect.csv")) == 3


def test_an_existing_export_is_never_overwritten_silently(tree_run, tmp_path):
    dest = tmp_path / "again"
    first = buzzdask.export(tree_run.output, format="buzzdetect", dest=dest)
    target = first.files[0]
    target.write_text("edited by hand\n")
    with pytest.raises(OutputConflictError, match=rf"{re.escape(str(target))} already exists"):
        buzzdask.export(tree_run.output, format="buzzdetect", dest=dest)
    assert target.read_text() == "edited by hand\n"
    buzzdask.export(tree_run.output, format="buzzdetect", dest=dest, overwrite=True)
    assert target.read_text().startswith("start,activation_ins_buzz,")
    assert not list(dest.rglob(".*.tmp"))


def test_an_export_replaced_leaves_no_recording_the_results_lost(run, make_audio, tmp_path, caplog):
    """A resume drops the results of an input since deleted (whose results were deleted as a
    resume says to); the export replaced after it drops its file, which buzzr would still read.
    Another run's files in the same folder stay."""
    for name in ("a.wav", "b.wav"):
        make_audio(name, n_samples=2 * 15360)
    make_audio("c.wav", n_samples=2 * 15360, directory=tmp_path / "site2")
    dest = tmp_path / "for_buzzr"
    result = run(tmp_path / "audio")
    buzzdask.export(result.output, format="buzzdetect", dest=dest)
    other = run(tmp_path / "site2", output=tmp_path / "site2_results")
    buzzdask.export(other.output, format="buzzdetect", dest=dest)

    (tmp_path / "audio" / "b.wav").unlink()
    shutil.rmtree(result.output / "scores" / "b.wav")
    resumed = run(tmp_path / "audio", on_conflict="resume")
    assert buzzdask.open_run(resumed.output).recordings() == ["a.wav"]
    with caplog.at_level("WARNING", logger="buzzdask"):
        buzzdask.export(result.output, format="buzzdetect", dest=dest, overwrite=True)
    exported = sorted(p.name for p in dest.glob("*.csv"))
    assert exported == ["a_buzzdetect.csv", "c_buzzdetect.csv"]
    assert (
        f"removed 1 file of the earlier export, of recordings {result.output} no longer holds "
        "under those names: b_buzzdetect.csv"
    ) in caplog.messages


def test_week_two_export_says_what_it_would_add(run, make_audio, tmp_path):
    """A season's second export: refused (its files are there), saying new recordings wait."""
    make_audio("a.wav", n_samples=2 * 15360)
    result = run(tmp_path / "audio")
    buzzdask.export(result.output, format="buzzdetect")
    make_audio("b.wav", n_samples=2 * 15360, seed=1)
    run(tmp_path / "audio", on_conflict="resume")
    with pytest.raises(OutputConflictError, match=r"already exists; 1 of the 2 files would be new"):
        buzzdask.export(result.output, format="buzzdetect")


def test_a_moved_output_still_replaces_its_own_export(run, make_audio, tmp_path):
    """The export's list names the run relative to it: after the output (its export inside)
    is moved, as from the cluster to a laptop, the replaced export still drops the files of
    recordings no longer in the results. Without --overwrite, their being there is a conflict."""
    for name in ("a.wav", "b.wav"):
        make_audio(name, n_samples=2 * 15360)
    result = run(tmp_path / "audio")
    buzzdask.export(result.output, format="buzzdetect")
    (tmp_path / "audio" / "b.wav").unlink()
    shutil.rmtree(result.output / "scores" / "b.wav")  # as a resume says, to drop them
    run(tmp_path / "audio", on_conflict="resume")
    moved = tmp_path / "copied_off_the_cluster"
    shutil.move(result.output, moved)
    dest = moved / "export" / "buzzdetect"
    (dest / "a_buzzdetect.csv").unlink()  # the conflict left: b's file, not a target now
    with pytest.raises(OutputConflictError, match=r"b_buzzdetect\.csv already exists"):
        buzzdask.export(moved, format="buzzdetect")
    buzzdask.export(moved, format="buzzdetect", overwrite=True)
    assert sorted(p.name for p in dest.glob("*.csv")) == ["a_buzzdetect.csv"]


def test_another_runs_export_is_never_replaced(run, make_audio, tmp_path, caplog):
    """Runs of two site folders both hold 20240612_053000.wav (names start at the folder a run
    analysed): the second export into the first's folder is refused, --overwrite or not, since
    buzzr would read one site's frames as the other's. Once the first run's output is gone, its
    claim goes with it. An input that failed without frames is said, as it has no file."""
    for seed, site in enumerate(("siteA", "siteB")):
        make_audio("20240612_053000.wav", n_samples=2 * 15360, seed=seed, directory=tmp_path / site)
    (tmp_path / "siteB" / "20240612_060000.wav").write_text("not audio\n")
    first = run(tmp_path / "siteA", output=tmp_path / "outA")
    second = run(tmp_path / "siteB", output=tmp_path / "outB")
    dest = tmp_path / "for_buzzr"
    dest.mkdir()
    # The same folder by a link at another depth (macOS's /tmp, a home linked to /fs/ess).
    linked = tmp_path / "home" / "me" / "for_buzzr"
    linked.parent.mkdir(parents=True)
    linked.symlink_to(dest, target_is_directory=True)
    buzzdask.export(first.output, format="buzzdetect", dest=linked)
    mine = (dest / "20240612_053000_buzzdetect.csv").read_bytes()
    for overwrite, into in ((False, dest), (True, dest), (True, linked)):
        with pytest.raises(OutputConflictError, match=r"holds the export of another run, .*outA"):
            buzzdask.export(second.output, format="buzzdetect", dest=into, overwrite=overwrite)
    assert (dest / "20240612_053000_buzzdetect.csv").read_bytes() == mine
    # One frames.csv for both (two heads compared in one folder): --overwrite replaced it.
    buzzdask.export(first.output, format="csv", dest=dest)
    buzzdask.export(first.output, format="csv", dest=dest, overwrite=True)  # its CSVs stay
    assert (dest / "20240612_053000_buzzdetect.csv").read_bytes() == mine
    combined = (dest / "frames.csv").read_bytes()
    with pytest.raises(OutputConflictError, match=r"holds the export of another run, .*outA"):
        buzzdask.export(second.output, format="csv", dest=dest, overwrite=True)
    assert (dest / "frames.csv").read_bytes() == combined
    (dest / "frames.csv").unlink()

    shutil.rmtree(first.output)
    with caplog.at_level("WARNING", logger="buzzdask"):
        buzzdask.export(second.output, format="buzzdetect", dest=dest, overwrite=True)
    assert (dest / "20240612_053000_buzzdetect.csv").read_bytes() != mine
    assert "1 input file(s) failed before any frame was written" in caplog.text
    assert "20240612_060000.wav" in caplog.text


def test_a_stopped_export_is_said_to_be_unfinished(
    tree_run, run, make_audio, tmp_path, monkeypatch
):
    # Each file is written whole, but a stop (Ctrl-C, a kill) leaves some of them: a set that
    # looks finished. The next export says it is not, also after another run's export into the
    # same folder finished (which cleared the folder's one mark).
    from buzzdask import exports

    dest = tmp_path / "cut"
    table = exports.buzzdetect_table
    calls = []

    def stopped_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return table(*args, **kwargs)

    monkeypatch.setattr(exports, "buzzdetect_table", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        buzzdask.export(tree_run.output, format="buzzdetect", dest=dest)
    monkeypatch.setattr(exports, "buzzdetect_table", table)
    make_audio("other_site.wav", n_samples=2 * 15360, directory=tmp_path / "other")
    other = run(tmp_path / "other", output=tmp_path / "out_other")
    buzzdask.export(other.output, format="buzzdetect", dest=dest)
    with pytest.raises(OutputConflictError, match=rf"into {re.escape(str(dest))} stopped before"):
        buzzdask.export(tree_run.output, format="buzzdetect", dest=dest)
    done = buzzdask.export(tree_run.output, format="buzzdetect", dest=dest, overwrite=True)
    written = [p for p in dest.rglob("*") if p.is_file() and p.name != exports.WRITTEN]
    assert sorted(written) == sorted([*done.files, dest / "other_site_buzzdetect.csv"])
    with pytest.raises(OutputConflictError) as finished:
        buzzdask.export(tree_run.output, format="buzzdetect", dest=dest)
    assert "stopped before" not in str(finished.value)


def test_an_output_renamed_exports_again_under_its_new_name(run, make_audio, tmp_path):
    """The folder's list named the export by the old name and its unfinished mark stayed: the
    next export said it had stopped, and a new run at the old name took its files as its own."""
    from buzzdask import exports

    make_audio("20240612_093000.wav", n_samples=2 * 15360)
    first = run(tmp_path / "audio", output=tmp_path / "week1")
    dest = tmp_path / "for_buzzr"
    buzzdask.export(first.output, format="buzzdetect", dest=dest)
    renamed = first.output.rename(tmp_path / "week1_sunflower")
    buzzdask.export(renamed, format="buzzdetect", dest=dest, overwrite=True)
    assert json.loads((dest / exports.WRITTEN).read_text()) == {
        "../week1_sunflower": ["20240612_093000_buzzdetect.csv"]
    }
    assert not (dest / exports.UNFINISHED).exists()
    with pytest.raises(OutputConflictError) as refused:
        buzzdask.export(renamed, format="buzzdetect", dest=dest)
    assert "stopped before" not in str(refused.value)


def test_an_interrupted_export_says_what_next(tree_run, tmp_path, monkeypatch, capsys):
    from buzzdask import exports
    from buzzdask.cli import EXIT_INTERRUPTED

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exports, "buzzdetect_table", stopped)
    dest = str(tmp_path / "cut")
    argv = ["export", str(tree_run.output), "--format", "buzzdetect", "--dest", dest]
    assert main(argv) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.endswith(
        "buzzdask: interrupted; each file written is whole, and the folder is marked "
        "unfinished: the same command with --overwrite exports it all again\n"
    )


def test_the_command_line_says_its_flags_alone(tree_run, tmp_path, capsys):
    """'pass overwrite=True (--overwrite) ... another dest (--dest)' in a terminal."""
    argv = ["export", str(tree_run.output), "--format", "csv", "--dest", str(tmp_path)]
    assert main(argv) == EXIT_OK
    assert main(argv) == EXIT_ERROR
    error = capsys.readouterr().err
    assert error.endswith("; pass --overwrite to replace the export, or choose another --dest\n")
    with pytest.raises(OutputConflictError, match=r"pass overwrite=True \(--overwrite\) to"):
        buzzdask.export(tree_run.output, format="csv", dest=tmp_path)


def test_a_folder_another_command_writes_in_is_refused(tree_run, tmp_path):
    """Two exports (summaries, plots) into one folder at once both found it free, then wrote
    over each other's files: one said it wrote files holding the other's columns."""
    from buzzdask.lock import destination_held
    from buzzdask.plots import plot_run

    dest = tmp_path / "shared"
    with held_by_another_thread(destination_held(dest)):
        thresholds = {"ins_buzz": 0.5}
        for write in (
            lambda: buzzdask.export(tree_run.output, format="csv", dest=dest),
            lambda: summarize(tree_run.output, bin="1h", thresholds=thresholds, dest=dest),
            lambda: plot_run(tree_run.output, bin="1h", thresholds=thresholds, dest=dest),
        ):
            with pytest.raises(OutputConflictError) as refused:
                write()
            assert str(refused.value).startswith(
                f"{dest} is being written by another buzzdask command (host "
            )
            assert str(refused.value).endswith(
                "): wait for it to end, or choose another dest (--dest)"
            )
        assert sorted(p.name for p in dest.iterdir()) == [".buzzdask.lock"]
    assert list(dest.iterdir()) == []


def test_what_a_killed_writer_left_is_cleared_and_a_stopped_plot_leaves_no_file(
    tree_run, tmp_path, monkeypatch
):
    """A PNG cut short by Ctrl-C kept its final name (the next plot took it as done); a kill
    left a hidden temporary beside frames.csv that no later export removed."""
    from matplotlib.figure import Figure

    from buzzdask.plots import plot_run

    dest = tmp_path / "pictures"
    dest.mkdir()
    left = dest / f".frames.csv.{'0' * 32}.tmp"
    left.write_text("file,start\n")
    buzzdask.export(tree_run.output, format="csv", dest=dest)
    assert not left.exists() and (dest / "frames.csv").is_file()

    def stopped_midway(figure, target, **kwargs):
        Path(target).write_bytes(b"\x89PNG\r\n\x1a\n")  # the first bytes of a PNG, then a stop
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        plot_run(tree_run.output, bin="1h", thresholds={"ins_buzz": 0.5}, dest=dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted([".buzzdask-export.json", "frames.csv"])


def test_combined_csv_has_times_where_known(tree_run, tmp_path):
    frames = frames_of(tree_run)
    threshold = a_rounded_threshold(frames)
    result = buzzdask.export(
        tree_run.output, format="csv", dest=tmp_path, thresholds={"ins_buzz": threshold}
    )
    assert result.files == [tmp_path / "frames.csv"]
    assert result.untimed == ["mustard/am1/notes.wav"]
    table = pd.read_csv(tmp_path / "frames.csv", keep_default_na=False)
    assert list(table.columns) == [
        "file",
        "start",
        "end",
        "time",
        *(f"activation_{c}" for c in CLASSES),
        "detections_ins_buzz",
    ]
    assert len(table) == len(frames)
    expected = frames.sort_values(["file", "start"], ignore_index=True)
    table = table.sort_values(["file", "start"], ignore_index=True)
    assert (table["file"] == expected["file"]).all()
    assert table["activation_ins_buzz"].tolist() == [
        as_buzzdetect(a) for a in expected["activation_ins_buzz"]
    ]
    assert table["detections_ins_buzz"].tolist() == [
        int(float(a) > threshold) for a in expected["activation_ins_buzz"]
    ]
    for name, start in STARTS.items():
        rows = table[table["file"] == name]
        times = pd.to_datetime(rows["time"])
        assert (times == start + pd.to_timedelta(rows["start"], "s")).all()
    assert (table.loc[table["file"] == "mustard/am1/notes.wav", "time"] == "").all()
    # With no start known at all, the column is still there, blank.
    untimed = buzzdask.export(
        tree_run.output, format="csv", dest=tmp_path / "untimed", time_format="%Y-%j-X"
    )
    assert len(untimed.untimed) == len(STARTS) + 1
    table = pd.read_csv(untimed.files[0], keep_default_na=False)
    assert list(table.columns)[:4] == ["file", "start", "end", "time"]
    assert (table["time"] == "").all()


def plain_events(frame: pd.DataFrame, threshold: float, *, gap: int, least: int) -> list[tuple]:
    """The event rule, one frame at a time."""
    events, current = [], None
    rows = frame.sort_values("start").reset_index(drop=True)
    for position, row in rows.iterrows():
        index = round(row["start"] / 0.96)
        if float(row["activation"]) <= threshold:
            continue
        if current is not None and index - current["last"] - 1 <= gap:
            current.update(last=index, last_row=position, hits=current["hits"] + 1)
        else:
            if current is not None:
                events.append(current)
            current = {"first": index, "last": index, "row": position, "last_row": position}
            current["hits"] = 1
    if current is not None:
        events.append(current)
    out = []
    for event in events:
        span = event["last"] - event["first"] + 1
        if span < least:
            continue
        inside = rows.loc[event["row"] : event["last_row"], "activation"].astype(float)
        out.append(
            (
                rows.loc[event["row"], "start"],
                rows.loc[event["last_row"], "start"] + 0.96,
                span,
                event["hits"],
                inside.max(),
                inside.mean(),
            )
        )
    return out


@pytest.mark.parametrize(("gap", "least"), [(0, 1), (1, 2), (3, 1)])
def test_events_equal_a_plain_computation(tree_run, gap, least):
    run = buzzdask.open_run(tree_run.output)
    frames = frames_of(tree_run)
    threshold = float(np.quantile(frames["activation_ins_buzz"], 0.5))
    starts = {name: pd.Timestamp(start) for name, start in STARTS.items()}
    events = run_events(
        run, {"ins_buzz": threshold}, gap_frames=gap, min_frames=least, starts=starts
    )
    for name in run.recordings():
        one = frames[frames["file"] == name].rename(columns={"activation_ins_buzz": "activation"})
        expected = plain_events(one, threshold, gap=gap, least=least)
        got = events[events["file"] == name]
        assert len(got) == len(expected), name
        for row, (start, end, span, hits, peak, mean) in zip(
            got.itertuples(index=False), expected, strict=True
        ):
            assert (row.start, row.end, row.frames, row.detections) == pytest.approx(
                (start, end, span, hits)
            )
            assert row.peak_activation == pytest.approx(peak)
            assert row.mean_activation == pytest.approx(mean)
            if name in starts:
                assert row.time == starts[name] + pd.Timedelta(seconds=start)
            else:
                assert pd.isna(row.time)
    assert len(events) > 0
    # recording_starts' column, a Series, serves as well as a mapping.
    as_series = run_events(
        run, {"ins_buzz": threshold}, gap_frames=gap, min_frames=least, starts=pd.Series(starts)
    )
    pd.testing.assert_frame_equal(as_series, events)
    # Starts in a time zone: the untimed recording's NaT share it (one datetime column).
    zoned = {name: start.tz_localize("America/New_York") for name, start in starts.items()}
    events = run_events(run, {"ins_buzz": threshold}, gap_frames=gap, starts=zoned)
    assert events["time"].dtype == pd.DatetimeTZDtype("ns", "America/New_York")
    assert events["time"].isna().any() and events["time"].dt.hour.notna().any()


def test_events_on_a_recording_with_a_missing_chunk():
    frames = pd.DataFrame(
        {
            "file": "a.wav",
            # frames 0-2 and 6-7: 3-5 missing (a failed chunk) count as below the threshold
            "start": np.array([0, 1, 2, 6, 7]) * 0.96,
            "activation_x": np.array([0.5, -1, 0.9, 0.7, 0.8], dtype=np.float32),
        }
    )
    spec = {"frame_hop_s": 0.96, "frame_length_s": 0.96}
    merged = recording_events(frames, {"x": 0.0}, gap_frames=1, **spec)
    assert merged[["start", "frames", "detections"]].values.tolist() == [
        [0.0, 3, 2],
        [pytest.approx(5.76), 2, 2],
    ]
    bridged = recording_events(frames, {"x": 0.0}, gap_frames=3, min_frames=6, **spec)
    assert bridged["frames"].tolist() == [8] and bridged["detections"].tolist() == [4]
    assert bridged["mean_activation"].tolist() == [pytest.approx((0.5 - 1 + 0.9 + 0.7 + 0.8) / 5)]
    assert recording_events(frames, {"x": 0.9}, **spec).empty  # '>' : 0.9 itself is no detection
    with pytest.raises(ParameterError, match="gap_frames=-1"):
        recording_events(frames, {"x": 0.0}, gap_frames=-1, **spec)


def test_raven_tables_list_the_events(tree_run, tmp_path):
    frames = frames_of(tree_run)
    threshold = float(np.quantile(frames["activation_ins_buzz"], 0.6))
    result = buzzdask.export(
        tree_run.output,
        format="raven",
        dest=tmp_path,
        thresholds={"ins_buzz": threshold},
        gap_frames=1,
    )
    assert sorted(p.relative_to(tmp_path).as_posix() for p in result.files) == [
        "mustard/am1/20240601_053000.Table.1.selections.txt",
        "mustard/am1/notes.Table.1.selections.txt",
        "soybean/9/230809_0000.Table.1.selections.txt",
        "soybean/9/230809_0005.Table.1.selections.txt",
    ]
    events = run_events(buzzdask.open_run(tree_run.output), {"ins_buzz": threshold}, gap_frames=1)
    total = 0
    for path in result.files:
        rows = list(csv.reader(io.StringIO(path.read_text()), delimiter="\t"))
        assert rows[0] == RAVEN_COLUMNS
        relative = path.relative_to(tmp_path).as_posix().replace(".Table.1.selections.txt", "")
        name = next(f for f in TREE if f.rsplit(".", 1)[0] == relative)
        expected = events[events["file"] == name]
        assert len(rows) - 1 == len(expected)
        for number, (row, event) in enumerate(
            zip(rows[1:], expected.itertuples(index=False), strict=True), start=1
        ):
            assert row[:3] == [str(number), "Spectrogram 1", "1"]
            assert float(row[3]) == pytest.approx(event.start)
            assert float(row[4]) == pytest.approx(event.end)
            assert (float(row[5]), float(row[6]), row[7]) == (0.0, 8000.0, "ins_buzz")
            assert float(row[8]) == pytest.approx(as_buzzdetect(event.peak_activation))
            assert int(row[10]) == event.frames
        total += len(rows) - 1
    assert total > 0


def test_cli_export(tree_run, tmp_path, capsys):
    dest = tmp_path / "cli"
    code = main(
        [
            *("export", str(tree_run.output), "--format", "buzzdetect", "--dest", str(dest)),
            *("--classes", "mech_plane,ins_buzz"),
        ]
    )
    assert code == EXIT_OK
    assert "exported 4 file(s)" in capsys.readouterr().out
    header = (dest / "soybean/9/230809_0000_buzzdetect.csv").read_text().splitlines()[0]
    assert header == "start,activation_ins_buzz,activation_mech_plane"  # the model's order
    assert main(
        ["export", str(tree_run.output), "--format", "buzzdetect", "--dest", str(dest)]
    ) == (EXIT_ERROR)
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tree_run.output), "--format", "raven", "--precision", "0.9"]) == (
        EXIT_ERROR
    )
    assert "no test metrics" in capsys.readouterr().err
    # --time-format is repeatable, as in summarize and plot.
    code = main(
        [
            *("export", str(tree_run.output), "--format", "csv", "--dest", str(tmp_path / "csv")),
            *("--time-format", "%y%m%d_%H%M", "--time-format", "%Y%m%d_%H%M%S"),
        ]
    )
    assert code == EXIT_OK
    assert "no start time for 1 recording(s), time left blank: mustard/am1/notes.wav" in (
        capsys.readouterr().err
    )
    # Bad values are named by their flags, as the command line spells them.
    for flag, value in (("--time-format", "230809"), ("--tz", "Mars/Olympus")):
        command = ["export", str(tree_run.output), "--format", "csv", flag, value]
        assert main([*command, "--dest", str(tmp_path / "bad")]) == EXIT_ERROR
        assert capsys.readouterr().err.startswith(f"buzzdask: error: {flag} '{value}' ")
    with pytest.raises(SystemExit):
        main(
            [
                *("export", str(tree_run.output), "--format", "csv", "--precision", "0.9"),
                *("--threshold", "ins_buzz=0"),
            ]
        )


def test_cli_classes_of_a_run_with_thresholds(run, make_audio, tmp_path, capsys):
    """--classes picks among a run's own thresholds (the CLI gave {} for none, taken as given);
    a class without a threshold in a detections export, or given twice, is refused."""
    make_audio("a.wav", n_samples=3 * 15360)
    result = run(tmp_path / "audio", thresholds={"ins_buzz": 0.0, "mech_plane": 0.0})
    output = str(result.output)
    # A notebook passes the result itself where the output goes (it is path-like).
    assert buzzdask.summarize(result, bin="1min", by="all", write=False)["frames"].sum() == 3
    # A cell's value: what was done, in a line, not the whole table and summary.
    assert repr(result) == (
        f"AnalysisResult(output={str(result.output)!r}: 1/1 files, 3 frames, 0 error rows; "
        ".summary, .errors, .to_pandas())"
    )
    for format in ("csv", "raven"):
        dest = tmp_path / format
        argv = ["export", output, "--format", format, "--classes", "ins_buzz"]
        assert main([*argv, "--dest", str(dest)]) == EXIT_OK, capsys.readouterr().err
    assert "detections_ins_buzz" in pd.read_csv(tmp_path / "csv" / "frames.csv").columns
    exported = buzzdask.export(result, format="buzzdetect", dest=tmp_path / "bd")
    assert repr(exported) == (
        f"ExportResult(buzzdetect: 1 file in {str(tmp_path / 'bd')!r}, no thresholds)"
    )
    assert "detections_mech_plane" not in pd.read_csv(tmp_path / "csv" / "frames.csv").columns
    # Repeated, as --threshold is: both (the second alone was kept).
    argv = ["export", output, "--format", "buzzdetect", "--classes", "ins_buzz"]
    assert main([*argv, "--classes", "mech_plane", "--dest", str(tmp_path / "two")]) == EXIT_OK
    (written,) = (tmp_path / "two").rglob("*_buzzdetect.csv")
    assert pd.read_csv(written).columns.tolist() == [
        "start",
        "activation_ins_buzz",
        "activation_mech_plane",
    ]
    # MODEL/CLASS, as analyze takes it with several heads, for this run's own model: its class.
    for threshold in ("model_tiny/ins_buzz=0", "ins_buzz=0"):
        argv = ["export", output, "--format", "csv", "--threshold", threshold, "--overwrite"]
        assert main([*argv, "--dest", str(tmp_path / "named")]) == EXIT_OK
        assert "detections_ins_buzz" in pd.read_csv(tmp_path / "named" / "frames.csv").columns
    named = buzzdask.summarize(
        output, bin="1min", by="all", write=False, thresholds={"model_tiny/ins_buzz": 0.0}
    )
    assert named.attrs["thresholds"] == {"ins_buzz": 0.0}
    assert named.attrs["model"] == "model_tiny"  # which head: the files do not say otherwise
    with pytest.raises(ParameterError, match=r"unknown class\(es\) \['other/ins_buzz'\]"):
        buzzdask.summarize(output, bin="1min", write=False, thresholds={"other/ins_buzz": 0.0})
    argv = ["export", output, "--format", "buzzdetect", "--classes", "ins_buzz,mech_plane"]
    code = main([*argv, "--threshold", "ins_buzz=0", "--dest", str(tmp_path / "detections")])
    assert code == EXIT_ERROR
    refused = capsys.readouterr().err
    assert "error: no threshold for ['mech_plane'], asked in " in refused
    assert "writes detections only" in refused
    assert not (tmp_path / "detections").exists()
    with pytest.raises(SystemExit):
        main(["summarize", output, "--threshold", "ins_buzz=0", "--threshold", "ins_buzz=5"])
    assert "--threshold ins_buzz given twice (0 and 5)" in capsys.readouterr().err


@pytest.mark.shared_data
@requires_shared
def test_testbuzz_exports_like_buzzdetect(run, shared_dir, tmp_path):
    result = run(shared_dir / "data/audio_in/testbuzz.mp3")
    exported = buzzdask.export(result.output, format="buzzdetect", dest=tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in exported.files] == [
        "testbuzz_buzzdetect.csv"
    ]
    written = pd.read_csv(exported.files[0])
    frames = result.to_pandas()
    assert list(written.columns) == ["start", *(f"activation_{c}" for c in CLASSES)]
    assert written["start"].tolist() == [round(i * 0.96, 2) for i in range(len(frames))]
    for name in CLASSES:
        assert written[f"activation_{name}"].tolist() == [
            as_buzzdetect(a) for a in frames[f"activation_{name}"]
        ]


def test_combined_csv_times_are_exact_at_a_hop_finer_than_buzzdetects_decimals(
    run, make_audio, tmp_path
):
    make_audio("a.wav", n_samples=3 * 16000)
    result = run(tmp_path / "audio", frame_hop_s=0.125)
    written = buzzdask.export(result.output, format="csv", dest=tmp_path / "csv")
    table = pd.read_csv(written.files[0])
    frames = result.to_pandas()
    assert table["start"].tolist() == pytest.approx(frames["start"].tolist(), abs=1e-9)
    assert table["start"].iloc[1] == 0.125  # not 0.12
    assert (table["end"] - table["start"]).tolist() == pytest.approx([0.96] * len(table))
