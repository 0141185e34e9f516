"""OPC UA bridge: the verdict stream as an OPC UA server a PLC, SCADA or MES reads.

One object, ``Station``, in the namespace ``urn:station:bridge``, with string
NodeIds (``ns=<idx>;s=Station.LastVerdict.Verdict``) so a PLC program can name
them without browsing. The machine state and the bottle counters carry their
Weihenstephan Standards (WS Pack) names; the rest is the station's own.
docs/bridge-opcua.md lists every node.

Threads: the ZeroMQ feed is read by one dedicated executor thread (a ZeroMQ
socket must stay on one thread); everything else, the OPC UA server, the
node writes and the reject pulse timer, runs on the asyncio loop.

The port faces the plant network. asyncua's server acknowledged any Hello and logged tracebacks for
malformed messages, so the bridge frames the TCP stream itself in front of asyncua (``GuardedProtocol``):
a message OPC UA Part 6 does not allow is answered with an Error message (ERR) and the connection closed,
with one rate-limited log line per client (station/bridges/badclients.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import urlparse

import structlog
from asyncua import ua
from asyncua.common.connection import TransportLimits
from asyncua.common.node import Node
from asyncua.common.ua_utils import value_to_datavalue
from asyncua.common.utils import Buffer
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.object_ids import ObjectIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.ua_binary import header_from_binary
from asyncua.ua.uaerrors import UaStatusCodeError

from station import __version__
from station.bridges.badclients import BadClientLog, excerpt
from station.bridges.feed import FeedEvent, VerdictFeed
from station.errors import EXIT_OK, ConfigError, PublishError
from station.service.publish import SequenceTracker

log = structlog.get_logger("station.bridge.opcua")

NAMESPACE_URI = "urn:station:bridge"
ROOT = "Station"
#: the language of every Description and unit text
LOCALE = "en"
#: how long the feed is polled before the loop looks at ``stop`` and the staleness again
POLL_S = 0.2
#: no message for this long (or three heartbeat intervals, if longer) and the station counts as offline
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

COUNTER_KEYS = ("captured", "inspected", "skipped", "errors", "published", "passed", "failed")

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
    Point("LastVerdict.ClassLabel", V.String, "", "the classifier's top class; empty when not inspected"),
    Point("LastVerdict.Confidence", V.Double, -1.0, "the top class's probability, 0..1; -1 when not inspected",
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


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return -1.0
    return number if math.isfinite(number) else -1.0


def _utc(text: Any) -> datetime:
    try:
        # Python 3.10 (a Jetson's) does not read a trailing Z.
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        return NO_TIME


class StationView:
    """What the address space shows, worked out from the feed; no OPC UA, no I/O.

    Counters are the station's (from heartbeats and the welcome), stepped on by
    each verdict in between so a PLC is current at every bottle, never moving
    backwards within a run; a new run starts them again from the station's.
    """

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self.values: dict[str, Any] = {p.path: p.initial for p in POINTS if p.path != "RejectPulse"}
        self.stale_after_s = stale_after_s
        self.run_id: str | None = None
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)
        self.counted_through = -1  # highest seq already in self.counters
        self.state = ""
        self.reject_count = 0
        self._last_message: float | None = None
        self._last_heartbeat: float | None = None
        self._heartbeat_interval = 0.0

    def apply(self, event: FeedEvent, tracker: SequenceTracker, now: float) -> bool:
        """Take one event; True when it is a new ``fail`` verdict (pulse the reject)."""
        self._heard(now, event.kind == "heartbeat")
        m = event.message
        fresh_fail = False
        if event.kind == "verdict":
            fresh_fail = self._verdict(m)
        else:
            self._status(m)
            if event.kind == "welcome" and event.verdict is not None:
                self._show_verdict(event.verdict)  # the latest bottle, at once; old, so never pulsed
        self.values["Stream.Gaps"] = tracker.gaps
        self.values["Stream.Missed"] = tracker.missed
        self.tick(now)
        return fresh_fail

    def tick(self, now: float) -> None:
        """Online and WS_Cur_State as of ``now``: a silent station is not Operating."""
        stale_after = max(self.stale_after_s, 3 * self._heartbeat_interval)
        online = self._last_message is not None and now - self._last_message < stale_after
        self.values["Stream.Online"] = online
        known = online or self.state == "stopped"  # stopped said goodbye; silence after it is expected
        self.values["WS_Cur_State"] = WS_STATES.get(self.state, WS_UNDEFINED) if known else WS_UNDEFINED

    def _heard(self, now: float, heartbeat: bool) -> None:
        self._last_message = now
        self.values["Stream.LastMessageAt"] = datetime.now(timezone.utc)
        if heartbeat:
            if self._last_heartbeat is not None:
                self._heartbeat_interval = now - self._last_heartbeat
            self._last_heartbeat = now

    def _enter_run(self, run_id: str) -> None:
        if run_id != self.run_id:
            self.run_id = run_id
            self.counters = dict.fromkeys(COUNTER_KEYS, 0)
            self.counted_through = -1
            self.values["RunId"] = run_id
            self.values["NextSeq"] = 0
            self.values.update(dict.fromkeys(RUN_SCOPED, NO_VALUE))

    def _status(self, m: dict[str, Any]) -> None:
        """A welcome or a heartbeat: state, counters, next seq."""
        self._enter_run(str(m.get("run_id", "")))
        counters = m.get("counters") or {}
        for key in COUNTER_KEYS:
            self.counters[key] = max(self.counters[key], _int(counters.get(key)))
        self.counted_through = max(self.counted_through, _int(m.get("next_seq")) - 1)
        self.state = str(m.get("state") or "")
        self.values["State"] = self.state
        self.values["StationId"] = str(m.get("station", ""))
        if "fps" in m:
            self.values["Fps"] = max(0.0, _float(m.get("fps")))
        self._show_counters()

    def _verdict(self, m: dict[str, Any]) -> bool:
        self._enter_run(str(m.get("run_id", "")))
        seq = _int(m.get("seq"), -1)
        if seq <= self.counted_through:
            return False  # already counted (and shown) through the welcome or a heartbeat
        self._count(m)
        self.counted_through = seq
        self._show_counters()
        self._show_verdict(m)
        if m.get("verdict") != "fail":
            return False
        self.reject_count += 1
        self.values["RejectCount"] = self.reject_count
        self.values["RejectSeq"] = seq
        return True

    def _count(self, m: dict[str, Any]) -> None:
        """Step the counters as the station does for this verdict (station/service/daemon.py)."""
        c = self.counters
        c["published"] += 1
        c["captured"] = max(c["captured"], c["published"])
        verdict = m.get("verdict")
        if verdict == "skipped":
            c["skipped"] += 1
        elif m.get("error"):
            c["errors"] += 1
        else:
            c["inspected"] += 1
        if verdict == "pass":
            c["passed"] += 1
        elif verdict == "fail":
            c["failed"] += 1

    def _show_counters(self) -> None:
        c, v = self.counters, self.values
        for key in COUNTER_KEYS:
            v[f"Counters.{key.capitalize()}"] = c[key]
        v["WS_Tot_Containers"], v["WS_Good_Containers"], v["WS_Tot_Rej"] = c["published"], c["passed"], c["failed"]
        v["NextSeq"] = max(v["NextSeq"], self.counted_through + 1)

    def _show_verdict(self, m: dict[str, Any]) -> None:
        cls, anomaly, trigger = m.get("class") or {}, m.get("anomaly") or {}, m.get("trigger") or {}
        self.values.update({
            "LastVerdict.Verdict": str(m.get("verdict", "")),
            "LastVerdict.ClassLabel": str(cls.get("label", "")),
            "LastVerdict.Confidence": _float(cls.get("confidence")),
            "LastVerdict.AnomalyScore": _float(anomaly.get("score")),
            "LastVerdict.AnomalyThreshold": _float(anomaly.get("threshold")),
            "LastVerdict.Reasons": ",".join(str(r) for r in m.get("reasons") or []),
            "LastVerdict.FrameId": str(m.get("frame_id", "")),
            "LastVerdict.CapturedAt": _utc(m.get("captured_at")),
            "LastVerdict.TriggerBlockId": _int(trigger.get("block_id"), -1),
            "LastVerdict.RunId": str(m.get("run_id", "")),
            "LastVerdict.Json": json.dumps(m, ensure_ascii=False, separators=(",", ":")),
            # Seq last: a client that polls Seq for a change then reads the rest sees this verdict or a newer one.
            "LastVerdict.Seq": _int(m.get("seq")),
        })


def listen_url(url: str) -> tuple[str, int]:
    """(host, port) of an ``opc.tcp://HOST:PORT/PATH`` URL, or a ConfigError that says what is wrong."""
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "opc.tcp" or not parsed.hostname or port is None:
        raise ConfigError(f"--listen {url!r}: expected opc.tcp://HOST:PORT/PATH, e.g. opc.tcp://0.0.0.0:4840/station/")
    return parsed.hostname, port


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one asyncua logger: it logs a traceback for a failure we report in one line ourselves."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


class AsyncuaLogs(logging.Handler):
    """asyncua's own log records as short, rate-limited structlog lines.

    asyncua logs through stdlib logging, which nothing else in the station configures: its warnings
    reached stderr as bare text through logging's last resort, and each malformed message came with a
    traceback. The bad messages themselves never reach asyncua (GuardedProtocol answers them and logs
    one line); what asyncua still says (an idle client closed, a service fault) is kept, first line only.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines = BadClientLog(log)

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"asyncua_level": record.levelname.lower(),
                                  "message": record.getMessage().split("\n", 1)[0]}
        if record.exc_info is not None and record.exc_info[1] is not None:
            fields["error"] = record.exc_info[1]
        self.lines.report("asyncua_log", None, **fields)


@contextlib.contextmanager
def asyncua_logs_as_lines() -> Iterator[None]:
    """While the bridge serves, asyncua's records go through AsyncuaLogs only."""
    logger = logging.getLogger("asyncua")
    saved = logger.handlers, logger.propagate, logger.level
    logger.handlers = [AsyncuaLogs()]
    logger.propagate = False  # else logging's last resort prints them a second time, as bare text
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


# -- the TCP gate: OPC UA Part 6, 7.1 ----------------------------------------------

#: MessageType, chunk type, MessageSize: the start of every OPC UA TCP message
HEADER = struct.Struct("<3scI")
#: a Hello after its header: ProtocolVersion, ReceiveBufferSize, SendBufferSize, MaxMessageSize,
#: MaxChunkCount, then the EndpointUrl's length (-1 for a null string)
HELLO = struct.Struct("<5Ii")
HELLO_MIN = HEADER.size + HELLO.size
#: the smallest secure-channel chunk: header, SecureChannelId, and a token id or sequence header
SECURE_MIN = HEADER.size + 4 + 8
SECURE_TYPES = (b"OPN", b"MSG", b"CLO")
CHUNK_TYPES = (b"F", b"C", b"A")
#: Part 6, 7.1.2.3: both buffer sizes of a Hello are at least 8192 bytes
MIN_BUFFER = 8192
#: Part 6, 7.1.2.3: the EndpointUrl of a Hello is at most 4096 bytes
MAX_ENDPOINT_URL = 4096
S = StatusCodes


class Fault(NamedTuple):
    """Why a message is refused: the StatusCode sent in the Error message, and its Reason."""

    code: int
    reason: str


def _shown(raw: bytes) -> str:
    return repr(raw.decode("latin-1"))  # any bytes, shown as the characters a protocol dump shows


def frame_fault(head: bytes, hello_seen: bool, max_chunk: int) -> Fault | None:
    """What is wrong with a message's 8-byte header, given what came before it on the connection."""
    kind, chunk, size = HEADER.unpack(head)
    if not hello_seen and kind != b"HEL":
        return Fault(S.BadTcpMessageTypeInvalid, f"message type {_shown(kind)} before a Hello")
    if hello_seen and kind not in SECURE_TYPES:
        what = "a second Hello" if kind == b"HEL" else f"message type {_shown(kind)}"
        return Fault(S.BadTcpMessageTypeInvalid, f"{what}; expected OPN, MSG or CLO")
    if kind == b"HEL" and chunk != b"F":
        return Fault(S.BadTcpMessageTypeInvalid, f"chunk type {_shown(chunk)} in a Hello; it is always 'F'")
    if chunk not in CHUNK_TYPES:
        return Fault(S.BadTcpMessageTypeInvalid, f"chunk type {_shown(chunk)}; expected 'F', 'C' or 'A'")
    if size > max_chunk:
        return Fault(S.BadTcpMessageTooLarge, f"MessageSize {size} over the receive buffer of {max_chunk} bytes")
    least = HELLO_MIN if kind == b"HEL" else SECURE_MIN
    if size < least:
        return Fault(S.BadDecodingError, f"MessageSize {size} under the {least} bytes of a {kind.decode()} header")
    return None


def hello_fault(message: bytes) -> Fault | None:
    """What is wrong with a whole Hello message (header included), if anything."""
    _, receive, send, _, _, url_length = HELLO.unpack_from(message, HEADER.size)
    for name, value in (("ReceiveBufferSize", receive), ("SendBufferSize", send)):
        if value < MIN_BUFFER:
            # The status the OPC Foundation's .NET stack uses for buffer sizes out of range.
            return Fault(S.BadTcpNotEnoughResources, f"{name} {value} under the {MIN_BUFFER} bytes OPC UA requires")
    if url_length > MAX_ENDPOINT_URL or url_length < -1:
        return Fault(S.BadTcpEndpointUrlInvalid, f"EndpointUrl length {url_length}; at most {MAX_ENDPOINT_URL}")
    if HELLO_MIN + max(url_length, 0) > len(message):
        return Fault(S.BadDecodingError, f"EndpointUrl length {url_length} runs past the Hello's end")
    try:
        message[HELLO_MIN:HELLO_MIN + max(url_length, 0)].decode("utf-8")
    except UnicodeDecodeError:
        return Fault(S.BadTcpEndpointUrlInvalid, "EndpointUrl is not UTF-8")
    return None


def error_message(fault: Fault) -> bytes:
    """An OPC UA TCP Error message (ERR): the StatusCode, then the Reason as a length-prefixed string."""
    reason = fault.reason.encode("utf-8")
    body = struct.pack("<Ii", fault.code, len(reason)) + reason
    return HEADER.pack(b"ERR", b"F", HEADER.size + len(body)) + body


def _address(peer: Any) -> str | None:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


class GuardedProtocol(OPCUAProtocol):
    """asyncua's connection, with the TCP stream framed and checked here before asyncua parses it.

    asyncua acknowledged a Hello whatever its chunk type, buffer sizes or EndpointUrl, buffered a
    declared 4 GiB message without end, and logged a traceback for a message it could not parse while
    leaving the connection open. Here each message is checked against OPC UA Part 6 first; one that fails
    is answered with an Error message and the connection closed, as Part 6, 7.1.5 says, and logged once.
    """

    def __init__(self, iserver: InternalServer, policies: list[Any], clients: list[OPCUAProtocol],
                 closing_tasks: list[asyncio.Task[Any]], limits: TransportLimits, bad_clients: BadClientLog) -> None:
        super().__init__(iserver, policies, clients, closing_tasks, limits)
        self.bad_clients = bad_clients
        self._hello_seen = False
        # Until the Hello says otherwise: the server's own receive buffer.
        self._max_chunk = limits.max_recv_buffer
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused or self.processor is None:
            return  # refused (closing), or turned away at max_connections
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            fault = frame_fault(self._buffer[:HEADER.size], self._hello_seen, self._max_chunk)
            if fault is not None:
                self.refuse(fault, self._buffer)
                return
            size = HEADER.unpack_from(self._buffer)[2]
            if len(self._buffer) < size:
                return
            message, self._buffer = self._buffer[:size], self._buffer[size:]
            if not self._hello_seen:
                fault = hello_fault(message)
                if fault is not None:
                    self.refuse(fault, message)
                    return
                self._hello_seen = True
                # asyncua's ACK takes the smaller of the client's SendBufferSize and its own; so do we.
                self._max_chunk = min(self._max_chunk, HELLO.unpack_from(message, HEADER.size)[2])
            body = Buffer(message)
            header = header_from_binary(body)
            try:
                self.messages.put_nowait((header, body))
            except asyncio.QueueFull:
                self.refuse(Fault(S.BadTcpServerTooBusy, f"over {self.messages.maxsize} messages waiting"), message)
                return

    async def _process_one_msg(self, header: Any, buf: Buffer) -> bool:
        try:
            return await super()._process_one_msg(header, buf)
        except Exception as exc:  # asyncua's loop would log a traceback and carry on with the connection
            code = exc.code if isinstance(exc, UaStatusCodeError) else S.BadDecodingError
            self.refuse(Fault(code, f"{_shown(header.MessageType)} not understood: {type(exc).__name__}"),
                        error=exc)
            return False

    def refuse(self, fault: Fault, data: bytes | None = None, error: Exception | None = None) -> None:
        """Answer with an Error message, close, and log one line (or count it, over the rate)."""
        self._refused = True
        self._buffer = b""
        while not self.messages.empty():  # a Hello queued before the bad message must not be answered
            self.messages.get_nowait()
        fields: dict[str, Any] = {"status": ua.StatusCode(ua.UInt32(fault.code)).name, "reason": fault.reason,
                                  "action": "ERR sent, connection closed"}
        if data is not None:
            fields["data"] = excerpt(data)
        if error is not None:
            fields["error"] = error
        self.bad_clients.report("opcua_bad_message", _address(self.peer_name), **fields)
        if self.transport is not None:
            self.transport.write(error_message(fault))
            self.transport.close()  # after the queued ERR is sent


class GuardedBinaryServer(BinaryServer):
    """asyncua's listener, making GuardedProtocol connections; one bad-client log for all of them."""

    def __init__(self, iserver: InternalServer, host: str, port: int, limits: TransportLimits) -> None:
        super().__init__(iserver, host, port, limits)
        self.bad_clients = BadClientLog(log)

    def _make_protocol(self) -> OPCUAProtocol:
        return GuardedProtocol(self.iserver, self._policies, self.clients, self.closing_tasks, self.limits,
                               self.bad_clients)


class GuardedServer(Server):
    """asyncua's Server listening through GuardedBinaryServer."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.listen_address = host, port

    async def start(self) -> None:
        # Server.start as of asyncua 2.1, less the certificate check (this server has no certificate):
        # it builds its BinaryServer inline, with no hook to give it another protocol.
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            self.bserver = GuardedBinaryServer(self.iserver, *self.listen_address, self.limits)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except Exception:
            await self.iserver.stop()
            raise


# -- the address space -------------------------------------------------------------


def _variant(path: str, value: Any) -> ua.Variant:
    vtype = VTYPES[path]
    if vtype == V.UInt32:
        value = int(value) & UINT32  # counters wrap, as a PLC's UDINT does
    return ua.Variant(value, vtype)


def _data_value(path: str, value: Any) -> ua.DataValue:
    if value is NO_VALUE:
        # A status, not a made-up number: a PLC sees "no value yet", and the first real value is a change
        # for every subscription even when it is 0. Stamped with the time, as every value written.
        return dataclasses.replace(value_to_datavalue(ua.Variant()),
                                   StatusCode=ua.StatusCode(ua.UInt32(S.BadWaitingForInitialData)))
    return value_to_datavalue(_variant(path, value))


class AddressSpace:
    """The OPC UA server and the ``Station`` object; writes only the values that changed."""

    def __init__(self, server: Server, nodes: dict[str, Node], url: str) -> None:
        self.server = server
        self.nodes = nodes
        self.url = url
        self._written: dict[str, Any] = {p.path: p.initial for p in POINTS}

    @classmethod
    async def start(cls, url: str) -> AddressSpace:
        host, port = listen_url(url)
        server = GuardedServer(host, port)
        await server.init()
        server.set_endpoint(url)
        server.set_server_name("station OPC UA bridge")
        # Read-only data for a plant network: no certificates to manage, anonymous reads, writes refused.
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_identity_tokens([ua.AnonymousIdentityToken])
        await server.set_application_uri(f"urn:{socket.gethostname()}:station:bridge:opcua")
        await server.set_build_info(NAMESPACE_URI, "station", "station bridge opcua", __version__, __version__,
                                    datetime.now(timezone.utc))
        idx = await server.register_namespace(NAMESPACE_URI)
        nodes = await _build(server, idx)
        try:
            with _quiet("asyncua.server.server"):
                await server.start()
        except OSError as exc:
            raise PublishError(f"--listen {url}: cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        return cls(server, nodes, url)

    async def write(self, values: dict[str, Any]) -> None:
        for path, value in values.items():
            if self._written.get(path) != value:
                await self.nodes[path].write_value(_data_value(path, value))
                self._written[path] = value

    async def stop(self) -> None:
        await self.server.stop()


def _nodeid(text: str, idx: int) -> ua.NodeId:
    return ua.NodeId(ua.String(text), ua.Int16(idx))


def _ns0(identifier: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(identifier))


def _text(text: str) -> ua.LocalizedText:
    return ua.LocalizedText(text, LOCALE)


async def _add_variable(parent: Node, nodeid: ua.NodeId, name: ua.QualifiedName, description: str,
                        value: ua.Variant, datatype: int, typedef: int = ObjectIds.BaseDataVariableType,
                        reference: int = ObjectIds.HasComponent) -> Node:
    """A read-only scalar variable of ``typedef``.

    Node.add_variable can neither give a type definition nor a Description other than the browse name.
    """
    attrs = ua.VariableAttributes(DisplayName=ua.LocalizedText(name.Name), Description=_text(description),
                                  Value=value, DataType=_ns0(datatype), ValueRank=ua.ValueRank.Scalar,
                                  AccessLevel=ua.AccessLevel.CurrentRead.mask,
                                  UserAccessLevel=ua.AccessLevel.CurrentRead.mask)
    item = ua.AddNodesItem(ParentNodeId=parent.nodeid, ReferenceTypeId=_ns0(reference),
                           RequestedNewNodeId=nodeid, BrowseName=name, NodeClass=ua.NodeClass.Variable,
                           NodeAttributes=attrs, TypeDefinition=_ns0(typedef))
    (result,) = await parent.session.add_nodes([item])
    result.StatusCode.check()
    return Node(parent.session, result.AddedNodeId)


async def _add_property(parent: Node, node_id: str, idx: int, name: str, description: str, value: Any,
                        datatype: int) -> None:
    # The standard's property names (EngineeringUnits, EURange) are in namespace 0; their NodeIds are ours.
    await _add_variable(parent, _nodeid(f"{node_id}.{name}", idx), ua.QualifiedName(name, 0), description,
                        ua.Variant(value, V.ExtensionObject), datatype, ObjectIds.PropertyType, ObjectIds.HasProperty)


async def _add_point(parent: Node, point: Point, idx: int) -> Node:
    node_id, name = f"{ROOT}.{point.path}", point.path.rsplit(".", 1)[-1]
    typedef = ObjectIds.BaseDataVariableType
    if point.unit is not None:
        # AnalogUnitType: EngineeringUnits mandatory, EURange optional. Not AnalogItemType, which makes an
        # EURange mandatory that a score or a rate does not have; with a range, AnalogUnitRangeType is one.
        typedef = ObjectIds.AnalogUnitType if point.eu_range is None else ObjectIds.AnalogUnitRangeType
    # A point without a value yet is created with a placeholder of its type, then given its status below.
    placeholder = _variant(point.path, 0 if point.initial is NO_VALUE else point.initial)
    node = await _add_variable(parent, _nodeid(node_id, idx), ua.QualifiedName(name, idx), point.description,
                               placeholder, getattr(ObjectIds, point.vtype.name), typedef)
    if point.unit is not None:
        await _add_property(node, node_id, idx, "EngineeringUnits", f"the unit of {name}: {point.unit.description}",
                            point.unit.information(), ObjectIds.EUInformation)
    if point.eu_range is not None:
        low, high = point.eu_range
        await _add_property(node, node_id, idx, "EURange", f"the range of {name} in normal operation: "
                            f"{low:g} to {high:g}", ua.Range(Low=low, High=high), ObjectIds.Range)
    await node.write_value(_data_value(point.path, point.initial))
    return node


async def _build(server: Server, idx: int) -> dict[str, Node]:
    """The ``Station`` object, one child object per group (LastVerdict, Counters, Stream), a variable per point."""
    parents: dict[str, Node] = {}

    async def parent(path: str) -> Node:
        if path not in parents:
            above = server.nodes.objects if path == ROOT else await parent(path.rsplit(".", 1)[0])
            name = path.rsplit(".", 1)[-1]
            node = await above.add_object(_nodeid(path, idx), ua.QualifiedName(name, idx))
            await node.write_attribute(AttributeIds.Description,
                                       ua.DataValue(ua.Variant(_text(GROUPS[name]), V.LocalizedText)))
            parents[path] = node
        return parents[path]

    nodes: dict[str, Node] = {}
    for point in POINTS:
        nodes[point.path] = await _add_point(await parent(".".join([ROOT, *point.path.split(".")[:-1]])), point, idx)
    return nodes


class RejectPulse:
    """RejectPulse high for ``width_s`` after the latest fail: a fail while it is high extends it.

    The pulse is for a PLC that edge-detects; RejectCount is what loses nothing.
    """

    def __init__(self, space: AddressSpace, width_s: float) -> None:
        self.space = space
        self.width_s = width_s
        self._lower: asyncio.Task[None] | None = None

    async def fire(self) -> None:
        if self.width_s <= 0:
            return  # --reject-pulse-ms 0: no pulse, RejectCount only
        if self._lower is not None:
            self._lower.cancel()
        await self.space.write({"RejectPulse": True})
        self._lower = asyncio.create_task(self._lower_later())

    async def _lower_later(self) -> None:
        await asyncio.sleep(self.width_s)
        await self.space.write({"RejectPulse": False})

    async def close(self) -> None:
        if self._lower is not None:
            self._lower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lower


def _log_notes(event: FeedEvent) -> None:
    for note in event.notes:
        log.warning("stream_note", note=note)


async def _step(event: FeedEvent | None, tracker: SequenceTracker, view: StationView, space: AddressSpace,
                pulse: RejectPulse) -> None:
    now = time.monotonic()
    fresh_fail = False
    if event is None:
        view.tick(now)  # silence, too, is news: the station may have gone offline
    else:
        _log_notes(event)
        run_before = view.run_id
        fresh_fail = view.apply(event, tracker, now)
        if view.run_id != run_before:
            # Through "no value" first, even when this one event also brings the new run's first verdict:
            # its seq may equal the one shown (0 after a run of one bottle), and only a change notifies.
            await space.write(dict.fromkeys(RUN_SCOPED, NO_VALUE))
    await space.write(view.values)  # RejectCount before the pulse: a PLC that sees the pulse sees the count too
    if fresh_fail:
        await pulse.fire()


async def serve(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> int:
    with asyncua_logs_as_lines():
        return await _serve(args, feed, stop)


async def _serve(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> int:
    space = await AddressSpace.start(args.listen)
    view = StationView()
    pulse = RejectPulse(space, args.reject_pulse_ms / 1000)
    # One worker, always the same thread: the feed's ZeroMQ socket must not change threads.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdict-feed")
    loop = asyncio.get_running_loop()
    log.info("opcua_bridge_started", listen=args.listen, connect=args.connect, namespace=NAMESPACE_URI)
    try:
        await space.write(view.values)
        while not stop.is_set():
            event = await loop.run_in_executor(reader, feed.next, POLL_S)
            await _step(event, feed.tracker, view, space, pulse)
    finally:
        await pulse.close()
        reader.shutdown(wait=True)
        await space.stop()
    log.info("opcua_bridge_stopped", rejects=view.reject_count, gaps=feed.tracker.gaps, missed=feed.tracker.missed)
    return EXIT_OK


def run(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> int:
    listen_url(args.listen)  # a bad URL exits 2 before the server is built
    return asyncio.run(serve(args, feed, stop))
