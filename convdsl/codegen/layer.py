"""The interface between one layer's generated kernels and the executor.

The executor builds one `KernelLayer` per layer of the graph, through the
builder registered for the layer's op, and then only calls `forward` and
`backward`. A kernel layer owns the buffers it writes (allocated once, for the
compiled batch) and keeps what its backward pass needs from the last forward.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import Layer, Op
from convdsl.passes.shapes import Window
from convdsl.runtime.params import layer_params

if TYPE_CHECKING:
    from convdsl.network import Network

ALGORITHMS = ("direct", "gemm", "fft", "winograd")


@dataclass(frozen=True)
class Mode:
    """What one forward pass is for: training (batch statistics, dropout) or inference."""

    train: bool = False
    seed: int = 0  # with step and the layer name, decides the dropout mask
    step: int = 0


@dataclass(frozen=True)
class LayerSetup:
    """All a builder needs to know about one layer, batch included."""

    layer: Layer
    batch: int
    dtype: str  # "float32" or "float64"
    in_shapes: tuple[tuple[int, ...], ...]  # without the batch
    out_shape: tuple[int, ...]  # without the batch
    window: Window | None
    algo: str  # "auto", or one of ALGORITHMS when the file or the caller asks
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # field -> shape
    device: str = "cpu"  # which target's kernels: "cpu" or "cuda"

    @property
    def batched_inputs(self) -> tuple[tuple[int, ...], ...]:
        return tuple((self.batch, *shape) for shape in self.in_shapes)

    @property
    def batched_output(self) -> tuple[int, ...]:
        return (self.batch, *self.out_shape)

    @property
    def spatial_axes(self) -> int:
        return len(self.in_shapes[0]) - 1

    def output_buffer(self) -> np.ndarray:
        return np.zeros(self.batched_output, dtype=self.dtype)

    def input_buffer(self, index: int = 0) -> np.ndarray:
        return np.zeros(self.batched_inputs[index], dtype=self.dtype)

    @property
    def macs(self) -> int:
        return math.prod(self.batched_output)


class KernelLayer(ABC):
    """One layer's forward and backward passes, run by generated kernels."""

    def __init__(self, setup: LayerSetup) -> None:
        self.setup = setup
        self.specs: list[KernelSpec] = []  # every kernel this layer runs, for reports
        self.algorithm = "direct"  # how the layer computes, for reports
        self.reason = ""  # why that algorithm, for reports
        # False: backward may skip its inputs' gradients and return None for them. The
        # executor clears it for a stage that reads only network inputs when training,
        # which never reads the input's gradient; convolutions and dense layers honour it.
        self.input_grad_needed = True

    @property
    def name(self) -> str:
        return self.setup.layer.name

    @abstractmethod
    def forward(self, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                mode: Mode) -> np.ndarray:
        """The layer's output for `inputs` (batch first). The returned array belongs to
        the layer and is overwritten by its next forward; batch norm in training
        updates `params['running_mean']` and friends in place."""

    def send(self, mode: Mode) -> None:
        """Copy to the device what the next forward in `mode` needs from the host (on
        CUDA, a dropout mask). The executor calls it for every stage before it queues
        any kernel of a pass, because a copy from host memory waits for every kernel
        queued before it; a forward not sent for sends for itself. Most layers need
        nothing, and no fused stage holds one that does (dropout keeps a stage of its
        own: passes/fusion.py)."""
        return None

    @abstractmethod
    def backward(self, grad_output: np.ndarray, params: dict[str, np.ndarray],
                 grads: dict[str, np.ndarray], skip_act: bool = False
                 ) -> list[np.ndarray | None]:
        """Gradients with respect to each input (in `layer.inputs` order), from the
        gradient of the output of the last forward. Writes (overwrites) the gradient of
        every trained field into the preallocated `grads[field]`. `skip_act`: the
        gradient already is with respect to the value before the layer's softmax.
        Returned arrays belong to the layer; `grad_output` may be overwritten."""


Builder = Callable[[LayerSetup], KernelLayer]
DEVICES = ("cpu", "cuda")
_BUILDERS: dict[tuple[str, Op], Builder] = {}


def builder(*ops: Op, device: str = "cpu") -> Callable[[Builder], Builder]:
    """Register the function that builds kernel layers for `ops` on `device`."""
    def register(build: Builder) -> Builder:
        for op in ops:
            if (device, op) in _BUILDERS:
                raise ValueError(f"op {op.value} has two {device} kernel builders")
            _BUILDERS[device, op] = build
        return build
    return register


def _register_target(device: str) -> None:
    """Import the target's package, whose modules register its builders."""
    if device == "cuda":
        from convdsl.codegen import cuda  # noqa: F401
    else:
        from convdsl.codegen import cpu  # noqa: F401


def build_layer(setup: LayerSetup) -> KernelLayer:
    _register_target(setup.device)
    try:
        build = _BUILDERS[setup.device, setup.layer.op]
    except KeyError:
        raise NotImplementedError(f"no {setup.device} kernels for op "
                                  f"{setup.layer.op.value}") from None
    return build(setup)


def registered_ops(device: str = "cpu") -> set[Op]:
    _register_target(device)
    return {op for target, op in _BUILDERS if target == device}


def layer_setups(network: Network, batch: int, dtype: str, algo: str | None = None,
                 device: str = "cpu") -> dict[str, LayerSetup]:
    """A setup for every layer but the inputs. `algo` (from the command line)
    overrides the algorithm each convolution asks for in the file."""
    setups: dict[str, LayerSetup] = {}
    for layer in network.layers:
        if layer.op is Op.INPUT:
            continue
        in_shapes = tuple(network.shapes[source] for source in layer.inputs)
        infos = layer_params(layer, in_shapes[0])
        asked = algo if algo else str(getattr(layer.attrs, "algo", "auto"))
        setups[layer.name] = LayerSetup(
            layer=layer, batch=batch, dtype=dtype, in_shapes=in_shapes,
            out_shape=network.shapes[layer.name], window=network.windows.get(layer.name),
            algo=asked, param_shapes=tuple((info.field, info.shape) for info in infos),
            device=device)
    return setups
