"""What a different threshold would have done: verdicts that flip, and what it means for reviewed rejects.

The decision rule is the station's (station/core/decide.py): fail when the
classifier calls the bottle defective at or above the class confidence (its top
class, or its defect classes' sum, by the rule asked for) with an anomaly score
at least the classifier's support, or the anomaly score is above the threshold.
Frames that were not inspected (errors, skipped) keep their verdict: no
threshold passes a frame nobody could look at. Nothing here changes the line;
applying a threshold is a config change and a reload, done by a person.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from station.core.defect_rule import DEFECT_SUM, TOP_CLASS, DefectRule
from station.core.folders import GOOD
from station.ui.live import compact
from station.ui.reviews import CONFIRMED, FALSE_REJECT, Review

Row = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    threshold: float
    #: None: the defect-class check as the station made it (the confidence it used is not in the message)
    class_confidence: float | None = None
    #: with a class confidence: the anomaly score the classifier alone needs (decision.classifier_min_anomaly)
    classifier_min_anomaly: float = 0.0
    #: with a class confidence: top_class or defect_sum (decision.defect_rule; the bundle's manifest says which)
    defect_rule: DefectRule = DEFECT_SUM


def decide(row: Row, rule: Rule) -> str:
    """``pass`` or ``fail`` under ``rule`` for an inspected row; the row's own verdict otherwise."""
    score = row.get("score")
    if row.get("verdict") == "skipped" or row.get("error") is not None or not isinstance(score, (int, float)):
        return str(row.get("verdict"))
    if rule.class_confidence is None:
        defect = "defect_class" in (row.get("reasons") or [])
    else:
        defective = _defective(row, rule.defect_rule)
        defect = defective is not None and defective >= rule.class_confidence and score >= rule.classifier_min_anomaly
    return "fail" if defect or score > rule.threshold else "pass"


def _defective(row: Row, defect_rule: DefectRule) -> float | None:
    """What the rule weighs against the class confidence, as station/core/decide.py does; None: never a defect."""
    if defect_rule == TOP_CLASS:
        confidence = row.get("confidence")
        return float(confidence) if row.get("label") != GOOD and isinstance(confidence, (int, float)) else None
    good, defects = row.get("good_probability"), row.get("defect_probability")
    if not isinstance(good, (int, float)) or not isinstance(defects, (int, float)) or good > defects:
        return None
    return float(defects)


def evaluate(rows: list[Row], reviews: dict[str, Review], rule: Rule) -> dict[str, Any]:
    flips = {"fail_to_pass": 0, "pass_to_fail": 0}
    inspected = 0
    for row in rows:
        if row.get("verdict") not in ("pass", "fail") or row.get("error") is not None:
            continue
        inspected += 1
        now = decide(row, rule)
        if now != row["verdict"]:
            flips["fail_to_pass" if now == "pass" else "pass_to_fail"] += 1
    passed_good: list[Row] = []
    let_through: list[Row] = []
    still_rejected_good = 0
    for entry_id, review in sorted(reviews.items()):
        row = compact(review.message)
        if decide(row, rule) != "pass":
            still_rejected_good += review.outcome == FALSE_REJECT
            continue
        item = {"id": entry_id, "seq": row["seq"], "frame_id": row["frame_id"], "score": row["score"],
                "label": row["label"], "confidence": row["confidence"], "true_class": review.true_class}
        (passed_good if review.outcome == FALSE_REJECT else let_through).append(item)
    return {
        "threshold": rule.threshold, "class_confidence": rule.class_confidence,
        "classifier_min_anomaly": rule.classifier_min_anomaly, "defect_rule": rule.defect_rule,
        "verdicts": len(rows), "inspected": inspected, **flips,
        "false_rejects_passed": passed_good, "false_rejects_still_rejected": still_rejected_good,
        "confirmed_let_through": let_through,
        "reviewed": {"false_reject": sum(r.outcome == FALSE_REJECT for r in reviews.values()),
                     "confirmed": sum(r.outcome == CONFIRMED for r in reviews.values())},
    }
