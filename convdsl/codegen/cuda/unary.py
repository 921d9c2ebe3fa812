"""Activation and dropout layers on the GPU, and what the CUDA kernels of the other
simple ops (pooling, batch norm, merges, losses) share: the launch size of a
one-thread-per-element kernel and the lines that apply a fused activation's derivative.

Every kernel here runs one thread per element and writes only its own element, so no
two threads ever write one address. The activation layer is an ActivationStep
(codegen/cuda/activation.py); dropout multiplies by a mask drawn on the host by
runtime/random.dropout_mask (the same mask every back end draws), copied into a device
buffer allocated once.
"""

from __future__ import annotations

import math

from convdsl.codegen import cache
from convdsl.codegen.cuda import arrays
from convdsl.codegen.cuda.activation import ActivationStep
from convdsl.codegen.cuda.common import FLAT, JIT, PRELUDE, DeviceArray, Launch, empty, grid_for
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import DropoutAttrs, Op
from convdsl.runtime.random import dropout_mask


@cache.template("cuda_multiply")
def _render_multiply(spec: KernelSpec) -> str:
    """forward(a, b, out): out = a * b over flat arrays (dropout's mask, both ways)."""
    ((size,),) = spec.shapes
    code = Code()
    code.line(PRELUDE)
    code.line(JIT)
    with code.block("def forward(a, b, out)"):
        code.line("i = cuda.grid(1)")
        with code.block(f"if i < {size}"):
            code.line("out[i] = a[i] * b[i]")
    return code.text()


class ActivationLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        self.step = ActivationStep(setup.layer.act, setup.batched_output, setup.dtype)
        self.specs = [] if self.step.identity else [self.step.spec]
        self.algorithm = "elementwise"
        self.reason = "one thread per element (softmax: per example and position)"
        self.out = empty(setup.batched_output, setup.dtype)
        self.dx = empty(setup.batched_inputs[0], setup.dtype)

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        self.step.forward(inputs[0], self.out)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        if skip_act:  # the gradient is already with respect to the input
            arrays.copy(grad_output, self.dx)
        else:
            self.step.backward(self.out, grad_output, self.dx)
        return [self.dx]


class DropoutLayer(KernelLayer):
    """Training: y = x * mask, the mask drawn on the host from (seed, step, layer name)
    as every back end draws it, and copied into a device buffer before the pass starts
    (`send`). Inference: the identity, returning the input itself."""

    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        attrs = setup.layer.attrs
        assert isinstance(attrs, DropoutAttrs)
        self.p = attrs.p
        size = math.prod(setup.batched_output)
        self.spec = KernelSpec.make("cuda_multiply", setup.dtype, ((size,),))
        self.specs = [self.spec]
        self.algorithm = "elementwise"
        self.reason = "mask drawn on the host, one thread per element"
        self._multiply = Launch(cache.load(self.spec).forward, *grid_for(size), every=FLAT)
        self.flat = (size,)
        self.out = empty(setup.batched_output, setup.dtype)
        self.dx = empty(setup.batched_inputs[0], setup.dtype)
        self.mask = empty(self.flat, setup.dtype)
        self.masked = False  # whether the last forward applied the mask (training)
        self._sent: tuple[int, int] | None = None  # the (seed, step) of the mask there

    def send(self, mode: Mode) -> None:
        if mode.train and self._sent != (mode.seed, mode.step):
            mask = dropout_mask(mode.seed, mode.step, self.name, self.setup.batched_output,
                                self.p, self.setup.dtype)
            self.mask.copy_to_device(mask.reshape(self.flat))
            self._sent = (mode.seed, mode.step)

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        (x,) = inputs
        self.masked = mode.train
        if not mode.train:
            return x
        self.send(mode)  # nothing to copy where the executor sent it before the pass
        self._multiply(x, self.mask, self.out)
        return self.out

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        if not self.masked:
            return [grad_output]
        self._multiply(grad_output, self.mask, self.dx)
        return [self.dx]


@builder(Op.ACTIVATION, device="cuda")
def build_activation(setup: LayerSetup) -> KernelLayer:
    return ActivationLayer(setup)


@builder(Op.DROPOUT, device="cuda")
def build_dropout(setup: LayerSetup) -> KernelLayer:
    return DropoutLayer(setup)
