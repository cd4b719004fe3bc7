"""Re-scoring kept embeddings on real parts: ffmpeg, a LocalCluster, tiny real SavedModels.

An analysis keeps its embeddings (``keep_embeddings``); ``rescore`` applies other heads to the
store without the audio and must write what a fresh analysis with those heads writes: the same
partitions, journal and metadata, with resume, conflicts and errors alike. Every comparison is
with an independent run, never with the code under test's own idea of the answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import get_task_stream

import buzzdask
from buzzdask import InputError, ModelError, OutputConflictError
from buzzdask.cli import EXIT_ERROR, EXIT_OK, main
from buzzdask.models import resolve_embedder
from buzzdask.store import EmbeddingStore, file_sha256
from buzzdask.write import PARTITION_GLOB, OutputLayout
from tests.conftest import (
    BUZZDASK,
    MidRunKiller,
    assert_same_frames,
    kill_client_mid_run,
    requires_ffmpeg,
    write_audio,
    write_wav,
)
from tests.test_analyze import KILL_CHUNKS, KILL_PACING

pytestmark = requires_ffmpeg
FRAME = 15360  # samples in one 0.96 s frame at 16 kHz
CHUNK_S = 2.0  # two frames a chunk
NEW_CLASSES = ["ins_buzz", "frog"]  # the new head's: other classes than the kept run's model


@pytest.fixture(scope="module")
def new_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another head on the same embedder, with its own weights and classes."""
    from tests.model_fixtures import build_tiny_head

    root = tmp_path_factory.mktemp("new_head")
    return build_tiny_head(root / "model_new", classes=NEW_CLASSES, seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, dask_client, tiny_embedder, tiny_model, new_head):
    """Three recordings (WAV, 44.1 kHz stereo FLAC, MP3), analysed once keeping the embeddings,
    and a fresh analysis of the same audio with the new head: what a re-scoring must equal."""
    root = tmp_path_factory.mktemp("rescore")
    audio = root / "audio"
    write_audio(audio, "site1/a.wav", n_samples=6 * FRAME + 100)  # 3 chunks
    write_audio(audio, "site2/b.flac", n_samples=4 * 44100 + 9, rate=44100, channels=2, seed=1)
    write_audio(audio, "c.mp3", n_samples=5 * FRAME, seed=2)  # a duration estimate only
    options = {
        "client": dask_client,
        "embedder": str(tiny_embedder),
        "chunk_seconds": CHUNK_S,
        "progress": False,
    }
    kept = buzzdask.analyze(
        audio, tiny_model, output=root / "kept", keep_embeddings=True, **options
    )
    fresh = buzzdask.analyze(audio, new_head, output=root / "fresh", **options)
    assert kept.ok and fresh.ok, (kept.errors, fresh.errors)
    return SimpleNamespace(
        root=root,
        audio=audio,
        store=root / "kept" / "embeddings",
        kept=kept,
        fresh=fresh,
        options=options,
    )


def rescore(store: Path, model, output: Path, client, embedder: Path, **options):
    options.setdefault("progress", False)
    return buzzdask.rescore(
        store, model, output=output, client=client, embedder=str(embedder), **options
    )


def assert_same_output(actual: Path, expected: Path, *, atol: float = 1e-4) -> None:
    """Partition by partition: the same files, chunks, rows and times; activations to ``atol``.

    The journals name the same chunks with the same frames.
    """
    got, want = OutputLayout(actual), OutputLayout(expected)
    # Partitions only: a worker killed while writing one may leave a hidden temporary file
    # beside it (that readers skip and a resume removes).
    got_parts = sorted(p.relative_to(got.scores) for p in got.scores.rglob(PARTITION_GLOB))
    want_parts = sorted(p.relative_to(want.scores) for p in want.scores.rglob(PARTITION_GLOB))
    assert got_parts == want_parts and want_parts
    for relative in want_parts:
        frame = pd.read_parquet(got.scores / relative)
        reference = pd.read_parquet(want.scores / relative)
        assert list(frame.columns) == list(reference.columns)
        pd.testing.assert_frame_equal(
            frame[["file", "start", "end"]], reference[["file", "start", "end"]], check_exact=True
        )
        activations = [c for c in reference.columns if c.startswith("activation_")]
        assert frame[activations].dtypes.eq(np.float32).all()
        np.testing.assert_allclose(
            frame[activations].to_numpy(), reference[activations].to_numpy(), atol=atol, rtol=0
        )
    frames = {key: entry["frames"] for key, entry in got.read_journal().items()}
    assert frames == {key: entry["frames"] for key, entry in want.read_journal().items()}


def test_rescore_equals_a_fresh_analysis(corpus, new_head, dask_client, tiny_embedder, tmp_path):
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in corpus.store.rglob("*")}
    away = corpus.audio.rename(corpus.root / "audio_away")  # no audio: the store is enough
    try:
        with get_task_stream(dask_client) as stream:
            result = rescore(corpus.store, new_head, tmp_path / "re", dask_client, tiny_embedder)
    finally:
        away.rename(corpus.audio)
    assert isinstance(result, buzzdask.AnalysisResult)
    assert result.ok, result.errors
    assert_same_output(result.output, corpus.fresh.output)
    assert_same_frames(result.to_pandas(), corpus.fresh.to_pandas())
    # Every chunk came from the store: nothing was decoded or embedded.
    summary = result.summary
    assert summary["chunks_written"] == summary["chunks_from_store"] == 3 + 2 + 3
    assert summary["frames"] == corpus.fresh.summary["frames"] == 6 + 4 + 5
    assert sum(s["frames_scored"] for s in summary["scorers"]) == summary["frames"]
    assert sum(s["frames_embedded"] for s in summary["scorers"]) == 0
    # Short chunks are read back several to a task, as short recordings are decoded.
    loads = [task for task in stream.data if str(task["key"]).startswith("load-")]
    assert 1 <= len(loads) < summary["chunks_from_store"]
    # What an analysis writes: metadata of the new head, the errors table, the journal.
    run = buzzdask.open_run(result.output)
    assert run.complete and run.classes == tuple(NEW_CLASSES)
    metadata = run.metadata
    expected = corpus.fresh.metadata
    assert metadata["model"]["sha256"] == expected["model"]["sha256"]
    assert metadata["model"]["name"] == "model_new"
    assert metadata["fingerprint"]["model_sha256"] == expected["fingerprint"]["model_sha256"]
    for key in ("frame_hop_s", "frame_length_s", "chunk_seconds", "sample_rate", "classes"):
        assert metadata[key] == expected[key], key
    embedder = resolve_embedder("yamnet_k2", handle=str(tiny_embedder))
    store = EmbeddingStore(corpus.store, embedder=embedder, spec=embedder.frame_spec())
    assert metadata["embeddings"] == str(store.directory) and metadata["ffmpeg"] is None
    assert pd.read_parquet(result.output / "errors.parquet").empty
    assert len(dd.read_parquet(result.dataset).compute()) == summary["frames"]
    assert run.recordings() == ["c.mp3", "site1/a.wav", "site2/b.flac"]
    # Named from the audio's folder, not the store's: start times come from its metadata.
    assert run.input_root == corpus.audio and metadata["inputs"]["store"] == str(store.directory)
    # The store is read, never written: its catalog does not grow with each re-scoring.
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in corpus.store.rglob("*")} == before


def test_rescore_on_its_own_local_cluster(corpus, new_head, tiny_embedder, tmp_path, capfd):
    """Without a client, a re-scoring runs on a local cluster of threads in this process: the
    same results, each log line once, and this process's stderr still its own."""
    with dask.config.set({"buzzdask.local-cluster.dashboard-address": ":0"}):
        result = rescore(corpus.store, new_head, tmp_path / "re", None, tiny_embedder)
    assert result.ok, result.errors
    assert_same_output(result.output, corpus.fresh.output)
    log = (result.output / "buzzdask.log").read_text().splitlines()
    scored = [line for line in log if "buzzdask: scoring " in line]
    assert len(scored) == len(set(scored)) == corpus.kept.summary["chunks_written"]
    assert all("[worker" not in line for line in log)
    print("still here", file=sys.stderr)
    assert "still here" in capfd.readouterr().err


def test_rescore_with_numpy_heads_needs_no_tensorflow(corpus, new_head, tiny_embedder, tmp_path):
    """A head with its NumPy weights (as ``buzzdask train`` writes them) re-scores without
    TensorFlow ever being imported, to the numbers its SavedModel gives."""
    import tensorflow as tf

    from buzzdask.models import save_head_weights

    head = tmp_path / "model_new"
    shutil.copytree(new_head, head)
    module = tf.saved_model.load(str(head))
    save_head_weights(head, [(module.kernel.numpy(), module.bias.numpy(), "linear")])
    script = (
        "import sys, buzzdask\n"
        "buzzdask.rescore(sys.argv[1], sys.argv[2], output=sys.argv[3], embedder=sys.argv[4],"
        " progress=False)\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    )
    output = tmp_path / "re"
    env = {**os.environ, "DASK_BUZZDASK__LOCAL_CLUSTER__DASHBOARD_ADDRESS": ":0"}
    command = [sys.executable, "-c", script, corpus.store, head, output, tiny_embedder]
    done = subprocess.run([str(c) for c in command], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_output(output, corpus.fresh.output, atol=1e-5)
    metadata = json.loads((output / "buzzdask.json").read_text())
    assert metadata["summary"]["scorers"][0]["device"] == "CPU (NumPy heads)"


def test_a_resume_keeps_the_embeddings_as_the_run_did(corpus, tiny_model, tmp_path):
    """A resume without --keep-embeddings left the store short of every chunk it did (and
    the output no longer named it), one with it added a store short of the earlier chunks:
    both refused before any work, naming the earlier way."""
    audio = corpus.audio / "site1"
    kept, plain = tmp_path / "kept", tmp_path / "plain"
    options = {**corpus.options, "on_conflict": "resume"}
    assert buzzdask.analyze(audio, tiny_model, output=kept, keep_embeddings=True, **options).ok
    assert buzzdask.analyze(audio, tiny_model, output=plain, **options).ok
    before = {path: path.stat().st_mtime_ns for path in kept.rglob("*")}
    with pytest.raises(
        OutputConflictError,
        match=r"keep_embeddings: True before, False now\); .*keep_embeddings=True",
    ):
        buzzdask.analyze(audio, tiny_model, output=kept, **options)
    assert {path: path.stat().st_mtime_ns for path in kept.rglob("*")} == before
    added = [
        *("analyze", str(audio), "--model", str(tiny_model), "--output", str(plain)),
        *("--embedder", str(options["embedder"]), "--resume", "--keep-embeddings"),
        *("--chunk-seconds", str(options["chunk_seconds"]), "--no-progress"),
    ]
    # A process of its own: main() here would set up this process's console for every test.
    done = subprocess.run([BUZZDASK, *added], capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_ERROR
    err = done.stderr
    assert "keep_embeddings: False before, True now" in err and "without --keep-embeddings" in err


def test_rescore_takes_the_embedder_and_hop_the_store_records(
    corpus, new_head, tiny_model, dask_client, tiny_embedder, tmp_path
):
    """No embedder given: the store's record of its own, never loaded (so no TF Hub on an
    offline node, whatever the configured handle), and its frame hop."""
    options = {**corpus.options, "frame_hop_s": 0.48}
    audio = corpus.audio / "site1"
    kept = tmp_path / "kept"
    assert buzzdask.analyze(audio, tiny_model, output=kept, keep_embeddings=True, **options).ok
    fresh = buzzdask.analyze(audio, new_head, output=tmp_path / "fresh", **options)
    other_embedder = tmp_path / "model_vggish"
    shutil.copytree(new_head, other_embedder)
    config_path = other_embedder / "config_model.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "embeddername": "vggish"}))
    with dask.config.set({"buzzdask.embedders.yamnet_k2.handle": str(tmp_path / "nowhere")}):
        result = buzzdask.rescore(
            kept, new_head, output=tmp_path / "re", client=dask_client, progress=False
        )
        with pytest.raises(ModelError, match="model_vggish is a head on embedder 'vggish', not"):
            buzzdask.rescore(kept, other_embedder, output=tmp_path / "no", client=dask_client)
    assert result.ok, result.errors
    assert_same_output(result.output, fresh.output)
    ours = resolve_embedder("yamnet_k2", handle=str(tiny_embedder)).sha256
    assert result.metadata["frame_hop_s"] == 0.48
    assert result.metadata["fingerprint"]["embedder_sha256"] == ours


def test_rescore_with_two_heads(corpus, new_head, tiny_model, dask_client, tiny_embedder, tmp_path):
    """Both heads score the stored embeddings: each output equals that head's own analysis."""
    results = rescore(
        corpus.store, [tiny_model, new_head], tmp_path / "re", dask_client, tiny_embedder
    )
    assert set(results) == {"model_tiny", "model_new"}
    for name, reference in [("model_tiny", corpus.kept), ("model_new", corpus.fresh)]:
        result = results[name]
        assert result.ok, result.errors
        assert result.output == tmp_path / "re" / name
        assert_same_output(result.output, reference.output)
        assert buzzdask.open_run(result.output).complete
    assert (tmp_path / "re" / "buzzdask.log").is_file()


def test_store_of_another_embedder_hop_or_preprocessing_is_refused(
    corpus, new_head, dask_client, tiny_embedder, tmp_path
):
    """Refused before any work, naming what the store holds: by the embedder's content hash,
    the preprocessing and the frame hop; and a directory that holds no store."""
    from tests.model_fixtures import build_tiny_yamnet

    ours = resolve_embedder("yamnet_k2", handle=str(tiny_embedder)).sha256
    assert ours is not None
    # Same interface, same framing, other weights: only its content hash tells.
    other = build_tiny_yamnet(tmp_path / "other_yamnet", patch_hop_seconds=0.96, seed=1)
    theirs = resolve_embedder("yamnet_k2", handle=str(other)).sha256
    assert theirs is not None and theirs != ours
    output = tmp_path / "out"
    with pytest.raises(ModelError) as refused:
        rescore(corpus.store, new_head, output, dask_client, other)
    message = str(refused.value)
    assert f"holds embeddings of embedder yamnet_k2 (sha256 {ours[:12]}" in message
    assert f"not of embedder yamnet_k2 (sha256 {theirs[:12]}" in message

    with pytest.raises(ModelError, match=r"hop 0\.96 s.*, not of .*hop 0\.48 s"):
        rescore(corpus.store, new_head, output, dask_client, tiny_embedder, frame_hop_s=0.48)

    # A store made with other preprocessing: its settings (and so its directory) differ.
    copy = tmp_path / "other_preprocessing"
    (original,) = [p for p in corpus.store.iterdir() if p.is_dir()]
    shutil.copytree(original, copy / "0123456789abcdef")
    settings_path = copy / "0123456789abcdef" / "settings.json"
    settings = json.loads(settings_path.read_text())
    settings["preprocessing"] = "first channel, linear resampling"
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(ModelError, match=r"first channel, linear resampling.*, not of "):
        rescore(copy, new_head, output, dask_client, tiny_embedder)

    with pytest.raises(ModelError, match=r"holds no embeddings an analysis stored"):
        rescore(corpus.audio, new_head, output, dask_client, tiny_embedder)
    with pytest.raises(InputError, match=r"no_such_store does not exist: give the output"):
        rescore(tmp_path / "no_such_store", new_head, output, dask_client, tiny_embedder)
    assert not output.exists()


def test_missing_or_damaged_part_fails_its_file_only(
    corpus, new_head, dask_client, tiny_embedder, tmp_path
):
    """A part removed from the store (found when the run is planned) or cut short (found when
    it is read): its file is reported, stage "load", and the other files finish."""
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    a_sha = file_sha256(corpus.audio / "site1" / "a.wav")
    (removed,) = store.glob(f"*/{a_sha}/part-000000002-000002.parquet")  # chunk 1: frames 2, 3
    removed.unlink()
    b_sha = file_sha256(corpus.audio / "site2" / "b.flac")
    (damaged,) = store.glob(f"*/{b_sha}/part-000000000-000002.parquet")  # chunk 0
    damaged.write_bytes(damaged.read_bytes()[:100])
    result = rescore(store, new_head, tmp_path / "re", dask_client, tiny_embedder)
    errors = result.errors.set_index("file").sort_index()
    assert list(errors.index) == ["site1/a.wav", "site2/b.flac"], errors
    assert list(errors["stage"]) == ["load", "load"]
    assert list(errors["chunk"]) == [1, 0]
    assert "no longer in" in errors.loc["site1/a.wav", "reason"]
    assert result.summary["files_failed"] == 2 and result.summary["files_done"] == 1
    on_disk = pd.read_parquet(result.output / "errors.parquet")
    assert sorted(on_disk["file"]) == ["site1/a.wav", "site2/b.flac"]
    frame = result.to_pandas()
    fresh = corpus.fresh.to_pandas()
    assert_same_frames(
        frame[frame.file == "c.mp3"].reset_index(drop=True),
        fresh[fresh.file == "c.mp3"].reset_index(drop=True),
    )
    # The frames of the chunks that failed are not invented.
    a_starts = set(frame.start[frame.file == "site1/a.wav"].round(2))
    assert not a_starts & {1.92, 2.88}
    b_starts = set(frame.start[frame.file == "site2/b.flac"].round(2))
    assert not b_starts & {0.0, 0.96}


def test_store_of_a_stopped_analysis_is_not_rescored_as_whole(
    corpus, new_head, dask_client, tiny_embedder, tmp_path
):
    """What an analysis killed before a.wav's last chunk leaves: its part and catalog line
    missing. The re-scoring scores what is there and reports the file (stage "load"), so the
    run and its buzzr export do not pass it off as whole. Given the store's own folder, as
    the re-scoring records it, the store is found."""
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    (kept,) = [p for p in store.iterdir() if p.is_dir()]
    a_sha = file_sha256(corpus.audio / "site1" / "a.wav")
    (last,) = kept.glob(f"{a_sha}/part-000000004-*.parquet")  # chunk 2: frames 4, 5
    last.unlink()
    catalog = kept / "catalog.jsonl"
    lines = catalog.read_text().splitlines(keepends=True)
    entries = [json.loads(line) for line in lines]
    gone = [(e["file"], e["chunk"]) == ("site1/a.wav", 2) for e in entries]
    assert sum(gone) == 1
    catalog.write_text("".join(line for line, drop in zip(lines, gone, strict=True) if not drop))
    result = rescore(kept, new_head, tmp_path / "re", dask_client, tiny_embedder)
    assert result.metadata["inputs"]["store"] == str(kept)
    (row,) = result.errors.itertuples()
    assert (row.file, row.stage, row.kept) == ("site1/a.wav", "load", False)
    assert "its frames from 4 on were never stored" in row.reason
    assert result.summary["files_failed"] == 1
    frame = result.to_pandas()
    assert sorted(frame.start[frame.file == "site1/a.wav"].round(2)) == [0.0, 0.96, 1.92, 2.88]
    exported = buzzdask.export(result.output, format="buzzdetect").files
    assert sorted(p.name for p in exported) == [
        "a_buzzpart.csv",
        "b_buzzdetect.csv",
        "c_buzzdetect.csv",
    ]


def test_store_damaged_where_it_is_first_read(
    corpus, new_head, dask_client, tiny_embedder, tmp_path
):
    """The part the store's embedding size is read from is damaged: its chunk fails, named by
    its path with the way to store it anew, and every other chunk is scored."""
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    (kept,) = [p for p in store.iterdir() if p.is_dir()]
    first = next(kept.glob("*/part-*.parquet"))  # what EmbeddingStore.embedding_size reads
    first.write_bytes(b"not parquet")
    result = rescore(store, new_head, tmp_path / "re", dask_client, tiny_embedder)
    (reason,) = result.errors["reason"]
    assert f"stored embeddings {first} cannot be read" in reason
    assert "--keep-embeddings" in reason
    assert result.summary["chunks_written"] == corpus.fresh.summary["chunks_written"] - 1


def test_store_at_two_hops_rescores_either_offline(
    corpus, new_head, tiny_model, dask_client, tmp_path
):
    """Analyses at two hops kept into one store: the hop chooses the set, its own record still
    gives the embedder (never loaded: no TF Hub), and a resume finds the same settings."""
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    options = {**corpus.options, "frame_hop_s": 0.48}
    half = buzzdask.analyze(
        corpus.audio / "site1",
        tiny_model,
        output=tmp_path / "half",
        keep_embeddings=store,
        **options,
    )
    assert half.ok, half.errors
    output = tmp_path / "re"
    nowhere = {"buzzdask.embedders.yamnet_k2.handle": str(tmp_path / "nowhere")}
    run = {"output": output, "client": dask_client, "progress": False}
    with dask.config.set(nowhere):
        with pytest.raises(ModelError, match=r"frame hops 0\.48 s and 0\.96 s: choose one"):
            buzzdask.rescore(store, new_head, **run)
        with pytest.raises(ModelError, match=r"0\.48 s and 0\.96 s, none at 0\.72 s"):
            buzzdask.rescore(store, new_head, frame_hop_s=0.72, **run)
        result = buzzdask.rescore(store, new_head, frame_hop_s=0.96, **run)
        assert result.ok, result.errors
        assert_same_output(output, corpus.fresh.output)
        again = buzzdask.rescore(store, new_head, frame_hop_s=0.96, on_conflict="resume", **run)
    assert again.ok and again.summary["chunks_written"] == 0


def test_audio_stored_under_two_names_is_rescored_once(
    corpus, new_head, tiny_model, dask_client, tiny_embedder, tmp_path, caplog
):
    """A folder analysed on its own, then with its parent (a.wav, then site1/a.wav): the same
    audio under two names in the catalog is scored once, under its latest name."""
    store = tmp_path / "store"
    for audio in (corpus.audio / "site1", corpus.audio):
        kept = buzzdask.analyze(
            audio,
            tiny_model,
            output=tmp_path / audio.name,
            keep_embeddings=store,
            **corpus.options,
        )
        assert kept.ok, kept.errors
    with caplog.at_level(logging.WARNING, logger="buzzdask.store"):
        result = rescore(store, new_head, tmp_path / "re", dask_client, tiny_embedder)
    assert "holds the audio of site1/a.wav under earlier names too (a.wav)" in caplog.text
    assert result.ok, result.errors
    assert sorted(result.to_pandas().file.unique()) == ["c.mp3", "site1/a.wav", "site2/b.flac"]
    assert_same_output(result.output, corpus.fresh.output)


def test_a_store_set_copied_alone_under_another_name_says_so(
    corpus, new_head, dask_client, tiny_embedder, tmp_path
):
    # It said it held embeddings "of embedder X (...), not of embedder X (...)", twice alike.
    (set_folder,) = [path.parent for path in corpus.store.glob("*/catalog.jsonl")]
    shutil.copytree(set_folder, tmp_path / "mine" / "justset")
    with pytest.raises(ModelError) as refused:
        rescore(
            tmp_path / "mine" / "justset", new_head, tmp_path / "re", dask_client, tiny_embedder
        )
    assert str(refused.value) == (
        f"{tmp_path / 'mine' / 'justset'} holds these embeddings under another folder name: "
        f"rename it {set_folder.name} (what a store names it), or copy the store's whole folder "
        "(embeddings/)"
    )


def test_two_seasons_sharing_a_store_rescore_each_its_own_audio(
    corpus, tiny_model, dask_client, tiny_embedder, tmp_path, caplog
):
    """A second season analysed into the first's store (--keep-embeddings DIR), its files
    named as the first's (siteA/a1.wav, other audio): each season's re-scoring is its own
    audio. The first's gave the second's frames under its name, without a word."""
    for season, samples in (("2024", 5 * FRAME), ("2025", 3 * FRAME)):
        write_audio(tmp_path / season, "siteA/a1.wav", n_samples=samples, seed=int(season))
    store = tmp_path / "out2024" / "embeddings"
    analysed = {
        season: buzzdask.analyze(
            tmp_path / season,
            tiny_model,
            output=tmp_path / f"out{season}",
            keep_embeddings=True if season == "2024" else store,
            **corpus.options,
        )
        for season in ("2024", "2025")
    }
    assert all(result.ok for result in analysed.values())
    for season, result in analysed.items():
        with caplog.at_level(logging.WARNING, logger="buzzdask.store"):
            again = rescore(
                result.output, tiny_model, tmp_path / f"re{season}", dask_client, tiny_embedder
            )
        assert again.ok, again.errors
        assert_same_output(again.output, result.output, atol=1e-6)
    # The store given alone: its own analysis' audio, the other named.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="buzzdask.store"):
        alone = rescore(store, tiny_model, tmp_path / "re_store", dask_client, tiny_embedder)
    assert_same_output(alone.output, analysed["2024"].output, atol=1e-6)
    said = f"siteA/a1.wav: {tmp_path / '2024' / 'siteA' / 'a1.wav'}, not {tmp_path / '2025'}"
    assert "holds different audio under one name, stored by analyses of different" in caplog.text
    assert said in caplog.text


def test_copies_of_one_recording_in_an_analysis_are_each_rescored(
    corpus, new_head, tiny_model, dask_client, tiny_embedder, tmp_path, caplog
):
    """An SD card dumped in two folders: the analysis gives each copy; so does its re-scoring
    (it gave one of them, the one whose chunk the catalog named last)."""
    audio = tmp_path / "audio"
    for name in ("site1/a.wav", "backup/a.wav", "b.wav"):
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus.audio / "site1" / "a.wav", audio / name)
    kept = buzzdask.analyze(
        audio, tiny_model, output=tmp_path / "kept", keep_embeddings=True, **corpus.options
    )
    assert kept.ok, kept.errors
    with caplog.at_level(logging.WARNING, logger="buzzdask.store"):
        result = rescore(
            tmp_path / "kept" / "embeddings", new_head, tmp_path / "re", dask_client, tiny_embedder
        )
    assert "under earlier names" not in caplog.text
    assert result.ok, result.errors
    frames = result.to_pandas()
    assert sorted(frames.file.unique()) == ["b.wav", "backup/a.wav", "site1/a.wav"]
    assert frames.groupby("file").size().nunique() == 1  # each whole


def test_resume_and_conflicts(corpus, new_head, dask_client, tiny_embedder, tmp_path):
    output = tmp_path / "re"
    first = rescore(corpus.store, new_head, output, dask_client, tiny_embedder)
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    with pytest.raises(OutputConflictError, match="already holds results"):
        rescore(corpus.store, new_head, output, dask_client, tiny_embedder)
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before

    # Simulate a kill: b.flac's partitions and journal lines are lost.
    for path in (first.dataset / "site2" / "b.flac").iterdir():
        path.unlink()
    journal = output / "journal.jsonl"
    kept = [line for line in journal.read_text().splitlines() if "b.flac" not in line]
    journal.write_text("\n".join(kept) + "\n")
    resumed = rescore(
        corpus.store, new_head, output, dask_client, tiny_embedder, on_conflict="resume"
    )
    assert resumed.ok, resumed.errors
    assert resumed.summary["chunks_written"] == 2
    assert resumed.summary["chunks_skipped_resume"] == 3 + 3
    assert_same_output(output, corpus.fresh.output)
    # The store copied elsewhere (to project space, another machine with the results): the
    # same embeddings, resumed from (its path differed: "settings differ", and the way offered
    # was an --embedder that is no embedder).
    copied = tmp_path / "project" / "embeddings"
    shutil.copytree(corpus.store, copied)
    again = rescore(copied, new_head, output, dask_client, tiny_embedder, on_conflict="resume")
    assert again.ok and again.summary["chunks_written"] == 0
    assert_same_output(output, corpus.fresh.output)

    with pytest.raises(OutputConflictError, match="thresholds"):
        rescore(
            corpus.store,
            new_head,
            output,
            dask_client,
            tiny_embedder,
            on_conflict="resume",
            thresholds={"frog": 0.5},
        )
    elsewhere = rescore(
        corpus.store, new_head, output, dask_client, tiny_embedder, on_conflict="new"
    )
    assert elsewhere.output != output and elsewhere.output.name.startswith("re-")
    assert_same_output(elsewhere.output, corpus.fresh.output)


def test_outputs_of_the_other_kind_of_run_are_named(
    corpus, new_head, tiny_model, dask_client, tiny_embedder, tmp_path
):
    """A several-models output given whole; an analysis' output resumed by a re-scoring, and a
    re-scoring's by an analysis: each refusal says what the output is, not 'settings differ'."""
    both = buzzdask.analyze(
        corpus.audio / "site1", [tiny_model, new_head], output=tmp_path / "both", **corpus.options
    )
    assert all(result.ok for result in both.values())
    with pytest.raises(OutputConflictError, match=r"holds buzzdask outputs \(model_new, "):
        rescore(corpus.store, new_head, tmp_path / "both", dask_client, tiny_embedder)
    with pytest.raises(OutputConflictError, match="holds an analysis's results, which only an"):
        rescore(
            corpus.store,
            new_head,
            tmp_path / "both" / "model_new",
            dask_client,
            tiny_embedder,
            on_conflict="resume",
        )
    rescored = rescore(corpus.store, new_head, tmp_path / "re", dask_client, tiny_embedder)
    assert rescored.ok
    with pytest.raises(OutputConflictError, match="holds a re-scoring's results, which only a"):
        buzzdask.analyze(
            corpus.audio, new_head, output=tmp_path / "re", on_conflict="resume", **corpus.options
        )


def test_analysis_reads_what_the_store_holds(corpus, tiny_model, tmp_path):
    """Analysing again with the same store decodes only what it lacks: here one new file."""
    audio = tmp_path / "audio"
    shutil.copytree(corpus.audio, audio)  # the store knows audio by content, not by path
    write_audio(audio, "new.wav", n_samples=3 * FRAME, seed=7)
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    again = buzzdask.analyze(
        audio, tiny_model, output=tmp_path / "again", keep_embeddings=store, **corpus.options
    )
    assert again.ok, again.errors
    summary = again.summary
    assert summary["chunks_from_store"] == corpus.kept.summary["chunks_written"] == 8
    assert summary["chunks_written"] == 8 + 2
    fresh = buzzdask.analyze(audio, tiny_model, output=tmp_path / "fresh", **corpus.options)
    assert_same_frames(again.to_pandas(), fresh.to_pandas())
    log = (again.output / "buzzdask.log").read_text()
    assert "reading stored embeddings of site1/a.wav" in log
    assert "decoding site1/a.wav" not in log and "decoding new.wav" in log
    # The new file's embeddings were kept too: a third run reads every chunk from the store.
    third = buzzdask.analyze(
        audio, tiny_model, output=tmp_path / "third", keep_embeddings=store, **corpus.options
    )
    assert third.summary["chunks_from_store"] == third.summary["chunks_written"] == 10
    assert_same_frames(third.to_pandas(), fresh.to_pandas())


def test_analysis_decodes_what_a_damaged_store_cannot_give(corpus, tiny_model, tmp_path):
    """A damaged part does not fail audio that is at hand: that chunk is decoded, and kept anew."""
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    a_sha = file_sha256(corpus.audio / "site1" / "a.wav")
    (damaged,) = store.glob(f"*/{a_sha}/part-000000000-000002.parquet")  # chunk 0 of a.wav
    damaged.write_bytes(damaged.read_bytes()[:100])
    again = buzzdask.analyze(
        corpus.audio, tiny_model, output=tmp_path / "again", keep_embeddings=store, **corpus.options
    )
    assert again.ok, again.errors
    assert again.summary["chunks_from_store"] == corpus.kept.summary["chunks_written"] - 1
    log = (again.output / "buzzdask.log").read_text()
    assert "site1/a.wav [0.00–1.92 s]: its stored embeddings cannot be read" in log
    assert_same_frames(again.to_pandas(), corpus.kept.to_pandas())
    pd.read_parquet(damaged)  # written again whole


def test_store_kept_by_analyses_of_two_chunk_lengths(
    corpus, tiny_model, new_head, dask_client, tiny_embedder, tmp_path
):
    """A second analysis keeps into the store with 1-frame chunks, and is cut short for one
    file: a re-scoring takes each file's chunks from one analysis, every frame once."""
    store = tmp_path / "store"
    shutil.copytree(corpus.store, store)
    (catalog,) = store.glob("*/catalog.jsonl")
    first = len(catalog.read_text().splitlines())
    assert first == 3 + 2 + 3
    options = {**corpus.options, "chunk_seconds": 1.0}
    again = buzzdask.analyze(
        corpus.audio, tiny_model, output=tmp_path / "again", keep_embeddings=store, **options
    )
    assert again.summary["chunks_from_store"] == again.summary["chunks_written"] == 15
    lines = catalog.read_text().splitlines()
    # As if killed: of a.wav's 1-frame chunks, only the first two were catalogued.
    cut = [json.loads(line) for line in lines[first:]]
    dropped = [i for i, e in enumerate(cut) if e["file"] == "site1/a.wav" and e["chunk"] >= 2]
    assert len(dropped) == 4
    catalog.write_text(
        "".join(line + "\n" for i, line in enumerate(lines) if i - first not in dropped)
    )

    result = rescore(store, new_head, tmp_path / "re", dask_client, tiny_embedder)
    assert result.ok, result.errors
    frame = result.to_pandas()
    assert not frame.duplicated(["file", "start"]).any()
    assert_same_frames(frame, corpus.fresh.to_pandas())
    chunks = {
        name: len(list((result.dataset / name).glob("chunk-*.parquet")))
        for name in ("site1/a.wav", "site2/b.flac", "c.mp3")
    }
    # a.wav: the complete 2-frame chunks; the others: the latest analysis' 1-frame chunks.
    assert chunks == {"site1/a.wav": 3, "site2/b.flac": 4, "c.mp3": 5}


# -- training and analysis share the store ---------------------------------------------------

RATE = 16000


def labelled_recording(seed: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """9 s at 16 kHz: quiet, a buzz-like tone, quiet, tone, quiet; the tones' (start, end)."""
    rng = np.random.default_rng(seed)
    pieces, tones, at = [], [], 0.0
    for kind, seconds in [("quiet", 2), ("tone", 2), ("quiet", 2), ("tone", 2), ("quiet", 1)]:
        t = np.arange(seconds * RATE) / RATE
        quiet = 0.003 * rng.standard_normal(len(t))
        if kind == "tone":
            pieces.append(0.3 * np.sign(np.sin(2 * np.pi * (200 + 40 * seed) * t)) + quiet)
            tones.append((at, at + seconds))
        else:
            pieces.append(quiet)
        at += seconds
    return np.clip(np.concatenate(pieces), -0.99, 0.99), tones


def test_training_and_analysis_share_the_store(
    dask_client, tiny_embedder, tiny_model, tmp_path, caplog
):
    """What an analysis kept, a training does not embed again; and the reverse."""
    labelled, ambient, ambient2 = (tmp_path / name for name in ("labelled", "ambient", "ambient2"))
    for folder in (labelled, ambient, ambient2):
        folder.mkdir()
    rows = []
    for seed, group in enumerate(["siteA", "siteB"]):
        samples, tones = labelled_recording(seed)
        write_wav(labelled / f"{group}.wav", samples, RATE)
        rows += [
            {"file": f"{group}.wav", "start": s, "end": e, "label": "ins_buzz", "group": group}
            for s, e in tones
        ]
    labels = pd.DataFrame(rows)
    rng = np.random.default_rng(5)
    write_wav(ambient / "quiet.wav", 0.003 * rng.standard_normal(6 * RATE), RATE)
    write_wav(ambient2 / "quiet2.wav", 0.003 * rng.standard_normal(5 * RATE), RATE)
    cache = tmp_path / "embedding-cache"
    analysis = {"client": dask_client, "embedder": str(tiny_embedder), "progress": False}
    training = {
        "client": dask_client,
        "embedder": str(tiny_embedder),
        "frame_hop_s": 0.96,  # the analysis' frames: a whole frame apart
        "holdout": ["siteB"],
        "unlabeled_ambient": 2,
        "ambient_margin_s": 0.5,
        "epochs": 3,
        "cache_dir": cache,
    }

    kept = buzzdask.analyze(
        [labelled, ambient],
        tiny_model,
        output=tmp_path / "analysis",
        keep_embeddings=cache,
        **analysis,
    )
    assert kept.ok, kept.errors
    first = buzzdask.train(
        labels, labelled, output=tmp_path / "model_1", ambient_dirs=[ambient], **training
    )
    assert first.summary["embedding_cache"] == {
        "frames_cached": first.summary["frames"],
        "frames_embedded": 0,
        "embedder_calls": 0,
    }

    # The reverse: a file the training embedded whole is not decoded by an analysis.
    second = buzzdask.train(
        labels, labelled, output=tmp_path / "model_2", ambient_dirs=[ambient, ambient2], **training
    )
    embedded = second.summary["embedding_cache"]
    assert embedded["frames_cached"] == first.summary["frames"]
    assert embedded["frames_embedded"] == second.summary["frames"] - first.summary["frames"] == 5
    from_cache = buzzdask.analyze(
        ambient2, tiny_model, output=tmp_path / "from_cache", keep_embeddings=cache, **analysis
    )
    assert from_cache.summary["chunks_from_store"] == from_cache.summary["chunks_written"] == 1
    fresh = buzzdask.analyze(ambient2, tiny_model, output=tmp_path / "fresh", **analysis)
    assert_same_frames(from_cache.to_pandas(), fresh.to_pandas())
    assert len(fresh.to_pandas()) == 5

    # Damaged parts are frames the cache lacks: embedded again, with a warning, not a crash.
    damaged = list(cache.glob(f"*/{file_sha256(ambient2 / 'quiet2.wav')}/part-*.parquet"))
    assert damaged
    for part in damaged:
        part.write_bytes(b"not parquet")
    with caplog.at_level(logging.WARNING, logger="buzzdask.store"):
        third = buzzdask.train(
            labels,
            labelled,
            output=tmp_path / "model_3",
            ambient_dirs=[ambient, ambient2],
            **training,
        )
    assert third.summary["embedding_cache"]["frames_embedded"] == 5
    assert f"stored embeddings {damaged[0]} cannot be read" in caplog.text


# -- kills -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kill_store(tmp_path_factory, dask_client, tiny_embedder, tiny_model, new_head):
    """Three 30-frame files kept in 1-frame chunks (many tasks), and their uninterrupted
    re-scoring with the new head."""
    root = tmp_path_factory.mktemp("kill_store")
    for seed in range(3):
        write_audio(root / "audio", f"f{seed}.wav", n_samples=30 * FRAME, seed=seed)
    kept = buzzdask.analyze(
        root / "audio",
        tiny_model,
        output=root / "kept",
        client=dask_client,
        embedder=str(tiny_embedder),
        chunk_seconds=1.0,
        keep_embeddings=True,
        progress=False,
    )
    assert kept.summary["chunks_written"] == KILL_CHUNKS
    store = root / "kept" / "embeddings"
    reference = rescore(store, new_head, root / "reference", dask_client, tiny_embedder)
    assert reference.ok and reference.summary["frames"] == KILL_CHUNKS
    return store, reference


def assert_each_frame_once(result, reference) -> None:
    frame = result.to_pandas()
    assert not frame.duplicated(["file", "start"]).any()
    assert_same_frames(frame, reference.to_pandas())
    assert_same_output(result.output, reference.output)


def test_worker_killed_mid_rescore_loses_nothing(kill_store, new_head, tiny_embedder, tmp_path):
    """SIGKILL the worker holding the only scorer while it holds score tasks, chunks still to
    write: the scorer is re-created on the live worker (without an embedder), the chunks it
    held are sent again, and the same run writes every frame exactly once."""
    import dask
    from distributed import Client, LocalCluster

    store, reference = kill_store
    with (
        dask.config.set({"buzzdask.cpu-scorer-workers": 1}),
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        target = sorted(client.scheduler_info()["workers"])[0]  # the scorer's
        pid = client.run(os.getpid, workers=[target])[target]

        def in_flight() -> list[str]:
            keys = client.processing(workers=[target])[target]
            return [key for key in keys if key.startswith("score-")]

        with MidRunKiller(
            pid, tmp_path / "out" / "scores", total=KILL_CHUNKS, in_flight=in_flight
        ) as killer:
            result = rescore(
                store, new_head, tmp_path / "out", client, tiny_embedder, **KILL_PACING
            )
    assert killer.kill is not None and killer.kill.tasks
    assert 0 < killer.kill.written < KILL_CHUNKS
    assert result.ok, result.errors
    summary = result.summary
    assert summary["chunks_resent"] >= 1
    assert (summary["scorers_lost"], summary["scorer_restarts"]) == (1, 1)
    assert summary["chunks_from_store"] == summary["chunks_written"] == KILL_CHUNKS
    assert_each_frame_once(result, reference)


def test_client_killed_mid_rescore_resume_completes(
    kill_store, new_head, dask_client, tiny_embedder, tmp_path
):
    """SIGKILL the process running rescore() with chunks journalled and chunks to go; a resume
    finishes the output exactly once, the same as an uninterrupted re-scoring."""
    store, reference = kill_store
    script = (
        "import sys, buzzdask\n"
        "buzzdask.rescore(sys.argv[1], sys.argv[2], output=sys.argv[3], embedder=sys.argv[4],"
        f" progress=False, **{KILL_PACING!r})\n"
    )
    output = tmp_path / "out"
    kill_client_mid_run(
        script, store, new_head, output, tiny_embedder, output=output, total=KILL_CHUNKS
    )
    journaled = len(OutputLayout(output).read_journal())
    assert 1 <= journaled < KILL_CHUNKS

    resumed = rescore(store, new_head, output, dask_client, tiny_embedder, on_conflict="resume")
    assert resumed.ok, resumed.errors
    assert resumed.summary["chunks_skipped_resume"] == journaled
    assert resumed.summary["chunks_written"] == KILL_CHUNKS - journaled
    assert_each_frame_once(resumed, reference)


# -- the command line --------------------------------------------------------------------------


def test_cli_two_models_keep_embeddings_then_rescore(
    corpus, tiny_model, new_head, tiny_embedder, dask_client, tmp_path, capsys
):
    output = tmp_path / "both"
    code = main(
        [
            *("analyze", str(corpus.audio)),
            *("--model", str(tiny_model), "--model", str(new_head)),
            *("--embedder", str(tiny_embedder), "--output", str(output)),
            *("--chunk-seconds", str(CHUNK_S), "--no-progress", "--keep-embeddings"),
        ],
        client=dask_client,
    )
    assert code == EXIT_OK
    printed = capsys.readouterr().out
    assert f"-> {output / 'model_tiny' / 'scores'}" in printed
    assert f"-> {output / 'model_new' / 'scores'}" in printed
    assert sorted(p.name for p in output.iterdir()) == [
        "buzzdask.log",
        "embeddings",
        "model_new",
        "model_tiny",
    ]
    assert_same_output(output / "model_tiny", corpus.kept.output)
    assert_same_output(output / "model_new", corpus.fresh.output)

    code = main(
        [
            # One model's output of the two: the store it recorded. No --embedder: the store's.
            *("rescore", str(output / "model_tiny")),
            *("--model", str(new_head), "--output", str(tmp_path / "re"), "--no-progress"),
        ],
        client=dask_client,
    )
    assert code == EXIT_OK
    assert "3/3 files" in capsys.readouterr().out
    assert_same_output(tmp_path / "re", corpus.fresh.output)


def test_an_output_that_kept_no_embeddings_is_no_store(corpus, tmp_path):
    """Beside another run's store (a project's results/): not taken for this run's."""
    from buzzdask.store import find_store

    shutil.copytree(corpus.fresh.output, tmp_path / "project" / "run1")
    shutil.copytree(corpus.store, tmp_path / "project" / "embeddings")
    with pytest.raises(ModelError, match="holds no embeddings an analysis stored"):
        find_store(tmp_path / "project" / "run1")
    assert find_store(corpus.kept.output) == corpus.store


def test_cli_rescore_prints_no_chunk_lines_without_v(corpus, new_head, tmp_path):
    """Its workers are threads of the command's process, where loading a SavedModel head without
    a fingerprint (one saved by a TensorFlow older than 2.12) makes TensorFlow log, through
    ``logging.basicConfig``: the chunks' INFO lines stay in the run's log all the same."""
    head = tmp_path / "model_unprinted"
    shutil.copytree(new_head, head)
    (head / "fingerprint.pb").unlink()
    done = subprocess.run(
        [
            *(BUZZDASK, "rescore", str(corpus.store), "--model", str(head)),
            *("--output", str(tmp_path / "re"), "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "scoring " not in done.stderr and "INFO" not in done.stderr, done.stderr
    assert "buzzdask: scoring " in (tmp_path / "re" / "buzzdask.log").read_text()


def test_cli_rescore_with_a_broken_head_says_so_in_one_line(corpus, new_head, tmp_path):
    """Its workers are threads of the command's process (no --scheduler): the scorer's failure is
    the command's one error line, not Dask's task dump and traceback before it."""
    broken = tmp_path / "model_broken"
    shutil.copytree(new_head, broken)
    config = json.loads((broken / "config_model.json").read_text())
    config["classes"] = [*config["classes"], "extra"]  # the head gives two outputs
    (broken / "config_model.json").write_text(json.dumps(config))
    done = subprocess.run(
        [
            *(BUZZDASK, "rescore", str(corpus.store), "--model", str(broken)),
            *("--output", str(tmp_path / "re"), "--no-progress"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == EXIT_ERROR
    assert "gives 2 outputs but its config lists 3 classes" in done.stderr
    assert "Compute Failed" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_store_keys_audio_by_the_sha256_of_its_bytes(tmp_path):
    """Read block by block into one buffer: a file of several blocks and a partial one, and
    an empty one, hash as hashlib hashes their bytes."""
    content = np.random.default_rng(3).bytes((5 << 19) + 7)  # 2.5 MiB and 7 bytes
    (tmp_path / "audio.bin").write_bytes(content)
    (tmp_path / "empty.bin").write_bytes(b"")
    assert file_sha256(tmp_path / "audio.bin") == hashlib.sha256(content).hexdigest()
    assert file_sha256(tmp_path / "empty.bin") == hashlib.sha256(b"").hexdigest()


def test_the_audio_folder_of_a_store_is_known_only_where_its_catalog_tells_one():
    from buzzdask.rescore import _analysed_root

    def line(name: str, path: str | None) -> dict:
        return {"file": name, **({"path": path} if path is not None else {})}

    one = {"a.wav": [line("a.wav", "/fs/x/a.wav")], "s/b.wav": [line("s/b.wav", "/fs/x/s/b.wav")]}
    assert _analysed_root(one) == "/fs/x"
    assert _analysed_root({"a.wav": [line("a.wav", "/a.wav")]}) == "/"
    # Analysed from two folders (names relative to each), or lines written before paths were:
    # the store's own folder, as before.
    two = {"a.wav": [line("a.wav", "/fs/x/a.wav")], "b.wav": [line("b.wav", "/fs/y/b.wav")]}
    assert _analysed_root(two) is None
    assert _analysed_root({"a.wav": [line("a.wav", None)]}) is None
    assert _analysed_root({"a.wav": [line("a.wav", "/fs/x/other.wav")]}) is None


def test_a_catalog_line_cut_short_loses_only_itself(tiny_embedder, tmp_path):
    """A kill (or a full disk) mid-line: the lines appended after it are read, not glued to it
    and skipped with it (a re-scoring would have lacked those chunks without a word)."""
    from buzzdask.frames import FrameSpec

    embedder = resolve_embedder("yamnet_k2", handle=str(tiny_embedder))
    store = EmbeddingStore(
        tmp_path / "store", embedder=embedder, spec=FrameSpec(16000, 15360, 15360, 240)
    )

    def line(chunk: int) -> dict[str, object]:
        return {
            **{"file": "site/rec.wav", "path": "/audio/site/rec.wav", "sha256": "a" * 64},
            **{"size": 1, "mtime_ns": 1, "duration_s": 30.0, "chunk": chunk},
            **{"first_frame": 10 * chunk, "frames": 10, "frames_per_chunk": 10},
        }

    store.record([line(0)])
    with store.catalog_path.open("a") as catalog:  # killed while it wrote chunk 1's line
        catalog.write(json.dumps(line(1))[:40])
    store.record([line(1)])
    store.record([line(2)])
    assert [entry["chunk"] for entry in store.catalog()["site/rec.wav"]] == [0, 1, 2]
