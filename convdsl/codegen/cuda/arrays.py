"""Whole-array operations on the device that the executor and the optimizers need.

These kernels take their sizes as arguments (they are the same for every network),
so they are compiled once per dtype rather than generated per spec.
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np

from convdsl.codegen.cuda.common import DeviceArray, cuda, grid_for, launch_on


def _kernels() -> ModuleType:
    cuda()  # the clear error first, if numba.cuda cannot run
    from convdsl.codegen.cuda import array_kernels

    return array_kernels


def flat(x: DeviceArray) -> DeviceArray:
    return x.reshape(x.size)


def fill(x: DeviceArray, value: float = 0.0) -> None:
    if x.size:
        launch_on(_kernels().fill, *grid_for(x.size), x, x.dtype.type(value))


def add(a: DeviceArray, b: DeviceArray, out: DeviceArray) -> None:
    """out = a + b, elementwise; out may be a or b."""
    if out.size:
        launch_on(_kernels().add, *grid_for(out.size), a, b, out)


def scale(x: DeviceArray, factor: float) -> None:
    """x *= factor, in x's dtype."""
    if x.size:
        launch_on(_kernels().scale, *grid_for(x.size), x, x.dtype.type(factor))


def copy(source: DeviceArray, target: DeviceArray) -> None:
    """target[...] = source, arrays of one size: a kernel, queued like the others (and
    recorded with them in a pass's graph), where a copy between device arrays would be
    a call of its own into the driver."""
    if source.size != target.size:
        raise ValueError(f"copy of {source.size} values into {target.size}")
    if target.size:
        launch_on(_kernels().copy, *grid_for(target.size), source, target)


def like(x: DeviceArray) -> DeviceArray:
    """A new device array with x's shape and dtype, unset."""
    return cuda().device_array(x.shape, dtype=x.dtype)


_COUNTS: dict[int, DeviceArray] = {}  # the counters of count_nonfinite, by their number


def count_nonfinite(*xs: DeviceArray) -> list[int]:
    """How many NaN or infinite values each array holds: one small copy comes back."""
    slots = max(len(xs), 1)
    if slots not in _COUNTS:
        _COUNTS[slots] = cuda().device_array(slots, dtype=np.int32)
    counts = _COUNTS[slots]
    fill(counts, 0)
    kernel = _kernels().count_nonfinite
    for slot, x in enumerate(xs):
        if x.size:
            launch_on(kernel, *grid_for(x.size), x, counts, slot)
    return [int(count) for count in counts.copy_to_host()[:len(xs)]]


def add_nonfinite(x: DeviceArray, counter: DeviceArray) -> None:
    """counter[0] += how many NaN or infinite values x holds, on the device: nothing
    comes back, so the host does not wait (an update reads the counter: sgd_step)."""
    if x.size:
        launch_on(_kernels().count_nonfinite, *grid_for(x.size), x, counter, 0)


@functools.cache
def _never() -> DeviceArray:
    """A counter that stays 0: the gate of an update that nothing checked."""
    return cuda().to_device(np.zeros(1, dtype=np.int32))


def to_host(x: DeviceArray) -> np.ndarray:
    host: np.ndarray = x.copy_to_host()
    return host


def to_device(x: np.ndarray) -> DeviceArray:
    # ascontiguousarray makes a 0-d array 1-d; keep the shape (num_batches_tracked is 0-d)
    return cuda().to_device(np.ascontiguousarray(x).reshape(np.shape(x)))


def fold_batch_norm(weight: DeviceArray, bias: DeviceArray | None,
                    norm: dict[str, DeviceArray], eps: float, affine: bool,
                    out_weight: DeviceArray, out_bias: DeviceArray) -> None:
    """Batch norm's inference map folded into a product's weight and bias, on the
    device (see codegen/fused.py): no weights cross to the host."""
    kernels = _kernels()
    channels = out_bias.size
    placeholder = norm["running_var"]  # stands in for arrays a case does not read
    gamma = norm.get("weight", placeholder)
    beta = norm.get("bias", placeholder)
    launch_on(kernels.fold_weight, *grid_for(weight.size), weight,
              weight.size // channels, gamma, norm["running_var"], float(eps), affine,
              out_weight)
    launch_on(kernels.fold_bias, *grid_for(channels),
              placeholder if bias is None else bias, bias is not None, gamma, beta,
              norm["running_mean"], norm["running_var"], float(eps), affine, out_bias)


def sgd_step(param: DeviceArray, grad: DeviceArray, buffer: DeviceArray | None, lr: float,
             weight_decay: float, momentum: float, nesterov: bool, first: bool,
             skip_if: DeviceArray | None = None) -> None:
    """One SGD update of one parameter in place (runtime/optim.py's SGD). The scalars
    take the parameter's dtype, so float32 training computes in float32 as on the CPU.
    Where the counter `skip_if` is not 0 when the kernel runs, nothing changes."""
    cast = param.dtype.type
    launch_on(_kernels().sgd_step, *grid_for(param.size),
              param, grad, param if buffer is None else buffer, cast(lr),
              cast(weight_decay), cast(momentum), nesterov, first,
              _never() if skip_if is None else skip_if)


def adam_step(param: DeviceArray, grad: DeviceArray, m: DeviceArray, v: DeviceArray,
              factors: DeviceArray, beta1: float, beta2: float, eps: float,
              weight_decay: float, decoupled: bool, skip_if: DeviceArray | None = None
              ) -> None:
    """One Adam (or AdamW) update of one parameter in place; `factors`, on the device in
    the parameter's dtype, holds what changes with the step and the rate: (1 - lr *
    weight_decay, lr / (1 - beta1^t), (1 - beta2^t)^0.5). Nothing changes where the
    counter `skip_if` is not 0."""
    cast = param.dtype.type
    launch_on(
        _kernels().adam_step, *grid_for(param.size),
        param, grad, m, v, cast(weight_decay), decoupled, factors,
        cast(1 - beta1), cast(beta2), cast(1 - beta2), cast(eps),
        _never() if skip_if is None else skip_if)
