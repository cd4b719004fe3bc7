"""Every configuration's activations, checked equal to the sequential baseline's.

The baseline (:func:`benchmarks.stages.baseline`) decodes each file whole and scores it in one
call; it writes ``<file index:04d>.parquet``. An ``analyze`` output must hold the same frames
of every file with activations within :data:`TOLERANCE`; so must the chunks the model stage
and the co-run's model side scored (saved by :func:`benchmarks.stages.save_activations`),
frame for frame at their place in the file. A difference fails the run (``AssertionError``)
naming the configuration: a speed bought with different scores is no speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TOLERANCE", "check_analyze", "check_baseline", "check_chunks"]

#: Largest absolute difference allowed in any activation.
TOLERANCE = 1e-5


def baseline_activations(baseline: Path, index: int) -> np.ndarray:
    """The baseline's activations of file ``index``: ``(n_frames, n_classes)``, frame order."""
    import pyarrow.parquet as pq

    table = pq.read_table(baseline / f"{index:04d}.parquet")
    columns = [name for name in table.column_names if name.startswith("activation_")]
    return np.column_stack([table[name].to_numpy() for name in columns])


def check_baseline(label: str, baseline: Path, reference: Path, n_files: int) -> float:
    """Another round's baseline against the reference one; the largest difference."""
    return _largest(
        label,
        (
            (str(i), baseline_activations(baseline, i), baseline_activations(reference, i))
            for i in range(n_files)
        ),
    )


def check_analyze(label: str, output: Path, files: list[str], reference: Path) -> float:
    """An ``analyze`` output against the baseline, file by file; the largest difference.

    Raises
    ------
    AssertionError
        If a file's frames differ in number, or an activation by more than :data:`TOLERANCE`.
    """
    from buzzdask.results import open_run

    run = open_run(output)
    root = run.input_root.resolve()
    columns = [f"activation_{name}" for name in run.classes]

    def pairs() -> Any:
        for index, path in enumerate(files):
            relative = Path(path).resolve().relative_to(root).as_posix()
            frames = run.recording_frames(relative, columns=columns)
            got = frames.to_numpy(dtype=np.float32)
            yield relative, got, baseline_activations(reference, index)

    return _largest(label, pairs())


def check_chunks(label: str, saved: Path, reference: Path) -> float:
    """Scored chunks (model stage, co-run) against the baseline's frames at the same places."""
    with np.load(saved) as data:
        activations, origins = data["activations"], data["origins"]
    if len(origins) == 0:
        raise AssertionError(f"{label}: no chunk scored")
    whole: dict[int, np.ndarray] = {}
    pairs = []
    position = 0
    for index, first, n_frames in origins.tolist():
        if index not in whole:
            whole[index] = baseline_activations(reference, index)
        pairs.append(
            (
                f"file {index}, frames {first}-{first + n_frames}",
                activations[position : position + n_frames],
                whole[index][first : first + n_frames],
            )
        )
        position += n_frames
    if position != len(activations):
        raise AssertionError(f"{label}: {len(activations)} frames scored, {position} expected")
    return _largest(label, iter(pairs))


def _largest(label: str, pairs: Any) -> float:
    """The largest absolute difference over ``(name, got, expected)``; fails past the tolerance."""
    largest = 0.0
    for name, got, expected in pairs:
        if got.shape != expected.shape:
            raise AssertionError(
                f"{label}: {name} has {got.shape} activations, the baseline {expected.shape}"
            )
        if got.size:
            largest = max(largest, float(np.max(np.abs(got.astype(np.float64) - expected))))
        if not largest <= TOLERANCE:  # also catches NaN
            raise AssertionError(
                f"{label}: {name} differs from the sequential baseline by {largest:.3g} "
                f"(tolerance {TOLERANCE:g})"
            )
    return largest
