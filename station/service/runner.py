"""`station run`: the station's resources built from station.yaml, and closed in reverse on any exit.

Each resource is pushed on one ExitStack as it is made, so a failure at any
step of the start-up (a bound endpoint, an unwritable JSONL file, a metrics port
in use) closes exactly what was opened before it, and a clean stop closes them
all: metrics server, notifier, JSONL file, publisher, reject archive (which
writes what it still holds). The signal handlers stay installed around all of it.
"""

from __future__ import annotations

import threading
import uuid
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import structlog

from station.core import parallelism
from station.core.backends import BackendSpec
from station.core.bundle import load_bundle
from station.core.pipeline import Pipeline
from station.errors import EXIT_OK
from station.service.archive import RejectArchive
from station.service.config import StationConfig, load_config
from station.service.daemon import Sink, Station, StationHooks, StationSettings
from station.service.jsonl import JsonlSink
from station.service.logsetup import configure_logging
from station.service.prometheus import StationMetrics
from station.service.publish import VerdictPublisher
from station.service.sdnotify import Notifier, watchdog_interval_s
from station.service.security import ServerKeys
from station.service.signals import ShutdownSignals
from station.service.source_factory import build_source

log = structlog.get_logger("station.run")

#: sections a SIGHUP re-reads but cannot apply to a running station
RESTART_KEYS = ("station_id", "source", "publish", "output", "metrics", "archive")


def build_pipeline(config: StationConfig, plan: parallelism.Plan) -> Pipeline:
    inference = config.inference
    backend = BackendSpec(inference.backend, threads=plan.threads_per_session, precision=inference.precision,
                          build_engines=inference.build_engines, slots=plan.workers)
    pipeline = Pipeline(
        load_bundle(config.model), backend=backend,
        class_confidence=config.decision.class_confidence, anomaly_threshold=config.decision.anomaly_threshold,
        classifier_min_anomaly=config.decision.classifier_min_anomaly, defect_rule=config.decision.defect_rule,
        drift_window=config.drift.window if config.drift.enabled else None,
    )
    pipeline.warm_up()
    return pipeline


def run_station(config_path: Path, log_level: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (drained) or the source fails; the exit code.

    StationErrors raised while starting (config, bundle, endpoint, …) propagate to the caller, after
    everything opened before them is closed.
    """
    config = load_config(config_path)
    configure_logging(log_level or config.log_level)
    reload_requested = threading.Event()
    # Installed before the models load: a SIGTERM during start-up is a clean stop, not a kill. Left last,
    # so a signal while the resources close is still a clean stop.
    with ShutdownSignals(on_hup=reload_requested.set) as signals:
        with ExitStack() as resources:
            station = _start(config_path, config, resources, signals, reload_requested)
            station.run(signals.stop, signals.finish_now)
        if station.source_error is not None:
            log.error("station_failed", error=str(station.source_error))
            return station.source_error.exit_code
        return EXIT_OK


def _start(config_path: Path, config: StationConfig, resources: ExitStack, signals: ShutdownSignals,
           reload_requested: threading.Event) -> Station:
    """Everything `station run` needs, each pushed on ``resources`` as it is opened; the station, ready."""
    source = build_source(config.source)
    # One plan for the run: workers are threads started once, so a reload keeps the sessions' threads too.
    plan = parallelism.plan(config.inference.workers, config.inference.threads)
    parallelism.apply(plan)
    pipeline = build_pipeline(config, plan)
    manifest = pipeline.bundle.manifest
    archive: RejectArchive | None = None
    if config.archive.path is not None:
        archive = resources.enter_context(
            closing(RejectArchive(config.archive, manifest.canonical_size, manifest.view.radius_margin)))
    run_id = uuid.uuid4().hex
    curve = config.publish.curve
    publisher = resources.enter_context(closing(VerdictPublisher(
        config.publish.endpoint, config.station_id, run_id,
        curve=ServerKeys(curve.secret_key, curve.allowed_clients) if curve is not None else None,
    )))
    sinks: list[Sink] = []
    if config.output.jsonl:
        sinks.append(resources.enter_context(closing(JsonlSink(config.output.jsonl))))
    if archive:
        sinks.append(archive)

    def reload() -> Pipeline:
        """SIGHUP: re-read the config and load its bundle; what needs a restart is said, not applied."""
        new = load_config(config_path)
        for key in RESTART_KEYS:
            if getattr(new, key) != getattr(config, key):
                log.warning("reload_needs_restart", key=key)
        if (new.inference.workers, new.inference.threads) != (config.inference.workers, config.inference.threads):
            log.warning("reload_needs_restart", key="inference.workers/threads")
        return build_pipeline(new, plan)

    notifier = resources.enter_context(closing(Notifier()))
    settings = StationSettings(config.station_id, run_id, workers=plan.workers, queue_size=config.inference.queue_size,
                               heartbeat_interval_s=config.publish.heartbeat_interval_s,
                               watchdog_interval_s=watchdog_interval_s())
    station = Station(pipeline, source, settings, publisher,
                      StationHooks(sinks=sinks, notifier=notifier, reloader=reload, reload_requested=reload_requested))

    def read_station() -> dict[str, Any]:
        return {**station.snapshot(), "archive": archive.snapshot() if archive else None}

    if config.metrics.listen is not None:
        metrics = resources.enter_context(closing(StationMetrics(read_station)))
        metrics.serve(config.metrics.listen)
        station.on_verdict = metrics.observe
    if archive:
        archive.start()
    wanted = config.publish.wait_subscribers
    if wanted:
        got = publisher.wait_for_subscribers(wanted, config.publish.wait_timeout_s, signals.stop)
        if got < wanted:
            log.warning("subscribers_missing", wanted=wanted, connected=got, endpoint=config.publish.endpoint)
    log.info("station_ready", station=config.station_id, model=pipeline.bundle.label,
             source=source.describe(), endpoint=config.publish.endpoint, run_id=run_id,
             metrics=config.metrics.listen, archive=str(config.archive.path) if archive else None,
             systemd=notifier.enabled)
    return station
