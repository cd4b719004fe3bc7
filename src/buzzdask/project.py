"""``buzzdask init``: the project directory layout the README documents."""

from __future__ import annotations

import os
from pathlib import Path

from buzzdask.errors import OutputConflictError, ParameterError
from buzzdask.inputs import user_path

__all__ = ["init_project"]

LAYOUT = {
    "audio_in": (
        "Field recordings to analyse (any format ffmpeg reads). Subfolders are kept:\n"
        "results mirror this tree. Run (-1.2: the lab's ins_buzz threshold for\n"
        "model_general_v3, about 95 % precision):\n\n"
        "    buzzdask analyze audio_in --model models/<model> --output results/<run> \\\n"
        "        --threshold ins_buzz=-1.2\n"
    ),
    "models": (
        "Model directories in buzzdetect's format: config_model.json (classes, embeddername,\n"
        "digits_results) and the head SavedModel (saved_model.pb, variables/). The lab's\n"
        "model_general_v3 is the folder models/model_general_v3 of\n"
        "https://github.com/OSU-Bee-Lab/buzzdetect (copy it here whole); buzzdask train\n"
        "writes heads of your own.\n"
    ),
    "results": (
        "One directory per analysis: buzzdask.json (metadata), errors.parquet, journal.jsonl\n"
        "and scores/ (the Parquet dataset: pandas.read_parquet('results/<run>/scores')).\n"
    ),
    "logs": (
        "Logs of batch jobs and Dask workers. Run from this project's directory with\n"
        "--log-directory logs (python -m buzzdask.cluster ...; the configs' own\n"
        "log-directory, buzzdask-logs, is relative to where the run starts) and the SLURM\n"
        "job and worker logs land here. Each analysis also writes its own log,\n"
        "results/<run>/buzzdask.log: the client's lines and the workers' buzzdask lines.\n"
    ),
}


def init_project(directory: str | os.PathLike[str]) -> list[Path]:
    """Create ``audio_in/``, ``models/``, ``results/`` and ``logs/`` with a short README in each.

    Existing files are never overwritten.

    Parameters
    ----------
    directory : path-like
        The project directory (created if missing).

    Returns
    -------
    list of Path
        The READMEs created (empty when everything existed).

    Raises
    ------
    ParameterError
        For an empty path (an unset shell variable), which would mean the current directory.
    OutputConflictError
        Where a folder cannot be made (a file in its place, no permission): which, and why.
    """
    if not os.fspath(directory).strip():
        raise ParameterError("the project directory is an empty path; name it ('.' for here)")
    root = user_path(directory)
    created = []
    for name, text in LAYOUT.items():
        folder = root / name
        readme = folder / "README.md"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not readme.exists():
                readme.write_text(f"# {name}/\n\n{text}", encoding="utf-8")
                created.append(readme)
        except OSError as error:
            where = Path(error.filename) if error.filename else folder
            raise OutputConflictError(
                f"cannot create the project layout in {root}: {where}: {error.strerror or error}"
            ) from None
    return created
