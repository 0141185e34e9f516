"""The serving path must import and run with torch unavailable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCK = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'onnx'):\n"
    "    sys.modules[name] = None  # makes `import torch` raise ImportError\n"
    "from station.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
    "sys.exit(rc)\n"
)


def test_replay_runs_without_torch(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "v.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, "replay", "--model", str(bundle), "--source", str(eval_root), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(verdicts) == sum(1 for p in eval_root.rglob("*") if p.is_file())
    assert all(v["class"] is not None for v in verdicts)


def test_calibrate_refits_the_map_classifier_without_torch(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    """A line calibrates on the station's own machine, which has no torch."""
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, "calibrate", "--model", str(copy), "--good", str(eval_root / "good")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "map classifier refitted" in proc.stdout


def test_train_without_torch_names_the_extra(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK, "train", "--data", str(tmp_path), "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "station[train]" in proc.stderr
    assert "Traceback" not in proc.stderr
