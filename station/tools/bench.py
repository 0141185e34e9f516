"""`station bench`: where a frame's time goes, and what the station sustains, measured in one run.

Shared machines are noisy, so everything is measured in the same run on the
same images and compared as ratios: bare inference of the models, a naive
sequential loop (decode → preprocess → infer → decide → publish, one frame at
a time), and the station itself (its threads and queues) on in-memory camera
frames, on PNG files replayed from disk, and at an offered frame rate.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from station.core.decide import decide
from station.core.folders import DEFECT_CLASSES, is_image_file
from station.core.frame import Frame
from station.core.imageio import read_image
from station.core.pipeline import Pipeline
from station.core.preprocess import PreprocessSpec, preprocess
from station.core.report_format import percentile
from station.errors import DatasetError, FrameError
from station.service.daemon import Station, StationHooks, StationSettings
from station.service.publish import Subscriber, VerdictPublisher
from station.sources import OnOverload, SourceBase
from station.sources.folder import FolderReplaySource, load_frame
from station.tools.synth import render_bottle

STAGES = ("decode", "preprocess", "autoencoder", "classifier", "anomaly_map", "decide", "publish", "total")


def summarise(values_ms: list[float]) -> dict[str, float]:
    a = np.asarray(values_ms, dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "p50": percentile(a, 50), "p99": percentile(a, 99),
            "n": int(a.size)}


class MemorySource(SourceBase):
    """Decoded frames from memory, as a camera driver hands them over (no file, no decode).

    ``rate``: offered at that many frames per second, as a live camera (surplus
    frames are skipped by the station, visibly); None: as fast as accepted.
    """

    def __init__(self, images: list[np.ndarray], rate: float | None = None, count: int | None = None) -> None:
        self.images = images
        self.rate = rate
        self.finite = rate is None
        self.on_overload: OnOverload = "wait" if rate is None else "skip"
        self.count = len(images) if count is None else count  # more than len(images): cycled

    def describe(self) -> str:
        return f"{self.count} in-memory frames" + (f" at {self.rate:g} fps" if self.rate else "")

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        start = time.monotonic()
        for seq in range(self.count):
            image = self.images[seq % len(self.images)]
            if self.rate:
                delay = start + seq / self.rate - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    return
            yield Frame(seq=seq, frame_id=f"mem/{seq}", source="bench", captured_at=time.time(),
                        captured_mono=time.monotonic(), image=image)


def bench_style(lighting: str) -> str:
    """The renderer style of the synthetic bottles `station bench` and `station soak` draw for a bundle with
    this ``view.lighting``: bottles it can locate."""
    return "backlit" if lighting == "back" else "ring"


def synth_images(n: int, seed: int = 11, style: str = "ring") -> list[np.ndarray]:
    """n bottles of ``style``, one in three defective, rendered in memory (nothing is written)."""
    rng = np.random.default_rng(seed)
    kinds: list[str | None] = [None, None, None, *DEFECT_CLASSES]
    return [render_bottle(rng, kinds[i % len(kinds)], style=style)[0] for i in range(n)]


def check_locatable(images: list[np.ndarray], names: list[str], spec: PreprocessSpec) -> None:
    """DatasetError naming the first image whose mouth this bundle cannot locate: the measurements
    need every frame inspected, and an error verdict costs a fraction of an inspection."""
    for image, name in zip(images, names, strict=True):
        try:
            preprocess(image, spec)
        except FrameError as exc:
            raise DatasetError(f"{name}: {exc.reason}: {exc.detail}; `station bench` needs bottles this "
                               f"bundle locates (view.lighting {spec.lighting})") from exc


def folder_images(folder: Path, n: int) -> tuple[list[np.ndarray], list[str]]:
    """n images of the folder (cycled), and the file each came from."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
    if not paths:
        raise DatasetError(f"no images under {folder}")
    chosen = [paths[i % len(paths)] for i in range(n)]
    return [read_image(p) for p in chosen], [str(p) for p in chosen]


@dataclass
class _Drain:
    """A subscriber on its own thread, so publishing is measured against a real reader."""

    sub: Subscriber
    received: int = 0

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            item = self.sub.receive(0.1)
            if item is not None and item.topic.startswith("verdict."):
                self.received += 1


def free_endpoint() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


class Bench:
    def __init__(self, pipeline: Pipeline, workers: int) -> None:
        self.pipeline = pipeline
        self.workers = workers

    def _publisher(self) -> tuple[VerdictPublisher, _Drain, threading.Event, threading.Thread]:
        endpoint = free_endpoint()  # each measurement its own port: a closed socket lingers on its own
        publisher = VerdictPublisher(endpoint, "bench", uuid.uuid4().hex)
        drain = _Drain(Subscriber(endpoint, station="bench"))
        stop = threading.Event()
        thread = threading.Thread(target=drain.run, args=(stop,), daemon=True)
        thread.start()
        publisher.wait_for_subscribers(1, 10.0)
        return publisher, drain, stop, thread

    def _close(self, publisher: VerdictPublisher, drain: _Drain, stop: threading.Event,
               thread: threading.Thread) -> None:
        stop.set()
        thread.join()
        drain.sub.close()
        publisher.close()

    def stages(self, pngs: list[bytes], images: list[np.ndarray]) -> dict[str, dict[str, float]]:
        """Each stage timed on its own, frame by frame."""
        per: dict[str, list[float]] = {s: [] for s in STAGES}
        for data in pngs:
            t0 = time.perf_counter()
            cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            per["decode"].append((time.perf_counter() - t0) * 1e3)
        publisher, drain, stop, thread = self._publisher()
        try:
            for seq, image in enumerate(images):
                frame = Frame(seq, f"mem/{seq}", "bench", time.time(), time.monotonic(), image=image)
                verdict = self.pipeline.process(frame)
                t0 = time.perf_counter()
                publisher.publish(verdict)
                per["publish"].append((time.perf_counter() - t0) * 1e3)
                for stage, ms in verdict.latency_ms.items():
                    if stage in per:
                        per[stage].append(ms)
                per["total"].append(sum(verdict.latency_ms.get(s, 0.0) for s in STAGES[1:6]) + per["publish"][-1])
        finally:
            self._close(publisher, drain, stop, thread)
        return {stage: summarise(v) for stage, v in per.items()}

    def bare_inference(self, images: list[np.ndarray], streams: int) -> float:
        """Frames per second of the two models alone, on inputs preprocessed beforehand,
        run back to back by ``streams`` threads sharing the sessions."""
        inspector = self.pipeline.inspector
        inputs = [preprocess(image, inspector.preprocess_spec) for image in images]

        def work(part: list[Any]) -> None:
            for x in part:
                inspector.inspect(x)

        threads = [threading.Thread(target=work, args=(inputs[k::streams],)) for k in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(inputs) / (time.perf_counter() - t0)

    def bare_work(self, images: list[np.ndarray], streams: int) -> float:
        """Frames per second of one frame's whole work (preprocess, both models, decide) on in-memory
        images, run back to back by ``streams`` threads: what the station does per frame, without it."""
        inspector, policy = self.pipeline.inspector, self.pipeline.policy

        def work(part: list[np.ndarray]) -> None:
            for image in part:
                decide(inspector.inspect(preprocess(image, inspector.preprocess_spec)), policy)

        threads = [threading.Thread(target=work, args=(images[k::streams],)) for k in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len(images) / (time.perf_counter() - t0)

    def bare_latency(self, images: list[np.ndarray], rate: float) -> list[float]:
        """Preprocess and both models for each image, alone on the calling thread, one every 1/rate s.

        The same work as the station's at the same offered rate, without the station: the tail of
        this is the machine's own (a shared VM's vCPU is descheduled now and then), which the
        station's latency at the offered rate is to be read against.
        """
        inspector = self.pipeline.inspector
        out = []
        start = time.monotonic()
        for seq, image in enumerate(images):
            delay = start + seq / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            inspector.inspect(preprocess(image, inspector.preprocess_spec))
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    def naive_loop(self, folder: Path) -> float:
        """read → decode → preprocess → infer → decide → publish, one frame at a time, no threads."""
        paths = sorted(folder.iterdir())
        publisher, drain, stop, thread = self._publisher()
        try:
            t0 = time.perf_counter()
            for seq, path in enumerate(paths):
                publisher.publish(self.pipeline.process(load_frame(path, seq, folder, "bench", None)))
            fps = len(paths) / (time.perf_counter() - t0)
        finally:
            self._close(publisher, drain, stop, thread)
        return fps

    def station(self, source: Any) -> tuple[float, list[float], dict[str, int]]:
        """The station's own threads and queues: (verdicts per second, total latencies, counters)."""
        publisher, drain, stop, thread = self._publisher()
        latencies: list[float] = []

        def sink(verdict: Any, _message: dict[str, Any]) -> None:
            if verdict.verdict != "skipped":
                latencies.append(verdict.latency_ms["total"])

        try:
            station = Station(self.pipeline, source, StationSettings("bench", publisher.run_id, workers=self.workers),
                              publisher, StationHooks(sinks=[sink]))
            t0 = time.perf_counter()
            counters = station.run(threading.Event())
            elapsed = time.perf_counter() - t0
        finally:
            self._close(publisher, drain, stop, thread)
        return counters.published / elapsed, latencies, counters.snapshot()


def model_precisions(pipeline: Pipeline, images: list[np.ndarray], rounds: int = 5) -> dict[str, dict[str, float]]:
    """Median ms of each model at each precision the bundle has, one ONNX Runtime thread, on the inputs
    these images give; the precisions are interleaved round by round, so a noisy machine slows all alike."""
    from station.core.backends import ROLES
    from station.core.backends.onnxruntime import OnnxRuntimeModel

    bundle, inspector = pipeline.bundle, pipeline.inspector
    inputs = [preprocess(image, inspector.preprocess_spec) for image in images[:8]]
    feeds = {"autoencoder": [[x.autoencoder] for x in inputs],
             "classifier": [inspector.classifier_batches(x, inspector.autoencoder.run(x.autoencoder)) for x in inputs]}
    models = {(role, precision): OnnxRuntimeModel(bundle.model_path(role, precision),
                                                  bundle.manifest.models[role].inputs,
                                                  bundle.manifest.models[role].output, threads=1)
              for role in ROLES for precision in ("fp32", "fp16", "int8") if bundle.has_precision(role, precision)}
    times: dict[tuple[str, str], list[float]] = {k: [] for k in models}
    for key, model in models.items():  # warm-up
        model.run(*feeds[key[0]][0])
    for _ in range(rounds):
        for key, model in models.items():
            for feed in feeds[key[0]]:
                t0 = time.perf_counter()
                model.run(*feed)
                times[key].append((time.perf_counter() - t0) * 1e3)
    out: dict[str, dict[str, float]] = {}
    for (role, precision), ms in times.items():
        out.setdefault(role, {})[precision] = float(np.median(ms))
    return out


def run_bench(pipeline: Pipeline, images: list[np.ndarray], rate: float, workers: int,
              baseline: Pipeline | None = None) -> dict[str, Any]:
    """Every measurement on ``pipeline``; with ``baseline`` (the same bundle at another precision) also
    the station's in-memory throughput and bare work on it, measured right after ``pipeline``'s."""
    bench = Bench(pipeline, workers)
    workdir = Path(tempfile.mkdtemp(prefix="station-bench-"))
    try:
        pngs = []
        for n, image in enumerate(images):
            ok, buf = cv2.imencode(".png", image)
            if not ok:
                raise DatasetError("PNG encoding failed")
            pngs.append(bytes(buf))
            (workdir / f"{n:05d}.png").write_bytes(pngs[-1])
        stages = bench.stages(pngs, images)
        models_ms = model_precisions(pipeline, images)
        bare = bench.bare_inference(images, 1)
        bare_parallel = bench.bare_inference(images, workers)
        work_parallel = bench.bare_work(images, workers)
        naive = bench.naive_loop(workdir)
        memory_fps, memory_lat, _ = bench.station(MemorySource(images))
        base: dict[str, Any] | None = None
        if baseline is not None:
            other = Bench(baseline, workers)
            base_memory, _, _ = other.station(MemorySource(images))
            base = {"station_memory": base_memory, "bare_work_parallel": other.bare_work(images, workers)}
        replay_fps, _, _ = bench.station(FolderReplaySource(workdir, pipeline.bundle.manifest.classes))
        _, offered_lat, offered_counters = bench.station(MemorySource(images, rate=rate))
        bare_lat = bench.bare_latency(images, rate)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "frames": len(images),
        "image_size": list(images[0].shape),
        "stages_ms": stages,
        "models_ms_by_precision": models_ms,
        "throughput_fps": {
            "bare_inference": bare,
            "bare_inference_parallel": bare_parallel,
            "bare_work_parallel": work_parallel,
            "naive_loop_png": naive,
            "station_memory": memory_fps,
            "station_png_replay": replay_fps,
        },
        "ratios": {
            "station_memory_vs_bare_inference": memory_fps / bare,
            "station_memory_vs_bare_inference_parallel": memory_fps / bare_parallel,
            "station_memory_vs_bare_work_parallel": memory_fps / work_parallel,
            "station_png_replay_vs_naive_loop": replay_fps / naive,
        },
        "offered": {
            "rate_fps": rate,
            "latency_ms": summarise(offered_lat),
            "bare_latency_ms": summarise(bare_lat),
            "skipped": offered_counters["skipped"],
            "published": offered_counters["published"],
        },
        "station_memory_latency_ms": summarise(memory_lat),
        **({"baseline": {**base, "station_memory_vs_baseline": memory_fps / base["station_memory"]}}
           if base is not None else {}),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['frames']} frames of {r['image_size'][1]}×{r['image_size'][0]}; model {r['model']}, "
             f"backend {r['backend']} ({r.get('precision', 'fp32')}), {r['workers']} workers × {r['threads']} "
             f"threads; {r['machine']}",
             "", f"{'stage':<12}{'mean ms':>9}{'p50 ms':>9}{'p99 ms':>9}"]
    for stage, s in r["stages_ms"].items():
        lines.append(f"{stage:<12}{s['mean']:>9.2f}{s['p50']:>9.2f}{s['p99']:>9.2f}")
    lines += ["", "each model alone, 1 ONNX Runtime thread, median ms by precision:"]
    for role, by in r["models_ms_by_precision"].items():
        ref = by.get("fp32")
        lines.append(f"  {role:<12}" + ", ".join(
            f"{p} {ms:.2f}" + (f" ({ref / ms:.2f}×)" if ref and p != "fp32" else "") for p, ms in by.items()))
    t = r["throughput_fps"]
    lines += ["", f"{'throughput':<34}{'frames/s':>9}",
              f"{'bare inference, 1 thread':<34}{t['bare_inference']:>9.1f}",
              f"{'bare inference, ' + str(r['workers']) + ' threads':<34}{t['bare_inference_parallel']:>9.1f}",
              f"{'bare work, ' + str(r['workers']) + ' threads':<34}{t['bare_work_parallel']:>9.1f}",
              f"{'naive sequential loop, PNG files':<34}{t['naive_loop_png']:>9.1f}",
              f"{'station, in-memory camera frames':<34}{t['station_memory']:>9.1f}",
              f"{'station, PNG files replayed':<34}{t['station_png_replay']:>9.1f}",
              "",
              f"station in-memory / bare inference, 1 thread: "
              f"{r['ratios']['station_memory_vs_bare_inference']:.2f}×",
              f"station in-memory / bare inference, {r['workers']} threads: "
              f"{r['ratios']['station_memory_vs_bare_inference_parallel']:.2f}×",
              f"station in-memory / bare work (preprocess, models, decide), {r['workers']} threads: "
              f"{r['ratios']['station_memory_vs_bare_work_parallel']:.2f}×",
              f"station PNG replay / naive loop:    {r['ratios']['station_png_replay_vs_naive_loop']:.2f}×"]
    if "baseline" in r:
        b = r["baseline"]
        lines += ["", f"precision {r.get('precision', '?')} against {r.get('baseline_precision', '?')}, same run: "
                  f"station in-memory {t['station_memory']:.1f} / {b['station_memory']:.1f} frames/s = "
                  f"{b['station_memory_vs_baseline']:.2f}×; bare work {t['bare_work_parallel']:.1f} / "
                  f"{b['bare_work_parallel']:.1f}"]
    o = r["offered"]
    lat = o["latency_ms"]
    bare = o["bare_latency_ms"]
    lines += ["", f"offered {o['rate_fps']:g} frames/s: latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
              f"skipped {o['skipped']} of {o['published']}",
              f"the same work alone, one frame at a time at that rate: p50 {bare['p50']:.1f} ms, "
              f"p99 {bare['p99']:.1f} ms (the machine's own tail)"]
    return "\n".join(lines)
