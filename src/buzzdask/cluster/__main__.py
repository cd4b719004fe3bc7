r"""``python -m buzzdask.cluster``: start a cluster, then analyse on it or hold it for a notebook.

    python -m buzzdask.cluster --config osc-cardinal --account PAS1234 --gpus 2 --cpu-workers 8 \\
        analyze field_audio/ --model general_v3 --output results/

starts the worker jobs, prints the dashboard (and how to reach it), runs ``buzzdask analyze`` on
them, cancels the jobs and exits with analyze's exit code. Without ``analyze ...`` it prints the
scheduler address for ``Client(address)`` and holds the cluster until Ctrl-C or SIGTERM.
``--print-job-script`` prints the worker job scripts it would submit, and submits nothing;
``--print-batch-script`` prints one sbatch script that runs the whole analysis inside a single
job (scheduler, client and workers as its tasks: see :mod:`buzzdask.cluster.batch`);
``--config osc-cardinal-node`` makes that job one whole GPU node.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from dask.utils import parse_bytes

from buzzdask.cli import EXIT_OK, default_of, reports_errors
from buzzdask.cluster.options import ACCOUNT_PLACEHOLDER, JobOptions, job_kinds
from buzzdask.errors import InputError, ModelError
from buzzdask.progress import console_lines

if TYPE_CHECKING:
    from buzzdask.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m buzzdask.cluster``."""
    parser = argparse.ArgumentParser(
        prog="python -m buzzdask.cluster",
        description="Start a Dask cluster (SLURM jobs or local) and analyse on it.",
    )
    parser.add_argument(
        "--config",
        default="local",
        help="cluster configuration: a name in cluster_configs/ or a YAML path (default local)",
    )
    parser.add_argument(
        "--gpus",
        type=int,
        help="GPU scorer workers, one GPU each (default: the configuration's gpus, else 0)",
    )
    parser.add_argument(
        "--cpu-workers",
        type=int,
        help="CPU decode workers (default: the configuration's cpu-workers, else 1)",
    )
    JobOptions.add_arguments(parser)
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"seconds to wait for the workers ({default_of('cluster-wait-seconds')})",
    )
    parser.add_argument(
        "--print-job-script",
        action="store_true",
        help="print the batch scripts that would be submitted, and exit",
    )
    parser.add_argument(
        "--print-batch-script",
        action="store_true",
        help="print an sbatch script running the whole analysis inside one job (within one node;"
        " its log directory is created), and exit",
    )
    parser.add_argument("--in-job", action="store_true", help=argparse.SUPPRESS)
    # The batch script's plan for its worker tasks: GPU,CPU threads and memory limits.
    parser.add_argument("--worker-threads", type=_pair(int), help=argparse.SUPPRESS)
    parser.add_argument("--worker-memory", type=_pair(parse_bytes), help=argparse.SUPPRESS)
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="optional: analyze INPUT... --model M --output O [options of buzzdask analyze]",
    )
    return parser


def _pair(convert: Callable[[str], int]) -> Callable[[str], tuple[int, int]]:
    """An argparse type for ``GPU,CPU`` (``8,13``, ``72GiB,54GiB``)."""

    def parse(text: str) -> tuple[int, int]:
        first, second = text.split(",")
        return convert(first), convert(second)

    return parse


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m buzzdask.cluster``; return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command and args.command[0] != "analyze":
        parser.error(f"unknown command {args.command[0]!r}: only 'analyze ...' can follow")
    from buzzdask import cli
    from buzzdask.cluster import dashboard_hints, job_scripts, start
    from buzzdask.cluster.configs import load_cluster_config, worker_counts
    from buzzdask.logs import quiet_environment

    verbosity = 0
    if args.command:  # check analyze's options before any job is submitted
        own = {flag for action in parser._actions for flag in action.option_strings} - {
            "-h",
            "--help",
        }
        misplaced = [word for word in args.command if word.split("=")[0] in own]
        if misplaced:
            parser.error(
                f"{misplaced[0].split('=')[0]} is an option of python -m buzzdask.cluster: "
                "give it before 'analyze'"
            )
        analyze = cli.build_parser().parse_args(args.command)
        verbosity = 2 if analyze.debug else 1 if analyze.verbose else 0
    quiet_environment(verbosity)  # before the cluster starts: its chatter too
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout {args.timeout:g}: give the seconds to wait, > 0")
    options = JobOptions.keywords(args)
    # Its buzzdask.* keys (check-gpus) hold here, in a batch job's tasks too; its entry names
    # the dashboard proxy and may give the worker counts (a layout such as osc-cardinal-node).
    entry = load_cluster_config(args.config)
    gpus, cpu_workers = worker_counts(entry, gpus=args.gpus, cpu_workers=args.cpu_workers)
    if args.in_job:  # a task of the --print-batch-script job
        from buzzdask.cluster.batch import WorkerShare, run_in_job

        if args.worker_threads is None or args.worker_memory is None:
            parser.error("--in-job needs the script of --print-batch-script: print it again")
        gpu_threads, cpu_threads = args.worker_threads
        gpu_memory, cpu_memory = args.worker_memory
        return run_in_job(
            args.command,
            gpus=gpus,
            gpu=WorkerShare(gpu_threads, gpu_memory),
            cpu=WorkerShare(cpu_threads, cpu_memory),
            entry=entry,
        )
    if args.print_batch_script:
        if not args.command:
            parser.error("--print-batch-script needs the analyze ... command to run")
        from buzzdask.cluster.batch import batch_script

        # The script goes to sbatch next: refuse a bad value now.
        settings = _analyze_settings(analyze)
        try:
            _check_sources(analyze, settings, args.command)
        except (InputError, ModelError) as error:
            # Only a warning: the script may be printed to be read, or before the audio arrives.
            # The job runs from here (--chdir) and would stop on this as it starts.
            print(f"buzzdask: warning: the job would stop at its start: {error}", file=sys.stderr)
        script = batch_script(
            args.config, args.command, gpus=gpus, cpu_workers=cpu_workers, **options
        )
        print(script, end="")
        return EXIT_OK
    if args.print_job_script:
        scripts = job_scripts(args.config, gpus=gpus, **options)
        for kind, script in scripts.items():
            print(f"# ---- {kind} worker job ----\n{script}")
        if any(f"-A {ACCOUNT_PLACEHOLDER}" in script for script in scripts.values()):
            print(
                f"buzzdask: no account given: the scripts show -A {ACCOUNT_PLACEHOLDER}; "
                "submitting them needs --account PAS1234 (your OSC project)",
                file=sys.stderr,
            )
        return EXIT_OK
    if args.command:
        # The account first, as start() checks it; then what analyze would refuse.
        JobOptions(**options).require_account(entry, job_kinds(gpus))
        _check_before_jobs(analyze, args.command)
    if not gpus and entry["kind"] == "slurm":  # a local cluster has no GPU workers to ask for
        given = "--gpus 0" if args.gpus is not None else "add --gpus N for GPU workers"
        print(f"buzzdask: no GPU workers ({given}): scorers run on the CPU workers")
    if entry["kind"] == "slurm":
        # The queue may hold the jobs for minutes: not a silent console meanwhile. The
        # warnings of the wait (the jobs' states) go to it as buzzdask's lines.
        console_lines((logging.WARNING, logging.INFO, logging.DEBUG)[verbosity])
        wanted = f"{gpus} GPU and {cpu_workers} CPU" if gpus else f"{cpu_workers} CPU"
        print(
            f"buzzdask: submitting {wanted} worker job(s) ({args.config}); their workers join "
            "when SLURM starts them (squeue -u $USER)",
            flush=True,
        )
    client = start(args.config, gpus=gpus, cpu_workers=cpu_workers, timeout=args.timeout, **options)
    try:
        assert client.scheduler is not None  # connected
        print(f"buzzdask: scheduler at {client.scheduler.address}")
        for line in dashboard_hints(client, args.config):
            print(f"buzzdask: {line}")
        sys.stdout.flush()
        if args.command:
            return cli.main(args.command, client=client)
        print("buzzdask: in Python: Client(<scheduler address above>); Ctrl-C stops the cluster")
        _wait_for_stop()
        return EXIT_OK
    finally:
        client.shutdown()


def _check_before_jobs(analyze: argparse.Namespace, argv: Sequence[str]) -> None:
    """Refuse what ``analyze`` (its words ``argv``) would refuse at once, before any job waits.

    Hours, on a GPU partition: a bad setting or option value, inputs that are missing or hold
    no audio, a model not found, an output another live run holds (a watch job), an output
    holding results without ``--resume`` or ``--new``.
    """
    from buzzdask.inputs import user_path
    from buzzdask.lock import refuse_if_in_use
    from buzzdask.write import OutputLayout, refuse_results

    settings = _analyze_settings(analyze)
    _check_sources(analyze, settings, argv)
    output = user_path(analyze.output)
    if not analyze.new:  # --new writes beside a held output, as analyze does
        refuse_if_in_use(output, stale_s=settings.lock_stale_seconds, resuming=analyze.resume)
    if not (analyze.resume or analyze.new) and len(analyze.model) == 1:
        refuse_results(OutputLayout(output))


def _check_sources(analyze: argparse.Namespace, settings: Settings, argv: Sequence[str]) -> None:
    """Refuse inputs that are missing or hold no audio, and a model not found (from here).

    Also an INPUT taken as the store of ``--keep-embeddings``
    (:func:`buzzdask.cli.refuse_an_input_as_the_store`).
    """
    from buzzdask import cli
    from buzzdask.inputs import scan
    from buzzdask.models import find_model_dir

    cli.refuse_an_input_as_the_store(analyze, argv)
    # A watched folder may be made and filled later (a transfer makes it).
    if not (analyze.watch and not os.path.exists(analyze.inputs[0])):
        found = scan(analyze.inputs, extensions=settings.extensions)
        if not analyze.watch:
            found.require_audio()
    for model in analyze.model:
        find_model_dir(model, settings.model_dirs)


def _analyze_settings(analyze: argparse.Namespace) -> Settings:
    """The settings ``analyze`` would run with, checked (a bad value or flag: ParameterError)."""
    from buzzdask.settings import load_settings

    return load_settings(
        chunk_seconds=analyze.chunk_seconds,
        memory_budget=analyze.memory_budget,
        batch_frames=analyze.batch_frames,
    )


def _wait_for_stop() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
