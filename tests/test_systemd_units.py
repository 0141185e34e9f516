"""The unit files pass systemd-analyze verify (no output at all) and security (exposure ≤ 3.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).parents[1] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


def _install(tmp_path: Path, name: str) -> Path:
    """The unit as shipped, with ExecStart pointing at this checkout's `station` so verify can check it."""
    station = Path(sys.executable).parent / "station"
    text = (UNITS / name).read_text().replace("/opt/station/venv/bin/station", str(station))
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("unit", "instance"), [("station.service", "station.service"),
                                                ("station@.service", "station@cam1.service"),
                                                ("station-ui.service", "station-ui.service")])
def test_verify_prints_nothing(tmp_path: Path, unit: str, instance: str) -> None:
    _install(tmp_path, unit)
    # verify exits 0 on unknown keys and bad values and only warns: any output is a failure.
    proc = subprocess.run([str(ANALYZE), "verify", str(tmp_path / instance)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""


@pytest.mark.parametrize(("unit", "instance"), [("station.service", "station.service"),
                                                ("station@.service", "station@cam1.service"),
                                                ("station-ui.service", "station-ui.service")])
def test_security_exposure_at_most_3(tmp_path: Path, unit: str, instance: str) -> None:
    _install(tmp_path, unit)
    proc = subprocess.run([str(ANALYZE), "security", "--offline=true", str(tmp_path / instance)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout[-500:] + proc.stderr
    assert float(match.group(1)) <= 3.0


def test_units_are_notify_with_watchdog_and_reload() -> None:
    for name in ("station.service", "station@.service"):
        text = (UNITS / name).read_text()
        assert "Type=notify" in text and "WatchdogSec=" in text
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text


@pytest.mark.parametrize("unit", ["station.service", "station@.service"])
def test_gpu_drop_in_verifies_and_keeps_exposure_at_most_3(tmp_path: Path, unit: str) -> None:
    _install(tmp_path, unit)
    (tmp_path / f"{unit}.d").mkdir()
    (tmp_path / f"{unit}.d" / "gpu.conf").write_text((UNITS / "gpu" / "gpu.conf").read_text())
    instance = "station@cam1.service" if "@" in unit else unit
    # Drop-ins are read from the unit search path, so the folder goes on it (the trailing ':' keeps the defaults).
    env = {"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"}
    verify = subprocess.run([str(ANALYZE), "verify", instance], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=60)
    assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == ""
    security = subprocess.run([str(ANALYZE), "security", "--offline=true", instance], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=60)
    assert "/dev/nvidiactl:rw" in security.stdout, "the drop-in was not read"
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert match and float(match.group(1)) <= 3.0
