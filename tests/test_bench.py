"""`station bench` runs every measurement and reports consistent figures (timings are not asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import run_station


def test_bench_reports_every_stage_and_throughput(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = run_station("bench", "--model", str(bundle), "--source", str(eval_root), "--frames", "16",
                       "--rate", "50", "--json", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["frames"] == 16 and r["image_size"] == [900, 900, 3]
    for stage in ("decode", "preprocess", "autoencoder", "classifier", "anomaly_map", "decide", "publish", "total"):
        s = r["stages_ms"][stage]
        assert s["n"] == 16 and 0 < s["p50"] <= s["p99"] and math.isfinite(s["mean"]), stage
    t = r["throughput_fps"]
    assert all(v > 0 for v in t.values())
    assert r["ratios"]["station_memory_vs_bare_inference"] == t["station_memory"] / t["bare_inference"]
    # The same per-frame work as the station's (preprocess, both models, decide), bare, on all workers.
    assert r["ratios"]["station_memory_vs_bare_work_parallel"] == t["station_memory"] / t["bare_work_parallel"]
    # Each model at each precision the bundle has (FP32 only: nothing exported), and no baseline asked for.
    assert set(r["models_ms_by_precision"]) == {"autoencoder", "classifier"}
    assert all(list(by) == ["fp32"] and by["fp32"] > 0 for by in r["models_ms_by_precision"].values())
    assert "baseline" not in r and r["precision"] == "fp32"
    assert r["offered"]["published"] == 16  # every offered frame got a verdict, inspected or skipped
    assert r["offered"]["latency_ms"]["n"] + r["offered"]["skipped"] == 16
    assert r["offered"]["bare_latency_ms"]["n"] == 16  # the same frames, alone, as the machine's baseline
    for line in ("bare inference", "naive sequential loop", "station, in-memory", "station, PNG files",
                 "offered 50 frames/s", "the same work alone", "bare work (preprocess, models, decide)"):
        assert line in proc.stdout


def test_bench_refuses_an_empty_folder(bundle: Path, tmp_path: Path) -> None:
    proc = run_station("bench", "--model", str(bundle), "--source", str(tmp_path), "--frames", "4")
    assert proc.returncode == 2 and "no images under" in proc.stderr


def test_bench_names_a_source_image_the_bundle_cannot_locate(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    import shutil

    import cv2
    import numpy as np

    shutil.copy(next((eval_root / "good").iterdir()), tmp_path / "a.png")
    cv2.imwrite(str(tmp_path / "b-blank.png"), np.full((900, 900, 3), 128, np.uint8))  # no bottle in it
    proc = run_station("bench", "--model", str(bundle), "--source", str(tmp_path), "--frames", "4", timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "b-blank.png: no_bottle_found" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_renders_bottles_lit_as_the_bundle_expects(bundle: Path, tmp_path: Path) -> None:
    import shutil

    import yaml

    root = shutil.copytree(bundle, tmp_path / "backlit")
    manifest = yaml.safe_load((root / "manifest.yaml").read_text())
    manifest["view"]["lighting"] = "back"  # a backlit line's bundle: ring-lit renders have no mouth for it
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    out = tmp_path / "bench.json"
    proc = run_station("bench", "--model", str(root), "--frames", "8", "--rate", "50", "--json", str(out),
                       timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "backlit style, for view.lighting back" in proc.stderr
    assert json.loads(out.read_text())["offered"]["published"] == 8


@pytest.mark.slow
def test_bench_compares_the_chosen_precision_with_a_baseline_in_the_same_run(bundle: Path, tmp_path: Path) -> None:
    import shutil

    root = shutil.copytree(bundle, tmp_path / "b")
    assert run_station("export", "--model", str(root), "--precision", "int8", timeout=900).returncode == 0
    out = tmp_path / "bench.json"
    proc = run_station("bench", "--model", str(root), "--frames", "8", "--backend", "onnxruntime",
                       "--precision", "autoencoder=int8", "--baseline-precision", "fp32", "--json", str(out),
                       timeout=900)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["precision"] == "autoencoder=int8,classifier=fp32" and r["baseline_precision"] == "fp32"
    b = r["baseline"]
    assert b["station_memory_vs_baseline"] == r["throughput_fps"]["station_memory"] / b["station_memory"]
    assert set(r["models_ms_by_precision"]["autoencoder"]) == {"fp32", "int8"}
    assert "against fp32, same run" in proc.stdout
