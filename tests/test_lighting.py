"""A backlit line end to end: `station synth --style backlit`, `station train`, `station replay`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_station

pytest.importorskip("torch")


@pytest.mark.slow
def test_backlit_data_trains_a_backlit_bundle_that_replays_without_errors(tmp_path: Path) -> None:
    proc = run_station("synth", "--out", str(tmp_path / "data"), "--seed", "6", "--style", "backlit",
                       "--train-good", "6", "--test-per-class", "2")
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "data" / "bottle"

    # Told the wrong lighting, training stops at the first image, naming it and why.
    proc = run_station("train", "--data", str(data), "--out", str(tmp_path / "wrong"), "--epochs", "1",
                       "--ae-steps", "2", "--lighting", "front")
    assert proc.returncode != 0
    assert str(data) in proc.stderr and ".png" in proc.stderr and "view.lighting is front" in proc.stderr
    assert "Traceback" not in proc.stderr

    # --lighting auto (the default): every image is backlit, so the bundle says back.
    model = tmp_path / "model"
    proc = run_station("train", "--data", str(data), "--out", str(model), "--epochs", "1", "--ae-steps", "4",
                       "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    manifest = yaml.safe_load((model / "manifest.yaml").read_text())
    assert manifest["view"]["lighting"] == "back"

    out = tmp_path / "verdicts.jsonl"
    proc = run_station("replay", "--model", str(model), "--source", str(data / "test"), "--out", str(out),
                       "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(verdicts) == 4 * 2
    assert all(v["error"] is None for v in verdicts), [v["error"] for v in verdicts]
