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

from station.core.bundle import PRECISIONS
from station.errors import BackendError, ConfigError, MissingDependencyError

if TYPE_CHECKING:
    from station.core.bundle import Bundle

BACKENDS = ("auto", "onnxruntime", "tensorrt")
ROLES = ("autoencoder", "classifier")

log = structlog.get_logger("station.backend")


class ModelRunner(Protocol):
    """One loaded model: float32 NCHW batches in (in its declared input order), its single output out."""

    name: str

    def run(self, *batches: np.ndarray) -> np.ndarray: ...


#: what ``precision: auto`` runs, per backend and model, where the bundle has the file (measured:
#: docs/performance.md). On the CPU, FP16 graphs only add casts, and the classifier's INT8 file is
#: slower than FP32 (MobileNetV3's hard-swish and squeeze-excite do not fuse around Q/DQ nodes) and far
#: less accurate; the autoencoder's INT8 file is faster but missed the parity bounds on the trained
#: bundle measured (pass/fail agreement 97.3 %, AUROC −0.009), so it is served only when configured.
#: On a GPU both models run FP16.
AUTO_PRECISION = {
    "onnxruntime": {"autoencoder": "fp32", "classifier": "fp32"},
    "tensorrt": {"autoencoder": "fp16", "classifier": "fp16"},
}


def parse_precision(value: str | Mapping[str, str]) -> dict[str, str] | None:
    """``auto`` → None; ``fp16`` → both models; ``classifier=fp32,autoencoder=int8`` (or a mapping) → per model.

    ConfigError names what is wrong. A model not named in a per-model value runs FP32.
    """
    if isinstance(value, str):
        text = value.strip()
        if text == "auto":
            return None
        if text in PRECISIONS:
            return dict.fromkeys(ROLES, text)
        pairs: dict[str, str] = {}
        for part in text.split(","):
            role, sep, precision = part.partition("=")
            if not sep:
                raise ConfigError(f"precision {value!r}: use auto, one of {', '.join(PRECISIONS)}, "
                                  "or per model: classifier=fp32,autoencoder=int8")
            pairs[role.strip()] = precision.strip()
        value = pairs
    unknown = sorted(set(value) - set(ROLES))
    if unknown:
        raise ConfigError(f"precision: unknown model {', '.join(unknown)}; the models are {', '.join(ROLES)}")
    for role, precision in value.items():
        if precision not in PRECISIONS:
            raise ConfigError(f"precision: {role}: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return {role: value.get(role, "fp32") for role in ROLES}


def resolve_precision(value: str | Mapping[str, str], backend: str, bundle: Bundle) -> tuple[dict[str, str], str]:
    """Each model's precision on ``backend``, and why (for the log): the configured one, or for ``auto``
    the measured best where the bundle has its file, else FP32."""
    chosen = parse_precision(value)
    if chosen is not None:
        return chosen, "configured"
    out, notes = {}, []
    for role, best in AUTO_PRECISION[backend].items():
        if bundle.has_precision(role, best):
            out[role] = best
        else:
            out[role] = "fp32"
            notes.append(f"no {best} {role} in the bundle (station export --precision {best})")
    return out, "auto" + (f"; {'; '.join(notes)}" if notes else "")


def precision_label(precisions: Mapping[str, str]) -> str:
    """``fp16`` when both models share it, else ``autoencoder-int8.classifier-fp32`` (a folder-name part)."""
    distinct = set(precisions.values())
    if len(distinct) == 1:
        return distinct.pop()
    return ".".join(f"{role}-{precisions[role]}" for role in ROLES)


def precision_arg(precisions: Mapping[str, str]) -> str:
    """The same choice as ``--precision`` takes it: ``fp16`` or ``autoencoder=int8,classifier=fp16``."""
    distinct = set(precisions.values())
    if len(distinct) == 1:
        return distinct.pop()
    return ",".join(f"{role}={precisions[role]}" for role in ROLES)


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
