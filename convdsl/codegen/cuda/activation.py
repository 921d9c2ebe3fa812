"""Activations on the GPU: elementwise kernels, softmax over the channels, and
`FusedAct`, the split every CUDA layer with an `act` option uses (as codegen/cpu/unary.py
does on the CPU): elementwise activations go into the layer's own kernels, softmax runs
as a step over the finished output.

Every kernel here runs one thread per element (softmax: per example and position).
"""

from __future__ import annotations

import math

from convdsl.codegen import activations, cache
from convdsl.codegen.activations import (
    act_from_spec,
    act_options,
    apply_act,
    derivative_expression,
    is_elementwise,
    is_identity,
    softmax_backward_lines,
    softmax_forward_lines,
)
from convdsl.codegen.cuda import arrays
from convdsl.codegen.cuda.common import JIT, PRELUDE, DeviceArray, Launch, grid_for
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ActSpec


def derivative(spec: KernelSpec, y: str) -> str:
    """d act / d input of the spec's activation, from the output `y`."""
    return derivative_expression(act_from_spec(spec), y)


@cache.template("cuda_act")
def _render_elementwise(spec: KernelSpec) -> str:
    """forward(x, y): y = act(x); backward(y, dy, dx): dx = dy * act'(y); flat arrays."""
    (size,) = spec.shapes[0]
    code = Code()
    code.line(PRELUDE)
    code.line(JIT)
    with code.block("def forward(x, y)"):
        code.line("i = cuda.grid(1)")
        with code.block(f"if i < {size}"):
            code.line("v = x[i]")
            code.line(f"y[i] = {apply_act(spec, 'v')}")
    code.line()
    code.line(JIT)
    with code.block("def backward(y, dy, dx)"):
        code.line("i = cuda.grid(1)")
        with code.block(f"if i < {size}"):
            code.line("v = y[i]")
            code.line(f"dx[i] = dy[i] * {derivative(spec, 'v')}")
    return code.text()


@cache.template("cuda_softmax")
def _render_softmax(spec: KernelSpec) -> str:
    """Softmax over axis 1 of (N, C, S) arrays, one thread per (n, s)."""
    batch, channels, positions = spec.shapes[0]
    code = Code()
    code.line(PRELUDE)
    for name, lines in (("forward(x, y)", softmax_forward_lines),
                        ("backward(y, dy, dx)", softmax_backward_lines)):
        code.line(JIT)
        with code.block(f"def {name}"):
            code.line("ns = cuda.grid(1)")
            with code.block(f"if ns < {batch * positions}"):
                code.line(f"n = ns // {positions}")
                code.line(f"s = ns % {positions}")
                lines(code, channels)
        code.line()
    return code.text()


class ActivationStep:
    """An activation over a whole batched device array, forward and back; in place
    when given the same array twice."""

    def __init__(self, act: ActSpec | None, shape: tuple[int, ...], dtype: str) -> None:
        self.act = act
        self.identity = is_identity(act)
        if is_elementwise(act):
            size = math.prod(shape)
            self.spec = KernelSpec.make("cuda_act", dtype, ((size,),), **act_options(act))
            self._view: tuple[int, ...] = (size,)
            self._threads = size
        else:
            positions = math.prod(shape[2:]) if len(shape) > 2 else 1
            self._view = (shape[0], shape[1], positions)
            self.spec = KernelSpec.make("cuda_softmax", dtype, (self._view,))
            self._threads = shape[0] * positions
        module = None if self.identity else cache.load(self.spec)
        grid = grid_for(self._threads)
        self._forward = (None if module is None else
                         Launch(module.forward, *grid, every=self._view))
        self._backward = (None if module is None else
                          Launch(module.backward, *grid, every=self._view))

    def forward(self, x: DeviceArray, y: DeviceArray) -> None:
        if self._forward is None:
            if y is not x:
                arrays.copy(x, y)
            return
        self._forward(x, y)

    def backward(self, y: DeviceArray, dy: DeviceArray, dx: DeviceArray) -> None:
        """dx = dy * act'(y); `y` is this activation's output."""
        if self._backward is None:
            if dx is not dy:
                arrays.copy(dy, dx)
            return
        self._backward(y, dy, dx)


class FusedAct(activations.FusedAct):
    """codegen/activations.py's split of a layer's activation, with this target's
    softmax step."""

    step_class = ActivationStep
