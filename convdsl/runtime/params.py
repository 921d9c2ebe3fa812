"""Parameters: which arrays each layer owns, their PyTorch names and layouts, and
how they start.

Names and layouts follow PyTorch so that weights move between the two without
reshaping: a convolution owns `<layer>.weight` shaped (out, in/groups, *window)
and `<layer>.bias` (out,); a dense layer `<layer>.weight` (units, features) and
`<layer>.bias`; batch norm `.weight` and `.bias` (trained) and the buffers
`.running_mean`, `.running_var` and `.num_batches_tracked`.

Initialisation is PyTorch's default, seeded: weights and biases uniform in
+-1/sqrt(fan_in) (Kaiming-uniform with a = sqrt(5)); batch norm scale 1, shift
0. `init="he"` draws weights from N(0, 2/fan_in) (He et al. 2015) and
`init="glorot"` from U(+-sqrt(6/(fan_in + fan_out))) (Glorot and Bengio 2010);
both start biases at 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from convdsl.ir.ops import BatchNormAttrs, ConvAttrs, DenseAttrs, Layer, Op
from convdsl.ir.training import INITS
from convdsl.network import Network


@dataclass(frozen=True)
class ParamInfo:
    """One array a layer owns. Trained arrays get gradients; buffers do not."""

    layer: str
    field: str  # weight, bias, running_mean, running_var, num_batches_tracked
    shape: tuple[int, ...]
    trained: bool

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.field}"


def layer_params(layer: Layer, input_shape: tuple[int, ...]) -> list[ParamInfo]:
    """The arrays `layer` owns, given its (batchless) input shape."""
    attrs = layer.attrs
    if layer.op is Op.CONV:
        assert isinstance(attrs, ConvAttrs)
        window = _broadcast(attrs.window, len(input_shape) - 1)
        weight = (attrs.out_channels, input_shape[0] // attrs.groups, *window)
        infos = [ParamInfo(layer.name, "weight", weight, True)]
        if attrs.bias:
            infos.append(ParamInfo(layer.name, "bias", (attrs.out_channels,), True))
        return infos
    if layer.op is Op.DENSE:
        assert isinstance(attrs, DenseAttrs)
        infos = [ParamInfo(layer.name, "weight", (attrs.units, input_shape[0]), True)]
        if attrs.bias:
            infos.append(ParamInfo(layer.name, "bias", (attrs.units,), True))
        return infos
    if layer.op is Op.BATCHNORM:
        assert isinstance(attrs, BatchNormAttrs)
        channels = (input_shape[0],)
        infos = []
        if attrs.affine:
            infos += [ParamInfo(layer.name, "weight", channels, True),
                      ParamInfo(layer.name, "bias", channels, True)]
        return [*infos, ParamInfo(layer.name, "running_mean", channels, False),
                ParamInfo(layer.name, "running_var", channels, False),
                ParamInfo(layer.name, "num_batches_tracked", (), False)]
    return []


def network_params(network: Network) -> list[ParamInfo]:
    """Every array of the network, layer by layer in topological order."""
    infos: list[ParamInfo] = []
    for layer in network.layers:
        if layer.inputs:
            infos += layer_params(layer, network.shapes[layer.inputs[0]])
    return infos


def init_params(network: Network, seed: int = 0, init: str = "pytorch",
                dtype: str = "float64") -> dict[str, np.ndarray]:
    """Fresh parameters and buffers for `network`, the same for the same seed."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    infos = network_params(network)
    weights = {info.layer: info.shape for info in infos if info.field == "weight"}
    for info in infos:
        arrays[info.name] = _initial(info, weights.get(info.layer, ()), rng, init, dtype)
    return arrays


def _initial(info: ParamInfo, weight_shape: tuple[int, ...], rng: np.random.Generator,
             init: str, dtype: str) -> np.ndarray:
    if info.field == "num_batches_tracked":
        return np.zeros((), dtype=np.int64)
    if info.field == "running_var" or (info.field == "weight" and len(info.shape) == 1):
        return np.ones(info.shape, dtype=dtype)  # batch norm scale and variance
    if info.field in ("running_mean",) or (info.field == "bias" and len(weight_shape) == 1):
        return np.zeros(info.shape, dtype=dtype)  # batch norm shift and mean
    fan_in = math.prod(weight_shape[1:])
    fan_out = weight_shape[0] * math.prod(weight_shape[2:])
    if info.field == "bias":
        if init != "pytorch":
            return np.zeros(info.shape, dtype=dtype)
        bound = 1 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, info.shape).astype(dtype)
    if init == "he":
        return rng.normal(0.0, math.sqrt(2 / fan_in), info.shape).astype(dtype)
    if init == "glorot":
        bound = math.sqrt(6 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, info.shape).astype(dtype)
    bound = 1 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, info.shape).astype(dtype)


def _broadcast(sizes: tuple[int, ...], axes: int) -> tuple[int, ...]:
    return sizes * axes if len(sizes) == 1 else sizes
