"""Fault injection: the archive's disk fills up, the station is SIGKILLed and restarted.
(Elsewhere: a subscriber killed and restarted, test_bridge_mes.py and test_verdict_stream.py; a camera lost
mid-stream, test_opencv_source.py; a corrupt bundle on SIGHUP, test_daemon_service.py.)"""

from __future__ import annotations

import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from station.bridges.feed import FeedEvent, VerdictFeed
from tests.conftest import free_endpoint, station_cmd
from tests.stationproc import StationProcess
from tests.test_verdict_stream import _drop


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs: room for two or three archived rejects, then ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0777", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot make a tiny file system here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                        if line and not line.startswith("#"))}


def test_a_full_archive_disk_loses_no_verdict(bundle: Path, eval_root: Path, tmp_path: Path, tiny_fs: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    port = int(free_endpoint().rsplit(":", 1)[1])
    station = StationProcess(tmp_path, {
        "model": str(bundle), "source": {"path": str(incoming), "poll_interval_s": 0.05},
        "metrics": {"listen": f"127.0.0.1:{port}"}, "inference": {"queue_size": 64},
        # min_free_bytes 0: the archive writes until the disk itself says no (ENOSPC).
        "archive": {"path": str(tiny_fs / "rejects"), "min_free_bytes": 0, "max_bytes": 10**9},
        "decision": {"anomaly_threshold": -1.0},  # every bottle fails, so every one is archived
    })
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        images = [p for cls in sorted(eval_root.iterdir()) for p in sorted(cls.iterdir())]
        _drop(images, incoming)
        verdicts = station.wait_verdicts(len(images))
        beat = station.wait_heartbeat(lambda h: h["counters"]["published"] == len(images))
        metrics = _metrics(port)
        rc, stopped, err = station.terminate()
    finally:
        station.close()
    assert rc == 0, err[-2000:]
    assert [v["seq"] for v in verdicts] == list(range(len(images)))
    assert all(v["verdict"] == "fail" for v in verdicts)
    assert beat["state"] == "running"
    assert stopped["counters"]["captured"] == stopped["counters"]["published"] == len(images)
    # Some rejects were archived, then the disk was full; the failed writes are counted and logged.
    assert metrics["station_archive_write_errors_total"] >= 1
    assert 1 <= metrics["station_archive_archived_total"] < len(images)
    assert "archive_write_failed" in err and "No space left on device" in err


def _events(feed: VerdictFeed, n: int) -> list[FeedEvent]:
    """The next n welcome/verdict events (heartbeats skipped)."""
    out: list[FeedEvent] = []
    while len(out) < n:
        event = feed.next(60)
        assert event is not None, f"only {len(out)} events"
        if event.kind != "heartbeat":
            out.append(event)
    return out


def test_sigkill_then_restart_is_a_new_run_that_subscribers_see(bundle: Path, eval_root: Path,
                                                                tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    endpoint = free_endpoint()
    config = tmp_path / "station.yaml"
    config.write_text(yaml.safe_dump({"station_id": "cam1", "model": str(bundle),
                                      "source": {"path": str(incoming), "poll_interval_s": 0.05},
                                      "publish": {"endpoint": endpoint, "heartbeat_interval_s": 0.2}}))
    images = sorted((eval_root / "good").iterdir())
    feed = VerdictFeed(endpoint)  # connects and keeps reconnecting on its own
    first = subprocess.Popen(station_cmd("run", "--config", str(config)), stderr=subprocess.DEVNULL)
    second: subprocess.Popen[bytes] | None = None
    try:
        welcome, = _events(feed, 1)
        _drop(images[:1], incoming)
        verdict, = _events(feed, 1)
        old_run = verdict.message["run_id"]
        first.send_signal(signal.SIGKILL)
        first.wait()
        # The restarted station would inspect the file again (process_existing); take it away, so the
        # new run's first verdict is the next bottle's.
        (incoming / "000.png").unlink()
        second = subprocess.Popen(station_cmd("run", "--config", str(config)), stderr=subprocess.DEVNULL)
        welcome2, = _events(feed, 1)
        _drop(images[1:2], incoming, start=1)
        verdict2, = _events(feed, 1)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        feed.close()
        first.kill()
        if second is not None:
            second.kill()
    assert welcome.kind == "welcome" and verdict.kind == "verdict" and verdict.message["seq"] == 0
    assert welcome2.kind == "welcome" and welcome2.message["run_id"] != old_run
    assert welcome2.notes == [f"new run_id {welcome2.message['run_id']} (was {old_run}): the station restarted"]
    assert verdict2.message["run_id"] == welcome2.message["run_id"] and verdict2.message["seq"] == 0
    assert verdict2.notes == []
