"""``python -m benchmarks`` on a tiny corpus, one round: the harness runs, checks and records.

The real run (8 hours per corpus, interleaved rounds) is a measurement, not a test; this proves
that every stage runs, that buzzdask's outputs pass the harness's checks against the baseline,
and that the record holds every target a reader checks (issue 20's "Record"). Also the page-cache
warm-up each stage starts with.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.measure import warm_page_cache
from benchmarks.summary import GOALS, METRICS
from tests.conftest import requires_ffmpeg, requires_shared, run_benchmark


def test_warm_page_cache_reads_every_file_through(tmp_path):
    sizes = {"a.wav": 5, "b.mp3": 3 * 2**20 + 7, "empty.wav": 0}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(bytes(size))
    paths = [str(tmp_path / name) for name in sizes]
    # A folder (the small-files corpus's root) and a missing file are the stage's to report.
    warmed = warm_page_cache([*paths, str(tmp_path), str(tmp_path / "gone.wav")], block_bytes=2**20)
    assert warmed["files"] == 3
    assert warmed["bytes"] == sum(sizes.values())
    assert warmed["read_s"] >= 0


@requires_ffmpeg
@requires_shared
@pytest.mark.shared_data
@pytest.mark.slow
def test_tiny_run_writes_the_whole_record(shared_dir, tmp_path):
    out = tmp_path / "results"
    run_benchmark(
        "benchmarks",
        *("--corpora", "small-files", "--small-files", "12", "--repeats", "1"),
        *("--model-sweep", "short", "--model-seconds", "30", "--model-passes", "1"),
        *("--corun-seconds", "1", "--no-slurm", "--shared-dir", str(shared_dir)),
        *("--cache-dir", str(tmp_path / "cache"), "--out", str(out)),
    )
    (record_path,) = out.glob("*.json")
    assert record_path.with_suffix(".png").is_file()
    record = json.loads(record_path.read_text())
    assert record["command"].startswith("python -m benchmarks --corpora small-files")

    small = record["targets"]["small-files"]
    assert set(METRICS) <= set(small)
    assert small["rounds"] == 1
    # A run's fixed cost taken off leaves less CPU per audio second (on a corpus this small,
    # the wall seconds left can be too few to compare).
    assert small["cpu_over_corun_stages_without_fixed"] < small["cpu_over_corun_stages"]
    start_up = record["targets"]["start_up"]
    assert start_up["first_partition_s"] > 0
    assert start_up["cli_short_file_s"] > 0
    assert start_up["fixed_cost"]["cpu_s"]["median"] > 0
    assert start_up["fixed_cost"]["wall_s"]["median"] > 0
    assert set(record["targets"]["goals"]) == set(GOALS)

    (one_round,) = record["results"]["corpora"]["small-files"]
    for result in one_round["analyze"].values():
        assert result["max_abs_diff_vs_baseline"] <= 1e-5
        assert result["errors"] == 0
        # Each stage found its files in the page cache: read through before it started.
        assert result["page_cache"]["files"] == 12
        assert result["page_cache"]["bytes"] > 12 * 44
    (short,) = record["results"]["analyze_short_file"]
    assert short["chunks_written"] == 1
    assert not (tmp_path / "cache" / "work").exists()  # scratch removed
