"""Partitions built from their buffers hold what ``pa.array`` would have made, without pandas."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from buzzdask.frames import FrameSpec
from buzzdask.thresholds import detected
from buzzdask.write import bool_array, frames_table, numeric_array, repeated_string
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
        metadata=metadata,
    )
    start = (40 + np.arange(n_frames)) * SPEC.hop_length / SPEC.sample_rate
    expected = {
        "file": pa.array(["a/b.mp3"] * n_frames, pa.string()),
        "start": pa.array(start, pa.float64()),
        "end": pa.array(start + SPEC.frame_length / SPEC.sample_rate, pa.float64()),
    }
    for column, name in enumerate(CLASSES):
        expected[f"activation_{name}"] = pa.array(activations[:, column], pa.float32())
    for name, threshold in thresholds.items():
        flags = detected(activations[:, CLASSES.index(name)], threshold)
        expected[f"detection_{name}"] = pa.array(flags, pa.bool_())
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
