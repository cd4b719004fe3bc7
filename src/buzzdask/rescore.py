"""``rescore()``: other heads on the embeddings an analysis kept, without touching the audio.

An analysis run with ``keep_embeddings`` leaves an embedding store (:mod:`buzzdask.store`) whose
catalog names every file and chunk it stored. A re-scoring walks that catalog: each chunk's
embeddings are read back on the workers and scored by heads alone (no ffmpeg, no embedder), and
the results are written exactly as an analysis writes them, through the same chunk loop, ledger,
journal, resume and conflict checks (:func:`buzzdask.analysis.run_plan`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from distributed import Client

from buzzdask.analysis import RunInputs, plan_run, run_plan
from buzzdask.decode import AudioInfo, ChunkPlan
from buzzdask.errors import BuzzdaskError, InputError, ModelError
from buzzdask.inputs import InputFile, user_path
from buzzdask.ledger import FileLedger, FileState
from buzzdask.logs import quiet_environment
from buzzdask.models import head_weights
from buzzdask.pipeline import ChunkPipeline
from buzzdask.preload import import_tensorflow
from buzzdask.results import open_run
from buzzdask.settings import load_settings
from buzzdask.store import STORED_CODEC, EmbeddingStore, find_store, open_store, stored_embedder
from buzzdask.write import OnConflict

__all__ = ["rescore"]


def rescore(
    store: str | os.PathLike[str],
    model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    output: str | os.PathLike[str],
    client: Client | str | None = None,
    embedder: str | None = None,
    frame_hop_s: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    precision: float | None = None,
    on_conflict: OnConflict = "error",
    memory_budget: int | str | None = None,
    batch_frames: int | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> Any:
    """Score the embeddings an analysis kept with other heads; write what ``analyze`` writes.

    Parameters
    ----------
    store : path-like
        An embedding store an analysis wrote (``analyze(..., keep_embeddings=...)``; by default
        ``<its output>/embeddings``), or that analysis' output (its ``embeddings``).
    model : str, path-like, or list of them
        The heads, as for :func:`buzzdask.analyze`; they must use the embedder, preprocessing
        and frame hop the store was made with (checked by content hash before any work).
    output : path-like
        Output directory, laid out as an analysis' (:mod:`buzzdask.write`).
    client : distributed.Client or str, optional
        The cluster to use. Default: a local cluster, started and closed here.
    embedder : str, optional
        The embedder handle the analysis used (it is not loaded: its content hash finds the
        store's embeddings). Default: the store's record of its embedder, where it holds one
        set at the hop (:func:`~buzzdask.store.stored_embedder`); else the configured one.
    frame_hop_s : float > 0 [s], optional
        The hop the analysis used; needed only where the store holds embeddings at several
        (default: the store's hop).
    thresholds, precision
        As for :func:`buzzdask.analyze`.
    on_conflict : {"error", "resume", "new"}, default: "error"
        As for :func:`buzzdask.analyze`; a resume checks each journalled chunk as an analysis'.
    memory_budget : int or str, optional
        Most embeddings in flight, counted as the decoded audio they stand for.
    batch_frames : int > 0, optional
        Most frames per score task.
    progress, verbose : bool
        As for :func:`buzzdask.analyze` ("reading stored embeddings of <file> [start–end]").

    Returns
    -------
    AnalysisResult, or dict of str -> AnalysisResult
        As :func:`buzzdask.analyze` returns for ``model``. Partitions, chunks, journal and
        metadata are an analysis' with the same chunk length (the store's).

    Raises
    ------
    ModelError
        If the store holds no embeddings of the models' embedder, preprocessing and frame hop
        (it names what it holds), or the models do not share one embedder; if it holds
        embeddings at several hops and ``frame_hop_s`` is not given.
    InputError
        If ``store`` does not exist, or its catalog names no file.
    OutputConflictError, ParameterError
        As for :func:`buzzdask.analyze`, before any work.

    Notes
    -----
    A chunk whose embeddings are no longer in the store is reported per file in the errors, and
    every other file finishes.
    """
    started_wall = time.perf_counter()
    quiet_environment()
    store_given = store
    store = find_store(store)  # before the embedder: a path without a store says so first
    settings = load_settings(memory_budget=memory_budget, batch_frames=batch_frames)
    # The store's own record of its embedder, which is never loaded: no TF Hub, no download.
    stored = stored_embedder(store, frame_hop_s=frame_hop_s) if embedder is None else None
    plan = plan_run(
        model,
        settings,
        embedder=embedder if stored is None else stored[0],
        frame_hop_s=stored[1] if stored is not None else frame_hop_s,
        thresholds=thresholds,
        precision=precision,
        ffmpeg=None,
        store=False,
        output=output,
    )
    if client is None and any(head_weights(m.path) is None for m in plan.models):
        # Its scorer runs in this process (a local cluster of threads) and these heads need
        # TensorFlow: its import, most of a re-scoring's time, goes on while the store and
        # the cluster are opened.
        threading.Thread(target=import_tensorflow, name="import-tensorflow").start()
    kept = open_store(store, embedder=plan.embedder, spec=plan.spec)
    recordings, roots = _analysed(kept, given=user_path(store_given))
    catalog = kept.catalog(recordings=recordings, roots=roots)
    if not catalog:
        raise InputError(f"the catalog of {kept.directory} names no file: nothing to re-score")
    first = next(iter(catalog.values()))[0]
    plan = replace(plan, store=kept, frames_per_chunk=int(first["frames_per_chunk"]))
    files = [
        InputFile(path=f"{kept.directory}/{entries[0]['sha256']}", relative=name)
        for name, entries in catalog.items()
    ]
    inputs = RunInputs(
        root=str(kept.root),
        files=files,
        # The run's recordings are named from the audio's folder, where the results' start
        # times are read from their metadata (exports, summaries, plots).
        described={
            "root": _analysed_root(catalog) or str(kept.root),
            "store": str(kept.directory),
        },
        feed=functools.partial(_feed, kept, catalog),
        versions=functools.partial(_version, catalog),
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


def _analysed(store: EmbeddingStore, *, given: Path) -> tuple[set[str], set[str]]:
    """The recordings of the analysis re-scored, and the folder(s) it analysed them from.

    That analysis: the output ``given`` (whose store may be shared, ``--keep-embeddings
    DIR``), else the one whose output holds ``store`` (``OUTPUT/embeddings``). Its copies of
    one recording (an SD card dumped in two folders) are each a recording of its results: a
    re-scoring gives each, where a name the analysis no longer has (a file since renamed) folds
    into the latest. Its folder tells its audio from other analyses' stored under the same
    names. Both empty for a store of its own (a training's cache).
    """
    owner = given if (given / "buzzdask.json").is_file() else store.root.parent
    if (owner == store.root.parent and store.root.name != "embeddings") or not owner.is_dir():
        return set(), set()
    recordings: set[str] = set()
    roots: set[str] = set()
    # One head's output is OUTPUT itself; several heads' are OUTPUT/<model name>.
    for output in (owner, *(path for path in owner.iterdir() if path.is_dir())):
        if (output / "buzzdask.json").is_file():
            with contextlib.suppress(BuzzdaskError, KeyError):
                run = open_run(output)
                recordings.update(run.recordings())
                roots.add(str(run.input_root))
    return recordings, roots


def _analysed_root(catalog: Mapping[str, list[dict[str, Any]]]) -> str | None:
    """The folder the stored recordings were analysed from: their names are relative to it.

    ``None`` for recordings analysed from different folders, or catalog lines written before
    they held the audio's ``path``.
    """
    roots = set()
    for name, entries in catalog.items():
        path, suffix = entries[0].get("path"), f"/{name}"
        if not isinstance(path, str) or not path.endswith(suffix):
            return None
        roots.add(path.removesuffix(suffix) or "/")
    return roots.pop() if len(roots) == 1 else None


def _feed(
    store: EmbeddingStore,
    catalog: Mapping[str, list[dict[str, Any]]],
    pipeline: ChunkPipeline,
    ledger: FileLedger,
    states: list[FileState],
) -> None:
    """Every stored chunk of each file, read back from the store (no probe: the catalog tells)."""
    for state in states:
        entries = catalog[state.input.relative]
        info = AudioInfo(
            path=state.input.path,
            codec=STORED_CODEC,
            sample_rate=ledger.spec.sample_rate,
            channels=1,
            duration_s=entries[0].get("duration_s"),
            size_bytes=int(entries[0]["size"]),
            mtime_ns=int(entries[0]["mtime_ns"]),
            sha256=str(entries[0]["sha256"]),
        )
        plans = [
            ChunkPlan(int(e["chunk"]), int(e["first_frame"]), int(e["frames"])) for e in entries
        ]
        short = _stored_short(store, entries)
        if short:  # its frames that are stored are scored all the same
            ledger.file_failed(state, "load", short)
        for job in ledger.planned(state, info, plans):
            if job.stored is None:
                last = job.plan.first_frame + (job.plan.n_frames or 1) - 1
                missing = ModelError(
                    f"its embeddings of frames {job.plan.first_frame}–{last} are no longer in "
                    f"{store.directory / str(entries[0]['sha256'])}"
                )
                ledger.chunk_failed(job, missing, "load")
            else:
                pipeline.enqueue(job)


def _stored_short(store: EmbeddingStore, entries: Sequence[Mapping[str, Any]]) -> str:
    """Why a file's stored chunks are not all of its audio, or ``""`` where they are.

    The analysis that kept them was stopped, or some of its chunks failed: a re-scoring of what
    is there alone would look whole.
    """
    indices = {int(entry["chunk"]) for entry in entries}
    missing = sorted(set(range(max(indices) + 1)) - indices)
    total = store.file_frames(str(entries[0]["sha256"]))
    reached = max(int(entry["first_frame"]) + int(entry["frames"]) for entry in entries)
    if not missing and total is not None and reached >= total:
        return ""
    what = (
        f"chunk(s) {', '.join(map(str, missing))} of it"
        if missing
        else f"its frames from {reached} on"
    )
    return (
        f"its stored embeddings are not all of its audio: {what} were never stored (the "
        "analysis that kept them was stopped, or failed there); finish that analysis "
        "(--resume, with --keep-embeddings), then rescore with --resume"
    )


def _version(catalog: Mapping[str, list[dict[str, Any]]], name: str) -> tuple[int, int] | None:
    """A stored file's (size, modification time) as the analysis saw it; ``None`` if gone."""
    entries = catalog.get(name)
    return (int(entries[0]["size"]), int(entries[0]["mtime_ns"])) if entries else None
