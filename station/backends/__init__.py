"""Inference backends: each runs one ONNX model of a bundle on one device."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from station.errors import ConfigError

BACKENDS = ("onnxruntime",)


class ModelRunner(Protocol):
    """One loaded model: a float32 NCHW batch in, its single output out."""

    name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def load_model(backend: str, path: Path, input_name: str, output_name: str, threads: int = 0) -> ModelRunner:
    if backend == "onnxruntime":
        from station.backends.onnxruntime import OnnxRuntimeModel

        return OnnxRuntimeModel(path, input_name, output_name, threads=threads)
    raise ConfigError(f"backend: unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
