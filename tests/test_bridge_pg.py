"""The MES recorder into a real PostgreSQL server (Debian's postgresql, an initdb cluster started by the tests).

Stations, concurrent recorders, a database restart mid-stream and a recorder
SIGKILL: the rows in the database must equal what was published, with a gap
row exactly where verdicts went by unheard.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_endpoint, run_station, start_bridge, stop_bridge

psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is in station[bridges]: pip install -e '.[bridges]'")


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A throwaway cluster on 127.0.0.1; as root, run as the postgres user (the server refuses root)."""

    def __init__(self) -> None:
        bindir = _pg_bin()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql (deploy/test.sh does)")
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="station-pg-"))
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no postgres user to run the server as (Debian's postgresql "
                            "package creates it)")
            shutil.chown(self.root, "postgres", "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self._pg("initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync", "--no-instructions")
        self.start()

    def _pg(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self.prefix, str(self.bindir / tool), *args], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, f"{tool}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"

    def start(self) -> None:
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-w", "start", "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                 "-c synchronous_commit=off -c max_connections=50")

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    def ensure_running(self) -> None:
        """After a test that stopped the server failed half-way: the next test needs it up."""
        status = subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "status"],
                                capture_output=True, timeout=30)
        if status.returncode != 0:
            self.start()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def new_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        subprocess.run([*self.prefix, str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer()
    try:
        yield server
    finally:
        server.close()


_counter = iter(range(10**6))


@pytest.fixture
def db_url(pg: PgServer) -> str:
    return pg.new_database(f"mes{os.getpid()}_{next(_counter)}")


def rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return list(conn.execute(sql, params).fetchall())
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):
        return []  # the server is down or the recorder has not created its tables yet


def until(what: str, predicate: Callable[[], bool], procs: list[subprocess.Popen[str]],
          timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        for p in procs:
            assert p.poll() is None, f"recorder exited: {p.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def recorder(endpoints: list[str], url: str, *extra: str) -> subprocess.Popen[str]:
    args = [a for e in endpoints[1:] for a in ("--connect", e)]
    return start_bridge("mes", endpoints[0], *args, "--db", url, *extra)


def published_keys(messages: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return sorted((str(m["station"]), str(m["run_id"]), int(m["seq"])) for m in messages)


def stored_keys(url: str) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in rows(url, "SELECT station, run_id, seq FROM verdicts ORDER BY 1, 2, 3")]  # type: ignore[misc]


def test_three_stations_replayed_concurrently_into_two_recorders_store_each_verdict_once(
        bundle: Path, eval_root: Path, tmp_path: Path, db_url: str) -> None:
    endpoints = [free_endpoint() for _ in range(3)]
    recorders = [recorder(endpoints, db_url), recorder(endpoints, db_url)]
    try:
        replays = [subprocess.Popen(
            [*_station_cmd(), "replay", "--model", str(bundle), "--source", str(eval_root), "--publish", ep,
             "--wait-subscribers", "2", "--station-id", f"line{n}", "--out", str(tmp_path / f"v{n}.jsonl")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n, ep in enumerate(endpoints, 1)]
        for r in replays:
            _, err = r.communicate(timeout=600)
            assert r.returncode == 0, err[-3000:]
        published = [json.loads(line) for n in (1, 2, 3)
                     for line in (tmp_path / f"v{n}.jsonl").read_text().splitlines()]
        want = published_keys(published)
        until("every verdict", lambda: len(stored_keys(db_url)) >= len(want), recorders)
        for r in recorders:  # a clean stop stores each recorder's last batch: it must add nothing
            stop_bridge(r, "mes_recorder_stopped")
    finally:
        for r in recorders:
            r.kill()
    assert stored_keys(db_url) == want  # each exactly once: no duplicates from two recorders, none lost
    assert rows(db_url, "SELECT count(*) FROM gaps") == [(0,)]
    assert {s for s, _, _ in want} == {"line1", "line2", "line3"}
    assert rows(db_url, "SELECT version FROM schema_version") == [(1,)]
    last = published[-1]
    (msg,) = rows(db_url, "SELECT message FROM verdicts WHERE station = %s AND seq = %s",
                  (last["station"], last["seq"]))[0]
    assert msg == last

    fails = run_station("mes-query", "--db", db_url, "--verdict", "fail", "--json")
    assert fails.returncode == 0, fails.stderr
    assert len(fails.stdout.splitlines()) == sum(m["verdict"] == "fail" for m in published)
    summary = run_station("mes-query", "--db", db_url, "--summary", "--json")
    assert summary.returncode == 0, summary.stderr
    assert sum(json.loads(line)["count"] for line in summary.stdout.splitlines()) == len(published)


def _station_cmd() -> list[str]:
    from tests.conftest import station_cmd

    return station_cmd()


def _metric(port: int, name: str) -> float | None:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _publish(sim: Any, n: int, rate: float = 200.0) -> None:
    for _ in range(n):
        sim.publish_one()
        time.sleep(1 / rate)


def test_a_database_restart_mid_stream_loses_nothing(pg: PgServer, db_url: str, tmp_path: Path) -> None:
    from station.tools.plantsim import SimStation

    endpoint, spool, port = free_endpoint(), tmp_path / "spool", _free_port()
    sim = SimStation(endpoint, "line7", rate=200, count=0)
    rec = recorder([endpoint], db_url, "--spool", str(spool), "--metrics", f"127.0.0.1:{port}")
    try:
        assert sim.publisher.wait_for_subscribers(1, 30) == 1
        _publish(sim, 100)
        until("the first 100", lambda: len(stored_keys(db_url)) == 100, [rec])
        pg.stop()
        _publish(sim, 150)
        until("degraded", lambda: _metric(port, "station_mes_degraded") == 1.0, [rec], 30)
        until("spooled", lambda: any(spool.glob("segment-*.jsonl")), [rec], 30)
        _publish(sim, 50)
        pg.start()
        _publish(sim, 100)
        until("every verdict", lambda: len(stored_keys(db_url)) == 400, [rec])
        until("recovered", lambda: _metric(port, "station_mes_degraded") == 0.0, [rec], 30)
        err = stop_bridge(rec, "mes_recorder_stopped")
    finally:
        rec.kill()
        sim.close()
        pg.ensure_running()
    assert stored_keys(db_url) == published_keys(sim.published)
    assert rows(db_url, "SELECT count(*) FROM gaps") == [(0,)]
    assert not list(spool.glob("segment-*.jsonl"))  # drained
    assert "mes_degraded" in err and "mes_recovered" in err


def test_a_recorder_killed_and_restarted_records_the_gap_and_nothing_else(db_url: str) -> None:
    from station.tools.plantsim import SimStation

    endpoint = free_endpoint()
    sim = SimStation(endpoint, "line9", rate=200, count=0)
    rec = recorder([endpoint], db_url)
    try:
        assert sim.publisher.wait_for_subscribers(1, 30) == 1
        _publish(sim, 50)
        until("seq 0…49", lambda: len(stored_keys(db_url)) == 50, [rec])
        rec.send_signal(signal.SIGKILL)  # no goodbye, as in a power cut
        rec.wait()
        _publish(sim, 20)  # seq 50…69, unheard
        rec = recorder([endpoint], db_url)
        stop = threading.Event()

        def service() -> None:
            # An idle publisher attaches a new subscriber (and sends it the welcome) only when used.
            while not stop.wait(0.02):
                sim.publisher.service()

        servicer = threading.Thread(target=service, daemon=True)
        servicer.start()
        until("the welcome's seq 69", lambda: len(stored_keys(db_url)) == 51, [rec])
        stop.set()
        servicer.join()
        _publish(sim, 10)
        until("seq 70…79", lambda: len(stored_keys(db_url)) == 61, [rec])
        stop_bridge(rec, "mes_recorder_stopped")
    finally:
        rec.kill()
        sim.close()
    assert [k[2] for k in stored_keys(db_url)] == [*range(50), *range(69, 80)]
    # plantsim's verdicts are real ones: each validates against the published schema
    import jsonschema

    schema = json.loads((Path(__file__).resolve().parent.parent / "station/schemas/verdict-1.schema.json").read_text())
    for m in sim.published:
        jsonschema.validate(m, schema)
    assert rows(db_url, "SELECT first_seq, last_seq, missed FROM gaps") == [(50, 68, 19)]
    gaps = run_station("mes-query", "--db", db_url, "--gaps", "--json")
    assert gaps.returncode == 0, gaps.stderr
    (gap,) = [json.loads(line) for line in gaps.stdout.splitlines()]
    assert gap["station"] == "line9" and gap["missed"] == 19 and gap["detected_at"].endswith("Z")


def test_a_full_spool_stops_the_recorder_naming_the_file(tmp_path: Path) -> None:
    from station.tools.plantsim import SimStation

    endpoint, spool = free_endpoint(), tmp_path / "spool"
    sim = SimStation(endpoint, "line3", rate=200, count=0)
    # Nothing listens on this port: the database is unreachable from the start.
    rec = recorder([endpoint], f"postgresql://postgres@127.0.0.1:{_free_port()}/mes", "--spool", str(spool),
                   "--spool-max-mb", "0.2")
    try:
        assert sim.publisher.wait_for_subscribers(1, 30) == 1
        deadline = time.monotonic() + 60
        while rec.poll() is None and time.monotonic() < deadline:
            _publish(sim, 20)
        _, err = rec.communicate(timeout=30)
    finally:
        rec.kill()
        sim.close()
    assert rec.returncode == 1, err[-2000:]
    assert "spool full" in err and str(spool / "segment-") in err and "verdicts not stored" in err, err[-2000:]
    held = sum(len(p.read_text().splitlines()) for p in spool.glob("segment-*.jsonl"))
    assert 0 < held < len(sim.published)


def test_without_a_spool_an_unreachable_database_exits_1(tmp_path: Path) -> None:
    rec = recorder([free_endpoint()], f"postgresql://postgres@127.0.0.1:{_free_port()}/mes")
    _, err = rec.communicate(timeout=60)
    assert rec.returncode == 1 and "cannot reach the database" in err, err[-2000:]
    bad = run_station("bridge", "mes", "--connect", free_endpoint(), "--db", "postgresql://u@h/db?nosuchparam=1")
    assert bad.returncode == 2 and "not a valid PostgreSQL URL" in bad.stderr, bad.stderr


def _dashboard_sql(sql: str) -> str:
    """Grafana's macros and the station variable, as Grafana would expand them for the last day."""
    import re

    sql = re.sub(r"\$__timeGroupAlias\((\w+), '1m'\)", r"date_trunc('minute', \1) AS time", sql)
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 > now() - interval '1 day'", sql)
    return sql.replace("($station)", "('line8')")


def test_the_dashboard_and_documented_sql_run_on_the_recorder_schema(db_url: str) -> None:
    import random

    from station.bridges.mes_pg import PgStore
    from station.bridges.spool import Received
    from station.tools.plantsim import simulated_verdict

    store = PgStore(db_url)
    store.migrate()
    rng = random.Random(3)
    messages = [json.loads(json.dumps(simulated_verdict(n, rng).to_message("line8", "r1", n, time.time())))
                for n in range(200)]
    assert store.write([Received(m, time.time()) for m in messages]).rows == 200
    store.close()
    fails = sum(m["verdict"] == "fail" for m in messages)
    assert fails > 0
    # mes-query's time bounds against timestamptz: the 200 verdicts are all after 2000 and before 2100
    middle = messages[100]["captured_at"]
    for bounds, want in ((("--since", "2000-01-01"), 200), (("--until", "2000-01-01T00:00:00+01:00"), 0),
                         (("--since", middle), sum(m["captured_at"] >= middle for m in messages))):
        proc = run_station("mes-query", "--db", db_url, "--json", *bounds)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == want, (bounds, proc.stderr)

    repo = Path(__file__).resolve().parent.parent
    dashboard = json.loads((repo / "deploy/grafana/station-plant.json").read_text())
    queries = [t["rawSql"] for p in dashboard["panels"] for t in p["targets"] if "rawSql" in t]
    assert len(queries) == 4
    with psycopg.connect(db_url) as conn:
        results = [conn.execute(_dashboard_sql(q)).fetchall() for q in queries]
        per_minute, yield_pct, pareto, gaps = results
        assert sum(r[2] for r in per_minute) == 200
        assert yield_pct == [("line8", pytest.approx(100 * (200 - fails) / 200, abs=0.01))]
        assert sum(r[1] for r in pareto) == fails and gaps == []
        doc = (repo / "docs/integration.md").read_text()
        documented = [block.split("```", 1)[0] for block in doc.split("```sql\n")[1:]]
        assert len(documented) == 2
        shift = conn.execute(documented[0])  # a fixed shift: rows or none, depending on today's date
        assert [c.name for c in shift.description or []] == ["station", "passed", "failed", "yield_pct"]
        doc_pareto = conn.execute(documented[1]).fetchall()
        assert sum(r[1] for r in doc_pareto) == fails and doc_pareto[-1][2] == 100


def test_a_spool_left_by_a_stopped_recorder_is_drained_by_the_next_one(pg: PgServer, db_url: str,
                                                                       tmp_path: Path) -> None:
    from station.tools.plantsim import SimStation

    endpoint, spool = free_endpoint(), tmp_path / "spool"
    sim = SimStation(endpoint, "line6", rate=200, count=0)
    pg.stop()
    rec = recorder([endpoint], db_url, "--spool", str(spool))
    try:
        assert sim.publisher.wait_for_subscribers(1, 30) == 1
        _publish(sim, 60)
        until("spooled", lambda: sum(len(p.read_text().splitlines()) for p in spool.glob("segment-*.jsonl")) == 60,
              [rec], 60)
        stop_bridge(rec, "mes_recorder_stopped")
        pg.start()
        rec = recorder([endpoint], db_url, "--spool", str(spool))
        until("drained", lambda: len(stored_keys(db_url)) == 60, [rec], 60)
        _publish(sim, 10)
        until("live again", lambda: len(stored_keys(db_url)) == 70, [rec])
        stop_bridge(rec, "mes_recorder_stopped")
    finally:
        rec.kill()
        sim.close()
        pg.ensure_running()
    assert stored_keys(db_url) == published_keys(sim.published)
    assert rows(db_url, "SELECT count(*) FROM gaps") == [(0,)] and not list(spool.glob("segment-*.jsonl"))


def test_spool_and_metrics_are_refused_for_an_sqlite_file(tmp_path: Path) -> None:
    proc = run_station("bridge", "mes", "--connect", free_endpoint(), "--db", str(tmp_path / "m.sqlite"),
                       "--spool", str(tmp_path / "spool"))
    assert proc.returncode == 2 and "--spool and --metrics need --db postgresql://" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.sqlite").exists()


def test_plantsim_reports_every_row_written(db_url: str) -> None:
    proc = run_station("plantsim", "--db", db_url, "--stations", "3", "--rate", "60", "--count", "60", "--json",
                       timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["published"] == report["rows_written"] == 180 and report["gaps"] == 0
    assert report["lag_p99_ms"] > 0 and report["recorder_cpu_percent"] > 0
    assert rows(db_url, "SELECT count(DISTINCT station) FROM verdicts") == [(3,)]
