"""The lab's numbers: real recording, rebuilt YAMNet, model_general_v3 (../shared)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

import buzzdask
from tests.conftest import requires_ffmpeg, requires_shared
from tests.reference import reference_activations

pytestmark = [requires_ffmpeg, requires_shared, pytest.mark.shared_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def real(shared_dir):
    return {
        "audio": shared_dir / "data" / "audio_in",
        "model": shared_dir / "data" / "models" / "model_general_v3",
        "embedder": shared_dir / "models" / "yamnet" / "saved_model_wholehop",
        "golden": json.loads((shared_dir / "data" / "golden" / "testbuzz.json").read_text()),
    }


@pytest.mark.parametrize("chunk_seconds", [0.96, 2.0, 600])
def test_testbuzz_equals_golden(dask_client, real, tmp_path, chunk_seconds):
    result = buzzdask.analyze(
        real["audio"],
        real["model"],
        output=tmp_path / "out",
        client=dask_client,
        embedder=str(real["embedder"]),
        chunk_seconds=chunk_seconds,
        progress=False,
    )
    golden = real["golden"]
    expected = golden["files"]["testbuzz.mp3"]
    complete = [i for i, over in enumerate(expected["overruns_end"]) if not over]
    frame = result.to_pandas()
    assert list(frame.file.unique()) == ["testbuzz.mp3"]
    np.testing.assert_allclose(frame.start, [expected["starts"][i] for i in complete])
    columns = [f"activation_{c}" for c in golden["classes"]]
    np.testing.assert_allclose(
        frame[columns].to_numpy(),
        np.array(expected["activations"])[complete],
        atol=1e-4,
        rtol=0,
    )
    assert len(frame) == expected["complete_frames"]  # the overrunning 7th frame is absent


def test_stereo_field_recording_independent_of_chunking(dask_client, real, tmp_path, make_audio):
    """Channels differ; 3 chunk sizes (one not a multiple of the hop) equal a whole-file pass."""
    path = make_audio("stereo.mp3", n_samples=44100 * 9 + 1234, rate=44100, channels=2)
    mp3 = tmp_path / "stereo128k.mp3"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-b:a", "128k", str(mp3)], check=True)
    starts, expected = reference_activations(mp3, embedder=real["embedder"], model=real["model"])
    for chunk_seconds in (1.0, 2.5, 600):
        result = buzzdask.analyze(
            mp3,
            real["model"],
            output=tmp_path / f"out{chunk_seconds}",
            client=dask_client,
            embedder=str(real["embedder"]),
            chunk_seconds=chunk_seconds,
            progress=False,
        )
        frame = result.to_pandas()
        np.testing.assert_array_equal(frame.start.to_numpy(), starts)
        columns = [c for c in frame.columns if c.startswith("activation_")]
        np.testing.assert_allclose(frame[columns].to_numpy(), expected, atol=1e-4, rtol=0)
