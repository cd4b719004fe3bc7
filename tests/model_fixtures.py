"""Tiny TensorFlow SavedModels that stand in for YAMNet and a buzzdetect head in tests.

`build_tiny_yamnet` writes a SavedModel with the interface of TF Hub ``google/yamnet/1``
(and of the rebuilt YAMNet under ``shared/models/yamnet``). Its front end is YAMNet's own:
the same padding, STFT, log-mel and patch framing, so patch counts and the samples that
each patch depends on are exactly those of the real model. Only the network is replaced by a
cheap, fixed, seeded projection.

`build_tiny_head` writes a buzzdetect-format model directory: a SavedModel whose
``serving_default`` signature maps ``input`` (embeddings) to ``dense`` (raw logits), and a
``config_model.json`` next to it.

Both builders are deterministic for a given ``seed`` (weights come from
`numpy.random.default_rng`) and build in under a second once TensorFlow is imported. The tiny
YAMNet is about 4.5 MB on disk with 1024-wide embeddings; the head is about 40 kB.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
import tempfile
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "MIN_NUM_SAMPLES",
    "NUM_CLASSES",
    "SAMPLE_RATE",
    "build_tiny_head",
    "build_tiny_yamnet",
    "patch_hop_samples",
]

# YAMNet params.py values.
SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
MEL_BANDS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.001
PATCH_WINDOW_SECONDS = 0.96
NUM_CLASSES = 521

STFT_WINDOW_SAMPLES = 400  # round(16000 * 0.025)
STFT_HOP_SAMPLES = 160  # round(16000 * 0.010)
FFT_LENGTH = 512  # next power of two >= 400
PATCH_FRAMES = 96  # round(0.96 / 0.010)
#: ``int((0.96 + 0.025 - 0.010) * 16000)``: the samples that one patch covers.
MIN_NUM_SAMPLES = 15600

_POOL_BLOCKS = 8  # the 96 frames of a patch are averaged in 8 blocks of 12 frames
_LOG_MEL_CENTRE = -4.0  # log-mel of quiet audio sits near log(0.001) = -6.9
_LOG_MEL_SCALE = 3.0


def patch_hop_samples(patch_hop_seconds: float) -> int:
    """Return the patch hop in samples, checking it is a whole number of STFT hops.

    Parameters
    ----------
    patch_hop_seconds : float
        Patch hop in seconds, e.g. 0.96 (buzzdetect's whole hop) or 0.48 (YAMNet's default).

    Returns
    -------
    int
        The hop in samples at 16 kHz (15360 for 0.96 s, 7680 for 0.48 s).

    Raises
    ------
    ValueError
        If the hop is not positive or not a whole multiple of the 10 ms STFT hop.
    """
    hop_frames = round(patch_hop_seconds / STFT_HOP_SECONDS)
    if hop_frames < 1 or not math.isclose(
        hop_frames * STFT_HOP_SECONDS, patch_hop_seconds, rel_tol=0.0, abs_tol=1e-9
    ):
        raise ValueError(
            f"patch_hop_seconds must be a positive multiple of {STFT_HOP_SECONDS} s, "
            f"got {patch_hop_seconds!r}"
        )
    return hop_frames * STFT_HOP_SAMPLES


def _write_class_map(path: pathlib.Path) -> None:
    """Write a synthetic 521-row class map in the format of ``yamnet_class_map.csv``.

    Display names contain a comma (as many real ones do) so that readers must parse quoted
    CSV fields.
    """
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "mid", "display_name"])
        for i in range(NUM_CLASSES):
            writer.writerow([i, f"/m/tiny{i:03d}", f"Tiny class {i:03d}, synthetic"])


class _TinyYamnet(tf.Module):
    """A `tf.Module` with YAMNet's front end and a fixed random projection as the network."""

    def __init__(
        self,
        *,
        patch_hop_seconds: float,
        seed: int,
        embedding_size: int,
        class_map_file: pathlib.Path,
    ) -> None:
        super().__init__(name="tiny_yamnet")
        hop_samples = patch_hop_samples(patch_hop_seconds)
        self._hop_samples = hop_samples
        self._hop_frames = hop_samples // STFT_HOP_SAMPLES
        self._embedding_size = embedding_size

        rng = np.random.default_rng(seed)
        n_pooled = _POOL_BLOCKS * MEL_BANDS
        proj = rng.standard_normal((n_pooled, embedding_size)) / math.sqrt(n_pooled)
        # The bias keeps embeddings of spectra that differ only by a constant level from
        # being collinear.
        proj_bias = 0.5 * rng.standard_normal(embedding_size)
        cls = rng.standard_normal((embedding_size, NUM_CLASSES)) * (2.0 / math.sqrt(embedding_size))
        cls_bias = rng.standard_normal(NUM_CLASSES) - 2.0
        self.proj = tf.Variable(proj.astype(np.float32), trainable=False, name="proj")
        self.proj_bias = tf.Variable(proj_bias.astype(np.float32), trainable=False, name="proj_b")
        self.cls = tf.Variable(cls.astype(np.float32), trainable=False, name="cls")
        self.cls_bias = tf.Variable(cls_bias.astype(np.float32), trainable=False, name="cls_b")
        self._class_map_asset = tf.saved_model.Asset(str(class_map_file))

    def _pad_waveform(self, waveform: tf.Tensor) -> tf.Tensor:
        """Pad as YAMNet's ``features.pad_waveform``: one whole patch, then whole hops."""
        num_samples = tf.shape(waveform)[0]
        num_padding = tf.maximum(0, MIN_NUM_SAMPLES - num_samples)
        after_first = tf.maximum(num_samples, MIN_NUM_SAMPLES) - MIN_NUM_SAMPLES
        hops_after_first = (after_first + self._hop_samples - 1) // self._hop_samples
        num_padding += hops_after_first * self._hop_samples - after_first
        return tf.pad(waveform, [[0, num_padding]], mode="CONSTANT", constant_values=0.0)

    def _log_mel_patches(self, waveform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Return ``(log_mel [M, 64], patches [N, 96, 64])`` as YAMNet's front end does."""
        magnitude = tf.abs(
            tf.signal.stft(
                waveform,
                frame_length=STFT_WINDOW_SAMPLES,
                frame_step=STFT_HOP_SAMPLES,
                fft_length=FFT_LENGTH,
                window_fn=tf.signal.hann_window,
                pad_end=False,
            )
        )
        mel_matrix = tf.signal.linear_to_mel_weight_matrix(
            num_mel_bins=MEL_BANDS,
            num_spectrogram_bins=FFT_LENGTH // 2 + 1,
            sample_rate=SAMPLE_RATE,
            lower_edge_hertz=MEL_MIN_HZ,
            upper_edge_hertz=MEL_MAX_HZ,
        )
        log_mel = tf.math.log(tf.matmul(magnitude, mel_matrix) + LOG_OFFSET)
        patches = tf.signal.frame(
            log_mel, frame_length=PATCH_FRAMES, frame_step=self._hop_frames, axis=0
        )
        return log_mel, patches

    def _embed(self, patches: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Map patches ``[N, 96, 64]`` to ``(scores [N, 521], embeddings [N, E])``.

        Each patch goes through its own ``[1, K] @ [K, E]`` products (`tf.map_fn`), so its
        result is bit-identical whatever the batch around it: a batched matmul sums in an
        order that depends on N (``[6, 512] @ W`` and ``[1, 512] @ W`` differ by ~3e-6).
        """
        blocks = tf.reshape(patches, [-1, _POOL_BLOCKS, PATCH_FRAMES // _POOL_BLOCKS, MEL_BANDS])
        pooled = tf.reshape(tf.reduce_mean(blocks, axis=2), [-1, _POOL_BLOCKS * MEL_BANDS])
        pooled = (pooled - _LOG_MEL_CENTRE) / _LOG_MEL_SCALE

        def one_patch(row: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            embedding = tf.tanh(tf.matmul(row[tf.newaxis], self.proj) + self.proj_bias)
            score = tf.sigmoid(tf.matmul(embedding, self.cls) + self.cls_bias)
            return score[0], embedding[0]

        return tf.map_fn(
            one_patch,
            pooled,
            fn_output_signature=(
                tf.TensorSpec([NUM_CLASSES], tf.float32),
                tf.TensorSpec([self._embedding_size], tf.float32),
            ),
        )

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="waveform")])
    def __call__(self, waveform: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Score a 16 kHz mono waveform: ``(scores [N,521], embeddings [N,E], log_mel [M,64])``."""
        log_mel, patches = self._log_mel_patches(self._pad_waveform(waveform))
        scores, embeddings = self._embed(patches)
        return scores, embeddings, log_mel

    @tf.function(
        input_signature=[tf.TensorSpec([None, PATCH_FRAMES, MEL_BANDS], tf.float32, name="patches")]
    )
    def embed_patches(self, patches: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Score log-mel patches that are already framed: ``(scores, embeddings)``."""
        return self._embed(patches)

    @tf.function(input_signature=[])
    def class_map_path(self) -> tf.Tensor:
        """Return the path of the ``yamnet_class_map.csv`` asset."""
        return self._class_map_asset.asset_path


def build_tiny_yamnet(
    path: str | pathlib.Path,
    *,
    patch_hop_seconds: float = 0.96,
    seed: int = 0,
    embedding_size: int = 1024,
) -> pathlib.Path:
    """Save a tiny stand-in for YAMNet with YAMNet's interface and exact framing.

    The SavedModel loads with `tensorflow_hub.load` and `tf.saved_model.load`, and provides:

    - ``m(waveform)`` for a 1-D float32 waveform (16 kHz) returning
      ``(scores [N, 521], embeddings [N, embedding_size], log_mel [M, 64])``;
    - ``m.signatures["serving_default"](waveform=...)`` returning ``output_0``, ``output_1``
      and ``output_2`` in that order;
    - ``m.embed_patches(patches [N, 96, 64])`` returning ``(scores, embeddings)``;
    - ``m.class_map_path()`` returning the path of the ``yamnet_class_map.csv`` asset
      (521 synthetic rows, ``index,mid,display_name``).

    Padding, STFT (25 ms periodic Hann, 10 ms hop, FFT 512), 64-band log-mel (125-7500 Hz,
    ``log(mel + 0.001)``) and 96-frame patching are YAMNet's. A waveform of
    ``15600 + (n - 1) * hop`` samples therefore gives exactly ``n`` patches, and patch ``i``
    depends only on samples ``[i * hop, i * hop + 15600)``. The embedding averages each patch
    over 8 blocks of 12 frames, projects with a fixed random matrix and applies ``tanh``;
    scores are a sigmoid of a fixed random projection of the embedding.

    Parameters
    ----------
    path : str or pathlib.Path
        Directory to write the SavedModel to (created if missing; SavedModel files in it are
        overwritten).
    patch_hop_seconds : float, default 0.96
        Patch hop in seconds; a positive multiple of 0.01 (0.96 is buzzdetect's
        ``yamnet_wholehop``, 0.48 is the TF Hub default).
    seed : int, default 0
        Seed of the fixed random weights.
    embedding_size : int, default 1024
        Width of the embeddings.

    Returns
    -------
    pathlib.Path
        The SavedModel directory.

    Raises
    ------
    ValueError
        If ``patch_hop_seconds`` is not a positive multiple of 0.01 s or ``embedding_size``
        is not positive.
    """
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be positive, got {embedding_size!r}")
    path = pathlib.Path(path)
    with tempfile.TemporaryDirectory(prefix="tiny_yamnet_assets_") as tmp:
        class_map_file = pathlib.Path(tmp) / "yamnet_class_map.csv"
        _write_class_map(class_map_file)
        module = _TinyYamnet(
            patch_hop_seconds=patch_hop_seconds,
            seed=seed,
            embedding_size=embedding_size,
            class_map_file=class_map_file,
        )
        tf.saved_model.save(
            module,
            str(path),
            signatures={"serving_default": module.__call__.get_concrete_function()},
        )
    return path


class _TinyHead(tf.Module):
    """A fixed dense layer from embeddings to logits, shaped like a buzzdetect head."""

    def __init__(self, *, embedding_size: int, n_classes: int, seed: int) -> None:
        super().__init__(name="tiny_head")
        rng = np.random.default_rng(seed)
        kernel = rng.standard_normal((embedding_size, n_classes)) * (
            4.0 / math.sqrt(embedding_size)
        )
        bias = 0.5 * rng.standard_normal(n_classes)
        self.kernel = tf.Variable(kernel.astype(np.float32), trainable=False, name="kernel")
        self.bias = tf.Variable(bias.astype(np.float32), trainable=False, name="bias")
        # Trace both functions for this embedding size; the SavedModel keeps these traces.
        spec = tf.TensorSpec([None, embedding_size], tf.float32, name="input")
        self.__call__.get_concrete_function(spec)
        self.serve.get_concrete_function(spec)

    @tf.function
    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """Return raw logits ``[N, n_classes]``, as calling a loaded Keras head does."""
        return tf.matmul(x, self.kernel) + self.bias

    @tf.function
    def serve(self, input: tf.Tensor) -> dict[str, tf.Tensor]:
        """Serving signature: keyword ``input`` to ``{"dense": logits}``."""
        return {"dense": tf.matmul(input, self.kernel) + self.bias}


def build_tiny_head(
    path: str | pathlib.Path,
    *,
    classes: Sequence[str],
    embedding_size: int = 1024,
    seed: int = 0,
    embedder_name: str = "yamnet_k2",
    digits_results: int = 2,
) -> pathlib.Path:
    """Write a tiny buzzdetect-format model directory (SavedModel head + ``config_model.json``).

    The SavedModel's ``serving_default`` signature has the form of
    ``model_general_v3``'s: ``inputs['input']`` float32 ``(-1, embedding_size)`` to
    ``outputs['dense']`` float32 ``(-1, len(classes))``, raw logits of a fixed seeded dense
    layer. The loaded object is also callable, ``m(x)``, returning the logits tensor, as a
    loaded Keras head is. ``config_model.json`` holds ``classes``, ``embeddername`` and
    ``digits_results``.

    Parameters
    ----------
    path : str or pathlib.Path
        Model directory to write (created; files in it are overwritten).
    classes : sequence of str
        Class names, in output-column order.
    embedding_size : int, default 1024
        Width of the input embeddings.
    seed : int, default 0
        Seed of the fixed random weights.
    embedder_name : str, default "yamnet_k2"
        Value of ``embeddername`` in ``config_model.json``.
    digits_results : int, default 2
        Value of ``digits_results`` in ``config_model.json``.

    Returns
    -------
    pathlib.Path
        The model directory.

    Raises
    ------
    ValueError
        If ``classes`` is empty or has duplicates, or ``embedding_size`` is not positive.
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise ValueError("classes must not be empty")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be unique, got {classes!r}")
    if embedding_size < 1:
        raise ValueError(f"embedding_size must be positive, got {embedding_size!r}")
    path = pathlib.Path(path)
    module = _TinyHead(embedding_size=embedding_size, n_classes=len(classes), seed=seed)
    spec = tf.TensorSpec([None, embedding_size], tf.float32, name="input")
    tf.saved_model.save(
        module,
        str(path),
        signatures={"serving_default": module.serve.get_concrete_function(spec)},
    )
    config = {
        "classes": classes,
        "embeddername": embedder_name,
        "digits_results": digits_results,
    }
    (path / "config_model.json").write_text(json.dumps(config), encoding="utf-8")
    return path
