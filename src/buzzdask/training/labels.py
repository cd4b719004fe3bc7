"""Labels table to audio files, frames and multi-hot targets, and the split into folds.

Frame ``i`` of a file covers ``[i * hop, i * hop + 0.96 s)``. It carries label ``c`` when it
overlaps a segment labelled ``c`` by at least ``min(min_overlap_s, segment length)``. Several
labels can apply to one frame (multi-label: one sigmoid output per class, logits stored).

Ambient frames come from two draws: every frame of a file under ``ambient_dirs`` that lies at
least ``ambient_margin_s`` from every labelled segment, and ``unlabeled_ambient`` frames drawn
(seeded by ``seed`` and the file's content hash) from the same kind of frames of each labelled
file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from buzzdask.decode import AudioInfo
from buzzdask.errors import InputError, ParameterError
from buzzdask.frames import FrameSpec
from buzzdask.inputs import as_list, discover, user_path

__all__ = [
    "LABEL_COLUMNS",
    "Labels",
    "TrainingFile",
    "check_label_ends",
    "cite_rows",
    "class_counts",
    "class_list",
    "class_weights",
    "collect_files",
    "directories",
    "holdout_groups",
    "label_paths",
    "read_labels",
    "want_frames",
]

logger = logging.getLogger(__name__)

#: Columns every labels table must have; ``start`` and ``end`` in seconds from the file's start.
LABEL_COLUMNS = ("file", "start", "end", "label")
#: A labels CSV, several (one per annotator: read as one table), or the table itself.
Labels: TypeAlias = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | pd.DataFrame
_END_TOLERANCE_S = 0.05  # a label may end this far past ffprobe's duration estimate


@dataclass
class TrainingFile:
    """One audio file of the training set and the frames wanted from it.

    Attributes
    ----------
    path : str
        Absolute, resolved path.
    name : str
        As the labels name it (or, for an ambient file, relative to its ``ambient_dirs`` entry).
    group : str
        Its group (deployment, site): the group column's value, else its folder's name.
    segments : pandas.DataFrame
        Its rows of the labels table (none for a file found only in ``ambient_dirs``).
    all_ambient : bool
        Whether it lies in ``ambient_dirs``: all its frames away from segments are ambient.
    info : AudioInfo or None
        ffprobe's answer, once probed on the cluster.
    sha256 : str
        Content hash, once probed ("" before).
    frames : np.ndarray [shape=(n_wanted,), dtype=int64]
        Frame indices wanted for training, ascending (set by :func:`want_frames`).
    targets : np.ndarray [shape=(n_wanted, n_classes), dtype=bool]
        Multi-hot targets of ``frames``.
    """

    path: str
    name: str
    group: str
    segments: pd.DataFrame
    all_ambient: bool = False
    info: AudioInfo | None = None
    sha256: str = ""
    frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    targets: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))


def read_labels(labels: Labels, *, group_column: str = "group") -> pd.DataFrame:
    """Read and check a labels table.

    Parameters
    ----------
    labels : path-like, sequence of path-like, or pandas.DataFrame
        CSV with columns ``file``, ``start`` [s], ``end`` [s], ``label`` (and optionally
        ``group_column``), several (their rows in one table; a group cell one lacks is empty),
        or the same as a table.
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
        paths = label_paths(labels)
        if not paths:
            raise ParameterError("no labels file given")
        resolved = [path.resolve() for path in paths]
        again = sorted(
            {str(p) for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1}
        )
        if again:
            raise ParameterError(f"labels file(s) given twice: {', '.join(again)}")
        # One file's rows are cited by its name; several files' by their paths as given.
        tables = [
            _read_csv(path, name=path.name if len(paths) == 1 else str(path)) for path in paths
        ]
        grouped = [group_column in t.columns for t in tables]
        if any(grouped) and not all(grouped):
            logger.warning(
                "labels %s have no %r column, unlike %s: their files' groups are the folders "
                "that hold them (a site labelled in both could then train and be held out)",
                ", ".join(str(p) for p, g in zip(paths, grouped, strict=True) if not g),
                group_column,
                ", ".join(str(p) for p, g in zip(paths, grouped, strict=True) if g),
            )
        table = pd.concat(tables, ignore_index=True)
    missing = [c for c in LABEL_COLUMNS if c not in table.columns]
    if missing:
        found = [c for c in table.columns if c != "row"]
        # Excel in a German or French locale saves "CSV" with semicolons.
        separated = len(found) == 1 and any(mark in str(found[0]) for mark in ";\t")
        raise ParameterError(
            f"labels lack column(s) {missing}; required: {list(LABEL_COLUMNS)} "
            f"(optional: {group_column!r}), found: {found}"
            + ("; its columns are not separated by commas: save it as CSV (comma)" * separated)
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
            raise ParameterError(f"labels: {reason} in {cite_rows(table[bad])}")
    table["file"] = table["file"].astype(str).str.strip()
    table["label"] = table["label"].astype(str).str.strip()
    _refuse_labels_alike(table)
    columns = [*LABEL_COLUMNS, "row"]
    if group_column in table.columns:
        group = table[group_column].astype("string").str.strip()
        # An empty cell, or one of a file without the column: the file's folder.
        table["group"] = group.mask(group.fillna("") == "")
        columns.append("group")
    return table[columns].reset_index(drop=True)


def label_paths(labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The labels CSVs given: one path, or a sequence of them."""
    if isinstance(labels, (str, os.PathLike)):
        return [Path(labels)]
    return [Path(path) for path in labels]


def _read_csv(path: Path, *, name: str) -> pd.DataFrame:
    """One labels CSV as text, with ``row`` naming each line (``"labels.csv line 5"``)."""
    if not path.is_file():
        raise InputError(f"labels file not found: {path}")
    # Names as written: "None", "NA" or "01" are a label or a group, not missing or 1.
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    # Line numbers as an editor shows them: the header is line 1.
    table["row"] = [f"{name} line {i + 2}" for i in range(len(table))]
    return table


def _refuse_labels_alike(table: pd.DataFrame) -> None:
    """Labels spelt two ways ("Ambient", "ambient"; "ins buzz", "ins_buzz") would be two classes.

    Raises
    ------
    ParameterError
        Naming each spelling and its first rows.
    """
    spellings: dict[str, list[str]] = {}
    for label in table["label"].unique():
        spellings.setdefault(_spelling(label), []).append(label)
    alike = [sorted(names) for names in spellings.values() if len(names) > 1]
    if alike:
        described = "; ".join(
            " and ".join(
                f"{name!r} ({cite_rows(table[table['label'] == name], most=2)})" for name in names
            )
            for names in alike
        )
        raise ParameterError(
            f"labels {described} differ only in case or spacing, so they would train as "
            "different classes: spell each class one way"
        )


def _spelling(label: str) -> str:
    """A label with case and spacing left out: what tells two spellings of one class."""
    return re.sub(r"[\s_-]+", "_", label.casefold())


def cite_rows(table: pd.DataFrame, *, most: int = 5) -> str:
    """Where rows of a labels table came from, for messages: ``"labels.csv line 3, ..."``.

    Parameters
    ----------
    table : pandas.DataFrame
        Rows of :func:`read_labels`'s table (its ``row`` column).
    most : int > 0
        Rows named; the others are counted (``"... and 4 more"``).
    """
    rows = list(table["row"])
    more = f" and {len(rows) - most} more" if len(rows) > most else ""
    return ", ".join(rows[:most]) + more


def directories(paths: Any, name: str) -> list[Path]:
    """The directories ``paths`` names (one or several), absolute.

    Raises
    ------
    InputError
        If one is not a directory; the message names the option ``name``.
    """
    found = [user_path(p) for p in as_list(paths)]
    missing = [str(d) for d in found if not d.is_dir()]
    if missing:
        raise InputError(f"{name}: not a directory: {', '.join(missing)}")
    return found


def collect_files(
    table: pd.DataFrame,
    audio_dirs: list[Path],
    ambient_dirs: list[Path],
    *,
    group_column: str,
    extensions: Sequence[str],
) -> list[TrainingFile]:
    """The labelled files (found in ``audio_dirs``) and the ambient ones, one entry per file.

    ``extensions`` are the suffixes of the audio files looked for under ``ambient_dirs``.
    """
    if not audio_dirs:
        raise ParameterError("audio_dirs is empty: name the directories the labels refer to")
    files: dict[str, TrainingFile] = {}
    missing, ambiguous, mixed = [], [], []
    used: set[Path] = set()  # the audio_dirs a labelled file was found in
    for name, segments in table.groupby("file", sort=True):
        given = Path(str(name)).expanduser()
        if given.is_absolute():
            found = [given] if given.is_file() else []
        else:
            holding = [d for d in audio_dirs if (d / given).is_file()]
            used.update(holding)
            found = [d / given for d in holding]
        if not found:
            missing.append(f"{name!r} ({cite_rows(segments)})")
            continue
        if len(found) > 1:
            ambiguous.append(f"{name!r} ({cite_rows(segments)}: {', '.join(map(str, found))})")
            continue
        groups = set(segments["group"].dropna()) if "group" in segments else set()
        if len(groups) > 1:
            mixed.append(f"{name!r}: {sorted(groups)} ({cite_rows(segments)})")
        path = str(found[0].resolve())
        group = groups.pop() if groups else found[0].parent.name
        if path in files:  # the same file spelled two ways ("a.wav", "./a.wav")
            segments = pd.concat([files[path].segments, segments])
        files[path] = TrainingFile(path=path, name=str(name), group=group, segments=segments)
    if missing:
        searched = ", ".join(str(d) for d in audio_dirs)
        raise InputError(f"labels name audio not found in {searched}: {'; '.join(missing)}")
    if ambiguous:
        raise ParameterError(
            f"labels name files found in several audio_dirs: {'; '.join(ambiguous)}; "
            "write their absolute paths in the labels"
        )
    if mixed:
        raise ParameterError(f"one file, several {group_column!r} values: {'; '.join(mixed)}")
    unused = [d for d in audio_dirs if d not in used]
    _warn_of_unused("audio_dirs", unused, "no file the labels name")
    if ambient_dirs:
        _add_ambient_files(files, table, ambient_dirs, extensions=extensions)
    return list(files.values())


def _add_ambient_files(
    files: dict[str, TrainingFile],
    table: pd.DataFrame,
    ambient_dirs: list[Path],
    *,
    extensions: Sequence[str],
) -> None:
    """Every audio file under ``ambient_dirs``, marked all-ambient (added when not labelled)."""
    _, found_ambient = discover(ambient_dirs, extensions=list(extensions))
    broken = [f"{f.path} ({f.problem})" for f in found_ambient if f.problem]
    if broken:
        raise InputError(f"ambient_dirs: unreadable: {', '.join(broken)}")
    if not found_ambient:
        raise InputError(f"ambient_dirs: no audio files in {', '.join(map(str, ambient_dirs))}")
    holding = {d for d in ambient_dirs for f in found_ambient if Path(f.path).is_relative_to(d)}
    _warn_of_unused("ambient_dirs", [d for d in ambient_dirs if d not in holding], "no audio file")
    for item in found_ambient:
        path = str(Path(item.path).resolve())
        entry = files.setdefault(
            path,
            TrainingFile(
                path=path,
                name=item.relative,
                group=Path(path).parent.name,
                segments=table.iloc[0:0],
            ),
        )
        entry.all_ambient = True


def _warn_of_unused(option: str, unused: list[Path], holding: str) -> None:
    """Say which directories given train on nothing (a typo, or the wrong folder)."""
    if unused:
        folders = ", ".join(map(str, unused))
        logger.warning("%s: %s in %s: nothing there to train on", option, holding, folders)


def class_list(
    given: Sequence[str] | None, labelled: list[str], table: pd.DataFrame, *, ambient: str | None
) -> list[str]:
    """The output classes in column order: ``given``, else the labels then ``ambient``.

    Parameters
    ----------
    given : sequence of str or None
        The ``classes`` option.
    labelled : list of str
        The labels of ``table``, sorted.
    table : pandas.DataFrame
        The labels table, for messages.
    ambient : str or None
        The ambient class, when ambient frames are asked for.

    Raises
    ------
    ParameterError
        If ``given`` is empty or repeats a name, misses a label, or misses ``ambient``; or a
        label is ``ambient`` spelt another way.
    """
    alike = [
        label
        for label in labelled
        if ambient is not None and label != ambient and _spelling(label) == _spelling(ambient)
    ]
    if alike:
        raise ParameterError(
            f"labels {alike} ({cite_rows(table[table['label'].isin(alike)], most=2)}) differ "
            f"from the ambient class {ambient!r} only in case or spacing, so they would train "
            f"as a second ambient class: spell them {ambient!r}"
        )
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
            f"({cite_rows(unknown)})"
        )
    if ambient is not None and ambient not in classes:
        raise ParameterError(f"ambient frames are asked for but {ambient!r} is not in classes")
    return classes


def check_label_ends(files: list[TrainingFile]) -> None:
    """Refuse labels ending past the end of their (probed) file.

    Raises
    ------
    ParameterError
        Naming every such row, its end and the file's duration.
    """
    late: list[str] = []
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


def want_frames(
    item: TrainingFile, spec: FrameSpec, classes: list[str], settings: Mapping[str, Any]
) -> None:
    """Set the frames wanted from a (probed) file and their multi-hot targets.

    Parameters
    ----------
    item : TrainingFile
        Its ``frames`` and ``targets`` are set.
    spec : FrameSpec
        The embedder's frame geometry.
    classes : list of str
        The output classes in column order.
    settings : mapping
        The training settings: ``min_overlap_s``, ``ambient_margin_s``, ``ambient_class``,
        ``unlabeled_ambient`` and ``seed``.
    """
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


def holdout_groups(
    groups: list[str],
    settings: Mapping[str, Any],
    *,
    drawable: Collection[str] | None = None,
    class_groups: Mapping[str, Collection[str]] | None = None,
) -> list[str]:
    """The groups held out for early stopping and evaluation, sorted.

    ``settings["holdout"]`` when given, else ``round(holdout_fraction * n)`` of the ``n``
    ``drawable`` groups (default all; at least one, never all) drawn with ``settings["seed"]``.
    The trainer leaves out groups of ambient folders only: held out, the ambient class they
    bring would have no frame to train on. Likewise a draw passes over a group whose absence
    would leave a class of ``class_groups`` (class -> the groups with its frames) with none.

    Raises
    ------
    ParameterError
        If ``holdout`` names an unknown group or one not drawable (an ambient folder's), none
        or all of the drawable ones, there is one group only, or every group drawable holds the
        last frames of a class.
    """
    pool = groups if drawable is None else [group for group in groups if group in drawable]
    if settings["holdout"] is not None:
        named = sorted(str(g) for g in settings["holdout"])
        unknown = sorted(set(named) - set(groups))
        ambient = sorted(set(named) - set(pool) - set(unknown))
        if unknown or ambient or not named or len(named) >= len(pool):
            raise ParameterError(
                f"holdout={named} must name some, not all, of the groups {pool}"
                + (f" (unknown: {unknown})" if unknown else "")
                + (f" (ambient folders always train: {ambient})" if ambient else "")
            )
        return named
    if len(pool) < 2:
        raise ParameterError(
            f"{len(pool)} group(s) of labelled audio ({pool}; ambient folders always train): "
            "a group must be held out for early stopping and evaluation; add a group column "
            "to the labels or put the audio in several folders"
        )
    n_held = min(len(pool) - 1, max(1, round(settings["holdout_fraction"] * len(pool))))
    held: list[str] = []
    for index in np.random.default_rng(settings["seed"]).permutation(len(pool)):
        trial = {*held, pool[index]}
        if all(set(owners) - trial for owners in (class_groups or {}).values()):
            held.append(pool[index])
        if len(held) == n_held:
            break
    if not held:
        sole = "; ".join(
            f"{name}: {sorted(owners)[0]}"
            for name, owners in (class_groups or {}).items()
            if len(owners) == 1
        )
        raise ParameterError(
            f"no group of {pool} can be held out: each holds all the frames of a class "
            f"({sole}), which would then have none to train on. Groups are the folders that "
            "hold the files unless the labels have a group column: label the class in more "
            "groups, or give the files groups of their own"
        )
    return sorted(held)


def class_counts(y: np.ndarray, classes: list[str]) -> dict[str, int]:
    """Frames per class of multi-hot targets ``y`` [shape=(n_frames, n_classes)]."""
    return {name: int(n) for name, n in zip(classes, y.sum(axis=0), strict=True)}


def class_weights(y: np.ndarray) -> np.ndarray:
    """Balanced weights, as buzzdetect's ``weights.csv``: ``n_frames / (n_classes * n_c)``."""
    positives = y.sum(axis=0)
    return len(y) / (y.shape[1] * np.maximum(positives, 1))
