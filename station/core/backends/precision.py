"""Model precisions: what a configured ``precision`` means for each model, and ``auto``'s choice.

A leaf of the backends package (bundle and errors only): the engine cache and the TensorRT builder
need these names, and the package's ``__init__`` imports those lazily, so keeping them here keeps the
import graph acyclic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from station.core.bundle import PRECISIONS
from station.errors import ConfigError

if TYPE_CHECKING:
    from station.core.bundle import Bundle

ROLES = ("autoencoder", "classifier")


#: what ``precision: auto`` runs, per backend and model, where the bundle has the file (measured:
#: docs/performance.md). On the CPU, FP16 graphs only add casts, and the classifier's INT8 file is
#: slower than FP32 (MobileNetV3's hard-swish and squeeze-excite do not fuse around Q/DQ nodes) and far
#: less accurate. On a GPU both models run FP16.
AUTO_PRECISION = {
    "onnxruntime": {"autoencoder": "fp32", "classifier": "fp32"},
    "tensorrt": {"autoencoder": "fp16", "classifier": "fp16"},
}
#: what ``auto`` runs instead where the bundle's file of that precision passed its parity check
#: (`station export --check`, recorded in the manifest): the autoencoder's INT8 file is 1.44× faster alone
#: on the CPU, and whether it keeps the verdicts depends on the trained model (97.3 % agreement on a
#: short-trained bundle, 100 % on the demo's residual-view bundle), so each bundle's own check decides.
AUTO_IF_PARITY = {
    "onnxruntime": {"autoencoder": "int8"},
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
        checked = AUTO_IF_PARITY.get(backend, {}).get(role)
        if checked is not None and bundle.has_precision(role, checked) and bundle.parity_ok(role, checked):
            out[role] = checked
            notes.append(f"{role} {checked}: passed its parity check")
        elif bundle.has_precision(role, best):
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
