"""OPC UA bridge: the verdict stream as an OPC UA server a PLC, SCADA or MES reads.

One object, ``Station``, in the namespace ``urn:station:bridge``, with string
NodeIds (``ns=<idx>;s=Station.LastVerdict.Verdict``) so a PLC program can name
them without browsing. The machine state and the bottle counters carry their
Weihenstephan Standards (WS Pack) names; the rest is the station's own.
docs/bridge-opcua.md lists every node.

Threads: the ZeroMQ feed is read by one dedicated executor thread (a ZeroMQ
socket must stay on one thread); everything else, the OPC UA server, the
node writes and the reject pulse timer, runs on the asyncio loop.

Modules: ``points`` (the variables), ``view`` (what they show, from the feed's
models), ``space`` (the server and its address space, the reject pulse),
``guard`` (the TCP gate in front of asyncua, asyncua's logs).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from station.bridges.feed import FeedEvent, VerdictFeed
from station.bridges.opcua.guard import asyncua_logs_as_lines, listen_url
from station.bridges.opcua.points import NAMESPACE_URI, NO_VALUE, POLL_S, RUN_SCOPED
from station.bridges.opcua.space import AddressSpace, RejectPulse
from station.bridges.opcua.view import StationView
from station.errors import EXIT_OK
from station.service.publish import SequenceTracker

__all__ = ["NAMESPACE_URI", "OpcuaOptions", "StationView", "asyncua_logs_as_lines", "listen_url", "run", "serve"]

log = structlog.get_logger("station.bridge.opcua")


@dataclass(frozen=True)
class OpcuaOptions:
    """``station bridge opcua``'s options."""

    #: the server's endpoint URL, opc.tcp://HOST:PORT/PATH
    listen: str = "opc.tcp://0.0.0.0:4840/station/"
    #: how long RejectPulse stays true after a fail (0: no pulse)
    reject_pulse_ms: int = 500
    #: the station's endpoint, for the log
    connect: str = ""


def _log_event(event: FeedEvent) -> None:
    for note in event.notes:
        log.warning("stream_note", note=note)
    if event.invalid is not None:
        log.warning("message_ignored", kind=event.kind, reason=event.invalid)


async def _step(event: FeedEvent | None, tracker: SequenceTracker, view: StationView, space: AddressSpace,
                pulse: RejectPulse) -> None:
    now = time.monotonic()
    fresh_fail = False
    if event is None:
        view.tick(now)  # silence, too, is news: the station may have gone offline
    else:
        _log_event(event)
        run_before = view.run_id
        fresh_fail = view.apply(event, tracker, now)
        if view.run_id != run_before:
            # Through "no value" first, even when this one event also brings the new run's first verdict:
            # its seq may equal the one shown (0 after a run of one bottle), and only a change notifies.
            await space.write(dict.fromkeys(RUN_SCOPED, NO_VALUE))
    await space.write(view.values)  # RejectCount before the pulse: a PLC that sees the pulse sees the count too
    if fresh_fail:
        await pulse.fire()


async def serve(options: OpcuaOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    with asyncua_logs_as_lines():
        return await _serve(options, feed, stop)


async def _serve(options: OpcuaOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    space = await AddressSpace.start(options.listen)
    view = StationView()
    pulse = RejectPulse(space, options.reject_pulse_ms / 1000)
    # One worker, always the same thread: the feed's ZeroMQ socket must not change threads.
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verdict-feed")
    loop = asyncio.get_running_loop()
    log.info("opcua_bridge_started", listen=options.listen, connect=options.connect, namespace=NAMESPACE_URI)
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


def run(options: OpcuaOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    listen_url(options.listen)  # a bad URL exits 2 before the server is built
    return asyncio.run(serve(options, feed, stop))
