"""Decision policy: scores → pass/fail with reasons. Errors are failures, never passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core.anomaly import Region, region
from station.core.folders import GOOD
from station.core.inspector import Scores

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
    #: the classifier alone fails a bottle only when its anomaly score is at least this (0: always).
    #: A classifier trained on a handful of images per class misnames good bottles far more often than
    #: the good-only anomaly check flags them; requiring the anomaly check's support bounds its false
    #: rejects by the share of good bottles scoring this high (docs/models.md, "The decision").
    classifier_min_anomaly: float = 0.0


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
    """The bottle's verdict from its model scores: the one place pass/fail is decided.

    Two rules, either fails the bottle, both may:

    - ``defect_class``: the classifier's top class is a defect, with probability at least
      ``class_confidence``, and the anomaly score is at least ``classifier_min_anomaly`` (the
      anomaly check's support; 0 means the classifier alone suffices);
    - ``anomaly``: the anomaly score is strictly above ``anomaly_threshold``.

    Otherwise the bottle passes, whatever the classifier says (a defect class under the confidence
    or without support is reported as ``label``, not acted on). ``label`` and ``confidence`` are the
    top class and its probability (the first class on a tie); ``region`` is where the anomaly map
    is above the threshold. Pure: no state, no I/O; frames that could not be scored never get here
    (they become error verdicts, which fail).
    """
    probs = scores.probabilities
    idx = int(np.argmax(probs))
    label = policy.classes[idx]
    confidence = float(probs[idx])
    reasons: list[str] = []
    if (label != GOOD and confidence >= policy.class_confidence
            and scores.anomaly_score >= policy.classifier_min_anomaly):
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
