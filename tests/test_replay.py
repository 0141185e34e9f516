"""`station replay` as a process, read by a real ZeroMQ subscriber on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from station.service.publish import Subscriber
from tests.conftest import free_endpoint, run_station, station_cmd

SCHEMA = json.loads((Path(__file__).parents[1] / "station" / "schemas" / "verdict-1.schema.json").read_text())


def collect_until_stopped(sub: Subscriber, timeout_s: float = 120) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    while True:
        item = sub.receive(timeout_s)
        assert item is not None, f"no message for {timeout_s} s; got {len(verdicts)} verdicts"
        if item.topic.startswith("heartbeat.") and item.message["state"] == "stopped":
            return verdicts, item.message
        if item.topic.startswith("verdict."):
            verdicts.append(item.message)


def test_replay_publishes_one_valid_verdict_per_file_in_order(bundle: Path, replay_folder: Path,
                                                               tmp_path: Path) -> None:
    endpoint = free_endpoint()
    files = sorted(p.relative_to(replay_folder).as_posix() for p in replay_folder.rglob("*") if p.is_file())
    out = tmp_path / "verdicts.jsonl"
    proc = subprocess.Popen(
        station_cmd("replay", "--model", str(bundle), "--source", str(replay_folder), "--publish", endpoint,
                    "--wait-subscribers", "1", "--out", str(out), "--station-id", "line7"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sub = Subscriber(endpoint, station="line7")
    try:
        verdicts, stopped = collect_until_stopped(sub)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        sub.close()
        proc.kill()
    assert proc.returncode == 0, stderr

    assert [v["frame_id"] for v in verdicts] == files
    assert [v["seq"] for v in verdicts] == list(range(len(files)))
    assert len({v["run_id"] for v in verdicts}) == 1
    assert stopped["counters"]["captured"] == stopped["counters"]["published"] == len(files)
    for v in verdicts:
        jsonschema.validate(v, SCHEMA)
        assert v["station"] == "line7"

    corrupt = next(v for v in verdicts if v["frame_id"].endswith("999_corrupt.png"))
    assert corrupt["verdict"] == "fail"
    assert "unreadable_image" in corrupt["reasons"]
    assert "999_corrupt.png" in corrupt["error"]["detail"]

    inspected = [v for v in verdicts if v["error"] is None]
    assert len(inspected) == len(files) - 1
    for v in inspected:
        assert v["truth"] == v["frame_id"].split("/")[0]
        assert abs(sum(v["class"]["scores"].values()) - 1.0) < 1e-3
        assert v["verdict"] == ("fail" if v["reasons"] else "pass")
        assert set(v["latency_ms"]) >= {"decode", "preprocess", "classifier", "autoencoder", "total"}

    # The JSONL file holds the same messages; the summary reports on the labelled folder.
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [m["seq"] for m in lines] == [v["seq"] for v in verdicts]
    assert "accuracy (4-class)" in stdout and "image AUROC" in stdout and "confusion matrix" in stdout
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["counters"]["published"] == len(files)
    assert metrics["labelled"]["n"] == len(files) - 1
    assert metrics["errors"] == {"unreadable_image": 1}
    cm = metrics["labelled"]["confusion_matrix"]["rows_true_cols_predicted"]
    assert sum(map(sum, cm)) == len(files) - 1


def test_subscribe_command_prints_a_line_per_verdict(bundle: Path, replay_folder: Path) -> None:
    endpoint = free_endpoint()
    n_files = sum(1 for p in replay_folder.rglob("*") if p.is_file())
    replay = subprocess.Popen(
        station_cmd("replay", "--model", str(bundle), "--source", str(replay_folder), "--publish", endpoint,
                    "--wait-subscribers", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    subscribe = subprocess.Popen(station_cmd("subscribe", "--connect", endpoint, "--exit-on-stop"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = subscribe.communicate(timeout=120)
        replay.communicate(timeout=60)
    finally:
        subscribe.kill()
        replay.kill()
    assert subscribe.returncode == 0, err
    lines = out.splitlines()
    assert len(lines) == n_files
    assert lines[0].startswith("#0 ")
    assert any("error unreadable_image" in line for line in lines)
    assert f"{n_files} verdicts" in err and "0 gaps" in err


def test_replay_without_bundle_exits_2_naming_the_file(tmp_path: Path, replay_folder: Path) -> None:
    proc = run_station("replay", "--model", str(tmp_path / "nope"), "--source", str(replay_folder))
    assert proc.returncode == 2
    assert "nope" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("command", "option", "says"), [
    ("replay", "--source", "does not exist"),
    ("evaluate", "--data", "does not exist"),
    ("bench", "--source", "no images under"),
])
def test_replay_of_missing_folder_is_a_clear_error(bundle: Path, tmp_path: Path, command: str, option: str,
                                                   says: str) -> None:
    # A missing input folder is a usage error (exit 2), whichever command is given it.
    proc = run_station(command, "--model", str(bundle), option, str(tmp_path / "missing"))
    assert proc.returncode == 2, proc.stderr
    assert "missing" in proc.stderr and says in proc.stderr
    assert "Traceback" not in proc.stderr


def test_replay_rate_paces_frames(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    proc = run_station("replay", "--model", str(bundle), "--source", str(eval_root / "good"), "--rate", "5",
                       "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    msgs = [json.loads(line) for line in out.read_text().splitlines()]
    t = [datetime.fromisoformat(m["captured_at"].replace("Z", "+00:00")).timestamp() for m in msgs]
    # 3 frames at 5 fps: the last is captured about 0.4 s after the first, never sooner.
    assert t[-1] - t[0] >= 0.35


def test_replay_counts_novel_defects_as_defects_outside_the_4_class_accuracy(bundle: Path, eval_root: Path,
                                                                            tmp_path: Path) -> None:
    folder = tmp_path / "replay"
    shutil.copytree(eval_root, folder)
    (folder / "novel").mkdir()
    for n, source in enumerate(sorted((folder / "broken_large").iterdir())[:2]):
        shutil.copy(source, folder / "novel" / f"{n:03d}_crack.png")
    out = tmp_path / "verdicts.jsonl"
    proc = run_station("replay", "--model", str(bundle), "--source", str(folder), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["truth"] for v in verdicts if v["frame_id"].startswith("novel/")] == ["novel", "novel"]

    lab = json.loads(out.with_suffix(".metrics.json").read_text())["labelled"]
    assert lab["n"] == 12 and sum(map(sum, lab["confusion_matrix"]["rows_true_cols_predicted"])) == 12
    defects = [v for v in verdicts if v["truth"] != "good"]
    assert len(defects) == 11
    assert lab["defects_rejected"] == pytest.approx(sum(v["verdict"] == "fail" for v in defects) / 11)
    # Each check's share is what the published reasons say.
    every = lab["reject_by_check"]["rejected"]["all_defects"]
    assert every["anomaly"] == pytest.approx(sum("anomaly" in v["reasons"] for v in defects) / 11)
    assert every["classifier"] == pytest.approx(sum("defect_class" in v["reasons"] for v in defects) / 11)
    novel = [v for v in verdicts if v["truth"] == "novel"]
    assert lab["novel"]["images"] == 2 and lab["novel"]["per_kind"]["crack"]["images"] == 2
    assert lab["novel"]["anomaly"] == sum("anomaly" in v["reasons"] for v in novel) / 2
    assert "(novel defects excluded: 2)" in proc.stdout and "novel defects: 2 images" in proc.stdout
