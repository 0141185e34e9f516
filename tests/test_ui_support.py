"""Shared by the test_ui*.py files (no tests here): a `station ui` process, a browser, synthetic verdicts."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from station.core.anomaly import Region
from station.core.decide import Decision
from station.core.frame import Frame
from station.core.verdict import Verdict
from tests.conftest import station_cmd

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "review-token-for-tests-0123"
CLASSES = ("good", "broken_large", "broken_small", "contamination")
#: STATION_UI_SCREENSHOTS=1 rewrites docs/img/ui-*.png from the test run (off in CI, so the tree stays clean)
SCREENSHOTS = os.environ.get("STATION_UI_SCREENSHOTS") == "1"
DOCS_IMG = Path(__file__).parents[1] / "docs" / "img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UiProcess:
    """`station ui` as a process on 127.0.0.1; ``request`` speaks raw HTTP (no client-side path clean-up)."""

    def __init__(self, endpoint: str, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(station_cmd("ui", "--connect", endpoint, "--listen", f"127.0.0.1:{self.port}",
                                                 *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.request("GET", "/api/summary")[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _, err = self.proc.communicate(timeout=10) if self.proc.poll() is not None else ("", "")
                self.proc.kill()
                raise AssertionError(f"station ui did not come up: {err[-2000:]}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()

    def get_json(self, path: str) -> Any:
        status, body, _ = self.request("GET", path)
        assert status == 200, body[:500]
        return json.loads(body)

    def review(self, entry_id: str, outcome: str | None, true_class: str | None = None,
               token: str = TOKEN) -> tuple[int, Any]:
        status, body, _ = self.request("POST", f"/api/reviews/{entry_id}",
                                       {"outcome": outcome, "true_class": true_class},
                                       {"Content-Type": "application/json", "X-Review-Token": token,
                                        "Origin": self.base, "Sec-Fetch-Site": "same-origin"})
        return status, json.loads(body)

    def wait(self, what: str, predicate: Any, timeout_s: float = 30) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            summary = self.get_json("/api/summary")
            if predicate(summary):
                return summary
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; summary: {json.dumps(summary)[:2000]}")
            time.sleep(0.1)

    def stop(self) -> str:
        """SIGTERM: the page's server exits 0; returns its stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err[-3000:]
        return err

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def launch_browser(playwright: Any) -> Any:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (deploy/test.sh installs it)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def token_file(folder: Path) -> Path:
    path = folder / "review.token"
    path.write_text(TOKEN + "\n")
    return path


def fake_verdict(seq: int, label: str = "good", score: float = 0.01, threshold: float = 0.05,
                 confidence: float = 0.9) -> Verdict:
    """A verdict as the pipeline makes one (for a publisher in the test process), decided as the station decides."""
    scores = {c: (1 - confidence) / (len(CLASSES) - 1) for c in CLASSES}
    scores[label] = confidence
    reasons = (["defect_class"] if label != "good" and confidence >= 0.5 else []) + (["anomaly"] if score > threshold
                                                                                     else [])
    decision = Decision("fail" if reasons else "pass", reasons, label, confidence, scores, score,
                        Region((100, 120, 40, 30) if "anomaly" in reasons else None, 900, 0.001))
    frame = Frame(seq=seq, frame_id=f"{label}/{seq:03d}.png", source="test", captured_at=time.time(),
                  captured_mono=time.monotonic())
    return Verdict(frame=frame, verdict=decision.verdict, reasons=reasons, model={"name": "t", "version": "1"},
                   decision=decision, threshold=threshold, latency_ms={"total": 10.0 + seq})
