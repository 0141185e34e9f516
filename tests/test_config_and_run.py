"""`station run`: config validation, and the daemon over a watched folder."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from station.service.publish import Subscriber
from tests.conftest import free_endpoint, run_station, station_cmd


def write_config(path: Path, **data: object) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"model": "m", "source": {"path": "."}}, "station_id"),
        ({"station_id": "a", "model": "m", "source": {}}, "source.path"),
        ({"station_id": "a", "model": "m", "source": {"path": ".", "poll_interval_s": -1}},
         "source.poll_interval_s"),
        ({"station_id": "a b", "model": "m", "source": {"path": "."}}, "station_id"),
        ({"station_id": "a", "model": "m", "source": {"path": "."}, "publsh": {}}, "publsh"),
        ({"station_id": "a", "model": "m", "source": {"path": "."}, "publish": {"endpoint": "localhost"}},
         "publish.endpoint"),
        ({"station_id": "a", "model": "m", "source": {"path": "."}, "inference": {"backend": "cuda"}},
         "inference.backend"),
        ({"station_id": "a", "model": "m", "source": {"path": "."}, "inference": {"precision": "fp8"}},
         "inference.precision"),
    ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path: Path, config: dict, key: str) -> None:
    proc = run_station("run", "--config", str(write_config(tmp_path / "station.yaml", **config)))
    assert proc.returncode == 2
    assert key in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_that_is_not_yaml_or_missing(tmp_path: Path) -> None:
    bad = tmp_path / "station.yaml"
    bad.write_text("station_id: [oops")
    proc = run_station("run", "--config", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr
    proc = run_station("run", "--config", str(tmp_path / "absent.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_run_inspects_new_files_and_drains_on_sigterm(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    endpoint = free_endpoint()
    config = write_config(
        tmp_path / "station.yaml", station_id="cam1", model=str(bundle),
        source={"path": "incoming", "poll_interval_s": 0.05},
        publish={"endpoint": endpoint, "heartbeat_interval_s": 0.2},
        output={"jsonl": "verdicts.jsonl"},
    )
    proc = subprocess.Popen(station_cmd("run", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sub = Subscriber(endpoint, station="cam1")
    try:
        # Wait for the station to be up: its heartbeats say so.
        while True:
            item = sub.receive(60)
            assert item is not None, "no heartbeat from station run"
            if item.topic.startswith("heartbeat.") and item.message["state"] == "running":
                break
        images = sorted((eval_root / "good").iterdir())[:3]
        for n, img in enumerate(images):
            tmp = incoming / f".{n}.tmp"
            shutil.copy(img, tmp)
            tmp.rename(incoming / f"{n:03d}.png")
        (incoming / "broken.png").write_bytes(b"nope")
        verdicts = []
        while len(verdicts) < 4:
            item = sub.receive(60)
            assert item is not None, f"only {len(verdicts)} verdicts"
            if item.topic.startswith("verdict."):
                verdicts.append(item.message)
        proc.send_signal(signal.SIGTERM)
        stopped = None
        while stopped is None:
            item = sub.receive(30)
            assert item is not None
            if item.topic.startswith("heartbeat.") and item.message["state"] == "stopped":
                stopped = item.message
        proc.wait(timeout=30)
    finally:
        sub.close()
        proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert sorted(v["frame_id"] for v in verdicts) == ["000.png", "001.png", "002.png", "broken.png"]
    assert [v["seq"] for v in verdicts] == [0, 1, 2, 3]
    broken = next(v for v in verdicts if v["frame_id"] == "broken.png")
    assert broken["verdict"] == "fail" and "unreadable_image" in broken["reasons"]
    assert stopped["counters"]["captured"] == stopped["counters"]["published"] == 4
    assert len((tmp_path / "verdicts.jsonl").read_text().splitlines()) == 4


def test_a_failed_start_closes_what_it_had_opened(bundle: Path, tmp_path: Path) -> None:
    # In this process, so a resource left open would still hold the endpoint: the JSONL file cannot be
    # created (its folder is a file) after the publisher has bound.
    from station.errors import ConfigError, PublishError
    from station.service.publish import VerdictPublisher
    from station.service.runner import run_station

    (tmp_path / "incoming").mkdir()
    (tmp_path / "not-a-folder").write_text("")
    endpoint = free_endpoint()
    config = write_config(tmp_path / "station.yaml", station_id="cam1", model=str(bundle),
                          source={"path": "incoming"}, publish={"endpoint": endpoint},
                          output={"jsonl": "not-a-folder/verdicts.jsonl"})
    # The traceback keeps start-up's frames, and whatever they opened, alive: a publisher left unclosed
    # would still hold the endpoint, not be closed behind our back by garbage collection.
    with pytest.raises(ConfigError, match="cannot write verdicts") as failed:
        run_station(config)
    # libzmq unbinds a closed socket on its I/O thread, a moment after close() returns: rebinding may need a
    # few tries. A bind left open never frees, so the last try still raises PublishError.
    deadline = time.monotonic() + 5
    while True:
        try:
            VerdictPublisher(endpoint, "cam1", "again").close()
            break
        except PublishError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert failed.traceback  # held until here


@pytest.mark.parametrize("args", [
    ("train", "--data", "d", "--out", "o", "--epochs", "0"),
    ("bench", "--model", "m", "--frames", "0"),
    ("plantsim", "--db", "postgresql://x", "--stations", "0"),
])
def test_counts_that_must_be_positive_refuse_0(args: tuple[str, ...]) -> None:
    proc = run_station(*args, timeout=60)
    assert proc.returncode == 2
    assert f"argument {args[-2]}: 0 is not > 0" in proc.stderr
