"""Metrics checked against hand-computed cases."""

from __future__ import annotations

import pytest

from station.evaluation import auroc, classification_report, confusion_matrix


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
    from station.evaluation import reject_rates

    truth = ["good", "good", "bad", "bad", "bad"]
    failed = [False, True, True, True, False]
    assert reject_rates(truth, failed, "good") == (pytest.approx(2 / 3), pytest.approx(1 / 2))
    assert reject_rates(["good"], [False], "good") == (None, 1.0)
