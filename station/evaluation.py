"""Classification and anomaly-detection metrics, in numpy (no sklearn on a station)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    index = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        cm[index[t], index[p]] += 1
    return cm


def auroc(scores: Sequence[float] | np.ndarray, positive: Sequence[bool] | np.ndarray) -> float | None:
    """Area under the ROC curve (probability a positive outranks a negative; ties count half).

    Vectorised (Mann–Whitney U with average ranks), so millions of pixels are
    fine. None when one of the two groups is empty, where AUROC is undefined.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = float(average_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def roc_curve(scores: Sequence[float], positive: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rates, true-positive rates and the thresholds (score ≥ t is positive)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    tpr = np.array([(s[y] >= t).mean() if y.any() else 0.0 for t in thresholds])
    fpr = np.array([(s[~y] >= t).mean() if (~y).any() else 0.0 for t in thresholds])
    return fpr, tpr, thresholds


def reject_rates(truth: Sequence[str], failed: Sequence[bool], good: str) -> tuple[float | None, float | None]:
    """Fraction of defective bottles failed, and of good bottles passed (None where there are none)."""
    defect_fails = [f for t, f in zip(truth, failed, strict=True) if t != good]
    good_fails = [f for t, f in zip(truth, failed, strict=True) if t == good]
    rejected = sum(defect_fails) / len(defect_fails) if defect_fails else None
    passed = sum(not f for f in good_fails) / len(good_fails) if good_fails else None
    return rejected, passed


def classification_report(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> dict[str, Any]:
    cm = confusion_matrix(truth, predicted, classes)
    total = int(cm.sum())
    correct = int(np.trace(cm))
    per_class: dict[str, dict[str, float | int | None]] = {}
    for i, c in enumerate(classes):
        support = int(cm[i].sum())
        predicted_n = int(cm[:, i].sum())
        per_class[c] = {
            "support": support,
            "recall": cm[i, i] / support if support else None,
            "precision": cm[i, i] / predicted_n if predicted_n else None,
        }
    return {
        "n": total,
        "accuracy": correct / total if total else None,
        "per_class": per_class,
        "confusion_matrix": {"classes": list(classes), "rows_true_cols_predicted": cm.tolist()},
    }


def format_confusion(cm: list[list[int]], classes: Sequence[str]) -> str:
    width = max(len(c) for c in classes) + 2
    head = " " * width + "".join(f"{c[:12]:>14}" for c in classes)
    rows = [head]
    for c, row in zip(classes, cm, strict=True):
        rows.append(f"{c:<{width}}" + "".join(f"{v:>14}" for v in row))
    return "\n".join(rows)
