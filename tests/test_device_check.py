"""``benchmarks/device-check`` as far as a CPU can run it: every stage, on small sizes.

On a machine with a GPU the same code measures the GPU scorer; here a dry run (``--allow-cpu``)
proves the script and its record work, so the first session lent a GPU only has to run it. On a
machine that TensorFlow cannot reach (no package index), it measures the decode side alone.
"""

from __future__ import annotations

import json
import os
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
    _assert_decode_side(record)
    assert record["projection"]["bound_by"] in {"decode", "scorer"}
    assert record["projection"]["scorer_rtf_per_gpu"] > 0


def _assert_decode_side(record: dict) -> None:
    scaling = record["decode_scaling"]
    counts = [run["processes"] for run in scaling["runs"]]
    assert counts[0] == 1 and counts[-1] == len(os.sched_getaffinity(0))  # one to every core
    for run in scaling["runs"]:
        assert run["chunks"] == 2 * run["processes"]  # --quick: two chunks per process
        assert run["audio_s"] > 0 and run["realtime_factor"] > 0 and run["cores_busy"] > 0
    assert scaling["per_core_rtf_all_cores"] > 0
    loopback = record["loopback"]
    assert loopback["bytes"] == 4 * 60 * 16000 * 4  # four minutes of 16 kHz float32
    assert loopback["bytes_per_s"] > 0
    assert record["projection"]["minutes"] > 0
    assert record["projection"]["scorer_rtf_per_gpu_needed"] > 0


def test_without_tensorflow_or_a_package_index_it_measures_the_decode_side(shared_dir, tmp_path):
    """What a lent machine with no TensorFlow and no network gets from the shell script."""
    no_tensorflow = tmp_path / "no-tensorflow"
    no_tensorflow.mkdir()
    (no_tensorflow / "tensorflow.py").write_text("raise ImportError('no TensorFlow here')\n")
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", "benchmarks/device-check", "--quick"],
        cwd=REPO,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "PYTHONPATH": str(no_tensorflow),
            "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # nothing listens on the discard port
            "OUT": str(out),
            "BUZZDASK_SHARED_DIR": str(shared_dir),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no TensorFlow and no package index" in done.stderr
    (path,) = out.glob("*-device-decode.json")
    record = json.loads(path.read_text())
    assert "tensorflow" not in record and "fidelity" not in record
    _assert_decode_side(record)
    assert record["projection"]["scorer_rtf_per_gpu"] is None
    assert record["projection"]["bound_by"] == "decode (no GPU scorer measured)"


def test_without_a_gpu_it_stops_and_says_so(shared_dir, tmp_path):
    done = _device_check("--out", str(tmp_path), shared=shared_dir)
    assert done.returncode == 2
    assert "sees no GPU" in done.stderr
    assert not list(tmp_path.iterdir())
