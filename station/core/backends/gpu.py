"""Is there a GPU TensorRT can use here? The facts `backend: auto` decides on, and an engine's cache key.

Imports of tensorrt and pycuda live here and in the tensorrt modules only, so
a CPU station never loads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from station.errors import MissingDependencyError

INSTALL_HINT = (
    "install the tensorrt extra (pip install 'station[tensorrt]' on a discrete GPU; on a Jetson, JetPack's "
    "python3-libnvinfer and pip install pycuda, see docs/jetson.md)"
)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    integrated: bool  # a Jetson: the GPU shares the host's memory
    total_memory: int
    tensorrt_version: str

    @property
    def slug(self) -> str:
        """The GPU's name as a folder-name part: ``NVIDIA H200`` → ``nvidia-h200``."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"


def tensorrt_module() -> ModuleType:
    """TensorRT's Python module, or MissingDependencyError saying what to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from exc
    # Type stubs alone (a tensorrt/ folder of .pyi files) import as an empty namespace package.
    if not hasattr(tensorrt, "Builder"):
        raise MissingDependencyError(f"TensorRT is not installed (only its type stubs are); {INSTALL_HINT}")
    return tensorrt


#: the oldest TensorRT this station builds for: JetPack 6's (docs/jetson.md has the support matrix)
OLDEST_TENSORRT = (10, 3)


def tensorrt_release(version: str) -> tuple[int, int]:
    """``10.13.0.35`` → (10, 13); MissingDependencyError for a version older than OLDEST_TENSORRT."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError as exc:
        raise MissingDependencyError(f"TensorRT reports an unreadable version {version!r}") from exc
    if (major, minor) < OLDEST_TENSORRT:
        raise MissingDependencyError(
            f"TensorRT {version} is too old: this station builds strongly typed networks, from TensorRT "
            f"{'.'.join(map(str, OLDEST_TENSORRT))} on (JetPack 6; see docs/jetson.md); {INSTALL_HINT}")
    return major, minor


def cuda_driver() -> Any:  # pycuda has no type information
    """pycuda's driver module, initialised; MissingDependencyError or a clear reason where there is no GPU."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise MissingDependencyError(f"pycuda is not installed ({exc}); {INSTALL_HINT}") from exc
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error and friends: no driver, no device node
        raise MissingDependencyError(f"the CUDA driver cannot be used: {exc}") from exc
    if count == 0:
        raise MissingDependencyError("no CUDA GPU found")
    return cuda


def probe(device: int = 0) -> GpuInfo:
    """The GPU TensorRT would run on; MissingDependencyError naming what is missing."""
    trt = tensorrt_module()
    tensorrt_release(str(trt.__version__))
    cuda = cuda_driver()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return GpuInfo(
        name=str(dev.name()),
        compute_capability=(int(major), int(minor)),
        integrated=bool(dev.get_attribute(cuda.device_attribute.INTEGRATED)),
        total_memory=int(dev.total_memory()),
        tensorrt_version=str(trt.__version__),
    )
