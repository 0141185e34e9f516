"""Training the anomaly model on good bottles only: simulated anomalies, cross-fitted threshold scores."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch
import yaml

from station.tools.calibrate import CONFIDENCE, choose_threshold
from station.training.anomalies import KINDS, simulate
from station.training.crossfit import (
    CROSS_FIT_CONFIDENCE,
    POINT_ESTIMATE_FROM,
    assign_folds,
    cross_fit,
    threshold_confidence,
)


def _views(n: int, seed: int = 0) -> torch.Tensor:
    """Polar-view-like images: smooth bands along the radius, as a bottle's lip makes them."""
    gen = torch.Generator().manual_seed(seed)
    cols = torch.linspace(0, 1, 128)
    band = torch.exp(-((cols - 0.8) ** 2) / 0.004)
    base = 0.2 + 0.6 * band.view(1, 1, 1, -1).expand(n, 3, 512, 128)
    return (base * (0.7 + 0.3 * torch.rand(n, 3, 1, 1, generator=gen))).clone()


@pytest.mark.parametrize("kind", KINDS)
def test_a_simulated_anomaly_batch_carries_masks_that_match_its_pasted_regions(kind: str) -> None:
    x = _views(8)
    out, mask = simulate(x, torch.Generator().manual_seed(5), rim_col=118, p=1.0, kinds=(kind,))
    changed = (out - x).abs().amax(dim=1, keepdim=True) > 0
    assert mask.shape == (8, 1, 512, 128)
    assert torch.equal(changed.float(), mask), f"{kind}: mask and changed pixels differ"
    per_image = mask.sum(dim=(1, 2, 3))
    assert (per_image > 0).all(), f"{kind}: an image with p=1 got no anomaly"
    assert (per_image < 0.05 * 512 * 128).all(), f"{kind}: anomalies must be small"
    # Anomalies sit on the glass, inside the rim (column 118) and a little past it, not in the background.
    cols = mask.nonzero()[:, 3]
    assert int(cols.max()) <= 118 + 4


def test_simulation_leaves_clean_images_alone_and_is_deterministic() -> None:
    x = _views(16)
    out, mask = simulate(x, torch.Generator().manual_seed(1), rim_col=118, p=0.0)
    assert torch.equal(out, x) and mask.sum() == 0
    a = simulate(x, torch.Generator().manual_seed(2), rim_col=118)
    b = simulate(x, torch.Generator().manual_seed(2), rim_col=118)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert 0 < int((a[1].sum(dim=(1, 2, 3)) > 0).sum()) < 16, "p = 0.5: some images anomalous, some not"


def test_cross_fitted_calibration_never_scores_an_image_with_a_fold_that_trained_on_it() -> None:
    n, folds = 23, 3
    scored_by: dict[int, int] = {}

    def train(rows: list[int], fold: int) -> tuple[int, set[int]]:
        return fold, set(rows)

    def score(model: tuple[int, set[int]], rows: list[int]) -> list[float]:
        fold, seen = model
        assert not seen & set(rows), f"fold {fold} asked to score images it trained on"
        for r in rows:
            assert r not in scored_by, f"image {r} scored twice"
            scored_by[r] = fold
        return [float(r) for r in rows]

    fit = cross_fit(n, folds, seed=4, train=train, score=score)
    assert fit.scores == [float(i) for i in range(n)]  # every image, in input order
    assert sorted(scored_by) == list(range(n))
    for i in range(n):
        assert fit.fold_of[i] == scored_by[i] and i not in fit.trained_on[fit.fold_of[i]]
        assert all(i in fit.trained_on[f] for f in range(folds) if f != fit.fold_of[i])
    sizes = [fit.fold_of.count(f) for f in range(folds)]
    assert max(sizes) - min(sizes) <= 1
    assert assign_folds(n, folds, 4) == fit.fold_of and assign_folds(n, folds, 5) != fit.fold_of
    with pytest.raises(ValueError):
        assign_folds(2, 3, 0)


def test_a_bundle_records_its_cross_fitted_threshold_and_margin(bundle: Path) -> None:
    """The shared test bundle is trained with the defaults: cross-fitted over 2 folds."""
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    split = json.loads((bundle / "split.json").read_text())
    scores = json.loads((bundle / manifest["anomaly"]["calibration_scores"]).read_text())
    training = manifest["training"]
    assert training["anomaly_model"] == "autoencoder" and training["cross_fit_folds"] == 2
    train_good = [r["path"] for r in split["train"] if r["label"] == "good"]
    # Every good image the anomaly model trained on was scored for the threshold, out of sample.
    assert split["calibration"] == []
    assert sorted(scores["images"]) == sorted(train_good) and len(scores["good_scores"]) == len(train_good)
    assert "cross-fitted over 2 folds" in manifest["anomaly"]["threshold_method"]
    # Under POINT_ESTIMATE_FROM scores the threshold is the 95 % bound, which is also the map classifier's unit.
    n = len(scores["good_scores"])
    assert n < POINT_ESTIMATE_FROM and threshold_confidence(n) == CONFIDENCE
    bound, _ = choose_threshold(scores["good_scores"], 0.01)
    assert manifest["anomaly"]["threshold"] == pytest.approx(bound)
    assert manifest["decision"]["map_classifier"]["threshold"] == pytest.approx(bound)
    metrics = manifest["metrics"]
    lowest = metrics["holdout_lowest_defect_score"]
    assert metrics["holdout_anomaly_margin"] == pytest.approx(lowest / manifest["anomaly"]["threshold"])


def test_many_cross_fitted_scores_set_the_fitted_quantile_never_under_the_empirical_one() -> None:
    # A log-normal sample at its plotting positions: the highest score is the fit's 0.985 quantile.
    scores = [float(np.exp(1.2 + 0.6 * NormalDist().inv_cdf((i + 1) / 65))) for i in range(64)]
    assert threshold_confidence(64) == CROSS_FIT_CONFIDENCE == 0.5
    fitted, method = choose_threshold(scores, 0.01, threshold_confidence(64))
    bound, _ = choose_threshold(scores, 0.01)
    log = np.log(scores)
    point = float(np.exp(log.mean() + 2.3263 * log.std(ddof=1)))  # the 0.99 quantile of the log-normal fit
    assert fitted == pytest.approx(max(point, float(np.quantile(scores, 0.99, method="higher"))), rel=1e-3)
    assert fitted < bound and "50%-confidence" in method
    # One bright good bottle far out in the tail: the empirical quantile (here the highest score) still rules.
    outlier = [*scores[:-1], max(scores) * 3]
    assert choose_threshold(outlier, 0.01, threshold_confidence(64))[0] == max(outlier)


def test_the_draem_model_exports_a_map_onnx_runtime_reproduces(tmp_path: Path) -> None:
    from station.training.anomaly_model import train_anomaly_model
    from station.training.export import INPUT_NAME, check_parity, export_onnx
    from station.training.nets import DRAEM_MAP_SCALE, DraemExport
    from station.training.options import TrainOptions

    x = _views(8)
    opts = TrainOptions(data=tmp_path, out=tmp_path / "m", ae_steps=3, seed=1)
    export = DraemExport(train_anomaly_model(x, opts)).eval()
    with torch.no_grad():
        maps = export(x[:2])
    assert maps.shape == (2, 1, 256, 64)
    assert float(maps.min()) >= 0 and float(maps.max()) <= DRAEM_MAP_SCALE
    path = tmp_path / "anomaly.onnx"
    export_onnx(export, (x[:1],), path, (INPUT_NAME,), "anomaly_map")
    assert check_parity(export, path, (INPUT_NAME,), "anomaly_map", (x[:2],), atol=1e-2) < 1e-2


def test_train_on_a_gpu_that_is_not_there_exits_2_naming_why(synth_root: Path, tmp_path: Path) -> None:
    from tests.conftest import run_station

    proc = run_station("train", "--data", str(synth_root), "--out", str(tmp_path / "m"), "--device", "cuda")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--device cuda" in proc.stderr and "sees no CUDA GPU" in proc.stderr
    proc = run_station("train", "--data", str(synth_root), "--out", str(tmp_path / "m"), "--device", "tpu")
    assert proc.returncode == 2 and "choose auto, cpu or cuda" in proc.stderr


def test_the_bundle_records_the_device_it_trained_on(bundle: Path) -> None:
    manifest = yaml.safe_load((bundle / "manifest.yaml").read_text())
    assert manifest["training"]["device"] == "cpu"  # --device auto on a machine without CUDA
