"""The dashboard's links (direct, ssh tunnel, OnDemand's proxy) and worker jobs from a notebook.

OnDemand itself cannot exist here: its sessions are stood in for by their environment (the job
name OnDemand gives its apps, the ``host`` its job exports, the module function OSC's apps
export, ``SLURM_EXPORT_ENV``). The dashboards are real, and so are the SLURM jobs (``-m slurm``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import dask
import pytest
from distributed import Client, LocalCluster

from buzzdask.cluster import dashboard_hints, job_scripts, load_cluster_config, start
from buzzdask.cluster.batch import batch_script
from buzzdask.cluster.slurm import LMOD_INIT, worker_exports
from buzzdask.dashboard import ONDEMAND_PROXY, dashboard_links, in_ondemand, local_dashboard_lines
from buzzdask.session import connect
from buzzdask.settings import LocalClusterSettings
from tests.conftest import requires_ffmpeg, requires_slurm

FRAME = 15360  # samples of one 0.96 s frame at 16 kHz

OSC_CONFIGS = ["osc-cardinal", "osc-ascend", "osc-pitzer"]
NODE = "c0312.ten.osc.edu"  # the form of `hostname` on an OSC compute node
# OnDemand's documented proxy form, with the documented host_regex ([\w.-]+\.osc\.edu).
ONDEMAND_FORM = re.compile(
    r"https://ondemand\.osc\.edu/rnode/(?P<host>[\w.-]+\.osc\.edu)/(\d+)/status"
)
# What a notebook in OSC's OnDemand Jupyter app inherits (bc_osc_jupyter: before.sh exports the
# module function; OSC's apps set SLURM_EXPORT_ENV=ALL; OnDemand names the job and exports host).
JUPYTER_SESSION = {
    "SLURM_JOB_NAME": "ondemand/sys/dashboard/sys/bc_osc_jupyter",
    "SLURM_JOB_ID": "31337",
    "SLURM_EXPORT_ENV": "ALL",
    "BASH_FUNC_module%%": '() {  eval $($LMOD_CMD bash "$@")\n}',
    "VIRTUAL_ENV": "/fs/ess/PAS1234/buzzdask-venv",
    "JPY_PARENT_PID": "4242",
    "host": NODE,
    "port": "18888",  # Jupyter's own port, not the dashboard's
    "USER": "bee",
}


@pytest.fixture
def notebook_env(monkeypatch):
    """This process's environment made that of a notebook in an OnDemand Jupyter session."""
    for key, value in JUPYTER_SESSION.items():
        monkeypatch.setenv(key, value)
    return JUPYTER_SESSION


@pytest.fixture
def dashboard_client():
    """A real LocalCluster whose dashboard took a free port."""
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        yield client


def _port(link: str) -> int:
    return int(re.search(r":(\d+)/status$", link).group(1))  # type: ignore[union-attr]


def test_ondemand_link_has_the_documented_form():
    links = dashboard_links("c0312", 40123, environ=JUPYTER_SESSION)
    assert links.ondemand == f"https://ondemand.osc.edu/rnode/{NODE}/40123/status"
    assert ONDEMAND_FORM.fullmatch(links.ondemand)
    # The session's own host (what OnDemand's Jupyter link uses) wins over the short name.
    assert links.direct == f"http://{NODE}:40123/status"
    assert links.tunnel is None  # no login host known
    assert links.lines()[-2:] == [
        f"  in a browser logged in to OnDemand: {links.ondemand}",
        f"  buzzdask page through OnDemand: https://ondemand.osc.edu/rnode/{NODE}/40123/buzzdask",
    ]


def test_links_outside_ondemand():
    environ = {"USER": "bee"}
    links = dashboard_links(NODE, 40123, environ=environ)
    assert not in_ondemand(environ)
    assert (links.direct, links.ondemand, links.tunnel) == (
        f"http://{NODE}:40123/status",
        None,
        None,
    )
    links = dashboard_links(
        "cardinal-login01.hpc.osc.edu", 40123, environ=environ, proxy=ONDEMAND_PROXY,
        login_host="cardinal.osc.edu",
    )  # fmt: skip
    assert links.tunnel == (
        "ssh -N -L 40123:cardinal-login01.hpc.osc.edu:40123 bee@cardinal.osc.edu, "
        "then open http://localhost:40123/status"
    )
    assert links.ondemand == (
        "https://ondemand.osc.edu/rnode/cardinal-login01.hpc.osc.edu/40123/status"
    )


@pytest.mark.parametrize("name", OSC_CONFIGS)
def test_osc_configurations_pick_a_free_dashboard_port_and_proxy_by_rnode(name):
    entry = load_cluster_config(name)
    for section in (entry["cpu-config"], entry["gpu-config"]):
        options = dask.config.get(f"jobqueue.{section}.scheduler-options")
        assert options["dashboard_address"] == ":0", section
    proxied = entry["dashboard-proxy"].format(host=NODE, port=40123)
    assert ONDEMAND_FORM.fullmatch(proxied)


def test_dashboard_of_a_real_cluster_answers_on_the_linked_port(dashboard_client):
    lines = local_dashboard_lines(dashboard_client)
    port = _port(lines[0])
    assert port == dashboard_client.cluster.scheduler.http_server.port
    assert port != 8787
    with urllib.request.urlopen(f"http://localhost:{port}/health", timeout=10) as answer:
        assert answer.read() == b"ok"
    with urllib.request.urlopen(f"http://localhost:{port}/status", timeout=30) as answer:
        page = answer.read().decode()
    # Relative references only: under OnDemand's /rnode/<host>/<port>/ they stay under it.
    references = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert references
    assert not [ref for ref in references if ref.startswith("/")]
    script = next(ref for ref in references if ref.startswith("static/js/bokeh"))
    with urllib.request.urlopen(f"http://localhost:{port}/{script}", timeout=30) as answer:
        assert answer.status == 200


def test_hints_for_an_osc_configuration_in_a_notebook(notebook_env, dashboard_client):
    port = dashboard_client.cluster.scheduler.http_server.port
    lines = dashboard_hints(dashboard_client, "osc-cardinal")
    assert lines == [
        f"dashboard: http://{NODE}:{port}/status",
        f"  buzzdask page: http://{NODE}:{port}/buzzdask",
        f"  from your computer: ssh -N -L {port}:{NODE}:{port} bee@cardinal.osc.edu, "
        f"then open http://localhost:{port}/status",
        f"  in a browser logged in to OnDemand: https://ondemand.osc.edu/rnode/{NODE}/{port}/status",
        f"  buzzdask page through OnDemand: https://ondemand.osc.edu/rnode/{NODE}/{port}/buzzdask",
    ]


def test_analyze_without_a_client_prints_the_ondemand_link(notebook_env, capsys):
    # analyze(), watch() and train() started without a client all go through connect().
    local = LocalClusterSettings(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", scorers=1
    )
    with connect(None, local=local) as client:
        port = client.cluster.scheduler.http_server.port
        out = capsys.readouterr().out
    assert f"buzzdask: dashboard: http://{NODE}:{port}/status" in out
    assert f"OnDemand: https://ondemand.osc.edu/rnode/{NODE}/{port}/status" in out


#: A local cluster whose dashboard is visited, in a fresh process (bokeh not yet imported).
FIRST_VISIT = """
import sys, urllib.error, urllib.request
from buzzdask.session import connect
from buzzdask.settings import LocalClusterSettings

def built():
    return 'distributed.dashboard.scheduler' in sys.modules

if __name__ == '__main__':
    local = LocalClusterSettings(
        n_workers=1, threads_per_worker=1, dashboard_address=':0', scorers=1
    )
    with connect(None, local=local) as client:
        status = client.dashboard_link
        print('before', built(), 'bokeh' in sys.modules)
        with urllib.request.urlopen(status.replace('/status', '/health'), timeout=30) as answer:
            print('health', answer.read().decode(), built())
        with urllib.request.urlopen(status, timeout=30) as answer:
            page = answer.read().decode()
        print('status', answer.url == status, 'Dask' in page and 'bokeh' in page.lower(), built())
        with urllib.request.urlopen(status.rsplit('/status', 1)[0] + '/', timeout=30) as answer:
            print('root', answer.url.endswith('/status'))
        try:
            urllib.request.urlopen(status.replace('/status', '/no-such-page'), timeout=30)
        except urllib.error.HTTPError as error:
            print('no such page', error.code)
"""


def test_local_cluster_builds_the_dashboard_pages_on_the_first_visit(tmp_path):
    script = tmp_path / "first_visit.py"
    script.write_text(FIRST_VISIT)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=300
    )
    assert done.stdout.splitlines()[-5:] == [
        "before False False",
        "health ok False",  # the scheduler's own routes need no bokeh
        "status True True True",
        "root True",  # the root still leads to /status
        "no such page 404",
    ]


def test_no_dashboard_no_link(capsys):
    local = LocalClusterSettings(
        n_workers=1, threads_per_worker=1, dashboard_address=None, scorers=1
    )
    with connect(None, local=local):
        pass
    assert capsys.readouterr().out == "buzzdask: started a local Dask cluster\n"


# -- worker jobs submitted from a notebook --------------------------------------------------------


@pytest.mark.parametrize("name", OSC_CONFIGS)
def test_job_scripts_do_not_depend_on_the_notebook_environment(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a one-job script makes its log directory
    options = {"account": "PAS1234", "job_kwargs": {"job_script_prologue": ["module load ffmpeg"]}}
    for key in JUPYTER_SESSION:
        monkeypatch.delenv(key, raising=False)
    from_login_node = job_scripts(name, **options)
    for key, value in JUPYTER_SESSION.items():
        monkeypatch.setenv(key, value)
    from_notebook = job_scripts(name, **options)
    assert from_notebook == from_login_node
    lines = from_notebook["cpu"].splitlines()
    # module works whether or not the session exported it; the worker is this very Python.
    assert lines.index(LMOD_INIT) == lines.index("module load ffmpeg") - 1
    assert lines[-1].startswith(f"{sys.executable} -m distributed.cli.dask_worker")
    assert not [line for line in lines if "--export" in line or "VIRTUAL_ENV" in line]
    # The configurations' own prologues load no module, so they need no Lmod.
    assert LMOD_INIT not in job_scripts(name, account="PAS1234")["gpu"]
    # The script of a run inside one job (--print-batch-script) starts its tasks alike.
    batch = batch_script(name, ["analyze", "audio/"], **options).splitlines()
    exports = worker_exports()
    start = batch.index(exports[0])
    assert batch[start : start + len(exports) + 2] == [*exports, LMOD_INIT, "module load ffmpeg"]
    assert LMOD_INIT not in batch_script(name, ["analyze", "audio/"], account="PAS1234")


@requires_slurm
@pytest.mark.slurm
@pytest.mark.parametrize(
    "export",
    [
        {"SLURM_EXPORT_ENV": "ALL"},  # OSC's apps
        {"SLURM_EXPORT_ENV": "NONE"},  # an OnDemand app that leaves its own job's setting
        {"SBATCH_EXPORT": "NONE"},  # what OnDemand submits its jobs with
    ],
    ids=lambda export: "=".join(*export.items()),
)
def test_worker_job_submitted_from_a_notebook_connects(
    local_slurm, notebook_env, monkeypatch, tmp_path, export
):
    """The worker's environment is the notebook's, module function included, whatever the
    session says about exporting; the notebook job's own SLURM_* variables do not get in the way.
    """
    called = tmp_path / "module-called"
    for key, value in export.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "4956")  # the notebook job's memory request
    monkeypatch.setenv("BASH_FUNC_module%%", f'() {{  echo "$*" > {called}\n}}')
    monkeypatch.setenv("BUZZDASK_NOTEBOOK_MARKER", "from-the-notebook")
    client = start(
        "local-slurm",
        cpu_workers=1,
        timeout=120,
        log_directory=str(tmp_path / "logs"),
        job_kwargs={"job_script_prologue": ["module load ffmpeg"]},
    )
    try:
        seen = client.run(lambda: os.environ.get("BUZZDASK_NOTEBOOK_MARKER"))
        assert list(seen.values()) == ["from-the-notebook"]
        assert called.read_text().strip() == "load ffmpeg"  # the exported module function ran
    finally:
        client.shutdown()


# -- the buzzdask page -------------------------------------------------------------------------


def _fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


@requires_ffmpeg
def test_buzzdask_page_shows_the_run_live_on_a_local_cluster(
    run, make_audio, dask_client, tmp_path
):
    # FLAC: every one-second chunk is an ffmpeg run (WAVs are read in process), so the run
    # lasts long enough to be seen running.
    for seed in range(4):
        make_audio(f"site{seed % 2}/f{seed}.flac", n_samples=40 * FRAME, seed=seed)
    (tmp_path / "audio" / "broken.wav").write_bytes(b"RIFF not really")
    base = dask_client.dashboard_link.rsplit("/status", 1)[0]
    output = tmp_path / "out"
    seen: list[dict] = []
    running = threading.Event()

    def poll() -> None:
        while not running.is_set():
            try:  # 404 until analyze() adds the page
                runs = _fetch_json(f"{base}/buzzdask/status.json")["runs"]
            except urllib.error.HTTPError as error:
                assert error.code == 404 and not seen
                runs = []
            seen.extend(found for found in runs if found["output"] == str(output))
            time.sleep(0.2)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        result = run(tmp_path / "audio", output=output, chunk_seconds=1.0)
    finally:
        time.sleep(0.5)
        running.set()
        poller.join()

    live = [s for s in seen if s["status"] == "running" and 0 < s["audio_done_s"]]
    assert live, "the page never showed the run while it ran"
    assert live[0]["audio_left_s"] > 0 and live[0]["realtime_factor"] > 0
    done = seen[-1]
    assert done["status"] == "finished"
    assert done["audio_done_s"] == pytest.approx(result.summary["audio_hours"] * 3600)
    assert done["audio_left_s"] == 0
    # As buzzdask.json counts them: done, and failed apart.
    assert (done["files"], done["files_done"], done["files_failed"]) == (5, 4, 1)
    assert done["files_done"] == result.summary["files_done"]
    assert sum(s["frames"] for s in done["scorers"].values()) == result.summary["frames"]
    # A scorer started as the run ends may have scored nothing: the page lists those that did.
    assert set(done["scorers"]) == {
        s["worker"] for s in result.summary["scorers"] if s["frames_scored"]
    }
    assert done["errors"][0]["file"] == "broken.wav"
    with urllib.request.urlopen(f"{base}/buzzdask", timeout=10) as answer:
        page = answer.read().decode()
    assert str(output) in page and "finished" in page and "broken.wav" in page
    assert "<svg" in page  # the realtime factor over time
    assert "href='status'" in page  # relative: it stays under OnDemand's /rnode/ prefix
    with urllib.request.urlopen(f"{base}/buzzdask/", timeout=10) as answer:
        assert answer.url == f"{base}/buzzdask"  # where that link leads to the dashboard


def test_the_scheduler_keeps_only_the_latest_runs(dask_client):
    from buzzdask.dashboard_page import METADATA_KEY, RunPublisher

    old = {f"/runs/{i}@{i}": {"output": f"/runs/{i}", "started": float(i)} for i in range(30)}
    dask_client.set_metadata([METADATA_KEY], old)
    publisher = RunPublisher(dask_client, {"output": "/runs/new", "model": "m", "host": "h"})
    publisher({"status": "running", "started": 1e12})
    kept = dask_client.get_metadata([METADATA_KEY])
    assert len(kept) == 21 and publisher.key in kept  # the 20 newest, and the new run
    assert "/runs/29@29" in kept and "/runs/9@9" not in kept
    dask_client.set_metadata([METADATA_KEY], {})
