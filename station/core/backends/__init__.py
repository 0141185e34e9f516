"""Inference backends: each runs one ONNX model of a bundle on one device.

``auto`` takes TensorRT where a CUDA GPU, pycuda and TensorRT are all present,
else ONNX Runtime on the CPU; the choice and its reason are logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import structlog

from station.core.backends.precision import (
    AUTO_PRECISION,
    ROLES,
    parse_precision,
    precision_arg,
    precision_label,
    resolve_precision,
)
from station.errors import BackendError, ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from station.core.bundle import Bundle

# The precision names are re-exported: callers know them as part of the backends' interface.
__all__ = ["AUTO_PRECISION", "BACKENDS", "ROLES", "BackendSpec", "Choice", "ModelRunner", "choose", "load_models",
           "parse_precision", "precision_arg", "precision_label", "resolve_precision"]

BACKENDS = ("auto", "onnxruntime", "tensorrt")

log = structlog.get_logger("station.backend")


class ModelRunner(Protocol):
    """One loaded model: float32 NCHW batches in (in its declared input order), its single output out."""

    name: str

    def run(self, *batches: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class BackendSpec:
    name: str = "onnxruntime"
    threads: int = 0  # ONNX Runtime: intra-op threads per session (0: one per core)
    #: either backend: auto, one precision for both models, or per model (parse_precision)
    precision: str | Mapping[str, str] = "auto"
    build_engines: bool = True  # TensorRT: build a missing or stale plan at start, else refuse
    slots: int = 1  # TensorRT: concurrent execution contexts (one per inspection worker)


@dataclass(frozen=True)
class Choice:
    name: str
    reason: str


def choose(requested: str) -> Choice:
    """The backend to run: ``requested`` itself, or for ``auto`` the best one this machine has."""
    if requested == "onnxruntime":
        return Choice("onnxruntime", "configured")
    if requested not in BACKENDS:
        raise ConfigError(f"backend: unknown backend {requested!r}; available: {', '.join(BACKENDS)}")
    from station.core.backends.gpu import probe

    try:
        gpu = probe()
    except MissingDependencyError as exc:
        if requested == "tensorrt":
            raise MissingDependencyError(f"backend tensorrt: {exc}") from exc
        return Choice("onnxruntime", f"auto: no TensorRT GPU here ({exc})")
    major, minor = gpu.compute_capability
    found = f"{gpu.name} (sm{major}{minor}) with TensorRT {gpu.tensorrt_version}"
    return Choice("tensorrt", f"auto: {found}" if requested == "auto" else f"configured; {found}")


def load_models(bundle: Bundle, spec: BackendSpec) -> tuple[Choice, dict[str, ModelRunner]]:
    """Both models of ``bundle`` on the backend ``spec`` chooses."""
    choice = choose(spec.name)
    precisions, why = resolve_precision(spec.precision, choice.name, bundle)
    log.info("backend_chosen", backend=choice.name, reason=choice.reason, precision=precisions,
             precision_reason=why)
    m = bundle.manifest
    if choice.name == "onnxruntime":
        from station.core.backends.onnxruntime import OnnxRuntimeModel

        return choice, {role: OnnxRuntimeModel(bundle.model_path(role, precisions[role]), m.models[role].inputs,
                                               m.models[role].output, threads=spec.threads) for role in ROLES}
    return choice, _load_tensorrt(bundle, spec, precisions)


def _load_tensorrt(bundle: Bundle, spec: BackendSpec, precisions: dict[str, str]) -> dict[str, ModelRunner]:
    from station.core.backends.engine_cache import EngineCache, EngineKey
    from station.core.backends.gpu import probe
    from station.core.backends.tensorrt import CudaDevice, TensorRtModel
    from station.core.backends.tensorrt_build import BuildOptions, build_engines

    gpu = probe()
    key = EngineKey.for_bundle(bundle, gpu, precisions)
    cache = EngineCache(bundle)
    cached, why = cache.usable(key, ROLES)
    if cached is None:
        if not spec.build_engines:
            present = ", ".join(cache.available()) or "none"
            raise BackendError(
                f"{cache.folder(key)}: {why} for this GPU ({key.dirname}), and building at start is off "
                f"(inference.build_engines: false). Plans present: {present}. "
                f"Run: station build-engine --model {bundle.root} --precision {precision_arg(precisions)}"
            )
        log.warning("building_engines", key=key.dirname, reason=why)
        cached = build_engines(bundle, BuildOptions(precisions=precisions), gpu)
    device = CudaDevice()
    m = bundle.manifest
    return {role: TensorRtModel(cached.plans[role], m.models[role].inputs, m.models[role].output, device,
                                slots=spec.slots)
            for role in ROLES}
