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
from benchmarks.summary import GOALS, METRICS, bounds, round_costs, targets
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


def _round(*, c2_decode: float, c2_model: float, ratio: float | None) -> dict:
    """One corpus's round as the harness records it (costs in CPU-s per audio second)."""
    stage = {"core_s_per_audio_s": 1e-3, "realtime_factor": 1000.0, "cores_used": 2}
    one = {
        "decode": {"1 at a time": stage, "2 at a time": stage},
        "model": {"batch 512 (default)": stage},
        "corun": {
            "c_decode_core_s_per_audio_s": c2_decode,
            "c_model_core_s_per_audio_s": c2_model,
            "realtime_factor": 2 / (c2_decode + c2_model),
        },
        "baseline": {"realtime_factor": 500.0},
        "analyze": {"buzzdask": {"core_s_per_audio_s": 1.2e-3, "realtime_factor": 1200.0}},
    }
    if ratio is not None:
        one["pairing"] = {"ratio": ratio}
    return one


def test_paired_bound_charges_calls_side_by_side_where_decoding_leaves_the_cores():
    # The WAVs: decoding a tenth of the model's work, nine tenths of it with calls paired.
    wav = round_costs(_round(c2_decode=0.1e-3, c2_model=1e-3, ratio=1.05), cores=2)
    assert wav["c2p_model"] == pytest.approx(1e-3 * (0.1 + 0.9 * 1.05))
    assert wav["paired_corun_bound"] == pytest.approx(2 / (0.1e-3 + wav["c2p_model"]))
    assert wav["paired_corun_bound"] < wav["corun_bound"]
    # MP3: decoding as costly as the model keeps every call company; B₂ᵖ is B₂.
    mp3 = round_costs(_round(c2_decode=1e-3, c2_model=1e-3, ratio=1.05), cores=2)
    assert mp3["paired_corun_bound"] == pytest.approx(mp3["corun_bound"])
    # A record from before the pairing stage: no B₂ᵖ, and its other figures as they were.
    old = round_costs(_round(c2_decode=0.1e-3, c2_model=1e-3, ratio=None), cores=2)
    assert "paired_corun_bound" not in old
    assert old["corun_bound"] == wav["corun_bound"]

    rounds = {"wav": [_round(c2_decode=0.1e-3, c2_model=1e-3, ratio=r) for r in (1.02, 1.05)]}
    paired = bounds(rounds["wav"], cores=2)["paired_corun"]
    assert paired["calls_side_by_side_over_one"] == pytest.approx(1.035)
    found = targets(rounds, 2, "buzzdask")["wav"]
    assert found["cpu_over_paired_corun_stages"] < found["cpu_over_corun_stages"]
    assert found["fraction_of_paired_corun_bound"] > found["fraction_of_corun_bound"]
    unpaired = targets(
        {"wav": [_round(c2_decode=0.1e-3, c2_model=1e-3, ratio=None)]}, 2, "buzzdask"
    )
    assert "cpu_over_paired_corun_stages" not in unpaired["wav"]


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
        *("--corun-seconds", "1", "--pairing-seconds", "30", "--pairing-passes", "1"),
        *("--no-slurm", "--shared-dir", str(shared_dir)),
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
    # The scorer's calls side by side and one at a time gave the same activations.
    assert one_round["pairing"]["max_abs_diff"] <= 1e-5
    assert len(one_round["pairing"]["ratios"]) == 1
    assert "paired_corun" in record["bounds"]["small-files"]
    for result in one_round["analyze"].values():
        assert result["max_abs_diff_vs_baseline"] <= 1e-5
        assert result["errors"] == 0
        # Each stage found its files in the page cache: read through before it started.
        assert result["page_cache"]["files"] == 12
        assert result["page_cache"]["bytes"] > 12 * 44
    (short,) = record["results"]["analyze_short_file"]
    assert short["chunks_written"] == 1
    assert not (tmp_path / "cache" / "work").exists()  # scratch removed
