"""The GPU path, as far as a machine without a GPU can prove it.

A worker that declares a GPU TensorFlow cannot see stops the run before any chunk; TensorFloat-32
is off in the scorer's process; a batch that runs out of GPU memory is split and scored again
with the same activations. ``benchmarks/device-check`` measures the rest on a real GPU.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from dask.typing import Key
from distributed import Client, LocalCluster, Scheduler, SchedulerPlugin, wait

import buzzdask
from buzzdask import ScorerError
from buzzdask.cli import EXIT_ERROR
from tests.conftest import BUZZDASK, CLASSES, requires_ffmpeg
from tests.test_score_tuning import DEFAULT_BATCH_FRAMES, SPEC, _assert_equal, _chunks

FRAME = 15360
GPU_MISMATCH = (
    r"declares GPU=1 but TensorFlow .* sees 0 GPU\(s\) \[\] with CUDA_VISIBLE_DEVICES=.*"
    r"pip install 'buzzdask\[gpu\]'"
)


@pytest.fixture
def gpu_declaring_cluster() -> Any:
    """A real local cluster whose one worker declares ``GPU=1`` on a machine without one.

    ``check-gpus`` is set explicitly: loading the local-slurm configuration (fake GPUs) earlier
    in the session turns it off.
    """
    with (
        dask.config.set({"buzzdask.check-gpus": True}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=True,
            resources={"GPU": 1},
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@requires_ffmpeg
def test_worker_declaring_a_gpu_tensorflow_cannot_see_stops_the_run(
    gpu_declaring_cluster, make_audio, tmp_path, tiny_embedder, tiny_model
):
    make_audio("a.wav", n_samples=3 * FRAME)
    with pytest.raises(ScorerError, match=GPU_MISMATCH):
        buzzdask.analyze(
            tmp_path / "audio",
            tiny_model,
            output=tmp_path / "out",
            client=gpu_declaring_cluster,
            embedder=str(tiny_embedder),
            progress=False,
        )
    assert not list((tmp_path / "out").rglob("*.parquet"))

    cli = subprocess.run(
        [
            *(BUZZDASK, "analyze", str(tmp_path / "audio")),
            *("--model", str(tiny_model), "--embedder", str(tiny_embedder)),
            *("--output", str(tmp_path / "cli"), "--no-progress"),
            *("--scheduler", gpu_declaring_cluster.scheduler.address),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == EXIT_ERROR, cli.stderr
    errors = [line for line in cli.stderr.splitlines() if line.startswith("buzzdask: error:")]
    assert len(errors) == 1
    assert re.search(GPU_MISMATCH, errors[0])
    assert not list((tmp_path / "cli").rglob("*.parquet"))


def test_a_worker_joining_mid_run_with_a_gpu_tensorflow_cannot_see_is_left_out(
    tiny_embedder, tiny_model, caplog
):
    """A replacement GPU job on a node whose GPU TensorFlow cannot see stopped the whole run,
    though its scorers worked: once one is up, the newcomer alone is left out."""
    from buzzdask.models import resolve_model
    from buzzdask.scorers import ScorerPool
    from buzzdask.settings import load_settings

    model = resolve_model(tiny_model, embedder=str(tiny_embedder))
    with (
        dask.config.set({"buzzdask.check-gpus": True}),
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        pool = ScorerPool.from_settings(
            client,
            load_settings(),
            head_path=model.path,
            embedder_handle=model.embedder.handle,
            spec=model.embedder.frame_spec(),
            n_classes=len(model.classes),
            key_prefix="scorer",
            cpu_scorer_workers=None,
        )
        ((first, future),) = pool.start().items()
        future.result(timeout=120)
        pool.started(first)
        joined = subprocess.Popen(
            [
                *(sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address),
                *("--nthreads", "1", "--resources", "GPU=1", "--no-dashboard"),
            ]
        )
        try:
            client.wait_for_workers(2, timeout=120)
            pool._next_refresh = 0.0  # its look at the cluster now, not in a few seconds
            ((address, future),) = pool.refresh().items()
            wait(future, timeout=120)
            with caplog.at_level("WARNING", logger="buzzdask"):
                assert pool.started(address) == {}
            pool._next_refresh = 0.0
            assert pool.refresh() == {}  # not tried again at each look (every 5 s)
        finally:
            pool.release()
            joined.terminate()
            joined.wait(timeout=60)
    assert list(pool.scorers) == [] and address != first  # released; the first one scored
    assert pool.restarts == 0  # no scorer started on the newcomer (it counted one)
    assert re.search(f"no scorer on {address} .*" + GPU_MISMATCH, caplog.text), caplog.text


def _tensor_float_32() -> bool:
    import tensorflow as tf

    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


@requires_ffmpeg
def test_scorer_turns_tensor_float_32_off_and_records_its_device(
    run, dask_client, make_audio, tmp_path
):
    make_audio("a.wav", n_samples=3 * FRAME)
    result = run(tmp_path / "audio")
    scorers = result.summary["scorers"]
    assert scorers and {s["device"] for s in scorers} == {"CPU"}
    assert result.metadata["summary"]["scorers"] == scorers  # buzzdask.json holds them too
    enabled = dask_client.run(_tensor_float_32, workers=[s["worker"] for s in scorers])
    assert set(enabled.values()) == {False}


class _SmallGPU:
    """A scorer whose embedder runs out of memory above ``most_frames`` frames, as a full GPU."""

    def __init__(self, most_frames: int, **options: Any) -> None:
        from buzzdask.score import Scorer

        scorer = Scorer(**options)
        embed = scorer._embed
        most = scorer._padded_length(most_frames) if most_frames else 0

        def embed_or_run_out(waveform: np.ndarray) -> np.ndarray:
            if len(waveform) > most:
                raise scorer._tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")
            return embed(waveform)

        scorer._embed = embed_or_run_out  # type: ignore[method-assign]
        self.scorer = scorer


@pytest.mark.parametrize("most_frames", [8, 1])
def test_batch_out_of_gpu_memory_is_split_and_gives_the_same_activations(
    tiny_embedder: Path, tiny_model: Path, most_frames: int
) -> None:
    from buzzdask.score import Scorer

    options = {
        "head_path": str(tiny_model),
        "embedder_handle": str(tiny_embedder),
        "spec": SPEC,
        "n_classes": len(CLASSES),
        "batch_frames": DEFAULT_BATCH_FRAMES,
    }
    expected = Scorer(**options).score(_chunks())
    small = _SmallGPU(most_frames, **options).scorer
    _assert_equal(small.score(_chunks()), expected)
    assert small.stats()["oom_splits"] > 0


def test_a_frame_that_does_not_fit_is_an_error(tiny_embedder: Path, tiny_model: Path) -> None:
    import tensorflow as tf

    small = _SmallGPU(
        0,
        head_path=str(tiny_model),
        embedder_handle=str(tiny_embedder),
        spec=SPEC,
        n_classes=len(CLASSES),
        batch_frames=DEFAULT_BATCH_FRAMES,
    ).scorer
    with pytest.raises(tf.errors.ResourceExhaustedError):
        small.score(_chunks())


class DecodePlacement(SchedulerPlugin):
    """Records, on the scheduler, the workers each decode task was allowed to run on."""

    name = "decode-placement"

    def __init__(self) -> None:
        self.allowed: dict[str, set[str]] = {}

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key: Key, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "processing" and str(key).startswith("decode-"):
            self.allowed[str(key)] = set(self.scheduler.tasks[key].worker_restrictions or ())


@requires_ffmpeg
def test_gpu_worker_spare_threads_decode_beside_its_scorer(
    make_audio, tmp_path, tiny_embedder, tiny_model
):
    """A GPU worker with more threads than its score tasks decodes too; CPU workers decode.

    What buzzdask decides is where decode tasks may run; which of those workers the scheduler
    picks depends on their load. Here the CPU worker decodes a 2-second chunk in milliseconds,
    so the scheduler often leaves the busy GPU worker out (CI once saw it do so throughout):
    the test checks the decode tasks' worker restrictions, as the scheduler held them.
    """
    for index in range(4):
        make_audio(f"f{index}.wav", n_samples=12 * FRAME + 100, seed=index)
    with (
        dask.config.set({"buzzdask.check-gpus": False}),  # its GPU is declared, not real
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        gpu_worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address),
                *("--nthreads", "4", "--resources", "GPU=1", "--no-dashboard"),
            ]
        )
        try:
            client.wait_for_workers(2, timeout=120)
            workers = client.scheduler_info()["workers"]
            (gpu_address,) = [a for a, w in workers.items() if w["resources"]]
            client.register_plugin(DecodePlacement())
            result = buzzdask.analyze(
                tmp_path / "audio",
                tiny_model,
                output=tmp_path / "out",
                client=client,
                embedder=str(tiny_embedder),
                chunk_seconds=1.92,
                progress=False,
            )
            allowed = client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.plugins[DecodePlacement.name].allowed
            )
        finally:
            gpu_worker.terminate()
            gpu_worker.wait(timeout=60)
    assert result.ok and result.summary["frames"] == 4 * 12
    assert [s["worker"] for s in result.summary["scorers"]] == [gpu_address]
    assert allowed and all(workers_allowed == set(workers) for workers_allowed in allowed.values())
