"""Embedder handles made local on the client: TF Hub downloads, their cache, SavedModel checks.

Workers never reach the internet: :func:`local_embedder` turns a handle into a local SavedModel
directory before any cluster starts. A URL is downloaded once, by ``tensorflow_hub.resolve``,
into the cache (:func:`cache_directory`); a later run finds it there without importing
TensorFlow, because the cache is laid out as tensorflow_hub lays out ``TFHUB_CACHE_DIR``:
``<cache>/<sha1 of the handle>/``.

The directory is checked, not loaded: a SavedModel's files must all be there
(:func:`saved_model_problem`). Loading it with TensorFlow here would cost the client seconds
and hundreds of MB for the whole run, while the scorers load it anyway, and check its output,
before they score anything; what goes wrong in a cache is a download or copy cut short.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

from buzzdask.errors import ModelError
from buzzdask.settings import Settings

__all__ = ["cache_directory", "cached_path", "is_remote", "local_embedder", "saved_model_problem"]

# tensorflow_hub's own environment variables (tensorflow_hub/resolver.py).
_CACHE_VARIABLE = "TFHUB_CACHE_DIR"
_FORMAT_VARIABLE = "TFHUB_MODEL_LOAD_FORMAT"
# Seconds without an answer before a connection or a read gives up: an offline node fails fast.
_NETWORK_TIMEOUT_S = 15.0
_SHARD = re.compile(r"variables\.data-\d+-of-(\d+)$")


def cache_directory(settings: Settings) -> Path:
    """Where TF Hub downloads go: ``$TFHUB_CACHE_DIR`` if set, else ``<cache-dir>/tfhub``.

    ``buzzdask.cache-dir`` defaults to ``$XDG_CACHE_HOME/buzzdask``, else ``~/.cache/buzzdask``:
    on OSC the home directory, which login and compute nodes share.
    """
    if os.environ.get(_CACHE_VARIABLE):
        return Path(os.environ[_CACHE_VARIABLE]).expanduser()
    base = settings.cache_dir or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "buzzdask"
    )
    return Path(base).expanduser() / "tfhub"


def cached_path(handle: str, cache: str | os.PathLike[str]) -> Path:
    """The directory tensorflow_hub downloads ``handle`` into under ``cache``.

    As ``tensorflow_hub.compressed_module_resolver._module_dir``: the SHA-1 of the handle.
    """
    return Path(cache) / hashlib.sha1(handle.encode("utf8")).hexdigest()


def saved_model_problem(path: str | os.PathLike[str]) -> str | None:
    """What makes ``path`` not a complete SavedModel directory, or None if nothing does.

    Complete: ``saved_model.pb`` (or ``.pbtxt``) is not empty and, if there is a ``variables/``
    directory, it holds ``variables.index`` and every ``variables.data-K-of-N`` shard.
    """
    root = Path(path)
    if not root.is_dir():
        return f"{root} is not a directory"
    graphs = [root / name for name in ("saved_model.pb", "saved_model.pbtxt")]
    if not any(g.is_file() and g.stat().st_size > 0 for g in graphs):
        return f"{root} holds no saved_model.pb: not a SavedModel, or a copy cut short"
    variables = root / "variables"
    if not variables.is_dir():
        return None
    if not (variables / "variables.index").is_file():
        return f"{variables} lacks variables.index: a copy cut short"
    shards = [m for p in variables.iterdir() if (m := _SHARD.match(p.name))]
    expected = int(shards[0].group(1)) if shards else 1
    if len(shards) != expected:
        return f"{variables} holds {len(shards)} of {expected} data shards: a copy cut short"
    return None


def is_remote(handle: str) -> bool:
    """Whether ``handle`` is a URL to download (not a directory nor a ``file://`` URL)."""
    return "://" in handle and urllib.parse.urlsplit(handle).scheme != "file"


def local_path(handle: str) -> Path | None:
    """The directory a local handle names: a path, or a ``file://`` URL decoded.

    ``file:///fs/my%20yamnet`` is ``/fs/my yamnet`` (``Path.as_uri`` writes a space so);
    ``file://localhost/...`` as well. ``None`` for a ``file://`` URL without an absolute path
    (``file://my yamnet``).
    """
    if "://" not in handle:
        return Path(handle).expanduser()
    parts = urllib.parse.urlsplit(handle)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        return None
    return Path(urllib.request.url2pathname(parts.path))


def local_embedder(handle: str, *, name: str, settings: Settings, fetching: bool = False) -> Path:
    """The local SavedModel directory for an embedder handle, downloading a URL once.

    Parameters
    ----------
    handle : str
        A local directory, a ``file://`` URL, or a TF Hub URL (``https://tfhub.dev/...``,
        ``https://.../model.tar.gz``, ``gs://...tar.gz``).
    name : str
        The embedder's name in ``buzzdask.embedders`` (for the fix in messages).
    settings : Settings
        The run's settings (``cache_dir``).
    fetching : bool, default: False
        Called by ``buzzdask embedder fetch``: a failed download's advice is then not to run
        that command.

    Returns
    -------
    pathlib.Path
        An absolute, complete SavedModel directory.

    Raises
    ------
    ModelError
        One line: ``cannot load embedder '<handle>': <cause>; <fix>``.
    """
    if not is_remote(handle):
        local = local_path(handle)
        if local is None:
            raise _cannot_load(
                handle,
                "a file:// URL names an absolute path (file:///fs/ess/PAS1234/yamnet)",
                name=name,
                fix=None,
            )
        missing = saved_model_problem(local)
        if missing:
            raise _cannot_load(handle, missing, name=name, fix=None)
        return local.resolve()
    cache = cache_directory(settings)
    path = cached_path(handle, cache)
    if not path.exists():
        try:
            _check_reachable(handle)
            path = _download(handle, cache)
        except Exception as error:  # whatever urllib, tarfile or TensorFlow raise
            cause = " ".join(str(error).split()) or type(error).__name__
            fix = "elsewhere" if fetching else "fetch"
            raise _cannot_load(handle, cause, name=name, fix=fix) from error
    problem = saved_model_problem(path)
    if problem:
        raise _cannot_load(
            handle, f"the cached copy is incomplete ({problem})", name=name, fix="refetch"
        )
    return path.resolve()


def _check_reachable(url: str) -> None:
    """Fail in seconds, before TensorFlow is imported, when the URL's host cannot be reached.

    Skipped for other schemes and when a proxy is set (the proxy may reach what this host cannot).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.scheme in urllib.request.getproxies():
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_NETWORK_TIMEOUT_S).close()
    except OSError as error:
        raise OSError(f"cannot reach {parts.hostname}:{port} ({error})") from None


def _download(handle: str, cache: Path) -> Path:
    """``tensorflow_hub.resolve(handle)`` into ``cache``, always as a local directory."""
    # tensorflow_hub reads its cache and format from the environment at each call; the
    # compressed format is the one that downloads (the other reads from GCS at load time).
    variables = {_CACHE_VARIABLE: str(cache), _FORMAT_VARIABLE: "COMPRESSED"}
    with _environment(variables), _socket_timeout(_NETWORK_TIMEOUT_S), warnings.catch_warnings():
        # Its import of pkg_resources (setuptools' notice that the API is deprecated): not ours.
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        import tensorflow_hub as hub

        return Path(hub.resolve(handle))


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # tensorflow_hub's urlopen has no timeout: a node whose packets are dropped would hang.
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _cannot_load(handle: str, cause: str, *, name: str, fix: str | None) -> ModelError:
    key = f"buzzdask.embedders.{name}.handle"
    local = (
        "give the analysis a local SavedModel copy (`buzzdask analyze --embedder PATH`, Python: "
        f"embedder=PATH) or set {key}"
    )
    if fix == "fetch":
        advice = (
            f"on a machine with internet (an OSC login node), run `buzzdask embedder fetch "
            f"{handle}` once, then run again; or {local}"
        )
    elif fix == "elsewhere":
        advice = f"run the fetch on a machine with internet (an OSC login node); or {local}"
    elif fix == "refetch":
        advice = f"delete it and run `buzzdask embedder fetch {handle}`; or {local}"
    else:
        advice = local
    return ModelError(f"cannot load embedder {handle!r}: {cause}; {advice}")
