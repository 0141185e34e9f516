"""Inference backends: each runs one ONNX model of a bundle on one device."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from station.errors import ConfigError

BACKENDS = ("onnxruntime",)


class ModelRunner(Protocol):
    """One loaded model: float32 NCHW batches in (in its declared input order), its single output out."""

    name: str

    def run(self, *batches: np.ndarray) -> np.ndarray: ...


def load_model(backend: str, path: Path, input_names: tuple[str, ...], output_name: str,
               threads: int = 0) -> ModelRunner:
    if backend == "onnxruntime":
        from station.backends.onnxruntime import OnnxRuntimeModel

        return OnnxRuntimeModel(path, input_names, output_name, threads=threads)
    raise ConfigError(f"backend: unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
