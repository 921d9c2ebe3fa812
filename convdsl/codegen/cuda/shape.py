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
        # the last view made each way: a step passes the same buffers, so the next
        # layer's launch gets the same view object and reuses its packed arguments
        self._views: dict[str, tuple[DeviceArray, DeviceArray]] = {}

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        return self._view("forward", inputs[0], self.setup.batched_output)

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        return [self._view("backward", grad_output, self.setup.batched_inputs[0])]

    def _view(self, way: str, array: DeviceArray, shape: tuple[int, ...]) -> DeviceArray:
        kept = self._views.get(way)
        if kept is None or kept[0] is not array:
            kept = self._views[way] = (array, array.reshape(shape))
        return kept[1]


@builder(Op.FLATTEN, device="cuda")
def build_flatten(setup: LayerSetup) -> KernelLayer:
    return FlattenLayer(setup)
