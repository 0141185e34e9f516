"""The OPC UA bridge's points: every variable below ``Station``, its type, unit and description.

docs/bridge-opcua.md lists them; the WS Pack (Weihenstephan Standards) names are the standard's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from asyncua import ua

from station.contract.counters import COUNTER_KEYS

NAMESPACE_URI = "urn:station:bridge"
ROOT = "Station"
#: the language of every Description and unit text
LOCALE = "en"
#: how long the feed is polled before the loop looks at ``stop`` and the staleness again
POLL_S = 0.2
#: no message for this long (or three heartbeat intervals, if longer: station/contract/liveness.py) and the
#: station counts as offline
STALE_AFTER_S = 5.0
#: OPC UA's null DateTime (1601-01-01), shown before the first verdict
NO_TIME = datetime(1601, 1, 1, tzinfo=timezone.utc)
UINT32 = 0xFFFFFFFF
#: a point's value before the station's run has given it one: written as Bad_WaitingForInitialData
NO_VALUE = None

#: WS_Cur_State bit codes (WS Pack) for the station's states. ``degraded`` means the camera is
#: lost and being reconnected: the machine's own equipment has failed.
WS_UNDEFINED = 0
WS_STATES = {"stopped": 1, "starting": 2, "running": 128, "stopping": 256, "degraded": 1024}

V = ua.VariantType

#: OPC UA Part 8 (mapping of UN/CEFACT units): EUInformation.NamespaceUri for UNECE Recommendation 20 codes
UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"


@dataclass(frozen=True)
class Unit:
    """An EngineeringUnits value: a UNECE Recommendation 20 common code, the symbol shown, what it is."""

    code: str
    display: str
    description: str

    def information(self) -> ua.EUInformation:
        # Part 8: UnitId is the common code's (up to three) ASCII bytes, big-endian: C62 is 0x433632.
        return ua.EUInformation(NamespaceUri=UNECE_URI, UnitId=int.from_bytes(self.code.encode("ascii"), "big"),
                                DisplayName=ua.LocalizedText(self.display, LOCALE),
                                Description=ua.LocalizedText(self.description, LOCALE))


PER_SECOND = Unit("C97", "s⁻¹", "reciprocal second: verdicts per second")
#: a probability: dimensionless, UNECE's unit "one"
ONE = Unit("C62", "1", "one: dimensionless, a probability from 0 to 1")
#: UNECE has no unit for a model's score; it is dimensionless ("one"), shown as "score"
SCORE = Unit("C62", "score", "anomaly score: dimensionless (UNECE C62, one), on the bundle's own scale")


@dataclass(frozen=True)
class Point:
    """One variable: ``path`` below ``Station`` (also its NodeId after ``Station.``).

    With a ``unit`` it is an analogue value, an AnalogUnitType (or AnalogUnitRangeType, with
    ``eu_range``) with EngineeringUnits; without one a BaseDataVariableType.
    """

    path: str
    vtype: ua.VariantType
    initial: Any
    description: str
    unit: Unit | None = None
    eu_range: tuple[float, float] | None = None


#: the objects above the variables: ``Station`` and its groups
GROUPS = {
    ROOT: "One inspection station's verdict stream: machine state and counters (WS Pack names), "
          "the last verdict, the link to the station and the reject pulse",
    "Counters": "The station's own counters for its current run, from its heartbeats, stepped on by each verdict",
    "LastVerdict": "The latest verdict, one bottle. Seq is written last: act each time it changes",
    "Stream": "The bridge's link to the station: online, last message, seq gaps",
}

POINTS: tuple[Point, ...] = (
    # WS Pack names
    Point("WS_Cur_State", V.UInt32, WS_UNDEFINED,
          "WS Pack machine state: 1 Stopped, 2 Starting, 128 Operating, 256 Stopping, 1024 Equipment Failure, "
          "0 undefined (no station, or it went silent)"),
    Point("WS_Tot_Containers", V.UInt32, 0, "WS Pack: bottles with a verdict in this run (pass, fail, skipped)"),
    Point("WS_Good_Containers", V.UInt32, 0, "WS Pack: bottles passed in this run"),
    Point("WS_Tot_Rej", V.UInt32, 0, "WS Pack: bottles failed (to be rejected) in this run"),
    # the station's own
    Point("StationId", V.String, "", "the station id"),
    Point("RunId", V.String, "", "the station's run; new at every start of the station"),
    Point("State", V.String, "", "starting, running, degraded, stopping or stopped; empty before the first message"),
    Point("NextSeq", V.UInt32, 0, "the seq the next verdict will carry"),
    Point("Fps", V.Double, 0.0, "verdicts per second, from the heartbeat", PER_SECOND),
    *(Point(f"Counters.{key.capitalize()}", V.UInt32, 0, f"the station's {key} counter, this run")
      for key in COUNTER_KEYS),
    Point("LastVerdict.Verdict", V.String, "", "pass, fail or skipped; empty before the first verdict"),
    Point("LastVerdict.ClassLabel", V.String, "", "the class the verdict names; empty when not inspected"),
    Point("LastVerdict.Confidence", V.Double, -1.0, "the named class's probability, 0..1; -1 when not inspected",
          ONE, (0.0, 1.0)),
    Point("LastVerdict.AnomalyScore", V.Double, -1.0, "the anomaly score; -1 when not inspected", SCORE),
    Point("LastVerdict.AnomalyThreshold", V.Double, -1.0,
          "the calibrated threshold: a score above it fails; -1 when not inspected", SCORE),
    Point("LastVerdict.Reasons", V.String, "", "reason codes, comma-separated; empty for pass"),
    Point("LastVerdict.FrameId", V.String, "", "the source's name for the frame"),
    Point("LastVerdict.CapturedAt", V.DateTime, NO_TIME, "when the frame was captured (UTC)"),
    Point("LastVerdict.TriggerBlockId", V.Int64, -1, "the camera's frame counter for the trigger; -1 when unknown"),
    Point("LastVerdict.Seq", V.UInt32, NO_VALUE,
          "the verdict's seq, written last: act each time it changes. Bad_WaitingForInitialData until the "
          "station's run has a verdict"),
    Point("LastVerdict.RunId", V.String, "", "the verdict's run"),
    Point("LastVerdict.Json", V.String, "", "the whole verdict message, JSON (station.verdict/1)"),
    Point("Stream.Online", V.Boolean, False, "a message arrived from the station within the staleness window"),
    Point("Stream.LastMessageAt", V.DateTime, NO_TIME, "when the bridge last heard from the station (UTC)"),
    Point("Stream.Gaps", V.UInt32, 0, "gaps in seq seen by this bridge since it started"),
    Point("Stream.Missed", V.UInt32, 0, "verdicts lost in those gaps"),
    Point("RejectCount", V.UInt32, 0, "fail verdicts received by this bridge since it started (a pulse each)"),
    Point("RejectSeq", V.UInt32, NO_VALUE,
          "seq of the last fail verdict that pulsed RejectPulse. Bad_WaitingForInitialData until a fail in the "
          "station's run"),
    Point("RejectPulse", V.Boolean, False, "true for --reject-pulse-ms after each fail verdict"),
)
#: points that belong to the station's run: no value again when a new run starts, so that the new run's
#: first seq is a change even when it equals the last one shown (0 after a run of one bottle)
RUN_SCOPED = ("LastVerdict.Seq", "RejectSeq")
VTYPES = {p.path: p.vtype for p in POINTS}
