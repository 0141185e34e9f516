"""A bounded on-disk spool: verdicts the database could not take, kept in order until it is back.

Segments are JSON-lines files, ``segment-<n>.jsonl``, numbered in the order
they were started; each line is one received verdict and the time it was
received. Appends are flushed and fsynced before ``append`` returns, so what
the recorder took from the stream survives its own crash as well as the
database's absence. Draining takes the oldest segment whole and deletes it
only after the database has committed every row of it; a crash in between
writes some rows twice, which the database's unique key absorbs.

The spool is bounded (``max_bytes``): an append that would pass the bound
raises SpoolFullError naming the segment, never drops. A line cut short by a
crash mid-append (the only way one is unreadable) is skipped with a warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from station.errors import ConfigError, StationError

log = structlog.get_logger("station.bridge.spool")

#: a segment is closed and a new one started past this size, so draining frees disk as it goes
SEGMENT_BYTES = 4 << 20


class SpoolFullError(StationError):
    """The spool reached --spool-max-mb while the database was away."""


@dataclass
class Received:
    """One verdict as the recorder took it from the stream."""

    message: dict[str, Any]
    received_at: float


class Spool:
    def __init__(self, folder: Path, max_bytes: int) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / ".probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"--spool: cannot write to {folder}: {exc}") from exc
        self.folder = folder
        self.max_bytes = max_bytes
        self._bytes = sum(p.stat().st_size for p in self._segments())
        self._current: Path | None = None

    def _segments(self) -> list[Path]:
        return sorted(self.folder.glob("segment-*.jsonl"))

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def empty(self) -> bool:
        return not self._segments()

    def append(self, items: list[Received]) -> None:
        if not items:
            return
        lines = [(json.dumps({"r": it.received_at, "m": it.message}, separators=(",", ":")) + "\n").encode()
                 for it in items]
        if self._current is None or not self._current.exists() or self._current.stat().st_size > SEGMENT_BYTES:
            segments = self._segments()
            n = int(segments[-1].stem.split("-")[1]) + 1 if segments else 0
            self._current = self.folder / f"segment-{n:012d}.jsonl"
        # What fits is kept, in order; the rest is refused loudly: the operator learns exactly what was lost.
        room, fit = self.max_bytes - self._bytes, 0
        while fit < len(lines) and len(lines[fit]) <= room:
            room -= len(lines[fit])
            fit += 1
        data = b"".join(lines[:fit])
        full = fit < len(lines)
        try:
            with open(self._current, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise SpoolFullError(f"spool: cannot append to {self._current}: {exc}; "
                                 f"{len(items)} verdicts not stored") from exc
        self._bytes += len(data)
        if full:
            first = items[fit].message
            raise SpoolFullError(
                f"spool full: {self._current} reached --spool-max-mb ({self.max_bytes / 2**20:g} MiB) while the "
                f"database is unreachable; {len(items) - fit} verdicts not stored, from station "
                f"{first.get('station')} run {first.get('run_id')} seq {first.get('seq')}")

    def oldest(self) -> tuple[Path, list[Received]] | None:
        """The oldest segment and its verdicts, or None when the spool is empty."""
        segments = self._segments()
        if not segments:
            return None
        path = segments[0]
        if path == self._current:
            self._current = None  # appends go to a new segment while this one drains
        items: list[Received] = []
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            try:
                d = json.loads(line)
                items.append(Received(d["m"], float(d["r"])))
            except (ValueError, KeyError, TypeError):
                log.warning("spool_line_unreadable", file=str(path), line=n, reason="cut short by a crash")
        return path, items

    def remove(self, path: Path) -> None:
        size = path.stat().st_size
        path.unlink()
        self._bytes = max(0, self._bytes - size)
