"""The command line, run as users run it: a real subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pandas as pd
import pytest

import buzzdask
from buzzdask.cli import EXIT_CODES, EXIT_ERROR, EXIT_FILES_FAILED, EXIT_OK
from tests.conftest import (
    BLAS_THREADS_REPORT,
    BUZZDASK,
    REPO,
    in_a_fresh_interpreter,
    requires_ffmpeg,
    zero_a_stretch,
)

FRAME = 15360


def buzzdask_cli(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    """The command as a user's shell runs it: without the log settings this test process made
    for itself (a scorer here sets ``TF_CPP_MIN_LOG_LEVEL``), and on a free dashboard port."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")
    }
    return subprocess.run(
        [BUZZDASK, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**env, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"},
    )


def test_version() -> None:
    done = buzzdask_cli("--version")
    assert done.returncode == EXIT_OK
    assert done.stdout.strip() == f"buzzdask {buzzdask.__version__}"
    as_module = subprocess.run(
        [sys.executable, "-m", "buzzdask", "--version"], capture_output=True, text=True
    )
    assert as_module.stdout == done.stdout


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("buzzdask:\n  chunk-seconds: [3\n  batch-frames: 64\n", "is not valid YAML: while"),
        ("- a\n", "must hold a mapping at its top level (such as buzzdask: and its keys), not"),
    ],
    ids=["malformed", "a-list"],
)
def test_a_malformed_dask_config_file_is_one_error_naming_it(tmp_path, content, problem) -> None:
    """Dask refuses it as it is imported: that was a traceback of 30 lines, from any command
    (``python -m buzzdask.cluster`` imports Dask with its package, before its ``main``)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mine.yaml").write_text(content)
    env = {**os.environ, "DASK_CONFIG": str(tmp_path / "config")}
    output = tmp_path / "out"
    commands = [
        [BUZZDASK, "analyze", "a.wav", "--model", "m", "--output", str(output)],
        [BUZZDASK, "--version"],
        [sys.executable, "-m", "buzzdask", "--version"],
        [sys.executable, "-m", "buzzdask.cluster", "--config", "local", "--print-job-script"],
    ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == EXIT_ERROR
        assert done.stderr.startswith(
            f"buzzdask: error: Dask configuration file {tmp_path / 'config' / 'mine.yaml'} "
            f"{problem}"
        )
        assert "Traceback" not in done.stderr
        assert done.stderr.rstrip().endswith("reads each YAML file of Dask's configuration)")
    assert not output.exists()


def test_a_bad_setting_names_the_file_or_variable_that_sets_it(tmp_path) -> None:
    """Not "a YAML file under ~/.config/dask/" of a key set in DASK_CONFIG's folder."""
    (tmp_path / "config").mkdir()
    mine = tmp_path / "config" / "mine.yaml"
    mine.write_text("buzzdask:\n  chunk_secondz: 3\n  embedders:\n    own:\n      handle: x\n")
    env = {**os.environ, "DASK_CONFIG": str(tmp_path / "config")}
    args = [BUZZDASK, "analyze", "a.wav", "--model", "m", "--output", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == EXIT_ERROR
    lines = done.stderr.splitlines()
    assert lines[0] == (
        f"buzzdask: error: unknown setting buzzdask.chunk-secondz (set in {mine}); did you mean "
        "buzzdask.chunk-seconds?"
    )
    # A key missing from a section: the file that holds the section.
    assert f"buzzdask.embedders.own.sample-rate is missing (set in {mine})" in lines
    # Of two files that set it, the one Dask read last (whose value it took).
    (tmp_path / "config" / "zz.yaml").write_text("buzzdask:\n  chunk_secondz: 4\n")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert f"(set in {tmp_path / 'config' / 'zz.yaml'}); did you mean" in done.stderr
    variable = {"DASK_BUZZDASK__BATCH_FRAMES": "0"}
    done = subprocess.run(args, capture_output=True, text=True, env={**env, **variable})
    assert (
        "buzzdask.batch-frames=0 must be an integer >= 1 [frames] (set by the DASK_BUZZDASK__"
        in (done.stderr)
    )
    assert not (tmp_path / "out").exists()


def test_help_gives_the_defaults_as_configured() -> None:
    """A user's own chunk-seconds in their YAML file or a variable is what a run takes."""
    env = {**os.environ, "DASK_BUZZDASK__CHUNK_SECONDS": "300", "COLUMNS": "300"}
    done = subprocess.run(
        [BUZZDASK, "analyze", "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    text = " ".join(done.stdout.split())
    assert "audio per decode task (default 300: buzzdask.chunk-seconds)" in text
    assert "(default 512: buzzdask.batch-frames;" in text


def test_the_readme_lists_the_exit_codes_the_command_has() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| exit code | meaning |") :].split("\n\n", 1)[0]
    assert [int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)] == list(EXIT_CODES)


def test_init_creates_the_documented_layout(tmp_path) -> None:
    done = buzzdask_cli("init", str(tmp_path / "project"))
    assert done.returncode == EXIT_OK, done.stderr
    for name in ("audio_in", "models", "results", "logs"):
        assert (tmp_path / "project" / name / "README.md").is_file()
    again = buzzdask_cli("init", str(tmp_path / "project"))
    assert again.returncode == EXIT_OK, again.stderr
    already = "has the project layout already: nothing created"
    assert again.stdout == f"{tmp_path / 'project'} {already}\n"
    # A file where a folder goes, a path under a file, an empty path: one line each, exit 1.
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "audio_in").write_text("")
    (tmp_path / "afile").write_text("")
    for path, said in [
        (tmp_path / "p2", f"{tmp_path / 'p2'}: {tmp_path / 'p2' / 'audio_in'}: File exists"),
        (tmp_path / "afile", f"{tmp_path / 'afile'}: {tmp_path / 'afile'}"),
        ("", "the project directory is an empty path"),
    ]:
        refused = buzzdask_cli("init", str(path))
        assert refused.returncode == EXIT_ERROR
        assert "Traceback" not in refused.stderr and said in refused.stderr, refused.stderr


@requires_ffmpeg
def test_analyze_exit_codes(tmp_path, make_audio, tiny_model, tiny_embedder) -> None:
    make_audio("a.wav", n_samples=3 * FRAME)
    make_audio("short.wav", n_samples=FRAME // 2)
    (tmp_path / "audio" / "broken.mp3").write_text("not audio")  # for ffprobe to refuse
    whole = make_audio("cut.wav", n_samples=4 * FRAME).read_bytes()
    (tmp_path / "audio" / "cut.wav").write_bytes(whole[: len(whole) // 2])
    zero_a_stretch(make_audio("damaged.mp3", n_samples=4 * 44100, rate=44100, channels=2))
    args = [
        "analyze", str(tmp_path / "audio"),
        "--model", str(tiny_model),
        "--embedder", str(tiny_embedder),
        "--output", str(tmp_path / "out"),
        "--threshold", "ins_buzz=0.5",
        "--chunk-seconds", "1",
        "-v",
    ]  # fmt: skip
    done = buzzdask_cli(*args)
    assert done.returncode == EXIT_FILES_FAILED, done.stderr
    assert "decoding a.wav [0.96–1.92 s]" in done.stderr
    assert "scoring a.wav" in done.stderr
    # Each file's own reason, as the command's worker processes send it (no unpickling error).
    assert "failed: broken.mp3: ffprobe cannot read it as audio" in done.stderr
    assert "failed: short.wav: 0.48 s of audio, shorter than one frame (0.96 s)" in done.stderr
    assert "written short.wav" not in done.stderr  # no partition: no "0 frames" written
    assert "Failed to deserialize" not in done.stderr
    # Files whose frames are written all the same are warned about, not called failed; a
    # chunk's number reads as one.
    # As it happens, and again as the run ends: labelled a warning both times.
    assert done.stderr.count("buzzdask: warning: cut.wav: cut short: its header declares") == 2
    damaged = r"warning: damaged.mp3 chunks? \d+(, \d+)*: ffmpeg reported damaged audio"
    assert re.search(damaged, done.stderr)
    assert "failed: cut.wav" not in done.stderr and "failed: damaged" not in done.stderr
    assert "buzzdask: 3/5 files (2 failed), " in done.stdout
    frame = pd.read_parquet(tmp_path / "out" / "scores")
    assert len(frame) > 3 and "detections_ins_buzz" in frame
    assert len(frame[frame.file == "a.wav"]) == 3

    make_audio("b.wav", n_samples=2 * FRAME, seed=3)  # arrived since: a resume adds it
    more = buzzdask_cli(*args, "--resume")
    # Its audio and speed are its own; what the earlier run wrote is said apart.
    added = (
        r"buzzdask: 4/6 files \(2 failed\), 2 s of audio in .*realtime, "
        r"\d+ chunks done before\)"
    )
    assert re.search(added, more.stdout), more.stdout
    finished = buzzdask_cli(*args, "--resume")
    assert "buzzdask: 4/6 files (2 failed), nothing left to analyse (" in finished.stdout

    conflict = buzzdask_cli(*args)
    assert conflict.returncode == EXIT_ERROR
    assert "already holds results" in conflict.stderr
    assert "already holds results of a finished run (" in conflict.stderr
    assert "); pass --new to write to a new timestamped directory" in conflict.stderr

    bad_threshold = buzzdask_cli(*args[:-3], "--threshold", "ins_buzz")
    assert bad_threshold.returncode == 2
    assert "CLASS=VALUE" in bad_threshold.stderr

    # An output the system will not create (here under a file: a mistyped or read-only
    # parent alike) stops the run before it starts, in one line.
    under_a_file = tmp_path / "audio" / "a.wav" / "out"
    nowhere = buzzdask_cli(*args[:6], "--output", str(under_a_file))
    assert nowhere.returncode == EXIT_ERROR
    assert nowhere.stderr.endswith(
        f"buzzdask: error: cannot create output {under_a_file} (Not a directory); "
        "choose another --output\n"
    )
    # A link to a folder that is gone (an unmounted scratch space): said so.
    dangling = tmp_path / "linked-out"
    dangling.symlink_to(tmp_path / "unmounted" / "out")
    gone = buzzdask_cli(*args[:6], "--output", str(dangling))
    assert gone.returncode == EXIT_ERROR
    assert gone.stderr.endswith(
        f"buzzdask: error: cannot create output {dangling} (a link to "
        f"{tmp_path / 'unmounted' / 'out'}, which does not exist); choose another --output\n"
    )


def test_the_command_imports_numpy_with_one_blas_thread(tmp_path) -> None:
    """As Dask's nanny gives its workers: numpy, imported once the command runs, starts one
    BLAS thread, not one per core; a value the user set wins."""
    script = (
        "import sys\n"
        "from buzzdask.cli import main\n"
        "assert 'numpy' not in sys.modules\n"
        f"assert main(['init', {str(tmp_path / 'project')!r}]) == 0\n"
    ) + BLAS_THREADS_REPORT

    def blas_threads(**variables: str) -> str:
        environment = {
            name: value
            for name, value in os.environ.items()
            if name not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        }
        return in_a_fresh_interpreter(script, env={**environment, **variables})[-1]

    assert blas_threads() == "[1]"
    if len(os.sched_getaffinity(0)) > 1:
        assert blas_threads(OPENBLAS_NUM_THREADS="2") == "[2]"


def test_messages_name_the_flags_given(tmp_path, make_audio, tiny_model, tiny_embedder) -> None:
    """A value refused by the library is named by the flag that gave it, not the keyword."""
    audio = make_audio("a.wav", n_samples=2 * FRAME)
    analyze = ["analyze", str(audio), "--model", str(tiny_model), "--embedder", str(tiny_embedder)]
    analyze += ["--output", str(tmp_path / "out")]
    for extra, said in [
        (["--chunk-seconds", "0"], "--chunk-seconds 0.0 must be a number in (0, 86400]"),
        (["--memory-budget", "lots"], "--memory-budget 'lots' must be a size > 0"),
        # "$OUT" unset: not the working directory, written into without a word
        (["--output", ""], "--output '' is empty"),
        (["--keep-embeddings="], "--keep-embeddings '' is empty"),
        (["--framehop", "0.0961"], "--framehop 0.0961 s is not a whole number of samples at "),
    ]:
        done = buzzdask_cli(*analyze, *extra, cwd=tmp_path)
        assert done.returncode == EXIT_ERROR
        assert done.stderr.startswith(f"buzzdask: error: {said}"), done.stderr
    assert "(1537.6 samples)" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audio"]  # nothing written here
    transfer = buzzdask_cli("transfer", "x:", str(tmp_path / "d"), "--batch-size", "0")
    assert transfer.stderr.startswith("buzzdask: error: --batch-size 0 must be"), transfer.stderr
    labels = tmp_path / "labels.csv"
    labels.write_text("file,start,end,classification\na.wav,0,1,ins_buzz\n")
    train = ["train", str(audio.parent), "--labels", str(labels), "--output", str(tmp_path / "m")]
    seed = buzzdask_cli(*train, "--seed", "-1")
    assert seed.stderr.startswith("buzzdask: error: --seed -1 must be"), seed.stderr


def test_a_hop_longer_than_a_frame_is_warned_of(tmp_path, make_audio, tiny_model, tiny_embedder):
    """buzzdetect's --framehop_prop 1 typed as --framehop 1: 40 ms unscored after each frame."""
    audio = make_audio("a.wav", n_samples=3 * FRAME)
    done = buzzdask_cli(
        *("analyze", str(audio), "--model", str(tiny_model), "--embedder", str(tiny_embedder)),
        *("--output", str(tmp_path / "out"), "--framehop", "1", "--no-progress"),
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert (
        "the frame hop, 1 s, is longer than a frame (0.96 s): 0.04 s after each frame are never "
        "scored (buzzdetect's framehop_prop 1 is a hop of 0.96 s, 0.5 of 0.48 s)"
    ) in done.stderr


def test_a_model_not_found_names_where_it_was_looked_for(tmp_path, make_audio) -> None:
    """The default model-dirs, "models", is named as the folder it is here."""
    audio = make_audio("a.wav", n_samples=2 * FRAME)
    done = buzzdask_cli("analyze", str(audio), "--model", "nosuch", "--output", "o", cwd=tmp_path)
    assert done.returncode == EXIT_ERROR
    assert f"model 'nosuch' not found: not a directory, nor in ['{tmp_path / 'models'}']" in (
        done.stderr
    )


def test_an_input_taken_as_the_embedding_store_is_refused(tmp_path, make_audio) -> None:
    """``--keep-embeddings a/ b/``: argparse reads a/ as the store (its value is optional)."""
    first = make_audio("a/x.wav", n_samples=2 * FRAME).parent
    second = make_audio("b/y.wav", n_samples=2 * FRAME).parent
    output = tmp_path / "out"
    done = buzzdask_cli(
        "analyze",
        "--keep-embeddings",
        str(first),
        str(second),
        "--model",
        "m",
        "--output",
        str(output),
    )
    assert done.returncode == 2
    assert f"--keep-embeddings {first}: {first} holds audio, so it was taken for an" in (
        done.stderr
    )
    assert sorted(p.name for p in first.iterdir()) == ["x.wav"] and not output.exists()
    # Written with "=", the store is meant (a project folder holding audio, say): taken as is.
    meant = buzzdask_cli(
        "analyze", f"--keep-embeddings={first}", str(second), "--model", "m", "--output", "o"
    )
    assert meant.returncode == EXIT_ERROR and "model 'm' not found" in meant.stderr


def test_threshold_of_a_model_named_with_an_equals_sign():
    """A head's folder may be named site=A: the value follows the last "=" (a number has none)."""
    from buzzdask.cli import build_parser

    given = ["analyze", "a.wav", "--model", "m", "--output", "o"]
    given += ["--threshold", "site=A/ins_buzz=0.1", "--threshold", "ins_buzz=-1.2"]
    parsed = build_parser().parse_args(given)
    assert parsed.threshold == {"site=A/ins_buzz": 0.1, "ins_buzz": -1.2}
