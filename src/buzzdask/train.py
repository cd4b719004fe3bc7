"""Training a detector head on labelled audio: embed on the cluster, fit, write a model directory.

The frames are embedded exactly as an analysis embeds them: :func:`~buzzdask.decode.decode_chunk`
tasks on the CPU workers and a :class:`~buzzdask.score.Scorer` actor (started without a head)
on the scoring worker. Embeddings are cached (:mod:`buzzdask.embeddings`), so a second training on
the same audio embeds nothing. The head is fitted with ``tf_keras`` on the client and written in
buzzdetect's model format, which :func:`buzzdask.analyze` reads directly.

Frame ``i`` of a file covers ``[i * hop, i * hop + 0.96 s)``. It carries label ``c`` when it
overlaps a segment labelled ``c`` by at least ``min(min_overlap_s, segment length)``. Several
labels can apply to one frame (multi-label: one sigmoid output per class, logits stored).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from dask.utils import parse_bytes
from distributed import Client, Future, as_completed

from buzzdask import config
from buzzdask.decode import AudioInfo, ChunkPlan, decode_chunk, probe_audio
from buzzdask.embeddings import EmbeddingCache, file_sha256
from buzzdask.errors import (
    BuzzdaskError,
    DecodeError,
    InputError,
    OutputConflictError,
    ParameterError,
    ScorerError,
)
from buzzdask.frames import FrameSpec
from buzzdask.graph import PREPROCESSING
from buzzdask.inputs import discover
from buzzdask.models import CONFIG_NAME, EmbedderSpec, load_head, resolve_embedder
from buzzdask.progress import logger
from buzzdask.score import embed_chunks, submit_scorer
from buzzdask.session import connect, package_versions, scorer_hosts, task_key
from buzzdask.write import utc_now, write_json

__all__ = ["LABEL_COLUMNS", "TrainingResult", "precision_recall", "train"]

#: Columns every labels table must have; ``start`` and ``end`` in seconds from the file's start.
LABEL_COLUMNS = ("file", "start", "end", "label")
_END_TOLERANCE_S = 0.05  # a label may end this far past ffprobe's duration estimate
_DIGITS = 2  # decimals of the evaluation thresholds (buzzdetect rounds activations to 2)


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


@dataclass
class _File:
    """One audio file of the training set and the frames wanted from it."""

    path: str
    name: str
    group: str
    segments: pd.DataFrame
    all_ambient: bool = False
    info: AudioInfo | None = None
    sha256: str = ""
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))


def train(
    labels: str | os.PathLike[str] | pd.DataFrame,
    audio_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str],
    client: Client | str | None = None,
    classes: Sequence[str] | None = None,
    ambient_dirs: Sequence[str | os.PathLike[str]] = (),
    ambient_class: str | None = None,
    unlabeled_ambient: int | None = None,
    ambient_margin_s: float | None = None,
    group_column: str | None = None,
    holdout: Sequence[str] | None = None,
    holdout_fraction: float | None = None,
    embedder_name: str = "yamnet_k2",
    embedder: str | None = None,
    frame_hop_s: float | None = None,
    min_overlap_s: float | None = None,
    hidden_units: Sequence[int] | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    patience: int | None = None,
    seed: int | None = None,
    target_precision: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    chunk_seconds: float | None = None,
    memory_budget: int | str | None = None,
    batch_frames: int | None = None,
) -> TrainingResult:
    """Train a detector head on labelled audio and write a buzzdetect-format model directory.

    Every option left ``None`` takes its value from ``buzzdask.train.<option>`` (or, for
    ``chunk_seconds``, ``memory_budget`` and ``batch_frames``, from the analysis settings).

    Parameters
    ----------
    labels : path-like or pandas.DataFrame
        CSV (or table) of labelled segments, one row each: ``file`` (relative to one of
        ``audio_dirs``, or absolute), ``start`` and ``end`` [s], ``label``; optionally a group
        column (see ``group_column``).
    audio_dirs : path-like or sequence of path-like
        Directories the ``file`` names are looked up in; a name found in two is an error.
    output : path-like
        The model directory to write; it must not exist or be empty.
    client : distributed.Client or str, optional
        The cluster (client or scheduler address); default a local cluster, closed at the end.
    classes : sequence of str, optional
        Output classes in column order; default the sorted labels, then ``ambient_class``.
        A label outside ``classes`` is an error.
    ambient_dirs : sequence of path-like
        Directories of recordings without the target sounds: every frame of every audio file
        under them (walked recursively) is a frame of ``ambient_class``.
    ambient_class : str, optional
        The class of ambient frames (``"ambient"``). Label segments with it to add ambient
        frames by hand.
    unlabeled_ambient : int >= 0, optional
        Frames drawn at random (seeded) per labelled file, away from every labelled segment,
        and given ``ambient_class``. 0: none.
    ambient_margin_s : float >= 0 [s], optional
        Least distance between a drawn unlabeled frame (or an ambient frame of a labelled file
        in ``ambient_dirs``) and any labelled segment.
    group_column : str, optional
        Column of ``labels`` naming each file's group (deployment, site). Files it does not
        name, and every file when ``labels`` has no such column, belong to the group named
        after the folder that holds them.
    holdout : sequence of str, optional
        Groups held out for early stopping and evaluation; default ``holdout_fraction`` of the
        groups, drawn with ``seed``.
    holdout_fraction : float in (0, 1), optional
    embedder_name : str, default: "yamnet_k2"
        The embedder in ``buzzdask.embedders``, written to the model's ``embeddername``.
    embedder : str, optional
        Its handle (TF Hub URL or local SavedModel directory), overriding the configured one.
    frame_hop_s : float > 0 [s], optional
        Seconds between training frame starts (buzzdetect trained with 0.096 s).
    min_overlap_s : float > 0 [s], optional
        Least overlap of a frame with a segment for the frame to carry the segment's label.
    hidden_units : sequence of int, optional
        Hidden ReLU layers before the output layer; empty: one dense layer (as
        ``model_general_v3``).
    epochs, batch_size, patience : int > 0, optional
        Most epochs; frames per step; epochs without a better held-out loss before stopping
        (the best epoch's weights are kept).
    learning_rate : float > 0, optional
        Adam's learning rate.
    seed : int, optional
        Seeds the held-out draw, the unlabeled-frame draw and TensorFlow.
    target_precision : float in (0, 1], optional
        The evaluation reports, per class, the lowest threshold reaching this precision.
    cache_dir : path-like, optional
        The embedding cache (:mod:`buzzdask.embeddings`).
    chunk_seconds : float > 0 [s], optional
        Most audio per decode task.
    memory_budget : int or str, optional
        Most decoded audio in flight.
    batch_frames : int > 0, optional
        Most frames per embedder call.

    Returns
    -------
    TrainingResult

    Raises
    ------
    ParameterError
        For a bad option or labels table (the message names the rows), a label ending past
        the end of its file, or too few groups to hold one out.
    InputError
        For a missing directory, or labels naming audio that is missing or unreadable.
    OutputConflictError
        If ``output`` is not empty.
    ModelError
        If the embedder cannot be found or loaded.
    DecodeError
        If ffmpeg fails on a labelled file (what was embedded before stays cached).

    Notes
    -----
    The model directory holds the head SavedModel (``serving_default``: ``input``
    ``(N, embedding_size)`` to ``dense`` ``(N, n_classes)`` logits), ``config_model.json``,
    ``weights.csv`` (frames and weight per class), ``history.csv`` and ``history.json`` (one
    row per epoch), ``training.json`` (inputs with content hashes, groups, counts, settings,
    versions, times) and ``evaluation.csv`` / ``evaluation.json`` (held-out precision and
    recall per class and threshold).
    """
    started_wall = time.perf_counter()
    started = utc_now()
    settings = _settings(
        classes=classes,
        ambient_class=ambient_class,
        unlabeled_ambient=unlabeled_ambient,
        ambient_margin_s=ambient_margin_s,
        group_column=group_column,
        holdout=holdout,
        holdout_fraction=holdout_fraction,
        frame_hop_s=frame_hop_s,
        min_overlap_s=min_overlap_s,
        hidden_units=hidden_units,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        patience=patience,
        seed=seed,
        target_precision=target_precision,
    )
    spec_embedder = resolve_embedder(embedder_name, handle=embedder)
    spec = spec_embedder.frame_spec(settings["frame_hop_s"])
    frames_per_chunk = spec.frames_per_chunk(float(config.get("chunk-seconds", chunk_seconds)))
    budget = parse_bytes(config.get("memory-budget", memory_budget))
    batch = int(config.get("batch-frames", batch_frames))
    if batch <= 0:
        raise ParameterError(f"batch_frames={batch} must be a positive integer")
    table = read_labels(labels, group_column=settings["group_column"])
    label_classes = sorted(table["label"].unique())
    files = _collect_files(
        table,
        _directories(audio_dirs, "audio_dirs"),
        _directories(ambient_dirs, "ambient_dirs"),
        group_column=settings["group_column"],
    )
    classes_out = _class_list(
        settings["classes"],
        label_classes,
        table,
        ambient=settings["ambient_class"]
        if any(f.all_ambient for f in files) or settings["unlabeled_ambient"] > 0
        else None,
    )
    output_path = _check_output(output)
    cache = EmbeddingCache(
        config.get("train.cache-dir", cache_dir), embedder=spec_embedder, spec=spec
    )

    with connect(client) as connected:
        _inspect_files(connected, files, table)
        for item in files:
            _want_frames(item, spec, classes_out, settings)
        cache_stats = _embed_missing(
            connected,
            files,
            cache,
            embedder=spec_embedder,
            spec=spec,
            frames_per_chunk=frames_per_chunk,
            budget=budget,
            batch_frames=batch,
        )

    x, y, frame_groups, frame_files = _assemble(files, cache)
    groups = sorted({f.group for f in files})
    held_out = _holdout_groups(groups, settings)
    in_holdout = np.isin(frame_groups, held_out)
    counts = {
        "train": _class_counts(y[~in_holdout], classes_out),
        "holdout": _class_counts(y[in_holdout], classes_out),
    }
    empty = [c for c, n in counts["train"].items() if n == 0]
    if empty:
        raise ParameterError(
            f"class(es) {empty} have no frames outside the held-out groups {held_out}; "
            "label more audio or hold out other groups"
        )
    if not in_holdout.any():
        raise ParameterError(f"the held-out groups {held_out} have no frames")
    weights = _class_weights(y[~in_holdout])

    temporary = output_path.with_name(f".{output_path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        history, best_epoch, tf_versions = _fit_and_save(
            x[~in_holdout],
            y[~in_holdout],
            (y[~in_holdout] * weights).max(axis=1),
            x[in_holdout],
            y[in_holdout],
            directory=temporary,
            settings=settings,
        )
        # Evaluate the head as saved, through the loader analyze() uses.
        head, _ = load_head(str(temporary))
        activations = head(x[in_holdout])
        curves = pd.concat(
            [
                precision_recall(activations[:, c], y[in_holdout][:, c]).assign(**{"class": name})
                for c, name in enumerate(classes_out)
            ],
            ignore_index=True,
        )[["class", "threshold", "precision", "recall", "fpr"]]
        evaluation = _evaluate(curves, y[in_holdout], classes_out, settings["target_precision"])
        summary = {
            "frames": len(x),
            "frames_train": int((~in_holdout).sum()),
            "frames_holdout": int(in_holdout.sum()),
            "frames_per_class": counts,
            "epochs": len(history),
            "best_epoch": best_epoch,
            "embedding_cache": cache_stats,
            "wall_seconds": time.perf_counter() - started_wall,
        }
        metadata = {
            "started": started,
            "finished": utc_now(),
            "host": platform.node(),
            "classes": list(classes_out),
            "labels": _labels_source(labels, table),
            "audio_dirs": [str(Path(d).absolute()) for d in _as_list(audio_dirs)],
            "ambient_dirs": [str(Path(d).absolute()) for d in ambient_dirs],
            "files": [_file_record(f, classes_out, held_out, frame_files) for f in files],
            "groups": groups,
            "holdout_groups": held_out,
            "counts": counts,
            "class_weights": dict(zip(classes_out, weights.tolist(), strict=True)),
            "settings": {k: v for k, v in settings.items() if k != "classes"},
            "embedder": asdict(spec_embedder),
            "preprocessing": PREPROCESSING,
            "frame_length_s": spec.frame_length / spec.sample_rate,
            "frame_hop_s": spec.hop_length / spec.sample_rate,
            "frame_context_s": spec.context / spec.sample_rate,
            "embedding_cache": {"directory": str(cache.directory), **cache_stats},
            "versions": {**package_versions(), **tf_versions},
            "summary": summary,
        }
        _write_records(
            temporary,
            classes=classes_out,
            embedder_name=spec_embedder.name,
            batch_size=settings["batch_size"],
            counts=counts["train"],
            weights=weights,
            history=history,
            curves=curves,
            evaluation=evaluation,
            metadata=metadata,
            target_precision=settings["target_precision"],
        )
        output_path.parent.mkdir(parents=True, exist_ok=True)
        if output_path.is_dir():
            output_path.rmdir()  # empty (checked before any work); replaced by the new model
        os.replace(temporary, output_path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return TrainingResult(
        output=output_path,
        classes=tuple(classes_out),
        history=history,
        evaluation=evaluation,
        curves=curves,
        summary=summary,
        metadata=metadata,
    )


# -- inputs ------------------------------------------------------------------------------------
def read_labels(
    labels: str | os.PathLike[str] | pd.DataFrame, *, group_column: str = "group"
) -> pd.DataFrame:
    """Read and check a labels table.

    Parameters
    ----------
    labels : path-like or pandas.DataFrame
        CSV with columns ``file``, ``start`` [s], ``end`` [s], ``label`` (and optionally
        ``group_column``), or the same as a table.
    group_column : str
        Name of the optional group column.

    Returns
    -------
    pandas.DataFrame
        The columns above (``start``/``end`` as float) plus ``row``: where each row came from
        (``"labels.csv line 5"``), for messages.

    Raises
    ------
    InputError
        If the CSV file is missing.
    ParameterError
        If a column is missing, or a row has no file or label, a non-numeric or negative time,
        or ``end <= start`` (the message names the rows).
    """
    if isinstance(labels, pd.DataFrame):
        table = labels.copy()
        table["row"] = [f"labels row {i}" for i in table.index]
    else:
        path = Path(labels)
        if not path.is_file():
            raise InputError(f"labels file not found: {path}")
        table = pd.read_csv(path, dtype={"file": str, "label": str})
        # Line numbers as an editor shows them: the header is line 1.
        table["row"] = [f"{path.name} line {i + 2}" for i in range(len(table))]
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        raise ParameterError(
            f"labels lack column(s) {missing}; required: {list(LABEL_COLUMNS)} "
            f"(optional: {group_column!r}), found: {[c for c in table.columns if c != 'row']}"
        )
    for column in ("start", "end"):
        table[column] = pd.to_numeric(table[column], errors="coerce").astype(float)
    problems = {
        "no file": table["file"].isna() | (table["file"].astype(str).str.strip() == ""),
        "no label": table["label"].isna() | (table["label"].astype(str).str.strip() == ""),
        "start or end is not a number": table["start"].isna() | table["end"].isna(),
        "start < 0": table["start"] < 0,
        "end <= start": table["end"] <= table["start"],
    }
    for reason, bad in problems.items():
        if bad.any():
            raise ParameterError(f"labels: {reason} in {_rows(table[bad])}")
    table["file"] = table["file"].astype(str).str.strip()
    table["label"] = table["label"].astype(str).str.strip()
    columns = [*LABEL_COLUMNS, "row"]
    if group_column in table.columns:
        table["group"] = table[group_column].astype("string").str.strip()
        columns.append("group")
    return table[columns].reset_index(drop=True)


def _rows(table: pd.DataFrame, *, most: int = 5) -> str:
    rows = list(table["row"])
    more = f" and {len(rows) - most} more" if len(rows) > most else ""
    return ", ".join(rows[:most]) + more


def _as_list(paths: Any) -> list[Any]:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def _directories(paths: Any, name: str) -> list[Path]:
    directories = [Path(p).expanduser() for p in _as_list(paths)]
    missing = [str(d) for d in directories if not d.is_dir()]
    if missing:
        raise InputError(f"{name}: not a directory: {', '.join(missing)}")
    return [d.absolute() for d in directories]


def _collect_files(
    table: pd.DataFrame, audio_dirs: list[Path], ambient_dirs: list[Path], *, group_column: str
) -> list[_File]:
    """The labelled files (found in ``audio_dirs``) and the ambient ones, one entry per file."""
    if not audio_dirs:
        raise ParameterError("audio_dirs is empty: name the directories the labels refer to")
    files: dict[str, _File] = {}
    missing, ambiguous, mixed = [], [], []
    for name, segments in table.groupby("file", sort=True):
        given = Path(str(name)).expanduser()
        candidates = [given] if given.is_absolute() else [d / given for d in audio_dirs]
        found = [p for p in candidates if p.is_file()]
        if not found:
            missing.append(f"{name!r} ({_rows(segments)})")
            continue
        if len(found) > 1:
            ambiguous.append(f"{name!r} ({', '.join(map(str, found))})")
            continue
        groups = set(segments["group"].dropna()) if "group" in segments else set()
        if len(groups) > 1:
            mixed.append(f"{name!r}: {sorted(groups)} ({_rows(segments)})")
        path = str(found[0].resolve())
        group = groups.pop() if groups else found[0].parent.name
        if path in files:  # the same file spelled two ways ("a.wav", "./a.wav")
            segments = pd.concat([files[path].segments, segments])
        files[path] = _File(path=path, name=str(name), group=group, segments=segments)
    if missing:
        searched = ", ".join(str(d) for d in audio_dirs)
        raise InputError(f"labels name audio not found in {searched}: {'; '.join(missing)}")
    if ambiguous:
        raise ParameterError(
            f"labels name files found in several audio_dirs: {'; '.join(ambiguous)}; "
            "give a path that tells them apart"
        )
    if mixed:
        raise ParameterError(f"one file, several {group_column!r} values: {'; '.join(mixed)}")
    if ambient_dirs:
        _, found_ambient = discover(ambient_dirs, extensions=config.get("extensions"))
        broken = [f"{f.path} ({f.problem})" for f in found_ambient if f.problem]
        if broken:
            raise InputError(f"ambient_dirs: unreadable: {', '.join(broken)}")
        if not found_ambient:
            raise InputError(f"ambient_dirs: no audio files in {', '.join(map(str, ambient_dirs))}")
        for item in found_ambient:
            path = str(Path(item.path).resolve())
            entry = files.setdefault(
                path,
                _File(
                    path=path,
                    name=item.relative,
                    group=Path(path).parent.name,
                    segments=table.iloc[0:0],
                ),
            )
            entry.all_ambient = True
    return list(files.values())


def _class_list(
    given: Sequence[str] | None, labelled: list[str], table: pd.DataFrame, *, ambient: str | None
) -> list[str]:
    if given is None:
        extra = [ambient] if ambient is not None and ambient not in labelled else []
        return [*labelled, *extra]
    classes = [str(c) for c in given]
    if len(set(classes)) != len(classes) or not classes:
        raise ParameterError(f"classes={classes!r} must be a non-empty list of distinct names")
    unknown = table[~table["label"].isin(classes)]
    if len(unknown):
        raise ParameterError(
            f"labels {sorted(unknown['label'].unique())} are not in classes={classes} "
            f"({_rows(unknown)})"
        )
    if ambient is not None and ambient not in classes:
        raise ParameterError(f"ambient frames are asked for but {ambient!r} is not in classes")
    return classes


def _check_output(output: str | os.PathLike[str]) -> Path:
    path = Path(output).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputConflictError(
            f"output {path} already exists and is not an empty directory; choose a new one"
        )
    return path


def _inspect(path: str, *, ffprobe: str) -> tuple[AudioInfo, str] | DecodeError:
    """Probe task: the file's audio parameters and content hash (a bad file is an answer)."""
    try:
        return probe_audio(path, ffprobe=ffprobe), file_sha256(path)
    except DecodeError as error:
        return error


def _inspect_files(client: Client, files: list[_File], table: pd.DataFrame) -> None:
    """Probe and hash every file on the cluster; check the labels against the durations."""
    futures = [
        client.submit(
            _inspect,
            f.path,
            ffprobe=str(config.get("ffprobe")),
            key=task_key("inspect", f.path),
            pure=False,
        )
        for f in files
    ]
    unreadable = []
    for item, answer in zip(files, client.gather(futures), strict=True):
        if isinstance(answer, DecodeError):
            where = f" ({_rows(item.segments)})" if len(item.segments) else ""
            unreadable.append(f"{item.name}: {answer.reason}{where}")
            continue
        item.info, item.sha256 = answer
        if item.info.duration_s is None:
            unreadable.append(f"{item.name}: ffprobe gives no duration")
    if unreadable:
        raise InputError(f"cannot train on unreadable audio: {'; '.join(unreadable)}")
    late = []
    for item in files:
        assert item.info is not None and item.info.duration_s is not None
        past = item.segments[item.segments["end"] > item.info.duration_s + _END_TOLERANCE_S]
        late.extend(
            f"{row.row}: end {row.end:g} s is past the end of {item.name} "
            f"({item.info.duration_s:.3f} s)"
            for row in past.itertuples()
        )
    if late:
        raise ParameterError("labels past the end of their file: " + "; ".join(late))


# -- frames and targets ------------------------------------------------------------------------
def _want_frames(
    item: _File, spec: FrameSpec, classes: list[str], settings: Mapping[str, Any]
) -> None:
    """Set the frames wanted from a file and their multi-hot targets."""
    assert item.info is not None and item.info.duration_s is not None
    rate, hop, length = spec.sample_rate, spec.hop_length, spec.frame_length
    n_frames = spec.n_complete_frames(int(item.info.duration_s * rate))
    starts = np.arange(n_frames) * hop / rate  # seconds
    ends = starts + length / rate
    targets = np.zeros((n_frames, len(classes)), bool)
    near = np.zeros(n_frames, bool)
    margin = settings["ambient_margin_s"]
    for row in item.segments.itertuples():
        overlap = np.minimum(ends, row.end) - np.maximum(starts, row.start)
        needed = min(settings["min_overlap_s"], row.end - row.start)
        targets[overlap >= needed - 1e-9, classes.index(row.label)] = True
        near |= (ends + margin > row.start) & (starts < row.end + margin)
    ambient = ~near & ~targets.any(axis=1)
    if not item.all_ambient:
        candidates = np.flatnonzero(ambient)
        rng = np.random.default_rng([settings["seed"], int(item.sha256[:12], 16)])
        drawn = rng.choice(
            candidates, size=min(settings["unlabeled_ambient"], len(candidates)), replace=False
        )
        ambient = np.isin(np.arange(n_frames), drawn)
    if ambient.any():
        targets[ambient, classes.index(settings["ambient_class"])] = True
    item.frames = np.flatnonzero(targets.any(axis=1)).astype(np.int64)
    item.targets = targets[item.frames]


def _chunk_plans(
    missing: np.ndarray, *, n_estimated: int, frames_per_chunk: int, spec: FrameSpec
) -> list[ChunkPlan]:
    """Decode tasks covering ``missing`` frames: runs (small gaps bridged), cut into chunks.

    A run reaching the estimated last frame ends in an open chunk (``n_frames=None``), which
    decodes to the real end of the file: ffprobe's duration is only an estimate.
    """
    gap = max(1, spec.frame_length // spec.hop_length)  # bridged: cheaper than a new ffmpeg
    breaks = np.flatnonzero(np.diff(missing) > gap + 1) + 1
    plans: list[ChunkPlan] = []
    for run in np.split(missing, breaks):
        first, last = int(run[0]), int(run[-1])
        for start in range(first, last + 1, frames_per_chunk):
            n_frames = min(frames_per_chunk, last + 1 - start)
            is_open = start + n_frames >= n_estimated
            plans.append(ChunkPlan(len(plans), start, None if is_open else n_frames))
    return plans


def _embed_missing(
    client: Client,
    files: list[_File],
    cache: EmbeddingCache,
    *,
    embedder: EmbedderSpec,
    spec: FrameSpec,
    frames_per_chunk: int,
    budget: int,
    batch_frames: int,
) -> dict[str, int]:
    """Embed the wanted frames the cache lacks; return cache and embedder counts."""
    jobs: list[tuple[_File, ChunkPlan]] = []
    frames_cached = 0
    for item in files:
        cached = cache.load(item.sha256)
        missing = cached.missing(item.frames)
        frames_cached += int(np.isin(item.frames, cached.frames).sum())
        if len(missing):
            assert item.info is not None and item.info.duration_s is not None
            n_estimated = spec.n_complete_frames(int(item.info.duration_s * spec.sample_rate))
            plans = _chunk_plans(
                missing, n_estimated=n_estimated, frames_per_chunk=frames_per_chunk, spec=spec
            )
            jobs.extend((item, plan) for plan in plans)
    stats = {"frames_cached": frames_cached, "frames_embedded": 0, "embedder_calls": 0}
    if not jobs:
        return stats
    logger.info("embedding %d chunks of %d files", len(jobs), len({j[0].path for j in jobs}))
    # Hold the actor's future: once it is released, Dask forgets the actor.
    address, actor, _actor_future, decoders = _start_embedder(
        client, embedder=embedder, spec=spec, batch_frames=batch_frames
    )
    margin_s = float(config.get("decode-margin-seconds"))
    margin = round(margin_s * spec.sample_rate)
    chunk_nbytes = 4 * (spec.span(frames_per_chunk) + 2 * margin)
    most_chunks = max(1, budget // chunk_nbytes)
    groups = _groups(jobs, frames_per_chunk=frames_per_chunk, batch_frames=batch_frames)
    pending = as_completed()
    payloads: dict[str, list[tuple[_File, ChunkPlan]]] = {}
    in_flight = 0

    def submit_more() -> None:
        nonlocal in_flight
        while groups and (in_flight == 0 or in_flight + len(groups[0]) <= most_chunks):
            group = groups.pop(0)
            decoded = [
                client.submit(
                    decode_chunk,
                    item.info,
                    plan,
                    spec=spec,
                    margin_s=margin_s,
                    seekable_codecs=tuple(config.get("seekable-codecs")),
                    ffmpeg_cmd=str(config.get("ffmpeg")),
                    key=task_key("decode", item.path, plan),
                    workers=decoders,
                    allow_other_workers=True,
                    pure=False,
                )
                for item, plan in group
            ]
            future = client.submit(
                embed_chunks,
                actor,
                *decoded,
                key=task_key("embed", [f.key for f in decoded]),
                workers=[address],
                allow_other_workers=True,
                pure=False,
            )
            payloads[future.key] = group
            in_flight += len(group)
            pending.add(future)

    submit_more()
    for future in pending:
        group = payloads.pop(future.key)
        results = _result(future)
        in_flight -= len(group)
        for (item, plan), (first_frame, embeddings, messages) in zip(group, results, strict=True):
            if messages:
                logger.warning("%s: ffmpeg reported damaged audio: %s", item.name, messages)
            reached_end = plan.n_frames is None or len(embeddings) < plan.n_frames
            cache.store(
                item.sha256,
                first_frame,
                embeddings,
                file_frames=first_frame + len(embeddings) if reached_end else None,
            )
            stats["frames_embedded"] += len(embeddings)
        del future
        submit_more()
    stats["embedder_calls"] = int(actor.stats().result()["embedder_calls"])
    return stats


def _groups(
    jobs: list[tuple[_File, ChunkPlan]], *, frames_per_chunk: int, batch_frames: int
) -> list[list[tuple[_File, ChunkPlan]]]:
    """Consecutive chunks handed to the embedder together (about ``batch_frames`` frames)."""
    groups: list[list[tuple[_File, ChunkPlan]]] = []
    frames = 0
    for job in jobs:
        size = job[1].n_frames or frames_per_chunk
        if not groups or frames + size > batch_frames:
            groups.append([])
            frames = 0
        groups[-1].append(job)
        frames += size
    return groups


def _result(future: Future) -> list[tuple[int, np.ndarray, str]]:
    try:
        return future.result()
    except BuzzdaskError:  # DecodeError names the file; ModelError the embedder
        raise
    except Exception as error:
        raise ScorerError(f"embedding failed: {type(error).__name__}: {error}") from error


def _start_embedder(
    client: Client, *, embedder: EmbedderSpec, spec: FrameSpec, batch_frames: int
) -> tuple[str, Any, Future, list[str] | None]:
    """One head-less scorer actor, on a GPU worker if there is one; the others decode."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:
        client.wait_for_workers(1, timeout=300)
        workers = client.scheduler_info(n_workers=-1)["workers"]
    address = scorer_hosts(workers)[0]
    future = submit_scorer(
        client,
        address,
        key=task_key("embedder", address, embedder.handle),
        head_path=None,
        embedder_handle=embedder.handle,
        spec=spec,
        n_classes=0,
        batch_frames=batch_frames,
    )
    try:
        actor = future.result()
    except BuzzdaskError:
        raise
    except Exception as error:
        raise ScorerError(f"could not start the embedder: {error}") from error
    decoders = sorted(set(workers) - {address}) or None
    return address, actor, future, decoders


def _assemble(
    files: list[_File], cache: EmbeddingCache
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, targets, group and file of every wanted frame that exists (from the cache)."""
    xs, ys, groups, names = [], [], [], []
    for item in files:
        present, embeddings = cache.load(item.sha256).take(item.frames)
        if not len(present):
            continue
        xs.append(embeddings)
        ys.append(item.targets[np.isin(item.frames, present)])
        groups.append(np.full(len(present), item.group, dtype=object))
        names.append(np.full(len(present), item.path, dtype=object))
    if not xs:
        raise ParameterError("no labelled frame lies inside its audio; check the labels' times")
    return (
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys),
        np.concatenate(groups),
        np.concatenate(names),
    )


def _holdout_groups(groups: list[str], settings: Mapping[str, Any]) -> list[str]:
    if settings["holdout"] is not None:
        held = sorted(str(g) for g in settings["holdout"])
        unknown = sorted(set(held) - set(groups))
        if unknown or not held or len(held) >= len(groups):
            raise ParameterError(
                f"holdout={held} must name some, not all, of the groups {groups}"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        return held
    if len(groups) < 2:
        raise ParameterError(
            f"only one group ({groups}): a group must be held out for early stopping and "
            "evaluation; add a group column to the labels or put the audio in several folders"
        )
    n_held = min(len(groups) - 1, max(1, round(settings["holdout_fraction"] * len(groups))))
    order = np.random.default_rng(settings["seed"]).permutation(len(groups))
    return sorted(groups[i] for i in order[:n_held])


def _class_counts(y: np.ndarray, classes: list[str]) -> dict[str, int]:
    return {name: int(n) for name, n in zip(classes, y.sum(axis=0), strict=True)}


def _class_weights(y: np.ndarray) -> np.ndarray:
    """Balanced weights, as buzzdetect's ``weights.csv``: ``n_frames / (n_classes * n_c)``."""
    positives = y.sum(axis=0)
    return len(y) / (y.shape[1] * np.maximum(positives, 1))


# -- the head ----------------------------------------------------------------------------------
def _fit_and_save(
    x_train: np.ndarray,
    y_train: np.ndarray,
    w_train: np.ndarray,
    x_holdout: np.ndarray,
    y_holdout: np.ndarray,
    *,
    directory: Path,
    settings: Mapping[str, Any],
) -> tuple[pd.DataFrame, int, dict[str, str]]:
    """Fit the head (tf_keras, as buzzdetect's heads) and save it as a SavedModel.

    Returns
    -------
    history : pandas.DataFrame
        One row per epoch run.
    best_epoch : int
        The epoch (from 1) whose weights were kept.
    versions : dict
        TensorFlow and tf_keras versions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(settings["seed"])
    # The layer names give the serving signature buzzdetect's heads have: input -> dense.
    model = keras.Sequential(name="buzzdask_head")
    model.add(keras.Input(shape=(x_train.shape[1],), name="input"))
    for index, units in enumerate(settings["hidden_units"]):
        model.add(keras.layers.Dense(units, activation="relu", name=f"hidden_{index}"))
    model.add(keras.layers.Dense(y_train.shape[1], activation="linear", name="dense"))
    model.compile(
        optimizer=keras.optimizers.Adam(settings["learning_rate"]),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="binary_accuracy")],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=settings["patience"], restore_best_weights=True
    )
    fitted = model.fit(
        x_train,
        y_train.astype(np.float32),
        sample_weight=w_train.astype(np.float32),
        validation_data=(x_holdout, y_holdout.astype(np.float32)),
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    model.save(str(directory), save_format="tf", include_optimizer=False)
    history = pd.DataFrame(fitted.history)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    versions = {"tensorflow": str(tf.__version__), "tf_keras": str(keras.__version__)}
    return history, int(stop.best_epoch) + 1, versions


# -- evaluation --------------------------------------------------------------------------------
def precision_recall(
    activations: np.ndarray, positive: np.ndarray, *, digits: int = _DIGITS
) -> pd.DataFrame:
    """Precision, recall and false-positive rate of ``activations >= threshold``.

    Parameters
    ----------
    activations : np.ndarray [shape=(n,)]
        Raw head outputs (logits) of one class.
    positive : np.ndarray [shape=(n,), dtype=bool]
        Whether each frame truly carries the class.
    digits : int
        Thresholds are the distinct activations rounded down to this many decimals (down, so
        that each frame is detected at its own threshold).

    Returns
    -------
    pandas.DataFrame
        ``threshold`` (descending), ``precision`` (NaN where nothing is detected), ``recall``,
        ``fpr`` (NaN without positives or negatives).
    """
    activations = np.asarray(activations, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    thresholds = np.unique(np.floor(activations * 10**digits) / 10**digits)[::-1]
    scores_pos = np.sort(activations[positive])
    scores_neg = np.sort(activations[~positive])
    tp = len(scores_pos) - np.searchsorted(scores_pos, thresholds, side="left")
    fp = len(scores_neg) - np.searchsorted(scores_neg, thresholds, side="left")
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "threshold": thresholds,
                "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
                "recall": tp / len(scores_pos) if len(scores_pos) else np.nan,
                "fpr": fp / len(scores_neg) if len(scores_neg) else np.nan,
            }
        )


def _evaluate(
    curves: pd.DataFrame, y: np.ndarray, classes: list[str], target: float
) -> pd.DataFrame:
    """Per class: the lowest threshold whose precision reaches ``target``, and its scores."""
    rows = []
    for c, name in enumerate(classes):
        curve = curves[(curves["class"] == name) & (curves["precision"] >= target)]
        best = curve.loc[curve["threshold"].idxmin()] if len(curve) else None
        rows.append(
            {
                "class": name,
                "positives": int(y[:, c].sum()),
                "negatives": int((~y[:, c]).sum()),
                "threshold": np.nan if best is None else float(best["threshold"]),
                "precision": np.nan if best is None else float(best["precision"]),
                "recall": np.nan if best is None else float(best["recall"]),
                "fpr": np.nan if best is None else float(best["fpr"]),
            }
        )
    return pd.DataFrame(rows)


# -- records -----------------------------------------------------------------------------------
def _write_records(
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
    """config_model.json, weights.csv, history, training.json and evaluation beside the head."""
    write_json(
        directory / CONFIG_NAME,
        {
            "classes": list(classes),
            "embeddername": embedder_name,
            "digits_results": _DIGITS,
            "size_batch": batch_size,
            "trainer": f"buzzdask {metadata['versions']['buzzdask']}",
        },
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
    item: _File, classes: list[str], held_out: list[str], frame_files: np.ndarray
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
        "frames_wanted": _class_counts(item.targets, classes),
        "frames_used": used,
    }


def _labels_source(labels: Any, table: pd.DataFrame) -> dict[str, Any]:
    if isinstance(labels, pd.DataFrame):
        return {"path": None, "sha256": None, "rows": len(table)}
    return {"path": str(Path(labels).absolute()), "sha256": file_sha256(labels), "rows": len(table)}


# -- settings ----------------------------------------------------------------------------------
def _settings(**given: Any) -> dict[str, Any]:
    """Keyword, else ``buzzdask.train.<key>``, checked once."""
    keys = {  # keyword: (configuration key under buzzdask.train, type)
        "ambient_class": ("ambient-class", str),
        "unlabeled_ambient": ("unlabeled-ambient", int),
        "ambient_margin_s": ("ambient-margin-seconds", float),
        "group_column": ("group-column", str),
        "holdout_fraction": ("holdout-fraction", float),
        "frame_hop_s": ("frame-hop-seconds", float),
        "min_overlap_s": ("min-overlap-seconds", float),
        "epochs": ("epochs", int),
        "batch_size": ("batch-size", int),
        "learning_rate": ("learning-rate", float),
        "patience": ("patience", int),
        "seed": ("seed", int),
        "target_precision": ("target-precision", float),
    }
    settings: dict[str, Any] = {
        key: kind(config.get(f"train.{name}", given[key])) for key, (name, kind) in keys.items()
    }
    settings["hidden_units"] = [
        int(u) for u in config.get("train.hidden-units", given["hidden_units"])
    ]
    settings["holdout"] = None if given["holdout"] is None else list(given["holdout"])
    settings["classes"] = given["classes"]
    positive = ("frame_hop_s", "min_overlap_s", "epochs", "batch_size", "learning_rate")
    bad = [f"{k}={settings[k]!r} must be > 0" for k in positive if settings[k] <= 0]
    bad += [
        f"{k}={settings[k]!r} must be >= 0"
        for k in ("unlabeled_ambient", "ambient_margin_s", "patience")
        if settings[k] < 0
    ]
    if any(units <= 0 for units in settings["hidden_units"]):
        bad.append(f"hidden_units={settings['hidden_units']} must all be > 0")
    if not 0 < settings["holdout_fraction"] < 1:
        bad.append(f"holdout_fraction={settings['holdout_fraction']!r} must be in (0, 1)")
    if not 0 < settings["target_precision"] <= 1:
        bad.append(f"target_precision={settings['target_precision']!r} must be in (0, 1]")
    if bad:
        raise ParameterError("; ".join(bad))
    return settings
