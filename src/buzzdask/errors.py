"""Exception and warning types raised by buzzdask.

Every error derives from :class:`BuzzdaskError` and from the builtin it refines, so
``except ValueError`` keeps working for callers who do not know buzzdask.
"""

from __future__ import annotations

import pickle
from typing import Any, TypeVar

__all__ = [
    "BuzzdaskError",
    "BuzzdaskWarning",
    "ClusterError",
    "DecodeError",
    "DecoderStopped",
    "InputError",
    "ModelError",
    "OutputConflictError",
    "OutputFullError",
    "OutputPermissionError",
    "ParameterError",
    "ScorerError",
    "ScorerMisplacedError",
    "TransferError",
    "as_task_answer",
    "without_chain",
]


class BuzzdaskError(Exception):
    """Root of every buzzdask error."""


class ParameterError(BuzzdaskError, ValueError):
    """An option has a value buzzdask cannot use."""


class InputError(BuzzdaskError, FileNotFoundError):
    """An input path is missing or cannot be analysed as a whole (before any work starts)."""


class ModelError(BuzzdaskError, ValueError):
    """A model directory or embedder is unusable (missing files, mismatched dimensions)."""


class OutputConflictError(BuzzdaskError, FileExistsError):
    """The output already holds results and the user did not ask to resume or start anew."""


class OutputPermissionError(BuzzdaskError, PermissionError):
    """The output refuses this user's writes (a labmate's folder): the run stops.

    A resume finishes it once the output's owner gives the group write access.
    """


class OutputFullError(BuzzdaskError, OSError):
    """The output's file system is full, or its quota reached: the run stops, a resume finishes it.

    Built as ``OutputFullError(errno, message)``, like the ``OSError`` it stands for; ``str()``
    is the message alone.
    """

    def __str__(self) -> str:
        return str(self.strerror)


class ScorerError(BuzzdaskError, RuntimeError):
    """The scorer actor could not be created or kept alive."""


class ScorerMisplacedError(ScorerError):
    """A scorer's task reached a worker other than its own, which had left or was paused.

    buzzdask then starts a scorer elsewhere; it reaches a user only through a log line.
    """


class ClusterError(BuzzdaskError, RuntimeError):
    """Cluster workers could not start (a job rejected or never running), or the run lost them."""


class DecodeError(BuzzdaskError, RuntimeError):
    """ffmpeg/ffprobe could not read an audio file.

    Parameters
    ----------
    path : str
        The file that failed.
    reason : str
        What went wrong, in words.
    stderr : str, optional
        The tail of ffmpeg's own message.
    """

    def __init__(self, path: str, reason: str, stderr: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.stderr = stderr
        message = f"{self.path}: {reason}"
        if stderr:
            message += f" (ffmpeg: {stderr})"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[DecodeError], tuple[str, str, str]]:
        # Sent between Dask workers and the client: keep the fields, not just the message.
        return (type(self), (self.path, self.reason, self.stderr))


class DecoderStopped(DecodeError):
    """ffmpeg was stopped by a signal while it decoded: not the file's fault.

    A job's end (SLURM signals every process of the job), a Ctrl-C that reached the workers,
    the out-of-memory killer. The run decodes the chunk again, elsewhere if its worker is
    going, up to ``buzzdask.score-attempts`` times.
    """


class BuzzdaskWarning(RuntimeWarning):
    """Something worked but deserves the user's attention."""


class TransferError(BuzzdaskError, RuntimeError):
    """rclone could not list, copy or upload, or a copied file is incomplete.

    Parameters
    ----------
    message : str
        What went wrong and what to do about it.
    reason : str
        ``"remote not configured"``, ``"authentication failed"``, ``"remote unreachable"``,
        ``"not found"``, ``"incomplete file"``, ``"rclone missing"``, ``"rclone failed"`` or
        ``"destination in use"`` (another transfer fills it).
    stderr : str, optional
        The tail of rclone's own message.
    """

    def __init__(self, message: str, *, reason: str, stderr: str = "") -> None:
        self.reason = reason
        self.stderr = stderr
        super().__init__(message + (f" (rclone: {stderr})" if stderr else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_transfer_error, (self.args[0], self.reason, self.stderr))


def _rebuild_transfer_error(message: str, reason: str, stderr: str) -> TransferError:
    error = TransferError("", reason=reason, stderr=stderr)
    error.args = (message,)
    return error


_Error = TypeVar("_Error", bound=BaseException)


def without_chain(error: _Error) -> _Error:
    """``error`` without its cause, context and traceback: fit to travel in a task's result.

    A probe or decode task hands a file's error back as its answer. Dask's workers pickle
    exceptions with tblib (``tblib.pickling_support``), cause, context and traceback along,
    and check that the pickle can be rebuilt only for a task's own exception, not for one in
    its result. A DecodeError raised while handling ffmpeg-python's error (whose pickle cannot
    be rebuilt: its ``args`` are its message alone) reached the client as "TypeError:
    Error.__init__() missing 2 required positional arguments", with a CRITICAL traceback. The
    reports use an error's type and message (:func:`buzzdask.ledger.describe`), not its chain.
    """
    error.__cause__ = error.__context__ = None
    error.__traceback__ = None
    return error


def as_task_answer(error: Exception) -> Exception:
    """Any ``error`` :func:`without_chain`, for a task that hands back whatever a step raised.

    A :class:`RuntimeError` naming its type and message takes its place where its own pickle
    cannot be rebuilt (its ``__init__`` takes other arguments than its ``args``).
    """
    error = without_chain(error)
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
