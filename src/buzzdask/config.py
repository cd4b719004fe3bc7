"""Configuration: defaults from ``buzzdask.yaml`` merged into ``dask.config``.

Users override any key with ``dask.config.set({"buzzdask.chunk-seconds": 300})``, a YAML file
under ``~/.config/dask/`` or an environment variable such as ``DASK_BUZZDASK__CHUNK_SECONDS=300``.
Settings are resolved once, on the client, and handed to tasks as plain values: workers started
elsewhere (SLURM jobs) do not see the client's ``dask.config.set``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.config
import yaml

_DEFAULTS_PATH = Path(__file__).with_name("buzzdask.yaml")

with _DEFAULTS_PATH.open(encoding="utf-8") as _file:
    _DEFAULTS = yaml.safe_load(_file)

dask.config.update_defaults(_DEFAULTS)

_UNSET: Any = object()


def get(key: str, value: Any = None, *, default: Any = _UNSET) -> Any:
    """Return ``value`` if given, else ``buzzdask.<key>`` from ``dask.config``.

    Parameters
    ----------
    key : str
        Key under ``buzzdask.``, hyphenated as in ``buzzdask.yaml`` (``"chunk-seconds"``).
    value : object, optional
        The caller's explicit value; ``None`` means "not given".
    default : object, optional
        Returned when the key is absent from the configuration.

    Returns
    -------
    object
        The resolved setting.
    """
    if value is not None:
        return value
    if default is _UNSET:
        return dask.config.get(f"buzzdask.{key}")
    return dask.config.get(f"buzzdask.{key}", default=default)
