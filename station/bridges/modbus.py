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
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

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

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.limit = limit
        self.pending: deque[Result] = deque()
        self.latched: Result | None = None
        self.valid = False
        self.ack = False
        self.dropped = 0

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
        self._advance()

    def _advance(self) -> None:
        if self.valid and self.ack:
            self.valid = False
        # A stale acknowledge must not take the next result for the PLC: wait until it is cleared.
        if not self.valid and not self.ack and self.pending:
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


async def _start(host: str, port: int, unit: int, state: BridgeState) -> ModbusTcpServer:
    server = ModbusTcpServer(build_devices(unit, RegisterFace(state)), address=(host, port))
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
    state = asyncio.run(_serve(args, feed, stop))
    log.info("modbus_bridge_stopped", rejects=state.reject_count, pending=len(state.handshake.pending),
             dropped=state.handshake.dropped, gaps=feed.tracker.gaps, missed=feed.tracker.missed)
    return EXIT_OK
