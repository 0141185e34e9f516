"""Training the classifier: image plus anomaly evidence → class, the epoch with the best validation kept."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from station.core.folders import BOTTLE_CLASSES
from station.errors import DatasetError
from station.training.augment import augment_batch
from station.training.nets import make_classifier
from station.training.options import BALANCE_MODES, CLASSIFIER_ROTATIONS, TrainOptions, say


def _reestimate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Recompute BN running statistics as an exact average over the training images.

    With a few dozen images, running averages drifting under augmentation and a
    changing learning rate make the eval-mode network predict one class for all.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size].to(device))
    model.eval()


def _optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    raise DatasetError(f"unknown optimiser {name!r}; choose adamw, adam, rmsprop or sgd")


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).float().mean().item()
    return loss, accuracy


def train_classifier(x: torch.Tensor, y: torch.Tensor, n_classes: int, opts: TrainOptions,
                     x_val: torch.Tensor | None = None, y_val: torch.Tensor | None = None) -> tuple[
    nn.Module, dict[str, Any]
]:
    """Train; keep the epoch with the best validation accuracy (then loss), BN statistics re-estimated."""
    if opts.balance not in BALANCE_MODES:
        raise DatasetError(f"unknown balance mode {opts.balance!r}; choose {', '.join(BALANCE_MODES)}")
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    device = torch.device(opts.device)
    model = make_classifier(opts.backbone, n_classes, pretrained=opts.pretrained, view=opts.input_view).to(device)
    counts = torch.bincount(y, minlength=n_classes).float().clamp(min=1)
    prior = counts / counts.sum()
    weights = counts.sum() / (n_classes * counts) if opts.balance == "weighted" else None
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    logit_bias = torch.log(prior).to(device) if opts.balance == "logit-adjust" else None
    # Class-balanced sampling draws each image with probability ∝ 1 / its class's count.
    sample_p = (1.0 / counts)[y] if opts.balance == "sampler" else None
    opt = _optimizer(opts.optimizer, model.parameters(), opts.lr)
    steps_per_epoch = max(1, -(-len(x) // opts.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr, total_steps=opts.epochs * steps_per_epoch)
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    history: dict[str, Any] = {"best_epoch": None, "best_val_accuracy": None, "best_val_loss": None}
    for epoch in range(opts.epochs):
        t0 = time.monotonic()
        model.train()
        if sample_p is not None:
            perm = torch.multinomial(sample_p, len(x), replacement=True, generator=gen)
        else:
            perm = torch.randperm(len(x), generator=gen)
        total_loss = 0.0
        correct = 0
        seen = 0
        for i in range(0, len(x), opts.batch_size):
            idx = perm[i : i + opts.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a batch of one
                continue
            target = y[idx].to(device)
            logits = model(augment_batch(x[idx], gen, photometric=True,
                                         invert=opts.residual_view).to(device))
            train_logits = logits + logit_bias if logit_bias is not None else logits
            loss = loss_fn(train_logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == target).sum())
            seen += len(idx)
        msg = (f"classifier epoch {epoch + 1}/{opts.epochs}: loss {total_loss / max(seen, 1):.4f}, "
               f"train accuracy {correct / max(seen, 1):.3f}")
        if x_val is not None and y_val is not None and len(x_val):
            _reestimate_batchnorm(model, x, opts.batch_size)
            val_loss, val_acc = _evaluate(model, x_val.to(device), y_val.to(device))
            msg += f", validation accuracy {val_acc:.3f} loss {val_loss:.4f}"
            if best is None or (val_acc, -val_loss) > best:
                best = (val_acc, -val_loss)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                history.update(best_epoch=epoch + 1, best_val_accuracy=val_acc, best_val_loss=val_loss)
        say(f"{msg} ({time.monotonic() - t0:.1f} s)")
    if best_state is not None:
        model.load_state_dict(best_state)
        say(f"classifier: keeping epoch {history['best_epoch']} (validation accuracy "
             f"{history['best_val_accuracy']:.3f})")
    else:
        _reestimate_batchnorm(model, x, opts.batch_size)
    model.eval()
    return model.cpu(), history


def served_probabilities(cls_export: nn.Module, x_rgb: torch.Tensor, maps: torch.Tensor) -> Any:
    """Class probabilities as the station computes them: averaged over the bottle's turns (NumPy)."""
    if len(x_rgb) == 0:
        return torch.zeros((0, len(BOTTLE_CLASSES))).numpy()
    def turned(x: torch.Tensor, k: int) -> torch.Tensor:  # as Inspector.classifier_batches turns it
        return torch.roll(x, k * x.shape[2] // CLASSIFIER_ROTATIONS, dims=2)

    with torch.no_grad():
        probs = [cls_export(turned(x_rgb, k), turned(maps, k)) for k in range(CLASSIFIER_ROTATIONS)]
    return torch.stack(probs).mean(0).numpy()
