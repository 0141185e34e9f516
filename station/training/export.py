"""ONNX export, and the check that ONNX Runtime computes what torch computed."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from station.core.backends.onnxruntime import OnnxRuntimeModel
from station.errors import StationError

INPUT_NAME = "input"
OPSET = 17


class ParityError(StationError):
    """The exported ONNX model does not reproduce the torch model."""


def export_onnx(module: nn.Module, examples: tuple[torch.Tensor, ...], path: Path, input_names: tuple[str, ...],
                output_name: str) -> None:
    module.eval()
    axes = {name: {0: "batch"} for name in (*input_names, output_name)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            examples,
            str(path),
            dynamo=False,
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )


def check_parity(module: nn.Module, path: Path, input_names: tuple[str, ...], output_name: str,
                 batches: tuple[torch.Tensor, ...], atol: float) -> float:
    """Max |torch − ONNX Runtime| over the batches, one image at a time as the station runs it."""
    module.eval()
    runner = OnnxRuntimeModel(path, input_names, output_name)
    worst = 0.0
    with torch.no_grad():
        for i in range(len(batches[0])):
            args = tuple(b[i : i + 1] for b in batches)
            ref = module(*args).numpy()
            got = runner.run(*(a.numpy() for a in args))
            worst = max(worst, float(np.abs(ref - got).max()))
    if worst > atol:
        raise ParityError(f"{path}: ONNX Runtime output differs from torch by {worst:.2e} (> {atol:.0e})")
    return worst
