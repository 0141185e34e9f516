"""`station evaluate` (metrics and report) and `station calibrate` (threshold from good images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import pytest
import yaml

from station.calibrate import choose_threshold
from tests.conftest import run_station


def test_evaluate_holdout_default_writes_a_report(bundle: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = run_station("evaluate", "--model", str(bundle), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    split = json.loads((bundle / "split.json").read_text())
    assert metrics["images"] == len(split["holdout"])  # the held-out split, not the training images
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert sum(map(sum, metrics["confusion_matrix"]["rows_true_cols_predicted"])) == metrics["images"]
    for png in ("confusion.png", "roc.png", "scores.png", "worst.png"):
        assert cv2.imread(str(report / png)) is not None, png
    page = (report / "report.html").read_text()
    assert page.startswith("<!doctype html>") and '<img src="confusion.png">' in page and "</html>" in page
    assert "4-class accuracy" in proc.stdout


def test_evaluate_folder_with_masks_gives_pixel_auroc(bundle: Path, eval_root: Path) -> None:
    proc = run_station("evaluate", "--model", str(bundle), "--data", str(eval_root.parent))
    assert proc.returncode == 0, proc.stderr
    assert "pixel AUROC 0." in proc.stdout or "pixel AUROC 1." in proc.stdout


def test_evaluate_missing_folder_is_a_usage_error(bundle: Path, tmp_path: Path) -> None:
    proc = run_station("evaluate", "--model", str(bundle), "--data", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "nothing" in proc.stderr and "Traceback" not in proc.stderr


def test_calibrate_rewrites_threshold_and_keeps_bundle_valid(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    before = yaml.safe_load((copy / "manifest.yaml").read_text())
    proc = run_station("calibrate", "--model", str(copy), "--good", str(eval_root / "good"),
                       "--target-false-reject", "0.05")
    assert proc.returncode == 0, proc.stderr
    after = yaml.safe_load((copy / "manifest.yaml").read_text())
    record = json.loads((copy / "calibration" / "anomaly_scores.json").read_text())
    assert len(record["good_scores"]) == len(list((eval_root / "good").iterdir()))
    expected, _ = choose_threshold(record["good_scores"], 0.05)
    assert after["anomaly"]["threshold"] == pytest.approx(expected)
    assert after["anomaly"]["threshold"] != before["anomaly"]["threshold"]
    assert "+cal" in after["version"] and "target false-reject rate 0.05" in after["anomaly"]["threshold_method"]
    # The rewritten bundle still verifies (checksums updated) and serves.
    proc = run_station("evaluate", "--model", str(copy))
    assert proc.returncode == 0, proc.stderr


def test_calibrate_refuses_an_empty_folder(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_station("calibrate", "--model", str(bundle), "--good", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "no images" in proc.stderr


def test_choose_threshold_hand_computed() -> None:
    # [1, 2, 3] at a 50 % target: logs 0, 0.6931, 1.0986 have mean 0.5973 and sd 0.5555.
    # Tolerance factor, n = 3, coverage 0.5 (z_p = 0), confidence 0.95 (z_g = 1.6449):
    # a = 1 − 2.7055/4 = 0.3236, b = −2.7055/3 = −0.9018, k = √(−a·b)/a = 1.6693.
    # Bound exp(0.5973 + 1.6693 · 0.5555) = 4.593, above the empirical 'higher' median 2.
    threshold, method = choose_threshold([1.0, 2.0, 3.0], 0.5)
    assert threshold == pytest.approx(4.593, abs=0.003)
    assert "log-normal" in method and "95%-confidence" in method
    # With a 1 % target, 5 scores cannot show the tail: the fit sets it, above the maximum.
    threshold, _ = choose_threshold([1.0, 1.1, 0.9, 1.05, 0.95], 0.01)
    assert threshold > 1.1


def test_tolerance_factor_matches_published_tables() -> None:
    from station.calibrate import tolerance_factor

    # One-sided normal tolerance factors, 99 % coverage (NIST/SEMATECH tables): 95 % confidence,
    # the default, and 90 %.
    assert tolerance_factor(10, 0.99) == pytest.approx(3.981, rel=0.03)
    assert tolerance_factor(20, 0.99) == pytest.approx(3.295, rel=0.03)
    assert tolerance_factor(10, 0.99, 0.90) == pytest.approx(3.532, rel=0.03)
    assert tolerance_factor(20, 0.99, 0.90) == pytest.approx(3.052, rel=0.03)
    # More calibration images: the bound tightens toward the plain quantile z = 2.326.
    ks = [tolerance_factor(n, 0.99) for n in (13, 50, 200, 1000, 100_000)]
    assert ks == sorted(ks, reverse=True) and 2.326 < ks[-1] < 2.34
