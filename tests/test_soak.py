"""The soak, short: `station soak` runs frames through the daemon to an outside subscriber process.
(The long run, 100 000 frames, is a command: docs/reliability.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_station


@pytest.mark.slow
def test_short_soak_loses_nothing_and_holds_memory(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = run_station("soak", "--model", str(bundle), "--frames", "1200", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["captured"] == r["published"] == r["received"] == 1200
    assert r["gaps"] == 0 and r["missed"] == 0
    assert r["rss_growth"] < 0.05 and r["ok"] is True
    assert "soak: OK" in proc.stdout


def test_the_soak_counts_what_the_subscriber_printed_as_verdict_messages() -> None:
    from station.contract.messages import encode
    from station.tools.soak import count_received

    def line(seq: int) -> str:
        return encode({"schema": "station.verdict/1", "station": "soak", "run_id": "r", "seq": seq, "frame_id": "f",
                       "source": "memory", "captured_at": "2026-12-02T05:00:00.000Z", "trigger": None,
                       "published_at": "2026-12-02T05:00:00.001Z", "verdict": "pass", "reasons": [],
                       "class": None, "anomaly": None, "error": None, "latency_ms": {},
                       "model": {"name": "t", "version": "1"}, "truth": None}).decode()

    assert count_received([line(0), line(1), line(2)]) == (3, 0, 0)
    # seq 3 printed but not a verdict message (a field gone), seq 4 and 5 never printed: one gap of three
    broken = json.loads(line(3))
    del broken["frame_id"]
    assert count_received([line(0), line(1), line(2), json.dumps(broken), line(6)]) == (4, 1, 3)
