"""Build TensorRT plans from a bundle's ONNX files, on the GPU that will run them: one path, strongly typed.

Precision lives in the ONNX graph, made by ``station export`` (station/tools/convert.py): FP32 is the trained
file, FP16 a converted graph with its sensitive nodes kept FP32, INT8 a graph with symmetric Q/DQ nodes
whose scales were calibrated on the bundle's training images through the station's own preprocessing.
TensorRT builds whichever file the precision names as a strongly typed network
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): every tensor runs in the type the graph gives it, and
no precision flag or calibrator is set on the builder. That is the only kind of network TensorRT 11 has,
and TensorRT 10 has it too, so 10.3 (JetPack 6), 10.13–10.16 (JetPack 7.0–7.2.1) and 11.x (JetPack
7.2.2 on, x86) build from this one code path. On TensorRT 11 the flag is a no-op kept for compatibility.

Why the TensorRT-10 implicit INT8 path (``BuilderFlag.INT8`` with an ``IInt8EntropyCalibrator2``) was
dropped rather than kept behind a 10.x-only branch:

- TensorRT 10 refuses ``BuilderFlag.INT8``/``FP16`` on a strongly typed network, so keeping it meant a
  second, weakly typed build path, and two different INT8 engines of one bundle depending on the
  JetPack generation (10.3 calibrated by TensorRT, 11 from the Q/DQ file).
- The Q/DQ file is checked where CI runs: ONNX Runtime serves it on the CPU, and its parity with FP32
  (pass/fail agreement, accuracy, AUROC) is tested on every change. TensorRT's calibration only ran on a
  GPU machine, which CI does not have.
- The scales live in the bundle, made once on the workstation from the training images, instead of a
  calibration cache per GPU made on the line, and the implicit path was deprecated in 10.x and removed
  in 11.

Batch: each model gets one optimisation profile at the batch the station runs it with (1 for the
autoencoder, the classifier's rotations); ``max_batch`` widens that to a dynamic range 1…max_batch.
A timing cache per GPU and TensorRT version (``<bundle>/engines/timing-<gpu>-sm<cc>-trt<version>.cache``)
makes rebuilds, and builds of the other precisions, much faster.

Only names TensorRT 10.3 and 11.x both have are used here; deploy/tensorrt11_check.py checks this module
against the real 11.x bindings in CI (a branch that only runs on 10.x would be written ``if TENSORRT_10:``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import tensorrt as trt  # import this module only after gpu.probe(): it says what is missing

from station.core.atomic import write_bytes_atomic
from station.core.backends.engine_cache import CachedEngines, EngineCache, EngineKey, onnx_sources
from station.core.backends.gpu import GpuInfo, probe
from station.core.backends.precision import ROLES, precision_label
from station.core.backends.tensorrt import TRT_LOGGER, CudaDevice, shape_of
from station.core.bundle import PRECISIONS, Bundle
from station.errors import BackendError, ConfigError

log = structlog.get_logger("station.build_engine")

DEFAULT_WORKSPACE_MB = 1024


@dataclass(frozen=True)
class BuildOptions:
    precisions: dict[str, str] = field(default_factory=lambda: dict.fromkeys(ROLES, "fp16"))
    workspace_mb: int = DEFAULT_WORKSPACE_MB
    max_batch: int = 0  # 0: a fixed profile at the serving batch

    def validate(self) -> None:
        for role in ROLES:
            if self.precisions.get(role) not in PRECISIONS:
                raise ConfigError(f"--precision: {role}: {self.precisions.get(role)!r} is not one of "
                                  f"{', '.join(PRECISIONS)}")
        if self.workspace_mb <= 0:
            raise ConfigError("--workspace-mb: must be > 0")


def serving_batch(bundle: Bundle, role: str) -> int:
    return bundle.manifest.models[role].rotations if role == "classifier" else 1


def build_engines(bundle: Bundle, options: BuildOptions, gpu: GpuInfo | None = None,
                  progress: Callable[[str], None] = lambda _: None) -> CachedEngines:
    """Build both plans for this GPU from the ONNX files of the requested precisions and cache them."""
    options.validate()
    gpu = gpu or probe()
    sources = onnx_sources(bundle, options.precisions)  # BundleError naming station export if one is missing
    key = EngineKey.for_bundle(bundle, gpu, options.precisions)
    cache = EngineCache(bundle)
    cache.root.mkdir(parents=True, exist_ok=True)
    # Timing data is only valid for the GPU and TensorRT version that measured it.
    timing_path = cache.root / f"timing-{key.gpu}-{key.compute_capability}-trt{key.tensorrt}.cache"
    plans: dict[str, bytes] = {}
    seconds: dict[str, float] = {}
    with CudaDevice().active():
        for role in ROLES:
            progress(f"building the {role} from {sources[role]} (strongly typed, TensorRT {gpu.tensorrt_version}) "
                     f"for {gpu.name}")
            t0 = time.perf_counter()
            plans[role] = _build_one(TRT_LOGGER, bundle, role, bundle.root / sources[role], options, timing_path)
            seconds[role] = round(time.perf_counter() - t0, 1)
    details = {
        "gpu": gpu.name, "integrated": gpu.integrated, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "network": "strongly typed", "precision": precision_label(options.precisions),
        "workspace_mb": options.workspace_mb, "max_batch": options.max_batch, "build_seconds": seconds,
    }
    stored = cache.store(key, plans, details, sources)
    log.info("engines_built", folder=str(cache.folder(key)), seconds=seconds)
    return stored


def _build_one(logger: trt.ILogger, bundle: Bundle, role: str, onnx: Path, options: BuildOptions,
               timing_path: Path) -> bytes:
    builder = trt.Builder(logger)
    # Strongly typed on every TensorRT from 10.3: the graph's types decide each layer's precision.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"{onnx}: TensorRT's ONNX parser refused the model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
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
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    if not config.set_timing_cache(timing, False):
        log.warning("timing_cache_refused", path=str(timing_path), note="building without it")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError(f"{onnx}: TensorRT could not build an engine from it (see its log above)")
    updated = config.get_timing_cache()
    if updated is not None:
        write_bytes_atomic(timing_path, bytes(updated.serialize()))
    return bytes(plan)
