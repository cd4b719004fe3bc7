"""buzzdask as pip installs it from its wheel and sdist, not the editable install of the tests.

The wheel is built offline from a copy of the checkout and installed into a bare virtual
environment of its own, so no install here touches the one running these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO

#: What the copy of the checkout leaves out: environments, caches, outputs, the records.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "example-results*",
    "results",  # benchmarks/results: tens of MB the sdist leaves out
)  # fmt: skip

_FIND_CONFIGS = """
import json
from buzzdask.cluster.configs import available_configs, load_cluster_config
import buzzdask
load_cluster_config("local")
print(json.dumps({"package": buzzdask.__file__,
                  "configs": {name: str(path) for name, path in available_configs().items()}}))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout to build from (a build writes into its source tree)."""
    copy = tmp_path_factory.mktemp("source") / "buzzdask"
    shutil.copytree(REPO, copy, ignore=_NOT_SOURCE)
    return copy


def _pip(*arguments: str, python: Path | None = None) -> None:
    """This environment's pip, offline (``--no-index``), for ``python``'s environment if given."""
    target = ["--python", str(python)] if python else []
    command = [sys.executable, "-m", "pip", *target, *arguments, "--no-index", "--quiet"]
    subprocess.run(command, check=True)


@pytest.fixture(scope="module")
def wheel(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: built with this environment's setuptools (offline).
    _pip("wheel", "--no-deps", "--no-build-isolation", str(source), "--wheel-dir", str(out))
    return next(out.glob("buzzdask-*.whl"))


@pytest.mark.parametrize("scheme", ["venv", "--prefix", "--target"])
def test_the_cluster_configurations_are_found_wherever_pip_installs_the_wheel(
    wheel: Path, tmp_path: Path, scheme: str
) -> None:
    # The wheel puts cluster_configs/ under its scheme's data directory (share/buzzdask/):
    # sys.prefix's only for a venv; --prefix, --user and /usr/local put it elsewhere, and
    # `python -m buzzdask.cluster` found no configuration at all, not even "local".
    python = tmp_path / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", python.parents[1]], check=True)
    deps = sysconfig.get_paths()["purelib"]  # this environment's: TensorFlow is not needed
    if scheme == "venv":
        _pip("install", "--no-deps", str(wheel), python=python)
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        data = python.parents[1]
    elif scheme == "--prefix":
        data = tmp_path / "prefix"
        _pip("install", "--no-deps", "--prefix", str(data), str(wheel), python=python)
        (site,) = (str(p) for p in data.glob("lib/python3*/site-packages"))
    else:
        data = tmp_path / "target"
        _pip("install", "--no-deps", "--target", str(data), str(wheel), python=python)
        site = str(data)
    elsewhere = tmp_path / "elsewhere"  # not a checkout, no ./cluster_configs
    elsewhere.mkdir()
    found = subprocess.run(
        [python, "-c", _FIND_CONFIGS],
        cwd=elsewhere,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([site, deps])},
        check=True,
        capture_output=True,
        text=True,
    )
    report = json.loads(found.stdout)
    assert Path(report["package"]).is_relative_to(site)  # the wheel's, not the checkout's
    shipped = {path.stem for path in (REPO / "cluster_configs").glob("*.yaml")}
    shipped -= {name for name in shipped if name.endswith("-nodes")}
    assert set(report["configs"]) == shipped
    configs = data / "share" / "buzzdask" / "cluster_configs"
    assert all(Path(path).parent == configs for path in report["configs"].values())


def test_the_sdist_holds_what_its_tests_need(source: Path, tmp_path: Path) -> None:
    # Its tests import their helpers (tests/conftest.py...) and the benchmarks they test.
    subprocess.run(
        [
            sys.executable,
            "-c",
            f"from setuptools import build_meta; build_meta.build_sdist({str(tmp_path)!r})",
        ],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("buzzdask-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = {
        str(path.relative_to(REPO))
        for folder in ("tests", "benchmarks", "notebooks", "cluster_configs")
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and "results" not in path.parts
    }
    assert tracked <= names, sorted(tracked - names)
    assert "Makefile" in names
