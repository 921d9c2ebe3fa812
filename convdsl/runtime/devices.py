"""Where a compiled network keeps its arrays: host memory (the CPU target) or the GPU's.

The executor, the optimizers and the timing report speak to a `Device` for the few
whole-array operations they do themselves (zeroing gradients, summing the gradients of
a layer read twice, copies in and out); the layers' own work is in their kernels. On
the CPU every operation is NumPy's and `put`/`get` copy nothing they need not. On CUDA
arrays are numba.cuda device arrays: they cross to the host only through `get`, which
the executor calls for outputs, metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from convdsl.errors import RunError

Array = Any  # np.ndarray on the CPU, a numba.cuda device array on CUDA

DEVICES = ("cpu", "cuda")


class Packed(Mapping[str, Array]):
    """Named arrays that are views into one flat array, in order: a network's trained
    parameters, their gradients and the optimizer's buffers. Whole-set work (an update,
    a check for NaN, zeroing) then runs once over `flat`: on a GPU one kernel launch
    instead of one per parameter."""

    def __init__(self, flat: Array, views: dict[str, Array]) -> None:
        self.flat = flat
        self._views = views
        # names and shapes in order: two packs with one layout line up element for element
        self.layout = tuple((name, tuple(view.shape)) for name, view in views.items())

    def __getitem__(self, name: str) -> Array:
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)


class Device:
    """NumPy arrays in host memory: the CPU target."""

    name = "cpu"

    def put(self, host: np.ndarray) -> Array:
        """The values of `host` where this device's kernels read them."""
        return host

    def get(self, array: Array) -> np.ndarray:
        """A host copy of the array."""
        return np.array(array, copy=True)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        return np.zeros(shape, dtype=dtype)

    def packed(self, shapes: Mapping[str, tuple[int, ...]], dtype: Any) -> Packed:
        """Zeroed arrays of these shapes, views into one flat array in this order."""
        flat = self.zeros((sum(math.prod(shape) for shape in shapes.values()),), dtype)
        views, start = {}, 0
        for name, shape in shapes.items():
            size = math.prod(shape)
            views[name] = flat[start:start + size].reshape(shape)
            start += size
        return Packed(flat, views)

    def fill(self, array: Array, value: float) -> None:
        array.fill(value)

    def add(self, a: Array, b: Array, out: Array) -> None:
        np.add(a, b, out=out)

    def scale(self, array: Array, factor: float) -> None:
        array *= factor

    def duplicate(self, array: Array) -> Array:
        return array.copy()

    def copy(self, source: Array, target: Array) -> None:
        """source's values into target, an array of the same shape on this device."""
        np.copyto(target, source)

    def assign(self, target: Array, host: np.ndarray) -> None:
        """Host values into an existing array, converted to its dtype."""
        np.copyto(target, host, casting="unsafe")

    def count_nonfinite(self, array: Array) -> int:
        return int(array.size - np.count_nonzero(np.isfinite(array)))

    def add_nonfinite(self, array: Array, counter: Array) -> None:
        """counter[0] += how many NaN or infinite values `array` holds. On a GPU this is
        queued, not read: an optimizer's step can read the counter on the device
        (Optimizer.step's skip_if), so the host need not wait for it."""
        counter[0] += self.count_nonfinite(array)

    def first_nonfinite(self, arrays: Mapping[str, Array]) -> str | None:
        """The name of the first array holding NaN or infinity, if any."""
        if isinstance(arrays, Packed) and not self.count_nonfinite(arrays.flat):
            return None  # the usual case, in one pass (on a GPU, one launch)
        return self._first_nonfinite_of(arrays)

    def _first_nonfinite_of(self, arrays: Mapping[str, Array]) -> str | None:
        return next((name for name, array in arrays.items()
                     if self.count_nonfinite(array)), None)

    def synchronize(self) -> None:
        """Wait for queued work (a no-op: the CPU's kernels return when done)."""

    def recorder(self) -> PassRecorder:
        """What runs a pass that repeats (a training step, an inference) so that its
        launches can be replayed together: on the CPU, nothing."""
        return Unrecorded()


class PassRecorder(Protocol):
    """Runs each pass of a network inside `pass_()` (codegen/cuda/graphs.StepGraph
    launches a repeating pass as CUDA graphs)."""

    def pass_(self) -> contextlib.AbstractContextManager[None]: ...


class Unrecorded:
    """The recorder that changes nothing."""

    def pass_(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class CudaDevice(Device):
    """numba.cuda device arrays on the default GPU."""

    name = "cuda"

    def __init__(self) -> None:
        from convdsl.codegen.cuda import arrays, common

        self._cuda = common.cuda()  # the clear error, if there is no GPU or no numba-cuda
        self._arrays = arrays

    def put(self, host: np.ndarray) -> Array:
        return self._arrays.to_device(host)

    def get(self, array: Array) -> np.ndarray:
        return self._arrays.to_host(array)

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Array:
        array = self._cuda.device_array(shape, dtype=np.dtype(dtype))
        self._arrays.fill(array, 0.0)
        return array

    def fill(self, array: Array, value: float) -> None:
        self._arrays.fill(array, value)

    def add(self, a: Array, b: Array, out: Array) -> None:
        self._arrays.add(a, b, out)

    def scale(self, array: Array, factor: float) -> None:
        self._arrays.scale(array, factor)

    def duplicate(self, array: Array) -> Array:
        copy = self._arrays.like(array)
        self._arrays.copy(array, copy)
        return copy

    def copy(self, source: Array, target: Array) -> None:
        self._arrays.copy(source, target)

    def assign(self, target: Array, host: np.ndarray) -> None:
        values = np.ascontiguousarray(np.asarray(host).astype(target.dtype, copy=False))
        target.copy_to_device(values.reshape(target.shape))

    def count_nonfinite(self, array: Array) -> int:
        return self._arrays.count_nonfinite(array)[0]

    def add_nonfinite(self, array: Array, counter: Array) -> None:
        self._arrays.add_nonfinite(array, counter)

    def _first_nonfinite_of(self, arrays: Mapping[str, Array]) -> str | None:
        counts = self._arrays.count_nonfinite(*arrays.values())  # one copy back
        return next((name for name, count in zip(arrays, counts) if count), None)

    def synchronize(self) -> None:
        self._cuda.synchronize()

    def recorder(self) -> PassRecorder:
        from convdsl.codegen.cuda.graphs import StepGraph

        return StepGraph()


_OPENED: dict[str, Device] = {}


def device_named(name: str) -> Device:
    """The device named `name` ("cpu" or "cuda"), checked and opened once."""
    if name not in DEVICES:
        raise RunError(f"unknown device {name!r}", f"choose one of {', '.join(DEVICES)}")
    if name not in _OPENED:
        _OPENED[name] = CudaDevice() if name == "cuda" else Device()
    return _OPENED[name]


def device_of(array: Array) -> Device:
    """The device an array lives on."""
    return device_named("cuda" if hasattr(array, "copy_to_host") else "cpu")
