"""The MES recorder: every verdict in SQLite, gaps recorded across a recorder restart, and the query command."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import free_endpoint, run_station, start_bridge, stop_bridge
from tests.stationproc import StationProcess
from tests.test_verdict_stream import _drop


def _recorder(endpoint: str, db: Path) -> subprocess.Popen[str]:
    return start_bridge("mes", endpoint, "--db", str(db))


def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as con:
        try:
            return con.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the recorder has not created its tables yet
            return []


def _until(what: str, predicate: Callable[[], bool], proc: subprocess.Popen[str], timeout_s: float = 60) -> None:
    # SQLite gives no change notification to another process: poll, with a deadline.
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert proc.poll() is None, f"recorder exited: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_recorder_keeps_every_verdict_of_a_replay(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    endpoint, db, out = free_endpoint(), tmp_path / "mes.sqlite", tmp_path / "v.jsonl"
    recorder = _recorder(endpoint, db)
    try:
        replay = run_station("replay", "--model", str(bundle), "--source", str(eval_root), "--publish", endpoint,
                             "--wait-subscribers", "1", "--station-id", "line1", "--out", str(out))
        assert replay.returncode == 0, replay.stderr
        published = [json.loads(line) for line in out.read_text().splitlines()]
        _until("every verdict", lambda: len(_rows(db, "SELECT seq FROM verdicts")) == len(published), recorder)
        stop_bridge(recorder, "mes_recorder_stopped")
    finally:
        recorder.kill()
    stored = _rows(db, "SELECT seq, verdict, frame_id, message FROM verdicts ORDER BY seq")
    assert [(s, v, f) for s, v, f, _ in stored] == [(m["seq"], m["verdict"], m["frame_id"]) for m in published]
    assert json.loads(str(stored[-1][3])) == published[-1]
    assert _rows(db, "SELECT * FROM gaps") == []

    fails = run_station("mes-query", "--db", str(db), "--verdict", "fail", "--json")
    assert fails.returncode == 0, fails.stderr
    assert [json.loads(line)["seq"] for line in fails.stdout.splitlines()] == \
        [m["seq"] for m in published if m["verdict"] == "fail"]
    summary = run_station("mes-query", "--db", str(db), "--summary", "--json")
    counts = {row["verdict"]: row["count"] for row in map(json.loads, summary.stdout.splitlines())}
    assert sum(counts.values()) == len(published) and counts.get("fail") == len(fails.stdout.splitlines())


def test_verdicts_missed_while_the_recorder_was_down_are_recorded_as_a_gap(bundle: Path, eval_root: Path,
                                                                           tmp_path: Path) -> None:
    incoming, db = tmp_path / "incoming", tmp_path / "mes.sqlite"
    incoming.mkdir()
    station = StationProcess(tmp_path, {"model": str(bundle),
                                        "source": {"path": str(incoming), "poll_interval_s": 0.05}})
    recorder = _recorder(station.endpoint, db)
    try:
        station.wait_heartbeat(lambda h: h["state"] == "running")
        images = sorted((eval_root / "good").iterdir())
        _drop(images[:1], incoming)
        _until("seq 0", lambda: _rows(db, "SELECT seq FROM verdicts") == [(0,)], recorder)
        recorder.kill()  # SIGKILL: no goodbye, as in a power cut
        recorder.wait()
        _drop(images[1:3], incoming, start=1)
        station.wait_verdicts(3)
        recorder = _recorder(station.endpoint, db)
        # The welcome brings seq 2 (the last verdict), so seq 1 is known missing.
        _until("seq 2", lambda: len(_rows(db, "SELECT seq FROM verdicts")) == 2, recorder)
        assert _rows(db, "SELECT first_seq, last_seq, missed FROM gaps") == [(1, 1, 1)]
        gaps = run_station("mes-query", "--db", str(db), "--gaps", "--json")
        assert gaps.returncode == 0
        (gap,) = [json.loads(line) for line in gaps.stdout.splitlines()]
        assert gap["station"] == "cam1" and gap["missed"] == 1
        station.terminate()
    finally:
        recorder.kill()
        station.close()


def test_query_of_a_missing_database_exits_2(tmp_path: Path) -> None:
    proc = run_station("mes-query", "--db", str(tmp_path / "nope.sqlite"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_a_restart_of_a_recorded_station_is_expected_from_seq_0(tmp_path: Path) -> None:
    from station.bridges.mes import Recorder, open_db

    db = open_db(tmp_path / "mes.sqlite", create=True)
    recorder = Recorder(db)
    # Joined the station's first run mid-way: that is where recording starts, no gap.
    for seq in (5, 6, 7):
        recorder.record({"station": "a", "run_id": "r1", "seq": seq, "verdict": "pass"})
    # The station restarted while the recorder was away; the first verdict it hears of is seq 56.
    recorder.record({"station": "a", "run_id": "r2", "seq": 56, "verdict": "fail"})
    assert db.execute("SELECT run_id, first_seq, last_seq, missed FROM gaps").fetchall() == [("r2", 0, 55, 56)]
    assert recorder.record({"station": "a", "run_id": "r2", "seq": "x", "verdict": "pass"}) is False
    db.close()


def _query_count(db: Path, *args: str) -> int:
    proc = run_station("mes-query", "--db", str(db), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return len(proc.stdout.splitlines())


def test_query_time_bounds_compare_as_instants_whatever_their_form(tmp_path: Path) -> None:
    from station.bridges.mes import Recorder, open_db

    path = tmp_path / "mes.sqlite"
    db = open_db(path, create=True)
    recorder = Recorder(db)
    # 60 verdicts from 04:13:10.500Z, one every 100 ms; one stamped by a producer with another offset.
    for seq in range(60):
        ms = 10_500 + seq * 100
        stamp = f"2026-12-02T04:13:{ms // 1000:02d}.{ms % 1000:03d}Z"
        if seq == 59:
            stamp = "2026-12-02T05:13:16.400+01:00"
        recorder.record({"station": "a", "run_id": "r1", "seq": seq, "verdict": "pass", "captured_at": stamp})
    db.close()
    # At or after 04:13:13 are seq 25…59: 35 rows, however the bound is written.
    for since in ("2026-12-02T04:13:13Z", "2026-12-02T04:13:13.000Z", "2026-12-02T05:13:13+01:00",
                  "2026-12-02T04:13:13", "2026-12-02 04:13:13.000+00:00", "2026-12-01T23:13:13-05:00"):
        assert _query_count(path, "--since", since) == 35, since
    # Before 04:13:13.05 are seq 0…25 (25 is 04:13:13.000): sub-millisecond bounds round up correctly.
    assert _query_count(path, "--until", "2026-12-02T05:13:13.0005+01:00") == 26
    assert _query_count(path, "--until", "2026-12-02T04:13:13Z") == 25
    assert _query_count(path, "--since", "2026-12-02", "--until", "2026-12-03") == 60
    assert _query_count(path, "--since", "2026-12-02T04:13:16.4Z") == 1  # the one stored from +01:00


def test_query_refuses_a_bound_that_is_not_a_time_naming_the_accepted_forms(tmp_path: Path) -> None:
    from station.bridges.mes import open_db

    path = tmp_path / "mes.sqlite"
    open_db(path, create=True).close()
    for bad in ("yesterday", "12/02/2026", "2026-13-01T00:00:00Z", ""):
        proc = run_station("mes-query", "--db", str(path), "--since", bad)
        assert proc.returncode == 2, (bad, proc.stderr)
        assert "is not an ISO-8601 time" in proc.stderr and "2026-12-02T05:00:00Z" in proc.stderr, proc.stderr
    proc = run_station("mes-query", "--db", str(path), "--until", "tomorrow")
    assert proc.returncode == 2 and "--until" in proc.stderr
