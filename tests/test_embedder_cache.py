"""The embedder is made local on the client: TF Hub downloads, their cache, offline failures.

No test reaches the internet: the cache is filled the way tensorflow_hub fills it
(``<cache>/<sha1 of the handle>/``, see ``tensorflow_hub/compressed_module_resolver.py``), and
the one real download comes from an HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dask.config
import pytest

import buzzdask
from buzzdask.cli import EXIT_ERROR, EXIT_OK
from buzzdask.embedders import (
    cache_directory,
    cached_path,
    local_embedder,
    saved_model_problem,
)
from buzzdask.errors import ModelError, ParameterError
from buzzdask.models import directory_sha256, resolve_embedder
from buzzdask.settings import load_settings
from tests.conftest import BUZZDASK, requires_ffmpeg

FRAME = 15360  # samples in one 0.96 s frame at 16 kHz
# Nothing listens on port 9 (discard) here: the connection is refused at once, as offline.
UNREACHABLE = "https://127.0.0.1:9/yamnet/1"
MISSING_FILE_URL = "file:///nonexistent/buzzdask/yamnet"
YAMNET = "https://tfhub.dev/google/yamnet/1"
_PROXIES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def buzzdask_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("TFHUB_CACHE_DIR", *_PROXIES)}
    return subprocess.run(
        [BUZZDASK, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0", **env},
    )


def fill_cache(cache: Path, handle: str, embedder: Path) -> Path:
    """A cache directory as tensorflow_hub leaves it after downloading ``handle``."""
    target = cached_path(handle, cache)
    shutil.copytree(embedder, target)
    target.with_name(f"{target.name}.descriptor.txt").write_text(f"Module: {handle}\n")
    return target


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``TFHUB_CACHE_DIR`` for this test only (never the user's own cache)."""
    cache = tmp_path / "tfhub-cache"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    for name in _PROXIES:
        monkeypatch.delenv(name, raising=False)
    return cache


@requires_ffmpeg
@pytest.mark.parametrize("handle", [UNREACHABLE, MISSING_FILE_URL])
def test_offline_embedder_fails_in_seconds_with_one_line(
    tmp_path: Path, make_audio, tiny_model: Path, handle: str
) -> None:
    audio = make_audio("a.wav", n_samples=2 * FRAME)
    output = tmp_path / "results"
    started = time.perf_counter()
    done = buzzdask_cli(
        "analyze", str(audio), "--model", str(tiny_model), "--embedder", handle,
        "--output", str(output),
        env={"TFHUB_CACHE_DIR": str(tmp_path / "cache")},
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert done.returncode == EXIT_ERROR, done.stderr
    assert elapsed < 10, f"took {elapsed:.1f} s"
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"buzzdask: error: cannot load embedder '{handle}': ")
    for fix in ("--embedder PATH", "buzzdask.embedders.yamnet_k2.handle"):
        assert fix in lines[0]
    if handle == UNREACHABLE:
        assert "Connection refused" in lines[0]
        assert f"buzzdask embedder fetch {handle}" in lines[0]
    assert not output.exists()


def test_cached_url_needs_no_network(hub_cache: Path, tiny_embedder: Path) -> None:
    cached = fill_cache(hub_cache, UNREACHABLE, tiny_embedder)
    spec = resolve_embedder("yamnet_k2", handle=UNREACHABLE)
    assert spec.handle == str(cached.resolve())
    assert spec.source == UNREACHABLE
    assert spec.sha256 == directory_sha256(tiny_embedder)


@requires_ffmpeg
def test_analysis_with_a_cached_url_gives_workers_the_local_copy(
    hub_cache: Path, tmp_path: Path, make_audio, dask_client, tiny_model: Path, tiny_embedder: Path
) -> None:
    cached = fill_cache(hub_cache, UNREACHABLE, tiny_embedder)
    audio = make_audio("a.wav", n_samples=3 * FRAME)
    result = buzzdask.analyze(
        audio,
        tiny_model,
        output=tmp_path / "results",
        client=dask_client,
        embedder=UNREACHABLE,
        progress=False,
    )
    assert result.ok and result.summary["frames"] == 3
    embedder = result.metadata["model"]["embedder"]
    assert embedder["handle"] == str(cached.resolve()) == result.metadata["embedder"]
    assert embedder["source"] == UNREACHABLE
    assert result.metadata["fingerprint"]["embedder_sha256"] == directory_sha256(tiny_embedder)


def test_cache_dir_setting_and_tfhub_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TFHUB_CACHE_DIR", raising=False)
    with dask.config.set({"buzzdask.cache-dir": str(tmp_path / "mine")}):
        assert cache_directory(load_settings()) == tmp_path / "mine" / "tfhub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_directory(load_settings()) == tmp_path / "xdg" / "buzzdask" / "tfhub"
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    assert cache_directory(load_settings()) == tmp_path / "hub"


def test_embedder_fetch_reports_a_cached_copy(tmp_path: Path, tiny_embedder: Path) -> None:
    cached = fill_cache(tmp_path / "cache" / "tfhub", YAMNET, tiny_embedder)
    env = {"DASK_BUZZDASK__CACHE_DIR": str(tmp_path / "cache")}
    done = buzzdask_cli("embedder", "fetch", env=env)
    assert done.returncode == EXIT_OK, done.stderr
    path = str(cached.resolve())
    assert f"embedder {YAMNET} is in {path}" in done.stdout
    assert f"--embedder {path}" in done.stdout
    assert f"buzzdask.embedders.yamnet_k2.handle: {path}" in done.stdout
    # The embedder's name, as the models' configs say it, fetches its configured handle.
    assert buzzdask_cli("embedder", "fetch", "yamnet_k2", env=env).stdout == done.stdout
    # A name it is not: the names it knows, not "yamnet is not a directory".
    unknown = buzzdask_cli("embedder", "fetch", "yamnet", env=env)
    assert unknown.returncode == EXIT_ERROR
    assert "'yamnet' is neither a TF Hub URL, nor an embedder's name (yamnet_k2)" in unknown.stderr
    # A directory as a file:// URL, a space in it written %20 (Path.as_uri's way): it was
    # read with the %20, and fetch refused it as no directory.
    spaced = tmp_path / "my yamnet"
    spaced.symlink_to(tiny_embedder, target_is_directory=True)
    done = buzzdask_cli("embedder", "fetch", spaced.as_uri(), env=env)
    assert done.returncode == EXIT_OK, done.stderr
    assert f"is in {tiny_embedder.resolve()}" in done.stdout
    assert local_embedder(spaced.as_uri(), name="yamnet_k2", settings=load_settings()) == (
        tiny_embedder.resolve()
    )
    with pytest.raises(ModelError, match=r"a file:// URL names an absolute path"):
        local_embedder("file://my yamnet", name="yamnet_k2", settings=load_settings())


def test_embedder_fetch_offline_fails_with_one_line(tmp_path: Path) -> None:
    done = buzzdask_cli(
        "embedder", "fetch", UNREACHABLE, env={"TFHUB_CACHE_DIR": str(tmp_path / "cache")}
    )
    assert done.returncode == EXIT_ERROR
    assert done.stderr.startswith(f"buzzdask: error: cannot load embedder '{UNREACHABLE}': ")
    assert len(done.stderr.strip().splitlines()) == 1
    # Not the advice to run the command that just failed.
    assert "; run the fetch on a machine with internet (an OSC login node)" in done.stderr
    assert "embedder fetch" not in done.stderr


def test_an_empty_embedder_is_refused_not_taken_for_the_configured_one(
    tmp_path: Path, make_audio, tiny_model: Path
) -> None:
    # `--embedder "$EMBEDDER"` with the variable unset: it meant the configured TF Hub URL.
    for handle in ("", "  "):
        with pytest.raises(ParameterError, match=r"embedder='\s*' is empty: give a TF Hub URL"):
            resolve_embedder("yamnet_k2", handle=handle)
    audio = make_audio("a.wav", n_samples=16000)
    command = [BUZZDASK, "analyze", str(audio), "--model", str(tiny_model), "--embedder", ""]
    done = subprocess.run(
        [*command, "--output", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == EXIT_ERROR, done.stderr
    assert done.stderr.startswith("buzzdask: error: --embedder '' is empty: give a TF Hub URL")
    assert not (tmp_path / "out").exists()


def test_incomplete_copy_is_refused(hub_cache: Path, tiny_embedder: Path) -> None:
    cached = fill_cache(hub_cache, UNREACHABLE, tiny_embedder)
    (cached / "saved_model.pb").write_bytes(b"")
    assert saved_model_problem(cached) is not None
    with pytest.raises(ModelError, match=r"cached copy is incomplete .* delete it"):
        resolve_embedder("yamnet_k2", handle=UNREACHABLE)
    with pytest.raises(ModelError, match=r"holds no saved_model\.pb.*--embedder PATH"):
        resolve_embedder("yamnet_k2", handle=str(cached))


@pytest.fixture
def served_archive(tmp_path: Path, tiny_embedder: Path) -> Iterator[str]:
    """The tiny embedder as a .tar.gz on an HTTP server at 127.0.0.1: its URL."""
    root = tmp_path / "served"
    root.mkdir()
    with tarfile.open(root / "tiny.tar.gz", "w:gz") as archive:
        archive.add(tiny_embedder, arcname=".")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/tiny.tar.gz"
    finally:
        server.shutdown()
        thread.join()


def test_url_is_downloaded_once_by_tensorflow_hub(
    hub_cache: Path, tmp_path: Path, served_archive: str, tiny_embedder: Path
) -> None:
    spec = resolve_embedder("yamnet_k2", handle=served_archive)
    assert spec.handle == str(cached_path(served_archive, hub_cache).resolve())
    assert spec.sha256 == directory_sha256(tiny_embedder)
    (tmp_path / "served" / "tiny.tar.gz").unlink()  # a second download would now fail
    assert resolve_embedder("yamnet_k2", handle=served_archive) == spec
