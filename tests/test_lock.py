"""One writer per output: a second run is refused; a dead run's lock is taken over.

Two real processes contend (no ``flock``: the lock is a file created with ``O_EXCL``, which
shared file systems perform atomically); another host's run is stood in for by its lock file.
"""

from __future__ import annotations

import getpass
import json
import logging
import multiprocessing
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

import buzzdask
from buzzdask import OutputConflictError
from buzzdask.cli import EXIT_ERROR, EXIT_OK
from buzzdask.lock import LOCK_NAME, OutputLock
from tests.conftest import BUZZDASK, requires_ffmpeg, requires_slurm, run_batch_job, wait_until
from tests.test_cli import buzzdask_cli

FRAME = 15360
OTHER_NODE = "c0312.ten.osc.edu"


def _lock_file(root: Path, *, host: str, pid: int, age_s: float = 0.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    entry = {
        "host": host,
        "pid": pid,
        "started": "2026-06-01T05:30:00+00:00",
        "process_started": 1.0e9,
        "token": "theirs",
    }
    path.write_text(json.dumps(entry))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def _gone_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(done.stdout)
    assert not psutil.pid_exists(pid)
    return pid


@requires_ffmpeg
def test_a_second_run_is_refused_while_the_first_writes(
    make_audio, dask_client, tiny_model, tiny_embedder, tmp_path
):
    # FLAC: each one-second chunk is an ffmpeg run, so the first run lasts (WAVs are quicker).
    for seed in range(3):
        make_audio(f"f{seed}.flac", n_samples=60 * FRAME, seed=seed)
    out = tmp_path / "out"
    args = [
        BUZZDASK, "analyze", str(tmp_path / "audio"),
        "--model", str(tiny_model), "--embedder", str(tiny_embedder), "--output", str(out),
        "--scheduler", dask_client.scheduler.address, "--chunk-seconds", "1", "--no-progress",
    ]  # fmt: skip
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:

        def journal_begun() -> bool:
            assert first.poll() is None, first.communicate()
            return (out / "journal.jsonl").exists()

        wait_until(journal_begun, timeout_s=120, failure="the first run wrote no journal")
        second = buzzdask_cli(*args[1:], "--resume")
        assert first.poll() is None, "the first run ended before the second tried: not a race"
    finally:
        _, stderr = first.communicate(timeout=300)
    assert second.returncode == EXIT_ERROR
    assert f"output {out} is in use by another buzzdask run" in second.stderr
    # Which command holds it: a user may have several in as many terminals.
    holder = f"host {platform.node()}, pid {first.pid}, since 20"
    # Whose: in a lab's shared output, whom to ask.
    assert re.search(rf"since 20[-0-9T:.+]+, by {getpass.getuser()}, running ", second.stderr)
    command = f'running "buzzdask analyze {tmp_path / "audio"} --model '
    assert holder in second.stderr and command in second.stderr
    assert f'..." in {os.getcwd()}; last sign of life' in second.stderr
    assert "buzzdask.lock-stale-seconds" in second.stderr
    # Whether to wait: it was alive moments ago; and the way on without waiting.
    assert re.search(r"; last sign of life \d+ s ago\); wait for it to end, ", second.stderr)
    # A resume wants that run's results: --new would analyse everything again.
    assert "then --resume adds what it left (or pass --new to analyse everything" in second.stderr
    assert first.returncode == EXIT_OK, stderr
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    chunks = [(entry["file"], entry["chunk"]) for entry in journal]
    assert len(chunks) == len(set(chunks)) == 180  # every chunk once: the second wrote nothing
    frames = pd.read_parquet(out / "scores", partitioning=None)
    assert len(frames) == 180 and not frames.duplicated(["file", "start"]).any()
    assert not (out / LOCK_NAME).exists()  # released at the end


@requires_ffmpeg
def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(
    run, make_audio, tmp_path, caplog
):
    make_audio("a.wav", n_samples=3 * FRAME)
    out = tmp_path / "out"
    _lock_file(out, host=platform.node(), pid=_gone_pid(), age_s=1)
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = run(tmp_path / "audio", output=out)
    assert result.ok and len(result.to_pandas()) == 3
    assert f"took over {out} from a run that is gone (host {platform.node()}" in caplog.text
    assert not (out / LOCK_NAME).exists()
    # Said before the run's log opened: the log has it too, after the run's first line.
    log = (out / "buzzdask.log").read_text().splitlines()
    assert "starting an analysis" in log[0]
    assert f"took over {out} from a run that is gone (host {platform.node()}" in log[1]


@requires_ffmpeg
def test_another_hosts_lock_holds_until_it_goes_stale(run, make_audio, tmp_path, caplog):
    make_audio("a.wav", n_samples=3 * FRAME)
    out = tmp_path / "out"
    _lock_file(out, host=OTHER_NODE, pid=os.getpid(), age_s=30)
    with pytest.raises(
        OutputConflictError, match=f"in use by another buzzdask run .host {OTHER_NODE}"
    ) as refused:
        run(tmp_path / "audio", output=out, on_conflict="resume")
    assert "then on_conflict='resume' adds what it left" in str(refused.value)
    with pytest.raises(OutputConflictError, match="write to a new directory beside it"):
        run(tmp_path / "audio", output=out)  # not resuming: another output will do
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written

    _lock_file(out, host=OTHER_NODE, pid=os.getpid(), age_s=200)  # silent past 120 s
    with caplog.at_level(logging.WARNING, logger="buzzdask"):
        result = run(tmp_path / "audio", output=out)
    assert result.ok
    assert "its lock last refreshed 200 s ago" in caplog.text


def test_a_lock_cut_short_is_taken_over(tmp_path, caplog):
    (tmp_path / LOCK_NAME).write_text("")  # killed between creating and writing it
    with (
        caplog.at_level(logging.WARNING, logger="buzzdask"),
        OutputLock(tmp_path, started="now", stale_s=120) as lock,
    ):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    # Not "(host ?, pid -1, since ?; its lock last refreshed inf s ago)".
    said = f"took over {tmp_path} from a run that is gone (its lock file empty or cut short: "
    assert said in caplog.text and "inf s" not in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_the_holder_keeps_its_lock_alive(tmp_path):
    with OutputLock(tmp_path, started="now", stale_s=0.4) as lock:
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 0.4


def test_a_holder_taken_over_stops_keeping_the_lock_fresh(tmp_path, caplog):
    """Stalled past stale_s (a suspended job), its lock was taken over by another host's run:
    it warns, and no longer touches that run's lock (which would hide the new holder's end)."""
    with (
        caplog.at_level(logging.WARNING, logger="buzzdask"),
        OutputLock(tmp_path, started="now", stale_s=0.4),
    ):
        taken = _lock_file(tmp_path, host=OTHER_NODE, pid=1, age_s=0.0)
        wait_until(
            lambda: "now held by another run (host c0312" in caplog.text,
            timeout_s=5,
            failure="no warning",
        )
        touched = taken.stat().st_mtime
        time.sleep(0.3)  # three of its heartbeats
        assert taken.stat().st_mtime == touched
    assert json.loads(taken.read_text())["token"] == "theirs"  # left to its holder


def test_a_holder_whose_lock_was_taken_and_released_holds_it_again(tmp_path, caplog):
    """Stalled past stale_s, its lock taken over by a run that has ended since (which removed
    it): it went on without a lock, unsaid, and a third run could have started there."""
    with (
        caplog.at_level(logging.WARNING, logger="buzzdask"),
        OutputLock(tmp_path, started="now", stale_s=0.4) as lock,
    ):
        lock.path.unlink()
        wait_until(lock.path.exists, timeout_s=5, failure="not held again")
        assert json.loads(lock.path.read_text())["token"] == lock.token
        assert "the output's lock was gone" in caplog.text
    assert not lock.path.exists()


@requires_ffmpeg
def test_a_record_written_by_a_run_that_took_over_is_kept(
    make_audio, dask_client, tiny_model, tiny_embedder, tmp_path
):
    """A run stalled past stale_s (a suspended job), its output taken over by a resume that
    finished and wrote its buzzdask.json: the stalled run's own, at its end, replaced that
    record; it is kept among the earlier runs."""
    for seed in range(2):
        make_audio(f"f{seed}.flac", n_samples=20 * FRAME, seed=seed)
    out = tmp_path / "out"
    theirs = {"started": "2026-06-01T05:30:00+00:00", "host": OTHER_NODE, "status": "complete"}

    def write_theirs_once_under_way() -> None:
        wait_until(lambda: (out / "journal.jsonl").exists(), timeout_s=120, failure="no journal")
        (out / "buzzdask.json").write_text(json.dumps(theirs))

    writer = threading.Thread(target=write_theirs_once_under_way)
    writer.start()
    result = buzzdask.analyze(
        tmp_path / "audio",
        tiny_model,
        output=out,
        client=dask_client,
        embedder=str(tiny_embedder),
        chunk_seconds=1.0,
        progress=False,
    )
    writer.join()
    (earlier,) = result.metadata["earlier_runs"]
    assert (earlier["started"], earlier["host"]) == (theirs["started"], OTHER_NODE)
    recorded = json.loads((out / "buzzdask.json").read_text())
    assert recorded["earlier_runs"] == [earlier] and recorded["status"] == "complete"


def test_a_lock_made_whose_link_answer_was_lost_is_held(tmp_path, monkeypatch):
    """NFS: the hard link was made, but the reply was lost, and the retry says it exists."""
    from buzzdask import lock as lock_module

    real_link = os.link

    def link_then_lose_the_reply(source: str, target: str) -> None:
        real_link(source, target)
        raise FileExistsError(target)

    monkeypatch.setattr(lock_module.os, "link", link_then_lose_the_reply)
    with OutputLock(tmp_path, started="now", stale_s=60) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    assert not (tmp_path / LOCK_NAME).exists()


def _contend(root: str, results: multiprocessing.Queue, ready: Any, tried: Any) -> None:
    ready.wait(60)  # both started: they contend at the same moment, however slow a spawn is
    try:
        with OutputLock(Path(root), started="now", stale_s=60):
            results.put("won")
            tried.wait(60)  # hold the lock until the other has tried
    except OutputConflictError:
        results.put("refused")
        tried.wait(60)


@pytest.mark.parametrize("existing", ["none", "stale"])
def test_two_processes_never_both_hold_an_output(tmp_path, existing):
    if existing == "stale":
        _lock_file(tmp_path, host=OTHER_NODE, pid=1, age_s=600)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ready, tried = context.Barrier(2), context.Barrier(2)
    contenders = [
        context.Process(target=_contend, args=(str(tmp_path), results, ready, tried))
        for _ in range(2)
    ]
    for process in contenders:
        process.start()
    for process in contenders:
        process.join(60)
    assert sorted(results.get(timeout=5) for _ in contenders) == ["refused", "won"]


def test_a_lock_names_the_command_as_typed(monkeypatch) -> None:
    """What a refusal says holds an output: the command as its user typed it."""
    import importlib.machinery

    from buzzdask.lock import command_line

    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None)
    monkeypatch.setattr(sys, "argv", ["/home/me/.venv/bin/buzzdask", "export", "out dir"])
    assert command_line() == "buzzdask export 'out dir'"
    assert command_line(most=12) == "buzzdask ..."
    monkeypatch.setattr(sys, "argv", ["/home/me/run.py", "site_a"])
    assert command_line() == "python run.py site_a"
    # python -m buzzdask.cluster: argv[0] is the package's __main__.py
    spec = importlib.machinery.ModuleSpec("buzzdask.cluster.__main__", None)
    monkeypatch.setattr(main, "__spec__", spec)
    monkeypatch.setattr(sys, "argv", ["/x/buzzdask/cluster/__main__.py", "--config", "cardinal"])
    assert command_line() == "python -m buzzdask.cluster --config cardinal"


@requires_slurm
def test_a_lock_whose_slurm_job_ended_is_taken_over_at_once(local_slurm, tmp_path, caplog):
    """A job killed outright (its time limit's SIGKILL, the OOM killer, its node lost) leaves
    its lock, fresh: the next job, submitted at once on another node, need not wait
    lock-stale-seconds where SLURM says the job ended."""
    from buzzdask.slurm_jobs import ended_state

    out = tmp_path / "out"
    take = f"from buzzdask.lock import OutputLock; OutputLock({str(out)!r}, started='now', "
    take += "stale_s=120).__enter__(); import os; os._exit(0)"  # gone without releasing it
    run_batch_job(f"#!/bin/bash\n{shlex.quote(sys.executable)} -c {shlex.quote(take)}\n", tmp_path)
    entry = json.loads((out / LOCK_NAME).read_text())
    job = entry["slurm_job"]
    assert entry["slurm_cluster"] == "localslurm" and job.isdigit()
    # On another node (this host's holders are asked themselves), touched a moment ago.
    (out / LOCK_NAME).write_text(json.dumps({**entry, "host": OTHER_NODE}))
    with (
        caplog.at_level(logging.WARNING, logger="buzzdask"),
        OutputLock(out, started="now", stale_s=120) as lock,
    ):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    said = f"from a run that is gone (host {OTHER_NODE}, pid {entry['pid']}, SLURM job {job}, "
    assert said in caplog.text and "; its SLURM job ended: COMPLETED)" in caplog.text

    running = subprocess.run(
        ["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    try:
        # Its job runs: the holder may too (held until stale, as any other host's).
        (out / LOCK_NAME).write_text(
            json.dumps({**entry, "host": OTHER_NODE, "slurm_job": running})
        )
        with pytest.raises(OutputConflictError, match=f"pid {entry['pid']}, SLURM job {running}, "):
            OutputLock(out, started="now", stale_s=120).__enter__()
    finally:
        subprocess.run(["scancel", running], check=True)
    wait_until(lambda: ended_state(running, "localslurm") == "CANCELLED", timeout_s=60,
               failure=f"job {running} did not end")  # fmt: skip
    # A job of that id on another cluster is not this one: nothing known, held until stale.
    elsewhere = {**entry, "host": OTHER_NODE, "slurm_job": running, "slurm_cluster": "ascend"}
    (out / LOCK_NAME).write_text(json.dumps(elsewhere))
    with pytest.raises(OutputConflictError, match="in use by another buzzdask run"):
        OutputLock(out, started="now", stale_s=120).__enter__()
    (out / LOCK_NAME).write_text(json.dumps({**elsewhere, "slurm_cluster": "localslurm"}))
    with OutputLock(out, started="now", stale_s=120) as lock:
        assert lock.took_over and lock.took_over.endswith("its SLURM job ended: CANCELLED)")
