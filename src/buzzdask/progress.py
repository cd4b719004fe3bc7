"""Progress bar (audio hours done) and verbose per-chunk lines, on the client."""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

__all__ = ["Progress", "TqdmHandler", "logger"]

logger = logging.getLogger("buzzdask")


class TqdmHandler(logging.Handler):
    """Print log lines above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record to stderr, clear of the bar."""
        tqdm.write(self.format(record), file=sys.stderr)


class Progress:
    """Audio hours scored, as a tqdm bar, plus "decoding"/"scoring" lines when verbose.

    Parameters
    ----------
    enabled : bool
        Show the bar.
    verbose : bool
        Log a line per chunk stage at INFO (a handler is added if the ``buzzdask`` logger has none).
    """

    def __init__(self, *, enabled: bool, verbose: bool) -> None:
        self._bar = tqdm(
            total=0.0,
            unit="h",
            disable=not enabled,
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} audio h [{elapsed}<{remaining}]",
        )
        self._handler: logging.Handler | None = None
        if verbose:
            logger.setLevel(logging.INFO)
            if not logger.handlers:
                self._handler = TqdmHandler()
                self._handler.setFormatter(logging.Formatter("%(message)s"))
                logger.addHandler(self._handler)

    def expect(self, hours: float) -> None:
        """Add audio to the total."""
        self._bar.total = (self._bar.total or 0.0) + hours
        self._bar.refresh()

    def advance(self, hours: float) -> None:
        """Mark audio as scored and written."""
        self._bar.update(hours)

    def close(self) -> None:
        """Close the bar and remove the handler this object added."""
        self._bar.close()
        if self._handler is not None:
            logger.removeHandler(self._handler)
