"""Node-local decoded copies: one float32 file per input and node, sliced by the chunk tasks.

Runs on the workers. A codec that cannot seek sample-exactly (AAC, Vorbis, Opus) must be decoded
from the start of the file to reach any chunk, so decoding each chunk on its own costs
``O(length**2)`` for a file. Instead the first chunk task of a file on a node decodes the whole
file once, in one streaming pass, into a raw float32 file on node-local disk (ffmpeg writes it;
no process holds the file in memory), and every chunk task on that node reads its samples from
it with ``pread``: each chunk costs its own size in memory, whatever the file's length.

The copy is made once per node, however many worker processes and threads ask at once: the
maker holds an exclusive ``flock`` on a lock file (node-local disk, so the lock is reliable, and
the kernel drops it if the maker dies), writes ``<key>.partial`` and renames it to ``<key>.f32``
when complete. Tasks waiting for it read their span from the partial file as soon as ffmpeg has
written past it, so scoring starts while the rest of the file is still being decoded.
A maker that fails leaves ``<key>.failed`` (its reason), which the waiting tasks raise too.

:func:`remove` deletes a copy (the client asks every worker once a file's chunks are done);
whatever a worker process made is also removed when it exits.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from stat import S_ISREG

import numpy as np
import psutil
from dask.utils import format_bytes

from buzzdask.errors import DecodeError, DecoderStopped

__all__ = ["copy_directory", "made_by_a_gone_process", "maker_line", "read_span", "remove"]

_SAMPLE_BYTES = 4  # float32
_POLL_S = (0.02, 0.25)  # first and longest wait between looks at a copy another task makes
_SUFFIXES = (".f32", ".partial", ".failed", ".failed.tmp", ".lock")
# What ffmpeg says when the copy's own disk fills (copies made side by side): no fault of
# the file, whose chunks are then decoded directly.
_DISK_FULL = ("No space left on device", "Disk quota exceeded")
_MADE_HERE: set[str] = set()  # stems of the copies this process made (removed at exit)
_MADE_LOCK = threading.Lock()
_NOT_MADE: set[str] = set()  # stems of the copies this process found no room for (said once)

logger = logging.getLogger(__name__)


def copy_directory(directory: str | None) -> str:
    """Where this node's decoded copies go: ``<directory>/buzzdask-pcm-<uid>``.

    One folder per user (as Dask's scratch space): in a ``/tmp`` that users share (a login
    node, an OnDemand desktop), the first user's folder refused the next user's copies, whose
    long AAC files were then decoded from their start for each chunk, until a reboot.

    Parameters
    ----------
    directory : str or None
        Node-local directory; default ``$TMPDIR`` of the process that runs this (an OSC job's
        local disk), else the system's temporary directory.
    """
    base = directory or os.environ.get("TMPDIR") or tempfile.gettempdir()
    return os.path.join(base, f"buzzdask-pcm-{os.getuid()}")


def read_span(
    key: str,
    *,
    directory: str | None,
    start: int,
    stop: int | None,
    make: Callable[[str], str],
    size_hint: int | None = None,
    name: str = "",
) -> tuple[np.ndarray, str] | None:
    """Samples ``start ... stop - 1`` of the node's decoded copy ``key``, made once if need be.

    Parameters
    ----------
    key : str
        Names the copy (a digest of the file and of how it is decoded); same key, same samples.
    directory : str or None
        As for :func:`copy_directory`.
    start : int >= 0 [samples]
    stop : int > start or None [samples]
        ``None``: to the end of the audio.
    make : callable
        ``make(path) -> messages``: writes the whole decoded file (raw float32) to ``path``;
        raises :class:`~buzzdask.errors.DecodeError` if it cannot.
    size_hint : int, optional [bytes]
        The copy's expected size: when the disk has less room than that, no copy is made.
    name : str, optional
        The file, for the warning (once per file and process) that no copy can be made.

    Returns
    -------
    (np.ndarray [shape=(n,), dtype=float32], str) or None
        The samples (``n < stop - start`` only at the end of the audio) and ``make``'s messages
        when this call made the copy (else ``""``: the maker's own chunk reports them once).
        ``None`` when no copy can be made here (the disk lacks room or cannot be written): the
        caller decodes its chunk directly instead.

    Raises
    ------
    DecodeError
        From ``make``, in this task or in the one that tried to make the copy.
    """
    stem = os.path.join(copy_directory(directory), key)
    try:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
    except OSError as error:
        _no_copy(stem, name, error.strerror or str(error))
        return None
    wait = _POLL_S[0]
    while True:
        samples = _read_file(stem + ".f32", start, stop, complete=True)
        if samples is not None:
            return samples, ""
        failure = _failure(stem)
        if failure is not None:
            raise failure
        try:
            descriptor = _open_lock(stem + ".lock")
        except OSError as error:
            # A lock no task here can open (a folder another user made, a read-only file
            # system) is not one another task holds: waiting for its copy would never end.
            _no_copy(stem, name, error.strerror or str(error))
            return None
        with _exclusive(stem + ".lock", descriptor) as mine:
            if mine:
                if os.path.exists(stem + ".f32") or os.path.exists(stem + ".failed"):
                    continue  # made (or failed) between the look above and the lock
                _remove_dead_copies(os.path.dirname(stem), keep=stem)
                free = _free_bytes(stem)
                if size_hint is not None and free < size_hint * 1.1:
                    room = f"{format_bytes(free)} free, {format_bytes(size_hint)} needed"
                    _no_copy(stem, name, room)
                    return None
                try:
                    messages = _make(stem, make)
                except _DiskFull as full:
                    _no_copy(stem, name, str(full))
                    return None
                samples = _read_file(stem + ".f32", start, stop, complete=True)
                if samples is None:  # removed at once by a run that finished with this file
                    continue
                return samples, messages
        # Another task is making it: the span may already be written.
        samples = _read_file(stem + ".partial", start, stop, complete=False)
        if samples is not None:
            return samples, ""
        time.sleep(wait)
        wait = min(2 * wait, _POLL_S[1])


def remove(key: str, *, directory: str | None) -> bool:
    """Delete the node's decoded copy ``key`` unless a task is making it right now.

    Tasks still reading it have it open and read on; a later task makes it again.

    Returns
    -------
    bool
        Whether nothing of the copy is left.
    """
    return _remove_stem(os.path.join(copy_directory(directory), key))


def _remove_stem(stem: str) -> bool:
    if not os.path.exists(stem + ".lock"):
        return True
    try:
        descriptor = _open_lock(stem + ".lock")
    except OSError:  # not this process's to remove
        return False
    with _exclusive(stem + ".lock", descriptor) as mine:
        if not mine:
            return False
        for suffix in _SUFFIXES:  # the lock last, while held: a late maker then sees it gone
            with contextlib.suppress(FileNotFoundError):
                os.remove(stem + suffix)
    with _MADE_LOCK:
        _MADE_HERE.discard(stem)
    return True


def _remove_dead_copies(directory: str, *, keep: str) -> None:
    """Remove the copies whose last holder of their lock on this host is gone, but ``keep``'s.

    A worker killed with its run (its client killed: Dask ends it with ``os._exit``, and no
    ``atexit`` runs) leaves its copies, 230 MB per audio hour, which no later run would ask
    for under the same key. Looked for before a copy is made, so they do not take its room. A
    copy a live task still makes (its lock held) stays; one that a live run still reads, whose
    maker alone died, is made again by the task that next needs it (the same samples).
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        stem = os.path.join(directory, name.removesuffix(".lock"))
        if name.endswith(".lock") and stem != keep and made_by_a_gone_process(stem + ".lock"):
            with contextlib.suppress(OSError):
                _remove_stem(stem)


def maker_line() -> str:
    """What a file this process makes says of its maker: its host and process id, a line."""
    return f"{socket.gethostname()} {os.getpid()}\n"


def made_by_a_gone_process(path: str) -> bool:
    """Whether ``path`` holds a :func:`maker_line` of this host whose process is gone.

    ``False`` for what is not a regular file (a FIFO's read would block), not one of ours, or
    gone meanwhile.
    """
    try:
        if not S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, encoding="utf-8") as file:
            maker_host, _, pid = file.read().strip().partition(" ")
    except (OSError, ValueError):
        return False
    return maker_host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


class _DiskFull(Exception):
    """The copy's disk filled while it was made: the file is not at fault."""


def _make(stem: str, make: Callable[[str], str]) -> str:
    """Make the copy under the lock: ``.partial`` then renamed; ``.failed`` if ``make`` fails.

    Raises
    ------
    DecodeError
        ``make``'s.
    _DiskFull
        Where ``make`` failed for want of room.
    """
    with _MADE_LOCK:
        if not _MADE_HERE:
            atexit.register(_remove_made_here)
        _MADE_HERE.add(stem)
    try:
        messages = make(stem + ".partial")
    except DecodeError as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(stem + ".partial")
        full = next((text for text in _DISK_FULL if text in error.stderr), None)
        if full is not None:
            raise _DiskFull(f"{full.lower()} while it was made") from None
        if not isinstance(error, DecoderStopped):  # not the file's: the next try makes it
            _write_failure(stem, error)
        raise
    # Rename (atomic): a reader never takes a copy still being written for a complete one.
    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: the caller looks again
        os.replace(stem + ".partial", stem + ".f32")
    return messages


def _read_file(path: str, start: int, stop: int | None, *, complete: bool) -> np.ndarray | None:
    """Samples ``start ... stop - 1`` of a raw float32 file, or ``None`` when not there (yet).

    A complete file gives what it holds of the span (nothing past its end); a partial one only
    the whole span, once written.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        n_samples = os.fstat(descriptor).st_size // _SAMPLE_BYTES
        if not complete and (stop is None or n_samples < stop):
            return None
        end = n_samples if stop is None else min(stop, n_samples)
        samples = np.empty(max(0, end - start), dtype="<f4")
        view = samples.data.cast("B")
        filled = 0
        while filled < len(view):
            read = os.preadv(descriptor, [view[filled:]], start * _SAMPLE_BYTES + filled)
            if not read:  # a partial file rewritten from the start by a new maker
                return None
            filled += read
        return samples.astype(np.float32, copy=False)
    finally:
        os.close(descriptor)


def _open_lock(path: str) -> int:
    """``path`` opened (made if need be) to be locked with :func:`_exclusive`."""
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def _exclusive(path: str, descriptor: int) -> Iterator[bool]:
    """Hold ``path``'s exclusive ``flock`` for the block if it is free; yield whether it was.

    ``descriptor`` is ``path`` opened (:func:`_open_lock`), closed here. A lock file removed
    by :func:`remove` while this waited on it is not a lock any more: the inode locked must
    still be the one the path names.
    """
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        try:
            linked = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            linked = False
        if linked:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, maker_line().encode())
        yield linked
    finally:
        os.close(descriptor)  # releases the flock


def _failure(stem: str) -> DecodeError | None:
    """The error of a maker that failed, as it raised it."""
    try:
        with open(stem + ".failed", encoding="utf-8") as file:
            saved = json.load(file)
    except (FileNotFoundError, ValueError):
        return None
    return DecodeError(saved["path"], saved["reason"], saved["stderr"])


def _write_failure(stem: str, error: DecodeError) -> None:
    record = {"path": error.path, "reason": error.reason, "stderr": error.stderr}
    try:
        with open(stem + ".failed.tmp", "w", encoding="utf-8") as file:
            json.dump(record, file)
        os.replace(stem + ".failed.tmp", stem + ".failed")
    except OSError:  # unrecorded, the next chunk tries again; no half record left behind
        with contextlib.suppress(OSError):
            os.remove(stem + ".failed.tmp")


def _no_copy(stem: str, name: str, why: str) -> None:
    """Say, once per file and process, why the file's chunks are decoded from its start.

    Each chunk then costs a decode from the start of the file, which a long file makes dear
    (a 6-hour file: about twenty times the CPU): the user learns where room would help.
    """
    with _MADE_LOCK:
        if stem in _NOT_MADE:
            return
        _NOT_MADE.add(stem)
    logger.warning(
        "%s: no decoded copy in %s (%s): each of its chunks is decoded from the file's start "
        "(the same samples, slower; buzzdask.staging.directory or TMPDIR choose the place)",
        name or os.path.basename(stem),
        os.path.dirname(stem),
        why,
    )


def _free_bytes(stem: str) -> int:
    try:
        return shutil.disk_usage(os.path.dirname(stem)).free
    except OSError:
        return 0


def _remove_made_here() -> None:
    """At exit: the copies this process made that no task is making again right now."""
    with _MADE_LOCK:
        stems = list(_MADE_HERE)
    for stem in stems:
        with contextlib.suppress(OSError):
            _remove_stem(stem)
