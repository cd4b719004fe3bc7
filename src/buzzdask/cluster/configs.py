"""Cluster configurations: the YAML files of ``cluster_configs/``, one per system.

Each file holds a ``buzzdask.clusters.<name>`` entry (the kind of cluster and, for SLURM, the
names of its two ``jobqueue`` sections: CPU decode workers and GPU scorer workers, whether jobs
need an account, and the size of one node of each partition) and those complete
``jobqueue.<section>`` sections. They enter ``dask.config`` as defaults, so a user's own
``~/.config/dask/*.yaml`` or ``DASK_JOBQUEUE__...`` variables still override any key.
Files named ``*-nodes.yaml`` beside them are node-size tables with their sources
(``osc-nodes.yaml``), not configurations.

A layout of a system's workers names that system's configuration in ``extends`` and adds its own
keys (``osc-cardinal-node``: ``whole-node``, ``gpus``, ``cpu-workers``), so it shares the
system's sections and node sizes instead of copying them.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.config
import yaml
from dask.utils import parse_bytes

from buzzdask.errors import ParameterError
from buzzdask.settings import byte_count, load_settings

__all__ = [
    "NodeSize",
    "available_configs",
    "config_dirs",
    "hyphenated",
    "load_cluster_config",
    "load_slurm_config",
    "node_size",
    "worker_counts",
]

NODE_TABLE_SUFFIX = "-nodes"  # osc-nodes.yaml: a table of node sizes, not a configuration


@dataclass(frozen=True, kw_only=True)
class NodeSize:
    """What one node of a partition gives a job.

    Attributes
    ----------
    cores : int > 0
        Cores a job may ask for on one node.
    memory : int > 0 [bytes]
        Memory a job may ask for on one node.
    memory_per_core : int > 0 [bytes]
        The partition's default memory per core: a job asking for more than
        ``cores * memory_per_core`` is charged (on OSC) for the cores that memory comes with.
    gpus : int >= 0
        GPUs per node.
    """

    cores: int
    memory: int
    memory_per_core: int
    gpus: int = 0

    @classmethod
    def from_mapping(cls, size: Mapping[str, Any]) -> NodeSize:
        """From ``{cores: 96, memory: 475776MiB, memory-per-core: 4956MiB, gpus: 0}``."""
        return cls(
            cores=int(size["cores"]),
            memory=parse_bytes(size["memory"]),
            memory_per_core=parse_bytes(size["memory-per-core"]),
            gpus=int(size.get("gpus", 0)),
        )


def config_dirs() -> list[Path]:
    """Directories searched for ``<name>.yaml``, first match wins.

    ``buzzdask.cluster-config-dirs``, then ``./cluster_configs``, then the source tree's
    ``cluster_configs/`` (a checkout, an editable install), then where pip put the wheel's
    (``<scheme>/share/buzzdask/cluster_configs``: a venv's, ``--user``'s, ``--prefix``'s,
    ``--target``'s, ``/usr/local``'s).
    """
    own = [Path(os.path.expanduser(d)) for d in load_settings().cluster_config_dirs]
    package = Path(__file__).resolve().parents[1]
    checkout = package.parents[1]
    # Guesses about the installation: only those that are there.
    installed = [
        *_recorded_config_dirs(),
        # pip --target leaves share/ beside the package and out of its record.
        package.parent / _SHARED_CONFIGS,
        Path(sys.prefix) / _SHARED_CONFIGS,
    ]
    installed = [directory for directory in installed if directory.is_dir()]
    return list(
        dict.fromkeys(
            [
                *own,
                Path.cwd() / "cluster_configs",
                *(
                    [checkout / "cluster_configs"]
                    if (checkout / "pyproject.toml").is_file()
                    else []
                ),
                *installed,
            ]
        )
    )


#: Where the wheel's ``cluster_configs/*.yaml`` go, under an installation scheme's data directory.
_SHARED_CONFIGS = Path("share", "buzzdask", "cluster_configs")


def _recorded_config_dirs() -> list[Path]:
    """The folders of the wheel's configurations, as pip recorded them at installation."""
    try:
        files = importlib.metadata.distribution("buzzdask").files or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return []
    found = {
        Path(os.path.normpath(file.locate())).parent
        for file in files
        if file.suffix == ".yaml" and Path(file).parent.parts[-3:] == _SHARED_CONFIGS.parts
    }
    return sorted(found)


def _did_you_mean(name: str, configs: Mapping[str, Path]) -> str:
    """The configurations a user naming the system (``cardinal``) or misspelling one meant."""
    meant = [config for config in sorted(configs) if name.lower() in config]
    meant = meant or difflib.get_close_matches(name.lower(), configs, n=3)
    return f" (did you mean {' or '.join(map(repr, meant))}?)" if meant else ""


def available_configs() -> dict[str, Path]:
    """Every configuration found, by name."""
    found: dict[str, Path] = {}
    for directory in reversed(config_dirs()):
        if directory.is_dir():
            found.update(
                {
                    path.stem: path
                    for path in sorted(directory.glob("*.yaml"))
                    if not path.stem.endswith(NODE_TABLE_SUFFIX)
                }
            )
    return dict(sorted(found.items()))


def load_cluster_config(
    name: str | os.PathLike[str], *, extended_by: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Register a cluster configuration's sections in ``dask.config``; return its entry.

    Parameters
    ----------
    name : str or path-like
        A name from :func:`available_configs` (``"osc-cardinal"``) or a YAML file's path.
    extended_by : tuple of str
        The configurations whose ``extends`` led here (a loop is an error, not a recursion).

    Returns
    -------
    dict
        ``buzzdask.clusters.<name>``: ``kind`` ("slurm" or "local") and its settings, plus
        ``name``; with ``extends: <other>``, over the entry of that configuration (loaded
        first, its sections registered too).

    Raises
    ------
    ParameterError
        If no such configuration exists, or it lacks its ``buzzdask.clusters`` entry.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        configs = available_configs()
        if str(name) not in configs:
            raise ParameterError(
                f"no cluster configuration {str(name)!r}{_did_you_mean(str(name), configs)}; "
                f"available: {sorted(configs)} (searched {[str(d) for d in config_dirs()]})"
            )
        path = configs[str(name)]
    elif not path.is_file():
        raise ParameterError(f"cluster configuration file {path} not found")
    try:
        with path.open(encoding="utf-8") as stream:  # YAML's marks then name the file
            data = yaml.safe_load(stream) or {}
    except yaml.YAMLError as error:  # an edited copy: where, in YAML's words, not a traceback
        raise ParameterError(f"cluster configuration {path} is not valid YAML: {error}") from None
    section = data.get("buzzdask") if isinstance(data, dict) else None
    clusters = section.get("clusters") if isinstance(section, dict) else None
    entry = clusters.get(path.stem) if isinstance(clusters, dict) else None
    if not isinstance(entry, dict) or entry.get("kind") not in ("slurm", "local"):
        # A copy under a new name keeps its entry's old one; a kind of another scheduler.
        found = (
            f": it has kind: {entry.get('kind')!r}"
            if isinstance(entry, dict)
            else f": it has buzzdask.clusters.{', '.join(map(str, clusters))} (an entry is "
            "named as its file)"
            if isinstance(clusters, dict) and clusters
            else ""
        )
        raise ParameterError(
            f"{path} needs a buzzdask.clusters.{path.stem} entry with kind: slurm or local{found}"
        )
    chain = (*extended_by, path.stem)
    base = {}
    if entry.get("extends"):
        if Path(entry["extends"]).stem in chain:
            raise ParameterError(
                f"cluster configurations extend each other in a loop: {' -> '.join(chain)} "
                f"-> {entry['extends']}"
            )
        base = load_cluster_config(entry["extends"], extended_by=chain)
    dask.config.update_defaults(data)
    own = _canonical(dask.config.get(f"buzzdask.clusters.{path.stem}"))
    merged = {**base, "name": path.stem, **own}
    # A layout adding the node of another partition keeps its system's nodes.
    merged["nodes"] = {**(base.get("nodes") or {}), **(own.get("nodes") or {})}
    _check_entry(merged, path)
    return merged


def hyphenated(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``mapping`` with its keys spelt as the files spell them, with ``-``.

    A ``DASK_..._CPU_WORKERS`` variable (names cannot hold ``-``) or a user's YAML written with
    ``cpu_workers`` gives ``_``, which ``dask.config`` keeps as given.
    """
    return {str(key).replace("_", "-"): value for key, value in mapping.items()}


def _canonical(entry: Mapping[str, Any]) -> dict[str, Any]:
    """An entry :func:`hyphenated`, its nodes' keys too; partition names left as they are."""
    canonical = hyphenated(entry)
    nodes = canonical.get("nodes")
    if isinstance(nodes, Mapping):
        canonical["nodes"] = {
            partition: hyphenated(size) if isinstance(size, Mapping) else size
            for partition, size in nodes.items()
        }
    return canonical


# The keys of a buzzdask.clusters.<name> entry: a misspelt one ("acount-required") would drop
# its rule without a word.
ENTRY_KEYS = frozenset(
    {
        "kind",
        "extends",
        "cpu-config",
        "gpu-config",
        "account-required",
        "nodes",
        "login-host",
        "dashboard-proxy",
        "dashboard-address",
        "gpus",
        "cpu-workers",
        "threads-per-worker",
        "whole-node",
    }
)


def _check_entry(entry: Mapping[str, Any], path: Path) -> None:
    where = f"buzzdask.clusters.{entry['name']} ({path})"
    for key in sorted(set(entry) - ENTRY_KEYS - {"name"}):
        meant = difflib.get_close_matches(key, ENTRY_KEYS, n=1)
        hint = f" (did you mean {meant[0]!r}?)" if meant else ""
        raise ParameterError(
            f"{where}: unknown key {key!r}{hint}; known: {', '.join(sorted(ENTRY_KEYS))}"
        )
    for key, least in (("gpus", 0), ("cpu-workers", 0), ("threads-per-worker", 1)):
        value = entry.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            raise ParameterError(f"{where}: {key}: {value!r} must be a whole number >= {least}")
    for key in ("whole-node", "account-required"):
        if entry.get(key) is not None and not isinstance(entry[key], bool):
            raise ParameterError(f"{where}: {key}: {entry[key]!r} must be true or false")
    for partition, size in (entry.get("nodes") or {}).items():
        lacking = [k for k in ("cores", "memory", "memory-per-core") if k not in (size or {})]
        if lacking:
            raise ParameterError(
                f"{where}: nodes: {partition} lacks {', '.join(lacking)} (a node is given by "
                "cores, memory, memory-per-core and gpus; see cluster_configs/osc-nodes.yaml)"
            )
    if entry["kind"] == "slurm":
        missing = [key for key in ("cpu-config", "gpu-config") if not entry.get(key)]
        if missing:
            raise ParameterError(
                f"{where} needs {' and '.join(missing)}: the jobqueue sections of its jobs"
            )


def load_slurm_config(name: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`load_cluster_config`, refusing a configuration without jobs (``kind: local``).

    Raises
    ------
    ParameterError
        As :func:`load_cluster_config`, and for a configuration that is not SLURM.
    """
    entry = load_cluster_config(name)
    if entry["kind"] != "slurm":
        raise ParameterError(f"{entry['name']!r} is a {entry['kind']} cluster: it has no jobs")
    for section in (entry["cpu-config"], entry["gpu-config"]):
        _check_job_section(section, entry)
    return entry


#: ``jobqueue`` keys dask-jobqueue renamed, and still reads (it warns).
_RENAMED_JOB_KEYS = {"project": "account", "header-skip": "job-directives-skip"}


def _check_job_section(section: str, entry: Mapping[str, Any]) -> None:
    """``jobqueue.<section>`` as merged from the configuration and a user's own files.

    A user's ``~/.config/dask/jobqueue.yaml`` overrides its keys: a misspelt one (``memroy``)
    would be ignored, and a bare ``memory: 32`` (bytes to Dask) or ``cores: abc`` would end
    in a traceback of dask-jobqueue's, or a job with no memory.
    """
    import buzzdask.cluster._jobqueue  # noqa: F401  (registers dask-jobqueue's jobqueue.slurm)

    known = set(hyphenated(dask.config.get("jobqueue.slurm", {})))
    given = hyphenated(dask.config.get(f"jobqueue.{section}", {}) or {})
    where = (
        f"jobqueue.{section} (of {entry['name']}; a user's ~/.config/dask/*.yaml or "
        "DASK_JOBQUEUE__ variables override it)"
    )
    for key in sorted(set(given) & set(_RENAMED_JOB_KEYS)):
        # dask-jobqueue still reads them (and warns); buzzdask's checks and one-job scripts
        # read the new names only.
        raise ParameterError(
            f"{where}: {key!r} is dask-jobqueue's old name of {_RENAMED_JOB_KEYS[key]!r}: rename it"
        )
    for key in sorted(set(given) - known):
        meant = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {meant[0]!r}?)" if meant else ""
        raise ParameterError(f"{where}: unknown key {key!r}{hint}")
    cores, memory = given.get("cores"), given.get("memory")
    # Left empty ("memory:"), a key is None: dask-jobqueue's own error, without the section.
    if "cores" in given and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
        raise ParameterError(f"{where}: cores: {cores!r} must be a whole number >= 1")
    if "memory" in given and byte_count(memory) < 2**30:
        # A bare number is bytes to Dask: "32" meant GB (34359738368 is 32 GiB, and fine).
        raise ParameterError(
            f"{where}: memory: {memory!r} must be at least 1 GiB, given with its unit, such "
            "as '32GiB' (a bare 32 is 32 bytes)"
        )


def node_size(entry: Mapping[str, Any], partition: str | None) -> NodeSize | None:
    """One node of ``partition`` as the configuration ``entry`` declares it (``nodes:``).

    Parameters
    ----------
    entry : mapping
        A configuration's entry, as :func:`load_cluster_config` returns it.
    partition : str or None
        A SLURM partition (``jobqueue.<section>.queue``, ``--queue``).

    Returns
    -------
    NodeSize or None
        ``None`` when the configuration declares no node for that partition.
    """
    size = (entry.get("nodes") or {}).get(partition)
    return None if size is None else NodeSize.from_mapping(size)


def worker_counts(
    entry: Mapping[str, Any], *, gpus: int | None = None, cpu_workers: int | None = None
) -> tuple[int, int]:
    """The GPU and CPU worker counts of a run: those given, else the configuration's.

    Parameters
    ----------
    entry : mapping
        A configuration's entry (:func:`load_cluster_config`). Its ``gpus`` and
        ``cpu-workers`` (a layout's, such as ``osc-cardinal-node``'s: ``dask.config`` keys
        ``buzzdask.clusters.<name>.gpus`` ...) are the defaults; without them, 0 and 1.
    gpus, cpu_workers : int, optional
        Counts given by the caller (``--gpus``, ``--cpu-workers``): they win.

    Returns
    -------
    tuple of int
        ``(gpus, cpu_workers)``.

    Raises
    ------
    ParameterError
        A negative count.
    """
    # A null in the entry is no count: the default.
    chosen_gpus = (entry.get("gpus") or 0) if gpus is None else gpus
    chosen_cpu = cpu_workers if cpu_workers is not None else entry.get("cpu-workers")
    chosen_cpu = 1 if chosen_cpu is None else chosen_cpu
    for name, count in (("gpus", chosen_gpus), ("cpu_workers", chosen_cpu)):
        if count < 0:
            raise ParameterError(f"{name}={count} (--{name.replace('_', '-')}) must be >= 0")
    return chosen_gpus, chosen_cpu
