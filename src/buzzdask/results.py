"""Reading a run's output directory: its metadata and its frames, whole or one recording at a time.

Works on a finished run and on one still going or stopped part-way (only partitions already
renamed into place are read; see :mod:`buzzdask.write` for the layout). Exports, summaries and
plots all start here, so each reads the output the same way.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from buzzdask.errors import InputError, ParameterError
from buzzdask.write import PARTITION_GLOB, OutputLayout

__all__ = ["Run", "open_run", "read_frames"]

logger = logging.getLogger(__name__)


def read_frames(dataset: str | os.PathLike[str], *, columns: Sequence[str] | None = None) -> Any:
    """A partitioned scores dataset as a dask DataFrame (one partition per chunk file).

    Parameters
    ----------
    dataset : path-like
        The ``scores/`` directory of an output.
    columns : sequence of str, optional
        Only these columns (default: all).

    Returns
    -------
    dask.dataframe.DataFrame
        Columns ``file``, ``start``, ``end`` [s], ``activation_<class>`` (float32) and any
        ``detections_<class>`` (bool); rows in no particular order across partitions.
    """
    import dask.dataframe as dd
    from fsspec.implementations.local import LocalFileSystem

    # No hive partitioning: an input folder named "site=A" is a name, not a column. A local
    # file system given and glob characters escaped, the path is a path: "::" in it chains no
    # URLs and "*" or "[x]" globs nothing.
    return dd.read_parquet(
        glob.escape(os.fspath(dataset)),
        columns=list(columns) if columns is not None else None,
        dataset={"partitioning": None},
        filesystem=LocalFileSystem(),
    )


@dataclass(frozen=True)
class Run:
    """One analysis output, opened for reading.

    Attributes
    ----------
    output : Path
        The output directory (absolute).
    metadata : dict
        ``buzzdask.json`` as written by :func:`buzzdask.analyze` (``status`` is ``"running"``
        until the run finishes, ``"interrupted"`` where Ctrl-C or SIGTERM stopped it,
        ``"failed"`` where an error did).
    """

    output: Path
    metadata: dict[str, Any] = field(repr=False)

    def __repr__(self) -> str:
        # What a notebook wants to see of it: which run, how far it got, which head.
        status, model = self.metadata.get("status"), self.metadata.get("model", {}).get("name")
        return f"Run(output={str(self.output)!r}, status={status!r}, model={model!r})"

    @property
    def layout(self) -> OutputLayout:
        """The output's paths."""
        return OutputLayout(self.output)

    @property
    def dataset(self) -> Path:
        """The partitioned Parquet dataset (``output / "scores"``)."""
        return self.layout.scores

    @property
    def complete(self) -> bool:
        """Whether the run finished (``status == "complete"``); a partial run is still readable."""
        return self.metadata.get("status") == "complete"

    def warn_if_unfinished(self, doing: str) -> None:
        """Log that the run has not finished (running, or stopped) before ``doing`` its frames.

        A watch between passes has marked its output complete, but holds it: files may still
        be on their way, or cut short.
        """
        from buzzdask.lock import holder_around
        from buzzdask.settings import load_settings

        # One head's of several: their run holds the output above it.
        found = holder_around(self.output, stale_s=load_settings().lock_stale_seconds)
        holder = None if found is None else found[1]
        if self.complete and holder is not None:
            logger.warning(
                "%s: a run still writes to it (%s; a watch between its passes, or a resume); "
                "%s the frames written so far, of recordings that may be cut short or not "
                "there yet",
                self.output,
                holder.describe(),
                doing,
            )
        elif not self.complete and holder is not None:
            logger.warning(
                "%s: the run is still running (%s); %s the frames written so far",
                self.output,
                holder.describe(),
                doing,
            )
        elif not self.complete:
            logger.warning(
                "%s: the run has not finished (it was stopped: analyze with --resume, "
                "on_conflict='resume' in Python, finishes it); %s the frames written so far",
                self.output,
                doing,
            )

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's classes, in its output order (the order of the activation columns)."""
        return tuple(self.metadata["classes"])

    @property
    def model(self) -> dict[str, Any]:
        """The model's description (:meth:`buzzdask.ModelSpec.as_metadata`)."""
        return dict(self.metadata["model"])

    @property
    def model_path(self) -> Path:
        """The model directory the run used (it may since have moved)."""
        return Path(self.metadata["model"]["path"])

    def metrics_model(
        self, model: str | os.PathLike[str] | None, *, precision: float | None
    ) -> Path:
        """The model directory whose test metrics serve ``precision``: ``model``, else the run's.

        A ``model`` other than the one the run recorded (its content hash differs) is warned
        of: its metrics describe another head.

        Raises
        ------
        ParameterError
            ``model`` given without a ``precision``, which alone reads it.
        """
        from buzzdask.models import model_config_path, model_sha256

        if model is None:
            return self.model_path
        if precision is None:
            raise ParameterError(
                f"the model directory {os.fspath(model)} serves the test metrics of a precision, "
                "and none is given (--precision)"
            )
        path = Path(model).expanduser()
        recorded = self.metadata["model"].get("sha256")
        if recorded and model_config_path(path).is_file() and model_sha256(path) != recorded:
            logger.warning(
                "%s is not the model %s was analysed with (its content differs from the one "
                "its buzzdask.json records): its test metrics describe another head",
                path,
                self.output,
            )
        return path

    @property
    def digits_results(self) -> int | None:
        """Decimals buzzdetect rounds activations to in its CSVs (``None``: not rounded)."""
        digits = self.metadata["model"].get("digits_results")
        return int(digits) if digits is not None else None

    @property
    def sample_rate(self) -> int:
        """The embedder's sample rate [Hz]."""
        return int(self.metadata["sample_rate"])

    @property
    def frame_hop_s(self) -> float:
        """Distance between frame starts [s]: ``start[i] = i * frame_hop_s``."""
        return float(self.metadata["frame_hop_s"])

    @property
    def frame_length_s(self) -> float:
        """One frame's length [s]: ``end = start + frame_length_s``."""
        return float(self.metadata["frame_length_s"])

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds the run wrote ``detections_<class>`` columns for (may be empty)."""
        recorded = self.metadata.get("thresholds") or {}
        # Either {class: value} or a record of their origin holding them under "values".
        if isinstance(recorded.get("values"), dict):
            recorded = recorded["values"]
        return {name: float(value) for name, value in recorded.items()}

    @property
    def input_root(self) -> Path:
        """The directory the ``file`` column's relative names are relative to."""
        return Path(self.metadata["inputs"]["root"])

    def recordings(self) -> list[str]:
        """The input files with at least one partition written: relative POSIX names, sorted."""
        scores = self.dataset
        if not scores.is_dir():
            return []
        names = {
            path.parent.relative_to(scores).as_posix() for path in scores.rglob(PARTITION_GLOB)
        }
        return sorted(names)

    def failed_recordings(self) -> list[str]:
        """Input files a problem stopped (``errors.parquet`` rows with ``kept`` false), sorted.

        Some of them have frames (a later chunk failed, the file was deleted mid-run), most
        none. Empty while the run has not written its errors table.
        """
        return self._with_problems(kept=False)

    def damaged_recordings(self) -> list[str]:
        """Input files scored despite a problem (``errors.parquet`` rows, ``kept`` true), sorted.

        Damaged audio ffmpeg decoded around, or a file cut short (its header promised more than
        it holds): their frames are what could be read. Empty while the run has not written
        its errors table.
        """
        return self._with_problems(kept=True)

    def _with_problems(self, *, kept: bool) -> list[str]:
        path = self.layout.errors
        if not path.exists():
            return []
        errors = pd.read_parquet(path, columns=["file", "kept"])
        return sorted(set(errors.loc[errors["kept"].astype(bool) == kept, "file"]))

    def unfinished_recordings(self) -> list[str]:
        """Recordings with frames written but not all their audio scored, sorted.

        Those a problem stopped (:meth:`failed_recordings`) and those whose journal does not
        reach their end: chunks ``0..k`` all written, the audio ending in chunk ``k``. A run
        "complete" has not finished every file it holds where its last resume named only some
        of its folders. (Journals written before they said where the audio ended: in a run not
        finished, chunk ``k`` short of a whole chunk of frames, which only a file's last is; a
        file ending exactly on a chunk's end then counts as unfinished.)
        """
        with_frames = set(self.recordings())
        unfinished = with_frames.intersection(self.failed_recordings())
        frames_per_chunk = self.metadata.get("fingerprint", {}).get("frames_per_chunk", 0)
        chunks_of: dict[str, dict[int, dict[str, Any]]] = {}
        for (relative, index), entry in self.layout.read_journal().items():
            chunks_of.setdefault(relative, {})[index] = entry
        for relative in with_frames:
            chunks = chunks_of.get(relative, {})
            last = chunks.get(len(chunks) - 1, {})  # chunks 0..k all there: the k-th
            # Older journals: a finished run's files are whole (a resume then judged them all).
            short = self.complete or int(last.get("frames", frames_per_chunk)) < frames_per_chunk
            if not (last and max(chunks) == len(chunks) - 1 and last.get("ends", short)):
                unfinished.add(relative)
        return sorted(unfinished)

    def partitions(self, relative: str) -> list[Path]:
        """The partition files of one recording, in chunk order."""
        return sorted(self._recording_dir(relative).glob(PARTITION_GLOB))

    def require_scores(self) -> None:
        """Refuse a run that has not written any frame.

        Raises
        ------
        InputError
            If the run has not written any partition yet (or, finished, none at all: every
            input failed or was shorter than a frame).
        """
        if not self.dataset.is_dir() or next(self.dataset.rglob(PARTITION_GLOB), None) is None:
            raise InputError(
                f"{self.output} holds no scored frames{'' if self.complete else ' yet'} "
                "(nothing under scores/)"
            )

    def frames(self, columns: str | Sequence[str] | None = None) -> Any:
        """Every frame written so far, as a dask DataFrame (see :func:`read_frames`).

        Parameters
        ----------
        columns : str or sequence of str, optional
            Only these columns (default: all).

        Raises
        ------
        InputError
            If the run has not written any partition yet.
        ParameterError
            A column the run's scores lack.
        """
        self.require_scores()
        return read_frames(self.dataset, columns=self._columns(columns))

    def recording_frames(
        self, relative: str, *, columns: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """One recording's frames, read from its own partitions only, sorted by ``start``.

        Parameters
        ----------
        relative : str
            The recording's relative name, as in the ``file`` column (``"site/a.wav"``).
        columns : str or sequence of str, optional
            Only these columns (default: all).

        Returns
        -------
        pandas.DataFrame [shape=(n_frames, n_columns)]
            With a fresh ``RangeIndex``.

        Raises
        ------
        InputError
            If no partition of ``relative`` exists.
        ParameterError
            A column the run's scores lack.
        """
        import pyarrow.parquet as pq

        paths = self.partitions(relative)
        if not paths:
            raise InputError(
                f"no scores for {relative!r} in {self.output}; recordings with scores: "
                f"{_some(self.recordings())}"
            )
        wanted = self._columns(columns, schema_of=paths[0])
        tables = [pq.read_table(path, columns=wanted) for path in paths]
        frame = pd.concat([table.to_pandas() for table in tables], ignore_index=True)
        if "start" in frame.columns:
            frame = frame.sort_values("start", kind="stable", ignore_index=True)
        return frame

    def _columns(
        self, columns: str | Sequence[str] | None, *, schema_of: Path | None = None
    ) -> list[str] | None:
        """``columns`` as a list, each checked against a partition's (``schema_of``'s)."""
        import pyarrow.parquet as pq

        if columns is None:
            return None
        wanted = [columns] if isinstance(columns, str) else list(columns)
        partition = schema_of or next(self.dataset.rglob(PARTITION_GLOB), None)
        known = pq.read_schema(partition).names if partition is not None else wanted
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ParameterError(f"columns {unknown} are not in the run's scores: {known}")
        return wanted

    def _recording_dir(self, relative: str) -> Path:
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise InputError(f"{relative!r} is not a recording's relative name")
        return self.dataset.joinpath(*parts)


def open_run(output: str | os.PathLike[str]) -> Run:
    """Open a buzzdask output directory (finished or partial) for reading.

    Parameters
    ----------
    output : path-like
        A directory :func:`buzzdask.analyze` wrote (it holds ``buzzdask.json``).

    Returns
    -------
    Run

    Raises
    ------
    InputError
        If ``output`` is missing, is not a directory, or holds no readable ``buzzdask.json``.
    """
    layout = OutputLayout(output)
    if not layout.root.exists():
        raise InputError(f"output {layout.root} does not exist")
    if not layout.root.is_dir():
        raise InputError(f"output {layout.root} is not a directory")
    try:
        metadata = json.loads(layout.metadata.read_text(encoding="utf-8"))
    except FileNotFoundError:
        heads = sorted(p.parent.name for p in layout.root.glob("*/buzzdask.json"))
        if heads:  # a run of several models: one output per model inside
            raise InputError(
                f"{layout.root} holds the outputs of several models: open one of "
                f"{', '.join(str(layout.root / name) for name in heads)}"
            ) from None
        if (layout.root / "buzzdask.log").is_file():  # stopped before its first chunk
            raise InputError(
                f"{layout.root} holds no results yet: its run is starting, or stopped before it "
                "wrote any (its buzzdask.log says which)"
            ) from None
        raise InputError(
            f"{layout.root} is not a buzzdask output: no buzzdask.json (pass the directory "
            f"given to analyze as output)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{layout.metadata}: invalid JSON ({error})") from None
    except OSError as error:  # a colleague's results, not readable to you
        raise InputError(f"cannot read {layout.metadata}: {error.strerror or error}") from None
    required = ("classes", "model", "frame_hop_s", "frame_length_s", "inputs")
    missing = [key for key in required if not isinstance(metadata, dict) or key not in metadata]
    if missing:
        raise InputError(f"{layout.metadata} is not buzzdask run metadata (missing {missing})")
    return Run(output=layout.root, metadata=metadata)


def _some(names: Sequence[str], limit: int = 5) -> str:
    """A few names for a message, with how many more."""
    if not names:
        return "none"
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
