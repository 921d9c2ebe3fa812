"""Merging layers: concat along channels and add, each with a fused activation.

Both kernels take the layer's inputs as separate arguments (their number is baked into
the source) and give every input its own gradient buffer, so that no two inputs share
an array the executor might later accumulate into.

concat sees maps as (N, C_i, S) (S = 1 for flat vectors) and copies input i into channels
[offset_i, offset_i + C_i) of the output, in parallel over the input's (n, c) rows;
add works on flat arrays in parallel over elements. Writes are disjoint either way.
Both read their sizes from their arrays, so one module serves every concatenation (or
sum) of the same number of inputs and activation (codegen/cache.py, `sized=False`).

An input a branch has already written into its channels of the output (the executor
hands such branches the slice as their output, passes/fusion.py concat_writes) is not
copied: concat's forward skips every input that is the very slice it would fill.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import FusedAct, apply_act, gradient_lines
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import Op


def _names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


@cache.template("concat", sized=False)
def _render_concat(spec: KernelSpec) -> str:
    """forward(x0, .., y, placed), backward(y, dy, dx0, .., act_grad) on (N, C, S)
    views of any size; placed[i]: input i is in place already, and is not copied. Input
    i fills the channels after those of the inputs before it."""
    count = int(spec.option("inputs"))
    xs, dxs = _names("x", count), _names("dx", count)
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block(f"def forward({', '.join(xs)}, y, placed)"):
        code.line("batch, _, positions = y.shape")
        code.line("offset = 0")
        for index, x in enumerate(xs):
            code.line(f"channels = {x}.shape[1]")
            with code.block(f"if not placed[{index}]"), \
                    code.block("for nc in prange(batch * channels)"):
                code.line("n = nc // channels")
                code.line("c = nc % channels")
                with code.block("for s in range(positions)"):
                    code.line(f"v = {x}[n, c, s]")
                    code.line(f"y[n, c + offset, s] = {apply_act(spec, 'v')}")
            code.line("offset += channels")
    code.line()
    code.line(jit())
    with code.block(f"def backward(y, dy, {', '.join(dxs)}, act_grad)"):
        code.line("batch, _, positions = y.shape")
        code.line("offset = 0")
        for dx in dxs:
            code.line(f"channels = {dx}.shape[1]")
            with code.block("for nc in prange(batch * channels)"):
                code.line("n = nc // channels")
                code.line("c = nc % channels")
                with code.block("for s in range(positions)"):
                    gradient_lines(code, spec, "g", "dy[n, c + offset, s]",
                                   "y[n, c + offset, s]")
                    code.line(f"{dx}[n, c, s] = g")
            code.line("offset += channels")
    return code.text()


@cache.template("add", sized=False)
def _render_add(spec: KernelSpec) -> str:
    """forward(x0, .., y): y = act(x0 + x1 + ..); backward(y, dy, dx0, .., act_grad):
    every dx_i = dy * act'(y). Flat arrays of any size."""
    count = int(spec.option("inputs"))
    xs, dxs = _names("x", count), _names("dx", count)
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block(f"def forward({', '.join(xs)}, y)"), code.block("for i in prange(y.size)"):
        code.line(f"v = {' + '.join(f'{x}[i]' for x in xs)}")  # left to right
        code.line(f"y[i] = {apply_act(spec, 'v')}")
    code.line()
    code.line(jit())
    with code.block(f"def backward(y, dy, {', '.join(dxs)}, act_grad)"), \
            code.block("for i in prange(y.size)"):
        gradient_lines(code, spec, "g", "dy[i]", "y[i]")
        for dx in dxs:
            code.line(f"{dx}[i] = g")
    return code.text()


class _Merge(KernelLayer):
    """add, or concat; forward's kernel takes the inputs and the output, then extra."""

    def __init__(self, setup: LayerSetup, spec: KernelSpec, act: FusedAct,
                 in_views: list[tuple[int, ...]], out_view: tuple[int, ...]) -> None:
        super().__init__(setup)
        self.act = act
        self.specs = [spec, *act.specs]
        self._module = cache.load(spec)
        self.in_views = in_views
        self.out = setup.output_buffer()
        self.out_view = self.out.reshape(out_view)
        self.dxs = [setup.input_buffer(i) for i in range(len(in_views))]
        self.dx_views = [dx.reshape(view) for dx, view in zip(self.dxs, in_views)]

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self._module.forward(*(x.reshape(view) for x, view in zip(inputs, self.in_views)),
                             self.out_view, *self._extra(inputs))
        self.act.forward(self.out)
        return self.out

    def _extra(self, inputs: list[np.ndarray]) -> tuple[object, ...]:
        return ()

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        act_grad = self.act.backward(self.out, grad_output, skip_act)
        self._module.backward(self.out_view, grad_output.reshape(self.out_view.shape),
                              *self.dx_views, act_grad)
        return list(self.dxs)


class ConcatLayer(_Merge):
    """concat, which skips the inputs a branch wrote into its channels already."""

    def __init__(self, setup: LayerSetup, spec: KernelSpec, act: FusedAct,
                 in_views: list[tuple[int, ...]], out_view: tuple[int, ...]) -> None:
        super().__init__(setup, spec, act, in_views, out_view)
        # where each input would lie in the output: (address, strides) of its slice
        starts = np.cumsum([0, *(channels for _, channels, _ in in_views)]).tolist()
        self._slots = [_where(self.out[:, start:stop])
                       for start, stop in itertools.pairwise(starts)]

    def _extra(self, inputs: list[np.ndarray]) -> tuple[object, ...]:
        return (tuple(_where(x) == slot for x, slot in zip(inputs, self._slots)),)


def _where(array: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """An array's first element's address and its strides: which memory it is."""
    return array.__array_interface__["data"][0], array.strides


@builder(Op.CONCAT)
def build_concat(setup: LayerSetup) -> KernelLayer:
    def view(shape: tuple[int, ...]) -> tuple[int, ...]:
        batch, channels, *sizes = shape
        return (batch, channels, math.prod(sizes))  # 1 position for flat vectors

    act = FusedAct(setup.layer.act, setup.batched_output, setup.dtype)
    in_views = [view(shape) for shape in setup.batched_inputs]
    out_view = view(setup.batched_output)
    spec = KernelSpec.make("concat", setup.dtype, (*in_views, out_view),
                           inputs=len(in_views), **act.options())
    return ConcatLayer(setup, spec, act, in_views, out_view)


@builder(Op.ADD)
def build_add(setup: LayerSetup) -> KernelLayer:
    size = math.prod(setup.batched_output)
    act = FusedAct(setup.layer.act, setup.batched_output, setup.dtype)
    count = len(setup.in_shapes)
    spec = KernelSpec.make("add", setup.dtype, ((size,),), inputs=count, **act.options())
    return _Merge(setup, spec, act, [(size,)] * count, (size,))
