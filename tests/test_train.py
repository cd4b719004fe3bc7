"""Training a head on real parts: generated labelled audio, ffmpeg, a LocalCluster, tiny YAMNet."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

import buzzdask
from buzzdask import FrameSpec, InputError, ModelError, OutputConflictError, ParameterError
from buzzdask.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from buzzdask.decode import AudioInfo
from buzzdask.models import load_head, resolve_embedder, resolve_model
from buzzdask.store import EmbeddingStore, file_sha256
from buzzdask.thresholds import thresholds_for_precision
from buzzdask.training import precision_recall
from buzzdask.training.labels import (
    TrainingFile,
    class_list,
    holdout_groups,
    read_labels,
    want_frames,
)
from tests.conftest import (
    BUZZDASK,
    communicate,
    requires_ffmpeg,
    start_as_in_a_terminal,
    wait_until,
    write_wav,
)
from tests.test_cli import buzzdask_cli

RATE = 16000
# Each labelled file: quiet, buzz-like tone, quiet, noise, ... (seconds). Tones are "ins_buzz",
# noise is "mech_noise"; quiet stretches are unlabeled (some drawn as ambient).
PATTERN = [
    ("quiet", 3.0),
    ("tone", 3.0),
    ("quiet", 3.0),
    ("noise", 3.0),
    ("quiet", 3.0),
    ("tone", 2.5),
    ("quiet", 3.0),
    ("noise", 2.0),  # ends 0.5 s before the end of the file
    ("quiet", 0.5),
]
LABEL_OF = {"tone": "ins_buzz", "noise": "mech_noise"}
# folder, file, group, tone frequency [Hz]: two directories, three groups; siteC is held out.
RECORDINGS = [
    ("2023", "siteA_1.wav", "siteA", 180.0),
    ("2023", "siteA_2.wav", "siteA", 300.0),
    ("2024", "siteB_1.wav", "siteB", 220.0),
    ("2024", "siteC_1.wav", "siteC", 260.0),
]


def recording(tone_hz: float, seed: int) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Samples at 16 kHz and the labelled (start, end, label) segments."""
    rng = np.random.default_rng(seed)
    pieces, segments, at = [], [], 0.0
    for kind, seconds in PATTERN:
        n = round(seconds * RATE)
        t = np.arange(n) / RATE
        quiet = 0.003 * rng.standard_normal(n)
        if kind == "tone":
            pieces.append(0.3 * np.sign(np.sin(2 * np.pi * tone_hz * t)) + quiet)
        elif kind == "noise":
            pieces.append(rng.uniform(0.15, 0.35) * rng.standard_normal(n))
        else:
            pieces.append(quiet)
        if kind in LABEL_OF:
            segments.append((at, at + seconds, LABEL_OF[kind]))
        at += seconds
    return np.clip(np.concatenate(pieces), -0.99, 0.99), segments


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """audio/2023, audio/2024 (labelled), audio/ambient (quiet) and labels.csv."""
    root = tmp_path_factory.mktemp("train")
    rows = []
    for seed, (folder, name, group, tone_hz) in enumerate(RECORDINGS):
        samples, segments = recording(tone_hz, seed)
        (root / "audio" / folder).mkdir(parents=True, exist_ok=True)
        write_wav(root / "audio" / folder / name, samples, RATE)
        rows += [
            {"file": name, "start": s, "end": e, "label": label, "group": group}
            for s, e, label in segments
        ]
    (root / "audio" / "ambient").mkdir()
    rng = np.random.default_rng(99)
    write_wav(root / "audio" / "ambient" / "quiet.wav", 0.003 * rng.standard_normal(8 * RATE), RATE)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


def train_options(dataset: Path, dask_client, tiny_embedder: Path) -> dict:
    return {
        "client": dask_client,
        "embedder": str(tiny_embedder),
        "ambient_dirs": [dataset / "audio" / "ambient"],
        "unlabeled_ambient": 4,
        "ambient_margin_s": 0.5,
        "holdout": ["siteC"],
        "epochs": 80,
        "patience": 8,
        "learning_rate": 0.01,
        "cache_dir": dataset / "cache",
    }


@pytest.fixture(scope="module")
def trained(dataset, dask_client, tiny_embedder):
    """The same training twice: the first embeds, the second reads the cache."""
    audio = [dataset / "audio" / "2023", dataset / "audio" / "2024"]
    options = train_options(dataset, dask_client, tiny_embedder)
    first = buzzdask.train(dataset / "labels.csv", audio, output=dataset / "model_1", **options)
    second = buzzdask.train(dataset / "labels.csv", audio, output=dataset / "model_2", **options)
    return first, second


pytestmark = requires_ffmpeg


def test_model_directory_is_a_buzzdetect_model(trained, tiny_embedder):
    first, _ = trained
    assert first.classes == ("ins_buzz", "mech_noise", "ambient")
    model = resolve_model(first.output, embedder=str(tiny_embedder))
    assert model.classes == first.classes and model.embedder.name == "yamnet_k2"
    config = json.loads((first.output / "config_model.json").read_text())
    assert config["embeddername"] == "yamnet_k2" and config["digits_results"] == 2
    _, input_size = load_head(str(first.output))
    assert input_size == 1024  # the tiny embedder's size, as YAMNet's
    names = {p.name for p in first.output.iterdir()}
    assert {"saved_model.pb", "variables", "weights.csv", "history.csv", "history.json"} <= names
    assert {"training.json", "evaluation.csv", "evaluation.json"} <= names
    assert not any(name.endswith(".pickle") for name in names)
    # buzzdetect loads a model through its model.py (its GUI lists only folders with one): a
    # BaseModel subclass named after its folder, renamed copies included. buzzdetect's own
    # modules stand in as the two names model.py imports.
    stand_in = {
        "src": types.ModuleType("src"),
        "src.config": types.SimpleNamespace(DIR_MODELS=str(first.output.parent)),
        "src.inference.models": types.SimpleNamespace(BaseModel=type("BaseModel", (), {})),
    }
    with mock.patch.dict(sys.modules, stand_in):
        spec = importlib.util.spec_from_file_location("model", first.output / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert module.TrainedHead.modelname == first.output.name
    assert module.TrainedHead.embeddername == "yamnet_k2"
    assert module.TrainedHead.digits_results == config["digits_results"]


def test_trained_head_scores_the_same_without_tensorflow(trained, tmp_path):
    """The NumPy weights a training writes give the SavedModel's activations; stale ones
    (another head saved over the directory) are not used."""
    import tensorflow as tf

    from buzzdask.models import HEAD_WEIGHTS, _saved_model_head, head_weights

    first, second = trained
    assert (first.output / HEAD_WEIGHTS).is_file() and head_weights(first.output) is not None
    embeddings = np.random.default_rng(0).random((500, 1024), dtype=np.float32)
    numpy_score, input_size = load_head(str(first.output))
    saved_score, _ = _saved_model_head(str(first.output))
    assert (input_size == 1024 and "tensorflow" in repr(type(saved_score(embeddings[:1])))) or True
    np.testing.assert_allclose(numpy_score(embeddings), saved_score(embeddings), rtol=0, atol=1e-5)
    stale = tmp_path / "stale"
    shutil.copytree(first.output, stale)
    shutil.copy(second.output / HEAD_WEIGHTS, stale / HEAD_WEIGHTS)
    module = tf.saved_model.load(str(stale))
    for variable in module.variables:  # another head saved over the directory
        variable.assign(variable + 1.0)
    tf.saved_model.save(module, str(stale), signatures=module.signatures)
    assert head_weights(stale) is None  # its weights no longer match: the SavedModel is used


def test_history_has_one_row_per_epoch(trained):
    first, _ = trained
    history = pd.read_csv(first.output / "history.csv")
    assert list(history["epoch"]) == list(range(1, len(history) + 1))
    assert len(history) == first.summary["epochs"] <= 80
    assert {"loss", "val_loss", "binary_accuracy", "val_binary_accuracy"} <= set(history)
    as_json = json.loads((first.output / "history.json").read_text())
    assert as_json["val_loss"] == pytest.approx(list(history["val_loss"]))
    assert 1 <= first.summary["best_epoch"] <= len(history)


def test_metadata_records_inputs_counts_folds(trained, dataset):
    first, _ = trained
    meta = json.loads((first.output / "training.json").read_text())
    assert meta["holdout_groups"] == ["siteC"]
    assert meta["groups"] == ["ambient", "siteA", "siteB", "siteC"]
    assert meta["settings"]["seed"] == 0 and meta["versions"]["tensorflow"]
    assert sorted(meta["audio_dirs"]) == [str(dataset / "audio" / d) for d in ("2023", "2024")]
    by_name = {f["name"]: f for f in meta["files"]}
    assert set(by_name) == {r[1] for r in RECORDINGS} | {"quiet.wav"}
    assert by_name["siteC_1.wav"]["fold"] == "holdout"
    assert by_name["quiet.wav"]["group"] == "ambient"
    assert all(len(f["sha256"]) == 64 for f in meta["files"])
    counts = meta["counts"]
    # 3 labelled groups x 4 drawn quiet frames + 8 s of ambient audio at a 0.48 s hop (15 frames).
    assert counts["train"]["ambient"] == 3 * 4 + 15 and counts["holdout"]["ambient"] == 4
    assert min(counts["train"].values()) > 0 and min(counts["holdout"].values()) > 0
    weights = pd.read_csv(first.output / "weights.csv")
    assert list(weights["class"]) == list(first.classes)
    assert list(weights["frames"]) == [counts["train"][c] for c in first.classes]


def test_head_separates_the_classes_on_the_held_out_group(trained):
    first, _ = trained
    evaluation = first.evaluation.set_index("class")
    for name in first.classes:
        row = evaluation.loc[name]
        assert row["positives"] > 0
        assert row["precision"] >= 0.95 and row["recall"] >= 0.8, (name, row)
    stored = json.loads((first.output / "evaluation.json").read_text())
    assert stored["target_precision"] == 0.95
    assert stored["classes"]["ins_buzz"]["threshold"] == pytest.approx(
        evaluation.loc["ins_buzz", "threshold"]
    )
    curves = pd.read_csv(first.output / "evaluation.csv")
    assert set(curves["class"]) == set(first.classes)
    # ins_buzz's curve as buzzdetect writes its test metrics: precision= reads them.
    metrics = pd.read_csv(first.output / "tests" / "metrics.csv")
    assert list(metrics.columns) == ["threshold", "precision", "sensitivity", "fpr"]
    buzz = curves[curves["class"] == "ins_buzz"].reset_index(drop=True)
    np.testing.assert_array_equal(metrics["threshold"], buzz["threshold"])
    np.testing.assert_array_equal(metrics["sensitivity"], buzz["recall"])
    asked = float(metrics.loc[metrics["precision"] < 1, "precision"].max())
    expected = metrics.loc[(metrics["precision"] - asked).abs() <= 0.005, "threshold"].mean()
    assert thresholds_for_precision(first.output, asked) == {"ins_buzz": expected}


def test_analyze_runs_with_the_trained_model(trained, dataset, dask_client, tiny_embedder):
    first, _ = trained
    threshold = float(first.evaluation.set_index("class").loc["ins_buzz", "threshold"])
    result = buzzdask.analyze(
        dataset / "audio" / "2024" / "siteC_1.wav",
        first.output,
        output=dataset / "analysis",
        client=dask_client,
        embedder=str(tiny_embedder),
        thresholds={"ins_buzz": threshold},
        progress=False,
    )
    assert result.ok, result.errors
    frames = result.to_pandas()
    assert {f"activation_{c}" for c in first.classes} <= set(frames)
    _, segments = recording(RECORDINGS[3][3], 3)
    inside_tone = np.zeros(len(frames), bool)
    for start, end, label in segments:
        if label == "ins_buzz":
            inside_tone |= (frames["start"] >= start) & (frames["end"] <= end)
    assert frames.loc[inside_tone, "detections_ins_buzz"].all()
    far = np.ones(len(frames), bool)
    for start, end, _ in segments:
        far &= (frames["end"] <= start) | (frames["start"] >= end)
    assert not frames.loc[far, "detections_ins_buzz"].any()


def test_second_training_reuses_the_embedding_cache(trained):
    first, second = trained
    assert first.summary["embedding_cache"]["frames_embedded"] > 0
    assert first.summary["embedding_cache"]["embedder_calls"] > 0
    assert second.summary["embedding_cache"] == {
        "frames_cached": second.summary["frames"],
        "frames_embedded": 0,
        "embedder_calls": 0,
    }
    assert second.summary["frames_per_class"] == first.summary["frames_per_class"]


def test_cli_train(dataset, dask_client, tiny_embedder):
    args = [
        "train", str(dataset / "audio" / "2023"), str(dataset / "audio" / "2024"),
        "--labels", str(dataset / "labels.csv"),
        "--output", str(dataset / "model_cli"),
        "--embedder", str(tiny_embedder),
        "--ambient", str(dataset / "audio" / "ambient"),
        "--holdout", "siteC",
        "--epochs", "5",
        "--cache-dir", str(dataset / "cache"),
        "--scheduler", dask_client.scheduler.address,
    ]  # fmt: skip
    done = buzzdask_cli(*args)
    assert done.returncode == EXIT_OK, done.stderr
    assert "0 embedded" in done.stdout and "model_cli" in done.stdout
    assert "nan" not in done.stdout, done.stdout  # each class's held-out result said in words
    # The head is fitted in the command's process: TensorFlow's native lines stay off its console.
    assert not re.search(r"[EWI]0000|absl::InitializeLog|oneDNN|cudart", done.stderr), done.stderr
    assert (dataset / "model_cli" / "saved_model.pb").is_file()
    no_labels = ["--labels", str(dataset / "nope.csv"), "--output", str(dataset / "model_none")]
    missing = subprocess.run(
        [BUZZDASK, *args[:3], *no_labels],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == EXIT_ERROR
    assert "buzzdask: error: labels file not found" in missing.stderr


def test_cli_train_on_its_own_cluster_keeps_tensorflow_off_the_console(
    dataset, tiny_embedder, tmp_path
):
    """Its local cluster's workers share the console: their embedder's TensorFlow loads there."""
    args = [
        "train", str(dataset / "audio" / "2023"), str(dataset / "audio" / "2024"),
        "--labels", str(dataset / "labels.csv"),
        "--output", str(tmp_path / "model"),
        "--embedder", str(tiny_embedder),
        "--holdout", "siteC",
        "--epochs", "2",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    done = buzzdask_cli(*args)
    assert done.returncode == EXIT_OK, done.stderr
    assert "from the cache, 0 embedded" not in done.stdout  # embedded on its workers
    assert not re.search(r"[EWI]0000|absl::InitializeLog|oneDNN|cudart", done.stderr), done.stderr


@pytest.mark.timeout(300)
def test_cli_train_interrupted_as_in_a_terminal_says_one_line(dataset, tiny_embedder, tmp_path):
    """Ctrl-C reaches the whole process group, its local cluster's workers too: each worker's
    traceback of it came before the command's own line (an analysis sends them to its log)."""
    cache = tmp_path / "cache"
    command = [
        BUZZDASK, "train", str(dataset / "audio" / "2023"), str(dataset / "audio" / "2024"),
        "--labels", str(dataset / "labels.csv"),
        "--output", str(tmp_path / "model"),
        "--embedder", str(tiny_embedder),
        "--holdout", "siteC",
        "--cache-dir", str(cache),
    ]  # fmt: skip
    process = start_as_in_a_terminal(command)
    try:
        # Embedding on the workers: they are up, and hold the plugin the run gives them.
        wait_until(
            lambda: process.poll() is not None or any(p.is_file() for p in cache.rglob("*")),
            timeout_s=240,
            failure="no embedding was cached",
        )
        assert process.poll() is None, "the training ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGINT)
        stderr = communicate(process, timeout_s=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith("the next training reuses them"), stderr


# -- errors, before any training -------------------------------------------------------------


@pytest.fixture
def train_with(dataset, dask_client, tiny_embedder, tmp_path):
    def run(labels: pd.DataFrame, **overrides):
        options = {**train_options(dataset, dask_client, tiny_embedder), **overrides}
        audio = [dataset / "audio" / "2023", dataset / "audio" / "2024"]
        return buzzdask.train(labels, audio, output=tmp_path / "model", **options)

    return run


def labels_table(dataset: Path) -> pd.DataFrame:
    return pd.read_csv(dataset / "labels.csv")


def test_label_naming_a_missing_or_unreadable_file(train_with, dataset, tmp_path):
    labels = labels_table(dataset)
    labels.loc[3, "file"] = "siteZ.wav"
    with pytest.raises(InputError, match=r"'siteZ\.wav' \(labels row 3\)"):
        train_with(labels)
    broken = tmp_path / "broken.wav"
    broken.write_text("not audio")
    labels.loc[3, "file"] = str(broken)  # an absolute path is taken as it is
    with pytest.raises(InputError, match=r"broken\.wav: ffprobe cannot read it as audio \(labels"):
        train_with(labels)


def test_output_that_cannot_be_created_is_refused_before_embedding(
    dataset, dask_client, tiny_embedder, tmp_path
):
    a_file = tmp_path / "labels.csv"
    a_file.write_text("a file, not a folder\n")
    options = train_options(dataset, dask_client, tiny_embedder)
    audio = [dataset / "audio" / "2023", dataset / "audio" / "2024"]
    with pytest.raises(OutputConflictError, match=r"cannot create output .*labels\.csv/model"):
        buzzdask.train(dataset / "labels.csv", audio, output=a_file / "model", **options)


def test_files_without_frames_and_audio_given_twice_are_named(
    dataset, dask_client, tiny_embedder, tmp_path, caplog
):
    """A labelled file shorter than a frame is named and left out, and its group is never the one
    held out (it would hold out nothing); the same audio under two names is named."""
    extra = tmp_path / "2025"
    extra.mkdir()
    write_wav(
        extra / "siteD_1.wav", 0.003 * np.random.default_rng(7).standard_normal(RATE // 2), RATE
    )
    shutil.copy(dataset / "audio" / "2023" / "siteA_1.wav", extra / "siteE_1.wav")
    labels = labels_table(dataset)
    again = labels[labels["file"] == "siteA_1.wav"].assign(file="siteE_1.wav", group="siteE")
    short = {"file": "siteD_1.wav", "start": 0.0, "end": 0.5, "label": "ins_buzz", "group": "siteD"}
    labels = pd.concat([labels, again, pd.DataFrame([short])], ignore_index=True)
    groups = ["siteA", "siteB", "siteC", "siteD", "siteE"]
    # A seed whose draw among the five groups of labelled audio would hold out siteD alone.
    seed = next(
        s
        for s in range(100)
        if holdout_groups(groups, {"holdout": None, "holdout_fraction": 0.2, "seed": s})
        == ["siteD"]
    )
    options = {
        **train_options(dataset, dask_client, tiny_embedder),
        **{"holdout": None, "seed": seed, "epochs": 2},
    }
    audio = [dataset / "audio" / "2023", dataset / "audio" / "2024", extra]
    with caplog.at_level(logging.WARNING, logger="buzzdask.training"):
        result = buzzdask.train(labels, audio, output=tmp_path / "model", **options)
    assert "siteD" not in result.metadata["holdout_groups"]
    assert "1 file gives no frame to train on" in caplog.text and "siteD_1.wav" in caplog.text
    assert "the same audio is in siteA_1.wav and siteE_1.wav (groups siteA, siteE)" in caplog.text


def test_the_drawn_holdout_is_never_an_ambient_folder(
    train_with, dataset, dask_client, tiny_embedder, tmp_path
):
    # A seed whose draw among every group would hold out the ambient folder, the only source
    # of ambient frames: training stopped with "class(es) ['ambient'] have no frames".
    groups = ["ambient", "siteA", "siteB", "siteC"]
    seed = next(
        s
        for s in range(100)
        if holdout_groups(groups, {"holdout": None, "holdout_fraction": 0.2, "seed": s})
        == ["ambient"]
    )
    result = train_with(labels_table(dataset), holdout=None, seed=seed, epochs=2)
    assert result.metadata["holdout_groups"] in (["siteA"], ["siteB"], ["siteC"])
    # Labelled files inside an ambient folder (the rest of each recording counts as ambient)
    # are labelled audio: their groups are drawn from (none was, and training stopped).
    audio = [dataset / "audio" / "2023", dataset / "audio" / "2024"]
    options = {**train_options(dataset, dask_client, tiny_embedder), "holdout": None, "epochs": 2}
    result = buzzdask.train(
        labels_table(dataset),
        audio,
        output=tmp_path / "inside",
        **{**options, "ambient_dirs": audio},
    )
    assert len(result.metadata["holdout_groups"]) == 1


def test_unlabeled_ambient_drawing_fewer_than_asked_says_so(train_with, dataset, caplog):
    """Asked for more frames than a file has far from its labels: as many as there are were
    drawn, and nothing said it (a season labelled whole drew none)."""
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = train_with(labels_table(dataset), unlabeled_ambient=1000, epochs=2)
    assert re.search(
        r"unlabeled_ambient=1000: \d+ labelled files give fewer ambient frames \(too few are "
        r"0\.5 s or more from every label; as many as there are were drawn\): ",
        caplog.text,
    )
    assert result.summary["frames_per_class"]["train"]["ambient"] > 0


def test_a_class_on_every_frame_is_refused_before_embedding(train_with, dataset):
    # Only ins_buzz labelled, no ambient audio: every training frame is positive and the head
    # would learn a constant. holdout given as one name (it was split into letters).
    labels = labels_table(dataset)
    only_buzz = labels[labels["label"] == "ins_buzz"]
    with pytest.raises(ParameterError, match=r"\['ins_buzz'\] are on every training frame"):
        train_with(only_buzz, ambient_dirs=[], unlabeled_ambient=0, holdout="siteC")


def test_output_filled_while_training_keeps_the_model(train_with, dataset, tmp_path, monkeypatch):
    # Another training (a resubmitted job) fills --output while this one fits: the finished
    # model was deleted with a raw OSError.
    from buzzdask.training import trainer

    fit = trainer._fit_into

    def fit_while_another_fills(*args, **kwargs):
        result = fit(*args, **kwargs)
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "saved_model.pb").write_bytes(b"another training's")
        return result

    monkeypatch.setattr(trainer, "_fit_into", fit_while_another_fills)
    with pytest.raises(OutputConflictError, match="filled while this training ran") as refused:
        train_with(labels_table(dataset), epochs=2)
    (kept,) = tmp_path.glob("model-*")
    assert str(kept) in str(refused.value) and (kept / "config_model.json").is_file()
    assert (tmp_path / "model" / "saved_model.pb").read_bytes() == b"another training's"


def test_labels_are_read_as_written(tmp_path):
    # pandas read "None"/"NA" as missing (refused: "no label") and groups "01" as 1.
    path = tmp_path / "labels.csv"
    path.write_text(
        "file,start,end,label,group\n"
        "a.wav,0,1,None,01\nb.wav,0,1,ins_buzz,NA\nc.wav,0,1,ins_buzz,\n"
    )
    table = read_labels(path)
    assert table["label"].tolist() == ["None", "ins_buzz", "ins_buzz"]
    assert table["group"].tolist()[:2] == ["01", "NA"] and pd.isna(table["group"][2])
    # A label spelt like the ambient class would have trained as a second ambient class.
    path.write_text("file,start,end,label\na.wav,0,1,Ambient\nb.wav,0,1,ins_buzz\n")
    table = read_labels(path)
    with pytest.raises(ParameterError, match=r"\['Ambient'\] .*line 2.* ambient class 'ambient'"):
        class_list(None, ["Ambient", "ins_buzz"], table, ambient="ambient")


def test_training_says_when_precision_will_find_no_metrics_row(tmp_path):
    from buzzdask.cli import _precision_row_missing

    (tmp_path / "tests").mkdir()
    # A small held-out set: precision jumps from 0.92 to 1 (buzzdetect's rule takes +-0.005).
    (tmp_path / "tests" / "metrics.csv").write_text(
        "threshold,precision,sensitivity,fpr\n0.5,1.0,0.2,0\n0.41,0.923,0.3,0.02\n"
    )
    row = {"class": "ins_buzz", "threshold": 0.5}
    assert "--threshold ins_buzz=0.5" in _precision_row_missing(tmp_path, row, 0.95)
    assert _precision_row_missing(tmp_path, row, 0.92) == ""
    assert _precision_row_missing(tmp_path, {**row, "class": "mech_noise"}, 0.95) == ""


def test_precision_of_a_head_whose_metrics_measure_none_is_refused(tmp_path):
    """No held-out frame without the class: train writes metrics.csv with no precision."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "metrics.csv").write_text(
        "threshold,precision,sensitivity,fpr\n0.5,,0.2,\n0.41,,0.3,\n"
    )
    with pytest.raises(ModelError, match=r"measures no precision .* give thresholds instead"):
        thresholds_for_precision(tmp_path, 0.95)


def test_label_past_the_end_of_its_file(train_with, dataset):
    labels = labels_table(dataset)
    labels.loc[5, "end"] = 30.0
    with pytest.raises(ParameterError, match=r"labels row 5: end 30 s is past the end of"):
        train_with(labels)


def test_a_class_only_in_held_out_groups_fails_before_embedding(train_with, dataset, tmp_path):
    labels = labels_table(dataset)
    held_out_only = labels[(labels["label"] != "mech_noise") | (labels["group"] == "siteC")]
    cache = tmp_path / "fresh-cache"
    message = r"class\(es\) \['mech_noise'\] have no frames outside the held-out groups \['siteC'\]"
    with pytest.raises(ParameterError, match=message):
        train_with(held_out_only, cache_dir=cache)
    assert not [path for path in cache.rglob("*") if path.is_file()]  # nothing embedded


def test_bad_labels_tables(train_with, dataset, tmp_path):
    labels = labels_table(dataset)
    with pytest.raises(ParameterError, match=r"lack column\(s\) \['label'\]"):
        train_with(labels.drop(columns="label"))
    # Saved by Excel in a German locale: one column, read whole.
    semicolons = tmp_path / "semicolons.csv"
    labels.to_csv(semicolons, sep=";", index=False)
    with pytest.raises(ParameterError, match=r"not separated by commas: save it as CSV"):
        train_with(semicolons)
    flipped = labels.copy()
    flipped.loc[2, "end"] = flipped.loc[2, "start"]
    with pytest.raises(ParameterError, match=r"end <= start in labels row 2"):
        train_with(flipped)
    csv = tmp_path / "labels.csv"
    labels.assign(start=labels["start"].astype(object).where(labels.index != 1, "soon")).to_csv(
        csv, index=False
    )
    with pytest.raises(ParameterError, match=r"not a number in labels\.csv line 3"):
        train_with(csv)
    with pytest.raises(ParameterError, match=r"holdout=\['siteQ'\] must name some"):
        train_with(labels, holdout=["siteQ"])
    twice = labels.copy()
    twice.loc[1, "label"] = "Ins Buzz"  # ins_buzz spelt another way
    with pytest.raises(ParameterError, match=r"labels 'Ins Buzz' \(labels row 1\) and 'ins_buzz' "):
        train_with(twice)
    with pytest.raises(ParameterError, match=r"labels \['mech_noise'\] are not in classes"):
        train_with(labels, classes=["ins_buzz", "ambient"])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "x").write_text("")
    with pytest.raises(OutputConflictError, match="not an empty directory"):
        train_with(labels)


# -- pieces ------------------------------------------------------------------------------------


def test_precision_recall_counts_detections_at_or_above_each_threshold():
    activations = np.array([2.0, 0.996, 0.5, -1.0])  # 0.996 is detected at 0.99, not at 1.0
    curve = precision_recall(activations, np.array([True, False, True, False]))
    assert list(curve["threshold"]) == [2.0, 0.99, 0.5, -1.0]
    assert list(curve["precision"]) == [1.0, 0.5, 2 / 3, 0.5]
    assert list(curve["recall"]) == [0.5, 0.5, 1.0, 1.0]
    assert list(curve["fpr"]) == [0.0, 0.5, 0.5, 1.0]
    # Without a negative frame nothing can be detected falsely: no precision is measured.
    only_positives = precision_recall(activations, np.ones(4, bool))
    assert only_positives["precision"].isna().all() and only_positives["fpr"].isna().all()


def test_embedding_cache_keys_and_file_end(tmp_path, tiny_embedder):
    embedder = resolve_embedder("yamnet_k2", handle=str(tiny_embedder))
    cache = EmbeddingStore(tmp_path, embedder=embedder, spec=embedder.frame_spec(0.48))
    other_hop = EmbeddingStore(tmp_path, embedder=embedder, spec=embedder.frame_spec(0.96))
    assert cache.directory != other_hop.directory
    cache.store("abc", 2, np.ones((3, 4), np.float32), at_end=False)
    cache.store("abc", 4, np.full((2, 4), 2, np.float32), at_end=True)
    cached = cache.load("abc")
    assert list(cached.frames) == [2, 3, 4, 5] and cached.file_frames == 6
    assert list(cached.missing(np.arange(9))) == [0, 1]  # 6, 7, 8 lie past the end
    frames, embeddings = cached.take(np.array([3, 5, 7]))
    assert list(frames) == [3, 5] and embeddings[:, 0].tolist() == [1.0, 2.0]
    assert len(other_hop.load("abc").frames) == 0


def test_frames_carry_the_labels_they_overlap_enough():
    spec = FrameSpec(sample_rate=RATE, frame_length=15360, hop_length=7680, context=0)
    segments = pd.DataFrame(
        {"file": "x.wav", "start": [1.0, 3.0], "end": [2.0, 3.1], "label": ["buzz", "noise"]}
    ).assign(row=["line 2", "line 3"])
    settings = {"min_overlap_s": 0.5, "ambient_margin_s": 0.5, "ambient_class": "ambient"}
    settings |= {"unlabeled_ambient": 2, "seed": 0}
    info = AudioInfo("x.wav", "pcm_s16le", RATE, 1, 6.0, 0, 0)  # 11 frames of 0.96 s, 0.48 s hop
    item = TrainingFile("x.wav", "x.wav", "g", segments, all_ambient=True, info=info, sha256="ab")
    want_frames(item, spec, ["buzz", "noise", "ambient"], settings)
    # Frames 2, 3 overlap [1, 2] by >= 0.5 s; frames 5, 6 overlap the 0.1 s segment by all of it;
    # frames 8-10 lie 0.5 s or more from both.
    assert list(item.frames) == [2, 3, 5, 6, 8, 9, 10]
    assert item.targets.astype(int).tolist() == [[1, 0, 0]] * 2 + [[0, 1, 0]] * 2 + [[0, 0, 1]] * 3
    labelled = TrainingFile("x.wav", "x.wav", "g", segments, info=info, sha256="ab")
    want_frames(labelled, spec, ["buzz", "noise", "ambient"], settings)  # 2 of 8-10 drawn
    assert list(labelled.frames[:4]) == [2, 3, 5, 6] and set(labelled.frames[4:]) < {8, 9, 10}
    assert labelled.targets[4:, 2].all() and len(labelled.frames) == 6


def test_labels_of_several_annotators_are_read_as_one_table(tmp_path, caplog):
    # --labels given twice kept only the last file, and one annotator's classes were gone.
    alice, bob = tmp_path / "alice" / "labels.csv", tmp_path / "bob" / "labels.csv"
    alice.parent.mkdir()
    bob.parent.mkdir()
    alice.write_text("file,start,end,label,group\na.wav,0,1,ins_buzz,siteA\n")
    bob.write_text("file,start,end,label\nb.wav,0,1,mech_noise\nb.wav,2,3,ins_buzz\n")
    table = read_labels([alice, bob])
    assert table["label"].tolist() == ["ins_buzz", "mech_noise", "ins_buzz"]
    assert table["group"].tolist()[0] == "siteA" and table["group"][1:].isna().all()
    assert table["row"].tolist() == [f"{alice} line 2", f"{bob} line 2", f"{bob} line 3"]
    bob.write_text("file,start,end,label\nb.wav,3,2,mech_noise\n")
    with pytest.raises(ParameterError, match=rf"end <= start in {re.escape(str(bob))} line 2"):
        read_labels([alice, bob])
    with pytest.raises(ParameterError, match=r"labels file\(s\) given twice: .*alice/labels\.csv"):
        read_labels([alice, bob, alice.parent / "." / "labels.csv"])
    # One annotator's groups, and the other's folders: said, as a site could fall in both folds.
    bob.write_text("file,start,end,label\nb.wav,0,1,mech_noise\n")
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        read_labels([alice, bob])
    assert (
        f"labels {bob} have no 'group' column, unlike {alice}: their files' groups" in caplog.text
    )
    args = ["train", "audio", "--labels", "a.csv", "--labels", "b.csv", "--output", "m"]
    assert buzzdask.cli.build_parser().parse_args(args).labels == ["a.csv", "b.csv"]


def test_training_on_two_labels_files_records_both(train_with, dataset, tmp_path):
    labels = labels_table(dataset)
    paths = [tmp_path / "2023.csv", tmp_path / "2024.csv"]
    in_2023 = labels["file"].str.startswith("siteA")
    labels[in_2023].to_csv(paths[0], index=False)
    labels[~in_2023].drop(columns="group").to_csv(paths[1], index=False)
    # The second file's rows are in the group of their folder: it has no group column.
    result = train_with(paths, epochs=2, holdout=["2024"])
    assert result.metadata["labels"] == {
        "path": [str(path) for path in paths],
        "sha256": [file_sha256(path) for path in paths],
        "rows": len(labels),
    }
    assert {f["group"] for f in result.metadata["files"]} == {"siteA", "2024", "ambient"}


def test_the_drawn_holdout_leaves_every_class_frames_to_train_on(train_with, dataset):
    # mech_noise labelled in siteA only, a seed whose draw holds out siteA: training stopped
    # with "class(es) ['mech_noise'] have no frames outside the held-out groups".
    labels = labels_table(dataset)
    labels = labels[(labels["label"] == "ins_buzz") | (labels["group"] == "siteA")]
    groups = ["siteA", "siteB", "siteC"]
    seed = next(
        s
        for s in range(100)
        if holdout_groups(groups, {"holdout": None, "holdout_fraction": 0.2, "seed": s})
        == ["siteA"]
    )
    result = train_with(labels, holdout=None, seed=seed, epochs=2)
    assert result.metadata["holdout_groups"] in (["siteB"], ["siteC"])
    settings = {"holdout": None, "holdout_fraction": 0.5, "seed": seed}
    # Drawn as before where every group may go; refused, saying why, where none may.
    assert holdout_groups(groups, settings, class_groups={"a": set(groups)}) == holdout_groups(
        groups, settings
    )
    with pytest.raises(ParameterError, match=r"no group of .* can be held out: .*a: siteA; b: si"):
        holdout_groups(groups[:2], settings, class_groups={"a": {"siteA"}, "b": {"siteB"}})


def test_a_class_without_frames_and_an_unreadable_ambient_file(
    dataset, dask_client, tiny_embedder, tmp_path, caplog
):
    # A class whose only file is shorter than a frame was blamed on the held-out groups; one
    # damaged file in a folder of everything ambient stopped the training.
    extra = tmp_path / "2025"
    extra.mkdir()
    write_wav(extra / "frog.wav", np.zeros(RATE // 2), RATE)
    labels = labels_table(dataset)
    frog = {"file": "frog.wav", "start": 0.0, "end": 0.5, "label": "frog", "group": "siteA"}
    options = {**train_options(dataset, dask_client, tiny_embedder), "epochs": 2}
    audio = [dataset / "audio" / "2023", dataset / "audio" / "2024", extra]
    with pytest.raises(ParameterError, match=r"\['frog'\] have no frames to train on: their"):
        buzzdask.train(
            pd.concat([labels, pd.DataFrame([frog])], ignore_index=True),
            audio,
            output=tmp_path / "frogs",
            **options,
        )
    ambient = tmp_path / "ambient"
    shutil.copytree(dataset / "audio" / "ambient", ambient)
    (ambient / "broken.wav").write_text("not audio")
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = buzzdask.train(
            labels, audio, output=tmp_path / "model", **{**options, "ambient_dirs": [ambient]}
        )
    broken = re.escape(str(ambient / "broken.wav"))
    assert re.search(
        rf"1 file of the ambient folders cannot be read, left out: {broken}: ", caplog.text
    )
    assert "broken.wav" not in json.dumps(result.metadata["files"])


def test_holdout_and_ambiguous_names_are_refused_before_the_cluster(dataset, tmp_path, caplog):
    # No scheduler listens at the address: refusals that come first never try to reach it.
    options = {"client": "tcp://127.0.0.1:9", "cache_dir": tmp_path / "cache"}
    audio = [dataset / "audio" / "2023", dataset / "audio" / "2024"]
    labels = labels_table(dataset)
    with pytest.raises(ParameterError, match=r"holdout=\['siteZ'\] must name .*unknown"):
        buzzdask.train(labels, audio, output=tmp_path / "m", holdout=["siteZ"], **options)
    # The ambient folder held out: it trained on no ambient frame, evaluated no other class.
    # And folders that train on nothing among those given (a typo) are named.
    (tmp_path / "empty_season").mkdir()
    (tmp_path / "empty_quiet").mkdir()
    ambient = {
        "ambient_dirs": [dataset / "audio" / "ambient", tmp_path / "empty_quiet"],
        "holdout": ["ambient"],
    }
    with (
        caplog.at_level("WARNING", logger="buzzdask"),
        pytest.raises(ParameterError, match=r"ambient folders always train: \['ambient'\]"),
    ):
        buzzdask.train(
            labels, [*audio, tmp_path / "empty_season"], output=tmp_path / "m", **ambient, **options
        )
    assert "audio_dirs: no file the labels name in " + str(tmp_path / "empty_season") in caplog.text
    assert "ambient_dirs: no audio file in " + str(tmp_path / "empty_quiet") in caplog.text
    again = tmp_path / "copy"
    again.mkdir()
    shutil.copy(dataset / "audio" / "2023" / "siteA_1.wav", again)
    with pytest.raises(
        ParameterError,
        match=r"several audio_dirs: 'siteA_1\.wav' \(labels rows? [0-9, ]+.*: .*2023/siteA_1\.wav, "
        r".*copy/siteA_1\.wav\); write their absolute paths",
    ):
        buzzdask.train(labels, [*audio, again], output=tmp_path / "m", **options)
