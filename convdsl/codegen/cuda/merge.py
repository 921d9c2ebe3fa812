"""Merging layers on the GPU: concat along channels and add, each with a fused
activation; the same semantics as codegen/cpu/merge.py.

Both kernels take the layer's inputs as separate arguments (their number is baked into
the source) and give every input its own gradient buffer, so that no two inputs share
an array the executor might later accumulate into.

Both run one thread per OUTPUT element and each thread writes only its own element:
forward the output, backward the one input-gradient element it came from (concat: the
input whose channel range holds the element's channel; add: the same element of every
input's gradient, each buffer its own). No two threads write one address.
"""

from __future__ import annotations

import math

from convdsl.codegen import cache
from convdsl.codegen.activations import apply_act, gradient_lines
from convdsl.codegen.cuda.activation import FusedAct
from convdsl.codegen.cuda.common import JIT, PRELUDE, DeviceArray, Launch, empty, grid_for
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import Op


def _names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def _channel_ranges(inputs: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """(offset, channels) of each input in the output's channel axis."""
    ranges, offset = [], 0
    for _, channels, _ in inputs:
        ranges.append((offset, channels))
        offset += channels
    return ranges


def _branch(i: int, count: int, condition: str) -> str:
    """Branch i of an if/elif/else chain over `count` cases; the last is the `else`, so
    that every variable the branches bind is bound on every path (Numba's typing)."""
    if i == count - 1:
        return "else" if count > 1 else "if True"
    return f"if {condition}" if i == 0 else f"elif {condition}"


def _output_element(code: Code, channels: int, positions: int) -> None:
    """Bind (n, c, s) to the thread's flat output element `e`."""
    code.line(f"s = e % {positions}")
    code.line(f"c = e // {positions} % {channels}")
    code.line(f"n = e // {positions * channels}")


@cache.template("cuda_concat")
def _render_concat(spec: KernelSpec) -> str:
    """forward(x0, .., y), backward(y, dy, dx0, .., act_grad) on (N, C, S) views."""
    *inputs, (batch, channels, positions) = spec.shapes
    ranges = _channel_ranges(inputs)
    xs, dxs = _names("x", len(inputs)), _names("dx", len(inputs))
    size = batch * channels * positions
    code = Code()
    code.line(PRELUDE)
    code.line(JIT)
    with code.block(f"def forward({', '.join(xs)}, y)"):
        code.line("e = cuda.grid(1)")
        with code.block(f"if e < {size}"):
            _output_element(code, channels, positions)
            for i, (x, (offset, width)) in enumerate(zip(xs, ranges)):
                with code.block(_branch(i, len(xs), f"c < {offset + width}")):
                    code.line(f"v = {x}[n, c - {offset}, s]")
            code.line(f"y[n, c, s] = {apply_act(spec, 'v')}")
    code.line()
    code.line(JIT)
    with code.block(f"def backward(y, dy, {', '.join(dxs)}, act_grad)"):
        code.line("e = cuda.grid(1)")
        with code.block(f"if e < {size}"):
            _output_element(code, channels, positions)
            gradient_lines(code, spec, "g", "dy[n, c, s]", "y[n, c, s]")
            for i, (dx, (offset, width)) in enumerate(zip(dxs, ranges)):
                with code.block(_branch(i, len(dxs), f"c < {offset + width}")):
                    code.line(f"{dx}[n, c - {offset}, s] = g")
    return code.text()


@cache.template("cuda_add")
def _render_add(spec: KernelSpec) -> str:
    """forward(x0, .., y): y = act(x0 + x1 + ..); backward(y, dy, dx0, .., act_grad):
    every dx_i = dy * act'(y). Flat arrays."""
    ((size,),) = spec.shapes
    count = int(spec.option("inputs"))
    xs, dxs = _names("x", count), _names("dx", count)
    code = Code()
    code.line(PRELUDE)
    code.line(JIT)
    with code.block(f"def forward({', '.join(xs)}, y)"):
        code.line("i = cuda.grid(1)")
        with code.block(f"if i < {size}"):
            code.line(f"v = {' + '.join(f'{x}[i]' for x in xs)}")  # left to right
            code.line(f"y[i] = {apply_act(spec, 'v')}")
    code.line()
    code.line(JIT)
    with code.block(f"def backward(y, dy, {', '.join(dxs)}, act_grad)"):
        code.line("i = cuda.grid(1)")
        with code.block(f"if i < {size}"):
            gradient_lines(code, spec, "g", "dy[i]", "y[i]")
            for dx in dxs:
                code.line(f"{dx}[i] = g")
    return code.text()


class _Merge(KernelLayer):
    def __init__(self, setup: LayerSetup, spec: KernelSpec, act: FusedAct,
                 in_views: list[tuple[int, ...]], out_view: tuple[int, ...]) -> None:
        super().__init__(setup)
        self.act = act
        self.specs = [spec, *act.specs]
        self.algorithm = "elementwise"
        self.reason = "one thread per output element"
        module = cache.load(spec)
        grid = grid_for(math.prod(out_view))
        self._forward = Launch(module.forward, *grid, views=[*in_views, out_view])
        self._backward = Launch(module.backward, *grid,
                                views=[out_view, out_view, *in_views, None])
        self.out = empty(setup.batched_output, setup.dtype)
        self.dxs = [empty(shape, setup.dtype) for shape in setup.batched_inputs]

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self._forward(*inputs, self.out)
        self.act.forward(self.out)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        act_grad = self.act.backward(self.out, grad_output, skip_act)
        self._backward(self.out, grad_output, *self.dxs, act_grad)
        return list(self.dxs)


def _view(shape: tuple[int, ...]) -> tuple[int, ...]:
    batch, channels, *sizes = shape
    return (batch, channels, math.prod(sizes))  # 1 position for flat vectors


@builder(Op.CONCAT, device="cuda")
def build_concat(setup: LayerSetup) -> KernelLayer:
    act = FusedAct(setup.layer.act, setup.batched_output, setup.dtype)
    in_views = [_view(shape) for shape in setup.batched_inputs]
    out_view = _view(setup.batched_output)
    spec = KernelSpec.make("cuda_concat", setup.dtype, (*in_views, out_view),
                           **act.options())
    return _Merge(setup, spec, act, in_views, out_view)


@builder(Op.ADD, device="cuda")
def build_add(setup: LayerSetup) -> KernelLayer:
    size = math.prod(setup.batched_output)
    act = FusedAct(setup.layer.act, setup.batched_output, setup.dtype)
    count = len(setup.in_shapes)
    spec = KernelSpec.make("cuda_add", setup.dtype, ((size,),), inputs=count,
                           **act.options())
    return _Merge(setup, spec, act, [(size,)] * count, (size,))
