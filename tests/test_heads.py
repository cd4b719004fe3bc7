"""Several heads in one run: one decode and one embedding, a complete output per head.

With the lab's parts (../shared): model_general_v3 and a head trained here with
``buzzdask.train``, both on the rebuilt YAMNet, scored together in one ``analyze`` run, must give
what each gives in a run of its own; the embeddings that run keeps re-score to the same numbers.
The errors a list of models can meet are refused before any work, with tiny real models.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import buzzdask
from buzzdask import InputError, ModelError, OutputConflictError, ParameterError
from buzzdask.write import OutputLayout
from tests.conftest import CLASSES, field_like, requires_ffmpeg, requires_shared, write_wav
from tests.test_rescore import assert_same_output

pytestmark = requires_ffmpeg
RATE = 16000
FRAME = 15360  # samples in one 0.96 s frame at 16 kHz


def labelled_recording(tone_hz: float, seed: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """8 s at 16 kHz: quiet, a buzz-like tone, quiet, tone; the tones' (start, end) [s]."""
    rng = np.random.default_rng(seed)
    pieces, tones, at = [], [], 0.0
    for kind, seconds in [("quiet", 2), ("tone", 2), ("quiet", 2), ("tone", 2)]:
        t = np.arange(seconds * RATE) / RATE
        quiet = 0.003 * rng.standard_normal(len(t))
        if kind == "tone":
            pieces.append(0.3 * np.sign(np.sin(2 * np.pi * tone_hz * t)) + quiet)
            tones.append((at, at + seconds))
        else:
            pieces.append(quiet)
        at += seconds
    return np.clip(np.concatenate(pieces), -0.99, 0.99), tones


@pytest.fixture(scope="module")
def lab(tmp_path_factory, shared_dir, dask_client):
    """A head trained on the rebuilt YAMNet; model_general_v3 and it scored in one run, and each
    in a run of its own, on the lab's recording and a generated 44.1 kHz stereo one."""
    root = tmp_path_factory.mktemp("heads")
    embedder = str(shared_dir / "models" / "yamnet" / "saved_model_wholehop")
    general = shared_dir / "data" / "models" / "model_general_v3"

    rows = []
    for seed, (group, tone_hz) in enumerate([("siteA", 180.0), ("siteB", 260.0)]):
        samples, tones = labelled_recording(tone_hz, seed)
        (root / "train").mkdir(exist_ok=True)
        write_wav(root / "train" / f"{group}.wav", samples, RATE)
        rows += [
            {"file": f"{group}.wav", "start": s, "end": e, "label": "ins_buzz", "group": group}
            for s, e in tones
        ]
    trained = buzzdask.train(
        pd.DataFrame(rows),
        root / "train",
        output=root / "model_site",
        client=dask_client,
        embedder=embedder,
        holdout=["siteB"],
        unlabeled_ambient=3,
        ambient_margin_s=0.5,
        epochs=4,
        cache_dir=root / "cache",
    )

    audio = root / "audio"
    audio.mkdir()
    (audio / "testbuzz.mp3").symlink_to(shared_dir / "data" / "audio_in" / "testbuzz.mp3")
    stereo = root / "stereo.wav"
    write_wav(stereo, field_like(44100 * 5 + 321, 44100, 2, seed=4), 44100)
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(stereo), "-b:a", "128k", str(audio / "stereo.mp3")],
        check=True,
    )
    options = {
        "client": dask_client,
        "embedder": embedder,
        "chunk_seconds": 2.0,
        # Each chunk's frames in an embedder call of their own, in every run here: TensorFlow's
        # sums then do not depend on which chunks timing puts in one score task (they move
        # the lab model's activations by up to 5e-7 otherwise).
        "batch_frames": 1,
        "progress": False,
    }
    both = buzzdask.analyze(
        audio,
        [general, trained.output],
        output=root / "both",
        keep_embeddings=True,
        **options,
    )
    alone = {
        model.name: buzzdask.analyze(audio, model, output=root / "alone" / model.name, **options)
        for model in (general, trained.output)
    }
    return SimpleNamespace(
        root=root,
        embedder=embedder,
        general=general,
        trained=trained,
        both=both,
        alone=alone,
        options=options,
    )


def lab_test(test):
    """Marks a test that runs the lab's parts (../shared)."""
    for mark in (requires_shared, pytest.mark.shared_data, pytest.mark.slow):
        test = mark(test)
    return test


@lab_test
@pytest.mark.parametrize("name", ["model_general_v3", "model_site"])
def test_heads_in_one_run_equal_separate_runs(lab, name):
    together, alone = lab.both[name], lab.alone[name]
    assert together.ok and alone.ok, (together.errors, alone.errors)
    frame, reference = together.to_pandas(), alone.to_pandas()
    assert sorted(frame.file.unique()) == ["stereo.mp3", "testbuzz.mp3"]
    assert len(frame) == together.summary["frames"] > 6  # testbuzz's 6 complete frames, and more
    assert list(frame.columns) == list(reference.columns)
    assert frame.columns.tolist()[3:] == [f"activation_{c}" for c in together.metadata["classes"]]
    assert_same_output(together.output, alone.output, atol=1e-6)


@lab_test
def test_each_head_gets_a_complete_output_of_its_own(lab):
    assert set(lab.both) == {"model_general_v3", "model_site"}
    classes = {
        "model_general_v3": json.loads((lab.general / "config_model.json").read_text())["classes"],
        "model_site": list(lab.trained.classes),
    }
    fingerprints = {}
    for name, result in lab.both.items():
        assert result.output == lab.root / "both" / name
        run = buzzdask.open_run(result.output)
        assert run.complete and list(run.classes) == classes[name]
        metadata, alone = run.metadata, lab.alone[name].metadata
        assert metadata["model"]["name"] == name
        assert metadata["model"]["sha256"] == alone["model"]["sha256"]
        # The settings that change its results are those of its own run.
        assert metadata["fingerprint"] == alone["fingerprint"]
        fingerprints[name] = metadata["fingerprint"]
        assert metadata["heads"] == ["model_general_v3", "model_site"]
        assert metadata["summary"] == result.summary
        schema = pq.read_schema(next(result.dataset.rglob("*.parquet"))).metadata
        assert json.loads(schema[b"buzzdask"])["model"]["sha256"] == alone["model"]["sha256"]
        with_pandas = pd.read_parquet(result.dataset, partitioning=None)
        with_dask = dd.read_parquet(result.dataset, dataset={"partitioning": None}).compute()
        assert len(with_pandas) == len(with_dask) == len(run.frames().compute())
        assert len(with_pandas) == result.summary["frames"]
        assert pd.read_parquet(result.output / "errors.parquet").empty
        journal = (result.output / "journal.jsonl").read_text().splitlines()
        assert len(journal) == len(OutputLayout(result.output).partitions())
    assert (
        fingerprints["model_general_v3"]["model_sha256"]
        != fingerprints["model_site"]["model_sha256"]
    )
    # The audio was decoded and embedded once for both heads.
    summary = lab.both["model_site"].summary
    assert sum(s["frames_embedded"] for s in summary["scorers"]) == summary["frames"]
    assert sum(s["frames_scored"] for s in summary["scorers"]) == summary["frames"]
    # The run's log and kept embeddings beside the heads' outputs; no output of its own.
    names = sorted(p.name for p in (lab.root / "both").iterdir())
    assert names == ["buzzdask.log", "embeddings", "model_general_v3", "model_site"]
    with pytest.raises(InputError, match="holds the outputs of several models: open one of"):
        buzzdask.open_run(lab.root / "both")


@lab_test
def test_kept_embeddings_rescore_to_the_same_numbers(lab, dask_client, tmp_path):
    """The lab's model and the trained head on the kept embeddings, without the audio."""
    away = (lab.root / "audio").rename(lab.root / "audio_away")
    try:
        results = buzzdask.rescore(
            lab.root / "both" / "embeddings",
            [lab.general, lab.trained.output],
            output=tmp_path / "re",
            client=dask_client,
            embedder=lab.embedder,
            progress=False,
        )
    finally:
        away.rename(lab.root / "audio")
    assert set(results) == {"model_general_v3", "model_site"}
    for name, result in results.items():
        assert result.ok, result.errors
        assert result.summary["chunks_from_store"] == result.summary["chunks_written"]
        assert_same_output(result.output, lab.alone[name].output, atol=1e-4)


# -- errors before any work, with tiny models --------------------------------------------------


@pytest.fixture
def one_file(make_audio, tmp_path) -> Path:
    make_audio("a.wav", n_samples=3 * FRAME)
    return tmp_path / "audio"


def test_heads_on_different_embedders_are_refused(
    one_file, tiny_model, tiny_embedder, tiny_embedder_halfhop, dask_client, tmp_path
):
    from tests.model_fixtures import build_tiny_head

    other = build_tiny_head(tmp_path / "model_other", classes=CLASSES, embedder_name="yamnet_half")
    embedders = {
        "buzzdask.embedders.yamnet_k2.handle": str(tiny_embedder),
        "buzzdask.embedders.yamnet_half": {
            "handle": str(tiny_embedder_halfhop),
            "sample-rate": 16000,
            "frame-length-seconds": 0.96,
            "frame-context-seconds": 0.015,
        },
    }
    with (
        dask.config.set(embedders),
        pytest.raises(ModelError, match="do not share one embedder") as refused,
    ):
        buzzdask.analyze(one_file, [tiny_model, other], output=tmp_path / "out", client=dask_client)
    message = str(refused.value)
    assert f"model_tiny uses yamnet_k2 ({tiny_embedder}" in message
    assert f"model_other uses yamnet_half ({tiny_embedder_halfhop}" in message
    assert not (tmp_path / "out").exists()


def test_a_list_of_models_errors_before_any_work(
    one_file, run, tiny_model, tiny_embedder, tmp_path
):
    from tests.model_fixtures import build_tiny_head

    twin = build_tiny_head(tmp_path / "elsewhere" / "model_tiny", classes=CLASSES, seed=3)
    with pytest.raises(ModelError, match=r"two models are named 'model_tiny'"):
        run(one_file, model=[tiny_model, twin], output=tmp_path / "twins")
    with pytest.raises(ModelError, match=r"model_tiny is given twice .*: give it once"):
        run(one_file, model=[tiny_model, f"{tiny_model}/"], output=tmp_path / "twins")
    # output/<name> is the run's own (its log: a traceback; its kept embeddings: mixed in), or
    # one folder where the disk ignores case.
    for name, said in [
        ("embeddings", "named 'embeddings', which the output of several models keeps"),
        ("buzzdask.log", "named 'buzzdask.log', which the output of several models keeps"),
        ("Embeddings", "named 'Embeddings', which the output of several models keeps"),
        ("Model_Tiny", r"\['model_tiny', 'Model_Tiny'\] differ only in letter case"),
    ]:
        odd = shutil.copytree(tiny_model, tmp_path / "odd" / name)
        with pytest.raises(ModelError, match=said):
            run(one_file, model=[tiny_model, odd], output=tmp_path / "twins")
    assert not (tmp_path / "twins").exists()
    with pytest.raises(ParameterError, match="no model given"):
        buzzdask.analyze(one_file, [], output=tmp_path / "none", embedder=str(tiny_embedder))
    assert not (tmp_path / "none").exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("field notes")
    with pytest.raises(OutputConflictError, match=r"holds other files \(notes\.txt\)"):
        run(one_file, model=[tiny_model], output=busy)
    # The user's own, not the run's embeddings (which a Mac's disk would take it for).
    (tmp_path / "theirs" / "Embeddings").mkdir(parents=True)
    with pytest.raises(OutputConflictError, match=r"holds other files \(Embeddings\)"):
        run(one_file, model=[tiny_model], output=tmp_path / "theirs", keep_embeddings=True)
    # A one-model output is not taken for a run of several either.
    single = run(one_file, output=tmp_path / "single")
    before = {p: p.stat().st_mtime_ns for p in single.output.rglob("*")}
    with pytest.raises(OutputConflictError, match=r"holds other files \(buzzdask\.json, "):
        run(one_file, model=[tiny_model], output=single.output)
    assert {p: p.stat().st_mtime_ns for p in single.output.rglob("*")} == before
    assert (busy / "notes.txt").read_text() == "field notes"
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    with pytest.raises(ParameterError, match="watch takes one model"):
        buzzdask.watch(
            one_file,
            [tiny_model],
            output=tmp_path / "watched",
            embedder=str(tiny_embedder),
            progress=False,
        )
    assert not (tmp_path / "watched").exists()


def test_each_head_takes_thresholds_named_for_it(one_file, run, tiny_model, tmp_path):
    """Heads trained apart score on scales of their own: one bare number for both is refused."""
    from tests.model_fixtures import build_tiny_head

    twin = build_tiny_head(tmp_path / "heads" / "model_twin", classes=CLASSES, seed=3)
    models = [tiny_model, twin]
    with pytest.raises(
        ParameterError,
        match=r"'ins_buzz' \(model_tiny and model_twin\).*"
        r"as MODEL/CLASS \(e\.g\. 'model_tiny/ins_buzz'\)",
    ):
        run(one_file, model=models, output=tmp_path / "bare", thresholds={"ins_buzz": 0.4})
    with pytest.raises(ParameterError, match=r"unknown class\(es\) \['model_other/ins_buzz'\]"):
        run(
            one_file, model=models, output=tmp_path / "bare", thresholds={"model_other/ins_buzz": 0}
        )
    assert not (tmp_path / "bare").exists()

    results = run(
        one_file,
        model=models,
        output=tmp_path / "named",
        thresholds={
            "model_tiny/ins_buzz": 0.4,
            "model_twin/ins_buzz": -1.2,
            "model_twin/mech_plane": 2,
        },
    )
    thresholds = {name: buzzdask.open_run(r.output).thresholds for name, r in results.items()}
    assert thresholds == {
        "model_tiny": {"ins_buzz": 0.4},
        "model_twin": {"ins_buzz": -1.2, "mech_plane": 2.0},
    }
    # A resume with other thresholds is told the earlier ones of every head, named so.
    with pytest.raises(OutputConflictError) as refused:
        run(
            one_file,
            model=models,
            output=tmp_path / "named",
            on_conflict="resume",
            thresholds={"model_tiny/ins_buzz": 0.5, "model_twin/ins_buzz": -1.2},
        )
    assert "'model_tiny/ins_buzz': 0.4" in str(refused.value)
    assert "'model_twin/ins_buzz': -1.2, 'model_twin/mech_plane': 2.0" in str(refused.value)
    for name, result in results.items():
        table = result.to_pandas()
        for class_name, value in thresholds[name].items():
            assert (
                table[f"detections_{class_name}"] == (table[f"activation_{class_name}"] > value)
            ).all()
        assert [c for c in table if c.startswith("detections_")] == [
            f"detections_{c}" for c in thresholds[name]
        ], name


def test_threshold_keys_a_class_with_a_slash_and_one_given_twice():
    from buzzdask.thresholds import thresholds_by_model

    models = {"model_a": ["ins_buzz", "bee/fly"], "model_b": ["ins_buzz"]}
    given = {"bee/fly": 1.0, "model_a/ins_buzz": 2.0, "model_b/ins_buzz": 3.0}
    assert thresholds_by_model(given, models) == {
        "model_a": {"bee/fly": 1.0, "ins_buzz": 2.0},
        "model_b": {"ins_buzz": 3.0},
    }
    assert thresholds_by_model({"model_a/bee/fly": 1.0}, models)["model_a"] == {"bee/fly": 1.0}
    with pytest.raises(ParameterError, match=r"given twice for model_a/ins_buzz \(as CLASS and"):
        thresholds_by_model({"ins_buzz": 1.0, "model_a/ins_buzz": 2.0}, {"model_a": ["ins_buzz"]})
    with pytest.raises(ParameterError, match=r"unknown class\(es\) \['/ins_buzz'\]"):
        thresholds_by_model({"/ins_buzz": 1.0}, models)


def test_a_run_of_two_heads_resumes_as_one(one_file, run, make_audio, tiny_model, tmp_path):
    """Both heads' outputs are checked; a chunk one head lacks is scored again for both."""
    from tests.model_fixtures import build_tiny_head

    other = build_tiny_head(tmp_path / "model_other", classes=["ins_buzz", "frog"], seed=1)
    make_audio("b.wav", n_samples=4 * FRAME, seed=1)
    options = {"model": [tiny_model, other], "chunk_seconds": 2.0}
    complete = run(one_file, output=tmp_path / "complete", **options)
    partial = run(one_file, output=tmp_path / "partial", **options)
    # As a kill leaves it: one head's partition of b.wav's last chunk and its journal line lost.
    damaged = partial["model_other"].output
    (damaged / "scores" / "b.wav" / "chunk-000001.parquet").unlink()
    journal = damaged / "journal.jsonl"
    lines = journal.read_text().splitlines()
    kept = [
        line
        for line in lines
        if json.loads(line)["file"] != "b.wav" or json.loads(line)["chunk"] != 1
    ]
    journal.write_text("\n".join(kept) + "\n")
    with pytest.raises(OutputConflictError, match="already holds results"):
        run(one_file, output=tmp_path / "partial", **options)

    resumed = run(one_file, output=tmp_path / "partial", on_conflict="resume", **options)
    for name in ("model_tiny", "model_other"):
        result = resumed[name]
        assert result.ok, result.errors
        assert result.summary["chunks_written"] == 1
        assert result.summary["chunks_skipped_resume"] == 2 + 1
        assert_same_output(result.output, complete[name].output, atol=1e-5)
        assert len(OutputLayout(result.output).read_journal()) == 4

    elsewhere = run(one_file, output=tmp_path / "partial", on_conflict="new", **options)
    assert elsewhere["model_tiny"].output.parent.name.startswith("partial-")
    assert_same_output(elsewhere["model_other"].output, complete["model_other"].output, atol=1e-5)
