"""The verdict message: schema ``station.verdict/1`` (contract with PLC/MES bridges).

The JSON Schema lives in ``station/schemas/verdict-1.schema.json``; a test
validates every published message against it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from station.contract.timefmt import iso_utc
from station.core.decide import FAIL, REASON_ERROR, REASON_OVERLOAD, SKIPPED, Decision
from station.core.frame import Frame
from station.core.inspector import Scores

SCHEMA = "station.verdict/1"
#: Frame.meta keys a source may set, published as the verdict's ``trigger`` object
TRIGGER_KEYS = ("block_id", "count", "encoder", "camera_timestamp")


@dataclass
class Verdict:
    """Everything about one bottle's outcome except what the publisher stamps (seq, times)."""

    frame: Frame
    verdict: str
    reasons: list[str]
    model: dict[str, str]
    decision: Decision | None = None
    threshold: float | None = None
    error: dict[str, str] | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    #: the raw scores (anomaly map included) for evaluation; never serialised
    scores: Scores | None = None

    @property
    def label(self) -> str | None:
        return self.decision.label if self.decision else None

    def to_message(self, station: str, run_id: str, seq: int, published_at: float) -> dict[str, Any]:
        d = self.decision
        msg: dict[str, Any] = {
            "schema": SCHEMA,
            "station": station,
            "run_id": run_id,
            "seq": seq,
            "frame_id": self.frame.frame_id,
            "source": self.frame.source,
            "captured_at": iso_utc(self.frame.captured_at),
            "trigger": _trigger_of(self.frame.meta),
            "published_at": iso_utc(published_at),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "class": None,
            "anomaly": None,
            "error": self.error,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "model": self.model,
            "truth": self.frame.label,
        }
        if d is not None:
            msg["class"] = {
                "label": d.label,
                "confidence": round(d.confidence, 6),
                "scores": {k: round(v, 6) for k, v in d.scores.items()},
            }
            msg["anomaly"] = {
                "score": round(d.anomaly_score, 6),
                "threshold": self.threshold,
                "region": {
                    "bbox": list(d.region.bbox) if d.region.bbox else None,
                    "area_px": d.region.area_px,
                    "area_fraction": round(d.region.area_fraction, 6),
                },
            }
        return msg


def _trigger_of(meta: dict[str, Any]) -> dict[str, int | None] | None:
    if not any(k in meta for k in TRIGGER_KEYS):
        return None
    return {k: meta.get(k) for k in TRIGGER_KEYS}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_verdict(frame: Frame, reason: str, detail: str, model: dict[str, str]) -> Verdict:
    """A frame that could not be read or inspected: fail, with the generic and the specific cause."""
    return Verdict(
        frame=frame,
        verdict=FAIL,
        reasons=[REASON_ERROR, reason] if reason != REASON_ERROR else [REASON_ERROR],
        model=model,
        error={"reason": reason, "detail": detail},
        latency_ms=dict(frame.latency_ms),
    )


def skipped_verdict(frame: Frame, model: dict[str, str], reason: str = REASON_OVERLOAD) -> Verdict:
    """A frame that was accounted for but explicitly not inspected.

    ``overload``: inference could not keep up; ``camera_skipped``: the
    acquisition dropped it to stay current (a newest-frame-only strategy);
    ``shutdown``: a second stop signal asked the station to finish now.
    """
    return Verdict(
        frame=frame, verdict=SKIPPED, reasons=[reason], model=model,
        latency_ms=dict(frame.latency_ms),
    )
