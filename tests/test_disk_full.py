"""The output's file system fills mid-run: a clear error, nothing half written, a resume finishes.

The output is a small tmpfs mounted here (root only); "freeing space" is remounting it larger.
The resumed run is compared frame by frame with an independent uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import buzzdask
from buzzdask import OutputFullError
from buzzdask.write import OutputLayout
from tests.conftest import assert_same_frames, requires_ffmpeg

FRAME = 15360  # samples in one 0.96 s frame at 16 kHz
PAGE = 4096  # tmpfs gives each file whole pages

pytestmark = [
    requires_ffmpeg,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root"
    ),
]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _mount(mount_point: Path, size_bytes: int, *, remount: bool = False) -> None:
    options = f"{'remount,' if remount else ''}size={size_bytes}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)], check=True)


def _pages(directory: Path) -> int:
    return sum(-(-path.stat().st_size // PAGE) for path in directory.rglob("*") if path.is_file())


def test_disk_full_mid_run_then_resume(run, make_audio, tmp_path, small_disk):
    # FLAC: each one-second chunk is an ffmpeg run, so chunks reach the scorer a few at a time
    # and some are recorded before the disk fills (WAVs, read in process, all come at once).
    for seed in range(3):
        make_audio(f"f{seed}.flac", n_samples=12 * FRAME, seed=seed)
    reference = run(tmp_path / "audio", chunk_seconds=1.0, output=tmp_path / "reference")
    partitions = list(reference.dataset.rglob("*.parquet"))
    # Room for the run's own files and about half of its 36 partitions.
    _mount(small_disk, (_pages(reference.output) - _pages(reference.dataset) // 2) * PAGE)
    output = small_disk / "out"

    with pytest.raises(OutputFullError) as raised:
        run(tmp_path / "audio", chunk_seconds=1.0, output=output)
    message = str(raised.value)
    assert f"the file system of output {output} is full (" in message
    assert "more is needed for the" in message and "of audio left" in message
    assert "--resume, or on_conflict='resume'" in message

    # Nothing half written: every partition whole, whole journal lines that vouch only for
    # partitions in place. (A worker stopped as the cluster closed, while it wrote, may leave
    # a hidden temporary file: readers skip it, and the resume removes it.)
    layout = OutputLayout(output)
    written = list(layout.scores.rglob("*"))
    on_disk = [path for path in written if path.suffix == ".parquet"]
    assert 0 < len(on_disk) < len(partitions)
    for path in on_disk:
        assert pq.read_metadata(path).num_rows >= 1
    journal = [json.loads(line) for line in layout.journal.read_text().splitlines()]
    assert {layout.partition(e["file"], e["chunk"]) for e in journal} <= set(on_disk)

    _mount(small_disk, 16 * 1024 * 1024, remount=True)  # space freed
    resumed = run(tmp_path / "audio", chunk_seconds=1.0, output=output, on_conflict="resume")
    assert resumed.ok, resumed.errors
    assert resumed.summary["resume"]["chunks_rejected"] == 0
    assert resumed.summary["chunks_skipped_resume"] == len(journal)
    frame = resumed.to_pandas()
    assert not frame.duplicated(["file", "start"]).any()
    assert_same_frames(frame, reference.to_pandas())
    assert len(buzzdask.open_run(output).frames()) == len(frame)
    assert not [path for path in layout.scores.rglob("*") if path.name.endswith(".tmp")]


def test_an_output_on_a_full_disk_says_so_before_any_work(small_disk, tmp_path):
    """Its lock cannot be written: the advice is room, not permissions."""
    from buzzdask import OutputConflictError
    from buzzdask.lock import OutputLock

    _mount(small_disk, 4 * PAGE)
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as stream:
        stream.write(b"x" * (8 * PAGE))
    with (
        pytest.raises(OutputConflictError, match=r"No space left on device.*free some space"),
        OutputLock(small_disk / "out", started="now", stale_s=120),
    ):
        pass
    # Nothing of the lock left behind (an empty .new file kept the output folder from being
    # removed as left empty).
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == ["filler"]


@pytest.fixture
def read_only_folders() -> Iterator[list[Path]]:
    """Folders to mount an empty read-only tmpfs on (a labmate's, for a user who may not write
    there: root writes anywhere else); unmounted at the end."""
    mounted: list[Path] = []
    yield mounted
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _read_only(folder: Path, mounted: list[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    mounted.append(folder)


def test_a_folder_of_the_output_it_may_not_write_stops_the_run(
    run, make_audio, tmp_path, dask_client, tiny_model, tiny_embedder, read_only_folders
):
    """A labmate's folder in a shared output (made with umask 022): writing there is refused.
    The run stops, saying where and what to do, and resumes once it may: its recordings were
    failed as broken instead (and any recording whose score task it shared)."""
    from tests.test_cli import buzzdask_cli

    make_audio("siteA/a.wav", n_samples=3 * FRAME)
    out = tmp_path / "out"
    assert run(tmp_path / "audio", output=out).ok
    make_audio("siteB/b.wav", n_samples=3 * FRAME, seed=1)
    _read_only(out / "scores" / "siteB" / "b.wav", read_only_folders)
    args = [
        "analyze", str(tmp_path / "audio"), "--output", str(out), "--resume", "--no-progress",
        "--model", str(tiny_model), "--embedder", str(tiny_embedder),
        "--scheduler", dask_client.scheduler.address,
    ]  # fmt: skip
    stopped = buzzdask_cli(*args)
    assert stopped.returncode == 1, stopped.stderr
    said = f"buzzdask: error: cannot write in output {out}: {out / 'scores' / 'siteB' / 'b.wav'}/"
    assert said in stopped.stderr and "Traceback" not in stopped.stderr
    assert "(Read-only file system; owned by root). Its owner can give the group write " in (
        stopped.stderr
    )
    assert f"(chmod -R g+w {out}; umask 002 in job scripts keeps it so)" in stopped.stderr
    metadata = json.loads((out / "buzzdask.json").read_text())
    assert metadata["status"] == "failed"
    assert metadata["stopped_by"].startswith("OutputPermissionError: cannot write in output")
    # Not the recording's fault: none is failed as broken.
    errors = out / "errors.parquet"
    assert not errors.exists() or pq.read_table(errors).num_rows == 0
    subprocess.run(["umount", str(out / "scores" / "siteB" / "b.wav")], check=True)
    read_only_folders.clear()
    resumed = buzzdask_cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    frames = buzzdask.open_run(out).frames().compute()
    assert sorted(frames.groupby("file").size().items()) == [("siteA/a.wav", 3), ("siteB/b.wav", 3)]


def test_a_file_it_may_not_write_is_said_in_one_line(run, make_audio, tmp_path, read_only_folders):
    """Any write refused (an export's folder a labmate made, a partition a resume removes, a
    lock it takes over): which file, whose, what to do; not a traceback."""
    from tests.test_cli import buzzdask_cli

    make_audio("siteA/a.wav", n_samples=3 * FRAME)
    out = run(tmp_path / "audio", output=tmp_path / "out").output
    dest = tmp_path / "csv"
    export = ["export", str(out), "--format", "buzzdetect", "--dest", str(dest)]
    assert buzzdask_cli(*export).returncode == 0
    _read_only(dest / "siteA", read_only_folders)  # emptied: as if a labmate had made it
    refused = buzzdask_cli(*export, "--overwrite")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.startswith(f"buzzdask: error: {dest / 'siteA'}/")
    assert ": Read-only file system; owned by root: ask its owner for access (chmod -R g+rwX" in (
        refused.stderr
    )
