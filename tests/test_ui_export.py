"""Reviews back into the models: rejects reviewed through `station ui`, exported, then trained on and calibrated on.

A real station rejects every bottle (threshold below any score), the page's
review API (the same POST the page makes) marks the good ones false rejects
and the defects confirmed, and `station ui export` writes an MVTec AD folder
that `station train` and `station calibrate` take as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from station.core.folders import list_images
from tests.conftest import run_station
from tests.stationproc import StationProcess
from tests.test_ui_support import UiProcess, token_file

DEFECTS = ("broken_large", "broken_small", "contamination")


@pytest.mark.slow
def test_reviewed_rejects_export_to_a_folder_that_trains_and_calibrates(bundle: Path, synth_root: Path,
                                                                        tmp_path: Path) -> None:
    incoming, archive, reviews = tmp_path / "incoming", tmp_path / "rejects", tmp_path / "reviews.sqlite"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                        "archive": {"path": str(archive), "min_free_bytes": 0},
                                        "decision": {"anomaly_threshold": -1.0}})
    ui = UiProcess(station.endpoint, "--archive", str(archive), "--reviews", str(reviews),
                   "--review-token-file", str(token_file(tmp_path)))
    # Training needs 8 good images and 2 of each class.
    dropped = [(f"good_{p.name}", p) for p in sorted((synth_root / "train" / "good").iterdir())[:8]]
    dropped += [(f"{cls}_{p.name}", p) for cls in DEFECTS for p in sorted((synth_root / "test" / cls).iterdir())[:2]]
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running", timeout_s=120)
        for name, source in dropped:
            shutil.copy(source, incoming / name)
        verdicts = station.wait_verdicts(len(dropped))
        assert all(v["verdict"] == "fail" for v in verdicts)
        ui.wait("every reject indexed", lambda s: s["archive"]["count"] == len(dropped))
        items = ui.get_json("/api/rejects?limit=200")["items"]
        for item in items:
            truth = next(cls for cls in ("good", *DEFECTS) if item["frame_id"].startswith(cls))
            status, reply = (ui.review(item["id"], "false_reject") if truth == "good"
                             else ui.review(item["id"], "confirmed", truth))
            assert status == 200, reply
        assert ui.get_json("/api/summary")["reviews"]["unreviewed"] == 0
    finally:
        ui.close()
        station.close()

    out = tmp_path / "reviewed"
    proc = run_station("ui", "export", "--reviews", str(reviews), "--archive", str(archive), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(list_images(out / "train" / "good")) == 8
    for cls in DEFECTS:
        assert len(list_images(out / "test" / cls)) == 2
    listing = json.loads((out / "reviews.json").read_text())
    assert {e["frame_id"] for e in listing} == {name for name, _ in dropped}
    # A second export into the same folder is refused rather than mixed in.
    again = run_station("ui", "export", "--reviews", str(reviews), "--archive", str(archive), "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr

    model = tmp_path / "retrained"
    proc = run_station("train", "--data", str(out), "--out", str(model), "--epochs", "1", "--ae-steps", "5",
                       "--cross-fit-folds", "0", "--batch-size", "8", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert (model / "manifest.yaml").is_file()
    proc = run_station("calibrate", "--model", str(model), "--good", str(out / "train" / "good"))
    assert proc.returncode == 0, proc.stderr
