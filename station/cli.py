"""The `station` command. Errors a user can act on become one line and an exit code.

Serving commands (run, replay, subscribe) never import torch; `train` does,
lazily, and says which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from station import __version__
from station.errors import (
    EXIT_OK,
    EXIT_RUNTIME,
    ConfigError,
    MissingDependencyError,
    StationError,
)
from station.service.signals import ShutdownSignals


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _instant(text: str) -> str:
    """An ISO-8601 time as the recorder stores them (UTC, milliseconds), so they compare as instants."""
    from station.contract.timefmt import iso_utc_ceil_ms, parse_instant

    try:
        return iso_utc_ceil_ms(parse_instant(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _db_target(text: str) -> Path | str:
    """A PostgreSQL URL as given, anything else as the SQLite file's path."""
    return text if text.startswith(("postgresql://", "postgres://")) else Path(text)


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="station",
        description="Edge inspection station for bottling lines: pass/fail verdicts for every bottle over ZeroMQ.",
    )
    p.add_argument("--version", action="version", version=f"station {__version__}")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="generate procedural bottle images in MVTec AD layout")
    s.add_argument("--out", type=Path, required=True, help="folder to create; images go to OUT/bottle/…")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-good", type=_positive_int, default=60, help="good images in train/good")
    s.add_argument("--test-per-class", type=_positive_int, default=15, help="images per class in test/")
    s.add_argument("--novel", type=_positive_int, default=0, metavar="N",
                   help="also N images of unlabelled defect kinds in test/novel (not a class; for the anomaly check)")
    s.add_argument("--style", default="ring", metavar="NAME[,NAME…]|all",
                   help="renderer style: ring (ring light above, the default), dome (diffuse dome light over a "
                        "belt), backlit (light from below); a comma list cycles them image by image")

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

    t = sub.add_parser("train", help="train classifier + autoencoder and write an ONNX model bundle")
    t.add_argument("--data", type=Path, required=True, help="an MVTec category folder, e.g. data/bottle")
    t.add_argument("--out", type=Path, required=True, help="bundle folder to write, e.g. models/demo")
    t.add_argument("--epochs", type=_positive_int, default=60, help="classifier epochs")
    t.add_argument("--ae-steps", type=_positive_int, default=1000,
                   help="anomaly model training steps (batches of 8)")
    t.add_argument("--anomaly-model", default="autoencoder", choices=["autoencoder", "draem"],
                   help="autoencoder: the reconstruction autoencoder (default); draem: restore bottles from "
                        "simulated anomalies and segment them with a head (experimental, docs/models.md)")
    t.add_argument("--cross-fit-folds", type=_positive_int, default=2,
                   help="score every good training image for the threshold with a model trained without it, "
                        "over this many folds (0 or 1: hold 20 %% of them out instead)")
    t.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N; the bundle is the same")
    t.add_argument("--lighting", default="auto", choices=["auto", "front", "back"],
                   help="how the mouth is lit: front (ring or dome light above), back (light from below), or "
                        "auto: the one all training images show, recorded in the bundle (mixed: decided per frame)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=_positive_int, default=16)
    t.add_argument("--target-false-reject", type=_positive_float, default=0.01,
                   help="fraction of good bottles the anomaly threshold may reject (default 0.01)")
    t.add_argument("--backbone", default="mobilenet_v3_small",
                   choices=["mobilenet_v3_small", "resnet18", "efficientnet_b0"])
    t.add_argument("--pretrained", type=Path, default=None,
                   help="torchvision state-dict file for the backbone (never downloaded)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="classifier learning rate")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "rmsprop", "sgd"])
    t.add_argument("--balance", default="logit-adjust", choices=["weighted", "sampler", "logit-adjust", "none"],
                   help="class-imbalance handling (default: logit-adjusted cross-entropy)")
    t.add_argument("--sweep", type=Path, default=None, metavar="FILE.yaml",
                   help="train a grid of classifier settings and write OUT/sweep.md instead of a bundle")
    t.add_argument("--name", default=None, help="bundle name (default: the --out folder's name)")
    t.add_argument("--threads", type=_positive_int, default=0, help="torch CPU threads (0: all cores)")

    r = sub.add_parser("replay", help="run a recorded image folder through the station")
    r.add_argument("--model", type=Path, required=True, help="model bundle folder")
    r.add_argument("--source", type=Path, required=True, help="folder of images (recursive, sorted)")
    r.add_argument("--publish", metavar="ENDPOINT", help="bind a ZeroMQ PUB endpoint, e.g. tcp://127.0.0.1:5556")
    r.add_argument("--out", type=Path, help="write every verdict message to this JSONL file")
    r.add_argument("--metrics", type=Path, help="write the summary as JSON (default: next to --out)")
    r.add_argument("--wait-subscribers", type=_positive_int, default=0, metavar="N",
                   help="hold the first verdict until N subscribers are connected")
    r.add_argument("--wait-timeout", type=_positive_float, default=30.0, metavar="S")
    r.add_argument("--rate", type=_positive_float, default=None, metavar="FPS", help="pace frames at FPS")
    r.add_argument("--station-id", default="replay")
    r.add_argument("--drift-window", type=_positive_int, default=200, metavar="N",
                   help="drift watch over the last N bottles, in the heartbeats and the summary (0: off)")
    r.add_argument("--workers", type=int, default=0, help="inspection workers (0: one per usable core)")
    r.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per model session (0: the cores shared out among the workers)")
    _add_backend_args(r)

    e = sub.add_parser("evaluate", help="score a bundle on labelled images: metrics, plots, HTML report")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--data", type=Path, default=None,
                   help="labelled folder or MVTec category folder (default: the bundle's held-out split)")
    e.add_argument("--report", type=Path, default=None, help="folder for metrics.json, plots and report.html")
    e.add_argument("--threshold", type=float, default=None, help="anomaly threshold (default: the bundle's)")

    k = sub.add_parser("calibrate", help="recalibrate a bundle's anomaly threshold on good images from the line")
    k.add_argument("--model", type=Path, required=True)
    k.add_argument("--good", type=Path, required=True, help="folder of good bottle images (recursive)")
    k.add_argument("--target-false-reject", type=_positive_float, default=0.01,
                   help="fraction of good bottles the threshold may reject (default 0.01)")

    c = sub.add_parser("subscribe", help="print one line per verdict from a station")
    c.add_argument("--connect", required=True, metavar="ENDPOINT")
    c.add_argument("--station-id", default=None, help="only this station (default: all)")
    c.add_argument("--count", type=_positive_int, default=0, help="exit after N verdicts (0: never)")
    c.add_argument("--timeout", type=_positive_float, default=None, help="exit after S seconds of silence")
    c.add_argument("--exit-on-stop", action="store_true", help="exit when the station reports it stopped")
    c.add_argument("--json", action="store_true", help="print each verdict as its JSON message")
    _add_feed_args(c)

    keys = sub.add_parser("keys", help="CURVE keys for the verdict endpoint (docs/integration.md)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kg = keys_sub.add_parser("generate", help="write OUT/NAME.key (public) and OUT/NAME.key_secret (secret, 0600)")
    kg.add_argument("--out", type=Path, required=True, help="folder for the key files")
    kg.add_argument("--name", required=True, help="e.g. station-line1, or the bridge's host name")

    bridge = sub.add_parser("bridge", help="reference bridges from the verdict stream to PLC and MES")
    bridges = bridge.add_subparsers(dest="bridge", required=True, metavar="KIND")
    ou = bridges.add_parser("opcua", help="OPC UA server: last verdict, seq, WS Pack counters, a reject pulse")
    ou.add_argument("--listen", default="opc.tcp://0.0.0.0:4840/station/", help="the server's endpoint URL")
    ou.add_argument("--reject-pulse-ms", type=_positive_int, default=500,
                    help="how long RejectPulse stays true (0: no pulse)")
    mb = bridges.add_parser("modbus", help="Modbus TCP server: reject coil, vision handshake, counter registers")
    mb.add_argument("--listen", default="0.0.0.0:5020", metavar="HOST:PORT")
    mb.add_argument("--unit", type=_positive_int, default=1, help="Modbus unit (slave) id (0: answer every unit id)")
    me = bridges.add_parser("mes", help="append every verdict to SQLite or PostgreSQL, with gaps recorded")
    me.add_argument("--db", type=_db_target, required=True,
                    help="SQLite file (created if missing) or postgresql://user@host/db (schema created)")
    me.add_argument("--spool", type=Path, default=None, metavar="DIR",
                    help="PostgreSQL only: hold verdicts here while the database is unreachable")
    me.add_argument("--spool-max-mb", type=_positive_float, default=1024.0, metavar="N",
                    help="spool bound; a full spool stops the recorder with an error naming the file")
    me.add_argument("--metrics", default=None, metavar="HOST:PORT",
                    help="PostgreSQL only: serve Prometheus metrics (degraded, rows, lag, spool bytes)")
    me.add_argument("--retention-days", type=_positive_int, default=None,
                    help="PostgreSQL with TimescaleDB only: drop verdict chunks older than this")
    mt = bridges.add_parser("mqtt", help="verdicts and station state to an MQTT broker: plain JSON or Sparkplug B")
    mt.add_argument("--broker", required=True, metavar="URL", help="mqtt://host:port, or mqtts://host:port for TLS")
    mt.add_argument("--mode", choices=["json", "sparkplug"], default="json")
    mt.add_argument("--prefix", default="station", help="json mode: topics are PREFIX/<station>/verdict|state")
    mt.add_argument("--group", default="bottling", help="sparkplug mode: the Sparkplug group id")
    mt.add_argument("--node", default=socket.gethostname(), help="sparkplug mode: the edge node id (the bridge)")
    mt.add_argument("--client-id", default=None, help="MQTT client id (default: station-bridge-NODE)")
    mt.add_argument("--username", default=None)
    mt.add_argument("--password-file", type=Path, default=None, help="file holding the password (not on argv)")
    mt.add_argument("--tls-ca", type=Path, default=None, help="CA bundle that signed the broker's certificate")
    mt.add_argument("--tls-cert", type=Path, default=None, help="client certificate, for brokers that ask for one")
    mt.add_argument("--tls-key", type=Path, default=None)
    mt.add_argument("--keepalive", type=_positive_int, default=15, help="seconds; the will fires after 1.5x")
    for bp in (ou, mb, me, mt):
        many = bp in (me, mt)
        bp.add_argument("--connect", required=True, metavar="ENDPOINT", action="append" if many else "store",
                        help="the station's verdict endpoint" + (" (repeat for several stations)" if many else ""))
        bp.add_argument("--station-id", default=None, help="only this station (default: all)")
        _add_feed_args(bp)

    ps = sub.add_parser("plantsim", help="load test: simulated stations into one PostgreSQL recorder (and MQTT)")
    ps.add_argument("--db", required=True, help="postgresql://… (the recorder's database)")
    ps.add_argument("--broker", default=None, metavar="URL", help="also run an MQTT bridge to mqtt://host:port")
    ps.add_argument("--stations", type=_positive_int, default=20)
    ps.add_argument("--rate", type=_positive_float, default=60.0, help="verdicts per second per station")
    ps.add_argument("--count", type=_positive_int, default=600, help="verdicts per station")
    ps.add_argument("--json", action="store_true", help="print the report as one JSON object too")

    mq = sub.add_parser("mes-query", help="query the MES recorder's database: verdicts, counts, gaps")
    mq.add_argument("--db", type=_db_target, required=True, help="SQLite file or postgresql://… URL")
    mq.add_argument("--verdict", choices=["pass", "fail", "skipped"], default=None)
    mq.add_argument("--since", type=_instant, default=None, metavar="ISO8601",
                    help="captured at or after this time (any ISO-8601 offset; none means UTC)")
    mq.add_argument("--until", type=_instant, default=None, metavar="ISO8601",
                    help="captured before this time (any ISO-8601 offset; none means UTC)")
    mq.add_argument("--run-id", default=None)
    mq.add_argument("--gaps", action="store_true", help="list the recorded gaps instead of verdicts")
    mq.add_argument("--summary", action="store_true", help="counts by run and verdict instead of verdicts")
    mq.add_argument("--limit", type=_positive_int, default=0, help="at most N rows (0: all)")
    mq.add_argument("--json", action="store_true", help="one JSON object per line")

    n = sub.add_parser("run", help="run the station as a long-running service")
    n.add_argument("--config", type=Path, required=True, help="station.yaml")

    b = sub.add_parser("bench", help="measure per-stage latency, throughput and latency at an offered rate")
    b.add_argument("--model", type=Path, required=True)
    b.add_argument("--source", default="synth", metavar="synth|FOLDER",
                   help="bottles rendered in memory (default) or the images of a folder")
    b.add_argument("--frames", type=_positive_int, default=300)
    _add_backend_args(b)
    b.add_argument("--workers", type=int, default=0, help="inspection workers (0: one per usable core)")
    b.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per model session (0: the cores shared out among the workers)")
    b.add_argument("--rate", type=_positive_float, default=20.0, metavar="FPS",
                   help="offered frame rate for the latency measurement")
    b.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    b.add_argument("--baseline-precision", default=None, metavar="PRECISION",
                   help="also measure the station at this precision (e.g. fp32) in the same run, and the ratio")

    so = sub.add_parser("soak", help="many frames through the daemon to an outside subscriber: nothing lost, "
                                     "memory flat (exit 1 if not)")
    so.add_argument("--model", type=Path, required=True)
    so.add_argument("--frames", type=_positive_int, default=100_000)
    so.add_argument("--workers", type=int, default=0, help="inspection workers (0: one per usable core)")
    so.add_argument("--threads", type=int, default=0, help="intra-op threads per model session")
    so.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the figures as JSON")
    _add_backend_args(so)

    from station.training.loso import add_parser as add_loso_parser

    add_loso_parser(sub)

    # `station ui` parses its own words (station/ui/cli.py), so the station's commands never import the UI.
    ui = sub.add_parser("ui", help="the operator's web page; `station ui export`: reviewed rejects for training",
                        add_help=False, prefix_chars="+")
    ui.add_argument("ui_args", nargs=argparse.REMAINDER, metavar="ARGS", help="see `station ui --help`")

    x = sub.add_parser("export", help="write FP16 or INT8 (Q/DQ) copies of a bundle's ONNX files into it "
                                      "(needs the train extra)")
    x.add_argument("--model", type=Path, required=True)
    x.add_argument("--precision", required=True, choices=["fp16", "int8"])
    x.add_argument("--calibration", type=Path, default=None, metavar="DIR",
                   help="INT8: images to calibrate on (default: the bundle's training images, good and defective)")
    x.add_argument("--check", type=Path, default=None, metavar="DIR",
                   help="then compare each converted file with FP32 on this labelled folder; exit 1 if one fails")

    g = sub.add_parser("build-engine", help="build TensorRT engines of a bundle for this GPU (cached in the bundle)")
    g.add_argument("--model", type=Path, required=True)
    g.add_argument("--precision", default="fp16", metavar="fp16|fp32|int8|classifier=P,autoencoder=P",
                   help="which of the bundle's ONNX files to build from (fp16, int8: made by station export)")
    g.add_argument("--calibration", type=Path, default=None, help=argparse.SUPPRESS)
    g.add_argument("--workspace-mb", type=_positive_int, default=1024, help="builder memory pool limit")
    g.add_argument("--max-batch", type=_positive_int, default=0, metavar="N",
                   help="also accept batches 1…N (default: the batch the station runs each model with)")
    g.add_argument("--force", action="store_true", help="rebuild even when valid engines are cached")
    return p


def _add_feed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-server-key", type=Path, default=None, metavar="FILE.key",
                   help="the station's public key: connect with CURVE encryption")
    p.add_argument("--curve-client-key", type=Path, default=None, metavar="FILE.key_secret",
                   help="this client's secret key; its .key must be in the station's allowed_clients")


def _client_keys(args: argparse.Namespace) -> Any:
    from station.service.security import ClientKeys

    if (args.curve_server_key is None) != (args.curve_client_key is None):
        raise ConfigError("--curve-server-key and --curve-client-key go together")
    return ClientKeys(args.curve_server_key, args.curve_client_key) if args.curve_server_key else None


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: TensorRT where a GPU and TensorRT are present, else ONNX Runtime (default)")
    p.add_argument("--precision", default="auto", metavar="auto|fp32|fp16|int8|classifier=P,autoencoder=P",
                   help="the models' precision on either backend (default auto: the measured best the bundle has)")


def _backend_spec(args: argparse.Namespace, plan: Any, precision: str | None = None) -> Any:
    from station.core.backends import BackendSpec

    return BackendSpec(args.backend, threads=plan.threads_per_session, precision=precision or args.precision,
                       slots=plan.workers)


# -- handlers -------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
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


def cmd_perturb(args: argparse.Namespace) -> int:
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


def cmd_train(args: argparse.Namespace) -> int:
    try:
        from station.training.train import TrainOptions, pick_device, train_bundle
    except ImportError as exc:
        raise MissingDependencyError(
            f"`station train` needs the train extra (torch, torchvision, onnx): "
            f"pip install 'station[train]' ({exc})"
        ) from exc
    options = TrainOptions(
        data=args.data, out=args.out, epochs=args.epochs,
        ae_steps=args.ae_steps,
        seed=args.seed, batch_size=args.batch_size, target_false_reject=args.target_false_reject,
        name=args.name or args.out.name, threads=args.threads, backbone=args.backbone,
        pretrained=args.pretrained, lr=args.lr, optimizer=args.optimizer, balance=args.balance,
        anomaly_model=args.anomaly_model, cross_fit_folds=args.cross_fit_folds, device=pick_device(args.device),
        lighting=args.lighting,
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from station.core.accuracy import format_confusion
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.evaluate import check_lines, folder_items, holdout_items, metrics, run_evaluation, write_report

    bundle = load_bundle(args.model)
    items = folder_items(args.data, bundle.manifest.classes) if args.data else holdout_items(bundle)

    pipeline = Pipeline(bundle, anomaly_threshold=args.threshold)
    result = run_evaluation(pipeline, items, keep_overlays=args.report is not None)
    figures = metrics(result, pipeline)

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{figures['images']} images; 4-class accuracy {fmt(figures['accuracy'])}; image AUROC "
          f"{fmt(figures['image_auroc'])}; pixel AUROC {fmt(figures['pixel_auroc'])}")
    print(f"at threshold {figures['threshold']:.4g}: defective rejected {fmt(figures['defects_rejected'])}, "
          f"good passed {fmt(figures['good_passed'])}")
    print("per class: " + ", ".join(
        f"{k} P {fmt(v['precision'])} R {fmt(v['recall'])}" for k, v in figures["per_class"].items()))
    print("image AUROC per defect: " + ", ".join(f"{k} {fmt(v)}" for k, v in figures["image_auroc_per_defect"].items()))
    cm = figures["confusion_matrix"]
    print(format_confusion(cm["rows_true_cols_predicted"], cm["classes"]))
    print("\n".join(check_lines(figures)))
    if args.report:
        try:
            written = write_report(result, figures, args.report)
        except ImportError as exc:
            raise MissingDependencyError(
                f"the report's plots need matplotlib: pip install 'station[train]' ({exc})"
            ) from exc
        print(f"report: {written[-1]}")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from station.core.bundle import load_bundle
    from station.core.folders import list_images
    from station.sources.folder import load_frame
    from station.tools.calibrate import recalibrate

    bundle = load_bundle(args.model)
    if not args.good.is_dir():
        raise ConfigError(f"--good {args.good} does not exist or is not a folder")
    paths = list_images(args.good)
    if not paths:
        raise ConfigError(f"--good {args.good} holds no images")
    frames = [load_frame(p, n, args.good, "calibrate", None) for n, p in enumerate(paths)]
    old = bundle.manifest.anomaly.threshold
    threshold, method = recalibrate(bundle, frames, args.target_false_reject)
    print(f"{args.model}: anomaly threshold {old:.5g} → {threshold:.5g} ({method})")
    return EXIT_OK


class JsonlSink:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f: TextIO = path.open("w", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise ConfigError(f"cannot write verdicts to {path}: {exc}") from exc

    def __call__(self, _verdict: Any, message: dict[str, Any]) -> None:
        self._f.write(json.dumps(message, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()


def cmd_replay(args: argparse.Namespace) -> int:
    import structlog

    from station.core import parallelism
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.service.daemon import Station
    from station.service.publish import VerdictPublisher
    from station.service.replay import ReplayCollector, format_summary
    from station.sources.folder import FolderReplaySource

    log = structlog.get_logger("station.replay")
    bundle = load_bundle(args.model)
    source = FolderReplaySource(args.source, bundle.manifest.classes, rate=args.rate)
    plan = parallelism.plan(args.workers, args.threads)
    parallelism.apply(plan)
    if 0 < args.drift_window < 20:
        raise ConfigError(f"--drift-window {args.drift_window}: use 20 or more bottles, or 0 for no drift watch")
    pipeline = Pipeline(bundle, backend=_backend_spec(args, plan), drift_window=args.drift_window or None)
    pipeline.warm_up()
    run_id = uuid.uuid4().hex
    publisher = VerdictPublisher(args.publish, args.station_id, run_id) if args.publish else None
    collector = ReplayCollector(bundle.manifest.classes)
    sinks: list[Callable[..., None]] = [collector]
    jsonl = JsonlSink(args.out) if args.out else None
    if jsonl:
        sinks.append(jsonl)
    with ShutdownSignals() as signals:
        try:
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
            station = Station(pipeline, source, args.station_id, run_id, publisher, sinks, workers=plan.workers)
            counters = station.run(signals.stop, signals.finish_now)
        finally:
            if jsonl:
                jsonl.close()
            if publisher:
                publisher.close()
    summary = collector.summary()
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


def _format_verdict_line(m: dict[str, Any]) -> str:
    verdict = str(m.get("verdict", "?")).upper()
    head = f"#{m.get('seq', '?'):<5} {verdict:<7}"
    total = m.get("latency_ms", {}).get("total")
    tail = f"{m.get('frame_id', '')}" + (f"  {total:.1f} ms" if isinstance(total, (int, float)) else "")
    if m.get("error"):
        err = m["error"]
        return f"{head} error {err.get('reason')}: {err.get('detail')}  [{tail}]"
    if verdict == "SKIPPED":
        return f"{head} {','.join(m.get('reasons', []))}  {tail}"
    cls = m.get("class") or {}
    an = m.get("anomaly") or {}
    reasons = ",".join(m.get("reasons", []))
    truth = m.get("truth")
    return (
        f"{head} {cls.get('label', '?'):<14} {cls.get('confidence', 0):.2f}  "
        f"anomaly {an.get('score', 0):.4f}/{an.get('threshold', 0):.4f}"
        + (f"  [{reasons}]" if reasons else "")
        + (f"  truth={truth}" if truth else "")
        + f"  {tail}"
    )


def cmd_subscribe(args: argparse.Namespace) -> int:
    from station.bridges.feed import VerdictFeed

    feed = VerdictFeed(args.connect, station=args.station_id, curve=_client_keys(args))
    tracker = feed.tracker
    outcome: dict[str, int] = {}
    with ShutdownSignals() as signals:
        try:
            _subscribe_loop(args, feed, signals.stop, outcome)
        finally:
            feed.close()
    parts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.items()))
    print(f"subscribe: {sum(outcome.values())} verdicts ({parts}); {tracker.gaps} gaps, {tracker.missed} missed",
          file=sys.stderr, flush=True)
    return EXIT_OK


def _subscribe_loop(args: argparse.Namespace, feed: Any, stop: threading.Event, outcome: dict[str, int]) -> None:
    """Print verdicts until stopped, the count is reached, the station stops (--exit-on-stop) or silence."""
    tracker = feed.tracker
    received = 0
    while not stop.is_set():
        event = feed.next(args.timeout if args.timeout else 0.5)
        if event is None:
            if args.timeout:
                print(f"subscribe: no message for {args.timeout:g} s, exiting", file=sys.stderr)
                return
            continue
        for note in event.notes:
            print(f"subscribe: warning: {note}", file=sys.stderr, flush=True)
        m = event.message
        if event.kind == "heartbeat":
            stopped = m.get("state") == "stopped" and m.get("run_id") == tracker.run_id
            if args.exit_on_stop and stopped and m.get("next_seq") == tracker.expected:
                return
            continue
        if event.kind == "welcome":
            print(f"subscribe: connected to {m.get('station')} run {m.get('run_id')}, state {m.get('state')}, "
                  f"next seq {m.get('next_seq')}", file=sys.stderr, flush=True)
            continue
        received += 1
        outcome[m.get("verdict", "?")] = outcome.get(m.get("verdict", "?"), 0) + 1
        line = json.dumps(m, ensure_ascii=False) if args.json else _format_verdict_line(m)
        print(line, flush=True)
        if args.count and received >= args.count:
            return


def cmd_keys(args: argparse.Namespace) -> int:
    from station.service.security import generate_keys

    public, secret = generate_keys(args.out, args.name)
    print(f"public key (hand out; clients' go in the station's allowed_clients folder): {public}")
    print(f"secret key (keep on this machine, mode 0600): {secret}")
    return EXIT_OK


BRIDGE_EXTRA = {"opcua": "asyncua", "modbus": "pymodbus", "mes": None, "mqtt": "paho"}


def cmd_bridge(args: argparse.Namespace) -> int:
    import importlib
    import importlib.util

    from station.bridges.feed import VerdictFeed

    needed = BRIDGE_EXTRA[args.bridge]
    if needed is not None and importlib.util.find_spec(needed) is None:
        raise MissingDependencyError(f"the {args.bridge} bridge needs {needed}: pip install 'station[bridges]'")
    module = importlib.import_module(f"station.bridges.{args.bridge}")
    feed: VerdictFeed
    if args.bridge in ("mes", "mqtt"):
        from station.bridges.mes_recorder import MultiFeed

        if args.bridge == "mes" and isinstance(args.db, str):
            module = importlib.import_module("station.bridges.mes_recorder")
        elif args.bridge == "mes" and (args.spool is not None or args.metrics is not None):
            raise ConfigError("--spool and --metrics need --db postgresql://…; the SQLite file is local")
        endpoints: list[str] = args.connect
        args.connect = endpoints[0] if len(endpoints) == 1 else endpoints
        feed = MultiFeed(endpoints, station=args.station_id, curve=_client_keys(args))
    else:
        feed = VerdictFeed(args.connect, station=args.station_id, curve=_client_keys(args))
    with ShutdownSignals() as signals:
        try:
            rc: int = module.run(args, feed, signals.stop)
        finally:
            feed.close()
    return rc


def cmd_plantsim(args: argparse.Namespace) -> int:
    from station.bridges.mes_pg import is_pg_url
    from station.tools.plantsim import plantsim

    if not is_pg_url(args.db):
        raise ConfigError(f"--db {args.db!r}: plantsim needs a postgresql://… URL")
    report = plantsim(args.stations, args.rate, args.count, args.db, args.broker, sys.stderr)
    if args.json:
        print(json.dumps(report))
    ok = report["rows_written"] == report["published"] and report["gaps"] == 0
    return EXIT_OK if ok else EXIT_RUNTIME


def cmd_mes_query(args: argparse.Namespace) -> int:
    from station.bridges.mes import query

    if isinstance(args.db, str):
        from station.bridges.mes_pg import query_rows

        rows = query_rows(args.db, args)
        for d in rows:
            print(json.dumps(d) if args.json else "  ".join("" if v is None else str(v) for v in d.values()))
        print(f"mes-query: {len(rows)} rows", file=sys.stderr)
        return EXIT_OK
    return query(args)


def _build_pipeline(config: Any, plan: Any) -> Any:
    from station.core.backends import BackendSpec
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline

    inference = config.inference
    backend = BackendSpec(inference.backend, threads=plan.threads_per_session, precision=inference.precision,
                          build_engines=inference.build_engines, slots=plan.workers)
    pipeline = Pipeline(
        load_bundle(config.model), backend=backend,
        class_confidence=config.decision.class_confidence, anomaly_threshold=config.decision.anomaly_threshold,
        classifier_min_anomaly=config.decision.classifier_min_anomaly,
        drift_window=config.drift.window if config.drift.enabled else None,
    )
    pipeline.warm_up()
    return pipeline


def cmd_run(args: argparse.Namespace) -> int:
    from station.service.config import load_config
    from station.service.logsetup import configure_logging

    config = load_config(args.config)
    configure_logging(args.log_level or config.log_level)
    reload_requested = threading.Event()
    # Installed before the models load: a SIGTERM during start-up is a clean stop, not a kill.
    with ShutdownSignals(on_hup=reload_requested.set) as signals:
        return _run_station(args, config, signals, reload_requested)


def _run_station(args: argparse.Namespace, config: Any, signals: ShutdownSignals,
                 reload_requested: threading.Event) -> int:
    import structlog

    from station.core import parallelism
    from station.service.archive import RejectArchive
    from station.service.config import load_config
    from station.service.daemon import Station
    from station.service.prometheus import StationMetrics
    from station.service.publish import VerdictPublisher
    from station.service.sdnotify import Notifier, watchdog_interval_s
    from station.service.security import ServerKeys
    from station.service.source_factory import build_source

    log = structlog.get_logger("station.run")
    source = build_source(config.source)
    # One plan for the run: workers are threads started once, so a reload keeps the sessions' threads too.
    plan = parallelism.plan(config.inference.workers, config.inference.threads)
    parallelism.apply(plan)
    pipeline = _build_pipeline(config, plan)
    manifest = pipeline.bundle.manifest
    archive = (RejectArchive(config.archive, manifest.canonical_size, manifest.view.radius_margin)
               if config.archive.path is not None else None)
    run_id = uuid.uuid4().hex
    curve = config.publish.curve
    publisher = VerdictPublisher(
        config.publish.endpoint, config.station_id, run_id,
        curve=ServerKeys(curve.secret_key, curve.allowed_clients) if curve is not None else None,
    )
    sinks: list[Any] = []
    jsonl = JsonlSink(config.output.jsonl) if config.output.jsonl else None
    if jsonl:
        sinks.append(jsonl)
    if archive:
        sinks.append(archive)

    def reload() -> Any:
        """SIGHUP: re-read the config and load its bundle; what needs a restart is said, not applied."""
        new = load_config(args.config)
        for key in ("station_id", "source", "publish", "output", "metrics", "archive"):
            if getattr(new, key) != getattr(config, key):
                log.warning("reload_needs_restart", key=key)
        if (new.inference.workers, new.inference.threads) != (config.inference.workers, config.inference.threads):
            log.warning("reload_needs_restart", key="inference.workers/threads")
        return _build_pipeline(new, plan)

    notifier = Notifier()
    metrics: StationMetrics | None = None
    station = Station(pipeline, source, config.station_id, run_id, publisher, sinks,
                      queue_size=config.inference.queue_size, workers=plan.workers,
                      heartbeat_interval_s=config.publish.heartbeat_interval_s,
                      notifier=notifier, watchdog_interval_s=watchdog_interval_s(), reloader=reload,
                      reload_requested=reload_requested)

    def read_station() -> dict[str, Any]:
        return {**station.snapshot(), "archive": archive.snapshot() if archive else None}

    try:
        if config.metrics.listen is not None:
            metrics = StationMetrics(read_station)
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
        station.run(signals.stop, signals.finish_now)
    finally:
        if archive:
            archive.close()
        if jsonl:
            jsonl.close()
        if metrics:
            metrics.close()
        publisher.close()
        notifier.close()
    if station.source_error is not None:
        log.error("station_failed", error=str(station.source_error))
        return station.source_error.exit_code
    return EXIT_OK


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


def cmd_bench(args: argparse.Namespace) -> int:
    from station.core import parallelism
    from station.core.backends import precision_arg, resolve_precision
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.bench import folder_images, format_report, run_bench, synth_images

    bundle = load_bundle(args.model)
    plan = parallelism.plan(args.workers, args.threads)
    parallelism.apply(plan)
    pipeline = Pipeline(bundle, backend=_backend_spec(args, plan))
    pipeline.warm_up()
    if args.source == "synth":
        print(f"bench: rendering {args.frames} bottles", file=sys.stderr)
        images = synth_images(args.frames)
    else:
        images = folder_images(Path(args.source), args.frames)
    baseline = None
    if args.baseline_precision is not None:
        baseline = Pipeline(bundle, backend=_backend_spec(args, plan, args.baseline_precision))
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


def cmd_soak(args: argparse.Namespace) -> int:
    from station.core import parallelism
    from station.core.bundle import load_bundle
    from station.core.pipeline import Pipeline
    from station.tools.soak import soak, write_json

    plan = parallelism.plan(args.workers, args.threads)
    parallelism.apply(plan)
    pipeline = Pipeline(load_bundle(args.model), backend=_backend_spec(args, plan))
    pipeline.warm_up()
    print(f"soak: {args.frames} frames, {plan.workers} workers, backend {pipeline.inspector.backend}",
          file=sys.stderr)
    report = soak(pipeline, args.frames, plan.workers)
    for line in report.lines():
        print(line)
    if args.json:
        write_json(report, args.json)
    return EXIT_OK if report.ok else EXIT_RUNTIME


def cmd_loso(args: argparse.Namespace) -> int:
    from station.training.loso import cmd_loso as run

    return run(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from station.ui.cli import main as ui_main

    return ui_main(args.ui_args)


def cmd_export(args: argparse.Namespace) -> int:
    from station.tools.convert import export, format_parity, parity, per_file_configs

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
    return EXIT_OK if all(c["ok"] for c in figures["configs"].values()) else EXIT_RUNTIME


def cmd_build_engine(args: argparse.Namespace) -> int:
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


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "synth": cmd_synth,
    "perturb": cmd_perturb,
    "train": cmd_train,
    "replay": cmd_replay,
    "subscribe": cmd_subscribe,
    "evaluate": cmd_evaluate,
    "calibrate": cmd_calibrate,
    "run": cmd_run,
    "bench": cmd_bench,
    "build-engine": cmd_build_engine,
    "export": cmd_export,
    "soak": cmd_soak,
    "keys": cmd_keys,
    "bridge": cmd_bridge,
    "mes-query": cmd_mes_query,
    "plantsim": cmd_plantsim,
    "ui": cmd_ui,
    "loso": cmd_loso,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        from station.service.logsetup import configure_logging

        # bench runs the station several times: its lifecycle lines would bury the report.
        configure_logging(args.log_level or ("warning" if args.command in ("bench", "soak") else "info"))
    try:
        return HANDLERS[args.command](args)
    except StationError as exc:
        print(f"station {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"station {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
