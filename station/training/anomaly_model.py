"""Training the anomaly model (the reconstruction autoencoder, or DRAEM) on good bottles, and scoring its maps."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from station.core.anomaly import AnomalyParams, image_score, smooth
from station.training.anomalies import simulate
from station.training.augment import augment_batch
from station.training.crossfit import CrossFit, cross_fit
from station.training.nets import (
    AutoencoderExport,
    ConvAutoencoder,
    DraemExport,
    DraemModel,
    error_column_stats,
)
from station.training.options import (
    AE_POOL,
    CROSS_FIT_STEPS,
    MASK_RADIUS,
    RADIUS_MARGIN,
    SMOOTHING_SIGMA,
    TOP_K_FRACTION,
    TrainOptions,
    say,
)


def train_autoencoder(x: torch.Tensor, opts: TrainOptions, steps: int | None = None, seed_offset: int = 0,
                      label: str = "autoencoder") -> ConvAutoencoder:
    """Train on good images for a fixed number of steps (a few dozen images make epochs meaningless)."""
    steps = opts.ae_steps if steps is None else steps
    device = torch.device(opts.device)
    torch.manual_seed(opts.seed + 1 + seed_offset)
    gen = torch.Generator().manual_seed(opts.seed + 1 + seed_offset)
    model = ConvAutoencoder(view=opts.input_view).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=opts.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batch = min(8, len(x))
    t0 = time.monotonic()
    model.train()
    running = 0.0
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        z = model.standardise(augment_batch(x[idx], gen, photometric=False, drift=opts.residual_view).to(device))
        loss = (model(z) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % report_every == 0 or step == steps:
            n = report_every if step % report_every == 0 else step % report_every
            say(f"{label} step {step}/{steps}: L1 {running / n:.4f} ({time.monotonic() - t0:.1f} s)")
            running = 0.0
    model.eval()
    return model


def _focal_dice(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, as DRAEM trains its head) plus a soft Dice term.

    Anomalous bins are a fraction of a percent of a bottle: plain cross-entropy
    is content to call everything good. Focal loss down-weights the easy good
    bins; Dice scores the overlap of the few anomalous ones.
    """
    p = torch.sigmoid(logits)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    focal = ((1 - p_t) ** gamma * bce).mean()
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = (p + target).sum(dim=(1, 2, 3))
    has = target.sum(dim=(1, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    dice_loss = dice[has].mean() if bool(has.any()) else logits.sum() * 0
    return focal * 10 + dice_loss


def train_anomaly_model(x: torch.Tensor, opts: TrainOptions, steps: int | None = None, seed_offset: int = 0,
                        label: str = "anomaly model") -> DraemModel:
    """DRAEM on good images ``x`` (raw polar views): restore the bottle from an input with simulated
    anomalies pasted in (station/training/anomalies.py), and find where they were."""
    steps = opts.ae_steps if steps is None else steps
    torch.manual_seed(opts.seed + 1 + seed_offset)
    gen = torch.Generator().manual_seed(opts.seed + 1 + seed_offset)
    device = torch.device(opts.device)
    model = DraemModel(view=opts.input_view).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=opts.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    batch = min(8, len(x))
    rim_col = round(x.shape[3] / RADIUS_MARGIN)
    pool = nn.MaxPool2d(AE_POOL)
    t0 = time.monotonic()
    model.train()
    running = [0.0, 0.0]
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        # Half the bottle's turn per image: a turned bottle is a circular shift of rows, so after the
        # random turn the first half is a random half; it halves the cost of a step.
        clean = augment_batch(x[idx], gen, photometric=False,
                              drift=opts.residual_view)[:, :, : x.shape[2] // 2]
        anomalous, mask = simulate(clean, gen, rim_col)
        target_z = model.autoencoder.standardise(clean.to(device))
        _, restored, logits = model(anomalous.to(device))
        rec_loss = (restored - target_z).abs().mean()
        seg_loss = _focal_dice(logits, pool(mask.to(device)))
        loss = rec_loss + seg_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running[0] += rec_loss.item()
        running[1] += seg_loss.item()
        if step % report_every == 0 or step == steps:
            n = report_every if step % report_every == 0 else step % report_every
            say(f"{label} step {step}/{steps}: restore L1 {running[0] / n:.4f}, segment {running[1] / n:.4f} "
                 f"({time.monotonic() - t0:.1f} s)")
            running = [0.0, 0.0]
    model.eval()
    return model


def _anomaly_params() -> AnomalyParams:
    return AnomalyParams(SMOOTHING_SIGMA, TOP_K_FRACTION, MASK_RADIUS, RADIUS_MARGIN)


def anomaly_maps(export: nn.Module, x: torch.Tensor, device: torch.device, batch: int = 16) -> torch.Tensor:
    """The exported model's maps for raw polar views ``x``, on the CPU."""
    with torch.no_grad():
        return torch.cat([export(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def map_scores(maps: torch.Tensor) -> list[float]:
    """Image scores of maps, by the serving code's own smoothing and top-k (station/core/anomaly.py)."""
    params = _anomaly_params()
    return [image_score(smooth(m[0].numpy(), params), params) for m in maps]


def train_anomaly_export(x: torch.Tensor, opts: TrainOptions, steps: int, seed_offset: int, label: str
                          ) -> nn.Module:
    device = torch.device(opts.device)
    if opts.anomaly_model == "autoencoder":
        autoencoder = train_autoencoder(x, opts, steps, seed_offset, label)
        col_mean, col_std = error_column_stats(autoencoder, x.to(device))
        return AutoencoderExport(autoencoder, col_mean, col_std).eval()
    return DraemExport(train_anomaly_model(x, opts, steps, seed_offset, label)).eval()


@dataclass
class AnomalyFit:
    """The served anomaly model, and the out-of-sample scores of the good images it trained on."""

    export: nn.Module
    #: None when not cross-fitted (fewer than 2 folds: a held-out calibration split sets the threshold)
    crossfit: CrossFit | None
    seconds: float
    #: each cross-fitted image's map from the fold model that never trained on it, by row of the input
    held_out_maps: dict[int, torch.Tensor] = field(default_factory=dict)


def fit_anomaly_model(x: torch.Tensor, opts: TrainOptions) -> AnomalyFit:
    """The anomaly model trained on all good images ``x``, after one model per fold has scored its held-out part
    (station/training/crossfit.py) when ``opts.cross_fit_folds`` is at least 2."""
    t0 = time.monotonic()
    device = torch.device(opts.device)
    crossfit: CrossFit | None = None
    held_out: dict[int, torch.Tensor] = {}
    if opts.cross_fit_folds >= 2:
        fold_steps = max(1, round(opts.ae_steps * CROSS_FIT_STEPS))

        def fold_model(rows: list[int], fold: int) -> nn.Module:
            return train_anomaly_export(x[torch.tensor(rows)], opts, fold_steps, 100 + fold,
                                        f"anomaly model, fold {fold + 1}/{opts.cross_fit_folds}")

        def fold_scores(model: nn.Module, rows: list[int]) -> list[float]:
            maps = anomaly_maps(model, x[torch.tensor(rows)], device)
            held_out.update(zip(rows, maps, strict=True))
            return map_scores(maps)

        crossfit = cross_fit(len(x), opts.cross_fit_folds, opts.seed, fold_model, fold_scores)
    export = train_anomaly_export(x, opts, opts.ae_steps, 0, "anomaly model").cpu()
    return AnomalyFit(export, crossfit, time.monotonic() - t0, held_out)
