"""Pooling kernels: max, average and soft pooling over 1, 2 or 3 spatial axes, and the
global poolings.

Every (batch, channel) plane is pooled on its own, so the kernels see the arrays as
(N*C, *spatial) views and the parallel loop runs over planes: each iteration writes only
its own plane of the output (forward) or of the input gradient (backward), with no races
even where windows overlap.

Window loops visit only real input positions: padding (-inf for max, 0 for average and
soft pooling) and a ceil-mode last window's overhang never contribute, so no padded copy
of the input is made. Max pooling stores, per output, the flat position of the first
maximum in row-major window order (as PyTorch does) and its backward scatters the gradient
there. Global pooling is the same kernels with one window covering the whole plane.

A max or average pooling fused after an activation (passes/fusion.py) folds that
activation's derivative into its backward: the gradient it scatters is multiplied by
act'(x), x being its own input (the activation's output; every derivative is written in
terms of the output), so the layer before starts its backward from the gradient before
its activation, with no pass of its own over it.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import act_from_spec, act_options, derivative_expression
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.pool_windows import (
    avg_divisor,
    flat,
    geometry,
    real_positions,
    softpool_window,
    window_maximum,
    window_options,
    window_starts,
)
from convdsl.codegen.source import PRELUDE, Code, index, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ActSpec, Op, PoolAttrs


def _clear_plane(code: Code, spec: KernelSpec) -> None:
    """dx[p] = 0 as explicit loops: slice assignment inside prange has had Numba bugs
    (numba #5942)."""
    _, sizes, _ = geometry(spec)
    with code.loops([(f"i{axis}", f"range({size})") for axis, size in enumerate(sizes)]):
        code.line(f"dx[{index(['p', *(f'i{axis}' for axis in range(len(sizes)))])}] = 0.0")


def _output_loops(spec: KernelSpec) -> list[tuple[str, str]]:
    _, _, outs = geometry(spec)
    return [(f"o{axis}", f"range({size})") for axis, size in enumerate(outs)]


def _folded_act(spec: KernelSpec) -> ActSpec | None:
    """The activation whose derivative a backward kernel folds in (see the module's
    docstring), or None: specs of a pooling that is not fused have no `act` option."""
    return act_from_spec(spec) if any(key == "act" for key, _ in spec.options) else None


def _times_derivative(spec: KernelSpec, value: str, y: str) -> str:
    """`value`, times the folded activation's derivative at output `y` if there is one."""
    act = _folded_act(spec)
    return value if act is None else f"{value} * {derivative_expression(act, y)}"


@cache.template("maxpool")
def _render_maxpool(spec: KernelSpec) -> str:
    """forward(x, y, arg) on (N*C, *spatial) views."""
    planes, sizes, _ = geometry(spec)
    rank = len(sizes)
    here = index(["p", *(f"o{axis}" for axis in range(rank))])
    there = index(["p", *(f"i{axis}" for axis in range(rank))])
    code = Code()
    code.line(PRELUDE + "from numba import uintp  # unsigned subscripts: no wrap-around test\n")
    code.line(jit())
    with code.block("def forward(x, y, arg)"):
        code.line('"""y: each window\'s maximum; arg: the flat position of its first maximum')
        code.line('in the plane (row-major window order, as PyTorch), for the backward pass."""')
        with code.block(f"for p in prange({planes})"):
            if _tap_by_tap(spec):
                _tap_by_tap_maximum(code, spec, positions=True)
            else:
                with code.loops(_output_loops(spec)):
                    window_starts(code, spec)
                    window_maximum(code, spec, there, "-np.inf", positions=True)
                    code.line(f"y[{here}] = best")
                    code.line(f"arg[{here}] = where")
    code.line()
    code.line()
    _render_maxpool_values(code, spec)
    return code.text()


# Padded windows of at most this many taps, over planes at least MIN_ROW outputs wide,
# are maximised tap by tap over whole rows of outputs (_tap_by_tap_maximum). Measured on
# the 2-core machine, training / inference forward against window by window: GoogLeNet's
# 3x3 stride-1 pooling of 32x192x28x28, 10 / 6 ms against 83 / 48; ResNet's 3x3 stride-2
# stem pooling of 32x64x112x112, 16 / 10 ms against 94 / 110. Windows wholly inside the
# input (2x2 stride 2) stay window by window, which ran faster there: 0.1 ms against 1.6.
TAP_BY_TAP_TAPS = 27
MIN_ROW = 4


def _tap_by_tap(spec: KernelSpec) -> bool:
    _, _, outs = geometry(spec)
    return (math.prod(spec.option("window")) <= TAP_BY_TAP_TAPS and outs[-1] >= MIN_ROW
            and not _inside(spec))


def _tap_by_tap_maximum(code: Code, spec: KernelSpec, positions: bool) -> None:
    """The maxima of plane p (inside its loop), and with `positions` their places, with
    the taps outermost: y starts at -inf, then for each tap, in row-major window order,
    every output whose window reads real input there compares and takes it. The inner
    loop runs along a row of outputs with no branch (the comparison selects), which
    vectorises; visiting each output's taps in window order keeps the first maximum,
    NaN propagating and the first real position always counting, as in window_maximum.
    """
    _, sizes, outs = geometry(spec)
    rank = len(sizes)
    here = index(["p", *(f"uintp(o{axis})" for axis in range(rank))])
    there = index(["p", *(f"uintp(i{axis})" for axis in range(rank))])
    with code.loops(_output_loops(spec)):
        plain = index(["p", *(f"o{axis}" for axis in range(rank))])
        code.line(f"y[{plain}] = -np.inf")
        if positions:
            code.line(f"arg[{plain}] = -1")
    with ExitStack() as stack:
        for axis, (size, out, width, step, spread, (before, _)) in enumerate(zip(
                sizes, outs, spec.option("window"), spec.option("stride"),
                spec.option("dilation"), spec.option("pads"))):
            stack.enter_context(code.block(f"for k{axis} in range({width})"))
            # outputs o with 0 <= o * step + k * spread - before < size
            code.line(f"lo{axis} = max(0, -((k{axis} * {spread} - {before}) // {step}))")
            code.line(f"hi{axis} = min({out}, ({size - 1 + before} - k{axis} * {spread}) "
                      f"// {step} + 1)")
            stack.enter_context(code.block(f"for o{axis} in range(lo{axis}, hi{axis})"))
            code.line(f"i{axis} = o{axis} * {step} + k{axis} * {spread} - {before}")
        code.line(f"v = x[{there}]")
        code.line(f"b = y[{here}]")
        if positions:
            code.line(f"a = arg[{here}]")
            code.line("take = (a < 0) | (v > b) | (v != v)")
            place = flat([f"i{axis}" for axis in range(rank)], sizes)
            code.line(f"arg[{here}] = {place} if take else a")
        else:
            code.line("take = (v > b) | (v != v)")
        code.line(f"y[{here}] = v if take else b")


# Windows of up to this many taps, all inside the input, are written out tap by tap.
UNROLL_TAPS = 16


def _inside(spec: KernelSpec) -> bool:
    """Whether every window lies wholly inside the input (no padding, no overhang)."""
    _, sizes, outs = geometry(spec)
    return all(
        before == 0 and (out - 1) * step + (width - 1) * spread < size
        for size, out, step, width, spread, (before, _) in zip(
            sizes, outs, spec.option("stride"), spec.option("window"),
            spec.option("dilation"), spec.option("pads")))


def _render_maxpool_values(code: Code, spec: KernelSpec) -> None:
    """forward_values(x, y): the maxima alone, for inference, where nothing reads the
    positions: a third fewer stores, and windows wholly inside the input are written
    out without bounds or loops. NaN propagates as in forward."""
    planes, sizes, _ = geometry(spec)
    rank = len(sizes)
    here = index(["p", *(f"o{axis}" for axis in range(rank))])
    windows, spreads = spec.option("window"), spec.option("dilation")
    code.line(jit())
    if _tap_by_tap(spec):
        with code.block("def forward_values(x, y)"), \
                code.block(f"for p in prange({planes})"):
            _tap_by_tap_maximum(code, spec, positions=False)
        return
    with code.block("def forward_values(x, y)"), code.block(f"for p in prange({planes})"), \
            code.loops(_output_loops(spec)):
        window_starts(code, spec)
        if _inside(spec) and math.prod(windows) <= UNROLL_TAPS:
            for tap, offsets in enumerate(np.ndindex(*windows)):
                place = index(["p", *(f"a{axis} + {k * spreads[axis]}"
                                      for axis, k in enumerate(offsets))])
                if tap == 0:
                    code.line(f"best = x[{place}]")
                    continue
                code.line(f"v = x[{place}]")
                with code.block("if v > best or v != v"):
                    code.line("best = v")
        else:
            there = index(["p", *(f"i{axis}" for axis in range(rank))])
            window_maximum(code, spec, there, "-np.inf", positions=False)
        code.line(f"y[{here}] = best")


@cache.template("argmax_scatter", sized=False)
def _render_argmax_scatter(spec: KernelSpec) -> str:
    """backward(dy, arg, x, dx) on flat (planes, positions) views of any size: each
    output's gradient goes to the input position its forward pass recorded (times the
    folded activation's derivative there, read from the input x). The window is in the
    recorded positions, so one module serves every max pooling."""
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def backward(dy, arg, x, dx)"), code.block("for p in prange(dx.shape[0])"):
        with code.block("for i in range(dx.shape[1])"):
            code.line("dx[p, i] = 0.0")
        with code.block("for q in range(dy.shape[1])"):
            code.line("where = arg[p, q]")
            with code.block("if where >= 0"):  # overlapping windows add up
                share = _times_derivative(spec, "dy[p, q]", "x[p, where]")
                code.line(f"dx[p, where] += {share}")
    return code.text()


@cache.template("avgpool")
def _render_avgpool(spec: KernelSpec) -> str:
    """forward(x, y), backward(dy, x, dx) on (N*C, *spatial) views (backward reads x
    only for a folded activation's derivative)."""
    planes, sizes, _ = geometry(spec)
    rank = len(sizes)
    here = index(["p", *(f"o{axis}" for axis in range(rank))])
    there = index(["p", *(f"i{axis}" for axis in range(rank))])
    window_loops = [(f"i{axis}", f"range(a{axis}, e{axis})") for axis in range(rank)]
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def forward(x, y)"), code.block(f"for p in prange({planes})"), \
            code.loops(_output_loops(spec)):
        window_starts(code, spec)
        avg_divisor(code, spec)
        code.line("total = 0.0")
        with code.loops(window_loops):
            code.line(f"total += x[{there}]")
        code.line(f"y[{here}] = total / div")
    code.line()
    code.line(jit())
    with code.block("def backward(dy, x, dx)"), code.block(f"for p in prange({planes})"):
        _clear_plane(code, spec)
        with code.loops(_output_loops(spec)):
            window_starts(code, spec)
            avg_divisor(code, spec)
            code.line(f"share = dy[{here}] / div")
            with code.loops(window_loops):
                code.line(f"dx[{there}] += share")
        if _folded_act(spec) is not None:  # the plane is still in cache
            every = index(["p", *(f"i{axis}" for axis in range(rank))])
            with code.loops([(f"i{axis}", f"range({size})") for axis, size in enumerate(sizes)]):
                code.line(f"dx[{every}] = {_times_derivative(spec, f'dx[{every}]', f'x[{every}]')}")
    return code.text()


@cache.template("softpool")
def _render_softpool(spec: KernelSpec) -> str:
    """forward(x, y, top, total), backward(x, y, dy, top, total, dx) on (N*C, *spatial)
    views. y = sum_i w_i x_i with w = softmax of the window's real values; forward keeps
    each window's maximum and sum of exponentials so that backward recomputes w_i in one
    pass: dy/dx_i = w_i (1 + x_i - y)."""
    planes, sizes, _ = geometry(spec)
    rank = len(sizes)
    here = index(["p", *(f"o{axis}" for axis in range(rank))])
    there = index(["p", *(f"i{axis}" for axis in range(rank))])
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def forward(x, y, top, total)"), \
            code.block(f"for p in prange({planes})"), code.loops(_output_loops(spec)):
        window_starts(code, spec)
        softpool_window(code, spec, there, here)
    code.line()
    code.line(jit())
    with code.block("def backward(x, y, dy, top, total, dx)"), \
            code.block(f"for p in prange({planes})"):
        _clear_plane(code, spec)
        with code.loops(_output_loops(spec)):
            window_starts(code, spec)
            code.line(f"g = dy[{here}] / total[{here}]")
            code.line(f"out = y[{here}]")
            code.line(f"peak = top[{here}]")
            with ExitStack() as stack:
                real_positions(code, stack, spec)
                code.line(f"v = x[{there}]")
                code.line(f"dx[{there}] += g * math.exp(v - peak) * (1.0 + v - out)")
    return code.text()


class _Pool(KernelLayer):
    """Shared plumbing: the plane views of input and output, and the buffers."""

    def __init__(self, setup: LayerSetup, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...]) -> None:
        """in_shape, out_shape: (N, C, *spatial) as the kernels index them (global
        pooling passes (N, C, positions) and (N, C, 1))."""
        super().__init__(setup)
        planes = in_shape[0] * in_shape[1]
        self.in_view = (planes, *in_shape[2:])
        self.out_view = (planes, *out_shape[2:])
        self.out = setup.output_buffer()
        self.dx = setup.input_buffer()
        self.out_planes = self.out.reshape(self.out_view)
        self.dx_planes = self.dx.reshape(self.in_view)


class MaxPoolLayer(_Pool):
    def __init__(self, setup: LayerSetup, spec: KernelSpec,
                 folded: dict[str, str | float] | None = None) -> None:
        """folded: act_options of an activation whose derivative backward folds in."""
        super().__init__(setup, spec.shapes[0], spec.shapes[1])
        planes = self.in_view[0]
        self.arg = np.full(self.out_view, -1, dtype=np.int64)
        self.scatter_spec = KernelSpec.make(
            "argmax_scatter", setup.dtype,
            ((planes, math.prod(self.in_view[1:])), (planes, math.prod(self.out_view[1:]))),
            **(folded or {}))
        self.specs = [spec, self.scatter_spec]
        module = cache.load(spec)
        self._forward, self._forward_values = module.forward, module.forward_values
        self._backward = cache.load(self.scatter_spec).backward
        self.flat_view = (planes, -1)
        self.arg_flat = self.arg.reshape(self.flat_view)
        self.dx_flat = self.dx.reshape(self.flat_view)
        self._x: np.ndarray | None = None  # the last forward's input, as planes
        self._positions_current = False  # whether arg holds the last forward's positions

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self._x = inputs[0].reshape(self.in_view)
        if mode.train:
            self._forward(self._x, self.out_planes, self.arg)
        else:
            self._forward_values(self._x, self.out_planes)
        self._positions_current = mode.train
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self._x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        if not self._positions_current:  # an inference forward left no positions
            self._forward(self._x, self.out_planes, self.arg)
            self._positions_current = True
        self._backward(grad_output.reshape(self.flat_view), self.arg_flat,
                       self._x.reshape(self.flat_view), self.dx_flat)
        return [self.dx]


class AvgPoolLayer(_Pool):
    def __init__(self, setup: LayerSetup, spec: KernelSpec) -> None:
        super().__init__(setup, spec.shapes[0], spec.shapes[1])
        self.specs = [spec]
        self._module = cache.load(spec)
        self._x: np.ndarray | None = None  # the last forward's input, as planes

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self._x = inputs[0].reshape(self.in_view)
        self._module.forward(self._x, self.out_planes)
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self._x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        self._module.backward(grad_output.reshape(self.out_view), self._x, self.dx_planes)
        return [self.dx]


class SoftPoolLayer(_Pool):
    def __init__(self, setup: LayerSetup, spec: KernelSpec) -> None:
        super().__init__(setup, spec.shapes[0], spec.shapes[1])
        self.specs = [spec]
        self._module = cache.load(spec)
        self.top = np.zeros(self.out_view, dtype=setup.dtype)
        self.total = np.zeros(self.out_view, dtype=setup.dtype)
        self.x: np.ndarray | None = None  # the last forward's input planes

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self.x = inputs[0].reshape(self.in_view)
        self._module.forward(self.x, self.out_planes, self.top, self.total)
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self.x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        self._module.backward(self.x, self.out_planes, grad_output.reshape(self.out_view),
                              self.top, self.total, self.dx_planes)
        return [self.dx]


@builder(Op.MAXPOOL, Op.AVGPOOL, Op.SOFTPOOL, Op.GLOBAL_MAXPOOL, Op.GLOBAL_AVGPOOL)
def build_pool(setup: LayerSetup) -> KernelLayer:
    return pool_after(setup, None)


def pool_after(setup: LayerSetup, act: ActSpec | None) -> KernelLayer:
    """A pooling layer whose backward folds in the derivative of `act`, the activation
    that computed its input (None: none to fold; soft pooling folds none)."""
    op = setup.layer.op
    folded = act_options(act) if act is not None else None
    if op in (Op.GLOBAL_MAXPOOL, Op.GLOBAL_AVGPOOL):
        return _global_pool(setup, folded)
    window = setup.window
    assert window is not None, f"'{setup.layer.name}' has no resolved window"
    assert isinstance(setup.layer.attrs, PoolAttrs)
    shapes = (setup.batched_inputs[0], setup.batched_output)
    options = window_options(window)
    if op is Op.MAXPOOL:
        return MaxPoolLayer(setup, KernelSpec.make("maxpool", setup.dtype, shapes, **options),
                            folded)
    if op is Op.SOFTPOOL:
        assert folded is None, "soft pooling folds no activation"
        return SoftPoolLayer(setup, KernelSpec.make("softpool", setup.dtype, shapes, **options))
    if any(spread != 1 for spread in window.dilation):
        raise ValueError(f"'{setup.layer.name}': average pooling has no dilation")
    del options["dilation"]
    return AvgPoolLayer(setup, KernelSpec.make("avgpool", setup.dtype, shapes,
                                               count_pad=setup.layer.attrs.count_pad,
                                               **options, **(folded or {})))


def _global_pool(setup: LayerSetup, folded: dict[str, str | float] | None) -> KernelLayer:
    """One window over each whole plane, seen as a flat (N, C, positions) array."""
    batch, channels, *sizes = setup.batched_inputs[0]
    positions = math.prod(sizes)
    shapes = ((batch, channels, positions), (batch, channels, 1))
    whole = {"window": (positions,), "stride": (positions,), "pads": ((0, 0),)}
    if setup.layer.op is Op.GLOBAL_MAXPOOL:
        return MaxPoolLayer(setup, KernelSpec.make("maxpool", setup.dtype, shapes,
                                                   dilation=(1,), **whole), folded)
    return AvgPoolLayer(setup, KernelSpec.make("avgpool", setup.dtype, shapes,
                                               count_pad=True, **whole, **(folded or {})))
