"""The ``buzzdask`` command line: ``analyze``, ``init``, ``--version``.

Exit codes: 0 everything analysed; 1 nothing could start (bad input path, model, option or an
output that already holds results); 2 usage error; 3 the run finished but some files failed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_FILES_FAILED = 0, 1, 2, 3


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
        "--batch-frames", type=int, metavar="N", help="frames per embedder call (default 4096)"
    )
    analyze.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="use a running Dask scheduler instead of a local cluster",
    )
    analyze.add_argument("--no-progress", action="store_true", help="no progress bar")
    analyze.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="a line per chunk: decoding/scoring <file> [start–end]",
    )

    init = commands.add_parser("init", help="create the project directory layout")
    init.add_argument("directory", help="project directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "init":
        from buzzdask.project import init_project

        for readme in init_project(args.directory):
            print(f"created {readme}")
        return EXIT_OK
    # -v lines come from analyze(verbose=True), printed above the progress bar.
    from buzzdask import BuzzdaskError, analyze

    try:
        result = analyze(
            args.inputs,
            args.model,
            output=args.output,
            client=args.scheduler,
            embedder=args.embedder,
            frame_hop_s=args.framehop,
            chunk_seconds=args.chunk_seconds,
            thresholds=dict(args.threshold),
            on_conflict="resume" if args.resume else "new" if args.new else "error",
            memory_budget=args.memory_budget,
            batch_frames=args.batch_frames,
            progress=not args.no_progress,
            verbose=args.verbose,
        )
    except BuzzdaskError as error:
        print(f"buzzdask: error: {error}", file=sys.stderr)
        return EXIT_ERROR
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


if __name__ == "__main__":
    raise SystemExit(main())
