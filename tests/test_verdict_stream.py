"""The verdict stream as plant systems meet it: CURVE with an allow-list, the welcome for late joiners,
gap detection across a reconnect, the trigger field."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import jsonschema

from station.bridges.feed import VerdictFeed
from station.service.publish import Subscriber
from station.service.security import ClientKeys
from tests.conftest import free_endpoint, run_station, station_cmd
from tests.stationproc import StationProcess

SCHEMA = json.loads((Path(__file__).parents[1] / "station/schemas/verdict-1.schema.json").read_text())


def _drop(images: list[Path], folder: Path, start: int = 0) -> None:
    """Files appear in the watched folder whole (written aside, then renamed), as a camera PC writes them."""
    for n, img in enumerate(images, start):
        tmp = folder / f".{n}.tmp"
        shutil.copy(img, tmp)
        tmp.rename(folder / f"{n:03d}.png")


def _keys(tmp_path: Path, name: str) -> tuple[Path, Path]:
    proc = run_station("keys", "generate", "--out", str(tmp_path / "keys"), "--name", name)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.key_secret"


def test_curve_admits_only_allow_listed_keys(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    server_pub, server_secret = _keys(tmp_path, "station")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    _, bridge_secret = _keys(tmp_path, "bridge")
    shutil.copy(tmp_path / "keys" / "bridge.key", allowed)
    _, rogue_secret = _keys(tmp_path, "rogue")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(
        tmp_path,
        {"model": str(bundle), "source": {"path": str(incoming), "poll_interval_s": 0.05},
         "publish": {"curve": {"secret_key": str(server_secret), "allowed_clients": str(allowed)}}},
        curve=ClientKeys(server_pub, bridge_secret),
    )
    rogue = Subscriber(station.endpoint, curve=ClientKeys(server_pub, rogue_secret))
    plain = Subscriber(station.endpoint)
    cli = subprocess.Popen(station_cmd("subscribe", "--connect", station.endpoint, "--count", "3", "--timeout", "60",
                                       "--curve-server-key", str(server_pub),
                                       "--curve-client-key", str(bridge_secret)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        _drop(sorted((eval_root / "good").iterdir())[:3], incoming)
        verdicts = station.wait_verdicts(3)
        out, err = cli.communicate(timeout=60)
        # The allow-listed bridge, and the CLI with the same key, got everything; the rest got nothing at all.
        assert [v["seq"] for v in verdicts] == [0, 1, 2]
        assert cli.returncode == 0 and len(out.splitlines()) == 3, err
        assert rogue.receive(1.0) is None
        assert plain.receive(0.2) is None
        rc, _, _ = station.terminate()
        assert rc == 0
    finally:
        rogue.close()
        plain.close()
        cli.kill()
        station.close()


def test_a_missing_station_key_exits_2_naming_the_key(bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "station.yaml"
    config.write_text(json.dumps({
        "station_id": "a", "model": str(bundle), "source": {"path": str(tmp_path)},
        "publish": {"curve": {"secret_key": "keys/nope.key_secret", "allowed_clients": "keys"}},
    }))
    proc = run_station("run", "--config", str(config))
    assert proc.returncode == 2
    assert "publish.curve.secret_key" in proc.stderr and "nope.key_secret" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_late_joiner_is_current_at_once_and_sees_no_gap(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05}})
    late: VerdictFeed | None = None
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        images = sorted((eval_root / "broken_large").iterdir())
        _drop(images[:2], incoming)
        early = station.wait_verdicts(2)
        # Joining mid-shift: the first message is the welcome with the last verdict and the counters.
        late = VerdictFeed(station.endpoint)
        welcome = late.next(30)
        assert welcome is not None and welcome.kind == "welcome"
        assert welcome.message["next_seq"] == 2
        assert welcome.verdict == early[-1]
        assert welcome.message["counters"]["published"] == 2 and welcome.message["state"] == "running"
        _drop(images[2:3], incoming, start=2)
        event = late.next(30)
        assert event is not None and event.kind in ("verdict", "heartbeat")
        while event is not None and event.kind != "verdict":
            event = late.next(30)
        assert event is not None and event.message["seq"] == 2 and event.notes == []
        assert late.tracker.gaps == 0
        jsonschema.validate(event.message, SCHEMA)
        assert event.message["trigger"] is None  # a watched folder knows no trigger
        station.terminate()
    finally:
        if late is not None:
            late.close()
        station.close()


def test_reconnecting_after_missing_verdicts_reports_them(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05}})
    feed = VerdictFeed(station.endpoint)
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        images = sorted((eval_root / "good").iterdir())
        _drop(images[:1], incoming)
        station.wait_verdicts(1)
        while feed.tracker.expected < 1:
            assert feed.next(30) is not None
        # The bridge goes away (its socket closed, as when its host reboots); two verdicts go by meanwhile.
        feed.subscriber.close()
        _drop(images[1:3], incoming, start=1)
        station.wait_verdicts(3)
        tracker = feed.tracker
        feed = VerdictFeed(station.endpoint)
        feed.tracker = tracker  # the same bridge process, reconnected
        welcome = feed.next(30)
        assert welcome is not None and welcome.kind == "welcome"
        assert welcome.notes == ["reconnected: 2 verdicts published while disconnected (seq 1…2)"]
        assert tracker.missed == 2
        station.terminate()
    finally:
        feed.close()
        station.close()


def test_tracker_counts_what_a_restart_or_reconnect_hid() -> None:
    from station.service.publish import SequenceTracker

    t = SequenceTracker()
    assert t.join("r1", 40) == ["joined run r1 at seq 40"] and t.missed == 0  # joining mid-run is not a loss
    assert t.observe("r1", 40) == [] and t.observe("r1", 43) != [] and t.missed == 2
    assert t.join("r1", 50) == ["reconnected: 6 verdicts published while disconnected (seq 44…49)"]
    assert t.join("r2", 3)[1] == "3 verdicts of the new run were missed (seq 0…2)"
    assert (t.gaps, t.missed) == (3, 11)
    assert t.observe("r3", 0) == ["new run_id r3 (was r2): the station restarted"] and t.missed == 11


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _zmtp_sub(endpoint: str) -> socket.socket:
    """A raw TCP connection that says it is a ZeroMQ SUB socket (ZMTP 3.0, NULL mechanism)."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
    greeting = b""
    while len(greeting) < 64:
        greeting += sock.recv(64 - len(greeting))
    assert greeting[0] == 0xFF and greeting[10] == 3, greeting
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 3) + b"SUB"
    sock.sendall(bytes([0x04, len(body)]) + body)
    return sock


def test_an_oversized_inbound_message_is_refused_and_its_sender_disconnected(bundle: Path, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle), "source": {"path": str(incoming)}})
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        rogue = _zmtp_sub(station.endpoint)
        before = _rss_kib(station.proc.pid)
        # One 8 MiB message frame (long form), sent until the station hangs up.
        size = 8 << 20
        rogue.sendall(b"\x02" + struct.pack(">Q", size))
        sent = 0
        chunk = b"x" * 65536
        with contextlib.suppress(ConnectionError, TimeoutError):
            while sent < size:
                rogue.sendall(chunk)
                sent += len(chunk)
            while rogue.recv(65536):  # what the station sent before hanging up
                pass
        rogue.close()
        assert sent < size, "the station read a whole 8 MiB message from a subscriber"
        # The line goes on: a heartbeat sent after the hang-up still reaches an ordinary subscriber,
        # and by then the station has handled whatever the rogue peer sent.
        station.wait_heartbeat(lambda h: h["state"] == "running", timeout_s=10)
        grown_kib = _rss_kib(station.proc.pid) - before
        assert grown_kib < 2048, f"resident memory grew {grown_kib} KiB"
        assert station.proc.poll() is None
    finally:
        station.close()


def test_a_welcome_before_the_first_heartbeat_carries_every_counter() -> None:
    from station.contract.counters import Counters
    from station.service.publish import VerdictPublisher

    endpoint = free_endpoint()
    publisher = VerdictPublisher(endpoint, "cam1", "run1")
    sub = Subscriber(endpoint, station="cam1")
    try:
        item = None
        deadline = time.monotonic() + 10
        while item is None and time.monotonic() < deadline:
            publisher.service()  # what the station's loop does between verdicts
            item = sub.receive(0.1)
        assert item is not None and item.topic == "welcome.cam1"
        assert item.message["state"] == "starting" and item.message["next_seq"] == 0
        assert item.message["counters"] == Counters().snapshot()
        assert set(item.message["counters"]) == {"captured", "inspected", "skipped", "errors", "published",
                                                 "passed", "failed"}
    finally:
        sub.close()
        publisher.close()
