"""Shared fixtures: a small synthetic data set and a bundle trained on it, made once per run.

Everything goes through the real `station` command, as a user would run it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


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


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    proc = run_station("synth", "--out", str(out), "--seed", "7", "--train-good", "16", "--test-per-class", "5")
    assert proc.returncode == 0, proc.stderr
    return out / "bottle"


@pytest.fixture(scope="session")
def bundle(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    proc = run_station("train", "--data", str(synth_root), "--out", str(out), "--epochs", "2", "--ae-steps", "20",
                       "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="session")
def eval_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An independent labelled set (another seed), as the README's demo replays."""
    out = tmp_path_factory.mktemp("eval")
    proc = run_station("synth", "--out", str(out), "--seed", "99", "--train-good", "0", "--test-per-class", "3")
    assert proc.returncode == 0, proc.stderr
    return out / "bottle" / "test"


@pytest.fixture()
def replay_folder(eval_root: Path, tmp_path: Path) -> Iterator[Path]:
    """A labelled folder with one corrupt file in it."""
    folder = tmp_path / "replay"
    shutil.copytree(eval_root, folder)
    (folder / "good" / "999_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    yield folder
