"""buzzdask: find bee buzzing in months of field audio with Dask.

ffmpeg decode tasks on CPU workers, a TensorFlow scorer actor (YAMNet + a buzzdetect head) per
GPU or CPU scoring worker, and a partitioned Parquet dataset with the run's metadata.
"""

from importlib.metadata import PackageNotFoundError, version

from buzzdask import config  # noqa: F401  (first: registers the defaults in dask.config)
from buzzdask.analysis import AnalysisResult, analyze
from buzzdask.decode import decode_file, probe_audio
from buzzdask.errors import (
    BuzzdaskError,
    BuzzdaskWarning,
    ClusterError,
    DecodeError,
    InputError,
    ModelError,
    OutputConflictError,
    OutputFullError,
    ParameterError,
    ScorerError,
    ScorerMisplacedError,
    TransferError,
)
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
    "ParameterError",
    "ScorerError",
    "ScorerMisplacedError",
    "TransferError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # buzzdask.cluster (dask-jobqueue) loads on first use, so `import buzzdask` stays light.
    if name == "cluster":
        import importlib

        return importlib.import_module("buzzdask.cluster")
    raise AttributeError(f"module 'buzzdask' has no attribute {name!r}")
