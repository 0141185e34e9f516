"""A real `station run` process with a subscriber that records everything it publishes."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from station.service.publish import Subscriber
from station.service.security import ClientKeys
from tests.conftest import free_endpoint, station_cmd

Message = dict[str, Any]


class StationProcess:
    def __init__(self, tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None,
                 station_id: str = "cam1", curve: ClientKeys | None = None, prefix: list[str] | None = None) -> None:
        self.endpoint = free_endpoint()
        config = {"station_id": station_id, **config}
        config.setdefault("publish", {})
        config["publish"] = {"endpoint": self.endpoint, "heartbeat_interval_s": 0.2, **config["publish"]}
        self.config_path = tmp_path / "station.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.verdicts: list[Message] = []
        self.heartbeats: list[Message] = []
        self._cond = threading.Condition()
        self._closed = threading.Event()
        self.sub = Subscriber(self.endpoint, station=station_id, curve=curve)
        self.proc = subprocess.Popen([*(prefix or []), *station_cmd("run", "--config", str(self.config_path))],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            item = self.sub.receive(0.2)
            if item is None or item.topic.startswith("welcome."):
                continue
            with self._cond:
                (self.verdicts if item.topic.startswith("verdict.") else self.heartbeats).append(item.message)
                self._cond.notify_all()

    def wait(self, what: str, predicate: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        exited_at: float | None = None
        with self._cond:
            while not predicate():
                if exited_at is None and self.proc.poll() is not None:
                    exited_at = time.monotonic()  # what it sent before exiting may still be on its way
                left = min(deadline, exited_at + 2.0 if exited_at is not None else deadline) - time.monotonic()
                if left <= 0:
                    exited = self.proc.poll() is not None and self.proc.stderr and not self.proc.stderr.closed
                    err = self.proc.stderr.read() if exited and self.proc.stderr else ""
                    raise AssertionError(f"timed out waiting for {what}; last heartbeat "
                                         f"{self.heartbeats[-1:]}; station stderr: {err[-3000:]}")
                self._cond.wait(min(left, 0.5))

    def wait_verdicts(self, n: int, timeout_s: float = 60) -> list[Message]:
        self.wait(f"{n} verdicts", lambda: len(self.verdicts) >= n, timeout_s)
        with self._cond:
            return list(self.verdicts)

    def wait_heartbeat(self, predicate: Callable[[Message], bool], timeout_s: float = 60) -> Message:
        start = len(self.heartbeats)
        found: list[Message] = []

        def seen() -> bool:
            found[:] = [h for h in self.heartbeats[start:] if predicate(h)]
            return bool(found)

        self.wait("a matching heartbeat", seen, timeout_s)
        return found[0]

    def stopped_heartbeat(self, timeout_s: float = 60) -> Message:
        """The ``stopped`` heartbeat, received already or still to come."""
        def stopped() -> list[Message]:
            return [h for h in self.heartbeats if h["state"] == "stopped"]

        self.wait("the stopped heartbeat", lambda: bool(stopped()), timeout_s)
        return stopped()[0]

    def terminate(self, timeout_s: float = 60) -> tuple[int, Message, str]:
        """SIGTERM; wait for the final ``stopped`` heartbeat and the exit; return (rc, stopped, stderr)."""
        self.proc.send_signal(signal.SIGTERM)
        stopped = self.wait_heartbeat(lambda h: h["state"] == "stopped", timeout_s)
        _, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, stopped, err

    def close(self) -> None:
        self._closed.set()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self._reader.join()
        self.sub.close()


def scrape_metrics(port: int) -> dict[str, float]:
    """The station's Prometheus endpoint as {series with labels: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
