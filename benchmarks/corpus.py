"""Corpora of field-recording-like files generated with ffmpeg, cached between runs.

Each file is pink noise plus a steady tone and a tremolo "buzz" tone, in one of the two formats
the lab's recorders write: MP3 at 128 kb/s, 44.1 kHz stereo (each channel its own noise), or
16-bit WAV at 48 kHz mono (AudioMoth). A file is named by its format, duration and seed, so
corpora of different sizes share the files they have in common and a rerun generates nothing.

:func:`build_corpus` makes the mixed corpus (1 minute to 2 hours, both formats; the GPU check
uses it). :func:`build_named_corpus` makes the throughput benchmark's three corpora
(:data:`CORPORA`), each measured on its own: ``mp3`` (15-minute MP3s), ``wav`` (1-hour
AudioMoth-like WAVs) and ``small-files`` (30-second AudioMoth-like WAVs in site/date folders,
where the per-file costs dominate).
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

__all__ = [
    "CORPORA",
    "PATTERN",
    "CorpusFile",
    "build_corpus",
    "build_named_corpus",
    "default_cache_dir",
    "plan_corpus",
    "plan_named_corpus",
]

#: The durations (s) and formats the corpus cycles through: 1 minute to 2 hours, both formats.
PATTERN: tuple[tuple[int, str], ...] = (
    (3600, "mp3"),
    (60, "wav"),
    (7200, "mp3"),
    (600, "wav"),
    (1800, "mp3"),
    (300, "wav"),
    (120, "mp3"),
    (1800, "wav"),
    (900, "mp3"),
    (3600, "wav"),
)
_SHORTEST_S = 60  # the last file is cut to fit the requested hours, but never below 1 minute

#: The throughput benchmark's corpora: name -> (seconds per file, format, description).
CORPORA: dict[str, tuple[int, str, str]] = {
    "mp3": (900, "mp3", "15-minute MP3s, 128 kb/s, 44.1 kHz stereo"),
    "wav": (3600, "wav", "1-hour AudioMoth-like WAVs, 16-bit, 48 kHz mono"),
    "small-files": (30, "wav", "30-second AudioMoth-like WAVs in site/date folders"),
}
_SITES = 4  # small-files: recorders, each writing one file every half hour
_FILES_PER_DAY = 48


@dataclass(frozen=True)
class CorpusFile:
    """One generated recording.

    Parameters
    ----------
    seconds : int > 0 [s]
        Duration.
    fmt : {"mp3", "wav"}
        MP3 128 kb/s 44.1 kHz stereo, or WAV 16-bit 48 kHz mono.
    seed : int
        Noise seed (the file's index in the corpus).
    """

    seconds: int
    fmt: str
    seed: int
    folder: str = ""
    stem: str = ""

    @property
    def name(self) -> str:
        """Path relative to the corpus directory.

        By default format, duration and seed, so equal files are shared between corpora; with
        ``folder`` and ``stem`` (the small-files layout) ``<folder>/<stem>.WAV``, as AudioMoths
        name their files.
        """
        if self.stem:
            return f"{self.folder}/{self.stem}.{self.fmt.upper()}"
        return f"field-{self.fmt}-{self.seconds:05d}s-{self.seed:03d}.{self.fmt}"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/buzzdask-bench`` (``~/.cache/buzzdask-bench``), outside the repository."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "buzzdask-bench"


def plan_corpus(hours: float) -> list[CorpusFile]:
    """Files cycling through :data:`PATTERN` until they hold ``hours`` of audio.

    Parameters
    ----------
    hours : float > 0 [h]
        Total audio; the last file is shortened to fit (at least one minute, so the total may
        exceed ``hours`` by less than a minute).

    Returns
    -------
    list of CorpusFile
    """
    return _cycle(hours, PATTERN)


def _cycle(hours: float, pattern: tuple[tuple[int, str], ...]) -> list[CorpusFile]:
    """Files cycling through ``pattern`` until they hold ``hours``; the last one cut to fit."""
    if hours <= 0:
        raise ValueError(f"hours={hours!r} must be > 0")
    remaining = round(hours * 3600)
    files: list[CorpusFile] = []
    while remaining > 0:
        seconds, fmt = pattern[len(files) % len(pattern)]
        seconds = max(_SHORTEST_S, min(seconds, remaining))
        files.append(CorpusFile(seconds=seconds, fmt=fmt, seed=len(files)))
        remaining -= seconds
    return files


def plan_named_corpus(name: str, *, hours: float, small_files: int) -> list[CorpusFile]:
    """The files of one of :data:`CORPORA`.

    Parameters
    ----------
    name : {"mp3", "wav", "small-files"}
    hours : float > 0 [h]
        Audio in ``mp3`` and ``wav`` (their last file is shortened to fit, to at least a minute).
    small_files : int > 0
        Files in ``small-files``: 30 s each, from :data:`_SITES` sites, one file every half
        hour, in ``site-NN/YYYY-MM-DD/YYYYMMDD_HHMMSS.WAV`` (AudioMoth's names).

    Returns
    -------
    list of CorpusFile
    """
    seconds, fmt, _ = CORPORA[name]
    if name != "small-files":
        return _cycle(hours, ((seconds, fmt),))
    if small_files <= 0:
        raise ValueError(f"small_files={small_files!r} must be > 0")
    files = []
    for index in range(small_files):
        site, slot = index % _SITES, index // _SITES
        day = date(2026, 6, 1) + timedelta(days=slot // _FILES_PER_DAY)
        minutes = 30 * (slot % _FILES_PER_DAY)
        files.append(
            CorpusFile(
                seconds=seconds,
                fmt=fmt,
                seed=index,
                folder=f"site-{site + 1:02d}/{day.isoformat()}",
                stem=f"{day:%Y%m%d}_{minutes // 60:02d}{minutes % 60:02d}00",
            )
        )
    return files


def build_corpus(hours: float, cache_dir: Path, *, jobs: int) -> list[Path]:
    """Generate the missing files of a ``hours``-long corpus under ``cache_dir / "corpus"``.

    Parameters
    ----------
    hours : float > 0 [h]
    cache_dir : Path
        Cache root (kept between runs).
    jobs : int > 0
        ffmpeg encoders run at once.

    Returns
    -------
    list of Path
        The corpus files, in plan order.
    """
    return _build(plan_corpus(hours), cache_dir / "corpus", jobs=jobs)


def build_named_corpus(
    name: str, cache_dir: Path, *, hours: float, small_files: int, jobs: int
) -> tuple[Path, list[Path]]:
    """Generate the missing files of one of :data:`CORPORA` (see :func:`plan_named_corpus`).

    Returns
    -------
    root : Path
        ``small-files``: its own directory (``cache_dir/corpus/small-files-<count>``, holding
        exactly these files, so analysing the directory analyses them). Otherwise the shared
        ``cache_dir/corpus``, which may hold other files too.
    files : list of Path
        The corpus files, in plan order.
    """
    directory = cache_dir / "corpus"
    if name == "small-files":
        directory = directory / f"small-files-{small_files}"
    planned = plan_named_corpus(name, hours=hours, small_files=small_files)
    return directory, _build(planned, directory, jobs=jobs)


def _build(files: list[CorpusFile], directory: Path, *, jobs: int) -> list[Path]:
    """Generate the files of ``files`` missing under ``directory``; all their paths, in order."""
    directory.mkdir(parents=True, exist_ok=True)
    missing = [f for f in files if not (directory / f.name).is_file()]
    if missing:
        hours_missing = sum(f.seconds for f in missing) / 3600
        print(f"benchmarks: generating {len(missing)} files ({hours_missing:.2f} h) in {directory}")
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda f: _generate(f, directory / f.name), missing))
    return [directory / f.name for f in files]


def _generate(file: CorpusFile, target: Path) -> None:
    """Encode one file with ffmpeg's lavfi sources; written under a temporary name, then renamed."""
    rate = 44100 if file.fmt == "mp3" else 48000
    seconds = file.seconds

    def noise(seed: int) -> str:
        return f"anoisesrc=d={seconds}:c=pink:r={rate}:a=0.05:seed={seed}"

    def tone(freq: int, volume: float, *, buzz: bool) -> str:
        # The buzz comes and goes every few seconds, like an insect passing the microphone.
        tremolo = ",tremolo=f=0.2:d=0.9" if buzz else ""
        return f"sine=f={freq}:r={rate}:d={seconds},volume={volume}{tremolo}"

    seed = 2 * file.seed + 1
    if file.fmt == "mp3":
        graph = (
            f"{noise(seed)}[n1];{noise(seed + 1)}[n2];"
            f"{tone(220, 0.1, buzz=False)}[t1];{tone(180, 0.2, buzz=True)}[t2];"
            "[n1][t1]amix=inputs=2:normalize=0[l];[n2][t2]amix=inputs=2:normalize=0[r];"
            "[l][r]amerge=inputs=2[out]"
        )
        codec = ["-c:a", "libmp3lame", "-b:a", "128k"]
    else:
        graph = (
            f"{noise(seed)}[n];{tone(220, 0.1, buzz=False)}[t1];{tone(180, 0.2, buzz=True)}[t2];"
            "[n][t1][t2]amix=inputs=3:normalize=0[out]"
        )
        codec = ["-c:a", "pcm_s16le"]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial{target.suffix}")
    subprocess.run(
        [
            *("ffmpeg", "-nostdin", "-v", "error", "-y", "-filter_complex", graph),
            *("-map", "[out]", *codec, str(partial)),
        ],
        check=True,
    )
    partial.replace(target)
