"""decide(): each rule of the pass/fail policy on hand-made scores, no model involved."""

from __future__ import annotations

import numpy as np
import pytest

from station.core.decide import FAIL, PASS, REASON_ANOMALY, REASON_DEFECT_CLASS, Policy, decide
from station.core.defect_rule import DEFECT_SUM
from station.core.folders import BOTTLE_CLASSES
from station.core.inspector import Scores
from station.core.preprocess import Mouth

THRESHOLD = 5.0
SIZE = 900


def _policy(class_confidence: float = 0.5, min_anomaly: float = 0.0) -> Policy:
    return Policy(classes=BOTTLE_CLASSES, class_confidence=class_confidence, anomaly_threshold=THRESHOLD,
                  canonical_size=SIZE, radius_margin=1.08, classifier_min_anomaly=min_anomaly)


def _scores(probs: tuple[float, ...], score: float, hot_bins: int = 0) -> Scores:
    """Scores with ``hot_bins`` bins of the polar map at ``score`` (the rest 0)."""
    amap = np.zeros((64, 16), np.float32)
    amap[10 : 10 + hot_bins, 8] = score
    return Scores(probabilities=np.asarray(probs, np.float64), anomaly_score=score, anomaly_map=amap,
                  mouth=Mouth(SIZE / 2, SIZE / 2, SIZE / 4))


GOOD_PROBS = (0.9, 0.05, 0.03, 0.02)
BROKEN_PROBS = (0.1, 0.8, 0.05, 0.05)  # broken_large


def test_a_good_bottle_passes_with_no_reasons_and_no_region() -> None:
    d = decide(_scores(GOOD_PROBS, 1.0), _policy())
    assert (d.verdict, d.reasons, d.label) == (PASS, [], "good")
    assert d.confidence == pytest.approx(0.9)
    assert d.scores == pytest.approx(dict(zip(BOTTLE_CLASSES, GOOD_PROBS, strict=True)))
    assert d.region.bbox is None and d.region.area_px == 0


def test_an_anomaly_score_over_the_threshold_fails_a_bottle_the_classifier_calls_good() -> None:
    d = decide(_scores(GOOD_PROBS, 7.5, hot_bins=3), _policy())
    assert (d.verdict, d.reasons, d.label) == (FAIL, [REASON_ANOMALY], "good")
    assert d.region.bbox is not None and d.region.area_px > 0  # where the map is over the threshold


def test_the_anomaly_threshold_is_strict() -> None:
    assert decide(_scores(GOOD_PROBS, THRESHOLD), _policy()).verdict == PASS
    assert decide(_scores(GOOD_PROBS, np.nextafter(THRESHOLD, np.inf)), _policy()).reasons == [REASON_ANOMALY]


def test_a_confident_defect_class_fails_without_support_required() -> None:
    d = decide(_scores(BROKEN_PROBS, 0.5), _policy(min_anomaly=0.0))
    assert (d.verdict, d.reasons, d.label) == (FAIL, [REASON_DEFECT_CLASS], "broken_large")
    assert d.confidence == pytest.approx(0.8)


def test_a_defect_class_needs_the_anomaly_checks_support_when_one_is_set() -> None:
    policy = _policy(min_anomaly=2.0)
    unsupported = decide(_scores(BROKEN_PROBS, 1.9), policy)
    assert (unsupported.verdict, unsupported.reasons) == (PASS, [])
    assert unsupported.label == "broken_large"  # reported, not acted on
    at_support = decide(_scores(BROKEN_PROBS, 2.0), policy)  # "at least": the bound itself supports
    assert (at_support.verdict, at_support.reasons) == (FAIL, [REASON_DEFECT_CLASS])


def test_both_rules_give_both_reasons_classifier_first() -> None:
    d = decide(_scores(BROKEN_PROBS, 9.0, hot_bins=2), _policy(min_anomaly=2.0))
    assert (d.verdict, d.reasons) == (FAIL, [REASON_DEFECT_CLASS, REASON_ANOMALY])


@pytest.mark.parametrize(("confidence", "verdict"), [(0.5, FAIL), (np.nextafter(0.5, 0.0), PASS)])
def test_class_confidence_is_inclusive(confidence: float, verdict: str) -> None:
    rest = (1.0 - confidence) / 3
    d = decide(_scores((rest, confidence, rest, rest), 0.0), _policy(class_confidence=0.5))
    assert d.label == "broken_large" and d.verdict == verdict


def test_a_defect_class_below_the_confidence_passes() -> None:
    d = decide(_scores((0.3, 0.4, 0.2, 0.1), 0.0), _policy(class_confidence=0.5))
    assert (d.verdict, d.label) == (PASS, "broken_large")
    assert d.confidence == pytest.approx(0.4)


def test_a_tie_goes_to_the_first_class_and_good_never_fails_by_class() -> None:
    d = decide(_scores((0.5, 0.5, 0.0, 0.0), 0.0), _policy(class_confidence=0.5))
    assert (d.verdict, d.label) == (PASS, "good")  # argmax takes good, the first of the tie
    d = decide(_scores((0.0, 0.0, 0.5, 0.5), 0.0), _policy(class_confidence=0.5))
    assert (d.verdict, d.label) == (FAIL, "broken_small")


def test_a_confidence_of_one_fails_and_a_threshold_above_one_never_fails_by_class() -> None:
    assert decide(_scores((0.0, 0.0, 0.0, 1.0), 0.0), _policy(class_confidence=1.0)).reasons == [REASON_DEFECT_CLASS]
    assert decide(_scores((0.0, 0.0, 0.0, 1.0), 0.0), _policy(class_confidence=1.01)).verdict == PASS


def _sum_policy(class_confidence: float = 0.5, min_anomaly: float = 0.0) -> Policy:
    return Policy(classes=BOTTLE_CLASSES, class_confidence=class_confidence, anomaly_threshold=THRESHOLD,
                  canonical_size=SIZE, radius_margin=1.08, classifier_min_anomaly=min_anomaly,
                  defect_rule=DEFECT_SUM)


# A faint defect the classifier spreads over two defect classes, each under the confidence.
SPREAD = (0.2, 0.35, 0.3, 0.15)


def test_defect_sum_fails_a_bottle_its_defect_classes_share_and_names_the_likeliest() -> None:
    top = decide(_scores(SPREAD, 0.0), _policy())
    assert (top.verdict, top.label) == (PASS, "broken_large")  # 0.35 is under 0.5: reported, not acted on
    d = decide(_scores(SPREAD, 0.0), _sum_policy())
    assert (d.verdict, d.reasons, d.label) == (FAIL, [REASON_DEFECT_CLASS], "broken_large")
    assert d.confidence == pytest.approx(0.35)  # the named class's own probability, as under top_class
    assert decide(_scores(SPREAD, 0.0), _sum_policy(class_confidence=0.85)).verdict == PASS  # 0.8 under 0.85


def test_defect_sum_names_good_when_good_outweighs_the_defects_together() -> None:
    d = decide(_scores((0.45, 0.5, 0.05, 0.0), 0.0), _sum_policy())
    assert (d.verdict, d.label) == (FAIL, "broken_large")  # as top_class would
    d = decide(_scores((0.55, 0.4, 0.05, 0.0), 0.0), _sum_policy(class_confidence=0.3))
    assert (d.verdict, d.reasons, d.label) == (PASS, [], "good")  # 0.45 is over 0.3, but good is likelier
    d = decide(_scores((0.5, 0.0, 0.25, 0.25), 0.0), _sum_policy())
    assert (d.verdict, d.label) == (FAIL, "broken_small")  # a tie is a defect: the sum reaches 0.5


def test_defect_sum_needs_the_anomaly_checks_support_too() -> None:
    assert decide(_scores(SPREAD, 1.9), _sum_policy(min_anomaly=2.0)).verdict == PASS
    assert decide(_scores(SPREAD, 2.0), _sum_policy(min_anomaly=2.0)).reasons == [REASON_DEFECT_CLASS]
