"""One training run: options and inputs checked, frames embedded, head fitted, directory written.

:func:`train` runs the steps of the other modules in order: :mod:`~buzzdask.training.labels`
(labels to files, frames and targets), :mod:`~buzzdask.training.embed` (probing and embedding on
the cluster, into the :mod:`~buzzdask.store`) and :mod:`~buzzdask.training.head`
(fitting and evaluation), then :mod:`~buzzdask.training.records` (``training.json`` and the
rest, beside the head), and moves the finished model directory into place.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from distributed import Client

from buzzdask.errors import OutputConflictError, ParameterError
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.inputs import as_list, first_names, user_path
from buzzdask.logs import quiet_workers
from buzzdask.models import resolve_embedder
from buzzdask.progress import format_count
from buzzdask.session import connect, stops_remembered
from buzzdask.settings import Settings, load_settings
from buzzdask.store import EmbeddingStore
from buzzdask.training.embed import embed_missing, inspect_files
from buzzdask.training.head import evaluate, fit_and_save
from buzzdask.training.labels import (
    Labels,
    TrainingFile,
    check_label_ends,
    class_counts,
    class_list,
    class_weights,
    collect_files,
    directories,
    holdout_groups,
    label_paths,
    read_labels,
    want_frames,
)
from buzzdask.training.records import TrainingInputs, TrainingResult, TrainingSet, write_records
from buzzdask.write import new_sibling, utc_now

logger = logging.getLogger(__name__)

__all__ = ["train"]

_NO_FRAMES = "no labelled frame lies inside its audio; check the labels' times"


def train(
    labels: Labels,
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
    labels : path-like, sequence of path-like, or pandas.DataFrame
        CSV (or table) of labelled segments, one row each: ``file`` (relative to one of
        ``audio_dirs``, or absolute), ``start`` and ``end`` [s], ``label``; optionally a group
        column (see ``group_column``). Several CSVs (one per annotator) train as one table.
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
        The embedding cache (:mod:`buzzdask.store`).
    chunk_seconds : float in (0, 86400] [s], optional
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
    if not isinstance(labels, pd.DataFrame):
        # Read here, and hashed into the records at the end.
        paths = [user_path(path) for path in label_paths(labels)]
        labels = paths[0] if len(paths) == 1 else paths
    base = load_settings(
        chunk_seconds=chunk_seconds,
        memory_budget=memory_budget,
        batch_frames=batch_frames,
        train=None if cache_dir is None else {"cache_dir": os.fspath(cache_dir)},
    )
    settings = _settings(
        base,
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
    inputs = _resolve(
        labels,
        audio_dirs,
        ambient_dirs=ambient_dirs,
        output=output,
        settings=settings,
        embedder_name=embedder_name,
        embedder=embedder,
        base=base,
    )
    with stops_remembered() as raise_if_stopped:
        cache_stats = _embed_on_cluster(client, inputs)
        raise_if_stopped()  # dropped as the embedding's futures went: not after every epoch
        data = _training_set(inputs)
        output_path = inputs.output
        temporary = output_path.with_name(f".{output_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            result = _fit_into(
                temporary,
                inputs,
                data,
                cache_stats=cache_stats,
                started=started,
                started_wall=started_wall,
            )
            raise_if_stopped()  # a Ctrl-C or SIGTERM Python dropped: no model, as for any other
            output_path.parent.mkdir(parents=True, exist_ok=True)
            try:
                if output_path.is_dir():  # empty (checked before any work): the model replaces it
                    output_path.rmdir()
                os.replace(temporary, output_path)
            except OSError as error:
                # Filled meanwhile (another training to the same folder, a resubmitted job):
                # the finished model is kept beside it, not thrown away.
                kept = new_sibling(output_path)
                os.replace(temporary, kept)
                raise OutputConflictError(
                    f"{output_path} was filled while this training ran ({error.strerror}); the "
                    f"trained model is in {kept}"
                ) from None
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return result


def _resolve(
    labels: Labels,
    audio_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    ambient_dirs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    settings: dict[str, Any],
    embedder_name: str,
    embedder: str | None,
    base: Settings,
) -> TrainingInputs:
    """Read the labels, find the files, check the output, then resolve the embedder.

    The local checks come first: they take no time, and a TF Hub embedder may be downloaded.
    """
    table = read_labels(labels, group_column=settings["group_column"])
    label_classes = sorted(table["label"].unique())
    files = collect_files(
        table,
        directories(audio_dirs, "audio_dirs"),
        directories(ambient_dirs, "ambient_dirs"),
        group_column=settings["group_column"],
        extensions=base.extensions,
    )
    classes = class_list(
        settings["classes"],
        label_classes,
        table,
        ambient=settings["ambient_class"]
        if any(f.all_ambient for f in files) or settings["unlabeled_ambient"] > 0
        else None,
    )
    if settings["holdout"] is not None:  # names checked before the cluster starts
        holdout_groups(sorted({item.group for item in files}), settings, drawable=_labelled(files))
    output_path = _check_output(output)
    spec_embedder = resolve_embedder(embedder_name, handle=embedder, settings=base)
    spec = spec_embedder.frame_spec(settings["frame_hop_s"])
    cache = EmbeddingStore(base.train.cache_dir, embedder=spec_embedder, spec=spec)
    return TrainingInputs(
        labels=labels,
        audio_dirs=audio_dirs,
        ambient_dirs=ambient_dirs,
        table=table,
        files=files,
        classes=classes,
        settings=settings,
        embedder=spec_embedder,
        spec=spec,
        output=output_path,
        cache=cache,
        frames_per_chunk=spec.frames_per_chunk(base.chunk_seconds),
        base=base,
    )


def _labelled(files: Sequence[TrainingFile]) -> set[str]:
    """Groups of labelled audio, the ones a holdout is drawn from; the others always train.

    Labelled: with segments of the labels, wherever the file is (an ambient folder too), or
    outside the ambient folders.
    """
    return {item.group for item in files if len(item.segments) or not item.all_ambient}


def _check_output(output: str | os.PathLike[str]) -> Path:
    path = user_path(output)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutputConflictError(
            f"output {path} already exists and is not an empty directory; choose a new one"
        )
    # The model is written beside it, then renamed into place: found now, not after the fit.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as error:
        raise OutputConflictError(
            f"cannot create output {path} ({error.strerror or error}); choose another output"
        ) from None
    return path


def _embed_on_cluster(client: Client | str | None, inputs: TrainingInputs) -> dict[str, int]:
    """Probe the files, check the labels against them, embed the wanted frames the cache lacks.

    Returns the cache and embedder counts (:func:`~buzzdask.training.embed.embed_missing`).
    """
    tools = find_ffmpeg(ffmpeg=inputs.base.ffmpeg, ffprobe=inputs.base.ffprobe)
    # Decode tasks run the ffmpeg found here, by its absolute path, on every node.
    base = inputs.base.with_overrides(ffmpeg=tools.ffmpeg)
    with connect(client, local=inputs.base.local_cluster) as connected:
        quiet_workers(connected, timeout_s=base.scorer_ping_seconds)
        inspect_files(connected, inputs.files, tools=tools)
        check_label_ends(inputs.files)
        for item in inputs.files:
            want_frames(item, inputs.spec, inputs.classes, inputs.settings)
        _warn_of_odd_files(inputs.files)
        _warn_of_short_draws(inputs.files, inputs.classes, inputs.settings)
        # The checks of the frames embedded, on the frames wanted, before minutes of
        # embedding: those embedded can only be fewer (a file shorter than its header said).
        if not any(len(item.frames) for item in inputs.files):
            raise ParameterError(_NO_FRAMES)
        _folds(
            inputs,
            np.concatenate([item.targets for item in inputs.files]),
            np.concatenate([_groups_of(item, len(item.frames)) for item in inputs.files]),
        )
        return embed_missing(
            connected,
            inputs.files,
            inputs.cache,
            embedder=inputs.embedder,
            spec=inputs.spec,
            frames_per_chunk=inputs.frames_per_chunk,
            settings=base,
        )


def _training_set(inputs: TrainingInputs) -> TrainingSet:
    """The embedded frames (from the cache), split into folds by group.

    Raises
    ------
    ParameterError
        If a class has no frames in the training folds or is on all of them, or the held-out
        groups have none.
    """
    x, y, frame_groups, frame_files = _assemble(inputs.files, inputs.cache)
    held_out, in_holdout, counts = _folds(inputs, y, frame_groups)
    return TrainingSet(
        x=x,
        y=y,
        in_holdout=in_holdout,
        frame_files=frame_files,
        groups=sorted({f.group for f in inputs.files}),
        held_out=held_out,
        counts=counts,
        weights=class_weights(y[~in_holdout]),
    )


def _folds(
    inputs: TrainingInputs, y: np.ndarray, frame_groups: np.ndarray
) -> tuple[list[str], np.ndarray, dict[str, dict[str, int]]]:
    """The held-out groups, which frames are theirs, and the frames per class in each fold.

    ``y`` [shape=(n_frames, n_classes)] holds the frames' targets, ``frame_groups``
    [shape=(n_frames,)] their groups.

    Raises
    ------
    ParameterError
        If a class has no frames in the training folds, or the held-out groups have none.
    """
    # Drawn from the groups that have frames: one of only files too short would hold out nothing.
    labelled = _labelled(inputs.files)
    frameless = [c for c, n in class_counts(y, inputs.classes).items() if n == 0]
    if frameless:
        raise ParameterError(
            f"class(es) {frameless} have no frames to train on: their files give none (see the "
            "files left out above); label the class in more audio"
        )
    held_out = holdout_groups(
        sorted(set(frame_groups.tolist())),
        inputs.settings,
        drawable=labelled,
        class_groups={
            name: set(frame_groups[y[:, column] > 0].tolist())
            for column, name in enumerate(inputs.classes)
        },
    )
    in_holdout = np.isin(frame_groups, held_out)
    counts = {
        "train": class_counts(y[~in_holdout], inputs.classes),
        "holdout": class_counts(y[in_holdout], inputs.classes),
    }
    empty = [c for c, n in counts["train"].items() if n == 0]
    if empty:
        raise ParameterError(
            f"class(es) {empty} have no frames outside the held-out groups {held_out}; "
            "label more audio or hold out other groups"
        )
    everywhere = [c for c, n in counts["train"].items() if n == (~in_holdout).sum()]
    if everywhere:
        # A head learns nothing from a class on every frame: it scores it high everywhere.
        raise ParameterError(
            f"class(es) {everywhere} are on every training frame, so there is nothing to tell "
            "them from: add audio without them (--ambient DIR, --unlabeled-ambient N)"
        )
    if not in_holdout.any():
        raise ParameterError(f"the held-out groups {held_out} have no frames")
    return held_out, in_holdout, counts


def _warn_of_odd_files(files: Sequence[TrainingFile]) -> None:
    """Warn of files that give no frame, and of the same audio under two names.

    The same audio in both folds would score the held-out groups on audio the head was trained on.
    """
    empty = [item.name for item in files if not len(item.frames)]
    if empty:
        logger.warning(
            "%s no frame to train on (shorter than one frame, or their labels are): left out: %s",
            format_count(len(empty), "file") + (" gives" if len(empty) == 1 else " give"),
            first_names(empty, shown=5),
        )
    by_audio: dict[str, list[TrainingFile]] = {}
    for item in files:
        by_audio.setdefault(item.sha256, []).append(item)
    for same in by_audio.values():
        if len(same) > 1:
            logger.warning(
                "the same audio is in %s (groups %s): if they fall in different folds, the "
                "evaluation scores audio the head was trained on",
                " and ".join(item.name for item in same),
                ", ".join(sorted({item.group for item in same})),
            )


def _warn_of_short_draws(
    files: Sequence[TrainingFile], classes: Sequence[str], settings: Mapping[str, Any]
) -> None:
    """Say which labelled files gave fewer ambient frames than ``unlabeled_ambient`` asked.

    Too few of their frames are far enough from every label (a file labelled whole): the draw
    takes what there is, which the run's numbers alone did not tell.
    """
    wanted = settings["unlabeled_ambient"]
    if not wanted or settings["ambient_class"] not in classes:
        return
    column = classes.index(settings["ambient_class"])
    labelled = [item for item in files if not item.all_ambient and len(item.frames)]
    short = [item.name for item in labelled if item.targets[:, column].sum() < wanted]
    if short:
        logger.warning(
            "unlabeled_ambient=%d: %s fewer ambient frames (too few are %g s or more from "
            "every label; as many as there are were drawn): %s",
            wanted,
            format_count(len(short), "labelled file") + (" gives" if len(short) == 1 else " give"),
            settings["ambient_margin_s"],
            first_names(short, shown=5),
        )


def _groups_of(item: TrainingFile, n_frames: int) -> np.ndarray:
    """The group of ``n_frames`` of ``item``'s frames, one each."""
    return np.full(n_frames, item.group, dtype=object)


def _assemble(
    files: list[TrainingFile], cache: EmbeddingStore
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, targets, group and file of every wanted frame that exists (from the cache)."""
    xs, ys, groups, names = [], [], [], []
    for item in files:
        present, embeddings = cache.load(item.sha256).take(item.frames)
        if not len(present):
            continue
        xs.append(embeddings)
        ys.append(item.targets[np.isin(item.frames, present)])
        groups.append(_groups_of(item, len(present)))
        names.append(np.full(len(present), item.path, dtype=object))
    if not xs:
        raise ParameterError(_NO_FRAMES)
    return (
        np.concatenate(xs).astype(np.float32),
        np.concatenate(ys),
        np.concatenate(groups),
        np.concatenate(names),
    )


def _fit_into(
    directory: Path,
    inputs: TrainingInputs,
    data: TrainingSet,
    *,
    cache_stats: dict[str, int],
    started: str,
    started_wall: float,
) -> TrainingResult:
    """Fit and evaluate the head, and write it with its records into ``directory``.

    ``started`` is when the training started (UTC, ISO 8601), ``started_wall`` the same as
    :func:`time.perf_counter` [s].
    """
    settings, classes = inputs.settings, inputs.classes
    train_rows, holdout_rows = ~data.in_holdout, data.in_holdout
    history, best_epoch, tf_versions = fit_and_save(
        data.x[train_rows],
        data.y[train_rows],
        (data.y[train_rows] * data.weights).max(axis=1),
        data.x[holdout_rows],
        data.y[holdout_rows],
        directory=directory,
        settings=settings,
    )
    # Evaluate the head as saved, through the loader analyze() uses.
    curves, evaluation = evaluate(
        directory,
        data.x[holdout_rows],
        data.y[holdout_rows],
        classes,
        target_precision=settings["target_precision"],
    )
    return write_records(
        directory,
        inputs,
        data,
        history=history,
        best_epoch=best_epoch,
        curves=curves,
        evaluation=evaluation,
        tf_versions=tf_versions,
        cache_stats=cache_stats,
        started=started,
        started_wall=started_wall,
    )


# -- settings ---------------------------------------------------------------------------------
#: train() keywords and the ``buzzdask.train`` settings they override.
_KEYWORDS = {
    "ambient_class": "ambient_class",
    "unlabeled_ambient": "unlabeled_ambient",
    "ambient_margin_s": "ambient_margin_seconds",
    "group_column": "group_column",
    "holdout_fraction": "holdout_fraction",
    "frame_hop_s": "frame_hop_seconds",
    "min_overlap_s": "min_overlap_seconds",
    "hidden_units": "hidden_units",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "learning_rate": "learning_rate",
    "patience": "patience",
    "seed": "seed",
    "target_precision": "target_precision",
}


def _settings(base: Settings, **given: Any) -> dict[str, Any]:
    """Keyword, else ``buzzdask.train.<key>``, checked once (by :mod:`buzzdask.settings`)."""
    overrides = {_KEYWORDS[k]: v for k, v in given.items() if k in _KEYWORDS and v is not None}
    train = base.with_overrides(train=overrides).train
    settings: dict[str, Any] = {k: getattr(train, field) for k, field in _KEYWORDS.items()}
    settings["hidden_units"] = list(train.hidden_units)
    # One name alone is a group or a class, not its letters.
    for key in ("holdout", "classes"):
        settings[key] = None if given[key] is None else [str(v) for v in as_list(given[key])]
    return settings
