"""Embedding cache: frames already embedded are read back instead of embedded again.

One directory per embedder and frame geometry (``<root>/<settings key>/``, its ``settings.json``
says what the key stands for), inside it one directory per audio content hash, holding Parquet
parts of ``frame`` (int64, index in the file) and ``embedding`` (fixed-size list of float32)::

    <root>/<settings key>/settings.json
    <root>/<settings key>/<audio sha256>/part-<first frame>-<uuid>.parquet

A file's content hash, not its path, names it, so moving or renaming audio keeps its cache, and a
changed file is embedded anew. A part written by a decode that reached the end of the file also
records the file's real frame count, so frames past the end are not asked for again.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from buzzdask.decode import PREPROCESSING
from buzzdask.frames import FrameSpec
from buzzdask.models import EmbedderSpec
from buzzdask.write import write_json, write_table

__all__ = ["CachedEmbeddings", "EmbeddingCache", "file_sha256"]

_METADATA_KEY = b"buzzdask-embeddings"
_FORMAT = 1  # bump when the part layout changes: older caches are then simply not found


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's content (not its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CachedEmbeddings:
    """What the cache holds for one audio file.

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
        """Frames of ``wanted`` that are neither cached nor known to lie past the end."""
        wanted = np.asarray(wanted, dtype=np.int64)
        absent = wanted[~np.isin(wanted, self.frames)]
        return absent if self.file_frames is None else absent[absent < self.file_frames]

    def take(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The cached frames among ``wanted`` and their embeddings (rows in ``frames`` order)."""
        present = np.isin(self.frames, wanted)
        return self.frames[present], self.embeddings[present]


class EmbeddingCache:
    """Embeddings of audio frames on disk, keyed by audio content, embedder and frame geometry.

    Parameters
    ----------
    root : path-like
        The cache directory (shared by every embedder and geometry).
    embedder : EmbedderSpec
        A local embedder is identified by its content hash, a URL handle by the URL.
    spec : FrameSpec
        Frame length, hop and context, in samples at the embedder's rate.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, embedder: EmbedderSpec, spec: FrameSpec
    ) -> None:
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
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]
        self.directory = Path(root).expanduser().absolute() / key

    def load(self, audio_sha256: str) -> CachedEmbeddings:
        """Everything cached for the audio with this content hash (empty when nothing is)."""
        frames: list[np.ndarray] = []
        embeddings: list[np.ndarray] = []
        file_frames: int | None = None
        for part in sorted((self.directory / audio_sha256).glob("part-*.parquet")):
            table = pq.read_table(part)
            column = table.column("embedding").combine_chunks()
            frames.append(table.column("frame").to_numpy())
            embeddings.append(
                column.flatten().to_numpy().reshape(len(table), column.type.list_size)
            )
            recorded = json.loads((table.schema.metadata or {}).get(_METADATA_KEY, b"{}"))
            if recorded.get("file_frames") is not None:
                file_frames = int(recorded["file_frames"])
        if not frames:
            return CachedEmbeddings(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), None)
        all_frames = np.concatenate(frames)
        # Parts may overlap (a run embedded again around a newly wanted frame): keep one copy.
        unique, first = np.unique(all_frames, return_index=True)
        return CachedEmbeddings(unique, np.concatenate(embeddings)[first], file_frames)

    def store(
        self,
        audio_sha256: str,
        first_frame: int,
        embeddings: np.ndarray,
        *,
        file_frames: int | None = None,
    ) -> None:
        """Write the embeddings of frames ``first_frame, first_frame + 1, ...`` as one part.

        Parameters
        ----------
        audio_sha256 : str
            Content hash of the audio file (:func:`file_sha256`).
        first_frame : int >= 0
        embeddings : np.ndarray [shape=(n_frames, embedding_size), dtype=float32]
        file_frames : int, optional
            The file's real frame count, when this decode reached the end of the file.
        """
        if not (self.directory / "settings.json").exists():
            write_json(self.directory / "settings.json", self.settings)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        n_frames, size = embeddings.shape
        table = pa.table(
            {
                "frame": pa.array(first_frame + np.arange(n_frames, dtype=np.int64)),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(embeddings.reshape(-1)), size
                ),
            }
        ).replace_schema_metadata({_METADATA_KEY: json.dumps({"file_frames": file_frames})})
        name = f"part-{first_frame:09d}-{uuid.uuid4().hex[:8]}.parquet"
        write_table(table, self.directory / audio_sha256 / name)
