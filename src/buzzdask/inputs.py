"""Finding the audio files an analysis covers, and naming them relative to their root."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from buzzdask.errors import InputError

__all__ = ["InputFile", "discover"]


@dataclass(frozen=True)
class InputFile:
    """One audio file to analyse.

    Parameters
    ----------
    path : str
        Absolute path.
    relative : str
        Path relative to the inputs' common root, ``/``-separated: the ``file`` column and
        the partition's place under the output.
    problem : str or None
        Why it cannot be read (broken symlink, symlink loop), reported per file.
    """

    path: str
    relative: str
    problem: str | None = None


def discover(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, extensions: Iterable[str]
) -> tuple[str, list[InputFile]]:
    """List the audio files under ``paths``.

    Parameters
    ----------
    paths : path-like or sequence of path-like
        Files and directories. Directories are walked recursively (following symlinks to
        directories once; loops are reported, not followed).
    extensions : iterable of str
        Suffixes picked up in directories (case-insensitive); files named explicitly are
        always taken.

    Returns
    -------
    root : str
        The common directory the ``relative`` names start from.
    files : list of InputFile
        Sorted by relative name.

    Raises
    ------
    InputError
        If an input path does not exist or nothing is given.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    absolute = [os.path.abspath(os.fspath(p)) for p in paths]
    if not absolute:
        raise InputError("no input paths given")
    missing = [p for p in absolute if not os.path.lexists(p)]
    if missing:
        raise InputError(f"input path(s) not found: {', '.join(missing)}")
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    tops = [p if os.path.isdir(p) else os.path.dirname(p) for p in absolute]
    root = tops[0] if len(tops) == 1 else os.path.commonpath(tops)
    found: dict[str, InputFile] = {}
    for path in absolute:
        if os.path.isdir(path):
            for file, problem in _walk(path, suffixes):
                _add(found, root, file, problem)
        else:
            problem = None if os.path.exists(path) else _dangling(path)
            _add(found, root, path, problem)
    return root, sorted(found.values(), key=lambda f: f.relative)


def _add(found: dict[str, InputFile], root: str, path: str, problem: str | None) -> None:
    relative = PurePosixPath(Path(os.path.relpath(path, root)).as_posix())
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"{path} is outside the input root {root}")
    found.setdefault(str(relative), InputFile(path=path, relative=str(relative), problem=problem))


def _walk(top: str, suffixes: set[str]) -> Iterable[tuple[str, str | None]]:
    seen: set[str] = set()
    stack = [top]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in seen:
            yield directory, "symlink loop: directory already visited"
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            yield directory, f"cannot list directory: {error.strerror}"
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files, rclone/OS partial files
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:  # a symlink loop (ELOOP): reported below as a file problem
                is_dir = False
            if is_dir:
                stack.append(entry.path)
            elif Path(entry.name).suffix.lower() in suffixes:
                if entry.is_symlink() and not os.path.exists(entry.path):
                    yield entry.path, _dangling(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    yield entry.path, None


def _dangling(path: str) -> str:
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop"
    return "broken symlink"
