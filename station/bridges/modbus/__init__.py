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

Framing is the bridge's own (BridgeServer, Connection): see ``server``.

Modules: ``registers`` (the map, one result as registers, the handshake),
``state`` (the station as the PLC sees it, from the feed's models),
``server`` (pymodbus's datastore behind the bridge's own TCP framing).
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import structlog

from station.bridges.feed import VerdictFeed
from station.bridges.modbus.registers import (
    ACK_COIL,
    ACK_GRACE_S,
    ACK_SEEN,
    DROP_LOG_EVERY_S,
    DROPPED,
    MAP_VERSION,
    ONLINE,
    PASSED,
    POLL_S,
    QUEUE_LIMIT,
    REASON_BITS,
    REJECT,
    SKIPPED,
    STATE_CODES,
    U16,
    VALID,
    Addr,
    Handshake,
    Result,
    result_of,
)
from station.bridges.modbus.server import BridgeServer, RegisterFace, address, build_devices, quiet_pymodbus
from station.bridges.modbus.state import BridgeState
from station.errors import EXIT_OK, ConfigError, StationError

__all__ = ["ACK_COIL", "ACK_GRACE_S", "ACK_SEEN", "DROPPED", "MAP_VERSION", "ONLINE", "PASSED", "QUEUE_LIMIT",
           "REASON_BITS", "REJECT", "SKIPPED", "STATE_CODES", "VALID", "Addr", "BridgeState", "Handshake",
           "ModbusOptions", "Result", "parse_listen", "quiet_pymodbus", "result_of", "run"]

log = structlog.get_logger("station.bridge.modbus")


@dataclass(frozen=True)
class ModbusOptions:
    """``station bridge modbus``'s options."""

    #: HOST:PORT ([v6]:PORT for IPv6) the Modbus TCP server listens on
    listen: str = "0.0.0.0:5020"
    #: the Modbus unit (slave) id; 0 answers every unit id
    unit: int = 1
    #: the station's endpoint, for the log
    connect: str = ""


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
        raise StationError(f"--listen {address(host, port)}: cannot listen: {_bind_problem(host, port)}") from exc
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


async def _serve(options: ModbusOptions, feed: VerdictFeed, stop: threading.Event) -> BridgeState:
    host, port = parse_listen(options.listen)
    unit = _check_unit(options.unit)
    state = BridgeState()
    server = await _start(host, port, unit, state)
    log.info("modbus_bridge_started", listen=address(host, port), unit=unit, connect=options.connect,
             map_version=MAP_VERSION)
    try:
        await _pump(feed, state, stop)
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it unannotated
    return state


def run(options: ModbusOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    quiet_pymodbus()
    state = asyncio.run(_serve(options, feed, stop))
    log.info("modbus_bridge_stopped", rejects=state.reject_count, pending=len(state.handshake.pending),
             dropped=state.handshake.dropped, gaps=feed.tracker.gaps, missed=feed.tracker.missed)
    return EXIT_OK
