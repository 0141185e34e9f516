"""`station bridge mes --db postgresql://…`: the stream into PostgreSQL in batches, a disk spool through outages.

One loop reads every connected station (``--connect`` repeated: one SUB
socket connected to each, fair-queued by ZeroMQ), gathers up to BATCH_ROWS
verdicts or BATCH_S seconds, and hands the batch to the store. While the
database is unreachable (or the spool still holds older verdicts), batches
go to the spool instead, in order, and the recorder is ``degraded``: one log
line on entering and one on leaving, and ``station_mes_degraded`` 1 on the
metrics endpoint. Every RETRY_S it tries the database again; once a write
succeeds the spool is drained oldest first, then live batches go straight in.

Exit codes: 0 on SIGTERM/SIGINT (a batch in hand is stored or spooled
first); 1 when the spool is full (the message names the segment file), when
the database is unreachable and no ``--spool`` was given, or on any other
database error; 2 for a bad URL, an unwritable spool folder or a schema newer
than this recorder. systemd's Restart= brings it back; verdicts published
meanwhile are recorded as a gap.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from station.bridges.feed import VerdictFeed
from station.bridges.mes_pg import PgStore, Written, db_errors
from station.bridges.spool import Received, Spool
from station.contract.timefmt import parse_instant
from station.errors import EXIT_OK, ConfigError, StationError

log = structlog.get_logger("station.bridge.mes")

BATCH_ROWS = 2000
BATCH_S = 0.1
RETRY_S = 2.0


@dataclass(frozen=True)
class PgRecorderOptions:
    """``station bridge mes --db postgresql://…``'s options."""

    db: str
    #: where verdicts wait while the database is unreachable (None: the recorder stops instead)
    spool: Path | None = None
    spool_max_mb: float = 1024.0
    #: HOST:PORT to serve Prometheus metrics on
    metrics: str | None = None
    #: TimescaleDB only: drop verdict chunks older than this
    retention_days: int | None = None
    #: the stations' endpoints, for the log
    connect: str | list[str] = ""


class MultiFeed(VerdictFeed):
    """One SUB socket connected to every endpoint: many stations, one ordered-per-station stream.

    The tracker's notes mix stations and are not used; gaps are judged per
    station and run by the store, against the database.
    """

    def __init__(self, endpoints: list[str], station: str | None = None, curve: Any = None) -> None:
        super().__init__(endpoints[0], station=station, curve=curve)
        for endpoint in endpoints[1:]:
            self.subscriber._sock.connect(endpoint)


class Metrics:
    """The recorder's Prometheus metrics, on --metrics HOST:PORT when given."""

    def __init__(self, listen: str | None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        self.degraded = Gauge("station_mes_degraded", "1 while the database is unreachable and verdicts "
                              "are spooled", registry=self.registry)
        self.spool_bytes = Gauge("station_mes_spool_bytes", "bytes held in the spool", registry=self.registry)
        self.rows = Counter("station_mes_rows_written", "verdict rows committed", registry=self.registry)
        self.gaps = Counter("station_mes_gaps", "gaps recorded", registry=self.registry)
        self.received = Counter("station_mes_verdicts_received", "verdicts taken from the stream",
                                registry=self.registry)
        self.lag = Histogram("station_mes_lag_seconds", "from the station's published_at to the row's commit",
                             buckets=(0.05, 0.1, 0.2, 0.5, 1, 2, 5, 30, 300), registry=self.registry)
        if listen:
            host, _, port = listen.rpartition(":")
            try:
                start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--metrics {listen}: cannot serve metrics: {exc}") from exc


class PgRecorder:
    def __init__(self, store: PgStore, spool: Spool | None, metrics: Metrics) -> None:
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.degraded = False
        self._retry_at = 0.0
        self.recorded = 0
        self.gaps = 0

    def _committed(self, batch: list[Received], written: Written) -> None:
        self.recorded += written.rows
        self.gaps += written.gaps
        self.metrics.rows.inc(written.rows)
        self.metrics.gaps.inc(written.gaps)
        now = time.time()
        for r in batch:
            stamp = r.message.get("published_at")
            if isinstance(stamp, str):
                with contextlib.suppress(ValueError):  # a producer's odd stamp: no lag to tell
                    self.metrics.lag.observe(max(0.0, now - parse_instant(stamp).timestamp()))

    def _write(self, batch: list[Received]) -> bool:
        """True once committed; False (and the pool reset) when the database is away."""
        try:
            self._committed(batch, self.store.write(batch))
            return True
        except db_errors() as exc:
            self.store.reset()
            self._retry_at = time.monotonic() + RETRY_S
            if self.spool is None:
                raise StationError(f"--db: database unreachable and no --spool to hold verdicts: {exc}") from exc
            if not self.degraded:
                self.degraded = True
                self.metrics.degraded.set(1)
                log.error("mes_degraded", reason=str(exc).strip(), spool=str(self.spool.folder))
            return False

    def _drain(self) -> bool:
        """Empty the spool into the database, oldest first; True when it is empty."""
        assert self.spool is not None
        while (oldest := self.spool.oldest()) is not None:
            path, items = oldest
            for start in range(0, len(items), BATCH_ROWS):
                if not self._write(items[start:start + BATCH_ROWS]):
                    return False
            self.spool.remove(path)
            self.metrics.spool_bytes.set(self.spool.bytes_used)
        return True

    def flush(self, batch: list[Received]) -> None:
        """Store ``batch`` after anything spooled before it, or spool it."""
        if self.spool is not None and (self.degraded or not self.spool.empty()):
            if batch:
                self.spool.append(batch)
                self.metrics.spool_bytes.set(self.spool.bytes_used)
            if time.monotonic() >= self._retry_at and self._drain():
                if self.degraded:
                    log.info("mes_recovered", recorded=self.recorded)
                self.degraded = False
                self.metrics.degraded.set(0)
            return
        if batch and not self._write(batch):
            self.flush(batch)  # now degraded: to the spool


def run(options: PgRecorderOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    spool = Spool(options.spool, int(options.spool_max_mb * 2**20)) if options.spool is not None else None
    store = PgStore(options.db, retention_days=options.retention_days)
    metrics = Metrics(options.metrics)
    recorder = PgRecorder(store, spool, metrics)
    if spool is not None:
        metrics.spool_bytes.set(spool.bytes_used)  # left by a previous run: drained first
    try:
        store.migrate()
    except db_errors() as exc:
        if spool is None:
            raise StationError(f"--db: cannot reach the database: {str(exc).strip()}") from exc
        recorder.degraded = True  # start anyway: the stream is spooled until the database is there
        metrics.degraded.set(1)
        log.error("mes_degraded", reason=str(exc).strip(), spool=str(spool.folder))
    log.info("mes_recorder_started", db=_redact(options.db), connect=options.connect, timescale=store.timescale,
             spool=str(spool.folder) if spool else None)
    migrated = not recorder.degraded
    batch: list[Received] = []
    deadline = time.monotonic() + BATCH_S
    try:
        while not stop.is_set():
            event = feed.next(max(0.0, deadline - time.monotonic()))
            if event is not None and event.verdict is not None:
                batch.append(Received(event.verdict, time.time()))
                metrics.received.inc()
            if len(batch) >= BATCH_ROWS or time.monotonic() >= deadline:
                if not migrated and time.monotonic() >= recorder._retry_at:
                    migrated = _try_migrate(store, recorder)
                if migrated:
                    recorder.flush(batch)
                elif batch:
                    assert spool is not None
                    spool.append(batch)
                batch = []
                deadline = time.monotonic() + BATCH_S
        if batch:
            if migrated:
                recorder.flush(batch)
            elif spool is not None:
                spool.append(batch)
    finally:
        store.close()
    log.info("mes_recorder_stopped", recorded=recorder.recorded, gaps=recorder.gaps,
             spooled_bytes=spool.bytes_used if spool else 0)
    return EXIT_OK


def _try_migrate(store: PgStore, recorder: PgRecorder) -> bool:
    try:
        store.migrate()
        return True
    except db_errors():
        store.reset()
        recorder._retry_at = time.monotonic() + RETRY_S
        return False


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, userinfo = head.partition("//")
    return f"{scheme}//{userinfo.split(':', 1)[0]}:***@{tail}"
