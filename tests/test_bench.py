"""`station bench` runs every measurement and reports consistent figures (timings are not asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    assert r["offered"]["published"] == 16  # every offered frame got a verdict, inspected or skipped
    assert r["offered"]["latency_ms"]["n"] + r["offered"]["skipped"] == 16
    assert r["offered"]["bare_latency_ms"]["n"] == 16  # the same frames, alone, as the machine's baseline
    for line in ("bare inference", "naive sequential loop", "station, in-memory", "station, PNG files",
                 "offered 50 frames/s", "the same work alone"):
        assert line in proc.stdout


def test_bench_refuses_an_empty_folder(bundle: Path, tmp_path: Path) -> None:
    proc = run_station("bench", "--model", str(bundle), "--source", str(tmp_path), "--frames", "4")
    assert proc.returncode == 2 and "no images under" in proc.stderr
