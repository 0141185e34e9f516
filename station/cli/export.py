"""`station export` (FP16 and INT8 copies of a bundle's models) and `station build-engine` (TensorRT plans)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from station.cli._args import non_negative_int, positive_int
from station.errors import EXIT_OK, EXIT_RUNTIME, ConfigError

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register_export(sub: Subparsers) -> None:
    x = sub.add_parser("export", help="write FP16 or INT8 (Q/DQ) copies of a bundle's ONNX files into it "
                                      "(needs the train extra)")
    x.add_argument("--model", type=Path, required=True)
    x.add_argument("--precision", required=True, choices=["fp16", "int8"])
    x.add_argument("--calibration", type=Path, default=None, metavar="DIR",
                   help="INT8: images to calibrate on (default: the bundle's training images, good and defective)")
    x.add_argument("--check", type=Path, default=None, metavar="DIR",
                   help="then compare each converted file with FP32 on this labelled folder; exit 1 if one fails")
    x.set_defaults(handler=handle_export)


def handle_export(args: argparse.Namespace) -> int:
    from station.tools.convert import export, format_parity, parity, per_file_configs, record_parity

    def say(msg: str) -> None:
        print(f"export: {msg}", file=sys.stderr)

    bundle = export(args.model, args.precision, args.calibration, progress=say)
    for role in ("autoencoder", "classifier"):
        path = bundle.model_path(role, args.precision)
        print(f"{role}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.check is None:
        return EXIT_OK
    figures = parity(bundle, args.check, per_file_configs(bundle), progress=say)
    for line in format_parity(figures):
        print(line)
    record_parity(bundle, figures)  # `precision: auto` reads it (station/core/backends/precision.py)
    return EXIT_OK if all(c["ok"] for c in figures["configs"].values()) else EXIT_RUNTIME


def register_build_engine(sub: Subparsers) -> None:
    g = sub.add_parser("build-engine", help="build TensorRT engines of a bundle for this GPU (cached in the bundle)")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--precision", default="fp16", metavar="fp16|fp32|int8|classifier=P,autoencoder=P",
                   help="which of the bundle's ONNX files to build from (fp16, int8: made by station export)")
    g.add_argument("--calibration", type=Path, default=None, help=argparse.SUPPRESS)
    g.add_argument("--workspace-mb", type=positive_int, default=1024, help="builder memory pool limit")
    g.add_argument("--max-batch", type=non_negative_int, default=0, metavar="N",
                   help="also accept batches 1…N (default: the batch the station runs each model with)")
    g.add_argument("--force", action="store_true", help="rebuild even when valid engines are cached")
    g.set_defaults(handler=handle_build_engine)


def handle_build_engine(args: argparse.Namespace) -> int:
    from station.core.backends import ROLES, parse_precision
    from station.core.backends.engine_cache import EngineCache, EngineKey
    from station.core.backends.gpu import probe
    from station.core.bundle import load_bundle

    if args.calibration is not None:
        raise ConfigError("build-engine --calibration: INT8 is calibrated by station export now (Q/DQ nodes in "
                          f"the bundle's int8 files): station export --model {args.model} --precision int8 "
                          "[--calibration DIR], then build-engine --precision int8")
    precisions = parse_precision(args.precision)
    if precisions is None:
        raise ConfigError("build-engine --precision: name one (fp16, fp32, int8) or one per model")
    bundle = load_bundle(args.model)
    gpu = probe()  # says what is missing (TensorRT, pycuda, a GPU) and exits 2
    from station.core.backends.tensorrt_build import BuildOptions, build_engines

    options = BuildOptions(precisions, args.workspace_mb, args.max_batch)
    options.validate()
    key = EngineKey.for_bundle(bundle, gpu, precisions)
    cache = EngineCache(bundle)
    if not args.force:
        cached, why = cache.usable(key, ROLES)
        if cached is None:
            print(f"build-engine: building: {why}", file=sys.stderr)
        else:
            print(f"build-engine: {cache.folder(key)} is up to date (--force rebuilds)")
            return EXIT_OK
    t0 = time.perf_counter()
    built = build_engines(bundle, options, gpu, progress=lambda msg: print(f"build-engine: {msg}", file=sys.stderr))
    for role, path in built.plans.items():
        print(f"{role}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"build-engine: {key.dirname} built in {time.perf_counter() - t0:.0f} s")
    return EXIT_OK
