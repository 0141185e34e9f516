"""Synthetic bottles: deterministic, MVTec layout, defects only where their masks say."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from station.mvtec import BOTTLE_CLASSES
from station.synth import render_bottle, write_dataset


def test_deterministic_per_seed() -> None:
    a, ma = render_bottle(np.random.default_rng([1, 2]), "broken_small")
    b, mb = render_bottle(np.random.default_rng([1, 2]), "broken_small")
    c, _ = render_bottle(np.random.default_rng([1, 3]), "broken_small")
    assert np.array_equal(a, b) and ma is not None and mb is not None and np.array_equal(ma, mb)
    assert not np.array_equal(a, c)


def test_defect_changes_pixels_inside_its_mask_only() -> None:
    for defect in ("broken_large", "broken_small", "contamination"):
        good, _ = render_bottle(np.random.default_rng(11), None)
        bad, mask = render_bottle(np.random.default_rng(11), defect)
        assert mask is not None and mask.any()
        diff = np.abs(good.astype(int) - bad.astype(int)).sum(axis=2) > 30
        near = cv2.dilate(mask, np.ones((15, 15), np.uint8)) > 0
        assert diff[near].sum() > 0.3 * (mask > 0).sum()
        assert diff[~near].sum() == 0, defect


def test_write_dataset_mvtec_layout(tmp_path: Path) -> None:
    summary = write_dataset(tmp_path, seed=3, train_good=3, test_per_class=2)
    root = tmp_path / "bottle"
    assert summary.root == root
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
    for cls in BOTTLE_CLASSES:
        images = sorted(p.name for p in (root / "test" / cls).iterdir())
        assert images == ["000.png", "001.png"]
        masks = root / "ground_truth" / cls
        if cls == "good":
            assert not masks.exists()
        else:
            assert sorted(p.name for p in masks.iterdir()) == ["000_mask.png", "001_mask.png"]
            m = cv2.imread(str(masks / "000_mask.png"), cv2.IMREAD_GRAYSCALE)
            assert m.shape == (900, 900) and set(np.unique(m)) == {0, 255}
    assert summary.counts == {"train/good": 3, "test/good": 2, "test/broken_large": 2,
                              "test/broken_small": 2, "test/contamination": 2}
    img = cv2.imread(str(root / "test" / "good" / "000.png"))
    assert img.shape == (900, 900, 3)
    # Adding images does not change the ones already there.
    again = tmp_path / "again"
    write_dataset(again, seed=3, train_good=5, test_per_class=1)
    assert (again / "bottle/train/good/001.png").read_bytes() == (root / "train/good/001.png").read_bytes()
