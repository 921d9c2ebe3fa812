"""The reference interpreter: every operation of the unfused graph, forward and backward,
in plain NumPy float64.

This is the executable form of the op contract (notes/semantics.md) and the oracle the
generated kernels are tested against, so it favours being obviously right over being fast:
each operation is a few lines of array code that reads like its formula, and nothing here is
shared with the code generators.

Windowed layers (conv, filter, pooling) all work the same way: pad the input, then visit
the window offsets t one by one. For an offset t, the input values that output position i
sees are `xpad[i*stride + t*dilation]` for every i at once, one strided slice ("tap"); the
layer combines the taps (a weighted sum, a max, a mean), and its backward scatters the
gradient back through the same slices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from convdsl.ir import ops
from convdsl.ir.ops import Activation, ActSpec, Layer, Loss, Op
from convdsl.network import Network
from convdsl.passes.shapes import Window
from convdsl.runtime import losses
from convdsl.runtime.params import ParamInfo, init_params, network_params
from convdsl.runtime.random import dropout_mask

Params = dict[str, np.ndarray]
Grads = tuple[list[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class RunContext:
    train: bool = False
    seed: int = 0
    step: int = 0


@dataclass(frozen=True)
class Saved:
    """What a layer's backward needs: its op's own record, and both sides of its activation."""

    core: Any
    pre_act: np.ndarray  # the op's result before the fused activation
    output: np.ndarray


# --- window helpers -----------------------------------------------------------


def _offsets(window: Window) -> Iterator[tuple[int, ...]]:
    """Every window offset, in row-major order (the order max pooling breaks ties in)."""
    return itertools.product(*(range(k) for k in window.window))


def _out_sizes(sizes: tuple[int, ...], window: Window, ceil: bool = False) -> tuple[int, ...]:
    """Output positions per axis, by the window formula of docs/language.md section 7."""
    out = []
    for n, k, s, d, (before, after) in zip(sizes, window.window, window.stride,
                                           window.dilation, window.pads):
        room = n + before + after - d * (k - 1) - 1
        size = (-(-room // s) if ceil else room // s) + 1
        if ceil and (size - 1) * s >= n + before:
            size -= 1  # PyTorch drops a last window that starts in the right padding
        out.append(size)
    return tuple(out)


def _pad(x: np.ndarray, window: Window, out: tuple[int, ...], value: float) -> np.ndarray:
    """x padded by window.pads, plus whatever a ceil-mode last window runs past the end."""
    widths = [(0, 0), (0, 0)]
    for n, k, s, d, o, (before, after) in zip(x.shape[2:], window.window, window.stride,
                                              window.dilation, out, window.pads):
        reach = (o - 1) * s + d * (k - 1) + 1  # padded positions the windows touch
        widths.append((before, max(after, reach - n - before)))
    return np.pad(x, widths, constant_values=value)


def _crop(xpad: np.ndarray, window: Window, sizes: tuple[int, ...]) -> np.ndarray:
    """The real input inside a padded array (undoes _pad)."""
    inner = tuple(slice(before, before + n) for n, (before, _) in zip(sizes, window.pads))
    return xpad[(slice(None), slice(None), *inner)]


def _tap(t: tuple[int, ...], window: Window, out: tuple[int, ...], lead: int = 2
         ) -> tuple[slice, ...]:
    """The slice of a padded array that offset t sees at every output position."""
    spatial = tuple(slice(ti * d, ti * d + (o - 1) * s + 1, s)
                    for ti, d, s, o in zip(t, window.dilation, window.stride, out))
    return (slice(None),) * lead + spatial


def _taps(xpad: np.ndarray, window: Window, out: tuple[int, ...]) -> np.ndarray:
    """All taps stacked: shape (window positions, N, C, *out)."""
    return np.stack([xpad[_tap(t, window, out)] for t in _offsets(window)])


def _untap(grads: np.ndarray, padded_shape: tuple[int, ...], window: Window,
           out: tuple[int, ...]) -> np.ndarray:
    """Backward of _taps: add each tap's gradient back where it came from."""
    gpad = np.zeros(padded_shape)
    for g, t in zip(grads, _offsets(window)):
        gpad[_tap(t, window, out)] += g
    return gpad


def _need_window(layer: Layer, window: Window | None) -> Window:
    if window is None:
        raise ValueError(f"'{layer.name}' ({layer.op.value}) needs its resolved window "
                         "(network.windows[name])")
    return window


def _spatial_axes(x: np.ndarray) -> tuple[int, ...]:
    return tuple(range(2, x.ndim))


# --- convolution and fixed filters ----------------------------------------------


def _correlate(xpad: np.ndarray, w: np.ndarray, groups: int, window: Window,
               out: tuple[int, ...]) -> np.ndarray:
    """y[n,o,i] = sum_{c,t} w[o,c,t] xpad[n, g*C/G + c, i*s + t*d], g = o // (O/G)."""
    n, c = xpad.shape[:2]
    o = w.shape[0]
    xg = xpad.reshape(n, groups, c // groups, *xpad.shape[2:])
    wg = w.reshape(groups, o // groups, c // groups, *w.shape[2:])
    y = np.zeros((n, groups, o // groups, *out))
    for t in _offsets(window):
        y += np.einsum("ngc...,goc->ngo...", xg[_tap(t, window, out, lead=3)],
                       wg[(slice(None),) * 3 + t])
    return y.reshape(n, o, *out)


def _correlate_backward(gy: np.ndarray, xpad: np.ndarray, w: np.ndarray, groups: int,
                        window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of _correlate for the padded input and the weight."""
    n, c = xpad.shape[:2]
    o = w.shape[0]
    out = gy.shape[2:]
    xg = xpad.reshape(n, groups, c // groups, *xpad.shape[2:])
    wg = w.reshape(groups, o // groups, c // groups, *w.shape[2:])
    gyg = gy.reshape(n, groups, o // groups, *out)
    gx = np.zeros_like(xg)
    gw = np.zeros_like(wg)
    for t in _offsets(window):
        tap = _tap(t, window, out, lead=3)
        kernel_at_t = (slice(None),) * 3 + t
        gx[tap] += np.einsum("ngo...,goc->ngc...", gyg, wg[kernel_at_t])
        # weight sharing: one weight serves every output position, so its gradient sums
        patch = xg[tap].reshape(n, groups, c // groups, -1)
        gw[kernel_at_t] = np.einsum("ngop,ngcp->goc", gyg.reshape(n, groups, o // groups, -1),
                                    patch)
    return gx.reshape(xpad.shape), gw.reshape(w.shape)


def _flip(w: np.ndarray) -> np.ndarray:
    """The kernel reversed along every spatial axis: convolution proper."""
    return np.flip(w, axis=_spatial_axes(w))


def _conv_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                  window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.ConvAttrs)
    window = _need_window(layer, window)
    (x,) = inputs
    out = _out_sizes(x.shape[2:], window)
    xpad = _pad(x, window, out, 0.0)
    w = _flip(params["weight"]) if attrs.flip else params["weight"]
    y = _correlate(xpad, w, attrs.groups, window, out)
    if attrs.bias:
        y += params["bias"].reshape(1, -1, *(1,) * len(out))
    return y, (xpad, x.shape[2:], window)


def _conv_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    attrs = layer.attrs
    assert isinstance(attrs, ops.ConvAttrs)
    xpad, sizes, window = saved
    w = _flip(params["weight"]) if attrs.flip else params["weight"]
    gxpad, gw = _correlate_backward(gy, xpad, w, attrs.groups, window)
    grads = {"weight": _flip(gw) if attrs.flip else gw}
    if attrs.bias:
        grads["bias"] = gy.sum(axis=(0, *_spatial_axes(gy)))
    return [_crop(gxpad, window, sizes)], grads


def _filter_kernel(attrs: ops.FilterAttrs, window: Window, channels: int) -> np.ndarray:
    """The fixed kernel as a depthwise weight (C, 1, *window): the same for every channel."""
    kernel = np.array(attrs.kernel, dtype=np.float64).reshape(window.window)
    if attrs.flip:
        kernel = np.flip(kernel)
    return np.broadcast_to(kernel, (channels, 1, *window.window))


def _filter_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                    window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.FilterAttrs)
    window = _need_window(layer, window)
    (x,) = inputs
    out = _out_sizes(x.shape[2:], window)
    xpad = _pad(x, window, out, 0.0)
    w = _filter_kernel(attrs, window, x.shape[1])
    return _correlate(xpad, w, x.shape[1], window, out), (xpad, x.shape[2:], window)


def _filter_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    attrs = layer.attrs
    assert isinstance(attrs, ops.FilterAttrs)
    xpad, sizes, window = saved
    channels = xpad.shape[1]
    w = _filter_kernel(attrs, window, channels)
    gxpad, _ = _correlate_backward(gy, xpad, w, channels, window)
    return [_crop(gxpad, window, sizes)], {}  # the kernel is fixed: no weight gradient


# --- pooling ----------------------------------------------------------------------


def _pool_setup(layer: Layer, x: np.ndarray, window: Window | None
                ) -> tuple[ops.PoolAttrs, Window, tuple[int, ...]]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.PoolAttrs)
    window = _need_window(layer, window)
    return attrs, window, _out_sizes(x.shape[2:], window, attrs.ceil)


def _maxpool_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                     window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs
    _, window, out = _pool_setup(layer, x, window)
    xpad = _pad(x, window, out, -np.inf)  # padding and overhang never win
    taps = _taps(xpad, window, out)
    first_max = taps.argmax(axis=0)  # argmax keeps the first of equal values
    return taps.max(axis=0), (first_max, xpad.shape, x.shape[2:], window)


def _maxpool_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    first_max, padded_shape, sizes, window = saved
    positions = np.arange(int(np.prod(window.window)))
    chosen = positions.reshape(-1, *(1,) * gy.ndim) == first_max
    gpad = _untap(chosen * gy, padded_shape, window, gy.shape[2:])
    return [_crop(gpad, window, sizes)], {}


def _avg_divisor(sizes: tuple[int, ...], window: Window, out: tuple[int, ...],
                 count_pad: bool) -> np.ndarray:
    """How many values each window averages, by PyTorch's rule (notes/semantics.md)."""
    per_axis = []
    for n, k, s, o, (before, after) in zip(sizes, window.window, window.stride, out,
                                           window.pads):
        start = np.arange(o) * s - before
        end = np.minimum(start + k, n + after)
        with_pad = end - start
        real = np.minimum(end, n) - np.maximum(start, 0)
        per_axis.append(with_pad if count_pad else real)
    divisor = np.ones(())
    for counts in per_axis:  # an outer product: the window is a box
        divisor = np.multiply.outer(divisor, counts)
    return divisor.astype(np.float64)


def _avgpool_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                     window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs
    attrs, window, out = _pool_setup(layer, x, window)
    if any(d != 1 for d in window.dilation):
        raise ValueError(f"'{layer.name}': average pooling has no dilation")
    xpad = _pad(x, window, out, 0.0)
    divisor = _avg_divisor(x.shape[2:], window, out, attrs.count_pad)
    return _taps(xpad, window, out).sum(axis=0) / divisor, (divisor, xpad.shape, x.shape[2:],
                                                             window)


def _avgpool_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    divisor, padded_shape, sizes, window = saved
    share = gy / divisor  # every value in the window gets the same share
    grads = np.broadcast_to(share, (int(np.prod(window.window)), *gy.shape))
    return [_crop(_untap(grads, padded_shape, window, gy.shape[2:]), window, sizes)], {}


def _softpool_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                      window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs
    _, window, out = _pool_setup(layer, x, window)
    xpad = _pad(x, window, out, 0.0)
    taps = _taps(xpad, window, out)
    # positions in the padding or past the end take no part at all
    real = _taps(_pad(np.ones_like(x, dtype=bool), window, out, False), window, out)
    peak = np.where(real, taps, -np.inf).max(axis=0)  # subtracted for stability
    e = np.where(real, np.exp(np.where(real, taps, peak) - peak), 0.0)
    weights = e / e.sum(axis=0)
    y = (weights * taps).sum(axis=0)
    return y, (weights, taps, y, xpad.shape, x.shape[2:], window)


def _softpool_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    weights, taps, y, padded_shape, sizes, window = saved
    grads = gy * weights * (1.0 + taps - y)  # d y / d x_i = w_i (1 + x_i - y)
    return [_crop(_untap(grads, padded_shape, window, gy.shape[2:]), window, sizes)], {}


def _global_maxpool_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                            window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs
    flat = x.reshape(*x.shape[:2], -1)
    first_max = flat.argmax(axis=2)[..., None]
    return np.take_along_axis(flat, first_max, axis=2)[..., 0], (first_max, x.shape)


def _global_maxpool_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params
                             ) -> Grads:
    first_max, shape = saved
    gx = np.zeros((*shape[:2], int(np.prod(shape[2:]))))
    np.put_along_axis(gx, first_max, gy[..., None], axis=2)
    return [gx.reshape(shape)], {}


def _global_avgpool_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                            window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs
    return x.mean(axis=_spatial_axes(x)), x.shape


def _global_avgpool_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params
                             ) -> Grads:
    shape = saved
    count = int(np.prod(shape[2:]))
    gx = np.broadcast_to((gy / count).reshape(*gy.shape, *(1,) * (len(shape) - 2)), shape)
    return [gx.copy()], {}


# --- activations ----------------------------------------------------------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    """Over axis 1: the channels of a map, the features of a flat vector."""
    e = np.exp(x - x.max(axis=1, keepdims=True))
    result: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return result


# kind -> (y = f(x), dL/dx = g(dL/dy, x, y))
ActForward = Callable[[np.ndarray, ActSpec], np.ndarray]
ActBackward = Callable[[np.ndarray, np.ndarray, np.ndarray, ActSpec], np.ndarray]

ACTIVATIONS: dict[Activation, tuple[ActForward, ActBackward]] = {
    Activation.IDENTITY: (lambda x, a: x, lambda gy, x, y, a: gy),
    Activation.RELU: (lambda x, a: np.maximum(x, 0.0),
                      lambda gy, x, y, a: gy * (x > 0)),
    Activation.RELU6: (lambda x, a: np.clip(x, 0.0, 6.0),
                       lambda gy, x, y, a: gy * ((x > 0) & (x < 6))),
    Activation.LEAKY_RELU: (lambda x, a: np.where(x > 0, x, a.slope * x),
                            lambda gy, x, y, a: gy * np.where(x > 0, 1.0, a.slope)),
    # min(x, 0) inside exp: the branch not taken must not overflow
    Activation.ELU: (lambda x, a: np.where(x > 0, x, a.alpha * np.expm1(np.minimum(x, 0.0))),
                     lambda gy, x, y, a: gy * np.where(x > 0, 1.0,
                                                       a.alpha * np.exp(np.minimum(x, 0.0)))),
    # 1/(1+e^-x) written through tanh, which never overflows
    Activation.SIGMOID: (lambda x, a: 0.5 * (1.0 + np.tanh(0.5 * x)),
                         lambda gy, x, y, a: gy * y * (1.0 - y)),
    Activation.TANH: (lambda x, a: np.tanh(x), lambda gy, x, y, a: gy * (1.0 - y * y)),
    # the Jacobian of softmax is diag(y) - y y^T
    Activation.SOFTMAX: (lambda x, a: _softmax(x),
                         lambda gy, x, y, a: y * (gy - (gy * y).sum(axis=1, keepdims=True))),
}


def activation_backward(layer: Layer, grad_output: np.ndarray, saved: Saved) -> np.ndarray:
    """d loss / d (value before the layer's activation), from d loss / d output."""
    if layer.act is None:
        return grad_output
    _, backward = ACTIVATIONS[layer.act.kind]
    return backward(grad_output, saved.pre_act, saved.output, layer.act)


def ends_in_softmax(layer: Layer) -> bool:
    """A fused act=softmax, or a softmax layer (whose act is its own ActSpec)."""
    return layer.act is not None and layer.act.kind is Activation.SOFTMAX


def _activation_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                        window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    # The op itself is the identity; its ActSpec is layer.act, applied like a fused one.
    (x,) = inputs
    return x, None


def _identity_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    return [gy], {}


# --- normalisation, dropout, reshaping ---------------------------------------------


def _batchnorm_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                       window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.BatchNormAttrs)
    (x,) = inputs
    axes = (0, *_spatial_axes(x))  # statistics per channel
    per_channel = (1, -1, *(1,) * (x.ndim - 2))
    if ctx.train:
        count = x.size // x.shape[1]
        if count < 2:
            raise ValueError(f"'{layer.name}': batch norm in training needs more than one "
                             "value per channel")
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # biased: what normalises the batch
        m = attrs.momentum
        # in place: the caller's arrays are the network's buffers (PyTorch's update)
        params["running_mean"][...] = (1 - m) * params["running_mean"] + m * mean
        params["running_var"][...] = ((1 - m) * params["running_var"]
                                      + m * var * count / (count - 1))
        params["num_batches_tracked"][...] += 1
    else:
        mean, var = params["running_mean"], params["running_var"]
    inv_std = 1.0 / np.sqrt(var + attrs.eps)
    xhat = (x - mean.reshape(per_channel)) * inv_std.reshape(per_channel)
    y = xhat
    if attrs.affine:
        y = xhat * params["weight"].reshape(per_channel) + params["bias"].reshape(per_channel)
    return y, (xhat, inv_std, ctx.train)


def _batchnorm_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    attrs = layer.attrs
    assert isinstance(attrs, ops.BatchNormAttrs)
    xhat, inv_std, train = saved
    axes = (0, *_spatial_axes(gy))
    per_channel = (1, -1, *(1,) * (gy.ndim - 2))
    grads = {}
    gxhat = gy
    if attrs.affine:
        grads = {"weight": (gy * xhat).sum(axis=axes), "bias": gy.sum(axis=axes)}
        gxhat = gy * params["weight"].reshape(per_channel)
    if not train:  # fixed statistics: a per-channel affine map
        return [gxhat * inv_std.reshape(per_channel)], grads
    # the batch statistics depend on x too: remove the gradient's mean and its xhat part
    mean_g = gxhat.mean(axis=axes, keepdims=True)
    mean_gx = (gxhat * xhat).mean(axis=axes, keepdims=True)
    return [(gxhat - mean_g - xhat * mean_gx) * inv_std.reshape(per_channel)], grads


def _dropout_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                     window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.DropoutAttrs)
    (x,) = inputs
    if not ctx.train:
        return x, None
    mask = dropout_mask(ctx.seed, ctx.step, layer.name, x.shape, attrs.p, "float64")
    return x * mask, mask


def _dropout_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    mask = saved
    return [gy if mask is None else gy * mask], {}


def _flatten_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                     window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs
    return x.reshape(x.shape[0], -1), x.shape


def _flatten_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    return [gy.reshape(saved)], {}


def _dense_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                   window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    attrs = layer.attrs
    assert isinstance(attrs, ops.DenseAttrs)
    (x,) = inputs
    y = x @ params["weight"].T
    if attrs.bias:
        y = y + params["bias"]
    return y, x


def _dense_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    attrs = layer.attrs
    assert isinstance(attrs, ops.DenseAttrs)
    x = saved
    grads = {"weight": gy.T @ x}
    if attrs.bias:
        grads["bias"] = gy.sum(axis=0)
    return [gy @ params["weight"]], grads


def _concat_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                    window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    return np.concatenate(inputs, axis=1), [x.shape[1] for x in inputs]


def _concat_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    ends = np.cumsum(saved)[:-1]
    return list(np.split(gy, ends, axis=1)), {}


def _add_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                 window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    total = inputs[0].copy()
    for x in inputs[1:]:
        total += x
    return total, len(inputs)


def _add_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    return [gy] * saved, {}


def _input_forward(layer: Layer, inputs: list[np.ndarray], params: Params,
                   window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    (x,) = inputs  # the caller passes the fed array
    return x, None


def _input_backward(layer: Layer, gy: np.ndarray, saved: Any, params: Params) -> Grads:
    return [], {}  # an input has no inputs; its gradient is grad_output itself


# --- the table ------------------------------------------------------------------------

OpForward = Callable[[Layer, list[np.ndarray], Params, "Window | None", RunContext],
                     tuple[np.ndarray, Any]]
OpBackward = Callable[[Layer, np.ndarray, Any, Params], Grads]


@dataclass(frozen=True)
class OpRule:
    """One operation without its fused activation: forward, and backward from the
    gradient of its own result (before the activation)."""

    forward: OpForward
    backward: OpBackward


OPS: dict[Op, OpRule] = {
    Op.INPUT: OpRule(_input_forward, _input_backward),
    Op.CONV: OpRule(_conv_forward, _conv_backward),
    Op.FILTER: OpRule(_filter_forward, _filter_backward),
    Op.MAXPOOL: OpRule(_maxpool_forward, _maxpool_backward),
    Op.AVGPOOL: OpRule(_avgpool_forward, _avgpool_backward),
    Op.SOFTPOOL: OpRule(_softpool_forward, _softpool_backward),
    Op.GLOBAL_MAXPOOL: OpRule(_global_maxpool_forward, _global_maxpool_backward),
    Op.GLOBAL_AVGPOOL: OpRule(_global_avgpool_forward, _global_avgpool_backward),
    Op.ACTIVATION: OpRule(_activation_forward, _identity_backward),
    Op.BATCHNORM: OpRule(_batchnorm_forward, _batchnorm_backward),
    Op.DROPOUT: OpRule(_dropout_forward, _dropout_backward),
    Op.FLATTEN: OpRule(_flatten_forward, _flatten_backward),
    Op.DENSE: OpRule(_dense_forward, _dense_backward),
    Op.CONCAT: OpRule(_concat_forward, _concat_backward),
    Op.ADD: OpRule(_add_forward, _add_backward),
}


def layer_forward(layer: Layer, inputs: list[np.ndarray], params: dict[str, np.ndarray],
                  window: Window | None, ctx: RunContext) -> tuple[np.ndarray, Any]:
    """Output (batch first) and whatever backward needs. `params` maps field names
    ('weight', 'bias', 'running_mean', ...) to arrays; batch norm in training updates the
    running statistics in place."""
    pre_act, core = OPS[layer.op].forward(layer, inputs, params, window, ctx)
    output = pre_act
    if layer.act is not None:
        forward, _ = ACTIVATIONS[layer.act.kind]
        output = forward(pre_act, layer.act)
    return output, Saved(core, pre_act, output)


def layer_backward(layer: Layer, grad_output: np.ndarray, saved: Any, params: dict[str, np.ndarray],
                   skip_act: bool = False) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Gradients for each input (same order as layer.inputs) and for each trained field.
    skip_act: grad_output is already with respect to the value before the layer's softmax
    (see losses.through_softmax); an ACTIVATION softmax layer then passes it through."""
    assert isinstance(saved, Saved)
    if skip_act:
        if not ends_in_softmax(layer):
            raise ValueError(f"skip_act: '{layer.name}' does not end in a softmax")
        grad_pre = grad_output
    else:
        grad_pre = activation_backward(layer, grad_output, saved)
    return OPS[layer.op].backward(layer, grad_pre, saved.core, params)


# --- the whole network ------------------------------------------------------------------


class ReferenceNetwork:
    """Runs a checked network forward and backward with the reference ops, keeping every
    layer's output, the loss gradients and the parameter gradients for inspection."""

    def __init__(self, network: Network, params: dict[str, np.ndarray] | None = None,
                 seed: int = 0, init: str = "pytorch") -> None:
        self.network = network
        self.seed = seed
        self._order = network.layers
        self._infos = network_params(network)
        self._fields: dict[str, list[ParamInfo]] = {}
        for info in self._infos:
            self._fields.setdefault(info.layer, []).append(info)
        given = init_params(network, seed, init) if params is None else params
        self.params: dict[str, np.ndarray] = self._checked_copy(given)
        self.grads: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        self.activations: dict[str, np.ndarray] = {}
        self._saved: dict[str, Saved] = {}
        self._loss_grads: dict[str, losses.LossValue] | None = None

    def _checked_copy(self, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {info.name: info for info in self._infos}
        missing = sorted(set(expected) - set(given))
        unknown = sorted(set(given) - set(expected))
        if missing or unknown:
            raise ValueError(f"parameters do not match the network: missing {missing}, "
                             f"unknown {unknown}")
        arrays = {}
        for name, info in expected.items():
            dtype = np.int64 if info.field == "num_batches_tracked" else np.float64
            array = np.array(given[name], dtype=dtype)  # a copy: the caller's stay untouched
            if array.shape != info.shape:
                raise ValueError(f"parameter '{name}' has shape {array.shape}, "
                                 f"expected {info.shape}")
            arrays[name] = array
        return arrays

    def _layer_params(self, layer: Layer) -> dict[str, np.ndarray]:
        return {info.field: self.params[info.name] for info in self._fields.get(layer.name, [])}

    @property
    def _main(self) -> str:
        return next(o.name for o in self.network.outputs if not o.aux)

    def _feeds(self, x: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = self.network.input_shapes
        if not isinstance(x, dict):
            if len(shapes) != 1:
                raise ValueError(f"the network has inputs {sorted(shapes)}; pass a dict by name")
            x = {next(iter(shapes)): x}
        if set(x) != set(shapes):
            raise ValueError(f"inputs given {sorted(x)}, the network has {sorted(shapes)}")
        feeds = {}
        for name, value in x.items():
            array = np.array(value, dtype=np.float64)  # a copy: activations stay as they were
            if array.shape[1:] != shapes[name]:
                raise ValueError(f"input '{name}' has shape {array.shape}, expected "
                                 f"(batch, {', '.join(map(str, shapes[name]))})")
            feeds[name] = array
        return feeds

    def forward(self, x: np.ndarray | dict[str, np.ndarray], train: bool = False,
                step: int = 0) -> np.ndarray:
        """Run every layer; return the first non-aux output."""
        feeds = self._feeds(x)
        ctx = RunContext(train=train, seed=self.seed, step=step)
        values: dict[str, np.ndarray] = {}
        self._saved = {}
        for layer in self._order:
            inputs = ([feeds[layer.name]] if layer.op is Op.INPUT
                      else [values[source] for source in layer.inputs])
            values[layer.name], self._saved[layer.name] = layer_forward(
                layer, inputs, self._layer_params(layer), self.network.windows.get(layer.name),
                ctx)
            # the shape pass and the arithmetic here are written separately: both must agree
            expected = (inputs[0].shape[0], *self.network.shapes[layer.name])
            if values[layer.name].shape != expected:
                raise RuntimeError(f"'{layer.name}' computed shape {values[layer.name].shape}, "
                                   f"but the shape pass says {expected}")
        self.activations = values
        self.outputs = {output.name: values[output.name] for output in self.network.outputs}
        self._loss_grads = None
        return self.outputs[self._main]

    def loss(self, targets: np.ndarray | dict[str, np.ndarray]) -> float:
        """The weighted sum of every output's loss; keeps the gradients for backward.

        An output ending in a softmax holds probabilities: its cross-entropy is -log p and
        its gradient is taken before the softmax (losses.py). Should that layer also feed
        other layers, backward adds their gradient, taken through the softmax, to it."""
        if not self.outputs:
            raise RuntimeError("call forward before loss")
        with_loss = [o for o in self.network.outputs if o.loss is not Loss.NONE]
        if not isinstance(targets, dict):
            if len(with_loss) != 1:
                raise ValueError(f"the network has {len(with_loss)} outputs with a loss; "
                                 "pass targets as a dict by output name")
            targets = {with_loss[0].name: targets}
        names = {o.name for o in with_loss}
        if set(targets) != names:
            raise ValueError(f"targets given for {sorted(targets)}, but the outputs with a "
                             f"loss are {sorted(names)}")
        total = 0.0
        self._loss_grads = {}
        for output in with_loss:
            value, target = self.outputs[output.name], np.asarray(targets[output.name])
            losses.check_targets(output.loss, value.shape, target, output.name)
            softmax = ends_in_softmax(self.network.graph.layer(output.name))
            result = losses.evaluate(output.loss, value, target, softmax)
            total += output.weight * result.value
            self._loss_grads[output.name] = losses.LossValue(
                result.value, output.weight * result.grad, result.through_softmax)
        return total

    def backward(self, grad: np.ndarray | dict[str, np.ndarray] | None = None
                 ) -> np.ndarray | dict[str, np.ndarray]:
        """Back-propagate; return the gradient of the input(s) and fill self.grads.

        grad None: the loss gradients of the last loss(); an array: the gradient of the
        main output; a dict: gradients of outputs by name."""
        if not self._saved:
            raise RuntimeError("call forward before backward")
        # two kinds of incoming gradient: of a layer's output, and (from a cross-entropy
        # through a softmax) of its value before the activation
        after: dict[str, np.ndarray] = {}
        before: dict[str, np.ndarray] = {}
        if grad is None:
            if self._loss_grads is None:
                raise RuntimeError("call loss before backward(), or pass a gradient")
            for name, value in self._loss_grads.items():
                (before if value.through_softmax else after)[name] = value.grad
        else:
            given = grad if isinstance(grad, dict) else {self._main: grad}
            for name, g in given.items():
                if name not in self.outputs:
                    raise ValueError(f"'{name}' is not an output of the network")
                after[name] = np.asarray(g, dtype=np.float64)
                if after[name].shape != self.outputs[name].shape:
                    raise ValueError(f"gradient for '{name}' has shape {after[name].shape}, "
                                     f"expected {self.outputs[name].shape}")

        self.grads = {info.name: np.zeros(info.shape) for info in self._infos if info.trained}
        input_grads: dict[str, np.ndarray] = {}
        for layer in reversed(self._order):
            g_after, g_before = after.pop(layer.name, None), before.pop(layer.name, None)
            if g_after is None and g_before is None:
                continue  # nothing downstream depends on this layer
            saved = self._saved[layer.name]
            params = self._layer_params(layer)
            if layer.op is Op.INPUT:
                assert g_after is not None
                input_grads[layer.name] = g_after
                continue
            if g_before is not None:
                if g_after is not None:  # also used downstream: both paths add up
                    g_before = g_before + activation_backward(layer, g_after, saved)
                input_g, param_g = layer_backward(layer, g_before, saved, params, skip_act=True)
            else:
                assert g_after is not None
                input_g, param_g = layer_backward(layer, g_after, saved, params)
            for source, g in zip(layer.inputs, input_g):
                after[source] = after[source] + g if source in after else g
            for field, g in param_g.items():
                self.grads[f"{layer.name}.{field}"] += g

        result = {name: input_grads.get(name, np.zeros_like(self.activations[name]))
                  for name in self.network.input_shapes}
        return next(iter(result.values())) if len(result) == 1 else result


__all__ = ["ACTIVATIONS", "OPS", "OpRule", "ReferenceNetwork", "RunContext", "Saved",
           "activation_backward", "ends_in_softmax", "layer_backward", "layer_forward"]
