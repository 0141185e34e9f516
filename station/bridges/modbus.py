"""Modbus TCP bridge: the verdict stream as a vision sensor's result handshake for a PLC.

A PLC cannot subscribe to ZeroMQ, and a bare "last verdict" register loses
bottles whenever two verdicts arrive within one PLC scan. So the map follows
the handshake vision sensors use towards PLCs: the bridge latches one result
and sets ResultsValid; the PLC reads it and sets ResultsAcknowledged; the
bridge clears ResultsValid; the PLC clears its acknowledge; only then is the
next result latched. Results that arrive in between wait in a bounded queue
(oldest dropped past QUEUE_LIMIT, and counted). Beside the handshake: the
station's counters as 32-bit pairs, a RejectCount for PLCs that only poll
counts, and the station's state with an alive counter.
docs/bridge-modbus.md has the full register map and the handshake timeline.

Threads: one executor thread owns the ZeroMQ feed (a ZeroMQ socket must stay
on one thread); the pymodbus server, and with it every register read and
write, runs on the asyncio loop. The bridge state is only touched from the
loop, so it needs no lock. Registers are rendered from that state inside
pymodbus's per-request action hook, so one request always sees one consistent
snapshot: read HR 0-31 in one request and the status word and the result
belong together.

Framing is the bridge's own (BridgeServer, Connection): pymodbus 3.16's
request handler answers only the first of several requests in one TCP
segment, drops a receive buffer over 264 bytes, answers a malformed request
with exception 01 under function code 0x80, and logs hex dumps of what a
client sent. The bridge splits the stream into MBAP frames, checks each
request as the Modbus spec says, answers every one in order, and leaves
pymodbus the PDU classes and the datastore. A misbehaving client gets one
short, rate-limited JSON log line (station/bridges/badclients.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.transport import CommParams, CommType, ModbusProtocol

from station.bridges.badclients import BadClientLog, excerpt
from station.bridges.feed import FeedEvent, VerdictFeed
from station.errors import EXIT_OK, ConfigError, StationError

log = structlog.get_logger("station.bridge.modbus")

#: raised when the layout below changes, so a PLC program can check it is talking to the map it was written for
MAP_VERSION = 1
#: results waiting for the PLC's acknowledge; past this the oldest is dropped (and counted)
QUEUE_LIMIT = 1000
#: how long the feed is polled before the loop looks at ``stop`` again
POLL_S = 0.2
#: no message from the station for this long (or three observed heartbeat intervals, if longer) and
#: StationOnline drops
ONLINE_WITHIN_S = 3.0
#: how often a growing drop count is logged, at most
DROP_LOG_EVERY_S = 10.0
#: after the bridge starts, how long (from the first request any client makes) the first result waits for the
#: PLC to show its acknowledge is clear, before the bridge assumes it is. A PLC that writes its acknowledge
#: every scan shows a stale one within a scan; one that writes only on change never shows it
ACK_GRACE_S = 2.0

U16 = 0xFFFF
U32 = 0xFFFFFFFF
#: "no value": before the first result, and for the class of a frame that was not inspected
NONE16 = U16

# Status word bits (HR/IR 0); discrete input N and coil N are bit N.
VALID, PASSED, REJECT, SKIPPED, ACK_SEEN, ONLINE, DROPPED = range(7)
STATUS_BITS = 7

RESULT_CODES = {"pass": 0, "fail": 1, "skipped": 2}
#: reason bit N is REASON_BITS[N]; the order is part of the map, append only
REASON_BITS = ("defect_class", "anomaly", "error", "overload", "camera_skipped", "unreadable_image",
               "unsupported_image", "image_too_small", "no_bottle_found", "inference_error", "grab_failed")
#: a reason this map version does not know (a newer station); the PLC still sees that something is set
OTHER_REASON_BIT = 15
#: 0 means unknown: no welcome or heartbeat yet
STATE_CODES = {"starting": 1, "running": 2, "degraded": 3, "stopping": 4, "stopped": 5}
#: the station's counters in register order (``published`` is every verdict: the total)
COUNTER_KEYS = ("published", "passed", "failed", "skipped", "errors")


class Addr:
    """0-based register addresses, the same in holding (4xxxx) and input (3xxxx) registers."""

    STATUS = 0
    ID16 = 1
    ID32 = 2
    RESULT = 4
    REASONS = 5
    CLASS = 6
    CONFIDENCE = 7
    ANOMALY = 8
    THRESHOLD = 10
    TRIGGER = 12
    PENDING = 14
    LABEL = 16
    LABEL_WORDS = 16
    LATEST_ID32 = 32
    LATEST_RESULT = 34
    LATEST_REASONS = 35
    REJECT_COUNT = 36
    DROPPED = 38
    COUNTERS = 40  # COUNTER_KEYS, then gaps and missed: seven 32-bit pairs, 40-53
    STATE = 56
    ALIVE = 57
    SILENT_S = 58
    MAP_VERSION = 59
    CONTROL = 60  # the one writable holding register: bit 0 = ResultsAcknowledged
    SIZE = 61


#: coils 0-6 mirror the status bits (read-only); the PLC's acknowledge sits in the next 16-bit word
ACK_COIL = 16
ACK_CONTROL_BIT = 0x0001

FC_COILS = frozenset({1, 5, 15})
FC_DISCRETE = frozenset({2})
FC_REGISTERS = frozenset({3, 4, 6, 16, 22, 23})
#: what the bridge answers: the map's function codes, plus diagnostics (08) and device identification (43),
#: which pymodbus answers without the map. Anything else gets exception 01: pymodbus would answer some
#: (FIFO, file records, comm event log) with made-up data
FC_SERVED = FC_COILS | FC_DISCRETE | FC_REGISTERS | {8, 43}


# -- one result, as registers carry it ---------------------------------------


@dataclass(frozen=True)
class Result:
    seq: int
    code: int
    reasons: int
    class_index: int
    confidence: int  # ×1000
    anomaly: int  # ×1000
    threshold: int  # ×1000
    trigger: int  # the camera's frame counter (trigger.block_id), U32 where the source has none
    label: str


def _milli(value: Any, ceiling: int) -> int:
    """``value`` ×1000 as an unsigned register value; 0 where there is none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if not math.isfinite(value):
        return ceiling if value > 0 else 0
    return min(max(round(value * 1000), 0), ceiling)


def reason_bits(reasons: Any) -> int:
    bits = 0
    for reason in reasons if isinstance(reasons, list) else []:
        bit = REASON_BITS.index(reason) if reason in REASON_BITS else OTHER_REASON_BIT
        bits |= 1 << bit
    return bits


def _class_index(cls: dict[str, Any]) -> int:
    # The scores object lists the bundle's classes in the bundle's order: that order is the index.
    scores, label = cls.get("scores"), cls.get("label")
    if isinstance(scores, dict) and isinstance(label, str) and label in scores:
        return list(scores).index(label)
    return NONE16


def _object(message: dict[str, Any], key: str) -> dict[str, Any]:
    value = message.get(key)
    return value if isinstance(value, dict) else {}


def _trigger(verdict: dict[str, Any]) -> int:
    block_id = _object(verdict, "trigger").get("block_id")
    if isinstance(block_id, bool) or not isinstance(block_id, int) or block_id < 0:
        return U32
    # Low 32 bits: the PLC compares it with its own trigger count, which wraps too.
    return block_id & U32


def result_of(verdict: dict[str, Any]) -> Result | None:
    """The registers' view of a verdict message; None for one too malformed to hand to a PLC."""
    seq, code = verdict.get("seq"), RESULT_CODES.get(str(verdict.get("verdict")))
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or code is None:
        return None
    cls, anomaly = _object(verdict, "class"), _object(verdict, "anomaly")
    return Result(
        seq=seq & U32, code=code, reasons=reason_bits(verdict.get("reasons")), class_index=_class_index(cls),
        confidence=_milli(cls.get("confidence"), U16), anomaly=_milli(anomaly.get("score"), U32),
        threshold=_milli(anomaly.get("threshold"), U32), trigger=_trigger(verdict),
        label=str(cls.get("label") or ""),
    )


# -- the handshake -------------------------------------------------------------


class Handshake:
    """Latch one result at a time; the next only after the PLC acknowledged and then cleared its acknowledge."""

    def __init__(self, limit: int = QUEUE_LIMIT, armed: bool = False) -> None:
        self.limit = limit
        self.pending: deque[Result] = deque()
        self.latched: Result | None = None
        self.valid = False
        self.ack = False
        self.dropped = 0
        # Until the PLC has written its acknowledge (or BridgeState's grace ran out), its value is unknown:
        # after a bridge restart the PLC may still hold the acknowledge of a result from the last run, and
        # would write it over the first result latched here before it ever read that result.
        self.armed = armed

    def offer(self, result: Result) -> bool:
        """Queue a result (latching it at once if the PLC is idle); False if the oldest waiting one was dropped."""
        kept = True
        if len(self.pending) >= self.limit:
            # The newest results matter most to a line that has fallen this far behind; the
            # inspection ID shows the PLC which ones it never saw.
            self.pending.popleft()
            self.dropped += 1
            kept = False
        self.pending.append(result)
        self._advance()
        return kept

    def acknowledge(self, ack: bool) -> None:
        self.ack = ack
        self.armed = True
        self._advance()

    def arm(self) -> None:
        """Take the PLC's acknowledge as clear without having seen it written (see ACK_GRACE_S)."""
        self.armed = True
        self._advance()

    def _advance(self) -> None:
        if self.valid and self.ack:
            self.valid = False
        # A stale acknowledge must not take the next result for the PLC: wait until it is cleared.
        if self.armed and not self.valid and not self.ack and self.pending:
            self.latched = self.pending.popleft()
            self.valid = True


# -- everything the registers show -------------------------------------------


def _put32(regs: list[int], addr: int, value: int) -> None:
    # Big-endian word order (high word first), as Modicon and most PLC libraries expect by default.
    value &= U32
    regs[addr], regs[addr + 1] = value >> 16, value & U16


def _put_label(regs: list[int], label: str) -> None:
    raw = label.encode("ascii", "replace")[: Addr.LABEL_WORDS * 2].ljust(Addr.LABEL_WORDS * 2, b"\0")
    for i in range(Addr.LABEL_WORDS):
        regs[Addr.LABEL + i] = raw[2 * i] << 8 | raw[2 * i + 1]


class BridgeState:
    """The station as the PLC sees it. Touched only from the asyncio loop."""

    def __init__(self, queue_limit: int = QUEUE_LIMIT, clock: Callable[[], float] = time.monotonic) -> None:
        self.handshake = Handshake(queue_limit)
        self.clock = clock
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)
        self.gaps = 0
        self.missed = 0
        self.state_code = 0
        self.heartbeats = 0
        self.last_message: float | None = None
        self._last_heartbeat: float | None = None
        self._heartbeat_interval = 0.0  # as observed: publish.heartbeat_interval_s may be up to 60 s
        self.latest: Result | None = None
        self.reject_count = 0
        self.ack_coil = False
        self.control = 0
        self.first_request: float | None = None

    # feed side

    def apply(self, event: FeedEvent, gaps: int, missed: int) -> bool:
        """Take one feed event; False if a waiting result had to be dropped for it."""
        self.last_message = self.clock()
        self.gaps, self.missed = gaps, missed
        m = event.message
        if event.kind == "verdict":
            return self._verdict(m)
        if event.kind == "heartbeat":
            self.heartbeats += 1
            if self._last_heartbeat is not None:
                self._heartbeat_interval = self.last_message - self._last_heartbeat
            self._last_heartbeat = self.last_message
        self._status(m)
        if event.kind == "welcome" and event.verdict is not None:
            # Shown as the latest, never latched: the PLC acted on it (or could not) long ago.
            self.latest = result_of(event.verdict) or self.latest
        return True

    def _status(self, m: dict[str, Any]) -> None:
        self.state_code = STATE_CODES.get(str(m.get("state")), 0)
        counters = m.get("counters")
        if isinstance(counters, dict):
            # The station's own counts win: they include what this bridge missed.
            for key in COUNTER_KEYS:
                value = counters.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    self.counters[key] = value

    def _verdict(self, m: dict[str, Any]) -> bool:
        result = result_of(m)
        if result is None:
            log.warning("verdict_ignored", reason="malformed", seq=m.get("seq"), verdict=m.get("verdict"))
            return True
        self._count(result, m.get("error") is not None)
        self.latest = result
        return self.handshake.offer(result)

    def _count(self, result: Result, error: bool) -> None:
        # Between heartbeats the counters follow each verdict as the station counts it (daemon._emit).
        c = self.counters
        c["published"] += 1
        if result.code == RESULT_CODES["skipped"]:
            c["skipped"] += 1
        elif error:
            c["errors"] += 1
        if result.code == RESULT_CODES["pass"]:
            c["passed"] += 1
        elif result.code == RESULT_CODES["fail"]:
            c["failed"] += 1
            self.reject_count += 1

    # PLC side

    def request_seen(self) -> None:
        """A client's well-formed request: runs the start-up grace of the acknowledge (ACK_GRACE_S)."""
        now = self.clock()
        if self.first_request is None:
            self.first_request = now
        if not self.handshake.armed and now - self.first_request >= ACK_GRACE_S:
            self.handshake.arm()

    def write_ack_coil(self, value: bool) -> None:
        self.ack_coil = value
        self._acknowledge()

    def write_control(self, value: int) -> None:
        self.control = value & U16
        self._acknowledge()

    def _acknowledge(self) -> None:
        self.handshake.acknowledge(self.ack_coil or bool(self.control & ACK_CONTROL_BIT))

    # rendering

    def online(self) -> bool:
        window = max(ONLINE_WITHIN_S, 3 * self._heartbeat_interval)
        return self.last_message is not None and self.clock() - self.last_message < window

    def status_word(self) -> int:
        h, r = self.handshake, self.handshake.latched
        bits = {
            VALID: h.valid,
            PASSED: r is not None and r.code == RESULT_CODES["pass"],
            REJECT: r is not None and r.code == RESULT_CODES["fail"],
            SKIPPED: r is not None and r.code == RESULT_CODES["skipped"],
            ACK_SEEN: h.ack,
            ONLINE: self.online(),
            DROPPED: h.dropped > 0,
        }
        return sum(1 << bit for bit, on in bits.items() if on)

    def registers(self) -> list[int]:
        regs = [0] * Addr.SIZE
        self._render_result(regs)
        self._render_latest(regs)
        self._render_counters(regs)
        self._render_station(regs)
        return regs

    def _render_result(self, regs: list[int]) -> None:
        h, r = self.handshake, self.handshake.latched
        regs[Addr.STATUS] = self.status_word()
        regs[Addr.PENDING] = min(len(h.pending), U16)
        if r is None:
            regs[Addr.RESULT] = regs[Addr.CLASS] = NONE16
            _put32(regs, Addr.TRIGGER, U32)
            return
        regs[Addr.ID16] = r.seq & U16
        _put32(regs, Addr.ID32, r.seq)
        regs[Addr.RESULT], regs[Addr.REASONS], regs[Addr.CLASS] = r.code, r.reasons, r.class_index
        regs[Addr.CONFIDENCE] = r.confidence
        _put32(regs, Addr.ANOMALY, r.anomaly)
        _put32(regs, Addr.THRESHOLD, r.threshold)
        _put32(regs, Addr.TRIGGER, r.trigger)
        _put_label(regs, r.label)

    def _render_latest(self, regs: list[int]) -> None:
        if self.latest is None:
            regs[Addr.LATEST_RESULT] = NONE16
        else:
            _put32(regs, Addr.LATEST_ID32, self.latest.seq)
            regs[Addr.LATEST_RESULT], regs[Addr.LATEST_REASONS] = self.latest.code, self.latest.reasons
        _put32(regs, Addr.REJECT_COUNT, self.reject_count)
        _put32(regs, Addr.DROPPED, self.handshake.dropped)

    def _render_counters(self, regs: list[int]) -> None:
        values = [*(self.counters[k] for k in COUNTER_KEYS), self.gaps, self.missed]
        for i, value in enumerate(values):
            _put32(regs, Addr.COUNTERS + 2 * i, min(value, U32))

    def _render_station(self, regs: list[int]) -> None:
        regs[Addr.STATE] = self.state_code
        regs[Addr.ALIVE] = self.heartbeats & U16
        silent = U16 if self.last_message is None else min(int(self.clock() - self.last_message), U16)
        regs[Addr.SILENT_S] = silent
        regs[Addr.MAP_VERSION] = MAP_VERSION
        regs[Addr.CONTROL] = self.control


# -- pymodbus --------------------------------------------------------------------


class RegisterFace:
    """pymodbus's per-request hook: renders the state into the block being read, and takes the PLC's writes.

    pymodbus calls it before it reads or writes the block, with the block's whole
    register list to modify in place; a write's values are applied after it returns.
    """

    def __init__(self, state: BridgeState) -> None:
        self.state = state

    async def action(self, function_code: int, _start_address: int, address: int, _count: int,
                     registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        if function_code in FC_COILS and values is not None:
            return self._coils_written(address, values)
        if function_code in FC_COILS | FC_DISCRETE:
            # Bit blocks are packed 16 to a register, bit 0 first, and start at address 0:
            # register 0 holds coils/discrete inputs 0-15, so bit N is status bit N.
            registers[0] = self.state.status_word()
            return None
        if function_code in FC_REGISTERS:
            if values is not None:
                self._registers_written(address, values)
            registers[: Addr.SIZE] = self.state.registers()
        return None

    def _coils_written(self, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        written = range(address, address + len(values))
        if any(coil != ACK_COIL for coil in written):
            return ExcCodes.ILLEGAL_ADDRESS
        self.state.write_ack_coil(bool(values[ACK_COIL - address]))
        return None

    def _registers_written(self, address: int, values: list[int] | list[bool]) -> None:
        # Every other holding register is read-only (pymodbus refuses the write before calling us).
        if address <= Addr.CONTROL < address + len(values):
            self.state.write_control(int(values[Addr.CONTROL - address]))


async def _unknown_unit(*_args: Any) -> ExcCodes:
    # What a Modbus TCP gateway answers for a unit behind it that does not respond; tells a
    # commissioning engineer the unit id is wrong, where an illegal-address error would mislead.
    return ExcCodes.GATEWAY_NO_RESPONSE


def build_devices(unit: int, face: RegisterFace) -> list[SimDevice]:
    bits = DataType.BITS
    regs = DataType.REGISTERS
    # Bits as a list, not count=: pymodbus 3.16 applies a bit block's count twice in its overlap
    # check, so count=7 at 0 "overlaps" a block at 16.
    status = [False] * STATUS_BITS
    device = SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=status, datatype=bits), SimData(ACK_COIL, values=[False], datatype=bits)],
            [SimData(0, values=status, datatype=bits)],
            [SimData(0, count=Addr.CONTROL, values=0, datatype=regs, readonly=True),
             SimData(Addr.CONTROL, values=0, datatype=regs)],
            [SimData(0, count=Addr.SIZE, values=0, datatype=regs, readonly=True)],
        ),
        action=face.action,
    )
    if unit == 0:  # pymodbus's device 0 answers every unit id
        return [device]
    # Without a device 0, pymodbus answers another unit id with a traceback in the log and exception 04.
    catch_all = SimDevice(id=0, simdata=[SimData(0, count=U16 + 1, datatype=regs)], action=_unknown_unit)
    return [device, catch_all]


# -- Modbus TCP framing and request checks ---------------------------------------

#: the MBAP header: transaction id, protocol id (0 for Modbus), length (unit id + PDU), unit id
MBAP = struct.Struct(">HHHB")
#: the largest PDU (Modbus Application Protocol V1.1b3, 4.1): an MBAP length is 2 (unit, function) to 254
MAX_PDU = 253
#: requests one connection may have waiting before the bridge stops reading from it until it has caught up
PIPELINE_LIMIT = 64
#: the spec's quantity limits (V1.1b3, 6.1-6.4, 6.11, 6.12, 6.17)
READ_BITS_MAX, READ_REGS_MAX = 2000, 125
WRITE_BITS_MAX, WRITE_REGS_MAX, READ_WRITE_REGS_MAX = 1968, 123, 121
#: the only two values a write single coil (FC05) may carry
COIL_ON, COIL_OFF = 0xFF00, 0x0000


def _u16(data: bytes, at: int) -> int:
    return int.from_bytes(data[at: at + 2], "big")


def _write_ok(data: bytes, count_at: int, quantity: int, limit: int, nbytes: int) -> bool:
    # The byte count must agree with the quantity, and the data that follows with the byte count.
    return 1 <= quantity <= limit and data[count_at] == nbytes and len(data) == count_at + 1 + nbytes


def check_request(pdu: bytes) -> ExcCodes | None:
    """The exception the Modbus spec gives a request before it reaches the map; None when it passes.

    Function code first (01), then quantity, value, byte count and length (03), in the order of the spec's
    state diagrams. pymodbus 3.16 answers a bad quantity with 01 and takes any FC05 value but 0 for ON.
    """
    fc, data = pdu[0], pdu[1:]
    if fc not in FC_SERVED:
        return ExcCodes.ILLEGAL_FUNCTION
    if fc == 8 and len(data) >= 2 and _u16(data, 0) not in DecodePDU.pdu_sub_table.get(fc, {}):
        return ExcCodes.ILLEGAL_FUNCTION  # a diagnostics sub-function pymodbus does not know: it would fail (04)
    if fc in (1, 2, 3, 4):
        ok = len(data) == 4 and 1 <= _u16(data, 2) <= (READ_BITS_MAX if fc in (1, 2) else READ_REGS_MAX)
    elif fc == 5:
        ok = len(data) == 4 and _u16(data, 2) in (COIL_ON, COIL_OFF)
    elif fc in (6, 22):
        ok = len(data) == (4 if fc == 6 else 6)
    elif fc in (15, 16):
        quantity = _u16(data, 2)
        nbytes, limit = ((quantity + 7) // 8, WRITE_BITS_MAX) if fc == 15 else (2 * quantity, WRITE_REGS_MAX)
        ok = len(data) >= 5 and _write_ok(data, 4, quantity, limit, nbytes)
    elif fc == 23:
        quantity = _u16(data, 6)
        ok = (len(data) >= 9 and 1 <= _u16(data, 2) <= READ_REGS_MAX
              and _write_ok(data, 8, quantity, READ_WRITE_REGS_MAX, 2 * quantity))
    else:
        ok = True  # diagnostics and identification: pymodbus's decoder checks them
    return None if ok else ExcCodes.ILLEGAL_VALUE


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return _address(str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None


class BridgeServer(ModbusTcpServer):
    """pymodbus's TCP listener and datastore, with the bridge's Connection in place of pymodbus's handler."""

    def __init__(self, devices: list[SimDevice], address: tuple[str, int], state: BridgeState) -> None:
        super().__init__(devices, address=address)
        self.state = state
        self.bad_clients = BadClientLog(log)
        self.failures = BadClientLog(log)

    def callback_new_connection(self) -> ModbusProtocol:
        return Connection(self)

    async def respond(self, tid: int, unit: int, pdu: bytes, peer: str | None) -> bytes:
        """The response frame to one request frame's PDU."""
        try:
            response = await self._response(unit, pdu, peer)
            body = bytes([response.function_code]) + response.encode()
        except Exception as exc:  # a fault in one request must cost that request, not the connection
            self.failures.report("modbus_request_failed", peer, unit=unit, function_code=pdu[0], error=exc)
            body = bytes([pdu[0] | 0x80, ExcCodes.DEVICE_FAILURE])
        return MBAP.pack(tid, 0, len(body) + 1, unit) + body

    async def _response(self, unit: int, pdu: bytes, peer: str | None) -> ModbusPDU:
        problem = check_request(pdu)
        request = None if problem else self.decoder.decode(pdu)
        if problem or request is None:
            # A function code we serve whose data pymodbus cannot decode is malformed data: 03.
            problem = problem or ExcCodes.ILLEGAL_VALUE
            self.bad_clients.report("modbus_bad_request", peer, unit=unit, function_code=pdu[0],
                                    exception=int(problem), request=excerpt(pdu))
            return ExceptionResponse(pdu[0], problem)
        request.dev_id = unit
        self.state.request_seen()
        # pymodbus hands its SimCore to datastore_update where its annotation says ModbusServerContext.
        context = cast(ModbusServerContext, self.context)
        try:
            return await request.datastore_update(context, unit)
        except NoSuchIdException:
            return ExceptionResponse(request.function_code, ExcCodes.GATEWAY_NO_RESPONSE)


class Connection(ModbusProtocol):
    """One client's TCP connection: the stream split into MBAP frames, each request answered in the order sent.

    A PLC or gateway may pipeline requests, so one segment can hold several frames, and one frame can span
    segments; the transaction id in each response tells the client which request it answers.
    """

    def __init__(self, server: BridgeServer) -> None:
        params = CommParams(comm_name="server", comm_type=CommType.TCP, reconnect_delay=0.0,
                            reconnect_delay_max=0.0, timeout_connect=0.0)
        super().__init__(params, True)
        self.server = server
        self.peer: str | None = None
        self._buffer = bytearray()
        self._requests: deque[tuple[int, int, bytes]] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        # Modbus TCP has no frame delimiter: after a header that is not Modbus the stream cannot be
        # resynchronised, so the requests before it are answered and then the connection is closed.
        self._hang_up = False

    def callback_new_connection(self) -> ModbusProtocol:
        raise RuntimeError("a client connection does not accept connections")

    def callback_connected(self) -> None:
        self.peer = _peer(self.transport)

    def callback_disconnected(self, exc: Exception | None) -> None:
        if self._worker is not None:
            self._worker.cancel()

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        return len(data)  # unused: data_received below takes the stream before pymodbus's path would

    def data_received(self, data: bytes) -> None:
        if self._hang_up:
            return
        self._buffer += data
        while len(self._buffer) >= MBAP.size:
            tid, protocol, length, unit = MBAP.unpack_from(self._buffer)
            if protocol != 0 or not 2 <= length <= MAX_PDU + 1:
                reason = f"protocol id {protocol}, not 0 (Modbus)" if protocol else f"MBAP length {length}, not 2-254"
                self.server.bad_clients.report("modbus_bad_frame", self.peer, reason=reason,
                                               data=excerpt(self._buffer), action="connection closed")
                self._buffer.clear()
                self._hang_up = True
                break
            end = MBAP.size - 1 + length
            if len(self._buffer) < end:
                break
            self._requests.append((tid, unit, bytes(self._buffer[MBAP.size:end])))
            del self._buffer[:end]
        if self._hang_up or len(self._requests) >= PIPELINE_LIMIT:
            self._reading(False)
        if (self._requests or self._hang_up) and (self._worker is None or self._worker.done()):
            self._worker = asyncio.create_task(self._answer())

    async def _answer(self) -> None:
        while self._requests:
            tid, unit, pdu = self._requests.popleft()
            frame = await self.server.respond(tid, unit, pdu, self.peer)
            if not isinstance(self.transport, asyncio.Transport):
                return  # closed meanwhile
            self.transport.write(frame)
            if not self._hang_up and len(self._requests) < PIPELINE_LIMIT // 2:
                self._reading(True)
            if self._requests:
                await asyncio.sleep(0)  # a long pipeline must not starve the other clients
        if self._hang_up:
            self.close()

    def _reading(self, on: bool) -> None:
        if self._paused == (not on) or not isinstance(self.transport, asyncio.Transport):
            return
        self._paused = not on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()


class PymodbusLogs(logging.Handler):
    """pymodbus's own log records as short, rate-limited structlog lines.

    pymodbus logs through stdlib logging, which nothing else in the station configures: its warnings
    reached stderr as bare text, and an error came with hex dumps of the last 20 frames appended (20 KB
    from one 4 KiB packet). The bridge frames and checks requests itself and logs bad clients itself, so
    only pymodbus's errors are kept, and only their first line.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines = BadClientLog(log)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.report("pymodbus_log", None, pymodbus_level=record.levelname.lower(),
                          message=record.getMessage().split("\n", 1)[0])


def quiet_pymodbus() -> None:
    logger = logging.getLogger("pymodbus")
    logger.handlers = [PymodbusLogs()]
    logger.propagate = False
    # Below ERROR pymodbus would only repeat what the bridge logs itself; the level also spares it
    # formatting hex dumps nobody reads.
    logger.setLevel(logging.ERROR)


# -- the command -------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` (``[v6]:PORT`` for IPv6), or a ConfigError that shows the form."""
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if sep and host and port_text.isdigit() and 0 < int(port_text) <= U16:
        return host, int(port_text)
    raise ConfigError(f"--listen {text!r}: expected HOST:PORT with a port 1-65535, e.g. 0.0.0.0:5020")


def _check_unit(unit: int) -> int:
    if not 0 <= unit <= 255:
        raise ConfigError(f"--unit {unit}: a Modbus unit id is 0-255 (1-247 usual; 0 answers every unit id)")
    return unit


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_problem(host: str, port: int) -> str:
    # pymodbus only logs why it could not listen; binding once more recovers the reason for the operator.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            return "the address could not be bound"
    except OSError as exc:
        return exc.strerror or str(exc)


async def _start(host: str, port: int, unit: int, state: BridgeState) -> BridgeServer:
    server = BridgeServer(build_devices(unit, RegisterFace(state)), (host, port), state)
    try:
        await server.serve_forever(background=True)
    except RuntimeError as exc:
        raise StationError(f"--listen {_address(host, port)}: cannot listen: {_bind_problem(host, port)}") from exc
    return server


class DropLog:
    """A warning when results start being dropped, then at most one per DROP_LOG_EVERY_S."""

    def __init__(self) -> None:
        self.last_logged = -math.inf

    def dropped(self, total: int) -> None:
        now = time.monotonic()
        if now - self.last_logged >= DROP_LOG_EVERY_S:
            self.last_logged = now
            log.warning("results_dropped", dropped=total, queue_limit=QUEUE_LIMIT,
                        hint="the PLC is not acknowledging results fast enough")


async def _pump(feed: VerdictFeed, state: BridgeState, stop: threading.Event) -> None:
    loop = asyncio.get_running_loop()
    drops = DropLog()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdict-feed") as pool:
        while not stop.is_set():
            event = await loop.run_in_executor(pool, feed.next, POLL_S)
            if event is None:
                continue
            for note in event.notes:
                log.warning("stream_note", note=note)
            if not state.apply(event, feed.tracker.gaps, feed.tracker.missed):
                drops.dropped(state.handshake.dropped)


async def _serve(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> BridgeState:
    host, port = parse_listen(args.listen)
    unit = _check_unit(args.unit)
    state = BridgeState()
    server = await _start(host, port, unit, state)
    log.info("modbus_bridge_started", listen=_address(host, port), unit=unit, connect=args.connect,
             map_version=MAP_VERSION)
    try:
        await _pump(feed, state, stop)
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it unannotated
    return state


def run(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> int:
    quiet_pymodbus()
    state = asyncio.run(_serve(args, feed, stop))
    log.info("modbus_bridge_stopped", rejects=state.reject_count, pending=len(state.handshake.pending),
             dropped=state.handshake.dropped, gaps=feed.tracker.gaps, missed=feed.tracker.missed)
    return EXIT_OK
