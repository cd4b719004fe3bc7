"""``buzzdask status``: where a run stands, read from its output alone.

From a login node while the batch job runs, the next morning after a walltime kill, on a copy
of the results: whether the run is still going (its lock's holder alive), finished, stopped,
or killed outright (``buzzdask.json`` still says ``"running"`` and nothing holds the output),
how far its journal goes, and what to do next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from buzzdask.errors import InputError
from buzzdask.inputs import first_names
from buzzdask.lock import LockHolder, holder_around
from buzzdask.progress import format_audio, format_count
from buzzdask.results import Run, open_run
from buzzdask.settings import load_settings

__all__ = ["RunStatus", "run_status"]

State = Literal["complete", "running", "interrupted", "failed", "stopped", "starting"]


@dataclass(frozen=True)
class RunStatus:
    """Where one run's output stands.

    Attributes
    ----------
    output : Path
    state : {"complete", "running", "interrupted", "failed", "stopped", "starting"}
        As its ``buzzdask.json`` says, except: ``"running"`` whenever a live process holds the
        output (a resume, a watch between passes, the run of several heads it is one of),
        ``"stopped"`` where it says ``"running"`` but nothing holds it (killed outright:
        ``kill -9``, a lost node), and ``"starting"`` for a run that has written nothing yet.
    model : str
        The model's name ("" while starting).
    log : Path
        The run's ``buzzdask.log`` (a run of several heads': in the folder above the head's).
    holder : str or None
        The process holding the output (host, pid, since when, last sign of life).
    stopped_by : str or None
        What stopped an ``"interrupted"`` or ``"failed"`` run.
    files : int
        Input files: those its last invocation found, or the recordings it holds results of
        where more (of inputs not found since).
    files_done : int
        Recordings scored to their end.
    unfinished : list of str
        Recordings with frames written, not to their end (to do, or failed midway).
    failed : list of str
        Input files a problem stopped (``errors.parquet``: written as an invocation ends).
    missing : list of str
        Of ``unfinished``, those whose audio is not under the run's input folder any more: a
        resume cannot finish them.
    frames : int
        Frames its journal holds.
    audio_s : float [s]
        Those frames' hops of audio.
    command : {"analyze", "rescore"}
        What wrote it (and resumes it).
    """

    output: Path
    state: State
    model: str
    log: Path
    holder: str | None = None
    stopped_by: str | None = None
    files: int = 0
    files_done: int = 0
    unfinished: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    frames: int = 0
    audio_s: float = 0.0
    command: Literal["analyze", "rescore"] = "analyze"

    def describe(self) -> str:
        """One paragraph: the state, how far, and what next."""
        how = {
            "complete": "complete",
            "running": f"running ({self.holder})",
            "starting": f"starting ({self.holder}); nothing written yet",
            "interrupted": f"interrupted ({self.stopped_by})",  # Ctrl-C, SIGTERM
            "failed": f"failed ({self.stopped_by})",
            "stopped": "stopped without a word (killed outright: kill -9, a lost node, a "
            "time limit's last signal; no process holds it)",
        }[self.state]
        lines = [f"{self.output}: {how}"]
        if self.state != "starting":
            failed = f", {len(self.failed)} failed" if self.failed else ""
            lines.append(
                f"  {self.model}: {self.files_done:,} of {format_count(self.files, 'file')} done"
                f"{failed}, {format_count(self.frames, 'frame')} "
                f"({format_audio(self.audio_s)} of audio)"
            )
        again = f"the same buzzdask {self.command} command with --resume"
        left = sorted({*self.unfinished, *self.failed} - set(self.missing))
        if self.state in ("running", "starting"):
            lines.append(f"  its log: {self.log}")
        elif self.state != "complete":
            # Stopped as it closed: every file done, the run not yet recorded complete.
            done = not left and self.files and self.files_done == self.files
            lines.append(
                f"  next: {again} "
                + ("records it complete (every file is done)" if done else "finishes it")
            )
        elif left:
            lines.append(
                f"  {format_count(len(left), 'file')} not scored, or not to the end "
                f"(errors.parquet says why): {again} tries {'it' if len(left) == 1 else 'them'} "
                "again (a file that is broken, once fixed or replaced)"
            )
        if self.missing and self.state not in ("running", "starting"):
            lines.append(
                f"  {format_count(len(self.missing), 'file')} not scored to the end whose audio "
                f"is not found any more ({first_names(self.missing, shown=3)}): no resume "
                f"finishes {'it' if len(self.missing) == 1 else 'them'}; to drop "
                f"{'its' if len(self.missing) == 1 else 'their'} results, delete "
                f"{'its folder' if len(self.missing) == 1 else 'their folders'} under "
                f"{self.output / 'scores'} and resume"
            )
        return "\n".join(lines)


def run_status(output: str | os.PathLike[str]) -> list[RunStatus]:
    """Where the run(s) of an output stand: one, or one per model of a run of several.

    Parameters
    ----------
    output : path-like
        A directory :func:`buzzdask.analyze` (or ``rescore``) wrote, or a folder of such
        directories (each one's).

    Returns
    -------
    list of RunStatus

    Raises
    ------
    InputError
        ``output`` holds no results, and no run is starting there.
    """
    root = Path(os.path.expanduser(output))
    stale_s = load_settings().lock_stale_seconds
    heads = sorted(path.parent for path in root.glob("*/buzzdask.json"))
    if not (root / "buzzdask.json").exists() and heads:
        return [_status(open_run(head), stale_s) for head in heads]
    try:
        run = open_run(root)
    except InputError:
        found = holder_around(root, stale_s=stale_s) if root.is_dir() else None
        if found is None:
            raise
        return [
            RunStatus(
                output=root,
                state="starting",
                model="",
                log=root / "buzzdask.log",
                holder=_said(found[1]),
            )
        ]
    return [_status(run, stale_s)]


def _said(holder: LockHolder) -> str:
    return f"{holder.describe()}; last sign of life {holder.age_s:.0f} s ago"


def _status(run: Run, stale_s: float) -> RunStatus:
    found = holder_around(run.output, stale_s=stale_s)
    recorded = run.metadata.get("status")
    state: State
    if found is not None:
        state = "running"
    elif recorded in ("complete", "interrupted", "failed"):
        state = recorded
    else:
        state = "stopped"
    frames = sum(int(entry["frames"]) for entry in run.layout.read_journal().values())
    unfinished = run.unfinished_recordings()
    failed = run.failed_recordings()
    recordings = set(run.recordings())
    own_log = run.output / "buzzdask.log"
    # A re-scoring records the store it read (an analysis keeping embeddings, its own).
    rescore = "embeddings" in run.metadata.get("fingerprint", {})
    return RunStatus(
        output=run.output,
        state=state,
        model=str(run.model.get("name", "")),
        # One head's of several: the run's log is in the folder above.
        log=own_log if own_log.exists() else run.output.parent / "buzzdask.log",
        holder=None if found is None else _said(found[1]),
        stopped_by=run.metadata.get("stopped_by"),
        files=max(int(run.metadata["inputs"].get("files", 0)), len(recordings | set(failed))),
        files_done=len(recordings - set(unfinished)),
        unfinished=unfinished,
        failed=failed,
        missing=[] if rescore else [n for n in unfinished if not (run.input_root / n).exists()],
        frames=frames,
        audio_s=frames * run.frame_hop_s,
        command="rescore" if rescore else "analyze",
    )
