"""`station synth` and `station perturb`: image folders to train and test on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from station.cli._args import non_negative_int
from station.errors import EXIT_OK, ConfigError, StationError

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register_synth(sub: Subparsers) -> None:
    s = sub.add_parser("synth", help="generate procedural bottle images in MVTec AD layout")
    s.add_argument("--out", type=Path, required=True, help="folder to create; images go to OUT/bottle/…")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-good", type=non_negative_int, default=60, help="good images in train/good")
    s.add_argument("--test-per-class", type=non_negative_int, default=15, help="images per class in test/")
    s.add_argument("--novel", type=non_negative_int, default=0, metavar="N",
                   help="also N images of unlabelled defect kinds in test/novel (not a class; for the anomaly check)")
    s.add_argument("--style", default="ring", metavar="NAME[,NAME…]|all",
                   help="renderer style: ring (ring light above, the default), dome (diffuse dome light over a "
                        "belt), backlit (light from below); a comma list cycles them image by image")
    s.set_defaults(handler=handle_synth)


def handle_synth(args: argparse.Namespace) -> int:
    from station.tools.synth import parse_styles, write_dataset

    def progress(done: int, total: int) -> None:
        if done == total or done % 20 == 0:
            print(f"\rsynth: {done}/{total} images", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        summary = write_dataset(args.out, seed=args.seed, train_good=args.train_good,
                                test_per_class=args.test_per_class, novel=args.novel, progress=progress,
                                styles=parse_styles(args.style))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise StationError(f"cannot write to {args.out}: {exc}") from exc
    counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items())
    print(f"wrote {summary.root}: {counts}")
    return EXIT_OK


def register_perturb(sub: Subparsers) -> None:
    pt = sub.add_parser("perturb", help="copy an image folder as a drifted line shows it: off centre, scaled, "
                                        "lamp gain, gamma, JPEG (masks moved with their images)")
    pt.add_argument("--data", type=Path, required=True, help="folder to copy (MVTec layout or any images)")
    pt.add_argument("--out", type=Path, required=True, help="new folder; same layout and file names")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--offset", type=float, default=0.0, metavar="F",
                    help="each image off centre by up to F of its shorter side, in a random direction")
    pt.add_argument("--offset-fixed", type=float, default=None, metavar="F",
                    help="every image off centre by exactly F, towards --offset-angle (a moved camera mount)")
    pt.add_argument("--offset-angle", type=float, default=0.0, metavar="DEG",
                    help="direction of --offset-fixed, degrees (0: right, 90: down)")
    pt.add_argument("--scale", type=float, default=0.0, metavar="F", help="scaled ×(1 ± F) about the centre")
    pt.add_argument("--gain", type=float, default=0.0, metavar="F", help="lamp gain: intensities ×(1 ± F)")
    pt.add_argument("--gamma", type=float, default=0.0, metavar="F", help="intensities to the power 1 ± F")
    pt.add_argument("--jpeg", type=int, default=None, metavar="Q", help="re-encoded as JPEG at quality Q")
    pt.set_defaults(handler=handle_perturb)


def handle_perturb(args: argparse.Namespace) -> int:
    from station.tools.perturb import PerturbSpec, perturb_folder

    def progress(done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            print(f"\rperturb: {done}/{total} files", end="" if done < total else "\n", file=sys.stderr, flush=True)

    spec = PerturbSpec(seed=args.seed, offset=args.offset, offset_fixed=args.offset_fixed,
                       offset_angle=args.offset_angle, scale=args.scale, gain=args.gain, gamma=args.gamma,
                       jpeg=args.jpeg)
    summary = perturb_folder(args.data, args.out, spec, progress)
    print(f"wrote {args.out}: {summary.images} images, {summary.masks} masks, {summary.copied} other files copied")
    return EXIT_OK
