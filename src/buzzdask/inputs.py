"""Finding the audio files an analysis covers, and naming them relative to their root.

What the input directories hold besides (other suffixes, hidden names, copies in progress) is
recorded, so that an input without audio is an error that says why.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from buzzdask.errors import InputError, ParameterError

__all__ = [
    "Discovery",
    "InputFile",
    "Skipped",
    "as_list",
    "describe_skipped",
    "discover",
    "first_names",
    "named_from",
    "scan",
    "user_path",
]

# Names a copy in progress leaves (rclone's --partial-suffix, browsers, editors): not audio yet.
_PARTIAL_SUFFIXES = (".partial", ".part", ".tmp", ".crdownload")
_SHOWN = 3  # names shown per reason when reporting skipped files
#: A folder's description, as ``buzzdask init`` writes in ``audio_in/``: never news to report.
_READMES = ("readme", "readme.md", "readme.txt")
#: What every buzzdask output directory holds (:class:`buzzdask.write.OutputLayout`'s metadata,
#: and the run log a run of several models writes at its top).
_OUTPUT_MARKERS = ("buzzdask.json", "buzzdask.log")
#: Skipped without a word when there is audio beside them: results written among the inputs
#: (``--output`` inside the input folder) would otherwise be listed on every resume.
_QUIET = ("hidden", "readme", "buzzdask output")


def as_list(items: Any) -> list[Any]:
    """One name or path, or a sequence of them, as a list (never a string's characters)."""
    return [items] if isinstance(items, (str, os.PathLike)) else list(items)


def user_path(path: str | os.PathLike[str], *, what: str = "path") -> Path:
    """A path the user gave, absolute: ``~`` expanded, ``..`` taken off as the shell does.

    From a notebook, ``output="~/results/run1"`` is the user's home, as for pandas: not a
    folder named ``~`` in the working directory.

    Parameters
    ----------
    path : str or path-like
    what : str
        The keyword it came as, for the messages.

    Raises
    ------
    ParameterError
        If ``path`` is not a path, or is empty: ``--output "$OUT"`` with ``OUT`` unset would
        otherwise mean the working directory, written into without a word.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ParameterError(f"{what}={path!r} must be a path (str or pathlib.Path)")
    text = os.fspath(path)
    if not text.strip():
        raise ParameterError(f"{what}={text!r} is empty: name a folder ('.' for this one)")
    return Path(os.path.abspath(os.path.expanduser(text)))


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
        Why it cannot be read (broken symlink, symlink loop, a name that is not UTF-8),
        reported per file.
    real : str
        Its path with no symbolic link in it, as the scan that found it knew it ("": not known).
    """

    path: str
    relative: str
    problem: str | None = None
    real: str = ""


@dataclass(frozen=True)
class Skipped:
    """A name in an input directory that is not analysed.

    Parameters
    ----------
    relative : str
        Path relative to the inputs' root (``/``-separated; a directory ends with ``/``).
    reason : {"other suffix", "hidden", "readme", "partial transfer", "buzzdask output"}
        Its suffix is not in ``buzzdask.extensions``; its name starts with ``.`` (a hidden
        directory counts once, unwalked); it is a ``README`` (as ``buzzdask init`` writes in
        ``audio_in/``); it is a copy in progress (``.partial``, ``.part``, ``.tmp``,
        ``.crdownload``); or it is a directory of buzzdask's results below an input (it holds
        a ``buzzdask.json`` or ``buzzdask.log``: counted once, its contents left alone).
    """

    relative: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    """What :func:`scan` found under the inputs.

    Parameters
    ----------
    paths : tuple of str
        The inputs, absolute.
    root : str
        The common directory the ``relative`` names start from.
    files : list of InputFile
        The audio files, sorted by relative name.
    skipped : list of Skipped
        What the directories held besides, sorted by relative name.
    suffixes : tuple of str
        The suffixes taken in directories (lower case, with the dot).
    """

    paths: tuple[str, ...]
    root: str
    files: list[InputFile]
    skipped: list[Skipped] = field(default_factory=list)
    suffixes: tuple[str, ...] = ()

    @property
    def visible_skipped(self) -> list[Skipped]:
        """What was skipped, less hidden names and READMEs (all a run with audio reports)."""
        return [item for item in self.skipped if item.reason not in _QUIET]

    def require_audio(self) -> None:
        """Raise :class:`InputError` when no (readable) audio file was found, saying where and why.

        Raises
        ------
        InputError
            Naming the paths looked in, the suffixes taken (``buzzdask.extensions``) and what
            was skipped, with the fix.
        """
        if any(file.problem is None for file in self.files):
            return
        if self.files:  # every one a broken link or a loop: nothing for a cluster to start on
            problems = [f"{file.relative}: {file.problem}" for file in self.files]
            raise InputError(
                f"no readable audio file in {', '.join(self.paths)}: "
                + first_names(problems, shown=_SHOWN, separator="; ")
            )
        skipped = f"; {describe_skipped(self.skipped)}" if self.skipped else "; they hold no files"
        raise InputError(
            f"no audio files in {', '.join(self.paths)} (looked for "
            f"{' '.join(self.suffixes)}, from buzzdask.extensions, in every subdirectory)"
            f"{skipped}. Give the directory that holds the recordings, or add their suffix to "
            "buzzdask.extensions, a list that replaces the default: name every suffix wanted "
            '(e.g. DASK_BUZZDASK__EXTENSIONS=\'[".wav", ".mp3", ".wv"]\')'
        )


def first_names(names: Sequence[str], *, shown: int, separator: str = ", ") -> str:
    """The first ``shown`` of ``names``, then ``...`` where there are more: ``"a, b, ..."``."""
    return separator.join([*names[:shown], *(["..."] if len(names) > shown else [])])


def describe_skipped(skipped: Sequence[Skipped]) -> str:
    """What was skipped, by reason, with the first names.

    For example ``"5 skipped: 4 other suffix (a.txt, b.txt, c.txt, ...), 1 hidden (.x)"``.
    """
    by_reason: dict[str, list[str]] = {}
    for item in skipped:
        by_reason.setdefault(item.reason, []).append(item.relative)
    parts = [
        f"{len(names)} {reason} ({first_names(names, shown=_SHOWN)})"
        for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1]))
    ]
    return f"{len(skipped)} skipped: {', '.join(parts)}"


def scan(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, extensions: Iterable[str]
) -> Discovery:
    """List the audio files under ``paths``, and what the directories hold besides.

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
    Discovery

    Raises
    ------
    InputError
        If an input path does not exist or is empty, nothing is given, or an input is not a
        path.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    elif not isinstance(paths, Iterable) or isinstance(paths, bytes):
        raise InputError(f"inputs must be a path or a list of paths, not {paths!r}")
    paths = list(paths)
    wrong = [p for p in paths if not isinstance(p, (str, os.PathLike))]
    if wrong:
        raise InputError(f"inputs must be paths (str or pathlib.Path), not {wrong[0]!r}")
    if any(not os.fspath(p).strip() for p in paths):
        # os.environ.get("AUDIO", "") unset: the current directory, walked whole, is no input.
        raise InputError("an input path is empty; name the recordings' folder ('.' for here)")
    absolute = [str(user_path(p)) for p in paths]
    if not absolute:
        raise InputError("no input paths given")
    missing = [p for p in absolute if not os.path.lexists(p)]
    if missing:
        raise InputError(f"input path(s) not found: {', '.join(missing)}")
    suffixes = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    tops = [p if os.path.isdir(p) else os.path.dirname(p) for p in absolute]
    root = tops[0] if len(tops) == 1 else os.path.commonpath(tops)
    found: dict[str, InputFile] = {}
    skipped: dict[str, Skipped] = {}
    directories = [path for path in absolute if os.path.isdir(path)]
    real_root = os.path.realpath(root)
    reached = [
        *_walk(directories, suffixes, skipped=skipped, root=root),
        *(
            _Reached(
                path,
                None,
                (os.path.islink(path), not _own(os.path.dirname(path), root, real_root)),
                os.path.realpath(path),
            )
            if os.path.exists(path)
            else _Reached(path, _dangling(path), (True, True), path)
            for path in absolute
            if not os.path.isdir(path)
        ),
    ]
    for file in _once(reached, skipped=skipped, root=root):
        _add(found, root, file.path, file.problem, real=file.real)
    for name in found:  # named on its own, whatever its suffix: analysed, not skipped
        skipped.pop(name, None)
    return Discovery(
        paths=tuple(absolute),
        root=root,
        files=sorted(found.values(), key=lambda f: f.relative),
        skipped=sorted(skipped.values(), key=lambda s: s.relative),
        suffixes=tuple(sorted(suffixes)),
    )


def discover(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, extensions: Iterable[str]
) -> tuple[str, list[InputFile]]:
    """The root and audio files of :func:`scan` (for callers that need nothing else).

    Returns
    -------
    root : str
        The common directory the ``relative`` names start from.
    files : list of InputFile
        Sorted by relative name.
    """
    found = scan(paths, extensions=extensions)
    return found.root, found.files


def named_from(
    files: Iterable[InputFile], root: str, *, earlier: Collection[str] = frozenset()
) -> list[InputFile]:
    """The same files named from ``root``, a folder above them all (a resume's), in name order.

    ``earlier``: the names an earlier run gave its recordings. A file it does not name, reached
    through a symbolic link, is named by the path the link leads to where the earlier run named
    that one (it walked the folder itself; this resume was given the link): not analysed again
    under a second name.
    """
    found: dict[str, InputFile] = {}
    real_root = os.path.realpath(root)
    for file in files:
        path = file.path
        # The scan's resolved path: resolving it again would look at each of its folders (round
        # trips on a parallel file system), for each new file a watch's resume meets.
        if file.real and file.real != path and earlier and _relative(path, root) not in earlier:
            own = os.path.join(root, os.path.relpath(file.real, real_root))
            path = own if _relative(own, root) in earlier else path
        _add(found, root, path, file.problem, real=file.real)
    return sorted(found.values(), key=lambda f: f.relative)


def _relative(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _add(
    found: dict[str, InputFile], root: str, path: str, problem: str | None, *, real: str
) -> None:
    relative = PurePosixPath(_relative(path, root))
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"{path} is outside the input root {root}")
    name = _text(str(relative))
    if name != str(relative):
        # Its name could go into no Parquet column, log or Dask message: one file's error.
        problem = problem or _NOT_UTF8
    found.setdefault(name, InputFile(path=path, relative=name, problem=problem, real=real))


_NOT_UTF8 = (
    "its name is not UTF-8 text (an old memory card's or a zip's encoding): rename it, "
    "e.g. with convmv -f latin1 -t utf8 --notest"
)


def _text(name: str) -> str:
    r"""``name`` as text: bytes that are not UTF-8 (``os`` keeps them as surrogates) as ``\xe9``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Reached(NamedTuple):
    """A file found under the inputs, or named as one."""

    path: str
    problem: str | None
    # (a symbolic link itself, in a folder reached through one): the lowest is its own path
    links: tuple[bool, bool]
    real: str  # its path with no link in it (``path`` where there is a problem)


def _own(directory: str, root: str, real_root: str) -> bool:
    """Whether ``directory`` is reached from the inputs' root through no symbolic link."""
    return os.path.realpath(directory) == os.path.normpath(
        os.path.join(real_root, os.path.relpath(directory, root))
    )


def _walk(
    tops: Sequence[str], suffixes: set[str], *, skipped: dict[str, Skipped], root: str
) -> Iterable[_Reached]:
    """Audio files under the folders ``tops``; the rest goes into ``skipped``.

    A folder reached twice (a symlink to a folder walked already, a loop, or an input folder
    inside another by a link) is walked once, by its own path where it has one: folders reached
    through a symlink are walked last.
    """
    walked: dict[str, str] = {}  # real path -> the path it was walked by
    stacks: tuple[list[str], list[str]] = ([], [])  # own paths, paths through a symlink
    real_root = os.path.realpath(root)
    for top in reversed(tops):  # popped last first: the inputs in the order given
        stacks[not _own(top, root, real_root)].append(top)
    inputs = set(tops)
    while any(stacks):
        through_link = not stacks[0]
        directory = stacks[through_link].pop()
        real = os.path.realpath(directory)
        if walked.get(real) == directory:  # an input folder inside another, or given twice
            continue
        if real in walked:
            first = Path(os.path.relpath(walked[real], root)).as_posix()
            alias = f"link to {'the input folder' if first == '.' else first + '/'}, walked once"
            _skip(skipped, root, directory, alias, is_dir=True)
            continue
        walked[real] = directory
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            problem = f"cannot list directory: {error.strerror}"
            yield _Reached(directory, problem, (False, through_link), directory)
            continue
        # Known from its listing, at no cost of its own (a stat per folder is a round trip on
        # a parallel file system); a folder named as an input is walked whatever it holds.
        if directory not in inputs and any(entry.name in _OUTPUT_MARKERS for entry in entries):
            _skip(skipped, root, directory, "buzzdask output", is_dir=True)
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:  # a symlink loop (ELOOP): reported below as a file problem
                is_dir = False
            # A link to nowhere, whatever its name: a site's folder on a disk not mounted was
            # "other suffix (siteB)", and its recordings missing without a word.
            broken = entry.is_symlink() and not is_dir and not os.path.exists(entry.path)
            reason = (
                _skip_reason(entry.name, is_dir=is_dir, suffixes=suffixes)
                if not broken or entry.name.startswith(".")
                else None
            )
            if reason is not None:
                _skip(skipped, root, entry.path, reason, is_dir=is_dir)
            elif is_dir:
                stacks[through_link or entry.is_symlink()].append(entry.path)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                yield _Reached(entry.path, _dangling(entry.path), (True, through_link), entry.path)
            elif entry.is_file() and entry.is_symlink():
                real_file = os.path.realpath(entry.path)
                yield _Reached(entry.path, None, (True, through_link), real_file)
            elif entry.is_file():
                # Its folder's real path is known: no lstat of each of its parents per file,
                # each a round trip on a parallel file system.
                real_file = os.path.join(real, entry.name)
                yield _Reached(entry.path, None, (False, through_link), real_file)
            else:  # a FIFO, socket or device with an audio suffix: said, as when named
                links = (entry.is_symlink(), through_link)
                yield _Reached(entry.path, "not a regular file", links, entry.path)


def _once(reached: Iterable[_Reached], *, skipped: dict[str, Skipped], root: str) -> list[_Reached]:
    """Each file once, by its own path where it has one; the other paths listed as skipped.

    A link to a file analysed already (or the same folder given by two paths) would score the
    same audio twice, under two names. Of paths alike in links, the first by name is kept,
    whatever the order of the inputs.
    """
    by_real: dict[str, list[_Reached]] = {}
    for file in reached:
        by_real.setdefault(file.real, []).append(file)
    kept = []
    for paths in by_real.values():
        first, *others = sorted(paths, key=lambda file: (file.links, file.path))
        kept.append(first)
        for other in others:
            if other.path != first.path:  # the same path given twice is no link
                _skip(skipped, root, other.path, _LINKED_RECORDING, is_dir=False)
    return kept


# Why a link to a recording is skipped (its name in ``describe_skipped``'s groups).
_LINKED_RECORDING = "link to a recording analysed under another name"


def _skip_reason(name: str, *, is_dir: bool, suffixes: set[str]) -> str | None:
    """Why a directory entry is not analysed (None: it is audio, or a directory to walk)."""
    lower = name.lower()
    if lower.endswith(_PARTIAL_SUFFIXES) and not is_dir:
        return "partial transfer"
    if name.startswith("."):
        return "hidden"  # also OS metadata (.DS_Store) and rclone's hidden temporary copies
    if not is_dir and lower in _READMES:
        return "readme"
    if is_dir or Path(lower).suffix in suffixes:
        return None
    return "other suffix"


def _skip(skipped: dict[str, Skipped], root: str, path: str, reason: str, *, is_dir: bool) -> None:
    relative = _text(Path(os.path.relpath(path, root)).as_posix()) + ("/" if is_dir else "")
    skipped.setdefault(relative, Skipped(relative=relative, reason=reason))


def _dangling(path: str) -> str:
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "symlink loop"
    return "broken symlink"
