"""Metrics checked against hand-computed cases."""

from __future__ import annotations

import pytest

from station.core.accuracy import auroc, classification_report, confusion_matrix


def test_auroc_hand_computed() -> None:
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) → 3/4
    assert auroc([0.8, 0.4, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    # a tie between a positive and a negative counts half
    assert auroc([0.5, 0.5], [True, False]) == pytest.approx(0.5)
    assert auroc([0.1, 0.2], [True, True]) is None


def test_confusion_and_report() -> None:
    classes = ["good", "bad"]
    truth = ["good", "good", "good", "bad", "bad"]
    pred = ["good", "bad", "good", "bad", "good"]
    assert confusion_matrix(truth, pred, classes).tolist() == [[2, 1], [1, 1]]
    r = classification_report(truth, pred, classes)
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["per_class"]["good"]["recall"] == pytest.approx(2 / 3)
    assert r["per_class"]["good"]["precision"] == pytest.approx(2 / 3)
    assert r["per_class"]["bad"]["recall"] == pytest.approx(1 / 2)


def test_reject_rates_hand_computed() -> None:
    from station.core.accuracy import reject_rates

    truth = ["good", "good", "bad", "bad", "bad"]
    failed = [False, True, True, True, False]
    assert reject_rates(truth, failed, "good") == (pytest.approx(2 / 3), pytest.approx(1 / 2))
    assert reject_rates(["good"], [False], "good") == (None, 1.0)


def test_checks_read_off_the_decisions_reasons_hand_computed() -> None:
    from station.core.accuracy import inspected, novel_report, rejection_by_check

    bottles = [
        inspected("good", "good", 1.0, [], False),
        inspected("good", "bad", 3.0, ["defect_class"], True),
        inspected("bad", "bad", 5.0, ["defect_class", "anomaly"], True),
        inspected("bad", "good", 4.0, ["anomaly"], True),
        inspected("bad", "good", 0.5, [], False),
        inspected("novel", "bad", 2.0, ["anomaly"], True, kind="crack"),
        inspected("novel", "good", 0.2, [], False, kind="stain"),
    ]
    figures = rejection_by_check(bottles, "good", ["bad", "other"])
    bad = figures["rejected"]["bad"]
    assert bad["images"] == 3
    assert (bad["anomaly"], bad["classifier"], bad["combined"]) == pytest.approx((2 / 3, 1 / 3, 2 / 3))
    # a class with no images keeps its row; a defect that is no class gets one
    assert figures["rejected"]["other"] == {"images": 0, "anomaly": None, "classifier": None, "combined": None}
    assert figures["rejected"]["novel"] == {"images": 2, "anomaly": 0.5, "classifier": 0.0, "combined": 0.5}
    every = figures["rejected"]["all_defects"]
    assert every["images"] == 5 and every["anomaly"] == pytest.approx(3 / 5) and every["combined"] == 0.6
    assert figures["good_passed"] == {"images": 2, "anomaly": 1.0, "classifier": 0.5, "combined": 0.5}

    novel = novel_report(bottles, "good", "novel")
    assert novel is not None
    # novel scores 2.0 and 0.2 against good 1.0 and 3.0: of 4 pairs only 2.0 > 1.0 is ranked right
    assert novel["images"] == 2 and novel["image_auroc"] == pytest.approx(0.25)
    assert novel["predicted"] == {"bad": 1, "good": 1}
    assert novel["per_kind"]["crack"]["image_auroc"] == pytest.approx(0.5)
    assert novel["per_kind"]["stain"] == {"images": 1, "image_auroc": 0.0, "anomaly": 0.0, "classifier": 0.0,
                                          "combined": 0.0}
    assert novel_report(bottles[:5], "good", "novel") is None
