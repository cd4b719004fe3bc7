"""Detection thresholds: given per class, or taken from a model's test metrics for a precision.

One comparison defines a detection everywhere (exports, events, summaries): :func:`detected`,
``activation > threshold``, strictly greater, as buzzdetect's detection mode
(``src/write/formatting.py``: ``activations > threshold``) and buzzr's ``call_detections``
(``Map(`>`, ...)``) both call it.

A buzzdetect model directory may hold its test metrics in ``tests/metrics.csv`` (columns
``threshold, precision, sensitivity, fpr``, one row per threshold tried on the model's test set,
for its ``ins_buzz`` neuron). buzzdetect turns a requested precision into a threshold as
:func:`thresholds_for_precision` does (``src/write/thresholds.py``, ``calculate_threshold``):
the mean threshold of the rows whose precision is within ``tolerance / 2 = 0.005`` of the request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from buzzdask.errors import ModelError, ParameterError
from buzzdask.inputs import as_list

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "COMPARISON",
    "METRICS_CLASS",
    "METRICS_PATH",
    "PRECISION_TOLERANCE",
    "ThresholdChoice",
    "choose_thresholds",
    "detected",
    "require_mapping",
    "resolve_thresholds",
    "thresholds_by_model",
    "thresholds_for_precision",
]

COMPARISON = ">"
METRICS_PATH = "tests/metrics.csv"
METRICS_COLUMNS = ("threshold", "precision")
# buzzdetect's metrics describe its detection-mode neuron only (format_detections: 'ins_buzz').
METRICS_CLASS = "ins_buzz"
# buzzdetect: calculate_threshold(..., tolerance=0.01) keeps |precision - asked| <= tolerance / 2.
PRECISION_TOLERANCE = 0.01


def detected(activation: Any, threshold: float) -> Any:
    """Whether frames are detections: ``activation > threshold`` (strictly).

    The one comparison buzzdask's exports, events and summaries use, as buzzdetect and buzzr.

    Parameters
    ----------
    activation : float or array-like [shape=(n_frames,)]
        Raw activations (float32 in the dataset).
    threshold : float
        The class's threshold.

    Returns
    -------
    bool or np.ndarray [shape=(n_frames,), dtype=bool]

    Examples
    --------
    >>> detected([-1.3, -1.2, -1.1], -1.2).tolist()
    [False, False, True]
    """
    # In float64, as buzzdetect compares its float32 activations with a float64 mean.
    return np.asarray(activation, dtype=np.float64) > float(threshold)


@dataclass(frozen=True)
class ThresholdChoice:
    """Thresholds per class and where they came from.

    Attributes
    ----------
    values : dict of class -> float
        The thresholds (empty: no detections asked for).
    source : {"none", "given", "precision"}
    precision : float or None
        The precision asked for (``source == "precision"``).
    metrics : str or None
        The metrics file the threshold was taken from.
    rows : tuple of (threshold, precision)
        The metrics rows whose thresholds were averaged.
    """

    values: dict[str, float] = field(default_factory=dict)
    source: str = "none"
    precision: float | None = None
    metrics: str | None = None
    rows: tuple[tuple[float, float], ...] = ()

    def as_metadata(self) -> dict[str, Any]:
        """JSON-ready record of the thresholds and their origin (for ``buzzdask.json``)."""
        record: dict[str, Any] = {
            "values": dict(self.values),
            "source": self.source,
            "comparison": f"activation {COMPARISON} threshold",
        }
        if self.source == "precision":
            record.update(
                precision=self.precision,
                metrics=self.metrics,
                tolerance=PRECISION_TOLERANCE / 2,
                rule="mean threshold of the metrics rows within tolerance of the precision",
                rows=[{"threshold": t, "precision": p} for t, p in self.rows],
            )
        return record


def _read_metrics(model_dir: str | os.PathLike[str]) -> tuple[Path, pd.DataFrame]:
    import pandas as pd  # here: workers import this module, never this function

    model_dir = Path(model_dir).expanduser()
    path = model_dir / METRICS_PATH
    if not model_dir.is_dir():
        # A run's recorded model, on the machine it ran on (results copied elsewhere).
        raise ModelError(
            f"model directory {model_dir} not found, so no threshold can be taken from "
            "its test metrics; give the model directory as it is here (model=..., --model DIR) "
            f"or thresholds per class (--threshold {METRICS_CLASS}=VALUE, an activation)"
        )
    try:
        metrics = pd.read_csv(path)
    except FileNotFoundError:
        raise ModelError(
            f"model {Path(model_dir)} has no test metrics ({path} not found), so no threshold "
            f"can be taken from a precision; give thresholds per class instead, activations "
            f"this head's own tests chose (thresholds={{'{METRICS_CLASS}': VALUE}} or "
            f"--threshold {METRICS_CLASS}=VALUE; MODEL/{METRICS_CLASS}=VALUE beside other heads)"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ModelError(f"{path}: not a readable CSV ({error})") from None
    missing = [column for column in METRICS_COLUMNS if column not in metrics.columns]
    if missing:
        raise ModelError(f"{path}: no column(s) {missing}; columns are {list(metrics.columns)}")
    return path, metrics


def _check_precision(precision: Any) -> float:
    # buzzdetect's validate_precision: numeric, > 0 and < 1.
    try:
        value = float(precision)
    except (TypeError, ValueError):
        raise ParameterError(f"precision={precision!r} must be a number in (0, 1)") from None
    if not 0 < value < 1:
        raise ParameterError(f"precision={precision!r} must be in (0, 1), e.g. 0.95")
    return value


def _precision_choice(
    model_dir: str | os.PathLike[str], precision: Any, *, classes: Sequence[str] | None
) -> ThresholdChoice:
    asked = _check_precision(precision)
    wanted = as_list(classes) if classes is not None else [METRICS_CLASS]
    others = [name for name in wanted if name != METRICS_CLASS]
    if others:
        raise ParameterError(
            f"a model's {METRICS_PATH} gives a threshold for {METRICS_CLASS!r} only, not for "
            f"{others}; give thresholds for those classes instead"
        )
    path, metrics = _read_metrics(model_dir)
    # The same arithmetic as buzzdetect's calculate_threshold, in float64.
    delta = (metrics["precision"].astype("float64") - asked).abs()
    rows = metrics[delta <= PRECISION_TOLERANCE / 2]
    if rows.empty:
        precisions = np.sort(metrics["precision"].dropna().unique())
        if not precisions.size:
            # A trained head whose held-out frames had no negative (train said so).
            raise ModelError(
                f"{path} measures no precision (its precision column is empty: the training "
                f"held out no frame without {METRICS_CLASS!r}); give thresholds instead"
            )
        nearest = precisions[np.argsort(np.abs(precisions - asked), kind="stable")[:4]]
        raise ParameterError(
            f"precision={asked} is not in {path} (no row within ±{PRECISION_TOLERANCE / 2}); its "
            f"precisions range from {precisions.min():.3g} to {precisions.max():.3g}, the "
            f"nearest are {', '.join(f'{p:.4g}' for p in sorted(nearest))}"
        )
    threshold = float(rows["threshold"].mean())
    if not math.isfinite(threshold):
        raise ModelError(f"{path}: the rows for precision={asked} have no numeric threshold")
    return ThresholdChoice(
        values={name: threshold for name in wanted},
        source="precision",
        precision=asked,
        metrics=str(path),
        rows=tuple(
            (float(t), float(p)) for t, p in zip(rows["threshold"], rows["precision"], strict=True)
        ),
    )


def thresholds_for_precision(
    model_dir: str | os.PathLike[str],
    precision: float,
    *,
    classes: str | Sequence[str] | None = None,
) -> dict[str, float]:
    """Thresholds that give ``precision`` on the model's test set, as buzzdetect computes them.

    ``threshold = mean(metrics.threshold[|metrics.precision - precision| <= 0.005])``, over
    ``model_dir / "tests/metrics.csv"``.

    Parameters
    ----------
    model_dir : path-like
        A buzzdetect model directory.
    precision : float in (0, 1)
        The target precision (``0.95``).
    classes : str or sequence of str, optional
        The classes to threshold; the metrics describe ``ins_buzz`` only (the default).

    Returns
    -------
    dict of class -> float

    Raises
    ------
    ModelError
        If the model has no (readable) ``tests/metrics.csv``.
    ParameterError
        If ``precision`` is not in (0, 1), no row of the table is within 0.005 of it (the
        message names the file and its nearest precisions), or another class is asked for.

    Examples
    --------
    With ``model_general_v3``'s metrics, ``precision=0.95`` averages the rows at precision
    0.9518 (threshold -1.2) and 0.9491 (-1.21): ``{"ins_buzz": -1.205}``.
    """
    return _precision_choice(model_dir, precision, classes=classes).values


def require_mapping(thresholds: object) -> None:
    """Refuse ``thresholds`` that are not a mapping of class to activation (one number, a list).

    Raises
    ------
    ParameterError
        Saying what was given and what is wanted.
    """
    if thresholds is not None and not isinstance(thresholds, Mapping):
        raise ParameterError(
            f"thresholds={thresholds!r} must map class names to activations, "
            "e.g. {'ins_buzz': -1.2}"
        )


def thresholds_by_model(
    thresholds: Mapping[str, float] | None, models: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, float]]:
    """Each model's share of one run's thresholds, keyed ``CLASS`` or ``MODEL/CLASS``.

    Parameters
    ----------
    thresholds : mapping of str -> float, optional
        ``{"ins_buzz": -1.2}``; with several models, ``{"model_lab/ins_buzz": 0.4}`` for one of
        them.
    models : mapping of str -> sequence of str
        Each model's name and classes, in the run's order.

    Returns
    -------
    dict of str -> dict of str -> float
        Per model name, its classes' thresholds as given (unchecked values).

    Raises
    ------
    ParameterError
        A class no model has, a model the run lacks, or a bare class that several models have:
        heads trained apart put their activations on scales of their own (buzzdetect's
        ``ins_buzz`` at -1.2 is another head's 0.4), so one number for both is a mistake.
    """
    require_mapping(thresholds)
    shares: dict[str, dict[str, float]] = {name: {} for name in models}
    unknown: list[str] = []
    shared: dict[str, list[str]] = {}
    twice: list[str] = []
    for key, value in (thresholds or {}).items():
        # A class first, whole (a trained class may hold "/"); else MODEL/CLASS.
        class_name = key
        owners = [name for name, classes in models.items() if key in classes]
        model_name, slash, rest = key.partition("/")
        if not owners and slash and rest in models.get(model_name, ()):
            class_name, owners = rest, [model_name]
        if not owners:
            unknown.append(key)
        elif len(owners) > 1:
            shared[key] = owners
        elif class_name in shares[owners[0]]:
            twice.append(f"{owners[0]}/{class_name}")
        else:
            shares[owners[0]][class_name] = value
    if unknown:
        raise ParameterError(
            f"thresholds for unknown class(es) {sorted(unknown)}; the models' classes are "
            + "; ".join(f"{name}: {list(classes)}" for name, classes in models.items())
        )
    if twice:
        raise ParameterError(
            f"thresholds given twice for {', '.join(twice)} (as CLASS and as MODEL/CLASS): "
            "give each once"
        )
    if shared:
        key, owners = next(iter(shared.items()))
        raise ParameterError(
            "thresholds for class(es) of several models: "
            + ", ".join(f"{k!r} ({' and '.join(o)})" for k, o in shared.items())
            + "; heads trained apart put their activations on scales of their own, so name "
            f"each one's model, as MODEL/CLASS (e.g. '{owners[0]}/{key}')"
        )
    return shares


def choose_thresholds(
    *,
    model_dir: str | os.PathLike[str],
    classes: Sequence[str],
    precision: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    model_name: str | None = None,
) -> ThresholdChoice:
    """The thresholds a command was asked for, checked before any work starts.

    Parameters
    ----------
    model_dir : path-like
        The model directory (its ``tests/metrics.csv`` serves ``precision``).
    classes : sequence of str
        The model's classes.
    precision : float in (0, 1), optional
        Thresholds from the model's test metrics (:func:`thresholds_for_precision`).
    thresholds : mapping of class -> float, optional
        Thresholds given directly. At most one of ``precision`` and ``thresholds``.
    model_name : str, optional
        The model's name: a threshold keyed ``MODEL/CLASS`` with it, as an analysis of
        several models takes them, is its class's.

    Returns
    -------
    ThresholdChoice
        ``values`` empty when neither is given.

    Raises
    ------
    ParameterError
        Both given, a class the model lacks, a threshold that is not a finite number, or a
        precision the metrics cannot give.
    ModelError
        ``precision`` for a model without metrics.
    """
    require_mapping(thresholds)
    if precision is not None and thresholds:
        raise ParameterError(
            "give either precision or thresholds, not both "
            f"(precision={precision!r}, thresholds={dict(thresholds)!r})"
        )
    known = as_list(classes)
    if precision is not None:
        if METRICS_CLASS not in known:
            raise ModelError(
                f"model {Path(model_dir)} has no {METRICS_CLASS!r} class (its classes are "
                f"{known}), which its {METRICS_PATH} would describe; give thresholds instead"
            )
        return _precision_choice(model_dir, precision, classes=None)
    if not thresholds:
        return ThresholdChoice()
    if model_name is not None:
        thresholds = thresholds_by_model(thresholds, {model_name: known})[model_name]
    unknown = sorted(set(thresholds) - set(known))
    if unknown:
        raise ParameterError(
            f"thresholds for unknown class(es) {unknown}; the model's classes are {known}"
        )
    values: dict[str, float] = {}
    for name in known:  # model order, whatever order they were given in
        if name not in thresholds:
            continue
        value = thresholds[name]
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise ParameterError(f"threshold for {name!r} must be a finite number, not {value!r}")
        values[name] = number
    return ThresholdChoice(values=values, source="given")


def resolve_thresholds(
    *,
    model_dir: str | os.PathLike[str],
    classes: str | Sequence[str],
    precision: float | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Thresholds per class from ``precision`` or ``thresholds``, checked.

    Parameters
    ----------
    model_dir : path-like
        The model directory (its ``tests/metrics.csv`` serves ``precision``).
    classes : str or sequence of str
        The model's classes, all of them (``resolve_model(...).classes``): a class asked
        for that is not among them is refused.
    precision : float in (0, 1), optional
        Thresholds from the model's test metrics (:func:`thresholds_for_precision`).
    thresholds : mapping of class -> float, optional
        Thresholds given directly. At most one of ``precision`` and ``thresholds``.

    Returns
    -------
    dict of class -> float
        In the model's class order; empty when neither is given.

    Raises
    ------
    ParameterError
        Both given, a class the model lacks, a threshold that is not a finite number, or a
        precision outside (0, 1) or one the metrics cannot give.
    ModelError
        ``precision`` for a model without ``tests/metrics.csv``.
    """
    return choose_thresholds(
        model_dir=model_dir, classes=classes, precision=precision, thresholds=thresholds
    ).values
