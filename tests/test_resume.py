"""A resume trusts only what it verifies: partitions, the journal's last line, the inputs.

Each damaged output is resumed and compared, frame by frame, with an independent uninterrupted
run; the dataset must then read back whole with pandas and dask.dataframe.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask.dataframe as dd
import pyarrow.parquet as pq
import pytest

from buzzdask import OutputConflictError
from buzzdask.write import OutputLayout
from tests.conftest import assert_same_frames, requires_ffmpeg

pytestmark = requires_ffmpeg
FRAME = 15360  # samples in one 0.96 s frame at 16 kHz
CHUNK_S = 2.0  # two frames a chunk


def _partition(result_dir: Path, name: str, chunk: int) -> Path:
    return result_dir / "scores" / name / f"chunk-{chunk:06d}.parquet"


def _assert_vouched_for(output: Path) -> None:
    """The journal's chunks and the partitions on disk are the same set."""
    layout = OutputLayout(output)
    journalled = {layout.partition(*key) for key, e in layout.read_journal().items() if e["frames"]}
    assert set(layout.partitions()) == journalled
    for line in layout.journal.read_text().splitlines():
        json.loads(line)  # every line whole


def test_resume_redoes_what_does_not_verify(run, make_audio, tmp_path, monkeypatch):
    # Two footers to a reading task, so that each task's answers must go to their own chunks.
    monkeypatch.setattr("buzzdask.resume._READERS", 2)
    monkeypatch.setattr("buzzdask.resume._TASKS_PER_READER", 1)
    make_audio("a.wav", n_samples=6 * FRAME)
    make_audio("b.wav", n_samples=4 * FRAME, seed=1)
    complete = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "complete")
    damaged = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "damaged").output

    # A partition cut short, one with a row missing, one written with other settings.
    cut = _partition(damaged, "a.wav", 0)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    short = _partition(damaged, "a.wav", 1)
    pq.write_table(pq.read_table(short).slice(1), short)
    foreign = _partition(damaged, "b.wav", 0)
    table = pq.read_table(foreign)
    stored = json.loads(table.schema.metadata[b"buzzdask"])
    stored["fingerprint"]["thresholds"] = {"ins_buzz": 0.5}
    pq.write_table(table.replace_schema_metadata({b"buzzdask": json.dumps(stored)}), foreign)
    # A kill while journalling b.wav's last chunk: the line is half there.
    journal = damaged / "journal.jsonl"
    lines = sorted(
        journal.read_text().splitlines(),
        key=lambda line: (json.loads(line)["file"], json.loads(line)["chunk"]),
    )
    journal.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    # And what a killed run leaves unjournalled: a partition, a temporary file.
    shutil.copy(_partition(damaged, "a.wav", 2), _partition(damaged, "a.wav", 9))
    (damaged / "scores" / "a.wav" / ".chunk-000002.parquet.0123abcd.tmp").write_bytes(b"PAR1")

    resumed = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=damaged, on_conflict="resume")
    assert resumed.ok, resumed.errors
    assert resumed.summary["resume"] == {
        "chunks_trusted": 1,  # a.wav's last chunk
        "chunks_rejected": 3,
        "files_changed": 0,
        "files_vanished": 0,
        "partitions_removed": 6,  # the three rejected, b.wav's last, the orphan, the temporary
    }
    assert resumed.summary["chunks_written"] == 4
    assert_same_frames(resumed.to_pandas(), complete.to_pandas())
    assert len(dd.read_parquet(damaged / "scores").compute()) == 10
    _assert_vouched_for(damaged)
    log = (damaged / "buzzdask.log").read_text()
    assert "its last line was cut short" in log
    assert "a.wav chunk 0: its partition is unreadable" in log
    assert "a.wav chunk 1: its partition holds 1 frames, the journal says 2" in log
    assert "b.wav chunk 0: its partition was written with other settings" in log


def test_resume_after_inputs_changed_or_vanished(run, make_audio, tmp_path):
    make_audio("a.wav", n_samples=6 * FRAME)
    make_audio("b.wav", n_samples=4 * FRAME, seed=1)
    make_audio("c.wav", n_samples=3 * FRAME, seed=2)
    earlier = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "out").output
    make_audio("a.wav", n_samples=3 * FRAME, seed=3)  # re-recorded: shorter, other audio
    (tmp_path / "audio" / "b.wav").unlink()

    resumed = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=earlier, on_conflict="resume")
    fresh = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "fresh")
    assert resumed.ok, resumed.errors
    assert resumed.summary["resume"] == {
        "chunks_trusted": 4,  # b.wav's and c.wav's
        "chunks_rejected": 0,
        "files_changed": 1,
        "files_vanished": 1,
        "partitions_removed": 3,  # a.wav's three
    }
    assert resumed.summary["chunks_written"] == 2  # a.wav, as it is now
    # A file not found (purged from scratch, a disk not mounted) keeps its results: a resume
    # meant to add files removed them for good.
    frames = resumed.to_pandas()
    kept = frames[frames["file"] != "b.wav"].reset_index(drop=True)
    assert_same_frames(kept, fresh.to_pandas())
    assert frames["file"].value_counts()["b.wav"] == 4
    _assert_vouched_for(earlier)
    log = (earlier / "buzzdask.log").read_text()
    assert "resume: a.wav changed since the earlier run (its size differs): 3 chunks" in log
    assert (
        f"resume: b.wav is not found under {tmp_path / 'audio'} any more (deleted, purged from "
        f"scratch, a disk not mounted?): its 2 chunks kept as written; to drop them, delete "
        f"{earlier / 'scores' / 'b.wav'} and resume"
    ) in log
    # Dropped as the message says: its journal lines go too, and the results are the fresh run's.
    shutil.rmtree(earlier / "scores" / "b.wav")
    again = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=earlier, on_conflict="resume")
    assert again.summary["chunks_written"] == 0
    assert_same_frames(again.to_pandas(), fresh.to_pandas())
    assert ("b.wav", 0) not in OutputLayout(earlier).read_journal()
    assert "resume: b.wav chunk 0: " in (earlier / "buzzdask.log").read_text()
    # Copied back without its time (cp -r): analysed again, and said why.
    os.utime(tmp_path / "audio" / "c.wav", ns=(1, 1))
    run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=earlier, on_conflict="resume")
    assert (
        "resume: c.wav changed since the earlier run (its time differs, its size is the same: "
        "copied without its time? cp -a and rsync -a keep it): 2 chunks analysed again"
    ) in (earlier / "buzzdask.log").read_text()


def test_journal_lines_held_in_a_block_are_written_together_as_it_ends(tmp_path):
    layout = OutputLayout(tmp_path)
    layout.record_chunk("a.wav", 0, frames=2, size=10, mtime_ns=1, ends=False)
    with pytest.raises(RuntimeError, match="a result went wrong"), layout.journal_held():
        layout.record_chunk("a.wav", 1, frames=2, size=10, mtime_ns=1, ends=True)
        with layout.journal_held():  # inside another: held for the outer block
            layout.record_chunk("b.wav", 0, frames=1, size=20, mtime_ns=2, ends=True)
        assert set(layout.read_journal()) == {("a.wav", 0)}
        layout.record_removed([("a.wav", 0)])
        raise RuntimeError("a result went wrong")
    # Written however the block ended, in order: the removal after what it removes.
    assert set(layout.read_journal()) == {("a.wav", 1), ("b.wav", 0)}
    assert len(layout.journal.read_text().splitlines()) == 4
    with layout.journal_held():
        pass
    assert len(layout.journal.read_text().splitlines()) == 4


def test_a_score_tasks_chunks_are_journalled_with_one_fsync(run, make_audio, tmp_path, monkeypatch):
    names = [f"site/{index:02d}.wav" for index in range(12)]
    for index, name in enumerate(names):
        make_audio(name, n_samples=3 * FRAME, seed=index)
    journal = tmp_path / "out" / "journal.jsonl"
    journal_syncs = []
    real_fsync = os.fsync

    def counted_fsync(fd: int) -> None:  # the client's own fsync, counted where it journals
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == journal:
            journal_syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counted_fsync)
    result = run(tmp_path / "audio", output=tmp_path / "out")
    assert result.ok, result.errors
    assert result.summary["chunks_written"] == 12
    assert {file for file, _ in OutputLayout(tmp_path / "out").read_journal()} == set(names)
    # Short files are scored several to a task: their lines go together.
    assert 1 <= len(journal_syncs) < len(names) / 2
    _assert_vouched_for(tmp_path / "out")


def test_resume_keeps_the_earlier_names_whatever_the_inputs_given(run, make_audio, tmp_path):
    audio = tmp_path / "audio"
    make_audio("a.wav", directory=audio / "siteA", n_samples=4 * FRAME)
    make_audio("b.wav", directory=audio / "siteB", n_samples=3 * FRAME, seed=1)
    paths = [audio / "siteA", audio / "siteB"]
    complete = run(paths, chunk_seconds=CHUNK_S, output=tmp_path / "complete")
    out = run(paths, chunk_seconds=CHUNK_S, output=tmp_path / "out").output

    # One folder of the two: named from the earlier root (not "a.wav"), the other one kept,
    # even where it changed since (copied again from the card): not this resume's to judge.
    os.utime(audio / "siteB" / "b.wav", ns=(1, 1))
    resumed = run(audio / "siteA", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    # siteA's chunks checked and trusted; siteB's kept as they are, not judged.
    assert resumed.ok and resumed.summary["resume"]["chunks_trusted"] == 2
    assert resumed.summary["resume"]["files_changed"] == 0
    assert_same_frames(resumed.to_pandas(), complete.to_pandas())
    again = run(audio / "siteB", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    assert again.summary["resume"]["files_vanished"] == 0
    assert again.summary["resume"]["files_changed"] == 1
    assert_same_frames(again.to_pandas(), complete.to_pandas())
    # Nor gone: siteB's audio archived (or purged from scratch) while siteA is finished.
    (audio / "siteB").rename(tmp_path / "archived")
    resumed = run(audio / "siteA", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    assert resumed.summary["resume"]["files_vanished"] == 0
    assert_same_frames(resumed.to_pandas(), complete.to_pandas())
    (tmp_path / "archived").rename(audio / "siteB")

    # Another season's folder sharing a name (siteA/a.wav, other audio) is not where the
    # recordings moved: refused, and the results stay.
    make_audio("a.wav", directory=tmp_path / "season2025" / "siteA", n_samples=2 * FRAME, seed=5)
    make_audio("c.wav", directory=tmp_path / "season2025" / "siteC", n_samples=2 * FRAME)
    with pytest.raises(OutputConflictError, match=r"it is not under .* not of their earlier"):
        run(tmp_path / "season2025", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    # Nor where a recorder's files all have one size: the earlier ones are still in place.
    for name, samples in (("siteA/a.wav", 4 * FRAME), ("siteB/b.wav", 3 * FRAME)):
        make_audio(name, directory=tmp_path / "season2026", n_samples=samples, seed=7)
    with pytest.raises(OutputConflictError, match=r"of other times than the earlier recordings"):
        run(tmp_path / "season2026", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    assert_same_frames(again.to_pandas(), complete.to_pandas())  # read from disk again

    # A file outside the earlier root would rename every recording: refused before any work.
    elsewhere = make_audio("c.wav", directory=tmp_path / "card2", n_samples=2 * FRAME)
    with pytest.raises(OutputConflictError, match=r"c\.wav: it is not under .*audio, the folder"):
        run([*paths, elsewhere], chunk_seconds=CHUNK_S, output=out, on_conflict="resume")

    # The inputs moved (a scratch copy, another mount): matched by their earlier names, also
    # where only part of them are there.
    partial = tmp_path / "partial_copy"
    shutil.copytree(audio / "siteA", partial / "siteA")
    resumed = run(partial / "siteA", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    assert resumed.ok and resumed.summary["resume"]["files_vanished"] == 0
    moved = tmp_path / "moved"
    audio.rename(moved)
    resumed = run(moved, chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    assert resumed.summary["resume"]["files_vanished"] == 0
    assert resumed.summary["chunks_written"] == 0
    assert_same_frames(resumed.to_pandas(), complete.to_pandas())
    assert json.loads((out / "buzzdask.json").read_text())["inputs"]["root"] == str(moved)
    assert "now under" in (out / "buzzdask.log").read_text()
    _assert_vouched_for(out)
    # Gone where they are now, and named: their results stay (a purge is no withdrawal).
    (moved / "siteB" / "b.wav").unlink()
    resumed = run(moved, chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    assert resumed.summary["resume"]["files_vanished"] == 1
    assert list(resumed.to_pandas()["file"].unique()) == ["siteA/a.wav", "siteB/b.wav"]


def test_a_resume_given_a_link_to_a_folder_walked_keeps_its_names(run, make_audio, tmp_path):
    """The first run walked siteA and skipped the link to it (``latest -> siteA``); a resume
    given the link names its recordings as the first did: not analysed again as latest/."""
    audio = tmp_path / "audio"
    make_audio("a.wav", directory=audio / "siteA", n_samples=4 * FRAME)
    make_audio("b.wav", directory=audio / "siteB", n_samples=3 * FRAME, seed=1)
    (audio / "latest").symlink_to("siteA")
    out = tmp_path / "out"
    first = run(audio, chunk_seconds=CHUNK_S, output=out)
    assert sorted(first.to_pandas()["file"].unique()) == ["siteA/a.wav", "siteB/b.wav"]
    # The link alone (an earlier root above it), and beside the other folder (the same root).
    for inputs in ([audio / "latest"], [audio / "latest", audio / "siteB"]):
        resumed = run(inputs, chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
        assert resumed.ok and resumed.summary["chunks_written"] == 0, inputs
        assert resumed.summary["resume"]["files_vanished"] == 0
        assert_same_frames(resumed.to_pandas(), first.to_pandas())
    assert not (out / "scores" / "latest").exists()
    _assert_vouched_for(out)


def test_a_resume_with_another_decode_margin_is_refused(run, make_audio, tmp_path):
    """Less margin than the default lets chunk edges show in the scores: never mixed."""
    import dask

    make_audio("a.wav", n_samples=4 * FRAME)
    first = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "out")
    assert "decode_margin_s" not in first.metadata["fingerprint"]  # the default: as before
    with dask.config.set({"buzzdask.decode-margin-seconds": 0.0}):
        with pytest.raises(OutputConflictError) as refused:
            run(
                tmp_path / "audio", chunk_seconds=CHUNK_S, output=first.output, on_conflict="resume"
            )
        # Only the margin changed: the default it was is said, and nothing else is asked back.
        assert str(refused.value).endswith(
            "settings differ (decode_margin_s: 0.5 (the default) before, 0.0 now); either pass "
            "on_conflict='new' instead of on_conflict='resume' to write to a new directory, or "
            "resume with buzzdask.decode-margin-seconds as it was (0.5)"
        )
        thin = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "thin")
    assert thin.metadata["fingerprint"]["decode_margin_s"] == 0.0
    # Back at the default (left out of the record now): still another margin than before.
    with pytest.raises(OutputConflictError) as refused:
        run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=thin.output, on_conflict="resume")
    assert "settings differ (decode_margin_s: 0.0 before, 0.5 (the default) now)" in str(
        refused.value
    )
    assert str(refused.value).endswith("resume with buzzdask.decode-margin-seconds as it was (0.0)")


def test_a_resume_with_other_seekable_codecs_is_refused(run, make_audio, tmp_path):
    """AAC seeked instead of decoded whole moved its scores by 0.1: never mixed."""
    import dask

    make_audio("a.wav", n_samples=4 * FRAME)
    first = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "out")
    assert "seekable_codecs" not in first.metadata["fingerprint"]
    with dask.config.set({"buzzdask.seekable-codecs": ["mp3", "flac", "aac"]}):
        with pytest.raises(OutputConflictError) as refused:
            run(
                tmp_path / "audio", chunk_seconds=CHUNK_S, output=first.output, on_conflict="resume"
            )
    default = ["mp3", "flac", "wavpack", "pcm_*"]
    assert str(refused.value).endswith(
        f"settings differ (seekable_codecs: {default!r} (the default) before, ['aac', 'flac', "
        "'mp3'] now); either pass on_conflict='new' instead of on_conflict='resume' to write to "
        f"a new directory, or resume with buzzdask.seekable-codecs as it was ({default!r})"
    )
    # The same patterns in another order are the same setting.
    with dask.config.set({"buzzdask.seekable-codecs": ["pcm_*", "wavpack", "flac", "mp3"]}):
        resumed = run(
            tmp_path / "audio", chunk_seconds=CHUNK_S, output=first.output, on_conflict="resume"
        )
    assert resumed.ok and resumed.summary["chunks_written"] == 0


def test_a_resume_looks_at_each_input_once(tmp_path):
    """Not once per journalled chunk: a 24-hour file has 144, each a stat on /fs/scratch, and
    a file changing meanwhile would have its chunks judged against different versions."""
    from buzzdask.resume import check_resume

    layout = OutputLayout(tmp_path / "out")
    layout.root.mkdir()
    for name in ("a.wav", "b.wav"):
        for index in range(5):
            layout.record_chunk(name, index, frames=0, size=1, mtime_ns=1, ends=True)
    looked: list[str] = []

    def versions(relative: str) -> tuple[int, int]:
        looked.append(relative)
        return (1, 1)

    check = check_resume(layout, fingerprint={}, input_root=tmp_path, versions=versions)
    assert sorted(looked) == ["a.wav", "b.wav"] and len(check.done) == 10


def test_a_damaged_or_missing_metadata_file_is_said_so(run, make_audio, tmp_path):
    """A buzzdask.json cut short (a copy) or deleted beside its results: one message with the
    ways on, not a traceback, nor "holds no buzzdask results"; nothing removed."""
    make_audio("a.wav", n_samples=2 * FRAME)
    out = run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=tmp_path / "out").output
    metadata = out / "buzzdask.json"
    kept = metadata.read_text()
    metadata.write_text(kept[:40])
    for on_conflict in ("error", "resume"):
        with pytest.raises(OutputConflictError, match=r"buzzdask.json cannot be read \("):
            run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=out, on_conflict=on_conflict)
    metadata.unlink()
    with pytest.raises(OutputConflictError, match=r"buzzdask\.json is missing .*on_conflict='new'"):
        run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=out, on_conflict="resume")
    metadata.write_text(kept)
    assert run(tmp_path / "audio", chunk_seconds=CHUNK_S, output=out, on_conflict="resume").ok
