"""`station train --sweep FILE.yaml`: a grid of classifier hyper-parameters, one Markdown table.

The autoencoder (which no classifier parameter affects) is trained once; each
grid point trains a classifier on the same split and is scored on the
validation images (used to pick its best epoch) and on the held-out split.

FILE.yaml::

    grid:                     # every combination is one attempt
      epochs: [50, 100]
      batch_size: [4]
      lr: [0.003, 0.0001]
      optimizer: [adam, rmsprop]
    fixed:                    # optional: the same for every attempt
      balance: weighted
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from station.core.report_format import pct
from station.errors import ConfigError
from station.training.classifier import train_classifier
from station.training.options import TrainOptions, say
from station.training.prepare import prepare

SWEEPABLE = ("epochs", "batch_size", "lr", "optimizer", "balance", "backbone", "seed")


def load_sweep(path: Path) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"sweep file {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("grid"), dict) or not raw["grid"]:
        raise ConfigError(f"{path}: grid: required mapping of parameter → list of values")
    fixed = raw.get("fixed") or {}
    unknown = set(raw) - {"grid", "fixed"}
    if unknown:
        raise ConfigError(f"{path}: {', '.join(sorted(unknown))}: unknown key (expected grid, fixed)")
    grid: dict[str, list[Any]] = {}
    for key, values in raw["grid"].items():
        if key not in SWEEPABLE:
            raise ConfigError(f"{path}: grid.{key}: not a sweepable parameter ({', '.join(SWEEPABLE)})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}: expected a non-empty list")
        grid[key] = values
    for key in fixed:
        if key not in SWEEPABLE:
            raise ConfigError(f"{path}: fixed.{key}: not a sweepable parameter ({', '.join(SWEEPABLE)})")
    return grid, fixed


def run_sweep(opts: TrainOptions, sweep_file: Path) -> Path:
    grid, fixed = load_sweep(sweep_file)
    prepared = prepare(opts)
    x_hold, y_hold = prepared.holdout()
    n = prepared.n_train
    rows: list[dict[str, Any]] = []
    keys = list(grid)
    for attempt, values in enumerate(itertools.product(*(grid[k] for k in keys)), start=1):
        params = {**fixed, **dict(zip(keys, values, strict=True))}
        try:
            run_opts = dataclasses.replace(opts, **params)
        except TypeError as exc:
            raise ConfigError(f"{sweep_file}: {exc}") from exc
        say(f"sweep attempt {attempt}: {params}")
        t0 = time.monotonic()
        model, history = train_classifier(prepared.x_cls[:n], prepared.y[:n], 4, run_opts,
                                          prepared.x_cls[n:], prepared.y[n:])
        with torch.no_grad():
            predicted = model(x_hold).argmax(1)
        holdout_acc = float((predicted == y_hold).float().mean())
        recalls = [float((predicted[y_hold == c] == c).float().mean()) for c in range(4) if (y_hold == c).any()]
        balanced = sum(recalls) / len(recalls)
        rows.append({"attempt": attempt, **{k: getattr(run_opts, k) for k in SWEEPABLE},
                     "validation_accuracy": history["best_val_accuracy"], "best_epoch": history["best_epoch"],
                     "holdout_accuracy": holdout_acc, "holdout_balanced_accuracy": balanced,
                     "seconds": round(time.monotonic() - t0, 1)})
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "sweep.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    table = ["| attempt | epochs | batch | learning rate | optimiser | balance | best epoch | validation accuracy "
             "| holdout accuracy | holdout balanced accuracy | seconds |", "| --- " * 11 + "|"]
    for r in rows:
        val = pct(r["validation_accuracy"], 2)
        table.append(f"| {r['attempt']} | {r['epochs']} | {r['batch_size']} | {r['lr']:g} | {r['optimizer']} | "
                     f"{r['balance']} | {r['best_epoch']} | {val} | {100 * r['holdout_accuracy']:.2f} % | "
                     f"{100 * r['holdout_balanced_accuracy']:.2f} % | {r['seconds']} |")
    best = max(rows, key=lambda r: (r["validation_accuracy"] or 0.0, r["holdout_accuracy"]))
    text = (f"# Classifier sweep on {opts.data}\n\n{len(prepared.split.classifier_train)} training, "
            f"{len(prepared.split.validation)} validation, {len(prepared.split.holdout)} held-out images "
            f"(seed {opts.seed}).\n\n" + "\n".join(table)
            + f"\n\nBest by validation accuracy: attempt {best['attempt']}.\n")
    path = opts.out / "sweep.md"
    path.write_text(text, encoding="utf-8")
    return path
