"""The reject archive: what it writes for a failed bottle, and retention by count, bytes, age and free disk."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.core.bundle import load_bundle
from station.core.pipeline import Pipeline
from station.core.verdict import Verdict
from station.service.archive import RejectArchive
from station.service.config import ArchiveConfig
from station.sources.folder import load_frame


@pytest.fixture(scope="module")
def fails(bundle: Path, eval_root: Path) -> list[tuple[Verdict, dict[str, object]]]:
    """Real failed verdicts (defective bottles through the real pipeline) with their messages."""
    images = [p for cls in ("broken_large", "contamination") for p in sorted((eval_root / cls).iterdir())]
    # The tiny bundle's threshold comes from a handful of calibration images and sits high; a threshold
    # below most of these defects' scores makes them real anomaly fails with real maps and regions.
    scoring = Pipeline(load_bundle(bundle))
    scores = [scoring.process(load_frame(p, 0, eval_root, "test", None)).decision for p in images]
    threshold = float(np.percentile([d.anomaly_score for d in scores if d is not None], 20))
    pipeline = Pipeline(load_bundle(bundle), anomaly_threshold=threshold)
    out = []
    for seq, path in enumerate(images):
        verdict = pipeline.process(load_frame(path, seq, eval_root, "test", None))
        if verdict.verdict == "fail":
            out.append((verdict, verdict.to_message("cam1", "run", seq, time.time())))
    assert len(out) >= 4
    return out


def _archive(tmp_path: Path, **limits: float) -> RejectArchive:
    archive = RejectArchive(ArchiveConfig.model_validate({"path": str(tmp_path / "rejects"), "min_free_bytes": 0,
                                                          **limits}), 900, 1.08)
    archive.start()
    return archive


def _sidecars(root: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*.json"))]


def test_each_fail_gets_image_overlay_and_sidecar(fails: list[tuple[Verdict, dict[str, object]]],
                                                 tmp_path: Path) -> None:
    archive = _archive(tmp_path)
    for verdict, message in fails:
        archive(verdict, message)
    archive.close()
    sidecars = _sidecars(archive.root)
    assert sorted(s["seq"] for s in sidecars) == sorted(m["seq"] for _, m in fails)  # type: ignore[type-var]
    for sidecar in archive.root.glob("*/*.json"):
        stem = sidecar.with_suffix("")
        image = cv2.imread(str(stem) + ".jpg")
        overlay = cv2.imread(str(stem) + ".overlay.jpg")
        assert image is not None and image.shape == (900, 900, 3)
        assert overlay is not None and overlay.shape == (900, 900, 3)
        assert (overlay != image).any(), "the overlay draws the anomaly map over the bottle"
    assert archive.snapshot()["archived"] == len(fails)


def test_passes_are_not_archived_and_unreadable_frames_keep_their_sidecar(
        bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    pipeline = Pipeline(load_bundle(bundle))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not an image")
    verdict = pipeline.process(load_frame(corrupt, 0, tmp_path, "test", None))
    assert verdict.verdict == "fail" and verdict.error is not None
    archive = _archive(tmp_path)
    archive(verdict, verdict.to_message("cam1", "run", 0, time.time()))
    good = pipeline.process(load_frame(next((eval_root / "good").iterdir()), 1, eval_root, "test", None))
    good.verdict = "pass"  # whatever the tiny model says, a pass is never archived
    archive(good, good.to_message("cam1", "run", 1, time.time()))
    archive.close()
    files = sorted(p.name.split(".", 1)[1] for p in archive.root.glob("*/*"))
    assert files == ["json"]
    assert _sidecars(archive.root)[0]["error"] == {"reason": "unreadable_image", "detail": verdict.error["detail"]}


def test_retention_by_count_keeps_the_newest(fails: list[tuple[Verdict, dict[str, object]]],
                                             tmp_path: Path) -> None:
    archive = _archive(tmp_path, max_count=2)
    for verdict, message in fails:
        archive(verdict, message)
    archive.close()
    assert sorted(s["seq"] for s in _sidecars(archive.root)) == sorted(m["seq"] for _, m in fails)[-2:]  # type: ignore[type-var]
    assert archive.snapshot()["pruned"] == len(fails) - 2


def test_retention_by_bytes(fails: list[tuple[Verdict, dict[str, object]]], tmp_path: Path) -> None:
    archive = _archive(tmp_path, max_bytes=1_000_000)
    for verdict, message in fails * 3:
        archive(verdict, message)
    archive.close()
    on_disk = sum(p.stat().st_size for p in archive.root.glob("*/*"))
    assert 0 < on_disk <= 1_000_000
    assert archive.snapshot()["bytes"] == on_disk and archive.snapshot()["pruned"] > 0


def test_retention_by_age_includes_earlier_runs_and_crash_leftovers(
        fails: list[tuple[Verdict, dict[str, object]]], tmp_path: Path) -> None:
    old_day = tmp_path / "rejects" / "2026-01-02"
    old_day.mkdir(parents=True)
    month_ago = time.time() - 31 * 86400
    for suffix in (".jpg", ".json"):
        path = old_day / f"101010_00000007_old{suffix}"
        path.write_bytes(b"x" * 100)
        os.utime(path, (month_ago, month_ago))
    (old_day / "121212_00000009_cut.jpg.tmp").write_bytes(b"half")
    archive = _archive(tmp_path, max_age_days=30)
    assert archive.snapshot()["files"] == 1, "the earlier run's entry is indexed, the torn write is gone"
    verdict, message = fails[0]
    archive(verdict, message)
    archive.close()
    assert not old_day.exists(), "the month-old entry and its emptied day folder were removed"
    assert [s["seq"] for s in _sidecars(archive.root)] == [message["seq"]]


def test_never_writes_into_a_nearly_full_disk(fails: list[tuple[Verdict, dict[str, object]]],
                                             tmp_path: Path) -> None:
    archive = _archive(tmp_path, min_free_bytes=10**18)  # more than any disk has free
    for verdict, message in fails:
        archive(verdict, message)
    archive.close()
    assert list(archive.root.glob("*/*")) == []
    assert archive.snapshot()["skipped_low_disk"] == len(fails)
