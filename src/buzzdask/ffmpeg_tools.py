"""Which ffmpeg decodes: a system one built with soxr, else the ``imageio-ffmpeg`` wheel's.

buzzdask's preprocessing resamples with soxr (:data:`buzzdask.decode.PREPROCESSING`), so its
ffmpeg must be built with libsoxr. :func:`find_ffmpeg` resolves the executables once, on the
client, into an :class:`FFmpegTools`: absolute paths and the version, handed to probe and decode
tasks as plain values (workers never search) and recorded in ``buzzdask.json``.

Settings ``buzzdask.ffmpeg`` and ``buzzdask.ffprobe`` are null (automatic) by default:

- ffmpeg: ``ffmpeg`` on ``PATH`` if it has soxr, else the static ffmpeg of the
  ``imageio-ffmpeg`` wheel (built with libsoxr; no ``module load`` needed). On a cluster the
  virtual environment lies on the shared file system, so that path is valid on every node.
- ffprobe: the ``ffprobe`` beside the chosen ffmpeg, if there is one; the wheel has none, and
  :func:`buzzdask.decode.probe_audio` then reads ffmpeg's own report of the file.

A configured name or path wins, and is checked the same way.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from buzzdask.errors import ParameterError

__all__ = ["FFmpegTools", "find_ffmpeg"]

Source = Literal["system", "imageio-ffmpeg", "configured"]

# A soxr resampling of a few silent samples: exits 0 only when this ffmpeg has soxr. A filter
# source rather than -f lavfi, which needs libavdevice.
_SOXR_CHECK = "anullsrc=r=44100:cl=mono,atrim=end_sample=441,aresample=16000:resampler=soxr"
_FIX = (
    "set it to an ffmpeg built with libsoxr, or to null (automatic: the system ffmpeg if it has "
    "soxr, else the imageio-ffmpeg wheel's)"
)


@dataclass(frozen=True)
class FFmpegTools:
    """The executables that probe and decode, as found on the client.

    Attributes
    ----------
    ffmpeg : str
        Absolute path of ffmpeg (built with libsoxr).
    version : str
        ffmpeg's version, as ``ffmpeg -version`` names it (``"5.1.6-0+deb12u1"``).
    source : {"system", "imageio-ffmpeg", "configured"}
        Where it came from: ``PATH``, the wheel, or ``buzzdask.ffmpeg``.
    ffprobe : str or None
        Absolute path of ffprobe; None: probe with ffmpeg.
    """

    ffmpeg: str
    version: str
    source: Source
    ffprobe: str | None

    def as_metadata(self) -> dict[str, str | None]:
        """The record of ``buzzdask.json``: path, version, source and ffprobe."""
        return {
            "path": self.ffmpeg,
            "version": self.version,
            "source": self.source,
            "ffprobe": self.ffprobe,
        }


def find_ffmpeg(*, ffmpeg: str | None = None, ffprobe: str | None = None) -> FFmpegTools:
    """Resolve ffmpeg and ffprobe (cached per value and ``PATH``).

    Parameters
    ----------
    ffmpeg : str, optional
        Name or path (``buzzdask.ffmpeg``); default: the system ffmpeg if it has soxr, else the
        ``imageio-ffmpeg`` wheel's.
    ffprobe : str, optional
        Name or path (``buzzdask.ffprobe``); default: the ffprobe beside the chosen ffmpeg, or
        none.

    Returns
    -------
    FFmpegTools

    Raises
    ------
    ParameterError
        If a configured executable is missing or does not run, if the configured ffmpeg lacks
        soxr, or if no ffmpeg with soxr is found.
    """
    return _find(ffmpeg, ffprobe, os.environ.get("PATH", os.defpath))


@functools.lru_cache(maxsize=16)
def _find(ffmpeg: str | None, ffprobe: str | None, path: str) -> FFmpegTools:
    if ffmpeg is None:
        executable, version, source = _automatic(path)
    else:
        executable, version, source = _configured(ffmpeg, path)
    probe = _beside(executable) if ffprobe is None else _configured_ffprobe(ffprobe, path)
    return FFmpegTools(ffmpeg=executable, version=version, source=source, ffprobe=probe)


def _configured_ffprobe(ffprobe: str, path: str) -> str:
    """``buzzdask.ffprobe``'s executable, checked.

    Another program there would fail every file it probes, each as if the file were not audio.
    """
    executable = _which(ffprobe, "ffprobe", path)
    answer = _stdout([executable, "-hide_banner", "-version"])
    if answer is None or answer.split()[:2] != ["ffprobe", "version"]:
        raise ParameterError(
            f"buzzdask.ffprobe={ffprobe!r} ({executable}) does not answer as ffprobe; set it to "
            "an ffprobe, or to null (the one beside ffmpeg, or none: ffmpeg then probes)"
        )
    return executable


def _configured(ffmpeg: str, path: str) -> tuple[str, str, Source]:
    """``buzzdask.ffmpeg``'s executable, checked."""
    executable = _which(ffmpeg, "ffmpeg", path)
    version = _checked(executable)
    if version is None:
        raise ParameterError(
            f"buzzdask.ffmpeg={ffmpeg!r} ({executable}) {_fault(executable)}; {_FIX}"
        )
    return executable, version, "configured"


def _automatic(path: str) -> tuple[str, str, Source]:
    """The system ffmpeg if it has soxr, else the wheel's."""
    faults = []
    system = shutil.which("ffmpeg", path=path)
    if system is not None:
        system = os.path.abspath(system)
        version = _checked(system)
        if version is not None:
            return system, version, "system"
        faults.append(f"{system} {_fault(system)}")
    try:
        import imageio_ffmpeg  # type: ignore[import-untyped]

        wheel = os.path.abspath(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError) as error:
        faults.append(f"imageio-ffmpeg: {error}")
    else:
        version = _checked(wheel)
        if version is not None:
            return wheel, version, "imageio-ffmpeg"
        faults.append(f"{wheel} (imageio-ffmpeg) {_fault(wheel)}")
    raise ParameterError(
        "buzzdask.ffmpeg is null (automatic), but no ffmpeg built with libsoxr was found: "
        f"{'; '.join(faults)}; `pip install imageio-ffmpeg`, or set buzzdask.ffmpeg to an "
        "ffmpeg built with libsoxr"
    )


def _which(name: str, key: str, path: str) -> str:
    """The absolute path of a configured executable (a path, or a name on ``PATH``)."""
    found = shutil.which(name, path=path)
    if found is None:
        fix = (
            _FIX if key == "ffmpeg" else "set it to an ffprobe, or to null (beside ffmpeg, or none)"
        )
        raise ParameterError(
            f"buzzdask.{key}={name!r} is neither an executable file nor a name on PATH; {fix}"
        )
    return os.path.abspath(found)


def _beside(ffmpeg: str) -> str | None:
    """The ffprobe in ffmpeg's directory, if any (a system install has one, the wheel none)."""
    candidate = os.path.join(os.path.dirname(ffmpeg), "ffprobe")
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def _checked(executable: str) -> str | None:
    """The version of an ffmpeg that has soxr; None for anything else.

    Both are asked at once: each answer is an ffmpeg process of about 0.1 s, before any run.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        has_soxr = pool.submit(_has_soxr, executable)
        version = _version(executable)
        return version if version is not None and has_soxr.result() else None


def _fault(executable: str) -> str:
    """Why :func:`_checked` refused ``executable`` (both answers are cached)."""
    return "is not built with libsoxr" if _version(executable) else "does not answer as ffmpeg"


@functools.lru_cache(maxsize=16)
def _version(executable: str) -> str | None:
    """The version ``-version`` names (``ffmpeg version 5.1.6 ...``: ``5.1.6``); None: no ffmpeg."""
    answer = _run(executable, "-version")
    words = answer.split() if answer is not None else []
    return words[2] if words[:2] == ["ffmpeg", "version"] and len(words) > 2 else None


@functools.lru_cache(maxsize=16)
def _has_soxr(executable: str) -> bool:
    return (
        _run(executable, "-v", "error", "-filter_complex", _SOXR_CHECK, "-f", "null", "-")
        is not None
    )


def _run(executable: str, *arguments: str) -> str | None:
    """What ffmpeg ``executable`` writes to stdout, or None if it cannot start or fails."""
    return _stdout([executable, "-nostdin", "-hide_banner", *arguments])


def _stdout(command: list[str]) -> str | None:
    """What ``command`` writes to stdout, or None if it cannot start or fails."""
    try:
        answer = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return answer.stdout.decode("utf-8", errors="replace") if answer.returncode == 0 else None
