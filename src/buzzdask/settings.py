"""Settings: every ``buzzdask.*`` configuration key, checked once, as one frozen value.

:func:`load_settings` reads ``dask.config.get("buzzdask")`` (the defaults of ``buzzdask.yaml``
merged with a user's YAML files under ``~/.config/dask/``, ``DASK_BUZZDASK__...`` variables and
``dask.config.set``), applies keyword overrides and checks every key and value, so that a
misspelt key or a value of the wrong kind fails before any work starts, naming the key, the value
and the fix. The result is a plain value (frozen, hashable, picklable) that the client hands to
tasks and actors; workers never read the configuration themselves.

Configuration keys are hyphenated (``chunk-seconds``), fields are not (``chunk_seconds``); dask
treats ``-`` and ``_`` in keys as the same, and so does this module.

>>> settings = load_settings(chunk_seconds=300)
>>> settings.chunk_seconds, settings.with_overrides(train={"epochs": 5}).train.epochs
(300.0, 5)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dask.config
import yaml
from dask.utils import parse_bytes

from buzzdask import config  # registers buzzdask.yaml's defaults in dask.config
from buzzdask.errors import ParameterError

__all__ = [
    "byte_count",
    "load_settings",
    "EmbedderSettings",
    "LocalClusterSettings",
    "Settings",
    "StagingSettings",
    "TrainSettings",
    "TransferSettings",
    "WatchSettings",
]

_SOURCES = "a YAML file under ~/.config/dask/, a {variable} variable or dask.config.set"
# buzzdask.clusters.<name> entries come from cluster_configs/*.yaml: they say how to start a
# cluster, not how to run, and buzzdask.cluster.configs.load_cluster_config checks them.
_FOREIGN = ("clusters",)

_T = TypeVar("_T")


class _Invalid(Exception):
    """A value breaks its rule; the message completes "must be ..."."""


_Check = Callable[[Any], Any]

# Number ranges, by the words the messages use.
_RANGES: dict[str, Callable[[float], bool]] = {
    "> 0": lambda x: x > 0,
    ">= 0": lambda x: x >= 0,
    "in (0, 1)": lambda x: 0 < x < 1,
    "in (0, 1]": lambda x: 0 < x <= 1,
    # A chunk is decoded whole into memory: a day of audio is 5.5 GB of float32 at 16 kHz.
    "in (0, 86400]": lambda x: 0 < x <= 86400,
}


def _to_number(value: Any, *, whole: bool) -> float | int | None:
    """``value`` as a number, or None: never a bool; strings as PyYAML leaves ``1e-3``.

    NumPy's numbers (``np.int64`` out of a DataFrame) are numbers too.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if whole and isinstance(value, numbers.Integral):
        return int(value)  # exact, however large
    number = float(value)
    if whole:
        return int(number) if number.is_integer() else None
    return number


def _real(rule: str, unit: str = "") -> _Check:
    within = _RANGES[rule]

    def check(value: Any) -> float:
        number = _to_number(value, whole=False)
        if number is None or not math.isfinite(number) or not within(number):
            raise _Invalid(f"a number {rule}{unit and f' [{unit}]'}")
        return number

    return check


def _whole(minimum: int, unit: str = "") -> _Check:
    def check(value: Any) -> int:
        number = _to_number(value, whole=True)
        if number is None or number < minimum:
            raise _Invalid(f"an integer >= {minimum}{unit and f' [{unit}]'}")
        return int(number)

    return check


def byte_count(value: Any) -> int:
    """``value`` in bytes (an integer, or text such as ``"32GiB"``); 0 where it is no size."""
    # parse_bytes reads "" and "GiB" as one of the unit, and int(inf) overflows.
    unitless = isinstance(value, str) and not any(char.isdigit() for char in value)
    if isinstance(value, float) and not value.is_integer():
        return 0  # parse_bytes would take 1.5 (a YAML number) as 1 byte
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # parse_bytes takes int, not np.int64
    try:
        return 0 if isinstance(value, bool) or unitless else parse_bytes(value)
    except (AttributeError, TypeError, ValueError, OverflowError):  # None: AttributeError
        return 0


def _size(value: Any) -> int:
    size = byte_count(value)
    if size <= 0:
        raise _Invalid("a size > 0: an integer or a string such as '1GiB' [bytes]")
    return size


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid("a non-empty string")
    return value


def _address(value: Any) -> str:
    # distributed also takes a bare port, as DASK_..._DASHBOARD_ADDRESS=8787 arrives.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**16:
        return f":{value}"
    if isinstance(value, str) and value.isdigit():
        value = f":{value}"  # a port quoted in YAML
    # "abc" or a URL ("http://host:8787") would only fail as the cluster starts, with a
    # traceback: [host]:port is what it needs.
    host, _, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not (
        port.isdigit()
        and int(port) < 2**16
        and not any(c.isspace() or c == "/" for c in host)
        and not any(c.isspace() for c in port)
    ):
        raise _Invalid("an address such as ':8787' or 'localhost:8787' (no URL), or a port")
    return value


def _texts(value: Any) -> tuple[str, ...]:
    # A lone string would otherwise be read as a list of its characters.
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _Invalid('a list of strings, such as ["a", "b"]')
    return tuple(value)


def _wholes(minimum: int) -> _Check:
    each = _whole(minimum)

    def check(value: Any) -> tuple[int, ...]:
        try:
            if not isinstance(value, (list, tuple)):
                raise _Invalid
            return tuple(each(v) for v in value)
        except _Invalid:
            raise _Invalid(f"a list of integers >= {minimum}") from None

    return check


def _flag(value: Any) -> bool:
    # DASK_...=1 arrives as the integer 1.
    if not isinstance(value, int) or value not in (0, 1):
        raise _Invalid("true or false")
    return bool(value)


def _optional(check: _Check, meaning: str) -> _Check:
    def optional(value: Any) -> Any:
        if value is None:
            return None
        try:
            return check(value)
        except _Invalid as rule:
            raise _Invalid(f"{rule}, or null ({meaning})") from None

    return optional


def _rule(check: _Check) -> dict[str, _Check]:
    """A field's metadata: the check its values pass."""
    return {"check": check}


@dataclass(frozen=True, slots=True)
class TransferSettings:
    """``buzzdask.transfer``: copying recordings with rclone (``buzzdask transfer``).

    Attributes
    ----------
    rclone : str
        The rclone executable; remotes are set up once with ``rclone config``.
    batch_size : int >= 1 [files]
        Files per rclone call: a batch becomes visible to an analysis as soon as it is complete.
    rclone_flags : tuple of str
        Extra flags for every rclone call, e.g. ``("--bwlimit", "50M")``.
    """

    rclone: str = field(metadata=_rule(_text))
    batch_size: int = field(metadata=_rule(_whole(1, "files")))
    rclone_flags: tuple[str, ...] = field(metadata=_rule(_texts))


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """``buzzdask.watch``: analysing a directory while a transfer fills it.

    Attributes
    ----------
    marker : str
        File name written by ``buzzdask transfer`` once everything has arrived; a watching
        analysis stops there.
    poll_seconds : float > 0 [s]
        Time between looks at the input; files are analysed once unchanged between two looks.
    idle_timeout_seconds : float > 0 [s] or None
        Stop watching after this long without new or changed files; None: only the marker.
    """

    marker: str = field(metadata=_rule(_text))
    poll_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    idle_timeout_seconds: float | None = field(
        metadata=_rule(_optional(_real("> 0", "s"), "stop only at the marker"))
    )


@dataclass(frozen=True, slots=True)
class StagingSettings:
    """``buzzdask.staging``: copying each input to the decode worker's node-local disk first.

    Attributes
    ----------
    enabled : bool
        Stage copies (spares the parallel file system).
    directory : str or None
        Node-local directory for the copies; None: the worker's own ``$TMPDIR``.
    keep_files : int >= 0 [files]
        Idle staged files a worker keeps for the same file's next chunk before removing them.
    """

    enabled: bool = field(metadata=_rule(_flag))
    directory: str | None = field(metadata=_rule(_optional(_text, "the worker's $TMPDIR")))
    keep_files: int = field(metadata=_rule(_whole(0, "files")))


@dataclass(frozen=True, slots=True)
class LocalClusterSettings:
    """``buzzdask.local-cluster``: the cluster ``analyze()`` starts when given no client.

    Attributes
    ----------
    n_workers : int >= 1 or None
        Worker processes, each decoding (``scorers`` of them scoring too); None: 1.
    threads_per_worker : int >= 1 or None
        Threads per worker; None: every core (decode threads mostly wait on ffmpeg).
    dashboard_address : str or None
        Dashboard address (``":0"`` picks a free port; a bare port ``p`` becomes ``":p"``); None
        disables the dashboard.
    scorers : int >= 1 or None
        Its workers holding a scorer (``cpu-scorer-workers`` for this cluster); None: every
        worker.
    """

    n_workers: int | None = field(metadata=_rule(_optional(_whole(1), "1 worker")))
    threads_per_worker: int | None = field(metadata=_rule(_optional(_whole(1), "every core")))
    dashboard_address: str | None = field(metadata=_rule(_optional(_address, "no dashboard")))
    scorers: int | None = field(metadata=_rule(_optional(_whole(1), "every worker")))


@dataclass(frozen=True, slots=True)
class EmbedderSettings:
    """``buzzdask.embedders.<name>``: an embedder, by the name a model's ``embeddername`` gives.

    Attributes
    ----------
    handle : str
        ``tensorflow_hub.load`` handle: a TF Hub URL or a local SavedModel directory.
    sample_rate : int >= 1 [Hz]
        The rate the embedder reads audio at.
    frame_length_seconds : float > 0 [s]
        One scored frame (YAMNet's 96 log-mel patch: 0.96 s).
    frame_context_seconds : float >= 0 [s]
        Audio past a frame's end the embedder also reads (STFT window overrun).
    """

    handle: str = field(metadata=_rule(_text))
    sample_rate: int = field(metadata=_rule(_whole(1, "Hz")))
    frame_length_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    frame_context_seconds: float = field(metadata=_rule(_real(">= 0", "s")))


# Keys removed on purpose, and why: a user's own YAML may still carry them.
_REMOVED: dict[tuple[type, str], str] = {
    (EmbedderSettings, key): "preprocessing is fixed (buzzdask.decode.PREPROCESSING)"
    for key in ("downmix", "resampler")
}


@dataclass(frozen=True, slots=True)
class TrainSettings:
    """``buzzdask.train``: training a detector head (``buzzdask.train``, ``buzzdask train``).

    Attributes
    ----------
    frame_hop_seconds : float > 0 [s]
        Time between training frame starts.
    min_overlap_seconds : float > 0 [s]
        Least overlap of a frame with a labelled segment for the frame to carry its label.
    ambient_class : str
        Class of the frames of ambient directories and of unlabeled frames drawn as ambient.
    unlabeled_ambient : int >= 0 [frames per labelled file]
        Unlabeled frames drawn as ambient, away from every labelled segment (0: none).
    ambient_margin_seconds : float >= 0 [s]
        Least distance between such an ambient frame and any labelled segment.
    group_column : str
        Labels column naming each file's group; files without one are grouped by their folder.
    holdout_fraction : float in (0, 1)
        Share of the groups held out when no holdout groups are named.
    hidden_units : tuple of int >= 1 [units per layer]
        Hidden ReLU layers before the output layer; ``()`` is one dense layer.
    epochs : int >= 1 [epochs]
        Most epochs; training stops earlier after ``patience`` epochs without improvement.
    patience : int >= 0 [epochs]
        Epochs without a better held-out loss before training stops.
    batch_size : int >= 1 [frames]
        Frames per training step.
    learning_rate : float > 0
        Adam's learning rate.
    seed : int >= 0
        Seeds the held-out draw, the unlabeled-frame draw and TensorFlow.
    target_precision : float in (0, 1]
        The evaluation reports, per class, the lowest threshold reaching this precision.
    cache_dir : str
        Embedding cache, relative to the working directory.
    """

    frame_hop_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    min_overlap_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    ambient_class: str = field(metadata=_rule(_text))
    unlabeled_ambient: int = field(metadata=_rule(_whole(0, "frames per labelled file")))
    ambient_margin_seconds: float = field(metadata=_rule(_real(">= 0", "s")))
    group_column: str = field(metadata=_rule(_text))
    holdout_fraction: float = field(metadata=_rule(_real("in (0, 1)")))
    hidden_units: tuple[int, ...] = field(metadata=_rule(_wholes(1)))
    epochs: int = field(metadata=_rule(_whole(1, "epochs")))
    patience: int = field(metadata=_rule(_whole(0, "epochs")))
    batch_size: int = field(metadata=_rule(_whole(1, "frames")))
    learning_rate: float = field(metadata=_rule(_real("> 0")))
    seed: int = field(metadata=_rule(_whole(0)))
    target_precision: float = field(metadata=_rule(_real("in (0, 1]")))
    cache_dir: str = field(metadata=_rule(_text))


@dataclass(frozen=True, slots=True)
class Settings:
    """Every ``buzzdask.*`` setting, checked: build it with :func:`load_settings`.

    Attributes
    ----------
    chunk_seconds : float in (0, 86400] [s]
        Audio per decode task, rounded down to whole frame hops (at least one frame).
    memory_budget : int >= 1 [bytes]
        Most decoded audio (float32 at the embedder's rate) held across the cluster at once.
    batch_frames : int >= 1 [frames]
        Most frames the scorer actor hands the embedder in one call, and per score task.
    cpu_call_frames : int >= 1 or None [frames]
        On a CPU, the most frames of one embedder call (a task's batch goes in calls of at most
        this many); None: ``batch_frames``.
    cpu_scorer_workers : int >= 1 or None
        Without GPU workers, how many workers hold a scorer actor; None: every worker.
    score_tasks_per_actor : int >= 1 [tasks]
        Score tasks queued per scorer actor, so transfers overlap scoring.
    score_attempts : int >= 1 [attempts]
        Times a chunk is sent to a scorer whose worker then dies (or decoded by an ffmpeg then
        stopped by a signal) before it is reported failed.
    lock_stale_seconds : float > 0 [s]
        A lock on an output whose holder on another host has not touched it for this long is
        taken over (at once where SLURM says the holder's job ended: :mod:`buzzdask.lock`).
    scorer_ping_seconds : float > 0 [s]
        Time a failed score task's actor has to answer a ping before it counts as lost; and
        that the run's start and end wait for a worker that does not answer (stopped, hung).
    scorer_restart_seconds : float > 0 [s]
        Time to wait for a worker to restart a lost scorer on.
    decode_margin_seconds : float >= 0 [s]
        Extra audio decoded on each side of a chunk so decoder and resampler settle.
    seekable_codecs : tuple of str
        Codecs (``fnmatch`` patterns) whose input seeking ffmpeg does sample-exactly; others are
        decoded from the start and trimmed.
    extensions : tuple of str
        File name extensions picked up when an input is a directory (case-insensitive).
    model_dirs : tuple of str
        Directories searched, in order, for a model given by name.
    cache_dir : str or None
        buzzdask's cache; embedders downloaded from TF Hub go to ``<cache_dir>/tfhub`` unless
        ``TFHUB_CACHE_DIR`` is set. None: ``$XDG_CACHE_HOME/buzzdask``, else
        ``~/.cache/buzzdask`` (:func:`buzzdask.embedders.cache_directory`).
    ffmpeg : str or None
        The ffmpeg executable (built with libsoxr); None: the system ffmpeg if it has soxr, else
        the ``imageio-ffmpeg`` wheel's (:func:`buzzdask.ffmpeg_tools.find_ffmpeg`).
    ffprobe : str or None
        The ffprobe executable; None: the one beside ffmpeg, or none (ffmpeg then probes).
    transfer : TransferSettings
        ``buzzdask.transfer.*``.
    watch : WatchSettings
        ``buzzdask.watch.*``.
    staging : StagingSettings
        ``buzzdask.staging.*``.
    cluster_config_dirs : tuple of str
        Extra directories searched first for cluster configurations (``<name>.yaml``).
    cluster_wait_seconds : float > 0 [s]
        Time ``buzzdask.cluster.start`` waits for its worker jobs (queue time included).
    client_lost_seconds : float > 0 [s]
        Time a one-batch job's scheduler and workers wait for its client task to come back
        once it is gone without stopping them (killed), before they end the job.
    tf_intra_op_threads, tf_inter_op_threads : int >= 1 or None
        TensorFlow threads in the scorer; None: TensorFlow's default.
    check_gpus : bool
        Whether a scorer on a worker that declares GPUs checks that TensorFlow sees them.
    local_cluster : LocalClusterSettings
        ``buzzdask.local-cluster.*``.
    embedders : Mapping[str, EmbedderSettings]
        ``buzzdask.embedders.<name>.*``, read-only.
    train : TrainSettings
        ``buzzdask.train.*``.
    """

    chunk_seconds: float = field(metadata=_rule(_real("in (0, 86400]", "s")))
    memory_budget: int = field(metadata=_rule(_size))
    batch_frames: int = field(metadata=_rule(_whole(1, "frames")))
    cpu_call_frames: int | None = field(
        metadata=_rule(_optional(_whole(1, "frames"), "batch-frames"))
    )
    cpu_scorer_workers: int | None = field(metadata=_rule(_optional(_whole(1), "every worker")))
    score_tasks_per_actor: int = field(metadata=_rule(_whole(1, "tasks")))
    score_attempts: int = field(metadata=_rule(_whole(1, "attempts")))
    lock_stale_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    scorer_ping_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    scorer_restart_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    decode_margin_seconds: float = field(metadata=_rule(_real(">= 0", "s")))
    seekable_codecs: tuple[str, ...] = field(metadata=_rule(_texts))
    extensions: tuple[str, ...] = field(metadata=_rule(_texts))
    model_dirs: tuple[str, ...] = field(metadata=_rule(_texts))
    cache_dir: str | None = field(metadata=_rule(_optional(_text, "~/.cache/buzzdask")))
    ffmpeg: str | None = field(
        metadata=_rule(_optional(_text, "the system ffmpeg with soxr, else imageio-ffmpeg's"))
    )
    ffprobe: str | None = field(metadata=_rule(_optional(_text, "beside ffmpeg, or none")))
    transfer: TransferSettings = field(metadata={"section": TransferSettings})
    watch: WatchSettings = field(metadata={"section": WatchSettings})
    staging: StagingSettings = field(metadata={"section": StagingSettings})
    cluster_config_dirs: tuple[str, ...] = field(metadata=_rule(_texts))
    cluster_wait_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    client_lost_seconds: float = field(metadata=_rule(_real("> 0", "s")))
    tf_intra_op_threads: int | None = field(
        metadata=_rule(_optional(_whole(1), "TensorFlow's default"))
    )
    tf_inter_op_threads: int | None = field(
        metadata=_rule(_optional(_whole(1), "TensorFlow's default"))
    )
    check_gpus: bool = field(metadata=_rule(_flag))
    local_cluster: LocalClusterSettings = field(metadata={"section": LocalClusterSettings})
    embedders: Mapping[str, EmbedderSettings] = field(metadata={"named": EmbedderSettings})
    train: TrainSettings = field(metadata={"section": TrainSettings})

    def with_overrides(self, **overrides: Any) -> Settings:
        """A copy with keyword overrides applied and checked.

        Parameters
        ----------
        **overrides
            Values by field name (``chunk_seconds=300``, ``memory_budget="2GiB"``); ``None``
            means "not given". A section or ``embedders`` takes a mapping merged into it:
            ``train={"epochs": 5}``, ``embedders={"yamnet_k2": {"handle": "/models/yamnet"}}``.

        Returns
        -------
        Settings

        Raises
        ------
        ParameterError
            For an unknown keyword (naming the nearest one) or a value breaking its rule.
        """
        return _apply(Settings, self, overrides, (), keyword=True)


def load_settings(**overrides: Any) -> Settings:
    """Read ``buzzdask.*`` from ``dask.config`` once, apply keyword overrides, check everything.

    Parameters
    ----------
    **overrides
        As for :meth:`Settings.with_overrides`; ``None`` means "not given".

    Returns
    -------
    Settings

    Raises
    ------
    ParameterError
        For every unknown key (anywhere under ``buzzdask.``, naming the nearest valid key and
        where the key can come from), missing key or value breaking its rule (naming the key,
        the value, the rule and its unit), in one message; or for a bad keyword.
    """
    _check_sources()
    settings = _apply(Settings, None, dask.config.get("buzzdask"), (), keyword=False)
    return settings.with_overrides(**overrides)


def _check_sources() -> None:
    """What a user's YAML files and variables say that ``dask.config.get`` no longer shows.

    Dask merges the defaults over them: a plain value where a section goes (``staging: true``)
    is replaced by the section's defaults, and keys outside ``buzzdask:`` (``chunk-seconds``
    at the top, ``buzzdsak:``, ``DASK_BUZZDASK_CHUNK_SECONDS``) are never read.
    """
    # The YAML files and DASK_* variables, without defaults (paths read now: its default is
    # bound at import).
    given = dask.config.collect(paths=dask.config.paths)
    problems = _sections_replaced(given.get("buzzdask", {}), config.DEFAULTS["buzzdask"], ())
    ours = set(config.DEFAULTS["buzzdask"])
    for key in given:
        name = str(key).lower().replace("_", "-")
        if name != "buzzdask" and (
            name.startswith("buzzdask")
            or name in ours
            or difflib.get_close_matches(name, ["buzzdask"], cutoff=0.75)
        ):
            problems.append(
                f"{key!r} at the top of the configuration (a YAML file under ~/.config/dask/ or "
                "a DASK_* variable) is not read: buzzdask's keys go under 'buzzdask:' "
                "(variables: DASK_BUZZDASK__KEY)"
            )
    if problems:
        raise ParameterError("; ".join(problems))


def _sections_replaced(given: Any, defaults: Mapping[str, Any], path: tuple[str, ...]) -> list[str]:
    """``buzzdask.<path>`` given as a plain value where ``defaults`` is a section, recursively."""
    if given is None:  # a section whose keys are all commented out: the defaults, as meant
        return []
    if not isinstance(given, Mapping):
        return [
            f"{_label(path, False)}={given!r} must be a mapping of settings"
            f"{_source(path, False, given)}"
        ]
    spelled = {str(key).replace("_", "-"): value for key, value in given.items()}
    return [
        problem
        for key, default in defaults.items()
        if isinstance(default, Mapping) and str(key).replace("_", "-") in spelled
        for problem in _sections_replaced(
            spelled[str(key).replace("_", "-")], default, (*path, key)
        )
    ]


class _FrozenMapping(Mapping[str, Any]):
    """A read-only mapping that hashes and pickles (``types.MappingProxyType`` does neither)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Any]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> Any:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __hash__(self) -> int:
        return hash(frozenset(self._entries.items()))

    def __repr__(self) -> str:
        return repr(self._entries)


def _label(path: tuple[str, ...], keyword: bool) -> str:
    return ".".join(path) if keyword else ".".join(("buzzdask", *path))


_ANY = object()  # a key's value, where :func:`_source` is not told it


def _source(path: tuple[str, ...], keyword: bool, value: Any = _ANY) -> str:
    """Where a configuration key comes from; keywords: nothing.

    Its environment variable, or the YAML file whose value Dask took (a missing key's: its
    section's), else where it can be set.
    """
    if keyword:
        return ""
    variable = "__".join(("DASK_BUZZDASK", *(p.upper().replace("-", "_") for p in path)))
    # Its value, where told: a variable of another value was overridden (dask.config.set).
    if variable in os.environ and (
        value is _ANY or dask.config.interpret_value(os.environ[variable]) == value
    ):
        return f" (set by the {variable} variable)"
    files = _files_setting(("buzzdask", *path)) or _files_setting(("buzzdask", *path[:-1]))
    if files:  # Dask reads them in order, the last one's value taken
        return f" (set in {files[-1]})"
    return f" (set in {_SOURCES.format(variable=variable)})"


def _files_setting(path: tuple[str, ...]) -> list[str]:
    """Dask's YAML configuration files that hold ``path`` (``-`` and ``_`` alike)."""
    files = []
    for place in dask.config.paths:  # directories, or a file (DASK_CONFIG may name one)
        try:
            names = [os.path.join(place, name) for name in sorted(os.listdir(place))]
        except NotADirectoryError:
            names = [place]
        except OSError:
            continue
        for file in names:
            if file.endswith((".yaml", ".yml")) and _holds(_yaml_file(file), path):
                files.append(file)
    return files


def _yaml_file(file: str) -> Any:
    """A YAML file's content; None where it cannot be read."""
    try:
        with open(file, encoding="utf-8") as stream:
            return yaml.safe_load(stream)
    except (OSError, yaml.YAMLError):
        return None


def _holds(node: Any, path: tuple[str, ...]) -> bool:
    """Whether nested mappings ``node`` hold the key ``path`` (``-`` and ``_`` alike)."""
    for key in path:
        if not isinstance(node, Mapping):
            return False
        keys = {str(name).replace("_", "-"): value for name, value in node.items()}
        if key.replace("_", "-") not in keys:
            return False
        node = keys[key.replace("_", "-")]
    return True


def _mapping(given: Any, path: tuple[str, ...], keyword: bool) -> Mapping[Any, Any]:
    if given is None and not keyword:
        # A section whose keys are all commented out, after dask.config.refresh() (at import,
        # dask's merge fills it with the defaults): its defaults.
        return _defaults_at(path)
    if not isinstance(given, Mapping):
        raise ParameterError(
            f"{_label(path, keyword)}={given!r} must be a mapping of settings"
            f"{_source(path, keyword)}"
        )
    return given


def _defaults_at(path: tuple[str, ...]) -> Mapping[str, Any]:
    """The section ``buzzdask.<path>`` of ``buzzdask.yaml``; empty where it has none."""
    node: Any = config.DEFAULTS["buzzdask"]
    for part in path:
        spelled = {str(k).replace("_", "-"): v for k, v in node.items()}
        node = spelled.get(part.replace("_", "-"))
        if not isinstance(node, Mapping):
            return {}
    return node


def _apply(
    kind: type[_T], base: _T | None, given: Any, path: tuple[str, ...], *, keyword: bool
) -> _T:
    """``base`` with the settings in ``given`` applied and checked, or all of them if no ``base``.

    Configuration keys are shown hyphenated under ``buzzdask.``, keywords as given.
    """
    by_key = {f.name.replace("_", "-"): f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    foreign = () if keyword or path else _FOREIGN
    values: dict[str, Any] = {}
    given_names: set[str] = set()
    problems: list[str] = []
    for name, value in _mapping(given, path, keyword).items():
        key = str(name).replace("_", "-")
        here = (*path, str(name) if keyword else key)
        if key in foreign:
            continue
        spec = by_key.get(key)
        if spec is None:
            problems.append(_unknown(kind, here, [*by_key, *foreign], keyword))
            continue
        given_names.add(spec.name)
        if keyword and value is None:
            continue
        current = None if base is None else getattr(base, spec.name)
        try:
            values[spec.name] = _value(spec.metadata, current, value, here, keyword)
        except ParameterError as error:
            problems.append(str(error))
    for key, spec in by_key.items():
        if base is None and spec.name not in given_names:
            missing = (*path, spec.name if keyword else key)
            problems.append(f"{_label(missing, keyword)} is missing{_source(missing, keyword)}")
    if problems:
        raise ParameterError("\n".join(problems))
    if base is None:
        return kind(**values)
    return dataclasses.replace(base, **values)  # type: ignore[type-var]


def _value(
    spec: Mapping[str, Any], current: Any, value: Any, path: tuple[str, ...], keyword: bool
) -> Any:
    """One field's checked value: a setting, a section or named entries."""
    if "section" in spec:
        return _apply(spec["section"], current, value, path, keyword=keyword)
    if "named" in spec:
        entries = dict(current or {})
        problems = []
        for name, entry in _mapping(value, path, keyword).items():
            if keyword and entry is None:
                continue
            try:
                entries[str(name)] = _apply(
                    spec["named"],
                    entries.get(str(name)),
                    entry,
                    (*path, str(name)),
                    keyword=keyword,
                )
            except ParameterError as error:
                problems.append(str(error))
        if problems:
            raise ParameterError("\n".join(problems))
        return _FrozenMapping(entries)
    try:
        return spec["check"](value)
    except _Invalid as rule:
        raise ParameterError(
            f"{_label(path, keyword)}={value!r} must be {rule}{_source(path, keyword, value)}"
        ) from None


def _unknown(kind: type, path: tuple[str, ...], keys: list[str], keyword: bool) -> str:
    names = [k.replace("-", "_") for k in keys] if keyword else keys
    close = difflib.get_close_matches(path[-1], names, n=1)
    if (kind, path[-1]) in _REMOVED:
        fix = f"it was removed: {_REMOVED[kind, path[-1]]}; delete it"
    elif close:
        fix = f"did you mean {_label((*path[:-1], close[0]), keyword)}?"
    else:
        fix = f"the known ones are {', '.join(names)}"
    if keyword:
        return f"unknown keyword {_label(path, keyword)}; {fix}"
    return f"unknown setting {_label(path, keyword)}{_source(path, keyword)}; {fix}"
