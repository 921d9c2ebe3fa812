"""Shape inference: the output shape of every layer, or a located error saying why not.

A shape is channels first: (C, L) for a signal, (C, H, W) for an image,
(C, D, H, W) for a volume or video, and (F,) for a flat feature vector.
Window arithmetic, per spatial axis, with input size n, window k, stride s,
dilation d and padding p_before + p_after:

    out = floor((n + p_before + p_after - d*(k-1) - 1) / s) + 1

Pooling may round up instead (round=ceil); then, as in PyTorch, a last
window that would start inside the right padding is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from convdsl.errors import ConvDslError, Diagnostic, Span, error
from convdsl.ir import ops
from convdsl.ir.graph import Graph
from convdsl.ir.ops import Layer, Op, PadMode

Shape = tuple[int, ...]


def format_shape(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


@dataclass(frozen=True)
class Window:
    """A window resolved against its input: sizes per axis and padding per side."""

    window: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]


class ShapeError(Exception):
    def __init__(self, message: str, span: Span | None, hint: str | None = None) -> None:
        super().__init__(message)
        self.diagnostic = error(message, span, hint)


def infer_shapes(graph: Graph) -> tuple[dict[str, Shape], dict[str, Window]]:
    """Shapes of all layers, and resolved windows of the windowed ones; errors collected."""
    shapes: dict[str, Shape] = {}
    windows: dict[str, Window] = {}
    problems: list[Diagnostic] = []
    for layer in graph.topological_order():
        if any(source not in shapes for source in layer.inputs):
            continue  # an input already failed; its error is reported
        inputs = [shapes[source] for source in layer.inputs]
        try:
            shape, window = _RULES[layer.op](layer, inputs)
        except ShapeError as exc:
            diagnostic = exc.diagnostic
            problems.append(replace(diagnostic, notes=(*diagnostic.notes, *layer.context)))
            continue
        shapes[layer.name] = shape
        if window is not None:
            windows[layer.name] = window
    if problems:
        raise ConvDslError(problems)
    return shapes, windows


Rule = Callable[[Layer, list[Shape]], tuple[Shape, Window | None]]


def _spatial_input(layer: Layer, shape: Shape) -> int:
    """Number of spatial axes; windowed layers need a map, not a flat vector."""
    if len(shape) < 2:
        raise ShapeError(
            f"'{layer.name}' needs a feature map but its input is a flat vector of "
            f"{shape[0]} features", layer.span,
            hint="windowed layers go before 'flatten' or 'dense'")
    return len(shape) - 1


def _per_axis(layer: Layer, option: str, values: tuple[int, ...], shape: Shape
              ) -> tuple[int, ...]:
    axes = len(shape) - 1
    if len(values) == 1:
        return values * axes
    if len(values) != axes:
        raise ShapeError(
            f"'{option}' of '{layer.name}' gives {len(values)} sizes but its input "
            f"{format_shape(shape)} has {axes} spatial {'axis' if axes == 1 else 'axes'}",
            layer.option_span(option),
            hint="give one size" if axes == 1 else f"give one size, or {axes} joined by 'x'")
    return values


def _resolve_padding(layer: Layer, padding: ops.Padding, sizes: tuple[int, ...],
                     window: tuple[int, ...], stride: tuple[int, ...],
                     dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    axes = len(sizes)
    if padding.mode is PadMode.VALID:
        return ((0, 0),) * axes
    if padding.mode is PadMode.FULL:
        return tuple((d * (k - 1), d * (k - 1)) for k, d in zip(window, dilation))
    if padding.mode is PadMode.SAME:
        # As TensorFlow does: out = ceil(n / s); any odd padding goes after.
        pads = []
        for n, k, s, d in zip(sizes, window, stride, dilation):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    sides = padding.sides
    if len(sides) == 1:
        return sides * axes
    if len(sides) != axes:
        raise ShapeError(
            f"'pad' of '{layer.name}' gives {len(sides)} axes but the input has {axes}",
            layer.option_span("pad"), hint="give one value, or a value per spatial axis")
    return sides


def _slide(layer: Layer, input_shape: Shape, window: Window, ceil: bool = False
           ) -> tuple[int, ...]:
    """Output sizes of a sliding window, with an error that shows the arithmetic."""
    sizes = input_shape[1:]
    out = []
    for axis, (n, k, s, d, (before, after)) in enumerate(
            zip(sizes, window.window, window.stride, window.dilation, window.pads)):
        padded = n + before + after
        span_ = d * (k - 1) + 1
        numerator = padded - span_
        size = (-(-numerator // s) if ceil else numerator // s) + 1
        if ceil and (size - 1) * s >= n + before:
            size -= 1  # the last window would start in the right padding
        if size < 1:
            rounding = "ceil" if ceil else "floor"
            formula = (f"out = {rounding}(({n} + {before} + {after} - {d}*({k}-1) - 1) / {s})"
                       f" + 1 = {size}")
            raise ShapeError(
                f"the window of '{layer.name}' ({span_}) is larger than its padded input "
                f"({padded}) on spatial axis {axis + 1} of input "
                f"{format_shape(input_shape)}: {formula}", layer.span,
                hint="use a smaller window, pad the input, or remove a pooling layer before it")
        out.append(size)
    return tuple(out)


def _conv(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    attrs = layer.attrs
    assert isinstance(attrs, (ops.ConvAttrs, ops.FilterAttrs))
    (shape,) = inputs
    _spatial_input(layer, shape)
    window = _per_axis(layer, "window", attrs.window, shape)
    stride = _per_axis(layer, "stride", attrs.stride, shape)
    dilation = _per_axis(layer, "dilation", attrs.dilation, shape)
    pads = _resolve_padding(layer, attrs.padding, shape[1:], window, stride, dilation)
    channels = shape[0]
    if isinstance(attrs, ops.ConvAttrs):
        _check_groups(layer, attrs, channels)
        channels = attrs.out_channels
    else:
        _check_kernel(layer, attrs, window)
    resolved = Window(window, stride, dilation, pads)
    return (channels, *_slide(layer, shape, resolved)), resolved


def _check_groups(layer: Layer, attrs: ops.ConvAttrs, channels: int) -> None:
    for what, count in (("input", channels), ("output", attrs.out_channels)):
        if count % attrs.groups:
            raise ShapeError(
                f"'{layer.name}' has {count} {what} channel{'s' if count != 1 else ''}, which "
                f"{attrs.groups} groups cannot divide evenly", layer.option_span("groups"),
                hint=f"choose groups that divide both {channels} and {attrs.out_channels}")


def _check_kernel(layer: Layer, attrs: ops.FilterAttrs, window: tuple[int, ...]) -> None:
    needed = math.prod(window)
    shape_ok = not attrs.kernel_shape or attrs.kernel_shape == window
    if len(attrs.kernel) != needed or not shape_ok:
        written = (format_shape(attrs.kernel_shape) if attrs.kernel_shape
                   else str(len(attrs.kernel)))
        plural = "s" if written != "1" else ""
        raise ShapeError(
            f"the fixed kernel of '{layer.name}' has {written} value{plural} but its window "
            f"{format_shape(window)} needs {needed}", layer.option_span("kernel"),
            hint="give one number per window position, row by row")


def _pool(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.PoolAttrs)
    (shape,) = inputs
    _spatial_input(layer, shape)
    window = _per_axis(layer, "window", attrs.window, shape)
    stride = _per_axis(layer, "stride", attrs.stride or attrs.window, shape)
    dilation = _per_axis(layer, "dilation", attrs.dilation, shape)
    padding = _per_axis(layer, "pad", attrs.padding, shape)
    for k, p in zip(window, padding):
        if p > k // 2:
            raise ShapeError(
                f"padding {p} of '{layer.name}' is more than half its window {k}",
                layer.option_span("pad"),
                hint="pooling pads at most half the window on each side, as in PyTorch")
    resolved = Window(window, stride, dilation, tuple((p, p) for p in padding))
    return (shape[0], *_slide(layer, shape, resolved, attrs.ceil)), resolved


def _global_pool(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    (shape,) = inputs
    _spatial_input(layer, shape)
    return (shape[0],), None


def _same(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    return inputs[0], None


def _flatten(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    return (math.prod(inputs[0]),), None


def _dense(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.DenseAttrs)
    (shape,) = inputs
    if len(shape) != 1:
        raise ShapeError(
            f"'{layer.name}' needs a flat vector but its input is a feature map "
            f"{format_shape(shape)}", layer.span,
            hint="insert 'flatten' (or a global pooling layer) before it")
    return (attrs.units,), None


def _concat(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    first_shape = inputs[0]
    for index, shape in enumerate(inputs[1:], 1):
        if len(shape) != len(first_shape) or shape[1:] != first_shape[1:]:
            raise ShapeError(
                f"cannot concatenate {_described(layer, 0, first_shape)} and "
                f"{_described(layer, index, shape)}: their sizes "
                f"{format_shape(first_shape[1:]) or 'flat'} and "
                f"{format_shape(shape[1:]) or 'flat'} differ", layer.span,
                hint="concatenation joins channels; every branch must keep the same "
                "spatial size (check padding and strides)")
    return (sum(shape[0] for shape in inputs), *first_shape[1:]), None


def _add(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    first_shape = inputs[0]
    for index, shape in enumerate(inputs[1:], 1):
        if shape != first_shape:
            raise ShapeError(
                f"cannot add {_described(layer, 0, first_shape)} and "
                f"{_described(layer, index, shape)}: shapes differ", layer.span,
                hint=_projection_hint(_written(layer, 0), first_shape,
                                      _written(layer, index), shape))
    return first_shape, None


def _written(layer: Layer, index: int) -> str:
    """A merge's input as the user wrote it (bn2, input), else its full name."""
    name = layer.inputs[index]
    span = dict(layer.option_spans).get(f"#{index}")
    if span is None or span.source is None or span.end_line != span.line:
        return name
    word = span.source.line(span.line)[span.column - 1:span.end_column - 1]
    return word if word.isidentifier() else name


def _described(layer: Layer, index: int, shape: Shape) -> str:
    """'bn2' (layer2.0.bn2, 128x28x28): the written name, the full one where it differs."""
    name, written = layer.inputs[index], _written(layer, index)
    full = f"{name}, " if name != written else ""
    return f"'{written}' ({full}{format_shape(shape)})"


def _projection_hint(first: str, first_shape: Shape, other: str, shape: Shape) -> str:
    """How to make two shapes addable: the 1x1 convolution (or dense layer) that would."""
    if len(shape) != len(first_shape):
        return "a feature map and a flat vector cannot be added; flatten or pool the map"
    if len(shape) == 1:
        return f"pass '{other}' through dense({first_shape[0]}) first, so that sizes agree"
    if shape[1:] == first_shape[1:]:
        return (f"pass '{other}' through conv({first_shape[0]}, 1, bias=no) -> bn first, so "
                f"that it has {first_shape[0]} channels too")
    big, big_shape, small_shape = first, first_shape, shape
    if math.prod(shape[1:]) > math.prod(first_shape[1:]):
        big, big_shape, small_shape = other, shape, first_shape
    for stride in range(2, 65):
        if all(-(-b // stride) == s for b, s in zip(big_shape[1:], small_shape[1:])):
            return (f"pass '{big}' through conv({small_shape[0]}, 1, stride={stride}, "
                    f"bias=no) -> bn first, so that it becomes {format_shape(small_shape)}")
    return (f"no stride turns {format_shape(big_shape[1:])} into "
            f"{format_shape(small_shape[1:])}; check the padding (pad=same keeps the size) "
            "and strides of both branches")


def _input(layer: Layer, inputs: list[Shape]) -> tuple[Shape, Window | None]:
    assert isinstance(layer.attrs, ops.InputAttrs)
    return layer.attrs.shape, None


_RULES: dict[Op, Rule] = {
    Op.INPUT: _input,
    Op.CONV: _conv,
    Op.FILTER: _conv,
    Op.MAXPOOL: _pool,
    Op.AVGPOOL: _pool,
    Op.SOFTPOOL: _pool,
    Op.GLOBAL_MAXPOOL: _global_pool,
    Op.GLOBAL_AVGPOOL: _global_pool,
    Op.ACTIVATION: _same,
    Op.BATCHNORM: _same,
    Op.DROPOUT: _same,
    Op.FLATTEN: _flatten,
    Op.DENSE: _dense,
    Op.CONCAT: _concat,
    Op.ADD: _add,
}
