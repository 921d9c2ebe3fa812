"""The CUDA kernels of every op but conv and dense, against the NumPy reference.

Pooling, activations, dropout, batch norm, concat and add run through
tests/kernel_harness.py on the device (forward, backward from a random output gradient,
parameter gradients, batch norm's running statistics); the device losses against
runtime/losses.py. The CUDA simulator runs a few thousand threads per second, so the
shapes are tiny and the cases few, picked to cover every option once rather than drawn.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from kernel_harness import TOLERANCES, assert_close, check_layer, random_array
from random_layers import POOL_KINDS, NumpyPicker, pool_layer

import convdsl
from convdsl.codegen.layer import Mode, build_layer, layer_setups
from convdsl.ir.ops import Loss
from convdsl.runtime import losses, reference
from convdsl.runtime.random import dropout_mask

pytestmark = pytest.mark.cuda


def sizes(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def network(shape: tuple[int, ...], layer: str) -> str:
    """input x -> (flatten, for a flat shape) -> layer `y`."""
    if len(shape) > 1:
        return f"input x: {sizes(shape)}\ny = {layer}\noutput y"
    return f"input x: {shape[0]}x1\nf = flatten\ny = f -> {layer}\noutput y"


def device(array: np.ndarray) -> Any:
    from convdsl.codegen.cuda import arrays

    return arrays.to_device(array)


def host(array: Any) -> np.ndarray:
    result: np.ndarray = array.copy_to_host() if hasattr(array, "copy_to_host") else array
    return result


# --- pooling ------------------------------------------------------------------------------

POOLS = [
    ((2, 6, 7), "maxpool(3x2, stride=2x1, pad=1x1, dilation=1x2, round=ceil)", "float32"),
    ((3, 9), "maxpool(3, stride=2, pad=1, dilation=2, round=ceil)", "float64"),
    ((2, 4, 3, 4), "maxpool(2, stride=1, pad=1)", "float32"),
    ((2, 6, 7), "avgpool(3, stride=2, pad=1, round=ceil, count_pad=yes)", "float32"),
    ((2, 6, 7), "avgpool(3x2, stride=2, pad=1x1, round=ceil, count_pad=no)", "float64"),
    ((3, 9), "avgpool(3, stride=3, pad=1, round=ceil, count_pad=no)", "float32"),
    ((2, 4, 3, 4), "avgpool(2x3x2, stride=2x1x2, pad=1x1x0, count_pad=yes)", "float64"),
    ((2, 6, 7), "softpool(3x2, stride=2, pad=1x1, round=ceil)", "float32"),
    ((3, 9), "softpool(3, stride=1, pad=1)", "float64"),
    ((2, 4, 3, 4), "softpool(2, stride=2, round=ceil)", "float32"),
]


@pytest.mark.parametrize(("shape", "layer", "dtype"), POOLS)
def test_pool(shape: tuple[int, ...], layer: str, dtype: str) -> None:
    check_layer(network(shape, layer), "y", dtype=dtype, seed=len(layer), device="cuda")


@pytest.mark.parametrize("kind", POOL_KINDS)
@pytest.mark.parametrize("seed", [1, 2, 3])  # seed 0 draws windows of 1
def test_random_pool(kind: str, seed: int) -> None:
    """Pooling layers drawn at random (tests/random_layers.py): rank, sizes, window,
    stride, padding, dilation, rounding and count_pad together."""
    shape, layer, dtype = pool_layer(NumpyPicker(np.random.default_rng(seed)), kind)
    check_layer(network(shape, layer), "y", batch=1 + seed % 3, dtype=dtype, seed=seed,
                train=seed % 2 == 1, device="cuda")


@pytest.mark.parametrize("kind", ["global_maxpool", "global_avgpool"])
@pytest.mark.parametrize(("shape", "dtype"), [((3, 9), "float32"), ((2, 4, 3), "float64"),
                                              ((2, 3, 2, 3), "float32")])
def test_global_pool(kind: str, shape: tuple[int, ...], dtype: str) -> None:
    check_layer(network(shape, kind), "y", batch=3, dtype=dtype, device="cuda")


def test_maxpool_ties_go_to_the_first_maximum() -> None:
    """Whole numbers make ties everywhere: each window's gradient goes to its first
    maximum in row-major window order, overlapping windows adding up."""
    rng = np.random.default_rng(7)
    for text in ("input x: 2x6x7\ny = maxpool(3, stride=2, pad=1, round=ceil)\noutput y",
                 "input x: 3x8\ny = maxpool(3, stride=1, dilation=2)\noutput y",
                 "input x: 2x3x3\ny = global_maxpool\noutput y"):
        shape = (2, *convdsl.loads(text).input_shape)
        values = rng.integers(1, 4, shape).astype(np.float64)  # 1, 2 or 3: no zeros
        check_layer(text, "y", dtype="float64", inputs=[values], device="cuda")


def test_pool_over_many_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of one warp: the element index crosses block boundaries."""
    from convdsl.codegen.cuda import common

    monkeypatch.setattr(common, "THREADS", 32)
    check_layer(network((2, 6, 7), "maxpool(2, stride=1)"), "y", dtype="float64",
                device="cuda")
    check_layer(network((2, 6, 7), "avgpool(3, stride=2, pad=1)"), "y", dtype="float64",
                device="cuda")


# --- activations and dropout --------------------------------------------------------------

ACTIVATIONS = [
    ("identity", (3, 5), "float32"), ("relu", (3, 5), "float64"),
    ("relu6", (3, 5), "float32"), ("leaky_relu(0.2)", (6,), "float64"),
    ("elu(0.5)", (2, 3, 4), "float32"), ("sigmoid", (6,), "float32"),
    ("tanh", (2, 3, 4), "float64"), ("softmax", (2, 3, 4), "float32"),
    ("softmax", (6,), "float64"),
]


@pytest.mark.parametrize(("act", "shape", "dtype"), ACTIVATIONS)
def test_activation(act: str, shape: tuple[int, ...], dtype: str) -> None:
    check_layer(network(shape, act), "y", dtype=dtype, device="cuda")


def test_relu6_clips_above_six() -> None:
    rng = np.random.default_rng(13)
    check_layer("input x: 3x5\ny = x -> relu6\noutput y", "y", dtype="float64",
                inputs=[random_array(rng, (2, 3, 5)) * 6], device="cuda")


@pytest.mark.parametrize(("p", "shape", "dtype"), [(0.0, (7,), "float32"),
                                                   (0.5, (3, 5), "float64"),
                                                   (0.9, (2, 3, 4), "float32")])
@pytest.mark.parametrize("train", [False, True])
def test_dropout(p: float, shape: tuple[int, ...], dtype: str, train: bool) -> None:
    text = network(shape, f"dropout({p})")
    kernel = check_layer(text, "y", dtype=dtype, train=train, seed=3, device="cuda")
    x = random_array(np.random.default_rng(3), kernel.setup.batched_inputs[0]).astype(dtype)
    on_device = device(x)
    y = kernel.forward([on_device], {}, Mode(train=train, seed=3, step=5))
    if not train:
        assert y is on_device  # the identity, no copy
        return
    mask = dropout_mask(3, 5, "y", x.shape, p, dtype)
    assert np.array_equal(host(y), x * mask)  # the CPU's mask, drawn on the host


# --- batch norm ---------------------------------------------------------------------------

BATCHNORMS = [
    ((5,), "affine=yes, act=softmax", True, "float32"),
    ((3, 7), "affine=no, act=sigmoid", True, "float64"),
    ((2, 4, 3), "affine=yes, act=softmax", False, "float32"),
    ((2, 3, 2, 3), "affine=yes, act=relu", True, "float32"),
    ((3, 2, 2), "affine=no, act=identity", False, "float64"),
]


@pytest.mark.parametrize(("shape", "options", "train", "dtype"), BATCHNORMS)
def test_batchnorm(shape: tuple[int, ...], options: str, train: bool, dtype: str) -> None:
    layer = f"bn(momentum=0.3, eps=1e-3, {options})"
    check_layer(network(shape, layer), "y", batch=3, dtype=dtype, train=train,
                device="cuda")


def test_batchnorm_threads_loop_over_many_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 4 threads: each thread sums several values before the tree."""
    from convdsl.codegen.cuda import norm

    monkeypatch.setattr(norm, "CHANNEL_THREADS", 4)
    for train in (True, False):
        kernel = check_layer(network((2, 7), "bn(act=tanh)"), "y", batch=2,
                             dtype="float64", train=train, device="cuda")
        assert getattr(kernel, "threads", None) == 4


SPLIT_BATCHNORMS = [
    ((3, 4, 5), "affine=yes, act=relu", True, 4, "float64"),
    ((3, 4, 5), "affine=yes, act=relu", True, 4, "float32"),
    ((3, 4, 5), "affine=no, act=identity", True, 4, "float64"),
    ((3, 20), "affine=yes, act=tanh", False, 4, "float64"),
    ((6,), "affine=yes, act=sigmoid", True, 24, "float64"),  # flat: one position a channel
]


def share_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 4 threads, 3 values each at least, and up to 16 blocks per layer: tiny
    channels shared by several blocks, as ResNet's first layers are on a GPU."""
    from convdsl.codegen.cuda import norm

    monkeypatch.setattr(norm, "CHANNEL_THREADS", 4)
    monkeypatch.setattr(norm, "VALUES_PER_THREAD", 3)
    monkeypatch.setattr(norm, "CHANNEL_BLOCKS", 16)


@pytest.mark.parametrize(("shape", "options", "train", "batch", "dtype"), SPLIT_BATCHNORMS)
def test_batchnorm_channels_shared_by_blocks(shape: tuple[int, ...], options: str,
                                             train: bool, batch: int, dtype: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each channel's sums over several blocks: per-block partial sums, then a second
    kernel that adds them (forward statistics, and backward's sums)."""
    share_channels(monkeypatch)
    kernel = check_layer(network(shape, f"bn(momentum=0.3, {options})"), "y",
                         batch=batch, dtype=dtype, train=train, device="cuda")
    blocks = getattr(kernel, "blocks", None)
    assert blocks is not None and blocks > 1, blocks


def test_channel_blocks_fill_the_gpu_only_where_channels_are_few() -> None:
    from convdsl.codegen.cuda.norm import channel_blocks

    # ResNet-18-CIFAR at batch 128: 64 channels of 32x32, 128 of 16x16, 512 of 4x4
    assert channel_blocks(64, 128 * 32 * 32, 512) == 8
    assert channel_blocks(128, 128 * 16 * 16, 512) == 4
    assert channel_blocks(512, 128 * 4 * 4, 512) == 1
    assert channel_blocks(6, 100, 128) == 1  # too few values to share


@pytest.mark.parametrize("split", [False, True], ids=["block-per-channel", "shared"])
def test_batchnorm_running_statistics_over_steps(split: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Three training steps then inference: running statistics and the batch count
    follow the reference step by step, updated in place on the device (by one block of
    each channel, where several share it)."""
    if split:
        share_channels(monkeypatch)
    net = convdsl.loads(network((3, 4, 5), "bn(momentum=0.2)"))
    setup = layer_setups(net, 4, "float64", device="cuda")["y"]
    kernel = build_layer(setup)
    assert (getattr(kernel, "blocks", 1) > 1) == split
    rng = np.random.default_rng(11)
    expected = {"weight": random_array(rng, (3,)), "bias": random_array(rng, (3,)),
                "running_mean": random_array(rng, (3,)),
                "running_var": rng.uniform(0.5, 2, 3),
                "num_batches_tracked": np.zeros((), dtype=np.int64)}
    params = {field: device(array) for field, array in expected.items()}
    for step in range(4):
        train = step < 3
        x = random_array(rng, setup.batched_inputs[0]) * (step + 1) + step
        want, _ = reference.layer_forward(setup.layer, [x], expected, setup.window,
                                          reference.RunContext(train=train))
        got = kernel.forward([device(x)], params, Mode(train=train))
        assert_close(host(got), want, 1e-10, f"output, step {step}")
        for field in ("running_mean", "running_var"):
            assert_close(host(params[field]), expected[field], 1e-12, f"{field}, step {step}")
        assert int(host(params["num_batches_tracked"]).reshape(())) == min(step + 1, 3)


def test_batchnorm_training_needs_two_values_per_channel() -> None:
    net = convdsl.loads(network((4,), "bn"))
    kernel = build_layer(layer_setups(net, 1, "float64", device="cuda")["y"])
    params = {"weight": np.ones(4), "bias": np.zeros(4), "running_mean": np.zeros(4),
              "running_var": np.ones(4), "num_batches_tracked": np.zeros((), np.int64)}
    on_device = {field: device(array) for field, array in params.items()}
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernel.forward([device(np.ones((1, 4)))], on_device, Mode(train=True))
    kernel.forward([device(np.ones((1, 4)))], on_device, Mode(train=False))


# --- merges -------------------------------------------------------------------------------

MERGES = [
    ("input a: 2x3\ninput b: 1x3\ny = concat(a, b, act=tanh)", "float32"),
    ("input a: 2x3x2\ninput b: 1x3x2\ninput c: 3x3x2\ny = concat(a, b, c, act=softmax)",
     "float64"),
    ("input a_in: 3x1\ninput b_in: 2x1\na = a_in -> flatten\nb = b_in -> flatten\n"
     "y = concat(a, b, act=relu)", "float32"),
    ("input a: 2x3\ninput b: 2x3\ny = add(a, b, act=leaky_relu)", "float64"),
    ("input a: 2x5\ninput b: 2x5\ninput c: 2x5\ny = add(a, b, c, act=softmax)", "float32"),
    ("input a: 2x3x2x2\ninput b: 2x3x2x2\ny = add(a, b, act=identity)", "float32"),
]


@pytest.mark.parametrize(("text", "dtype"), MERGES)
def test_merge(text: str, dtype: str) -> None:
    kernel = check_layer(text + "\noutput y", "y", dtype=dtype, device="cuda")
    grads = kernel.backward(device(np.ones(kernel.setup.batched_output, dtype=dtype)), {}, {})
    assert len({id(g) for g in grads}) == len(grads), "inputs must not share a gradient"


# --- skipping a softmax's chain rule ------------------------------------------------------

SOFTMAX_LAYERS = [
    ((2, 3, 4), "softmax", False),
    ((2, 3, 4), "bn(act=softmax)", True),
    ((6,), "bn(act=softmax)", False),
    ((2, 3), "add(x, x, act=softmax)", False),
    ((2, 3), "concat(x, x, act=softmax)", False),
]


@pytest.mark.parametrize(("shape", "layer", "train"), SOFTMAX_LAYERS)
def test_skip_act_passes_the_gradient_before_softmax(shape: tuple[int, ...], layer: str,
                                                     train: bool) -> None:
    """With skip_act (cross-entropy through a softmax), the gradient is already with
    respect to the value before the softmax; the layer must not apply its derivative."""
    net = convdsl.loads(network(shape, layer))
    setup = layer_setups(net, 3, "float64", device="cuda")["y"]
    rng = np.random.default_rng(5)
    params = {field: (rng.uniform(0.5, 2, dims) if field == "running_var" else
                      np.zeros((), np.int64) if field == "num_batches_tracked" else
                      random_array(rng, dims))
              for field, dims in setup.param_shapes}
    inputs = [random_array(rng, dims) for dims in setup.batched_inputs]
    kernel = build_layer(setup)
    want, saved = reference.layer_forward(setup.layer, inputs,
                                          {f: a.copy() for f, a in params.items()},
                                          setup.window, reference.RunContext(train=train))
    on_device = {field: device(array) for field, array in params.items()}
    got = kernel.forward([device(x) for x in inputs], on_device, Mode(train=train))
    assert_close(host(got), want, 1e-10, "forward")
    grad = random_array(rng, want.shape)
    want_inputs, want_params = reference.layer_backward(setup.layer, grad, saved, params,
                                                        skip_act=True)
    grads = {field: device(np.zeros_like(array)) for field, array in want_params.items()}
    got_inputs = kernel.backward(device(grad), on_device, grads, skip_act=True)
    for got_input, expected in zip(got_inputs, want_inputs, strict=True):
        assert got_input is not None
        assert_close(host(got_input), expected, TOLERANCES["float64"][1], "input gradient")
    for field, expected in want_params.items():
        assert_close(host(grads[field]), expected, TOLERANCES["float64"][1], field)


# --- losses -------------------------------------------------------------------------------

def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 2, 2)])
@pytest.mark.parametrize(("probabilities", "at_logits"),
                         [(False, True), (True, True), (True, False)])
def test_cross_entropy(dtype: str, shape: tuple[int, ...], probabilities: bool,
                       at_logits: bool) -> None:
    from convdsl.codegen.cuda import losses as device_losses

    rng = np.random.default_rng(len(shape))
    logits = random_array(rng, shape)
    output = (softmax(logits) if probabilities else logits).astype(dtype)
    targets = rng.integers(0, shape[1], (shape[0], *shape[2:]))
    want = losses.evaluate(Loss.CROSS_ENTROPY, output, targets, probabilities, at_logits)
    grad = device(np.full(shape, np.nan, dtype=dtype))
    value, through = device_losses.evaluate(Loss.CROSS_ENTROPY, device(output),
                                            device(targets), probabilities, at_logits, grad)
    forward_tol, grad_tol = TOLERANCES[dtype]
    assert_close(np.array(value), np.array(want.value), forward_tol, "loss")
    assert_close(host(grad), want.grad, grad_tol, "gradient")
    assert through == want.through_softmax


@pytest.mark.parametrize(("dtype", "shape"), [("float32", (3, 2, 5, 7)), ("float64", (4, 3))])
def test_mean_squared_error(dtype: str, shape: tuple[int, ...]) -> None:
    from convdsl.codegen.cuda import losses as device_losses

    rng = np.random.default_rng(9)
    output = random_array(rng, shape).astype(dtype)
    targets = random_array(rng, shape)  # float64 targets: cast to the output's type
    want = losses.evaluate(Loss.MSE, output, targets, False)
    grad = device(np.full(shape, np.nan, dtype=dtype))
    value, through = device_losses.evaluate(Loss.MSE, device(output), device(targets), False,
                                            True, grad)
    forward_tol, grad_tol = TOLERANCES[dtype]
    assert_close(np.array(value), np.array(want.value), forward_tol, "loss")
    assert_close(host(grad), want.grad, grad_tol, "gradient")
    assert not through


def test_no_loss_gives_a_zero_gradient() -> None:
    from convdsl.codegen.cuda import losses as device_losses

    grad = device(np.full((2, 3), np.nan))
    value, through = device_losses.evaluate(Loss.NONE, device(np.ones((2, 3))),
                                            device(np.ones((2, 3))), False, True, grad)
    assert (value, through) == (0.0, False)
    assert np.array_equal(host(grad), np.zeros((2, 3)))
