"""ONNX Runtime on the CPU: the embedded default backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from station.errors import BackendError, BundleError


class OnnxRuntimeModel:
    def __init__(self, path: Path, input_names: tuple[str, ...], output_name: str, threads: int = 0) -> None:
        self.name = path.name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0 lets ONNX Runtime pick one thread per physical core.
        opts.intra_op_num_threads = threads
        # Idle intra-op threads spin by default, waiting for the next call; on a small machine they
        # take the core from the other inspection workers and from OpenCV, and the latency tail
        # grows (measured: docs/performance.md, "Intra-op threads that do not spin").
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own untyped exceptions for bad files
            raise BundleError(f"{path}: ONNX Runtime cannot load the model: {exc}") from exc
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if set(input_names) != set(inputs):
            raise BundleError(f"{path}: inputs are {sorted(inputs)}, the manifest says {sorted(input_names)}")
        if output_name not in outputs:
            raise BundleError(f"{path}: has no output {output_name!r} (outputs: {sorted(outputs)})")
        self._inputs = input_names
        self._output = output_name

    def run(self, *batches: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._session.run([self._output], dict(zip(self._inputs, batches, strict=True)))
        except Exception as exc:
            raise BackendError(f"{self.name}: inference failed: {exc}") from exc
        return np.asarray(out)
