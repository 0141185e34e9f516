"""The verdict message: schema ``station.verdict/1`` (contract with PLC/MES bridges).

Built through ``station.contract.messages.VerdictMessage``; the JSON Schema
``station/schemas/verdict-1.schema.json`` is generated from that model, and a
test validates every published message against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from station.contract.messages import VERDICT_SCHEMA, VerdictMessage
from station.contract.messages import Trigger as MessageTrigger
from station.contract.messages import encode as encode
from station.contract.timefmt import iso_utc
from station.core.decide import FAIL, REASON_ERROR, REASON_OVERLOAD, SKIPPED, Decision
from station.core.frame import Frame, Trigger
from station.core.inspector import Scores

SCHEMA = VERDICT_SCHEMA
#: the Trigger fields published as the verdict's ``trigger`` object, in this order
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

    def to_model(self, station: str, run_id: str, seq: int, published_at: float) -> VerdictMessage:
        d = self.decision
        cls: dict[str, Any] | None = None
        anomaly: dict[str, Any] | None = None
        if d is not None:
            cls = {"label": d.label, "confidence": round(d.confidence, 6),
                   "scores": {k: round(v, 6) for k, v in d.scores.items()}}
            anomaly = {"score": round(d.anomaly_score, 6), "threshold": self.threshold, "region": {
                "bbox": list(d.region.bbox) if d.region.bbox else None, "area_px": d.region.area_px,
                "area_fraction": round(d.region.area_fraction, 6)}}
        return VerdictMessage.model_validate({
            "station": station,
            "run_id": run_id,
            "seq": seq,
            "frame_id": self.frame.frame_id,
            "source": self.frame.source,
            "captured_at": iso_utc(self.frame.captured_at),
            "trigger": _trigger_of(self.frame.trigger),
            "published_at": iso_utc(published_at),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "class": cls,
            "anomaly": anomaly,
            "error": self.error,
            "latency_ms": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "model": self.model,
            "truth": self.frame.label,
        })

    def to_message(self, station: str, run_id: str, seq: int, published_at: float) -> dict[str, Any]:
        """The message as published, a dict in wire order (``encode`` gives its bytes)."""
        return self.to_model(station, run_id, seq, published_at).model_dump(mode="json", by_alias=True)


def _trigger_of(trigger: Trigger | None) -> MessageTrigger | None:
    if trigger is None:
        return None
    return MessageTrigger(**{k: getattr(trigger, k) for k in TRIGGER_KEYS})


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
