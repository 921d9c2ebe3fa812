"""Batch normalisation on the GPU, training and inference, any spatial rank or a flat
input; the same semantics as codegen/cpu/norm.py.

The kernels see the input as (N, C, S): S positions per channel (S = 1 for a flat vector
of C features). Every statistic is per channel, so each kernel runs ONE BLOCK PER
CHANNEL: the block's threads stride over the channel's N*S values, each summing its
share in a float64 register, then combine the shares in a shared-memory tree reduction
(a fixed pairing, so the result is the same on every run; no atomics). Only the block
of channel c writes channel c of the output, of the input gradient, of the running
statistics and of the parameter gradients, so no two blocks ever write one address.

Training normalises with the batch mean and biased variance (two passes over the
values: no cancellation in E[x^2] - E[x]^2) and updates the running statistics in place
with the unbiased variance and the momentum, as PyTorch does; the block of channel 0
also counts the batch in num_batches_tracked. Inference uses the running statistics.
Forward keeps the mean and 1/sqrt(var + eps) it used per channel (float64), so backward
recomputes xhat = (x - mean) / std from the input instead of storing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import apply_act, gradient_lines
from convdsl.codegen.cuda.activation import FusedAct
from convdsl.codegen.cuda.common import (
    CHANNEL_THREADS,
    JIT,
    PRELUDE,
    DeviceArray,
    Launch,
    View,
    empty,
)
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import BatchNormAttrs, Op


def block_threads(count: int) -> int:
    """Threads of a one-block-per-channel kernel: the smallest power of two (for the
    tree) that covers the channel's values, at most CHANNEL_THREADS. Real layers fill
    whole warps; a tiny one starts no idle threads (each costs real time in the
    simulator)."""
    threads = 1
    while threads < min(count, CHANNEL_THREADS):
        threads *= 2
    return threads


def _tree(code: Code, buffers: list[str], threads: int) -> None:
    """Sum each shared buffer into its element 0, halving the active threads each step."""
    code.line("cuda.syncthreads()")
    step = threads // 2
    while step >= 1:
        with code.block(f"if t < {step}"):
            for buffer in buffers:
                code.line(f"{buffer}[t] += {buffer}[t + {step}]")
        code.line("cuda.syncthreads()")
        step //= 2


@contextmanager
def _my_values(code: Code, count: int, positions: int, threads: int) -> Iterator[None]:
    """A loop over the values of channel c that thread t handles: binds n, s."""
    with code.block(f"for j in range(t, {count}, {threads})"):
        code.line(f"n = j // {positions}")
        code.line(f"s = j % {positions}")
        yield


@cache.template("cuda_batchnorm")
def _render_batchnorm(spec: KernelSpec) -> str:
    """forward_train, forward_eval, backward_train, backward_eval over (N, C, S)
    arrays, each launched as [C, threads]."""
    ((batch, _, positions),) = spec.shapes
    count = batch * positions  # values per channel
    threads = int(spec.option("threads"))
    affine = bool(spec.option("affine"))
    eps = float(spec.option("eps"))
    momentum = float(spec.option("momentum"))
    keep = 1.0 - momentum
    unbias = count / (count - 1) if count > 1 else math.nan  # the layer refuses count 1
    scale_arg, grad_args = ("w, b, ", ", dw, db") if affine else ("", "")

    code = Code()
    code.line(PRELUDE)
    code.line("import numba")
    code.line()

    def start() -> None:
        code.line("c = cuda.blockIdx.x")
        code.line("t = cuda.threadIdx.x")

    def reduce_into(name: str) -> None:
        """Every thread's `name` becomes the sum over the block."""
        code.line(f"buf[t] = {name}")
        _tree(code, ["buf"], threads)
        code.line(f"{name} = buf[0]")

    def normalise_into_y() -> None:
        """y = act((x - mu) * r * w + b) over this thread's values, given mu and r."""
        code.line("scale = r * w[c]" if affine else "scale = r")
        code.line("shift = b[c]" if affine else "shift = 0.0")
        with _my_values(code, count, positions, threads):
            code.line("v = (x[n, c, s] - mu) * scale + shift")
            code.line(f"y[n, c, s] = {apply_act(spec, 'v')}")

    code.line(JIT)
    with code.block(f"def forward_train(x, {scale_arg}y, mean, inv, running_mean, "
                    "running_var, tracked)"):
        start()
        code.line(f"buf = cuda.shared.array({threads}, numba.float64)")
        code.line("total = 0.0")
        with _my_values(code, count, positions, threads):
            code.line("total += x[n, c, s]")
        reduce_into("total")
        code.line(f"mu = total / {count}")
        code.line("cuda.syncthreads()")  # everyone has read buf[0] before it is reused
        code.line("spread = 0.0")
        with _my_values(code, count, positions, threads):
            code.line("d = x[n, c, s] - mu")
            code.line("spread += d * d")
        reduce_into("spread")
        code.line(f"var = spread / {count}")  # biased: what normalises the batch
        code.line(f"r = 1.0 / math.sqrt(var + {eps!r})")
        with code.block("if t == 0"):
            code.line("mean[c] = mu")
            code.line("inv[c] = r")
            # PyTorch's update, with the unbiased variance
            code.line(f"running_mean[c] = {keep!r} * running_mean[c] + {momentum!r} * mu")
            code.line(f"running_var[c] = {keep!r} * running_var[c] + {momentum!r} * var * "
                      f"{unbias!r}")
            with code.block("if c == 0"):
                code.line("tracked[0] += 1")
        normalise_into_y()
    code.line()
    code.line(JIT)
    with code.block(f"def forward_eval(x, {scale_arg}y, mean, inv, running_mean, "
                    "running_var)"):
        start()
        code.line("mu = running_mean[c]")
        code.line(f"r = 1.0 / math.sqrt(running_var[c] + {eps!r})")
        with code.block("if t == 0"):
            code.line("mean[c] = mu")
            code.line("inv[c] = r")
        normalise_into_y()

    def sums() -> None:
        """sum_g = sum of g, sum_gx = sum of g * xhat over channel c (block-wide)."""
        start()
        code.line(f"buf_g = cuda.shared.array({threads}, numba.float64)")
        code.line(f"buf_gx = cuda.shared.array({threads}, numba.float64)")
        code.line("mu = mean[c]")
        code.line("r = inv[c]")
        code.line("sum_g = 0.0")
        code.line("sum_gx = 0.0")
        with _my_values(code, count, positions, threads):
            gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
            code.line("sum_g += g")
            code.line("sum_gx += g * (x[n, c, s] - mu) * r")
        code.line("buf_g[t] = sum_g")
        code.line("buf_gx[t] = sum_gx")
        _tree(code, ["buf_g", "buf_gx"], threads)
        code.line("sum_g = buf_g[0]")
        code.line("sum_gx = buf_gx[0]")
        if affine:
            with code.block("if t == 0"):
                code.line("dw[c] = sum_gx")
                code.line("db[c] = sum_g")
        code.line("gain = r * w[c]" if affine else "gain = r")

    w_arg = "w, " if affine else ""
    signature = f"(x, y, dy, {w_arg}mean, inv, dx{grad_args}, act_grad)"
    code.line()
    code.line(JIT)
    with code.block(f"def backward_train{signature}"):
        sums()
        # the batch statistics depend on x too: remove g's mean and its xhat part
        code.line(f"mean_g = sum_g / {count}")
        code.line(f"mean_gx = sum_gx / {count}")
        with _my_values(code, count, positions, threads):
            gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
            code.line("xhat = (x[n, c, s] - mu) * r")
            code.line("dx[n, c, s] = (g - mean_g - xhat * mean_gx) * gain")
    code.line()
    code.line(JIT)
    with code.block(f"def backward_eval{signature}"):
        sums()  # fixed statistics: a per-channel affine map
        with _my_values(code, count, positions, threads):
            gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
            code.line("dx[n, c, s] = g * gain")
    return code.text()


class BatchNormLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        attrs = setup.layer.attrs
        assert isinstance(attrs, BatchNormAttrs)
        self.affine = attrs.affine
        batch, channels, *sizes = setup.batched_inputs[0]
        self.view = (batch, channels, math.prod(sizes))  # 1 position for a flat input
        self.count = batch * self.view[2]
        self.channels = channels
        self.threads = block_threads(self.count)
        self.act = FusedAct(attrs.act, setup.batched_output, setup.dtype)
        self.spec = KernelSpec.make("cuda_batchnorm", setup.dtype, (self.view,),
                                    eps=attrs.eps, momentum=attrs.momentum,
                                    affine=attrs.affine, threads=self.threads,
                                    **self.act.options())
        self.specs = [self.spec, *self.act.specs]
        self.algorithm = "block per channel"
        self.reason = (f"one block of {self.threads} threads per channel, shared-memory "
                       "tree reductions")
        module = cache.load(self.spec)
        self.out = empty(setup.batched_output, setup.dtype)
        self.dx = empty(setup.batched_inputs[0], setup.dtype)
        scale: list[View] = [None, None] if self.affine else []
        weight: list[View] = [None] if self.affine else []
        grid = self.channels, self.threads
        view = self.view
        # forward: x, [weight, bias], y, mean, inv, running_mean, running_var[, count]
        self._forward_train = Launch(module.forward_train, *grid,
                                     views=[view, *scale, view, None, None, None, None, (1,)])
        self._forward_eval = Launch(module.forward_eval, *grid,
                                    views=[view, *scale, view, None, None, None, None])
        # backward: x, y, dy, [weight], mean, inv, dx, [dweight, dbias], act_grad
        views = [view, view, view, *weight, None, None, view, *scale, None]
        self._backward_train = Launch(module.backward_train, *grid, views=views)
        self._backward_eval = Launch(module.backward_eval, *grid, views=views)
        # the statistics forward used, kept as computed
        self.mean = empty((channels,), np.float64)
        self.inv = empty((channels,), np.float64)
        self.x: DeviceArray | None = None
        self.train = False

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self.x = inputs[0]
        self.train = mode.train
        scale = [params["weight"], params["bias"]] if self.affine else []
        if mode.train:
            if self.count < 2:
                raise ValueError(f"'{self.name}': batch norm in training needs more than "
                                 "one value per channel")
            self._forward_train(
                self.x, *scale, self.out, self.mean, self.inv, params["running_mean"],
                params["running_var"], params["num_batches_tracked"])
        else:
            self._forward_eval(
                self.x, *scale, self.out, self.mean, self.inv, params["running_mean"],
                params["running_var"])
        self.act.forward(self.out)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        if self.x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        act_grad = self.act.backward(self.out, grad_output, skip_act)
        weight = [params["weight"]] if self.affine else []
        param_grads = [grads["weight"], grads["bias"]] if self.affine else []
        run = self._backward_train if self.train else self._backward_eval
        run(self.x, self.out, grad_output, *weight, self.mean, self.inv, self.dx,
            *param_grads, act_grad)
        return [self.dx]


@builder(Op.BATCHNORM, device="cuda")
def build_batchnorm(setup: LayerSetup) -> KernelLayer:
    return BatchNormLayer(setup)
