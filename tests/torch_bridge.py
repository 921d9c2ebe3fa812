"""A checked convdsl network as a PyTorch computation: the test-side oracle.

`TorchNetwork(network)` owns one `torch.nn.Parameter` per trained convdsl array
and one buffer per batch-norm statistic, named as `convdsl.runtime.params` names
them (`layer1.0.conv1.weight`), and computes every layer with
`torch.nn.functional` following the op contract in the semantics notes. Autograd
then gives the gradients every back end must reproduce.

    net = TorchNetwork(convdsl.load("networks/lenet5.cnn"))
    net.load_arrays(init_params(network))
    outputs = net(torch.from_numpy(x), train=True, step=3)
    torch_loss(network, outputs, targets).backward()
    net.grads()["c1.weight"]

The dots of the convdsl names cannot stand in a PyTorch attribute name, so the
arrays are stored under `SEPARATOR`-joined keys; `arrays()`, `grads()`,
`convdsl_state_dict()` and `load_arrays()` speak convdsl names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from convdsl.ir.ops import (
    Activation,
    ActSpec,
    BatchNormAttrs,
    ConvAttrs,
    DenseAttrs,
    DropoutAttrs,
    FilterAttrs,
    Layer,
    Loss,
    Op,
    PoolAttrs,
)
from convdsl.network import Network
from convdsl.passes.shapes import Window
from convdsl.runtime.params import ParamInfo, network_params
from convdsl.runtime.random import dropout_mask

SEPARATOR = "/"  # never in a convdsl name; "." is not allowed in a PyTorch key

ArrayLike = np.ndarray | Tensor
Targets = ArrayLike | Mapping[str, ArrayLike]


def safe_key(name: str) -> str:
    return name.replace(".", SEPARATOR)


# --- activations ---------------------------------------------------------------


def activate(x: Tensor, act: ActSpec | None) -> Tensor:
    """A (fused or stand-alone) activation, as the contract defines it."""
    if act is None or act.kind is Activation.IDENTITY:
        return x
    if act.kind is Activation.RELU:
        return F.relu(x)
    if act.kind is Activation.RELU6:
        return F.relu6(x)  # hardtanh(0, 6): gradient 1 only where 0 < x < 6
    if act.kind is Activation.LEAKY_RELU:
        return F.leaky_relu(x, act.slope)
    if act.kind is Activation.ELU:
        return F.elu(x, act.alpha)
    if act.kind is Activation.SIGMOID:
        return torch.sigmoid(x)
    if act.kind is Activation.TANH:
        return torch.tanh(x)
    if act.kind is Activation.SOFTMAX:
        return torch.softmax(x, dim=1)
    raise AssertionError(f"unknown activation {act.kind}")


def ends_in_softmax(network: Network, name: str) -> bool:
    """The output holds probabilities: its layer ends in a softmax (fused, or a softmax
    layer). Cross-entropy then reads it as probabilities, -log p[true class], whether or
    not other layers use it too (convdsl.runtime.losses); only the back ends' shortcut of
    taking the gradient at the logits needs an output that feeds nothing else."""
    act = network.graph.layer(name).act
    return act is not None and act.kind is Activation.SOFTMAX


# --- windowed layers ----------------------------------------------------------------

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL: dict[int, Callable[..., Tensor]] = {1: F.max_pool1d, 2: F.max_pool2d,
                                             3: F.max_pool3d}
_AVGPOOL: dict[int, Callable[..., Tensor]] = {1: F.avg_pool1d, 2: F.avg_pool2d,
                                             3: F.avg_pool3d}


def pad(x: Tensor, pads: tuple[tuple[int, int], ...], value: float = 0.0) -> Tensor:
    """Pad the spatial axes, (before, after) per axis, first spatial axis first."""
    flat: list[int] = []
    for before, after in reversed(pads):
        flat += [before, after]
    return F.pad(x, flat, value=value) if any(flat) else x


def spatial_dims(window: Window) -> list[int]:
    return list(range(2, 2 + len(window.window)))


def correlate(x: Tensor, weight: Tensor, bias: Tensor | None, window: Window, groups: int,
              flip: bool) -> Tensor:
    """Zero padding by the resolved window, then PyTorch's (cross-correlating) convolution."""
    if flip:
        weight = weight.flip(spatial_dims(window))
    conv = _CONV[len(window.window)]
    return conv(pad(x, window.pads), weight, bias, stride=window.stride,
                dilation=window.dilation, groups=groups)


def fixed_filter(x: Tensor, attrs: FilterAttrs, window: Window) -> Tensor:
    """The same fixed kernel on every channel: a depthwise convolution, groups = channels."""
    kernel = torch.tensor(attrs.kernel, dtype=x.dtype, device=x.device)
    kernel = kernel.reshape(window.window)
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, *window.window).contiguous()
    return correlate(x, weight, None, window, channels, attrs.flip)


def _symmetric(window: Window) -> list[int]:
    assert all(before == after for before, after in window.pads)
    return [before for before, _ in window.pads]


def max_pool(x: Tensor, attrs: PoolAttrs, window: Window) -> Tensor:
    return _MAXPOOL[len(window.window)](x, window.window, window.stride, _symmetric(window),
                                        window.dilation, ceil_mode=attrs.ceil)


def avg_pool(x: Tensor, attrs: PoolAttrs, window: Window) -> Tensor:
    assert set(window.dilation) == {1}, "average pooling has no dilation"
    return _AVGPOOL[len(window.window)](x, window.window, window.stride, _symmetric(window),
                                        ceil_mode=attrs.ceil, count_include_pad=attrs.count_pad)


def windows_of(x: Tensor, window: Window, out_sizes: tuple[int, ...]) -> Tensor:
    """Every window of `x` padded by the resolved window (and past its end where ceil
    rounding runs over): shape (N, C, *out_sizes, *window)."""
    extra = []
    for n, k, s, d, (before, after), out in zip(x.shape[2:], window.window, window.stride,
                                                 window.dilation, window.pads, out_sizes):
        needed = (out - 1) * s + d * (k - 1) + 1
        extra.append((before, max(after, needed - n - before)))
    padded = pad(x, tuple(extra))
    axes = len(window.window)
    for axis, (k, s, d, out) in enumerate(zip(window.window, window.stride, window.dilation,
                                              out_sizes)):
        dim = 2 + axis
        padded = padded.unfold(dim, d * (k - 1) + 1, s)  # appends the window axis last
        padded = padded.narrow(dim, 0, out)[..., ::d]
    # unfold put the window axes at the end in axis order, after the output positions
    return padded.reshape(*padded.shape[: 2 + axes], -1)


def soft_pool(x: Tensor, window: Window, out_sizes: tuple[int, ...]) -> Tensor:
    """sum_i softmax(x)_i x_i over each window's positions inside the real input."""
    values = windows_of(x, window, out_sizes)
    real = windows_of(torch.ones_like(x[:1, :1]), window, out_sizes) > 0.5
    logits = values.masked_fill(~real, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return (weights * values).sum(dim=-1)


def global_pool(x: Tensor, op: Op) -> Tensor:
    flat = x.flatten(2)
    if op is Op.GLOBAL_AVGPOOL:
        return flat.mean(dim=2)
    return flat.max(dim=2).values  # the gradient goes to the first maximum


# --- the network ---------------------------------------------------------------------


class TorchNetwork(torch.nn.Module):
    """A convdsl network computed by PyTorch, parameters named as convdsl names them."""

    def __init__(self, network: Network, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        self.infos: list[ParamInfo] = network_params(network)
        self.weights = torch.nn.ParameterDict()
        self.stats = torch.nn.Module()  # batch-norm buffers
        for info in self.infos:
            if info.trained:
                self.weights[safe_key(info.name)] = torch.nn.Parameter(
                    torch.zeros(info.shape, dtype=dtype, device=device))
            else:
                kind = torch.int64 if info.field == "num_batches_tracked" else dtype
                self.stats.register_buffer(safe_key(info.name),
                                           torch.zeros(info.shape, dtype=kind, device=device))

    # --- arrays by convdsl name ---------------------------------------------------------

    def tensor(self, name: str) -> Tensor:
        key = safe_key(name)
        if key in self.weights:
            return self.weights[key]
        found: Tensor = getattr(self.stats, key)
        return found

    def _optional(self, layer: Layer, field: str) -> Tensor | None:
        key = safe_key(f"{layer.name}.{field}")
        if key in self.weights:
            return self.weights[key]
        found: Tensor | None = getattr(self.stats, key, None)
        return found

    def load_arrays(self, arrays: Mapping[str, ArrayLike]) -> None:
        """Copy every array in (by convdsl name); all of them must be given."""
        missing = [info.name for info in self.infos if info.name not in arrays]
        unknown = sorted(set(arrays) - {info.name for info in self.infos})
        if missing or unknown:
            raise KeyError(f"missing arrays {missing}, unknown arrays {unknown}")
        with torch.no_grad():
            for info in self.infos:
                target = self.tensor(info.name)
                value = arrays[info.name]
                source = (value if isinstance(value, Tensor)
                          else torch.from_numpy(np.array(value)))
                if tuple(source.shape) != info.shape:
                    raise ValueError(f"{info.name}: shape {tuple(source.shape)}, "
                                     f"expected {info.shape}")
                target.copy_(source.to(target.dtype))

    def convdsl_state_dict(self) -> OrderedDict[str, Tensor]:
        """Every array under its convdsl (= torchvision) name, as a torch state_dict holds it."""
        return OrderedDict((info.name, self.tensor(info.name).detach().clone())
                           for info in self.infos)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: value.cpu().numpy() for name, value in self.convdsl_state_dict().items()}

    def grads(self) -> dict[str, np.ndarray]:
        """Gradients of the trained arrays (zeros where no loss reaches them)."""
        result = {}
        for info in self.infos:
            if info.trained:
                grad = self.tensor(info.name).grad
                result[info.name] = (np.zeros(info.shape) if grad is None
                                     else grad.detach().cpu().numpy().copy())
        return result

    def zero_grad_arrays(self) -> None:
        for parameter in self.weights.values():
            parameter.grad = None

    # --- the computation ---------------------------------------------------------------

    def forward(self, x: Tensor | Mapping[str, Tensor], train: bool = False, seed: int = 0,
                step: int = 0) -> dict[str, Tensor]:  # type: ignore[override]
        """Every layer's output, inputs included, keyed by layer name."""
        feeds = x if isinstance(x, Mapping) else {
            next(iter(self.network.input_shapes)): x}
        values: dict[str, Tensor] = {}
        for layer in self.network.layers:
            if layer.op is Op.INPUT:
                values[layer.name] = feeds[layer.name]
                continue
            inputs = [values[source] for source in layer.inputs]
            result = self._layer(layer, inputs, train, seed, step)
            values[layer.name] = activate(result, layer.act)
        return values

    def _layer(self, layer: Layer, inputs: list[Tensor], train: bool, seed: int,
               step: int) -> Tensor:
        """The layer's own computation, before its fused activation."""
        x = inputs[0]
        attrs = layer.attrs
        op = layer.op
        if op is Op.CONV:
            assert isinstance(attrs, ConvAttrs)
            return correlate(x, self.tensor(f"{layer.name}.weight"),
                             self._optional(layer, "bias"), self.network.windows[layer.name],
                             attrs.groups, attrs.flip)
        if op is Op.FILTER:
            assert isinstance(attrs, FilterAttrs)
            return fixed_filter(x, attrs, self.network.windows[layer.name])
        if op in (Op.MAXPOOL, Op.AVGPOOL, Op.SOFTPOOL):
            assert isinstance(attrs, PoolAttrs)
            return self._pool(layer, attrs, x)
        if op in (Op.GLOBAL_MAXPOOL, Op.GLOBAL_AVGPOOL):
            return global_pool(x, op)
        if op is Op.BATCHNORM:
            assert isinstance(attrs, BatchNormAttrs)
            return self._batch_norm(layer, attrs, x, train)
        if op is Op.DROPOUT:
            assert isinstance(attrs, DropoutAttrs)
            return self._dropout(layer, attrs, x, train, seed, step)
        if op is Op.FLATTEN:
            return x.reshape(x.shape[0], -1)
        if op is Op.DENSE:
            assert isinstance(attrs, DenseAttrs)
            return F.linear(x, self.tensor(f"{layer.name}.weight"),
                            self._optional(layer, "bias"))
        if op is Op.CONCAT:
            return torch.cat(inputs, dim=1)
        if op is Op.ADD:
            total = inputs[0]
            for other in inputs[1:]:
                total = total + other
            return total
        if op is Op.ACTIVATION:
            return x  # the activation itself is layer.act
        raise AssertionError(f"no PyTorch rule for {op}")

    def _pool(self, layer: Layer, attrs: PoolAttrs, x: Tensor) -> Tensor:
        window = self.network.windows[layer.name]
        if layer.op is Op.MAXPOOL:
            return max_pool(x, attrs, window)
        if layer.op is Op.AVGPOOL:
            return avg_pool(x, attrs, window)
        return soft_pool(x, window, self.network.shapes[layer.name][1:])

    def _batch_norm(self, layer: Layer, attrs: BatchNormAttrs, x: Tensor,
                    train: bool) -> Tensor:
        result = F.batch_norm(x, self.tensor(f"{layer.name}.running_mean"),
                              self.tensor(f"{layer.name}.running_var"),
                              self._optional(layer, "weight"), self._optional(layer, "bias"),
                              training=train, momentum=attrs.momentum, eps=attrs.eps)
        if train:
            with torch.no_grad():
                self.tensor(f"{layer.name}.num_batches_tracked").add_(1)
        return result

    def _dropout(self, layer: Layer, attrs: DropoutAttrs, x: Tensor, train: bool, seed: int,
                 step: int) -> Tensor:
        if not train:
            return x
        numpy_dtype = str(x.dtype).removeprefix("torch.")
        mask = dropout_mask(seed, step, layer.name, tuple(x.shape), attrs.p, numpy_dtype)
        return x * torch.from_numpy(mask).to(x.device)


# --- losses ------------------------------------------------------------------------------


def _as_tensor(value: ArrayLike, like: Tensor) -> Tensor:
    tensor = value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))
    return tensor.to(like.device)


def output_loss(network: Network, name: str, loss: Loss, output: Tensor,
                target: ArrayLike) -> Tensor:
    """One output's mean loss, as convdsl.runtime.losses defines it."""
    if loss is Loss.CROSS_ENTROPY:
        classes = _as_tensor(target, output).long()
        if ends_in_softmax(network, name):
            tiny = torch.finfo(output.dtype).tiny
            return F.nll_loss(torch.log(output.clamp_min(tiny)), classes)
        return F.cross_entropy(output, classes)
    if loss is Loss.MSE:
        return F.mse_loss(output, _as_tensor(target, output).to(output.dtype))
    return output.sum() * 0.0


def torch_loss(network: Network, outputs: Mapping[str, Tensor], targets: Targets) -> Tensor:
    """The weighted sum of every output's loss, auxiliary heads included. `targets` is one
    array (for every output) or a dict by output name."""
    total: Tensor | None = None
    for output in network.outputs:
        if output.loss is Loss.NONE:
            continue
        target = targets[output.name] if isinstance(targets, Mapping) else targets
        term = output.weight * output_loss(network, output.name, output.loss,
                                           outputs[output.name], target)
        total = term if total is None else total + term
    if total is None:
        first = outputs[network.outputs[0].name]
        return first.sum() * 0.0
    return total


__all__ = ["SEPARATOR", "TorchNetwork", "activate", "ends_in_softmax", "output_loss",
           "torch_loss"]
