"""Configuration defaults: ``buzzdask.yaml`` merged into ``dask.config`` on import.

Users override any key with ``dask.config.set({"buzzdask.chunk-seconds": 300})``, a YAML file
under ``~/.config/dask/`` or an environment variable such as ``DASK_BUZZDASK__CHUNK_SECONDS=300``.
The code never reads these keys where it uses them: :func:`buzzdask.settings.load_settings`
reads and checks them once, on the client, and the resulting object goes to tasks and actors as
a plain value (workers started elsewhere, such as SLURM jobs, do not see the client's
``dask.config.set``).
"""

from __future__ import annotations

from pathlib import Path

import dask.config
import yaml

DEFAULTS_PATH = Path(__file__).with_name("buzzdask.yaml")

with DEFAULTS_PATH.open(encoding="utf-8") as _file:
    #: The defaults as ``buzzdask.yaml`` holds them (read-only: ``dask.config`` has its own copy).
    DEFAULTS = yaml.safe_load(_file)
dask.config.update_defaults(DEFAULTS)
