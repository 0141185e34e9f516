"""The decision rule: a defect class needs the anomaly check's support; calibrated class probabilities."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from station.core import parallelism
from station.core.bundle import load_bundle
from station.core.decide import FAIL, PASS, REASON_ANOMALY, REASON_DEFECT_CLASS, Policy, decide
from station.core.defect_rule import DEFECT_SUM, TOP_CLASS
from station.core.folders import BOTTLE_CLASSES
from station.core.inspector import Scores, temper
from station.core.pipeline import Pipeline
from station.core.preprocess import Mouth
from station.service.config import load_config
from station.service.runner import build_pipeline
from station.sources.folder import load_frame
from station.training.decision import TRUSTED_PER_CLASS, classifier_support, fit_temperature
from tests.conftest import run_station


def _scores(probs: list[float], anomaly: float) -> Scores:
    return Scores(probabilities=np.array(probs), anomaly_score=anomaly, anomaly_map=np.zeros((16, 8)),
                  mouth=Mouth(450, 450, 300))


def _policy(min_anomaly: float) -> Policy:
    return Policy(classes=BOTTLE_CLASSES, class_confidence=0.5, anomaly_threshold=10.0, canonical_size=900,
                  radius_margin=1.08, classifier_min_anomaly=min_anomaly)


@pytest.mark.parametrize(("anomaly", "min_anomaly", "verdict", "reasons"), [
    (1.0, 0.0, FAIL, [REASON_DEFECT_CLASS]),  # no support asked: the classifier fails it alone
    (1.0, 4.0, PASS, []),  # the classifier says contamination, but the bottle scores like a good one
    (4.0, 4.0, FAIL, [REASON_DEFECT_CLASS]),  # supported: at the support level it fails
    (12.0, 4.0, FAIL, [REASON_DEFECT_CLASS, REASON_ANOMALY]),
])
def test_a_defect_class_fails_a_bottle_only_with_the_anomaly_checks_support(
        anomaly: float, min_anomaly: float, verdict: str, reasons: list[str]) -> None:
    d = decide(_scores([0.1, 0.05, 0.05, 0.8], anomaly), _policy(min_anomaly))
    assert (d.verdict, d.reasons, d.label) == (verdict, reasons, "contamination")


def test_the_anomaly_check_fails_a_bottle_the_classifier_calls_good() -> None:
    d = decide(_scores([0.9, 0.05, 0.03, 0.02], 10.5), _policy(4.0))
    assert (d.verdict, d.reasons, d.label) == (FAIL, [REASON_ANOMALY], "good")
    assert decide(_scores([0.9, 0.05, 0.03, 0.02], 10.0), _policy(4.0)).verdict == PASS  # at the threshold


def test_temperature_softens_without_changing_the_ranking() -> None:
    p = np.array([[0.9, 0.06, 0.03, 0.01]])
    assert np.allclose(temper(p, 1.0), p)
    soft = temper(p, 3.0)
    assert soft.sum() == pytest.approx(1.0)
    assert soft[0, 0] < 0.6 and soft.argmax() == 0
    assert list(np.argsort(soft[0])) == list(np.argsort(p[0]))


def test_temperature_fit_softens_an_overconfident_classifier_and_never_sharpens() -> None:
    labels = np.array([0, 1, 2, 3, 0, 1])
    wrong = np.full((6, 4), 0.01)
    wrong[np.arange(6), (labels + 1) % 4] = 0.97  # confidently wrong on every image
    right = np.full((6, 4), 0.1)
    right[np.arange(6), labels] = 0.7  # right, and could be sharper
    assert fit_temperature(wrong, labels).value > 5
    fit = fit_temperature(right, labels)
    assert fit.value == 1.0 and fit.nll_after == pytest.approx(fit.nll_before)
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, int)).value == 1.0


def test_support_is_the_90_percent_quantile_with_few_images_and_warns_naming_the_class() -> None:
    scores = [float(s) for s in range(1, 101)]
    few = classifier_support(scores, {"good": 80, "broken_large": 8, "broken_small": 9, "contamination": 30})
    assert few.quantile == 0.9 and few.value == pytest.approx(np.quantile(scores, 0.9))
    assert few.warning is not None and "'broken_large' has only 8 training images" in few.warning
    many = classifier_support(scores, {c: TRUSTED_PER_CLASS for c in BOTTLE_CLASSES})
    assert many.warning is None and many.value == pytest.approx(np.quantile(scores, 0.5))


@pytest.mark.slow
def test_training_records_the_decision_and_warns_about_small_classes(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    proc = run_station("train", "--data", str(synth_root), "--out", str(out), "--epochs", "1", "--ae-steps", "8",
                       "--seed", "2")
    assert proc.returncode == 0, proc.stderr
    assert "has only 4 training images (under 30): the classifier is not trusted alone" in proc.stderr
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    decision = manifest["decision"]
    cal = [float(s) for s in _calibration_scores(out)]
    assert decision["classifier_min_anomaly"] == pytest.approx(np.quantile(cal, 0.9))
    assert decision["temperature"] >= 1.0
    assert "90% quantile" in decision["classifier_min_anomaly_method"]


def _calibration_scores(bundle: Path) -> list[float]:
    import json

    return list(json.loads((bundle / "calibration" / "anomaly_scores.json").read_text())["good_scores"])


def test_the_bundles_support_changes_verdicts_and_config_overrides_it(bundle: Path, eval_root: Path) -> None:
    paths = sorted(eval_root.rglob("*.png"))

    def defect_class_fails(min_anomaly: float | None) -> int:
        pipeline = Pipeline(load_bundle(bundle), class_confidence=0.01, anomaly_threshold=1e9,
                            classifier_min_anomaly=min_anomaly)
        verdicts = [pipeline.process(load_frame(p, i, eval_root, "test", None)) for i, p in enumerate(paths)]
        return sum(REASON_DEFECT_CLASS in v.reasons for v in verdicts)

    assert load_bundle(bundle).manifest.decision.classifier_min_anomaly > 0
    unsupported = defect_class_fails(0.0)
    assert unsupported > 0  # the classifier names some defect in this set
    assert unsupported >= defect_class_fails(None) >= defect_class_fails(1e9) == 0


def test_new_bundles_decide_on_the_defect_classes_sum_older_ones_and_station_yaml_may_keep_the_top_class(
        bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    assert load_bundle(bundle).manifest.decision.defect_rule == DEFECT_SUM
    older = tmp_path / "older"
    shutil.copytree(bundle, older)
    manifest = yaml.safe_load((older / "manifest.yaml").read_text())
    del manifest["decision"]["defect_rule"]  # as bundles before the field was written
    (older / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    assert load_bundle(older).manifest.decision.defect_rule == TOP_CLASS

    config = tmp_path / "station.yaml"
    config.write_text(yaml.safe_dump({"station_id": "t", "model": str(bundle),
                                      "source": {"kind": "folder", "path": str(tmp_path / "in")},
                                      "decision": {"defect_rule": "top_class"}}))
    pipelines = {"new": Pipeline(load_bundle(bundle)), "older": Pipeline(load_bundle(older)),
                 "station.yaml": build_pipeline(load_config(config), parallelism.plan(1, 1))}
    assert {k: p.policy.defect_rule for k, p in pipelines.items()} == {
        "new": DEFECT_SUM, "older": TOP_CLASS, "station.yaml": TOP_CLASS}
    for i, path in enumerate(sorted(eval_root.rglob("*.png"))[:6]):
        named = {k: p.process(load_frame(path, i, eval_root, "test", None)).decision for k, p in pipelines.items()}
        probs = {k: d.scores for k, d in named.items() if d is not None}
        assert len(probs) == 3, path
        p = probs["new"]
        defects = {c: v for c, v in p.items() if c != "good"}
        hierarchical = "good" if p["good"] > sum(defects.values()) else max(defects, key=lambda c: defects[c])
        assert named["new"] is not None and named["new"].label == hierarchical
        assert named["older"] is not None and named["older"].label == max(p, key=lambda c: p[c])
        assert named["station.yaml"] is not None and named["station.yaml"].label == named["older"].label
