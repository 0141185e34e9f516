"""Collects the verdicts of a replay and sums them up (accuracy, recall, confusion, AUROC).

Images under ``novel/`` are defects of kinds no class names: they count as
defects (AUROC, defective rejected, each check's rejections) but stay out of
the 4-class accuracy and confusion matrix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from station.core.accuracy import (
    Inspected,
    auroc,
    classification_report,
    format_checks,
    format_confusion,
    format_novel,
    inspected,
    novel_report,
    reject_rates,
    rejection_by_check,
)
from station.core.decide import FAIL, PASS, SKIPPED
from station.core.folders import GOOD, NOVEL, novel_kind
from station.core.report_format import num, pct, percentile
from station.core.verdict import Verdict


class ReplayCollector:
    """A Station sink: remembers what each labelled verdict said, for the summary."""

    def __init__(self, classes: tuple[str, ...]) -> None:
        self.classes = classes
        self.started = time.monotonic()
        self.verdicts = 0
        self.counts = {PASS: 0, FAIL: 0, SKIPPED: 0}
        self.errors: dict[str, int] = {}
        self.truth: list[str] = []
        self.predicted: list[str] = []
        self.anomaly_scores: list[float] = []
        self.defect_probs: list[float] = []
        self.failed: list[bool] = []
        self.bottles: list[Inspected] = []
        self.latency_total: list[float] = []

    def restart_clock(self) -> None:
        """Measure throughput from now (after waiting for subscribers), not from construction."""
        self.started = time.monotonic()

    def __call__(self, verdict: Verdict, message: dict[str, Any]) -> None:
        self.verdicts += 1
        self.counts[verdict.verdict] = self.counts.get(verdict.verdict, 0) + 1
        if verdict.error is not None:
            reason = verdict.error["reason"]
            self.errors[reason] = self.errors.get(reason, 0) + 1
        if "total" in verdict.latency_ms:
            self.latency_total.append(verdict.latency_ms["total"])
        d = verdict.decision
        truth = verdict.frame.label
        if d is None or truth is None:
            return
        self.truth.append(truth)
        self.predicted.append(d.label)
        self.anomaly_scores.append(d.anomaly_score)
        self.defect_probs.append(1.0 - d.scores.get(GOOD, 0.0))
        self.failed.append(verdict.verdict == FAIL)
        kind = novel_kind(Path(verdict.frame.frame_id)) if truth == NOVEL else None
        self.bottles.append(inspected(truth, d.label, d.anomaly_score, d.reasons, verdict.verdict == FAIL, kind))

    def summary(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        out: dict[str, Any] = {
            "verdicts": self.verdicts,
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            "elapsed_s": round(elapsed, 3),
            "bottles_per_s": round(self.verdicts / elapsed, 2) if elapsed > 0 else None,
        }
        if self.latency_total:
            out["latency_ms"] = {
                "p50": round(percentile(self.latency_total, 50), 2),
                "p99": round(percentile(self.latency_total, 99), 2),
            }
        if self.truth:
            is_defect = [t != GOOD for t in self.truth]
            named = [i for i, t in enumerate(self.truth) if t in self.classes]
            report = classification_report([self.truth[i] for i in named], [self.predicted[i] for i in named],
                                           self.classes)
            rejected, passed = reject_rates(self.truth, self.failed, GOOD)
            out["labelled"] = {
                **report,
                "image_auroc": auroc(self.anomaly_scores, is_defect),
                "classifier_defect_auroc": auroc(self.defect_probs, is_defect),
                "defects_rejected": rejected,
                "good_passed": passed,
                "reject_by_check": rejection_by_check(self.bottles, GOOD, [c for c in self.classes if c != GOOD]),
                "novel": novel_report(self.bottles, GOOD, NOVEL),
            }
        return out


def format_summary(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    lines = [
        f"verdicts: {summary['verdicts']}  pass {c.get(PASS, 0)}  fail {c.get(FAIL, 0)}  "
        f"skipped {c.get(SKIPPED, 0)}  errors {sum(summary['errors'].values())}"
        + (f" {summary['errors']}" if summary["errors"] else ""),
        f"throughput: {summary['bottles_per_s']} bottles/s over {summary['elapsed_s']} s",
    ]
    if "latency_ms" in summary:
        lines.append(f"latency (capture→publish): p50 {summary['latency_ms']['p50']} ms, "
                     f"p99 {summary['latency_ms']['p99']} ms")
    lab = summary.get("labelled")
    if lab:
        novel = lab.get("novel")
        lines.append(f"accuracy (4-class): {pct(lab['accuracy'])} on {lab['n']} labelled images"
                     + (f" (novel defects excluded: {novel['images']})" if novel else ""))
        lines.append("recall: " + ", ".join(f"{k} {pct(v['recall'])}" for k, v in lab["per_class"].items()))
        auc = lab["image_auroc"]
        lines.append(f"image AUROC (anomaly score): {num(auc)}")
        lines.append(f"defective bottles rejected: {pct(lab['defects_rejected'])}; "
                     f"good bottles passed: {pct(lab['good_passed'])}")
        cm = lab["confusion_matrix"]
        lines.append("confusion matrix (rows: truth, columns: predicted):")
        lines.append(format_confusion(cm["rows_true_cols_predicted"], cm["classes"]))
        lines += format_checks(lab["reject_by_check"]) + format_novel(novel)
    return "\n".join(lines)
