"""Output: a partitioned Parquet dataset, its metadata, the errors table and the run journal.

Layout under the output directory::

    buzzdask.json             run metadata (model, hash, frames, versions, times, summary)
    errors.parquet            one row per problem: file, chunk, stage, reason, detail, kept
    journal.jsonl             one line per finished chunk (what resume skips)
    buzzdask.log              the client's and the workers' log lines of every run
    scores/<file>/chunk-NNNNNN.parquet   one partition per chunk, mirroring the input tree

A run of several models writes this layout once per model, in ``<output>/<model name>/``, beside
the run's log (and its embedding store, :mod:`buzzdask.store`, when embeddings are kept).

Partitions are written under a hidden temporary name and renamed into place, so a reader
never sees half a file and a crash leaves nothing that resume would trust.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dask.utils import format_bytes

from buzzdask.config import DEFAULTS
from buzzdask.errors import (
    OutputConflictError,
    OutputFullError,
    OutputPermissionError,
    ParameterError,
)
from buzzdask.frames import FrameSpec
from buzzdask.inputs import first_names, user_path
from buzzdask.progress import format_audio, format_count
from buzzdask.thresholds import detected

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ACTIVATION_PREFIX",
    "DECODING_SETTINGS",
    "DETECTION_PREFIX",
    "ERROR_COLUMNS",
    "KEPT_EMBEDDINGS",
    "PARTITION_GLOB",
    "append_json_lines",
    "atomic_path",
    "check_run_directory",
    "errors_table",
    "is_run_directory_entry",
    "new_sibling",
    "PYTHON_WORDS",
    "OnConflict",
    "OutputConflict",
    "OutputLayout",
    "PartitionWriter",
    "Vocabulary",
    "frames_table",
    "is_output_full",
    "output_full_error",
    "partition_problem",
    "prepare_output",
    "refuse_results",
    "write_errors",
    "utc_now",
    "write_json",
    "write_table",
]

logger = logging.getLogger(__name__)

OnConflict = Literal["error", "resume", "new"]
ConflictReason = Literal[
    "not a directory",
    "cannot create",
    "cannot write",
    "not buzzdask",
    "holds results",
    "settings differ",
    "in use",
    "holds other files",
    "metadata unreadable",
]
# The lock file of buzzdask.lock (and the name a stale one is set aside under): no results.
_LOCK_PREFIX = ".buzzdask.lock"
#: The errors table's columns and their types (:func:`errors_table`): ``chunk`` is nullable (a
#: whole file's problem has none); ``kept`` is true where the frames were written all the same
#: (damaged audio, a file cut short), false where the file or chunk failed.
_ERROR_TYPES = {
    "file": "string",
    "chunk": "Int64",
    "stage": "string",
    "reason": "string",
    "detail": "string",
    "kept": "bool",
}
ERROR_COLUMNS = list(_ERROR_TYPES)
#: Where an analysis keeps its embeddings in its output (``keep_embeddings=True``).
KEPT_EMBEDDINGS = "embeddings"
#: The names :meth:`OutputLayout.partition` gives partitions.
PARTITION_GLOB = "chunk-*.parquet"
#: How a partition being written starts its name (:func:`atomic_path`'s hidden temporary).
PARTITION_BEING_WRITTEN = ".chunk-"
#: Bytes in a file's name on Linux file systems (ext4, XFS, Lustre, GPFS).
NAME_MAX = 255
#: Fingerprint keys of the decoding settings that change scores (a resume must not mix them),
#: by their setting's name: recorded only where not at the default.
DECODING_SETTINGS = {
    "decode_margin_s": "decode-margin-seconds",
    "seekable_codecs": "seekable-codecs",
}
# Score columns are named as buzzdetect (src/config.py: PREFIX_COLUMN_DETECTION) and buzzr
# (VARIABLES.R: PREFIX_DETECTION) name them: buzzr sums the columns of that plural prefix.
ACTIVATION_PREFIX = "activation_"
DETECTION_PREFIX = "detections_"


class OutputLayout:
    """Paths inside one analysis output directory.

    Parameters
    ----------
    root : path-like
        The output directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = user_path(root, what="output")
        self.scores = self.root / "scores"
        self.metadata = self.root / "buzzdask.json"
        self.errors = self.root / "errors.parquet"
        self.journal = self.root / "journal.jsonl"
        self.log = self.root / "buzzdask.log"
        # Journal lines held back by journal_held(), written as its block ends.
        self._held: list[Mapping[str, Any]] | None = None
        # Directories inside scores/ already checked by partition(), and whether they stay inside.
        self._checked: dict[Path, bool] = {}

    def partition(self, relative: str, chunk_index: int) -> Path:
        """Where chunk ``chunk_index`` of input ``relative`` is written (inside ``scores/``)."""
        parts = PurePosixPath(relative).parts
        if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
            raise ParameterError(f"unsafe input name {relative!r}: would write outside the output")
        directory = self.scores.joinpath(*parts)
        if not self._inside_scores(directory, remember=False):
            raise ParameterError(f"input name {relative!r} resolves outside {self.scores}")
        return directory / f"chunk-{chunk_index:06d}.parquet"

    def _inside_scores(self, directory: Path, *, remember: bool = True) -> bool:
        """Whether ``directory`` (in ``scores/``) stays there once symbolic links are followed.

        One ``lstat`` per directory not seen before (an input's own directory is not kept: one
        for each of its chunks). Resolving each partition's whole path twice took about 25 file
        system calls per partition, each a round trip on a parallel file system, and a resume
        checks every partition of the output.
        """
        inside = self._checked.get(directory)
        if inside is None:
            if directory == self.scores:
                return True
            inside = self._inside_scores(directory.parent) and (
                not directory.is_symlink()
                or directory.resolve().is_relative_to(self.scores.resolve())
            )
            if remember:
                self._checked[directory] = inside
        return inside

    def journal_entries(self) -> list[dict[str, Any]]:
        """Every line of the journal, in the order they were written (removals included)."""
        entries = []
        if self.journal.exists():
            lines = self.journal.read_text(encoding="utf-8").splitlines()
            for number, line in enumerate(lines, start=1):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    # The last line cut short by a kill: that chunk is simply redone.
                    where = "its last line" if number == len(lines) else f"line {number}"
                    logger.warning(
                        "%s: %s is unreadable (cut short?); its chunk is analysed again",
                        self.journal,
                        where,
                    )
        return entries

    def repair_journal(self) -> None:
        """Cut a last line a kill left unfinished, so that the next line starts on its own."""
        if not self.journal.exists():
            return
        try:
            stream = self.journal.open("rb+")
        except OSError as error:  # read-only: a resume could not journal what it does
            problem = f"{self.journal.name}: {error.strerror}"
            raise OutputConflictError(
                OutputConflict(self.root, "cannot write", problem=problem)
            ) from None
        with stream:
            content = stream.read()
            if not content or content.endswith(b"\n"):
                return
            logger.warning(
                "%s: its last line was cut short (a run killed while writing it); removed, "
                "its chunk is analysed again",
                self.journal,
            )
            stream.truncate(content.rfind(b"\n") + 1)

    def holds_chunks(self) -> bool:
        """Whether an earlier run wrote any chunk here (journalled, or a partition in place)."""
        return bool(self.journal_entries()) or any(self.scores.rglob(PARTITION_GLOB))

    def read_journal(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Finished chunks recorded by earlier runs, keyed by (file, chunk index).

        A later line about the same chunk replaces an earlier one; a removal drops it.
        """
        done: dict[tuple[str, int], dict[str, Any]] = {}
        for entry in self.journal_entries():
            key = (entry["file"], int(entry["chunk"]))
            if entry.get("removed"):
                done.pop(key, None)
            else:
                done[key] = entry
        return done

    def record_chunk(
        self,
        relative: str,
        chunk_index: int,
        *,
        frames: int,
        size: int,
        mtime_ns: int,
        ends: bool,
        damaged: str = "",
    ) -> None:
        """Journal one finished chunk whose partition (if it has frames) is in place.

        ``size`` and ``mtime_ns`` identify the input's version: a resume redoes the chunk when
        the file has changed since. ``ends``: the file's audio ended in this chunk (or before
        it). ``damaged``: what ffmpeg reported of damaged audio in the chunk, kept for the
        errors table of a run that resumes this one.
        """
        entry = {
            "file": relative,
            "chunk": chunk_index,
            "frames": frames,
            "size": size,
            "mtime_ns": mtime_ns,
            "ends": ends,
        }
        self.append_journal({**entry, "damaged": damaged} if damaged else entry)

    def record_removed(self, chunks: Iterable[tuple[str, int]]) -> None:
        """Journal that these chunks' partitions were removed: no later run trusts them."""
        self.append_journal(
            *({"file": relative, "chunk": index, "removed": True} for relative, index in chunks)
        )

    def append_journal(self, *entries: Mapping[str, Any]) -> None:
        """Add lines, one per entry: a chunk finished (its partition in place) or removed.

        One write and one ``fsync`` for all (inside :meth:`journal_held`, as its block ends).
        What cannot be written whole (the disk filled) is taken back, so the journal never
        holds half a line.
        """
        if self._held is not None:
            self._held.extend(entries)
            return
        if not entries:
            return
        append_json_lines(self.journal, entries, sync=True)

    @contextmanager
    def journal_held(self) -> Iterator[None]:
        """Lines journalled in the block are appended together as it ends, however it ends.

        A score task's chunks finish together: sixteen 30-second files' lines then cost one
        ``fsync`` instead of sixteen, on the client's one thread (on a parallel file system,
        milliseconds each). Their partitions are already in place, so a kill before the block
        ends only has those chunks analysed again. A block inside another writes nothing itself.
        """
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            self.append_journal(*held)

    def partitions(self) -> list[Path]:
        """Every partition file under ``scores/``, and the temporary files a kill left there."""
        if not self.scores.is_dir():
            return []
        return [*self.scores.rglob(PARTITION_GLOB), *self.scores.rglob(f".{PARTITION_GLOB}.*.tmp")]


def partition_problem(path: Path, *, frames: int, fingerprint: Mapping[str, Any]) -> str | None:
    """Why a journalled partition cannot be trusted, or ``None`` when it can.

    Cheap: only the Parquet footer is read. It must be readable, hold ``frames`` rows, and
    carry ``fingerprint`` in its schema metadata (the settings it was written with).
    """
    try:
        footer = pq.read_metadata(path)
    except FileNotFoundError:
        return "its partition is missing"
    except (OSError, pa.ArrowException) as error:
        return f"its partition is unreadable ({error})"
    if footer.num_rows != frames:
        return f"its partition holds {footer.num_rows} frames, the journal says {frames}"
    stored = json.loads((footer.metadata or {}).get(b"buzzdask", b"{}"))
    expected = json.loads(json.dumps(fingerprint, sort_keys=True))
    written = stored.get("fingerprint")
    if not isinstance(written, dict) or not _fingerprints_agree(written, expected):
        return "its partition was written with other settings"
    return None


def _fingerprints_agree(before: Mapping[str, Any], now: Mapping[str, Any]) -> bool:
    """Whether two runs' settings are the same (a re-scoring's store may have moved)."""
    return before.keys() == now.keys() and all(
        before[key] == now[key] or _same_store_set(key, before[key], now[key]) for key in now
    )


@dataclass(frozen=True)
class PartitionWriter:
    """Writes scored chunks as partitions, where they are scored (a worker, not the client).

    A plain value sent with each score task: the worker writes each partition atomically into
    the output on the shared file system, and the client only journals what was written, so a
    client on a login node does none of the output's I/O.

    Parameters
    ----------
    output : str
        The output directory (see :class:`OutputLayout`).
    spec : FrameSpec
    classes : tuple of str
    thresholds : tuple of (class, threshold)
    metadata_json : str
        Run metadata stored in every partition's schema (JSON with sorted keys).
    """

    output: str
    spec: FrameSpec
    classes: tuple[str, ...]
    thresholds: tuple[tuple[str, float], ...]
    metadata_json: str

    @functools.cached_property
    def layout(self) -> OutputLayout:
        """The output's layout, one per score task: its checked directories are kept."""
        return OutputLayout(self.output)

    def write(self, relative: str, chunk_index: int, first_frame: int, activations: Any) -> int:
        """Write one chunk's partition (none for a chunk without frames); its frame count."""
        n_frames = len(activations)
        if n_frames:
            table = frames_table(
                relative,
                first_frame,
                activations,
                spec=self.spec,
                classes=self.classes,
                thresholds=dict(self.thresholds),
                metadata_json=self.metadata_json,
            )
            write_table(table, self.layout.partition(relative, chunk_index))
        return n_frames


@dataclass(frozen=True)
class Vocabulary:
    """How a caller names the ways on from an output conflict: Python keywords or CLI flags.

    Parameters
    ----------
    resume, new : str
        How to ask to finish the earlier run, or to write to a new directory.
    output : str
        How to name another output.
    option : callable (name, value) -> str
        One earlier setting as the caller passes it, from its keyword name in ``analyze``
        (``"chunk_seconds", 600.0`` -> ``"chunk_seconds=600.0"`` or ``"--chunk-seconds 600"``).
    separator : str
        Between settings: ``", "`` between keywords, ``" "`` between flags.
    """

    resume: str
    new: str
    output: str
    option: Callable[[str, Any], str]
    separator: str = " "


PYTHON_WORDS = Vocabulary(
    resume="on_conflict='resume'",
    new="on_conflict='new'",
    output="output",
    option=lambda name, value: f"{name}={value!r}",
    separator=", ",
)


@dataclass(frozen=True)
class OutputConflict:
    """Why an output cannot be used as asked, as data each caller words its own way.

    The argument of :class:`~buzzdask.errors.OutputConflictError`; ``str()`` gives the Python
    wording, ``render`` another (the CLI's flags).

    Parameters
    ----------
    output : Path
    reason : str
        One of :data:`ConflictReason`: ``"not a directory"``, ``"cannot create"``, ``"cannot
        write"``, ``"not buzzdask"``, ``"holds results"``, ``"settings differ"``, ``"in use"``,
        ``"holds other files"``, ``"metadata unreadable"``.
    chunks : int
        Chunks the earlier run journalled.
    finished : bool
        Whether that run finished (``"holds results"``).
    differences : tuple of (key, before, now)
        Fingerprint entries that differ (``"settings differ"``).
    earlier : tuple of (option, value)
        The earlier run's options (keyword names of ``analyze``) that differ from this run's:
        passing them resumes it (empty when no option restores the difference).
    holder : str
        The run holding the output (``"in use"``): host, pid, start time.
    stale_s : float [s]
        After how long without a sign of life another host's lock is taken over (``"in use"``).
    others : tuple of str
        What the output holds that a run of several models does not write there
        (``"holds other files"``); or the models' outputs of such a run in it (``"not
        buzzdask"``: one of them is the output to give).
    problem : str
        Why the system refused to create it (``"cannot create"``: a missing or read-only
        parent, no permission) or to write in it (``"cannot write"``: a read-only mount, another
        user's results; the file it could not write first where it is not the directory).
    resuming : bool
        Whether the run refused was to resume the output's run (``"in use"``).
    """

    output: Path
    reason: ConflictReason
    chunks: int = 0
    finished: bool = False
    differences: tuple[tuple[str, Any, Any], ...] = ()
    earlier: tuple[tuple[str, Any], ...] = ()
    holder: str = ""
    stale_s: float = 0.0
    others: tuple[str, ...] = ()
    problem: str = ""
    resuming: bool = False

    def render(self, words: Vocabulary) -> str:
        """The message, naming the caller's flags or keywords."""
        if self.reason == "not a directory":
            return (
                f"output {self.output} exists and is not a directory; choose another {words.output}"
            )
        if self.reason == "cannot create":
            return (
                f"cannot create output {self.output} ({self.problem}); "
                f"choose another {words.output}"
            )
        if self.reason == "cannot write":
            full = self.problem.endswith(os.strerror(errno.ENOSPC))
            fix = "free some space on its disk" if full else "give yourself write access to it"
            return (
                f"cannot write in output {self.output} ({self.problem}); {fix} or choose "
                f"another {words.output}"
            )
        if self.reason == "metadata unreadable":
            return (
                f"output {self.output} holds results, but its buzzdask.json {self.problem} (a "
                "copy cut short, an edit, a deletion?): put back the buzzdask.json of the run "
                f"that wrote it, or pass {words.new} to write to a new timestamped directory "
                "(nothing here is removed)"
            )
        if self.reason == "not buzzdask" and self.others:
            return (
                f"output {self.output} holds buzzdask outputs "
                f"({first_names(self.others, shown=5)}: earlier runs, or the models of a run "
                f"of several): give one of them as {words.output} to resume it or follow it, or "
                "choose an empty or new directory, such as a new one inside it"
            )
        if self.reason == "not buzzdask":
            return (
                f"output {self.output} is not empty and holds no buzzdask results; "
                f"choose an empty or new directory as {words.output}"
            )
        if self.reason == "holds other files":
            return (
                f"output {self.output} holds other files ({first_names(self.others, shown=5)}); "
                "a run of several models writes one directory per model there: choose an empty "
                f"or new directory as {words.output}"
            )
        if self.reason == "in use":
            # A resume wants that run's results: a new directory would analyse it all again.
            ways_on = (
                f"wait for it to end, then {words.resume} adds what it left (or pass "
                f"{words.new} to analyse everything again in a new directory beside it)"
                if self.resuming
                else f"wait for it to end, choose another {words.output}, or pass {words.new} "
                "to write to a new directory beside it"
            )
            return (
                f"output {self.output} is in use by another buzzdask run ({self.holder}); "
                f"{ways_on}. A dead run's lock is taken "
                f"over by the next run: at once on its own host, from another host after "
                f"{self.stale_s:g} s without a sign of life (buzzdask.lock-stale-seconds)"
            )
        if self.reason == "holds results" and self.finished:
            done = format_count(self.chunks, "chunk")
            return (
                f"output {self.output} already holds results of a finished run ({done}); "
                f"pass {words.new} to write to a new timestamped directory, or choose another "
                f"{words.output} ({words.resume} adds only what it lacks: new or changed "
                "files, chunks that failed, and a model to an output of several)"
            )
        if self.reason == "holds results":
            # Killed between its first partition and that chunk's journal line: none counts yet.
            done = f"{format_count(self.chunks, 'chunk')} done" if self.chunks else "none done yet"
            return (
                f"output {self.output} already holds results of an unfinished run ({done}); "
                f"pass {words.resume} to finish that run, {words.new} to write to a new "
                f"timestamped directory, or choose another {words.output}"
            )
        # What only one kind of run records: an analysis its ffmpeg, a re-scoring its store.
        before = {key: earlier for key, earlier, _ in self.differences}
        earlier_run = (
            "an analysis"
            if "embeddings" in before and before["embeddings"] is None
            else "a re-scoring"
            if "ffmpeg_version" in before and before["ffmpeg_version"] is None
            else None
        )
        if earlier_run is not None:
            return (
                f"cannot resume into {self.output}: it holds {earlier_run}'s results, which "
                f"only {earlier_run} resumes; pass {words.new} instead of {words.resume} to "
                f"write to a new directory, or choose another {words.output}"
            )
        differing = "; ".join(
            f"{key}: {_recorded(earlier, key)} before, {_recorded(now, key)} now"
            for key, earlier, now in self.differences
        )
        # Options left out last: "--threshold ins_buzz=-1.2 without --precision", not
        # "no --precision --threshold ins_buzz=-1.2".
        earlier = sorted(self.earlier, key=lambda item: item[1] in (None, False, {}))
        settings = words.separator.join(words.option(name, value) for name, value in earlier)
        back = (
            f"resume with the earlier settings ({settings})"
            if self.earlier
            else "resume with the earlier model, embedder, buzzdask and ffmpeg"
            if set(before) - set(DECODING_SETTINGS)
            else "resume"
        )
        for key in [key for key in DECODING_SETTINGS if key in before]:  # named as settings
            joined = " with" if back == "resume" else " and"
            back += (
                f"{joined} buzzdask.{DECODING_SETTINGS[key]} as it was "
                f"({_setting(before[key], key)!r})"
            )
        # Scores do not depend on thresholds: summaries, exports and plots take their own.
        rethreshold = (
            "; other thresholds alone need no new analysis: summarize, export and plot take "
            "their own on the scores written"
            if set(before) == {"thresholds"}
            else ""
        )
        return (
            f"cannot resume into {self.output}: settings differ ({differing}); either pass "
            f"{words.new} instead of {words.resume} to write to a new directory, or {back}"
            f"{rethreshold}"
        )

    def __str__(self) -> str:
        return self.render(PYTHON_WORDS)


def _recorded(value: Any, key: str) -> str:
    """A fingerprint's value in a message; one the earlier run did not record, said so.

    A decoding setting's absence is its default.
    """
    if value is None and key in DECODING_SETTINGS:
        return f"{_setting(value, key)!r} (the default)"
    return "not recorded" if value is None else repr(value)


def _setting(value: Any, key: str) -> Any:
    """A :data:`DECODING_SETTINGS` key's value: recorded only where it is not the default."""
    return DEFAULTS["buzzdask"][DECODING_SETTINGS[key]] if value is None else value


def refuse_results(layout: OutputLayout) -> None:
    """Refuse an output that holds an earlier run's results (a run without resume or new).

    Raises
    ------
    OutputConflictError
        Its argument an :class:`OutputConflict` that names the chunks and the ways on.
    """
    if layout.metadata.exists() and layout.holds_chunks():
        chunks = len(layout.read_journal())
        try:
            finished = json.loads(layout.metadata.read_text())["status"] == "complete"
        except (OSError, ValueError, KeyError, TypeError):
            finished = False
        raise OutputConflictError(
            OutputConflict(layout.root, "holds results", chunks=chunks, finished=finished)
        )


def _as_given(key: str, fingerprint: Mapping[str, Any]) -> tuple[str, Any]:
    """A fingerprint's setting as the caller gives it: chunks and hop in seconds.

    "frames_per_chunk: 2 before, 7 now" and "frame_hop: 15360 before, 7680 now" read as the
    seconds just typed.
    """
    name = {"frames_per_chunk": "chunk_seconds", "frame_hop": "frame_hop_s"}.get(key)
    if name is None:
        return key, fingerprint.get(key)
    try:
        hop_s = fingerprint["frame_hop"] / fingerprint["sample_rate"]
        frames = fingerprint["frames_per_chunk"] if key == "frames_per_chunk" else 1
        return name, round(frames * hop_s, 6)
    except (KeyError, TypeError, ZeroDivisionError):  # not recorded
        return name, None


def prepare_output(
    output: str | os.PathLike[str],
    *,
    on_conflict: OnConflict,
    fingerprint: Mapping[str, Any],
    options: Mapping[str, Any],
) -> OutputLayout:
    """Check the output before any work starts; return where this run writes.

    An output whose earlier run wrote no chunk (it failed to start) is reused as if empty,
    with a log line, unless ``on_conflict="new"``: nothing in it depends on its settings.

    Parameters
    ----------
    output : path-like
        Requested output directory.
    on_conflict : {"error", "resume", "new"}
        What to do when it already holds results: refuse, continue that run (its settings must
        match ``fingerprint``), or write to a new sibling directory named with the time.
    fingerprint : mapping
        The settings that change results.
    options : mapping
        This run's options, by their keyword in ``analyze`` (stored in ``buzzdask.json`` as
        ``options``): a refused resume names the earlier ones that differ.

    Raises
    ------
    OutputConflictError
        Its argument an :class:`OutputConflict`: the output holds results and
        ``on_conflict="error"``, or holds something that is not a buzzdask output, or a
        resume's settings differ (the message names each difference and both ways on).
    """
    if on_conflict not in get_args(OnConflict):
        raise ParameterError(f"on_conflict={on_conflict!r} is not one of {get_args(OnConflict)}")
    layout = OutputLayout(output)
    if layout.root.exists() and not layout.root.is_dir():
        raise OutputConflictError(OutputConflict(layout.root, "not a directory"))
    if not layout.root.exists():
        # Made now, not once the cluster is up: a parent that is missing or read-only (a typo,
        # another group's project space) stops the run before any work.
        try:
            layout.root.mkdir(parents=True)
        except OSError as error:
            made_meanwhile = isinstance(error, FileExistsError) and not layout.root.is_symlink()
            if not made_meanwhile:
                problem = error.strerror or ""
                if layout.root.is_symlink():  # mkdir's "File exists" would say nothing of it
                    problem = f"a link to {os.readlink(layout.root)}, which does not exist"
                refused = OutputConflict(layout.root, "cannot create", problem=problem)
                raise OutputConflictError(refused) from None
            # By another run (a SLURM array's tasks start together): what it holds is judged
            # below, and by the lock.
            if on_conflict == "new":
                return OutputLayout(new_sibling(layout.root))
    # The run's log alone (a run that stopped before its metadata) holds no results; nor does
    # a lock, which the caller has checked (a new run goes elsewhere rather than wait on it).
    holds_anything = layout.root.is_dir() and any(
        path != layout.log and (on_conflict == "new" or not path.name.startswith(_LOCK_PREFIX))
        for path in layout.root.iterdir()
    )
    if not holds_anything:
        return layout
    if on_conflict == "new":
        return OutputLayout(new_sibling(layout.root))
    if not layout.metadata.exists() and layout.journal.exists():
        problem = "is missing"
        raise OutputConflictError(
            OutputConflict(layout.root, "metadata unreadable", problem=problem)
        )
    if not layout.metadata.exists():
        heads = sorted(p.name for p in layout.root.iterdir() if OutputLayout(p).metadata.is_file())
        raise OutputConflictError(OutputConflict(layout.root, "not buzzdask", others=tuple(heads)))
    if not layout.holds_chunks():
        logger.warning(
            "reusing %s: the run that created it wrote no chunk, so nothing in it depends on "
            "its settings",
            layout.root,
        )
        return layout
    try:
        previous = json.loads(layout.metadata.read_text(encoding="utf-8"))
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        problem = f"cannot be read ({error})"
        raise OutputConflictError(
            OutputConflict(layout.root, "metadata unreadable", problem=problem)
        ) from None
    if on_conflict == "error":
        refuse_results(layout)
    before = previous.get("fingerprint", {})
    differences: tuple[tuple[str, Any, Any], ...] = ()
    # A decoding setting back at its default is left out of the record now, not before.
    left_out = [key for key in DECODING_SETTINGS if key in before and key not in fingerprint]
    for key in [*fingerprint, *left_out]:
        value = fingerprint.get(key)
        if before.get(key) == value or _same_store_set(key, before.get(key), value):
            continue
        (name, earlier), (_, now) = _as_given(key, before), _as_given(key, fingerprint)
        if earlier != now or name == key:  # a chunk of the same seconds, in frames of another hop
            differences += ((name, earlier, now),)
    earlier = previous.get("options", {})
    kept_before, kept_now = earlier.get("keep_embeddings"), options.get("keep_embeddings")
    if None not in (kept_before, kept_now) and bool(kept_before) != bool(kept_now):
        # Not a setting of the results: their store (left out of earlier runs' records).
        differences += (("keep_embeddings", kept_before, kept_now),)
    if differences:
        raise OutputConflictError(
            OutputConflict(
                layout.root,
                "settings differ",
                differences=differences,
                earlier=tuple(
                    (name, value) for name, value in earlier.items() if options.get(name) != value
                ),
            )
        )
    return layout


def _same_store_set(key: str, before: Any, now: Any) -> bool:
    """Whether a re-scoring's embeddings are the same store set, moved or copied.

    Its folder is named by what made its embeddings (the embedder, its hop and preprocessing):
    a store copied to project space, or to another machine with the results, is the same.
    Which recordings it holds, and their audio's hashes, the resume judges file by file.
    """
    return (
        key == "embeddings"
        and isinstance(before, str)
        and isinstance(now, str)
        and PurePosixPath(before).name == PurePosixPath(now).name
    )


def append_json_lines(path: Path, entries: Iterable[Mapping[str, Any]], *, sync: bool) -> None:
    """Append one JSON line per entry: all of them whole, or none.

    A last line a kill left unfinished is ended first, so that the new lines start on their
    own (readers skip the cut one) instead of being glued to it and lost with it. What cannot
    be written whole (the disk filled) is taken back. ``sync``: ``fsync`` before returning.
    """
    lines = "".join(json.dumps(dict(entry), sort_keys=True) + "\n" for entry in entries)
    if not lines:
        return
    # Unbuffered: a text stream's truncate flushes its buffer first, which fails again.
    with path.open("ab+", buffering=0) as stream:
        end = stream.seek(0, os.SEEK_END)
        cut = end > 0 and os.pread(stream.fileno(), 1, end - 1) != b"\n"
        try:
            left = memoryview(("\n" if cut else "").encode() + lines.encode("utf-8"))
            while left:
                left = left[stream.write(left) :]
            if sync:
                os.fsync(stream.fileno())
        except OSError:
            os.ftruncate(stream.fileno(), end)
            raise


def new_sibling(root: Path) -> Path:
    """A new directory beside ``root``, named with the time, made here.

    Made, not only named: runs started in the same second (a SLURM array's tasks, each with
    ``--new``) get one each.

    Raises
    ------
    OutputConflictError
        ``"cannot create"``: the parent is read-only, say.
    """
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = root.with_name(f"{root.name}-{stamp}")
    counter = 1
    while True:
        try:
            candidate.mkdir()
        except FileExistsError:
            candidate = root.with_name(f"{root.name}-{stamp}-{counter}")
            counter += 1
            continue
        except OSError as error:
            refused = OutputConflict(candidate, "cannot create", problem=error.strerror or "")
            raise OutputConflictError(refused) from None
        return candidate


def is_run_directory_entry(name: str) -> bool:
    """Whether a run of several models keeps ``name`` in its output for itself, not a model's.

    Its log, its lock and the kept embeddings: a model of that name could not have its
    ``root/<name>`` there.
    """
    return name in (KEPT_EMBEDDINGS, "buzzdask.log") or name.startswith(_LOCK_PREFIX)


def check_run_directory(root: Path, *, names: Iterable[str]) -> None:
    """Refuse a run of several models in ``root`` if it holds anything but such a run's.

    Such a run writes an output per model (``root/<name>``), its log and lock, and maybe kept
    embeddings; anything else (a one-model output, the user's files) is not overwritten.

    Raises
    ------
    OutputConflictError
        ``"holds other files"``, naming some of them.
    """
    if root.exists() and not root.is_dir():
        raise OutputConflictError(OutputConflict(root, "not a directory"))
    if not root.is_dir():
        return
    others = sorted(
        path.name
        for path in root.iterdir()
        if path.name not in names and not is_run_directory_entry(path.name)
    )
    if others:
        raise OutputConflictError(OutputConflict(root, "holds other files", others=tuple(others)))


#: What a file system says when it is full, or the user's quota on it is.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_output_full(error: BaseException) -> bool:
    """Whether ``error`` (raised here or on a worker) means the file system is full."""
    return isinstance(error, OSError) and error.errno in _FULL


#: What a file system says to a user who may not write there (EROFS: mounted read-only).
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_refused(error: BaseException) -> bool:
    """Whether ``error`` is a file system refusing this user (or any: mounted read-only)."""
    return isinstance(error, OSError) and error.errno in _REFUSED


def is_output_refused(error: BaseException, root: Path) -> bool:
    """Whether ``error`` (raised here or on a worker) is a write refused in the output ``root``."""
    if not isinstance(error, OSError) or not write_refused(error):
        return False
    if error.filename is None:
        return True
    return is_under(os.path.abspath(os.fsdecode(error.filename)), os.path.abspath(root))


def is_under(path: str, folder: str) -> bool:
    """Whether the absolute ``path`` is ``folder`` (absolute) or lies under it, by its text."""
    return os.path.commonpath([path, folder]) == os.path.normpath(folder)


def owner_said(path: Path) -> str:
    """``"; owned by alice"`` for the user owning ``path`` (or the folder it was to be in)."""
    import pwd

    for candidate in (path, path.parent):
        try:
            return f"; owned by {pwd.getpwuid(candidate.stat().st_uid).pw_name}"
        except (OSError, KeyError):
            continue
    return ""


def output_refused_error(root: Path, error: OSError) -> OutputPermissionError:
    """What to tell a user who may not write in the output ``root`` (a labmate's)."""
    where = Path(os.fsdecode(error.filename)) if error.filename is not None else root
    return OutputPermissionError(
        f"cannot write in output {root}: {where} ({error.strerror}{owner_said(where)}). Its "
        f"owner can give the group write access (chmod -R g+w {root}; umask 002 in job "
        "scripts keeps it so), then finish the run with a resume (--resume, or "
        "on_conflict='resume'): what was written is checked and kept"
    )


def output_full_error(
    layout: OutputLayout, error: OSError, *, audio_done_s: float, audio_left_s: float
) -> OutputFullError:
    """What to tell the user when the output filled: where, how much more space, what next.

    The space needed is the space the partitions took per audio second so far times the audio
    left, plus a tenth for the journal and the log.

    Parameters
    ----------
    layout : OutputLayout
    error : OSError
        ``ENOSPC`` or ``EDQUOT``.
    audio_done_s, audio_left_s : float [s]
        Audio whose partitions are written (by this run or an earlier one), and still to do.
    """
    # Space taken, not bytes: a file system stores small files in whole blocks.
    written = sum(path.stat().st_blocks * 512 for path in layout.scores.rglob(PARTITION_GLOB))
    left = format_audio(audio_left_s)
    if written and audio_done_s > 0:
        needed = format_bytes(int(1.1 * written / audio_done_s * audio_left_s))
        space = f"about {needed} more is needed for the {left} of audio left"
    else:
        space = f"{left} of audio is left, and no partition was written yet to tell its size"
    free = format_bytes(shutil.disk_usage(layout.root).free)
    why = os.strerror(error.errno or errno.ENOSPC)
    return OutputFullError(
        error.errno,
        f"the file system of output {layout.root} is full ({why}): {space}, "
        f"{free} is free now. Free space (or raise the quota), then finish the run with a resume "
        f"(--resume, or on_conflict='resume'): what was written is checked and kept",
    )


def frames_table(
    relative: str,
    first_frame: int,
    activations: np.ndarray,
    *,
    spec: FrameSpec,
    classes: Sequence[str],
    thresholds: Mapping[str, float],
    metadata_json: str,
) -> pa.Table:
    """One chunk's rows.

    Parameters
    ----------
    relative : str
        The input's relative name (``file`` column).
    first_frame : int >= 0
        Index of the chunk's first frame in the file.
    activations : np.ndarray [shape=(n_frames, n_classes), dtype=float32]
        Raw head outputs.
    spec : FrameSpec
        ``start[i] = (first_frame + i) * hop_length / sample_rate``,
        ``end[i] = ((first_frame + i) * hop_length + frame_length) / sample_rate`` (seconds).
    classes : sequence of str
    thresholds : mapping of class -> float
        ``detections_<class> = activation_<class> > threshold``
        (:func:`buzzdask.thresholds.detected`).
    metadata_json : str
        Run metadata stored in the Parquet schema under ``b"buzzdask"`` (JSON, as
        ``json.dumps(metadata, sort_keys=True)`` makes it: made once per run, not per chunk).
    """
    n_frames = len(activations)
    index = first_frame + np.arange(n_frames, dtype=np.int64)
    start = index * spec.hop_length / spec.sample_rate
    columns: dict[str, pa.Array] = {
        "file": repeated_string(relative, n_frames),
        "start": numeric_array(start, np.float64),
        # Exact from the sample counts: start + 0.96 gave 9.600000000000001 where the next
        # frame starts at 9.6, and end == next start compared false.
        "end": numeric_array(
            (index * spec.hop_length + spec.frame_length) / spec.sample_rate, np.float64
        ),
    }
    activations = np.asarray(activations, dtype=np.float32).reshape(n_frames, len(classes))
    for column, name in enumerate(classes):
        columns[f"{ACTIVATION_PREFIX}{name}"] = numeric_array(activations[:, column], np.float32)
    for name, threshold in thresholds.items():
        columns[f"{DETECTION_PREFIX}{name}"] = bool_array(
            detected(activations[:, list(classes).index(name)], threshold)
        )
    table = pa.table(columns)
    return table.replace_schema_metadata({b"buzzdask": metadata_json})


# Columns built from their buffers: ``pa.array`` imports pandas (pyarrow 26 checks every input
# for a pandas object), 0.2 CPU-s and 43 MiB in a worker that needs none.


def numeric_array(values: np.ndarray, dtype: type[np.number[Any]]) -> pa.Array:
    """A column of ``values`` (any 1-d array, strided included) as ``dtype``, without pandas.

    Parameters
    ----------
    values : np.ndarray [shape=(n,)]
    dtype : numpy numeric type

    Returns
    -------
    pa.Array [length n]
        The values of a contiguous copy (or of ``values`` itself when already contiguous).
    """
    values = np.ascontiguousarray(values, dtype=dtype)
    arrow_type = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def bool_array(values: np.ndarray) -> pa.Array:
    """A boolean column of ``values`` [shape=(n,)], without pandas (Arrow packs bits, LSB first)."""
    values = np.asarray(values, dtype=bool)
    bits = np.packbits(values, bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def repeated_string(value: str, n: int) -> pa.Array:
    """A string column of ``n`` rows that all hold ``value``, without pandas."""
    encoded = value.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int32) * len(encoded)
    return pa.Array.from_buffers(
        pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(encoded * n)]
    )


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A hidden temporary name beside ``path``: renamed to it if the block succeeds, else removed.

    A reader never sees half a file, and a failed write (a full disk) leaves nothing behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Its name cut to fit where the name itself just fits (a long recording's export).
    suffix = f".{uuid.uuid4().hex}.tmp"
    hidden = path.name.encode()[: NAME_MAX - 1 - len(suffix)].decode(errors="ignore")
    temporary = path.with_name(f".{hidden}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with suppress(OSError):  # the error that matters is the one raised
            temporary.unlink(missing_ok=True)
        raise


#: :func:`atomic_path`'s temporary names: ``.<name>.<32 hex digits>.tmp``.
_TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{32}\.tmp")


def remove_stale_temporaries(paths: Iterable[Path]) -> None:
    """Remove what :func:`atomic_path` left beside ``paths`` for a writer killed outright.

    Only while holding their folders (:func:`buzzdask.lock.destination_held`): another
    writer's temporaries would be in use. A folder is listed once, whatever its files.
    """
    names: dict[Path, set[str]] = {}
    for path in paths:
        names.setdefault(path.parent, set()).add(path.name)
    for folder, wanted in names.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there yet
            continue
        for entry in entries:
            left = _TEMPORARY.fullmatch(entry.name)
            if left is not None and left[1] in wanted:
                with suppress(OSError):
                    os.unlink(entry.path)


def write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file atomically (:func:`atomic_path`), in one write.

    Made in memory first: written to a path, a 31-frame partition took 68 writes
    (0.43 ms here, against 0.33), and each write to a parallel file system is a round trip.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    with atomic_path(path) as temporary:
        temporary.write_bytes(sink.getvalue())


def errors_table(errors: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The errors table: one row per problem, typed alike in memory and on disk.

    ``chunk`` is ``Int64``, so that chunk 3 reads ``3`` and not ``3.0`` beside a null.
    """
    import pandas as pd  # here: the workers write partitions with this module, never this table

    return pd.DataFrame(list(errors), columns=ERROR_COLUMNS).astype(_ERROR_TYPES)


def write_errors(path: Path, errors: Sequence[Mapping[str, Any]]) -> None:
    """Write the errors table (:func:`errors_table`; always, empty when nothing failed)."""
    write_table(pa.Table.from_pandas(errors_table(errors), preserve_index=False), path)


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write JSON atomically (:func:`atomic_path`)."""
    text = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def utc_now() -> str:
    """The current time, ISO 8601 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
