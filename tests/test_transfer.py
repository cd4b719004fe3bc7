"""rclone transfers against rclone's own WebDAV server (the SharePoint stand-in), and staging."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dask.utils import format_bytes

from buzzdask import DecodeError, ParameterError, probe_audio
from buzzdask.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK
from buzzdask.decode import decode_chunk, plan_chunks
from buzzdask.inputs import discover
from buzzdask.lock import OutputLock
from buzzdask.rclone import FAILED_MARKER, INCOMING, MANIFEST, TransferError, transfer, upload
from buzzdask.settings import load_settings
from buzzdask.staging import decode_chunk_staged, staged
from buzzdask.write import utc_now
from tests.conftest import (
    BUZZDASK,
    SIGINT_AS_IN_A_TERMINAL,
    held_by_another_thread,
    requires_ffmpeg,
    requires_rclone,
    wait_until,
)
from tests.test_frames import spec

pytestmark = [requires_rclone, requires_ffmpeg]
FRAME = 15360
EXTENSIONS = list(load_settings().extensions)


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def cli(
    *args: str, flags: tuple[str, ...], as_in_a_terminal: bool = False, **popen: object
) -> subprocess.Popen[str]:
    environment = {**os.environ, "DASK_BUZZDASK__TRANSFER__RCLONE_FLAGS": json.dumps(list(flags))}
    # With SIGINT at its default, as a terminal starts a command (a background run of the tests
    # would hand it down ignored).
    start = [sys.executable, "-c", SIGINT_AS_IN_A_TERMINAL] if as_in_a_terminal else []
    return subprocess.Popen(
        [*start, BUZZDASK, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        **popen,
    )


def test_batches_arrive_whole_with_a_manifest(rclone_remote, make_audio, tmp_path):
    remote = rclone_remote.root / "batches"
    for seed, name in enumerate(["site1/a.wav", "site1/b.mp3", "site2/c.wav"]):
        make_audio(name, n_samples=2 * FRAME, seed=seed, directory=remote)
    (remote / "notes.txt").write_text("not audio\n")
    (remote / "site1" / ".hidden.wav").write_bytes(b"")

    result = transfer(
        "sharepoint:batches", tmp_path / "dest", batch_size=2, rclone_flags=rclone_remote.flags
    )

    dest = tmp_path / "dest"
    assert result.files == ["site1/a.wav", "site1/b.mp3", "site2/c.wav"]
    assert result.batches == 2 and result.skipped == []
    assert result.left_out == ["notes.txt", "site1/.hidden.wav"]
    assert result.bytes == sum((remote / name).stat().st_size for name in result.files)
    for name in result.files:
        assert same_bytes(dest / name, remote / name)
    assert not (dest / "notes.txt").exists() and not (dest / "site1" / ".hidden.wav").exists()
    assert not (dest / INCOMING).exists()
    manifest = [json.loads(line) for line in (dest / MANIFEST).read_text().splitlines()]
    assert [(m["file"], m["batch"]) for m in manifest] == [
        ("site1/a.wav", 1),
        ("site1/b.mp3", 1),
        ("site2/c.wav", 2),
    ]
    assert json.loads(result.marker.read_text())["files"] == 3
    # The bookkeeping is invisible to an analysis of the destination.
    assert [f.relative for f in discover(dest, extensions=EXTENSIONS)[1]] == result.files

    again = transfer("sharepoint:batches", dest, batch_size=2, rclone_flags=rclone_remote.flags)
    assert again.files == [] and again.batches == 0
    assert again.skipped == result.files and again.marker.exists()

    # A recording replaced on the remote by one of the same size (a corrected upload) comes
    # again; the others do not.
    replaced = remote / "site1" / "a.wav"
    size = replaced.stat().st_size
    make_audio("site1/a.wav", n_samples=2 * FRAME, seed=9, directory=remote)
    assert replaced.stat().st_size == size and not same_bytes(dest / "site1/a.wav", replaced)
    later = replaced.stat().st_mtime + 3600
    os.utime(replaced, (later, later))
    third = transfer("sharepoint:batches", dest, batch_size=2, rclone_flags=rclone_remote.flags)
    assert third.files == ["site1/a.wav"] and same_bytes(dest / "site1/a.wav", replaced)


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        # A port that holds the digits 401 is not an HTTP 401 (this once failed by chance).
        (
            'couldn\'t list files: Propfind "http://127.0.0.1:40103/": dial tcp '
            "127.0.0.1:40103: connect: connection refused",
            "remote unreachable",
        ),
        ('Propfind "http://127.0.0.1:8080/": 401 Unauthorized', "authentication failed"),
    ],
)
def test_rclone_messages_are_read_by_their_words(stderr: str, reason: str) -> None:
    from buzzdask.rclone import _diagnose

    assert _diagnose(stderr)[0] == reason


@pytest.mark.parametrize(
    ("source", "reason", "message"),
    [
        (
            "wrongpass:",
            "authentication failed",
            "refresh the credentials with `rclone config reconnect wrongpass:`",
        ),
        ("offline:", "remote unreachable", "check the network (OSC compute nodes have none"),
        ("teams:Recordings", "remote not configured", "set it up with `rclone config`"),
        (
            "sharepoint:no/such/folder",
            "not found",
            "check the path (`rclone lsd sharepoint:` lists",
        ),
    ],
)
def test_remote_problems_are_named(rclone_remote, tmp_path, source, reason, message):
    """What went wrong, then what to do about it, each said once."""
    said = re.escape(f"cannot list {source}: {reason}; {message}")
    with pytest.raises(TransferError, match=said) as caught:
        transfer(source, tmp_path / "dest", rclone_flags=rclone_remote.flags)
    assert caught.value.reason == reason
    # Nothing copied; what stopped it is said to a watch of the destination.
    written = list((tmp_path / "dest").rglob("*"))
    assert [path.name for path in written] == [FAILED_MARKER]
    assert f"{reason}; {message}" in json.loads(written[0].read_text())["stopped"]


def test_bad_options_and_missing_rclone(tmp_path):
    with pytest.raises(ParameterError, match="batch_size"):
        transfer("sharepoint:", tmp_path / "dest", batch_size=0)
    with pytest.raises(TransferError, match="not found") as caught:
        transfer("sharepoint:", tmp_path / "dest", rclone="no-such-rclone")
    assert caught.value.reason == "rclone missing"
    # Said to a watch of the destination (`module load rclone` forgotten in its job): it ended
    # only at its idle timeout.
    stopped = json.loads((tmp_path / "dest" / FAILED_MARKER).read_text())["stopped"]
    assert "no-such-rclone" in stopped


def _signal_mid_copy(
    rclone_remote,
    folder: str,
    dest: Path,
    signal_number: int,
    *options: str,
    meanwhile: Callable[[], None] = lambda: None,
) -> tuple[int, str]:
    """``buzzdask transfer`` of ``folder`` (slowly), signalled as part of ``b_large.wav`` is in
    (after ``meanwhile()``); its exit code and stderr. SIGINT goes as a terminal sends it, to
    the process group."""
    slow = (*rclone_remote.flags, "--bwlimit", "400k")
    running = cli(
        "transfer", f"sharepoint:{folder}", str(dest), *options, flags=slow,
        start_new_session=True, as_in_a_terminal=True,
    )  # fmt: skip
    partial = dest / INCOMING / "b_large.wav"
    try:
        wait_until(  # the CLI's start is slow on a loaded machine
            lambda: partial.exists() and partial.stat().st_size > 0,
            timeout_s=60,
            failure=f"nothing of {partial.name} arrived",
            interval_s=0.025,
        )
        meanwhile()
        os.killpg(running.pid, signal_number)
    finally:
        _, stderr = running.communicate(timeout=60)
    return running.returncode, stderr


def test_a_second_transfer_into_the_same_folder_is_refused(rclone_remote, make_audio, tmp_path):
    """Two transfers into one folder (a scrontab's beside a manual one) would both copy every
    file into its hidden folder: the second is refused, naming the first, and touches nothing."""
    remote = rclone_remote.root / "twice"
    make_audio("b_large.wav", n_samples=100 * FRAME, seed=1, directory=remote)
    dest = tmp_path / "dest"

    def refused() -> None:
        with pytest.raises(TransferError, match="being filled by another transfer") as caught:
            transfer("sharepoint:twice", dest, rclone_flags=rclone_remote.flags)
        assert caught.value.reason == "destination in use"
        assert f"(host {socket.gethostname()}, pid " in str(caught.value)

    returncode, _ = _signal_mid_copy(
        rclone_remote, "twice", dest, signal.SIGKILL, meanwhile=refused
    )
    assert returncode == -signal.SIGKILL
    assert not (dest / FAILED_MARKER).exists()  # the refused one wrote no marker either
    # The first one killed: its lock is a dead process's, taken over.
    finished = transfer("sharepoint:twice", dest, rclone_flags=rclone_remote.flags)
    assert finished.files == ["b_large.wav"]


def test_killed_transfer_never_shows_half_a_file(rclone_remote, make_audio, tmp_path):
    remote = rclone_remote.root / "killed"
    make_audio("a_small.wav", n_samples=FRAME, directory=remote)
    make_audio("b_large.wav", n_samples=100 * FRAME, seed=1, directory=remote)  # about 3 MB
    dest = tmp_path / "dest"
    _signal_mid_copy(rclone_remote, "killed", dest, signal.SIGKILL, "--batch-size", "1")
    partial = dest / INCOMING / "b_large.wav"
    assert 0 < partial.stat().st_size < (remote / "b_large.wav").stat().st_size
    visible = discover(dest, extensions=EXTENSIONS)[1]
    assert [f.relative for f in visible] == ["a_small.wav"]
    assert same_bytes(dest / "a_small.wav", remote / "a_small.wav")
    assert not (dest / ".transfer-complete").exists()

    finished = transfer("sharepoint:killed", dest, batch_size=1, rclone_flags=rclone_remote.flags)
    assert finished.files == ["b_large.wav"] and finished.skipped == ["a_small.wav"]
    assert same_bytes(dest / "b_large.wav", remote / "b_large.wav")
    assert finished.marker.exists()


def test_interrupted_transfer_says_how_to_finish(rclone_remote, make_audio, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group): exit 130, and the way on is a transfer's,
    not an analysis' --resume."""
    remote = rclone_remote.root / "interrupted"
    make_audio("b_large.wav", n_samples=100 * FRAME, seed=1, directory=remote)
    dest = tmp_path / "dest"
    returncode, stderr = _signal_mid_copy(rclone_remote, "interrupted", dest, signal.SIGINT)
    assert returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted; the files copied so far are kept: the same command again" in stderr
    assert "--resume" not in stderr
    assert not discover(dest, extensions=EXTENSIONS)[1]
    # A watch of the destination ends there, not after its idle timeout.
    assert json.loads((dest / FAILED_MARKER).read_text())["stopped"] == "interrupted"
    assert not (dest / ".transfer-complete").exists()


def test_upload_sends_results_back(rclone_remote, tmp_path, caplog):
    """Sent while a run (a watch between its passes) still writes there: said, as an export
    says it, and its lock is not sent (it would name a run on a host the copy is not on)."""
    results = tmp_path / "results" / "run1"
    (results / "scores" / "a.wav").mkdir(parents=True)
    metadata = {"status": "complete", "classes": ["ins_buzz"], "model": "model_general_v3"}
    metadata |= {"frame_hop_s": 0.96, "frame_length_s": 0.96, "inputs": {"root": "audio"}}
    (results / "buzzdask.json").write_text(json.dumps(metadata))
    (results / "scores" / "a.wav" / "chunk-000000.parquet").write_bytes(os.urandom(5000))

    with (
        held_by_another_thread(OutputLock(results, started=utc_now(), stale_s=60)),
        caplog.at_level("WARNING", logger="buzzdask"),
    ):
        sent = upload(results, "sharepoint:uploads/run1", rclone_flags=rclone_remote.flags)

    assert "run1: a run still writes to it" in caplog.text
    assert sent.files == ["buzzdask.json", "scores/a.wav/chunk-000000.parquet"]
    assert not list((rclone_remote.root / "uploads").rglob(".buzzdask.lock*"))
    for name in sent.files:
        assert same_bytes(rclone_remote.root / "uploads" / "run1" / name, results / name)
    # Sent again: what the remote has already is not said to be sent (113 files each time).
    again = upload(results, "sharepoint:uploads/run1", rclone_flags=rclone_remote.flags)
    assert (again.files, again.skipped, again.bytes) == ([], sent.files, 0)
    (results / "buzzdask.json").write_text(json.dumps({**metadata, "note": "resumed"}))
    third = upload(results, "sharepoint:uploads/run1", rclone_flags=rclone_remote.flags)
    assert third.files == ["buzzdask.json"] and third.skipped == sent.files[1:]
    assert third.bytes == (results / "buzzdask.json").stat().st_size
    with pytest.raises(TransferError, match="authentication failed; refresh the credentials"):
        upload(results, "wrongpass:uploads/run1", rclone_flags=rclone_remote.flags)
    # Caught by what catches a transfer's unconfigured remote.
    with pytest.raises(TransferError, match="remote not configured") as unknown:
        upload(results, "nosuch:uploads/run1", rclone_flags=rclone_remote.flags)
    assert unknown.value.reason == "remote not configured"


def test_cli_transfer_and_upload(rclone_remote, make_audio, tmp_path, monkeypatch):
    make_audio("x.wav", n_samples=FRAME, directory=rclone_remote.root / "cli")
    (rclone_remote.root / "cli" / "notes.txt").write_text("not audio\n")
    flags = rclone_remote.flags
    done = cli("transfer", "sharepoint:cli", str(tmp_path / "d"), flags=flags)
    stdout, stderr = done.communicate(timeout=120)
    assert done.returncode == EXIT_OK, stderr
    size = format_bytes((tmp_path / "d" / "x.wav").stat().st_size)
    assert stdout.startswith(f"buzzdask: 1 file ({size}) in 1 batch -> "), stdout
    assert stdout.endswith("; left out (not audio, or hidden): notes.txt\n"), stdout
    assert "buzzdask: transfer batch 1/1: 1 file arrived" in stderr  # as each batch lands

    back = cli("transfer", "--upload", str(tmp_path / "d"), "sharepoint:cli-back", flags=flags)
    stdout, stderr = back.communicate(timeout=120)
    assert back.returncode == EXIT_OK, stderr
    assert (rclone_remote.root / "cli-back" / "x.wav").is_file()
    # An upload is one rclone call: --batch-size was taken without a word.
    batched = cli(
        "transfer", "--upload", "--batch-size", "10", str(tmp_path / "d"), "sharepoint:x",
        flags=flags,
    )  # fmt: skip
    stdout, stderr = batched.communicate(timeout=120)
    assert batched.returncode == 2 and "--batch-size applies to downloads" in stderr

    refused = cli("transfer", "wrongpass:cli", str(tmp_path / "e"), flags=flags)
    stdout, stderr = refused.communicate(timeout=120)
    assert refused.returncode == EXIT_ERROR
    assert stderr.startswith("buzzdask: error: cannot list wrongpass:cli: authentication failed")

    # Results sent the wrong way: swapped arguments, or --upload forgotten; an upload to a
    # local folder. Refused, nothing copied into a folder named after the remote.
    monkeypatch.chdir(tmp_path)
    for args, said in [
        (["transfer", "d", "sharepoint:cli-back2"], "is an rclone remote, and transfer copies"),
        (["transfer", "--upload", "d", "elsewhere"], "is not on an rclone remote"),
        (["transfer", "--upload", "d", "nosuch:x"], "nosuch:x: remote not configured"),
        # A remote rclone lacks (misspelt, not set up yet): a local folder "Sharepoint:cli" was
        # filled, and said to be sent.
        (["transfer", "d", "Sharepoint:cli"], "which rclone does not have (its remotes: "),
    ]:
        wrong = cli(*args, flags=flags)
        stdout, stderr = wrong.communicate(timeout=120)
        assert wrong.returncode == EXIT_ERROR and said in stderr, stderr
    assert not [path for path in tmp_path.iterdir() if ":" in path.name]
    assert not (tmp_path / "elsewhere").exists()
    assert not (rclone_remote.root / "cli-back2").exists()


def test_staged_decode_equals_in_place_and_cleans_up(make_audio, tmp_path, dask_client, caplog):
    frame_spec = spec()
    path = make_audio("a.mp3", n_samples=7 * FRAME, rate=44100, channels=2)
    info = probe_audio(path)
    plans = plan_chunks(info, frame_spec, frames_per_chunk=2)
    local = tmp_path / "node_local"
    local.mkdir()

    def staged_files() -> list[Path]:
        return [p for p in local.rglob("*") if p.is_file() and p.name != ".owner"]

    for plan in plans:
        expected = decode_chunk(info, plan, spec=frame_spec)
        got = decode_chunk_staged(
            info, plan, spec=frame_spec, staging_directory=str(local), keep_files=0
        )
        np.testing.assert_array_equal(got.samples, expected.samples)
        assert got.n_frames == expected.n_frames
        assert staged_files() == []  # removed once no decode uses it

    # Chunks in flight together share one copy; one idle copy is kept for the next chunk.
    with staged(path, directory=str(local)) as first, staged(path, directory=str(local)) as again:
        assert first == again and same_bytes(Path(first), path)
    assert len(staged_files()) == 1
    other = make_audio("b.wav", n_samples=FRAME)
    with staged(other, directory=str(local)):
        pass
    assert [p.name.split("-", 1)[1] for p in staged_files()] == ["b.wav"]

    # On a real worker process, into that worker's own directory.
    future = dask_client.submit(
        decode_chunk_staged, info, plans[0], spec=frame_spec, staging_directory=str(local)
    )
    expected_first = decode_chunk(info, plans[0], spec=frame_spec)
    np.testing.assert_array_equal(future.result().samples, expected_first.samples)

    not_audio = tmp_path / "audio" / "c.mp3"
    not_audio.write_text("text\n" * 100)
    broken = info.__class__(**{**info.__dict__, "path": str(not_audio)})
    with pytest.raises(DecodeError) as caught:
        decode_chunk_staged(broken, plans[0], spec=frame_spec, staging_directory=str(local))
    assert caught.value.path == str(not_audio)
    # A missing directory is made; this one cannot be: read in place, one warning.
    unusable = not_audio / "under-a-file"
    with caplog.at_level(logging.WARNING, logger="buzzdask.staging"):
        for _ in range(2):
            in_place = decode_chunk_staged(
                info, plans[0], spec=frame_spec, staging_directory=str(unusable)
            )
            np.testing.assert_array_equal(in_place.samples, expected_first.samples)
    assert caplog.text.count(f"cannot stage copies in {unusable} (Not a directory)") == 1
    # The original gone since its probe is said so, not blamed on node-local disk.
    path.unlink()
    with pytest.raises(DecodeError, match="cannot read the file: No such file"):
        decode_chunk_staged(info, plans[0], spec=frame_spec, staging_directory=str(local))


def test_copies_of_a_worker_that_did_not_exit_cleanly_are_removed(make_audio, tmp_path):
    """A worker ended without its atexit (a nanny's kill as a notebook's cluster closes, a
    killed job) leaves its staged copy; the next worker to stage on the host removes it."""
    path = make_audio("a.wav", n_samples=FRAME)
    local = tmp_path / "node_local"
    left_behind = (
        "import os, sys\n"
        "from buzzdask.staging import staged\n"
        "with staged(sys.argv[1], directory=sys.argv[2], keep_files=1):\n"
        "    pass\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", left_behind, str(path), str(local)], check=True)
    (dead,) = local.iterdir()
    assert [p.name for p in dead.iterdir() if p.suffix == ".wav"], "its copy outlived it"
    stranger = local / "buzzdask-stage-not-ours"
    stranger.mkdir()  # no owner file: left alone
    with staged(path, directory=str(local)) as copy:
        assert same_bytes(Path(copy), path)
    assert not dead.exists() and stranger.exists()
