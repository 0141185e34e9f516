"""MES recorder: every verdict appended to SQLite, with the gaps in the stream recorded beside them.

Gaps are found against the database, not the connection: the recorder keeps,
per station and run, the highest seq stored, so verdicts published while the
recorder was stopped or disconnected show up as a gap once it is back (the
station's welcome carries the last verdict, which tells the recorder where the
run has got to). A new run of a station already recorded (a restart) is
expected from seq 0; only the very first run of a station is taken from
wherever the recorder joined it. The tail of a run that ended while the
recorder was away cannot be known, as nothing tells how far it went. A
verdict already stored (the welcome repeats the last one) is ignored, so a
row is never written twice.

Tables: ``verdicts`` (one row per verdict, the full message in ``message``),
``gaps`` (station, run, first and last missing seq), ``runs`` (first and last
seen). WAL mode, so ``station mes-query`` and other readers never block the
recorder.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from station.bridges.feed import VerdictFeed
from station.contract.timefmt import iso_utc, iso_utc_ceil_ms, parse_instant
from station.errors import EXIT_OK, ConfigError, StationError

log = structlog.get_logger("station.bridge.mes")


@dataclass(frozen=True)
class MesOptions:
    """``station bridge mes --db FILE``'s options (SQLite; PostgreSQL: mes_recorder.PgRecorderOptions)."""

    db: Path
    #: the stations' endpoints, for the log
    connect: str | list[str] = ""


@dataclass(frozen=True)
class QueryOptions:
    """``station mes-query``'s options. Times are in the recorder's own form (timefmt.iso_utc_ceil_ms)."""

    db: Path | str
    verdict: str | None = None
    since: str | None = None
    until: str | None = None
    run_id: str | None = None
    #: the recorded gaps instead of verdicts
    gaps: bool = False
    #: counts by run and verdict instead of verdicts
    summary: bool = False
    #: at most this many rows (0: all)
    limit: int = 0
    #: one JSON object per line
    json: bool = False

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS verdicts (
    station TEXT NOT NULL,
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    frame_id TEXT,
    captured_at TEXT,
    published_at TEXT,
    received_at TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reasons TEXT NOT NULL,
    class_label TEXT,
    confidence REAL,
    anomaly_score REAL,
    threshold REAL,
    error_reason TEXT,
    model TEXT,
    message TEXT NOT NULL,
    PRIMARY KEY (station, run_id, seq)
);
CREATE INDEX IF NOT EXISTS verdicts_captured ON verdicts (captured_at);
CREATE INDEX IF NOT EXISTS verdicts_verdict ON verdicts (verdict, captured_at);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY,
    station TEXT NOT NULL,
    run_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    missed INTEGER NOT NULL,
    detected_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    station TEXT NOT NULL,
    run_id TEXT NOT NULL,
    first_seen_at TEXT NOT NULL,
    last_seen_at TEXT NOT NULL,
    PRIMARY KEY (station, run_id)
);
"""


def open_db(path: Path, create: bool) -> sqlite3.Connection:
    if not create and not path.is_file():
        raise ConfigError(f"--db: {path} does not exist (station bridge mes creates it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if create:
            db.executescript(SCHEMA_SQL)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"--db: cannot open {path} as SQLite: {exc}") from exc
    return db


def _canonical_time(value: Any) -> Any:
    """A timestamp in the one fixed-width UTC form, so the column orders as time; other values as they are.

    The station already sends that form; a producer that sends another offset
    or precision is brought to it, and mes-query's bounds are in it too.
    """
    if not isinstance(value, str):
        return value
    try:
        return iso_utc_ceil_ms(parse_instant(value))
    except ValueError:
        return value


class Recorder:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.recorded = 0
        self.gaps = 0
        self._next: dict[tuple[str, str], int] = {}  # (station, run) → the seq expected next

    def _expected(self, station: str, run_id: str) -> int | None:
        key = (station, run_id)
        if key not in self._next:
            row = self.db.execute("SELECT MAX(seq) FROM verdicts WHERE station = ? AND run_id = ?",
                                  key).fetchone()
            if row[0] is not None:
                self._next[key] = int(row[0]) + 1
            elif self.db.execute("SELECT 1 FROM runs WHERE station = ? LIMIT 1", (station,)).fetchone():
                self._next[key] = 0  # a restart of a station we record: its new run starts at seq 0
            else:
                return None  # the first run of a station we have never seen: it starts wherever we joined it
        return self._next[key]

    def record(self, m: dict[str, Any]) -> bool:
        """Store one verdict; False if it was already stored."""
        station, run_id, seq = str(m.get("station")), str(m.get("run_id")), m.get("seq")
        if not isinstance(seq, int) or seq < 0:
            log.warning("verdict_ignored", reason="no valid seq", seq=seq, station=station)
            return False
        now = iso_utc(time.time())
        expected = self._expected(station, run_id)
        captured_at = _canonical_time(m.get("captured_at"))
        cls, anomaly, error = m.get("class") or {}, m.get("anomaly") or {}, m.get("error") or {}
        self.db.execute("BEGIN")
        try:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO verdicts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (station, run_id, seq, m.get("frame_id"), captured_at, m.get("published_at"), now,
                 m.get("verdict"), ",".join(m.get("reasons") or []), cls.get("label"), cls.get("confidence"),
                 anomaly.get("score"), anomaly.get("threshold"), error.get("reason"),
                 json.dumps(m.get("model")), json.dumps(m, separators=(",", ":"))),
            )
            if cur.rowcount == 0:
                self.db.execute("COMMIT")
                return False
            if expected is not None and seq > expected:
                self.db.execute("INSERT INTO gaps (station, run_id, first_seq, last_seq, missed, detected_at) "
                                "VALUES (?,?,?,?,?,?)", (station, run_id, expected, seq - 1, seq - expected, now))
                self.gaps += 1
                log.warning("gap", station=station, run_id=run_id, first_seq=expected, last_seq=seq - 1)
            self.db.execute("INSERT INTO runs VALUES (?,?,?,?) ON CONFLICT (station, run_id) "
                            "DO UPDATE SET last_seen_at = excluded.last_seen_at", (station, run_id, now, now))
            self.db.execute("COMMIT")
        except sqlite3.Error:
            self.db.execute("ROLLBACK")
            raise
        self._next[(station, run_id)] = max(seq + 1, expected or 0)
        self.recorded += 1
        return True


def run(options: MesOptions, feed: VerdictFeed, stop: threading.Event) -> int:
    db = open_db(options.db, create=True)
    recorder = Recorder(db)
    log.info("mes_recorder_started", db=str(options.db), connect=options.connect)
    try:
        while not stop.is_set():
            event = feed.next(0.2)
            if event is None or event.verdict is None:
                continue
            try:
                recorder.record(event.verdict)
            except sqlite3.Error as exc:
                # The disk is full or the file was taken away: say so and stop, systemd restarts us.
                raise StationError(f"--db {options.db}: cannot record seq {event.verdict.get('seq')}: {exc}") from exc
    finally:
        db.close()
    log.info("mes_recorder_stopped", recorded=recorder.recorded, gaps=recorder.gaps)
    return EXIT_OK


def query(args: QueryOptions) -> int:
    db = open_db(Path(args.db), create=False)
    db.row_factory = sqlite3.Row
    try:
        rows = _select(db, args)
    except sqlite3.Error as exc:
        raise ConfigError(f"--db: {args.db} is not a recorder database: {exc}") from exc
    finally:
        db.close()
    for row in rows:
        d = dict(row)
        print(json.dumps(d) if args.json else "  ".join("" if v is None else str(v) for v in d.values()))
    print(f"mes-query: {len(rows)} rows", file=sys.stderr)
    return EXIT_OK


def query_sql(args: QueryOptions, placeholder: str, instant_cast: str = "") -> tuple[str, list[Any]]:
    """mes-query's SELECT and its parameters, for either back-end (SQLite ``?``, PostgreSQL ``%s``).

    ``instant_cast`` follows a time parameter (``::timestamptz`` on PostgreSQL, where times are typed;
    SQLite compares the canonical text the recorder stores).
    """
    where: list[str] = []
    params: list[Any] = []
    if args.run_id:
        where.append(f"run_id = {placeholder}")
        params.append(args.run_id)
    if args.gaps:
        sql = "SELECT station, run_id, first_seq, last_seq, missed, detected_at FROM gaps"
        order = " ORDER BY id"
    else:
        for column, value, op in (("verdict", args.verdict, "="), ("captured_at", args.since, ">="),
                                  ("captured_at", args.until, "<")):
            if value:
                where.append(f"{column} {op} {placeholder}" + (instant_cast if column == "captured_at" else ""))
                params.append(value)
        if args.summary:
            sql = ("SELECT station, run_id, verdict, COUNT(*) AS count, MIN(seq) AS first_seq, "
                   "MAX(seq) AS last_seq FROM verdicts")
            order = " GROUP BY station, run_id, verdict ORDER BY MIN(received_at), verdict"
        else:
            sql = ("SELECT station, run_id, seq, captured_at, verdict, reasons, class_label, confidence, "
                   "anomaly_score, frame_id FROM verdicts")
            order = " ORDER BY captured_at, seq"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + order + (f" LIMIT {int(args.limit)}" if args.limit else ""), params


def _select(db: sqlite3.Connection, args: QueryOptions) -> list[sqlite3.Row]:
    sql, params = query_sql(args, "?")
    return db.execute(sql, params).fetchall()
