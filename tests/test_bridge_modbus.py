"""The Modbus TCP bridge as a PLC meets it: a real `station bridge modbus` process, driven with pymodbus's client.

Malformed, pipelined and garbage frames go over raw sockets, built by hand: pymodbus's client cannot send them.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq
from pymodbus.client import ModbusTcpClient
from pymodbus.pdu import ModbusPDU

from station.bridges.feed import FeedEvent
from station.bridges.modbus import (
    ACK_COIL,
    ACK_GRACE_S,
    ACK_SEEN,
    DROPPED,
    ONLINE,
    PASSED,
    QUEUE_LIMIT,
    REASON_BITS,
    REJECT,
    SKIPPED,
    STATE_CODES,
    VALID,
    Addr,
    BridgeState,
    Handshake,
    Result,
    quiet_pymodbus,
)
from station.service.config import PublishConfig
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


def _stop(bridge: subprocess.Popen[str]) -> str:
    return stop_bridge(bridge, "modbus_bridge_stopped")


def u32(regs: list[int], addr: int) -> int:
    return regs[addr] << 16 | regs[addr + 1]


def label(regs: list[int]) -> str:
    raw = b"".join(r.to_bytes(2, "big") for r in regs[Addr.LABEL: Addr.LABEL + Addr.LABEL_WORDS])
    return raw.rstrip(b"\0").decode("ascii")


def bit(word: int, n: int) -> bool:
    return bool(word >> n & 1)


class Plc:
    """What a PLC program does over Modbus TCP: poll, read a block in one request, acknowledge."""

    def __init__(self, port: int, bridge: subprocess.Popen[str], clear_ack: bool = True) -> None:
        self.bridge = bridge
        self.client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        # Nothing to wait on but the port itself: poll the connect, with a deadline.
        self.wait("the bridge to listen", self.client.connect)
        if clear_ack:
            # As the doc's PLC program does at start: the bridge then knows no stale acknowledge is coming.
            self.ok(self.ack_coil(False))

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


def _message(seq: int, verdict: str = "fail") -> Message:
    return {"schema": "station.verdict/1", "station": "x", "run_id": "r1", "seq": seq, "frame_id": f"{seq}.png",
            "source": "test", "captured_at": "2026-12-02T05:00:00.000Z",
            "trigger": {"block_id": 1000 + seq, "count": None, "encoder": None, "camera_timestamp": None},
            "published_at": "2026-12-02T05:00:00.001Z", "verdict": verdict,
            "reasons": ["anomaly"] if verdict == "fail" else [],
            "class": {"label": "good", "confidence": 0.75, "scores": {"good": 0.75, "broken": 0.25}},
            "anomaly": {"score": 0.25, "threshold": 0.125, "region": {"bbox": None, "area_px": 0, "area_fraction": 0}},
            "error": None, "latency_ms": {"total": 1.5}, "model": {"name": "t", "version": "1"}, "truth": None}


def _verdict(seq: int, verdict: str = "fail") -> bytes:
    return json.dumps(_message(seq, verdict)).encode()


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
        heartbeat = {"schema": "station.heartbeat/1", "station": "x", "run_id": "r1", "state": "degraded",
                     "sent_at": "2026-12-02T05:00:01.000Z", "next_seq": last + 5,
                     "counters": {**counters, "published": 9999}, "fps": 0.5, "drift": None}
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


def _event(kind: str, message: Message, notes: list[str] | None = None) -> FeedEvent:
    return FeedEvent(kind, message, notes or [])  # type: ignore[arg-type]  # the kinds the feed gives


def _beat(state: str, next_seq: int, **counters: int) -> Message:
    zeros = dict.fromkeys(("captured", "inspected", "skipped", "errors", "published", "passed", "failed"), 0)
    return {"schema": "station.heartbeat/1", "station": "x", "run_id": "r1", "state": state,
            "sent_at": "2026-12-02T05:00:00.000Z", "next_seq": next_seq, "counters": {**zeros, **counters},
            "fps": 1.0, "drift": None}


def test_the_registers_follow_verdicts_and_heartbeats_and_drop_online_after_three_silent_intervals() -> None:
    now = 1000.0
    state = BridgeState(clock=lambda: now)
    regs = state.registers()
    assert (regs[Addr.STATE], regs[Addr.SILENT_S], regs[Addr.RESULT], regs[Addr.LATEST_RESULT]) == (
        0, 0xFFFF, 0xFFFF, 0xFFFF)
    assert not bit(regs[Addr.STATUS], ONLINE)
    state.apply(_event("heartbeat", _beat("running", 4, captured=4, published=4, passed=3, failed=1)), 0, 0)
    now += 10.0  # a station set to heartbeat every 10 s
    state.apply(_event("heartbeat", _beat("running", 4, captured=4, published=4, passed=3, failed=1)), 0, 0)
    state.write_ack_coil(False)  # the PLC's acknowledge is clear: results latch at once
    fail = {**_message(4), "error": {"reason": "unreadable_image", "detail": "x"},
            "reasons": ["error", "unreadable_image"]}
    assert state.apply(_event("verdict", fail), 0, 0)
    state.apply(_event("verdict", _message(5, "skipped") | {"reasons": ["overload"], "class": None, "anomaly": None}),
                1, 2)
    regs = state.registers()
    # published, passed, failed, skipped, errors, then the stream's gaps and missed: stepped on per verdict
    assert [u32(regs, Addr.COUNTERS + 2 * i) for i in range(7)] == [6, 3, 2, 1, 1, 1, 2]
    assert (u32(regs, Addr.ID32), regs[Addr.RESULT], regs[Addr.PENDING]) == (4, 1, 1)  # seq 5 waits its turn
    assert regs[Addr.REASONS] == 1 << REASON_BITS.index("error") | 1 << REASON_BITS.index("unreadable_image")
    assert (u32(regs, Addr.LATEST_ID32), regs[Addr.LATEST_RESULT], u32(regs, Addr.REJECT_COUNT)) == (5, 2, 1)
    assert u32(regs, Addr.TRIGGER) == 1004 and label(regs) == "good"
    assert (regs[Addr.STATE], regs[Addr.ALIVE], regs[Addr.SILENT_S]) == (STATE_CODES["running"], 2, 0)
    status = regs[Addr.STATUS]
    assert bit(status, VALID) and bit(status, REJECT) and bit(status, ONLINE) and not bit(status, PASSED)
    # Three observed heartbeat intervals (30 s) of silence, not the 3 s floor, and the station is offline.
    now += 29.9
    assert bit(state.status_word(), ONLINE) and state.registers()[Addr.SILENT_S] == 29
    now += 0.1
    assert not bit(state.status_word(), ONLINE)
    # The station's own counts win again at its next heartbeat; a message outside the contract changes nothing.
    state.apply(_event("heartbeat", _beat("stopping", 6, published=7, passed=3, failed=2, skipped=1, errors=1)), 1, 2)
    state.apply(_event("verdict", {"seq": 6, "verdict": "fail"}), 1, 2)
    regs = state.registers()
    assert [u32(regs, Addr.COUNTERS + 2 * i) for i in range(5)] == [7, 3, 2, 1, 1]
    assert (regs[Addr.STATE], regs[Addr.ALIVE], u32(regs, Addr.REJECT_COUNT)) == (STATE_CODES["stopping"], 3, 1)
    assert bit(regs[Addr.STATUS], ONLINE)


def test_a_stale_acknowledge_does_not_take_the_next_result() -> None:
    hs = Handshake(limit=2)
    hs.acknowledge(True)  # the PLC left its acknowledge set, e.g. across a bridge restart
    hs.offer(Result(seq=0, code=0, reasons=0, class_index=0, confidence=0, anomaly=0, threshold=0, trigger=0,
                    label="good"))
    assert not hs.valid and len(hs.pending) == 1
    hs.acknowledge(False)
    assert hs.valid and hs.latched is not None and hs.latched.seq == 0


def test_after_a_start_the_first_result_waits_for_the_plcs_acknowledge_or_the_grace() -> None:
    now = 100.0
    state = BridgeState(clock=lambda: now)
    result = Result(seq=0, code=0, reasons=0, class_index=0, confidence=0, anomaly=0, threshold=0, trigger=0,
                    label="good")
    state.handshake.offer(result)
    state.request_seen()  # the first request of any client starts the grace
    now += ACK_GRACE_S - 0.01
    state.request_seen()
    assert not state.handshake.valid and len(state.handshake.pending) == 1
    now += 0.01
    state.request_seen()
    assert state.handshake.valid and state.handshake.latched == result

    written = BridgeState()
    written.handshake.offer(result)
    written.write_ack_coil(False)  # the PLC shows its acknowledge clear: no grace to wait for
    assert written.handshake.valid


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
    # The one message, without pymodbus's own warning ("Failed to start server ...") as bare text beside it.
    assert [line for line in busy.stderr.splitlines() if not line.startswith("{")] == [busy.stderr.splitlines()[-1]]


# -- requests as bytes on a raw socket ---------------------------------------------

Frame = tuple[int, int, bytes]  # transaction id, unit id, PDU


def mbap(tid: int, pdu: bytes, unit: int = UNIT) -> bytes:
    """A Modbus TCP frame: transaction id, protocol 0, length (unit id + PDU), unit id, then the PDU."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def pdu(fc: int, fmt: str = "", *fields: int) -> bytes:
    return bytes([fc]) + struct.pack(">" + fmt, *fields)


def raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def responses(sock: socket.socket, n: int) -> list[Frame]:
    """The next ``n`` response frames, split by their MBAP length as a client does."""
    buf, frames = b"", list[Frame]()
    while len(frames) < n:
        chunk = sock.recv(65536)
        assert chunk, f"the bridge closed the connection after {len(frames)} of {n} responses"
        buf += chunk
        while len(buf) >= 7 and len(buf) >= 6 + int.from_bytes(buf[4:6], "big"):
            tid, protocol, length, unit = struct.unpack(">HHHB", buf[:7])
            assert protocol == 0
            frames.append((tid, unit, buf[7: 6 + length]))
            buf = buf[6 + length:]
    assert not buf, f"more than {n} responses: {buf.hex()}"
    return frames


def exchange(port: int, *requests: bytes) -> list[bytes]:
    """The requests one after another on one fresh connection; their response PDUs."""
    with raw(port) as sock:
        answers: list[bytes] = []
        for tid, request in enumerate(requests, 1):
            sock.sendall(mbap(tid, request))
            [(got_tid, _, response)] = responses(sock, 1)
            assert got_tid == tid
            answers.append(response)
    return answers


def exception(fc: int, code: int) -> bytes:
    return bytes([fc | 0x80, code])


def _welcome(next_seq: int = 7) -> Message:
    counters = {"captured": 0, "inspected": 0, "skipped": 0, "errors": 0, "published": 0, "passed": 0, "failed": 0}
    return {"schema": "station.welcome/1", "station": "x", "run_id": "r1", "next_seq": next_seq, "state": "running",
            "counters": counters, "last_verdict": None}


def _subscribed(pub: zmq.Socket[bytes]) -> None:
    """Wait for a bridge's subscription to verdicts (its first), past what earlier bridges left in the queue."""
    while True:
        assert pub.poll(30_000), "no bridge subscribed"
        if pub.recv() == b"\x01verdict.":  # XPUB: byte 1 + topic subscribes, byte 0 + topic leaves
            return


def _latest(plc: Plc, seq: int) -> None:
    plc.wait(f"verdict {seq}", lambda: u32(plc.holding(), Addr.LATEST_ID32) == seq)


def _stderr_lines(err: str) -> list[Message]:
    lines = err.splitlines()
    for line in lines:
        assert len(line) < 1024, f"a {len(line)}-character log line: {line[:300]}"
    return [json.loads(line) for line in lines]


# -- the PLC's acknowledge across a bridge restart --------------------------------


def test_a_stale_acknowledge_from_before_a_bridge_restart_does_not_take_the_first_result() -> None:
    endpoint, port = free_endpoint(), _free_port()
    pub = _publisher(endpoint, _welcome())
    try:
        # A PLC program that never writes its acknowledge before it has a result (the doc's example before it
        # cleared it at start) still gets one: after the grace, the bridge takes the acknowledge as clear.
        bridge = _bridge(endpoint, port)
        plc = Plc(port, bridge, clear_ack=False)
        _subscribed(pub)
        pub.send_multipart([b"verdict.x", _verdict(7)])
        _latest(plc, 7)
        plc.wait("the grace for the acknowledge", plc.valid, timeout_s=10)
        assert u32(plc.holding(), Addr.ID32) == 7
        # The PLC takes it and acknowledges; the bridge goes down while the PLC still holds its acknowledge.
        plc.ok(plc.ack_coil(True))
        assert not plc.valid()
        plc.close()
        _stop(bridge)

        bridge = _bridge(endpoint, port)
        _subscribed(pub)
        # The first verdict after the restart comes before the PLC is back.
        pub.send_multipart([b"verdict.x", _verdict(8)])
        plc = Plc(port, bridge, clear_ack=False)
        _latest(plc, 8)
        regs = plc.holding()
        # Held, not latched: a PLC that writes its acknowledge every scan is about to write the stale one.
        assert not bit(regs[Addr.STATUS], VALID) and regs[Addr.PENDING] == 1, regs[:16]
        plc.ok(plc.ack_coil(True))  # there it is
        regs = plc.holding()
        assert bit(regs[Addr.STATUS], ACK_SEEN) and not bit(regs[Addr.STATUS], VALID)
        assert regs[Addr.PENDING] == 1, "the stale acknowledge took the first result"
        plc.ok(plc.ack_coil(False))  # the PLC sees ResultsValid = 0 and clears it: now the result is handed over
        regs = plc.holding()
        assert bit(regs[Addr.STATUS], VALID) and u32(regs, Addr.ID32) == 8 and regs[Addr.PENDING] == 0
        plc.close()
        _stop(bridge)
    finally:
        pub.close(0)
        bridge.kill()


def test_write_single_coil_takes_only_0000_and_ff00_and_anything_else_changes_nothing() -> None:
    endpoint, port = free_endpoint(), _free_port()
    pub = _publisher(endpoint, _welcome())
    bridge = _bridge(endpoint, port)
    plc = Plc(port, bridge)
    try:
        _subscribed(pub)
        pub.send_multipart([b"verdict.x", _verdict(7)])
        plc.wait("the result", plc.valid)
        # Any of these taken as ON would acknowledge a result the PLC never read.
        for value in (0x1234, 0x0001, 0x00FF, 0xFFFF, 0xFF01):
            [answer] = exchange(port, pdu(5, "HH", ACK_COIL, value))
            assert answer == exception(5, 3), (hex(value), answer.hex())
        regs = plc.holding()
        assert bit(regs[Addr.STATUS], VALID) and not bit(regs[Addr.STATUS], ACK_SEEN)
        assert u32(regs, Addr.ID32) == 7 and not plc.client.read_coils(ACK_COIL, count=1, device_id=UNIT).bits[0]

        on, off = pdu(5, "HH", ACK_COIL, 0xFF00), pdu(5, "HH", ACK_COIL, 0x0000)
        assert exchange(port, on) == [on]  # the response echoes the request
        assert not plc.valid()
        assert exchange(port, off) == [off]
        _stop(bridge)
    finally:
        plc.close()
        bridge.kill()
        pub.close(0)


def test_a_read_of_no_or_too_many_items_and_a_malformed_request_get_exception_03() -> None:
    port = _free_port()
    bridge = _bridge(free_endpoint(), port)
    plc = Plc(port, bridge)
    try:
        for fc, limit in ((1, 2000), (2, 2000), (3, 125), (4, 125)):
            answers = exchange(port, pdu(fc, "HH", 0, 0), pdu(fc, "HH", 0, limit + 1), pdu(fc, "HH", 0, 0xFFFF))
            assert answers == [exception(fc, 3)] * 3, (fc, [a.hex() for a in answers])
        # Quantities within the spec's limits but past the map: 02, as before.
        assert plc.client.read_holding_registers(0, count=125, device_id=UNIT).exception_code == 2
        assert plc.client.read_input_registers(0, count=125, device_id=UNIT).exception_code == 2
        assert plc.client.read_coils(0, count=2000, device_id=UNIT).exception_code == 2
        assert plc.client.read_discrete_inputs(0, count=2000, device_id=UNIT).exception_code == 2
        assert len(plc.holding(0, Addr.SIZE)) == Addr.SIZE

        malformed = [
            pdu(3, "H", 0),  # no quantity
            pdu(3, "HHB", 0, 1, 0),  # a byte too many
            pdu(16, "HHBH", Addr.CONTROL, 1, 3, 1),  # byte count 3 for one register
            pdu(16, "HHBHH", Addr.CONTROL, 1, 2, 1, 0),  # more data than the byte count
            pdu(16, "HHB", Addr.CONTROL, 0, 0),  # no registers
            pdu(15, "HHBB", ACK_COIL, 1, 2, 1),  # byte count 2 for one coil
            pdu(23, "HHHHBH", 0, 1, Addr.CONTROL, 0, 2, 1),  # writes none, carries one
            pdu(23, "HHHHBH", 0, 126, Addr.CONTROL, 1, 2, 1),  # reads too many
        ]
        for request, answer in zip(malformed, exchange(port, *malformed), strict=True):
            assert answer == exception(request[0], 3), (request.hex(), answer.hex())
        # A function code the bridge does not serve: 01, under its own code (pymodbus answered 0x80).
        assert exchange(port, b"\x41", pdu(20, "BBHHH", 7, 6, 0, 1, 2)) == [exception(0x41, 1), exception(20, 1)]
        assert plc.holding(Addr.MAP_VERSION, 1) == [1]
        _stop(bridge)
    finally:
        plc.close()
        bridge.kill()


def test_requests_pipelined_in_one_segment_are_each_answered_in_order() -> None:
    port = _free_port()
    bridge = _bridge(free_endpoint(), port)
    plc = Plc(port, bridge)  # only to wait for the port
    try:
        with raw(port) as sock:
            burst = [
                mbap(11, pdu(3, "HH", Addr.MAP_VERSION, 1)),
                mbap(12, pdu(5, "HH", ACK_COIL, 0x1234)),  # malformed: answered, and the rest still are
                mbap(13, pdu(5, "HH", ACK_COIL, 0xFF00)),
                mbap(14, pdu(1, "HH", ACK_COIL, 1)),
                mbap(15, pdu(4, "HH", Addr.CONTROL, 1), unit=UNIT + 1),
                mbap(16, pdu(5, "HH", ACK_COIL, 0x0000)),
                mbap(17, pdu(4, "HH", Addr.MAP_VERSION, 2)),
            ]
            sock.sendall(b"".join(burst))
            assert responses(sock, len(burst)) == [
                (11, UNIT, pdu(3, "BH", 2, 1)),
                (12, UNIT, exception(5, 3)),
                (13, UNIT, pdu(5, "HH", ACK_COIL, 0xFF00)),
                (14, UNIT, pdu(1, "BB", 1, 1)),  # the write before it was applied first
                (15, UNIT + 1, exception(4, 0x0B)),
                (16, UNIT, pdu(5, "HH", ACK_COIL, 0)),
                (17, UNIT, pdu(4, "BHH", 4, 1, 0)),
            ]

            # More than pymodbus's 264-byte receive buffer, which it threw away whole.
            sock.sendall(b"".join(mbap(100 + i, pdu(3, "HH", Addr.MAP_VERSION, 1)) for i in range(40)))
            assert responses(sock, 40) == [(100 + i, UNIT, pdu(3, "BH", 2, 1)) for i in range(40)]

            # A frame split across segments, the second carrying the next frame too.
            first, second = mbap(200, pdu(3, "HH", Addr.MAP_VERSION, 1)), mbap(201, pdu(1, "HH", 0, 7))
            sock.sendall(first[:5])
            time.sleep(0.05)
            sock.sendall(first[5:] + second)
            assert [tid for tid, _, _ in responses(sock, 2)] == [200, 201]
        _stop(bridge)
    finally:
        plc.close()
        bridge.kill()


def _hung_up(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with some of the garbage still unread: a hang-up all the same
        return True
    except TimeoutError:
        return False


def test_garbage_on_the_port_costs_one_short_json_line_per_client_rate_limited_and_the_bridge_keeps_serving() -> None:
    port = _free_port()
    bridge = _bridge(free_endpoint(), port)
    plc = Plc(port, bridge)
    garbage = random.Random(4).randbytes(4096)
    assert garbage[2:4] != b"\0\0"  # not a Modbus protocol id: no prefix of it is a request
    # The 4 KiB packet; a short one, which made pymodbus log the last 20 frames in hex, the 4 KiB one
    # included; a header claiming 64 KiB.
    kinds = [garbage, garbage[:100], b"\x00\x01\x00\x00\xff\xff\x01" + garbage[:100]]
    hung_up: list[bool] = []
    try:
        # A scanner or fuzzer at it: many clients; lines for the first ten per 10 s at most.
        for i in range(30):
            with raw(port) as sock:
                sock.settimeout(2)
                sock.sendall(kinds[i % len(kinds)])
                # No delimiter to resynchronise on: the bridge hangs up.
                hung_up.append(_hung_up(sock))
            if i == 0:
                assert plc.holding(Addr.MAP_VERSION, 1) == [1]
        assert plc.holding(Addr.MAP_VERSION, 1) == [1]
        plc.close()
        err = _stop(bridge)
    finally:
        plc.close()
        bridge.kill()
    lines = _stderr_lines(err)
    bad = [line for line in lines if line["event"] == "modbus_bad_frame"]
    assert 1 <= len(bad) <= 10 < len(hung_up)
    assert bad[0]["data"] == garbage[:16].hex() + "… (4096 bytes)"
    assert bad[0]["peer"].startswith("127.0.0.1:") and "protocol id" in bad[0]["reason"]
    assert "MBAP length 65535" in bad[2]["reason"]
    others = {line["event"] for line in lines} - {"modbus_bad_frame"}
    assert others <= {"modbus_bridge_started", "stop_requested", "modbus_bridge_stopped"}, others
    assert all(hung_up), hung_up


def test_the_doc_connects_to_the_station_on_its_default_port() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "bridge-modbus.md").read_text()
    default_port = PublishConfig().endpoint.rsplit(":", 1)[1]
    ports = re.findall(r"tcp://[\w.-]+:(\d+)", doc)
    assert ports and set(ports) == {default_port}, ports


def test_pymodbus_errors_become_one_short_line_each_rate_limited_and_its_warnings_are_dropped() -> None:
    logger = logging.getLogger("pymodbus")
    saved = logger.handlers[:], logger.propagate, logger.level
    quiet_pymodbus()
    try:
        with structlog.testing.capture_logs() as logs:
            # What pymodbus's Log.error writes: the message, then hex dumps of the last 20 frames.
            for _ in range(30):
                logging.getLogger("pymodbus.logging").error("Invalid Modbus protocol id: 7\n>>>>> " + "0x0 " * 4096)
            logging.getLogger("pymodbus.logging").warning("Unable to decode frame")
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    assert len(logs) == 10  # BadClientLog's burst; the rest counted
    assert logs[0]["event"] == "pymodbus_log" and logs[0]["message"] == "Invalid Modbus protocol id: 7"
