"""Configuration defaults: ``buzzdask.yaml`` merged into ``dask.config`` on import.

Users override any key with ``dask.config.set({"buzzdask.chunk-seconds": 300})``, a YAML file
under ``~/.config/dask/`` or an environment variable such as ``DASK_BUZZDASK__CHUNK_SECONDS=300``.
The code never reads these keys where it uses them: :func:`buzzdask.settings.load_settings`
reads and checks them once, on the client, and the resulting object goes to tasks and actors as
a plain value (workers started elsewhere, such as SLURM jobs, do not see the client's
``dask.config.set``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from buzzdask.errors import ParameterError

DEFAULTS_PATH = Path(__file__).with_name("buzzdask.yaml")

with DEFAULTS_PATH.open(encoding="utf-8") as _file:
    #: The defaults as ``buzzdask.yaml`` holds them (read-only: ``dask.config`` has its own copy).
    DEFAULTS = yaml.safe_load(_file)

try:
    import dask.config
except ValueError as _error:
    # Dask reads every YAML file of its configuration as it is imported and refuses a malformed
    # one: kept for the command line to say in one line (Python code that goes on meets the
    # same error as it imports Dask).
    _unreadable: ValueError | None = _error
else:
    _unreadable = None
    dask.config.update_defaults(DEFAULTS)


def check_dask_config() -> None:
    """Refuse a Dask configuration with a malformed YAML file, naming it.

    Raises
    ------
    ParameterError
        Dask could not read one of its configuration files (``~/.config/dask/``,
        ``DASK_CONFIG``, ``/etc/dask``): which, and where the YAML goes wrong.
    """
    if _unreadable is None:
        return
    named = re.match(r"A dask config file at '(.+?)' is malformed", str(_unreadable))
    if named is None:
        raise ParameterError(str(_unreadable)) from None
    path = named[1]
    try:
        with open(path, encoding="utf-8") as stream:  # YAML's marks then name the file
            content = yaml.safe_load(stream)
    except yaml.YAMLError as error:  # where, in YAML's words, as for a cluster configuration
        problem = f"is not valid YAML: {error}"
    else:
        problem = (
            "must hold a mapping at its top level (such as buzzdask: and its keys), not a "
            f"{type(content).__name__}"
        )
    raise ParameterError(
        f"Dask configuration file {path} {problem}\n(fix or move it: buzzdask, as every Dask "
        "program, reads each YAML file of Dask's configuration)"
    ) from None


def exit_if_dask_config_unreadable() -> None:
    """Exit with :func:`check_dask_config`'s error as the command line says it, if it has one.

    ``buzzdask: error: <message>`` on stderr, exit code 1: for ``python -m buzzdask.cluster``,
    whose package imports Dask before its ``main`` can catch anything.
    """
    try:
        check_dask_config()
    except ParameterError as error:
        sys.exit(f"buzzdask: error: {error}")
