"""Recorder metadata written into real WAV files, as AudioMoth's firmware and GUANO writers do.

``add_metadata`` rewrites a PCM WAV (as ``wave`` writes it: ``RIFF``, ``fmt ``, ``data``) with a
``LIST/INFO`` chunk holding ``ICMT`` (AudioMoth puts it before the audio) and/or a ``guan`` chunk
(GUANO writers append it after the audio), fixing the RIFF size.
"""

from __future__ import annotations

import struct
from pathlib import Path


def _chunk(chunk_id: bytes, body: bytes) -> bytes:
    return chunk_id + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) % 2 else b"")


def audiomoth_comment(
    clock: str = "05:30:00 01/06/2024", zone: str = "UTC", serial: str = "24F319046395E8C2"
) -> str:
    """A comment as AudioMoth firmware 1.8 writes it (``clock`` is ``HH:MM:SS DD/MM/YYYY``)."""
    return (
        f"Recorded at {clock} ({zone}) by AudioMoth {serial} at medium gain while battery was "
        "greater than 4.9V and temperature was 21.3C."
    )


def add_metadata(path: Path, *, comment: str | None = None, guano: str | None = None) -> Path:
    """Rewrite ``path`` with an ``ICMT`` comment before the audio and/or GUANO text after it."""
    raw = path.read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE"
    chunks: list[tuple[bytes, bytes]] = []
    position = 12
    while position + 8 <= len(raw):
        chunk_id = raw[position : position + 4]
        (size,) = struct.unpack("<I", raw[position + 4 : position + 8])
        chunks.append((chunk_id, raw[position + 8 : position + 8 + size]))
        position += 8 + size + (size % 2)
    body = b""
    for chunk_id, data in chunks:
        if chunk_id == b"data" and comment is not None:
            text = comment.encode("ascii") + b"\x00"
            body += _chunk(b"LIST", b"INFO" + _chunk(b"ICMT", text))
        body += _chunk(chunk_id, data)
    if guano is not None:
        body += _chunk(b"guan", guano.encode("utf-8"))
    path.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)
    return path
