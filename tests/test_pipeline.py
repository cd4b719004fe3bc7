"""The chunk loop's decisions as plain functions, and its tasks run in this process: no cluster
(the wiring is tested end to end)."""

from __future__ import annotations

import copyreg
import os
import pickle
from dataclasses import dataclass, replace
from pathlib import Path

import ffmpeg
import numpy as np
import pytest

from buzzdask.decode import (
    AudioInfo,
    ChunkPlan,
    DecodedChunk,
    decode_chunk,
    expected_frames,
    plan_chunks,
    probe_audio,
)
from buzzdask.errors import DecodeError, ScorerError
from buzzdask.ffmpeg_tools import find_ffmpeg
from buzzdask.frames import FrameSpec
from buzzdask.ledger import describe
from buzzdask.pipeline import (
    Budget,
    ChunkJob,
    ScorerRef,
    budget_bytes,
    chunk_label,
    chunk_nbytes,
    decode_several,
    decode_slots,
    free_scorers,
    group_bytes,
    next_group,
    probe_task,
    score_picked,
    short_chunks,
    split_failed_group,
    useful_bytes,
)
from buzzdask.scorers import decode_workers
from buzzdask.store import StoredRef
from tests.conftest import requires_ffmpeg

SPEC = FrameSpec(sample_rate=16000, frame_length=15360, hop_length=15360, context=240)


@dataclass(frozen=True)
class Key:
    """Stands in for a Future in decisions that only read its key."""

    key: str


def job(index: int, *, n_frames: int = 10) -> ChunkJob:
    info = AudioInfo(
        path="a.wav",
        codec="pcm_s16le",
        sample_rate=16000,
        channels=1,
        duration_s=60.0,
        size_bytes=1,
        mtime_ns=1,
    )
    plan = ChunkPlan(index, index * n_frames, n_frames)
    return ChunkJob("a.wav", info, plan, label=chunk_label("a.wav", plan, SPEC))


def thirty_second_file(index: int, *, codec: str = "pcm_s16le") -> ChunkJob:
    """A 30-second recording's one chunk, planned as the ledger plans it (10-minute chunks)."""
    info = AudioInfo(
        path=f"{index}.wav",
        codec=codec,
        sample_rate=48000,
        channels=1,
        duration_s=30.0,
        size_bytes=1,
        mtime_ns=1,
    )
    (plan,) = plan_chunks(info, SPEC, frames_per_chunk=625)
    return ChunkJob(
        info.path,
        info,
        plan,
        label=chunk_label(info.path, plan, SPEC),
        expected_frames=expected_frames(info, plan, SPEC),
    )


def test_budget_admits_one_chunk_however_large_then_up_to_the_limit():
    budget = Budget(limit_bytes=250, chunk_bytes=100)
    assert budget.admits(100)
    budget.take(100)
    budget.take(100)
    assert not budget.admits(100)
    assert budget.admits(50)  # a short file's chunk still fits
    budget.release(100)
    assert budget.admits(100)
    assert budget.peak_bytes == 200
    huge = Budget(limit_bytes=10, chunk_bytes=100)
    assert huge.admits(100)
    huge.take(100)
    assert not huge.admits(100)


def test_budget_holds_no_more_than_keeps_the_cluster_busy():
    budget = Budget(limit_bytes=1000, chunk_bytes=100, useful_bytes=250)
    budget.take(100)
    budget.take(100)
    assert not budget.admits(100)  # the limit would, what is useful does not
    budget.useful_bytes = None
    assert budget.admits(100)


def test_useful_bytes_a_chunk_per_decode_thread_and_a_group_per_queued_score_task():
    chunk, group = 38, 63
    one_worker = useful_bytes(
        decode_threads=2, scorers=1, tasks_per_scorer=2, chunk_bytes=chunk, group_bytes=group
    )
    assert one_worker == 2 * chunk + 2 * group
    # Each scorer more queues its own score tasks.
    assert (
        useful_bytes(
            decode_threads=8, scorers=4, tasks_per_scorer=2, chunk_bytes=chunk, group_bytes=group
        )
        == 8 * chunk + 4 * 2 * group
    )


def test_decode_slots_leave_the_first_score_task_its_thread_and_then_the_cores():
    # The local worker: two threads, one loading the scorer: one decode at a time, none queued.
    assert decode_slots(decode_threads=2, loading=1, first_score_out=False) == 1
    assert decode_slots(decode_threads=1, loading=1, first_score_out=False) == 0
    # The first score task out: nothing more until it is back; then what the budget admits.
    assert decode_slots(decode_threads=2, loading=0, first_score_out=True) == 0
    assert decode_slots(decode_threads=2, loading=0, first_score_out=False) is None


def test_group_bytes_as_many_chunks_as_fill_a_score_task():
    whole = chunk_nbytes(SPEC, 627, 0.5)
    # A 10-minute chunk is a score task of its own.
    assert group_bytes(job(0, n_frames=626), nbytes=whole, most_frames=1024) == whole
    # 30-second WAVs: 33 of their real size; MP3s: 33 counted whole, as the budget counts them.
    wav, mp3 = thirty_second_file(0), thirty_second_file(1, codec="mp3")
    short = budget_bytes(wav, SPEC, chunk_bytes=whole, margin_s=0.5)
    assert group_bytes(wav, nbytes=short, most_frames=1024) == 33 * short
    assert group_bytes(mp3, nbytes=whole, most_frames=1024) == 33 * whole
    # An open-ended chunk (no estimate, no planned end) is one task.
    open_ended = ChunkJob("a.wav", wav.info, ChunkPlan(0, 0, None), label="a.wav")
    assert group_bytes(open_ended, nbytes=whole, most_frames=1024) == whole


def test_chunk_bytes_count_context_and_both_margins():
    # 10 frames of 15360 samples, 240 of context, 0.5 s margins: float32.
    assert chunk_nbytes(SPEC, 10, 0.5) == 4 * (10 * 15360 + 240 + 2 * 8000)


def test_free_scorers_least_busy_first():
    load = {"a": 2, "b": 0, "c": 1}
    assert free_scorers(load, ["a", "b", "c", "d"], most=2) == ["b", "d", "c"]
    assert free_scorers({"a": 2}, ["a"], most=2) == []


def test_next_group_prefers_the_scorer_that_holds_the_chunks():
    decoded = [(job(i), Key(f"k{i}")) for i in range(4)]
    held = {"k2": ["w2"], "k3": ["w2"]}
    address, group = next_group(decoded, ["w1", "w2"], held, most_frames=30)
    assert address == "w2"
    assert [item[1].key for item in group] == ["k2", "k3", "k0"]
    address, group = next_group(decoded, ["w1"], {}, most_frames=25)
    assert (address, [item[1].key for item in group]) == ("w1", ["k0", "k1"])


def test_next_group_fills_a_batch_with_short_chunks_and_takes_one_long_one():
    # 30-second files: each planned as a whole chunk (626 frames), expected to hold 31.
    short = [(thirty_second_file(i), Key(f"s{i}")) for i in range(40)]
    assert {item[0].plan.n_frames for item in short} == {626}
    _, group = next_group(short, ["w1"], {}, most_frames=1024)
    assert len(group) == 33  # 33 x 31 = 1023 frames
    long = [(job(0, n_frames=625), Key("l0")), (job(1, n_frames=625), Key("l1"))]
    _, group = next_group(long, ["w1"], {}, most_frames=512)
    assert [item[1].key for item in group] == ["l0"]  # more than a batch: alone


def test_expected_frames_by_the_estimate_and_as_planned_past_it():
    info = thirty_second_file(0).info
    assert expected_frames(info, ChunkPlan(0, 0, 626), SPEC) == 31
    assert expected_frames(info, ChunkPlan(0, 0, 10), SPEC) == 10
    assert expected_frames(info, ChunkPlan(1, 31, 626), SPEC) == 626  # the audio went on
    assert expected_frames(replace(info, duration_s=None), ChunkPlan(0, 0, 626), SPEC) == 626


def test_a_pcm_file_counts_its_expected_audio_in_the_budget_a_lossy_one_a_whole_chunk():
    whole = chunk_nbytes(SPEC, 626, 0.5)
    wav = thirty_second_file(0)
    assert budget_bytes(wav, SPEC, chunk_bytes=whole, margin_s=0.5) == chunk_nbytes(SPEC, 32, 0.5)
    mp3 = thirty_second_file(0, codec="mp3")  # its estimate may be short: counted whole
    assert budget_bytes(mp3, SPEC, chunk_bytes=whole, margin_s=0.5) == whole
    assert budget_bytes(job(0), SPEC, chunk_bytes=whole, margin_s=0.5) == whole  # no estimate


def test_failed_group_is_sent_again_only_when_its_scorer_was_lost():
    group = [(job(0), Key("k0")), (job(1), Key("k1"))]
    retry, failed = split_failed_group(group, scorer_lost=False, most_attempts=3)
    assert (retry, failed) == ([], group)
    group[1][0].attempts = 2
    retry, failed = split_failed_group(group, scorer_lost=True, most_attempts=3)
    assert retry == group[:1] and failed == group[1:]
    assert [item[0].attempts for item in group] == [1, 3]


def test_chunk_labels_in_seconds_of_the_file():
    # The frames' audio: a chunk ends where the next starts (not 15 ms of context past it).
    assert chunk_label("x.mp3", ChunkPlan(1, 10, 10), SPEC) == "x.mp3 [9.60–19.20 s]"
    assert chunk_label("x.mp3", ChunkPlan(2, 20, None), SPEC) == "x.mp3 [19.20–end s]"
    # A chunk a re-scoring reads that held no whole frame.
    assert chunk_label("x.mp3", ChunkPlan(2, 20, 0), SPEC) == "x.mp3 [19.20–19.20 s]"
    # A one-chunk file, and an empty one (a WAV's header with no samples), not the chunk length.
    one_chunk = ChunkPlan(0, 0, 625)
    assert chunk_label("x.wav", one_chunk, SPEC, duration_s=3.5) == "x.wav [0.00–end s]"
    assert chunk_label("x.wav", one_chunk, SPEC, duration_s=0.0) == "x.wav [0.00–end s]"


def test_decode_workers_are_the_non_scorers_and_gpu_workers_with_spare_threads():
    gpu = {"resources": {"GPU": 1}, "nthreads": 2}
    spare = {"resources": {"GPU": 1}, "nthreads": 8}
    workers = {"a": {"nthreads": 4}, "b": gpu, "c": {"nthreads": 4}, "d": spare}
    assert decode_workers(workers, {"b", "c", "d"}, score_slots=2) == ["a", "d"]
    assert decode_workers({"c": {}}, {"c"}, score_slots=2) is None


def test_probe_batches_grow_to_the_most_per_task() -> None:
    from buzzdask.analysis import probe_batches

    batches = list(probe_batches(list(range(100)), most=32))
    assert [len(b) for b in batches] == [1, 2, 4, 8, 16, 32, 32, 5]
    assert [i for b in batches for i in b] == list(range(100))
    assert list(probe_batches([], most=32)) == []


def test_short_chunks_one_decode_task_per_score_group() -> None:
    short = [thirty_second_file(i) for i in range(40)]
    assert short_chunks(short, most_frames=512) == 16  # 16 x 31 = 496 frames
    assert short_chunks(short[:3], most_frames=512) == 3
    # A long chunk stops the count, and goes alone when it leads.
    long = job(0, n_frames=625)
    assert short_chunks([*short[:2], long, *short[2:]], most_frames=512) == 2
    assert short_chunks([long, *short], most_frames=512) == 1
    # So do a chunk read back from the store and one whose shared task failed.
    stored = [
        replace(
            chunk,
            stored=StoredRef(directory="store", audio_sha256="0" * 64, first_frame=0, n_frames=31),
        )
        for chunk in short
    ]
    assert short_chunks([short[0], stored[1], *short[2:]], most_frames=512) == 1
    # Chunks read back from the store go together as well, one kind to a task; their frames
    # are known, so a longer file's go too.
    assert short_chunks(stored, most_frames=512) == 16
    assert short_chunks([*stored[:3], *short[3:]], most_frames=512) == 3
    parts = [
        replace(stored[0], plan=ChunkPlan(i, 20 * i, 20), expected_frames=None) for i in range(3)
    ]
    assert short_chunks(parts, most_frames=512) == 3
    assert (
        short_chunks(
            [stored[0], replace(stored[1], plan=ChunkPlan(0, 0, 625), expected_frames=None)],
            most_frames=512,
        )
        == 1
    )
    alone = replace(short[2], decode_alone=True)
    assert short_chunks([*short[:2], alone, *short[3:]], most_frames=512) == 2
    assert short_chunks([], most_frames=512) == 1
    # The chunks of a longer file keep a decode task each, however short.
    assert short_chunks([job(i, n_frames=10) for i in range(5)], most_frames=512) == 1
    first_of_two = replace(short[0], plan=replace(short[0].plan, n_frames=20), expected_frames=20)
    assert short_chunks([first_of_two, *short], most_frames=512) == 1


@requires_ffmpeg
def test_decode_several_gives_each_chunk_or_its_own_error(make_audio, tmp_path) -> None:
    chunks = []
    for index in range(3):
        path = make_audio(f"{index}.wav", n_samples=3 * 15360, seed=index)
        info = probe_audio(path)
        chunks.append((info, plan_chunks(info, SPEC, frames_per_chunk=625)[0]))
    # Replaced after it was probed (a transfer overwrote it): it can no longer be decoded.
    (tmp_path / "audio" / "1.wav").write_text("not audio any more\n" * 99)

    decoded = decode_several(decode_chunk, chunks, spec=SPEC)

    assert isinstance(decoded[1], DecodeError) and "1.wav" in str(decoded[1])
    for index in (0, 2):
        alone = decode_chunk(*chunks[index], spec=SPEC)
        assert isinstance(decoded[index], DecodedChunk) and decoded[index].n_frames == 3
        np.testing.assert_array_equal(decoded[index].samples, alone.samples)


class _CommandFailed(Exception):
    """An error whose pickle cannot be rebuilt, as ffmpeg-python's ``ffmpeg.Error``."""

    def __init__(self, command: str, stderr: bytes) -> None:
        super().__init__(f"{command} error")
        self.stderr = stderr


def _fails(*_: object, **__: object) -> None:
    raise _CommandFailed("ffmpeg", b"no such filter")


def test_a_file_gone_between_probe_and_hash_is_its_own_error(
    make_audio, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embeddings kept: a file moved after its probe (a sync tool) fails alone, not its batch."""
    import buzzdask.pipeline

    paths = [str(make_audio(f"{index}.wav", n_samples=2 * 15360)) for index in range(3)]

    def probe_then_move(path: str, **options: object) -> object:
        info = probe_audio(path, **options)
        if path == paths[1]:
            os.rename(path, path + ".moved")
        return info

    monkeypatch.setattr(buzzdask.pipeline, "probe_audio", probe_then_move)
    answers = probe_task(paths, find_ffmpeg(), True)
    assert isinstance(answers[1], DecodeError)
    assert str(answers[1]).endswith("1.wav: cannot read the file: No such file or directory")
    assert [len(answers[i].sha256 or "") for i in (0, 2)] == [64, 64]


@requires_ffmpeg
def test_errors_in_task_answers_reach_the_client_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Probe and decode tasks hand a file's error back in their result. Dask's workers pickle
    exceptions with tblib, context and traceback along, and rebuild-check only a task's own
    exception: the command's workers did so for every buzzdask error (imported before Dask),
    and a DecodeError raised while handling ffmpeg-python's error reached the client as
    "TypeError: Error.__init__() missing 2 required positional arguments"."""
    from distributed.protocol import pickle as dask_pickle
    from tblib import pickling_support

    # As tblib.pickling_support.install() left those workers: for buzzdask's errors, which
    # existed when Dask was imported, not for the other library's.
    monkeypatch.setitem(copyreg.dispatch_table, DecodeError, pickling_support.pickle_exception)
    for foreign in (ffmpeg.Error, _CommandFailed):
        monkeypatch.delitem(copyreg.dispatch_table, foreign, raising=False)
    not_audio = tmp_path / "notes.wav"  # no WAV header: ffprobe is asked, and refuses
    not_audio.write_text("field notes, not audio\n")

    (refused,) = dask_pickle.loads(dask_pickle.dumps(probe_task([str(not_audio)], find_ffmpeg())))
    (failed,) = dask_pickle.loads(dask_pickle.dumps(decode_several(_fails, [("a.wav",)])))

    assert describe(refused)[0] == "ffprobe cannot read it as audio"
    assert "Invalid data" in describe(refused)[1]
    assert describe(failed) == ("RuntimeError: _CommandFailed: ffmpeg error", "")


def test_score_picked_scores_what_it_names_and_hands_back_decode_errors() -> None:
    calls = []

    def score(scorer: str, *chunks: str, targets: list[str]) -> list[str]:
        calls.append((scorer, chunks, targets))
        return [f"{chunk}->{target}" for chunk, target in zip(chunks, targets, strict=True)]

    failed = DecodeError("b.wav", "cannot read it")
    several, alone = ["a", failed, "c"], "d"
    results = score_picked(
        score,
        ScorerRef("actor"),
        several,
        alone,
        picks=[(0, 2), (1, None), (0, 1), (0, 0)],
        per_chunk={"targets": ["C", "D", "B", "A"]},
    )
    assert results == ["c->C", "d->D", failed, "a->A"]
    assert calls == [("actor", ("c", "d", "a"), ["C", "D", "A"])]
    assert score_picked(
        score, ScorerRef("actor"), [failed], picks=[(0, 0)], per_chunk={"targets": ["B"]}
    ) == [failed]
    assert len(calls) == 1  # nothing left to score: no call


def test_score_picked_hands_back_a_lost_scorer() -> None:
    # Raised, each worker logged a "Compute Failed" traceback of it: the loop re-sends the chunks.
    def score(scorer: str, *chunks: str) -> list[str]:
        raise ScorerError("the scorer scorer-1 was lost with its worker")

    lost = score_picked(score, ScorerRef("actor"), "a", picks=[(0, None)], per_chunk={})
    assert isinstance(lost, ScorerError) and lost.__traceback__ is None
    assert pickle.loads(pickle.dumps(lost)).args == lost.args
