"""buzzdask: find bee buzzing in months of field audio with Dask.

ffmpeg decode tasks on CPU workers, a TensorFlow scorer actor (YAMNet + a buzzdetect head) per
GPU or CPU scoring worker, and a partitioned Parquet dataset with the run's metadata.
"""

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from buzzdask import config  # first: registers the defaults in dask.config
from buzzdask.errors import (
    BuzzdaskError,
    BuzzdaskWarning,
    ClusterError,
    DecodeError,
    InputError,
    ModelError,
    OutputConflictError,
    OutputFullError,
    OutputPermissionError,
    ParameterError,
    ScorerError,
    ScorerMisplacedError,
    TransferError,
)

if sys.argv[:1] == ["-m"]:
    # ``python -m buzzdask.cluster`` (Python imports the packages above a module with argv[0]
    # "-m"): that package imports Dask before its ``main`` runs, and Dask refuses a malformed
    # YAML of its configuration with a traceback; said here as the buzzdask command says it.
    config.exit_if_dask_config_unreadable()

if TYPE_CHECKING:  # what the names below are, for type checkers and editors
    from buzzdask.analysis import AnalysisResult, analyze
    from buzzdask.decode import decode_file, probe_audio
    from buzzdask.exports import ExportResult, export
    from buzzdask.frames import FrameSpec
    from buzzdask.models import ModelSpec, resolve_model
    from buzzdask.plots import plot_activation, plot_daily_activity, plot_run
    from buzzdask.project import init_project
    from buzzdask.rclone import TransferResult, transfer, upload
    from buzzdask.recording_time import recording_start, recording_starts
    from buzzdask.rescore import rescore
    from buzzdask.results import Run, open_run
    from buzzdask.summaries import summarize
    from buzzdask.thresholds import resolve_thresholds, thresholds_for_precision
    from buzzdask.training import TrainingResult, train
    from buzzdask.watching import watch

#: The public names that come from modules imported on first use (:func:`__getattr__`).
_LAZY_NAMES: dict[str, str] = {
    "AnalysisResult": "buzzdask.analysis",
    "analyze": "buzzdask.analysis",
    "decode_file": "buzzdask.decode",
    "probe_audio": "buzzdask.decode",
    "ExportResult": "buzzdask.exports",
    "export": "buzzdask.exports",
    "FrameSpec": "buzzdask.frames",
    "ModelSpec": "buzzdask.models",
    "resolve_model": "buzzdask.models",
    "plot_activation": "buzzdask.plots",
    "plot_daily_activity": "buzzdask.plots",
    "plot_run": "buzzdask.plots",
    "init_project": "buzzdask.project",
    "TransferResult": "buzzdask.rclone",
    "transfer": "buzzdask.rclone",
    "upload": "buzzdask.rclone",
    "recording_start": "buzzdask.recording_time",
    "recording_starts": "buzzdask.recording_time",
    "rescore": "buzzdask.rescore",
    "Run": "buzzdask.results",
    "open_run": "buzzdask.results",
    "summarize": "buzzdask.summaries",
    "resolve_thresholds": "buzzdask.thresholds",
    "thresholds_for_precision": "buzzdask.thresholds",
    "TrainingResult": "buzzdask.training",
    "train": "buzzdask.training",
    "watch": "buzzdask.watching",
}

#: Modules the README names as ``buzzdask.<module>`` (``buzzdask.settings.load_settings``).
_SUBMODULES = ("cluster", "settings")

try:
    __version__ = version("buzzdask")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"

__all__ = [
    # functions
    "analyze",
    "decode_file",
    "export",
    "init_project",
    "open_run",
    "plot_activation",
    "plot_daily_activity",
    "plot_run",
    "probe_audio",
    "recording_start",
    "recording_starts",
    "rescore",
    "resolve_model",
    "resolve_thresholds",
    "summarize",
    "thresholds_for_precision",
    "transfer",
    "upload",
    "train",
    "watch",
    # classes
    "AnalysisResult",
    "ExportResult",
    "FrameSpec",
    "ModelSpec",
    "Run",
    "TransferResult",
    "TrainingResult",
    # exceptions and warnings
    "BuzzdaskError",
    "BuzzdaskWarning",
    "ClusterError",
    "DecodeError",
    "InputError",
    "ModelError",
    "OutputConflictError",
    "OutputFullError",
    "OutputPermissionError",
    "ParameterError",
    "ScorerError",
    "ScorerMisplacedError",
    "TransferError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Each public name's module is imported when the name is first used (PEP 562), and
    # buzzdask.cluster (dask-jobqueue) likewise: `import buzzdask` stays light. A worker process
    # imports only what its tasks use: not the client's planning, exports, plots or training.
    if name in _SUBMODULES:
        return importlib.import_module(f"buzzdask.{name}")
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'buzzdask' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_SUBMODULES})
