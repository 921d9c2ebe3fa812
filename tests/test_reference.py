"""The reference interpreter (convdsl/runtime/reference.py) checked three ways:

- its gradients against central finite differences, in float64, for every op and option,
  on small random shapes and values that hypothesis draws (the "loss" is a random linear
  function of the outputs, or the network's real losses);
- its forward values against PyTorch and against small hand-computed cases;
- its bookkeeping: parameter copies, running statistics, dropout masks, errors.

Values are chosen so that finite differences are meaningful: never zeros, no ties inside a
max-pooling window, nothing within a step of a ReLU kink.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.ir.ops import Op
from convdsl.runtime.random import dropout_mask
from convdsl.runtime.reference import OPS, ReferenceNetwork, RunContext, layer_forward

FD_STEP = 1e-6
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)


# --- helpers ------------------------------------------------------------------------


def sizes(values: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(v) for v in values)


def nonzero(rng: np.random.Generator, shape: tuple[int, ...], low: float = 0.2,
            high: float = 1.5) -> np.ndarray:
    """Random values of random sign, bounded away from zero."""
    return rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape)


def distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values at least 0.15 apart, so no pooling window holds a tie."""
    count = math.prod(shape)
    values = rng.permutation(count) * 0.25 + rng.uniform(-0.05, 0.05, count)
    return (values - count * 0.125).reshape(shape)


def source(shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """An input whose next layer sees `shape`; a flat vector (inputs are maps) comes from
    flattening an F x 1 map. Returns the text and the batchless shape to feed."""
    if len(shape) == 1:
        return f"input x: {shape[0]}x1\nflat = flatten\n", (shape[0], 1)
    return f"input x: {sizes(shape)}\n", shape


def reference(text: str, rng: np.random.Generator) -> ReferenceNetwork:
    """The network with random parameters: trained ones away from zero, buffers positive."""
    network = convdsl.loads(text)
    ref = ReferenceNetwork(network)
    for name, value in ref.params.items():
        if name.endswith("running_var"):
            value[...] = rng.uniform(0.5, 2.0, value.shape)
        elif name.endswith("running_mean"):
            value[...] = rng.normal(size=value.shape)
        elif not name.endswith("num_batches_tracked"):
            value[...] = nonzero(rng, value.shape)
    return ref


def numeric_gradient(objective: Callable[[], float], array: np.ndarray) -> np.ndarray:
    """Central differences of objective() with respect to every value of `array`, which
    the objective reads (it is perturbed in place)."""
    grad = np.zeros_like(array)
    for index in np.ndindex(array.shape):
        kept = array[index]
        array[index] = kept + FD_STEP
        up = objective()
        array[index] = kept - FD_STEP
        down = objective()
        array[index] = kept
        grad[index] = (up - down) / (2 * FD_STEP)
    return grad


def check_gradients(ref: ReferenceNetwork, x: np.ndarray | dict[str, np.ndarray],
                    rng: np.random.Generator, *, train: bool = False,
                    targets: np.ndarray | dict[str, np.ndarray] | None = None) -> None:
    """backward() agrees with finite differences for every input and trained array.

    Without targets the objective is a random linear function of all outputs; with
    them, the network's own loss."""
    if targets is None:
        ref.forward(x, train=train)
        weights = {name: rng.normal(size=value.shape) for name, value in ref.outputs.items()}

        def objective() -> float:
            ref.forward(x, train=train)
            return sum(float((weights[name] * ref.outputs[name]).sum()) for name in weights)

        objective()
        grad_x = ref.backward(weights)
    else:
        fixed_targets = targets

        def objective() -> float:
            ref.forward(x, train=train)
            return ref.loss(fixed_targets)

        objective()
        grad_x = ref.backward()
    analytic = {name: g.copy() for name, g in ref.grads.items()}
    inputs = x if isinstance(x, dict) else {"": x}
    grads = grad_x if isinstance(grad_x, dict) else {"": grad_x}
    for name, array in inputs.items():
        np.testing.assert_allclose(grads[name], numeric_gradient(objective, array),
                                   rtol=1e-5, atol=1e-7, err_msg=f"input {name}")
    for name, g in analytic.items():
        np.testing.assert_allclose(g, numeric_gradient(objective, ref.params[name]),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


def torch_of(array: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(array, dtype=torch.float64, requires_grad=grad)


# --- the table -----------------------------------------------------------------------


def test_every_op_has_a_rule() -> None:
    assert set(OPS) == set(Op)


# --- convolution -----------------------------------------------------------------------


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[str, tuple[int, ...], dict[str, object]]:
    """A conv layer with random options, and its input shape (batch first)."""
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    big = 3 if dims < 3 else 2
    window = [draw(st.integers(1, big)) for _ in range(dims)]
    stride = [draw(st.integers(1, 2)) for _ in range(dims)]
    dilation = [draw(st.integers(1, 2)) for _ in range(dims)]
    spatial = [d * (k - 1) + 1 + draw(st.integers(0, 2)) for k, d in zip(window, dilation)]
    pad = draw(st.sampled_from(["valid", "same", "full", "number", "sizes", "sides"]))
    if pad == "number":
        pad = str(draw(st.integers(0, 2)))
    elif pad == "sizes":
        pad = sizes([draw(st.integers(0, 2)) for _ in range(dims)]) if dims > 1 else "1"
    elif pad == "sides":
        pad = "[" + " ".join(str(draw(st.integers(0, 2))) for _ in range(2 * dims)) + "]"
    options = {
        "stride": sizes(stride), "dilation": sizes(dilation), "pad": pad, "groups": groups,
        "bias": draw(st.sampled_from(["yes", "no"])),
        "mode": draw(st.sampled_from(["correlation", "convolution"])),
        "act": draw(st.sampled_from(["none", "tanh", "sigmoid", "elu", "softmax"])),
    }
    written = ", ".join(f"{key}={value}" for key, value in options.items())
    text = (f"input x: {sizes([c_in, *spatial])}\n"
            f"y = conv({c_out}, {sizes(window)}, {written})\noutput y loss=none\n")
    batch = draw(st.integers(1, 2))
    return text, (batch, c_in, *spatial), {**options, "window": window}


@SETTINGS
@given(conv_cases(), seeds)
def test_conv_gradients(case: tuple[str, tuple[int, ...], dict[str, object]],
                        seed: int) -> None:
    text, shape, _ = case
    rng = np.random.default_rng(seed)
    check_gradients(reference(text, rng), rng.normal(size=shape), rng)


def _torch_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                pads: tuple[tuple[int, int], ...], stride: tuple[int, ...],
                dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    flat_pads = [p for pair in reversed(pads) for p in pair]  # F.pad wants last axis first
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(stride)]
    result: torch.Tensor = conv(F.pad(x, flat_pads), w, b, stride=stride, dilation=dilation,
                                groups=groups)
    return result


@SETTINGS
@given(conv_cases(), seeds)
def test_conv_matches_torch(case: tuple[str, tuple[int, ...], dict[str, object]],
                            seed: int) -> None:
    """Values and gradients, with the padding resolved by the shape pass."""
    text, shape, options = case
    rng = np.random.default_rng(seed)
    ref = reference(text, rng)
    window = ref.network.windows["y"]
    x = rng.normal(size=shape)
    y = ref.forward(x)
    r = rng.normal(size=y.shape)
    gx = ref.backward(r)

    tx, tw = torch_of(x, True), torch_of(ref.params["y.weight"], True)
    tb = torch_of(ref.params["y.bias"], True) if options["bias"] == "yes" else None
    kernel = tw.flip(list(range(2, tw.dim()))) if options["mode"] == "convolution" else tw
    z = _torch_conv(tx, kernel, tb, window.pads, window.stride, window.dilation,
                    int(str(options["groups"])))
    act = str(options["act"])
    ty = {"none": z, "tanh": torch.tanh(z), "sigmoid": torch.sigmoid(z), "elu": F.elu(z),
          "softmax": torch.softmax(z, dim=1)}[act]
    (ty * torch_of(r)).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ref.grads["y.weight"], tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    if tb is not None:
        np.testing.assert_allclose(ref.grads["y.bias"], tb.grad.numpy(), rtol=1e-10,
                                   atol=1e-12)


def test_conv_by_hand() -> None:
    """A 1-D correlation and a convolution of one signal, written out."""
    x = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    for mode, expected in (("correlation", [1 * 1 + 2 * 2 - 3, 2 + 6 - 4]),
                           ("convolution", [-1 + 4 + 3, -2 + 6 + 4])):
        network = convdsl.loads(f"input 1x4\ny = conv(1, 3, mode={mode}, bias=no)\noutput y")
        ref = ReferenceNetwork(network, {"y.weight": np.array([[[1.0, 2.0, -1.0]]])})
        np.testing.assert_allclose(ref.forward(x)[0, 0], expected)


# --- fixed filters -----------------------------------------------------------------------


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.sampled_from(["correlation", "convolution"]),
       st.sampled_from(["valid", "same", "full", "1"]), st.integers(1, 2), st.integers(1, 2),
       seeds)
def test_filter_gradients_and_values(dims: int, channels: int, mode: str, pad: str,
                                     stride: int, dilation: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    window = [int(k) for k in rng.integers(1, 4, dims)]
    kernel = nonzero(rng, tuple(window))
    spatial = [dilation * (k - 1) + 1 + int(rng.integers(0, 3)) for k in window]
    listed = "[" + " ".join(f"{v:.17g}" for v in kernel.ravel()) + "]"
    text = (f"input x: {sizes([channels, *spatial])}\n"
            f"y = filter({sizes(window)}, kernel={listed}, mode={mode}, pad={pad}, "
            f"stride={stride}, dilation={dilation}, act=tanh)\noutput y loss=none\n")
    ref = reference(text, rng)
    assert not ref.params  # nothing to train
    x = rng.normal(size=(2, channels, *spatial))
    check_gradients(ref, x, rng)

    # the same kernel on every channel: a depthwise torch convolution
    win = ref.network.windows["y"]
    w = torch_of(np.broadcast_to(kernel, (channels, 1, *window)).copy())
    if mode == "convolution":
        w = w.flip(list(range(2, w.dim())))
    expected = torch.tanh(_torch_conv(torch_of(x), w, None, win.pads, win.stride,
                                      win.dilation, channels))
    np.testing.assert_allclose(ref.forward(x), expected.numpy(), rtol=1e-12, atol=1e-12)


# --- pooling -----------------------------------------------------------------------------


@st.composite
def pool_cases(draw: st.DrawFn, kind: str) -> tuple[str, tuple[int, ...], dict[str, object]]:
    dims = draw(st.integers(1, 3))
    big = 3 if dims < 3 else 2
    window = [draw(st.integers(1, big)) for _ in range(dims)]
    stride = [draw(st.integers(1, 3)) for _ in range(dims)]
    dilation = ([draw(st.integers(1, 2)) for _ in range(dims)] if kind == "maxpool"
                else [1] * dims)
    pad = [draw(st.integers(0, k // 2)) for k in window]
    spatial = [d * (k - 1) + 1 + draw(st.integers(0, 3)) for k, d in zip(window, dilation)]
    options: dict[str, object] = {"stride": sizes(stride), "pad": sizes(pad),
                                  "round": draw(st.sampled_from(["floor", "ceil"]))}
    if kind == "maxpool":
        options["dilation"] = sizes(dilation)
    if kind == "avgpool":
        options["count_pad"] = draw(st.sampled_from(["yes", "no"]))
    written = ", ".join(f"{key}={value}" for key, value in options.items())
    channels = draw(st.integers(1, 2))
    text = (f"input x: {sizes([channels, *spatial])}\n"
            f"y = {kind}({sizes(window)}, {written})\noutput y loss=none\n")
    return text, (draw(st.integers(1, 2)), channels, *spatial), {
        **options, "window": window, "dilation": dilation, "pad": pad, "stride": stride}


@SETTINGS
@given(st.sampled_from(["maxpool", "avgpool", "softpool"]).flatmap(
    lambda kind: st.tuples(st.just(kind), pool_cases(kind))), seeds)
def test_pool_gradients(kind_case: tuple[str, tuple[str, tuple[int, ...], dict[str, object]]],
                        seed: int) -> None:
    _, (text, shape, _) = kind_case
    rng = np.random.default_rng(seed)
    ref = reference(text, rng)
    x = distinct(rng, shape)
    assume(np.isfinite(ref.forward(x)).all())  # a dilated window may see only padding
    check_gradients(ref, x, rng)


@SETTINGS
@given(st.sampled_from(["maxpool", "avgpool"]).flatmap(
    lambda kind: st.tuples(st.just(kind), pool_cases(kind))), seeds)
def test_pool_matches_torch(kind_case: tuple[str, tuple[str, tuple[int, ...], dict[str, object]]],
                            seed: int) -> None:
    """PyTorch's rules for ceil mode, padding, dilation and count_include_pad."""
    kind, (text, shape, options) = kind_case
    rng = np.random.default_rng(seed)
    ref = reference(text, rng)
    x = distinct(rng, shape)
    y = ref.forward(x)
    assume(np.isfinite(y).all())
    r = rng.normal(size=y.shape)
    gx = ref.backward(r)
    tx = torch_of(x, True)
    dims = len(shape) - 2
    common = {"kernel_size": options["window"], "stride": options["stride"],
              "padding": options["pad"], "ceil_mode": options["round"] == "ceil"}
    if kind == "maxpool":
        pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        ty = pool(tx, dilation=options["dilation"], **common)
    else:
        pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        ty = pool(tx, count_include_pad=options["count_pad"] == "yes", **common)
    (ty * torch_of(r)).sum().backward()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def _pool_once(text: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = ReferenceNetwork(convdsl.loads(text))
    y = ref.forward(x)
    grad = ref.backward(np.ones_like(y))
    assert isinstance(grad, np.ndarray)
    return y, grad


def test_max_pool_ties_go_to_the_first_position() -> None:
    y, grad = _pool_once("input 1x4\ny = maxpool(2)\noutput y", np.array([[[1.0, 1, 0, 2]]]))
    np.testing.assert_array_equal(y, [[[1, 2]]])
    np.testing.assert_array_equal(grad, [[[1, 0, 0, 1]]])
    # in row-major window order: the top-left of an all-equal 2x2 window
    y, grad = _pool_once("input 1x2x2\ny = maxpool(2)\noutput y", np.full((1, 1, 2, 2), 5.0))
    np.testing.assert_array_equal(grad, [[[[1, 0], [0, 0]]]])
    y, grad = _pool_once("input 1x3\ny = global_maxpool\noutput y",
                         np.array([[[3.0, 7, 7]]]))
    np.testing.assert_array_equal(grad, [[[0, 1, 0]]])


def test_soft_pool_by_hand() -> None:
    e = math.e
    y, _ = _pool_once("input 1x4\ny = softpool(2)\noutput y", np.array([[[1.0, 2, 3, 0]]]))
    np.testing.assert_allclose(y[0, 0], [(e * 1 + e**2 * 2) / (e + e**2),
                                         (e**3 * 3 + 0) / (e**3 + 1)])
    # the padded position takes no part: the first window is the first value alone
    y, _ = _pool_once("input 1x3\ny = softpool(3, stride=1, pad=1)\noutput y",
                      np.array([[[1.0, 2, 3]]]))
    weights = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
    np.testing.assert_allclose(y[0, 0, 0], weights @ [1.0, 2.0])
    # past the end in ceil mode too: the last window holds only the last value
    y, _ = _pool_once("input 1x3\ny = softpool(2, round=ceil)\noutput y",
                      np.array([[[1.0, 2, 3]]]))
    np.testing.assert_allclose(y[0, 0, 1], 3.0)


def test_ceil_mode_drops_a_window_starting_in_the_padding() -> None:
    """docs/language.md: n=5, k=2, s=2, p=1 has windows at padded 0, 2, 4; the one at 6
    would start in the right padding."""
    x = np.array([[[1.0, 5, 2, 4, 3]]])
    y, grad = _pool_once("input 1x5\ny = maxpool(2, pad=1, round=ceil)\noutput y", x)
    np.testing.assert_array_equal(y, [[[1, 5, 4]]])
    np.testing.assert_array_equal(grad, [[[1, 1, 0, 1, 0]]])
    y, _ = _pool_once("input 1x5\ny = maxpool(2, round=ceil)\noutput y", x)
    np.testing.assert_array_equal(y, [[[5, 4, 3]]])  # the last window holds one value


def test_avg_pool_divisor_by_hand() -> None:
    """n=5, k=3, s=2, p=1, ceil: windows [-1,2) [1,4) [3,6): the last runs past the
    padded end (5+1) by nothing, but past the input by one."""
    x = np.array([[[1.0, 2, 3, 4, 5]]])
    y, _ = _pool_once("input 1x5\ny = avgpool(3, stride=2, pad=1, round=ceil)\noutput y", x)
    np.testing.assert_allclose(y[0, 0], [(0 + 1 + 2) / 3, (2 + 3 + 4) / 3, (4 + 5 + 0) / 3])
    y, _ = _pool_once("input 1x5\ny = avgpool(3, stride=2, pad=1, round=ceil, count_pad=no)"
                      "\noutput y", x)
    np.testing.assert_allclose(y[0, 0], [(1 + 2) / 2, (2 + 3 + 4) / 3, (4 + 5) / 2])


@SETTINGS
@given(st.integers(1, 3), st.sampled_from(["global_maxpool", "global_avgpool"]), seeds)
def test_global_pool_gradients_and_values(dims: int, kind: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    spatial = [int(n) for n in rng.integers(1, 4, dims)]
    text = f"input x: {sizes([2, *spatial])}\ny = {kind}\noutput y loss=none\n"
    ref = reference(text, rng)
    x = distinct(rng, (2, 2, *spatial))
    check_gradients(ref, x, rng)
    axes = tuple(range(2, 2 + dims))
    expected = x.max(axis=axes) if kind == "global_maxpool" else x.mean(axis=axes)
    np.testing.assert_allclose(ref.forward(x), expected, rtol=1e-14)


# --- activations --------------------------------------------------------------------------

ACTIVATIONS = {
    "identity": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu(0.2)": lambda t: F.leaky_relu(t, 0.2),
    "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
    "elu(0.7)": lambda t: F.elu(t, 0.7),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softmax": lambda t: torch.softmax(t, dim=1),
}


def away_from_kinks(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values in [-8, 8], at least 0.05 away from 0 and 6 (the kinks of relu and relu6)."""
    x = nonzero(rng, shape, low=0.05, high=8.0)
    return np.where(np.abs(x - 6) < 0.05, x + 0.1, x)


@SETTINGS
@given(st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from([(3,), (2, 3), (2, 2, 2)]),
       seeds)
def test_activation_gradients_and_values(name: str, shape: tuple[int, ...], seed: int) -> None:
    """On flat vectors and maps (softmax runs over channels, axis 1)."""
    rng = np.random.default_rng(seed)
    head, fed = source(shape)
    ref = reference(f"{head}y = {name}\noutput y loss=none\n", rng)
    x = away_from_kinks(rng, (2, *fed))
    check_gradients(ref, x, rng)
    expected = ACTIVATIONS[name](torch_of(x.reshape(2, *shape))).numpy()
    np.testing.assert_allclose(ref.forward(x), expected, rtol=1e-13, atol=1e-15)


def test_activations_at_the_kinks() -> None:
    """The contract's one-sided choices: relu's gradient is 0 at 0, relu6's 0 at 0 and 6."""
    x = np.array([[[0.0], [6.0], [-1.0], [3.0]]])
    for name, expected in (("relu", [0, 1, 0, 1]), ("relu6", [0, 0, 0, 1]),
                           ("leaky_relu(0.5)", [0.5, 1, 0.5, 1])):
        ref = ReferenceNetwork(convdsl.loads(f"input 4x1\ny = {name}\noutput y"))
        ref.forward(x)
        grad = ref.backward(np.ones((1, 4, 1)))
        np.testing.assert_array_equal(grad, np.reshape(expected, (1, 4, 1)))


def test_sigmoid_and_elu_do_not_overflow() -> None:
    x = np.array([[[-1000.0, 1000.0]]])
    for name in ("sigmoid", "elu"):
        ref = ReferenceNetwork(convdsl.loads(f"input 1x2\ny = {name}\noutput y"))
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y = ref.forward(x)
            ref.backward(np.ones((1, 1, 2)))
        assert np.isfinite(y).all()


# --- batch norm -----------------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from([(3,), (2, 3), (2, 2, 2), (1, 2, 2, 2)]), st.booleans(),
       st.booleans(), st.sampled_from(["none", "tanh"]), seeds)
def test_batchnorm_gradients(shape: tuple[int, ...], train: bool, affine: bool, act: str,
                             seed: int) -> None:
    rng = np.random.default_rng(seed)
    head, fed = source(shape)
    text = (f"{head}"
            f"y = bn(eps=0.01, momentum=0.3, affine={'yes' if affine else 'no'}, act={act})\n"
            "output y loss=none\n")
    ref = reference(text, rng)
    check_gradients(ref, rng.normal(size=(3, *fed)), rng, train=train)


@SETTINGS
@given(st.sampled_from([(3,), (2, 4), (2, 2, 3)]), seeds)
def test_batchnorm_matches_torch_and_updates_running_statistics(shape: tuple[int, ...],
                                                                seed: int) -> None:
    rng = np.random.default_rng(seed)
    head, fed = source(shape)
    ref = reference(f"{head}y = bn(momentum=0.2)\noutput y loss=none\n", rng)
    x = rng.normal(size=(4, *fed)).reshape(4, *shape)  # what bn sees
    mean0, var0 = ref.params["y.running_mean"].copy(), ref.params["y.running_var"].copy()
    running = ref.params["y.running_mean"]  # updated in place

    y = ref.forward(x.reshape(4, *fed), train=True)
    axes = (0, *range(2, x.ndim))
    count = x.size // x.shape[1]
    np.testing.assert_allclose(ref.params["y.running_mean"], 0.8 * mean0 + 0.2 * x.mean(axes))
    np.testing.assert_allclose(ref.params["y.running_var"],
                               0.8 * var0 + 0.2 * x.var(axes) * count / (count - 1))
    assert ref.params["y.num_batches_tracked"] == 1
    assert ref.params["y.running_mean"] is running

    t_mean, t_var = torch_of(mean0), torch_of(var0)
    tw, tb = torch_of(ref.params["y.weight"]), torch_of(ref.params["y.bias"])
    expected = F.batch_norm(torch_of(x), t_mean, t_var, tw, tb, training=True, momentum=0.2)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.params["y.running_mean"], t_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(ref.params["y.running_var"], t_var.numpy(), rtol=1e-12)

    # inference: the running statistics, unchanged by the pass
    y = ref.forward(x.reshape(4, *fed))
    expected = F.batch_norm(torch_of(x), t_mean, t_var, tw, tb, training=False)
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-12, atol=1e-12)
    assert ref.params["y.num_batches_tracked"] == 1


def test_batchnorm_training_needs_two_values_per_channel() -> None:
    ref = ReferenceNetwork(convdsl.loads("input 3x1\ny = flatten -> bn\noutput y"))
    with pytest.raises(ValueError, match="more than one value"):
        ref.forward(np.ones((1, 3, 1)), train=True)


# --- dropout ---------------------------------------------------------------------------------


@SETTINGS
@given(st.floats(0.1, 0.9), st.integers(0, 5), seeds)
def test_dropout_is_seeded_and_differentiable(p: float, step: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    text = f"input x: 2x5\nd = dropout({p})\ny = flatten -> dense(3)\noutput y loss=none\n"
    network = convdsl.loads(text)
    ref = reference(text, rng)
    x = nonzero(rng, (3, 2, 5))
    ref.forward(x, train=True, step=step)
    mask = dropout_mask(ref.seed, step, "d", x.shape, p)
    np.testing.assert_array_equal(ref.activations["d"], x * mask)
    ref.forward(x)
    np.testing.assert_array_equal(ref.activations["d"], x)  # inference: the identity

    def objective() -> float:
        return float(ref.forward(x, train=True, step=step).sum())

    objective()
    grad = ref.backward(np.ones((3, 3)))
    np.testing.assert_allclose(grad, numeric_gradient(objective, x), rtol=1e-5, atol=1e-7)
    # layer_forward itself, outside a network, draws the same mask
    layer = network.graph.layer("d")
    y, _ = layer_forward(layer, [x], {}, None, RunContext(train=True, seed=ref.seed, step=step))
    np.testing.assert_array_equal(y, x * mask)


# --- dense, flatten, concat, add, several inputs and outputs ------------------------------------


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), seeds)
def test_merges_dense_and_flatten_gradients(c_a: int, c_b: int, size: int, units: int,
                                            seed: int) -> None:
    rng = np.random.default_rng(seed)
    text = f"""\
input a: {c_a}x{size}x2
input b: {c_b}x{size}x2
ca = a -> conv({c_b}, 1, act=tanh)
joined = concat(ca, b, a, act=sigmoid)
summed = add(ca, b, ca, act=tanh)
flat_j = joined -> flatten
flat_s = summed -> flatten
both = concat(flat_j, flat_s)
d = dense({units}, act=elu)
side = summed -> global_avgpool -> dense(2, bias=no)
output d loss=none
aux side loss=none
"""
    ref = reference(text, rng)
    x = {"a": rng.normal(size=(2, c_a, size, 2)), "b": rng.normal(size=(2, c_b, size, 2))}
    check_gradients(ref, x, rng)


def test_dense_flatten_concat_add_values() -> None:
    text = """\
input a: 2x1x2
input b: 1x1x2
j = concat(a, b)
s = add(b, b)
f = j -> flatten
d = dense(2)
output d loss=none
aux s loss=none
"""
    params = {"d.weight": np.arange(12.0).reshape(2, 6), "d.bias": np.array([1.0, -1.0])}
    ref = ReferenceNetwork(convdsl.loads(text), params)
    a, b = np.array([[[[1.0, 2.0]], [[3.0, 4.0]]]]), np.array([[[[5.0, 6.0]]]])
    y = ref.forward({"a": a, "b": b})
    features = np.array([1.0, 2, 3, 4, 5, 6])  # C order: channel, then position
    np.testing.assert_allclose(ref.activations["f"][0], features)
    np.testing.assert_allclose(y[0], params["d.weight"] @ features + params["d.bias"])
    np.testing.assert_allclose(ref.outputs["s"], 2 * b)


# --- losses ----------------------------------------------------------------------------------

LOSS_NETWORK = """\
input x: 2x3
stem = conv(3, 2, act=tanh)
logits = stem -> flatten -> dense(4)
probs = stem -> flatten -> dense(3, act=softmax)
later = stem -> flatten -> dense(3)
p2 = later -> softmax
positions = stem -> conv(3, 1)
side = stem -> global_avgpool -> dense(2)
output logits loss=cross_entropy
aux probs loss=cross_entropy weight=0.7
aux p2 loss=cross_entropy weight=1.5
aux positions loss=cross_entropy weight=0.2
aux side loss=mse weight=0.3
"""


def _loss_targets(rng: np.random.Generator, batch: int) -> dict[str, np.ndarray]:
    return {"logits.1": rng.integers(0, 4, batch), "probs.1": rng.integers(0, 3, batch),
            "p2": rng.integers(0, 3, batch), "positions": rng.integers(0, 3, (batch, 2)),
            "side.1": rng.normal(size=(batch, 2))}


@SETTINGS
@given(seeds)
def test_loss_gradients_through_softmax_and_aux_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ref = reference(LOSS_NETWORK, rng)
    names = {o.name for o in ref.network.outputs}
    targets = _loss_targets(rng, 3)
    assert set(targets) == names
    check_gradients(ref, rng.normal(size=(3, 2, 3)), rng, targets=targets)


def test_loss_values_match_torch() -> None:
    rng = np.random.default_rng(7)
    ref = reference(LOSS_NETWORK, rng)
    ref.forward(rng.normal(size=(3, 2, 3)))
    targets = _loss_targets(rng, 3)
    out = {name: torch_of(value) for name, value in ref.outputs.items()}
    t = {name: torch.tensor(value) for name, value in targets.items()}
    expected = (F.cross_entropy(out["logits.1"], t["logits.1"])
                + 0.7 * F.nll_loss(out["probs.1"].log(), t["probs.1"])
                + 1.5 * F.nll_loss(out["p2"].log(), t["p2"])
                + 0.2 * F.cross_entropy(out["positions"], t["positions"])
                + 0.3 * F.mse_loss(out["side.1"], t["side.1"]))
    assert ref.loss(targets) == pytest.approx(float(expected), rel=1e-12)


@SETTINGS
@given(seeds)
def test_softmax_output_that_also_feeds_a_layer(seed: int) -> None:
    """The loss gradient (before the softmax) and the consumer's (after it) add up."""
    rng = np.random.default_rng(seed)
    text = """\
input 4x1
probs = flatten -> dense(3, act=softmax)
more = probs -> dense(2)
output more loss=mse
aux probs loss=cross_entropy weight=0.5
"""
    ref = reference(text, rng)
    targets = {"more": rng.normal(size=(2, 2)), "probs.1": rng.integers(0, 3, 2)}
    check_gradients(ref, rng.normal(size=(2, 4, 1)), rng, targets=targets)


def test_loss_targets_must_name_the_outputs() -> None:
    ref = ReferenceNetwork(convdsl.loads(LOSS_NETWORK))
    ref.forward(np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match="dict by output name"):
        ref.loss(np.zeros(1, dtype=int))
    with pytest.raises(ValueError, match="targets given"):
        ref.loss({"logits.1": np.zeros(1, dtype=int)})
    single = ReferenceNetwork(convdsl.loads("input 3x1\ny = flatten -> dense(2)\noutput y"))
    single.forward(np.ones((2, 3, 1)))
    assert single.loss(np.array([0, 1])) > 0
    single.backward()
    assert set(single.grads) == {"y.1.weight", "y.1.bias"}


# --- bookkeeping ------------------------------------------------------------------------------


def test_params_are_float64_copies() -> None:
    network = convdsl.loads("input 2x4\nc = conv(2, 3)\nn = bn\nf = flatten\ny = dense(2)\n"
                            "output y")
    mine = {name: value.astype(np.float32) for name, value in
            ReferenceNetwork(network).params.items() if "num_batches" not in name}
    mine["n.num_batches_tracked"] = np.array(3)
    ref = ReferenceNetwork(network, mine)
    assert all(value.dtype == np.float64 for name, value in ref.params.items()
               if "num_batches" not in name)
    assert ref.params["n.num_batches_tracked"].dtype == np.int64
    ref.forward(np.ones((2, 2, 4)), train=True)
    assert mine["n.num_batches_tracked"] == 3  # the caller's arrays are untouched
    with pytest.raises(ValueError, match="missing"):
        ReferenceNetwork(network, {"c.weight": mine["c.weight"]})
    with pytest.raises(ValueError, match="shape"):
        ReferenceNetwork(network, {**mine, "y.bias": np.zeros(3)})


def test_default_params_are_seeded() -> None:
    network = convdsl.loads("input 2x4\nc = conv(2, 3)\noutput c")
    a, b = ReferenceNetwork(network, seed=1), ReferenceNetwork(network, seed=1)
    np.testing.assert_array_equal(a.params["c.weight"], b.params["c.weight"])
    assert not np.array_equal(a.params["c.weight"],
                              ReferenceNetwork(network, seed=2).params["c.weight"])


def test_unreached_parameters_get_zero_gradients() -> None:
    text = ("input 3x1\nflat = flatten\nmain = dense(2)\nside = flat -> dense(2)\n"
            "output main\naux side loss=none\n")
    ref = ReferenceNetwork(convdsl.loads(text))
    ref.forward(np.ones((1, 3, 1)))
    ref.backward(np.ones((1, 2)))
    np.testing.assert_array_equal(ref.grads["side.weight"], 0)
    assert np.abs(ref.grads["main.weight"]).sum() > 0


def test_forward_checks_its_input() -> None:
    ref = ReferenceNetwork(convdsl.loads("input 2x4\nc = conv(2, 3)\noutput c"))
    with pytest.raises(ValueError, match="expected"):
        ref.forward(np.ones((1, 2, 5)))
    with pytest.raises(RuntimeError, match="forward"):
        ref.backward()
