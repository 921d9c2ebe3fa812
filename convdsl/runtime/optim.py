"""Optimizers and learning-rate schedules for `convdsl train`, as PyTorch defines them.

    optimizer = make_optimizer(settings, net.trained)    # the trained arrays only
    schedule = Schedule(settings, steps_per_epoch)
    for epoch in range(settings.epochs):
        for index, batch in enumerate(batches):
            net.forward(x[batch], train=True)
            net.loss(y[batch])
            net.backward()
            optimizer.step(net.trained, net.grads, schedule.lr(epoch, index))

`net.trained` and `net.grads` are packed: views into one flat array each, so a step is
one pass over all parameters (one kernel on a GPU). Any dicts of arrays work too, a
parameter at a time.

The updates are torch.optim's, operation for operation, so that a network trained
here follows the same path as the same network trained by PyTorch:

- SGD: g = grad + weight_decay * w; with momentum, b = g on the first step and
  b = momentum * b + g after it (no dampening); Nesterov steps along g + momentum * b,
  plain momentum along b; then w -= lr * step.
- Adam: g = grad + weight_decay * w (L2 in the gradient); m and v are running means
  of g and g*g; w -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
- AdamW: Adam without the L2 term; instead w *= 1 - lr * weight_decay first
  (decoupled weight decay, Loshchilov and Hutter 2019).

An optimizer's state (momentum buffers, moment estimates and the step count) is a
flat dict of arrays, "momentum/c1.weight" and "step", so a checkpoint can store it
beside the weights as it is, and training resumed from it continues bit for bit.

A schedule gives the learning rate of a step from its position alone (epoch and
batch), so a resumed run needs no scheduler state: a linear warm-up per step, then
a constant rate, a step decay or a cosine, per epoch (PyTorch's LinearLR, StepLR and
CosineAnnealingLR stepped once per epoch).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from convdsl.errors import RunError
from convdsl.ir.training import OPTIMIZERS, SCHEDULES, TrainSettings
from convdsl.runtime.devices import Array, Packed, device_named, device_of

Arrays = Mapping[str, np.ndarray]
STEP = "step"  # the state entry holding the number of steps taken
CPU_PART = 1 << 18  # elements updated at a time on the CPU: 1 MiB of float32


class Optimizer(ABC):
    """Updates the trained parameters in place from their gradients, one step at a time.

    It knows the parameters by name and shape (from the arrays it was made with) and
    keeps, per parameter, one array for each kind of buffer the method needs."""

    def __init__(self, params: Arrays, kinds: tuple[str, ...]) -> None:
        """`kinds`: the buffers each parameter needs, e.g. ("momentum",)."""
        self.steps = 0
        self.names = list(params)
        # Where the parameters live (host or GPU): the buffers live there too, and on a
        # GPU every update is a kernel, so nothing crosses to the host while training.
        self.device = device_of(next(iter(params.values()))) if params else device_named("cpu")
        self.layout = tuple((name, tuple(params[name].shape)) for name in self.names)
        self.buffers: dict[str, Mapping[str, Array]] = {
            kind: self._zeros_like(params) for kind in kinds}

    def _zeros_like(self, params: Arrays) -> Mapping[str, Array]:
        """Zeroed buffers of the parameters' shapes and dtypes (float32 training stays
        float32): packed in the parameters' order when they share a dtype."""
        dtypes = {np.dtype(params[name].dtype) for name in self.names}
        if len(dtypes) == 1:
            return self.device.packed(dict(self.layout), dtypes.pop())
        return {name: self.device.zeros(params[name].shape, params[name].dtype)
                for name in self.names}

    def step(self, params: Mapping[str, np.ndarray], grads: Arrays, lr: float,
             skip_if: Array | None = None) -> None:
        """One update of params[name], in place, for every name in grads (which must be
        the optimizer's parameters, all of them: the step count is shared). Parameters
        and gradients packed in the optimizer's layout (an executor's `trained` and
        `grads`) update in one pass over their flat arrays.

        `skip_if` gates the update: a one-element counter on the parameters' device
        (Device.add_nonfinite's); where it is not 0 when the update runs, no parameter
        or buffer changes. On a GPU the kernels read it, so the host need not wait to
        know; the step counts all the same until its caller, having read the counter,
        says otherwise (`skipped`)."""
        self._check_names(grads)
        if self.device.name == "cpu" and skip_if is not None and skip_if[0]:
            self.steps += 1
            return
        if (isinstance(params, Packed) and isinstance(grads, Packed)
                and self._lines_up(params, grads)):
            buffers = dict(self._packed_buffers())
            size = params.flat.size
            for part in self._parts(size):
                self._update(_cut(params.flat, part, size), _cut(grads.flat, part, size),
                             {kind: _cut(buffer.flat, part, size)
                              for kind, buffer in buffers.items()},
                             float(lr), skip_if)
        else:
            for name, grad in grads.items():
                self._update(params[name], grad,
                             {kind: buffer[name] for kind, buffer in self.buffers.items()},
                             float(lr), skip_if)
        self.steps += 1

    def send(self, lr: float) -> None:
        """Put on the device what the next step's update reads there rather than in its
        arguments (Adam's factors), before the step's kernels are queued: a step whose
        every launch is the last one's replays as a CUDA graph. Here, nothing."""
        return

    def skipped(self) -> None:
        """The last step's gate was closed, so it changed nothing: it does not count
        (SGD's next step starts its momentum as the first does, Adam's keeps t)."""
        if self.steps <= 0:
            raise RunError("no step to take back", "call skipped() only after step()")
        self.steps -= 1

    def _parts(self, size: int) -> list[slice]:
        """How a flat update is cut: whole on a GPU (one launch); on the CPU in parts of
        CPU_PART elements, so that NumPy's temporaries stay in the cache. ResNet-18's
        SGD step with momentum: 26 ms whole, 13 ms an array at a time, 10 ms in parts."""
        if self.device.name == "cuda":
            return [slice(0, size)]
        return [slice(start, start + CPU_PART) for start in range(0, size, CPU_PART)]

    def _packed_buffers(self) -> list[tuple[str, Packed]]:
        return [(kind, buffer) for kind, buffer in self.buffers.items()
                if isinstance(buffer, Packed)]

    def _lines_up(self, params: Packed, grads: Packed) -> bool:
        """Whether the packs and every buffer share one layout, element for element."""
        return (params.layout == grads.layout == self.layout
                and len(self._packed_buffers()) == len(self.buffers))

    @abstractmethod
    def _update(self, param: Array, grad: Array, buffers: Mapping[str, Array],
                lr: float, skip_if: Array | None) -> None:
        """Update one parameter (or a flat pack of them) with its buffers, by kind;
        `self.steps` is the number of steps before this one. On a GPU the kernel reads
        the gate `skip_if`; on the CPU `step` has read it already."""

    def _check_names(self, grads: Arrays) -> None:
        unknown = [name for name in grads if name not in self.names]
        missing = [name for name in self.names if name not in grads]
        if unknown or missing:
            raise RunError(
                "the gradients do not match the optimizer's parameters"
                + (f"; unknown: {_some(unknown)}" if unknown else "")
                + (f"; missing: {_some(missing)}" if missing else ""),
                "make the optimizer from the network's trained parameters (net.grads)")

    # --- state, for checkpoints --------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the step count and every buffer, by flat name ("momentum/c1.weight")."""
        state = {STEP: np.array(self.steps, dtype=np.int64)}
        for kind, arrays in self.buffers.items():
            for name, array in arrays.items():
                state[f"{kind}/{name}"] = self.device.get(array)
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Continue from a saved state; nothing changes unless all of it fits."""
        expected = {STEP: ()} | {f"{kind}/{name}": array.shape
                                 for kind, arrays in self.buffers.items()
                                 for name, array in arrays.items()}
        missing = [key for key in expected if key not in state]
        unknown = [key for key in state if key not in expected]
        if missing or unknown:
            raise RunError(
                f"the optimizer state does not fit this {type(self).__name__} optimizer"
                + (f"; missing: {_some(missing)}" if missing else "")
                + (f"; unexpected: {_some(unknown)}" if unknown else ""),
                "was it saved for another network, or with another optimizer or momentum?")
        values = {key: np.asarray(state[key]) for key in expected}
        for key, shape in expected.items():
            value = values[key]
            if value.shape != shape:
                raise RunError(f"optimizer state '{key}' has shape {value.shape}, "
                               f"expected {shape}", "was it saved for another network?")
            if key != STEP and value.dtype.kind != "f":
                raise RunError(f"optimizer state '{key}' holds {value.dtype} values, "
                               "expected floating-point numbers")
        steps = values[STEP]
        if steps.dtype.kind not in "iu" or int(steps) < 0:
            raise RunError(f"optimizer state '{STEP}' is {steps.tolist()!r}, "
                           "expected a whole number of at least 0")
        for kind, arrays in self.buffers.items():
            for name, array in arrays.items():  # into the buffers: their dtype stays
                self.device.assign(array, values[f"{kind}/{name}"])
        self.steps = int(steps)


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay."""

    def __init__(self, params: Arrays, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, ("momentum",) if momentum else ())
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay

    def _update(self, param: Array, grad: Array, buffers: Mapping[str, Array],
                lr: float, skip_if: Array | None) -> None:
        buffer = buffers["momentum"] if self.momentum else None
        if self.device.name == "cuda":
            from convdsl.codegen.cuda import arrays

            arrays.sgd_step(param, grad, buffer, lr, self.weight_decay, self.momentum,
                            self.nesterov, self.steps == 0, skip_if)
            return
        direction = grad + self.weight_decay * param if self.weight_decay else grad
        if buffer is not None:
            if self.steps == 0:
                buffer[...] = direction  # PyTorch starts the buffer at the first gradient
            else:
                buffer *= self.momentum
                buffer += direction
            direction = direction + self.momentum * buffer if self.nesterov else buffer
        param -= lr * direction


class Adam(Optimizer):
    """Adam (Kingma and Ba 2015) with L2 weight decay, or AdamW's decoupled decay."""

    def __init__(self, params: Arrays, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = False) -> None:
        super().__init__(params, ("exp_avg", "exp_avg_sq"))  # PyTorch's names for m and v
        self.beta1 = beta1
        self.beta2 = beta2
        self.eps = eps
        self.weight_decay = weight_decay
        self.decoupled = decoupled
        self._dtypes = {np.dtype(params[name].dtype) for name in self.names}
        # on a GPU, per dtype: the factors of a step on the device, and their (t, lr)
        self._factors: dict[np.dtype[Any], Array] = {}
        self._sent: dict[np.dtype[Any], tuple[int, float]] = {}

    def send(self, lr: float) -> None:
        if self.device.name == "cuda":
            for dtype in self._dtypes:
                self._factors_on_device(lr, dtype)

    def _factors_on_device(self, lr: float, dtype: np.dtype[Any]) -> Array:
        """(1 - lr * weight_decay, the step size, the root of v's bias correction) of the
        next step, in `dtype`, where the GPU's update reads them: copied only when the
        step or the rate changed since the last copy."""
        t = self.steps + 1
        factors = self._factors.get(dtype)
        if factors is None:
            factors = self._factors[dtype] = self.device.zeros((3,), dtype)
        if self._sent.get(dtype) != (t, lr):
            values = [1 - lr * self.weight_decay, lr / (1 - self.beta1 ** t),
                      (1 - self.beta2 ** t) ** 0.5]
            self.device.assign(factors, np.array(values, dtype=dtype))
            self._sent[dtype] = (t, lr)
        return factors

    def _update(self, param: Array, grad: Array, buffers: Mapping[str, Array],
                lr: float, skip_if: Array | None) -> None:
        m, v = buffers["exp_avg"], buffers["exp_avg_sq"]
        if self.device.name == "cuda":
            from convdsl.codegen.cuda import arrays

            factors = self._factors_on_device(lr, np.dtype(param.dtype))
            arrays.adam_step(param, grad, m, v, factors, self.beta1, self.beta2, self.eps,
                             self.weight_decay, self.decoupled, skip_if)
            return
        if self.weight_decay and self.decoupled:
            param *= 1 - lr * self.weight_decay
        elif self.weight_decay:
            grad = grad + self.weight_decay * param
        m += (1 - self.beta1) * (grad - m)  # beta1 m + (1 - beta1) g, as PyTorch's lerp
        v *= self.beta2
        v += (1 - self.beta2) * grad * grad
        t = self.steps + 1
        # The bias corrections undo the zero start of m and v; the operations are in
        # PyTorch's order, so that float64 results agree to the last few bits.
        step_size = lr / (1 - self.beta1 ** t)
        denominator = np.sqrt(v) / (1 - self.beta2 ** t) ** 0.5 + self.eps
        param -= step_size * m / denominator


def make_optimizer(settings: TrainSettings, params: Arrays) -> Optimizer:
    """The optimizer the settings name, for these (trained) parameters."""
    if settings.optimizer == "sgd":
        if settings.nesterov and not settings.momentum:
            raise RunError("Nesterov momentum needs a momentum above 0",
                           "set momentum (0.9 is usual), or nesterov=false")
        return SGD(params, settings.momentum, settings.nesterov, settings.weight_decay)
    if settings.optimizer in ("adam", "adamw"):
        return Adam(params, settings.beta1, settings.beta2, settings.eps,
                    settings.weight_decay, decoupled=settings.optimizer == "adamw")
    raise RunError(f"unknown optimizer '{settings.optimizer}'",
                   f"choose one of {', '.join(OPTIMIZERS)}")


class Schedule:
    """The learning rate of every step of a run, from its position alone."""

    def __init__(self, settings: TrainSettings, steps_per_epoch: int) -> None:
        if steps_per_epoch < 1:
            raise RunError(f"a schedule needs at least 1 step per epoch, not {steps_per_epoch}")
        if settings.schedule not in SCHEDULES:
            raise RunError(f"unknown schedule '{settings.schedule}'",
                           f"choose one of {', '.join(SCHEDULES)}")
        if settings.warmup > settings.epochs:
            raise RunError(f"the warm-up ({settings.warmup} epochs) is longer than the "
                           f"training ({settings.epochs} epochs)",
                           "lower warmup, or train for more epochs")
        self.settings = settings
        self.steps_per_epoch = steps_per_epoch

    def lr(self, epoch: int, batch_index: int) -> float:
        """The rate for batch `batch_index` (from 0) of epoch `epoch` (from 0)."""
        s = self.settings
        if not (0 <= epoch < s.epochs and 0 <= batch_index < self.steps_per_epoch):
            raise RunError(f"no learning rate for epoch {epoch}, batch {batch_index}: the "
                           f"schedule has {s.epochs} epochs of {self.steps_per_epoch} steps")
        warmup_steps = s.warmup * self.steps_per_epoch
        step = epoch * self.steps_per_epoch + batch_index
        if step < warmup_steps:  # linear, from lr / warmup_steps up to lr
            return s.lr * (step + 1) / warmup_steps
        e, total = epoch - s.warmup, s.epochs - s.warmup  # epochs after the warm-up
        if s.schedule == "step":
            return s.lr * s.gamma ** (e // s.step_size)
        if s.schedule == "cosine":
            return s.min_lr + (s.lr - s.min_lr) * (1 + math.cos(math.pi * e / total)) / 2
        return s.lr


def _cut(flat: Array, part: slice, size: int) -> Array:
    """flat[part], or flat itself where the part is all of it: on a GPU a slice is a new
    array object every step, whose launch would pack its arguments anew."""
    return flat if part.start == 0 and part.stop >= size else flat[part]


def _some(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"
