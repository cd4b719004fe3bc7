"""``benchmarks/device-check`` as far as a CPU can run it: every stage, on small sizes.

On a machine with a GPU the same code measures the GPU scorer; here a dry run (``--allow-cpu``)
proves the script and its record work, so the first session lent a GPU only has to run it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_ffmpeg, requires_shared

REPO = Path(__file__).resolve().parents[1]
pytestmark = [requires_ffmpeg, requires_shared, pytest.mark.shared_data]


def _device_check(*args: str, shared: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--shared", str(shared), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_dry_run_on_the_cpu_writes_the_whole_record(shared_dir, tmp_path):
    done = _device_check("--allow-cpu", "--quick", "--out", str(tmp_path), shared=shared_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("*-device-cpu.json")
    record = json.loads(path.read_text())
    fidelity = record["fidelity"]
    assert fidelity["scorer"] == {"device": "CPU", "tensor_float_32": False}
    assert set(fidelity["files"]) >= {"testbuzz.mp3"} and len(fidelity["files"]) == 2
    assert fidelity["within_target"]  # a CPU against a CPU: equal
    assert set(record["batch_sweep"]["frames_per_second"]) == {"256", "512"}
    # A CPU's calls: buzzdask.yaml's cpu-call-frames.
    assert record["batch_sweep"]["call_frames"] == {"256": 96, "512": 96}
    run = record["analyze"]
    assert run["files_failed"] == 0 and run["realtime_factor"] > 0
    assert 0 < run["fraction_of_bound"]
    assert record["projection"]["minutes"] > 0


def test_without_a_gpu_it_stops_and_says_so(shared_dir, tmp_path):
    done = _device_check("--out", str(tmp_path), shared=shared_dir)
    assert done.returncode == 2
    assert "sees no GPU" in done.stderr
    assert not list(tmp_path.iterdir())
