"""Node-local staging: a worker decodes a node-local copy of its file, not the shared one.

Runs on the workers. Hundreds of decode tasks reading their files from a parallel file system
(OSC's ``/fs/scratch``) load its metadata servers and share its bandwidth with every other job.
:func:`staged` copies a file once to the worker's node-local disk (``$TMPDIR`` in an OSC job),
ffmpeg reads it from there, and the copy is removed once no decode uses it any more.
:func:`decode_chunk_staged` is :func:`buzzdask.decode.decode_chunk` with that copy.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    DecodedChunk,
    decode_chunk,
    readable_stat,
    uses_decoded_copy,
)
from buzzdask.errors import DecodeError
from buzzdask.pcm_cache import made_by_a_gone_process, maker_line

__all__ = ["decode_chunk_staged", "staged"]


@dataclass
class _Copy:
    """A file staged in this worker process, shared by the decodes that use it."""

    local: str
    users: int = 0
    ready: threading.Event = field(default_factory=threading.Event)
    error: OSError | None = None


_COPY_OPTIONS = ("spec", "margin_s", "seekable_codecs")  # what decides the decoded-copy path
_STAGE_LOCK = threading.Lock()
_COPIES: OrderedDict[tuple[str, int, int], _Copy] = OrderedDict()
_STAGE_DIRS: dict[str, str] = {}
_STAGE_PREFIX = "buzzdask-stage-"
#: In each stage directory: the host and process id of the worker that made it.
_OWNER = ".owner"
# (directory, reason) already warned of in this process: one line each, not one per chunk.
_WARNED: set[tuple[str, str]] = set()
logger = logging.getLogger(__name__)


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
        The same samples as decoding the file in place. A chunk that
        :func:`~buzzdask.decode.decode_chunk` reads from the node's decoded copy of its file
        (a codec that cannot seek exactly) is not staged: that copy is made in one reading of
        the file, and is keyed by the file's own path, shared by every worker on the node.

    Raises
    ------
    DecodeError
        Naming the original file: ffmpeg failed. A copy that cannot be made is no error: the
        chunk is decoded in place, with one warning per worker for each reason.
    """
    copy_options = {k: decode_options[k] for k in _COPY_OPTIONS if k in decode_options}
    if uses_decoded_copy(info, plan, **copy_options):
        return decode_chunk(info, plan, **decode_options)
    try:
        with staged(info.path, directory=staging_directory, keep_files=keep_files) as local:
            try:
                return decode_chunk(dataclasses.replace(info, path=local), plan, **decode_options)
            except DecodeError as error:  # of the copy: said of the file, of the same kind
                raise type(error)(info.path, error.reason, error.stderr) from None
    except OSError as error:
        # The original's own problem first: moved or deleted since its probe.
        readable_stat(info.path)
        # Staging only spares the shared file system: without a copy (a local directory that
        # cannot be made, a full local disk), the chunk is read in place, to the same samples.
        where = staging_directory or "$TMPDIR"
        problem = (where, error.strerror or str(error))
        if problem not in _WARNED:
            _WARNED.add(problem)
            logger.warning(
                "cannot stage copies in %s (%s): reading files in place (buzzdask.staging)",
                *problem,
            )
        return decode_chunk(info, plan, **decode_options)


def _stage_directory(directory: str | None) -> str:
    """The calling process' own directory under ``directory`` (made once, removed at exit).

    A worker that does not exit by itself (a nanny's kill when the worker is slow to close,
    as a notebook's own cluster closing; a killed job) runs no ``atexit``: the directories of
    this host's processes that are gone are removed as a new one is made.
    """
    base = directory or os.environ.get("TMPDIR") or tempfile.gettempdir()
    if base not in _STAGE_DIRS or not os.path.isdir(_STAGE_DIRS[base]):
        os.makedirs(base, exist_ok=True)  # a configured directory may not exist yet
        _remove_dead_stage_dirs(base)
        private = tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=base)
        with open(os.path.join(private, _OWNER), "w", encoding="utf-8") as owner:
            owner.write(maker_line())
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        _STAGE_DIRS[base] = private
    return _STAGE_DIRS[base]


def _remove_dead_stage_dirs(base: str) -> None:
    """Remove the stage directories under ``base`` whose process on this host is gone."""
    try:
        names = [name for name in os.listdir(base) if name.startswith(_STAGE_PREFIX)]
    except OSError:
        return
    for name in names:
        if made_by_a_gone_process(os.path.join(base, name, _OWNER)):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
