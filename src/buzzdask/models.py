"""Models: a buzzdetect model directory (config + head SavedModel) and its embedder.

Resolving a model (:func:`resolve_model`) reads only files, so the client never imports
TensorFlow (except to download an embedder once: :mod:`buzzdask.embedders`);
:func:`load_embedder` and :func:`load_head` run where scoring happens. Workers always get the
embedder as a local SavedModel directory, so they never need the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from buzzdask.embedders import is_remote, local_embedder, saved_model_problem
from buzzdask.errors import ModelError, ParameterError
from buzzdask.frames import FrameSpec, seconds_to_samples
from buzzdask.inputs import as_list
from buzzdask.settings import EmbedderSettings, Settings, load_settings

__all__ = [
    "HEAD_WEIGHTS",
    "EmbedderSpec",
    "ModelSpec",
    "directory_sha256",
    "feed_file",
    "find_model_dir",
    "head_weights",
    "load_embedder",
    "load_head",
    "save_head_weights",
    "resolve_embedder",
    "resolve_model",
]

CONFIG_NAME = "config_model.json"
#: The same JSON under the name buzzdetect's trainer gave it until 2025 (and its analyzer read).
EARLIER_CONFIG_NAME = "config_model.txt"
#: A dense head's weights as NumPy arrays, beside its SavedModel (``buzzdask train`` writes it).
HEAD_WEIGHTS = "head_weights.npz"
# What the weights are checked against: the SavedModel they were read from.
_SAVED_MODEL_FILES = ("saved_model.pb", "variables")
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0, dtype=np.float32),
}


@dataclass(frozen=True)
class EmbedderSpec:
    """An embedder and the frame geometry its models were trained on.

    The preprocessing (mean of channels, soxr) is fixed: :data:`buzzdask.decode.PREPROCESSING`.

    Parameters
    ----------
    name : str
        The name model configs use (``"yamnet_k2"``).
    handle : str
        The local SavedModel directory workers load (absolute).
    sample_rate : int [Hz]
    frame_length_s : float [s]
        One embedding's frame.
    frame_context_s : float [s]
        Audio read past a frame's end.
    sha256 : str or None
        Content hash of the directory.
    source : str or None
        The URL it was downloaded from (into the cache); None when given as a directory.
    """

    name: str
    handle: str
    sample_rate: int
    frame_length_s: float
    frame_context_s: float
    sha256: str | None = None
    source: str | None = None

    def frame_spec(self, frame_hop_s: float | None = None) -> FrameSpec:
        """Frame geometry with hop ``frame_hop_s`` (default: one whole frame).

        Raises
        ------
        ParameterError
            The embedder's frame length or context is no whole number of samples at its rate
            (its ``buzzdask.embedders`` entry named), or ``frame_hop_s`` is not.
        """
        entry = f"buzzdask.embedders.{self.name}"
        for key, seconds in (
            ("frame-length-seconds", self.frame_length_s),
            ("frame-context-seconds", self.frame_context_s),
        ):
            try:
                seconds_to_samples(seconds, self.sample_rate, name=f"{entry}.{key}")
            except ParameterError as error:
                raise ParameterError(f"{error}, or another {entry}.sample-rate") from None
        return FrameSpec.from_seconds(
            sample_rate=self.sample_rate,
            frame_length_s=self.frame_length_s,
            frame_hop_s=self.frame_length_s if frame_hop_s is None else frame_hop_s,
            context_s=self.frame_context_s,
        )


@dataclass(frozen=True)
class ModelSpec:
    """A buzzdetect model directory, resolved and hashed.

    Parameters
    ----------
    name : str
        Directory name (``"model_general_v3"``).
    path : str
        Absolute path of the directory holding ``config_model.json`` and the head SavedModel.
    classes : tuple of str
        Output classes in column order.
    embedder : EmbedderSpec
    digits_results : int or None
        Decimals the lab rounds activations to in CSV (buzzdask stores raw float32).
    sha256 : str
        Content hash of the config and the SavedModel files.
    """

    name: str
    path: str
    classes: tuple[str, ...]
    embedder: EmbedderSpec
    digits_results: int | None
    sha256: str

    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready description for run metadata."""
        return asdict(self)


def directory_sha256(path: str | os.PathLike[str], *, names: Sequence[str] | None = None) -> str:
    """SHA-256 over the relative paths and contents of the files under ``path``.

    Parameters
    ----------
    path : str or path-like
        A directory.
    names : sequence of str, optional
        Only these top-level entries (files or directories); default every file.
    """
    root = Path(path)
    tops = [root / name for name in names] if names is not None else [root]
    files: list[Path] = []
    for top in tops:
        if top.is_file():
            files.append(top)
        elif top.is_dir():
            files.extend(p for p in top.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(file.relative_to(root).as_posix().encode())
        feed_file(digest, file)
    return digest.hexdigest()


def feed_file(digest: hashlib._Hash, path: str | os.PathLike[str]) -> None:
    """Feed ``digest`` a file's content.

    Read into one buffer, unbuffered (as ``hashlib.file_digest`` of Python 3.11 does): 1.9
    against 2.5 CPU-ms for a 30-second WAV (2.9 MB) read in new 1 MiB blocks.
    """
    block = bytearray(1 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as stream:
        while size := stream.readinto(block):
            digest.update(view[:size])


def resolve_embedder(
    name: str,
    *,
    handle: str | None = None,
    settings: Settings | None = None,
    fetching: bool = False,
) -> EmbedderSpec:
    """Look up an embedder by name in ``buzzdask.embedders`` (``handle`` overrides its handle).

    A URL handle is downloaded once into the cache (:func:`buzzdask.embedders.local_embedder`,
    which takes ``fetching``); the result names the local directory and its content hash.
    ``settings`` are the run's (default: :func:`~buzzdask.settings.load_settings`).

    Raises
    ------
    ParameterError
        If ``handle`` is empty (it would have meant the configured one, silently).
    ModelError
        If the name is unknown, or the handle is not a complete SavedModel directory and cannot
        be downloaded (one line naming the handle, the cause and the fix).
    """
    if handle is not None and not str(handle).strip():
        raise ParameterError(
            f"embedder={handle!r} is empty: give a TF Hub URL or a SavedModel directory, or "
            f"leave it out for the configured one (buzzdask.embedders.{name}.handle)"
        )
    settings = settings or load_settings()
    known = settings.embedders
    if name not in known:
        raise ModelError(
            f"unknown embedder {name!r}; known: {sorted(known)}. {_how_to_add(name, known)}"
        )
    configured = known[name]
    given = str(handle or configured.handle)
    path = local_embedder(given, name=name, settings=settings, fetching=fetching)
    return EmbedderSpec(
        name=name,
        handle=str(path),
        sample_rate=configured.sample_rate,
        frame_length_s=configured.frame_length_seconds,
        frame_context_s=configured.frame_context_seconds,
        sha256=directory_sha256(path),
        source=given if is_remote(given) else None,
    )


def _how_to_add(name: str, known: Mapping[str, EmbedderSettings]) -> str:
    """Where and what to add for an embedder buzzdask does not know, from a known one's."""
    like = "yamnet_k2" if "yamnet_k2" in known else min(known, default=None)
    keys = "handle: ..., sample-rate: ..., frame-length-seconds: ..., frame-context-seconds: ..."
    if like is not None:
        spec = known[like]
        keys = (
            f"handle: {spec.handle}, sample-rate: {spec.sample_rate}, frame-length-seconds: "
            f"{spec.frame_length_seconds}, frame-context-seconds: {spec.frame_context_seconds}"
        )
    earlier = " (buzzdetect's models before 2025-09 name TF Hub's YAMNet 'yamnet')"
    return (
        "Add it under buzzdask.embedders in the dask config (~/.config/dask/buzzdask.yaml)"
        + (f", e.g. with {like}'s settings" if like else "")
        + f": buzzdask: {{embedders: {{{name}: {{{keys}}}}}}}"
        + (earlier if name == "yamnet" else "")
    )


def resolve_model(
    model: str | os.PathLike[str],
    *,
    embedder: str | EmbedderSpec | None = None,
    search_dirs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    settings: Settings | None = None,
) -> ModelSpec:
    """Find a model directory by path or name, read its configuration, resolve its embedder.

    Resolving the embedder makes it ready to load: a TF Hub handle (the configured one unless
    ``embedder`` is given) is downloaded into the cache here, on the client, the first time;
    offline, give a local SavedModel directory as ``embedder``.

    Parameters
    ----------
    model : str or path-like
        A directory, or a name looked up in ``search_dirs`` (``"general_v3"`` also finds
        ``model_general_v3``).
    embedder : str or EmbedderSpec, optional
        Embedder handle overriding the configured one (TF Hub URL or local directory); a URL
        is downloaded into the cache here, on the client. Or the embedder itself, resolved
        already (a store's, :func:`~buzzdask.store.stored_embedder`): the model's must have its
        name.
    search_dirs : path-like or sequence of path-like, optional
        Where names are looked up; default ``buzzdask.model-dirs``.
    settings : Settings, optional
        The run's settings (default: :func:`~buzzdask.settings.load_settings`).

    Returns
    -------
    ModelSpec

    Raises
    ------
    ModelError
        If the directory is missing or is not a buzzdetect model, or its embedder cannot be
        found or downloaded.
    """
    settings = settings or load_settings()
    path = find_model_dir(model, settings.model_dirs if search_dirs is None else search_dirs)
    config_path = model_config_path(path)
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            f"{path} is not a buzzdetect model: no {CONFIG_NAME} (nor {EARLIER_CONFIG_NAME})"
        ) from None
    except json.JSONDecodeError as error:
        raise ModelError(f"{config_path}: invalid JSON ({error})") from None
    if not isinstance(model_config, dict):
        raise ModelError(f"{config_path}: not a JSON object of the model's settings")
    classes = model_config.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ModelError(f"{config_path}: 'classes' must be a non-empty list of names")
    if not all(name.strip() for name in classes):
        # Its column would be "activation_", and no --threshold could name it.
        raise ModelError(f"{config_path}: a class has an empty name ({classes})")
    if len(set(classes)) != len(classes):
        raise ModelError(f"{config_path}: duplicate class names in {classes}")
    # buzzdetect read its earlier models' "embedder" as "embeddername".
    embedder_name = model_config.get("embeddername", model_config.get("embedder"))
    if not isinstance(embedder_name, str) or not embedder_name:
        raise ModelError(f"{config_path}: no 'embeddername' (the embedder's name, e.g. yamnet_k2)")
    if problem := saved_model_problem(path):
        raise ModelError(_head_problem(path, problem))
    digits = model_config.get("digits_results")
    whole = isinstance(digits, int) and not isinstance(digits, bool) and digits >= 0
    if digits is not None and not whole:
        raise ModelError(
            f"{config_path}: 'digits_results' {digits!r} must be a whole number >= 0 (the "
            "decimals results keep) or absent (all of them)"
        )
    if not isinstance(embedder, EmbedderSpec):
        embedder = resolve_embedder(embedder_name, handle=embedder, settings=settings)
    elif embedder.name != embedder_name:
        raise ModelError(
            f"{path.name} is a head on embedder {embedder_name!r}, not on {embedder.name!r} "
            f"({embedder.handle})"
        )
    return ModelSpec(
        name=path.name,
        path=str(path),
        classes=tuple(classes),
        embedder=embedder,
        digits_results=digits,
        sha256=model_sha256(path),
    )


def model_config_path(path: Path) -> Path:
    """A model directory's ``config_model.json``, else an earlier buzzdetect's ``.txt`` there."""
    if not (path / CONFIG_NAME).is_file() and (path / EARLIER_CONFIG_NAME).is_file():
        return path / EARLIER_CONFIG_NAME
    return path / CONFIG_NAME


def model_sha256(path: Path) -> str:
    """The hash a run records of its model: its configuration and head (not its tests/)."""
    names = [model_config_path(path).name, *_SAVED_MODEL_FILES]
    return directory_sha256(path, names=names)


def _head_problem(path: Path, problem: str) -> str:
    """Why the head in ``path`` cannot load, and how to make one from a Keras file there."""
    files = sorted(p.name for p in path.iterdir() if p.suffix in (".keras", ".h5"))
    keras = [name for name in files if not name.endswith(".weights.h5")]
    if not keras and files:  # Model.save_weights: no architecture to load it into
        return (
            f"the head must be a TF SavedModel: {problem}; {path} holds {files[0]}, weights "
            "only: build the head's Keras model again, then model.load_weights("
            f"'{path / files[0]}') and model.export('{path}')"
        )
    if not keras:
        return f"the head must be a TF SavedModel: {problem}"
    return (
        f"the head must be a TF SavedModel: {problem}; {path} holds {keras[0]}, which can be "
        f"exported as one: keras.models.load_model('{path / keras[0]}').export('{path}')"
    )


def find_model_dir(
    model: str | os.PathLike[str], search_dirs: str | os.PathLike[str] | Sequence[Any]
) -> Path:
    """The directory of ``model``: a path, or a name (``general_v3``) under ``search_dirs``.

    Raises
    ------
    ModelError
        If there is none.
    """
    direct = Path(model).expanduser()
    if direct.is_dir():
        return direct.resolve()
    search_dirs = as_list(search_dirs)
    name = str(model)
    candidates = [Path(d).expanduser() / n for d in search_dirs for n in (name, f"model_{name}")]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    if direct.is_file():
        raise ModelError(
            f"model {name!r} is a file: give the model's directory, the folder that holds it "
            f"({direct.parent})"
        )
    # Absolute: the default "models" is the current directory's, which a batch job may not share.
    searched = [str(Path(d).expanduser().absolute()) for d in search_dirs]
    raise ModelError(
        f"model {name!r} not found: not a directory, nor in {searched} "
        f"(set buzzdask.model-dirs or give the model's path)"
    )


def load_embedder(handle: str) -> Any:
    """Load an embedder's local SavedModel directory (resolved above) as ``tensorflow_hub.load``.

    ``tf.saved_model.load`` is what ``tensorflow_hub.load`` calls for a local TF2 SavedModel;
    called directly, it spares the scorer importing ``tensorflow_hub`` (with
    ``pkg_resources``), which was on the critical path of every run's start: the embedder
    loaded 0.2-0.5 s sooner. Downloads still go through ``tensorflow_hub`` (:mod:`.embedders`).
    """
    import tensorflow as tf

    try:
        return tf.saved_model.load(handle)
    except Exception as error:
        raise ModelError(f"cannot load embedder {handle!r}: {error}") from error


def save_head_weights(path: str | os.PathLike[str], layers: Sequence[Any]) -> Path:
    """Write a dense head's weights beside its SavedModel (:data:`HEAD_WEIGHTS`).

    Parameters
    ----------
    path : path-like
        The head's directory, its SavedModel already saved there.
    layers : sequence of (kernel, bias, activation)
        Each dense layer in order: ``kernel [shape=(d_in, d_out)]``, ``bias [shape=(d_out,)]``
        and ``"relu"`` or ``"linear"``.

    Returns
    -------
    Path
        The file written. It records the SavedModel's content hash: a head saved again
        over it makes it stale, and it is then not used.
    """
    arrays: dict[str, Any] = {
        "saved_model_sha256": np.array(directory_sha256(path, names=_SAVED_MODEL_FILES)),
        "activations": np.array([activation for _, _, activation in layers]),
    }
    for index, (kernel, bias, _) in enumerate(layers):
        arrays[f"kernel_{index}"] = np.asarray(kernel, np.float32)
        arrays[f"bias_{index}"] = np.asarray(bias, np.float32)
    target = Path(path) / HEAD_WEIGHTS
    np.savez(target, **arrays)
    return target


def head_weights(path: str | os.PathLike[str]) -> list[tuple[np.ndarray, np.ndarray, str]] | None:
    """A head's dense layers from :data:`HEAD_WEIGHTS`, if it is there and matches the head.

    ``None`` without the file, or when it was not read from the SavedModel now in ``path``
    (another head saved over it), or names an activation NumPy does not evaluate here.
    """
    file = Path(path) / HEAD_WEIGHTS
    if not file.is_file():
        return None
    with np.load(file) as stored:
        if str(stored["saved_model_sha256"]) != directory_sha256(path, names=_SAVED_MODEL_FILES):
            return None
        activations = [str(a) for a in stored["activations"]]
        if not set(activations) <= set(_ACTIVATIONS):
            return None
        return [
            (stored[f"kernel_{i}"], stored[f"bias_{i}"], activation)
            for i, activation in enumerate(activations)
        ]


def load_head(path: str) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """Load a head: its NumPy weights when they match it (no TensorFlow), else its SavedModel.

    The SavedModel's ``serving_default`` signature is what a head is; the weights a training
    exported beside it (:func:`head_weights`) compute the same activations, to float32
    rounding, without TensorFlow's import (seconds): a re-scoring with such heads needs none.

    Returns
    -------
    score : callable
        ``score(embeddings [shape=(n, d), float32]) -> activations [shape=(n, n_classes)]``.
    input_size : int
        ``d``, the embedding size the head expects.
    """
    layers = head_weights(path)
    if layers is not None:
        return _dense_head(layers), int(layers[0][0].shape[0])
    return _saved_model_head(path)


def _dense_head(
    layers: list[tuple[np.ndarray, np.ndarray, str]],
) -> Callable[[np.ndarray], np.ndarray]:
    def score(embeddings: np.ndarray) -> np.ndarray:
        values = np.asarray(embeddings, np.float32)
        for kernel, bias, activation in layers:
            values = _ACTIVATIONS[activation](values @ kernel + bias)
        return values

    return score


def _saved_model_head(path: str) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """The head SavedModel's ``serving_default`` signature, with TensorFlow."""
    import tensorflow as tf

    try:
        signatures = tf.saved_model.load(path).signatures
    except Exception as error:  # a damaged copy: OSError, ValueError, IndexError...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ModelError(
            f"cannot load the head SavedModel in {path} ({type(error).__name__}: {reason}): a "
            "copy cut short? Copy the model directory again"
        ) from error
    if "serving_default" not in signatures:
        raise ModelError(
            f"head in {path}: no serving_default signature (it has {sorted(signatures)}); "
            "export the head with one"
        )
    signature = signatures["serving_default"]
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"head in {path}: serving_default must take one input and give one output, "
            f"has inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    (input_name, input_spec), (output_name,) = next(iter(inputs.items())), list(outputs)
    input_size = input_spec.shape[-1]

    def score(embeddings: np.ndarray) -> np.ndarray:
        result = signature(**{input_name: tf.constant(embeddings, dtype=tf.float32)})
        activations = result[output_name].numpy()
        # A one-class head may give one value per frame (a Dense(1) squeezed): one column, as
        # buzzdetect's DataFrame of it.
        return activations[:, np.newaxis] if activations.ndim == 1 else activations

    return score, int(input_size) if input_size is not None else -1
