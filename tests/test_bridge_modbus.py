"""The Modbus TCP bridge as a PLC meets it: a real `station bridge modbus` process, driven with pymodbus's client."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
from pymodbus.client import ModbusTcpClient
from pymodbus.pdu import ModbusPDU

from station.bridges.modbus import (
    ACK_COIL,
    DROPPED,
    PASSED,
    QUEUE_LIMIT,
    REASON_BITS,
    REJECT,
    SKIPPED,
    STATE_CODES,
    VALID,
    Addr,
    Handshake,
    Result,
)
from tests.conftest import free_endpoint, run_station, start_bridge, station_cmd, stop_bridge

UNIT = 1
#: how often the test PLC polls, as a PLC task would
SCAN_S = 0.01
CODES = {"pass": 0, "fail": 1, "skipped": 2}
Message = dict[str, Any]


def _free_port() -> int:
    return int(free_endpoint().rsplit(":", 1)[1])


def _bridge(endpoint: str, port: int) -> subprocess.Popen[str]:
    return start_bridge("modbus", endpoint, "--listen", f"127.0.0.1:{port}")


def _stop(bridge: subprocess.Popen[str]) -> None:
    stop_bridge(bridge, "modbus_bridge_stopped")


def u32(regs: list[int], addr: int) -> int:
    return regs[addr] << 16 | regs[addr + 1]


def label(regs: list[int]) -> str:
    raw = b"".join(r.to_bytes(2, "big") for r in regs[Addr.LABEL: Addr.LABEL + Addr.LABEL_WORDS])
    return raw.rstrip(b"\0").decode("ascii")


def bit(word: int, n: int) -> bool:
    return bool(word >> n & 1)


class Plc:
    """What a PLC program does over Modbus TCP: poll, read a block in one request, acknowledge."""

    def __init__(self, port: int, bridge: subprocess.Popen[str]) -> None:
        self.bridge = bridge
        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        # Nothing to wait on but the port itself: poll the connect, with a deadline.
        self.wait("the bridge to listen", self.client.connect)

    def alive(self) -> None:
        if self.bridge.poll() is not None:
            raise AssertionError(f"bridge exited {self.bridge.returncode}: {self.bridge.communicate()[1][-3000:]}")

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.alive()
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(SCAN_S)

    def ok(self, response: ModbusPDU) -> ModbusPDU:
        assert not response.isError(), response
        return response

    def holding(self, address: int = 0, count: int = Addr.SIZE) -> list[int]:
        return list(self.ok(self.client.read_holding_registers(address, count=count, device_id=UNIT)).registers)

    def inputs(self, address: int = 0, count: int = Addr.SIZE) -> list[int]:
        return list(self.ok(self.client.read_input_registers(address, count=count, device_id=UNIT)).registers)

    def discrete(self) -> list[bool]:
        return list(self.ok(self.client.read_discrete_inputs(0, count=8, device_id=UNIT)).bits)

    def coils(self) -> list[bool]:
        return list(self.ok(self.client.read_coils(0, count=8, device_id=UNIT)).bits)

    def counters(self) -> list[int]:
        regs = self.holding(Addr.COUNTERS, 14)
        return [u32(regs, 2 * i) for i in range(7)]

    def valid(self) -> bool:
        return bit(self.holding(Addr.STATUS, 1)[0], VALID)

    def acknowledge(self, write: Callable[[bool], ModbusPDU]) -> None:
        self.ok(write(True))
        self.wait("ResultsValid to drop", lambda: not self.valid(), timeout_s=5)
        self.ok(write(False))

    def ack_coil(self, on: bool) -> ModbusPDU:
        return self.client.write_coil(ACK_COIL, on, device_id=UNIT)

    def ack_control(self, on: bool) -> ModbusPDU:
        return self.client.write_register(Addr.CONTROL, int(on), device_id=UNIT)

    def close(self) -> None:
        self.client.close()


def _lines(path: Path) -> list[Message]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_plc_gets_every_replayed_verdict_once_in_order_through_the_handshake(
        bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    endpoint, port, out = free_endpoint(), _free_port(), tmp_path / "v.jsonl"
    bridge = _bridge(endpoint, port)
    plc = Plc(port, bridge)
    # Files, not pipes, for replay's output: nobody reads it while the PLC loop runs.
    with (tmp_path / "replay.log").open("w") as log:
        replay = subprocess.Popen(
            station_cmd("replay", "--model", str(bundle), "--source", str(eval_root), "--publish", endpoint,
                        "--wait-subscribers", "1", "--station-id", "line1", "--out", str(out)),
            stdout=log, stderr=subprocess.STDOUT, text=True)
    taken: list[list[int]] = []
    try:
        deadline = time.monotonic() + 60
        # Results arrive while the PLC works through earlier ones: the bridge must queue, not lose, them.
        while replay.poll() is None or len(taken) < len(_lines(out)):
            assert time.monotonic() < deadline, f"took {len(taken)} results, replay rc {replay.poll()}"
            plc.alive()
            block = plc.holding(0, Addr.LATEST_ID32)  # status and result in one request: one snapshot
            if bit(block[Addr.STATUS], VALID):
                taken.append(block)
                plc.acknowledge(plc.ack_coil)
            else:
                time.sleep(SCAN_S)
        assert replay.wait(timeout=30) == 0, (tmp_path / "replay.log").read_text()[-3000:]
        published = _lines(out)
        assert len(published) == len(list(eval_root.rglob("*.png"))) > 0

        assert [u32(b, Addr.ID32) for b in taken] == [m["seq"] for m in published]
        assert [b[Addr.ID16] for b in taken] == [m["seq"] & 0xFFFF for m in published]
        for b, m in zip(taken, published, strict=True):
            _check_result(b, m)

        passed, failed, skipped = (sum(m["verdict"] == v for m in published) for v in ("pass", "fail", "skipped"))
        errors = sum(m["error"] is not None for m in published)
        # The final heartbeat (state stopped) brings the station's own totals.
        plc.wait("the station's final heartbeat", lambda: plc.holding(Addr.STATE, 1)[0] == STATE_CODES["stopped"])
        assert plc.counters() == [len(published), passed, failed, skipped, errors, 0, 0]
        regs = plc.holding()
        assert u32(regs, Addr.REJECT_COUNT) == failed
        assert (regs[Addr.PENDING], u32(regs, Addr.DROPPED)) == (0, 0)
        assert u32(regs, Addr.LATEST_ID32) == published[-1]["seq"]
        assert regs[Addr.LATEST_RESULT] == CODES[published[-1]["verdict"]]
        assert regs[Addr.MAP_VERSION] == 1
        assert plc.inputs(0, Addr.SILENT_S) == plc.holding(0, Addr.SILENT_S)  # a PLC may read either table
        assert not bit(regs[Addr.STATUS], VALID) and not plc.discrete()[VALID] and not plc.coils()[VALID]
        _stop(bridge)
    finally:
        plc.close()
        replay.kill()
        bridge.kill()


def _check_result(block: list[int], m: Message) -> None:
    status, code = block[Addr.STATUS], CODES[m["verdict"]]
    assert block[Addr.RESULT] == code, m
    assert (bit(status, PASSED), bit(status, REJECT), bit(status, SKIPPED)) == (code == 0, code == 1, code == 2)
    assert block[Addr.REASONS] == sum(1 << REASON_BITS.index(r) for r in m["reasons"])
    cls, anomaly = m["class"], m["anomaly"]
    assert label(block) == cls["label"]
    assert block[Addr.CLASS] == list(cls["scores"]).index(cls["label"])
    assert block[Addr.CONFIDENCE] == round(cls["confidence"] * 1000)
    assert u32(block, Addr.ANOMALY) == round(anomaly["score"] * 1000)
    assert u32(block, Addr.THRESHOLD) == round(anomaly["threshold"] * 1000)
    assert u32(block, Addr.TRIGGER) == 0xFFFFFFFF  # replayed files have no camera frame counter


def _verdict(seq: int, verdict: str = "fail") -> bytes:
    msg = {"schema": "station.verdict/1", "station": "x", "run_id": "r1", "seq": seq, "verdict": verdict,
           "reasons": ["anomaly"] if verdict == "fail" else [],
           "class": {"label": "good", "confidence": 0.75, "scores": {"good": 0.75, "broken": 0.25}},
           "anomaly": {"score": 0.25, "threshold": 0.125}, "error": None,
           "trigger": {"block_id": 1000 + seq, "count": None, "encoder": None, "camera_timestamp": None}}
    return json.dumps(msg).encode()


def _publisher(endpoint: str, welcome: Message) -> zmq.Socket[bytes]:
    pub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)  # the test sends a queue's worth and more at once
    pub.setsockopt(zmq.XPUB_WELCOME_MSG, b"welcome.x " + json.dumps(welcome).encode())
    pub.bind(endpoint)
    return pub


def test_a_late_joiner_is_current_at_once_and_a_slow_plc_loses_only_the_oldest_results(tmp_path: Path) -> None:
    endpoint, port = free_endpoint(), _free_port()
    counters = {"captured": 7, "inspected": 7, "skipped": 0, "errors": 0, "published": 7, "passed": 5, "failed": 2}
    pub = _publisher(endpoint, {"schema": "station.welcome/1", "station": "x", "run_id": "r1", "next_seq": 7,
                                "state": "running", "counters": counters, "last_verdict": json.loads(_verdict(6))})
    bridge = _bridge(endpoint, port)
    plc = Plc(port, bridge)
    try:
        assert pub.poll(30_000), "the bridge never subscribed"
        plc.wait("the welcome's counters", lambda: plc.counters() == [7, 5, 2, 0, 0, 0, 0])
        regs = plc.holding()
        # The welcome's last verdict is old news: shown as the latest, never latched as a new result.
        assert not bit(regs[Addr.STATUS], VALID) and regs[Addr.RESULT] == 0xFFFF
        assert (u32(regs, Addr.LATEST_ID32), regs[Addr.LATEST_RESULT], u32(regs, Addr.REJECT_COUNT)) == (6, 1, 0)
        assert regs[Addr.STATE] == STATE_CODES["running"]

        # The PLC is not acknowledging: seq 7 is latched, 1000 wait, the 4 oldest after it are dropped.
        last = 7 + QUEUE_LIMIT + 4
        for seq in range(7, last + 1):
            pub.send_multipart([b"verdict.x", _verdict(seq)])
        plc.wait("the last verdict", lambda: u32(plc.holding(), Addr.LATEST_ID32) == last)
        regs = plc.holding()
        assert (u32(regs, Addr.ID32), regs[Addr.PENDING], u32(regs, Addr.DROPPED)) == (7, QUEUE_LIMIT, 4)
        assert u32(regs, Addr.TRIGGER) == 1007  # the PLC's key into its shift register
        assert bit(regs[Addr.STATUS], DROPPED) and plc.discrete()[DROPPED] and plc.coils()[DROPPED]
        assert plc.coils()[REJECT] and not plc.coils()[PASSED]
        assert u32(regs, Addr.REJECT_COUNT) == QUEUE_LIMIT + 5  # every fail, handshake or not
        assert plc.counters() == [7 + QUEUE_LIMIT + 5, 5, 2 + QUEUE_LIMIT + 5, 0, 0, 0, 0]

        # A PLC that only writes holding registers acknowledges with the control word.
        plc.acknowledge(plc.ack_control)
        plc.wait("the next result", plc.valid)
        assert u32(plc.holding(), Addr.ID32) == 12

        pub.send_multipart([b"verdict.x", _verdict(last + 4, "pass")])  # 3 lost on the way
        heartbeat = {"state": "degraded", "counters": {**counters, "published": 9999}, "next_seq": last + 5}
        pub.send_multipart([b"heartbeat.x", json.dumps(heartbeat).encode()])
        plc.wait("the heartbeat", lambda: plc.holding(Addr.ALIVE, 1)[0] == 1)
        regs = plc.holding()
        assert regs[Addr.STATE] == STATE_CODES["degraded"]
        assert plc.counters() == [9999, 5, 2, 0, 0, 1, 3]  # the station's own counts win; 1 gap of 3

        assert plc.client.write_register(Addr.RESULT, 0, device_id=UNIT).exception_code == 2  # read-only
        assert plc.client.read_holding_registers(Addr.SIZE, count=1, device_id=UNIT).exception_code == 2
        assert plc.client.write_coil(ACK_COIL + 1, True, device_id=UNIT).exception_code == 2
        assert plc.client.write_coil(REJECT, False, device_id=UNIT).exception_code == 2  # status coils are read-only
        assert plc.client.read_holding_registers(0, count=1, device_id=UNIT + 1).exception_code == 0x0B
        _stop(bridge)
    finally:
        plc.close()
        bridge.kill()
        pub.close(0)


def test_a_stale_acknowledge_does_not_take_the_next_result() -> None:
    hs = Handshake(limit=2)
    hs.acknowledge(True)  # the PLC left its acknowledge set, e.g. across a bridge restart
    hs.offer(Result(seq=0, code=0, reasons=0, class_index=0, confidence=0, anomaly=0, threshold=0, trigger=0,
                    label="good"))
    assert not hs.valid and len(hs.pending) == 1
    hs.acknowledge(False)
    assert hs.valid and hs.latched is not None and hs.latched.seq == 0


def test_a_bad_listen_exits_2_and_a_taken_port_exits_1_naming_it() -> None:
    endpoint = free_endpoint()
    bad = run_station("bridge", "modbus", "--connect", endpoint, "--listen", "0.0.0.0", timeout=60)
    assert bad.returncode == 2 and "--listen '0.0.0.0'" in bad.stderr, bad.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_station("bridge", "modbus", "--connect", endpoint, "--listen", f"127.0.0.1:{port}", timeout=60)
    assert busy.returncode == 1 and f"--listen 127.0.0.1:{port}: cannot listen" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr
