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
