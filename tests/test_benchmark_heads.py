"""``python -m benchmarks.heads --quick``: the whole benchmark on a 6-minute corpus, one round.

The real run (8 hours, 3 rounds) is a measurement, not a test; this proves the script, its
checks (two heads equal one head, a re-scoring equals a fresh analysis) and its record work.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_ffmpeg, requires_shared, run_benchmark

pytestmark = [requires_ffmpeg, requires_shared, pytest.mark.shared_data, pytest.mark.slow]


def test_quick_run_writes_the_whole_record(shared_dir, tmp_path):
    record_path = tmp_path / "heads.json"
    run_benchmark(
        "benchmarks.heads",
        *("--quick", "--shared-dir", str(shared_dir)),
        *("--cache-dir", str(tmp_path / "cache"), "--record", str(record_path)),
    )
    record = json.loads(record_path.read_text())
    targets = record["targets"]
    assert set(targets) >= {
        "two_heads_over_one",
        "rescore_speedup",
        "rescore_max_abs_diff",
        "float16_max_abs_diff",
        "store_bytes_per_audio_hour",
    }
    assert targets["rescore_max_abs_diff"]["value"] <= 1e-4
    assert targets["two_heads_max_abs_diff"]["value"] <= 1e-6
    assert targets["two_heads_over_one"]["wall"]["median"] > 0
    assert targets["rescore_speedup"]["wall"]["median"] > 0
    assert targets["store_bytes_per_audio_hour"] > 0
    assert record["float16"]["max_abs_diff"] >= 0
    (only,) = record["rounds"]
    assert only["rescore"]["chunks_from_store"] == only["rescore"]["chunks_written"] > 0
    assert only["rescore"]["split_s"].get("decode_compute", 0) == 0  # no audio was decoded
    assert only["two heads"]["heads"] == 2
    assert record["heads"]["second"]["name"] != "model_general_v3"
    assert not (tmp_path / "cache" / "heads-work").exists()  # scratch removed
