"""The closed set of operations and one frozen, typed payload per operation."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from convdsl.errors import Span


class Op(Enum):
    INPUT = "input"
    CONV = "conv"
    FILTER = "filter"  # a fixed, never-trained kernel applied to every channel
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    SOFTPOOL = "softpool"
    GLOBAL_MAXPOOL = "global_maxpool"
    GLOBAL_AVGPOOL = "global_avgpool"
    ACTIVATION = "activation"
    BATCHNORM = "bn"
    DROPOUT = "dropout"
    FLATTEN = "flatten"
    DENSE = "dense"
    CONCAT = "concat"
    ADD = "add"


class Activation(Enum):
    IDENTITY = "identity"
    RELU = "relu"
    RELU6 = "relu6"
    LEAKY_RELU = "leaky_relu"
    ELU = "elu"
    SIGMOID = "sigmoid"
    TANH = "tanh"
    SOFTMAX = "softmax"


class PadMode(Enum):
    VALID = "valid"
    SAME = "same"
    FULL = "full"
    EXPLICIT = "explicit"


class Loss(Enum):
    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    NONE = "none"


@dataclass(frozen=True)
class Padding:
    """How a window meets the border. Explicit padding is (before, after) per axis;
    a tuple of one pair applies to every axis."""

    mode: PadMode
    sides: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ActSpec:
    kind: Activation
    slope: float = 0.01  # leaky_relu's negative slope
    alpha: float = 1.0  # elu's saturation value


# Sizes per spatial axis; one value is broadcast to every axis of the input.
Sizes = tuple[int, ...]


@dataclass(frozen=True)
class InputAttrs:
    shape: tuple[int, ...]  # channels first


@dataclass(frozen=True)
class ConvAttrs:
    out_channels: int
    window: Sizes
    stride: Sizes = (1,)
    padding: Padding = Padding(PadMode.VALID)
    dilation: Sizes = (1,)
    groups: int = 1
    bias: bool = True
    flip: bool = False  # True: convolution proper (kernel flipped); False: cross-correlation
    act: ActSpec | None = None
    algo: str = "auto"


@dataclass(frozen=True)
class FilterAttrs:
    window: Sizes
    kernel: tuple[float, ...]  # row-major, prod(window) values
    kernel_shape: tuple[int, ...]  # the nesting the user wrote, () for a flat list
    stride: Sizes = (1,)
    padding: Padding = Padding(PadMode.VALID)
    dilation: Sizes = (1,)
    flip: bool = False
    act: ActSpec | None = None


@dataclass(frozen=True)
class PoolAttrs:
    window: Sizes
    stride: Sizes | None = None  # None: equal to the window
    padding: Sizes = (0,)
    dilation: Sizes = (1,)
    ceil: bool = False
    count_pad: bool = True  # average pooling: do padded zeros count in the mean


@dataclass(frozen=True)
class NoAttrs:
    pass


@dataclass(frozen=True)
class ActivationAttrs:
    act: ActSpec


@dataclass(frozen=True)
class BatchNormAttrs:
    eps: float = 1e-5
    momentum: float = 0.1
    affine: bool = True
    act: ActSpec | None = None


@dataclass(frozen=True)
class DropoutAttrs:
    p: float = 0.5


@dataclass(frozen=True)
class DenseAttrs:
    units: int
    bias: bool = True
    act: ActSpec | None = None


@dataclass(frozen=True)
class MergeAttrs:
    act: ActSpec | None = None


Attrs = (InputAttrs | ConvAttrs | FilterAttrs | PoolAttrs | NoAttrs | ActivationAttrs
         | BatchNormAttrs | DropoutAttrs | DenseAttrs | MergeAttrs)


@dataclass(frozen=True)
class Layer:
    """One node of the graph: what it computes, from which layers, and where it was written."""

    name: str
    op: Op
    attrs: Attrs
    inputs: tuple[str, ...]
    span: Span | None = field(default=None, compare=False)
    option_spans: tuple[tuple[str, Span | None], ...] = field(default=(), compare=False)
    # The block calls that produced this layer, innermost first, as notes for errors.
    context: tuple[str, ...] = field(default=(), compare=False)

    def option_span(self, option: str) -> Span | None:
        for key, span in self.option_spans:
            if key == option:
                return span
        return self.span

    @property
    def act(self) -> ActSpec | None:
        return getattr(self.attrs, "act", None)


@dataclass(frozen=True)
class Output:
    name: str
    loss: Loss
    weight: float
    aux: bool
    span: Span | None = field(default=None, compare=False)
