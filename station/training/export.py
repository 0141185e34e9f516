"""ONNX export, and the check that ONNX Runtime computes what torch computed."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from station.backends.onnxruntime import OnnxRuntimeModel
from station.errors import StationError

INPUT_NAME = "input"
OPSET = 17


class ParityError(StationError):
    """The exported ONNX model does not reproduce the torch model."""


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, output_name: str) -> None:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
        )


def check_parity(module: nn.Module, path: Path, output_name: str, batch: torch.Tensor, atol: float) -> float:
    """Max |torch − ONNX Runtime| over ``batch``, one image at a time as the station runs it."""
    module.eval()
    runner = OnnxRuntimeModel(path, INPUT_NAME, output_name)
    worst = 0.0
    with torch.no_grad():
        for x in batch:
            ref = module(x[None]).numpy()
            got = runner.run(x[None].numpy())
            worst = max(worst, float(np.abs(ref - got).max()))
    if worst > atol:
        raise ParityError(f"{path}: ONNX Runtime output differs from torch by {worst:.2e} (> {atol:.0e})")
    return worst
