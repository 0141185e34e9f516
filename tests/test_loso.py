"""`station loso`: each style is judged by models that never saw it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_station


@pytest.mark.slow
def test_leave_one_style_out_trains_without_the_judged_style(tmp_path: Path) -> None:
    out = tmp_path / "loso"
    proc = run_station("loso", "--out", str(out), "--styles", "ring,dome", "--train-good", "6",
                       "--train-per-class", "3", "--judge-per-class", "2", "--novel", "2", "--epochs", "1",
                       "--ae-steps", "8", "--threads", "1", "--calibrate-good", "4", "--adapt-good", "16",
                       timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "loso.json").read_text())
    assert [r["left_out"] for r in record["results"]] == ["ring", "dome"]
    for result in record["results"]:
        left_out, trained_on = result["left_out"], result["trained_on"]
        assert left_out not in trained_on and trained_on
        # What the models trained on was drawn in the other styles only; what judged them in the left-out one.
        train_styles = set(json.loads((out / "data" / f"without-{left_out}" / "synth.json").read_text())
                           ["images"].values())
        judge_styles = set(json.loads((out / "data" / f"judge-{left_out}" / "synth.json").read_text())
                           ["images"].values())
        assert train_styles == set(trained_on) and judge_styles == {left_out}
        figures = result["figures"]
        assert figures["images"] == 4 * 2 + 2  # every judged image went through the station, novel ones too
        assert 0.0 <= figures["accuracy"] <= 1.0 and figures["novel"]["images"] == 2
        # Judged again after the line's own good bottles set the threshold: a copy, recalibrated on 4 of them.
        calibrated = figures["calibrated_on_line"]
        assert calibrated["good"] == 4 and calibrated["figures"]["images"] == figures["images"]
        manifest = yaml.safe_load((out / "models" / f"without-{left_out}-calibrated" / "manifest.yaml").read_text())
        assert manifest["anomaly"]["threshold"] == calibrated["figures"]["threshold"] != figures["threshold"]
        assert manifest["decision"]["map_classifier"]["fit"]["line_good"] == 4  # refitted with them as good
        # And after `station adapt` on 16 of them: an autoencoder of the line's own, the map classifier kept.
        adapted = figures["adapted_on_line"]
        assert adapted["good"] == 16 and adapted["figures"]["images"] == figures["images"]
        manifest = yaml.safe_load((out / "models" / f"without-{left_out}-adapted" / "manifest.yaml").read_text())
        assert manifest["training"]["adapted"]["line_good"] == 16
        assert manifest["anomaly"]["threshold"] == adapted["figures"]["threshold"]
    table = (out / "loso.md").read_text()
    assert table.count("\n| ring | dome |") == 1 and table.count("\n| dome | ring |") == 1
    assert table.count("↳ adapted on 16 of its good") == 2
    assert "wrote" in proc.stdout


def test_loso_refuses_an_unknown_style(tmp_path: Path) -> None:
    proc = run_station("loso", "--out", str(tmp_path), "--styles", "ring,neon")
    assert proc.returncode != 0 and "neon" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_lighting_nobody_trained_on_is_still_located(tmp_path: Path) -> None:
    """Trained on ring-lit bottles only, judged on backlit ones: the bundle locates each frame as it is lit."""
    out = tmp_path / "loso"
    proc = run_station("loso", "--out", str(out), "--styles", "ring,backlit", "--left-out", "backlit",
                       "--train-good", "6", "--train-per-class", "3", "--judge-per-class", "2", "--novel", "0",
                       "--epochs", "1", "--ae-steps", "8", "--threads", "1", "--calibrate-good", "0",
                       "--adapt-good", "0", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = yaml.safe_load((out / "models" / "without-backlit" / "manifest.yaml").read_text())
    assert manifest["view"]["lighting"] == "auto"  # front, as the ring images alone say, finds no backlit mouth
    figures = json.loads((out / "loso.json").read_text())["results"][0]["figures"]
    assert figures["images"] == 8 and figures["unreadable"] == 0


def test_folds_run_apart_into_one_folder_share_one_table(tmp_path: Path) -> None:
    """`--left-out` folds run in parallel (one process each) into one --out: the last to finish leaves all."""
    from station.training.loso import LOSO_FILE, LosoPlan, _write

    figures = {"accuracy": 0.9, "per_class": {"good": {"recall": 1.0}, "broken_large": {"recall": 0.8}},
               "good_passed": 1.0, "defects_rejected": 0.95, "novel": {}, "image_auroc": 0.99, "threshold": 10.0}
    styles = ("ring", "dome", "backlit")
    _write(LosoPlan(tmp_path, styles, left_out=("backlit",)), [("backlit", ("ring", "dome"), figures)])
    _write(LosoPlan(tmp_path, styles, left_out=("ring",)), [("ring", ("dome", "backlit"), figures)])
    record = json.loads((tmp_path / "loso.json").read_text())
    assert [r["left_out"] for r in record["results"]] == ["ring", "backlit"]  # both, in --styles order
    assert record["results"][1]["plan"]["left_out"] == ["backlit"]  # each fold says how it was run
    table = (tmp_path / LOSO_FILE).read_text()
    assert "\n| ring | dome, backlit |" in table and "\n| backlit | ring, dome |" in table
