"""`station evaluate` and `station calibrate`: a bundle measured, and its threshold set, on labelled images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from station.cli._args import positive_float
from station.errors import EXIT_OK, MissingDependencyError

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register_evaluate(sub: Subparsers) -> None:
    e = sub.add_parser("evaluate", help="score a bundle on labelled images: metrics, plots, HTML report")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--data", type=Path, default=None,
                   help="labelled folder or MVTec category folder (default: the bundle's held-out split)")
    e.add_argument("--report", type=Path, default=None, help="folder for metrics.json, plots and report.html")
    e.add_argument("--threshold", type=float, default=None, help="anomaly threshold (default: the bundle's)")
    e.set_defaults(handler=handle_evaluate)


def handle_evaluate(args: argparse.Namespace) -> int:
    from station.core.accuracy import format_confusion
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.evaluate import check_lines, folder_items, holdout_items, metrics, run_evaluation, write_report

    bundle = load_bundle(args.model)
    items = folder_items(args.data, bundle.manifest.classes) if args.data else holdout_items(bundle)

    pipeline = Pipeline(bundle, anomaly_threshold=args.threshold)
    result = run_evaluation(pipeline, items, keep_overlays=args.report is not None)
    figures = metrics(result, pipeline)

    from station.core.report_format import num

    def fmt(v: float | None) -> str:
        return num(v, 4)

    print(f"{figures['images']} images; 4-class accuracy {fmt(figures['accuracy'])}; image AUROC "
          f"{fmt(figures['image_auroc'])}; pixel AUROC {fmt(figures['pixel_auroc'])}")
    print(f"at threshold {figures['threshold']:.4g}: defective rejected {fmt(figures['defects_rejected'])}, "
          f"good passed {fmt(figures['good_passed'])}")
    print("per class: " + ", ".join(
        f"{k} P {fmt(v['precision'])} R {fmt(v['recall'])}" for k, v in figures["per_class"].items()))
    print("image AUROC per defect: " + ", ".join(f"{k} {fmt(v)}" for k, v in figures["image_auroc_per_defect"].items()))
    cm = figures["confusion_matrix"]
    print(format_confusion(cm["rows_true_cols_predicted"], cm["classes"]))
    print("\n".join(check_lines(figures)))
    if args.report:
        try:
            written = write_report(result, figures, args.report)
        except ImportError as exc:
            raise MissingDependencyError(
                f"the report's plots need matplotlib: pip install 'station[train]' ({exc})"
            ) from exc
        print(f"report: {written[-1]}")
    return EXIT_OK


def register_calibrate(sub: Subparsers) -> None:
    k = sub.add_parser("calibrate", help="recalibrate a bundle's anomaly threshold on good images from the line")
    k.add_argument("--model", type=Path, required=True)
    k.add_argument("--good", type=Path, required=True, help="folder of good bottle images (recursive)")
    k.add_argument("--target-false-reject", type=positive_float, default=0.01,
                   help="fraction of good bottles the threshold may reject (default 0.01)")
    k.set_defaults(handler=handle_calibrate)


def handle_calibrate(args: argparse.Namespace) -> int:
    from station.core.bundle import load_bundle
    from station.tools.calibrate import good_frames, recalibrate

    bundle = load_bundle(args.model)
    frames = good_frames(args.good)
    old = bundle.manifest.anomaly.threshold
    manifest = recalibrate(bundle, frames, args.target_false_reject)
    print(f"{args.model}: anomaly threshold {old:.5g} → {manifest.anomaly.threshold:.5g} "
          f"({manifest.anomaly.threshold_method})")
    mc = manifest.decision.map_classifier
    if mc is not None and "line_good" in mc.fit:
        print(f"{args.model}: map classifier refitted on its {mc.fit['images']} training images and "
              f"{mc.fit['line_good']} good bottles of this line")
    elif mc is not None:
        print(f"{args.model}: map classifier unchanged (the bundle keeps no training features to refit it on: "
              "it was trained before they were kept; retrain it to have calibrate refit the map classifier too)")
    return EXIT_OK
