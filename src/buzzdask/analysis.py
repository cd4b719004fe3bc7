"""``analyze()``: score every frame of the audio under some paths and write partitioned Parquet.

Probe and decode tasks run on CPU workers, score tasks beside the scorer actors
(:mod:`buzzdask.scorers`), driven by the chunk loop of :mod:`buzzdask.pipeline`; each scored
chunk becomes one Parquet partition (:mod:`buzzdask.ledger`, :mod:`buzzdask.write`). This
module checks everything before any work starts and records what the run was: the fingerprint
a resume must match, the metadata and the summary.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from distributed import Client

from buzzdask.config import DEFAULTS
from buzzdask.dashboard_page import RunPublisher
from buzzdask.decode import PREPROCESSING, decode_chunk
from buzzdask.errors import ModelError, ParameterError
from buzzdask.ffmpeg_tools import FFmpegTools, find_ffmpeg
from buzzdask.frames import FrameSpec
from buzzdask.inputs import (
    InputFile,
    describe_skipped,
    first_names,
    named_from,
    scan,
    user_path,
)
from buzzdask.ledger import FileLedger, FileState, HeadOutput
from buzzdask.lock import OutputLock, refuse_if_in_use
from buzzdask.logs import append_to_run_log, quiet_environment, run_log
from buzzdask.models import EmbedderSpec, ModelSpec, resolve_model
from buzzdask.pipeline import ChunkPipeline, outcome, probe_task
from buzzdask.progress import Progress, format_audio, format_count, format_factor
from buzzdask.resume import ResumeCheck, check_resume, earlier_runs, journalled, resume_root
from buzzdask.score import score_chunks
from buzzdask.scorers import ScorerPool
from buzzdask.session import connect, package_versions, peak_rss_by_worker, task_key
from buzzdask.settings import Settings, load_settings
from buzzdask.staging import decode_chunk_staged
from buzzdask.store import EmbeddingStore
from buzzdask.thresholds import (
    ThresholdChoice,
    choose_thresholds,
    require_mapping,
    thresholds_by_model,
)
from buzzdask.write import (
    DECODING_SETTINGS,
    KEPT_EMBEDDINGS,
    PARTITION_BEING_WRITTEN,
    OnConflict,
    OutputLayout,
    PartitionWriter,
    check_run_directory,
    errors_table,
    is_run_directory_entry,
    new_sibling,
    prepare_output,
    utc_now,
    write_errors,
    write_json,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "AnalysisResult",
    "RunInputs",
    "analyze",
    "import_in_background",
    "plan_run",
    "probe_batches",
    "refuse_other_settings",
    "run_plan",
    "say_stopped_after_the_end",
]

logger = logging.getLogger(__name__)
_Item = TypeVar("_Item")

#: What every partition's schema carries of the run's metadata.
_PARTITION_METADATA = ("model", "embedder", "preprocessing", "fingerprint", "started")
#: Most files one probe task reads: a WAV's header takes microseconds, an ffprobe 0.05 CPU-s.
PROBES_PER_TASK = 32


@dataclass
class AnalysisResult:
    """Handle on an analysis' output.

    Attributes
    ----------
    output : Path
        The output directory.
    dataset : Path
        The partitioned Parquet dataset (``output / "scores"``).
    summary : dict
        Files done and failed, audio hours, wall time, realtime factor, peak memory per worker.
    errors : pandas.DataFrame
        One row per problem (:func:`buzzdask.write.errors_table`: file, chunk, stage, reason,
        detail, kept).
    metadata : dict
        The run metadata written to ``buzzdask.json``.

    Notes
    -----
    It is path-like (:func:`os.fspath` gives ``output``): ``buzzdask.summarize(result, ...)``,
    ``export`` and ``plot_run`` take it where they take the output directory.
    """

    output: Path
    dataset: Path
    summary: dict[str, Any]
    errors: pd.DataFrame
    metadata: dict[str, Any]

    def __fspath__(self) -> str:
        return os.fspath(self.output)

    def __repr__(self) -> str:
        # A notebook cell's value: what was done, not the summary's every counter.
        summary = self.summary
        failed = summary.get("files_failed")
        files = f"{summary.get('files_done')}/{summary.get('files')} files"
        # A resume's frames are its own: what earlier runs wrote is said apart.
        before = summary.get("chunks_skipped_resume")
        earlier = f" ({format_count(before, 'chunk')} done before)" if before else ""
        return (
            f"AnalysisResult(output={os.fspath(self.output)!r}: {files}"
            f"{f' ({failed} failed)' if failed else ''}, {summary.get('frames')} frames{earlier}, "
            f"{format_count(len(self.errors), 'error row')}; "
            ".summary, .errors, .to_pandas())"
        )

    @property
    def ok(self) -> bool:
        """True when ``errors`` is empty: no file failed, none was damaged or cut short.

        A damaged or cut-short file's frames are written (its ``kept`` rows, warnings); it
        still makes ``ok`` False, and the command's exit code 3, so that a script notices.
        """
        return self.errors.empty

    def to_pandas(self) -> pd.DataFrame:
        """All frames, sorted by file and start.

        Raises
        ------
        InputError
            If the run wrote no frame (every input failed or was shorter than a frame).
        """
        import pandas as pd

        from buzzdask.results import open_run  # with pandas: not before the cluster starts

        open_run(self.output).require_scores()
        # No hive partitioning: an input folder named "site=A" is a name, not a column; and
        # "_pilot/" or ".x/" is a recording's folder, not metadata (pyarrow skips names starting
        # with "_" or "." by default): only partitions being written are left out.
        frame = pd.read_parquet(
            self.dataset, partitioning=None, ignore_prefixes=[PARTITION_BEING_WRITTEN]
        )
        return frame.sort_values(["file", "start"], ignore_index=True)

    def to_dask(self) -> Any:
        """All frames as a dask DataFrame (one partition per chunk file).

        Raises
        ------
        InputError
            If the run wrote no frame (every input failed or was shorter than a frame).
        """
        from buzzdask.results import open_run

        return open_run(self.output).frames()


@dataclass(frozen=True)
class _Plan:
    """Everything a run was asked to do, checked before any work starts.

    ``models`` share one embedder and frame geometry; ``thresholds`` holds one choice per model.
    ``ffmpeg`` is ``None`` for a re-scoring (:func:`buzzdask.rescore`): no audio is read.
    ``several``: the models were given as a list, and each gets a directory of the output.
    """

    models: tuple[ModelSpec, ...]
    spec: FrameSpec
    frames_per_chunk: int
    thresholds: tuple[ThresholdChoice, ...]
    settings: Settings
    ffmpeg: FFmpegTools | None
    store: EmbeddingStore | None
    several: bool
    store_in_output: bool = False

    @property
    def embedder(self) -> EmbedderSpec:
        """The embedder every model shares."""
        return self.models[0].embedder


@dataclass
class RunInputs:
    """What a run reads and how its files enter the chunk loop.

    ``feed(pipeline, ledger, states)`` starts the files of ``states`` (probe tasks for audio, the
    store's catalog for a re-scoring); ``versions(name)`` gives an input's (size, modification
    time) as journalled, for a resume (``None``: the file on disk under ``root``).
    """

    root: str
    files: list[InputFile]
    described: dict[str, Any]
    feed: Callable[[ChunkPipeline, FileLedger, list[FileState]], None]
    n_skipped: int = 0
    versions: Callable[[str], tuple[int, int] | None] | None = None
    #: Warnings given before the run's log opened, for it too (files skipped).
    said_before: tuple[str, ...] = ()


def analyze(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str],
    client: Client | str | None = None,
    embedder: str | None = None,
    frame_hop_s: float | None = None,
    chunk_seconds: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    precision: float | None = None,
    on_conflict: OnConflict = "error",
    keep_embeddings: bool | str | os.PathLike[str] = False,
    memory_budget: int | str | None = None,
    batch_frames: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> Any:
    """Score every frame of the audio under ``paths`` and write partitioned Parquet.

    Parameters
    ----------
    paths : path-like or sequence of path-like
        Audio files and directories (walked recursively for known extensions).
    model : str, path-like, or list of them
        A buzzdetect model directory, or its name in ``buzzdask.model-dirs``. A list: several
        heads on one embedder, each scoring the same embeddings in the same scorer call (the
        audio is decoded and embedded once); each gets a complete output of its own,
        ``output/<model name>/``.
    output : path-like
        Output directory (see :mod:`buzzdask.write` for its layout).
    client : distributed.Client or str, optional
        The cluster to use (a client or a scheduler address). Default: a local cluster of
        worker processes, started and closed here.
    embedder : str, optional
        Embedder handle (TF Hub URL or local SavedModel directory) overriding the configured one.
    frame_hop_s : float > 0 [s], optional
        Distance between frame starts; default one whole frame (0.96 s for YAMNet).
        ``start[i] = i * frame_hop_s``.
    chunk_seconds : float in (0, 86400] [s], optional
        Audio per decode task, rounded down to whole hops. Results do not depend on it.
        Default: ``buzzdask.chunk-seconds`` (600).
    thresholds : mapping of class -> float, optional
        Adds ``detections_<class>`` columns: ``activation > threshold``, as buzzdetect and buzzr.
        With several models, each takes the classes it has; a class that several have is
        named with its model, ``{"model_lab/ins_buzz": 0.4}`` (heads trained apart put their
        activations on scales of their own).
    precision : float in (0, 1), optional
        Instead of ``thresholds``: the thresholds the model's ``tests/metrics.csv`` gives for
        this precision, as buzzdetect computes them (:func:`buzzdask.thresholds_for_precision`).
    on_conflict : {"error", "resume", "new"}, default: "error"
        When ``output`` already holds results: refuse, finish that run (skipping every chunk it
        completed), or write into a new timestamped sibling directory.
    keep_embeddings : bool or path-like, default: False
        Keep the embeddings in an embedding store (:mod:`buzzdask.store`): ``True`` for
        ``output/embeddings``, or a store's directory (the training's ``embedding-cache`` is
        one). Chunks the store already holds are read from it instead of decoded and embedded;
        :func:`buzzdask.rescore` scores the store with another head without the audio.
    memory_budget : int or str, optional
        Most decoded audio in flight, in bytes or as ``"1GiB"``. Default:
        ``buzzdask.memory-budget`` (1 GiB).
    batch_frames : int > 0, optional
        Most frames per score task and per embedder call (on a CPU, calls hold at most
        ``buzzdask.cpu-call-frames``). Default: ``buzzdask.batch-frames`` (512).
    progress : bool, default: True
        Show a progress bar of audio hours.
    verbose : bool, default: False
        Log "decoding <file> [start–end]" and "scoring <file> [start–end]" per chunk.

    Returns
    -------
    AnalysisResult, or dict of str -> AnalysisResult
        One result; for a list of models, one per model, by its name.

    Raises
    ------
    InputError, ModelError, ParameterError, OutputConflictError
        Before any result is written, for a missing input, an unusable model (or models on
        different embedders), a bad option or an output that already holds results.
    ScorerError
        When no scorer can start (its model does not load on the workers).
    ClusterError
        When the cluster cannot be reached (``client`` an address that does not answer in
        30 s) or has no workers.
    BuzzdaskError
        Called at the top level of a script run as ``python script.py``: the local cluster's
        worker processes start by importing the script again, so the call must be under
        ``if __name__ == "__main__":`` (not needed in a notebook or with ``client``).

    See Also
    --------
    buzzdask.watch : the same, on a directory files are still arriving in.
    buzzdask.rescore : another head on the embeddings an analysis kept.

    Notes
    -----
    A file that cannot be read (corrupt, empty, not audio, shorter than one frame) does not stop
    the run: it is reported in ``result.errors`` and ``errors.parquet``, and every other file
    finishes. The last frame of a file, if it would overrun the end, is dropped, never padded.
    """
    started_wall = time.perf_counter()
    quiet_environment()  # before the model's check loads TensorFlow here
    settings = load_settings(
        chunk_seconds=chunk_seconds, memory_budget=memory_budget, batch_frames=batch_frames
    )
    # Inputs first: a mistyped or empty folder is reported in a second, before any model loads.
    found = scan(paths, extensions=settings.extensions)
    found.require_audio()
    said: tuple[str, ...] = ()
    if found.visible_skipped:  # hidden names (.DS_Store, a watch's marker) are not news
        said = (f"not analysed under {found.root}: {describe_skipped(found.visible_skipped)}",)
    misread = [item.relative for item in found.files if _misread_as_parquet(item.relative)]
    if misread:
        said += (
            f"{len(misread)} recording(s) whose names plain Parquet readers misread "
            f"({first_names(misread, shown=3)}): pd.read_parquet takes a 'key=value' name for a "
            "column (dd.read_parquet fails where some are) and leaves out names starting with "
            "'_' or '.'; read the results with result.to_pandas(), to_dask(), "
            "buzzdask.open_run(output).frames() or pd.read_parquet(OUTPUT/'scores', "
            "partitioning=None, ignore_prefixes=['.']) (README: Reading results)",
        )
    for line in said:
        logger.warning("%s", line)
    plan = plan_run(
        model,
        settings,
        embedder=embedder,
        frame_hop_s=frame_hop_s,
        thresholds=thresholds,
        precision=precision,
        ffmpeg=find_ffmpeg(ffmpeg=settings.ffmpeg, ffprobe=settings.ffprobe),
        store=keep_embeddings,
        output=output,
    )
    inputs = RunInputs(
        root=found.root,
        files=found.files,
        # Absolute: a resume from another working directory still says where they were. As
        # scan read them: paths given as a generator (Path.glob) are used up.
        described={"root": found.root, "paths": list(found.paths)},
        feed=functools.partial(_probe_files, plan),
        n_skipped=len(found.visible_skipped),
        said_before=said,
    )
    return run_plan(
        plan,
        inputs,
        output=output,
        client=client,
        on_conflict=on_conflict,
        progress=progress,
        verbose=verbose,
        started_wall=started_wall,
    )


def plan_run(
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    settings: Settings,
    *,
    embedder: str | EmbedderSpec | None,
    frame_hop_s: float | None,
    thresholds: Mapping[str, float] | None,
    precision: float | None,
    ffmpeg: FFmpegTools | None,
    store: bool | str | os.PathLike[str] | EmbeddingStore,
    output: str | os.PathLike[str],
) -> _Plan:
    """Resolve the models and frame geometry and check the thresholds (or the precision's).

    Raises
    ------
    ModelError
        If the models do not share one embedder (naming each model's), or two have one name.
    ParameterError
        A threshold for a class no model has; an output or store that is no path, or empty.
    """
    # Both before the models load: an unset shell variable, not the working directory.
    output = user_path(output, what="output")
    if not isinstance(store, (bool, str, os.PathLike, EmbeddingStore)):
        raise ParameterError(f"keep_embeddings={store!r} must be True, False or a folder")
    store_root = (
        None
        if isinstance(store, (bool, EmbeddingStore))
        else user_path(store, what="keep_embeddings")
    )
    several = not isinstance(model, (str, os.PathLike))
    items: list[object] = list(model) if several and isinstance(model, Iterable) else [model]
    given = [m for m in items if isinstance(m, (str, os.PathLike))]
    if len(given) != len(items):
        wrong = next(m for m in items if not isinstance(m, (str, os.PathLike)))
        raise ParameterError(
            "model must be a model directory or its name (str or pathlib.Path), or a list of "
            f"them, not {type(wrong).__name__}"
        )
    if not given:
        raise ParameterError("no model given")
    require_mapping(thresholds)  # before the embedder loads (or downloads)
    models = tuple(resolve_model(m, embedder=embedder, settings=settings) for m in given)
    _check_models(models, several=several)
    spec = models[0].embedder.frame_spec(frame_hop_s)
    if spec.hop_length > spec.frame_length:  # allowed (a sparse survey), but seldom meant
        logger.warning(
            "the frame hop, %g s, is longer than a frame (%g s): %g s after each frame are "
            "never scored (buzzdetect's framehop_prop 1 is a hop of %g s, 0.5 of %g s)",
            spec.hop_s,
            spec.frame_length_s,
            spec.hop_s - spec.frame_length_s,
            spec.frame_length_s,
            spec.frame_length_s / 2,
        )
    shares = thresholds_by_model(thresholds, {m.name: m.classes for m in models})
    choices = tuple(
        choose_thresholds(
            model_dir=m.path, classes=m.classes, precision=precision, thresholds=shares[m.name]
        )
        for m in models
    )
    kept: EmbeddingStore | None
    if isinstance(store, EmbeddingStore):
        kept = store
    elif store is False:
        kept = None
    else:
        # True: in the output, once it is known (on_conflict="new" may choose another).
        root = output / KEPT_EMBEDDINGS if store_root is None else store_root
        kept = EmbeddingStore(root, embedder=models[0].embedder, spec=spec)
    return _Plan(
        models=models,
        spec=spec,
        frames_per_chunk=spec.frames_per_chunk(settings.chunk_seconds),
        thresholds=choices,
        # Decode tasks run the ffmpeg found here, by its absolute path, on every node.
        settings=settings if ffmpeg is None else settings.with_overrides(ffmpeg=ffmpeg.ffmpeg),
        ffmpeg=ffmpeg,
        store=kept,
        several=several,
        store_in_output=store is True,
    )


def _check_models(models: Sequence[ModelSpec], *, several: bool) -> None:
    """Several heads must share one embedder (their scorer embeds once) and have distinct names.

    Their results go to ``output/<name>``: a name the run keeps for itself (its log, kept
    embeddings) is refused, and so are names differing only in letter case, one folder where
    the disk ignores case (a Mac's, exFAT) and once copied there.
    """
    embedders = {(m.embedder.name, m.embedder.sha256, m.embedder.handle) for m in models}
    if len(embedders) > 1:
        raise ModelError(
            "the models do not share one embedder, so they cannot score the same embeddings: "
            + "; ".join(
                f"{m.name} uses {m.embedder.name} ({m.embedder.handle}, sha256 "
                f"{(m.embedder.sha256 or '?')[:12]}…)"
                for m in models
            )
            + ". Run them separately"
        )
    names = [m.name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        paths = [m.path for m in models if m.name == twice[0]]
        if len({os.path.realpath(path) for path in paths}) == 1:
            raise ModelError(f"the model {paths[0]} is given twice ({paths}): give it once")
        raise ModelError(
            f"two models are named {twice[0]!r} ({paths}); each model's results go to "
            "output/<name>: rename one directory"
        )
    if not several:
        return  # one model's results are the output itself
    for model in models:
        # The run's own entries are lower case: "Embeddings" is theirs where case is ignored.
        if is_run_directory_entry(model.name.casefold()):
            raise ModelError(
                f"the model {model.path} is named {model.name!r}, which the output of several "
                "models keeps for itself (its results go to output/<name>): rename its directory"
            )
    by_case: dict[str, list[str]] = {}
    for name in names:
        by_case.setdefault(name.casefold(), []).append(name)
    alike = next((spellings for spellings in by_case.values() if len(spellings) > 1), None)
    if alike:
        raise ModelError(
            f"the models {alike} differ only in letter case: their output/<name> folders are one "
            "where the disk ignores case (a Mac's, exFAT, once copied there): rename one directory"
        )


def _misread_as_parquet(relative: str) -> bool:
    """Whether a recording's folder under ``scores/`` is one pyarrow's defaults misread.

    Its name and each folder above it are folders of the dataset: ``site=A`` is read as a hive
    partition (a column), and names starting with ``_`` or ``.`` are skipped as metadata.
    """
    return any("=" in part or part.startswith(("_", ".")) for part in relative.split("/"))


def run_plan(
    plan: _Plan,
    inputs: RunInputs,
    *,
    output: str | os.PathLike[str],
    client: Client | str | None,
    on_conflict: OnConflict,
    progress: bool,
    verbose: bool,
    started_wall: float,
) -> Any:
    """Check the outputs, then score every chunk of ``inputs`` with ``plan``'s heads.

    Returns an :class:`AnalysisResult`, or one per model by name when ``plan.several``.
    """
    settings = plan.settings
    fingerprints = [_fingerprint(plan, i) for i in range(len(plan.models))]
    output = user_path(output)  # once: the lock, the checks and the layouts take it as it is
    if on_conflict != "new":  # a new run goes elsewhere when another holds the output
        refuse_if_in_use(
            output, stale_s=settings.lock_stale_seconds, resuming=on_conflict == "resume"
        )
    existed = output.exists()
    root, layouts = _prepare_outputs(plan, output, on_conflict, fingerprints)
    if plan.store_in_output:
        store = EmbeddingStore(root / KEPT_EMBEDDINGS, embedder=plan.embedder, spec=plan.spec)
        plan = replace(plan, store=store)
    started = utc_now()
    # on_conflict="new": where to resume it from, should it stop (said before the cluster,
    # which may wait in a queue, starts).
    elsewhere = (
        f"writing to {root} (new, beside {output}, which is not empty)" if root != output else None
    )
    if elsewhere:
        logger.warning("%s", elsewhere)
    metadata: list[dict[str, Any]] = []  # the outputs' buzzdask.json, once planned
    resumed: list[ResumeCheck] = []  # what a resume found done, once checked
    lock = OutputLock(root, started=started, stale_s=settings.lock_stale_seconds)
    try:
        with (
            _removed_if_left_empty(root, made=root != output or not existed),
            lock,
            # A re-scoring decodes nothing: its local cluster is threads in this process.
            connect(
                client, local=settings.local_cluster, processes=plan.ffmpeg is not None
            ) as connected,
            run_log(
                root / "buzzdask.log",
                connected,
                timeout_s=settings.scorer_ping_seconds,
                verbose=verbose,
            ) as run_file,
        ):
            # Off the start's critical path: pandas (0.2 s) only makes the results' tables.
            import_in_background("pandas")
            # Each invocation's first line in the log: a resumed output's log tells them apart.
            logger.info(
                "%s %s on %s (scheduler %s)",
                # A resume into an output no run has written is a start.
                "resuming"
                if on_conflict == "resume" and any(layout.metadata.exists() for layout in layouts)
                else "starting",
                "a re-scoring" if plan.ffmpeg is None else "an analysis",
                platform.node(),
                getattr(connected.scheduler, "address", "?"),
            )
            # On the console already; the log keeps them too.
            for line in (*inputs.said_before, *filter(None, [lock.took_over, elsewhere])):
                run_file.handle(
                    logger.makeRecord(logger.name, logging.WARNING, __file__, 0, line, (), None)
                )
            if on_conflict == "resume" and inputs.versions is None:
                file_paths = [f.path for f in inputs.files]
                named_root = resume_root(layouts, file_paths, root=inputs.root)
                inputs = _named_from(inputs, named_root, earlier=journalled(layouts))
            metadata = [
                _metadata(
                    plan, i, inputs=inputs.described, n_files=len(inputs.files), started=started
                )
                for i in range(len(plan.models))
            ]
            if on_conflict == "resume":  # read before this run writes its own
                for layout, meta in zip(layouts, metadata, strict=True):
                    meta["earlier_runs"] = earlier_runs(layout)
            run_files = {file.relative for file in inputs.files}
            resumed = [
                check_resume(
                    layout,
                    fingerprint=fp,
                    input_root=inputs.root,
                    # A re-scoring's inputs are its store's catalog: all of it is the run's.
                    named=inputs.described["paths"] if inputs.versions is None else None,
                    files=run_files,
                    versions=inputs.versions,
                )
                if on_conflict == "resume"
                else ResumeCheck()
                for layout, fp in zip(layouts, fingerprints, strict=True)
            ]
            ledger = FileLedger(
                heads=[
                    HeadOutput(layout, _writer(plan, i, layout, meta), check.done)
                    for i, (layout, meta, check) in enumerate(
                        zip(layouts, metadata, resumed, strict=True)
                    )
                ],
                spec=plan.spec,
                frames_per_chunk=plan.frames_per_chunk,
                progress=Progress(
                    enabled=progress,
                    verbose=verbose,
                    files=len(inputs.files),
                    # The bar's realtime factor as the summary's: the start-up in it.
                    started=time.monotonic() - (time.perf_counter() - started_wall),
                    publish=RunPublisher(
                        connected,
                        {
                            "output": str(root),
                            "model": ", ".join(m.name for m in plan.models),
                            "host": platform.node(),
                        },
                    ),
                ),
                store=plan.store,
                exact_plans=plan.ffmpeg is None,
            )

            def scorer_ready() -> None:
                # buzzdask.json once a scorer has loaded the model: a run that cannot start leaves
                # nothing but its log in the output.
                for layout, meta in zip(layouts, metadata, strict=True):
                    write_json(layout.metadata, meta)

            with ledger.stops_when_output_full():
                pool, pipeline = _run(
                    connected,
                    plan,
                    ledger,
                    inputs,
                    on_scorer_ready=scorer_ready,
                    # The local cluster started here has its own (a laptop holds one model).
                    scorer_workers=(
                        settings.local_cluster.scorers
                        if client is None
                        else settings.cpu_scorer_workers
                    ),
                )
            run_stats = {
                "peak_rss_bytes": peak_rss_by_worker(
                    connected, timeout_s=settings.scorer_ping_seconds
                ),
                "peak_decoded_bytes_in_flight": pipeline.budget.peak_bytes,
                "chunks_resent": pipeline.resent,
                "scorers": pool.stats(),
                "scorer_restarts": pool.restarts,
                "scorers_lost": pool.lost,
            }
            # Now, not when a collection finds them: the actors' models on a user's own
            # cluster (Dask's actor handles hold themselves in a cycle once called).
            pool.release()
        wall = time.perf_counter() - started_wall
        results = {}
        for layout, meta, check, model in zip(layouts, metadata, resumed, plan.models, strict=True):
            summary = _summary(
                ledger,
                plan,
                n_files=len(inputs.files),
                n_skipped=inputs.n_skipped,
                wall=wall,
                resume=check.as_summary(),
                **run_stats,
            )
            meta["versions"]["tensorflow"] = pool.tensorflow_version
            meta.update(status="complete", finished=utc_now(), summary=summary)
            if _recorded_by_another_run(layout, meta):
                # Its lock was taken over while this run stalled (a suspended job), by a run
                # that has written its record since: kept as an earlier run's, not replaced.
                meta["earlier_runs"] = earlier_runs(layout)
            with ledger.stops_when_output_full():
                write_errors(layout.errors, ledger.errors)
                write_json(layout.metadata, meta)
            results[model.name] = AnalysisResult(
                output=layout.root,
                dataset=layout.scores,
                summary=summary,
                errors=errors_table(ledger.errors),
                metadata=meta,
            )
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as the command raises it
        # Up to the last write: a stop as the cluster closes or the summary is written too.
        why = str(stop) or "Ctrl-C"
        _say_stopped(layouts, metadata, "interrupted", why, resumed, started_wall)
        raise
    except Exception as error:  # its own (the output's disk full, every scorer lost)
        why = f"{type(error).__name__}: {error}"
        _say_stopped(layouts, metadata, "failed", why, resumed, started_wall)
        raise
    first = next(iter(results.values())).summary
    append_to_run_log(
        root / "buzzdask.log",
        f"finished: {first['files_done']}/{first['files']} files ({first['files_failed']} "
        f"failed), {format_audio(first['audio_hours'] * 3600)} of audio in "
        f"{first['wall_seconds']:.1f} s ({format_factor(first['realtime_factor'])} realtime)",
    )
    return results if plan.several else results[plan.models[0].name]


def _written_before_the_stop(
    layout: OutputLayout, trusted: Mapping[tuple[str, int], Any], started_wall: float
) -> dict[str, Any]:
    """A stopped run's ``summary``: the chunks and frames it journalled, and its wall time.

    Read from the journal, not counted as the run went: a stop lands between a chunk's journal
    line and its count as readily as anywhere. ``trusted``: what the journal held before (a
    resume's chunks done).
    """
    new = [entry for key, entry in layout.read_journal().items() if key not in trusted]
    return {
        "chunks_written": len(new),
        "frames": sum(int(entry["frames"]) for entry in new),
        "wall_seconds": time.perf_counter() - started_wall,
    }


def _say_stopped(
    layouts: Sequence[OutputLayout],
    metadata: Sequence[dict[str, Any]],
    status: Literal["interrupted", "failed"],
    why: str,
    resumed: Sequence[ResumeCheck],
    started_wall: float,
) -> None:
    """Mark the outputs a stopped run had started: ``status``, when, why and what it wrote.

    So that a resume's ``earlier_runs`` tells a run stopped by Ctrl-C or SIGTERM
    (``"interrupted"``) or by an error (``"failed"``) from one killed outright (still
    ``"running"``), with its counts (its ``summary``: what its journal gained beyond the chunks
    ``resumed`` found done). Outputs the run had not started (no metadata yet, no
    ``buzzdask.json``), or had finished already (one head of several), are left alone.
    """
    if not metadata:
        return
    trusted = [check.done for check in resumed] or [{} for _ in layouts]
    for layout, meta, done in zip(layouts, metadata, trusted, strict=True):
        if layout.metadata.exists() and _written_status(layout) != "complete":
            with suppress(OSError, ValueError):  # a gone disk, a journal cut short: no counts
                meta["summary"] = _written_before_the_stop(layout, done, started_wall)
            meta.update(status=status, finished=utc_now(), stopped_by=why)
            with suppress(OSError):  # a full or gone disk: the stop is what matters now
                write_json(layout.metadata, meta)


def say_stopped_after_the_end(layout: OutputLayout, why: str) -> bool:
    """Mark an output whose run had ended ``"complete"`` as ``"interrupted"`` by ``why``.

    A watch stopped between its passes: each pass ended complete, the watch did not. Returns
    whether it did (not for a stop during a pass, which said so, or before anything was written).
    """
    if _written_status(layout) != "complete":
        return False
    metadata = json.loads(layout.metadata.read_text(encoding="utf-8"))
    metadata.update(status="interrupted", finished=utc_now(), stopped_by=why)
    with suppress(OSError):  # a full or gone disk: the stop is what matters now
        write_json(layout.metadata, metadata)
    return True


def _written_status(layout: OutputLayout) -> str | None:
    """The status in an output's ``buzzdask.json`` as written (None: unreadable)."""
    try:
        return json.loads(layout.metadata.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None


def import_in_background(module: str) -> None:
    """Import ``module`` in a thread of its own, while this process mostly waits on others.

    A later ``import`` of it here waits for this one (Python's import lock) to finish. The
    process may end before the import does.
    """
    threading.Thread(
        target=importlib.import_module, args=(module,), name=f"import-{module}", daemon=True
    ).start()


def _named_from(inputs: RunInputs, root: str, *, earlier: set[str]) -> RunInputs:
    """``inputs`` named from ``root`` (a resume's: :func:`~buzzdask.resume.resume_root`).

    ``earlier``: the names the earlier run gave (:func:`~buzzdask.inputs.named_from`).
    """
    return replace(
        inputs,
        root=root,
        files=named_from(inputs.files, root, earlier=earlier),
        described={**inputs.described, "root": root},
    )


@contextmanager
def _removed_if_left_empty(root: Path, *, made: bool) -> Iterator[None]:
    """Remove ``root``, made for this run, if the run left it empty.

    A run that stops before it writes anything (its cluster cannot start: a script without a
    ``__main__`` guard) then leaves no empty output behind.
    """
    try:
        yield
    finally:
        if made:
            with suppress(OSError):  # not empty: it holds the run's log, or results
                root.rmdir()


def _prepare_outputs(
    plan: _Plan,
    output: Path,
    on_conflict: OnConflict,
    fingerprints: Sequence[Mapping[str, Any]],
) -> tuple[Path, list[OutputLayout]]:
    """The run's directory and each model's output in it, checked (:func:`prepare_output`).

    One model: the output itself. Several: ``<output>/<model name>`` each, beside the run's log
    and lock (and kept embeddings); ``on_conflict="new"`` moves the whole run to a new sibling.
    """
    if not plan.several:
        layout = prepare_output(
            output, on_conflict=on_conflict, fingerprint=fingerprints[0], options=_options(plan, 0)
        )
        return layout.root, [layout]
    root = output
    names = {m.name for m in plan.models}
    check_run_directory(root, names=names)
    if on_conflict == "new" and root.is_dir() and any(root.iterdir()):
        root = new_sibling(root)
    layouts = [
        prepare_output(
            root / model.name,
            on_conflict="error" if on_conflict == "new" else on_conflict,
            fingerprint=fingerprint,
            options=_options(plan, i),
        )
        for i, (model, fingerprint) in enumerate(zip(plan.models, fingerprints, strict=True))
    ]
    return root, layouts


def _writer(
    plan: _Plan, index: int, layout: OutputLayout, metadata: Mapping[str, Any]
) -> PartitionWriter:
    """What score tasks write model ``index``'s partitions with, on the workers."""
    return PartitionWriter(
        output=str(layout.root),
        spec=plan.spec,
        classes=plan.models[index].classes,
        thresholds=tuple(plan.thresholds[index].values.items()),
        metadata_json=json.dumps(
            {key: metadata[key] for key in _PARTITION_METADATA}, sort_keys=True
        ),
    )


def _run(
    client: Client,
    plan: _Plan,
    ledger: FileLedger,
    inputs: RunInputs,
    *,
    on_scorer_ready: Callable[[], None],
    scorer_workers: int | None,
) -> tuple[ScorerPool, ChunkPipeline]:
    """Start the scorers, then feed every file through the chunk loop (decode, score, write).

    Without GPUs, up to ``scorer_workers`` workers hold a scorer (None: every worker).
    """
    settings, spec = plan.settings, plan.spec
    pool = ScorerPool.from_settings(
        client,
        settings,
        head_path=tuple(m.path for m in plan.models),
        # A re-scoring loads no embedder: its heads take the stored embeddings.
        embedder_handle=plan.embedder.handle if plan.ffmpeg is not None else None,
        embedding_size=plan.store.embedding_size() if plan.ffmpeg is None and plan.store else None,
        spec=spec,
        n_classes=tuple(len(m.classes) for m in plan.models),
        key_prefix="scorer",
        cpu_scorer_workers=scorer_workers,
    )
    pool.start(on_ready=on_scorer_ready)
    pipeline = ChunkPipeline.from_settings(
        client,
        pool,
        settings,
        spec=spec,
        frames_per_chunk=plan.frames_per_chunk,
        decode=_decoder(settings),
        score=functools.partial(score_chunks, writer=ledger.writer()),
        score_prefix="score",
        on_result=ledger.scored,
        on_failure=ledger.chunk_failed,
        score_keywords=lambda jobs: {"targets": ledger.targets(jobs)},
        recording=ledger.recording,
    )
    states = [state for item in inputs.files if (state := ledger.add(item)) is not None]
    inputs.feed(pipeline, ledger, states)
    try:
        pipeline.run()
    except BaseException:  # the bar and the dashboard page end with the run, however it ends
        ledger.progress.close(stopped=True)
        raise
    ledger.progress.close()
    pool.refresh(finished=True)
    return pool, pipeline


def _probe_files(
    plan: _Plan, pipeline: ChunkPipeline, ledger: FileLedger, states: list[FileState]
) -> None:
    """Probe the audio files in batches (hashing them where embeddings are kept)."""
    assert plan.ffmpeg is not None
    for batch in probe_batches(states, most=PROBES_PER_TASK):
        paths = [state.input.path for state in batch]
        pipeline.submit(
            probe_task,
            paths,
            plan.ffmpeg,
            plan.store is not None,
            key=task_key("probe"),
            then=functools.partial(_probed, ledger, pipeline, batch),
        )


def probe_batches(items: Sequence[_Item], *, most: int) -> Iterator[list[_Item]]:
    """``items`` in batches of 1, 2, 4... up to ``most``.

    The first file decodes at once, and a folder of short recordings costs one probe task per
    ``most`` files, not one each.
    """
    size, start = 1, 0
    while start < len(items):
        yield list(items[start : start + size])
        start += size
        size = min(2 * size, most)


def _probed(
    ledger: FileLedger, pipeline: ChunkPipeline, batch: list[FileState], future: Any
) -> None:
    answers = outcome(future)
    if isinstance(answers, BaseException):  # the task itself failed: so did each probe
        answers = [answers] * len(batch)
    for state, answer in zip(batch, answers, strict=True):
        for job in ledger.probed(state, answer):
            pipeline.enqueue(job)


def _decoder(settings: Settings) -> Any:
    """The decode task: in place, or from a node-local copy (spares the parallel file system)."""
    if not settings.staging.enabled:
        return decode_chunk
    return functools.partial(
        decode_chunk_staged,
        staging_directory=settings.staging.directory,
        keep_files=settings.staging.keep_files,
    )


def refuse_other_settings(plan: _Plan, output: str | os.PathLike[str]) -> None:
    """Refuse now what a resume into ``output`` would refuse as it starts: other settings.

    For a watch, whose first pass may come hours later. Outputs of several models, and an
    output with no chunk yet, are left to the pass.

    Raises
    ------
    OutputConflictError
        ``"settings differ"``, naming each difference and both ways on.
    """
    layout = OutputLayout(user_path(output))
    if plan.several or not (layout.metadata.is_file() and layout.holds_chunks()):
        return
    prepare_output(
        layout.root,
        on_conflict="resume",
        fingerprint=_fingerprint(plan, 0),
        options=_options(plan, 0),
    )


def _recorded_by_another_run(layout: OutputLayout, meta: Mapping[str, Any]) -> bool:
    """Whether the output's ``buzzdask.json`` is now another run's than ``meta``'s.

    Not one of those it resumed: their record stays there until this run writes its own.
    """
    try:
        recorded = json.loads(layout.metadata.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    known = {(run.get("started"), run.get("host")) for run in [meta, *meta.get("earlier_runs", [])]}
    return (
        isinstance(recorded, dict) and (recorded.get("started"), recorded.get("host")) not in known
    )


def _fingerprint(plan: _Plan, index: int) -> dict[str, Any]:
    """The settings that change model ``index``'s results: a resume must match them."""
    from buzzdask import __version__

    model, spec = plan.models[index], plan.spec
    fingerprint = {
        "model_sha256": model.sha256,
        # A TF Hub copy's path depends on the machine's cache; its URL and content do not.
        "embedder": model.embedder.source or model.embedder.handle,
        "embedder_sha256": model.embedder.sha256,
        "preprocessing": PREPROCESSING,
        "sample_rate": spec.sample_rate,
        "frame_length": spec.frame_length,
        "frame_hop": spec.hop_length,
        "frame_context": spec.context,
        "frames_per_chunk": plan.frames_per_chunk,
        "thresholds": dict(sorted(plan.thresholds[index].values.items())),
        "buzzdask_version": __version__,
    }
    if plan.ffmpeg is None:  # a re-scoring: what was decoded, the store says
        assert plan.store is not None
        # Its embedder is never loaded: the handle given, or the store's own set, names the
        # same embeddings (its content hash and the set tell them).
        embeddings = {"embedder": model.embedder.name, "embeddings": str(plan.store.directory)}
        return {**fingerprint, **embeddings}
    decoding: dict[str, Any] = {
        # Builds differ in duration estimates (chunk plans) and AAC's last samples; so do the
        # probes (an MP3's header and ffprobe differ where a LAME header trims the padding).
        "ffmpeg_version": plan.ffmpeg.version,
        "probe": "MP3 headers, else " + ("ffprobe" if plan.ffmpeg.ffprobe else "ffmpeg"),
    }
    for key, setting in DECODING_SETTINGS.items():
        # Less margin lets the chunks' edges show in the scores; AAC seeked, not decoded whole,
        # moves them by 0.1: a resume must not mix either. Left out at the default, which the
        # outputs of this version written before they counted here used.
        value, default = (
            getattr(plan.settings, setting.replace("-", "_")),
            DEFAULTS["buzzdask"][setting],
        )
        if isinstance(value, tuple):  # a set of patterns: their order means nothing
            value, default = sorted(value), sorted(default)
        if value != default:
            decoding[key] = value
    return {**fingerprint, **decoding}


def _options(plan: _Plan, index: int) -> dict[str, Any]:
    """The run's options, resolved, by their keyword: what a resume with other ones should pass."""
    spec, model = plan.spec, plan.models[index]
    return {
        "model": str(model.path),
        # The URL, not this machine's cache of it: what a resume elsewhere is told to pass.
        "embedder": model.embedder.source or model.embedder.handle,
        "frame_hop_s": spec.hop_s,
        "chunk_seconds": plan.frames_per_chunk * spec.hop_length / spec.sample_rate,
        # Every head's, named with its model, where several share the run: a resume passes
        # them all, and a bare class two heads have is refused.
        "thresholds": {
            f"{plan.models[i].name}/{name}" if plan.several else name: value
            for i in (range(len(plan.models)) if plan.several else [index])
            for name, value in sorted(plan.thresholds[i].values.items())
        },
        "precision": plan.thresholds[index].precision,
        # Where the embeddings are kept (True: in the output); a resume must keep them alike,
        # or the store would lack the chunks of one of the runs (a re-scoring's is its source).
        "keep_embeddings": (
            False
            if plan.store is None or plan.ffmpeg is None
            else plan.store_in_output or str(plan.store.directory)
        ),
    }


def _metadata(
    plan: _Plan, index: int, *, inputs: Mapping[str, Any], n_files: int, started: str
) -> dict[str, Any]:
    """``buzzdask.json`` of model ``index``'s output, for a run that starts now."""
    spec, model = plan.spec, plan.models[index]
    return {
        "status": "running",
        "started": started,
        "host": platform.node(),
        "model": model.as_metadata(),
        "embedder": model.embedder.handle,
        "preprocessing": PREPROCESSING,
        "classes": list(model.classes),
        "sample_rate": spec.sample_rate,
        "frame_length_s": spec.frame_length_s,
        "frame_hop_s": spec.hop_s,
        "frame_context_s": spec.context / spec.sample_rate,
        "chunk_seconds": plan.frames_per_chunk * spec.hop_length / spec.sample_rate,
        # Embedder calls of other sizes sum in other orders: scores move by about 1e-6.
        "scoring": {
            "batch_frames": plan.settings.batch_frames,
            "cpu_call_frames": plan.settings.cpu_call_frames,
            "tf_intra_op_threads": plan.settings.tf_intra_op_threads,
            "tf_inter_op_threads": plan.settings.tf_inter_op_threads,
        },
        # The values, how they compare, and the precision and metrics rows they came from.
        "thresholds": plan.thresholds[index].as_metadata(),
        "versions": package_versions(),
        "ffmpeg": plan.ffmpeg.as_metadata() if plan.ffmpeg else None,
        "embeddings": str(plan.store.directory) if plan.store else None,
        # The other heads of the run, which scored the same embeddings.
        "heads": [m.name for m in plan.models],
        "inputs": {**inputs, "files": n_files},
        "fingerprint": _fingerprint(plan, index),
        "options": _options(plan, index),
    }


def _summary(
    ledger: FileLedger, plan: _Plan, *, n_files: int, n_skipped: int, wall: float, **run_stats: Any
) -> dict[str, Any]:
    """Files, frames, audio hours, wall time and realtime factor, plus ``run_stats``.

    ``n_skipped`` counts what the input directories hold besides audio and hidden names.
    """
    spec = plan.spec
    audio_s = ledger.frames_written * spec.hop_length / spec.sample_rate
    return {
        "files": n_files,
        "files_done": len(ledger.files) - ledger.files_failed,
        "files_failed": ledger.files_failed,
        "files_skipped": n_skipped,
        "chunks_written": ledger.chunks_written,
        "chunks_skipped_resume": ledger.chunks_skipped,
        # Chunks sent again because their scorer was lost (each is still written once).
        "chunks_resent": run_stats["chunks_resent"],
        "frames": ledger.frames_written,
        "audio_hours": audio_s / 3600,
        "wall_seconds": wall,
        "realtime_factor": audio_s / wall if wall > 0 else None,
        "peak_rss_bytes": run_stats["peak_rss_bytes"],
        "memory_budget_bytes": plan.settings.memory_budget,
        "peak_decoded_bytes_in_flight": run_stats["peak_decoded_bytes_in_flight"],
        "scorers": run_stats["scorers"],
        "scorer_restarts": run_stats["scorer_restarts"],
        "scorers_lost": run_stats["scorers_lost"],
        # What a resume found it could trust, and removed (zeros for a run not resumed).
        "resume": run_stats["resume"],
        # Chunks whose embeddings came from the store rather than from decoding the audio.
        "chunks_from_store": ledger.chunks_from_store,
    }
