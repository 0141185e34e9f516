"""The Modbus bridge's state: the station as the PLC sees it, from the feed's models, rendered as registers."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from station.bridges.feed import FeedEvent
from station.bridges.modbus.registers import (
    ACK_CONTROL_BIT,
    ACK_GRACE_S,
    ACK_SEEN,
    COUNTER_KEYS,
    DROPPED,
    MAP_VERSION,
    NONE16,
    ONLINE,
    ONLINE_WITHIN_S,
    PASSED,
    QUEUE_LIMIT,
    REJECT,
    RESULT_CODES,
    SKIPPED,
    STATE_CODES,
    U16,
    U32,
    VALID,
    Addr,
    Handshake,
    Result,
    result_of,
)
from station.contract.counters import Counters
from station.contract.liveness import Liveness
from station.contract.messages import HeartbeatMessage, VerdictMessage, WelcomeMessage

log = structlog.get_logger("station.bridge.modbus")

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
        self.counters = Counters()
        self.gaps = 0
        self.missed = 0
        self.state_code = 0
        self.heartbeats = 0
        # The heartbeat interval as observed: publish.heartbeat_interval_s may be up to 60 s.
        self.liveness = Liveness(floor_s=ONLINE_WITHIN_S)
        self.latest: Result | None = None
        self.reject_count = 0
        self.ack_coil = False
        self.control = 0
        self.first_request: float | None = None

    # feed side

    def apply(self, event: FeedEvent, gaps: int, missed: int) -> bool:
        """Take one feed event; False if a waiting result had to be dropped for it."""
        heartbeat = event.kind == "heartbeat"
        self.liveness.heard(self.clock(), heartbeat)
        self.gaps, self.missed = gaps, missed
        if heartbeat:
            self.heartbeats += 1
        m = event.model
        if m is None:
            log.warning("message_ignored", kind=event.kind, reason=event.invalid)
            return True
        if isinstance(m, VerdictMessage):
            return self._verdict(m)
        self._status(m)
        if isinstance(m, WelcomeMessage) and m.last_verdict is not None:
            # Shown as the latest, never latched: the PLC acted on it (or could not) long ago.
            self.latest = result_of(m.last_verdict)
        return True

    def _status(self, m: HeartbeatMessage | WelcomeMessage) -> None:
        self.state_code = STATE_CODES.get(m.state, 0)
        # The station's own counts win: they include what this bridge missed.
        self.counters = Counters(**m.counters.snapshot())

    def _verdict(self, m: VerdictMessage) -> bool:
        result = result_of(m)
        # Between heartbeats the counters follow each verdict as the station counts it.
        self.counters.count(m.verdict, m.error is not None)
        if m.verdict == "fail":
            self.reject_count += 1
        self.latest = result
        return self.handshake.offer(result)

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
        return self.liveness.online(self.clock())

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
        values = [*(getattr(self.counters, k) for k in COUNTER_KEYS), self.gaps, self.missed]
        for i, value in enumerate(values):
            _put32(regs, Addr.COUNTERS + 2 * i, min(value, U32))

    def _render_station(self, regs: list[int]) -> None:
        regs[Addr.STATE] = self.state_code
        regs[Addr.ALIVE] = self.heartbeats & U16
        silent = self.liveness.silent_s(self.clock())
        regs[Addr.SILENT_S] = U16 if silent is None else min(int(silent), U16)
        regs[Addr.MAP_VERSION] = MAP_VERSION
        regs[Addr.CONTROL] = self.control
