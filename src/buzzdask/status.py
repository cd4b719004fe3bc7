"""``buzzdask status``: where a run stands, read from its output alone.

From a login node while the batch job runs, the next morning after a walltime kill, on a copy
of the results: whether the run is still going (its lock's holder alive), finished, stopped,
or killed outright (``buzzdask.json`` still says ``"running"`` and nothing holds the output),
how far its journal goes, and what to do next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from buzzdask.errors import InputError
from buzzdask.lock import LockHolder, live_holder
from buzzdask.progress import format_audio, format_count
from buzzdask.results import Run, open_run
from buzzdask.settings import load_settings

__all__ = ["RunStatus", "run_status"]

State = Literal["complete", "running", "interrupted", "failed", "stopped"]


@dataclass(frozen=True)
class RunStatus:
    """Where one run's output stands.

    Attributes
    ----------
    output : Path
    state : {"complete", "running", "interrupted", "failed", "stopped"}
        As its ``buzzdask.json`` says, except: ``"running"`` whenever a live process holds the
        output (a resume, a watch between passes), and ``"stopped"`` where it says
        ``"running"`` but nothing holds it (killed outright: ``kill -9``, a lost node).
    model : str
        The model's name.
    holder : str or None
        The process holding the output (host, pid, since when, last sign of life).
    stopped_by : str or None
        What stopped an ``"interrupted"`` or ``"failed"`` run.
    files : int
        Input files its last invocation found.
    files_done : int
        Recordings scored to their end.
    unfinished : list of str
        Recordings with frames written, not to their end (to do, or failed midway).
    failed : list of str
        Input files a problem stopped (``errors.parquet``: written as an invocation ends).
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
    holder: str | None
    stopped_by: str | None
    files: int
    files_done: int
    unfinished: list[str]
    failed: list[str]
    frames: int
    audio_s: float
    command: Literal["analyze", "rescore"]

    def describe(self) -> str:
        """One paragraph: the state, how far, and what next."""
        how = {
            "complete": "complete",
            "running": f"running ({self.holder})",
            "interrupted": f"interrupted ({self.stopped_by})",  # Ctrl-C, SIGTERM
            "failed": f"failed ({self.stopped_by})",
            "stopped": "stopped without a word (killed outright: kill -9, a lost node, a "
            "time limit's last signal; no process holds it)",
        }[self.state]
        failed = f", {len(self.failed)} failed" if self.failed else ""
        lines = [
            f"{self.output}: {how}",
            f"  {self.model}: {self.files_done} of {format_count(self.files, 'file')} done"
            f"{failed}, {format_count(self.frames, 'frame')} "
            f"({format_audio(self.audio_s)} of audio)",
        ]
        again = f"the same buzzdask {self.command} command with --resume"
        if self.state == "running":
            lines.append(f"  its log: {self.output / 'buzzdask.log'}")
        elif self.state != "complete":
            lines.append(f"  next: {again} finishes it")
        elif self.unfinished or self.failed:
            left = {*self.unfinished, *self.failed}
            lines.append(
                f"  {format_count(len(left), 'file')} not scored to the end (errors.parquet says "
                f"why): {again} tries {'it' if len(left) == 1 else 'them'} again (a file that "
                "is broken, once fixed or replaced)"
            )
        return "\n".join(lines)


def run_status(output: str | os.PathLike[str]) -> list[RunStatus]:
    """Where the run(s) of an output stand: one, or one per model of a run of several.

    Parameters
    ----------
    output : path-like
        A directory :func:`buzzdask.analyze` (or ``rescore``) wrote.

    Returns
    -------
    list of RunStatus

    Raises
    ------
    InputError
        ``output`` holds no results: not a buzzdask output, or a run that wrote none yet
        (where a live process holds it, the message names it).
    """
    root = Path(os.path.expanduser(output))
    stale_s = load_settings().lock_stale_seconds
    heads = sorted(path.parent for path in root.glob("*/buzzdask.json"))
    if not (root / "buzzdask.json").exists() and heads:
        above = live_holder(root, stale_s=stale_s)
        return [_status(open_run(head), above, stale_s) for head in heads]
    try:
        run = open_run(root)
    except InputError:
        holder = live_holder(root, stale_s=stale_s) if root.is_dir() else None
        if holder is not None:
            raise InputError(
                f"{root} holds no results yet: a run is starting there ({holder.describe()}; "
                f"its log: {root / 'buzzdask.log'})"
            ) from None
        raise
    return [_status(run, None, stale_s)]


def _status(run: Run, above: LockHolder | None, stale_s: float) -> RunStatus:
    holder = live_holder(run.output, stale_s=stale_s) or above
    recorded = run.metadata.get("status")
    state: State
    if holder is not None:
        state = "running"
    elif recorded in ("complete", "interrupted", "failed"):
        state = recorded
    else:
        state = "stopped"
    frames = sum(int(entry["frames"]) for entry in run.layout.read_journal().values())
    unfinished = run.unfinished_recordings()
    return RunStatus(
        output=run.output,
        state=state,
        model=str(run.model.get("name", "")),
        holder=(
            None
            if holder is None
            else f"{holder.describe()}; last sign of life {holder.age_s:.0f} s ago"
        ),
        stopped_by=run.metadata.get("stopped_by"),
        files=int(run.metadata["inputs"].get("files", 0)),
        files_done=len(set(run.recordings()) - set(unfinished)),
        unfinished=unfinished,
        failed=run.failed_recordings(),
        frames=frames,
        audio_s=frames * run.frame_hop_s,
        # A re-scoring records the store it read (an analysis keeping embeddings, its own).
        command="rescore" if "embeddings" in run.metadata.get("fingerprint", {}) else "analyze",
    )
