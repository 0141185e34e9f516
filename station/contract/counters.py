"""The station's counters for one run: what heartbeats, the welcome, STATUS= and metrics report."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Counters:
    """Every captured frame is published once: ``captured == published`` when the run has drained."""

    captured: int = 0
    inspected: int = 0
    skipped: int = 0
    errors: int = 0
    published: int = 0
    passed: int = 0
    failed: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
