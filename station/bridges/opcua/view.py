"""What the OPC UA address space shows, worked out from the feed's models; no OPC UA, no I/O."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from station.bridges.feed import FeedEvent
from station.bridges.opcua.points import NO_VALUE, POINTS, RUN_SCOPED, STALE_AFTER_S, WS_STATES, WS_UNDEFINED
from station.contract.counters import COUNTER_KEYS, Counters
from station.contract.liveness import Liveness
from station.contract.messages import HeartbeatMessage, VerdictMessage, WelcomeMessage, encode
from station.contract.timefmt import instant_of
from station.service.publish import SequenceTracker


def _shown(value: float | None) -> float:
    """A number for a Double point: -1 where there is none (not inspected) or it is not finite."""
    return float(value) if value is not None and math.isfinite(value) else -1.0


class StationView:
    """What the address space shows, worked out from the feed; no OPC UA, no I/O.

    Counters are the station's (from heartbeats and the welcome), stepped on by
    each verdict in between so a PLC is current at every bottle, never moving
    backwards within a run; a new run starts them again from the station's.
    """

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self.values: dict[str, Any] = {p.path: p.initial for p in POINTS if p.path != "RejectPulse"}
        self.liveness = Liveness(floor_s=stale_after_s)
        self.run_id: str | None = None
        self.counters = Counters()
        self.counted_through = -1  # highest seq already in self.counters
        self.state = ""
        self.reject_count = 0

    def apply(self, event: FeedEvent, tracker: SequenceTracker, now: float) -> bool:
        """Take one event; True when it is a new ``fail`` verdict (pulse the reject)."""
        self._heard(now, event.kind == "heartbeat")
        m = event.model
        fresh_fail = False
        if isinstance(m, VerdictMessage):
            fresh_fail = self._verdict(m)
        elif m is not None:
            self._status(m)
            if isinstance(m, WelcomeMessage) and m.last_verdict is not None:
                self._show_verdict(m.last_verdict)  # the latest bottle, at once; old, so never pulsed
        self.values["Stream.Gaps"] = tracker.gaps
        self.values["Stream.Missed"] = tracker.missed
        self.tick(now)
        return fresh_fail

    def tick(self, now: float) -> None:
        """Online and WS_Cur_State as of ``now``: a silent station is not Operating."""
        online = self.liveness.online(now)
        self.values["Stream.Online"] = online
        known = online or self.state == "stopped"  # stopped said goodbye; silence after it is expected
        self.values["WS_Cur_State"] = WS_STATES.get(self.state, WS_UNDEFINED) if known else WS_UNDEFINED

    def _heard(self, now: float, heartbeat: bool) -> None:
        self.liveness.heard(now, heartbeat)
        self.values["Stream.LastMessageAt"] = datetime.now(timezone.utc)

    def _enter_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            self.run_id = run_id
            self.counters = Counters()
            self.counted_through = -1
            self.values["RunId"] = run_id
            self.values["NextSeq"] = 0
            self.values.update(dict.fromkeys(RUN_SCOPED, NO_VALUE))

    def _status(self, m: HeartbeatMessage | WelcomeMessage) -> None:
        """A welcome or a heartbeat: state, counters, next seq."""
        self._enter_run(m.run_id)
        for key in COUNTER_KEYS:
            setattr(self.counters, key, max(getattr(self.counters, key), getattr(m.counters, key)))
        self.counted_through = max(self.counted_through, m.next_seq - 1)
        self.state = m.state
        self.values["State"] = self.state
        self.values["StationId"] = m.station
        if isinstance(m, HeartbeatMessage):
            self.values["Fps"] = max(0.0, _shown(m.fps))
        self._show_counters()

    def _verdict(self, m: VerdictMessage) -> bool:
        self._enter_run(m.run_id)
        if m.seq <= self.counted_through:
            return False  # already counted (and shown) through the welcome or a heartbeat
        self.counters.count(m.verdict, m.error is not None)
        self.counted_through = m.seq
        self._show_counters()
        self._show_verdict(m)
        if m.verdict != "fail":
            return False
        self.reject_count += 1
        self.values["RejectCount"] = self.reject_count
        self.values["RejectSeq"] = m.seq
        return True

    def _show_counters(self) -> None:
        c, v = self.counters, self.values
        for key in COUNTER_KEYS:
            v[f"Counters.{key.capitalize()}"] = getattr(c, key)
        v["WS_Tot_Containers"], v["WS_Good_Containers"], v["WS_Tot_Rej"] = c.published, c.passed, c.failed
        v["NextSeq"] = max(v["NextSeq"], self.counted_through + 1)

    def _show_verdict(self, m: VerdictMessage) -> None:
        cls, anomaly, trigger = m.class_, m.anomaly, m.trigger
        block_id = trigger.block_id if trigger is not None else None
        self.values.update({
            "LastVerdict.Verdict": m.verdict,
            "LastVerdict.ClassLabel": cls.label if cls is not None else "",
            "LastVerdict.Confidence": _shown(cls.confidence if cls is not None else None),
            "LastVerdict.AnomalyScore": _shown(anomaly.score if anomaly is not None else None),
            "LastVerdict.AnomalyThreshold": _shown(anomaly.threshold if anomaly is not None else None),
            "LastVerdict.Reasons": ",".join(m.reasons),
            "LastVerdict.FrameId": m.frame_id,
            "LastVerdict.CapturedAt": instant_of(m.captured_at),
            "LastVerdict.TriggerBlockId": block_id if block_id is not None else -1,
            "LastVerdict.RunId": m.run_id,
            "LastVerdict.Json": encode(m.model_dump(mode="json", by_alias=True)).decode("utf-8"),
            # Seq last: a client that polls Seq for a change then reads the rest sees this verdict or a newer one.
            "LastVerdict.Seq": m.seq,
        })
