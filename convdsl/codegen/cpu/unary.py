"""Activation and dropout layers, and how every CPU kernel applies a fused activation.

A layer's fused activation (layer.act) goes into the layer's own kernels when it is
elementwise: forward computes act(v) in its epilogue, backward multiplies the incoming
gradient by act'(y) (written in terms of the output y, see codegen/activations.py) unless
the caller says the gradient already skips it. Softmax couples the channels, so it runs as
an ActivationStep over the finished output, and its chain rule runs over the incoming
gradient (in place) before the layer's backward kernel. `FusedAct` (codegen/activations.py)
is that split, shared by the kernels of bn, dense, concat and add on both targets.
"""

from __future__ import annotations

import math

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import (
    ActivationStep,
)
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import DropoutAttrs, Op
from convdsl.runtime.random import dropout_mask


@cache.template("multiply", sized=False)
def _render_multiply(spec: KernelSpec) -> str:
    """forward(a, b, out): out = a * b over flat arrays of any size (dropout's mask,
    both ways)."""
    code = Code()
    code.line(PRELUDE)
    code.line(jit())
    with code.block("def forward(a, b, out)"), code.block("for i in prange(out.size)"):
        code.line("out[i] = a[i] * b[i]")
    return code.text()


class ActivationLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        self.step = ActivationStep(setup.layer.act, setup.batched_output, setup.dtype)
        self.specs = [] if self.step.identity else [self.step.spec]
        self.out = setup.output_buffer()
        self.dx = setup.input_buffer()

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        self.step.forward(inputs[0], self.out)
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if skip_act:  # the gradient is already with respect to the input
            np.copyto(self.dx, grad_output)
        else:
            self.step.backward(self.out, grad_output, self.dx)
        return [self.dx]


class DropoutLayer(KernelLayer):
    """Training: y = x * mask, the mask drawn in Python from (seed, step, layer name) as
    every back end draws it. Inference: the identity, returning the input itself."""

    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        attrs = setup.layer.attrs
        assert isinstance(attrs, DropoutAttrs)
        self.p = attrs.p
        size = math.prod(setup.batched_output)
        self.spec = KernelSpec.make("multiply", setup.dtype, ((size,),))
        self.specs = [self.spec]
        self._multiply = cache.load(self.spec).forward
        self.out = setup.output_buffer()
        self.dx = setup.input_buffer()
        self.flat = (size,)
        self.mask: np.ndarray | None = None  # None: the last forward was inference

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        (x,) = inputs
        if not mode.train:
            self.mask = None
            return x
        self.mask = dropout_mask(mode.seed, mode.step, self.name, self.setup.batched_output,
                                 self.p, self.setup.dtype)
        self._multiply(x.reshape(self.flat), self.mask.reshape(self.flat),
                       self.out.reshape(self.flat))
        return self.out

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        if self.mask is None:
            return [grad_output]
        self._multiply(grad_output.reshape(self.flat), self.mask.reshape(self.flat),
                       self.dx.reshape(self.flat))
        return [self.dx]


@builder(Op.ACTIVATION)
def build_activation(setup: LayerSetup) -> KernelLayer:
    return ActivationLayer(setup)


@builder(Op.DROPOUT)
def build_dropout(setup: LayerSetup) -> KernelLayer:
    return DropoutLayer(setup)
