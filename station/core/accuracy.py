"""Classification and anomaly-detection metrics, in numpy (no sklearn on a station)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from station.core.decide import REASON_ANOMALY, REASON_DEFECT_CLASS
from station.core.report_format import num, pct

#: The rejections compared per group of bottles: each check of the decision on its own (its reason
#: among the decision's reasons, whatever the other check said), and both together (the verdict).
CHECKS: tuple[str, ...] = ("anomaly", "classifier", "combined")
ALL_DEFECTS = "all_defects"


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


@dataclass(frozen=True)
class Inspected:
    """One inspected bottle as serving decided it."""

    truth: str
    predicted: str
    score: float
    rejected: Mapping[str, bool]  # by each of CHECKS
    kind: str | None = None  # a novel defect's kind, where its file name records one


def inspected(truth: str, predicted: str, score: float, reasons: Sequence[str], failed: bool,
              kind: str | None = None) -> Inspected:
    """Read the checks off the decision's own reasons, so the figures are what the station did.

    Recomputing ``score > threshold`` here would be a second definition that could drift from
    station/core/decide.py's.
    """
    rejected = {"anomaly": REASON_ANOMALY in reasons, "classifier": REASON_DEFECT_CLASS in reasons,
                "combined": failed}
    return Inspected(truth, predicted, score, rejected, kind)


def _check_rates(bottles: Sequence[Inspected], passed: bool = False) -> dict[str, Any]:
    """Share of ``bottles`` each check rejected (or, with ``passed``, let through); None for no bottles."""
    row: dict[str, Any] = {"images": len(bottles)}
    for check in CHECKS:
        hits = [not b.rejected[check] if passed else b.rejected[check] for b in bottles]
        row[check] = sum(hits) / len(hits) if hits else None
    return row


def rejection_by_check(bottles: Sequence[Inspected], good: str, defects: Sequence[str]) -> dict[str, Any]:
    """Per defect group and over all defects, the share each check rejects; of good bottles, the share passed.

    Every class in ``defects`` gets a row (None where it has no images) so the keys do not depend on
    the data; a defect label that is not a class (``novel``) gets its own row when present.
    """
    others = sorted({b.truth for b in bottles if b.truth != good and b.truth not in defects})
    rejected = {g: _check_rates([b for b in bottles if b.truth == g]) for g in [*defects, *others]}
    rejected[ALL_DEFECTS] = _check_rates([b for b in bottles if b.truth != good])
    return {"rejected": rejected, "good_passed": _check_rates([b for b in bottles if b.truth == good], passed=True)}


def novel_report(bottles: Sequence[Inspected], good: str, novel: str) -> dict[str, Any] | None:
    """Defects of kinds no class names: how well the anomaly score separates them from good bottles
    (image AUROC), what each check rejects, and which class the classifier took them for."""
    found = [b for b in bottles if b.truth == novel]
    if not found:
        return None
    good_scores = [b.score for b in bottles if b.truth == good]

    def figures(group: list[Inspected]) -> dict[str, Any]:
        separation = auroc([b.score for b in group] + good_scores, [True] * len(group) + [False] * len(good_scores))
        rates = _check_rates(group)
        return {"images": rates.pop("images"), "image_auroc": separation, **rates}

    kinds = sorted({b.kind for b in found if b.kind is not None})
    return {
        **figures(found),
        "predicted": dict(Counter(b.predicted for b in found).most_common()),
        "per_kind": {k: figures([b for b in found if b.kind == k]) for k in kinds},
    }


def format_checks(by_check: dict[str, Any]) -> list[str]:
    """``rejection_by_check`` as a text table: a row per defect group, then good bottles passed."""
    rows = [(g.replace("_", " ") if g == ALL_DEFECTS else g, r) for g, r in by_check["rejected"].items()]
    rows.append(("good passed", by_check["good_passed"]))
    width = max(len(name) for name, _ in rows) + 2
    lines = ["rejected by each check alone and combined (the verdict); last row: good bottles passed",
             f"  {'':<{width}}{'images':>7}{'anomaly':>11}{'classifier':>12}{'combined':>11}"]
    for name, r in rows:
        lines.append(f"  {name:<{width}}{r['images']:>7}{pct(r['anomaly']):>11}{pct(r['classifier']):>12}"
                     f"{pct(r['combined']):>11}")
    return lines


def format_novel(novel: dict[str, Any] | None) -> list[str]:
    """``novel_report`` as text lines (none when there were no novel defects)."""
    if novel is None:
        return []

    def one(f: dict[str, Any]) -> str:
        auc = num(f["image_auroc"])
        return (f"{f['images']} images, image AUROC vs good {auc}, rejected by anomaly {pct(f['anomaly'])}, "
                f"classifier {pct(f['classifier'])}, combined {pct(f['combined'])}")

    lines = [f"novel defects: {one(novel)}",
             "novel classified as: " + ", ".join(f"{k} {v}" for k, v in novel["predicted"].items())]
    lines += [f"  novel {kind}: {one(f)}" for kind, f in novel["per_kind"].items()]
    return lines
