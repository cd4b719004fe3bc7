"""The buzzdask page of the Dask dashboard: ``/buzzdask`` (and ``/buzzdask/status.json``).

A scheduler plugin adds two routes to the scheduler's dashboard server (the Tornado application
that serves ``/status``), so the page is wherever the dashboard is: on a ``LocalCluster``, on a
dask-jobqueue cluster, through OnDemand's proxy. Each run's client publishes its
:meth:`buzzdask.progress.Progress.snapshot` into the scheduler's metadata about once a second;
the page renders the runs it finds there and reloads itself.
"""

from __future__ import annotations

import html
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web

from buzzdask.dashboard import PAGE_ROUTE as ROUTE
from buzzdask.progress import format_audio, format_duration, format_factor

if TYPE_CHECKING:
    from distributed import Client, Scheduler

__all__ = ["METADATA_KEY", "ROUTE", "DashboardPage", "RunPublisher", "add_page", "render_page"]

METADATA_KEY = "buzzdask-runs"
_RELOAD_S = 2
# Runs shown (newest first) and kept: a long-lived notebook cluster, or a watch that analyses
# every few minutes for days, serves many runs; the scheduler keeps only the latest.
_RUNS_SHOWN = 5
_RUNS_KEPT = 20

logger = logging.getLogger(__name__)


def _runs(scheduler: Scheduler) -> list[dict[str, Any]]:
    runs = scheduler.task_metadata.get(METADATA_KEY, {})
    return sorted(runs.values(), key=lambda run: run.get("started", 0), reverse=True)


class _PageHandler(web.RequestHandler):
    def initialize(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def get(self) -> None:
        if self.request.path.endswith("/"):
            # To the page's own address: its links are relative to it (they stay under a
            # proxy's prefix, OnDemand's /rnode/...), and from ".../buzzdask/" they missed.
            self.redirect(f"../{ROUTE.rsplit('/', 1)[-1]}")
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.write(render_page(_runs(self.scheduler)[:_RUNS_SHOWN]))


class _JsonHandler(_PageHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps({"runs": _runs(self.scheduler)}))


class DashboardPage(SchedulerPlugin):
    """Adds the buzzdask routes to the scheduler's dashboard (nothing where it has none)."""

    name = "buzzdask-page"
    idempotent = True  # once per scheduler, however many runs it serves

    async def start(self, scheduler: Scheduler) -> None:
        """Register ``/buzzdask`` and ``/buzzdask/status.json`` once per scheduler."""
        application = getattr(scheduler, "http_application", None)
        if application is None or getattr(application, "buzzdask_page", False):
            return
        routes = [
            (rf"{ROUTE}/status\.json", _JsonHandler, {"scheduler": scheduler}),
            (rf"{ROUTE}/?", _PageHandler, {"scheduler": scheduler}),
        ]
        application.add_handlers(r".*$", routes)
        application.buzzdask_page = True


def add_page(client: Client) -> None:
    """Add the buzzdask page to the dashboard of ``client``'s scheduler (once per scheduler).

    Each run adds it; a cluster buzzdask starts adds it at once, so that the link printed with
    the dashboard's address leads to a page (no run yet) before the first run, not to a 404.
    """
    try:
        client.register_plugin(DashboardPage())
    except Exception as error:  # the runs go on without their page
        logger.warning("no buzzdask page in the dashboard: %s", error)


class RunPublisher:
    """Publishes one run's numbers to the scheduler, for the page.

    Parameters
    ----------
    client : distributed.Client
    run : mapping
        What identifies the run on the page: ``output``, ``model``, ``host``.
    """

    def __init__(self, client: Client, run: Mapping[str, Any]) -> None:
        self.client = client
        self.run = dict(run)
        self.key = f"{run['output']}@{time.time():.3f}"
        add_page(client)
        try:
            runs = client.get_metadata([METADATA_KEY], default={})
            if len(runs) >= _RUNS_KEPT:
                newest = sorted(runs, key=lambda key: runs[key].get("started", 0))[-_RUNS_KEPT:]
                client.set_metadata([METADATA_KEY], {key: runs[key] for key in newest})
        except Exception as error:  # the page then shows every earlier run
            logger.warning("could not drop earlier runs from the buzzdask page: %s", error)

    def __call__(self, snapshot: Mapping[str, Any]) -> None:
        """Send ``snapshot`` (``Progress.snapshot()``) as the run's current state."""
        document = {**self.run, **snapshot}
        try:
            self.client.set_metadata([METADATA_KEY, self.key], document)
        except Exception as error:  # a scheduler gone at shutdown; the run's result stands
            logger.debug("could not publish to the dashboard: %s", error)


def render_page(runs: Sequence[Mapping[str, Any]]) -> str:
    """The HTML page for ``runs`` (newest first), reloading itself every few seconds."""
    body = (
        "".join(_render_run(run) for run in runs) or "<p>No buzzdask run on this cluster yet.</p>"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<meta http-equiv='refresh' content='{_RELOAD_S}'>"
        "<title>buzzdask</title><style>"
        "body{font-family:sans-serif;margin:1.5em;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
        ".numbers td{font-size:1.2em}.failed{color:#b00}"
        "</style></head><body><h1>buzzdask</h1>"
        f"{body}<p><a href='status'>Dask dashboard</a></p></body></html>"
    )


def _render_run(run: Mapping[str, Any]) -> str:
    escape = html.escape
    done, left = run.get("audio_done_s", 0.0), run.get("audio_left_s", 0.0)
    total = done + left
    eta = run.get("eta_s")
    failed = run.get("files_failed", 0)
    numbers = [
        ("audio done", format_audio(done, total_s=total)),
        ("audio left", format_audio(left, total_s=total)),
        ("realtime factor", format_factor(run.get("realtime_factor"))),
        ("files done", f"{run.get('files_done', 0)} / {run.get('files', 0)}"),
        ("files failed", str(failed)),
        ("time left", "-" if eta is None else format_duration(eta)),
    ]
    cells = "".join(f"<th>{escape(name)}</th>" for name, _ in numbers)
    values = "".join(
        f"<td class='{'failed' if name == 'files failed' and failed else ''}'>{escape(value)}</td>"
        for name, value in numbers
    )
    scorers = "".join(
        f"<tr><td>{escape(address)}</td><td>{item['frames']:,}</td>"
        f"<td>{(item['frames_per_s'] or 0):,.0f}</td></tr>"
        for address, item in run.get("scorers", {}).items()
    )
    errors = "".join(
        f"<tr><td>{escape(item['at'])}</td><td>{escape(item['file'])}</td>"
        f"<td>{escape(item['reason'])}</td></tr>"
        for item in reversed(run.get("errors", []))
    )
    return (
        f"<h2>{escape(str(run.get('output', '')))} &mdash; {escape(run.get('status', ''))}</h2>"
        f"<p>model {escape(str(run.get('model', '')))} on {escape(str(run.get('host', '')))}</p>"
        f"<table class='numbers'><tr>{cells}</tr><tr>{values}</tr></table>"
        f"<h3>Realtime factor over time</h3>{_sparkline(run.get('history', []))}"
        "<h3>Scorers</h3><table><tr><th>worker</th><th>frames</th><th>frames per second</th></tr>"
        f"{scorers}</table>"
        "<h3>Latest errors</h3><table><tr><th>at</th><th>file</th><th>reason</th></tr>"
        f"{errors or '<tr><td colspan=3>none</td></tr>'}</table>"
    )


def _sparkline(history: list[list[float]], *, width: int = 600, height: int = 120) -> str:
    """The realtime factor (y) against seconds since the start (x), as inline SVG."""
    if len(history) < 2:
        return "<p>(after the first chunks)</p>"
    xs = [point[0] for point in history]
    ys = [point[1] for point in history]
    x_span = (max(xs) - min(xs)) or 1.0
    y_top = max(ys) or 1.0
    points = " ".join(
        f"{(x - min(xs)) / x_span * width:.1f},{height - y / y_top * height:.1f}"
        for x, y in zip(xs, ys, strict=True)
    )
    return (
        f"<svg width='{width}' height='{height + 20}' role='img'>"
        f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{points}'/>"
        f"<text x='0' y='{height + 16}' font-size='12'>{min(xs):,.0f} s</text>"
        f"<text x='{width - 120}' y='{height + 16}' font-size='12'>{max(xs):,.0f} s, "
        f"peak {format_factor(y_top)}</text></svg>"
    )
