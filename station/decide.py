"""Decision policy: scores → pass/fail with reasons. Errors are failures, never passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.anomaly import Region, region
from station.inspector import Scores
from station.mvtec import GOOD

PASS = "pass"
FAIL = "fail"
SKIPPED = "skipped"

REASON_DEFECT_CLASS = "defect_class"
REASON_ANOMALY = "anomaly"
REASON_ERROR = "error"
REASON_OVERLOAD = "overload"
#: a frame captured before a stop, left uninspected because a second stop signal asked to finish now
REASON_SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Policy:
    classes: tuple[str, ...]
    class_confidence: float  # a defect class at or above this probability fails the bottle
    anomaly_threshold: float  # an anomaly score above this fails the bottle
    canonical_size: int
    radius_margin: float  # of the polar view, to map anomaly regions back into the canonical view


@dataclass
class Decision:
    verdict: str
    reasons: list[str]
    label: str
    confidence: float
    scores: dict[str, float]
    anomaly_score: float
    region: Region


def decide(scores: Scores, policy: Policy) -> Decision:
    probs = scores.probabilities
    idx = int(np.argmax(probs))
    label = policy.classes[idx]
    confidence = float(probs[idx])
    reasons: list[str] = []
    if label != GOOD and confidence >= policy.class_confidence:
        reasons.append(REASON_DEFECT_CLASS)
    if scores.anomaly_score > policy.anomaly_threshold:
        reasons.append(REASON_ANOMALY)
    return Decision(
        verdict=FAIL if reasons else PASS,
        reasons=reasons,
        label=label,
        confidence=confidence,
        scores={c: float(p) for c, p in zip(policy.classes, probs, strict=True)},
        anomaly_score=scores.anomaly_score,
        region=region(scores.anomaly_map, policy.anomaly_threshold, scores.mouth, policy.radius_margin,
                      policy.canonical_size),
    )
