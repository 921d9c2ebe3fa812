"""Flatten on the GPU: a reshape of a contiguous device array, so no kernel runs."""

from __future__ import annotations

from convdsl.codegen.cuda.common import DeviceArray
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.ir.ops import Op


class FlattenLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        self.algorithm = "view"
        self.reason = "a reshape: no data moves"

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        return inputs[0].reshape(self.setup.batched_output)

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        return [grad_output.reshape(self.setup.batched_inputs[0])]


@builder(Op.FLATTEN, device="cuda")
def build_flatten(setup: LayerSetup) -> KernelLayer:
    return FlattenLayer(setup)
