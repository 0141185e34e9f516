"""One short log line per misbehaving client, rate-limited: garbage on a port never floods the journal.

A bridge's port faces the plant network, where scanners, misconfigured
clients and fuzzers send whatever they send. Each such event is worth one
JSON line that names the peer and what was wrong, at most ``burst`` lines per
``window_s``; past that the lines are counted, and the next line that gets
through says how many were held back (``suppressed``). Payload excerpts are
capped at EXCERPT_BYTES, so a 4 KiB packet is never a 20 KB line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: bytes of a bad request shown, as hex
EXCERPT_BYTES = 16
#: characters of any text field (an error message, an endpoint URL) shown
TEXT_CHARS = 160


def excerpt(data: bytes | bytearray | memoryview) -> str:
    """The first EXCERPT_BYTES as hex, with the total length when more was sent."""
    raw = bytes(data)
    head = raw[:EXCERPT_BYTES].hex()
    return head if len(raw) <= EXCERPT_BYTES else f"{head}… ({len(raw)} bytes)"


def _short(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return excerpt(value)
    if isinstance(value, str) and len(value) > TEXT_CHARS:
        return value[:TEXT_CHARS] + f"… ({len(value)} chars)"
    if isinstance(value, BaseException):
        return _short(f"{type(value).__name__}: {value}")
    return value


class BadClientLog:
    """``report(event, peer, **fields)``: one warning line, or a count while over the rate."""

    def __init__(self, logger: Any, burst: int = 10, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._window_start = clock()
        self._in_window = 0
        self.suppressed = 0
        #: every report, logged or not (for tests and metrics)
        self.total = 0

    def report(self, event: str, peer: str | None, **fields: Any) -> bool:
        """Log ``event`` for ``peer`` unless over the rate; True when a line was written."""
        self.total += 1
        now = self._clock()
        if now - self._window_start >= self.window_s:
            self._window_start = now
            self._in_window = 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return False
        self._in_window += 1
        extra = {key: _short(value) for key, value in fields.items()}
        if self.suppressed:
            extra["suppressed"] = self.suppressed
            self.suppressed = 0
        self._log.warning(event, peer=peer, **extra)
        return True
