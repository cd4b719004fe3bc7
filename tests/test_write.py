"""Partitions built from their buffers hold what ``pa.array`` would have made, without pandas;
their paths stay inside the output and cost few file system calls."""

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buzzdask.errors import OutputConflictError, ParameterError
from buzzdask.frames import FrameSpec
from buzzdask.thresholds import detected
from buzzdask.write import (
    OutputLayout,
    atomic_path,
    bool_array,
    frames_table,
    numeric_array,
    prepare_output,
    refuse_results,
    repeated_string,
)
from tests.conftest import in_a_fresh_interpreter

SPEC = FrameSpec(sample_rate=16000, frame_length=15360, hop_length=7680, context=240)
CLASSES = ("ins_buzz", "ambient_rain", "mech_plane")


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 625])
def test_columns_equal_those_pa_array_makes(n: int) -> None:
    rng = np.random.default_rng(n)
    wide = rng.normal(size=(n, 3)).astype(np.float32)
    strided = wide[:, 1]  # not contiguous
    flags = rng.random(n) > 0.5
    assert numeric_array(strided, np.float32).equals(pa.array(strided, pa.float32()))
    frames = np.arange(n, dtype=np.int64) * 3
    assert numeric_array(frames / 7, np.float64).equals(pa.array(frames / 7, pa.float64()))
    assert numeric_array(frames, np.int64).equals(pa.array(frames))
    assert bool_array(flags).equals(pa.array(flags, pa.bool_()))
    name = "site 1/2026-06-01/ÉTÉ_0001.WAV"
    assert repeated_string(name, n).equals(pa.array([name] * n, pa.string()))
    for column in (numeric_array(strided, np.float32), bool_array(flags), repeated_string(name, n)):
        column.validate(full=True)


@pytest.mark.parametrize("n_frames", [1, 31, 625])
def test_a_partition_equals_the_one_pa_table_makes(tmp_path, n_frames: int) -> None:
    activations = np.random.default_rng(n_frames).normal(size=(n_frames, 5)).astype(np.float32)
    activations = activations[:, ::2]  # a head's columns of a wider output
    thresholds = {"ins_buzz": 0.1, "mech_plane": -0.3}
    metadata = {"model": "model_general_v3", "frame_hop_s": 0.48}
    table = frames_table(
        "a/b.mp3",
        40,
        activations,
        spec=SPEC,
        classes=CLASSES,
        thresholds=thresholds,
        metadata_json=json.dumps(metadata, sort_keys=True),
    )
    start = (40 + np.arange(n_frames)) * SPEC.hop_length / SPEC.sample_rate
    expected = {
        "file": pa.array(["a/b.mp3"] * n_frames, pa.string()),
        "start": pa.array(start, pa.float64()),
        "end": pa.array(
            ((40 + np.arange(n_frames)) * SPEC.hop_length + SPEC.frame_length) / SPEC.sample_rate,
            pa.float64(),
        ),
    }
    # A frame ends exactly where the one a frame's length later starts (hops of half a frame).
    ends = np.asarray(table["end"])
    assert (ends[:-2] == start[2:]).all()
    assert n_frames < 31 or (ends != start + 0.96).any()  # as they were: not all
    for column, name in enumerate(CLASSES):
        expected[f"activation_{name}"] = pa.array(activations[:, column], pa.float32())
    for name, threshold in thresholds.items():
        flags = detected(activations[:, CLASSES.index(name)], threshold)
        expected[f"detections_{name}"] = pa.array(flags, pa.bool_())
    reference = pa.table(expected).replace_schema_metadata(
        {b"buzzdask": json.dumps(metadata, sort_keys=True)}
    )
    assert table.equals(reference, check_metadata=True)
    pq.write_table(table, tmp_path / "chunk.parquet")
    read = pq.read_table(tmp_path / "chunk.parquet")
    assert read.equals(reference, check_metadata=True)


def test_writing_partitions_and_embeddings_imports_no_pandas(tmp_path) -> None:
    script = f"""
import sys
import numpy as np
from buzzdask.frames import FrameSpec
from buzzdask.write import PartitionWriter
from buzzdask.models import EmbedderSpec
from buzzdask.store import EmbeddingStore
spec = FrameSpec(sample_rate=16000, frame_length=15360, hop_length=15360, context=240)
writer = PartitionWriter(
    output={str(tmp_path / "out")!r}, spec=spec, classes=("a", "b"),
    thresholds=(("a", 0.5),), metadata_json="{{}}",
)
print(writer.write("x.wav", 0, 0, np.ones((4, 2), np.float32)), "pandas" in sys.modules)
embedder = EmbedderSpec(
    name="e", handle="h", sample_rate=16000, frame_length_s=0.96, frame_context_s=0.015
)
store = EmbeddingStore({str(tmp_path / "store")!r}, embedder=embedder, spec=spec)
embeddings = np.arange(12, dtype=np.float32).reshape(3, 4)
store.store("ab" * 32, 5, embeddings, at_end=True)
print("pandas" in sys.modules)
stored = store.load("ab" * 32)
print(stored.frames.tolist(), (stored.embeddings == embeddings).all())
"""
    assert in_a_fresh_interpreter(script, timeout=120) == ["4 False", "False", "[5, 6, 7] True"]


def test_partition_paths_stay_inside_scores(tmp_path) -> None:
    """Input names that lead out of ``scores/``, by name or by a symbolic link, are refused."""
    layout = OutputLayout(tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (layout.scores / "site").mkdir(parents=True)
    (layout.scores / "site" / "linked").symlink_to(elsewhere, target_is_directory=True)
    (layout.scores / "alias").symlink_to(layout.scores / "site", target_is_directory=True)
    for name in ["", "/x.wav", "../x.wav", "a/../../x.wav", "site/linked/x.wav", "site/linked"]:
        with pytest.raises(ParameterError):
            layout.partition(name, 0)
        # Asked again (an answer kept by the layout): still refused.
        with pytest.raises(ParameterError):
            layout.partition(name, 1)
    # A link that stays inside is followed as before.
    assert layout.partition("alias/x.wav", 3) == layout.scores / "alias/x.wav/chunk-000003.parquet"
    assert layout.partition("site/a.wav", 0) == layout.scores / "site/a.wav/chunk-000000.parquet"


def test_partition_paths_check_each_directory_once(tmp_path, monkeypatch) -> None:
    """One ``stat`` per directory a layout has not seen (an input's own: one per chunk).

    Each partition's whole path was resolved twice before: about 25 calls a partition here,
    each a round trip on a parallel file system, and a resume checks every partition.
    """
    layout = OutputLayout(tmp_path / "out")
    calls: list[str] = []

    def counted(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def call(path, *args, **kwargs) -> os.stat_result:
            # Only this layout's: threads and finalizers an earlier test left (a Dask client's,
            # a temporary directory's cleanup) stat their own files meanwhile.
            if str(path).startswith(str(layout.root)):
                calls.append(path)
            return real(path, *args, **kwargs)

        return call

    for name in ("stat", "lstat"):
        monkeypatch.setattr(os, name, counted(getattr(os, name)))
    partitions = {
        layout.partition(f"site{site}/2026-06-0{day}/{index:03d}.WAV", chunk)
        for site in range(2)
        for day in range(3)
        for index in range(5)
        for chunk in range(4)
    }
    directories = 2 + 2 * 3  # site*/ and site*/2026-06-0*/
    assert len(partitions) == 120 and len(calls) == directories + len(partitions)


def test_atomic_path_leaves_nothing_behind_when_its_block_fails(tmp_path) -> None:
    target = tmp_path / "deep" / "x.parquet"
    with atomic_path(target) as temporary:
        temporary.write_bytes(b"kept")
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("a full disk")
    assert target.read_bytes() == b"kept" and os.listdir(target.parent) == ["x.parquet"]
    # A name that just fits (a long recording's export): its temporary name fits too.
    longest = tmp_path / ("蜂" * 80 + "_buzzdetect.csv")  # 255 bytes
    with atomic_path(longest) as temporary:
        temporary.write_bytes(b"start\n")
    assert longest.read_bytes() == b"start\n"
    # Too long: the file system's error, not one from removing the temporary file.
    with (
        pytest.raises(OSError, match="File name too long"),
        atomic_path(longest.with_suffix(".csvx")) as temporary,
    ):
        temporary.write_bytes(b"start\n")


def test_a_journal_line_the_disk_cannot_hold_is_taken_back(tmp_path) -> None:
    """A full disk mid-line (here a file size limit: EFBIG, as ENOSPC) leaves whole lines only."""
    script = f"""
import errno, resource, signal
from buzzdask.write import OutputLayout
layout = OutputLayout({str(tmp_path)!r})
layout.record_chunk("a.wav", 0, frames=31, size=100, mtime_ns=1, ends=True)
before = layout.journal.read_bytes()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 20, resource.RLIM_INFINITY))
try:
    layout.record_chunk("b.wav", 0, frames=31, size=100, mtime_ns=1, ends=True)
except OSError as error:
    print(errno.errorcode[error.errno])
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(layout.journal.read_bytes() == before)
"""
    assert in_a_fresh_interpreter(script) == ["EFBIG", "True"]


def test_a_run_killed_before_its_first_journal_line_is_refused_as_none_done(tmp_path) -> None:
    """Its partition is in place but no chunk is journalled: not "0 chunks done"."""
    layout = OutputLayout(tmp_path / "out")
    layout.scores.mkdir(parents=True)
    layout.metadata.write_text(json.dumps({"status": "running"}))
    (layout.scores / "chunk-000000.parquet").write_bytes(b"")
    with pytest.raises(OutputConflictError, match=r"an unfinished run \(none done yet\); pass"):
        refuse_results(layout)


def test_a_resume_with_another_hop_names_it_in_seconds(tmp_path) -> None:
    """ "frame_hop: 15360 before, 7680 now" was in samples, beside a chunk length that had not
    changed ("chunk_seconds: 0.96 before, 0.96 now"); and the way back read as one phrase
    ("no --precision --threshold ins_buzz=-1.2")."""
    from buzzdask.cli import _in_flags

    layout = OutputLayout(tmp_path / "out")
    layout.root.mkdir()
    before = {"frame_hop": 15360, "sample_rate": 16000, "frames_per_chunk": 1}
    earlier = {"thresholds": {"ins_buzz": -1.2}, "precision": None, "frame_hop_s": 0.96}
    layout.metadata.write_text(json.dumps({"fingerprint": before, "options": earlier}))
    layout.record_chunk("a.wav", 0, frames=1, size=100, mtime_ns=1, ends=True)
    now = {"frame_hop": 7680, "sample_rate": 16000, "frames_per_chunk": 2}
    options = {"thresholds": {}, "precision": 0.95, "frame_hop_s": 0.48}
    with pytest.raises(OutputConflictError) as refused:
        prepare_output(layout.root, on_conflict="resume", fingerprint=now, options=options)
    message = _in_flags(refused.value)
    assert "settings differ (frame_hop_s: 0.96 before, 0.48 now)" in message
    assert "(--threshold ins_buzz=-1.2 --framehop 0.96 without --precision)" in message


def test_a_resume_with_other_thresholds_alone_points_to_summarize_export_and_plot(
    tmp_path,
) -> None:
    """A new threshold is no reason to analyse everything again (``--new``)."""
    layout = OutputLayout(tmp_path / "out")
    layout.root.mkdir()
    before = {"frame_hop": 15360, "sample_rate": 16000, "thresholds": {"ins_buzz": -1.2}}
    earlier = {"thresholds": {"ins_buzz": -1.2}, "precision": None}
    layout.metadata.write_text(json.dumps({"fingerprint": before, "options": earlier}))
    layout.record_chunk("a.wav", 0, frames=1, size=100, mtime_ns=1, ends=True)
    hint = "other thresholds alone need no new analysis: summarize, export and plot take"
    now = {**before, "thresholds": {"ins_buzz": -1.0}}
    with pytest.raises(OutputConflictError, match=hint):
        prepare_output(
            layout.root,
            on_conflict="resume",
            fingerprint=now,
            options={**earlier, "thresholds": {"ins_buzz": -1.0}},
        )
    # With another difference too, a new analysis may be what is meant: no such hint.
    with pytest.raises(OutputConflictError) as refused:
        prepare_output(
            layout.root,
            on_conflict="resume",
            fingerprint={**now, "frame_hop": 7680},
            options={**earlier, "thresholds": {"ins_buzz": -1.0}},
        )
    assert hint not in str(refused.value)


def test_runs_started_together_with_new_get_an_output_each(tmp_path) -> None:
    """A SLURM array's tasks, each ``--output results/run --new``, start in the same second."""
    output = tmp_path / "results" / "run"
    output.mkdir(parents=True)
    (output / "buzzdask.json").write_text("{}")  # an earlier run's
    barrier = threading.Barrier(8)

    def start() -> Path:
        barrier.wait()
        return prepare_output(output, on_conflict="new", fingerprint={}, options={}).root

    with ThreadPoolExecutor(8) as pool:
        roots = list(pool.map(lambda _: start(), range(8)))
    assert len(set(roots)) == 8 and all(root.is_dir() for root in roots)
    assert {root.parent for root in roots} == {output.parent}
