"""`station run` as systemd runs it: a real NOTIFY_SOCKET, real signals, overload accounting."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from station.service.publish import Subscriber
from tests.conftest import free_endpoint, station_cmd


def _config(tmp_path: Path, bundle: Path, endpoint: str, **extra: Any) -> Path:
    (tmp_path / "incoming").mkdir(exist_ok=True)
    data = {"station_id": "cam1", "model": str(bundle), "source": {"path": "incoming", "poll_interval_s": 0.05},
            "publish": {"endpoint": endpoint, "heartbeat_interval_s": 0.2}, **extra}
    path = tmp_path / "station.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class NotifySocket:
    """What systemd does: bind a datagram socket and keep reading what the service sends."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._lock = threading.Condition()
        self._closed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append(data)
                self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    def wait_for(self, needle: str, timeout_s: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not any(needle in m for m in self.messages):
                left = deadline - time.monotonic()
                assert left > 0, f"no {needle!r} from the service; got {self.messages[-5:]}"
                self._lock.wait(left)
            return list(self.messages)


def _verdicts(sub: Subscriber, n: int, timeout_s: float = 60) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        item = sub.receive(timeout_s)
        assert item is not None, f"only {len(out)} of {n} verdicts"
        if item.topic.startswith("verdict."):
            out.append(item.message)
    return out


def _wait_subscribed(sub: Subscriber) -> None:
    """A heartbeat proves the subscription is live, so no verdict is lost to a slow join."""
    while True:
        item = sub.receive(60)
        assert item is not None, "no heartbeat from station run"
        if item.topic.startswith("heartbeat."):
            return


def _stopped(sub: Subscriber) -> dict[str, Any]:
    while True:
        item = sub.receive(60)
        assert item is not None
        if item.topic.startswith("heartbeat.") and item.message["state"] == "stopped":
            return item.message


def test_notify_ready_watchdog_status_and_sigterm(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path)
    endpoint = free_endpoint()
    config = _config(tmp_path, bundle, endpoint)
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(station_cmd("run", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    sub = Subscriber(endpoint, station="cam1")
    try:
        notify.wait_for("READY=1")
        _wait_subscribed(sub)
        # Idle but healthy: the watchdog is fed while nothing is waiting for inspection.
        notify.wait_for("WATCHDOG=1")
        shutil.copy(next((eval_root / "good").iterdir()), tmp_path / "incoming" / "a.png")
        _verdicts(sub, 1)
        messages = notify.wait_for("inspected 1")
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        stopped = _stopped(sub)
        proc.wait(timeout=30)
    finally:
        sub.close()
        proc.kill()
    assert proc.returncode == 0
    assert stopped["counters"]["captured"] == stopped["counters"]["published"] == 1


def test_sighup_reloads_bundle_and_refuses_a_bad_one(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path)
    endpoint = free_endpoint()
    live = tmp_path / "model"
    shutil.copytree(bundle, live)
    config = _config(tmp_path, live, endpoint)
    proc = subprocess.Popen(station_cmd("run", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)})
    sub = Subscriber(endpoint, station="cam1")
    images = sorted((eval_root / "good").iterdir())
    try:
        notify.wait_for("READY=1")
        _wait_subscribed(sub)
        shutil.copy(images[0], tmp_path / "incoming" / "0.png")
        first = _verdicts(sub, 1)
        # A new bundle (renamed) is loaded on SIGHUP.
        manifest = yaml.safe_load((live / "manifest.yaml").read_text())
        manifest["name"] = "reloaded"
        (live / "manifest.yaml").write_text(yaml.safe_dump(manifest))
        notify.clear()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        shutil.copy(images[1], tmp_path / "incoming" / "1.png")
        second = _verdicts(sub, 1)
        # A corrupt bundle is refused; the running one keeps inspecting.
        (live / "classifier.onnx").write_bytes(b"broken")
        notify.clear()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1")
        shutil.copy(images[2], tmp_path / "incoming" / "2.png")
        third = _verdicts(sub, 1)
        proc.send_signal(signal.SIGTERM)
        stopped = _stopped(sub)
        _, err = proc.communicate(timeout=30)
    finally:
        sub.close()
        proc.kill()
    assert proc.returncode == 0
    assert first[0]["model"]["name"] == "tiny"
    assert second[0]["model"]["name"] == "reloaded" and second[0]["verdict"] in ("pass", "fail")
    assert third[0]["model"]["name"] == "reloaded" and third[0]["class"] is not None
    assert "reload_refused" in err and "checksum mismatch" in err
    assert [v["seq"] for v in first + second + third] == [0, 1, 2]
    assert stopped["counters"]["captured"] == stopped["counters"]["published"] == 3


def _fill(folder: Path, eval_root: Path, n: int) -> None:
    """``n`` images named 000.png… in ``folder``, cycled from the labelled set."""
    images = sorted(p for cls in sorted(eval_root.iterdir()) for p in sorted(cls.iterdir()))
    folder.mkdir(exist_ok=True)
    for i in range(n):
        shutil.copy(images[i % len(images)], folder / f"{i:03d}.png")


def _run_for_verdicts(config: Path, endpoint: str, n: int, once_subscribed: Callable[[], None] | None = None
                      ) -> tuple[list[dict[str, Any]], dict[str, Any], int | None]:
    """`station run` until ``n`` verdicts came, then SIGTERM: (verdicts, the stopped heartbeat, exit code)."""
    proc = subprocess.Popen(station_cmd("run", "--config", str(config)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    sub = Subscriber(endpoint, station="cam1")
    try:
        if once_subscribed is not None:
            _wait_subscribed(sub)
            once_subscribed()
        verdicts = _verdicts(sub, n, timeout_s=180)
        proc.send_signal(signal.SIGTERM)
        stopped = _stopped(sub)
        proc.wait(timeout=30)
    finally:
        sub.close()
        proc.kill()
    return verdicts, stopped, proc.returncode


def test_overload_skip_mode_skips_visibly_and_accounts_for_every_frame(bundle: Path, eval_root: Path,
                                                                       tmp_path: Path) -> None:
    endpoint = free_endpoint()
    n = 48
    _fill(tmp_path / "incoming", eval_root, n)
    # The frames are there before the station starts: hold them until the subscriber is connected.
    config = _config(tmp_path, bundle, endpoint, inference={"queue_size": 1},
                     source={"path": "incoming", "poll_interval_s": 0.05, "on_overload": "skip"},
                     publish={"endpoint": endpoint, "heartbeat_interval_s": 0.2, "wait_subscribers": 1})
    verdicts, stopped, _ = _run_for_verdicts(config, endpoint, n)
    skipped = [v for v in verdicts if v["verdict"] == "skipped"]
    assert skipped, "decoding outpaces inspection with a queue of 1: some frames must be skipped"
    assert all(v["reasons"] == ["overload"] and v["class"] is None for v in skipped)
    assert sorted(v["frame_id"] for v in verdicts) == [f"{i:03d}.png" for i in range(n)]
    c = stopped["counters"]
    assert c["captured"] == c["published"] == n
    assert c["skipped"] == len(skipped) and c["inspected"] + c["skipped"] + c["errors"] == n


def test_a_burst_into_a_watched_folder_is_inspected_file_by_file_by_default(bundle: Path, eval_root: Path,
                                                                           tmp_path: Path) -> None:
    """200 files copied at once into a running station's folder: 200 inspected verdicts, none skipped."""
    endpoint = free_endpoint()
    n = 200
    config = _config(tmp_path, bundle, endpoint, inference={"queue_size": 1})

    def burst() -> None:
        staging = tmp_path / "staging"
        _fill(staging, eval_root, n)
        for path in sorted(staging.iterdir()):  # a rename is atomic: the burst lands at once
            path.rename(tmp_path / "incoming" / path.name)

    verdicts, stopped, rc = _run_for_verdicts(config, endpoint, n, once_subscribed=burst)
    assert rc == 0
    assert [v["verdict"] for v in verdicts if v["verdict"] not in ("pass", "fail")] == []
    assert all(v["class"] is not None for v in verdicts), "every file is inspected, not only accounted for"
    assert sorted(v["frame_id"] for v in verdicts) == [f"{i:03d}.png" for i in range(n)]
    c = stopped["counters"]
    assert c["captured"] == c["published"] == c["inspected"] == n and c["skipped"] == 0
