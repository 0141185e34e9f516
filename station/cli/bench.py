"""`station bench` (latency and throughput) and `station soak` (nothing lost, memory flat, over many frames)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from station.cli._args import add_backend_args, add_worker_args, backend_spec, positive_float, positive_int
from station.errors import EXIT_OK, EXIT_RUNTIME

if TYPE_CHECKING:
    from station.cli._args import Subparsers


def register_bench(sub: Subparsers) -> None:
    b = sub.add_parser("bench", help="measure per-stage latency, throughput and latency at an offered rate")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--source", default="synth", metavar="synth|FOLDER",
                   help="bottles rendered in memory (default) or the images of a folder")
    b.add_argument("--frames", type=positive_int, default=300)
    add_backend_args(b)
    add_worker_args(b, "intra-op threads per model session (0: the cores shared out among the workers)")
    b.add_argument("--rate", type=positive_float, default=20.0, metavar="FPS",
                   help="offered frame rate for the latency measurement")
    b.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    b.add_argument("--baseline-precision", default=None, metavar="PRECISION",
                   help="also measure the station at this precision (e.g. fp32) in the same run, and the ratio")
    b.set_defaults(handler=handle_bench)


def _machine() -> str:
    import os
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores usable, {model}"


def handle_bench(args: argparse.Namespace) -> int:
    from station.core import parallelism
    from station.core.backends import precision_arg, resolve_precision
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.bench import bench_style, check_locatable, folder_images, format_report, run_bench, synth_images

    bundle = load_bundle(args.model)
    plan = parallelism.plan(args.workers, args.threads)
    parallelism.apply(plan)
    pipeline = Pipeline(bundle, backend=backend_spec(args, plan))
    pipeline.warm_up()
    if args.source == "synth":
        style = bench_style(bundle.manifest.view.lighting)
        print(f"bench: rendering {args.frames} bottles ({style} style, for view.lighting "
              f"{bundle.manifest.view.lighting})", file=sys.stderr)
        images = synth_images(args.frames, style=style)
        names = [f"rendered bottle {n}" for n in range(len(images))]
    else:
        images, names = folder_images(Path(args.source), args.frames)
    check_locatable(images, names, pipeline.inspector.preprocess_spec)
    baseline = None
    if args.baseline_precision is not None:
        baseline = Pipeline(bundle, backend=backend_spec(args, plan, args.baseline_precision))
        baseline.warm_up()
    print("bench: measuring", file=sys.stderr)
    report = run_bench(pipeline, images, args.rate, plan.workers, baseline)
    backend = pipeline.inspector.backend
    precision = resolve_precision(args.precision, backend, bundle)[0]
    report.update(model=bundle.label, backend=backend, workers=plan.workers,
                  threads=plan.threads_per_session, machine=_machine(),
                  source=args.source, precision=precision_arg(precision))
    if args.baseline_precision is not None:
        report["baseline_precision"] = precision_arg(resolve_precision(args.baseline_precision, backend, bundle)[0])
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"figures written to {args.json}")
    return EXIT_OK


def register_soak(sub: Subparsers) -> None:
    so = sub.add_parser("soak", help="many frames through the daemon to an outside subscriber: nothing lost, "
                                     "memory flat (exit 1 if not)")
    so.add_argument("--model", type=Path, required=True)
    so.add_argument("--frames", type=positive_int, default=100_000)
    add_worker_args(so, "intra-op threads per model session")
    so.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    add_backend_args(so)
    so.set_defaults(handler=handle_soak)


def handle_soak(args: argparse.Namespace) -> int:
    from station.core import parallelism
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.soak import soak, write_json

    plan = parallelism.plan(args.workers, args.threads)
    parallelism.apply(plan)
    pipeline = Pipeline(load_bundle(args.model), backend=backend_spec(args, plan))
    pipeline.warm_up()
    print(f"soak: {args.frames} frames, {plan.workers} workers, backend {pipeline.inspector.backend}",
          file=sys.stderr)
    report = soak(pipeline, args.frames, plan.workers)
    for line in report.lines():
        print(line)
    if args.json:
        write_json(report, args.json)
    return EXIT_OK if report.ok else EXIT_RUNTIME
