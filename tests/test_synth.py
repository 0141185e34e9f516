"""Synthetic bottles: deterministic, MVTec layout, defects only where their masks say."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from station.core.folders import (
    BOTTLE_CLASSES,
    NOVEL,
    NOVEL_KINDS,
    is_labelled_folder,
    label_of,
    labelled_pool,
    novel_kind,
)
from station.tools.synth import NOVEL_MASK_LEVELS, _draw_scene, render_bottle, render_novel, scene_of, write_dataset
from tests.conftest import run_station


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


def test_ring_small_chips_bite_from_either_edge_and_an_inner_one_shows_the_opening() -> None:
    inner_chips = 0
    for i in range(20):
        stream = [7, 1, 2, i]
        cx, cy, radius = scene_of(np.random.default_rng(stream))
        good, _ = render_bottle(np.random.default_rng(stream), None)
        bad, mask = render_bottle(np.random.default_rng(stream), "broken_small")
        assert mask is not None
        ys, xs = np.nonzero(mask)
        reach = np.hypot(xs - cx, ys - cy) / radius
        if reach.min() > 0.72:  # from the outer edge, as before
            assert reach.max() > 1.0, i
            continue
        inner_chips += 1
        assert reach.max() < 0.95, i  # it does not reach the outer edge
        inside = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
        # Where the lit lip was, the dim inside of the bottle.
        assert _gray(bad)[inside].mean() < _gray(good)[inside].mean() - 40, i
    assert 3 <= inner_chips <= 10  # about 30 %, as in the other styles


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


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", NOVEL_KINDS)
def test_novel_mask_is_exactly_the_changed_pixels_on_the_rim(kind: str) -> None:
    for seed in (11, 12):
        # The same generator without the defect draws the same bottle: render_novel draws the scene first.
        good, _ = render_bottle(np.random.default_rng(seed), None)
        bad, mask = render_novel(np.random.default_rng(seed), kind)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
        diff = np.abs(good.astype(int) - bad.astype(int)).max(axis=2)
        assert np.array_equal(mask > 0, diff > NOVEL_MASK_LEVELS), kind
        # Below the mask's threshold only a faint fringe differs (blur, a soft edge), right beside the defect.
        near = cv2.dilate(mask, np.ones((25, 25), np.uint8)) > 0
        assert not (diff[~near] > 0).any(), kind
        # Small, as the defects the anomaly check must not miss are: tens to ~2000 pixels, ≤ 200 px long.
        area = int((mask > 0).sum())
        ys, xs = np.nonzero(mask)
        assert 20 <= area <= 2500, (kind, area)
        assert max(np.ptp(xs), np.ptp(ys)) <= 200, kind
        # On the glass of the rim (where the trained defects are), not in the opening or the background.
        scene = _draw_scene(np.random.default_rng(seed), 900)
        u = np.hypot(xs - scene.cx, ys - scene.cy) / scene.radius
        assert u.min() > 0.66 and u.max() < 1.01, (kind, u.min(), u.max())


def test_render_novel_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="novel defect"):
        render_novel(np.random.default_rng(0), "dent")


def test_write_dataset_novel_images_masks_and_kinds(tmp_path: Path) -> None:
    summary = write_dataset(tmp_path / "a", seed=3, train_good=1, test_per_class=1, novel=6)
    root = summary.root
    names = sorted(p.name for p in (root / "test" / "novel").iterdir())
    assert names == ["000_crack.png", "001_stain.png", "002_scratch.png", "003_bubble.png", "004_tint.png",
                     "005_crack.png"]
    assert [novel_kind(Path(n)) for n in names[:5]] == list(NOVEL_KINDS)
    masks = sorted(p.name for p in (root / "ground_truth" / "novel").iterdir())
    assert masks == [n.replace(".png", "_mask.png") for n in names]
    assert novel_kind(root / "ground_truth" / "novel" / masks[1]) == "stain"
    assert summary.counts["test/novel"] == 6
    # Each written mask is where the written image differs from its bottle rendered without the defect.
    for i, name in enumerate(names):
        kind = NOVEL_KINDS[i % len(NOVEL_KINDS)]
        good, _ = render_bottle(np.random.default_rng([3, 2, NOVEL_KINDS.index(kind), i]), None)
        image = cv2.imread(str(root / "test" / "novel" / name))
        mask = cv2.imread(str(root / "ground_truth" / "novel" / masks[i]), cv2.IMREAD_GRAYSCALE)
        diff = np.abs(good.astype(int) - image.astype(int)).max(axis=2)
        assert np.array_equal(mask > 0, diff > NOVEL_MASK_LEVELS), name

    # The novel images draw from their own stream: the other files are the same bytes whether novel
    # images are asked for or not, and the same seed gives the same novel images (fewer: a prefix).
    tree = _tree(root)
    plain = _tree(write_dataset(tmp_path / "c", seed=3, train_good=1, test_per_class=1).root)
    assert len(plain) == 1 + 4 + 3 and not any(NOVEL in k for k in plain)
    assert plain == {k: v for k, v in tree.items() if NOVEL not in k}
    fewer = _tree(write_dataset(tmp_path / "d", seed=3, train_good=0, test_per_class=0, novel=2).root)
    assert len(fewer) == 4
    assert fewer == {k: v for k, v in tree.items() if k.split("/")[-1][:3] in ("000", "001") and NOVEL in k}
    other = _tree(write_dataset(tmp_path / "e", seed=4, train_good=0, test_per_class=0, novel=1).root)
    assert other.keys() <= fewer.keys() and all(other[k] != fewer[k] for k in other)

    with pytest.raises(ValueError, match="novel=-1"):
        write_dataset(tmp_path / "f", novel=-1)


def test_novel_kind_from_file_name() -> None:
    assert novel_kind(Path("test/novel/012_bubble.png")) == "bubble"
    assert novel_kind(Path("ground_truth/novel/012_bubble_mask.png")) == "bubble"
    assert novel_kind(Path("test/good/012.png")) is None
    assert novel_kind(Path("test/novel/012_dent.png")) is None


def test_novel_folder_is_no_class(tmp_path: Path) -> None:
    root = write_dataset(tmp_path, seed=3, train_good=1, test_per_class=1, novel=2).root
    pool = labelled_pool(root)
    assert len(pool) == 1 + len(BOTTLE_CLASSES) and all(NOVEL not in p.path.parts for p in pool)
    # A synthesised test/ folder stays a labelled replay folder; its novel images are labelled "novel",
    # which no class is (replay and evaluate keep them out of the 4-class figures).
    test = root / "test"
    assert is_labelled_folder(test, BOTTLE_CLASSES)
    assert label_of(test / NOVEL / "000_crack.png", test, BOTTLE_CLASSES) == NOVEL
    assert label_of(test / "good" / "000.png", test, BOTTLE_CLASSES) == "good"
    # novel/ alone is no labelled folder (nothing a class could be scored on), nor beside a non-class folder.
    only_novel = tmp_path / "only_novel"
    (only_novel / "novel").mkdir(parents=True)
    assert not is_labelled_folder(only_novel, BOTTLE_CLASSES)
    (only_novel / "misc").mkdir()
    (only_novel / "good").mkdir()
    assert not is_labelled_folder(only_novel, BOTTLE_CLASSES)


@pytest.mark.slow
def test_synth_novel_then_train_and_replay(tmp_path: Path) -> None:
    """`station synth --novel`, then `station train` and `station replay` on that data, as a user would."""
    proc = run_station("synth", "--out", str(tmp_path / "data"), "--seed", "5", "--train-good", "6",
                       "--test-per-class", "2", "--novel", "5")
    assert proc.returncode == 0, proc.stderr
    assert "test/novel 5" in proc.stdout
    data = tmp_path / "data" / "bottle"
    model = tmp_path / "model"
    # Training only has to run to the end with test/novel present: the smallest settings do.
    proc = run_station("train", "--data", str(data), "--out", str(model), "--epochs", "1", "--ae-steps", "4",
                       "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    split = json.loads((model / "split.json").read_text())
    used = [row["path"] for part in ("train", "holdout") for row in split[part]]
    assert any(p.startswith("test/good/") for p in used)
    assert not any(p.startswith(f"test/{NOVEL}/") for p in used)

    out = tmp_path / "verdicts.jsonl"
    proc = run_station("replay", "--model", str(model), "--source", str(data / "test"), "--out", str(out),
                       "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(verdicts) == 4 * 2 + 5
    novel = [v for v in verdicts if v["frame_id"].startswith(f"{NOVEL}/")]
    assert len(novel) == 5 and all(v["truth"] == NOVEL and v["error"] is None for v in novel)
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["labelled"]["n"] == 4 * 2  # the 4-class figures leave novel defects out


# -- renderer styles -------------------------------------------------------------------------------

LOOKS = ("dome", "backlit")


def _gray(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)


@pytest.mark.slow
def test_synth_styles_are_deterministic_cycled_and_recorded(tmp_path: Path) -> None:
    """`station synth --style all` twice with one seed: the same bytes, every style, class and novel kind."""
    args = ("--seed", "4", "--train-good", "3", "--test-per-class", "3", "--novel", "6", "--style", "all")
    for name in ("a", "b"):
        proc = run_station("synth", "--out", str(tmp_path / name), *args)
        assert proc.returncode == 0, proc.stderr
    a, b = _tree(tmp_path / "a" / "bottle"), _tree(tmp_path / "b" / "bottle")
    assert len(a) == 3 + 4 * 3 + 3 * 3 + 6 * 2 and a == b
    record = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert record["styles"] == ["ring", "dome", "backlit"] and record["seed"] == 4
    # Image i of every folder is drawn in style i mod 3.
    images = record["images"]
    assert images["train/good/001.png"] == "dome" and images["test/broken_small/002.png"] == "backlit"
    assert images["test/novel/003_bubble.png"] == "ring" and images["test/novel/005_crack.png"] == "backlit"
    assert len(images) == 3 + 4 * 3 + 6
    # The ring images are the ones a ring-only run of the same seed writes.
    proc = run_station("synth", "--out", str(tmp_path / "ring"), "--seed", "4", "--train-good", "1",
                       "--test-per-class", "0")
    assert proc.returncode == 0, proc.stderr
    assert _tree(tmp_path / "ring" / "bottle")["train/good/000.png"] == a["train/good/000.png"]
    # The backlit images are backlit: the frame's border is brighter than its middle; the others darker.
    for name, style in (("000", "ring"), ("001", "dome"), ("002", "backlit")):
        gray = _gray(cv2.imread(str(tmp_path / "a" / "bottle" / "train" / "good" / f"{name}.png")))
        border = np.concatenate([gray[:20].ravel(), gray[-20:].ravel()]).mean()
        assert (border > gray[350:550, 350:550].mean()) == (style == "backlit"), style


def test_synth_refuses_an_unknown_style() -> None:
    proc = run_station("synth", "--out", "/nonexistent/x", "--style", "ring,neon")
    assert proc.returncode == 2
    assert "neon" in proc.stderr and "backlit" in proc.stderr


@pytest.mark.parametrize("style", LOOKS)
def test_styles_draw_other_images_from_one_seed(style: str) -> None:
    same, _ = render_bottle(np.random.default_rng(5), None, style=style)
    again, _ = render_bottle(np.random.default_rng(5), None, style=style)
    ring, _ = render_bottle(np.random.default_rng(5), None)
    other, _ = render_bottle(np.random.default_rng(6), None, style=style)
    assert np.array_equal(same, again)
    assert np.abs(_gray(same) - _gray(ring)).mean() > 10
    assert np.abs(_gray(same) - _gray(other)).mean() > 3


@pytest.mark.parametrize("style", LOOKS)
def test_style_defects_change_pixels_inside_their_masks_only(style: str) -> None:
    for seed, defect in enumerate(("broken_large", "broken_small", "contamination") * 2):
        good, _ = render_bottle(np.random.default_rng([seed, 7]), None, style=style)
        bad, mask = render_bottle(np.random.default_rng([seed, 7]), defect, style=style)
        assert mask is not None and set(np.unique(mask)) == {0, 255} and (mask > 0).sum() >= 9
        diff = np.abs(good.astype(int) - bad.astype(int)).sum(axis=2) > 30
        # Blur, the break's seam (≤ 4 px) and JPEG's 16 px blocks reach a little beyond the mask; no further.
        near = cv2.dilate(mask, np.ones((41, 41), np.uint8)) > 0
        assert diff[mask > 0].mean() > 0.3, (style, defect, seed)
        assert not diff[~near].any(), (style, defect, seed)


def test_a_backlit_chip_shows_the_light() -> None:
    for seed in range(3):
        good, _ = render_bottle(np.random.default_rng([seed, 3]), None, style="backlit")
        bad, mask = render_bottle(np.random.default_rng([seed, 3]), "broken_small", style="backlit")
        assert mask is not None
        inside = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
        # Where the glass was, the light behind it: brighter than the dark rim it replaced.
        assert _gray(bad)[inside].mean() > _gray(good)[inside].mean() + 40, seed


@pytest.mark.parametrize("style", LOOKS)
@pytest.mark.parametrize("kind", NOVEL_KINDS)
def test_style_novel_mask_is_exactly_the_changed_pixels(style: str, kind: str) -> None:
    good, _ = render_bottle(np.random.default_rng([8, 1]), None, style=style)
    bad, mask = render_novel(np.random.default_rng([8, 1]), kind, style=style)
    diff = np.abs(good.astype(int) - bad.astype(int)).max(axis=2)
    assert np.array_equal(mask > 0, diff > NOVEL_MASK_LEVELS), (style, kind)
    assert (mask > 0).sum() >= 20
    # On the glass of the rim, where the drawers put it.
    cx, cy, radius = scene_of(np.random.default_rng([8, 1]), style)
    ys, xs = np.nonzero(mask)
    u = np.hypot(xs - cx, ys - cy) / radius
    assert u.min() > 0.5 and u.max() < 1.05, (style, kind, u.min(), u.max())
