"""`station train`, `station adapt` and `station loso`: the only commands that import torch, and only when run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from station.cli._args import non_negative_int, positive_float, positive_int
from station.errors import EXIT_OK, ConfigError, MissingDependencyError

#: station.core.bundle.CLASS_SOURCES, the default first; spelled out because the CLI starts without pydantic
#: and OpenCV, which importing the bundle module would load for every command
CLASS_SOURCES = ("map", "cnn", "fused")

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register_train(sub: Subparsers) -> None:
    t = sub.add_parser("train", help="train classifier + autoencoder and write an ONNX model bundle")
    t.add_argument("--data", type=Path, required=True, help="an MVTec category folder, e.g. data/bottle")
    t.add_argument("--out", type=Path, required=True, help="bundle folder to write, e.g. models/demo")
    t.add_argument("--epochs", type=positive_int, default=60, help="classifier epochs")
    t.add_argument("--ae-steps", type=positive_int, default=1000,
                   help="anomaly model training steps (batches of 8)")
    t.add_argument("--anomaly-model", default="autoencoder", choices=["autoencoder", "draem"],
                   help="autoencoder: the reconstruction autoencoder (default); draem: restore bottles from "
                        "simulated anomalies and segment them with a head (experimental, docs/models.md)")
    t.add_argument("--cross-fit-folds", type=non_negative_int, default=2,
                   help="score every good training image for the threshold with a model trained without it, "
                        "over this many folds (0 or 1: hold 20 %% of them out instead)")
    t.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N; the bundle is the same")
    t.add_argument("--lighting", default="auto", choices=["auto", "front", "back", "per-frame"],
                   help="how the mouth is lit: front (ring or dome light above), back (light from below), "
                        "auto: the one all training images show, recorded in the bundle (mixed: decided per "
                        "frame), or per-frame: decided for each frame whatever the training images show")
    t.add_argument("--input-view", default="residual", choices=["raw", "residual"],
                   help="what both networks see of the polar view: residual (the default: what differs between "
                        "angles of the mouth, docs/models.md) or raw (each image standardised as a whole, and the "
                        "augmentations of bundles before 2026-12-07)")
    t.add_argument("--classes-from", default=CLASS_SOURCES[0], choices=CLASS_SOURCES,
                   help="where the bottle's class comes from: map (the default: a logistic regression on the "
                        "anomaly map's size, extent and place, docs/models.md), cnn (the CNN classifier, as "
                        "bundles before 2026-12-07) or fused (the geometric mean of both)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--target-false-reject", type=positive_float, default=0.01,
                   help="fraction of good bottles the anomaly threshold may reject (default 0.01)")
    t.add_argument("--backbone", default="mobilenet_v3_small",
                   choices=["mobilenet_v3_small", "resnet18", "efficientnet_b0"])
    t.add_argument("--pretrained", type=Path, default=None,
                   help="torchvision state-dict file for the backbone (never downloaded)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="classifier learning rate")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "rmsprop", "sgd"])
    t.add_argument("--balance", default="logit-adjust", choices=["weighted", "sampler", "logit-adjust", "none"],
                   help="class-imbalance handling (default: logit-adjusted cross-entropy)")
    t.add_argument("--sweep", type=Path, default=None, metavar="FILE.yaml",
                   help="train a grid of classifier settings and write OUT/sweep.md instead of a bundle")
    _name_and_threads(t)
    t.set_defaults(handler=handle_train)


def _name_and_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: all cores)")


def _needs_train_extra(command: str, exc: ImportError) -> MissingDependencyError:
    return MissingDependencyError(f"`station {command}` needs the train extra (torch, torchvision, onnx): "
                                  f"pip install 'station[train]' ({exc})")


def handle_train(args: argparse.Namespace) -> int:
    try:
        from station.training.options import TrainOptions, pick_device
        from station.training.train import train_bundle
    except ImportError as exc:
        raise _needs_train_extra("train", exc) from exc
    options = TrainOptions(
        data=args.data, out=args.out, epochs=args.epochs,
        ae_steps=args.ae_steps,
        seed=args.seed, batch_size=args.batch_size, target_false_reject=args.target_false_reject,
        name=args.name or args.out.name, threads=args.threads, backbone=args.backbone,
        pretrained=args.pretrained, lr=args.lr, optimizer=args.optimizer, balance=args.balance,
        anomaly_model=args.anomaly_model, cross_fit_folds=args.cross_fit_folds, device=pick_device(args.device),
        lighting=args.lighting, input_view=args.input_view, classes_from=args.classes_from,
    )
    if args.sweep:
        from station.training.sweep import run_sweep

        table = run_sweep(options, args.sweep)
        print(table.read_text(encoding="utf-8"))
        return EXIT_OK
    manifest = train_bundle(options)
    print(f"wrote bundle {args.out} ({manifest.name} {manifest.version})")
    print(json.dumps(manifest.metrics, indent=2))
    return EXIT_OK


def register_adapt(sub: Subparsers) -> None:
    a = sub.add_parser("adapt", help="carry a bundle to a new line: retrain its autoencoder on the line's good "
                                     "bottles, keep its map classifier")
    a.add_argument("--model", type=Path, required=True, help="the bundle to adapt (trained with --classes-from map)")
    a.add_argument("--good", type=Path, required=True,
                   help="a folder of the new line's good bottles (at least 16, 60 or more advised; no defects "
                        "needed)")
    a.add_argument("--out", type=Path, required=True, help="bundle folder to write (may be --model itself)")
    a.add_argument("--ae-steps", type=positive_int, default=None,
                   help="autoencoder training steps (default 1000, station train's)")
    a.add_argument("--lighting", default="auto", choices=["auto", "front", "back"],
                   help="how the new line lights the mouth (auto: the one all its good images show)")
    a.add_argument("--cross-fit-folds", type=positive_int, default=2,
                   help="folds for the line's out-of-sample good scores the threshold is set on (at least 2)")
    a.add_argument("--target-false-reject", type=positive_float, default=0.01,
                   help="fraction of good bottles the anomaly threshold may reject (default 0.01)")
    a.add_argument("--device", default="auto", help="as station train's")
    a.add_argument("--seed", type=int, default=0)
    _name_and_threads(a)
    a.set_defaults(handler=handle_adapt)


def handle_adapt(args: argparse.Namespace) -> int:
    try:
        from station.training.adapt import AdaptOptions, adapt_bundle
        from station.training.options import pick_device
    except ImportError as exc:
        raise _needs_train_extra("adapt", exc) from exc
    manifest = adapt_bundle(AdaptOptions(
        model=args.model, good=args.good, out=args.out, ae_steps=args.ae_steps, seed=args.seed,
        threads=args.threads, device=pick_device(args.device), lighting=args.lighting,
        target_false_reject=args.target_false_reject, cross_fit_folds=args.cross_fit_folds, name=args.name))
    print(f"wrote bundle {args.out} ({manifest.name} {manifest.version}), adapted from {args.model}")
    print(json.dumps(manifest.metrics, indent=2))
    return EXIT_OK


def register_loso(sub: Subparsers) -> None:
    p = sub.add_parser("loso", help="leave one renderer style out: train on the others, judge on it")
    p.add_argument("--out", type=Path, required=True, help="folder for the data, bundles and loso.md")
    p.add_argument("--styles", default="ring,dome,backlit", help="comma list of synth styles (default: all three)")
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--judge-seed", type=int, default=2)
    p.add_argument("--train-good", type=positive_int, default=60)
    p.add_argument("--train-per-class", type=positive_int, default=20)
    p.add_argument("--judge-per-class", type=positive_int, default=30)
    p.add_argument("--novel", type=non_negative_int, default=30)
    p.add_argument("--epochs", type=positive_int, default=60)
    p.add_argument("--ae-steps", type=positive_int, default=1000)
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--input-view", default="residual", choices=["raw", "residual"], help="as station train's")
    p.add_argument("--classes-from", default=CLASS_SOURCES[0], choices=CLASS_SOURCES, help="as station train's")
    p.add_argument("--calibrate-good", type=non_negative_int, default=30,
                   help="then judge again after `station calibrate` on this many good bottles of the left-out "
                        "style, as a line installing a bundle would (0: not done)")
    p.add_argument("--adapt-good", type=non_negative_int, default=60,
                   help="then judge again after `station adapt` on this many good bottles of the left-out style "
                        "(its autoencoder retrained on them, no labels; 0: not done)")
    p.add_argument("--lighting", default="per-frame", choices=["auto", "front", "back", "per-frame"],
                   help="as station train's; per-frame (the default) lets a bundle meet a lighting it never "
                        "trained on")
    p.add_argument("--left-out", default=None, metavar="NAME[,NAME…]",
                   help="leave out only these styles (default: each in turn), e.g. to run the folds in parallel")
    p.set_defaults(handler=handle_loso)


def handle_loso(args: argparse.Namespace) -> int:
    # station.training.loso imports no torch at module level; run_loso trains, so only when run.
    from station.tools.synth import parse_styles
    from station.training.loso import LOSO_FILE, LosoPlan, run_loso, table

    try:
        styles = parse_styles(args.styles)
    except ValueError as exc:
        raise ConfigError(f"--styles: {exc}") from exc
    try:
        left_out = parse_styles(args.left_out) if args.left_out else ()
    except ValueError as exc:
        raise ConfigError(f"--left-out: {exc}") from exc
    if set(left_out) - set(styles):
        raise ConfigError(f"--left-out {args.left_out}: not among --styles {args.styles}")
    plan = LosoPlan(args.out, styles, train_seed=args.train_seed, judge_seed=args.judge_seed,
                    train_good=args.train_good, train_per_class=args.train_per_class,
                    judge_per_class=args.judge_per_class, novel=args.novel, epochs=args.epochs,
                    ae_steps=args.ae_steps, threads=args.threads, left_out=left_out,
                    input_view=args.input_view, lighting=args.lighting, calibrate_good=args.calibrate_good,
                    adapt_good=args.adapt_good, classes_from=args.classes_from)
    rows = run_loso(plan)
    print(table(rows), end="")
    print(f"wrote {args.out / LOSO_FILE}")
    return EXIT_OK
