"""`station replay`: a recorded image folder through the station, with a summary at the end."""

from __future__ import annotations

import argparse
import json
import uuid
from contextlib import ExitStack, closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from station.cli._args import (
    add_backend_args,
    add_worker_args,
    backend_spec,
    non_negative_int,
    positive_float,
)
from station.errors import EXIT_OK, EXIT_RUNTIME, ConfigError, DatasetError, StationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from station.cli._args import Subparsers


def register(sub: Subparsers) -> None:
    r = sub.add_parser("replay", help="run a recorded image folder through the station")
    r.add_argument("--model", type=Path, required=True, help="model bundle folder")
    r.add_argument("--source", type=Path, required=True, help="folder of images (recursive, sorted)")
    r.add_argument("--publish", metavar="ENDPOINT", help="bind a ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556")
    r.add_argument("--out", type=Path, help="write every verdict message to this JSONL file")
    r.add_argument("--metrics", type=Path, help="write the summary as JSON (default: next to --out)")
    r.add_argument("--wait-subscribers", type=non_negative_int, default=0, metavar="N",
                   help="hold the first verdict until N subscribers are connected")
    r.add_argument("--wait-timeout", type=positive_float, default=30.0, metavar="S")
    r.add_argument("--rate", type=positive_float, default=None, metavar="FPS", help="pace frames at FPS")
    r.add_argument("--station-id", default="replay")
    r.add_argument("--drift-window", type=non_negative_int, default=200, metavar="N",
                   help="drift watch over the last N bottles, in the heartbeats and the summary (0: off)")
    add_worker_args(r, "intra-op threads per model session (0: the cores shared out among the workers)")
    add_backend_args(r)
    r.set_defaults(handler=handle)


def _check_folder(root: Path) -> None:
    # The folder is the command's input, so a wrong one is a usage error (exit 2) like evaluate's and
    # bench's; the source's own SourceError (exit 1) is for a folder that goes away during the run.
    if not root.exists():
        raise DatasetError(f"replay folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"replay source {root} is not a folder")


def handle(args: argparse.Namespace) -> int:
    import structlog

    from station.core import parallelism
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.service.daemon import Station, StationHooks, StationSettings
    from station.service.jsonl import JsonlSink
    from station.service.publish import VerdictPublisher
    from station.service.replay import ReplayCollector, format_summary
    from station.service.signals import ShutdownSignals
    from station.sources.folder import FolderReplaySource

    log = structlog.get_logger("station.replay")
    bundle = load_bundle(args.model)
    _check_folder(args.source)
    source = FolderReplaySource(args.source, bundle.manifest.classes, rate=args.rate)
    plan = parallelism.plan(args.workers, args.threads)
    parallelism.apply(plan)
    if 0 < args.drift_window < 20:
        raise ConfigError(f"--drift-window {args.drift_window}: use 20 or more bottles, or 0 for no drift watch")
    pipeline = Pipeline(bundle, backend=backend_spec(args, plan), drift_window=args.drift_window or None)
    pipeline.warm_up()
    run_id = uuid.uuid4().hex
    collector = ReplayCollector(bundle.manifest.classes)
    sinks: list[Callable[..., None]] = [collector]
    # Closed in reverse: the sinks, the publisher, then the signal handlers.
    with ExitStack() as resources:
        signals = resources.enter_context(ShutdownSignals())
        publisher = (resources.enter_context(closing(VerdictPublisher(args.publish, args.station_id, run_id)))
                     if args.publish else None)
        if args.out:
            sinks.append(resources.enter_context(closing(JsonlSink(args.out))))
        if publisher and args.wait_subscribers:
            log.info("waiting_for_subscribers", wanted=args.wait_subscribers, endpoint=args.publish)
            got = publisher.wait_for_subscribers(args.wait_subscribers, args.wait_timeout, signals.stop)
            if got < args.wait_subscribers and not signals.stop.is_set():
                raise StationError(
                    f"only {got} of {args.wait_subscribers} subscribers connected to {args.publish} "
                    f"within {args.wait_timeout:g} s"
                )
        log.info("replay_start", source=source.describe(), model=bundle.label, run_id=run_id)
        collector.restart_clock()
        station = Station(pipeline, source, StationSettings(args.station_id, run_id, workers=plan.workers),
                          publisher, StationHooks(sinks=sinks))
        counters = station.run(signals.stop, signals.finish_now)
    summary: dict[str, Any] = collector.summary()
    summary.update(model=bundle.manifest.name, version=bundle.manifest.version, source=str(args.source),
                   run_id=run_id, counters=counters.snapshot())
    if pipeline.drift is not None:
        summary["drift"] = {**pipeline.drift.snapshot(), "drifting": pipeline.drift.report()}
    metrics_path = args.metrics or (args.out.with_suffix(".metrics.json") if args.out else None)
    if metrics_path:
        metrics_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(format_summary(summary))
    if pipeline.drift is not None:
        print(pipeline.drift.summary_line())
    if metrics_path:
        print(f"metrics written to {metrics_path}")
    return EXIT_RUNTIME if station.source_error else EXIT_OK
