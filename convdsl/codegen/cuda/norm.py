"""Batch normalisation on the GPU, training and inference, any spatial rank or a flat
input; the same semantics as codegen/cpu/norm.py.

The kernels see the input as (N, C, S), S positions per channel (S = 1 for a flat vector
of C features), and read it flat at unsigned offsets. Every statistic is per channel:
each channel's N*S values are shared by `blocks` blocks (channel_blocks: one where the
layer has channels enough to fill the GPU, up to CHANNEL_BLOCKS / C where it has few),
whose threads stride over them, each summing its share in float64 registers, then
combine the shares in a shared-memory tree (a fixed pairing, so the result is the same
on every run; no atomics). With one block per channel each pass is one kernel. With
several, a pass whose values need the channel's sums is two: the first writes each
block's sums to `partial`, the second adds a channel's partial sums in block order (in
every thread: a few cached loads) and goes on. Only blocks of channel c write channel c
of the output and the input gradient, each its own values; only its first block writes
the statistics, running statistics and parameter gradients of channel c.

Training normalises with the batch mean and biased variance and updates the running
statistics in place with the unbiased variance and the momentum, as PyTorch does; the
first block of channel 0 also counts the batch in num_batches_tracked. The variance
comes from float64 sums of d and d*d, d = x - x[0, c, 0]: shifted by one of the
channel's own values, the sums of float32 values lose nothing to cancellation, and the
statistics take one pass over the values instead of two. Inference uses the running
statistics. Forward keeps the mean and 1/sqrt(var + eps) it used per channel (float64),
so backward recomputes xhat = (x - mean) / std from the input instead of storing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import act_from_spec, apply_act, gradient_lines, is_identity
from convdsl.codegen.cuda.activation import FusedAct
from convdsl.codegen.cuda.common import (
    CHANNEL_THREADS,
    FLAT,
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

# A channel's values are shared by several blocks where that gives the layer about this
# many blocks in all (four of 512 threads on each of an H100's 132 SMs), as long as each
# thread still sums at least VALUES_PER_THREAD values: with one block per channel,
# ResNet-18-CIFAR's first layers ran 64 blocks, on half the SMs, each thread waiting on
# its loads in turn.
CHANNEL_BLOCKS = 512
VALUES_PER_THREAD = 8
GROUP = 4  # values a thread loads before it stores any, in the loops that store


def block_threads(count: int) -> int:
    """Threads of a block that sums a channel's values: the smallest power of two (for
    the tree) that covers the channel's values, at most CHANNEL_THREADS. Real layers fill
    whole warps; a tiny one starts no idle threads (each costs real time in the
    simulator)."""
    threads = 1
    while threads < min(count, CHANNEL_THREADS):
        threads *= 2
    return threads


def channel_blocks(channels: int, count: int, threads: int) -> int:
    """Blocks that share one channel's `count` values: enough that the layer has about
    CHANNEL_BLOCKS blocks in all, as long as each thread still sums VALUES_PER_THREAD
    values or more."""
    wanted = -(-CHANNEL_BLOCKS // channels)
    most = count // (threads * VALUES_PER_THREAD)
    return max(1, min(wanted, most))


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


class _Channel:
    """The generated code's view of channel c of an (N, C, S) array read flat: which
    block (of `blocks` per channel) and thread run, and the loop over their values."""

    def __init__(self, code: Code, spec: KernelSpec) -> None:
        ((batch, channels, positions),) = spec.shapes
        self.code = code
        self.batch, self.channels, self.positions = batch, channels, positions
        self.count = batch * positions  # values per channel
        self.threads = int(spec.option("threads"))
        self.blocks = int(spec.option("blocks"))

    def start(self) -> None:
        """Bind c (the channel), b (this block's share of it) and t (the thread)."""
        if self.blocks == 1:
            self.code.line("c = cuda.blockIdx.x")
            self.code.line("b = 0")
        else:
            self.code.line(f"c = cuda.blockIdx.x // {self.blocks}")
            self.code.line(f"b = cuda.blockIdx.x % {self.blocks}")
        self.code.line("t = cuda.threadIdx.x")

    def first_value(self) -> str:
        """The channel's first value, x[0, c, 0], as float64: the shift of its sums."""
        return f"float64(x[uint64(c * {self.positions})])"

    @contextmanager
    def values(self) -> Iterator[None]:
        """A loop over this block's and thread's values of channel c: binds `o`, their
        offset in the flat array. Blocks take turns by whole rows of `threads` values,
        so a warp reads consecutive addresses."""
        code = self.code
        self._start_loop()
        with code.block(f"while j < uint64({self.count})"):
            code.line(f"o = {self._offset('j')}")
            yield
            code.line(f"j += uint64({self.stride})")

    def each_value(self, loads: list[str], body: Callable[[str], None]) -> None:
        """The loop of `values`, GROUP values a pass: the group's loads from the arrays
        `loads` first, then `body(k)` for each value, which writes the code for the k-th
        (its offset o{k}, its loaded values array_{k}). Where each value's store came
        before the next value's load, a thread had one load in flight: the compiler
        cannot tell the arrays apart, so it keeps that order."""
        code = self.code
        self._start_loop()

        def group(size: int) -> None:
            for k in range(size):
                at = "j" if k == 0 else f"j + uint64({k * self.stride})"
                code.line(f"o{k} = {self._offset(at)}")
            for k in range(size):
                for array in loads:
                    code.line(f"{array}_{k} = {array}[o{k}]")
            for k in range(size):
                body(str(k))
            code.line(f"j += uint64({size * self.stride})")

        last = (GROUP - 1) * self.stride
        with code.block(f"while j + uint64({last}) < uint64({self.count})"):
            group(GROUP)
        with code.block(f"while j < uint64({self.count})"):
            group(1)

    @property
    def stride(self) -> int:
        return self.blocks * self.threads

    def _start_loop(self) -> None:
        """Bind j, the number of this thread's first value of the channel, and `base`,
        the channel's offset in an example. All unsigned (Numba turns a mix of signed and unsigned
        integers into floats): no wrap-around of negative indices, and division by a
        power of two is a shift."""
        start = "t" if self.blocks == 1 else f"b * {self.threads} + t"
        self.code.line(f"base = uint64(c * {self.positions})")
        self.code.line(f"j = uint64({start})")

    def _offset(self, j: str) -> str:
        """The flat offset of the channel's value number `j` (an unsigned expression)."""
        if self.positions == 1:
            return f"({j}) * uint64({self.channels}) + base"
        return (f"(({j}) // uint64({self.positions})) * "
                f"uint64({self.channels * self.positions}) + base + "
                f"({j}) % uint64({self.positions})")

    def block_sums(self, names: list[str]) -> None:
        """Each thread's `names` become their sums over the block (a shared-memory tree:
        a fixed pairing, the same result on every run)."""
        for name in names:
            self.code.line(f"sum_{name} = cuda.shared.array({self.threads}, float64)")
            self.code.line(f"sum_{name}[t] = {name}")
        _tree(self.code, [f"sum_{name}" for name in names], self.threads)
        for name in names:
            self.code.line(f"{name} = sum_{name}[0]")

    def store_partials(self, names: list[str]) -> None:
        """This block's sums into partial[c, b, :], for the kernel that follows."""
        with self.code.block("if t == 0"):
            for index, name in enumerate(names):
                self.code.line(f"partial[c, b, {index}] = {name}")

    def gather_partials(self, names: list[str]) -> None:
        """`names` summed over the channel's blocks, in block order: every thread reads
        the same few partial sums (one cached load each), so no barrier is needed."""
        for name in names:
            self.code.line(f"{name} = 0.0")
        with self.code.block(f"for i in range({self.blocks})"):
            for index, name in enumerate(names):
                self.code.line(f"{name} += partial[c, i, {index}]")


@cache.template("cuda_batchnorm")
def _render_batchnorm(spec: KernelSpec) -> str:
    """Over (N, C, S) arrays read flat, launched as [C * blocks, threads]. With one block
    per channel: forward_train, forward_eval, backward_train, backward_eval, each one
    kernel. With several, a channel's sums take two kernels, the second reading the
    first's partial sums per block: statistics then normalize_train, forward_eval,
    gradient_sums then input_grad_train or input_grad_eval."""
    channel = _Channel(Code(), spec)
    code = channel.code
    affine = bool(spec.option("affine"))
    eps = float(spec.option("eps"))
    momentum = float(spec.option("momentum"))
    keep = 1.0 - momentum
    count = channel.count
    unbias = count / (count - 1) if count > 1 else math.nan  # the layer refuses count 1
    split = channel.blocks > 1
    scale_arg, grad_args = ("w, bias, ", ", dw, db") if affine else ("", "")

    code.line(PRELUDE)
    code.line("from numba import float64, uint64")
    code.line()

    def first_sums() -> None:
        """s1, s2: sums of d and d*d over this thread's values, d = x - the shift."""
        code.line(f"shift = {channel.first_value()}")
        code.line("s1 = 0.0")
        code.line("s2 = 0.0")
        with channel.values():
            code.line("d = float64(x[o]) - shift")
            code.line("s1 += d")
            code.line("s2 += d * d")

    def statistics_from_sums() -> None:
        """mu, var (biased) and r = 1/sqrt(var + eps) from the channel's s1 and s2, and
        by one thread the statistics kept and the running ones. Shifted by one of the
        channel's values, float64 sums of float32 values lose nothing to cancellation."""
        code.line(f"m1 = s1 / {count}")
        code.line("mu = shift + m1")
        code.line(f"var = max(s2 / {count} - m1 * m1, 0.0)")  # what normalises the batch
        code.line(f"r = 1.0 / math.sqrt(var + {eps!r})")
        with code.block("if b == 0 and t == 0"):
            code.line("mean[c] = mu")
            code.line("inv[c] = r")
            # PyTorch's update, with the unbiased variance
            code.line(f"running_mean[c] = {keep!r} * running_mean[c] + {momentum!r} * mu")
            code.line(f"running_var[c] = {keep!r} * running_var[c] + {momentum!r} * var * "
                      f"{unbias!r}")
            with code.block("if c == 0"):
                code.line("tracked[0] += 1")

    def normalise_into_y() -> None:
        """y = act((x - mu) * r * w + bias) over this thread's values, given mu and r."""
        code.line("scale = r * w[c]" if affine else "scale = r")
        code.line("offset = bias[c]" if affine else "offset = 0.0")

        def normalise(k: str) -> None:
            code.line(f"v = (x_{k} - mu) * scale + offset")
            code.line(f"y[o{k}] = {apply_act(spec, 'v')}")

        channel.each_value(["x"], normalise)

    train_args = (f"x, {scale_arg}y, mean, inv, running_mean, running_var, tracked"
                  + (", partial" if split else ""))
    def partial_sums_kernel(header: str, sums: Callable[[], None], names: list[str]) -> None:
        """A kernel whose blocks each write their sums of `names` to partial[c, b, :]."""
        code.line(JIT)
        with code.block(header):
            channel.start()
            sums()
            channel.block_sums(names)
            channel.store_partials(names)
        code.line()

    if split:
        partial_sums_kernel("def statistics(x, partial)", first_sums, ["s1", "s2"])
    code.line(JIT)
    with code.block(f"def {'normalize_train' if split else 'forward_train'}({train_args})"):
        channel.start()
        if split:
            code.line(f"shift = {channel.first_value()}")
            channel.gather_partials(["s1", "s2"])
        else:
            first_sums()
            channel.block_sums(["s1", "s2"])
        statistics_from_sums()
        normalise_into_y()
    code.line()
    code.line(JIT)
    with code.block(f"def forward_eval(x, {scale_arg}y, mean, inv, running_mean, "
                    "running_var)"):
        channel.start()
        code.line("mu = running_mean[c]")
        code.line(f"r = 1.0 / math.sqrt(running_var[c] + {eps!r})")
        with code.block("if b == 0 and t == 0"):
            code.line("mean[c] = mu")
            code.line("inv[c] = r")
        normalise_into_y()

    def gradient_sums() -> None:
        """sum_g and sum_gx: g and g * xhat summed over this thread's values."""
        code.line("mu = mean[c]")
        code.line("r = inv[c]")
        code.line("g_total = 0.0")
        code.line("gx_total = 0.0")
        with channel.values():
            gradient_lines(code, spec, "g", "dy[o]", "y[o]")
            code.line("g_total += g")
            code.line("gx_total += g * (x[o] - mu) * r")

    def parameter_grads() -> None:
        code.line("gain = r * w[c]" if affine else "gain = r")
        if affine:
            with code.block("if b == 0 and t == 0"):
                code.line("dw[c] = gx_total")
                code.line("db[c] = g_total")

    def input_grad(train: bool) -> None:
        loads = ["dy"] + ([] if is_identity(act_from_spec(spec)) else ["y"])

        def gradient(k: str) -> None:
            gradient_lines(code, spec, "g", f"dy_{k}", f"y_{k}")
            if train:  # the batch statistics depend on x too: remove g's mean and xhat part
                code.line(f"xhat = (x_{k} - mu) * r")
                code.line(f"dx[o{k}] = (g - mean_g - xhat * mean_gx) * gain")
            else:  # fixed statistics: a per-channel affine map
                code.line(f"dx[o{k}] = g * gain")

        channel.each_value(loads + (["x"] if train else []), gradient)

    w_arg = "w, " if affine else ""
    signature = (f"(x, y, dy, {w_arg}mean, inv, dx{grad_args}, act_grad"
                 + (", partial)" if split else ")"))
    code.line()
    if split:
        partial_sums_kernel("def gradient_sums(x, y, dy, mean, inv, partial, act_grad)",
                            gradient_sums, ["g_total", "gx_total"])
    for train in (True, False):
        code.line(JIT)
        name = ("input_grad_" if split else "backward_") + ("train" if train else "eval")
        with code.block(f"def {name}{signature}"):
            channel.start()
            if split:
                code.line("mu = mean[c]")
                code.line("r = inv[c]")
                channel.gather_partials(["g_total", "gx_total"])
            else:
                gradient_sums()
                channel.block_sums(["g_total", "gx_total"])
            parameter_grads()
            if train:
                code.line(f"mean_g = g_total / {count}")
                code.line(f"mean_gx = gx_total / {count}")
            input_grad(train)
        code.line()
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
        self.blocks = channel_blocks(channels, self.count, self.threads)
        self.act = FusedAct(attrs.act, setup.batched_output, setup.dtype)
        self.spec = KernelSpec.make("cuda_batchnorm", setup.dtype, (self.view,),
                                    eps=attrs.eps, momentum=attrs.momentum,
                                    affine=attrs.affine, threads=self.threads,
                                    blocks=self.blocks, **self.act.options())
        self.specs = [self.spec, *self.act.specs]
        if self.blocks == 1:
            self.algorithm = "block per channel"
            self.reason = (f"one block of {self.threads} threads per channel, "
                           "shared-memory tree sums")
        else:
            self.algorithm = "blocks per channel"
            self.reason = (f"{self.blocks} blocks of {self.threads} threads per channel, "
                           "shared-memory tree sums, then the blocks' sums in order")
        self.out = empty(setup.batched_output, setup.dtype)
        self.dx = empty(setup.batched_inputs[0], setup.dtype)
        # the statistics forward used, kept as computed; the blocks' sums of a channel
        self.mean = empty((channels,), np.float64)
        self.inv = empty((channels,), np.float64)
        self.partial = empty((channels, self.blocks, 2), np.float64)
        self._launches(cache.load(self.spec))
        self.x: DeviceArray | None = None
        self.train = False

    def _launches(self, module: Any) -> None:
        grid = self.channels * self.blocks, self.threads
        scale: list[View] = [FLAT, FLAT] if self.affine else []
        weight: list[View] = [FLAT] if self.affine else []
        split: list[View] = [None] if self.blocks > 1 else []
        # forward: x, [weight, bias], y, mean, inv, running_mean, running_var, count[,
        # partial]
        forward: list[View] = [FLAT, *scale, FLAT, FLAT, FLAT, FLAT, FLAT]
        self._statistics = (Launch(module.statistics, *grid, views=[FLAT, None])
                            if self.blocks > 1 else None)
        self._forward_train = Launch(
            module.normalize_train if self.blocks > 1 else module.forward_train, *grid,
            views=[*forward, FLAT, *split])
        self._forward_eval = Launch(module.forward_eval, *grid, views=forward)
        # backward: x, y, dy, [weight], mean, inv, dx, [dweight, dbias], act_grad[,
        # partial]
        backward: list[View] = [FLAT, FLAT, FLAT, *weight, FLAT, FLAT, FLAT, *scale, None,
                                *split]
        self._gradient_sums = (Launch(module.gradient_sums, *grid,
                                      views=[FLAT, FLAT, FLAT, FLAT, FLAT, None, None])
                               if self.blocks > 1 else None)
        prefix = "input_grad_" if self.blocks > 1 else "backward_"
        self._backward_train = Launch(getattr(module, prefix + "train"), *grid,
                                      views=backward)
        self._backward_eval = Launch(getattr(module, prefix + "eval"), *grid, views=backward)

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self.x = inputs[0]
        self.train = mode.train
        scale = [params["weight"], params["bias"]] if self.affine else []
        if mode.train:
            if self.count < 2:
                raise ValueError(f"'{self.name}': batch norm in training needs more than "
                                 "one value per channel")
            split = [self.partial] if self._statistics is not None else []
            if self._statistics is not None:
                self._statistics(self.x, self.partial)
            self._forward_train(
                self.x, *scale, self.out, self.mean, self.inv, params["running_mean"],
                params["running_var"], params["num_batches_tracked"], *split)
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
        split = [self.partial] if self._gradient_sums is not None else []
        if self._gradient_sums is not None:
            self._gradient_sums(self.x, self.out, grad_output, self.mean, self.inv,
                                self.partial, act_grad)
        run = self._backward_train if self.train else self._backward_eval
        run(self.x, self.out, grad_output, *weight, self.mean, self.inv, self.dx,
            *param_grads, act_grad, *split)
        return [self.dx]


@builder(Op.BATCHNORM, device="cuda")
def build_batchnorm(setup: LayerSetup) -> KernelLayer:
    return BatchNormLayer(setup)
