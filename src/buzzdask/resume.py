"""What a resume may trust: journalled chunks whose partitions verify, of unchanged inputs.

A resume skips each chunk an earlier run journalled, so before it starts every journal line is
checked, cheaply: the input must still be there, unchanged (same size and modification time),
and the partition's Parquet footer must be readable, hold the journal's frame count and carry the
run's fingerprint. Whatever fails is analysed again. Afterwards ``scores/`` holds only partitions
the journal vouches for: those of vanished or changed inputs, of failed checks, and any a kill
left unjournalled are removed (and the journal says so), so the dataset never mixes in stale or
broken files.

A resume names its recordings as the earlier run did (:func:`resume_root`): from the earlier
run's input folder when the inputs lie under it, from where they were moved to when they did
(found by the earlier names), and not at all otherwise: names from another folder would
analyse the same recordings again under new names, twice in the results.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from buzzdask.errors import OutputConflictError
from buzzdask.progress import format_count
from buzzdask.write import OutputLayout, is_under, partition_problem

__all__ = ["ResumeCheck", "check_resume", "journalled", "resume_root"]

logger = logging.getLogger(__name__)

#: Footers read at once: on a parallel file system each read waits mostly on the network.
_READERS = 16
#: Tasks per reader thread: enough that a slow file holds up little besides.
_TASKS_PER_READER = 8


@dataclass
class ResumeCheck:
    """The outcome of checking an output before a resume.

    Attributes
    ----------
    done : dict of (file, chunk index) -> journal entry
        The chunks to skip.
    rejected : int
        Journalled chunks analysed again: partition missing, unreadable, short or written with
        other settings.
    changed, vanished : list of str
        Inputs that changed since the earlier run (analysed again), or are not found (their
        chunks kept as written: a scratch purge or an unmounted disk is no withdrawal).
    partitions_removed : int
        Partition files removed: stale, broken, or written by a killed run but never journalled.
    """

    done: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    rejected: int = 0
    changed: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    partitions_removed: int = 0

    def as_summary(self) -> dict[str, Any]:
        """The counts for the run's summary."""
        return {
            "chunks_trusted": len(self.done),
            "chunks_rejected": self.rejected,
            "files_changed": len(self.changed),
            "files_vanished": len(self.vanished),
            "partitions_removed": self.partitions_removed,
        }


def resume_root(layouts: Sequence[OutputLayout], paths: Sequence[str], *, root: str) -> str:
    """The folder a resume names its inputs from, so each recording keeps its earlier name.

    Parameters
    ----------
    layouts : sequence of OutputLayout
        The outputs being resumed (one per head; they share their inputs), their lock held.
    paths : sequence of str
        This run's input files, absolute.
    root : str
        Their common folder (:func:`buzzdask.inputs.scan`): the names a new run would give.

    Returns
    -------
    str
        The earlier run's input folder where every input lies under it (a resume naming fewer
        or other folders of it); else, where the earlier recordings are found to have been
        moved (the folder that, joined to their names, gives these inputs' paths) when every
        input lies under it; else ``root`` when nothing was journalled yet.

    Raises
    ------
    OutputConflictError
        An input lies outside the earlier run's folder (and outside any it was moved to): its
        recordings would be named anew and analysed twice.
    """
    for layout in layouts:
        if not layout.metadata.exists():
            continue
        earlier = json.loads(layout.metadata.read_text(encoding="utf-8"))
        earlier_root = earlier.get("inputs", {}).get("root")
        layout.repair_journal()
        journal = layout.read_journal()
        names = {name for name, _ in journal}
        if earlier_root is None or earlier_root == root or not names:
            continue
        if all(is_under(path, earlier_root) for path in paths):
            return str(earlier_root)
        moved = _moved_to(paths, names)
        why = ""
        if moved is not None and all(is_under(path, moved) for path in paths):
            not_moved = _not_moved_there(moved, earlier_root, journal, paths)
            if not not_moved:
                logger.warning(
                    "resume: the earlier run's recordings are now under %s (it read them under %s)",
                    moved,
                    earlier_root,
                )
                return moved
            why = (
                f" (the files under {moved} named as earlier recordings are {not_moved}, not "
                "the earlier ones moved)"
            )
        outside = next(path for path in paths if not is_under(path, earlier_root))
        raise OutputConflictError(
            f"cannot resume {layout.root} with {outside}: it is not under {earlier_root}, the "
            f"folder the earlier run named its {format_count(len(names), 'recording')} from"
            f"{why}, so recordings would be named anew and analysed twice. Resume with "
            f"inputs under {earlier_root} (or the folder it was moved to), and analyse the "
            "others into another output"
        )
    return root


def journalled(layouts: Sequence[OutputLayout]) -> set[str]:
    """The recordings the outputs' journals hold chunks of (relative names, as in ``file``)."""
    return {name for layout in layouts for name, _ in layout.read_journal()}


def earlier_runs(layout: OutputLayout) -> list[dict[str, Any]]:
    """The invocations that wrote ``layout`` before a resume, oldest first.

    Each: its ``started``, ``finished`` (``None``: it was killed), ``status`` (``"interrupted"``
    by Ctrl-C or SIGTERM, ``"failed"`` by an error: ``stopped_by`` says which), ``host`` and
    its summary's ``chunks_written``, ``frames`` and ``wall_seconds`` (``None`` where it never
    wrote one), taken from the ``buzzdask.json`` this resume replaces.
    """
    try:
        previous = json.loads(layout.metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    summary = previous.get("summary") or {}
    last = {
        key: previous.get(key) for key in ("started", "finished", "status", "stopped_by", "host")
    }
    last.update({key: summary.get(key) for key in ("chunks_written", "frames", "wall_seconds")})
    return [*previous.get("earlier_runs", []), last]


def _moved_to(paths: Sequence[str], names: set[str]) -> str | None:
    """The folder most inputs' paths end in an earlier name under, or None."""
    folders: Counter[str] = Counter()
    for path in paths:
        parts = PurePath(path).parts
        for start in range(1, len(parts)):
            if "/".join(parts[start:]) in names:
                folders[str(PurePath(*parts[:start]))] += 1
                break
    return folders.most_common(1)[0][0] if folders else None


def _not_moved_there(
    folder: str,
    earlier_root: str,
    journal: Mapping[tuple[str, int], Mapping[str, Any]],
    paths: Sequence[str],
) -> str:
    """Why the inputs found by earlier names under ``folder`` are not the earlier ones, or "".

    ``""`` where they are the earlier recordings moved there (a move, or a scratch copy of all
    or part of them). Another season's folder that shares their names (``siteA/REC0001.WAV``),
    resumed from, would have the earlier results taken for changed or gone and replaced. Its
    files differ in size; where a recorder's files all have one size, in time, while the
    earlier recordings are still where they were, unchanged (a copy keeps them: ``cp -a``,
    ``rsync -a``).
    """
    versions = {
        name: (entry.get("size"), entry.get("mtime_ns")) for (name, _), entry in journal.items()
    }
    matched = same_size = same_version = intact = 0
    for path in paths:
        name = Path(os.path.relpath(path, folder)).as_posix()
        if name not in versions:
            continue
        matched += 1
        now = _version(Path(path))
        same_size += now is not None and now[0] == versions[name][0]
        same_version += now == versions[name]
        intact += _version(Path(earlier_root, name)) == versions[name]
    if 2 * same_size <= matched:
        return "mostly not of their earlier sizes: other recordings"
    if 2 * intact > matched and 2 * same_version <= matched:
        return (
            f"of other times than the earlier recordings, which are still under {earlier_root} "
            "unchanged: other recordings (or a copy that did not keep the times: copy with "
            "cp -a or rsync -a)"
        )
    return ""


def check_resume(
    layout: OutputLayout,
    *,
    fingerprint: Mapping[str, Any],
    input_root: str | os.PathLike[str],
    named: Sequence[str] | None = None,
    files: Collection[str] = frozenset(),
    versions: Callable[[str], tuple[int, int] | None] | None = None,
) -> ResumeCheck:
    """Check every journalled chunk of ``layout``; remove what cannot be trusted.

    Parameters
    ----------
    layout : OutputLayout
        The output being resumed (its lock held by the caller).
    fingerprint : mapping
        The run's settings, as stored in every partition's schema metadata.
    input_root : path-like
        This run's input directory, which the journal's file names are relative to
        (:func:`resume_root`).
    named : sequence of str, optional
        The input paths this run was given (absolute). A journalled file outside all of them
        (a resume naming one folder of the run's) is not this run's to judge: its chunks are
        kept as they are, changed or gone. Default: every journalled file is this run's.
    files : collection of str
        This run's recordings (relative names): each is this run's to judge, whether or not
        its path lies under ``named`` (given through a symbolic link to its folder).
    versions : callable, optional
        ``versions(name)``: an input's (size, modification time) now, ``None`` if gone. Default:
        the file's under the input directory (a re-scoring asks its store's catalog).

    Returns
    -------
    ResumeCheck
    """
    layout.repair_journal()
    journal = layout.read_journal()

    def in_scope(relative: str) -> bool:
        path = os.path.join(input_root, relative)
        return named is None or relative in files or any(is_under(path, given) for given in named)

    version_of = versions or (lambda relative: _version(Path(input_root, relative)))
    # One look per file, not per chunk: a 24-hour file's 144 on a parallel file system, and
    # its chunks all judged against the same version; none at files not this run's to judge.
    scope = {relative: in_scope(relative) for relative in dict.fromkeys(r for r, _ in journal)}
    current = {relative: version_of(relative) for relative, mine in scope.items() if mine}
    check = ResumeCheck()
    rejected: dict[tuple[str, int], str] = {}
    to_verify = []
    trusted: set[Path] = set()
    vanished: Counter[str] = Counter()
    for key, entry in journal.items():
        if not scope[key[0]]:  # not this run's to judge: its partition stays
            if entry["frames"]:
                trusted.add(layout.partition(*key))
            continue
        version = current[key[0]]
        if version is None:
            # Purged from scratch, on a disk not mounted, deleted: its results are still its
            # audio's, and were removed for good by a resume that only meant to add files.
            vanished[key[0]] += 1
        if version is not None and version != (entry.get("size"), entry.get("mtime_ns")):
            rejected[key] = "changed" if version[0] != entry.get("size") else "retimed"
        elif entry["frames"]:
            to_verify.append(key)
        else:
            check.done[key] = entry  # no frames: no partition to check

    def problems_of(keys: Sequence[tuple[str, int]]) -> list[tuple[Path, str | None]]:
        answers = []
        for key in keys:
            path = layout.partition(*key)  # a file system call: kept for the removal below
            frames = int(journal[key]["frames"])
            answers.append((path, partition_problem(path, frames=frames, fingerprint=fingerprint)))
        return answers

    # Many footers to a task: one task per partition cost more in hand-overs between threads
    # than the reads (0.07 CPU-ms each): a resume of 20,000 finished files took 12.3-12.6 s
    # that way, 10.9-11.2 s this way.
    per_task = max(1, -(-len(to_verify) // (_READERS * _TASKS_PER_READER)))
    batches = [to_verify[i : i + per_task] for i in range(0, len(to_verify), per_task)]
    with ThreadPoolExecutor(_READERS) as pool:
        problems = itertools.chain.from_iterable(pool.map(problems_of, batches))
        for key, (path, problem) in zip(to_verify, problems, strict=True):
            if problem is None:
                check.done[key] = journal[key]
                trusted.add(path)
            else:
                rejected[key] = problem
                check.rejected += 1
                then = (
                    "dropped (its audio is not found)" if key[0] in vanished else "analysed again"
                )
                logger.warning("resume: %s chunk %d: %s; %s", *key, problem, then)
    check.vanished.extend(sorted(vanished))
    dropped = Counter(relative for relative, _ in rejected if relative in vanished)
    for relative in check.vanished:
        kept = vanished[relative] - dropped[relative]
        if kept:
            logger.warning(
                "resume: %s is not found under %s any more (deleted, purged from scratch, a "
                "disk not mounted?): its %s kept as written; to drop them, delete %s and resume",
                relative,
                input_root,
                format_count(kept, "chunk"),
                layout.scores / relative,
            )
    changed = Counter(r for (r, _), why in rejected.items() if why in ("changed", "retimed"))
    retimed = {r for (r, _), why in rejected.items() if why == "retimed"}
    check.changed.extend(sorted(changed))
    for relative in check.changed:
        # A same-sized recording may be another (an AudioMoth's hour), so it is analysed again;
        # but a copy that did not keep the times (cp -r) is the usual reason.
        what = (
            "its time differs, its size is the same: copied without its time? cp -a and "
            "rsync -a keep it"
            if relative in retimed
            else "its size differs"
        )
        logger.warning(
            "resume: %s changed since the earlier run (%s): %s analysed again",
            relative,
            what,
            format_count(changed[relative], "chunk"),
        )
    check.partitions_removed = _remove_untrusted(layout, trusted)
    layout.record_removed(rejected)
    return check


def _version(path: Path) -> tuple[int, int] | None:
    """An input's (size, modification time), as the journal records it; ``None`` if gone."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _remove_empty(folder: Path, *, stop: Path) -> None:
    """Remove ``folder`` and its parents below ``stop`` while empty (a vanished recording's)."""
    while stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty: another recording's, or a partition trusted
            return
        folder = folder.parent


def _remove_untrusted(layout: OutputLayout, trusted: set[Path]) -> int:
    """Remove every partition file but the ``trusted`` (verified); how many there were."""
    untrusted = [path for path in layout.partitions() if path not in trusted]
    for path in untrusted:
        path.unlink(missing_ok=True)
        _remove_empty(path.parent, stop=layout.scores)
    if untrusted:
        logger.info(
            "resume: removed %s to be written again (of files changed since, or of chunks cut "
            "short by the stop: the journal does not vouch for them)",
            format_count(len(untrusted), "partition file"),
        )
    return len(untrusted)
