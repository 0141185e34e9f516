"""The soak, short: `station soak` runs frames through the daemon to an outside subscriber process.
(The long run, 100 000 frames, is a command: docs/reliability.md.)"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_station


def test_short_soak_loses_nothing_and_holds_memory(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = run_station("soak", "--model", str(bundle), "--frames", "1200", "--json", str(out), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["captured"] == r["published"] == r["received"] == 1200
    assert r["gaps"] == 0 and r["missed"] == 0
    assert r["rss_growth"] < 0.05 and r["ok"] is True
    assert "soak: OK" in proc.stdout
