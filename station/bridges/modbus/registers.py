"""The Modbus bridge's register map, one result as registers carry it, and the result handshake.

docs/bridge-modbus.md has the full map and the handshake timeline; the layout here is the contract with
the PLC program (MAP_VERSION).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from station.contract.messages import ClassResult, Trigger, VerdictMessage

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


def _milli(value: float | None, ceiling: int) -> int:
    """``value`` ×1000 as an unsigned register value; 0 where there is none."""
    if value is None:
        return 0
    if not math.isfinite(value):
        return ceiling if value > 0 else 0
    return min(max(round(value * 1000), 0), ceiling)


def reason_bits(reasons: list[str]) -> int:
    bits = 0
    for reason in reasons:
        bit = REASON_BITS.index(reason) if reason in REASON_BITS else OTHER_REASON_BIT
        bits |= 1 << bit
    return bits


def _class_index(cls: ClassResult | None) -> int:
    # The scores object lists the bundle's classes in the bundle's order: that order is the index.
    if cls is not None and cls.label in cls.scores:
        return list(cls.scores).index(cls.label)
    return NONE16


def _trigger(trigger: Trigger | None) -> int:
    block_id = trigger.block_id if trigger is not None else None
    if block_id is None or block_id < 0:
        return U32
    # Low 32 bits: the PLC compares it with its own trigger count, which wraps too.
    return block_id & U32


def result_of(verdict: VerdictMessage) -> Result:
    """The registers' view of a verdict message."""
    cls, anomaly = verdict.class_, verdict.anomaly
    return Result(
        seq=verdict.seq & U32, code=RESULT_CODES[verdict.verdict], reasons=reason_bits(list(verdict.reasons)),
        class_index=_class_index(cls), confidence=_milli(cls.confidence if cls else None, U16),
        anomaly=_milli(anomaly.score if anomaly else None, U32),
        threshold=_milli(anomaly.threshold if anomaly else None, U32), trigger=_trigger(verdict.trigger),
        label=cls.label if cls else "",
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
