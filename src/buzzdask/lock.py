"""One writer per output: ``OUTPUT/.buzzdask.lock``, safe on shared file systems.

Two runs pointed at one output (two batch jobs, a job and a notebook) would both analyse and
both journal every chunk. The lock file is written whole under a name of its own, then
hard-linked to the lock's name, which GPFS and NFS perform atomically on the server (unlike
``flock``, which does not reach across nodes on every mount): a contender never sees a lock
without its holder, which it would take for one a kill cut short. (Without hard links,
``O_CREAT | O_EXCL`` does the same but for that moment.) It names its holder (host, pid, the
process's start time, when the run began, its SLURM job), and the holder touches it every
``stale_s / 4`` seconds.

A lock is taken over, with a warning, when its holder is known dead: on this host, no process
with its pid and start time; on another host, no touch for ``stale_s`` seconds (a killed job's
node cannot be asked), or at once where the holder ran in a SLURM job that SLURM here says has
ended (a job killed outright at its time limit, by the OOM killer or with its node: the next
job, submitted at once, need not wait ``stale_s``). Only the contender holding a second,
short-lived lock (the takeover guard) may remove a stale file, and only while it is still the
one found dead: two runs finding the same stale lock do not both take it, nor does one remove
the lock the other just took.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import platform
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from buzzdask import slurm_jobs
from buzzdask.errors import BuzzdaskError, OutputConflictError
from buzzdask.write import OutputConflict, utc_now

__all__ = [
    "LOCK_NAME",
    "LockHolder",
    "OutputLock",
    "current_holder",
    "destination_held",
    "held",
    "holder_around",
    "live_holder",
    "refuse_if_in_use",
]

LOCK_NAME = ".buzzdask.lock"
# Seconds after which a takeover guard is a dead contender's: a takeover takes milliseconds.
_GUARD_STALE_S = 30.0

logger = logging.getLogger("buzzdask")


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output, from its lock file.

    Attributes
    ----------
    host, pid, started : str, int, str
        The holding process and when its run began (ISO 8601, UTC).
    process_started : float
        The process's start time (``psutil``), against pid reuse.
    token : str
        Unique to one acquisition.
    age_s : float
        Seconds since the holder last touched the file.
    command, directory : str
        The holding process's command line (``buzzdask export out``) and the directory it
        ran in (its relative paths are from there); empty in a lock file of a version that
        did not write them.
    slurm_job, slurm_cluster : str
        The SLURM job the holder ran in and its cluster's name; empty outside a job.
    user : str
        Who ran it (a lab's shared output: whom to ask); empty in older lock files.
    """

    host: str
    pid: int
    started: str
    process_started: float
    token: str
    age_s: float
    command: str = ""
    directory: str = ""
    slurm_job: str = ""
    slurm_cluster: str = ""
    user: str = ""

    def describe(self) -> str:
        """Who holds it, for a message.

        ``host n0001, pid 4242, SLURM job 123456, since 2026-06-01T05:30:00+00:00, by alice,
        running "buzzdask export out" in /fs/project``.
        """
        if self.pid < 0:  # the lock could not be read
            return "its lock file empty or cut short: a run killed as it took the output"
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        user = f", by {self.user}" if self.user else ""
        running = f', running "{self.command}"' if self.command else ""
        where = f" in {self.directory}" if running and self.directory else ""
        since = f"since {self.started}{user}"
        return f"host {self.host}, pid {self.pid}{job}, {since}{running}{where}"

    @functools.cached_property
    def job_ended(self) -> str | None:
        """The state its SLURM job ended in (``"TIMEOUT"``), where SLURM here says it ended."""
        if not self.slurm_job or self.host == platform.node():
            return None  # this host's processes are asked themselves
        return slurm_jobs.ended_state(self.slurm_job, self.slurm_cluster)

    def is_alive(self, *, stale_s: float) -> bool:
        """Whether the holder may still be running (see the module's notes)."""
        if self.host != platform.node():
            return self.age_s < stale_s and self.job_ended is None
        try:
            process = psutil.Process(self.pid)
            return abs(process.create_time() - self.process_started) < 1.0
        except psutil.Error:
            return False


def command_line(*, most: int = 160) -> str:
    """The command line of this process as typed (``buzzdask export out``), cut at ``most``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:  # python -m PACKAGE: argv[0] is its __main__.py
        first = ["python", "-m", spec.name.removesuffix(".__main__")]
    elif sys.argv and sys.argv[0] and sys.argv[0] != "-c":
        script = Path(sys.argv[0]).name
        first = ["python", script] if script.endswith(".py") else [script]
    else:
        first = ["python", *sys.argv[:1]]
    line = " ".join(shlex.quote(word) for word in [*first, *sys.argv[1:]])
    return line if len(line) <= most else f"{line[: most - 3]}..."


def _user() -> str:
    """The name of the user running this process (its uid where the system names none)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a container's uid without a passwd entry
        return str(os.getuid())


def _working_directory() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed under the process
        return ""


def current_holder(root: Path) -> LockHolder | None:
    """The holder named by ``root``'s lock file; None without one (or one cut short)."""
    path = root / LOCK_NAME
    try:
        text = path.read_text(encoding="utf-8")
        age = time.time() - path.stat().st_mtime
        entry = json.loads(text)
        return LockHolder(
            host=str(entry["host"]),
            pid=int(entry["pid"]),
            started=str(entry["started"]),
            process_started=float(entry["process_started"]),
            token=str(entry["token"]),
            age_s=max(age, 0.0),
            command=str(entry.get("command", "")),
            directory=str(entry.get("directory", "")),
            slurm_job=str(entry.get("slurm_job", "")),
            slurm_cluster=str(entry.get("slurm_cluster", "")),
            user=str(entry.get("user", "")),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Written by a process killed between create and write: its holder is gone.
        return LockHolder("?", -1, "?", 0.0, "", float("inf"))


#: The tokens of the locks this thread holds, by their output's real path: a run inside a hold
#: of its own thread takes it as its own (a watch holds its output between passes, and each
#: pass's analysis holds it again).
_held = threading.local()


def _tokens_here() -> dict[str, str]:
    if not hasattr(_held, "tokens"):
        _held.tokens = {}
    tokens: dict[str, str] = _held.tokens
    return tokens


def _held_here(root: Path, holder: LockHolder | None) -> bool:
    """Whether ``holder`` of ``root`` is a lock this thread holds."""
    return holder is not None and _tokens_here().get(os.path.realpath(root)) == holder.token


def live_holder(root: Path, *, stale_s: float) -> LockHolder | None:
    """The holder of ``root`` if it may still be running (:meth:`LockHolder.is_alive`)."""
    holder = current_holder(root)
    return holder if holder is not None and holder.is_alive(stale_s=stale_s) else None


def holder_around(root: Path, *, stale_s: float) -> tuple[Path, LockHolder] | None:
    """A live holder of ``root`` or of an output around it, with the folder it holds.

    Around it: the run of several heads ``root`` is one head of, or one of its heads. A hold of
    this thread is none. A run of several heads holds its folder, and writes each head's
    output inside it: a resume of one head alone (what ``status`` of that head suggested)
    wrote into it beside the run, each chunk twice.
    """
    above = root.parent
    related = [root]
    if _of_several_heads(above):
        related.append(above)
    if _of_several_heads(root):
        related.extend(sorted(path.parent for path in root.glob("*/buzzdask.json")))
    for folder in related:
        holder = live_holder(folder, stale_s=stale_s)
        if holder is not None and not _held_here(folder, holder):
            return folder, holder
    return None


def _of_several_heads(folder: Path) -> bool:
    """Whether ``folder`` is a run of several heads' (its log, and no run metadata of its own)."""
    return (folder / "buzzdask.log").is_file() and not (folder / "buzzdask.json").exists()


def refuse_if_in_use(root: Path, *, stale_s: float, resuming: bool = False) -> None:
    """Raise ``OutputConflictError`` ("in use") if a live run holds ``root`` or one around it.

    Around it: the run of several heads ``root`` is one head of, or one of its heads
    (:func:`holder_around`). Checked before an output's other conflicts, so that a second run
    hears that another is writing there, not that the output holds results. A hold of this
    thread is no conflict. ``resuming``: the run refused was to resume it (the ways on differ).
    """
    found = holder_around(root, stale_s=stale_s)
    if found is not None:
        raise _in_use(found[0], found[1], stale_s=stale_s, resuming=resuming)


def _in_use(
    root: Path, holder: LockHolder | None, *, stale_s: float, resuming: bool = False
) -> OutputConflictError:
    # How long ago it last showed life: whether to wait, and how long until a takeover.
    described = (
        f"{holder.describe()}; last sign of life {holder.age_s:.0f} s ago"
        if holder
        else "another run"
    )
    conflict = OutputConflict(root, "in use", holder=described, stale_s=stale_s, resuming=resuming)
    return OutputConflictError(conflict)


class OutputLock:
    """Hold ``root`` for this process's run; a context manager.

    Parameters
    ----------
    root : Path
        The output directory (created if missing).
    started : str
        When the run began, for the message another run gets.
    stale_s : float > 0 [s]
        A holder on another host that has not touched the lock for this long is dead.

    Raises
    ------
    OutputConflictError
        From ``__enter__``: a live run holds ``root`` (reason ``"in use"``, naming it), or
        ``root`` cannot be created or written in (``"cannot create"``, ``"cannot write"``).
    """

    def __init__(self, root: Path, *, started: str, stale_s: float) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.started = started
        self.stale_s = stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        #: The warning of a takeover from a dead run, where this lock made one.
        self.took_over: str | None = None
        # Entered inside a hold of this thread: that one's, left as it is.
        self._nested = False

    def __enter__(self) -> OutputLock:
        if _held_here(self.root, current_holder(self.root)):
            self._nested = True
            return self
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a new sibling (--new) beside a read-only output
            refused = OutputConflict(self.root, "cannot create", problem=error.strerror or "")
            raise OutputConflictError(refused) from None
        for _ in range(10):
            try:
                created = self._create()
            except OSError as error:  # a read-only mount, another user's results
                refused = OutputConflict(self.root, "cannot write", problem=error.strerror or "")
                raise OutputConflictError(refused) from None
            if created:
                break
            holder = current_holder(self.root)
            if holder is None:
                continue  # released meanwhile
            if holder.token == self.token:
                break  # NFS: the link was made, but its reply was lost and the retry refused
            if holder.is_alive(stale_s=self.stale_s):
                raise _in_use(self.root, holder, stale_s=self.stale_s)
            self._set_aside(holder)
        else:  # it kept changing hands
            raise _in_use(self.root, current_holder(self.root), stale_s=self.stale_s)
        self._heartbeat = threading.Thread(
            target=self._touch, name="buzzdask-output-lock", daemon=True
        )
        self._heartbeat.start()
        _tokens_here()[os.path.realpath(self.root)] = self.token
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._nested:
            return
        _tokens_here().pop(os.path.realpath(self.root), None)
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = current_holder(self.root)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def _create(self, path: Path | None = None) -> bool:
        """Create the lock file (or ``path``) naming this holder; False if it exists."""
        path = path or self.path
        entry: dict[str, Any] = {
            "host": platform.node(),
            "pid": os.getpid(),
            "started": self.started,
            "process_started": psutil.Process().create_time(),
            "token": self.token,
            # Said to whoever it holds off: which of their commands (or a notebook) it is.
            "command": command_line(),
            "directory": _working_directory(),
            "user": _user(),
        }
        job = slurm_jobs.current_job()
        if job is not None:  # asked of SLURM by a run that meets it on another node
            entry["slurm_job"], entry["slurm_cluster"] = job
        written = self.path.with_name(f"{LOCK_NAME}.{self.token}.new")
        try:
            # In the try: a disk too full to write it would leave it, and the output folder
            # it may have been made in could not be removed as left empty.
            written.write_text(json.dumps(entry), encoding="utf-8")
            os.link(written, path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            return self._create_exclusive(path, entry)
        finally:
            written.unlink(missing_ok=True)

    @staticmethod
    def _create_exclusive(path: Path, entry: dict[str, Any]) -> bool:
        """Create ``path`` with ``O_EXCL`` (a file system without hard links)."""
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            json.dump(entry, stream)
        return True

    def _set_aside(self, holder: LockHolder) -> None:
        """Remove a dead holder's lock, with a warning, if this contender holds the guard.

        Otherwise (another contender is taking over) wait a moment: the caller looks again.
        """
        guard = self.path.with_name(f"{LOCK_NAME}.takeover")
        if not self._create(guard):
            try:  # a contender killed in the middle of a takeover leaves its guard
                if time.time() - guard.stat().st_mtime > _GUARD_STALE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return
        try:
            current = current_holder(self.root)
            if current is None or current.token != holder.token:
                return  # it changed hands meanwhile: not the lock found dead
            aside = self.path.with_name(f"{LOCK_NAME}.{self.token}.stale")
            os.rename(self.path, aside)
            aside.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)
        if holder.job_ended is not None:
            refreshed = f"; its SLURM job ended: {holder.job_ended}"
        elif math.isinf(holder.age_s):
            refreshed = ""
        else:
            refreshed = f"; its lock last refreshed {holder.age_s:.0f} s ago"
        self.took_over = (
            f"took over {self.root} from a run that is gone ({holder.describe()}{refreshed})"
        )
        logger.warning("%s", self.took_over)

    def _touch(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            holder = current_holder(self.root)
            if holder is not None and holder.token != self.token:
                # Taken over while this process was stalled past stale_s (a suspended job, a
                # node hung on its file system): the new holder's lock is not this one's to
                # keep fresh.
                logger.warning(
                    "%s: the output's lock is now held by another run (%s); this run goes on, "
                    "but both write there: stop one of them",
                    self.root,
                    holder.describe(),
                )
                return
            try:
                if holder is None and self._create():
                    # Taken over while this process was stalled, by a run that has ended since
                    # (and removed it), or removed by hand: held again, so that a third run
                    # waits for this one.
                    logger.warning(
                        "%s: the output's lock was gone (taken over while this run was stalled, "
                        "by a run that has ended since; or removed): this run holds it again and "
                        "goes on, but another may have written there meanwhile",
                        self.root,
                    )
                os.utime(self.path)
            except OSError:  # the output vanished or filled up; the run reports that itself
                pass


@contextmanager
def held(root: Path, *, stale_s: float, in_use: Callable[[str], BuzzdaskError]) -> Iterator[None]:
    """Hold ``root`` with an :class:`OutputLock` for a block (a command writing files there).

    Parameters
    ----------
    root : Path
        The folder (created if missing).
    stale_s : float > 0 [s]
        As :class:`OutputLock`'s.
    in_use : callable (holder) -> BuzzdaskError
        The error raised where a live process holds ``root``, from that holder in words
        (``host n0001, pid 4242, since ...``): each command says what it is waiting on.

    Raises
    ------
    OutputConflictError
        ``root`` cannot be created or written in.
    """
    if root.exists() and not root.is_dir():  # not "cannot write in it (File exists)"
        raise OutputConflictError(f"{root} exists and is not a directory: give a folder")
    lock = OutputLock(root, started=utc_now(), stale_s=stale_s)
    try:
        lock.__enter__()
    except OutputConflictError as error:
        conflict = error.args[0] if error.args else None
        if isinstance(conflict, OutputConflict) and conflict.reason != "in use":
            raise OutputConflictError(f"cannot write in {root} ({conflict.problem})") from None
        holder = current_holder(root)
        raise in_use(holder.describe() if holder else "another process") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def destination_held(dest: Path) -> AbstractContextManager[None]:
    """One command at a time writing files (an export, summaries, plots) into ``dest``.

    Two would both find the folder free, then write over each other's files (a PNG of one
    with the other's last bytes). Held from the check of what is there to the last file.
    """
    from buzzdask.settings import load_settings

    return held(
        dest,
        stale_s=load_settings().lock_stale_seconds,
        in_use=lambda holder: OutputConflictError(
            f"{dest} is being written by another buzzdask command ({holder}): wait for it to "
            "end, or choose another dest (--dest)"
        ),
    )
