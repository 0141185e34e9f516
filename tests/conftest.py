"""Shared fixtures: a small synthetic data set and a bundle trained on it, made once per run.

Everything goes through the real `station` command, as a user would run it. Under pytest-xdist
(`-n N`) the workers share one copy: the first to need it builds it under a file lock, the others wait
and reuse it, so the tiny bundle is trained once per run, not once per worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from filelock import FileLock

BIN = Path(sys.executable).parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # More workers than cores: torch's OpenMP threads, idle, would spin for the CPU the other workers' station
    # processes need (measured: -n 3 on 2 cores took half the CPU time and half the wall time with PASSIVE).
    # How idle threads wait changes no result. Set before any test module imports torch; inherited by
    # every `station` subprocess.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def station_cmd(*args: str) -> list[str]:
    exe = BIN / "station"
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "station.cli", *args]


def run_station(*args: str, timeout: float = 600, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(station_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def start_bridge(kind: str, endpoint: str, *args: str) -> subprocess.Popen[str]:
    """`station bridge KIND --connect ENDPOINT ARGS…` as a process, output captured."""
    return subprocess.Popen(station_cmd("bridge", kind, "--connect", endpoint, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop_bridge(bridge: subprocess.Popen[str], stopped_event: str) -> str:
    """SIGTERM: the bridge exits 0 and logs ``stopped_event``; returns its stderr."""
    bridge.send_signal(signal.SIGTERM)
    _, err = bridge.communicate(timeout=30)
    assert bridge.returncode == 0, err[-3000:]
    assert stopped_event in err
    return err


#: Rough seconds a test costs, to hand the longest files out first (below); a slow test is several
#: times the typical subprocess round trip.
SLOW_COST, TEST_COST = 30, 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (deploy/test.sh: --dist loadfile --no-loadscope-reorder), files in falling estimated cost:
    a long file handed out last would leave the other workers idle at the end. Every worker sorts the
    same collection the same way, as xdist requires; a file's own order is kept (the sort is stable)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    cost: dict[Path, int] = {}
    for item in items:
        cost[item.path] = cost.get(item.path, 0) + (SLOW_COST if item.get_closest_marker("slow") else TEST_COST)
    items.sort(key=lambda item: -cost[item.path])


def shared_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """``make(out)`` once per run, in a folder every xdist worker of the run sees; returns ``out``.

    The lock serialises the builders; the ``.done`` stamp, written only after ``make`` returned, is what
    a later worker trusts, so a build that failed half-way is redone (and fails again, visibly) rather
    than reused."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # each worker's basetemp is <run's basetemp>/popen-gwN
    out, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with FileLock(str(base / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out)
            done.touch()
    return out


def _check(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = shared_once(tmp_path_factory, "synth", lambda out: _check(run_station(
        "synth", "--out", str(out), "--seed", "7", "--train-good", "16", "--test-per-class", "5")))
    return out / "bottle"


@pytest.fixture(scope="session")
def bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = shared_once(tmp_path_factory, "models", lambda out: _check(run_station(
        "train", "--data", str(synth_root), "--out", str(out / "tiny"), "--epochs", "2", "--ae-steps", "20",
        "--seed", "1")))
    return out / "tiny"


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An independent labelled set (another seed), as the README's demo replays."""
    out = shared_once(tmp_path_factory, "eval", lambda out: _check(run_station(
        "synth", "--out", str(out), "--seed", "99", "--train-good", "0", "--test-per-class", "3")))
    return out / "bottle" / "test"


@pytest.fixture()
def replay_folder(eval_root: Path, tmp_path: Path) -> Iterator[Path]:
    """A labelled folder with one corrupt file in it."""
    folder = tmp_path / "replay"
    shutil.copytree(eval_root, folder)
    (folder / "good" / "999_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    yield folder
