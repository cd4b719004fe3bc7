"""Cluster configurations, their job scripts, and analyses on a real local SLURM.

Job-script tests need no scheduler (as dask-jobqueue's own ``test_job_script``); the ``slurm``
tests submit real jobs to the single-node SLURM of ../shared/slurm (fake GPUs: jobs get
``CUDA_VISIBLE_DEVICES`` but TensorFlow finds no device, so "GPU" workers score on their CPU).
"""

from __future__ import annotations

import gc
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pandas as pd
import pytest
import yaml

import buzzdask
from buzzdask import ClusterError, ParameterError
from buzzdask.cli import EXIT_ERROR
from buzzdask.cluster import available_configs, job_scripts, load_cluster_config, start
from buzzdask.cluster.__main__ import main as cluster_main
from buzzdask.cluster.batch import batch_script
from buzzdask.cluster.configs import NodeSize, node_size, worker_counts
from buzzdask.cluster.slurm import worker_exports
from buzzdask.dashboard import page_link
from buzzdask.lock import LOCK_NAME
from buzzdask.session import LEAN_DASK, worker_environment
from tests.conftest import (
    BLAS_THREADS_REPORT,
    REPO,
    assert_same_frames,
    requires_ffmpeg,
    requires_slurm,
    run_batch_job,
    wait_until,
    when_scoring_started,
    write_wav,
)
from tests.test_console import NOISE

OSC = {
    "osc-cardinal": {"cpu_partition": "cpu", "gpu_partition": "gpu"},
    "osc-ascend": {"cpu_partition": "cpuonly", "gpu_partition": "quad"},
    "osc-pitzer": {"cpu_partition": "batch", "gpu_partition": "gpu"},
}
# One whole GPU node of each system in one batch job, and the configuration it extends.
NODE_LAYOUTS = {
    "osc-cardinal-node": "osc-cardinal",
    "osc-ascend-node": "osc-ascend",
    "osc-pitzer-node": "osc-pitzer",
}
# OSC's documented node sizes, with their sources: what every OSC job must fit.
NODE_TABLE = yaml.safe_load((REPO / "cluster_configs" / "osc-nodes.yaml").read_text())
FRAME = 15360
ANALYZE = ["analyze", "audio/", "--model", "general_v3", "--output", "results/"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    # Job objects create their log directory (relative in the OSC configs) on construction.
    monkeypatch.chdir(tmp_path)


def test_every_system_has_a_complete_configuration():
    slurm_keys = set(dask.config.get("jobqueue.slurm"))
    assert {"osc-cardinal", "osc-ascend", "osc-pitzer", "local-slurm", "local"} <= set(
        available_configs()
    )
    assert set(NODE_LAYOUTS) <= set(available_configs())
    assert "osc-nodes" not in available_configs()  # the node-size table is no configuration
    for path in sorted((REPO / "cluster_configs").glob("*.yaml")):
        if path.stem.endswith("-nodes"):
            continue
        data = yaml.safe_load(path.read_text())
        entry = data["buzzdask"]["clusters"][path.stem]
        if "extends" in entry:  # its sections are those of the configuration it extends
            assert "jobqueue" not in data, path.name
            entry = load_cluster_config(entry["extends"])
            data = yaml.safe_load(available_configs()[entry["name"]].read_text())
        if entry["kind"] == "slurm":
            for section in (entry["cpu-config"], entry["gpu-config"]):
                # dask-jobqueue reads every key of a named section: a missing one is a KeyError.
                assert set(data["jobqueue"][section]) == slurm_keys, (path.name, section)


def test_configurations_extending_each_other_in_a_loop_are_refused(tmp_path):
    for name, other in (("a", "b"), ("b", "a")):
        entry = {"kind": "slurm", "extends": str(tmp_path / f"{other}.yaml")}
        config = {"buzzdask": {"clusters": {name: entry}}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ParameterError, match=r"in a loop: a -> b -> .*a\.yaml"):
        load_cluster_config(tmp_path / "a.yaml")


def test_a_copied_configuration_with_a_typo_is_refused(tmp_path):
    # A lab's copy of osc-cardinal.yaml, renamed as the README says, with one key misspelt:
    # its account rule would be gone without a word. (Each copy its own name: dask.config
    # keeps the entries registered.)
    original = available_configs()["osc-cardinal"].read_text()

    def copy(name: str, old: str = "", new: str = "") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(original.replace("osc-cardinal:", f"{name}:", 1).replace(old, new))
        return path

    with pytest.raises(ParameterError, match=r"unknown key 'acount-required' \(did you mean "):
        load_cluster_config(copy("lab1", "account-required:", "acount-required:"))
    with pytest.raises(ParameterError, match=r"'cpu-confg' \(did you mean 'cpu-config'\?\)"):
        load_cluster_config(copy("lab2", "cpu-config:", "cpu-confg:"))
    with pytest.raises(ParameterError, match=r"lab4 .*lab4\.yaml\) needs cpu-config: the"):
        load_cluster_config(copy("lab4", "      cpu-config: osc-cardinal\n", ""))
    assert load_cluster_config(copy("lab3"))["account-required"] is True
    # An edit that breaks the YAML (a bracket left open) or its shape: the file and the line.
    with pytest.raises(
        ParameterError, match=r"(?s)lab5\.yaml is not valid YAML: .*lab5\.yaml\", line"
    ):
        load_cluster_config(copy("lab5", "cores: 96", "cores: [96"))
    (tmp_path / "lab6.yaml").write_text("- a list\n")
    with pytest.raises(ParameterError, match=r"lab6\.yaml needs a buzzdask\.clusters\.lab6 entry"):
        load_cluster_config(tmp_path / "lab6.yaml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"memory": 32}, r"memory: 32 must be at least 1 GiB, given with its unit"),
        ({"memory": None}, r"memory: None must be at least 1 GiB"),  # "memory:" left empty
        # Still read by dask-jobqueue, not by buzzdask's account check or one-job script.
        ({"project": "PAS9"}, r"'project' is dask-jobqueue's old name of 'account': rename"),
        ({"memroy": "32GiB"}, r"unknown key 'memroy' \(did you mean 'memory'\?\)"),
        ({"cores": "abc"}, r"cores: 'abc' must be a whole number >= 1"),
    ],
)
def test_a_users_jobqueue_override_is_checked(override, message):
    # As ~/.config/dask/jobqueue.yaml gives them: a traceback of dask-jobqueue's ("not all
    # arguments converted"), a job with --mem=2048M, or a key ignored without a word.
    with dask.config.set({f"jobqueue.osc-cardinal.{k}": v for k, v in override.items()}):
        with pytest.raises(ParameterError, match=r"^jobqueue\.osc-cardinal \(of osc-cardinal; "):
            job_scripts("osc-cardinal", account="PAS9")
        with pytest.raises(ParameterError, match=message):
            job_scripts("osc-cardinal", account="PAS9")


def test_a_copied_configuration_s_mistakes_are_named(tmp_path):
    """A copy under a new name kept its entry's old name ("needs a ... entry" said nothing of
    what it had); cpu-workers: 0 in a local one passed the file's check, then blamed a flag."""
    copied = tmp_path / "mylab.yaml"
    copied.write_text(yaml.safe_dump({"buzzdask": {"clusters": {"mylocal": {"kind": "local"}}}}))
    with pytest.raises(ParameterError) as refused:
        load_cluster_config(copied)
    assert str(refused.value) == (
        f"{copied} needs a buzzdask.clusters.mylab entry with kind: slurm or local: it has "
        "buzzdask.clusters.mylocal (an entry is named as its file)"
    )
    copied.write_text(yaml.safe_dump({"buzzdask": {"clusters": {"mylab": {"kind": "pbs"}}}}))
    with pytest.raises(ParameterError, match=r"slurm or local: it has kind: 'pbs'$"):
        load_cluster_config(copied)
    entry = {"kind": "local", "cpu-workers": 0}
    copied.write_text(yaml.safe_dump({"buzzdask": {"clusters": {"mylab": entry}}}))
    with pytest.raises(ParameterError) as refused:
        start(copied)
    assert str(refused.value) == (
        "cpu-workers: 0 in cluster configuration 'mylab' must be >= 1: a cluster's workers "
        "without a GPU decode the audio"
    )


def test_a_users_jobqueue_memory_in_bytes_is_a_size():
    with dask.config.set({"jobqueue.osc-cardinal.memory": 34359738368}):  # 32 GiB
        assert "#SBATCH --mem=32G" in job_scripts("osc-cardinal", account="PAS9")["cpu"]


def test_entry_keys_with_underscores_nodes_extended_values_checked(tmp_path):
    # A variable name cannot hold "-": DASK_BUZZDASK__CLUSTERS__<NAME>__CPU_WORKERS gave
    # "unknown key 'cpu_workers' (did you mean 'cpu-workers'?)".
    variable = {"DASK_BUZZDASK__CLUSTERS__OSC_CARDINAL_NODE__CPU_WORKERS": "7"}
    done = subprocess.run(
        [*(sys.executable, "-m", "buzzdask.cluster", "--config", "osc-cardinal-node"),
         *("--account", "PAS1", "--print-batch-script", *ANALYZE)],
        env={**os.environ, **variable}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "srun --ntasks=13 " in done.stdout and "--worker-threads 8,9 " in done.stdout

    def layout(name: str, **keys: Any) -> dict[str, Any]:
        path = tmp_path / f"{name}.yaml"
        entry = {"kind": "slurm", "extends": "osc-pitzer", **keys}
        path.write_text(yaml.safe_dump({"buzzdask": {"clusters": {name: entry}}}))
        return load_cluster_config(path)

    # The node of another partition added, as the README says: Pitzer's own nodes stay.
    exp = {"cores": 48, "memory": "300GiB", "memory_per_core": "6GiB", "gpus": 2}
    entry = layout("my-pitzer", nodes={"gpu-exp": exp})
    assert node_size(entry, "gpu") == node_size(load_cluster_config("osc-pitzer"), "gpu")
    assert node_size(entry, "gpu-exp").memory_per_core == 6 * 2**30
    assert worker_counts(layout("nulls", gpus=None, **{"cpu-workers": None})) == (0, 1)
    for number, (keys, message) in enumerate(
        [
            ({"gpus": "two"}, "gpus: 'two' must be a whole number >= 0"),
            ({"gpus": 1.7}, "gpus: 1.7 must be a whole number >= 0"),
            ({"threads-per-worker": 0}, "threads-per-worker: 0 must be a whole number >= 1"),
            ({"whole-node": "yes"}, "whole-node: 'yes' must be true or false"),
            ({"nodes": {"x": {"cores": 4, "memory": "8GiB"}}}, "x lacks memory-per-core"),
        ]
    ):
        with pytest.raises(ParameterError, match=re.escape(message)):
            layout(f"bad{number}", **keys)


@pytest.mark.parametrize("name", sorted(OSC))
def test_osc_job_scripts(name):
    scripts = job_scripts(name, account="PAS1234", walltime="02:00:00")
    cpu, gpu = scripts["cpu"], scripts["gpu"]
    for script in (cpu, gpu):
        assert "#SBATCH -A PAS1234" in script
        assert "#SBATCH -t 02:00:00" in script
        assert "--local-directory $TMPDIR" in script
        assert "--lifetime 115m --lifetime-stagger 4m" in script
        assert "module load" not in script  # ffmpeg comes from PATH or the imageio-ffmpeg wheel
        assert "#SBATCH -e buzzdask-logs/" in script
        assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert f"#SBATCH -p {OSC[name]['cpu_partition']}" in cpu
    assert f"#SBATCH -p {OSC[name]['gpu_partition']}" in gpu
    # Only GPU jobs ask SLURM for a GPU and advertise it to Dask (where the actors go).
    assert "#SBATCH --gpus-per-node=1" in gpu and "--resources GPU=1" in gpu
    assert "--gpus-per-node" not in cpu and "--resources" not in cpu
    # The scorers' workers start importing TensorFlow as they start; the decoders never do.
    assert "--preload buzzdask.preload" in gpu and "--preload" not in cpu
    # Without GPU workers the CPU workers are the scorers', and no GPU job is submitted.
    (cpu_only,) = job_scripts(name, account="PAS1234", walltime="02:00:00", gpus=0).values()
    assert "--preload buzzdask.preload" in cpu_only
    assert cpu_only.replace(" --preload buzzdask.preload", "") == cpu
    # TensorFlow's CUDA comes with the [gpu] extra in the workers' Python, not from a module.
    assert "module load cuda" not in gpu
    assert "#SBATCH --mem=" in cpu and "#SBATCH --cpus-per-task=" in cpu
    # The workers get the settings of the local ones, unless the job already has its own.
    for script in (cpu, gpu):
        assert 'export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-16777216}"' in script
        assert 'export NUMPY_MADVISE_HUGEPAGE="${NUMPY_MADVISE_HUGEPAGE:-0}"' in script
        assert (
            'export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED="'
            '${DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED:-False}"'
        ) in script


def test_worker_exports_keep_what_the_job_already_has(tmp_path):
    script = tmp_path / "exports.sh"
    script.write_text("\n".join([*worker_exports(), "env"]) + "\n")

    def exported(**already: str) -> dict[str, str]:
        environment = {"PATH": os.environ["PATH"], **already}
        done = subprocess.run(
            ["bash", str(script)], env=environment, capture_output=True, text=True, check=True
        )
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    assert exported()["MALLOC_MMAP_THRESHOLD_"] == "16777216"
    assert exported()["TF_USE_LEGACY_KERAS"] == "1"
    # Dask's nanny's own settings too, for the one-batch-job mode's workers, which have none.
    assert exported()["OPENBLAS_NUM_THREADS"] == exported()["OMP_NUM_THREADS"] == "1"
    assert exported(MALLOC_MMAP_THRESHOLD_="1048576")["MALLOC_MMAP_THRESHOLD_"] == "1048576"
    # A worker's Dask reads the exported variables back as the local workers' settings.
    with dask.config.set(dask.config.collect_env(exported())):
        for key, value in LEAN_DASK.items():
            assert dask.config.get(key) == value, key


def test_a_job_task_without_a_nanny_runs_numpy_on_one_blas_thread(tmp_path):
    """The one-batch-job mode's tasks are workers without a nanny (SLURMRunner): the job
    script's exports alone give numpy the one BLAS thread a nanny gives local workers."""
    script = tmp_path / "task.sh"
    task = shlex.join([sys.executable, "-c", BLAS_THREADS_REPORT])
    script.write_text("\n".join([*worker_exports(), task]))

    def blas_threads(script_lines: Path) -> str:
        environment = {"PATH": os.environ["PATH"]}
        done = subprocess.run(
            ["bash", str(script_lines)], env=environment, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()[-1]

    assert blas_threads(script) == "[1]"
    # Without them: a thread per core it may use.
    bare = tmp_path / "bare.sh"
    bare.write_text(task)
    if len(os.sched_getaffinity(0)) > 1:
        assert blas_threads(bare) != "[1]"


def test_job_script_overrides_from_keywords_and_dask_config():
    with dask.config.set({"jobqueue.osc-cardinal.cores": 12}):
        scripts = job_scripts(
            "osc-cardinal",
            account="PAS9",
            queue="debug-cpu",
            memory="16GiB",
            job_kwargs={"job_extra_directives": ["--mail-type=END"]},
        )
    assert "#SBATCH --cpus-per-task=12" in scripts["cpu"]
    assert "--nthreads 12" in scripts["cpu"]
    assert "#SBATCH -p debug-cpu" in scripts["cpu"] and "#SBATCH --mem=16G" in scripts["cpu"]
    assert "#SBATCH --mail-type=END" in scripts["cpu"]
    assert "#SBATCH -p gpu" in scripts["gpu"]  # the GPU jobs keep their own partition
    # The one-job script keeps a section's directives (they were dropped), less those it sets
    # for the whole node itself.
    # From a DASK_JOBQUEUE__... variable, which dask.config keeps spelt with "_".
    extra = '["--gpus-per-node=1", "-G 1", "-n4", "--constraint=48core", "--mail-type=END"]'
    printed = subprocess.run(
        [*(sys.executable, "-m", "buzzdask.cluster", "--config", "osc-pitzer"),
         *("--account", "PAS9", "--gpus", "1", "--cpu-workers", "1", "--print-batch-script"),
         *ANALYZE],
        env={**os.environ, "DASK_JOBQUEUE__OSC_PITZER_GPU__JOB_EXTRA_DIRECTIVES": extra},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    script = printed.stdout
    assert "#SBATCH --constraint=48core\n#SBATCH --mail-type=END\n" in script, printed.stderr
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert sum("--gpus-per-node" in line for line in directives) == 1
    assert not {"#SBATCH -G 1", "#SBATCH -n4"} & set(directives)
    # And the variable itself, for a job started without the environment.
    variable = "DASK_JOBQUEUE__OSC_PITZER_GPU__JOB_EXTRA_DIRECTIVES"
    assert f"export {variable}={shlex.quote(extra)}\n" in script


def test_cores_given_alone_bring_their_share_of_memory():
    # --cores 4 kept the section's 116 GiB, sized for 24 cores: OSC charges a job for the
    # cores its memory would take beyond the partition's default (4956 MiB each on Cardinal).
    scripts = {
        cores: job_scripts("osc-cardinal", account="PAS9", gpus=0, cores=cores)["cpu"]
        for cores in (4, 1, 24, 48)
    }
    memory = {cores: re.search(r"#SBATCH --mem=(\d+)G", s).group(1) for cores, s in scripts.items()}
    assert memory == {4: "19", 1: "4", 24: "116", 48: "232"}
    for cores, gib in memory.items():
        assert int(gib) * 1024 <= cores * 4956
    given = job_scripts("osc-cardinal", account="PAS9", gpus=0, cores=4, memory="8GiB")["cpu"]
    assert "#SBATCH --mem=8G" in given  # a memory given is the job's


def test_cores_given_alone_size_the_batch_scripts_cpu_workers_too(capsys):
    # It kept their section's 116 GiB on 4 cores: a job charged as about twice its cores.
    command = ["--config", "osc-cardinal", "--account", "PAS9", "--cores", "4"]
    assert cluster_main([*command, "--print-batch-script", *ANALYZE]) == 0
    script = capsys.readouterr().out
    # One core and 2 GiB for scheduler and client; the CPU worker's 19 GiB of its 4 cores.
    assert "#SBATCH --cpus-per-task=5\n" in script
    assert f"#SBATCH --mem={(2 + 19) * 1024}M" in script
    assert "--worker-memory 73728MiB,19456MiB " in script


@pytest.mark.parametrize(
    ("walltime", "lifetime"),
    [
        (None, "--lifetime 55m --lifetime-stagger 4m"),  # the configuration's, under 1 h
        ("00:30:00", "--lifetime 25m --lifetime-stagger 4m"),
        ("12:00:00", "--lifetime 715m --lifetime-stagger 4m"),
        ("1-00:00:00", "--lifetime 1435m --lifetime-stagger 4m"),
        ("12", "--lifetime 10m --lifetime-stagger 96s"),  # minutes: a sixth of it to spare
    ],
)
def test_workers_retire_before_the_walltime_given(walltime, lifetime):
    # Workers that outlive their job's walltime are killed all at once, not retired in turn.
    scripts = job_scripts("osc-cardinal", account="PAS9", walltime=walltime)
    for script in scripts.values():
        assert lifetime in script
        assert f"#SBATCH -t {walltime or '01:00:00'}" in script
    # A walltime from the configuration (a user's jobqueue.yaml) moves it too: 4-hour jobs'
    # workers retired at 55 minutes, and a new job went into the queue every hour.
    if walltime is not None:
        with dask.config.set({"jobqueue.osc-cardinal-gpu.walltime": walltime}):
            gpu = job_scripts("osc-cardinal", account="PAS9", gpus=1)["gpu"]
        assert lifetime in gpu and f"#SBATCH -t {walltime}" in gpu


def test_paths_with_spaces_are_quoted_in_the_job_scripts(monkeypatch, tmp_path, capsys):
    # A venv or project folder with a space ("My Project"): dask-jobqueue writes the Python
    # unquoted (every worker job failed to start, and the client waited for them).
    monkeypatch.setattr(sys, "executable", "/fs/ess/PAS1/My Project/.venv/bin/python")
    scripts = job_scripts("osc-cardinal", account="PAS9", gpus=1)
    for script in scripts.values():
        assert "\n'/fs/ess/PAS1/My Project/.venv/bin/python' -m distributed.cli." in script
    # Their logs too, "~" expanded; a script only printed leaves no folder behind.
    monkeypatch.setenv("HOME", str(tmp_path))
    script = job_scripts("osc-cardinal", account="PAS9", log_directory="~/my logs/a")["cpu"]
    assert f"#SBATCH -e '{tmp_path}/my logs/a/buzzdask-cpu-%J.err'\n" in script
    assert not (tmp_path / "my logs").exists() and not (tmp_path / "~").exists()
    project = tmp_path / "My Project"
    project.mkdir()
    monkeypatch.chdir(project)
    command = ["--config", "osc-cardinal", "--account", "PAS9", "--print-batch-script", *ANALYZE]
    assert cluster_main(command) == 0
    script = capsys.readouterr().out
    assert f"#SBATCH --chdir='{project}'\n" in script
    assert f"#SBATCH -o '{project}/buzzdask-logs/buzzdask-%j.out'\n" in script


def test_a_walltime_slurm_cannot_read_is_refused():
    with pytest.raises(ParameterError, match=r"walltime='1h' is not a SLURM time limit"):
        job_scripts("osc-cardinal", account="PAS9", walltime="1h")


def test_batch_script_for_one_job_mode(capsys):
    command = ["analyze", "audio dir/", "--model", "general_v3", "--output", "results/"]
    code = cluster_main(
        [
            *("--config", "osc-cardinal", "--account", "PAS1234", "--gpus", "2"),
            *("--cpu-workers", "3", "--print-batch-script", *command),
        ]
    )
    script = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH -A PAS1234" in script and "#SBATCH -p gpu" in script
    assert "#SBATCH --gpus-per-node=2" in script and "#SBATCH --nodes=1" in script
    # Its relative paths ("audio dir/") mean what they meant where it was printed.
    assert f"#SBATCH --chdir={Path.cwd()}\n" in script
    # One core for scheduler and client, 8 per GPU worker, the CPU workers' 24 each (they fit):
    # 1 + 2 x 8 + 3 x 24 = 89 of the node's 96; 2 GiB + 2 x 72 GiB + 3 x 116 GiB of memory.
    assert "#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=89\n" in script
    assert f"#SBATCH --mem={(2 + 2 * 72 + 3 * 116) * 1024}M" in script
    # The log directory exists before sbatch opens the log, wherever sbatch is run from.
    logs = Path.cwd() / "buzzdask-logs"
    assert f"#SBATCH -o {logs}/buzzdask-%j.out" in script and logs.is_dir()
    # scheduler + client + 2 GPU + 3 CPU tasks, sharing the job's cores by their threads
    assert "srun --ntasks=7 --cpus-per-task=1 --overcommit --cpu-bind=none " in script
    assert script.rstrip().endswith(
        "--config osc-cardinal --gpus 2 --in-job --worker-threads 8,24 "
        "--worker-memory 73728MiB,118784MiB analyze 'audio dir/' --model general_v3 "
        "--output results/"
    )


def test_a_batch_script_whose_job_would_stop_at_once_is_printed_with_a_warning(capsys, tmp_path):
    # The job runs where the script was printed (--chdir): what is missing here stops it as it
    # starts, after its wait in the queue.
    config = ["--config", "osc-cardinal", "--account", "PAS1234", "--print-batch-script"]
    assert cluster_main([*config, *ANALYZE]) == 0
    captured = capsys.readouterr()
    assert "#SBATCH" in captured.out
    assert "warning: the job would stop at its start: input path(s) not found" in captured.err
    assert str(tmp_path / "audio") in captured.err
    (tmp_path / "audio").mkdir()
    write_wav(tmp_path / "audio" / "a.wav", np.zeros(16000), 16000)
    assert cluster_main([*config, *ANALYZE]) == 0
    assert "model 'general_v3' not found" in capsys.readouterr().err
    (tmp_path / "models" / "model_general_v3").mkdir(parents=True)
    assert cluster_main([*config, *ANALYZE]) == 0
    assert capsys.readouterr().err == ""
    # A watched folder may be made later (by a transfer): the job waits for it.
    watch = ["analyze", "--watch", "incoming/", "--model", "general_v3", "--output", "r/"]
    assert cluster_main([*config, *watch]) == 0
    assert capsys.readouterr().err == ""
    # An INPUT taken as --keep-embeddings' store is refused here too, not at the job's start.
    misread = ["analyze", "--keep-embeddings", "audio/", "more/", "--model", "general_v3"]
    assert cluster_main([*config, *misread, "--output", "r/"]) == EXIT_ERROR
    assert "--keep-embeddings audio/: audio/ holds audio" in capsys.readouterr().err


def test_impossible_job_options_are_refused_before_a_script_is_printed(capsys):
    pitzer = ["--config", "osc-pitzer", "--account", "PAS1234"]
    cases = {
        # Said in flags, with their values.
        "--gpus -1 must be >= 0": ["--gpus", "-1", "--print-job-script"],
        "--cpu-workers -1 must be >= 0": [
            *("--cpu-workers", "-1", "--print-job-script"),
        ],
        "--cores 0 must be an integer >= 1": ["--cores", "0", "--print-job-script"],
        "--memory '10GiBs' must be a size": ["--memory", "10GiBs", "--print-job-script"],
        "walltime='1 hour' is not a SLURM time limit": [
            *("--walltime", "1 hour", "--print-job-script"),
        ],
        # Read as 5 minutes, while sbatch took it as years.
        "walltime='-5' is not a SLURM time limit": ["--walltime=-5", "--print-job-script"],
        # Bytes to Dask: dask-jobqueue's traceback, or a worker limit of 0 (none) in a batch.
        "--memory '32' must be a size with its unit": [
            *("--memory", "32", "--print-job-script"),
        ],
        "--memory '500KiB' must be a size with its unit, at least 1.00 GiB": [
            *("--memory", "500KiB", "--print-batch-script", *ANALYZE),
        ],
        # "--queue $PARTITION" with it unset: "#SBATCH -p " printed, refused in the queue.
        "--queue '' is empty": ["--queue", "", "--print-job-script"],
        # The analysis' own values, before its script goes to sbatch.
        "--chunk-seconds": ["--print-batch-script", *ANALYZE, "--chunk-seconds", "-1"],
        "--memory-budget": ["--print-batch-script", *ANALYZE, "--memory-budget", ""],
    }
    for message, arguments in cases.items():
        assert cluster_main([*pitzer, *arguments]) == EXIT_ERROR, message
        captured = capsys.readouterr()
        assert message in captured.err, captured.err
        assert "#SBATCH" not in captured.out
    with pytest.raises(SystemExit):
        cluster_main([*pitzer, "--timeout", "-5", "--print-job-script"])
    assert "--timeout -5: give the seconds to wait, > 0" in capsys.readouterr().err


def test_unknown_configuration_names_the_available_ones():
    with pytest.raises(ParameterError, match="osc-cardinal"):
        load_cluster_config("osc-owens")
    # The system's name alone, or misspelt, points at its configurations.
    meant = "(did you mean 'osc-cardinal' or 'osc-cardinal-node'?)"
    for name in ("cardinal", "Cardinal"):
        with pytest.raises(ParameterError, match=re.escape(f"'{name}' {meant}; available")):
            load_cluster_config(name)
    with pytest.raises(ParameterError, match=re.escape("'ascned' (did you mean 'osc-ascend'")):
        load_cluster_config("ascned")
    with pytest.raises(ParameterError, match="no cluster configuration 'owens'; available"):
        load_cluster_config("owens")
    with pytest.raises(ParameterError, match="local cluster: it has no jobs"):
        job_scripts("local")


def test_print_job_script_submits_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pitzer = ["--config", "osc-pitzer", "--account", "PAS1234", "--print-job-script"]
    assert cluster_main([*pitzer, "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH -e buzzdask-logs/buzzdask-cpu-" in out
    assert not list(tmp_path.iterdir())  # nor makes the log directory it names
    assert "# ---- cpu worker job ----" in out and "# ---- gpu worker job ----" in out
    assert out.count("#SBATCH -A PAS1234") == 2
    assert out.count("--preload buzzdask.preload") == 1  # the GPU job's scorer
    # Without GPU workers (the configuration's default) the CPU jobs are all there is, and
    # they hold the scorers: as submitted, with TensorFlow preloaded.
    assert cluster_main(pitzer) == 0
    out = capsys.readouterr().out
    assert "# ---- gpu worker job ----" not in out and "--preload buzzdask.preload" in out


def test_command_line_checks_analyze_options_before_submitting(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cluster_main(["--config", "local-slurm", "analyze", "audio/"])  # no --model/--output
    assert exit_.value.code == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cluster_main(["--config", "local-slurm", "analyze", "audio/", "--gpus", "1"])
    assert "--gpus is an option of python -m buzzdask.cluster: give it before 'analyze'" in (
        capsys.readouterr().err
    )
    # Typos and a rerun without --resume: refused before any job waits in a queue (no SLURM
    # runs here; starting one would fail otherwise).
    audio = tmp_path / "audio"
    audio.mkdir()
    write_wav(audio / "a.wav", np.zeros(16000), 16000)
    model = tmp_path / "model_general_v3"
    model.mkdir()
    done = tmp_path / "done"
    done.mkdir()
    (done / "buzzdask.json").write_text("{}")
    (done / "journal.jsonl").write_text('{"file": "a.wav", "chunk": 0, "frames": 1}\n')
    # A watch job on a compute node holds this one: even a resume would wait for its jobs
    # first, then be refused.
    held = tmp_path / "held"
    held.mkdir()
    holder = {"host": "c0312.cardinal.osc.edu", "pid": 4242, "started": "2026-06-01T05:30:00"}
    holder |= {"process_started": 0.0, "token": "x"}
    (held / LOCK_NAME).write_text(json.dumps(holder))
    cases = {
        "is in use by another buzzdask run (host c0312.cardinal.osc.edu, pid 4242": [
            *(str(audio), "--model", str(model), "--output", str(held), "--resume"),
        ],
        "input path(s) not found: ": [str(tmp_path / "adio"), "--model", str(model)],
        "no audio files in ": [str(model), "--model", str(model)],
        "model 'general_v2' not found": [str(audio), "--model", "general_v2"],
        "already holds results of an unfinished run (1 chunk done); pass --resume": [
            *(str(audio), "--model", str(model), "--output", str(done)),
        ],
    }
    for message, arguments in cases.items():
        command = ["analyze", *arguments]
        if "--output" not in arguments:
            command += ["--output", str(tmp_path / "out")]
        assert cluster_main(["--config", "local-slurm", *command]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert message in err, err
        assert "scheduler at" not in err


# -- OSC's documented nodes, accounts ---------------------------------------------------------


def _documented_node(name: str, partition: str) -> NodeSize:
    """One node of ``partition`` on cluster ``name``, as osc-nodes.yaml documents it."""
    return NodeSize.from_mapping(NODE_TABLE["clusters"][name]["partitions"][partition])


def _requests(script: str) -> dict[str, Any]:
    """What a job script asks SLURM for: partition, cores, memory [bytes], GPUs per node."""
    found = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            option, _, value = line.removeprefix("#SBATCH ").replace("=", " ", 1).partition(" ")
            found[option] = value.strip()
    size = re.fullmatch(r"(\d+)([KMGT])", found["--mem"])
    assert size, found["--mem"]
    number, unit = size.groups()
    tasks = int(found.get("-n") or found["--ntasks"])
    return {
        "partition": found["-p"],
        "cores": tasks * int(found["--cpus-per-task"]),
        "memory": int(number) * 2 ** (10 * "KMGT".index(unit) + 10),
        "gpus": int(found.get("--gpus-per-node", 0)),
    }


def _assert_fits(script: str, name: str, partition: str) -> dict[str, Any]:
    """The script's job fits one documented node of ``partition``, memory within its default."""
    asked = _requests(script)
    node = _documented_node(name, partition)
    assert asked["partition"] == partition
    assert 1 <= asked["cores"] <= node.cores, asked
    assert asked["memory"] <= min(node.memory, asked["cores"] * node.memory_per_core), asked
    assert asked["gpus"] <= node.gpus, asked
    return asked


@pytest.mark.parametrize("name", sorted(OSC))
def test_osc_configurations_declare_their_documented_nodes(name):
    documented = NODE_TABLE["clusters"][name]
    assert NODE_TABLE["read"] and documented["sources"]
    entry = load_cluster_config(name)
    assert entry["account-required"] is True
    for kind in ("cpu", "gpu"):
        partition = dask.config.get(f"jobqueue.{entry[f'{kind}-config']}.queue")
        assert partition == OSC[name][f"{kind}_partition"]
        assert node_size(entry, partition) == _documented_node(name, partition)


@pytest.mark.parametrize("name", sorted(OSC))
def test_osc_worker_jobs_fit_one_documented_node(name):
    scripts = job_scripts(name, account="PAS1234")
    assert _assert_fits(scripts["cpu"], name, OSC[name]["cpu_partition"])["gpus"] == 0
    assert _assert_fits(scripts["gpu"], name, OSC[name]["gpu_partition"])["gpus"] == 1


@pytest.mark.parametrize("name", sorted(OSC))
@pytest.mark.parametrize("gpus, cpu_workers", [(0, 1), (0, 3), (1, 1), (2, 6), (2, 0)])
def test_osc_batch_scripts_fit_one_documented_node(name, gpus, cpu_workers):
    script = batch_script(name, ANALYZE, gpus=gpus, cpu_workers=cpu_workers, account="PAS1234")
    partition = OSC[name]["gpu_partition" if gpus else "cpu_partition"]
    asked = _assert_fits(script, name, partition)
    assert asked["gpus"] == gpus
    # The workers' threads and memory limits add up to what the job asked for, less the
    # scheduler's and the client's core and 2 GiB.
    srun = script.splitlines()[-1]
    assert f"srun --ntasks={2 + gpus + cpu_workers} " in srun
    threads = re.search(r"--worker-threads (\d+),(\d+)", srun)
    memory = re.search(r"--worker-memory (\d+)MiB,(\d+)MiB", srun)
    assert threads and memory, srun
    gpu_threads, cpu_threads = map(int, threads.groups())
    gpu_mib, cpu_mib = map(int, memory.groups())
    assert 1 + gpus * gpu_threads + cpu_workers * cpu_threads == asked["cores"]
    assert 2048 + gpus * gpu_mib + cpu_workers * cpu_mib == asked["memory"] // 2**20


def test_batch_script_refuses_what_one_node_cannot_hold(capsys):
    too_many: dict[str, dict[str, Any]] = {
        "5 GPU workers do not fit one node of partition 'gpu' of osc-cardinal: it has 4 GPUs": {
            "gpus": 5
        },
        r"\(96 cores\).* GPU workers 16 \(8 each\), which leaves 79 for the CPU workers": {
            "gpus": 2,
            "cpu_workers": 80,
        },
        r"need 502\.00 GiB .*one node of partition 'cpu' of osc-cardinal has 464\.62 GiB": {
            "memory": "500GiB"
        },
    }
    for message, request in too_many.items():
        with pytest.raises(ParameterError, match=message):
            batch_script("osc-cardinal", ANALYZE, account="PAS1", **request)
    code = cluster_main(
        [
            *("--config", "osc-pitzer", "--account", "PAS1", "--gpus", "3"),
            *("--print-batch-script", *ANALYZE),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "3 GPU workers do not fit one node of partition 'gpu' of osc-pitzer: it has 2 GPUs" in err
    )


@pytest.mark.parametrize("name", sorted(OSC))
def test_osc_configuration_without_account_fails_before_any_job(name, capsys):
    started = time.monotonic()
    account = rf"--account PAS1234 .*jobqueue\.{name}\.account and jobqueue\.{name}-gpu\.account"
    with pytest.raises(ParameterError, match=account):
        start(name, gpus=1, cpu_workers=1)
    assert time.monotonic() - started < 10
    # dask-jobqueue makes the jobs' log directory as it builds the first job: none was built.
    assert not Path("buzzdask-logs").exists()
    assert cluster_main(["--config", name, "--gpus", "1", *ANALYZE]) == 1
    assert f"jobqueue.{name}-gpu.account" in capsys.readouterr().err
    # The batch script goes to sbatch as printed: refused too.
    with pytest.raises(ParameterError, match=rf"--account .*jobqueue\.{name}\.account"):
        batch_script(name, ANALYZE, cpu_workers=1)
    assert not Path("buzzdask-logs").exists()


def test_osc_job_scripts_without_account_show_a_placeholder(capsys):
    assert cluster_main(["--config", "osc-ascend", "--gpus", "1", "--print-job-script"]) == 0
    out, err = capsys.readouterr()
    assert out.count("#SBATCH -A <PROJECT>") == 2
    assert "submitting them needs --account" in err
    # An account in the configuration's section counts, for that section's jobs.
    with dask.config.set({"jobqueue.osc-pitzer.account": "PAS9"}):
        scripts = job_scripts("osc-pitzer")
        assert "#SBATCH -A PAS9" in batch_script("osc-pitzer", ANALYZE, cpu_workers=1)
    assert "#SBATCH -A PAS9" in scripts["cpu"] and "#SBATCH -A <PROJECT>" in scripts["gpu"]


def test_local_slurm_needs_no_account():
    scripts = job_scripts("local-slurm")
    script = batch_script("local-slurm", ANALYZE, gpus=1, cpu_workers=1)
    for text in (*scripts.values(), script):
        assert "#SBATCH -A" not in text
    # It declares no node size: the workers keep their sections' cores and memory.
    assert "#SBATCH --cpus-per-task=3\n#SBATCH --mem=5120M\n" in script


# -- one whole GPU node in one batch job -------------------------------------------------------


def test_whole_cardinal_gpu_node_in_one_batch_job(capsys, monkeypatch):
    for name in [name for name in os.environ if name.startswith("DASK_")]:
        monkeypatch.delenv(name)  # they would be written into the script
    code = cluster_main(
        [
            *("--config", "osc-cardinal-node", "--account", "PAS1234", "--print-batch-script"),
            *ANALYZE,
            "--resume",
        ]
    )
    assert code == 0
    logs = Path.cwd() / "buzzdask-logs"
    # The whole node: 96 cores, 96 x 9 GiB, 4 GPUs. 9 tasks: scheduler, client, a scorer worker
    # per GPU (8 threads, 72 GiB each) and 3 decode workers sharing what is left: (96 - 1 -
    # 4 x 8) / 3 = 21 threads, (884736 - 2048 - 4 x 73728) MiB / 3 = 195925 MiB.
    assert capsys.readouterr().out == (
        "#!/usr/bin/env bash\n"
        "#SBATCH -J buzzdask\n"
        "#SBATCH -p gpu\n"
        "#SBATCH -A PAS1234\n"
        "#SBATCH -t 01:00:00\n"
        "#SBATCH --nodes=1\n"
        "#SBATCH --ntasks=1\n"
        "#SBATCH --cpus-per-task=96\n"
        "#SBATCH --mem=884736M\n"
        "#SBATCH --gpus-per-node=4\n"
        f"#SBATCH --chdir={Path.cwd()}\n"
        f"#SBATCH -o {logs}/buzzdask-%j.out\n"
        + "".join(f"{line}\n" for line in worker_exports())
        + "unset SLURM_MEM_PER_CPU SLURM_MEM_PER_GPU\n"
        "export SLURM_EXPORT_ENV=ALL\n"
        "\n"
        "srun --ntasks=9 --cpus-per-task=1 --overcommit --cpu-bind=none "
        f"{shlex.quote(sys.executable)} -m buzzdask.cluster --config osc-cardinal-node --gpus 4 "
        "--in-job --worker-threads 8,21 --worker-memory 73728MiB,195925MiB "
        "analyze audio/ --model general_v3 --output results/ --resume\n"
    )


@pytest.mark.parametrize("name", sorted(NODE_LAYOUTS))
def test_node_layouts_fill_one_documented_gpu_node(name):
    system = NODE_LAYOUTS[name]
    entry, base = load_cluster_config(name), load_cluster_config(system)
    # The system's sections and nodes, not copies of them.
    for key in ("cpu-config", "gpu-config", "nodes", "account-required", "dashboard-proxy"):
        assert entry[key] == base[key], key
    partition = OSC[system]["gpu_partition"]
    node = _documented_node(system, partition)
    assert entry["whole-node"] is True and entry["gpus"] == node.gpus
    script = batch_script(name, ANALYZE, account="PAS1234")
    asked = _assert_fits(script, system, partition)
    # The whole node: every core, its memory within the default per core, every GPU.
    assert asked["cores"] == node.cores
    assert asked["memory"] == min(node.memory, node.cores * node.memory_per_core)
    assert asked["gpus"] == node.gpus
    # A scorer worker per GPU, with its section's size; the decode workers share the rest.
    srun = script.splitlines()[-1]
    assert f"srun --ntasks={2 + node.gpus + entry['cpu-workers']} " in srun
    assert f"--config {name} --gpus {node.gpus} --in-job " in srun
    threads = re.search(r"--worker-threads (\d+),(\d+)", srun)
    memory = re.search(r"--worker-memory (\d+)MiB,(\d+)MiB", srun)
    assert threads and memory, srun
    gpu_threads, cpu_threads = map(int, threads.groups())
    gpu_mib, cpu_mib = map(int, memory.groups())
    gpu_section = dask.config.get(f"jobqueue.{entry['gpu-config']}")
    assert gpu_threads == gpu_section["cores"]
    assert gpu_mib * 2**20 == dask.utils.parse_bytes(gpu_section["memory"])
    # The counts divide the cores left evenly; the memory is split to the MiB.
    assert 1 + node.gpus * gpu_threads + entry["cpu-workers"] * cpu_threads == node.cores
    spare = asked["memory"] // 2**20 - (2048 + node.gpus * gpu_mib + entry["cpu-workers"] * cpu_mib)
    assert 0 <= spare < entry["cpu-workers"]
    # Accounts as for the system's jobs.
    with pytest.raises(ParameterError, match=rf"--account .*jobqueue\.{system}-gpu\.account"):
        batch_script(name, ANALYZE)


def test_node_layout_counts_from_flags_and_dask_config(capsys):
    """--gpus and --cpu-workers, or the layout's dask.config keys, change the workers; the job
    still asks for the whole node."""
    code = cluster_main(
        [
            *("--config", "osc-cardinal-node", "--account", "PAS1", "--gpus", "2"),
            *("--cpu-workers", "4", "--print-batch-script", *ANALYZE),
        ]
    )
    script = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --cpus-per-task=96\n#SBATCH --mem=884736M\n" in script
    assert "#SBATCH --gpus-per-node=2\n" in script
    # (96 - 1 - 2 x 8) // 4 = 19 threads, (884736 - 2048 - 2 x 73728) // 4 = 183808 MiB
    assert "srun --ntasks=8 " in script
    assert "--gpus 2 --in-job --worker-threads 8,19 --worker-memory 73728MiB,183808MiB " in script
    with dask.config.set({"buzzdask.clusters.osc-cardinal-node.cpu-workers": 7}):
        script = batch_script("osc-cardinal-node", ANALYZE, account="PAS1")
    assert "srun --ntasks=13 " in script and "--worker-threads 8,9 " in script


def test_node_layout_is_one_batch_job_only(capsys):
    with pytest.raises(ParameterError, match=r"--print-batch-script .*--config osc-cardinal "):
        start("osc-cardinal-node", account="PAS1234")
    with pytest.raises(ParameterError, match="one whole node in one batch job"):
        job_scripts("osc-ascend-node", account="PAS1234")
    assert cluster_main(["--config", "osc-pitzer-node", "--print-job-script"]) == 1
    assert "--config osc-pitzer for worker jobs" in capsys.readouterr().err
    # Its decode workers share what the GPU workers leave: a CPU job's size does not apply.
    for size in ({"cores": 12}, {"memory": "32GiB"}):
        with pytest.raises(ParameterError, match="--cores and --memory do not apply"):
            batch_script("osc-cardinal-node", ANALYZE, account="PAS1", **size)
    assert not Path("buzzdask-logs").exists()  # nothing was built


# -- real SLURM --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_corpus(tmp_path_factory, tiny_embedder, tiny_model):
    """Three 30-frame WAVs and their analysis on the session's local cluster, for comparison."""
    from tests.conftest import field_like, write_wav

    audio = tmp_path_factory.mktemp("slurm_audio")
    for seed in range(3):
        write_wav(audio / f"f{seed}.wav", field_like(30 * FRAME, 16000, seed=seed), 16000)
    options = {
        "model": tiny_model,
        "embedder": str(tiny_embedder),
        "chunk_seconds": 1.0,
        "progress": False,
    }
    with dask.config.set({"buzzdask.local-cluster.dashboard-address": ":0"}):
        reference = buzzdask.analyze(
            audio, output=tmp_path_factory.mktemp("slurm_ref") / "out", **options
        )
    return audio, options, reference.to_pandas()


def _same_frames(result: buzzdask.AnalysisResult, reference: pd.DataFrame) -> None:
    assert result.ok, result.errors
    frame = result.to_pandas()
    assert not frame.duplicated(["file", "start"]).any()
    assert_same_frames(frame, reference)


def _analyze_command(audio: Path, options: dict[str, Any], output: Path) -> list[str]:
    """``analyze ...`` arguments for the corpus with the fixture's options."""
    return [
        *("analyze", str(audio), "--model", str(options["model"])),
        *("--embedder", options["embedder"], "--output", str(output)),
        *("--chunk-seconds", "1", "--no-progress"),
    ]


def _read_scores(output: Path) -> pd.DataFrame:
    """A command-line run's frames, read back with pandas, in analyze's order."""
    frame = pd.read_parquet(output / "scores", partitioning=None)
    return frame.sort_values(["file", "start"], ignore_index=True)


def _job_ids(job_name: str) -> list[str]:
    """Pending or running jobs named ``job_name``."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "PENDING,RUNNING", "-o", "%i %j"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1] == job_name]


def _preloads(client: Any) -> dict[str, list[str]]:
    """The preload modules of each worker of ``client``'s cluster."""
    return client.run(lambda dask_worker: [p.name for p in dask_worker.preloads])


def _assert_no_jobs_left() -> None:
    # scancel is asynchronous: a cancelled job stays in squeue for a moment.
    wait_until(
        lambda: not _job_ids("buzzdask-cpu") + _job_ids("buzzdask-gpu"),
        timeout_s=30,
        failure="worker jobs left behind",
        interval_s=0.5,
    )


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_analysis_on_slurm_gpu_and_cpu_workers_matches_local(
    local_slurm, slurm_corpus, tmp_path, monkeypatch
):
    audio, options, reference = slurm_corpus
    # Not from this process (a local cluster's nanny leaves them here): from the job scripts.
    for name in worker_environment():
        monkeypatch.delenv(name, raising=False)
    client = start("local-slurm", gpus=1, cpu_workers=1, log_directory=str(tmp_path / "logs"))
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        gpu_worker = next(a for a, w in workers.items() if w["resources"].get("GPU"))
        visible = client.run(os.getenv, "CUDA_VISIBLE_DEVICES", workers=[gpu_worker])
        assert visible[gpu_worker] == "0"  # SLURM gave the job its (fake) GPU
        # The job scripts gave both kinds of worker the local workers' settings.
        assert set(client.run(os.getenv, "MALLOC_MMAP_THRESHOLD_").values()) == {"16777216"}
        assert set(client.run(os.getenv, "TF_USE_LEGACY_KERAS").values()) == {"1"}
        assert set(client.run(os.getenv, "NUMPY_MADVISE_HUGEPAGE").values()) == {"0"}
        assert set(
            client.run(lambda: dask.config.get("distributed.worker.profile.enabled")).values()
        ) == {False}
        # The GPU worker imports TensorFlow from its start (before any run asks for a scorer),
        # the decode worker not at all.
        assert _preloads(client) == {
            a: (["buzzdask.preload"] if a == gpu_worker else []) for a in workers
        }

        # The import is over once the garbage collector, paused for it, runs again.
        def imported() -> bool:
            return "tensorflow" in sys.modules and gc.isenabled()

        wait_until(
            lambda: client.run(imported, workers=[gpu_worker])[gpu_worker],
            timeout_s=60,
            failure="the GPU worker never imported TensorFlow",
            interval_s=0.5,
        )
        assert client.run(gc.isenabled) == dict.fromkeys(workers, True)
        result = buzzdask.analyze(audio, output=tmp_path / "out", client=client, **options)
        _same_frames(result, reference)
        # The actor lives on the GPU worker, decoding happens on the CPU worker.
        assert [s["worker"] for s in result.summary["scorers"]] == [gpu_worker]
        # The buzzdask page, served by this cluster's dashboard, has the run's numbers.
        page = client.dashboard_link.rsplit("/status", 1)[0] + "/buzzdask/status.json"
        with urllib.request.urlopen(page, timeout=10) as answer:
            (shown,) = json.loads(answer.read())["runs"]
        assert (shown["status"], shown["files_done"], shown["files_failed"]) == ("finished", 3, 0)
        assert shown["scorers"] == {
            gpu_worker: {
                "frames": 90,
                "frames_per_s": pytest.approx(shown["scorers"][gpu_worker]["frames_per_s"]),
            }
        }

        # Scale CPU jobs up and down; the GPU job stays.
        cluster = client.cluster
        cluster.scale(jobs=2)
        cluster.wait_for_workers_by_kind(gpus=1, cpu_workers=2, timeout=120)
        assert len(_job_ids("buzzdask-cpu")) == 2
        cluster.scale(jobs=1)
        wait_until(
            lambda: len(client.scheduler_info(n_workers=-1)["workers"]) <= 2,
            timeout_s=60,
            failure="scale down did not retire a worker",
            interval_s=0.5,
        )
        assert len(_job_ids("buzzdask-gpu")) == 1
    finally:
        client.shutdown()
    _assert_no_jobs_left()


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
@pytest.mark.parametrize(
    ("victims", "gpu_processes"),
    [
        (("buzzdask-gpu",), 1),
        (("buzzdask-cpu",), 1),
        (("buzzdask-gpu", "buzzdask-cpu"), 1),
        (("buzzdask-gpu",), 2),
    ],
    ids=["gpu", "cpu", "both", "gpu-job-of-two-workers"],
)
def test_scancel_a_worker_job_mid_run_loses_nothing(
    local_slurm, slurm_corpus, tmp_path, victims, gpu_processes
):
    """scancel the job holding the actor (or a decoding one, or both at once, as a walltime
    ends jobs started together) mid-run: replacement jobs are submitted, the actor is
    re-created, decode tasks placed on the lost worker go to the new ones, and the same run
    finishes exactly once.

    A job of two worker processes (two scorers): Dask forgets a job when a worker of the
    job's own name leaves, and these are named ``<job>-0`` and ``<job>-1``: no job replaced
    it, and the run waited out scorer-restart-seconds, silent, then failed."""
    audio, options, reference = slurm_corpus
    scores = tmp_path / "out" / "scores"
    # Replace lost workers quickly (default 15 s) so the test stays short.
    two = {
        f"jobqueue.local-slurm-gpu.{key}": value
        for key, value in (("processes", 2), ("cores", 2), ("memory", "4GiB"))
    }
    with dask.config.set(
        {"distributed.deploy.lost-worker-timeout": "1s", **(two if gpu_processes == 2 else {})}
    ):
        client = start("local-slurm", gpus=1, cpu_workers=1, log_directory=str(tmp_path / "logs"))
        try:
            jobs = [job for victim in victims for job in _job_ids(victim)]
            assert len(jobs) == len(victims)

            killer = when_scoring_started(
                scores, lambda: subprocess.run(["scancel", *jobs], check=True)
            )
            result = buzzdask.analyze(audio, output=tmp_path / "out", client=client, **options)
            killer.join()
            assert not set(jobs) & {j for v in victims for j in _job_ids(v)}
        finally:
            client.shutdown()
    _same_frames(result, reference)
    if "buzzdask-gpu" in victims:
        lost, restarts = result.summary["scorers_lost"], result.summary["scorer_restarts"]
        if gpu_processes == 1:
            assert restarts == lost == 1
        else:
            # How many of each is a race: the run can end before the second lost worker is seen
            # to leave (its scorer went on), or before the replacement job's second worker
            # joins and loads its scorer. That the run ended at all is the test: it waited.
            assert restarts <= 2 and 1 <= lost <= 2, (restarts, lost)


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_scorer_worker_retiring_mid_run_is_replaced(local_slurm, slurm_corpus, tmp_path):
    """The GPU worker retires mid-run, as ``--lifetime`` makes it before an OSC walltime: a new
    GPU job takes its place, the actor is re-created there, and the run completes."""
    audio, options, reference = slurm_corpus
    scores = tmp_path / "out" / "scores"
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        client = start("local-slurm", gpus=1, cpu_workers=1, log_directory=str(tmp_path / "logs"))
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]
            (gpu_worker,) = [a for a, w in workers.items() if w["resources"].get("GPU")]

            def reach_lifetime(dask_worker: Any) -> None:
                # What --lifetime does when it expires: a graceful close, then the job ends.
                # (Dask refuses to *retire* a worker holding an actor; this closes anyway.)
                # Nested, so the SLURM worker gets it by value (it cannot import tests/).
                dask_worker.loop.add_callback(
                    dask_worker.close_gracefully, reason="worker-lifetime-reached"
                )

            retirer = when_scoring_started(
                scores, lambda: client.run(reach_lifetime, workers=[gpu_worker])
            )
            result = buzzdask.analyze(audio, output=tmp_path / "out", client=client, **options)
            retirer.join()
            workers = client.scheduler_info(n_workers=-1)["workers"]
        finally:
            client.shutdown()
    _same_frames(result, reference)
    assert result.summary["scorer_restarts"] == 1
    (new_gpu_worker,) = [a for a, w in workers.items() if w["resources"].get("GPU")]
    assert new_gpu_worker != gpu_worker
    assert [s["worker"] for s in result.summary["scorers"]] == [new_gpu_worker]


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_cpu_job_added_mid_run_decodes(local_slurm, slurm_corpus, tmp_path):
    """A CPU job that joins a GPU run while it runs (scale, adapt, a replacement) gets decode
    tasks within a few seconds; the frames are those of the local run."""
    from distributed import get_task_stream

    audio, options, reference = slurm_corpus
    many = tmp_path / "audio"
    # 360 one-frame chunks, each an ffmpeg run (FLAC: the WAVs' samples, not read in process),
    # so the run outlasts the job's start.
    for copy in range(4):
        (many / f"copy{copy}").mkdir(parents=True)
        for wav in audio.glob("*.wav"):
            flac = many / f"copy{copy}" / wav.with_suffix(".flac").name
            subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), str(flac)], check=True)
    client = start("local-slurm", gpus=1, cpu_workers=1, log_directory=str(tmp_path / "logs"))
    try:
        first = set(client.scheduler_info(n_workers=-1)["workers"])
        scaler = when_scoring_started(
            tmp_path / "out" / "scores", lambda: client.cluster.scale(jobs=2)
        )
        with get_task_stream(client) as stream:
            # A small budget: decode tasks are handed out as the run goes, not all at once.
            result = buzzdask.analyze(
                many, output=tmp_path / "out", client=client, memory_budget="1MB", **options
            )
        scaler.join()
        joined = set(client.scheduler_info(n_workers=-1)["workers"]) - first
    finally:
        client.shutdown()
    _assert_no_jobs_left()
    decoders = {t["worker"] for t in stream.data if str(t["key"]).startswith("decode")}
    assert joined and joined <= decoders
    frame = result.to_pandas()
    assert result.ok and not frame.duplicated(["file", "start"]).any()
    for copy in range(4):
        ours = frame[frame["file"].str.startswith(f"copy{copy}/")].copy()
        ours["file"] = ours["file"].str.removeprefix(f"copy{copy}/").str.replace(".flac", ".wav")
        assert_same_frames(ours.reset_index(drop=True), reference)


@requires_slurm
@pytest.mark.slurm
def test_adaptive_scaling_moves_cpu_jobs_only(local_slurm, tmp_path):
    client = start("local-slurm", gpus=1, cpu_workers=1, log_directory=str(tmp_path / "logs"))
    try:
        client.cluster.adapt(minimum_jobs=1, maximum_jobs=3, interval="500ms", wait_count=2)
        work = client.map(time.sleep, [1.0] * 40, pure=False)
        wait_until(
            lambda: len(_job_ids("buzzdask-cpu")) >= 2,
            timeout_s=120,
            failure="adapt did not add CPU jobs under load",
            interval_s=0.5,
        )
        assert len(_job_ids("buzzdask-gpu")) == 1
        client.gather(work)
        del work
        wait_until(
            lambda: len(_job_ids("buzzdask-cpu")) <= 1,
            timeout_s=120,
            failure="adapt did not remove idle CPU jobs",
            interval_s=0.5,
        )
        assert len(_job_ids("buzzdask-gpu")) == 1  # the scorer's worker was never retired
    finally:
        client.shutdown()
    _assert_no_jobs_left()


@requires_slurm
@pytest.mark.slurm
def test_worker_reaching_its_lifetime_gets_a_new_job(local_slurm, tmp_path):
    lifetime = ["--lifetime", "5s", "--lifetime-stagger", "1s"]
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        client = start(
            "local-slurm",
            cpu_workers=1,
            log_directory=str(tmp_path / "logs"),
            job_kwargs={"worker_extra_args": lifetime},
        )
        try:
            seen = set(client.scheduler_info()["workers"])
            first_jobs = set(_job_ids("buzzdask-cpu"))
            wait_until(
                lambda: set(client.scheduler_info()["workers"]) - seen,
                timeout_s=90,
                failure="no replacement worker arrived",
                interval_s=0.5,
            )
            assert set(_job_ids("buzzdask-cpu")) - first_jobs  # a new SLURM job
        finally:
            client.shutdown()
    _assert_no_jobs_left()


@requires_slurm
@pytest.mark.slurm
def test_a_cluster_started_again_closes_the_earlier_one(local_slurm, tmp_path, caplog):
    # A notebook cell run again left the first cluster's jobs queued, each replaced as it
    # ended, for as long as the kernel lived.
    first = start("local-slurm", gpus=0, cpu_workers=1, log_directory=str(tmp_path / "logs"))
    first_jobs = _job_ids("buzzdask-cpu")
    second = start("local-slurm", gpus=0, cpu_workers=1, log_directory=str(tmp_path / "logs"))
    try:
        assert first.cluster.status.name in ("closing", "closed")
        assert f"left running (job {first_jobs[0]})" in caplog.text
        wait_until(
            lambda: not set(first_jobs) & set(_job_ids("buzzdask-cpu")),
            timeout_s=30,
            failure="the first cluster's job was left queued",
            interval_s=0.5,
        )
        assert second.submit(sum, [1, 2]).result(timeout=60) == 3
    finally:
        second.shutdown()
        first.close()
    _assert_no_jobs_left()


@requires_slurm
@pytest.mark.slurm
def test_rejected_job_reports_sbatch_message(local_slurm, tmp_path, caplog):
    started = time.monotonic()
    with pytest.raises(ClusterError, match="sbatch rejected the CPU worker job: sbatch: error"):
        start("local-slurm", cpu_workers=1, memory="5000GiB", timeout=120)
    assert time.monotonic() - started < 60  # at once, not after the timeout
    # That line says it all: no traceback of the same error from Dask's job task before it.
    assert not [record for record in caplog.records if record.exc_info], caplog.text


@requires_slurm
@pytest.mark.slurm
def test_workers_that_never_arrive_time_out_with_state_and_log(
    local_slurm, tmp_path, caplog, monkeypatch
):
    # Three GPU jobs on a node with two GPUs: the third stays PENDING. The run goes on with
    # the two (a busy cluster), saying which job is missing and why; and while it waits, it
    # says so (30 s, then every 5 minutes: the queue may hold jobs for half an hour).
    monkeypatch.setattr(buzzdask.cluster.slurm, "_WAITING_SAID_S", (8.0, 300.0))
    logs = tmp_path / "logs"
    try:
        client = start("local-slurm", gpus=3, cpu_workers=1, log_directory=str(logs), timeout=20)
    except ClusterError as error:
        # SLURM may hold the CPU job back behind the pending GPU one: with no CPU worker, no
        # run (its decoding has nowhere to go), and the message says which job waits.
        expected = r"(?s)[12]/3 GPU and 0/1 CPU workers have arrived\. Jobs:.*cpu-0: job \d+ PEND"
        assert re.search(expected, str(error)), error
    else:
        expected = r"(?s)[12]/3 GPU and 1/1 CPU workers have arrived: going on with them.*PEND"
        waiting = r"(?s)waiting for the worker jobs: [0-2]/3 GPU and [01]/1 CPU workers after 8 s"
        assert re.search(waiting + r" \(waiting up to 20 s\)\. Jobs:\n.*PEND", caplog.text)
        try:
            assert re.search(expected + r".*logs/buzzdask-gpu", caplog.text), caplog.text
            assert len(client.scheduler_info()["workers"]) >= 2
        finally:
            client.shutdown()
            client.close()
    # One line per record, one per job: the console escapes a line break (a job's log said
    # "Jobs:\n  ...-cpu-0: job 30 PENDING").
    said = [record.getMessage() for record in caplog.records if record.name.startswith("buzzdask")]
    assert said and not [message for message in said if "\n" in message], said
    # No worker at all by the timeout: the start fails, naming the jobs, and cancels them.
    with pytest.raises(ClusterError, match=r"(?s)0/1 GPU and 0/1 CPU workers have arrived\."):
        start("local-slurm", gpus=1, cpu_workers=1, log_directory=str(logs), timeout=0.1)
    _assert_no_jobs_left()
    # A job that ends at once (a prologue that fails on the compute node) is said within
    # seconds, not after the timeout (30 minutes by default).
    began = time.monotonic()
    with (
        dask.config.set({"jobqueue.local-slurm.job-script-prologue": ["exit 3"]}),
        pytest.raises(ClusterError, match=r"(?s)every CPU worker job ended before its worker"),
    ):
        start("local-slurm", gpus=0, cpu_workers=1, log_directory=str(logs), timeout=300)
    assert time.monotonic() - began < 60
    _assert_no_jobs_left()


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_command_line_runs_analysis_on_slurm(local_slurm, slurm_corpus, tmp_path):
    audio, options, reference = slurm_corpus
    # "~/my logs": dask-jobqueue made ./~ and wrote "#SBATCH -e ~/my logs/..." (sbatch refused).
    command = [
        *(sys.executable, "-m", "buzzdask.cluster", "--config", "local-slurm"),
        *("--gpus", "1", "--cpu-workers", "1", "--log-directory", "~/my logs"),
        *_analyze_command(audio, options, tmp_path / "out"),
    ]
    home = {**os.environ, "HOME": str(tmp_path)}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=home
    )
    assert done.returncode == 0, done.stderr
    # Said before the wait for the queue, which may be long: not a silent console meanwhile.
    assert "buzzdask: submitting 1 GPU and 1 CPU worker job(s) (local-slurm)" in done.stdout
    assert "buzzdask: scheduler at tcp://127.0.0.1:" in done.stdout
    assert "dashboard: http://" in done.stdout
    assert "3/3 files" in done.stdout
    assert_same_frames(_read_scores(tmp_path / "out"), reference)
    # Quiet on the console; the workers' chatter is in their job logs, their lines in the run's.
    assert not NOISE.search(done.stderr), done.stderr
    job_logs = "".join(p.read_text() for p in (tmp_path / "my logs").glob("buzzdask-gpu-*.err"))
    assert "Start worker" in job_logs
    assert not (tmp_path / "~").exists()
    run_log = (tmp_path / "out" / "buzzdask.log").read_text()
    assert "written f0.wav" in run_log
    _assert_no_jobs_left()


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_batch_script_runs_the_analysis_inside_one_job(local_slurm, slurm_corpus, tmp_path):
    audio, options, reference = slurm_corpus
    analyze = _analyze_command(audio, options, tmp_path / "out")
    # The embedder from a setting, and sbatch under OnDemand's SBATCH_EXPORT=NONE: the job
    # started without the setting it was checked with, and failed to reach TF Hub.
    embedder = analyze.index("--embedder")
    del analyze[embedder : embedder + 2]
    setting = {"DASK_BUZZDASK__EMBEDDERS__YAMNET_K2__HANDLE": options["embedder"]}
    printed = subprocess.run(
        [
            *(sys.executable, "-m", "buzzdask.cluster", "--config", "local-slurm"),
            *("--gpus", "1", "--cpu-workers", "1", "--print-batch-script", *analyze),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **setting},
    )
    no_export = {**os.environ, "SBATCH_EXPORT": "NONE"}
    assert "3/3 files" in run_batch_job(printed.stdout, tmp_path, env=no_export)
    assert_same_frames(_read_scores(tmp_path / "out"), reference)
    # The actor went to the GPU task (rank 2), as in the cluster mode.
    metadata = json.loads((tmp_path / "out" / "buzzdask.json").read_text())
    assert metadata["summary"]["scorers"][0]["gpu_worker"] is True


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_a_batch_job_whose_client_is_killed_ends(local_slurm, slurm_corpus, tmp_path):
    """The client task killed outright (by the OOM killer, say) cannot stop the other tasks:
    they end the job once it has been gone for client-lost-seconds, not at the walltime."""
    audio, options, _ = slurm_corpus
    output = tmp_path / "out"
    # A watch: its client holds the output (its pid in the lock) and waits for more files.
    watch = [*_analyze_command(audio, options, output), "--watch", "--idle-timeout", "600"]
    printed = subprocess.run(
        [
            *(sys.executable, "-m", "buzzdask.cluster", "--config", "local-slurm"),
            *("--gpus", "0", "--cpu-workers", "1", "--print-batch-script", *watch),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DASK_BUZZDASK__CLIENT_LOST_SECONDS": "3"},
    )
    (tmp_path / "job.sh").write_text(printed.stdout)
    log = tmp_path / "job.out"
    submitted = subprocess.run(
        ["sbatch", "--parsable", "-o", str(log), str(tmp_path / "job.sh")],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]

    def running() -> bool:
        states = ["squeue", "-h", "-j", job_id, "-t", "PENDING,RUNNING,COMPLETING", "-o", "%T"]
        return bool(subprocess.run(states, capture_output=True, text=True).stdout.strip())

    def first_pass_written() -> bool:
        journal = output / "journal.jsonl"
        lines = journal.read_text().splitlines() if journal.exists() else []
        return sum(json.loads(line)["frames"] for line in lines) == 90

    try:
        wait_until(
            first_pass_written,
            timeout_s=300,
            failure=lambda: "the watch's first pass never ended: " + (log.read_text()[-2000:]),
            interval_s=0.5,
        )
        client_pid = json.loads((output / LOCK_NAME).read_text())["pid"]
        os.kill(client_pid, signal.SIGKILL)
        wait_until(
            lambda: not running(),
            timeout_s=90,
            failure=lambda: "the job went on without its client: " + log.read_text()[-2000:],
            interval_s=1.0,
        )
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert "the job's client task has been gone for 3 s (killed?)" in log.read_text()
    assert len(_read_scores(output)) == 90  # what the first pass wrote is kept


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_whole_node_layout_runs_inside_one_job(local_slurm, slurm_corpus, tmp_path):
    """osc-cardinal-node's layout on the local SLURM's node: its (fake) GPUs, cores and memory
    in one job, a scorer worker per GPU, two decode workers, all of them on loopback. Its
    configuration is a file, given by a relative path and submitted from another directory."""
    audio, options, reference = slurm_corpus
    partition = local_slurm["SLURM_LOCAL_GPU_PARTITION"]
    cores, memory, gres = subprocess.run(
        ["sinfo", "-h", "-N", "-p", partition, "-o", "%c %m %G"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    found = re.search(r"gpu:(\d+)", gres)
    assert found, gres
    gpus = int(found.group(1))
    node = {
        "cores": int(cores),
        "memory": f"{memory}MiB",
        "memory-per-core": f"{int(memory) // int(cores)}MiB",  # its DefMemPerCPU
        "gpus": gpus,
    }
    layout = {
        "kind": "slurm",
        "extends": "local-slurm",
        "whole-node": True,
        "gpus": gpus,
        "cpu-workers": 2,
        "nodes": {partition: node},
    }
    config = {"buzzdask": {"clusters": {"local-slurm-node": layout}}}
    (tmp_path / "local-slurm-node.yaml").write_text(yaml.safe_dump(config))
    printed = subprocess.run(
        [
            *(sys.executable, "-m", "buzzdask.cluster", "--config", "local-slurm-node.yaml"),
            *("--print-batch-script", *_analyze_command(audio, options, tmp_path / "out")),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    script = printed.stdout
    assert f"#SBATCH --cpus-per-task={cores}\n#SBATCH --mem={memory}M\n" in script
    assert f"#SBATCH --gpus-per-node={gpus}\n" in script
    assert f"srun --ntasks={2 + gpus + 2} " in script
    assert f"--config {tmp_path / 'local-slurm-node.yaml'} --gpus {gpus} --in-job" in script
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output = run_batch_job(script, tmp_path, cwd=elsewhere)
    assert "3/3 files" in output
    assert "scheduler at tcp://127.0.0.1:" in output
    assert_same_frames(_read_scores(tmp_path / "out"), reference)
    # A scorer on each GPU worker, each its own task; every worker listens on loopback only.
    metadata = json.loads((tmp_path / "out" / "buzzdask.json").read_text())
    scorers = metadata["summary"]["scorers"]
    assert [s["gpu_worker"] for s in scorers] == [True] * gpus
    assert len({s["worker"] for s in scorers}) == gpus
    assert all(s["worker"].startswith("tcp://127.0.0.1:") for s in scorers), scorers


@requires_ffmpeg
@requires_slurm
@pytest.mark.slurm
def test_command_line_holds_the_cluster_for_a_notebook(local_slurm, slurm_corpus, tmp_path):
    """Without analyze: the cluster stays up, its address is printed for Client(address), and
    SIGTERM cancels the jobs. With --gpus 0 it says the CPU workers score."""
    from distributed import Client

    audio, options, reference = slurm_corpus
    command = [
        *(sys.executable, "-m", "buzzdask.cluster", "--config", "local-slurm"),
        *("--cpu-workers", "2", "--log-directory", str(tmp_path / "logs")),
        # One CPU worker holds TensorFlow: 1 GiB would have Dask pause it (80 % memory).
        *("--memory", "2GiB"),
    ]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        lines = []
        for line in holder.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "scheduler at" in line:
                break
        # No --gpus given (local-slurm's default is none): not said as if typed.
        assert "no GPU workers (add --gpus N for GPU workers): scorers run on the CPU" in "".join(
            lines
        )
        address = lines[-1].split("scheduler at ")[1].strip()
        with Client(address) as client:
            # Without GPU workers each CPU worker may hold a scorer: each preloads TensorFlow.
            assert set(map(tuple, _preloads(client).values())) == {("buzzdask.preload",)}
            result = buzzdask.analyze(audio, output=tmp_path / "out", client=client, **options)
        _same_frames(result, reference)
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    _assert_no_jobs_left()


def test_local_configuration_starts_a_local_cluster():
    assert load_cluster_config("local")["cpu-workers"] == 1  # cluster_configs/local.yaml
    # The dashboard's address is the local cluster setting's (the entry's ":8787" beat a
    # user's DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS).
    with socket.socket() as probe:  # a port free now
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    local = {"local-cluster.dashboard-address": f":{port}", "clusters.local.cpu-workers": 2}
    with dask.config.set({f"buzzdask.{key}": value for key, value in local.items()}):
        client = start("local")
    try:
        assert len(client.scheduler_info()["workers"]) == 3  # the scorer's and two decoding
        assert urllib.parse.urlsplit(client.dashboard_link).port == port
        # The buzzdask page printed with the dashboard's address is there before any run.
        page = page_link(client.dashboard_link)
        with urllib.request.urlopen(page, timeout=30) as answer:
            assert "No buzzdask run on this cluster yet" in answer.read().decode()
        with urllib.request.urlopen(f"{page}/status.json", timeout=30) as answer:
            assert json.load(answer) == {"runs": []}
    finally:
        client.shutdown()
    with pytest.raises(ParameterError, match="gpus=1"):
        start("local", gpus=1)


def test_cluster_package_is_importable_without_tensorflow():
    probe = "import sys, buzzdask.cluster; print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
    assert Path(buzzdask.cluster.__file__).parent.name == "cluster"


def test_importing_the_slurm_cluster_leaves_ctrl_c_alone():
    # dask_jobqueue.runner sets SIGINT to sys.exit() as it is imported: Ctrl-C then ended a
    # run with exit code 0 and no word, and a notebook's "interrupt kernel" would end it.
    probe = (
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "import buzzdask.cluster.slurm, buzzdask.cluster.batch, dask_jobqueue.runner; "
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr
