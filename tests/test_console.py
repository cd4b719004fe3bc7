"""The console a user sees (quiet by default, chunk lines with -v) and each run's buzzdask.log."""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

from buzzdask.cli import EXIT_ERROR, EXIT_FILES_FAILED, EXIT_OK
from buzzdask.progress import PROBLEMS_SHOWN
from tests.conftest import BUZZDASK, ffmpeg_failing_on, requires_ffmpeg
from tests.test_cli import buzzdask_cli

# What TensorFlow, absl, CUDA and Dask print when nothing silences them.
NOISE = re.compile(r"E0000|W0000|I0000|cuInit|oneDNN|cudart|absl|Nanny|nanny|distributed\.")
TENSORFLOW = re.compile(r"[EWI]0000|cuInit|oneDNN|cudart")
CHUNK_LINES = ("decoding ", "scoring ", "written ")


def _analyze(tmp_path, tiny_model, tiny_embedder, *flags: str) -> subprocess.CompletedProcess[str]:
    return _command(
        "analyze", tmp_path / "audio", tiny_model, tiny_embedder, tmp_path / "out", *flags
    )


def _command(
    command: str, source: Path, model: Path, embedder: Path, output: Path, *flags: str
) -> subprocess.CompletedProcess[str]:
    return buzzdask_cli(
        command, str(source),
        "--model", str(model),
        "--embedder", str(embedder),
        "--output", str(output),
        "--no-progress",
        *flags,
    )  # fmt: skip


@requires_ffmpeg
def test_default_console_is_quiet_and_the_log_has_every_chunk(
    tmp_path, make_audio, tiny_model, tiny_embedder
):
    make_audio("good.wav", n_samples=16000 * 3)
    (tmp_path / "audio" / "broken.wav").write_bytes(b"RIFF not really audio")
    done = _analyze(tmp_path, tiny_model, tiny_embedder)
    assert done.returncode == EXIT_FILES_FAILED, done.stderr
    assert not NOISE.search(done.stderr), done.stderr
    assert not any(line in done.stderr for line in CHUNK_LINES), done.stderr
    assert "broken.wav" in done.stderr  # the failure is still reported, once, plainly
    log = (tmp_path / "out" / "buzzdask.log").read_text()
    for line in CHUNK_LINES:
        assert f"{line}good.wav" in log, log
    assert "broken.wav" in log and "WARNING" in log, log


@requires_ffmpeg
def test_verbose_shows_the_chunk_lines(tmp_path, make_audio, tiny_model, tiny_embedder):
    make_audio("good.wav", n_samples=16000 * 3)
    done = _analyze(tmp_path, tiny_model, tiny_embedder, "-v")
    assert done.returncode == EXIT_OK, done.stderr
    for line in CHUNK_LINES:
        assert f"buzzdask: {line}good.wav" in done.stderr, done.stderr
    assert not TENSORFLOW.search(done.stderr), done.stderr  # that is --debug's
    # bokeh's warning that Dask's dashboard takes connections from any host: nothing to act on.
    assert "bokeh" not in done.stderr, done.stderr


@requires_ffmpeg
def test_a_console_no_one_reads_any_more_does_not_stop_the_run(
    tmp_path, make_audio, tiny_model, tiny_embedder
):
    """``buzzdask analyze ... 2>&1 | head -1``: the run's next line met a closed pipe and the
    whole run failed on it (BrokenPipeError, exit 1, nothing written)."""
    make_audio("good.wav", n_samples=16000 * 3)
    command = shlex.join([
        BUZZDASK, "analyze", str(tmp_path / "audio"),
        "--model", str(tiny_model), "--embedder", str(tiny_embedder),
        "--output", str(tmp_path / "out"), "-v",
    ])  # fmt: skip
    env = {**os.environ, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"}
    done = subprocess.run(
        ["bash", "-c", f"{command} 2>&1 | head -1; exit ${{PIPESTATUS[0]}}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == EXIT_OK, done.stdout
    assert done.stdout.count("\n") == 1, done.stdout
    assert len(pd.read_parquet(tmp_path / "out" / "scores")) == 3
    # The console's lines went nowhere; the run's log has them all.
    assert "written good.wav" in (tmp_path / "out" / "buzzdask.log").read_text()


@requires_ffmpeg
def test_a_script_without_main_guard_gets_one_line(tmp_path, make_audio, tiny_model, tiny_embedder):
    make_audio("good.wav", n_samples=16000 * 3)
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(f"""
            import buzzdask

            buzzdask.analyze(
                {str(tmp_path / "audio")!r},
                {str(tiny_model)!r},
                embedder={str(tiny_embedder)!r},
                output={str(tmp_path / "out")!r},
                progress=False,
            )
        """)
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"},
    )
    assert done.returncode != 0
    assert "Nanny" not in done.stderr, done.stderr
    fix = [line for line in done.stderr.splitlines() if '__name__ == "__main__"' in line]
    assert len(fix) == 1 and str(script) in fix[0], done.stderr
    assert len(done.stderr.splitlines()) < 30, done.stderr
    assert not (tmp_path / "out").exists()  # no empty output left behind


def test_a_main_guard_with_more_conditions_is_one():
    # "if __name__ == '__main__' and args:" was refused as no guard.
    from buzzdask.logs import _guards

    tree = ast.parse(
        'if __name__ == "__main__" and len(sys.argv) > 1:\n    main()\n'
        'if __name__ != "__main__":\n    other()\n'
    )
    assert _guards(tree.body[0], 2) and not _guards(tree.body[1], 4)


@requires_ffmpeg
def test_a_run_ends_with_the_first_problems_and_where_the_rest_are(
    tmp_path, make_audio, tiny_model, tiny_embedder
) -> None:
    make_audio("a.wav", n_samples=16000 * 3)
    for index in range(PROBLEMS_SHOWN + 2):
        (tmp_path / "audio" / f"notes{index:02d}.wav").write_text("not audio")
    done = _analyze(tmp_path, tiny_model, tiny_embedder)
    assert done.returncode == EXIT_FILES_FAILED, done.stderr
    assert "buzzdask: 1/23 files" in done.stdout
    # The first ones as they happened, then again at the end; the run's log has every one.
    assert done.stderr.count("buzzdask: failed: notes") == 2 * PROBLEMS_SHOWN
    assert f"buzzdask: more than {PROBLEMS_SHOWN} problems: the others go to" in done.stderr
    errors = tmp_path / "out" / "errors.parquet"
    assert f"buzzdask: ... and 2 more, every one in {errors}" in done.stderr
    assert len(pd.read_parquet(errors)) == PROBLEMS_SHOWN + 2
    log = (tmp_path / "out" / "buzzdask.log").read_text()
    assert log.count("buzzdask: failed: notes") == PROBLEMS_SHOWN + 2


@requires_ffmpeg
def test_a_file_failing_in_every_chunk_is_one_line(
    tmp_path, make_audio, tiny_model, tiny_embedder, monkeypatch
) -> None:
    """Its chunks are rows of their own, but one line on the console, as it happens and at
    the end: a file deleted mid-run had filled the console's lines alone."""
    from buzzdask.ffmpeg_tools import find_ffmpeg

    make_audio("good.mp3", n_samples=6 * 15360)
    make_audio("bad.mp3", n_samples=6 * 15360, seed=1)
    tools = find_ffmpeg()
    wrapper = ffmpeg_failing_on(tmp_path, "bad.mp3")
    monkeypatch.setenv("DASK_BUZZDASK__FFMPEG", str(wrapper))
    monkeypatch.setenv("DASK_BUZZDASK__FFPROBE", tools.ffprobe or "")
    done = _analyze(tmp_path, tiny_model, tiny_embedder, "--chunk-seconds", "2")
    assert done.returncode == EXIT_FILES_FAILED, done.stderr
    lines = [line for line in done.stderr.splitlines() if "bad.mp3" in line]
    assert len(lines) == 2, done.stderr  # the first chunk to fail, then all at the end
    assert re.fullmatch(r"buzzdask: failed: bad.mp3 chunk \d: ffmpeg failed to decode", lines[0])
    assert lines[1] == "buzzdask: failed: bad.mp3 chunks 0, 1, 2: ffmpeg failed to decode"
    assert len(pd.read_parquet(tmp_path / "out" / "errors.parquet")) == 3


@requires_ffmpeg
def test_a_rescoring_in_the_commands_process_is_as_quiet(
    tmp_path, make_audio, tiny_model, tiny_embedder
):
    """Its scorer runs in the command's own process (a local cluster of threads): TensorFlow's
    native start-up lines, written before any setting is read, stay off the console there too.
    The analysis' output names its store; a path without one says so before any embedder."""
    make_audio("good.wav", n_samples=16000 * 3)
    assert _analyze(tmp_path, tiny_model, tiny_embedder, "--keep-embeddings").returncode == 0
    done = _command("rescore", tmp_path / "out", tiny_model, tiny_embedder, tmp_path / "again")
    assert done.returncode == EXIT_OK, done.stderr
    assert "buzzdask: 1/1 files" in done.stdout
    assert not NOISE.search(done.stderr), done.stderr
    nowhere = _command(
        "rescore", tmp_path / "audio", tiny_model, tmp_path / "no-embedder", tmp_path / "never"
    )
    assert nowhere.returncode == EXIT_ERROR
    assert nowhere.stderr == (
        f"buzzdask: error: {tmp_path / 'audio'} holds no embeddings an analysis stored "
        "(no */catalog.jsonl); analyse with --keep-embeddings first\n"
    )
