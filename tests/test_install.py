"""deploy/install.sh staged into a temporary root with DESTDIR, as a package build would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from station.service.config import load_config

REPO = Path(__file__).parents[1]


def _install(dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "deploy" / "install.sh"), "--extras", "", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "DESTDIR": str(dest)})


@pytest.mark.slow
def test_destdir_install_is_complete_relocated_and_torch_free(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "root"
    proc = _install(dest, "--prefix", "/srv/station", "--bundle", str(bundle), "--gpu")
    assert proc.returncode == 0, proc.stderr
    venv = dest / "srv/station/venv"
    # Scripts name the installed path, not the staging root.
    assert (venv / "bin/station").read_text().splitlines()[0] == "#!/srv/station/venv/bin/python"
    staged = subprocess.run(["grep", "-rlI", str(dest), str(venv / "bin"), str(venv / "pyvenv.cfg")],
                            capture_output=True, text=True)
    assert staged.stdout == ""
    # The service venv serves without torch (the train extra is not installed).
    check = subprocess.run([str(venv / "bin/python"), "-c",
                            "import importlib.util, station.cli, station.service.daemon, station.service.prometheus;"
                            "print(importlib.util.find_spec('torch') is None)"],
                           capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == "True", check.stderr
    assert (dest / "srv/station/models/current/manifest.yaml").is_file()
    for unit in ("station.service", "station@.service"):
        text = (dest / "etc/systemd/system" / unit).read_text()
        assert "ExecStart=/srv/station/venv/bin/station run" in text and "/opt/station" not in text
        # --gpu: the drop-in that opens the GPU's device nodes and lets engines be built into the bundle
        gpu = (dest / "etc/systemd/system" / f"{unit}.d" / "gpu.conf").read_text()
        assert "ReadWritePaths=/srv/station/models" in gpu and "DeviceAllow=/dev/nvidiactl rw" in gpu
    # The shipped config is valid as installed and points at the installed bundle.
    config = dest / "etc/station/station.yaml"
    assert load_config(config).model == Path("/srv/station/models/current")
    # A second install keeps the operator's edits.
    config.write_text(config.read_text().replace("line1-cam1", "edited"))
    again = _install(dest, "--prefix", "/srv/station")
    assert again.returncode == 0, again.stderr
    assert "keeping the existing" in again.stdout
    assert load_config(config).station_id == "edited"


def test_rejects_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    proc = _install(tmp_path / "root", "--bundle", str(tmp_path))
    assert proc.returncode == 2
    assert "not a model bundle" in proc.stderr
    assert not (tmp_path / "root").exists(), "nothing is staged when the arguments are wrong"


def test_engines_are_never_built_into_a_staging_root(bundle: Path, tmp_path: Path) -> None:
    proc = _install(tmp_path / "root", "--bundle", str(bundle), "--build-engines", "fp16")
    assert proc.returncode == 2
    assert "engines are built for one GPU" in proc.stderr
    assert not (tmp_path / "root").exists()
