"""OPC UA bridge: the verdict stream as an OPC UA server a PLC, SCADA or MES reads.

One object, ``Station``, in the namespace ``urn:station:bridge``, with string
NodeIds (``ns=<idx>;s=Station.LastVerdict.Verdict``) so a PLC program can name
them without browsing. The machine state and the bottle counters carry their
Weihenstephan Standards (WS Pack) names; the rest is the station's own.
docs/bridge-opcua.md lists every node.

Threads: the ZeroMQ feed is read by one dedicated executor thread (a ZeroMQ
socket must stay on one thread); everything else, the OPC UA server, the
node writes and the reject pulse timer, runs on the asyncio loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlparse

import structlog
from asyncua import ua
from asyncua.common.node import Node
from asyncua.server.server import Server
from asyncua.ua.attribute_ids import AttributeIds

from station import __version__
from station.bridges.feed import FeedEvent, VerdictFeed
from station.errors import EXIT_OK, ConfigError, PublishError
from station.publish import SequenceTracker

log = structlog.get_logger("station.bridge.opcua")

NAMESPACE_URI = "urn:station:bridge"
ROOT = "Station"
#: how long the feed is polled before the loop looks at ``stop`` and the staleness again
POLL_S = 0.2
#: no message for this long (or three heartbeat intervals, if longer) and the station counts as offline
STALE_AFTER_S = 5.0
#: OPC UA's null DateTime (1601-01-01), shown before the first verdict
NO_TIME = datetime(1601, 1, 1, tzinfo=timezone.utc)
UINT32 = 0xFFFFFFFF

#: WS_Cur_State bit codes (WS Pack) for the station's states. ``degraded`` means the camera is
#: lost and being reconnected: the machine's own equipment has failed.
WS_UNDEFINED = 0
WS_STATES = {"stopped": 1, "starting": 2, "running": 128, "stopping": 256, "degraded": 1024}

COUNTER_KEYS = ("captured", "inspected", "skipped", "errors", "published", "passed", "failed")

V = ua.VariantType


@dataclass(frozen=True)
class Point:
    """One variable: ``path`` below ``Station`` (also its NodeId after ``Station.``)."""

    path: str
    vtype: ua.VariantType
    initial: Any
    description: str


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
    Point("Fps", V.Double, 0.0, "verdicts per second, from the heartbeat"),
    *(Point(f"Counters.{key.capitalize()}", V.UInt32, 0, f"the station's {key} counter, this run")
      for key in COUNTER_KEYS),
    Point("LastVerdict.Verdict", V.String, "", "pass, fail or skipped; empty before the first verdict"),
    Point("LastVerdict.ClassLabel", V.String, "", "the classifier's top class; empty when not inspected"),
    Point("LastVerdict.Confidence", V.Double, -1.0, "its probability, 0..1; -1 when not inspected"),
    Point("LastVerdict.AnomalyScore", V.Double, -1.0, "anomaly score; -1 when not inspected"),
    Point("LastVerdict.AnomalyThreshold", V.Double, -1.0, "the calibrated threshold; -1 when not inspected"),
    Point("LastVerdict.Reasons", V.String, "", "reason codes, comma-separated; empty for pass"),
    Point("LastVerdict.FrameId", V.String, "", "the source's name for the frame"),
    Point("LastVerdict.CapturedAt", V.DateTime, NO_TIME, "when the frame was captured (UTC)"),
    Point("LastVerdict.TriggerBlockId", V.Int64, -1, "the camera's frame counter for the trigger; -1 when unknown"),
    Point("LastVerdict.Seq", V.UInt32, 0, "the verdict's seq"),
    Point("LastVerdict.RunId", V.String, "", "the verdict's run"),
    Point("LastVerdict.Json", V.String, "", "the whole verdict message, JSON (station.verdict/1)"),
    Point("Stream.Online", V.Boolean, False, "a message arrived from the station within the staleness window"),
    Point("Stream.LastMessageAt", V.DateTime, NO_TIME, "when the bridge last heard from the station (UTC)"),
    Point("Stream.Gaps", V.UInt32, 0, "gaps in seq seen by this bridge since it started"),
    Point("Stream.Missed", V.UInt32, 0, "verdicts lost in those gaps"),
    Point("RejectCount", V.UInt32, 0, "fail verdicts received by this bridge since it started (a pulse each)"),
    Point("RejectSeq", V.UInt32, 0, "seq of the last fail verdict that pulsed RejectPulse"),
    Point("RejectPulse", V.Boolean, False, "true for --reject-pulse-ms after each fail verdict"),
)
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
        """Step the counters as the station does for this verdict (station/daemon.py)."""
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


def _variant(path: str, value: Any) -> ua.Variant:
    vtype = VTYPES[path]
    if vtype == V.UInt32:
        value = int(value) & UINT32  # counters wrap, as a PLC's UDINT does
    return ua.Variant(value, vtype)


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
        server = Server()
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
                await self.nodes[path].write_value(_variant(path, value))
                self._written[path] = value

    async def stop(self) -> None:
        await self.server.stop()


def _nodeid(text: str, idx: int) -> ua.NodeId:
    return ua.NodeId(ua.String(text), ua.Int16(idx))


async def _build(server: Server, idx: int) -> dict[str, Node]:
    """The ``Station`` object, one child object per group (LastVerdict, Counters, Stream), a variable per point."""
    parents = {ROOT: await server.nodes.objects.add_object(_nodeid(ROOT, idx), ua.QualifiedName(ROOT, idx))}
    nodes: dict[str, Node] = {}
    for point in POINTS:
        *groups, name = point.path.split(".")
        parent_id = ".".join([ROOT, *groups])
        if parent_id not in parents:
            parents[parent_id] = await parents[ROOT].add_object(_nodeid(parent_id, idx),
                                                                ua.QualifiedName(groups[-1], idx))
        node = await parents[parent_id].add_variable(_nodeid(f"{ROOT}.{point.path}", idx),
                                                     ua.QualifiedName(name, idx), _variant(point.path, point.initial))
        await node.write_attribute(AttributeIds.Description,
                                   ua.DataValue(ua.Variant(ua.LocalizedText(point.description), V.LocalizedText)))
        nodes[point.path] = node
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
        fresh_fail = view.apply(event, tracker, now)
    await space.write(view.values)  # RejectCount before the pulse: a PLC that sees the pulse sees the count too
    if fresh_fail:
        await pulse.fire()


async def serve(args: argparse.Namespace, feed: VerdictFeed, stop: threading.Event) -> int:
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
