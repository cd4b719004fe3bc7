r"""Links to a Dask dashboard: direct, through an ssh tunnel, through OSC OnDemand's proxy.

OnDemand passes a logged-in browser's request on to a port of a cluster node in two forms:
``/node/<host>/<port>/...`` (the whole path) and ``/rnode/<host>/<port>/...`` (the prefix
stripped). The dashboard serves ``/status`` at its root, so it takes ``/rnode/``. ``<host>``
must match the portal's ``host_regex`` (OnDemand's documentation: ``[\w.-]+\.osc\.edu``
against ``hostname`` on a compute node, ``n0001.ten.osc.edu``): a node's name, never the IP
address Dask advertises. OnDemand's own apps (Jupyter) link to their node with the ``host``
their job exports, which a notebook inherits.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed import Client

__all__ = [
    "ONDEMAND_PROXY",
    "PAGE_ROUTE",
    "DashboardLinks",
    "dashboard_links",
    "in_ondemand",
    "local_dashboard_lines",
    "node_name",
    "page_link",
]

# OSC's portal, for a dashboard started inside an OnDemand session without a cluster
# configuration (``analyze`` in a notebook); the OSC configurations carry the same template.
ONDEMAND_PROXY = "https://ondemand.osc.edu/rnode/{host}/{port}/status"
# The buzzdask page's route on the dashboard server (buzzdask.dashboard_page serves it).
PAGE_ROUTE = "/buzzdask"


@dataclass(frozen=True)
class DashboardLinks:
    """Ways to open one dashboard.

    Attributes
    ----------
    direct : str
        ``http://<host>:<port>/status``: from the cluster's own network (an OnDemand desktop).
    tunnel : str or None
        An ssh command for your own computer, then ``http://localhost:<port>/status``; None
        without a login host.
    ondemand : str or None
        Through OnDemand's proxy, for a browser logged in to OnDemand; None outside an OnDemand
        session without a proxy template.
    """

    direct: str
    tunnel: str | None
    ondemand: str | None

    def lines(self) -> list[str]:
        """The links as the lines buzzdask prints (the first names the dashboard)."""
        lines = [f"dashboard: {self.direct}", f"  buzzdask page: {page_link(self.direct)}"]
        if self.tunnel:
            lines.append(f"  from your computer: {self.tunnel}")
        if self.ondemand:
            lines.append(f"  in a browser logged in to OnDemand: {self.ondemand}")
            lines.append(f"  buzzdask page through OnDemand: {page_link(self.ondemand)}")
        return lines


def page_link(status_link: str) -> str:
    """The buzzdask page beside a dashboard's ``.../status`` link."""
    return status_link.rsplit("/status", 1)[0] + PAGE_ROUTE


def in_ondemand(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` is that of an OnDemand interactive session (Jupyter, desktop...).

    OnDemand names the batch jobs of its apps ``<portal>/sys/dashboard/...``
    (``ondemand/sys/dashboard/sys/bc_osc_jupyter``); a notebook's kernel inherits the job's
    ``SLURM_JOB_NAME``.
    """
    return "/sys/dashboard/" in environ.get("SLURM_JOB_NAME", "")


def node_name() -> str:
    """The name ``hostname`` gives this machine, fully qualified where it resolves so."""
    name = socket.gethostname()
    if "." not in name:
        qualified = socket.getfqdn(name)
        if "." in qualified and not qualified.startswith("localhost"):
            return qualified
    return name


def dashboard_links(
    host: str,
    port: int,
    *,
    environ: Mapping[str, str],
    proxy: str | None = None,
    login_host: str | None = None,
) -> DashboardLinks:
    """The links to a dashboard listening on ``port`` of the node ``host``.

    Parameters
    ----------
    host : str
        Name of the node the dashboard runs on (:func:`node_name` where the scheduler runs in
        this process). Inside an OnDemand session, the session's own ``host`` variable wins:
        it is the name OnDemand proxies this node by.
    port : int > 0
        The dashboard's real port (``client.scheduler_info()["services"]["dashboard"]``).
    environ : mapping
        The environment (``os.environ``): the OnDemand session, ``host`` and ``USER``.
    proxy : str, optional
        OnDemand's proxy URL with ``{host}`` and ``{port}`` (a configuration's
        ``dashboard-proxy``). Default: none, or :data:`ONDEMAND_PROXY` inside an OnDemand
        session.
    login_host : str, optional
        The cluster's ssh login host (``cardinal.osc.edu``), for the tunnel.

    Returns
    -------
    DashboardLinks
    """
    session = in_ondemand(environ)
    if session and environ.get("host"):
        host = environ["host"]
    template = proxy or (ONDEMAND_PROXY if session else None)
    tunnel = None
    if login_host:
        user = environ.get("USER") or "you"
        tunnel = (
            f"ssh -N -L {port}:{host}:{port} {user}@{login_host}, "
            f"then open http://localhost:{port}/status"
        )
    return DashboardLinks(
        direct=f"http://{host}:{port}/status",
        tunnel=tunnel,
        ondemand=template.format(host=host, port=port) if template else None,
    )


def local_dashboard_lines(
    client: Client, *, proxy: str | None = None, login_host: str | None = None
) -> list[str]:
    """The lines to print about the dashboard of a scheduler running in this process.

    Parameters
    ----------
    client : distributed.Client
        Connected to a cluster started here (``LocalCluster``, a dask-jobqueue cluster), so
        the dashboard runs on this node, on the port its scheduler reports (``:0`` picks one).
    proxy, login_host : str, optional
        As for :func:`dashboard_links`.

    Returns
    -------
    list of str
        :meth:`DashboardLinks.lines`.
    """
    port = client.scheduler_info()["services"]["dashboard"]
    links = dashboard_links(
        node_name(), port, environ=os.environ, proxy=proxy, login_host=login_host
    )
    return links.lines()
