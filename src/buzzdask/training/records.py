"""A training's records: the result it returns and the files it writes beside the head.

:func:`write_records` writes into the model directory ``config_model.json`` (what
:func:`buzzdask.analyze` reads), ``model.py`` (how buzzdetect loads it), ``weights.csv``
(frames and weight per class), ``history.csv`` and ``history.json`` (one row per epoch),
``training.json`` (inputs with content hashes, groups, counts, settings, versions, times) and
``evaluation.csv`` / ``evaluation.json`` (held-out precision and recall; for an ``ins_buzz``
class also ``tests/metrics.csv``, buzzdetect's table, so that ``precision=`` chooses a threshold
as for the lab's models), and returns the same as a :class:`TrainingResult`. What a training
works on, :class:`TrainingInputs` and :class:`TrainingSet`, is defined here, beside the records that
describe it, so that :mod:`~buzzdask.training.trainer` and this module share it without a cycle.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from buzzdask.decode import PREPROCESSING
from buzzdask.frames import FrameSpec
from buzzdask.inputs import as_list
from buzzdask.models import CONFIG_NAME, EmbedderSpec
from buzzdask.session import package_versions
from buzzdask.settings import Settings
from buzzdask.store import EmbeddingStore, file_sha256
from buzzdask.thresholds import METRICS_CLASS, METRICS_PATH
from buzzdask.training.head import DIGITS
from buzzdask.training.labels import Labels, TrainingFile, class_counts, label_paths
from buzzdask.write import utc_now, write_json

__all__ = ["TrainingInputs", "TrainingResult", "TrainingSet", "write_records"]


@dataclass
class TrainingResult:
    """A trained model directory and how the training went.

    Attributes
    ----------
    output : Path
        The model directory (``buzzdask.analyze(..., model=output)`` reads it).
    classes : tuple of str
        Output classes in column order.
    history : pandas.DataFrame
        One row per epoch run: ``epoch`` (from 1), ``loss``, ``binary_accuracy`` and their
        ``val_`` counterparts on the held-out groups.
    evaluation : pandas.DataFrame
        One row per class on the held-out groups: ``class``, ``positives``, ``negatives``,
        ``threshold`` (the lowest reaching the target precision, NaN if none does),
        ``precision``, ``recall``, ``fpr`` at that threshold.
    curves : pandas.DataFrame
        ``class``, ``threshold``, ``precision``, ``recall``, ``fpr`` for every threshold.
    summary : dict
        Frames per class and fold, embedding-cache counts (``frames_cached``,
        ``frames_embedded``, ``embedder_calls``), epochs, wall time.
    metadata : dict
        What ``training.json`` holds.
    """

    output: Path
    classes: tuple[str, ...]
    history: pd.DataFrame
    evaluation: pd.DataFrame
    curves: pd.DataFrame
    summary: dict[str, Any]
    metadata: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class TrainingInputs:
    """What a training works on, resolved and checked before any work starts.

    Attributes
    ----------
    labels : path-like, sequence of path-like, or pandas.DataFrame
        As given to :func:`~buzzdask.training.train` (recorded in ``training.json``).
    audio_dirs : path-like or sequence of path-like
        As given.
    ambient_dirs : sequence of path-like
        As given.
    table : pandas.DataFrame
        The labels table (:func:`~buzzdask.training.labels.read_labels`).
    files : list of TrainingFile
        Every labelled or ambient file.
    classes : list of str
        Output classes in column order.
    settings : dict
        The training options, keyword else ``buzzdask.train.<key>``.
    embedder : EmbedderSpec
        The resolved embedder.
    spec : FrameSpec
        The training frames (``frame_hop_s`` apart).
    output : Path
        The model directory to write (absolute).
    cache : EmbeddingStore
        The embedding cache of this embedder and frame spec.
    frames_per_chunk : int > 0
        Most frames per decode task.
    base : Settings
        Everything but the training keywords (``settings``).
    """

    labels: Labels
    audio_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
    ambient_dirs: Sequence[str | os.PathLike[str]]
    table: pd.DataFrame
    files: list[TrainingFile]
    classes: list[str]
    settings: dict[str, Any]
    embedder: EmbedderSpec
    spec: FrameSpec
    output: Path
    cache: EmbeddingStore
    frames_per_chunk: int
    base: Settings


@dataclass(frozen=True)
class TrainingSet:
    """Every wanted frame that exists, with its embedding, targets, file and fold.

    Attributes
    ----------
    x : np.ndarray [shape=(n_frames, embedding_size), dtype=float32]
        Embeddings.
    y : np.ndarray [shape=(n_frames, n_classes), dtype=bool]
        Targets.
    in_holdout : np.ndarray [shape=(n_frames,), dtype=bool]
        Whether each frame's group is held out.
    frame_files : np.ndarray [shape=(n_frames,), dtype=object]
        Each frame's file path.
    groups : list of str
        Every group, sorted.
    held_out : list of str
        The held-out groups.
    counts : dict
        Frames per class, per fold (``"train"``, ``"holdout"``).
    weights : np.ndarray [shape=(n_classes,)]
        Class weights on the training folds.
    """

    x: np.ndarray
    y: np.ndarray
    in_holdout: np.ndarray
    frame_files: np.ndarray
    groups: list[str]
    held_out: list[str]
    counts: dict[str, dict[str, int]]
    weights: np.ndarray


def write_records(
    directory: Path,
    inputs: TrainingInputs,
    data: TrainingSet,
    *,
    history: pd.DataFrame,
    best_epoch: int,
    curves: pd.DataFrame,
    evaluation: pd.DataFrame,
    tf_versions: dict[str, str],
    cache_stats: dict[str, int],
    started: str,
    started_wall: float,
) -> TrainingResult:
    """Write the records of a fitted and evaluated head into ``directory``; return the result.

    Parameters
    ----------
    directory : Path
        The model directory being built (the head is already saved in it).
    inputs : TrainingInputs
        What the training worked on.
    data : TrainingSet
        The frames it fitted and evaluated on.
    history : pandas.DataFrame
        One row per epoch run (:func:`~buzzdask.training.head.fit_and_save`).
    best_epoch : int >= 1
        The epoch whose weights were kept.
    curves, evaluation : pandas.DataFrame
        As :func:`~buzzdask.training.head.evaluate` returns them.
    tf_versions : dict
        TensorFlow's package versions, for ``training.json``.
    cache_stats : dict
        The embedding-cache counts (:func:`~buzzdask.training.embed.embed_missing`).
    started : str
        When the training started (UTC, ISO 8601).
    started_wall : float [s]
        The same, as :func:`time.perf_counter`.

    Returns
    -------
    TrainingResult
    """
    settings, classes = inputs.settings, inputs.classes
    train_rows, holdout_rows = ~data.in_holdout, data.in_holdout
    summary = {
        "frames": len(data.x),
        "frames_train": int(train_rows.sum()),
        "frames_holdout": int(holdout_rows.sum()),
        "frames_per_class": data.counts,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "embedding_cache": cache_stats,
        "wall_seconds": time.perf_counter() - started_wall,
    }
    metadata = _metadata(
        inputs,
        data,
        started=started,
        cache_stats=cache_stats,
        tf_versions=tf_versions,
        summary=summary,
    )
    _write_files(
        directory,
        classes=classes,
        embedder_name=inputs.embedder.name,
        batch_size=settings["batch_size"],
        counts=data.counts["train"],
        weights=data.weights,
        history=history,
        curves=curves,
        evaluation=evaluation,
        metadata=metadata,
        target_precision=settings["target_precision"],
    )
    return TrainingResult(
        output=inputs.output,
        classes=tuple(classes),
        history=history,
        evaluation=evaluation,
        curves=curves,
        summary=summary,
        metadata=metadata,
    )


def _metadata(
    inputs: TrainingInputs,
    data: TrainingSet,
    *,
    started: str,
    cache_stats: dict[str, int],
    tf_versions: dict[str, str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """What ``training.json`` holds (and ``TrainingResult.metadata``)."""
    classes, spec = inputs.classes, inputs.spec
    return {
        "started": started,
        "finished": utc_now(),
        "host": platform.node(),
        "classes": list(classes),
        "labels": _labels_source(inputs.labels, inputs.table),
        "audio_dirs": [str(Path(d).absolute()) for d in as_list(inputs.audio_dirs)],
        "ambient_dirs": [str(Path(d).absolute()) for d in inputs.ambient_dirs],
        "files": [_file_record(f, classes, data.held_out, data.frame_files) for f in inputs.files],
        "groups": data.groups,
        "holdout_groups": data.held_out,
        "counts": data.counts,
        "class_weights": dict(zip(classes, data.weights.tolist(), strict=True)),
        "settings": {k: v for k, v in inputs.settings.items() if k != "classes"},
        "embedder": asdict(inputs.embedder),
        "preprocessing": PREPROCESSING,
        "frame_length_s": spec.frame_length_s,
        "frame_hop_s": spec.hop_s,
        "frame_context_s": spec.context / spec.sample_rate,
        "embedding_cache": {"directory": str(inputs.cache.directory), **cache_stats},
        "versions": {**package_versions(), **tf_versions},
        "summary": summary,
    }


#: buzzdetect loads a model through its ``model.py`` (a ``BaseModel`` subclass; its GUI lists only
#: folders with one): model_general_v3's, with the folder's own name, so that a renamed copy loads.
BUZZDETECT_MODEL_PY = """\
\"\"\"How buzzdetect loads this head (written by buzzdask train, as model_general_v3's).\"\"\"
import os

import src.config as cfg
from src.inference.models import BaseModel


class TrainedHead(BaseModel):
    modelname = os.path.basename(os.path.dirname(os.path.abspath(__file__)))
    embeddername = {embedder_name!r}
    digits_results = {digits!r}

    def initialize(self):
        self.embedder.initialize()

        from keras.layers import TFSMLayer

        dir_model = os.path.abspath(os.path.join(cfg.DIR_MODELS, self.modelname))
        self.model = TFSMLayer(dir_model, call_endpoint="serving_default")

    def predict(self, audiosamples):
        embeddings = self.embedder.embed(audiosamples)
        return self.model(embeddings)["dense"]
"""


def _write_files(
    directory: Path,
    *,
    classes: list[str],
    embedder_name: str,
    batch_size: int,
    counts: Mapping[str, int],
    weights: np.ndarray,
    history: pd.DataFrame,
    curves: pd.DataFrame,
    evaluation: pd.DataFrame,
    metadata: Mapping[str, Any],
    target_precision: float,
) -> None:
    """config_model.json, model.py, weights.csv, history, training.json and evaluation."""
    write_json(
        directory / CONFIG_NAME,
        {
            "classes": list(classes),
            "embeddername": embedder_name,
            "digits_results": DIGITS,
            "size_batch": batch_size,
            "trainer": f"buzzdask {metadata['versions']['buzzdask']}",
        },
    )
    (directory / "model.py").write_text(
        BUZZDETECT_MODEL_PY.format(embedder_name=embedder_name, digits=DIGITS), encoding="utf-8"
    )
    pd.DataFrame(
        {
            "target": range(len(classes)),
            "class": classes,
            "frames": [counts[c] for c in classes],
            "weight": weights,
        }
    ).to_csv(directory / "weights.csv", index=False)
    history.to_csv(directory / "history.csv", index=False)
    write_json(directory / "history.json", history.to_dict(orient="list"))
    write_json(directory / "training.json", metadata)
    curves.to_csv(directory / "evaluation.csv", index=False)
    if METRICS_CLASS in classes:  # buzzdetect's test metrics: --precision reads them
        buzz = curves[curves["class"] == METRICS_CLASS].rename(columns={"recall": "sensitivity"})
        metrics = directory / METRICS_PATH
        metrics.parent.mkdir(exist_ok=True)
        buzz[["threshold", "precision", "sensitivity", "fpr"]].to_csv(metrics, index=False)
    write_json(
        directory / "evaluation.json",
        {
            "target_precision": target_precision,
            "holdout_groups": metadata["holdout_groups"],
            "classes": {
                row["class"]: {k: _json_number(v) for k, v in row.items() if k != "class"}
                for row in evaluation.to_dict(orient="records")
            },
        },
    )


def _json_number(value: Any) -> Any:
    """NaN as null (JSON has no NaN)."""
    return None if isinstance(value, float) and np.isnan(value) else value


def _file_record(
    item: TrainingFile, classes: list[str], held_out: list[str], frame_files: np.ndarray
) -> dict[str, Any]:
    assert item.info is not None
    used = int((frame_files == item.path).sum())
    return {
        "name": item.name,
        "path": item.path,
        "sha256": item.sha256,
        "group": item.group,
        "fold": "holdout" if item.group in held_out else "train",
        "duration_s": item.info.duration_s,
        "ambient_dir": item.all_ambient,
        "segments": len(item.segments),
        "frames_wanted": class_counts(item.targets, classes),
        "frames_used": used,
    }


def _labels_source(labels: Labels, table: pd.DataFrame) -> dict[str, Any]:
    """The labels file's path and hash (several files: a list of each), and the rows read."""
    if isinstance(labels, pd.DataFrame):
        return {"path": None, "sha256": None, "rows": len(table)}
    paths = label_paths(labels)
    where = [str(path.absolute()) for path in paths]
    hashes = [file_sha256(path) for path in paths]
    if isinstance(labels, (str, os.PathLike)):
        return {"path": where[0], "sha256": hashes[0], "rows": len(table)}
    return {"path": where, "sha256": hashes, "rows": len(table)}
