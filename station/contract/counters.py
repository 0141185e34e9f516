"""The station's counters for one run: what heartbeats, the welcome, STATUS= and metrics report.

The one place a verdict is counted: the station counts what it publishes with ``Counters.count``, and every
reader of the stream (the bridges, the UI) steps the station's last counters on with the same method
between heartbeats, so what they show is what the station's next heartbeat will say.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated

from pydantic import ConfigDict, Field

Count = Annotated[int, Field(ge=0)]


@dataclass
class Counters:
    """Every captured frame is published once: ``captured == published`` when the run has drained."""

    # A later station may count more; such counters are non-negative integers too.
    __pydantic_config__ = ConfigDict(title="Counters", json_schema_serialization_defaults_required=True,
                                     json_schema_extra={"additionalProperties": {"type": "integer", "minimum": 0}})

    captured: Count = 0
    inspected: Count = 0
    skipped: Count = 0
    errors: Count = 0
    published: Count = 0
    passed: Count = 0
    failed: Count = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def count(self, verdict: str, error: bool) -> None:
        """One published verdict (``error``: it carries an error object), as the station counts it.

        ``captured`` is counted at capture by the station; a reader that only sees verdicts keeps it at
        least ``published``, which it always is on the station's side.
        """
        self.published += 1
        self.captured = max(self.captured, self.published)
        if verdict == "skipped":
            self.skipped += 1
        elif error:
            self.errors += 1
        else:
            self.inspected += 1
        if verdict == "pass":
            self.passed += 1
        elif verdict == "fail":
            self.failed += 1


COUNTER_KEYS = tuple(Counters().snapshot())
