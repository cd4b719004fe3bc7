"""The embedding store: embeddings of audio frames on disk, shared by analysis and training.

An embedder (YAMNet) is most of a model's cost and a head almost none, so what an analysis or a
training embedded is kept, and neither embeds those frames again: another head re-scores a
season from the store without touching the audio (:func:`buzzdask.rescore`). One directory per
embedder and frame geometry, its name a hash of what ``settings.json`` records (the embedder's
content hash, the preprocessing, the sample rate and the frame length, hop and context); inside
it, one directory per audio content hash::

    <root>/<settings key>/settings.json
    <root>/<settings key>/catalog.jsonl        which file names the stored audio had
    <root>/<settings key>/<audio sha256>/part-<first frame>-<frames>[-end].parquet

A part holds consecutive frames: ``frame`` (int64, index in the file) and ``embedding``
(fixed-size list of float32, the embedder's output as it gave it). ``-end``: the decode that
made it reached the end of the audio, which has ``first + frames`` frames in all. A file's
content hash, not its path, names it, so moving or renaming audio keeps its embeddings, and a
changed file is embedded anew. The catalog, one line per chunk an analysis stored, gives the
names and chunks of the audio, which is what a re-scoring walks.

Embeddings stay float32: float16 would halve the store but move activations of the lab's model
by more than the 1e-4 a re-scoring must keep (``benchmarks/heads.py`` measures both).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from buzzdask.decode import PREPROCESSING
from buzzdask.errors import InputError, ModelError
from buzzdask.frames import FrameSpec
from buzzdask.inputs import first_names, user_path
from buzzdask.models import EmbedderSpec, feed_file
from buzzdask.write import (
    KEPT_EMBEDDINGS,
    append_json_lines,
    numeric_array,
    write_json,
    write_table,
)

__all__ = [
    "STORED_CODEC",
    "CachedEmbeddings",
    "EmbeddingStore",
    "StoredChunk",
    "file_sha256",
    "find_store",
    "load_stored",
    "open_store",
    "stored_embedder",
]

# Bump when the part layout changes: older stores are then simply not found.
_FORMAT = 2
_PART = re.compile(r"part-(\d{9})-(\d{6})(-end)?\.parquet$")
_SETTINGS = "settings.json"
_CATALOG = "catalog.jsonl"
logger = logging.getLogger(__name__)

#: The codec a re-scoring's inputs give: embeddings, read from the store, never decoded.
STORED_CODEC = "stored embeddings"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content (not its name)."""
    digest = hashlib.sha256()
    feed_file(digest, path)
    return digest.hexdigest()


@dataclass
class CachedEmbeddings:
    """What the store holds for one audio file.

    Parameters
    ----------
    frames : np.ndarray [shape=(n,), dtype=int64]
        Frame indices, sorted, unique.
    embeddings : np.ndarray [shape=(n, embedding_size), dtype=float32]
        One row per entry of ``frames``.
    file_frames : int or None
        The file's real number of frames, once a decode reached its end.
    """

    frames: np.ndarray
    embeddings: np.ndarray
    file_frames: int | None

    def missing(self, wanted: np.ndarray) -> np.ndarray:
        """Frames of ``wanted`` that are neither stored nor known to lie past the end."""
        wanted = np.asarray(wanted, dtype=np.int64)
        absent = wanted[~np.isin(wanted, self.frames)]
        return absent if self.file_frames is None else absent[absent < self.file_frames]

    def take(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored frames among ``wanted`` and their embeddings (rows in ``frames`` order)."""
        present = np.isin(self.frames, wanted)
        return self.frames[present], self.embeddings[present]


@dataclass
class StoredChunk:
    """A chunk's embeddings read back from the store: what a scorer's heads take directly.

    Parameters
    ----------
    embeddings : np.ndarray [shape=(n_frames, embedding_size), dtype=float32]
    first_frame : int >= 0
    n_frames : int >= 0
    messages : str
        Always empty (what ffmpeg said was reported when the audio was decoded).
    """

    embeddings: np.ndarray
    first_frame: int
    n_frames: int
    messages: str = ""


@dataclass(frozen=True)
class StoredRef:
    """Where a chunk's embeddings are: a plain value sent to the task that reads them."""

    directory: str
    audio_sha256: str
    first_frame: int
    n_frames: int | None


class EmbeddingStore:
    """Embeddings on disk, keyed by audio content, embedder and frame geometry.

    Parameters
    ----------
    root : path-like
        The store (shared by every embedder and geometry).
    embedder : EmbedderSpec
        Identified by its content hash (a URL handle without one, by the URL).
    spec : FrameSpec
        Frame length, hop and context, in samples at the embedder's rate.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, embedder: EmbedderSpec, spec: FrameSpec
    ) -> None:
        self.root = user_path(root)
        self.settings: dict[str, Any] = {
            "format": _FORMAT,
            "embedder": embedder.name,
            "embedder_id": embedder.sha256 or embedder.handle,
            "preprocessing": PREPROCESSING,
            "sample_rate": spec.sample_rate,
            "frame_length": spec.frame_length,
            "frame_hop": spec.hop_length,
            "frame_context": spec.context,
        }
        self.directory = self.root / _key(self.settings)

    @property
    def catalog_path(self) -> Path:
        """The catalog: one line per chunk an analysis stored."""
        return self.directory / _CATALOG

    # -- writing -----------------------------------------------------------------------------
    def store(
        self, audio_sha256: str, first_frame: int, embeddings: np.ndarray, *, at_end: bool
    ) -> None:
        """Write the embeddings of frames ``first_frame, first_frame + 1, ...`` as one part.

        Parameters
        ----------
        audio_sha256 : str
            Content hash of the audio file (:func:`file_sha256`).
        first_frame : int >= 0
        embeddings : np.ndarray [shape=(n_frames, embedding_size), dtype=float32]
            ``n_frames`` may be 0 for a part that only records where the audio ends.
        at_end : bool
            Whether the decode reached the end of the audio (it has ``first_frame + n_frames``
            frames).

        Notes
        -----
        The part's name says which frames it holds, so writing the same frames again (a resumed
        run) replaces it with the same values rather than adding a copy.
        """
        if not (self.directory / _SETTINGS).exists():
            write_json(self.directory / _SETTINGS, self.settings)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        n_frames, size = embeddings.shape
        table = pa.table(
            {
                "frame": numeric_array(first_frame + np.arange(n_frames, dtype=np.int64), np.int64),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    numeric_array(embeddings.reshape(-1), np.float32), size
                ),
            }
        )
        name = f"part-{first_frame:09d}-{n_frames:06d}{'-end' if at_end else ''}.parquet"
        write_table(table, self.directory / audio_sha256 / name)

    def record(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Add catalog lines for chunks whose parts are in place.

        Each names the audio (``file``, its relative name; ``path``, where it was analysed;
        ``sha256``, ``size``, ``mtime_ns``, ``duration_s``) and the chunk (``chunk``,
        ``first_frame``, ``frames``, ``frames_per_chunk``).
        """
        entries = list(entries)
        if entries:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Synced before the journal vouches for the chunks: after a crash, a resume redoes
            # no chunk whose catalog line was lost, and a re-scoring would miss it.
            append_json_lines(self.catalog_path, entries, sync=True)

    # -- reading -----------------------------------------------------------------------------
    def load(self, audio_sha256: str) -> CachedEmbeddings:
        """Everything stored for the audio with this content hash (empty when nothing is)."""
        frames: list[np.ndarray] = []
        embeddings: list[np.ndarray] = []
        for part in self._parts(audio_sha256):
            try:
                part_frames, part_embeddings = _read_part(part.path)
            except ModelError as error:  # its frames are missing: embedded again
                logger.warning("%s", error)
                continue
            frames.append(part_frames)
            embeddings.append(part_embeddings)
        file_frames = self.file_frames(audio_sha256)
        if not frames:
            empty = np.zeros((0, 0), np.float32)
            return CachedEmbeddings(np.zeros(0, np.int64), empty, file_frames)
        all_frames = np.concatenate(frames)
        # Parts may overlap (training embeds around its labels): keep one copy.
        unique, first = np.unique(all_frames, return_index=True)
        return CachedEmbeddings(unique, np.concatenate(embeddings)[first], file_frames)

    def file_frames(self, audio_sha256: str) -> int | None:
        """The audio's number of frames, once a decode reached its end (from part names)."""
        ends = _audio_ends(self._parts(audio_sha256))
        return min(ends) if ends else None

    def frames_of(self, audio_sha256: str, first_frame: int, n_frames: int) -> int | None:
        """How many of frames ``first_frame ... + n_frames - 1`` the audio has, if all are stored.

        Read from the parts' names, not their contents; ``None`` when some are not stored.
        """
        parts = self._parts(audio_sha256)
        stop = _stop(parts, first_frame, first_frame + n_frames)
        if stop <= first_frame and not any(part.first == first_frame for part in parts):
            # An end before these frames, and no decode of them: the run that stored it may
            # have stopped there (killed after a short chunk, which may be damage, no end).
            return None
        covered = first_frame
        for part in sorted(parts, key=lambda p: p.first):
            if part.first > covered:
                break
            covered = max(covered, part.first + part.n_frames)
        return max(0, stop - first_frame) if covered >= stop else None

    def catalog(
        self, *, recordings: Collection[str] = (), roots: Collection[str] = ()
    ) -> dict[str, list[dict[str, Any]]]:
        """The chunks an analysis stored, by file name, in chunk order.

        A name's latest audio (by the last line naming it) replaces any earlier one (the file
        changed and was analysed again). Where analyses of different folders stored different
        audio under one name (``siteA/a1.mp3`` of two seasons kept in one store), the audio
        under one of ``roots`` is given (the re-scored analysis' input folder), else the latest,
        and a warning names the others. Audio stored under several names (moved, renamed, or
        analysed from another folder) is given once, under the latest (a warning names the
        others), except the names in ``recordings``: an analysis's own inputs, copies of one
        recording among them, are each given. Analyses with other chunk lengths chunk a file
        differently: the chunks of one of them are given, the one that stored the most frames
        (of equals, the latest), never a mix that would give frames twice.
        """
        # name -> audio sha256 -> its {frames per chunk -> {chunk index -> entry}}, its path
        # (where lines record it) and its last line
        stored: dict[str, dict[str, _Stored]] = {}
        if self.catalog_path.exists():
            lines = self.catalog_path.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a last line cut short by a kill
                    continue
                audio = stored.setdefault(entry["file"], {}).setdefault(
                    entry["sha256"], _Stored(chunkings={}, path=None, line=number)
                )
                audio.line, audio.path = number, entry.get("path") or audio.path
                per_chunk = int(entry["frames_per_chunk"])
                chunks = audio.chunkings.pop(per_chunk, {})
                chunks[int(entry["chunk"])] = entry
                audio.chunkings[per_chunk] = chunks
        files: dict[str, tuple[str, dict[int, dict[int, dict[str, Any]]]]] = {}
        latest_line: dict[str, int] = {}
        elsewhere: list[str] = []
        for name, audios in stored.items():
            latest_first = sorted(audios.items(), key=lambda item: -item[1].line)
            wanted = {os.path.join(root, name) for root in roots}
            sha, chosen = next(
                (item for item in latest_first if item[1].path in wanted), latest_first[0]
            )
            files[name], latest_line[name] = (sha, chosen.chunkings), chosen.line
            others = sorted({a.path for _, a in latest_first if a.path and a.path != chosen.path})
            if others and chosen.path:
                elsewhere.append(f"{name}: {chosen.path}, not {first_names(others, shown=2)}")
        if elsewhere:
            logger.warning(
                "%s holds different audio under one name, stored by analyses of different "
                "folders: given %s. Re-score the others from their own analysis' output, or "
                "keep each season's embeddings in a store of its own",
                self.directory,
                first_names(elsewhere, shown=3, separator="; "),
            )
        names: dict[str, list[str]] = {}  # audio sha256 -> its names, the latest first
        for name in sorted(files, key=latest_line.__getitem__, reverse=True):
            names.setdefault(files[name][0], []).append(name)
        given: list[str] = []
        for all_names in names.values():
            own = [name for name in all_names if name in recordings] or all_names[:1]
            earlier = [name for name in all_names if name not in own]
            given.extend(own)
            if earlier:
                logger.warning(
                    "%s holds the audio of %s under earlier names too (%s): given as %s only",
                    self.directory,
                    own[0],
                    first_names(earlier, shown=3),
                    first_names(own, shown=3),
                )
        catalog = {}
        for name in sorted(given):
            chunks = max(
                reversed(files[name][1].values()),
                key=lambda c: sum(int(e["frames"]) for e in c.values()),
            )
            catalog[name] = [chunks[i] for i in sorted(chunks)]
        return catalog

    def _parts(self, audio_sha256: str) -> list[_Part]:
        return _parts_in(self.directory / audio_sha256)

    def embedding_size(self) -> int:
        """Values per stored embedding (from the first readable part's schema).

        Raises
        ------
        ModelError
            If the store holds no readable part.
        """
        for part in self.directory.glob("*/part-*.parquet"):
            try:
                return int(pq.read_schema(part).field("embedding").type.list_size)
            except (OSError, pa.ArrowException, KeyError):  # damaged: its chunks fail alone
                continue
        raise ModelError(f"{self.directory} holds no readable embeddings")

    def ref(self, audio_sha256: str, first_frame: int, n_frames: int | None) -> StoredRef:
        """What :func:`load_stored` needs to read these frames back on a worker."""
        return StoredRef(str(self.directory), audio_sha256, first_frame, n_frames)


@dataclass(frozen=True)
class _Part:
    path: Path
    first: int
    n_frames: int
    at_end: bool


def load_stored(ref: StoredRef) -> StoredChunk:
    """Task: the stored embeddings of frames ``ref.first_frame ...`` (to the audio's end).

    Raises
    ------
    ModelError
        If a frame is not stored (a part removed since the run was planned).
    """
    folder = Path(ref.directory) / ref.audio_sha256
    parts = sorted(_parts_in(folder), key=lambda part: part.path.name)
    asked = ref.first_frame + (ref.n_frames if ref.n_frames is not None else 1 << 62)
    stop = _stop(parts, ref.first_frame, asked)
    frames: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for part in parts:
        if part.first < stop and part.first + part.n_frames > ref.first_frame and part.n_frames:
            part_frames, part_rows = _read_part(part.path)
            frames.append(part_frames)
            rows.append(part_rows)
    wanted = np.arange(ref.first_frame, max(ref.first_frame, stop), dtype=np.int64)
    if not frames:
        if len(wanted):
            raise ModelError(f"{folder}: frames {ref.first_frame}–{stop - 1} are not stored")
        return StoredChunk(np.zeros((0, 0), np.float32), ref.first_frame, 0)
    all_frames = np.concatenate(frames)
    unique, first_rows = np.unique(all_frames, return_index=True)
    positions = np.searchsorted(unique, wanted)
    if len(wanted) and (
        positions[-1] >= len(unique) or not np.array_equal(unique[positions], wanted)
    ):
        raise ModelError(f"{folder}: some of frames {ref.first_frame}–{stop - 1} are not stored")
    embeddings = np.concatenate(rows)[first_rows][positions]
    return StoredChunk(embeddings, ref.first_frame, len(wanted))


def find_store(path: str | os.PathLike[str]) -> Path:
    """The embedding store at ``path``, or in the analysis output ``path`` (its ``embeddings``).

    Checked before any embedder is resolved, so that a path holding no store says so first.

    Raises
    ------
    InputError
        If ``path`` does not exist.
    ModelError
        If it holds no embeddings an analysis stored (a catalog).
    """
    given = user_path(path)
    if not given.exists():
        raise InputError(
            f"{given} does not exist: give the output directory of an analysis that kept its "
            "embeddings, or an embedding store"
        )
    roots = [given, given / KEPT_EMBEDDINGS]
    if (given / _CATALOG).is_file():  # one set of the store (a re-scoring records its path)
        roots.append(given.parent)
    kept = _kept_by(given)
    if kept is not None:  # an analysis' output: the store it recorded (one model's of several)
        roots.append(kept.parent)
    for root in roots:
        if any(root.glob(f"*/{_CATALOG}")):
            return root
    raise _no_catalog(given / KEPT_EMBEDDINGS if (given / KEPT_EMBEDDINGS).is_dir() else given)


def _kept_by(output: Path) -> Path | None:
    """The store set an analysis output recorded keeping its embeddings in, if it did."""
    try:
        recorded = json.loads((output / "buzzdask.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kept = recorded.get("embeddings") if isinstance(recorded, dict) else None
    return Path(kept) if isinstance(kept, str) else None


def _no_catalog(root: Path) -> ModelError:
    return ModelError(
        f"{root} holds no embeddings an analysis stored (no */{_CATALOG}); "
        f"analyse with --keep-embeddings first"
    )


def stored_embedder(
    root: str | os.PathLike[str], *, frame_hop_s: float | None = None
) -> tuple[EmbedderSpec, float] | None:
    """The embedder and frame hop of the embeddings under ``root``: its one set at that hop.

    A re-scoring never loads the embedder: the store's record of it (name, content hash,
    frame geometry) is all it needs, on a machine without the embedder or TF Hub.

    Parameters
    ----------
    root : path-like
        A store (:func:`find_store`).
    frame_hop_s : float > 0 [s], optional
        The hop wanted; without it, the store's, where all its sets share one.

    Returns
    -------
    (EmbedderSpec, float [s]) or None
        The embedder, its ``handle`` the set's directory (never loaded), and the hop; ``None``
        where ``root`` holds no set of this format and preprocessing, or sets of several
        embedders at that hop (the embedder given then chooses; :func:`open_store` says what
        it holds when none fits).

    Raises
    ------
    ModelError
        Where ``root`` holds sets at several hops and none is wanted, or none at the hop wanted
        (both name the hops it holds).
    """
    sets = []
    for path in sorted(Path(root).glob(f"*/{_SETTINGS}")):
        settings = json.loads(path.read_text(encoding="utf-8"))
        current = (settings.get("format"), settings.get("preprocessing")) == (
            _FORMAT,
            PREPROCESSING,
        )
        if current and (path.parent / _CATALOG).exists():
            sets.append((path.parent, settings))
    held = sorted({settings["frame_hop"] / settings["sample_rate"] for _, settings in sets})
    if frame_hop_s is not None:
        sets = [
            (directory, settings)
            for directory, settings in sets
            if round(frame_hop_s * settings["sample_rate"]) == settings["frame_hop"]
        ]
    if held and (not sets or (frame_hop_s is None and len(held) > 1)):
        hops = " and ".join(f"{hop:g} s" for hop in held)
        wanted = "" if frame_hop_s is None else f", none at {frame_hop_s:g} s"
        raise ModelError(
            f"{root} holds embeddings at frame hops {hops}{wanted}: choose one with "
            "frame_hop_s (--framehop)"
        )
    if len(sets) != 1:
        return None
    directory, settings = sets[0]
    rate = int(settings["sample_rate"])
    embedder = EmbedderSpec(
        name=str(settings["embedder"]),
        handle=str(directory.absolute()),
        sample_rate=rate,
        frame_length_s=settings["frame_length"] / rate,
        frame_context_s=settings["frame_context"] / rate,
        sha256=str(settings["embedder_id"]),
    )
    return embedder, settings["frame_hop"] / rate


def open_store(
    root: str | os.PathLike[str], *, embedder: EmbedderSpec, spec: FrameSpec
) -> EmbeddingStore:
    """The store under ``root`` for this embedder and geometry; it must hold a catalog.

    Raises
    ------
    ModelError
        If ``root`` holds embeddings of other embedders, preprocessing or frames only (named
        with their content hashes), or none.
    """
    store = EmbeddingStore(root, embedder=embedder, spec=spec)
    if store.catalog_path.exists():
        return store
    found = []
    wanted = _describe(store.settings)
    for settings_path in sorted(Path(store.root).glob(f"*/{_SETTINGS}")):
        other = json.loads(settings_path.read_text(encoding="utf-8"))
        if not (settings_path.parent / _CATALOG).exists():
            continue
        if _key(other) == store.directory.name:
            # The set, copied alone under another name: its name is how it is found.
            raise ModelError(
                f"{settings_path.parent} holds these embeddings under another folder name: "
                f"rename it {store.directory.name} (what a store names it), or copy the "
                "store's whole folder (embeddings/)"
            )
        found.append(_describe(other))
    if not found:
        raise _no_catalog(Path(store.root))
    raise ModelError(
        f"{store.root} holds embeddings of {'; '.join(found)}, not of {wanted}: re-scoring "
        "needs embeddings made by the model's own embedder, preprocessing and frames"
    )


def _describe(settings: Mapping[str, Any]) -> str:
    hop_s = settings["frame_hop"] / settings["sample_rate"]
    return (
        f"embedder {settings['embedder']} (sha256 {str(settings['embedder_id'])[:12]}…, "
        f"{settings['preprocessing']}, hop {hop_s:g} s, format {settings['format']})"
    )


def _key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_part(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A part's frame numbers ``[shape=(n,)]`` and embeddings ``[shape=(n, d)]``.

    Read as one Parquet file, not through ``pq.read_table``'s dataset layer: 0.57 against 1.2
    CPU-ms per part here, which a re-scoring of many short recordings pays once per file.
    """
    try:
        with pq.ParquetFile(path) as part:
            table = part.read()
    except (OSError, pa.ArrowException) as error:
        raise ModelError(
            f"stored embeddings {path} cannot be read ({error}); analysing its recording "
            "again with keep_embeddings (--keep-embeddings) pointing at this store stores them "
            "anew"
        ) from error
    column = table.column("embedding").combine_chunks()
    rows = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return table.column("frame").to_numpy(), rows


@dataclass
class _Stored:
    """One audio (by its sha256) a catalog names a file by, as :meth:`catalog` gathers it."""

    chunkings: dict[int, dict[int, dict[str, Any]]]
    path: str | None
    line: int


def _parts_in(folder: Path) -> list[_Part]:
    """The parts stored for one audio (its folder), from their names."""
    if not folder.is_dir():
        return []
    return [
        _Part(folder / m.group(0), int(m.group(1)), int(m.group(2)), bool(m.group(3)))
        for path in folder.iterdir()
        if (m := _PART.fullmatch(path.name))
    ]


def _stop(parts: Sequence[_Part], first_frame: int, stop: int) -> int:
    """Where frames ``first_frame ... stop - 1`` end: at the audio's end, if it comes first.

    That end is where a decode of these frames, chunked as asked, ended (an ``-end`` part
    starting at ``first_frame``), or one of the audio's (:func:`_audio_ends`).
    """
    own = [p.first + p.n_frames for p in parts if p.at_end and p.first == first_frame]
    return min([stop, *_audio_ends(parts), *own])


def _audio_ends(parts: Sequence[_Part]) -> list[int]:
    """Where decodes found the audio's end: each ``-end`` part's, but not one with audio after.

    Audio stored after it says it was no end: a chunk that came back short of damage its
    decoder dropped (a FLAC's), and the chunks after it decoded.
    """
    last_start = max((part.first for part in parts if part.n_frames), default=-1)
    return [
        part.first + part.n_frames
        for part in parts
        if part.at_end and part.first + part.n_frames > last_start
    ]
