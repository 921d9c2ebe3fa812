"""Pooling kernels on the GPU: max, average and soft pooling over 1, 2 or 3 spatial axes,
and the global poolings; the same semantics as codegen/cpu/pool.py.

The kernels see the arrays as (N*C, *spatial) planes. Forward runs one thread per output
element, looping over the real input positions of its window (padding and a ceil-mode
overhang never contribute, so no padded copy is made); max pooling also records the
flat position, in its plane, of each window's first maximum (row-major window order,
as PyTorch).

Backward is a gather, not a scatter: one thread per INPUT element loops over the output
windows that cover it (computed per axis from stride, padding and dilation, in
ascending output order) and sums their contributions into a register, then writes its
own element once. Overlapping windows therefore never make two threads add into one
address: no atomics, and the sums are deterministic. Max pooling's gather adds the
gradient of exactly those windows whose recorded argmax is this element; average
pooling recomputes each window's divisor; soft pooling recomputes each weight from the
window maximum and sum of exponentials its forward kept. Global pooling is the same
kernels with one window over each whole plane, seen as (N, C, positions).
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.cuda.common import JIT, PRELUDE, DeviceArray, Launch, View, empty, grid_for
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.pool_windows import (
    avg_divisor,
    flat,
    geometry,
    softpool_window,
    window_maximum,
    window_options,
    window_starts,
)
from convdsl.codegen.source import Code, index
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import Op, PoolAttrs


def _names(prefix: str, rank: int) -> list[str]:
    return [f"{prefix}{axis}" for axis in range(rank)]


def _unflatten(code: Code, flat: str, names: list[str], dims: tuple[int, ...]) -> None:
    """Bind `names` to the row-major multi-index of the flat position `flat`."""
    code.line(f"rest = {flat}")
    for name, dim in reversed(list(zip(names[1:], dims[1:]))):
        code.line(f"{name} = rest % {dim}")
        code.line(f"rest = rest // {dim}")
    code.line(f"{names[0]} = rest")


def _thread(code: Code, stack: ExitStack, count: int, names: list[str],
            dims: tuple[int, ...]) -> None:
    """The thread's element among `count`, as the multi-index `names`; threads past
    the end do nothing."""
    code.line("e = cuda.grid(1)")
    stack.enter_context(code.block(f"if e < {count}"))
    _unflatten(code, "e", names, dims)


def _covering_windows(code: Code, stack: ExitStack, spec: KernelSpec) -> None:
    """Nested loops binding o<axis> to every output position whose window holds the
    input position i<axis>, in ascending row-major output order (the gather)."""
    _, _, outs = geometry(spec)
    for axis, (out, width, step, spread, (before, _)) in enumerate(zip(
            outs, spec.option("window"), spec.option("stride"), spec.option("dilation"),
            spec.option("pads"))):
        code.line(f"t{axis} = i{axis} + {before}")  # in padded coordinates, >= 0
        if spread == 1:  # windows [o*step, o*step + width) that hold t
            code.line(f"lo{axis} = 0 if t{axis} < {width} else "
                      f"(t{axis} - {width}) // {step} + 1")
            stack.enter_context(code.block(
                f"for o{axis} in range(lo{axis}, min({out}, t{axis} // {step} + 1))"))
        else:  # t = o*step + k*spread for one tap k: last tap first, so o ascends
            stack.enter_context(code.block(f"for k{axis} in range({width - 1}, -1, -1)"))
            code.line(f"u{axis} = t{axis} - k{axis} * {spread}")
            with code.block(f"if u{axis} < 0 or u{axis} % {step} != 0"):
                code.line("continue")
            code.line(f"o{axis} = u{axis} // {step}")
            with code.block(f"if o{axis} >= {out}"):
                code.line("continue")


def _source(spec: KernelSpec) -> tuple[Code, int, tuple[int, ...],
                                                       tuple[int, ...], int]:
    """A new kernel source, and the spec's planes, sizes, output sizes and rank."""
    planes, sizes, outs = geometry(spec)
    code = Code()
    code.line(PRELUDE)
    return code, planes, sizes, outs, len(sizes)


def _per_output(code: Code, stack: ExitStack, spec: KernelSpec) -> str:
    """One thread per output element: binds p and o<axis>; returns its subscript."""
    planes, _, outs = geometry(spec)
    names = ["p", *_names("o", len(outs))]
    _thread(code, stack, planes * math.prod(outs), names, (planes, *outs))
    return index(names)


def _per_input(code: Code, stack: ExitStack, spec: KernelSpec) -> str:
    """One thread per input element: binds p and i<axis>; returns its subscript."""
    planes, sizes, _ = geometry(spec)
    names = ["p", *_names("i", len(sizes))]
    _thread(code, stack, planes * math.prod(sizes), names, (planes, *sizes))
    return index(names)


@cache.template("cuda_maxpool")
def _render_maxpool(spec: KernelSpec) -> str:
    """forward(x, y, arg), backward(dy, arg, dx) on (N*C, *spatial) views."""
    code, _, sizes, _, rank = _source(spec)
    there = index(["p", *_names("i", rank)])
    code.line(JIT)
    with code.block("def forward(x, y, arg)"), ExitStack() as outer:
        here = _per_output(code, outer, spec)
        window_starts(code, spec)
        window_maximum(code, spec, there, "-math.inf", positions=True)
        code.line(f"y[{here}] = best")
        code.line(f"arg[{here}] = where")
    code.line()
    code.line(JIT)
    with code.block("def backward(dy, arg, dx)"), ExitStack() as outer:
        mine = _per_input(code, outer, spec)
        code.line(f"me = {flat(_names('i', rank), sizes)}")
        code.line("total = 0.0")
        with ExitStack() as stack:
            _covering_windows(code, stack, spec)
            window = index(["p", *_names("o", rank)])
            with code.block(f"if arg[{window}] == me"):
                code.line(f"total += dy[{window}]")
        code.line(f"dx[{mine}] = total")
    return code.text()


@cache.template("cuda_avgpool")
def _render_avgpool(spec: KernelSpec) -> str:
    """forward(x, y), backward(dy, dx) on (N*C, *spatial) views."""
    code, _, _, _, rank = _source(spec)
    there = index(["p", *_names("i", rank)])
    code.line(JIT)
    with code.block("def forward(x, y)"), ExitStack() as outer:
        here = _per_output(code, outer, spec)
        window_starts(code, spec)
        avg_divisor(code, spec, clip=True)
        code.line("total = 0.0")
        with code.loops([(f"i{axis}", f"range(a{axis}, e{axis})") for axis in range(rank)]):
            code.line(f"total += x[{there}]")
        code.line(f"y[{here}] = total / div")
    code.line()
    code.line(JIT)
    with code.block("def backward(dy, dx)"), ExitStack() as outer:
        mine = _per_input(code, outer, spec)
        code.line("total = 0.0")
        with ExitStack() as stack:
            _covering_windows(code, stack, spec)
            window_starts(code, spec)
            avg_divisor(code, spec, clip=False)
            code.line(f"total += dy[{index(['p', *_names('o', rank)])}] / div")
        code.line(f"dx[{mine}] = total")
    return code.text()


@cache.template("cuda_softpool")
def _render_softpool(spec: KernelSpec) -> str:
    """forward(x, y, top, total), backward(x, y, dy, top, total, dx) on (N*C, *spatial)
    views. y = sum_i w_i x_i with w = softmax of the window's real values; forward keeps
    each window's maximum and sum of exponentials so that backward recomputes w_i:
    dy/dx_i = w_i (1 + x_i - y)."""
    code, _, _, _, rank = _source(spec)
    there = index(["p", *_names("i", rank)])
    code.line(JIT)
    with code.block("def forward(x, y, top, total)"), ExitStack() as outer:
        here = _per_output(code, outer, spec)
        window_starts(code, spec)
        softpool_window(code, spec, there, here)
    code.line()
    code.line(JIT)
    with code.block("def backward(x, y, dy, top, total, dx)"), ExitStack() as outer:
        mine = _per_input(code, outer, spec)
        code.line(f"v = x[{mine}]")
        code.line("acc = 0.0")
        with ExitStack() as stack:
            _covering_windows(code, stack, spec)
            window = index(["p", *_names("o", rank)])
            code.line(f"g = dy[{window}] / total[{window}]")
            code.line(f"acc += g * math.exp(v - top[{window}]) * (1.0 + v - y[{window}])")
        code.line(f"dx[{mine}] = acc")
    return code.text()


class _Pool(KernelLayer):
    """Shared plumbing: the plane views of input and output, buffers, launch sizes."""

    def __init__(self, setup: LayerSetup, spec: KernelSpec) -> None:
        """spec.shapes: (N, C, *spatial) of input and output as the kernels index them
        (global pooling: (N, C, positions) and (N, C, 1))."""
        super().__init__(setup)
        in_shape, out_shape = spec.shapes
        planes = in_shape[0] * in_shape[1]
        self.in_view = (planes, *in_shape[2:])
        self.out_view = (planes, *out_shape[2:])
        self.specs = [spec]
        self.algorithm = "direct"
        self.reason = ("one thread per output; backward gathers per input element over "
                       "the windows that cover it")
        self._module = cache.load(spec)
        self.out = empty(setup.batched_output, setup.dtype)
        self.dx = empty(setup.batched_inputs[0], setup.dtype)
        self.per_output = grid_for(math.prod(self.out_view))
        self.per_input = grid_for(math.prod(self.in_view))

    def _forward(self, views: list[View]) -> Launch:
        """The forward kernel, one thread per output, its arguments seen as `views`."""
        return Launch(self._module.forward, *self.per_output, views=views)

    def _backward(self, views: list[View]) -> Launch:
        """The backward kernel, one thread per input element."""
        return Launch(self._module.backward, *self.per_input, views=views)


class MaxPoolLayer(_Pool):
    def __init__(self, setup: LayerSetup, spec: KernelSpec) -> None:
        super().__init__(setup, spec)
        self.arg = empty(self.out_view, np.int32)  # first maximum, flat in its plane
        self._run_forward = self._forward([self.in_view, self.out_view, None])
        self._run_backward = self._backward([self.out_view, None, self.in_view])

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self._run_forward(inputs[0], self.out, self.arg)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        self._run_backward(grad_output, self.arg, self.dx)
        return [self.dx]


class AvgPoolLayer(_Pool):
    def __init__(self, setup: LayerSetup, spec: KernelSpec) -> None:
        super().__init__(setup, spec)
        self._run_forward = self._forward([self.in_view, self.out_view])
        self._run_backward = self._backward([self.out_view, self.in_view])

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self._run_forward(inputs[0], self.out)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        self._run_backward(grad_output, self.dx)
        return [self.dx]


class SoftPoolLayer(_Pool):
    def __init__(self, setup: LayerSetup, spec: KernelSpec) -> None:
        super().__init__(setup, spec)
        self.top = empty(self.out_view, setup.dtype)
        self.total = empty(self.out_view, setup.dtype)
        self.x: DeviceArray | None = None  # the last forward's input
        self._run_forward = self._forward([self.in_view, self.out_view, None, None])
        self._run_backward = self._backward(
            [self.in_view, self.out_view, self.out_view, None, None, self.in_view])

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self.x = inputs[0]
        self._run_forward(self.x, self.out, self.top, self.total)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        if self.x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        self._run_backward(self.x, self.out, grad_output, self.top, self.total, self.dx)
        return [self.dx]


@builder(Op.MAXPOOL, Op.AVGPOOL, Op.SOFTPOOL, device="cuda")
def build_pool(setup: LayerSetup) -> KernelLayer:
    window = setup.window
    assert window is not None, f"'{setup.layer.name}' has no resolved window"
    assert isinstance(setup.layer.attrs, PoolAttrs)
    shapes = (setup.batched_inputs[0], setup.batched_output)
    options = window_options(window)
    op = setup.layer.op
    if op is Op.MAXPOOL:
        return MaxPoolLayer(setup, KernelSpec.make("cuda_maxpool", setup.dtype, shapes,
                                                   **options))
    if op is Op.SOFTPOOL:
        return SoftPoolLayer(setup, KernelSpec.make("cuda_softpool", setup.dtype, shapes,
                                                    **options))
    if any(spread != 1 for spread in window.dilation):
        raise ValueError(f"'{setup.layer.name}': average pooling has no dilation")
    return AvgPoolLayer(setup, KernelSpec.make("cuda_avgpool", setup.dtype, shapes,
                                               count_pad=setup.layer.attrs.count_pad,
                                               **options))


@builder(Op.GLOBAL_MAXPOOL, Op.GLOBAL_AVGPOOL, device="cuda")
def build_global_pool(setup: LayerSetup) -> KernelLayer:
    """One window over each whole plane, seen as a flat (N, C, positions) array."""
    batch, channels, *sizes = setup.batched_inputs[0]
    positions = math.prod(sizes)
    shapes = ((batch, channels, positions), (batch, channels, 1))
    whole = {"window": (positions,), "stride": (positions,), "pads": ((0, 0),),
             "dilation": (1,)}
    if setup.layer.op is Op.GLOBAL_MAXPOOL:
        return MaxPoolLayer(setup, KernelSpec.make("cuda_maxpool", setup.dtype, shapes,
                                                   **whole))
    return AvgPoolLayer(setup, KernelSpec.make("cuda_avgpool", setup.dtype, shapes,
                                               count_pad=True, **whole))
