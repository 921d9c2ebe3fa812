"""What each layer costs: parameters, buffers, fixed weights, units, MACs, receptive field.

Conventions, chosen so that figures match what users compare against:
- parameters are trainable numbers, as torchvision counts them (weights,
  biases, batch-norm scale and shift);
- buffers are batch-norm running mean and variance (Keras's "non-trainable");
- fixed weights are the literal numbers of `filter` layers, never trained;
- units are the elements of a layer's output for one example (as the lecture
  counts 4,704 units for LeNet's C1);
- MACs are the multiply-accumulates of convolution, filter and dense layers for
  one example; FLOPs = 2 x MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from convdsl.ir import ops
from convdsl.ir.graph import Graph
from convdsl.ir.ops import Layer, Op
from convdsl.passes.shapes import Shape, Window

BYTES_PER_VALUE = 4  # float32


@dataclass(frozen=True)
class ReceptiveField:
    """Extent in input samples seen by one output unit, and input samples between units."""

    size: tuple[int, ...]
    jump: tuple[int, ...]


@dataclass(frozen=True)
class LayerCounts:
    params: int
    buffers: int
    fixed: int
    units: int
    macs: int
    receptive_field: ReceptiveField
    aux: bool  # feeds only auxiliary heads

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def activation_bytes(self) -> int:
        return self.units * BYTES_PER_VALUE


def count_layers(graph: Graph, shapes: dict[str, Shape], windows: dict[str, Window]
                 ) -> dict[str, LayerCounts]:
    aux = auxiliary_layers(graph)
    whole = _whole_input(graph, shapes)
    fields: dict[str, ReceptiveField] = {}
    counts: dict[str, LayerCounts] = {}
    for layer in graph.topological_order():
        inputs = [shapes[name] for name in layer.inputs]
        output = shapes[layer.name]
        field = _receptive_field(layer, output, [fields[n] for n in layer.inputs],
                                 windows.get(layer.name), whole)
        fields[layer.name] = field
        window = windows.get(layer.name)
        params, buffers, fixed = _weights(layer, inputs, window)
        counts[layer.name] = LayerCounts(params, buffers, fixed, math.prod(output),
                                         _macs(layer, inputs, output, window), field,
                                         layer.name in aux)
    return counts


def auxiliary_layers(graph: Graph) -> set[str]:
    """Layers that only auxiliary heads need: dropped when the network is deployed."""
    main: set[str] = set()
    aux: set[str] = set()
    for output in graph.outputs:
        (aux if output.aux else main).update(graph.ancestors(output.name))
    return aux - main


def _window_size(window: Window | None) -> int:
    """Taps of a window resolved by the shape pass (sizes per axis already broadcast)."""
    assert window is not None, "the shape pass resolves every convolution's window"
    return math.prod(window.window)


def _weights(layer: Layer, inputs: list[Shape], window: Window | None
             ) -> tuple[int, int, int]:
    attrs = layer.attrs
    if isinstance(attrs, ops.ConvAttrs):
        taps = _window_size(window)
        weights = attrs.out_channels * (inputs[0][0] // attrs.groups) * taps
        return weights + (attrs.out_channels if attrs.bias else 0), 0, 0
    if isinstance(attrs, ops.FilterAttrs):
        return 0, 0, len(attrs.kernel)
    if isinstance(attrs, ops.DenseAttrs):
        return inputs[0][0] * attrs.units + (attrs.units if attrs.bias else 0), 0, 0
    if isinstance(attrs, ops.BatchNormAttrs):
        channels = inputs[0][0]
        return (2 * channels if attrs.affine else 0), 2 * channels, 0
    return 0, 0, 0


def _macs(layer: Layer, inputs: list[Shape], output: Shape, window: Window | None) -> int:
    attrs = layer.attrs
    if isinstance(attrs, ops.ConvAttrs):
        return math.prod(output) * (inputs[0][0] // attrs.groups) * _window_size(window)
    if isinstance(attrs, ops.FilterAttrs):
        return math.prod(output) * len(attrs.kernel)
    if isinstance(attrs, ops.DenseAttrs):
        return inputs[0][0] * attrs.units
    return 0


def _whole_input(graph: Graph, shapes: dict[str, Shape]) -> ReceptiveField:
    """The receptive field of a unit that sees every input sample."""
    sizes = [shapes[layer.name][1:] for layer in graph.inputs()]
    whole = tuple(map(max, *sizes)) if len(sizes) > 1 else sizes[0]
    return ReceptiveField(whole, whole)


def _receptive_field(layer: Layer, output: Shape, inputs: list[ReceptiveField],
                     window: Window | None, whole: ReceptiveField) -> ReceptiveField:
    if layer.op is Op.INPUT:
        axes = len(output) - 1
        return ReceptiveField((1,) * axes, (1,) * axes)
    if layer.op in (Op.GLOBAL_AVGPOOL, Op.GLOBAL_MAXPOOL, Op.DENSE):
        return whole
    if len(inputs) > 1:
        return ReceptiveField(tuple(map(max, *(f.size for f in inputs))),
                              tuple(map(max, *(f.jump for f in inputs))))
    (source,) = inputs
    if window is None:
        return source
    size = tuple(r + d * (k - 1) * j for r, k, d, j in
                 zip(source.size, window.window, window.dilation, source.jump))
    jump = tuple(j * s for j, s in zip(source.jump, window.stride))
    return ReceptiveField(size, jump)
