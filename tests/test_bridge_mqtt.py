"""The MQTT bridge against a real Mosquitto broker (Debian's mosquitto, started by the test on a free port).

A paho subscriber must see, in Sparkplug B mode, NBIRTH, the station's
DBIRTH, one DDATA per verdict (every seq) and, when the bridge is killed
with SIGKILL, the NDEATH the broker sends as its will, with the birth's
bdSeq; in JSON mode, every verdict and the retained state.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_endpoint, start_bridge, stop_bridge

mqtt = pytest.importorskip("paho.mqtt.client", reason="paho-mqtt is in station[bridges]")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mosquitto() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        pytest.skip("mosquitto not installed: apt-get install mosquitto (deploy/test.sh does)")
    return exe


@pytest.fixture(scope="module")
def broker() -> Iterator[int]:
    folder = Path(tempfile.mkdtemp(prefix="station-mqtt-"))
    yield from _serve(folder, "allow_anonymous true\n")


def _serve(folder: Path, extra_conf: str) -> Iterator[int]:
    exe = _mosquitto()
    port = _free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\npersistence false\n{extra_conf}")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


class Listener:
    """A paho subscriber that keeps every (topic, payload, retain) it gets."""

    def __init__(self, port: int, topic: str) -> None:
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{time.monotonic_ns()}")
        c.on_connect = lambda cl, *_: cl.subscribe(topic, qos=1)
        c.on_subscribe = lambda *_: subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert subscribed.wait(10)
        self.client = c

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def snapshot(self) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _until(what: str, predicate: Callable[[], bool], proc: subprocess.Popen[str] | None,
           timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc is None or proc.poll() is None, f"bridge exited: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sparkplug_births_every_verdict_and_death_by_will(broker: int) -> None:
    from station.bridges.sparkplug import BOOLEAN, decode, payload
    from station.tools.plantsim import SimStation

    endpoint = free_endpoint()
    sim = SimStation(endpoint, "line4", rate=100, count=0)
    listener = Listener(broker, "spBv1.0/#")
    bridge = start_bridge("mqtt", endpoint, "--broker", f"mqtt://127.0.0.1:{broker}", "--mode", "sparkplug",
                          "--group", "plant", "--node", "edge1")
    try:
        assert sim.publisher.wait_for_subscribers(1, 30) == 1
        for _ in range(40):  # an idle publisher greets the bridge when used
            sim.publisher.service()
            time.sleep(0.02)
        _until("births", lambda: any("/DBIRTH/" in t for t, _, _ in listener.snapshot()), bridge)
        for _ in range(50):
            sim.publish_one()
            time.sleep(0.005)
        ddata = "spBv1.0/plant/DDATA/edge1/line4"
        _until("50 DDATA", lambda: sum(t == ddata for t, _, _ in listener.snapshot()) >= 50, bridge)
        # A host application asks for a rebirth: NBIRTH (seq 0) and the station's DBIRTH again.
        listener.client.publish("spBv1.0/plant/NCMD/edge1",
                                payload(0, [("Node Control/Rebirth", BOOLEAN, True)], 0), qos=1)
        _until("rebirth", lambda: sum(t.endswith("/DBIRTH/edge1/line4") for t, _, _ in listener.snapshot()) == 2,
               bridge)
        bridge.send_signal(signal.SIGKILL)
        bridge.wait()
        # no goodbye from the bridge: the NDEATH is the broker's, from the will
        _until("NDEATH", lambda: any(t.endswith("/NDEATH/edge1") for t, _, _ in listener.snapshot()), None, 15)
    finally:
        bridge.kill()
        listener.close()
        sim.close()
    got = listener.snapshot()
    topics = [t for t, _, _ in got]
    assert topics[0] == "spBv1.0/plant/NBIRTH/edge1" and topics[1] == "spBv1.0/plant/DBIRTH/edge1/line4"
    nbirth, dbirth = decode(got[0][1]), decode(got[1][1])
    assert nbirth["seq"] == 0 and dbirth["seq"] == 1
    assert dbirth["metrics"]["Counters/published"] == 0 and "Last Verdict/verdict" in dbirth["metrics"]
    data = [decode(p) for t, p, _ in got if t == ddata]
    assert [d["metrics"]["Last Verdict/seq"] for d in data] == list(range(50))
    assert [d["metrics"]["Last Verdict/verdict"] for d in data] == [m["verdict"] for m in sim.published]
    assert [d["seq"] for d in data] == [(2 + n) % 256 for n in range(50)]  # one seq across the node's messages
    rebirth = [decode(p) for t, p, _ in got if t.endswith("/NBIRTH/edge1")][1]
    assert rebirth["seq"] == 0 and rebirth["metrics"]["bdSeq"] == nbirth["metrics"]["bdSeq"]
    (death,) = [decode(p) for t, p, _ in got if t.endswith("/NDEATH/edge1")]
    assert death["metrics"]["bdSeq"] == nbirth["metrics"]["bdSeq"] and death["seq"] is None


def test_json_mode_sends_every_verdict_and_retains_the_state(broker: int) -> None:
    from station.tools.plantsim import SimStation

    endpoint = free_endpoint()
    sim = SimStation(endpoint, "line5", rate=100, count=0)
    listener = Listener(broker, "plant1/#")
    bridge = start_bridge("mqtt", endpoint, "--broker", f"mqtt://127.0.0.1:{broker}", "--prefix", "plant1",
                          "--client-id", "br5")
    try:
        assert sim.publisher.wait_for_subscribers(1, 30) == 1
        _until("online", lambda: ("plant1/_bridge/br5", b"online", False) in listener.snapshot(), bridge)
        for _ in range(30):
            sim.publish_one()
            time.sleep(0.005)
        sim.publisher.heartbeat("running", sim.counters.snapshot(), 100.0)
        _until("30 verdicts and the state", lambda: sum(t == "plant1/line5/verdict" for t, _, _ in
                                                        listener.snapshot()) >= 30 and
               any(t == "plant1/line5/state" and b'"published":30' in p for t, p, _ in listener.snapshot()), bridge)
        late = Listener(broker, "plant1/+/state")  # a dashboard that connects later
        try:
            _until("retained state", lambda: bool(late.snapshot()), bridge, 10)
            topic, payload, retained = late.snapshot()[0]
            assert topic == "plant1/line5/state"
        finally:
            late.close()
        stop_bridge(bridge, "mqtt_bridge_stopped")
    finally:
        bridge.kill()
        listener.close()
        sim.close()
    verdicts = [json.loads(p) for t, p, _ in listener.snapshot() if t == "plant1/line5/verdict"]
    assert verdicts == sim.published
    assert retained and json.loads(payload)["counters"]["published"] == 30 and json.loads(payload)["state"] == "running"
    assert ("plant1/_bridge/br5", b"offline", False) in listener.snapshot()  # said on a clean stop


def test_tls_and_a_password_are_required_and_used(tmp_path: Path) -> None:
    """A broker that takes only TLS with a known user: the bridge gets in with --tls-ca and --password-file."""
    from paho.mqtt.enums import CallbackAPIVersion

    _mosquitto()
    folder = Path(tempfile.mkdtemp(prefix="station-mqtts-"))
    key, cert = folder / "key.pem", folder / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                           "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(folder / "passwd"), "line-bridge", "s3cret"], check=True)
    folder.chmod(0o755)  # mosquitto started as root drops to its own user before it reads these
    for f in folder.iterdir():
        f.chmod(0o644)
    password = tmp_path / "mqtt.pass"
    password.write_text("s3cret\n")
    wrong = tmp_path / "wrong.pass"
    wrong.write_text("guess\n")
    servers = _serve(folder, f"allow_anonymous false\npassword_file {folder / 'passwd'}\ncafile {cert}\n"
                             f"certfile {cert}\nkeyfile {key}\n")
    port = next(servers)
    got: list[tuple[str, bytes]] = []
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="watcher")
    watcher.username_pw_set("line-bridge", "s3cret")
    watcher.tls_set(ca_certs=str(cert))
    watcher.on_connect = lambda cl, *_: cl.subscribe("tls/#", qos=1)
    watcher.on_message = lambda _c, _u, msg: got.append((msg.topic, bytes(msg.payload)))
    watcher.connect("127.0.0.1", port)
    watcher.loop_start()
    endpoint = free_endpoint()
    common = ["--broker", f"mqtts://127.0.0.1:{port}", "--tls-ca", str(cert), "--prefix", "tls",
              "--username", "line-bridge"]
    refused = start_bridge("mqtt", endpoint, *common, "--password-file", str(wrong), "--client-id", "bad")
    bridge = start_bridge("mqtt", endpoint, *common, "--password-file", str(password), "--client-id", "good")
    try:
        _until("online", lambda: ("tls/_bridge/good", b"online") in got, bridge)
        stop_bridge(bridge, "mqtt_bridge_stopped")
        err = stop_bridge(refused, "mqtt_bridge_stopped")
    finally:
        for b in (bridge, refused):
            b.kill()
        watcher.disconnect()
        watcher.loop_stop()
        servers.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert "mqtt_connect_refused" in err and not any(t == "tls/_bridge/bad" and p == b"online" for t, p in got)
