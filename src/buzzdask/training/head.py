"""The detector head: fitted on the training folds, evaluated on the held-out groups.

The head is fitted with ``tf_keras`` on the client and saved as a SavedModel in buzzdetect's
format (``serving_default``: ``input`` ``(N, embedding_size)`` to ``dense`` ``(N, n_classes)``
logits). The evaluation reads it back through the loader :func:`buzzdask.analyze` uses.
TensorFlow is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from buzzdask.models import load_head, save_head_weights
from buzzdask.preload import import_tensorflow
from buzzdask.session import tensorflow_version

__all__ = ["DIGITS", "evaluate", "fit_and_save", "precision_recall"]

#: Decimals of the evaluation thresholds (buzzdetect rounds activations to 2).
DIGITS = 2


def fit_and_save(
    x_train: np.ndarray,
    y_train: np.ndarray,
    w_train: np.ndarray,
    x_holdout: np.ndarray,
    y_holdout: np.ndarray,
    *,
    directory: Path,
    settings: Mapping[str, Any],
) -> tuple[pd.DataFrame, int, dict[str, str]]:
    """Fit the head (tf_keras, as buzzdetect's heads) and save it as a SavedModel.

    Parameters
    ----------
    x_train : np.ndarray [shape=(n_train, embedding_size), dtype=float32]
    y_train : np.ndarray [shape=(n_train, n_classes), dtype=bool]
        Multi-hot targets.
    w_train : np.ndarray [shape=(n_train,)]
        Sample weights.
    x_holdout, y_holdout : np.ndarray
        The same for the held-out frames (validation: early stopping).
    directory : Path
        Where the SavedModel is written.
    settings : mapping
        ``seed``, ``hidden_units``, ``learning_rate``, ``patience``, ``epochs``,
        ``batch_size``.

    Returns
    -------
    history : pandas.DataFrame
        One row per epoch run.
    best_epoch : int
        The epoch (from 1) whose weights were kept.
    versions : dict
        TensorFlow and tf_keras versions.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import_tensorflow()  # its native start-up lines kept off the command's console
    import tf_keras as keras

    keras.utils.set_random_seed(settings["seed"])
    # The layer names give the serving signature buzzdetect's heads have: input -> dense.
    model = keras.Sequential(name="buzzdask_head")
    model.add(keras.Input(shape=(x_train.shape[1],), name="input"))
    for index, units in enumerate(settings["hidden_units"]):
        model.add(keras.layers.Dense(units, activation="relu", name=f"hidden_{index}"))
    model.add(keras.layers.Dense(y_train.shape[1], activation="linear", name="dense"))
    model.compile(
        optimizer=keras.optimizers.Adam(settings["learning_rate"]),
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        metrics=[keras.metrics.BinaryAccuracy(threshold=0.0, name="binary_accuracy")],
    )
    stop = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=settings["patience"], restore_best_weights=True
    )
    fitted = model.fit(
        x_train,
        y_train.astype(np.float32),
        sample_weight=w_train.astype(np.float32),
        validation_data=(x_holdout, y_holdout.astype(np.float32)),
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    model.save(str(directory), save_format="tf", include_optimizer=False)
    # Its weights for NumPy too: a re-scoring with this head then needs no TensorFlow.
    save_head_weights(
        directory,
        [
            (layer.kernel.numpy(), layer.bias.numpy(), layer.activation.__name__)
            for layer in model.layers
        ],
    )
    history = pd.DataFrame(fitted.history)
    history.insert(0, "epoch", np.arange(1, len(history) + 1))
    versions = {"tensorflow": tensorflow_version(), "tf_keras": str(keras.__version__)}
    return history, int(stop.best_epoch) + 1, versions


def evaluate(
    directory: Path, x: np.ndarray, y: np.ndarray, classes: list[str], *, target_precision: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate the head saved in ``directory`` on held-out frames.

    Parameters
    ----------
    directory : Path
        The head SavedModel, read as :func:`buzzdask.analyze` reads it.
    x : np.ndarray [shape=(n, embedding_size), dtype=float32]
    y : np.ndarray [shape=(n, n_classes), dtype=bool]
        Multi-hot targets.
    classes : list of str
        The classes in column order.
    target_precision : float in (0, 1]

    Returns
    -------
    curves : pandas.DataFrame
        ``class``, ``threshold``, ``precision``, ``recall``, ``fpr`` for every threshold
        (:func:`precision_recall`).
    evaluation : pandas.DataFrame
        One row per class: ``class``, ``positives``, ``negatives``, and the ``threshold``
        (lowest reaching ``target_precision``, NaN if none does) with its ``precision``,
        ``recall`` and ``fpr``.
    """
    head, _ = load_head(str(directory))
    activations = head(x)
    curves = pd.concat(
        [
            precision_recall(activations[:, c], y[:, c]).assign(**{"class": name})
            for c, name in enumerate(classes)
        ],
        ignore_index=True,
    )[["class", "threshold", "precision", "recall", "fpr"]]
    return curves, _best_thresholds(curves, y, classes, target_precision)


def precision_recall(
    activations: np.ndarray, positive: np.ndarray, *, digits: int = DIGITS
) -> pd.DataFrame:
    """Precision, recall and false-positive rate of ``activations >= threshold``.

    Parameters
    ----------
    activations : np.ndarray [shape=(n,)]
        Raw head outputs (logits) of one class.
    positive : np.ndarray [shape=(n,), dtype=bool]
        Whether each frame truly carries the class.
    digits : int
        Thresholds are the distinct activations rounded down to this many decimals (down, so
        that each frame is detected at its own threshold).

    Returns
    -------
    pandas.DataFrame
        ``threshold`` (descending), ``precision`` (NaN where nothing is detected, and
        everywhere without negatives: with no frame to detect falsely, it measures nothing),
        ``recall``, ``fpr`` (NaN without positives or negatives).
    """
    activations = np.asarray(activations, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    thresholds = np.unique(np.floor(activations * 10**digits) / 10**digits)[::-1]
    scores_pos = np.sort(activations[positive])
    scores_neg = np.sort(activations[~positive])
    tp = len(scores_pos) - np.searchsorted(scores_pos, thresholds, side="left")
    fp = len(scores_neg) - np.searchsorted(scores_neg, thresholds, side="left")
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "threshold": thresholds,
                "precision": np.where(
                    (tp + fp > 0) & (len(scores_neg) > 0), tp / (tp + fp), np.nan
                ),
                "recall": tp / len(scores_pos) if len(scores_pos) else np.nan,
                "fpr": fp / len(scores_neg) if len(scores_neg) else np.nan,
            }
        )


def _best_thresholds(
    curves: pd.DataFrame, y: np.ndarray, classes: list[str], target: float
) -> pd.DataFrame:
    """Per class: the lowest threshold whose precision reaches ``target``, and its scores."""
    rows = []
    for c, name in enumerate(classes):
        curve = curves[(curves["class"] == name) & (curves["precision"] >= target)]
        best = curve.loc[curve["threshold"].idxmin()] if len(curve) else None
        rows.append(
            {
                "class": name,
                "positives": int(y[:, c].sum()),
                "negatives": int((~y[:, c]).sum()),
                "threshold": np.nan if best is None else float(best["threshold"]),
                "precision": np.nan if best is None else float(best["precision"]),
                "recall": np.nan if best is None else float(best["recall"]),
                "fpr": np.nan if best is None else float(best["fpr"]),
            }
        )
    return pd.DataFrame(rows)
