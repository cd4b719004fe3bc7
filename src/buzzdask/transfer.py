"""Moving recordings: cloud remote → shared scratch (rclone), and scratch → a worker's local disk.

**rclone.** The lab's recordings live in Microsoft Teams (SharePoint/OneDrive). ``rclone`` reaches
them once the user has configured a remote with ``rclone config``. :func:`transfer` copies the
audio files under ``REMOTE:path`` to a local directory in batches. Each batch is copied into a
hidden directory inside the destination (``.buzzdask-incoming/``) and each file is renamed into
place only after rclone has finished and verified it. An analysis skips hidden names, so it
never sees half a file, whichever rclone version writes it. A line per arrived file goes into the
manifest ``.buzzdask-transfer.jsonl``, and the marker ``.transfer-complete`` is written last:
:mod:`buzzdask.watch` stops there. :func:`upload` sends a results directory back.

**Node-local staging.** Hundreds of decode tasks reading their files from a parallel file system
(OSC's ``/fs/scratch``) load its metadata servers and share its bandwidth with every other job.
:func:`staged` copies a file once to the worker's node-local disk (``$TMPDIR`` in an OSC job),
ffmpeg reads it from there, and the copy is removed once no decode uses it any more.
:func:`decode_chunk_staged` is :func:`buzzdask.decode.decode_chunk` with that copy.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from buzzdask import config
from buzzdask.decode import AudioInfo, ChunkPlan, DecodedChunk, decode_chunk
from buzzdask.errors import DecodeError, ParameterError, TransferError
from buzzdask.progress import logger
from buzzdask.write import utc_now

__all__ = [
    "INCOMING",
    "MANIFEST",
    "TransferError",
    "TransferResult",
    "decode_chunk_staged",
    "staged",
    "transfer",
    "upload",
]

INCOMING = ".buzzdask-incoming"
MANIFEST = ".buzzdask-transfer.jsonl"

# What rclone prints, in words a user can act on (first match wins).
_DIAGNOSES = (
    (
        "remote not configured",
        ("didn't find section in config file", "config file not found"),
        "the rclone remote is not configured: run `rclone config` (see the README, "
        "'From Teams/SharePoint to OSC')",
    ),
    (
        "authentication failed",
        ("401", "403 forbidden", "unauthorized", "invalid_grant", "token expired", "auth"),
        "the remote refused the credentials: refresh them with `rclone config reconnect REMOTE:`",
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
        "the remote cannot be reached: check the network (OSC compute nodes have none; "
        "transfer from a login or data-mover node)",
    ),
    (
        "not found",
        ("directory not found", "object not found", "file not found", "not found"),
        "the path does not exist on the remote",
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
        Files already at the destination with the same size (downloads only).
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
        copies only what is missing.
    ParameterError
        If ``batch_size`` is not a positive integer.
    """
    size = int(config.get("transfer.batch-size", batch_size))
    if size <= 0:
        raise ParameterError(f"batch_size={size} must be a positive integer")
    runner = _Rclone(rclone, rclone_flags)
    suffixes = {e.lower() for e in config.get("extensions", extensions)}
    target = Path(destination).absolute()
    target.mkdir(parents=True, exist_ok=True)
    marker = target / str(config.get("watch.marker"))
    marker.unlink(missing_ok=True)  # a new transfer: analyses watching must wait for its end
    incoming = target / INCOMING
    result = TransferResult(
        source=source, destination=os.fspath(target), manifest=target / MANIFEST, marker=marker
    )

    wanted: list[tuple[str, int]] = []
    for entry in sorted(runner.list(source), key=lambda entry: str(entry["Path"])):
        relative = _safe_relative(entry["Path"])
        if PurePosixPath(relative).suffix.lower() not in suffixes or any(
            part.startswith(".") for part in PurePosixPath(relative).parts
        ):
            continue
        here = target.joinpath(*PurePosixPath(relative).parts)
        if here.is_file() and here.stat().st_size == entry["Size"]:
            result.skipped.append(relative)
        else:
            wanted.append((relative, int(entry["Size"])))
    batches = [wanted[i : i + size] for i in range(0, len(wanted), size)]
    for number, batch in enumerate(batches, start=1):
        runner.copy_files(source, incoming, [relative for relative, _ in batch])
        arrived = []
        for relative, expected in batch:
            parts = PurePosixPath(relative).parts
            copied = incoming.joinpath(*parts)
            actual = copied.stat().st_size if copied.is_file() else None
            if actual != expected:
                raise TransferError(
                    f"{relative}: rclone finished but the copy holds {actual} of {expected} "
                    f"bytes; it stays hidden in {incoming} and is not analysed",
                    reason="incomplete file",
                )
            final = target.joinpath(*parts)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(copied, final)  # same file system: the file appears whole or not at all
            arrived.append(
                {"file": relative, "size": expected, "batch": number, "arrived": utc_now()}
            )
        _append_lines(target / MANIFEST, arrived)
        result.files += [entry["file"] for entry in arrived]
        result.bytes += sum(entry["size"] for entry in arrived)
        result.batches += 1
        logger.info("transfer batch %d/%d: %d files arrived", number, len(batches), len(batch))
    shutil.rmtree(incoming, ignore_errors=True)
    marker.write_text(
        json.dumps(
            {
                "source": source,
                "files": len(result.files) + len(result.skipped),
                "finished": utc_now(),
            }
        )
        + "\n",
        encoding="utf-8",
    )
    return result


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
        If ``source`` is not a directory.
    TransferError
        As for :func:`transfer`.
    """
    local = Path(source).absolute()
    if not local.is_dir():
        raise ParameterError(f"upload source {local} is not a directory")
    runner = _Rclone(rclone, rclone_flags)
    runner.run(["copy", os.fspath(local), destination], what=f"upload to {destination}")
    files = sorted(p for p in local.rglob("*") if p.is_file())
    return TransferResult(
        source=os.fspath(local),
        destination=destination,
        files=[p.relative_to(local).as_posix() for p in files],
        bytes=sum(p.stat().st_size for p in files),
        batches=1,
    )


class _Rclone:
    """One configured rclone executable; every failure becomes a :class:`TransferError`."""

    def __init__(self, executable: str | None, flags: Sequence[str] | None) -> None:
        self.executable = str(config.get("transfer.rclone", executable))
        self.flags = [str(flag) for flag in config.get("transfer.rclone-flags", flags)]

    def list(self, source: str) -> list[dict[str, Any]]:
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
            reason, advice = _diagnose(done.stderr)
            raise TransferError(
                f"cannot {what}: {reason}; {advice}",
                reason=reason,
                stderr=done.stderr.strip()[-600:],
            )
        return done


def _diagnose(stderr: str) -> tuple[str, str]:
    text = stderr.lower()
    for reason, needles, advice in _DIAGNOSES:
        if any(needle in text for needle in needles):
            return reason, advice
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


# -- node-local staging ------------------------------------------------------------------------


@dataclass
class _Copy:
    """A file staged in this worker process, shared by the decodes that use it."""

    local: str
    users: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    error: OSError | None = None


_STAGE_LOCK = threading.Lock()
_COPIES: OrderedDict[tuple[str, int, int], _Copy] = OrderedDict()
_STAGE_DIRS: dict[str, str] = {}


@contextmanager
def staged(
    path: str | os.PathLike[str], *, directory: str | None = None, keep_files: int = 1
) -> Iterator[str]:
    """Copy a file to node-local disk for as long as the ``with`` block needs it.

    The copy is made once per worker process and shared by concurrent decodes of the same
    file (its chunks). When no decode uses it, it is kept while it is among the ``keep_files``
    most recently staged idle files, so the file's next chunk finds it, and removed after that.
    Whatever is left is removed when the process exits.

    Parameters
    ----------
    path : path-like
        The file on shared storage.
    directory : str, optional
        Node-local directory; default ``$TMPDIR`` of the process that runs this (an OSC job's
        local disk), else the system's temporary directory.
    keep_files : int >= 0
        Idle staged files kept for reuse.

    Yields
    ------
    str
        The local copy's path (same name, in a private directory of this process).

    Raises
    ------
    OSError
        If the copy cannot be made (full or missing local disk); nothing is left behind.
    """
    source = os.path.abspath(os.fspath(path))
    status = os.stat(source)
    key = (source, status.st_size, status.st_mtime_ns)
    with _STAGE_LOCK:
        copy = _COPIES.get(key)
        owner = copy is None
        if copy is None:
            private = _stage_directory(directory)
            copy = _COPIES[key] = _Copy(
                local=os.path.join(private, f"{uuid.uuid4().hex[:8]}-{os.path.basename(source)}")
            )
        copy.users += 1
        _COPIES.move_to_end(key)
    try:
        if owner:
            try:
                shutil.copyfile(source, copy.local)
            except OSError as error:
                copy.error = error
            finally:
                copy.ready.set()
        else:
            copy.ready.wait()
        if copy.error is not None:
            raise copy.error
        yield copy.local
    finally:
        with _STAGE_LOCK:
            copy.users -= 1
            if copy.error is not None and copy.users == 0:
                _COPIES.pop(key, None)
                _remove(copy.local)
            idle = [k for k, c in _COPIES.items() if c.users == 0]
            for stale in idle[: max(0, len(idle) - keep_files)]:
                _remove(_COPIES.pop(stale).local)


def decode_chunk_staged(
    info: AudioInfo,
    plan: ChunkPlan,
    *,
    staging_directory: str | None = None,
    keep_files: int = 1,
    **decode_options: Any,
) -> DecodedChunk:
    """:func:`buzzdask.decode.decode_chunk` reading a node-local copy of the file.

    Parameters
    ----------
    info, plan
        As for :func:`~buzzdask.decode.decode_chunk`.
    staging_directory, keep_files
        As ``directory`` and ``keep_files`` of :func:`staged`.
    **decode_options
        The keyword arguments of :func:`~buzzdask.decode.decode_chunk`.

    Returns
    -------
    DecodedChunk
        The same samples as decoding the file in place.

    Raises
    ------
    DecodeError
        Naming the original file: ffmpeg failed, or the local copy could not be made.
    """
    try:
        with staged(info.path, directory=staging_directory, keep_files=keep_files) as local:
            try:
                return decode_chunk(dataclasses.replace(info, path=local), plan, **decode_options)
            except DecodeError as error:
                raise DecodeError(info.path, error.reason, error.stderr) from None
    except OSError as error:
        raise DecodeError(
            info.path, f"cannot stage a copy on node-local disk: {error.strerror or error}"
        ) from None


def _stage_directory(directory: str | None) -> str:
    """The calling process' own directory under ``directory`` (made once, removed at exit)."""
    base = directory or os.environ.get("TMPDIR") or tempfile.gettempdir()
    if base not in _STAGE_DIRS or not os.path.isdir(_STAGE_DIRS[base]):
        os.makedirs(base, exist_ok=True)  # a configured directory may not exist yet
        private = tempfile.mkdtemp(prefix=f"buzzdask-stage-{os.getpid()}-", dir=base)
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        _STAGE_DIRS[base] = private
    return _STAGE_DIRS[base]


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
