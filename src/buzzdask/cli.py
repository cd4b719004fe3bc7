"""The ``buzzdask`` command line.

Commands: ``analyze`` (``--watch``), ``init``, ``transfer``, ``train``, ``embedder fetch``,
``export``, ``summarize``, ``plot``;
``--version``.

Exit codes: see :data:`EXIT_CODES` (``buzzdask --help`` lists them).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import logging
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec

from buzzdask.errors import BuzzdaskError, OutputConflictError, ParameterError
from buzzdask.preload import skip_final_collection

if TYPE_CHECKING:
    from pathlib import Path

    from distributed import Client

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FILES_FAILED = 0, 1, 2, 3
EXIT_INTERRUPTED = 128 + 2  # the shell's code for a command ended by SIGINT (Ctrl-C)
EXIT_TERMINATED = 128 + 15  # ... and by SIGTERM (SLURM at a job's time limit, scancel)
#: What each exit code means, as ``buzzdask --help`` and the README's table say it.
EXIT_CODES = {
    EXIT_OK: "done, and the errors table is empty",
    EXIT_ERROR: "nothing could start (a bad input path, model, option, an output in the way), "
    "or the run stopped on an error of its own, or a --watch ended on a transfer that stopped "
    "short; what was written is kept",
    EXIT_USAGE: "usage error",
    EXIT_FILES_FAILED: "the run finished, but errors.parquet has rows: files failed, or were "
    "damaged or cut short (their frames written)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C): what was written is kept, --resume finishes it",
    EXIT_TERMINATED: "stopped by SIGTERM (a SLURM time limit, scancel): as 130",
}

_P = ParamSpec("_P")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: the command stops the same way."""


def _terminate(signal_number: int, frame: Any) -> None:
    raise _Terminated("SIGTERM")  # the run's log says so


# What a command stopped midway leaves, and how to go on; set by main() once it knows its command.
_AFTER_STOP = {
    "analyze": "what was written is kept: finish the run with the same command and --resume",
    "transfer": (
        "the files copied so far are kept: the same command again finishes the transfer "
        "(they are not copied again)"
    ),
    "train": (
        "no model is written until a training ends; the embeddings made so far are kept in its "
        "cache, and the next training reuses them"
    ),
}
_AFTER_STOP["rescore"] = _AFTER_STOP["analyze"]
_AFTER_STOP["export"] = (
    "each file written is whole, and the folder is marked unfinished: the same command with "
    "--overwrite exports it all again"
)
_AFTER_STOP["summarize"] = _AFTER_STOP["plot"] = (
    "each file written is whole: run the same command again (with --overwrite if it wrote some)"
)
_stopping: dict[str, str] = {}


def default_of(key: str) -> str:
    """A help text's default: the setting's name and its value as configured now.

    ``"default 600: buzzdask.chunk-seconds"``, or a user's own value where their YAML file or
    variable sets it (what the command then takes).
    """
    import dask.config

    value = dask.config.get(f"buzzdask.{key}", default=None)
    return f"default {'none' if value is None else value}: buzzdask.{key}"


def reports_errors(command: Callable[_P, int]) -> Callable[_P, int]:
    """Wrap a command so that a :class:`~buzzdask.errors.BuzzdaskError` or Ctrl-C ends it cleanly.

    The error is printed as ``buzzdask: error: <message>`` on stderr, without a traceback, and
    the command returns :data:`EXIT_ERROR`; Ctrl-C says what it left and returns
    :data:`EXIT_INTERRUPTED`. SIGTERM (what SLURM sends at a job's time limit, and ``scancel``)
    stops it as Ctrl-C does, says so in the job's log and returns :data:`EXIT_TERMINATED`.
    """

    @functools.wraps(command)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> int:
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
        try:
            return command(*args, **kwargs)
        except BuzzdaskError as error:
            print(f"buzzdask: error: {_in_flags(error)}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as error:
            # A labmate's file in the way (a partition a resume removes, a log, a lock, an
            # export's folder), or a read-only mount: which, whose, what to do; no traceback.
            from pathlib import Path

            from buzzdask.write import owner_said, write_refused

            if not write_refused(error):
                raise
            where = os.fsdecode(error.filename) if error.filename is not None else "a file"
            print(
                f"buzzdask: error: {where}: {error.strerror}{owner_said(Path(where))}: ask its "
                "owner for access (chmod -R g+rwX on its folder; umask 002 in job scripts "
                "keeps it so), or write elsewhere (--output, --dest)",
                file=sys.stderr,
            )
            return EXIT_ERROR
        except KeyboardInterrupt as stop:
            terminated = isinstance(stop, _Terminated)
            # Each partition and journal line is written whole: what was written stays valid.
            after = _stopping.get("after")
            print(
                # Off the bar's line in a terminal; no blank line in a job's log.
                ("\n" if sys.stderr.isatty() else "")
                + "buzzdask: "
                + (
                    "stopped by SIGTERM (a job's time limit, or scancel)"
                    if terminated
                    else "interrupted"
                )
                + (f"; {after}" if after else ""),
                file=sys.stderr,
            )
            return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return run


# analyze's keywords -> its flags, for messages that tell how to pass an earlier setting.
_FLAGS = {
    "model": "--model",
    "embedder": "--embedder",
    "frame_hop_s": "--framehop",
    "chunk_seconds": "--chunk-seconds",
    "precision": "--precision",
    "keep_embeddings": "--keep-embeddings",
}


def _flag(name: str, value: Any) -> str:
    if name == "thresholds":
        return " ".join(f"--threshold {k}={v}" for k, v in value.items()) or "without --threshold"
    if name == "keep_embeddings" and isinstance(value, bool):
        return "--keep-embeddings" if value else "without --keep-embeddings"
    if value is None:
        return f"without {_FLAGS.get(name, name)}"
    return f"{_FLAGS.get(name, name)} {shlex.quote(str(value))}"


# The keywords (and the settings they set) that library messages start with ("chunk_seconds=0.0
# must be ..."), as the commands' flags spell them.
_MESSAGE_FLAGS = {
    **_FLAGS,
    "output": "--output",
    "memory_budget": "--memory-budget",
    "batch_frames": "--batch-frames",
    "watch.poll_seconds": "--poll",
    "watch.idle_timeout_seconds": "--idle-timeout",
    "transfer.batch_size": "--batch-size",
    "train.epochs": "--epochs",
    "train.frame_hop_seconds": "--framehop",
    "train.seed": "--seed",
    "train.unlabeled_ambient": "--unlabeled-ambient",
    "gap_frames": "--gap-frames",
    "min_frames": "--min-frames",
    "holdout": "--holdout",
    "audio_dirs": "AUDIO_DIR",
    "ambient_dirs": "--ambient",
    "unlabeled_ambient": "--unlabeled-ambient",
    "time_format": "--time-format",
    "tz": "--tz",
}


def _in_flags(error: BuzzdaskError) -> str:
    """The message, naming flags where it names the ways on, or starts with a keyword."""
    if isinstance(error, OutputConflictError):
        from buzzdask.write import OutputConflict, Vocabulary

        conflict = error.args[0] if error.args else None
        if isinstance(conflict, OutputConflict):
            words = Vocabulary(resume="--resume", new="--new", output="--output", option=_flag)
            return conflict.render(words)
    text = _flags_for_keywords(str(error))
    keyword = re.match(r"([\w.]+)([=:]) ?", text)
    if keyword and keyword.group(1) in _MESSAGE_FLAGS:
        flag = _MESSAGE_FLAGS[keyword.group(1)]
        return f"{flag}{' ' if keyword.group(2) == '=' else ': '}{text[keyword.end() :]}"
    return text


def _flags_for_keywords(text: str) -> str:
    """A library message's keywords, in flags alone.

    ``pass overwrite=True (--overwrite)`` as ``pass --overwrite``, ``another dest (--dest)`` as
    ``another --dest``, ``gpus=-1 (--gpus)`` as ``--gpus -1``: only where the keyword is the
    flag's (its name, or :data:`_MESSAGE_FLAGS`'s).
    """

    def flag_alone(found: re.Match[str]) -> str:
        keyword, value, flag = found[1], found[2], found[3]
        same = keyword.replace("_", "-") == flag[2:] or _MESSAGE_FLAGS.get(keyword) == flag
        if not same or value == "False":
            return found[0]
        return flag if value in (None, "", "True") else f"{flag} {value}"

    return re.sub(r"\b(\w+)(?:=([^\s,;)]*))? \((--[\w-]+)\)", flag_alone, text)


def _threshold(text: str) -> tuple[str, float]:
    # The last "=": a model's name may hold one ("site=A/ins_buzz=-1.2"), a number never does.
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CLASS=VALUE (e.g. ins_buzz=-1.2), got {text!r}"
        ) from None


class _Thresholds(argparse.Action):
    """``--threshold CLASS=VALUE``, repeatable, into a dict; a class given twice is refused.

    A second value for one class is far more often a typo than an intended override.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        name, value = values
        given = dict(getattr(namespace, self.dest) or {})
        if name in given:
            parser.error(f"{option_string} {name} given twice ({given[name]:g} and {value:g})")
        given[name] = value
        setattr(namespace, self.dest, given)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document every flag in the README)."""
    from buzzdask import __version__

    parser = argparse.ArgumentParser(
        prog="buzzdask",
        description="Find bee buzzing in field audio with Dask.",
        epilog="exit codes: "
        + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"buzzdask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_analyze_parser(commands)
    _add_rescore_parser(commands)
    _add_init_parser(commands)
    _add_transfer_parser(commands)
    _add_train_parser(commands)
    _add_embedder_parser(commands)
    _add_export_parser(commands)
    _add_summarize_parser(commands)
    _add_plot_parser(commands)
    return parser


def _add_detection_options(
    parser: argparse.ArgumentParser, *, threshold_help: str, of_a_run: bool = False
) -> None:
    """``--threshold CLASS=VALUE ...`` or ``--precision P``: the thresholds of detections.

    ``of_a_run``: the command reads a run's results, and ``--model`` names the model whose
    metrics serve ``--precision`` where the run's is not reachable (results copied elsewhere).
    """
    detection = parser.add_mutually_exclusive_group()
    detection.add_argument(
        "--threshold",
        type=_threshold,
        action=_Thresholds,
        default={},
        metavar="CLASS=VALUE",
        help=threshold_help,
    )
    detection.add_argument(
        "--precision",
        type=float,
        metavar="P",
        help="thresholds from the model's tests/metrics.csv for this precision (e.g. 0.95), "
        "as buzzdetect computes them; instead of --threshold",
    )
    if of_a_run:
        parser.add_argument(
            "--model",
            metavar="DIR",
            help="the model directory whose tests/metrics.csv serves --precision (default: "
            "the run's, as its buzzdask.json records it)",
        )


def _add_run_options(parser: argparse.ArgumentParser, *, from_store: bool = False) -> None:
    """The flags ``analyze`` and ``rescore`` (``from_store``) share: models, output, cluster."""
    parser.add_argument(
        "--model",
        required=True,
        action="append",
        help="model directory or name in buzzdask.model-dirs; repeat for several heads on one "
        "embedder (scored together, each into OUTPUT/<model name>)",
    )
    parser.add_argument("--output", required=True, help="output directory")
    stores = " (default: the store's, where it holds one set of embeddings)" if from_store else ""
    configured = " (default: buzzdask.embedders' handle for the model's embedder: YAMNet, TF Hub)"
    parser.add_argument(
        "--embedder",
        help="embedder handle: TF Hub URL or local SavedModel directory" + (stores or configured),
    )
    parser.add_argument(
        "--framehop",
        type=float,
        metavar="SECONDS",
        help="seconds between frame starts "
        + (stores.strip() if from_store else "(default: one frame, 0.96)")
        + "; buzzdetect's --framehop_prop 1 is 0.96 s, 0.5 is 0.48 s",
    )
    _add_detection_options(
        parser,
        threshold_help="add a detections_CLASS column (activation > VALUE); repeatable; with "
        "several --model, MODEL/CLASS=VALUE for a class that more than one has",
    )
    conflict = parser.add_mutually_exclusive_group()
    conflict.add_argument(
        "--resume", action="store_true", help="finish the run already in --output"
    )
    conflict.add_argument(
        "--new",
        action="store_true",
        help="if --output holds results, write to OUTPUT-<time> instead",
    )
    parser.add_argument(
        "--memory-budget",
        metavar="BYTES",
        help=(
            f"decoded audio in flight, e.g. 2GiB ({default_of('memory-budget')}); TensorFlow and "
            "the processes take about 1 GiB more, whatever the budget"
        ),
    )
    parser.add_argument(
        "--batch-frames",
        type=int,
        metavar="N",
        help=(
            f"frames per score task and embedder call ({default_of('batch-frames')}; on a CPU, "
            "calls of at most buzzdask.cpu-call-frames)"
        ),
    )
    parser.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use a running Dask scheduler instead of a local cluster",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="a line per chunk (decoding/scoring/written <file> [start–end]), and Dask's warnings",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="everything TensorFlow, absl, gRPC and Dask log, local workers' stderr included",
    )


def _add_analyze_parser(commands: argparse._SubParsersAction) -> None:
    analyze = commands.add_parser("analyze", help="score audio files and write Parquet")
    analyze.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files or directories")
    _add_run_options(analyze)
    analyze.add_argument(
        "--chunk-seconds",
        type=float,
        metavar="SECONDS",
        help=f"audio per decode task ({default_of('chunk-seconds')})",
    )
    analyze.add_argument(
        "--keep-embeddings",
        nargs="?",
        const=True,
        default=False,
        metavar="STORE",
        help="keep the embeddings in an embedding store (default OUTPUT/embeddings; the "
        "training's embedding-cache works too), so that `buzzdask rescore` can score them with "
        "another head without the audio; chunks already there are not decoded again",
    )
    _add_watch_options(analyze)


def _add_rescore_parser(commands: argparse._SubParsersAction) -> None:
    rescore = commands.add_parser(
        "rescore",
        help="score the embeddings an analysis kept with other heads (no audio, no embedder)",
    )
    rescore.add_argument(
        "store", metavar="STORE", help="an embedding store (an analysis' OUTPUT/embeddings)"
    )
    _add_run_options(rescore, from_store=True)


def _add_watch_options(analyze: argparse.ArgumentParser) -> None:
    """``--watch`` and the options that only apply with it."""
    analyze.add_argument(
        "--watch",
        action="store_true",
        help="keep analysing files as they arrive in the one INPUT directory, until the "
        "transfer-complete marker or the idle timeout",
    )
    analyze.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="with --watch: stop after this long without new or changed files "
        f"({default_of('watch.idle-timeout-seconds')})",
    )
    analyze.add_argument(
        "--poll",
        type=float,
        metavar="SECONDS",
        help="with --watch: seconds between looks at the input "
        f"({default_of('watch.poll-seconds')})",
    )


def _add_init_parser(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser("init", help="create the project directory layout")
    init.add_argument("directory", help="project directory")
    status = commands.add_parser(
        "status",
        help="where a run stands: running, finished, stopped or killed; how far; what next",
    )
    status.add_argument("outputs", nargs="+", metavar="OUTPUT", help="a run's output directory")


def _add_transfer_parser(commands: argparse._SubParsersAction) -> None:
    transfer = commands.add_parser(
        "transfer", help="copy recordings from an rclone remote in batches, or --upload results"
    )
    transfer.add_argument(
        "source", help="rclone remote path, e.g. teams:Recordings (with --upload: local directory)"
    )
    transfer.add_argument("destination", help="local directory (with --upload: rclone remote path)")
    transfer.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"files per rclone call ({default_of('transfer.batch-size')})",
    )
    transfer.add_argument(
        "--upload", action="store_true", help="send the local SOURCE directory to DESTINATION"
    )


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train a detector head on labelled audio; write a model directory"
    )
    train.add_argument(
        "audio_dirs", nargs="+", metavar="AUDIO_DIR", help="directories the labels' files are in"
    )
    train.add_argument(
        "--labels",
        required=True,
        action="append",
        help="CSV of labelled segments: file,start,end,label[,group]; repeatable (one per "
        "annotator: read as one table)",
    )
    train.add_argument("--output", required=True, help="model directory to write (new or empty)")
    train.add_argument(
        "--ambient",
        action="append",
        default=[],
        metavar="DIR",
        help="directory whose every frame is ambient; repeatable",
    )
    train.add_argument(
        "--unlabeled-ambient",
        type=int,
        metavar="N",
        help="unlabeled frames drawn per labelled file as ambient "
        f"({default_of('train.unlabeled-ambient')})",
    )
    train.add_argument(
        "--holdout",
        action="append",
        metavar="GROUP",
        help="group held out for early stopping and evaluation; repeatable "
        "(default: a seeded 20%% of the groups)",
    )
    train.add_argument(
        "--embedder", help="embedder handle: TF Hub URL or local SavedModel directory"
    )
    train.add_argument(
        "--framehop",
        type=float,
        metavar="SECONDS",
        help=f"seconds between frames ({default_of('train.frame-hop-seconds')})",
    )
    train.add_argument(
        "--epochs", type=int, metavar="N", help=f"most epochs ({default_of('train.epochs')})"
    )
    train.add_argument(
        "--seed",
        type=int,
        help=f"seed of the draws and of TensorFlow ({default_of('train.seed')})",
    )
    train.add_argument(
        "--cache-dir", metavar="DIR", help="embedding cache (default ./embedding-cache)"
    )
    train.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use a running Dask scheduler instead of a local cluster",
    )


def _add_embedder_parser(commands: argparse._SubParsersAction) -> None:
    embedder = commands.add_parser("embedder", help="manage embedders (download ahead of a run)")
    actions = embedder.add_subparsers(dest="action", required=True)
    fetch = actions.add_parser(
        "fetch",
        help="download an embedder into the cache (on a machine with internet, e.g. a login "
        "node), so runs on offline compute nodes find it",
    )
    fetch.add_argument(
        "handle",
        nargs="?",
        metavar="HANDLE",
        help="TF Hub URL, or an embedder's name (default: the configured handle of --name)",
    )
    fetch.add_argument(
        "--name", default="yamnet_k2", help="embedder in buzzdask.embedders (default yamnet_k2)"
    )


def _classes(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected class names separated by commas, got {text!r}")
    return names


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="write a run's scores as buzzdetect CSVs, one CSV or Raven tables"
    )
    export.add_argument("output", metavar="OUTPUT", help="the output directory of a run")
    export.add_argument(
        "--format",
        required=True,
        choices=["buzzdetect", "csv", "raven"],
        help="buzzdetect: one <recording>_buzzdetect.csv per recording (what buzzr reads); "
        "csv: one combined frames.csv; raven: a Raven Pro selection table per recording",
    )
    export.add_argument("--dest", metavar="DIR", help="default: OUTPUT/export/FORMAT")
    export.add_argument(
        "--classes",
        type=_classes,
        action="extend",
        metavar="A,B",
        help="only these classes (default: all); repeatable",
    )
    _add_detection_options(
        export,
        threshold_help="detections: activation > VALUE; repeatable (default for csv and raven: "
        "the run's own thresholds; buzzdetect: activations only)",
        of_a_run=True,
    )
    export.add_argument(
        "--gap-frames",
        type=int,
        default=0,
        metavar="N",
        help="raven: most frames below the threshold bridged inside one event (default 0)",
    )
    export.add_argument(
        "--min-frames",
        type=int,
        default=1,
        metavar="N",
        help="raven: fewest frames of an event (default 1)",
    )
    _add_start_time_options(export, applies_to="csv: ")
    export.add_argument(
        "--overwrite", action="store_true", help="replace export files that already exist"
    )


def _export(args: argparse.Namespace) -> int:
    from buzzdask.exports import export
    from buzzdask.inputs import first_names

    result = export(
        args.output,
        format=args.format,
        dest=args.dest,
        classes=args.classes,
        precision=args.precision,
        thresholds=args.threshold,
        model=args.model,
        gap_frames=args.gap_frames,
        min_frames=args.min_frames,
        time_format=args.time_format,
        tz=args.tz,
        read_metadata=not args.no_metadata,
        overwrite=args.overwrite,
    )
    used = ", ".join(f"{name} > {value:g}" for name, value in result.thresholds.values.items())
    print(
        f"buzzdask: exported {len(result.files)} file(s) -> {result.dest}"
        + (f" (detections: {used})" if used else "")
    )
    if result.untimed:
        print(
            f"buzzdask: no start time for {len(result.untimed)} recording(s), time left blank: "
            + first_names(result.untimed, shown=5),
            file=sys.stderr,
        )
    return EXIT_OK


def _by(text: str) -> int | list[int] | str | None:
    """``--by``: ``file``, ``all`` or folder levels (``1``, ``1,2``)."""
    if text in ("file", "all"):
        return None if text == "all" else text
    try:
        levels = [int(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(
            f"expected file, all, or folder levels such as 1 or 1,2 (1 = top folder), got {text!r}"
        )
    return levels[0] if len(levels) == 1 else levels


def _add_binning_options(parser: argparse.ArgumentParser, *, by_default: str) -> None:
    """The options ``summarize`` and ``plot`` share: bins, groups, thresholds, start times."""
    parser.add_argument("output", metavar="OUTPUT", help="the output directory of a run")
    parser.add_argument(
        "--bin",
        default="5min",
        metavar="WIDTH",
        help="bin width: 5min, 20min, 1h... (default 5min)",
    )
    parser.add_argument(
        "--by",
        type=_by,
        default=_by(by_default),
        metavar="LEVEL|file|all",
        help="groups: a folder level of the recordings' paths (1 = top folder, e.g. the site; "
        f"1,2 for two levels; a recording with no folder there is in group '.'), file, or all "
        f"(default {by_default})",
    )
    _add_detection_options(
        parser,
        threshold_help="detections: activation > VALUE; repeatable "
        "(default: the run's own thresholds)",
        of_a_run=True,
    )
    parser.add_argument(
        "--dest", metavar="DIR", help="where the files go (default OUTPUT/summaries)"
    )
    _add_start_time_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def _add_start_time_options(parser: argparse.ArgumentParser, *, applies_to: str = "") -> None:
    """Where recordings' start times come from (``summarize``, ``plot``, ``export``)."""
    parser.add_argument(
        "--time-format",
        action="append",
        metavar="FORMAT",
        help=f"{applies_to}how names spell the start time: strptime (%%y%%m%%d_%%H%%M) or a "
        "regex with named groups year, month, day[, hour, minute, second]; repeatable "
        "(default: AudioMoth and buzzr's formats)",
    )
    parser.add_argument(
        "--tz",
        metavar="ZONE",
        help=f"{applies_to}time zone, e.g. America/New_York (default: local clock)",
    )
    parser.add_argument(
        "--no-metadata",
        action="store_true",
        help=f"{applies_to}do not read AudioMoth comments or GUANO timestamps from the WAV files",
    )


def _add_summarize_parser(commands: argparse._SubParsersAction) -> None:
    summarize = commands.add_parser(
        "summarize",
        help="frames, detections and detection rates per group and time bin (Parquet and CSV)",
    )
    _add_binning_options(summarize, by_default="file")


def _add_plot_parser(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser(
        "plot",
        help="PNGs: detection rate over the time of day per group, one recording's activation",
    )
    _add_binning_options(plot, by_default="1")
    plot.add_argument(
        "--recording",
        action="append",
        metavar="RELATIVE",
        help="recording whose activation is drawn, as in the file column; repeatable "
        "(default: the first)",
    )


def _binning(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "bin": args.bin,
        "by": args.by,
        "precision": args.precision,
        "thresholds": args.threshold or None,
        "model": args.model,
        "dest": args.dest,
        "overwrite": args.overwrite,
        "time_format": args.time_format,
        "tz": args.tz,
        "read_metadata": not args.no_metadata,
    }


def _summarize(args: argparse.Namespace) -> int:
    from buzzdask.summaries import summarize

    table = summarize(args.output, **_binning(args))
    used = ", ".join(f"{name} > {value:g}" for name, value in table.attrs["thresholds"].items())
    print(
        f"buzzdask: {len(table)} bins of {table.attrs['bin']} (detections: {used}) -> "
        + ", ".join(table.attrs["paths"].values())
    )
    return EXIT_OK  # recordings without a start time: the summary's own warning said which


def _plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only: never look for a display
    from buzzdask.plots import plot_run

    for path in plot_run(args.output, recordings=args.recording, **_binning(args)):
        print(f"buzzdask: wrote {path}")
    return EXIT_OK


def _one_blas_thread() -> None:
    """One thread for numpy's BLAS in the command's process, unless the user set otherwise.

    As Dask's nanny gives its workers, and before anything here imports numpy. The command does
    no linear algebra of its own (a re-scoring's NumPy heads run on one thread anyway,
    :func:`buzzdask.session.connect`), and OpenBLAS starts a thread per core, each spinning
    0.1 s as numpy is imported: on two cores, 0.1 of the 0.8 CPU-s this process takes for a
    7-second file.
    """
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def main(argv: Sequence[str] | None = None, *, client: Client | None = None) -> int:
    """Run the command line; return the exit code.

    ``client`` is the cluster an ``analyze`` command runs on, overriding ``--scheduler``
    (``python -m buzzdask.cluster ... analyze ...`` passes the SLURM cluster's client). Its
    output going unread (``| head``, a closed terminal) does not stop it.
    """
    from buzzdask.progress import console_outlives_its_reader

    with console_outlives_its_reader():
        return _run(argv, client=client)


@reports_errors
def _run(argv: Sequence[str] | None, *, client: Client | None) -> int:
    from buzzdask.config import check_dask_config

    check_dask_config()
    args = build_parser().parse_args(argv)
    if args.command in _AFTER_STOP:
        _stopping["after"] = _AFTER_STOP[args.command]
        if getattr(args, "new", False):  # not the same command: it would start yet another
            _stopping["after"] = (
                "what was written is kept: finish the run with --resume and --output set to "
                'the directory named above ("writing to ..."), instead of --new; with none '
                "named, nothing was written: run the same command again"
            )
    # The command's process ends when it returns: its last garbage collection would only delay
    # the exit (0.3 s with pandas, Dask and pyarrow loaded).
    skip_final_collection()
    _one_blas_thread()
    if args.command not in ("init", "analyze", "rescore", "train"):  # those set theirs below
        from buzzdask.progress import console_lines

        # The library's warnings (a recording without a start time, damaged training audio)
        # as the command's own lines, not Python's bare last-resort ones; a transfer's batches
        # as they land (hours, for a season).
        console_lines(logging.INFO if args.command == "transfer" else logging.WARNING)
    if args.command == "init":
        from buzzdask.project import init_project

        created = init_project(args.directory)
        for readme in created:
            print(f"created {readme}")
        if not created:
            print(f"{args.directory} has the project layout already: nothing created")
        return EXIT_OK
    if args.command == "status":
        return _status(args.outputs)
    if args.command == "transfer":
        return _transfer(args)
    if args.command == "train":
        return _train(args)
    if args.command == "embedder":
        return _embedder(args)
    if args.command == "export":
        return _export(args)
    if args.command == "summarize":
        return _summarize(args)
    if args.command == "plot":
        return _plot(args)
    if args.command == "analyze" and args.watch:
        if len(args.inputs) != 1:
            build_parser().error("--watch takes exactly one INPUT directory")
        if len(args.model) != 1:
            build_parser().error("--watch takes one --model")
    elif args.command == "analyze" and (args.poll is not None or args.idle_timeout is not None):
        given = "--poll" if args.poll is not None else "--idle-timeout"
        build_parser().error(f"{given} applies to --watch only: add --watch, or leave it out")
    if args.command == "analyze":
        try:
            refuse_an_input_as_the_store(args, sys.argv[1:] if argv is None else argv)
        except BuzzdaskError as error:
            build_parser().error(str(error))
    from buzzdask.logs import configure_console

    # Before anything loads TensorFlow or starts workers, which inherit it.
    configure_console(2 if args.debug else 1 if args.verbose else 0)
    from buzzdask import analyze, rescore

    # One --model: its output is OUTPUT itself; several: OUTPUT/<model name> each.
    model = args.model[0] if len(args.model) == 1 else args.model
    options = {
        "output": args.output,
        "client": client if client is not None else args.scheduler,
        "embedder": args.embedder,
        "frame_hop_s": args.framehop,
        "thresholds": args.threshold,
        "precision": args.precision,
        "on_conflict": "resume" if args.resume else "new" if args.new else "error",
        "memory_budget": args.memory_budget,
        "batch_frames": args.batch_frames,
        "progress": not args.no_progress,
        "verbose": args.verbose or args.debug,
    }
    if args.command == "rescore":
        result = rescore(args.store, model, **options)
    elif args.watch:
        from buzzdask.watching import watch  # pandas: not on a plain analysis' start

        result = watch(
            args.inputs[0],
            model,
            poll_seconds=args.poll,
            idle_timeout_s=args.idle_timeout,
            chunk_seconds=args.chunk_seconds,
            keep_embeddings=args.keep_embeddings,
            **options,
        )
    else:
        result = analyze(
            args.inputs,
            model,
            chunk_seconds=args.chunk_seconds,
            keep_embeddings=args.keep_embeddings,
            **options,
        )
    results = result if isinstance(result, dict) else {"": result}
    code = max(_report(one) for one in results.values())
    if getattr(args, "watch", False) and result.summary["watch"]["stopped"] == "transfer failed":
        return EXIT_ERROR  # what arrived is analysed, but not all that was meant to
    return code


def refuse_an_input_as_the_store(analyze: argparse.Namespace, argv: Sequence[str]) -> None:
    """Refuse ``--keep-embeddings STORE`` where STORE holds audio: an INPUT taken as the store.

    ``analyze --keep-embeddings audio_a/ audio_b/ ...`` reads ``audio_a/`` as the store (the
    option's value is optional), which would leave it unanalysed and write embeddings into it.
    ``--keep-embeddings=STORE`` says the store is meant: it is taken as given.

    Parameters
    ----------
    analyze : argparse.Namespace
        The parsed ``analyze`` command.
    argv : sequence of str
        Its words, as given.

    Raises
    ------
    ParameterError
        If STORE holds audio and was given as a word of its own.
    """
    from buzzdask.inputs import scan
    from buzzdask.settings import load_settings

    store = analyze.keep_embeddings
    if not isinstance(store, str) or any(w.startswith("--keep") and "=" in w for w in argv):
        return
    if os.path.exists(store) and scan([store], extensions=load_settings().extensions).files:
        raise ParameterError(
            f"--keep-embeddings {store}: {store} holds audio, so it was taken for an INPUT "
            "given after the option: put --keep-embeddings after the inputs, or write "
            f"--keep-embeddings={store} if it is the embedding store"
        )


def _report(result: Any) -> int:
    """Print a run's one-line summary and its problems; its exit code."""
    import pandas as pd

    from buzzdask.inputs import first_names
    from buzzdask.progress import (
        PROBLEMS_SHOWN,
        format_audio,
        format_count,
        format_factor,
        one_line,
    )
    from buzzdask.write import OutputLayout

    summary = result.summary
    done_before = summary["chunks_skipped_resume"]
    if summary["chunks_written"] == 0 and done_before:  # a resume of a finished run
        work = f"nothing left to analyse ({format_count(done_before, 'chunk')} done before)"
    else:
        # A watch's wall time is mostly waiting for files: its speed is over its passes.
        analysing = summary.get("analysing_seconds")
        busy = "" if analysing is None else f", {analysing:.1f} s of it analysing"
        # A resume's audio and speed are its own: what earlier runs wrote is said apart.
        before = f", {format_count(done_before, 'chunk')} done before" if done_before else ""
        work = (
            f"{format_audio(summary['audio_hours'] * 3600)} of audio "
            f"in {summary['wall_seconds']:.1f} s{busy} "
            f"({format_factor(summary['realtime_factor'])} realtime{before})"
        )
    failed = f" ({summary['files_failed']} failed)" if summary["files_failed"] else ""
    print(
        f"buzzdask: {summary['files_done']}/{summary['files']} files{failed}, {work} "
        f"-> {result.dataset}"
    )
    # One line for the chunks of a file that failed for the same reason (a file deleted mid-run).
    said = 0
    rows = result.errors.groupby(["file", "reason", "kept"], sort=False, dropna=False)["chunk"]
    for (file, reason, kept), chunks in itertools.islice(rows, PROBLEMS_SHOWN):
        numbers = [str(chunk) for chunk in sorted(chunk for chunk in chunks if not pd.isna(chunk))]
        where = ""
        if numbers:
            where = f" chunk{'s' if len(numbers) > 1 else ''} {first_names(numbers, shown=5)}"
        # A kept row's frames are written (damaged audio, a file cut short): not a failure.
        label = "warning" if kept else "failed"
        print(one_line(f"buzzdask: {label}: {file}{where}: {reason}"), file=sys.stderr)
        said += len(chunks)
    if len(result.errors) > said:
        more = len(result.errors) - said
        every = OutputLayout(result.output).errors
        print(f"buzzdask: ... and {more} more, every one in {every}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FILES_FAILED


def _status(outputs: Sequence[str]) -> int:
    """Each output's status; one that holds no run is said and the others go on (exit 1)."""
    from buzzdask.status import run_status

    code = EXIT_OK
    for output in outputs:
        try:
            statuses = run_status(output)
        except BuzzdaskError as error:
            print(f"buzzdask: error: {_in_flags(error)}", file=sys.stderr)
            code = EXIT_ERROR
            continue
        for status in statuses:
            print(status.describe())
    return code


def _transfer(args: argparse.Namespace) -> int:
    from dask.utils import format_bytes

    from buzzdask.inputs import first_names
    from buzzdask.progress import format_count
    from buzzdask.rclone import transfer, upload

    if args.upload:
        if args.batch_size is not None:  # taken without a word, as if it did something
            build_parser().error(
                "--batch-size applies to downloads (files per rclone call, each batch "
                "analysable as it lands); an upload is one rclone call"
            )
        result = upload(args.source, args.destination)
    else:
        result = transfer(args.source, args.destination, batch_size=args.batch_size)
    left_out = result.left_out
    print(
        f"buzzdask: {format_count(len(result.files), 'file')} ({format_bytes(result.bytes)}) in "
        f"{format_count(result.batches, 'batch', 'batches')} -> {result.destination}"
        + (f"; {len(result.skipped)} already there" if result.skipped else "")
        + (
            f"; left out (not audio, or hidden): {first_names(left_out, shown=3)}"
            if left_out
            else ""
        )
    )
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from buzzdask import train
    from buzzdask.logs import configure_console
    from buzzdask.progress import format_count

    # Before the workers start, or TensorFlow loads here to fit the head.
    configure_console(0)

    result = train(
        args.labels[0] if len(args.labels) == 1 else args.labels,
        args.audio_dirs,
        output=args.output,
        client=args.scheduler,
        ambient_dirs=args.ambient,
        unlabeled_ambient=args.unlabeled_ambient,
        holdout=args.holdout,
        embedder=args.embedder,
        frame_hop_s=args.framehop,
        epochs=args.epochs,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    summary, cache = result.summary, result.summary["embedding_cache"]
    print(
        f"buzzdask: trained {format_count(len(result.classes), 'class', 'classes')} on "
        f"{summary['frames_train']} frames, {summary['frames_holdout']} more held out, "
        f"{format_count(summary['epochs'], 'epoch')}, "
        f"{cache['frames_cached']} frames from the cache, {cache['frames_embedded']} embedded "
        f"-> {result.output}"
    )
    target = result.metadata["settings"]["target_precision"]
    for row in result.evaluation.to_dict(orient="records"):
        if not row["positives"]:
            said = "no frames of it in the held-out groups to measure it on"
        elif not row["negatives"]:
            said = (
                "no held-out frame without it, so no precision to measure: the held-out groups "
                "need audio without it (--unlabeled-ambient N draws it from their files, or "
                "label more of them; --ambient folders always train)"
            )
        elif row["threshold"] != row["threshold"]:  # NaN: no threshold reaches the target
            said = (
                f"no threshold reaches precision {target:g} on its {row['positives']} frames "
                "in the held-out groups"
            )
        else:
            said = (
                f"threshold {row['threshold']:g} gives precision {row['precision']:.2f}, "
                f"recall {row['recall']:.2f} on the held-out groups"
            ) + _precision_row_missing(result.output, row, target)
        print(f"buzzdask: {row['class']}: {said}")
    return EXIT_OK


def _precision_row_missing(model: os.PathLike[str], row: dict[str, Any], target: float) -> str:
    """What to analyse with where ``--precision target`` will find no metrics row for the class.

    buzzdetect's rule takes rows within 0.005 of the precision; a small held-out set may give
    none (0.92, then 1.0), though a threshold reaches it.
    """
    from buzzdask.thresholds import METRICS_CLASS, thresholds_for_precision

    if row["class"] != METRICS_CLASS:
        return ""
    try:
        thresholds_for_precision(model, target)
    except ParameterError:
        return (
            f"; analyze --precision {target:g} finds no tests/metrics.csv row near it on so "
            f"few held-out frames: analyze with --threshold {METRICS_CLASS}={row['threshold']:g}"
        )
    return ""


def _exists(path: Path | None) -> bool:
    return path is not None and path.exists()


def _embedder(args: argparse.Namespace) -> int:
    from buzzdask.embedders import is_remote, local_path
    from buzzdask.errors import ParameterError
    from buzzdask.models import resolve_embedder
    from buzzdask.settings import load_settings

    name, handle = args.name, args.handle
    known = load_settings().embedders
    if handle in known and not os.path.exists(handle):
        name, handle = handle, None  # an embedder's name (`fetch yamnet_k2`): its handle
    elif handle is not None and not is_remote(handle) and not _exists(local_path(handle)):
        raise ParameterError(
            f"{handle!r} is neither a TF Hub URL, nor an embedder's name "
            f"({', '.join(known)}), nor a directory"
        )
    spec = resolve_embedder(name, handle=handle, fetching=True)
    print(f"buzzdask: embedder {spec.source or spec.handle} is in {spec.handle}")
    print(
        f"buzzdask: use it with --embedder {spec.handle}, or set "
        f"buzzdask.embedders.{name}.handle: {spec.handle}"
        + (" (runs given the URL find it there too)" if spec.source else "")
    )
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
