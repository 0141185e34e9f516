"""`station adapt`: a bundle carried to a line it never saw, with that line's good bottles only."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_station, shared_once


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _judged(model: Path, data: Path, report: Path) -> dict[str, Any]:
    proc = run_station("evaluate", "--model", str(model), "--data", str(data), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    figures: dict[str, Any] = json.loads((report / "metrics.json").read_text())
    return figures


@pytest.fixture(scope="module")
def backlit_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backlit line: 16 good bottles to adapt on, and a labelled set of 2 a class to judge on."""
    def make(out: Path) -> None:
        for args in (("--out", str(out / "good"), "--seed", "21", "--train-good", "16", "--test-per-class", "0"),
                     ("--out", str(out / "judge"), "--seed", "22", "--train-good", "0", "--test-per-class", "2")):
            proc = run_station("synth", "--style", "backlit", *args)
            assert proc.returncode == 0, proc.stderr
    return shared_once(tmp_path_factory, "backlit-line", make)


@pytest.mark.slow
def test_a_ring_lit_bundle_adapted_to_a_backlit_line_inspects_it(bundle: Path, backlit_line: Path,
                                                                 tmp_path: Path) -> None:
    source_ae = _sha(bundle / "autoencoder.onnx")
    judge = backlit_line / "judge" / "bottle"
    before = _judged(bundle, judge, tmp_path / "before")
    # Trained under a ring light, the bundle finds no mouth on a backlit bottle: every frame is an error.
    assert before["images"] == 8 and before["unreadable"] == 8

    adapted = tmp_path / "adapted"
    proc = run_station("adapt", "--model", str(bundle), "--good", str(backlit_line / "good" / "bottle" / "train"),
                       "--out", str(adapted), "--ae-steps", "8", "--threads", "1", "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote bundle {adapted}" in proc.stdout
    assert "warning: 16 good bottles" in proc.stderr and "under 60" in proc.stderr  # fewer than advised
    manifest = yaml.safe_load((adapted / "manifest.yaml").read_text())
    assert manifest["view"]["lighting"] == "back"  # what the line's good bottles show, recorded for serving
    assert _sha(adapted / "autoencoder.onnx") != source_ae  # a new autoencoder...
    assert _sha(bundle / "autoencoder.onnx") == source_ae  # ...and the source bundle untouched
    assert _sha(adapted / "classifier.onnx") == _sha(bundle / "classifier.onnx")
    assert manifest["anomaly"]["threshold_method"].startswith("station adapt: cross-fitted over 2 folds")
    scores = json.loads((adapted / "calibration" / "anomaly_scores.json").read_text())
    assert len(scores["good_scores"]) == 16 and scores["threshold"] == manifest["anomaly"]["threshold"]
    mc = manifest["decision"]["map_classifier"]
    source_mc = yaml.safe_load((bundle / "manifest.yaml").read_text())["decision"]["map_classifier"]
    assert mc["fit"]["line_good"] == 16 and mc["fit"]["images"] == source_mc["fit"]["images"]
    assert mc["threshold"] != source_mc["threshold"]  # the features' unit is the line's own
    features = json.loads((adapted / "calibration" / "map_features.json").read_text())
    assert features["labels"].count("good") >= 16 and features["threshold"] == mc["threshold"]
    assert manifest["training"]["adapted"]["line_good"] == 16
    assert manifest["training"]["adapted"]["from"].startswith("tiny ")
    assert "good_confidence" in manifest["drift"]["skipped"]  # no held-out good image: not watched
    assert "mouth_offset" in manifest["drift"]["quantities"]

    after = _judged(adapted, judge, tmp_path / "after")
    # Every judged frame is now inspected and named (the tiny models' accuracy is not the point here).
    assert after["images"] == 8 and after["unreadable"] == 0 and after["accuracy"] is not None
    # And `station calibrate` refits on the adapted bundle's kept features, as on a trained one.
    calibrated = tmp_path / "calibrated"
    shutil.copytree(adapted, calibrated)
    cal = run_station("calibrate", "--model", str(calibrated), "--good", str(backlit_line / "good"))
    assert cal.returncode == 0, cal.stderr


def test_adapt_refuses_a_bundle_that_names_classes_with_the_cnn(bundle: Path, backlit_line: Path,
                                                                tmp_path: Path) -> None:
    copy = tmp_path / "cnn"
    shutil.copytree(bundle, copy)
    manifest = yaml.safe_load((copy / "manifest.yaml").read_text())
    manifest["decision"]["classes_from"] = "cnn"
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    proc = run_station("adapt", "--model", str(copy), "--good", str(backlit_line / "good"),
                       "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "'cnn'" in proc.stderr and "--classes-from map" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_adapt_needs_enough_good_bottles_and_names_the_folder(bundle: Path, backlit_line: Path,
                                                             tmp_path: Path) -> None:
    few = tmp_path / "few"
    few.mkdir()
    for image in sorted((backlit_line / "good").rglob("*.png"))[:5]:
        shutil.copy(image, few / image.name)
    proc = run_station("adapt", "--model", str(bundle), "--good", str(few), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and f"--good {few}: 5 images" in proc.stderr and "at least 16" in proc.stderr
    missing = run_station("adapt", "--model", str(bundle), "--good", str(tmp_path / "nowhere"),
                          "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()
