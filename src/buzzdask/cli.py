"""The ``buzzdask`` command line.

Commands: ``analyze`` (``--watch``), ``init``, ``transfer``, ``train``, ``embedder fetch``;
``--version``.

Exit codes: 0 everything analysed; 1 nothing could start (bad input path, model, option or an
output that already holds results); 2 usage error; 3 the run finished but some files failed.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec

from buzzdask.errors import BuzzdaskError, OutputConflictError

if TYPE_CHECKING:
    from distributed import Client

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FILES_FAILED = 0, 1, 2, 3

_P = ParamSpec("_P")


def reports_errors(command: Callable[_P, int]) -> Callable[_P, int]:
    """Wrap a command so that a :class:`~buzzdask.errors.BuzzdaskError` ends it cleanly.

    The error is printed as ``buzzdask: error: <message>`` on stderr, without a traceback, and
    the command returns :data:`EXIT_ERROR`.
    """

    @functools.wraps(command)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> int:
        try:
            return command(*args, **kwargs)
        except BuzzdaskError as error:
            print(f"buzzdask: error: {_in_flags(error)}", file=sys.stderr)
            return EXIT_ERROR

    return run


# analyze's keywords -> its flags, for messages that tell how to pass an earlier setting.
_FLAGS = {
    "model": "--model",
    "embedder": "--embedder",
    "frame_hop_s": "--framehop",
    "chunk_seconds": "--chunk-seconds",
}


def _flag(name: str, value: Any) -> str:
    if name == "thresholds":
        return " ".join(f"--threshold {k}={v}" for k, v in value.items()) or "no --threshold"
    return f"{_FLAGS.get(name, name)} {shlex.quote(str(value))}"


def _in_flags(error: BuzzdaskError) -> str:
    """The message, naming flags where it names the ways on (an output conflict)."""
    if isinstance(error, OutputConflictError):
        from buzzdask.write import OutputConflict, Vocabulary

        conflict = error.args[0] if error.args else None
        if isinstance(conflict, OutputConflict):
            words = Vocabulary(resume="--resume", new="--new", output="--output", option=_flag)
            return conflict.render(words)
    return str(error)


def _threshold(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CLASS=VALUE (e.g. ins_buzz=-1.2), got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document every flag in the README)."""
    from buzzdask import __version__

    parser = argparse.ArgumentParser(
        prog="buzzdask", description="Find bee buzzing in field audio with Dask."
    )
    parser.add_argument("--version", action="version", version=f"buzzdask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_analyze_parser(commands)
    _add_init_parser(commands)
    _add_transfer_parser(commands)
    _add_train_parser(commands)
    _add_embedder_parser(commands)
    return parser


def _add_analyze_parser(commands: argparse._SubParsersAction) -> None:
    analyze = commands.add_parser("analyze", help="score audio files and write Parquet")
    analyze.add_argument("inputs", nargs="+", metavar="INPUT", help="audio files or directories")
    analyze.add_argument(
        "--model", required=True, help="model directory or name in buzzdask.model-dirs"
    )
    analyze.add_argument("--output", required=True, help="output directory")
    analyze.add_argument(
        "--embedder", help="embedder handle: TF Hub URL or local SavedModel directory"
    )
    analyze.add_argument(
        "--framehop",
        type=float,
        metavar="SECONDS",
        help="seconds between frame starts (default: one frame, 0.96)",
    )
    analyze.add_argument(
        "--chunk-seconds", type=float, metavar="SECONDS", help="audio per decode task (default 600)"
    )
    analyze.add_argument(
        "--threshold",
        type=_threshold,
        action="append",
        default=[],
        metavar="CLASS=VALUE",
        help="add a detection_CLASS column (activation >= VALUE); repeatable",
    )
    conflict = analyze.add_mutually_exclusive_group()
    conflict.add_argument(
        "--resume", action="store_true", help="finish the run already in --output"
    )
    conflict.add_argument(
        "--new",
        action="store_true",
        help="if --output holds results, write to OUTPUT-<time> instead",
    )
    analyze.add_argument(
        "--memory-budget", metavar="BYTES", help="decoded audio in flight, e.g. 2GiB (default 1GiB)"
    )
    analyze.add_argument(
        "--batch-frames", type=int, metavar="N", help="frames per embedder call (default 1024)"
    )
    analyze.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use a running Dask scheduler instead of a local cluster",
    )
    _add_watch_options(analyze)
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    analyze.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="a line per chunk (decoding/scoring/written <file> [start–end]), and Dask's warnings",
    )
    analyze.add_argument(
        "--debug",
        action="store_true",
        help="everything TensorFlow, absl, gRPC and Dask log, local workers' stderr included",
    )


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
        help="with --watch: stop after this long without new files (default 3600)",
    )
    analyze.add_argument(
        "--poll",
        type=float,
        metavar="SECONDS",
        help="with --watch: seconds between looks at the input (default 30)",
    )


def _add_init_parser(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser("init", help="create the project directory layout")
    init.add_argument("directory", help="project directory")


def _add_transfer_parser(commands: argparse._SubParsersAction) -> None:
    transfer = commands.add_parser(
        "transfer", help="copy recordings from an rclone remote in batches, or --upload results"
    )
    transfer.add_argument(
        "source", help="rclone remote path, e.g. teams:Recordings (with --upload: local directory)"
    )
    transfer.add_argument("destination", help="local directory (with --upload: rclone remote path)")
    transfer.add_argument(
        "--batch-size", type=int, metavar="N", help="files per rclone call (default 20)"
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
        "--labels", required=True, help="CSV of labelled segments: file,start,end,label[,group]"
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
        help="unlabeled frames drawn per labelled file as ambient (default 0)",
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
        "--framehop", type=float, metavar="SECONDS", help="seconds between frames (default 0.48)"
    )
    train.add_argument("--epochs", type=int, metavar="N", help="most epochs (default 200)")
    train.add_argument("--seed", type=int, help="seed of the draws and of TensorFlow (default 0)")
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
        help="TF Hub URL (default: the configured handle of --name)",
    )
    fetch.add_argument(
        "--name", default="yamnet_k2", help="embedder in buzzdask.embedders (default yamnet_k2)"
    )


@reports_errors
def main(argv: Sequence[str] | None = None, *, client: Client | None = None) -> int:
    """Run the command line; return the exit code.

    ``client`` is the cluster an ``analyze`` command runs on, overriding ``--scheduler``
    (``python -m buzzdask.cluster ... analyze ...`` passes the SLURM cluster's client).
    """
    args = build_parser().parse_args(argv)
    if args.command == "init":
        from buzzdask.project import init_project

        for readme in init_project(args.directory):
            print(f"created {readme}")
        return EXIT_OK
    if args.command == "transfer":
        return _transfer(args)
    if args.command == "train":
        return _train(args)
    if args.command == "embedder":
        return _embedder(args)
    if args.watch and len(args.inputs) != 1:
        build_parser().error("--watch takes exactly one INPUT directory")
    from buzzdask.logs import configure_console

    # Before anything loads TensorFlow or starts workers, which inherit it.
    configure_console(2 if args.debug else 1 if args.verbose else 0)
    from buzzdask import analyze
    from buzzdask.watching import watch

    options = {
        "output": args.output,
        "client": client if client is not None else args.scheduler,
        "embedder": args.embedder,
        "frame_hop_s": args.framehop,
        "chunk_seconds": args.chunk_seconds,
        "thresholds": dict(args.threshold),
        "on_conflict": "resume" if args.resume else "new" if args.new else "error",
        "memory_budget": args.memory_budget,
        "batch_frames": args.batch_frames,
        "progress": not args.no_progress,
        "verbose": args.verbose or args.debug,
    }
    if args.watch:
        result = watch(
            args.inputs[0],
            args.model,
            poll_seconds=args.poll,
            idle_timeout_s=args.idle_timeout,
            **options,
        )
    else:
        result = analyze(args.inputs, args.model, **options)
    summary = result.summary
    print(
        f"buzzdask: {summary['files_done']}/{summary['files']} files, "
        f"{summary['audio_hours']:.3f} audio h in {summary['wall_seconds']:.1f} s "
        f"({summary['realtime_factor'] or 0:.0f}x realtime) -> {result.dataset}"
    )
    for row in result.errors.itertuples():
        chunk = "" if row.chunk is None or row.chunk != row.chunk else f" chunk {row.chunk}"
        print(f"buzzdask: failed: {row.file}{chunk}: {row.reason}", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FILES_FAILED


def _transfer(args: argparse.Namespace) -> int:
    from buzzdask.rclone import transfer, upload

    if args.upload:
        result = upload(args.source, args.destination)
    else:
        result = transfer(args.source, args.destination, batch_size=args.batch_size)
    print(
        f"buzzdask: {len(result.files)} files ({result.bytes} bytes) in {result.batches} "
        f"batch(es) -> {result.destination}"
        + (f"; {len(result.skipped)} already there" if result.skipped else "")
    )
    return EXIT_OK


def _train(args: argparse.Namespace) -> int:
    from buzzdask import train

    result = train(
        args.labels,
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
        f"buzzdask: trained {len(result.classes)} classes on {summary['frames_train']} frames "
        f"({summary['frames_holdout']} held out), {summary['epochs']} epochs, "
        f"{cache['frames_cached']} frames from the cache, {cache['frames_embedded']} embedded "
        f"-> {result.output}"
    )
    for row in result.evaluation.to_dict(orient="records"):
        print(
            f"buzzdask: {row['class']}: threshold {row['threshold']:g} gives precision "
            f"{row['precision']:.2f}, recall {row['recall']:.2f} on the held-out groups"
        )
    return EXIT_OK


def _embedder(args: argparse.Namespace) -> int:
    from buzzdask.models import resolve_embedder

    spec = resolve_embedder(args.name, handle=args.handle)
    print(f"buzzdask: embedder {spec.source or spec.handle} is in {spec.handle}")
    print(
        f"buzzdask: use it with --embedder {spec.handle}, or set "
        f"buzzdask.embedders.{args.name}.handle: {spec.handle}"
        + (" (runs given the URL find it there too)" if spec.source else "")
    )
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
