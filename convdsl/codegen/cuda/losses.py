"""Losses at the network's outputs on the GPU: the device twin of runtime/losses.py's
`evaluate`, with the same semantics and the same numbers (see that module: means over
examples and positions, probabilities when the output ends in a softmax, the gradient
taken before that softmax when `grad_at_logits`).

The gradient is written into a device array the caller owns (the output's gradient
buffer), and the loss value comes back as per-row partial sums: cross-entropy runs one
thread per (example, position) row, which computes its row's term of the loss and its
row of the gradient; squared error runs one thread per chunk of CHUNK values. Each
thread writes only its own row (or chunk) of the gradient and its own partial sum, so
there are no races and no atomics; the host adds the few partial sums (float64, in a
fixed order), so the value is deterministic. The whole output never leaves the device.

`DeviceLoss` holds one output's kernels and its partial-sum buffer (allocated once);
`queue` launches it, keeping one DeviceLoss per output shape and options, and
`evaluate` also reads the value back.
"""

from __future__ import annotations

import math

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.cuda import arrays
from convdsl.codegen.cuda.common import FLAT, JIT, PRELUDE, DeviceArray, Launch, empty, grid_for
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import Loss

CHUNK = 32  # values per thread (and per partial sum) of squared error


def _rows_view(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(N, C, positions) of an output of shape (N, C, *spatial)."""
    batch, classes, *sizes = shape
    return batch, classes, math.prod(sizes)


@cache.template("cuda_cross_entropy")
def _render_cross_entropy(spec: KernelSpec) -> str:
    """evaluate(y, targets, grad, partial) over (N, C, S) outputs and (N*S,) targets:
    partial[row] = the row's loss term (not yet divided by the row count)."""
    ((batch, classes, positions),) = spec.shapes
    rows = batch * positions
    probabilities = bool(spec.option("probabilities"))
    at_logits = bool(spec.option("grad_at_logits"))
    tiny = float(np.finfo(spec.dtype).tiny)
    code = Code()
    code.line(PRELUDE)
    code.line(JIT)
    with code.block("def evaluate(y, targets, grad, partial)"):
        code.line("r = cuda.grid(1)")
        with code.block(f"if r < {rows}"):
            code.line(f"n = r // {positions}")
            code.line(f"s = r % {positions}")
            code.line("k = targets[r]")
            if not probabilities:  # log-softmax of the logits, shifted for stability
                code.line("top = y[n, 0, s]")
                with code.block(f"for c in range(1, {classes})"):
                    code.line("top = max(top, y[n, c, s])")
                code.line("total = 0.0")
                with code.block(f"for c in range({classes})"):
                    code.line("total += math.exp(y[n, c, s] - top)")
                code.line("partial[r] = math.log(total) - (y[n, k, s] - top)")
                with code.block(f"for c in range({classes})"):
                    code.line("p = math.exp(y[n, c, s] - top) / total")
                    code.line(f"grad[n, c, s] = (p - 1.0 if c == k else p) / {rows}")
            else:
                code.line(f"picked = max(y[n, k, s], {tiny!r})")
                code.line("partial[r] = -math.log(picked)")
                with code.block(f"for c in range({classes})"):
                    if at_logits:  # p - onehot: the gradient before the softmax
                        code.line("p = y[n, c, s]")
                        code.line(f"grad[n, c, s] = (p - 1.0 if c == k else p) / {rows}")
                    else:  # with respect to the probabilities themselves
                        code.line(f"grad[n, c, s] = -1.0 / (picked * {rows}) if c == k "
                                  "else 0.0")
    return code.text()


@cache.template("cuda_mse")
def _render_mse(spec: KernelSpec) -> str:
    """evaluate(y, targets, grad, partial) over flat arrays: partial[chunk] = the sum
    of squared differences over the chunk's CHUNK values."""
    ((size,),) = spec.shapes
    chunk = int(spec.option("chunk"))
    code = Code()
    code.line(PRELUDE)
    code.line("import numba")
    code.line()
    code.line(JIT)
    with code.block("def evaluate(y, targets, grad, partial)"):
        code.line("q = cuda.grid(1)")
        with code.block(f"if q < {math.ceil(size / chunk)}"):
            code.line("total = 0.0")
            with code.block(f"for i in range(q * {chunk}, min(q * {chunk} + {chunk}, "
                            f"{size}))"):
                # the targets in the output's type first, as runtime/losses.py does
                code.line(f"d = y[i] - numba.{spec.dtype}(targets[i])")
                code.line("total += d * d")
                code.line(f"grad[i] = {2.0 / size!r} * d")
            code.line("partial[q] = total")
    return code.text()


class DeviceLoss:
    """One output's loss on the device: its kernel and its partial-sum buffer."""

    def __init__(self, loss: Loss, shape: tuple[int, ...], dtype: str,
                 softmax_output: bool, grad_at_logits: bool = True) -> None:
        """shape: the output's batched shape."""
        self.loss = loss
        self.shape = shape
        self.through_softmax = (loss is Loss.CROSS_ENTROPY and softmax_output
                                and grad_at_logits)
        self.spec: KernelSpec | None = None
        if loss is Loss.CROSS_ENTROPY:
            view = _rows_view(shape)
            self.view: tuple[int, ...] = view
            self.count = view[0] * view[2]  # rows: the mean's divisor
            self.spec = KernelSpec.make("cuda_cross_entropy", dtype, (view,),
                                        probabilities=softmax_output,
                                        grad_at_logits=grad_at_logits)
            partials = self.count
        elif loss is Loss.MSE:
            size = math.prod(shape)
            self.view = (size,)
            self.count = size
            self.spec = KernelSpec.make("cuda_mse", dtype, (self.view,), chunk=CHUNK)
            partials = math.ceil(size / CHUNK)
        else:
            self.view = shape
            self.count = 1
            partials = 1
        kernel = None if self.spec is None else cache.load(self.spec).evaluate
        self._evaluate = (None if kernel is None else
                          Launch(kernel, *grid_for(partials), views=[self.view, FLAT,
                                                                    self.view, None]))
        self.partial = empty((partials,), np.float64)

    def launch(self, output: DeviceArray, targets: DeviceArray, grad: DeviceArray) -> None:
        """Write d loss / d output (before the softmax when through_softmax) into `grad`,
        shaped like `output`, and the loss's partial sums into `partial`: queued, so the
        host does not wait (`value` reads them)."""
        if self._evaluate is None:  # loss=none: no loss, no gradient
            arrays.fill(grad, 0.0)
            arrays.fill(self.partial, 0.0)
            return
        self._evaluate(output, targets, grad, self.partial)

    def value(self) -> float:
        """The loss of the last launch: its partial sums, added on the host (float64,
        in a fixed order); the host waits here for the kernels queued before."""
        return float(np.sum(self.partial.copy_to_host()) / self.count)


_LOSSES: dict[tuple[Loss, tuple[int, ...], str, bool, bool], DeviceLoss] = {}


def queue(loss: Loss, output: DeviceArray, targets: DeviceArray, softmax_output: bool,
          grad_at_logits: bool, grad_output: DeviceArray) -> DeviceLoss:
    """runtime/losses.evaluate on the device, launched: writes the gradient into
    `grad_output` (a device array shaped like `output`) and returns the output's
    DeviceLoss, whose `value()` is the loss once read. Targets are on the device: class
    indices of shape (N, *spatial) for cross-entropy, the output's shape for squared
    error (checked by the caller, as on the CPU)."""
    key = (loss, tuple(output.shape), str(output.dtype), softmax_output, grad_at_logits)
    if key not in _LOSSES:
        _LOSSES[key] = DeviceLoss(loss, key[1], key[2], softmax_output, grad_at_logits)
    device_loss = _LOSSES[key]
    device_loss.launch(output, targets, grad_output)
    return device_loss


def evaluate(loss: Loss, output: DeviceArray, targets: DeviceArray, softmax_output: bool,
             grad_at_logits: bool, grad_output: DeviceArray) -> tuple[float, bool]:
    """`queue`, then read: (loss value, through_softmax)."""
    device_loss = queue(loss, output, targets, softmax_output, grad_at_logits, grad_output)
    return device_loss.value(), device_loss.through_softmax
