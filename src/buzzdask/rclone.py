"""Moving recordings between a cloud remote and the cluster's file system, with rclone.

Runs on the login (or data-mover) node, never on a worker. The lab's recordings live in Microsoft
Teams (SharePoint/OneDrive); ``rclone`` reaches them once the user has configured a remote with
``rclone config``. :func:`transfer` copies the audio files under ``REMOTE:path`` to a local
directory in batches. Each batch is copied into a hidden directory inside the destination
(``.buzzdask-incoming/``) and each file is renamed into place only after rclone has finished and
verified it. An analysis skips hidden names, so it never sees half a file, whichever rclone
version writes it. A line per arrived file goes into the manifest ``.buzzdask-transfer.jsonl``,
and the marker ``.transfer-complete`` is written last: :func:`buzzdask.watch` stops there.
:func:`upload` sends a results directory back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from buzzdask.errors import BuzzdaskError, ParameterError, TransferError
from buzzdask.inputs import user_path
from buzzdask.lock import LOCK_NAME, held
from buzzdask.progress import format_count, logger
from buzzdask.settings import TransferSettings, load_settings
from buzzdask.write import utc_now

__all__ = [
    "FAILED_MARKER",
    "INCOMING",
    "MANIFEST",
    "TransferError",
    "TransferResult",
    "transfer",
    "upload",
]

INCOMING = ".buzzdask-incoming"
MANIFEST = ".buzzdask-transfer.jsonl"
#: Written where a transfer stopped short (an error, Ctrl-C): a watch ends at it, as at the
#: transfer-complete marker, instead of waiting out its idle timeout.
FAILED_MARKER = ".transfer-failed"

# What rclone prints, in words a user can act on (first match wins).
_DIAGNOSES = (
    (
        "remote not configured",
        ("didn't find section in config file", "config file not found"),
        "set it up with `rclone config` (see the README, 'From Teams/SharePoint to OSC')",
    ),
    (
        "authentication failed",
        # " 401": a status code, not the digits of a port such as 127.0.0.1:40103.
        (" 401", "403 forbidden", "unauthorized", "invalid_grant", "token expired", "auth"),
        "refresh the credentials with `rclone config reconnect REMOTE:`",
    ),
    (
        "remote unreachable",
        (
            "connection refused",
            "no such host",
            "dial tcp",
            "i/o timeout",
            "network is unreachable",
            "tls handshake",
            "context deadline exceeded",
        ),
        "check the network (OSC compute nodes have none; transfer from a login or data-mover node)",
    ),
    (
        "not found",
        ("directory not found", "object not found", "file not found", "not found"),
        "check the path (`rclone lsd REMOTE:` lists the remote's top folders)",
    ),
)


@dataclass
class TransferResult:
    """What one transfer moved.

    Attributes
    ----------
    source, destination : str
        As given (a remote ``NAME:path`` or a local directory).
    files : list of str
        Files copied by this call, relative to the source, ``/``-separated, in arrival order.
    skipped : list of str
        Files already at the destination with the same size (an upload: those rclone did not
        send again).
    left_out : list of str
        Files of the source not copied: other suffixes than the audio ones, hidden names
        (downloads only).
    bytes : int
        Bytes copied.
    batches : int
        rclone invocations that copied files.
    manifest : Path or None
        The manifest of a download (``DEST/.buzzdask-transfer.jsonl``).
    marker : Path or None
        The transfer-complete marker of a download.
    """

    source: str
    destination: str
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    bytes: int = 0
    batches: int = 0
    manifest: Path | None = None
    marker: Path | None = None


def transfer(
    source: str,
    destination: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    extensions: Iterable[str] | None = None,
    rclone: str | None = None,
    rclone_flags: Sequence[str] | None = None,
) -> TransferResult:
    """Copy the audio files under an rclone remote to a local directory, batch by batch.

    Parameters
    ----------
    source : str
        rclone source, e.g. ``"teams:Recordings/2024"`` (a remote set up with ``rclone config``).
    destination : path-like
        Local directory (created). Files keep their path relative to ``source``.
    batch_size : int > 0, optional
        Files per rclone call; each batch becomes visible to an analysis when it is complete.
        Default ``buzzdask.transfer.batch-size``.
    extensions : iterable of str, optional
        Suffixes copied (case-insensitive). Default ``buzzdask.extensions``.
    rclone : str, optional
        The rclone executable. Default ``buzzdask.transfer.rclone``.
    rclone_flags : sequence of str, optional
        Extra rclone flags (``["--bwlimit", "50M"]``). Default ``buzzdask.transfer.rclone-flags``.

    Returns
    -------
    TransferResult

    Raises
    ------
    TransferError
        The remote is not configured, refuses the credentials, cannot be reached or lacks the
        path; rclone fails; or a copied file is not the size the remote listed. Files of the
        failed batch stay hidden in ``DEST/.buzzdask-incoming/``, and running the transfer again
        copies only what is missing. A transfer that stops short (this, or Ctrl-C) writes
        ``DEST/.transfer-failed`` (:data:`FAILED_MARKER`): a watch ends there.
    ParameterError
        If ``batch_size`` is not a positive integer.
    """
    settings = load_settings(
        extensions=None if extensions is None else list(extensions),
        transfer={"batch_size": batch_size, "rclone": rclone, "rclone_flags": rclone_flags},
    )
    size = settings.transfer.batch_size
    runner = _Rclone(settings.transfer)
    target = user_path(destination)
    try:
        remotes = runner.remotes()
    except BaseException as error:
        # A watch on it ends now, not at its idle timeout; unless another transfer fills it.
        from buzzdask.lock import live_holder

        filled = live_holder(target, stale_s=settings.lock_stale_seconds)  # by another transfer
        if _remote_name(destination) is None and filled is None:
            with suppress(OSError):  # this error is the one to say
                target.mkdir(parents=True, exist_ok=True)
                _write_marker(target / FAILED_MARKER, source=source, stopped=_stopped(error))
        raise
    _check_destination(destination, target, remotes)
    suffixes = {e.lower() for e in settings.extensions}
    target.mkdir(parents=True, exist_ok=True)
    with _held(target, stale_s=settings.lock_stale_seconds):
        marker = target / settings.watch.marker
        # A new transfer: analyses watching must wait for its end.
        marker.unlink(missing_ok=True)
        (target / FAILED_MARKER).unlink(missing_ok=True)
        result = TransferResult(
            source=source, destination=os.fspath(target), manifest=target / MANIFEST, marker=marker
        )
        try:
            _copy_all(runner, source, target, result, suffixes=suffixes, batch_size=size)
        except BaseException as error:
            _write_marker(target / FAILED_MARKER, source=source, stopped=_stopped(error))
            raise
        shutil.rmtree(target / INCOMING, ignore_errors=True)
        _write_marker(marker, source=source, files=len(result.files) + len(result.skipped))
    return result


def _held(target: Path, *, stale_s: float) -> AbstractContextManager[None]:
    """One transfer at a time into ``target`` (an hourly scrontab's beside a manual one).

    Both would copy every file into the same hidden folder, where one renames what the other
    is still writing; the same lock as an analysis output's (:func:`buzzdask.lock.held`).
    """
    return held(
        target,
        stale_s=stale_s,
        in_use=lambda holder: TransferError(
            f"{target} is being filled by another transfer ({holder}): let it finish (a watch "
            "analyses what it brings), or stop it and run this one again",
            reason="destination in use",
        ),
    )


def _check_destination(
    destination: str | os.PathLike[str], target: Path, remotes: set[str]
) -> None:
    """Refuse a transfer's destination that is, or looks like, an rclone remote.

    The arguments swapped, ``--upload`` forgotten: results would be copied into a local folder
    named ``teams:General/...``, said to be sent. A remote rclone does not know (``Teams:`` for
    ``teams:``, one not set up yet) is refused too, unless that local folder exists already.
    """
    remote = _remote_name(destination)
    if remote in remotes:
        raise ParameterError(
            f"destination {os.fspath(destination)} is an rclone remote, and transfer copies from "
            "a remote into a local folder; to send a local folder to the remote, upload it "
            f"(buzzdask transfer --upload FOLDER {os.fspath(destination)})"
        )
    if remote is not None and not target.exists():
        known = ", ".join(sorted(f"{name}:" for name in remotes)) or "none"
        raise ParameterError(
            f"destination {os.fspath(destination)} reads as an rclone remote, {remote}:, which "
            f"rclone does not have (its remotes: {known}); transfer copies into a local folder "
            "(to send one to a remote, transfer --upload FOLDER REMOTE:path; for a local folder "
            f"with a colon in its name, write ./{os.fspath(destination)})"
        )


def _stopped(error: BaseException) -> str:
    """Why a transfer stopped, for its failed marker."""
    return "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)


def _write_marker(path: Path, **facts: Any) -> None:
    path.write_text(json.dumps({**facts, "finished": utc_now()}) + "\n", encoding="utf-8")


def _copy_all(
    runner: _Rclone,
    source: str,
    target: Path,
    result: TransferResult,
    *,
    suffixes: set[str],
    batch_size: int,
) -> None:
    """List ``source``, then copy its audio files missing at ``target`` in batches."""
    wanted: list[tuple[str, int]] = []
    for entry in sorted(runner.list_files(source), key=lambda entry: str(entry["Path"])):
        relative = _safe_relative(entry["Path"])
        if PurePosixPath(relative).suffix.lower() not in suffixes or any(
            part.startswith(".") for part in PurePosixPath(relative).parts
        ):
            result.left_out.append(relative)
            continue
        here = target.joinpath(*PurePosixPath(relative).parts)
        if here.is_file() and _same_version(here.stat(), entry):
            result.skipped.append(relative)
        else:
            wanted.append((relative, int(entry["Size"])))
    batches = [wanted[i : i + batch_size] for i in range(0, len(wanted), batch_size)]
    for number, batch in enumerate(batches, start=1):
        arrived = _copy_batch(runner, source, batch, target=target, number=number)
        _append_lines(target / MANIFEST, arrived)
        result.files += [entry["file"] for entry in arrived]
        result.bytes += sum(entry["size"] for entry in arrived)
        result.batches += 1
        logger.info(
            "transfer batch %d/%d: %s arrived",
            number,
            len(batches),
            format_count(len(batch), "file"),
        )


#: rclone's ModTime: RFC 3339, up to nanoseconds (more digits than Python's parser takes).
_MOD_TIME = re.compile(r"(?P<second>[\d-]+T[\d:]+)(?P<fraction>\.\d+)?(?P<zone>Z|[+-][\d:]+)$")


def _same_version(local: os.stat_result, entry: dict[str, Any]) -> bool:
    """Whether a file at the destination is the remote's: the same size and modification time.

    Times to 2 s (rclone gives a copy the remote's; FAT keeps 2 s): a recording replaced on
    the remote is copied again although it has the same size (AudioMoth's all have one).
    """
    if local.st_size != int(entry["Size"]):
        return False
    match = _MOD_TIME.match(str(entry.get("ModTime", "")))
    if match is None:  # no time from this remote: the size alone
        return True
    zone = "+00:00" if match["zone"] == "Z" else match["zone"]
    remote_s = datetime.fromisoformat(match["second"] + zone).timestamp()
    remote_s += float(match["fraction"] or 0.0)
    return abs(local.st_mtime_ns / 1e9 - remote_s) <= 2.0  # FAT's times are to 2 s


def upload(
    source: str | os.PathLike[str],
    destination: str,
    *,
    rclone: str | None = None,
    rclone_flags: Sequence[str] | None = None,
) -> TransferResult:
    """Send a local directory (an analysis' results) to an rclone remote.

    Parameters
    ----------
    source : path-like
        Local directory, e.g. ``results/run1``.
    destination : str
        rclone destination, e.g. ``"teams:Results/run1"``.
    rclone, rclone_flags
        As for :func:`transfer`.

    Returns
    -------
    TransferResult
        ``files`` lists every file sent, relative to ``source``.

    Raises
    ------
    ParameterError
        If ``source`` is not a directory, or ``destination`` not on a remote.
    TransferError
        As for :func:`transfer` (``reason="remote not configured"`` for a remote rclone does
        not list).
    """
    local = user_path(source)
    if not local.is_dir():
        raise ParameterError(f"upload source {local} is not a directory")
    settings = load_settings(transfer={"rclone": rclone, "rclone_flags": rclone_flags})
    runner = _Rclone(settings.transfer)
    remote = _remote_name(destination)
    if remote is None:
        raise ParameterError(
            f"upload destination {destination} is not on an rclone remote (REMOTE:path); to "
            "copy into a local folder, copy it"
        )
    if remote not in runner.remotes():
        raise TransferError(
            f"cannot upload to {destination}: remote not configured (`rclone listremotes` does "
            f"not name {remote!r}); {_DIAGNOSES[0][2]}",
            reason=_DIAGNOSES[0][0],
        )
    _warn_of_runs_not_finished(local)
    # A run's lock says who writes there, on this cluster: a copy elsewhere holds no run.
    # -v: rclone names each file it copies; one the remote has already (same size and time)
    # is not sent again, and a second upload is not said to send it.
    done = runner.run(
        ["copy", "-v", "--exclude", f"{LOCK_NAME}*", os.fspath(local), destination],
        what=f"upload to {destination}",
    )
    files = sorted(p for p in local.rglob("*") if p.is_file() and LOCK_NAME not in p.name)
    names = [p.relative_to(local).as_posix() for p in files]
    said = _COPIED.findall(done.stderr)
    # Neither said (rclone-flags with -q): every file, as rclone was asked to send them all.
    copied = set(said if said or _NOTHING_COPIED in done.stderr else names)
    return TransferResult(
        source=os.fspath(local),
        destination=destination,
        files=[name for name in names if name in copied],
        skipped=[name for name in names if name not in copied],
        bytes=sum(p.stat().st_size for p, name in zip(files, names, strict=True) if name in copied),
        batches=1,
    )


#: A file rclone -v says it copied: ``2026/12/07 12:08:50 INFO  : a/x.txt: Copied (new)``.
_COPIED = re.compile(r"^\S+ \S+ INFO\s+: (.+): Copied \(", re.M)
#: What rclone -v says where the remote had every file already.
_NOTHING_COPIED = "There was nothing to transfer"


def _warn_of_runs_not_finished(local: Path) -> None:
    """Say which runs under ``local`` are still written to, or stopped (as an export does)."""
    from buzzdask.results import open_run

    for metadata in sorted(local.rglob("buzzdask.json")):
        try:
            run = open_run(metadata.parent)
        except BuzzdaskError:  # not a run's (unreadable): sent as any other file
            continue
        run.warn_if_unfinished("uploading")


class _Rclone:
    """One configured rclone executable; every failure becomes a :class:`TransferError`."""

    def __init__(self, settings: TransferSettings) -> None:
        self.executable = settings.rclone
        self.flags = list(settings.rclone_flags)

    def remotes(self) -> set[str]:
        """The names of the remotes rclone has configured (``rclone listremotes``)."""
        done = self.run(["listremotes"], what="list the configured remotes")
        return {line.strip().rstrip(":") for line in done.stdout.splitlines() if line.strip()}

    def list_files(self, source: str) -> list[dict[str, Any]]:
        done = self.run(
            ["lsjson", "--recursive", "--files-only", "--no-mimetype", source],
            what=f"list {source}",
        )
        return list(json.loads(done.stdout or "[]"))

    def copy_files(self, source: str, target: Path, files: Sequence[str]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8") as listing:
            listing.write("".join(f"{name}\n" for name in files))
            listing.flush()
            # --files-from-raw: names are names, not filter patterns; --no-traverse: do not list
            # the whole source again for each batch.
            self.run(
                [
                    "copy",
                    source,
                    os.fspath(target),
                    "--files-from-raw",
                    listing.name,
                    "--no-traverse",
                ],
                what=f"copy from {source}",
            )

    def run(self, arguments: list[str], *, what: str) -> subprocess.CompletedProcess[str]:
        command = [self.executable, *arguments, *self.flags]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise TransferError(
                f"cannot {what}: rclone executable {self.executable!r} not found "
                "(apt-get install rclone, or `module load rclone` on OSC)",
                reason="rclone missing",
            ) from None
        if done.returncode != 0:
            remotes = [name for name in map(_remote_name, arguments) if name]
            reason, advice = _diagnose(done.stderr, remote=remotes[0] if remotes else None)
            raise TransferError(
                f"cannot {what}: {reason}; {advice}",
                reason=reason,
                stderr=done.stderr.strip()[-600:],
            )
        return done


def _remote_name(location: str | os.PathLike[str]) -> str | None:
    """The remote of an rclone location (``teams`` for ``teams:Results``); None for a path."""
    match = re.match(r"([\w.\- ]+):", os.fspath(location))
    return match.group(1) if match else None


def _copy_batch(
    runner: _Rclone, source: str, batch: Sequence[tuple[str, int]], *, target: Path, number: int
) -> list[dict[str, Any]]:
    """Copy one batch into ``target``'s hidden incoming directory, check, move into place.

    ``batch`` holds ``(relative path, size listed by the remote [bytes])`` pairs; ``number``
    (from 1) goes into each returned manifest entry (``file``, ``size``, ``batch``,
    ``arrived``), one per file in ``batch`` order.
    """
    incoming = target / INCOMING
    runner.copy_files(source, incoming, [relative for relative, _ in batch])
    arrived: list[dict[str, Any]] = []
    for relative, expected in batch:
        parts = PurePosixPath(relative).parts
        copied = incoming.joinpath(*parts)
        actual = copied.stat().st_size if copied.is_file() else None
        if actual != expected:
            raise TransferError(
                f"{relative}: rclone finished but the copy holds {actual} of {expected} "
                f"bytes (changed on the remote while it was copied?); it stays hidden in "
                f"{incoming} and is not analysed: run the transfer again to copy it and the "
                "files after it (those already here are not copied again)",
                reason="incomplete file",
            )
        final = target.joinpath(*parts)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(copied, final)  # same file system: the file appears whole or not at all
        arrived.append({"file": relative, "size": expected, "batch": number, "arrived": utc_now()})
    return arrived


def _diagnose(stderr: str, *, remote: str | None = None) -> tuple[str, str]:
    text = stderr.lower()
    for reason, needles, advice in _DIAGNOSES:
        if any(needle in text for needle in needles):
            # The advice's commands, ready to paste: the remote's own name for REMOTE.
            return reason, advice if remote is None else advice.replace("REMOTE:", f"{remote}:")
    return "rclone failed", "see rclone's message"


def _safe_relative(name: str) -> str:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise TransferError(f"remote listed an unsafe name {name!r}", reason="rclone failed")
    return relative.as_posix()


def _append_lines(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    with path.open("a", encoding="utf-8") as stream:
        stream.write("".join(json.dumps(entry, sort_keys=True) + "\n" for entry in entries))
        stream.flush()
        os.fsync(stream.fileno())
