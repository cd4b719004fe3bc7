"""Shared fixtures: real ffmpeg, real Dask worker processes, tiny real SavedModels, shared data.

The shared data (a real recording, the lab's model, the rebuilt YAMNet) is found through one
path: ``$BUZZDASK_SHARED_DIR``, else ``../shared`` beside the repository. Tests that need it
skip with the reason when it is absent; with ``BUZZDASK_REQUIRE_SHARED=1`` (CI) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("BUZZDASK_SHARED_DIR", REPO.parent / "shared")).resolve()
CLASSES = ["ins_buzz", "ambient_noise", "mech_plane"]
HAS_FFMPEG = shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def _require(
    condition: bool, reason: str, *, strict_env: str | None = None
) -> pytest.MarkDecorator:
    if strict_env and os.environ.get(strict_env) == "1" and not condition:
        raise RuntimeError(f"{strict_env}=1 but: {reason}")
    return pytest.mark.skipif(not condition, reason=reason)


requires_ffmpeg = _require(HAS_FFMPEG, "ffmpeg/ffprobe not on PATH (apt-get install ffmpeg)")
requires_shared = _require(
    (SHARED_DIR / "data" / "golden" / "testbuzz.json").is_file()
    and (SHARED_DIR / "models" / "yamnet" / "saved_model_wholehop").is_dir(),
    f"shared data not found at {SHARED_DIR} (set BUZZDASK_SHARED_DIR)",
    strict_env="BUZZDASK_REQUIRE_SHARED",
)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return SHARED_DIR


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A YAMNet-shaped SavedModel (YAMNet's own framing, 0.96 s patch hop)."""
    from tests.model_fixtures import build_tiny_yamnet

    return build_tiny_yamnet(tmp_path_factory.mktemp("tiny_yamnet"), patch_hop_seconds=0.96)


@pytest.fixture(scope="session")
def tiny_embedder_halfhop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like TF Hub's YAMNet: 0.48 s patch hop."""
    from tests.model_fixtures import build_tiny_yamnet

    return build_tiny_yamnet(tmp_path_factory.mktemp("tiny_yamnet_half"), patch_hop_seconds=0.48)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A buzzdetect-format model directory with a tiny head over 1024-d embeddings."""
    from tests.model_fixtures import build_tiny_head

    return build_tiny_head(tmp_path_factory.mktemp("models") / "model_tiny", classes=CLASSES)


@pytest.fixture(scope="session")
def dask_client() -> Iterator[object]:
    """A real local cluster of two worker processes, shared by the session."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def write_wav(path: Path, samples: np.ndarray, rate: int) -> Path:
    """16-bit PCM WAV; ``samples`` has shape (n,) or (n, channels) in [-1, 1]."""
    data = np.asarray(samples, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    pcm = np.clip(np.round(data * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as stream:
        stream.setnchannels(data.shape[1])
        stream.setsampwidth(2)
        stream.setframerate(rate)
        stream.writeframes(pcm.tobytes())
    return path


def field_like(n_samples: int, rate: int, channels: int = 1, *, seed: int = 0) -> np.ndarray:
    """Noise plus tones and a buzz-like burst, different in every channel: shape (n, channels)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / rate
    columns = []
    for channel in range(channels):
        tone = 0.2 * np.sin(2 * np.pi * (220 + 170 * channel) * t)
        buzz = (
            0.3
            * np.sign(np.sin(2 * np.pi * (180 + 40 * channel) * t))
            * (np.sin(2 * np.pi * 0.2 * t) > 0.5)
        )
        columns.append(tone + buzz + 0.1 * (channel + 1) * rng.standard_normal(n_samples))
    return np.clip(np.stack(columns, axis=1), -0.99, 0.99)


@pytest.fixture
def make_audio(tmp_path: Path) -> Callable[..., Path]:
    """Write a generated recording with an exact number of samples, in any format ffmpeg writes."""

    def make(
        name: str,
        *,
        n_samples: int,
        rate: int = 16000,
        channels: int = 1,
        seed: int = 0,
        directory: Path | None = None,
    ) -> Path:
        target = (directory or tmp_path / "audio") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        wav = target if target.suffix == ".wav" else target.with_name(f".{target.stem}.src.wav")
        write_wav(wav, field_like(n_samples, rate, channels, seed=seed), rate)
        if wav != target:
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), str(target)], check=True)
            wav.unlink()
        return target

    return make
