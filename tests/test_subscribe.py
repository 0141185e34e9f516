"""`station subscribe` warns on seq gaps and on a new run_id (a restarted station)."""

from __future__ import annotations

import json
import subprocess

import zmq

from tests.conftest import free_endpoint, station_cmd


def test_subscribe_reports_gaps_and_restarts() -> None:
    endpoint = free_endpoint()
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.XPUB)
    pub.bind(endpoint)
    proc = subprocess.Popen(station_cmd("subscribe", "--connect", endpoint, "--count", "4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert pub.poll(30_000), "subscriber never subscribed"
        pub.recv()
        for run_id, seq in [("r1", 0), ("r1", 1), ("r1", 4), ("r2", 0)]:
            msg = {"run_id": run_id, "seq": seq, "verdict": "pass", "frame_id": f"{seq}.png", "reasons": [],
                   "class": {"label": "good", "confidence": 0.9}, "anomaly": {"score": 0.1, "threshold": 0.2},
                   "latency_ms": {"total": 3.0}, "error": None}
            pub.send_multipart([b"verdict.x", json.dumps(msg).encode()])
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        pub.close(0)
    assert proc.returncode == 0
    assert len(out.splitlines()) == 4
    assert "seq gap: expected 2, got 4 (2 verdicts missed)" in err
    assert "new run_id r2" in err
