"""A convdsl network as idiomatic PyTorch modules: the benchmark's opponent.

    model = TorchModel(convdsl.load("networks/resnet18_cifar.cnn"))
    model.load_arrays(compiled.params)      # the same weights as the convdsl network
    scores = model(torch.from_numpy(x))

Why not tests/torch_bridge.py: the bridge is a test oracle, written to follow the op
contract to the letter, so it pads with F.pad before every convolution, keeps every
layer's output in a dict and reads parameters by name on each call. That costs PyTorch
time and memory that no one writing a PyTorch model would spend. Here each layer is
the nn.Module a PyTorch user would write (nn.Conv2d(padding=1), nn.BatchNorm2d,
nn.ReLU, ...), and an output is dropped as soon as its last reader has run. Only the
ops the benchmark networks use are translated; others raise NotImplementedError.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from convdsl.ir.ops import (
    Activation,
    ActSpec,
    BatchNormAttrs,
    ConvAttrs,
    DenseAttrs,
    Layer,
    Op,
    PoolAttrs,
)
from convdsl.network import Network
from convdsl.passes.shapes import Window

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d,
                                          3: nn.BatchNorm3d}
_MAXPOOL: dict[int, type[nn.Module]] = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL: dict[int, type[nn.Module]] = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_GLOBAL_AVG: dict[int, type[nn.Module]] = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d,
                                           3: nn.AdaptiveAvgPool3d}


def module_key(layer_name: str) -> str:
    """A ModuleDict key for a convdsl layer name ("." is not allowed in one)."""
    return layer_name.replace(".", "/")


def activation(act: ActSpec | None) -> nn.Module | None:
    """The nn.Module of a (fused) activation; None for none or identity."""
    if act is None or act.kind is Activation.IDENTITY:
        return None
    simple: dict[Activation, nn.Module] = {
        Activation.RELU: nn.ReLU(), Activation.RELU6: nn.ReLU6(),
        Activation.SIGMOID: nn.Sigmoid(), Activation.TANH: nn.Tanh(),
        Activation.SOFTMAX: nn.Softmax(dim=1)}
    if act.kind in simple:
        return simple[act.kind]
    if act.kind is Activation.LEAKY_RELU:
        return nn.LeakyReLU(act.slope)
    if act.kind is Activation.ELU:
        return nn.ELU(act.alpha)
    raise NotImplementedError(f"no PyTorch module for activation {act.kind}")


def symmetric_padding(window: Window, layer: Layer) -> list[int]:
    """The per-axis padding of a PyTorch layer; convdsl may pad unequally (pad=same with
    an even window), which PyTorch's layers cannot, and the benchmark networks never do."""
    if any(before != after for before, after in window.pads):
        raise NotImplementedError(f"{layer.name}: unequal padding {window.pads}")
    return [before for before, _ in window.pads]


def layer_module(network: Network, layer: Layer) -> nn.Module:
    """The PyTorch module computing `layer` before its fused activation."""
    attrs = layer.attrs
    if layer.op is Op.CONV:
        assert isinstance(attrs, ConvAttrs)
        window = network.windows[layer.name]
        if attrs.flip:
            raise NotImplementedError(f"{layer.name}: flipped (true) convolution")
        in_channels = network.shapes[layer.inputs[0]][0]
        return _CONV[len(window.window)](
            in_channels, attrs.out_channels, window.window, stride=window.stride,
            padding=symmetric_padding(window, layer), dilation=window.dilation,
            groups=attrs.groups, bias=attrs.bias)
    if layer.op is Op.BATCHNORM:
        assert isinstance(attrs, BatchNormAttrs)
        shape = network.shapes[layer.name]
        return _BATCHNORM[len(shape) - 1](shape[0], eps=attrs.eps, momentum=attrs.momentum,
                                          affine=attrs.affine)
    if layer.op in (Op.MAXPOOL, Op.AVGPOOL):
        assert isinstance(attrs, PoolAttrs)
        return _pool(network, layer, attrs)
    if layer.op is Op.GLOBAL_AVGPOOL:
        axes = len(network.shapes[layer.inputs[0]]) - 1
        return nn.Sequential(_GLOBAL_AVG[axes](1), nn.Flatten())
    if layer.op is Op.FLATTEN:
        return nn.Flatten()
    if layer.op is Op.DENSE:
        assert isinstance(attrs, DenseAttrs)
        features = network.shapes[layer.inputs[0]][0]
        return nn.Linear(features, attrs.units, bias=attrs.bias)
    if layer.op in (Op.ACTIVATION, Op.DROPOUT, Op.ADD, Op.CONCAT):
        return nn.Identity()  # computed in TorchModel.forward (merges) or by `act`
    raise NotImplementedError(f"{layer.name}: no PyTorch module for {layer.op.value}")


def _pool(network: Network, layer: Layer, attrs: PoolAttrs) -> nn.Module:
    window = network.windows[layer.name]
    padding = symmetric_padding(window, layer)
    if layer.op is Op.MAXPOOL:
        return _MAXPOOL[len(window.window)](window.window, window.stride, padding,
                                            window.dilation, ceil_mode=attrs.ceil)
    return _AVGPOOL[len(window.window)](window.window, window.stride, padding,
                                        ceil_mode=attrs.ceil, count_include_pad=attrs.count_pad)


class TorchModel(nn.Module):
    """One module per convdsl layer, run in the network's order; an output is freed
    after its last reader, as plain PyTorch code frees its temporaries."""

    def __init__(self, network: Network) -> None:
        super().__init__()
        self.network = network
        self.order = [layer for layer in network.layers if layer.op is not Op.INPUT]
        self.input_name = next(iter(network.input_shapes))
        if len(network.input_shapes) != 1:
            raise NotImplementedError("networks with several inputs")
        self.output_name = next(o.name for o in network.outputs if not o.aux)
        self.layers = nn.ModuleDict(
            {module_key(layer.name): layer_module(network, layer) for layer in self.order})
        self.acts = nn.ModuleDict()
        for layer in self.order:
            act = activation(layer.act)
            if act is not None:
                self.acts[module_key(layer.name)] = act
        self.dropout = {layer.name: float(getattr(layer.attrs, "p", 0.0))
                        for layer in self.order if layer.op is Op.DROPOUT}
        # After running layer i, the values no later layer (nor the output) reads.
        self.last_use = _last_uses(self.order, self.output_name)

    def forward(self, x: Tensor) -> Tensor:
        values: dict[str, Tensor] = {self.input_name: x}
        for layer in self.order:
            key = module_key(layer.name)
            inputs = [values[name] for name in layer.inputs]
            y = self._compute(layer, key, inputs)
            if key in self.acts:
                y = self.acts[key](y)
            values[layer.name] = y
            for name in self.last_use.get(layer.name, ()):
                del values[name]
        return values[self.output_name]

    def _compute(self, layer: Layer, key: str, inputs: list[Tensor]) -> Tensor:
        if layer.op is Op.ADD:
            total = inputs[0]
            for other in inputs[1:]:
                total = total + other
            return total
        if layer.op is Op.CONCAT:
            return torch.cat(inputs, dim=1)
        if layer.op is Op.DROPOUT:
            return nn.functional.dropout(inputs[0], self.dropout[layer.name], self.training)
        result: Tensor = self.layers[key](inputs[0])
        return result

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Copy convdsl's parameters and buffers in, by convdsl name ("layer.field")."""
        with torch.no_grad():
            for name, value in arrays.items():
                layer, _, field = name.rpartition(".")
                target = getattr(self.layers[module_key(layer)], field)
                # num_batches_tracked: one value, of shape (1,) here and () in PyTorch
                if value.size != target.numel() or (value.ndim > 1 and
                                                    tuple(target.shape) != value.shape):
                    raise ValueError(f"{name}: shape {value.shape}, PyTorch has "
                                     f"{tuple(target.shape)}")
                source = torch.from_numpy(np.ascontiguousarray(value))
                target.copy_(source.reshape(target.shape).to(target.dtype))


def _last_uses(order: list[Layer], keep: str) -> dict[str, tuple[str, ...]]:
    """For each layer, the values whose last reader it is (never `keep`)."""
    last_reader: dict[str, str] = {}
    for layer in order:
        for name in layer.inputs:
            last_reader[name] = layer.name
    freed: dict[str, list[str]] = {}
    for value, reader in last_reader.items():
        if value != keep:
            freed.setdefault(reader, []).append(value)
    return {reader: tuple(values) for reader, values in freed.items()}


__all__ = ["TorchModel", "module_key"]
