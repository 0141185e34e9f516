"""TensorRT engines on an NVIDIA GPU (Jetson or discrete), driven through pycuda.

Each model keeps a pool of execution slots, one per inspection worker: an
execution context, a CUDA stream and page-locked host buffers, plus device
buffers on a discrete GPU. A call takes a free slot, copies its inputs in,
enqueues ``execute_async_v3`` on the slot's stream, copies the output back and
waits for that stream only, so workers overlap on the GPU.

On a Jetson the GPU shares the host's memory, so the host buffers are mapped
into the device's address space and given to TensorRT directly: no copies.
On a discrete GPU the copies are async on the slot's stream.

Every slot is warmed up when the model loads, so the first bottle does not pay
for lazy allocations.
"""

from __future__ import annotations

import queue
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt  # import this module only after gpu.probe(): it says what is missing

from station.core.backends.gpu import cuda_driver
from station.errors import BackendError, BundleError

#: one logger for every TensorRT object of the process (TensorRT keeps the first one it is given)
TRT_LOGGER = trt.Logger(trt.Logger.WARNING)
#: execution slots per model: each holds a context's activation memory; more than a few gain nothing
MAX_SLOTS = 8


def shape_of(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))


def numpy_dtype(dtype: trt.DataType) -> np.dtype[Any]:
    table = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16, trt.DataType.INT32: np.int32,
             trt.DataType.INT8: np.int8, trt.DataType.UINT8: np.uint8, trt.DataType.BOOL: np.bool_,
             trt.DataType.INT64: np.int64}
    if dtype not in table:
        raise BackendError(f"TensorRT tensor type {dtype} has no numpy equivalent")
    return np.dtype(table[dtype])


class CudaDevice:
    """The device's primary context, made current around each call from whichever worker thread."""

    def __init__(self, index: int = 0) -> None:
        self.cuda = cuda_driver()
        self.device = self.cuda.Device(index)
        self.integrated = bool(self.device.get_attribute(self.cuda.device_attribute.INTEGRATED))
        self._context = self.device.retain_primary_context()

    @contextmanager
    def active(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()


@dataclass
class _Buffer:
    host: np.ndarray
    device_ptr: int
    device_alloc: Any = None  # a DeviceAllocation on a discrete GPU, None where the host buffer is mapped


@dataclass
class _Slot:
    context: trt.IExecutionContext
    stream: Any  # pycuda Stream
    buffers: dict[str, _Buffer] = field(default_factory=dict)


class TensorRtModel:
    def __init__(self, plan: Path, input_names: tuple[str, ...], output_name: str, device: CudaDevice,
                 slots: int = 1) -> None:
        self.name = plan.name
        self._device = device
        with device.active():
            self._runtime = trt.Runtime(TRT_LOGGER)
            engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise BackendError(
                    f"{plan}: TensorRT {trt.__version__} cannot load this plan (built by another TensorRT "
                    "version or for another GPU?); rebuild it with station build-engine"
                )
            self._engine = engine
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
            outputs = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT}
            if inputs != set(input_names):
                raise BundleError(f"{plan}: inputs are {sorted(inputs)}, the manifest says {sorted(input_names)}")
            if output_name not in outputs:
                raise BundleError(f"{plan}: has no output {output_name!r} (outputs: {sorted(outputs)})")
            self._inputs = input_names
            self._output = output_name
            self._dtypes = {n: numpy_dtype(engine.get_tensor_dtype(n)) for n in (*input_names, output_name)}
            self._all_slots: list[_Slot] = []
            # Device memory and streams must go while the context is current: at collection or at exit.
            weakref.finalize(self, _release, device, self._all_slots)
            for _ in range(min(max(1, slots), MAX_SLOTS)):
                context = engine.create_execution_context()
                if context is None:
                    raise BackendError(f"{plan}: TensorRT could not create an execution context "
                                       f"(out of GPU memory with {len(self._all_slots)} already made?)")
                self._all_slots.append(_Slot(context, device.cuda.Stream()))
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for slot in self._all_slots:
            self._free.put(slot)
        # Warm-up at the profile's optimum shape: the batch the station runs the model with.
        blanks = [np.zeros(shape_of(engine.get_tensor_profile_shape(n, 0)[1]), np.float32) for n in input_names]
        for _ in self._all_slots:
            self.run(*blanks)  # takes each slot in turn: the queue hands them out in order

    def run(self, *batches: np.ndarray) -> np.ndarray:
        slot = self._free.get()
        try:
            with self._device.active():
                return self._run_on(slot, list(batches))
        except BackendError:
            raise
        except Exception as exc:  # pycuda.driver.Error, TensorRT's RuntimeError
            raise BackendError(f"{self.name}: inference failed: {exc}") from exc
        finally:
            self._free.put(slot)

    def _run_on(self, slot: _Slot, batches: list[np.ndarray]) -> np.ndarray:
        cuda, ctx = self._device.cuda, slot.context
        for name, batch in zip(self._inputs, batches, strict=True):
            buf = slot.buffers.get(name)
            if buf is None or buf.host.shape != batch.shape:
                if not ctx.set_input_shape(name, batch.shape):
                    raise BackendError(f"{self.name}: input {name} of shape {batch.shape} is outside the "
                                       "engine's optimisation profile (rebuild with a larger --max-batch)")
                buf = slot.buffers[name] = self._allocate(batch.shape, self._dtypes[name])
                ctx.set_tensor_address(name, buf.device_ptr)
            np.copyto(buf.host, batch, casting="same_kind")
            if buf.device_alloc is not None:
                cuda.memcpy_htod_async(buf.device_alloc, buf.host, slot.stream)
        out_shape = shape_of(ctx.get_tensor_shape(self._output))
        out = slot.buffers.get(self._output)
        if out is None or out.host.shape != out_shape:
            out = slot.buffers[self._output] = self._allocate(out_shape, self._dtypes[self._output])
            ctx.set_tensor_address(self._output, out.device_ptr)
        if not ctx.execute_async_v3(slot.stream.handle):
            raise BackendError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")
        if out.device_alloc is not None:
            cuda.memcpy_dtoh_async(out.host, out.device_alloc, slot.stream)
        slot.stream.synchronize()
        return np.array(out.host, dtype=np.float32)  # a copy: the slot's buffer is reused by the next call

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> _Buffer:
        cuda = self._device.cuda
        if self._device.integrated:
            host = cuda.pagelocked_empty(shape, dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
            return _Buffer(host, int(host.base.get_device_pointer()))
        host = cuda.pagelocked_empty(shape, dtype)
        dev = cuda.mem_alloc(host.nbytes)
        return _Buffer(host, int(dev), dev)


def _release(device: CudaDevice, slots: list[_Slot]) -> None:
    # pycuda destroys a stream only with its context current; after a SIGHUP reload the old model is
    # collected on another thread, so everything is let go here, inside the context.
    try:
        with device.active():
            for slot in slots:
                for buf in slot.buffers.values():
                    if buf.device_alloc is not None:
                        buf.device_alloc.free()
                slot.buffers.clear()
            slots.clear()
    except Exception:  # at interpreter exit the driver may already be gone; nothing left to free then
        pass
