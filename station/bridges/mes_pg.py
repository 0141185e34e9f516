"""The MES recorder's PostgreSQL store: the SQLite recorder's tables, for many stations and recorders at once.

Same tables as station/bridges/mes.py (verdicts, gaps, runs) and the same gap
rule, evaluated against the database so it survives a recorder restart. What
changes for a plant-wide database:

* Times are ``timestamptz``; the full message is ``jsonb``.
* ``verdicts`` is range-partitioned by month on ``published_at`` (the
  station's stamp, identical for every recorder that hears the verdict, so the
  unique key ``(station, run_id, seq, published_at)`` makes rows from several
  recorders collapse into one: ON CONFLICT DO NOTHING). Where the TimescaleDB
  extension is installed it is a hypertable instead, with an optional
  retention policy.
* Rows go in one multi-row INSERT per batch (``unnest`` of arrays), gaps and
  run bookkeeping in the same transaction, so a batch is stored whole or not.
* A gap is recorded only while its seqs are still absent from ``verdicts``:
  a second recorder that heard them fills the hole instead of a gap row.
* The schema is created and migrated by the recorder (``schema_version``),
  under an advisory lock so recorders starting together do not race.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import structlog

from station.bridges.mes import QueryOptions, query_sql
from station.bridges.spool import Received
from station.contract.timefmt import parse_instant
from station.errors import ConfigError, MissingDependencyError, StationError

log = structlog.get_logger("station.bridge.mes_pg")

SCHEMA_VERSION = 1
#: pg_advisory_lock key for schema changes and partition creation ("stmesdb1")
_LOCK_KEY = 0x73746D6573646231

_V1_COMMON = [
    """CREATE TABLE gaps (
        id BIGSERIAL PRIMARY KEY, station TEXT NOT NULL, run_id TEXT NOT NULL,
        first_seq BIGINT NOT NULL, last_seq BIGINT NOT NULL, missed BIGINT NOT NULL,
        detected_at TIMESTAMPTZ NOT NULL, UNIQUE (station, run_id, first_seq, last_seq))""",
    """CREATE TABLE runs (
        station TEXT NOT NULL, run_id TEXT NOT NULL, first_seen_at TIMESTAMPTZ NOT NULL,
        last_seen_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (station, run_id))""",
    "CREATE INDEX verdicts_captured ON verdicts (captured_at)",
    "CREATE INDEX verdicts_verdict ON verdicts (verdict, captured_at)",
    "CREATE INDEX verdicts_run ON verdicts (station, run_id, seq)",
]
_VERDICTS_COLUMNS = """(
    station TEXT NOT NULL, run_id TEXT NOT NULL, seq BIGINT NOT NULL, frame_id TEXT,
    captured_at TIMESTAMPTZ, published_at TIMESTAMPTZ NOT NULL, received_at TIMESTAMPTZ NOT NULL,
    stored_at TIMESTAMPTZ NOT NULL DEFAULT now(), verdict TEXT NOT NULL, reasons TEXT NOT NULL,
    class_label TEXT, confidence DOUBLE PRECISION, anomaly_score DOUBLE PRECISION,
    threshold DOUBLE PRECISION, error_reason TEXT, model JSONB, message JSONB NOT NULL,
    PRIMARY KEY (station, run_id, seq, published_at))"""
_COLUMNS = ("station", "run_id", "seq", "frame_id", "captured_at", "published_at", "received_at", "verdict",
            "reasons", "class_label", "confidence", "anomaly_score", "threshold", "error_reason", "model", "message")
_TYPES = ("text", "text", "int8", "text", "timestamptz", "timestamptz", "timestamptz", "text", "text", "text",
          "float8", "float8", "float8", "text", "jsonb", "jsonb")
# Rows are COPYed into a session-local staging table, then moved with ON CONFLICT DO NOTHING: COPY is
# psycopg's C path (a multi-row INSERT of arrays spent most of its time escaping the JSON in Python).
_STAGE = ("CREATE TEMP TABLE IF NOT EXISTS verdicts_incoming ("
          + ", ".join(f"{c} {t}" for c, t in zip(_COLUMNS, _TYPES, strict=True)) + ") ON COMMIT DELETE ROWS")
_COPY = f"COPY verdicts_incoming ({', '.join(_COLUMNS)}) FROM STDIN"
_INSERT = (f"INSERT INTO verdicts ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} FROM verdicts_incoming "
           "ON CONFLICT DO NOTHING RETURNING station, run_id, seq")


def is_pg_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool
    except ImportError as exc:
        raise MissingDependencyError("--db postgresql://… needs psycopg 3 and psycopg_pool: "
                                     "pip install 'station[bridges]'") from exc
    return psycopg, psycopg_pool


def db_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or restarting server raises: the outage the spool covers."""
    psycopg, psycopg_pool = _psycopg()
    return (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg_pool.PoolTimeout)


def _month(dt: datetime) -> datetime:
    return datetime(dt.year, dt.month, 1, tzinfo=timezone.utc)


def _next_month(dt: datetime) -> datetime:
    return datetime(dt.year + dt.month // 12, dt.month % 12 + 1, 1, tzinfo=timezone.utc)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return parse_instant(value)
    except ValueError:
        return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _text(value: Any) -> str | None:
    # PostgreSQL text cannot hold NUL; a producer's stray NUL must not make a batch unstorable forever.
    return None if value is None else str(value).replace("\x00", "")


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("\\u0000", "")


@dataclass
class Written:
    rows: int
    gaps: int


class PgStore:
    """A pool of connections to one database; ``write`` stores a batch with its gaps, in one transaction."""

    def __init__(self, url: str, retention_days: int | None = None, pool_max: int = 2) -> None:
        psycopg, _ = _psycopg()
        try:
            psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"--db: not a valid PostgreSQL URL: {exc}") from exc
        self.url = url
        self.retention_days = retention_days
        self._pool_max = pool_max
        self._pool: Any = None
        self._months: set[datetime] = set()
        self.timescale = False
        self._next: dict[tuple[str, str], int | None] = {}  # (station, run) → the seq expected next

    def _connection(self, timeout_s: float = 3.0) -> Any:
        psycopg, psycopg_pool = _psycopg()
        if self._pool is None:
            # keepalives: a server that vanished without a FIN (a pulled cable) is noticed in ~25 s, not hours.
            kwargs = {"connect_timeout": 5, "application_name": "station-mes", "keepalives": 1,
                      "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
            try:
                self._pool = psycopg_pool.ConnectionPool(
                    self.url, min_size=1, max_size=self._pool_max, kwargs=kwargs, open=True,
                    check=psycopg_pool.ConnectionPool.check_connection)
            except psycopg.ProgrammingError as exc:
                raise ConfigError(f"--db: {self.url!r} is not a valid PostgreSQL URL: {exc}") from exc
        return self._pool.connection(timeout=timeout_s)

    def reset(self) -> None:
        """Drop the pool after a failure: the next attempt connects afresh."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                pool.close(timeout=0)
            except Exception as exc:
                log.debug("pool_close_failed", error=str(exc))

    def close(self) -> None:
        self.reset()

    def migrate(self) -> None:
        """Create or bring the schema up to SCHEMA_VERSION; ConfigError if the database is newer than us."""
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL, "
                         "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            have = row[0] or 0
            self.timescale = bool(conn.execute(
                "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())
            if have > SCHEMA_VERSION:
                raise ConfigError(f"--db: schema version {have} is newer than this recorder's "
                                  f"({SCHEMA_VERSION}); upgrade station")
            if have < 1:
                self._create_v1(conn)
                conn.execute("INSERT INTO schema_version (version) VALUES (1)")
                log.info("mes_schema_created", version=1, timescale=self.timescale)

    def _create_v1(self, conn: Any) -> None:
        if not self.timescale and conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
            try:
                with conn.transaction():  # a savepoint: without the right to create it, carry on without
                    conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                self.timescale = True
            except Exception as exc:
                log.info("timescaledb_not_used", reason=str(exc))
        if self.timescale:
            conn.execute("CREATE TABLE verdicts " + _VERDICTS_COLUMNS)
            conn.execute("SELECT create_hypertable('verdicts', 'published_at', chunk_time_interval => "
                         "interval '1 day')")
            if self.retention_days:
                conn.execute("SELECT add_retention_policy('verdicts', %s::interval)",
                             (f"{self.retention_days} days",))
        else:
            conn.execute("CREATE TABLE verdicts " + _VERDICTS_COLUMNS + " PARTITION BY RANGE (published_at)")
        for sql in _V1_COMMON:
            conn.execute(sql)

    def _ensure_partitions(self, conn: Any, stamps: Sequence[datetime]) -> None:
        if self.timescale:
            return
        for month in sorted({_month(s) for s in stamps} - self._months):
            name = f"verdicts_{month:%Y%m}"
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF verdicts "
                             f"FOR VALUES FROM ('{month.isoformat()}') TO ('{_next_month(month).isoformat()}')")
            self._months.add(month)

    def _expected(self, conn: Any, nxt: dict[tuple[str, str], int | None], station: str, run_id: str) -> int | None:
        key = (station, run_id)
        if key not in nxt:
            row = conn.execute("SELECT max(seq) FROM verdicts WHERE station = %s AND run_id = %s", key).fetchone()
            if row[0] is not None:
                nxt[key] = int(row[0]) + 1
            elif conn.execute("SELECT 1 FROM runs WHERE station = %s LIMIT 1", (station,)).fetchone():
                nxt[key] = 0  # a restart of a station we record: its new run starts at seq 0
            else:
                nxt[key] = None  # first run of a station never seen: it starts wherever we joined it
        return nxt[key]

    def write(self, batch: Sequence[Received]) -> Written:
        """Store ``batch`` (in stream order) with its gaps; raises db_errors() when the server is away."""
        good: list[Received] = []
        for r in batch:
            seq = r.message.get("seq")
            if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq < 2**63:
                good.append(r)
            else:
                log.warning("verdict_ignored", reason="no valid seq", seq=seq, station=r.message.get("station"))
        if not good:
            return Written(0, 0)
        table: list[tuple[Any, ...]] = []
        stamps: list[datetime] = []
        runs: dict[tuple[str, str], tuple[datetime, datetime]] = {}
        for r in good:
            m = r.message
            received = datetime.fromtimestamp(r.received_at, tz=timezone.utc)
            published = _time(m.get("published_at")) or received
            cls, anomaly, error = (v if isinstance(v, dict) else {} for v in
                                   (m.get("class"), m.get("anomaly"), m.get("error")))
            raw_reasons = m.get("reasons")
            reasons: list[Any] = raw_reasons if isinstance(raw_reasons, list) else []
            row: tuple[Any, ...] = (_text(m.get("station")), _text(m.get("run_id")), m["seq"], _text(m.get("frame_id")),
                   _time(m.get("captured_at")), published, received, _text(m.get("verdict")) or "",
                   ",".join(str(x) for x in reasons).replace("\x00", ""), _text(cls.get("label")),
                   _num(cls.get("confidence")), _num(anomaly.get("score")), _num(anomaly.get("threshold")),
                   _text(error.get("reason")), _json(m.get("model")), _json(m))
            table.append(row)
            stamps.append(published)
            key = (str(row[0]), str(row[1]))
            seen_first, _ = runs.get(key, (received, received))
            runs[key] = (seen_first, received)
        with self._connection() as conn:
            self._ensure_partitions(conn, stamps)
            with conn.transaction():
                nxt = dict(self._next)
                gaps: list[tuple[str, str, int, int]] = []
                for station, run_id, seq, *_ in table:
                    expected = self._expected(conn, nxt, str(station), str(run_id))
                    if expected is not None and seq > expected:
                        gaps.append((str(station), str(run_id), expected, seq - 1))
                    nxt[(str(station), str(run_id))] = max(seq + 1, expected or 0)
                cur = conn.cursor()
                cur.execute(_STAGE)
                with cur.copy(_COPY) as copy:
                    for row in table:
                        copy.write_row(row)
                inserted = cur.execute(_INSERT).fetchall()
                recorded = 0
                for station, run_id, first_seq, last_seq in gaps:
                    first, last = int(first_seq), int(last_seq)
                    cur = conn.execute(
                        "INSERT INTO gaps (station, run_id, first_seq, last_seq, missed, detected_at) "
                        "SELECT %s, %s, %s, %s, %s, now() WHERE (SELECT count(*) FROM verdicts WHERE station = %s "
                        "AND run_id = %s AND seq BETWEEN %s AND %s) < %s ON CONFLICT DO NOTHING",
                        (station, run_id, first, last, last - first + 1, station, run_id, first, last,
                         last - first + 1))
                    if cur.rowcount:
                        recorded += 1
                        log.warning("gap", station=station, run_id=run_id, first_seq=first, last_seq=last)
                keys = list(runs)
                conn.execute("INSERT INTO runs SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], "
                             "%s::timestamptz[]) ON CONFLICT (station, run_id) DO UPDATE "
                             "SET last_seen_at = GREATEST(runs.last_seen_at, excluded.last_seen_at)",
                             ([k[0] for k in keys], [k[1] for k in keys], [runs[k][0] for k in keys],
                              [runs[k][1] for k in keys]))
        self._next = nxt  # only once committed: a failed batch is retried from the same state
        return Written(len(inserted), recorded)


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        utc = value.astimezone(timezone.utc)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return value


def query_rows(url: str, args: QueryOptions) -> list[dict[str, Any]]:
    """mes-query's rows from PostgreSQL: the same columns and order as from SQLite, times in the same text form."""
    psycopg, _ = _psycopg()
    from psycopg.rows import dict_row

    sql, params = query_sql(args, "%s", "::timestamptz")
    try:
        with psycopg.connect(url, connect_timeout=10, row_factory=dict_row) as conn:
            rows = conn.execute(sql, params).fetchall()
    except psycopg.OperationalError as exc:
        raise StationError(f"--db: cannot query {url}: {exc}".strip()) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise ConfigError(f"--db: {url} is not a recorder database: {exc}".strip()) from exc
    return [{k: _iso(v) for k, v in row.items()} for row in rows]
