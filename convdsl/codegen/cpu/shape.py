"""Flatten: (N, C, *sizes) to (N, C*prod(sizes)) in C order, a reshape and no kernel.

Forward returns a view of its input and backward a view of the incoming gradient, so
neither copies (NumPy copies only an input that is not contiguous). The views live as long
as the arrays under them: the previous layer's output until its next forward, and the
next layer's input gradient until its next backward, which is all the executor needs.
"""

from __future__ import annotations

import numpy as np

from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.ir.ops import Op


class FlattenLayer(KernelLayer):
    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        self.algorithm = "view"
        self.reason = "a reshape: no data moves"

    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        return inputs[0].reshape(self.setup.batched_output)

    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        return [grad_output.reshape(self.setup.batched_inputs[0])]


@builder(Op.FLATTEN)
def build_flatten(setup: LayerSetup) -> KernelLayer:
    return FlattenLayer(setup)
