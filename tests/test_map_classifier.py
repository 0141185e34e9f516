"""The map classifier: the class from the anomaly map's region (size, extent, place), fitted at training, served
without torch, and the bundle's switch between it and the CNN."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from station.core.map_classifier import FEATURE_COUNTS, map_features, map_probabilities
from tests.conftest import run_station


def _map(rows: slice, cols: slice, level: float, shape: tuple[int, int] = (256, 64)) -> np.ndarray:
    m = np.random.default_rng(0).uniform(0.0, 0.5, shape)
    m[rows, cols] = level
    return m


def test_features_tell_a_large_break_at_the_rim_from_a_speck_in_the_opening() -> None:
    names = ["score", "area", "angles", "radii", "centre", "inner", "outer", "pieces"]
    brk = dict(zip(names, map_features(_map(slice(40, 100), slice(50, 60), 40.0), 40.0, 10.0, _view()), strict=False))
    speck = dict(zip(names, map_features(_map(slice(40, 43), slice(10, 13), 40.0), 40.0, 10.0, _view()), strict=False))
    assert brk["area"] > speck["area"] + 3  # log(1 + bins): 600 bins against 9
    assert brk["angles"] > 10 * speck["angles"]
    assert brk["centre"] > 0.75 and speck["centre"] < 0.25  # at the rim, in the opening
    assert 0.75 < brk["inner"] <= brk["outer"] < 1.0 and speck["outer"] < 0.25


def _view(shape: tuple[int, int] = (512, 128)) -> np.ndarray:
    """A polar view (1, 3, angles, radii) of a good mouth: grey opening, bright rim, dark background."""
    view = np.empty((1, 3, *shape), np.float32)
    radii = shape[1]
    view[..., : radii * 5 // 10] = 0.3
    view[..., radii * 5 // 10: radii * 9 // 10] = 0.8
    view[..., radii * 9 // 10:] = 0.05
    return view


def test_features_are_in_units_of_the_threshold() -> None:
    """An autoencoder whose maps read twice as high, with a threshold twice as high, shows the same features."""
    m = _map(slice(10, 30), slice(20, 40), 25.0)
    for feature_set in FEATURE_COUNTS:
        a = map_features(m, 25.0, 8.0, _view(), feature_set)
        assert a.shape == (FEATURE_COUNTS[feature_set],)
        assert np.allclose(a, map_features(2 * m, 50.0, 16.0, _view(), feature_set))
        assert not np.allclose(a, map_features(m, 25.0, 16.0, _view(), feature_set))
        # a map with no anomalous region at all (an all-black map) gives as many numbers, all finite
        empty = map_features(np.zeros_like(m), 0.0, 8.0, _view(), feature_set)
        assert empty.shape == a.shape and np.isfinite(empty).all()
    with pytest.raises(ValueError, match="calibrated anomaly threshold"):
        map_features(m, 25.0, float("inf"), _view())
    with pytest.raises(ValueError, match="need the polar view"):
        map_features(m, 25.0, 8.0)


def test_v2_tells_a_chip_showing_the_background_from_a_foreign_speck() -> None:
    """A chip's pixels take the colour of what lies behind the glass, found further out on the same mouth; a speck
    of contamination is a colour found at no radius of a good mouth. The map is the same for both."""
    m = _map(slice(40, 46), slice(36, 44), 40.0)  # on the rim (half-resolution bins 32-57)
    chip, speck = _view(), _view()
    chip[0, :, 80:92, 72:88] = 0.05  # the background's grey
    speck[0, :, 80:92, 72:88] = np.array([0.9, 0.1, 0.1], np.float32)[:, None, None]  # red, on no good mouth
    names = ["closest_over_own", "own_distance", "shift", "abs_shift"]
    f_chip = dict(zip(names, map_features(m, 40.0, 10.0, chip, "map-v2")[-4:], strict=True))
    f_speck = dict(zip(names, map_features(m, 40.0, 10.0, speck, "map-v2")[-4:], strict=True))
    assert f_chip["closest_over_own"] < 0.1 < 0.5 < f_speck["closest_over_own"]
    assert f_chip["shift"] > 0.2  # the background lies outside the rim


def test_v3_tells_glass_missing_at_the_lips_edge_from_matter_lying_on_the_lip() -> None:
    """A chip takes glass away from the rim's outer edge inward, so along its angles the view departs from the
    mouth's profile at that edge; a blob of the same size on the middle of the lip leaves both edges as they are.
    The map is the same for both: only the view tells them apart."""
    m = _map(slice(40, 46), slice(50, 57), 40.0)  # half-resolution bins 50-56: the outer half of the lip
    good = np.empty((1, 3, 512, 128), np.float32)
    good[..., :64], good[..., 64:118], good[..., 118:] = 0.3, 0.8, 0.05  # opening, lip to the rim at 1.08, belt
    chip, blob = good.copy(), good.copy()
    chip[0, :, 80:92, 100:118] = 0.05  # the belt seen through the gap, from the rim inward
    blob[0, :, 80:92, 84:100] = 0.05  # as dark, with glass on both sides of it
    names = ["starts", "stops_short", "at_outer", "at_inner", "at_either", "across"]
    f_chip = dict(zip(names, map_features(m, 40.0, 10.0, chip)[-6:], strict=True))
    f_blob = dict(zip(names, map_features(m, 40.0, 10.0, blob)[-6:], strict=True))
    assert f_chip["at_outer"] > 0.9 and f_chip["at_either"] > 0.9 and f_chip["at_inner"] == 0.0
    assert f_blob["at_outer"] == f_blob["at_inner"] == f_blob["at_either"] == 0.0
    assert f_chip["across"] > f_blob["across"] > 0.0
    # the lip's inner edge is found on the profile (bin 64), the outer one where the view's reach puts the rim
    assert abs(f_chip["starts"] - (100 - 64) / (119 - 64)) < 0.05  # the map's region starts 0.65 of the lip in
    # told that the view reaches 1.33 rim radii, the rim is at bin 96, where the blob lies
    assert map_features(m, 40.0, 10.0, blob, radius_margin=128 / 96)[-4] > 0.9


def test_the_fit_learns_what_separates_the_classes() -> None:
    from station.core.map_refit import fit_logistic

    rng = np.random.default_rng(3)
    centres = np.array([[0, 0], [3, 0], [0, 3], [3, 3]], float)
    y = np.repeat(np.arange(4), 16)
    x = centres[y] + rng.normal(0, 0.5, (64, 2))
    weights, bias = fit_logistic(x, y, 4)
    again = fit_logistic(x, y, 4)
    assert np.array_equal(weights, again[0]) and np.array_equal(bias, again[1])  # deterministic
    test_y = np.repeat(np.arange(4), 25)
    test_x = centres[test_y] + rng.normal(0, 0.5, (100, 2))
    probs = map_probabilities(test_x, np.zeros(2), np.ones(2), weights, bias)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == test_y).mean() >= 0.95


def test_a_trained_bundle_serves_the_map_classifier(bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    """`station train` fits it by default; the station's probabilities are the fitted regression on the features
    of the served map; switching the manifest to the CNN or to both changes what is served, as documented."""
    from station.core.bundle import load_bundle
    from station.core.inspector import Inspector
    from station.core.preprocess import preprocess
    from station.sources.folder import load_frame

    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    mc = manifest["decision"]["map_classifier"]
    assert manifest["decision"]["classes_from"] == "map"
    assert mc["feature_set"] == "map-v3" and mc["fit"]["images"] > 0
    assert np.asarray(mc["weights"]).shape == (len(mc["mean"]), len(manifest["classes"]))

    inspector = Inspector(load_bundle(bundle))
    image = load_frame(next((eval_root / "broken_large").iterdir()), 0, eval_root, "test", None).image
    assert image is not None
    x = preprocess(image, inspector.preprocess_spec)
    served = inspector.inspect(x)
    assert mc["threshold"] == manifest["anomaly"]["threshold"]  # fitted at the threshold training chose
    features = map_features(served.anomaly_map, served.anomaly_score, mc["threshold"], x.autoencoder)
    expected = map_probabilities(features, np.asarray(mc["mean"]), np.asarray(mc["std"]),
                                 np.asarray(mc["weights"]), np.asarray(mc["bias"]))
    assert np.allclose(served.probabilities, expected, atol=1e-9)

    cnn = inspector.cnn_probabilities(x, inspector.autoencoder.run(x.autoencoder))
    served_by = {}
    for source in ("cnn", "fused"):
        copy = tmp_path / source
        shutil.copytree(bundle, copy)
        manifest["decision"]["classes_from"] = source
        (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
        served_by[source] = Inspector(load_bundle(copy)).inspect(x).probabilities
    assert np.allclose(served_by["cnn"], cnn, atol=1e-6)
    geometric = np.sqrt(cnn * expected)
    assert np.allclose(served_by["fused"], geometric / geometric.sum(), atol=1e-6)

    # A bundle fitted on map-v1 (before the region's form and look were measured) is served with map-v1.
    copy = tmp_path / "v1"
    shutil.copytree(bundle, copy)
    v1 = FEATURE_COUNTS["map-v1"]
    old = dict(mc, feature_set="map-v1", mean=mc["mean"][:v1], std=mc["std"][:v1], weights=mc["weights"][:v1])
    manifest["decision"].update(classes_from="map", map_classifier=old)
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    old_features = map_features(served.anomaly_map, served.anomaly_score, mc["threshold"], feature_set="map-v1")
    assert np.allclose(Inspector(load_bundle(copy)).inspect(x).probabilities,
                       map_probabilities(old_features, np.asarray(old["mean"]), np.asarray(old["std"]),
                                         np.asarray(old["weights"]), np.asarray(old["bias"])), atol=1e-9)


def test_a_bundle_that_names_the_map_classifier_must_carry_one(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    manifest["decision"]["map_classifier"]["feature_set"] = "map-v0"
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    proc = run_station("replay", "--model", str(copy), "--source", str(tmp_path))
    assert proc.returncode == 2
    assert "map-v0" in proc.stderr and "retrain" in proc.stderr
    manifest["decision"]["map_classifier"]["feature_set"] = "map-v1"  # 28 features, the weights are for 40
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    proc = run_station("replay", "--model", str(copy), "--source", str(tmp_path))
    assert proc.returncode == 2
    assert "weights must be 28 features" in proc.stderr
    del manifest["decision"]["map_classifier"]
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    proc = run_station("replay", "--model", str(copy), "--source", str(tmp_path))
    assert proc.returncode == 2
    assert "decision.map_classifier is missing" in proc.stderr


def test_calibrate_refits_the_map_classifier_on_the_lines_good_bottles_in_its_training_unit(
        bundle: Path, eval_root: Path, tmp_path: Path) -> None:
    """`station calibrate` moves the threshold and refits the map classifier on its training features plus the
    line's good bottles (labelled good), in the training threshold's unit; each calibration starts again from
    the training features; a bundle that keeps none is left as it was, and says so."""
    from station.core.bundle import load_bundle
    from station.core.inspector import Inspector
    from station.core.map_refit import FEATURES_FILE
    from station.core.preprocess import preprocess
    from station.sources.folder import load_frame

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    goods = sorted((eval_root / "good").iterdir())
    spec = Inspector(load_bundle(copy)).preprocess_spec
    images = [load_frame(p, 0, eval_root, "test", None).image for p in goods]
    inputs = [preprocess(image, spec) for image in images if image is not None]
    before = [Inspector(load_bundle(copy)).inspect(x).probabilities[0] for x in inputs]
    proc = run_station("calibrate", "--model", str(copy), "--good", str(eval_root / "good"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    old, new = (yaml.safe_load((b / "manifest.yaml").read_text()) for b in (bundle, copy))
    trained_on = old["decision"]["map_classifier"]["fit"]["images"]
    assert f"refitted on its {trained_on} training images and {len(goods)} good bottles" in proc.stdout
    assert new["anomaly"]["threshold"] != old["anomaly"]["threshold"]
    mc_old, mc_new = old["decision"]["map_classifier"], new["decision"]["map_classifier"]
    assert mc_new["threshold"] == mc_old["threshold"] and mc_new["feature_set"] == mc_old["feature_set"]
    assert mc_new["fit"]["line_good"] == len(goods) and mc_new["weights"] != mc_old["weights"]
    after = [Inspector(load_bundle(copy)).inspect(x).probabilities[0] for x in inputs]
    assert np.mean(np.log(after)) > np.mean(np.log(before))  # the line's good bottles now read as good

    assert run_station("calibrate", "--model", str(copy), "--good", str(eval_root / "good")).returncode == 0
    again = yaml.safe_load((copy / "manifest.yaml").read_text())["decision"]["map_classifier"]
    assert again["weights"] == mc_new["weights"] and again["fit"]["line_good"] == len(goods)

    old_style = tmp_path / "old"
    shutil.copytree(bundle, old_style)
    (old_style / FEATURES_FILE).unlink()
    del old["files"][FEATURES_FILE]
    (old_style / "manifest.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    proc = run_station("calibrate", "--model", str(old_style), "--good", str(eval_root / "good"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "map classifier unchanged" in proc.stdout
    assert yaml.safe_load((old_style / "manifest.yaml").read_text())["decision"]["map_classifier"] == mc_old
