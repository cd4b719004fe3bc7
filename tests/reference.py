"""The plain computation buzzdask must reproduce: whole file decoded, framed, scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from buzzdask.decode import decode_file
from buzzdask.frames import FrameSpec

SPEC_KW = {"sample_rate": 16000, "frame_length_s": 0.96, "context_s": 0.015}


def reference_activations(
    audio: Path | np.ndarray, *, embedder: Path, model: Path, frame_hop_s: float = 0.96
) -> tuple[np.ndarray, np.ndarray]:
    """Return (starts [s], activations [n_frames, n_classes]) for complete frames only.

    Each frame is embedded from its own window ``[start, start + 0.975 s)``, zero-padded past the
    end of the file as YAMNet pads a whole file; the overrunning last frame is dropped.
    """
    waveform = decode_file(audio, sample_rate=16000) if isinstance(audio, Path) else audio
    spec = FrameSpec.from_seconds(frame_hop_s=frame_hop_s, **SPEC_KW)
    n_frames = spec.n_complete_frames(len(waveform))
    embed = tf.saved_model.load(str(embedder))
    head = tf.saved_model.load(str(model)).signatures["serving_default"]
    padded = np.concatenate([waveform, np.zeros(spec.window, np.float32)])
    rows = []
    for index in range(n_frames):
        start = index * spec.hop_length
        _, embeddings, _ = embed(tf.constant(padded[start : start + spec.window]))
        assert embeddings.shape[0] == 1
        rows.append(embeddings.numpy()[0])
    if not rows:
        return np.zeros(0), np.zeros((0, 0), np.float32)
    activations = head(input=tf.constant(np.stack(rows)))["dense"].numpy()
    starts = np.arange(n_frames) * spec.hop_length / spec.sample_rate
    return starts, activations
