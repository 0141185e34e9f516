"""Build TensorRT plans from a bundle's ONNX files, on the GPU that will run them.

FP16 and FP32 need nothing but the bundle. INT8 calibrates with TensorRT's
entropy calibrator on images run through the station's own preprocessing (and,
for a classifier that reads the anomaly map, the bundle's autoencoder in ONNX
Runtime), so the ranges it measures are the ones serving will see. The
calibration cache goes to ``<bundle>/calibration/`` and is reused by later
builds. A timing cache per GPU and TensorRT version
(``<bundle>/engines/timing-<gpu>-sm<cc>-trt<version>.cache``) makes rebuilds,
and builds of the other precisions, much faster.

Batch: each model gets one optimisation profile at the batch the station runs
it with (1 for the autoencoder, the classifier's rotations); ``max_batch``
widens that to a dynamic range 1…max_batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import tensorrt as trt  # import this module only after gpu.probe(): it says what is missing

from station.backends import ROLES
from station.backends.engine_cache import PRECISIONS, CachedEngines, EngineCache, EngineKey
from station.backends.gpu import GpuInfo, cuda_driver, probe
from station.backends.tensorrt import TRT_LOGGER, CudaDevice, shape_of
from station.bundle import Bundle
from station.errors import BackendError, ConfigError, DatasetError

log = structlog.get_logger("station.build_engine")

DEFAULT_WORKSPACE_MB = 1024
CALIBRATION_IMAGES = 64


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    max_batch: int = 0  # 0: a fixed profile at the serving batch
    calibration: Path | None = None  # INT8: folder of good and defective bottle images from the line

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.workspace_mb <= 0:
            raise ConfigError("--workspace-mb: must be > 0")


def serving_batch(bundle: Bundle, role: str) -> int:
    return bundle.manifest.models[role].rotations if role == "classifier" else 1


def build_engines(bundle: Bundle, options: BuildOptions, gpu: GpuInfo | None = None,
                  progress: Callable[[str], None] = lambda _: None) -> CachedEngines:
    """Build both plans for this GPU and store them in the bundle's engine cache."""
    options.validate()
    gpu = gpu or probe()
    key = EngineKey.for_gpu(gpu, options.precision)
    cache = EngineCache(bundle)
    cache.root.mkdir(parents=True, exist_ok=True)
    # Timing data is only valid for the GPU and TensorRT version that measured it.
    timing_path = cache.root / f"timing-{key.gpu}-{key.compute_capability}-trt{key.tensorrt}.cache"
    plans: dict[str, bytes] = {}
    seconds: dict[str, float] = {}
    with CudaDevice().active():
        for role in ROLES:
            progress(f"building the {role} ({options.precision}) for {gpu.name}")
            t0 = time.perf_counter()
            calibrator = _calibrator(bundle, role, options) if options.precision == "int8" else None
            plans[role] = _build_one(TRT_LOGGER, bundle, role, options, timing_path, calibrator)
            seconds[role] = round(time.perf_counter() - t0, 1)
    details = {
        "gpu": gpu.name, "integrated": gpu.integrated, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workspace_mb": options.workspace_mb, "max_batch": options.max_batch, "build_seconds": seconds,
    }
    stored = cache.store(key, plans, details)
    log.info("engines_built", folder=str(cache.folder(key)), seconds=seconds)
    return stored


def _build_one(logger: trt.ILogger, bundle: Bundle, role: str, options: BuildOptions, timing_path: Path,
               calibrator: trt.IInt8Calibrator | None) -> bytes:
    onnx = bundle.model_path(role)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx}: TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.precision in ("fp16", "int8"):
        if not builder.platform_has_fast_fp16:
            log.warning("no_fast_fp16", gpu_note="this GPU has no fast FP16; the plan will still be built")
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8":
        if not builder.platform_has_fast_int8:
            raise BackendError("this GPU has no fast INT8; build with --precision fp16")
        config.set_flag(trt.BuilderFlag.INT8)
        if calibrator is not None:
            config.int8_calibrator = calibrator
    batch = serving_batch(bundle, role)
    low, high = (1, max(options.max_batch, batch)) if options.max_batch else (batch, batch)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = shape_of(tensor.shape)[1:]
        if any(d < 0 for d in dims):
            raise BackendError(f"{onnx}: input {tensor.name} has dynamic dimensions {dims} besides the batch")
        profile.set_shape(tensor.name, trt.Dims([low, *dims]), trt.Dims([batch, *dims]), trt.Dims([high, *dims]))
    config.add_optimization_profile(profile)
    if calibrator is not None:
        config.set_calibration_profile(profile)
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if not config.set_timing_cache(timing, False):
        log.warning("timing_cache_refused", path=str(timing_path), note="building without it")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx}: TensorRT could not build a {options.precision} engine (see its log above)")
    calibration_error = getattr(calibrator, "error", None)
    if calibration_error is not None:
        raise calibration_error  # TensorRT swallows exceptions from get_batch: raise the first one here
    updated = config.get_timing_cache()
    if updated is not None:
        tmp = timing_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(updated.serialize()))
        tmp.replace(timing_path)
    return bytes(plan)


def _calibration_batches(bundle: Bundle, role: str, folder: Path) -> list[dict[str, np.ndarray]]:
    """The inputs ``role`` sees in serving, by input name, one inspection each, from images in ``folder``.

    Made before the build: TensorRT swallows exceptions raised while it calibrates, so an unreadable
    image must fail here, naming itself, not end the calibration early without a word.
    """
    from station.errors import FrameError
    from station.imageio import read_image
    from station.inspector import Inspector
    from station.mvtec import list_images
    from station.preprocess import preprocess

    found = list_images(folder) if folder.is_dir() else []
    if not found:
        raise DatasetError(f"--calibration {folder}: no images found")
    # Evenly spaced over the sorted list, so every class folder contributes its share.
    images = found[:: max(1, len(found) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]
    reference = Inspector(bundle, "onnxruntime")  # the classifier's map input comes from the autoencoder
    names = bundle.manifest.models[role].inputs
    batches = []
    for path in images:
        try:
            inputs = preprocess(read_image(path), reference.preprocess_spec)
        except FrameError as exc:
            raise DatasetError(f"--calibration: {path}: {exc.detail}") from exc
        arrays = ([inputs.autoencoder] if role == "autoencoder"
                  else reference.classifier_batches(inputs, reference.autoencoder.run(inputs.autoencoder)))
        batches.append({n: np.ascontiguousarray(a, np.float32) for n, a in zip(names, arrays, strict=True)})
    return batches


def _calibrator(bundle: Bundle, role: str, options: BuildOptions) -> trt.IInt8Calibrator:
    cache_path = bundle.root / "calibration" / f"tensorrt-int8-{role}.cache"
    if options.calibration is None and not cache_path.is_file():
        raise ConfigError("INT8 engines need calibrating on bottle images from the line: run station build-engine "
                          f"--model {bundle.root} --precision int8 --calibration DIR (no cache at {cache_path} yet)")
    cuda = cuda_driver()
    batches = [] if options.calibration is None else _calibration_batches(bundle, role, options.calibration)

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device: dict[str, Any] = {}
            self.next = 0
            self.error: Exception | None = None

        def get_batch_size(self) -> int:
            return serving_batch(bundle, role)

        def get_batch(self, names: list[str]) -> list[int]:
            try:
                if self.next >= len(batches):
                    return []
                arrays = batches[self.next]
                self.next += 1
                for name in names:  # in the order TensorRT asks, which need not be the manifest's
                    if name not in self.device:
                        self.device[name] = cuda.mem_alloc(arrays[name].nbytes)
                    cuda.memcpy_htod(self.device[name], arrays[name])
                return [int(self.device[name]) for name in names]
            except Exception as exc:
                self.error = self.error or exc
                return []

        def read_calibration_cache(self) -> bytes | None:
            return cache_path.read_bytes() if cache_path.is_file() and options.calibration is None else None

        def write_calibration_cache(self, cache: Any) -> None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_bytes(bytes(cache))
            log.info("int8_calibration_cache_written", path=str(cache_path))

    return EntropyCalibrator()
