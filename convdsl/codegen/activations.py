"""Activation functions as source: forward from the value before, derivative from the
value after.

Every derivative is written in terms of the activation's output y, so that a
layer keeps one array (its output) for the backward pass: relu' = [y > 0],
sigmoid' = y(1 - y), tanh' = 1 - y^2, elu' = y + alpha for y <= 0.
Softmax couples the channels, so it has its own kernels instead of an expression.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import Activation, ActSpec


def is_elementwise(act: ActSpec | None) -> bool:
    return act is None or act.kind is not Activation.SOFTMAX


def is_identity(act: ActSpec | None) -> bool:
    return act is None or act.kind is Activation.IDENTITY


def forward_expression(act: ActSpec | None, v: str) -> str:
    """The activation of the value named `v`, as a Python expression."""
    kind = Activation.IDENTITY if act is None else act.kind
    if kind is Activation.IDENTITY:
        return v
    if kind is Activation.RELU:
        return f"(0.0 if {v} <= 0.0 else {v})"  # NaN stays NaN, as in PyTorch
    if kind is Activation.RELU6:
        return f"min(max({v}, 0.0), 6.0)"
    assert act is not None
    if kind is Activation.LEAKY_RELU:
        return f"({act.slope!r} * {v} if {v} <= 0.0 else {v})"
    if kind is Activation.ELU:
        return f"({act.alpha!r} * math.expm1({v}) if {v} <= 0.0 else {v})"
    if kind is Activation.SIGMOID:
        return f"(1.0 / (1.0 + math.exp(-{v})))"
    if kind is Activation.TANH:
        return f"math.tanh({v})"
    raise ValueError(f"{kind.value} is not elementwise")


def derivative_expression(act: ActSpec | None, y: str) -> str:
    """d act / d input, in terms of the output named `y`."""
    kind = Activation.IDENTITY if act is None else act.kind
    if kind is Activation.IDENTITY:
        return "1.0"
    if kind is Activation.RELU:
        return f"(1.0 if {y} > 0.0 else 0.0)"
    if kind is Activation.RELU6:
        return f"(1.0 if 0.0 < {y} < 6.0 else 0.0)"
    assert act is not None
    if kind is Activation.LEAKY_RELU:
        return f"(1.0 if {y} > 0.0 else {act.slope!r})"
    if kind is Activation.ELU:
        return f"(1.0 if {y} > 0.0 else {y} + {act.alpha!r})"
    if kind is Activation.SIGMOID:
        return f"({y} * (1.0 - {y}))"
    if kind is Activation.TANH:
        return f"(1.0 - {y} * {y})"
    raise ValueError(f"{kind.value} is not elementwise")


def act_options(act: ActSpec | None) -> dict[str, str | float]:
    """What of an activation a kernel spec must record."""
    if act is None:
        return {"act": "identity"}
    return {"act": act.kind.value, "slope": act.slope, "alpha": act.alpha}


def act_from_spec(spec: KernelSpec) -> ActSpec:
    kind = Activation(spec.option("act"))
    if kind is Activation.IDENTITY:
        return ActSpec(kind)
    return ActSpec(kind, spec.option("slope"), spec.option("alpha"))


@cache.template("act", sized=False)
def _render_elementwise(spec: KernelSpec) -> str:
    """forward(x, y): y = act(x); backward(y, dy, dx): dx = dy * act'(y); flat arrays
    of any size."""
    act = act_from_spec(spec)
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def forward(x, y)"), code.block("for i in prange(x.size)"):
        code.line("v = x[i]")
        code.line(f"y[i] = {forward_expression(act, 'v')}")
    code.line()
    code.line(jit())
    with code.block("def backward(y, dy, dx)"), code.block("for i in prange(y.size)"):
        code.line("v = y[i]")
        code.line(f"dx[i] = dy[i] * {derivative_expression(act, 'v')}")
    return code.text()


def softmax_forward_lines(code: Code, channels: int) -> None:
    """y[n, :, s] = softmax(x[n, :, s]), for the n and s the caller has bound (shifted by
    the largest value, so that no exponential overflows)."""
    code.line("top = x[n, 0, s]")
    with code.block(f"for c in range(1, {channels})"):
        code.line("top = max(top, x[n, c, s])")
    code.line("total = 0.0")
    with code.block(f"for c in range({channels})"):
        code.line("e = math.exp(x[n, c, s] - top)")
        code.line("y[n, c, s] = e")
        code.line("total += e")
    with code.block(f"for c in range({channels})"):
        code.line("y[n, c, s] = y[n, c, s] / total")


def softmax_backward_lines(code: Code, channels: int) -> None:
    """dx[n, :, s] = y * (dy - <dy, y>), softmax's chain rule at the bound n and s."""
    code.line("dot = 0.0")
    with code.block(f"for c in range({channels})"):
        code.line("dot += dy[n, c, s] * y[n, c, s]")
    with code.block(f"for c in range({channels})"):
        code.line("dx[n, c, s] = y[n, c, s] * (dy[n, c, s] - dot)")


@cache.template("softmax")
def _render_softmax(spec: KernelSpec) -> str:
    """Softmax over axis 1 of (N, C, S) arrays (S = 1 for flat vectors)."""
    batch, channels, positions = spec.shapes[0]
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def forward(x, y)"), \
            code.block(f"for ns in prange({batch * positions})"):
        code.line(f"n = ns // {positions}")
        code.line(f"s = ns % {positions}")
        softmax_forward_lines(code, channels)
    code.line()
    code.line(jit())
    with code.block("def backward(y, dy, dx)"), \
            code.block(f"for ns in prange({batch * positions})"):
        code.line(f"n = ns // {positions}")
        code.line(f"s = ns % {positions}")
        softmax_backward_lines(code, channels)
    return code.text()


def apply_act(spec: KernelSpec, value: str) -> str:
    """The spec's (elementwise) activation of the expression `value`."""
    return forward_expression(act_from_spec(spec), value)


def gradient_lines(code: Code, spec: KernelSpec, target: str, dy: str, y: str) -> None:
    """`target = dy * act'(y)` when the kernel argument `act_grad` is true, else dy."""
    act = act_from_spec(spec)
    code.line(f"{target} = {dy}")
    if not is_identity(act):
        with code.block("if act_grad"):
            code.line(f"yv = {y}")
            code.line(f"{target} = {target} * {derivative_expression(act, 'yv')}")


class ActivationStep:
    """An activation over a whole batched array: forward, and the chain rule back.

    Both work in place when given the same array twice.
    """

    def __init__(self, act: ActSpec | None, shape: tuple[int, ...], dtype: str) -> None:
        self.act = act
        self.shape = shape
        self.identity = is_identity(act)
        if is_elementwise(act):
            size = int(np.prod(shape))
            self.spec = KernelSpec.make("act", dtype, ((size,),), **act_options(act))
            self._view: tuple[int, ...] = (size,)
        else:
            positions = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            self._view = (shape[0], shape[1], positions)
            self.spec = KernelSpec.make("softmax", dtype, (self._view,))
        self._module = None if self.identity else cache.load(self.spec)

    def forward(self, x: np.ndarray, y: np.ndarray) -> None:
        if self._module is None:
            if y is not x:
                np.copyto(y, x)
            return
        self._module.forward(x.reshape(self._view), y.reshape(self._view))

    def backward(self, y: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> None:
        """dx = dy * act'(y); `y` is this activation's output."""
        if self._module is None:
            if dx is not dy:
                np.copyto(dx, dy)
            return
        self._module.backward(y.reshape(self._view), dy.reshape(self._view),
                              dx.reshape(self._view))


class FusedAct:
    """A layer's activation, split between its kernels (elementwise) and a softmax step.

    Elementwise activations go into the layer's own kernels (its spec's `act` options);
    softmax couples the channels, so it runs as a `step_class` step over the finished
    output. The CUDA target subclasses this with its own step."""

    step_class: Any = ActivationStep

    def __init__(self, act: ActSpec | None, shape: tuple[int, ...], dtype: str) -> None:
        """shape: the layer's batched output shape."""
        softmax = not is_elementwise(act)
        self.in_kernel = None if softmax else act  # what the layer's kernels bake in
        self.softmax = self.step_class(act, shape, dtype) if softmax else None
        self.specs = [] if self.softmax is None else [self.softmax.spec]

    def options(self) -> dict[str, str | float]:
        """The spec options of the layer's kernels."""
        return act_options(self.in_kernel)

    def forward(self, y: Any) -> None:
        """After the layer's kernel: softmax over its output, in place."""
        if self.softmax is not None:
            self.softmax.forward(y, y)

    def backward(self, y: Any, grad_output: Any, skip_act: bool) -> bool:
        """Before the layer's backward kernel: softmax's chain rule on grad_output, in
        place. Returns `act_grad`: whether the kernel must still multiply by act'(y)."""
        if skip_act:
            return False
        if self.softmax is not None:
            self.softmax.backward(y, grad_output, grad_output)
            return False
        return not is_identity(self.in_kernel)
