"""A missing or invalid bundle exits 2 naming the file and what is wrong, with no traceback."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_station


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / "manifest.yaml"
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data))
    return apply


CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "no_manifest": (lambda r: (r / "manifest.yaml").unlink(), ["manifest.yaml", "missing"]),
    "bad_yaml": (lambda r: (r / "manifest.yaml").write_text("name: [unclosed"), ["manifest.yaml", "YAML"]),
    "missing_onnx": (lambda r: (r / "classifier.onnx").unlink(), ["classifier.onnx", "missing"]),
    "corrupt_onnx": (lambda r: (r / "autoencoder.onnx").write_bytes(b"garbage"),
                     ["autoencoder.onnx", "checksum mismatch"]),
    "no_good_class": (_edit_manifest(lambda d: d.update(classes=["ok", "bad"])), ["classes", "good"]),
    "missing_threshold": (_edit_manifest(lambda d: d["anomaly"].pop("threshold")),
                          ["anomaly.threshold", "missing"]),
    "typo_key": (_edit_manifest(lambda d: d.update(clases=["good"])), ["clases", "unknown key"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_bundle_is_refused(case: str, bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    damage, expected = CASES[case]
    damage(broken)
    proc = run_station("replay", "--model", str(broken), "--source", str(eval_root))
    assert proc.returncode == 2, proc.stderr
    for text in expected:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trained_bundle_is_complete(bundle: Path) -> None:
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert manifest["classes"] == ["good", "broken_large", "broken_small", "contamination"]
    assert manifest["anomaly"]["threshold"] > 0
    assert "quantile" in manifest["anomaly"]["threshold_method"]
    assert len(manifest["training"]["data_fingerprint"]) == 64
    split = yaml.safe_load((bundle / "split.json").read_text())
    train = {row["path"] for row in split["train"]}
    holdout = {row["path"] for row in split["holdout"]}
    assert train and holdout and not train & holdout
    assert {row["path"] for row in split["calibration"]} <= train
    for rel in manifest["files"]:
        assert (bundle / rel).is_file()
    assert manifest["metrics"]["onnx_parity_max_abs"]["classifier"] < 1e-4


def test_bundle_without_calibration_scores_is_refused(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    (broken / "calibration" / "anomaly_scores.json").unlink()
    proc = run_station("replay", "--model", str(broken), "--source", str(eval_root))
    assert proc.returncode == 2
    assert "anomaly_scores.json" in proc.stderr and "missing" in proc.stderr


def test_classifier_rotations_average_the_turned_bottle(bundle: Path, eval_root: Path) -> None:
    """rotations: 2 in the manifest: the CNN's probabilities are the mean over the bottle and the bottle turned
    180° (then tempered, as every CNN probability the station reports)."""
    import numpy as np

    from station.core.bundle import load_bundle
    from station.core.inspector import Inspector, temper
    from station.core.preprocess import preprocess
    from station.sources.folder import load_frame

    b = load_bundle(bundle)
    assert b.manifest.models["classifier"].rotations == 2  # what training writes
    inspector = Inspector(b)
    image = load_frame(next((eval_root / "broken_small").iterdir()), 0, eval_root, "test", None).image
    assert image is not None
    x = preprocess(image, inspector.preprocess_spec)
    amap = inspector.autoencoder.run(x.autoencoder)
    probs = inspector.cnn_probabilities(x, amap)
    turned = [inspector.classifier.run(np.roll(x.classifier, k * 256, axis=2), np.roll(amap, k * 128, axis=2))[0]
              for k in (0, 1)]
    # Averaged, then tempered by the bundle's temperature (1 leaves them as they are).
    assert np.allclose(probs, temper(np.mean(turned, axis=0, keepdims=True), inspector.temperature)[0], atol=1e-6)
    assert not np.allclose(turned[0], turned[1]), "the two turns are different inputs"
