"""station.core.atomic: a reader sees the old file or the new one, and a failed write leaves the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from station.core.atomic import atomic_path, swap_in_dir, write_bytes_atomic, write_text_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "manifest.yaml"
    target.write_text("old")
    write_text_atomic(target, "new ✓", fsync=True)
    assert target.read_text(encoding="utf-8") == "new ✓"
    write_bytes_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.yaml"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old model")
    with pytest.raises(RuntimeError, match="converter broke"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a mod")
        assert tmp.parent == target.parent and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        raise RuntimeError("converter broke")
    assert target.read_bytes() == b"old model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_swap_in_dir_replaces_a_folder_whole(tmp_path: Path) -> None:
    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.onnx").write_bytes(b"old")
    staging = tmp_path / ".bundle.partial"
    staging.mkdir()
    (staging / "new.onnx").write_bytes(b"new")
    swap_in_dir(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # neither staging nor the old one left
    fresh = tmp_path / ".fresh"
    fresh.mkdir()
    swap_in_dir(fresh, tmp_path / "absent")
    assert (tmp_path / "absent").is_dir() and not fresh.exists()
