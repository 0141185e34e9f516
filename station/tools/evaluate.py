"""`station evaluate`: a bundle on a labelled set → metrics.json, plots and a one-page HTML report.

Runs the serving pipeline (ONNX Runtime, no torch), so the figures are what
the station would do. Pixel AUROC compares the anomaly map, brought back into
the canonical view, with MVTec ground-truth masks where they exist.

Novel defects (``test/novel``, kinds no class names) are defects for image and
pixel AUROC and for "defective rejected", but not part of the 4-class accuracy
and confusion matrix: the classifier cannot name them, only reject them.
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from station.core.accuracy import (
    ALL_DEFECTS,
    CHECKS,
    auroc,
    classification_report,
    format_checks,
    format_novel,
    inspected,
    novel_report,
    reject_rates,
    rejection_by_check,
    roc_curve,
)
from station.core.bundle import Bundle
from station.core.decide import FAIL
from station.core.folders import GOOD, NOVEL, LabelledImage, is_image_file, novel_kind
from station.core.overlay import anomaly_overlay, cartesian_map
from station.core.pipeline import Pipeline
from station.core.preprocess import canonical_view
from station.core.report_format import num, pct
from station.errors import DatasetError
from station.sources.folder import load_frame

PIXEL_SIDE = 225  # pixel AUROC is computed at a quarter of the canonical 900×900 view


@dataclass
class Case:
    path: Path
    truth: str
    predicted: str | None
    probabilities: dict[str, float]
    score: float | None
    failed: bool
    error: str | None
    reasons: list[str] = field(default_factory=list)  # the decision's (anomaly, defect_class)
    overlay_source: tuple[np.ndarray, np.ndarray] | None = None  # canonical view, cartesian anomaly map


@dataclass
class EvaluationResult:
    cases: list[Case] = field(default_factory=list)
    pixel_scores: list[np.ndarray] = field(default_factory=list)
    pixel_truth: list[np.ndarray] = field(default_factory=list)


def holdout_items(bundle: Bundle) -> list[LabelledImage]:
    """The images the bundle's training held out (split.json), so evaluation never scores training images."""
    path = bundle.root / "split.json"
    if not path.is_file():
        raise DatasetError(f"{path}: missing; give --data to evaluate on a folder")
    split = json.loads(path.read_text(encoding="utf-8"))
    root = Path(split["root"])
    items = [LabelledImage(root / row["path"], row["label"]) for row in split["holdout"]]
    missing = [str(i.path) for i in items if not i.path.is_file()]
    if missing:
        raise DatasetError(f"held-out images of {bundle.root} are gone (first: {missing[0]}); give --data")
    return items


def folder_items(root: Path, classes: tuple[str, ...]) -> list[LabelledImage]:
    """A labelled folder (class subfolders, perhaps ``novel``) or an MVTec category folder (its test/ split)."""
    if not root.is_dir():
        raise DatasetError(f"evaluation data {root} does not exist or is not a folder")
    base = root / "test" if (root / "test").is_dir() else root
    items = [
        LabelledImage(p, cls)
        for cls in (*classes, NOVEL)
        if (base / cls).is_dir()
        for p in sorted((base / cls).iterdir())
        if is_image_file(p)
    ]
    if not items:
        raise DatasetError(f"{root}: no images in class subfolders ({', '.join(classes)})")
    return items


def ground_truth_mask(image_path: Path, label: str) -> Path | None:
    """MVTec: <cat>/test/<defect>/<name>.png → <cat>/ground_truth/<defect>/<name>_mask.png."""
    if label == GOOD:
        return None
    candidate = image_path.parents[2] / "ground_truth" / label / f"{image_path.stem}_mask.png"
    return candidate if candidate.is_file() else None


def run_evaluation(pipeline: Pipeline, items: list[LabelledImage], keep_overlays: bool = True) -> EvaluationResult:
    m = pipeline.bundle.manifest
    result = EvaluationResult()
    for n, item in enumerate(items):
        frame = load_frame(item.path, n, item.path.parent, "evaluate", item.label)
        verdict = pipeline.process(frame)
        d, sc = verdict.decision, verdict.scores
        case = Case(item.path, item.label, d.label if d else None, d.scores if d else {},
                    d.anomaly_score if d else None, verdict.verdict == FAIL,
                    verdict.error["detail"] if verdict.error else None, list(d.reasons) if d else [])
        if sc is not None and frame.image is not None:
            amap = cartesian_map(sc.anomaly_map, sc.mouth, m.view.radius_margin, m.canonical_size, PIXEL_SIDE)
            view, _ = canonical_view(frame.image, m.canonical_size)
            if keep_overlays:
                case.overlay_source = (cv2.resize(view, (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA), amap)
            mask_path = ground_truth_mask(item.path, item.label)
            if mask_path is not None or item.label == GOOD:
                truth = np.zeros((PIXEL_SIDE, PIXEL_SIDE), bool)
                if mask_path is not None:
                    raw = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
                    if raw is not None:
                        mv, _ = canonical_view(raw, m.canonical_size)
                        small = cv2.resize(mv[:, :, 0], (PIXEL_SIDE, PIXEL_SIDE), interpolation=cv2.INTER_AREA)
                        truth = small > 127
                result.pixel_scores.append(amap.ravel())
                result.pixel_truth.append(truth.ravel())
        result.cases.append(case)
        if (n + 1) % 20 == 0 or n + 1 == len(items):
            print(f"\revaluate: {n + 1}/{len(items)} images", end="\n" if n + 1 == len(items) else "",
                  file=sys.stderr, flush=True)
    return result


def metrics(result: EvaluationResult, pipeline: Pipeline) -> dict[str, Any]:
    m = pipeline.bundle.manifest
    ok = [c for c in result.cases if c.predicted is not None]
    truth = [c.truth for c in ok]
    is_defect = [t != GOOD for t in truth]
    scores = [c.score for c in ok if c.score is not None]
    named = [c for c in ok if c.truth in m.classes]  # novel defects have no row in a 4-class confusion
    report = classification_report([c.truth for c in named], [c.predicted or "" for c in named], m.classes)
    bottles = [inspected(c.truth, c.predicted or "", c.score or 0.0, c.reasons, c.failed,
                         novel_kind(c.path) if c.truth == NOVEL else None) for c in ok]
    rejected, passed = reject_rates([c.truth for c in result.cases], [c.failed for c in result.cases], GOOD)
    pixel = None
    defective_masks = sum(int(t.any()) for t in result.pixel_truth)
    if result.pixel_scores and defective_masks:
        pixel = auroc(np.concatenate(result.pixel_scores), np.concatenate(result.pixel_truth))
    per_defect_auroc = {}
    for cls in m.classes:
        if cls == GOOD:
            continue
        sel = [c for c in ok if c.truth in (GOOD, cls)]
        per_defect_auroc[cls] = auroc([c.score or 0.0 for c in sel], [c.truth == cls for c in sel])
    return {
        "model": {"name": m.name, "version": m.version},
        "threshold": pipeline.policy.anomaly_threshold,
        "class_confidence": pipeline.policy.class_confidence,
        "defect_rule": pipeline.policy.defect_rule,
        "images": len(result.cases),
        "unreadable": sum(1 for c in result.cases if c.error),
        **report,
        "image_auroc": auroc(scores, is_defect),
        "image_auroc_per_defect": per_defect_auroc,
        "pixel_auroc": pixel,
        "pixel_auroc_images": len(result.pixel_scores),
        "defects_rejected": rejected,
        "good_passed": passed,
        "reject_by_check": rejection_by_check(bottles, GOOD, [c for c in m.classes if c != GOOD]),
        "novel": novel_report(bottles, GOOD, NOVEL),
    }


def check_lines(figures: dict[str, Any]) -> list[str]:
    """The printed summary's lines on each check alone and on novel defects."""
    return format_checks(figures["reject_by_check"]) + format_novel(figures["novel"])


def write_report(result: EvaluationResult, figures: dict[str, Any], out: Path, worst: int = 6) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    (out / "metrics.json").write_text(json.dumps(figures, indent=2), encoding="utf-8")
    classes = figures["confusion_matrix"]["classes"]
    cm = np.array(figures["confusion_matrix"]["rows_true_cols_predicted"])

    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="black")
    ax.set_title(f"accuracy {figures['accuracy']:.3f}" if figures["accuracy"] is not None else "confusion")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)

    ok = [c for c in result.cases if c.score is not None]
    s = [c.score or 0.0 for c in ok]
    y = [c.truth != GOOD for c in ok]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if any(y) and not all(y):
        fpr, tpr, _ = roc_curve(s, y)
        ax.plot(fpr, tpr, label=f"anomaly score (AUROC {figures['image_auroc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set_xlabel("good bottles rejected (FPR)")
    ax.set_ylabel("defective bottles rejected (TPR)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = list(np.linspace(min(s, default=0), max(s, default=1), 40))
    ax.hist([v for v, d in zip(s, y, strict=True) if not d], bins=bins, alpha=0.6, label="good")
    ax.hist([v for v, d in zip(s, y, strict=True) if d], bins=bins, alpha=0.6, label="defective")
    ax.axvline(figures["threshold"], color="red", ls="--", label=f"threshold {figures['threshold']:.3g}")
    ax.set_xlabel("anomaly score")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=100)
    plt.close(fig)
    written += [out / "confusion.png", out / "roc.png", out / "scores.png"]

    # Worst cases: the defects scored lowest and the good bottles scored highest.
    with_overlay = [c for c in ok if c.overlay_source is not None]
    worst_defects = sorted((c for c in with_overlay if c.truth != GOOD), key=lambda c: c.score or 0.0)[: worst // 2]
    worst_good = sorted((c for c in with_overlay if c.truth == GOOD), key=lambda c: -(c.score or 0.0))[: worst // 2]
    tiles = []
    for c in worst_defects + worst_good:
        assert c.overlay_source is not None
        tile = anomaly_overlay(*c.overlay_source, figures["threshold"])
        cv2.putText(tile, f"{c.truth} {c.score:.2f}", (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        tiles.append(tile)
    worst_rows: list[tuple[str, str, str, str]] = [
        (c.path.name, c.truth, c.predicted or "", f"{c.score:.3f}") for c in worst_defects + worst_good
    ]
    if tiles:
        cv2.imwrite(str(out / "worst.png"), np.hstack(tiles))
        written.append(out / "worst.png")

    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{pct(v['precision'])}</td><td>{pct(v['recall'])}</td>"
        f"<td>{v['support']}</td></tr>"
        for k, v in figures["per_class"].items()
    )
    worst_html = "".join(f"<tr>{''.join(f'<td>{html.escape(x)}</td>' for x in r)}</tr>" for r in worst_rows)

    def check_row(name: str, r: dict[str, Any], extra: str = "") -> str:
        return (f"<tr><td>{html.escape(name)}</td><td>{r['images']}</td>{extra}"
                + "".join(f"<td>{pct(r[check])}</td>" for check in CHECKS) + "</tr>")

    by_check = figures["reject_by_check"]
    check_rows = "".join(check_row("all defects" if g == ALL_DEFECTS else g, r)
                         for g, r in by_check["rejected"].items())
    check_rows += check_row("good passed", by_check["good_passed"])
    novel = figures["novel"]
    novel_html = ""
    if novel is not None:
        kind_rows = "".join(check_row(k, f, f"<td>{num(f['image_auroc'])}</td>") for k, f in novel["per_kind"].items())
        predicted = ", ".join(f"{html.escape(k)} {v}" for k, v in novel["predicted"].items())
        novel_html = (
            f"<h2>Novel defects</h2><p>{novel['images']} images of defect kinds no class names: image AUROC "
            f"against good bottles {num(novel['image_auroc'])}; the classifier called them {predicted}.</p>"
            + (f"<table><tr><th>kind</th><th>images</th><th>image AUROC</th><th>anomaly only</th>"
               f"<th>classifier only</th><th>combined</th></tr>{kind_rows}</table>" if kind_rows else "")
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>station evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:1em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>Evaluation of {html.escape(figures['model']['name'])} {html.escape(figures['model']['version'])}</h1>
<p>{figures['images']} images ({figures['unreadable']} unreadable). Threshold {figures['threshold']:.4g},
class confidence {figures['class_confidence']} ({html.escape(figures['defect_rule'])}).</p>
<table><tr><th>4-class accuracy</th><th>image AUROC</th><th>pixel AUROC</th><th>defective rejected</th>
<th>good passed</th></tr><tr><td>{pct(figures['accuracy'])}</td><td>{num(figures['image_auroc'])}</td>
<td>{num(figures['pixel_auroc'])}</td><td>{pct(figures['defects_rejected'])}</td>
<td>{pct(figures['good_passed'])}</td></tr></table>
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>images</th></tr>{rows}</table>
<h2>Each check alone</h2><p>Share rejected by the anomaly check alone (score above the threshold, whatever
the classifier says), by the classifier alone (defective at or above the class confidence, by the
bundle's defect rule) and by both (the verdict); last row: good bottles passed under each.</p>
<table><tr><th>bottles</th><th>images</th><th>anomaly only</th><th>classifier only</th><th>combined</th></tr>
{check_rows}</table>
{novel_html}
<p><img src="confusion.png"> <img src="roc.png"></p><p><img src="scores.png"></p>
<h2>Worst cases</h2><p>Defects with the lowest anomaly scores, then good bottles with the highest
(heat map: anomaly map; white outline: above threshold).</p>
<p><img src="worst.png"></p><table><tr><th>file</th><th>truth</th><th>predicted</th><th>score</th></tr>
{worst_html}</table></body></html>"""
    (out / "report.html").write_text(page, encoding="utf-8")
    written.append(out / "report.html")
    return written
