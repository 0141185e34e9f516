"""Decision policy: scores → pass/fail with reasons. Errors are failures, never passes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from station.core.anomaly import Region, region
from station.core.defect_rule import TOP_CLASS, DefectRule
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
    class_confidence: float  # defective at or above this probability (by ``defect_rule``) fails the bottle
    anomaly_threshold: float  # an anomaly score above this fails the bottle
    canonical_size: int
    radius_margin: float  # of the polar view, to map anomaly regions back into the canonical view
    #: the classifier alone fails a bottle only when its anomaly score is at least this (0: always).
    #: A classifier trained on a handful of images per class misnames good bottles far more often than
    #: the good-only anomaly check flags them; requiring the anomaly check's support bounds its false
    #: rejects by the share of good bottles scoring this high (docs/models.md, "The decision").
    classifier_min_anomaly: float = 0.0
    #: top_class: the top class is a defect at ``class_confidence`` or more (bundles before 2026-12-08);
    #: defect_sum: the defect classes together reach it (1 − P(good) ≥ ``class_confidence``), and the label
    #: is the likeliest defect. A faint defect the classifier spreads over two defect classes, each under
    #: the confidence, fails under the second (docs/models.md, "The decision").
    defect_rule: DefectRule = TOP_CLASS


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

    - ``defect_class``: the classifier calls the bottle defective with probability at least
      ``class_confidence``, and the anomaly score is at least ``classifier_min_anomaly`` (the
      anomaly check's support; 0 means the classifier alone suffices). What "defective with
      probability p" means is the policy's ``defect_rule``: the top class is a defect at p
      (``top_class``), or the defect classes sum to p (``defect_sum``);
    - ``anomaly``: the anomaly score is strictly above ``anomaly_threshold``.

    Otherwise the bottle passes, whatever the classifier says (a defect class under the confidence
    or without support is reported as ``label``, not acted on). ``label`` and ``confidence`` are the
    class named and its probability: under ``top_class`` the top class (the first on a tie); under
    ``defect_sum`` good when P(good) is more than the defect classes' sum, else the likeliest defect.
    ``region`` is where the anomaly map is above the threshold. Pure: no state, no I/O; frames that
    could not be scored never get here (they become error verdicts, which fail).
    """
    probs = scores.probabilities
    idx, defective = _named_class(probs, policy)
    label = policy.classes[idx]
    confidence = float(probs[idx])
    reasons: list[str] = []
    if (label != GOOD and defective >= policy.class_confidence
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


def _named_class(probs: np.ndarray, policy: Policy) -> tuple[int, float]:
    """The index of the class the bottle is named, and the probability the rule weighs against the confidence."""
    if policy.defect_rule == TOP_CLASS:
        idx = int(np.argmax(probs))
        return idx, float(probs[idx])
    good = policy.classes.index(GOOD)
    defects = [i for i in range(len(policy.classes)) if i != good]
    defective = float(sum(float(probs[i]) for i in defects))
    if float(probs[good]) > defective:
        return good, defective
    return max(defects, key=lambda i: float(probs[i])), defective
