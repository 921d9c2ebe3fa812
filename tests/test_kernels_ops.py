"""The CPU kernels of every op but conv and filter, against the NumPy reference.

Each test draws a layer (shapes, options, dtype, seed for the values) with hypothesis and
runs it through tests/kernel_harness.py: forward, backward from a random output gradient,
parameter gradients and, for batch norm in training, the updated running statistics.
Examples are few and derandomized, so that a second run finds every kernel compiled in the
test cache; input sizes are fixed per rank, so options, not sizes, decide the kernels.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kernel_harness import TOLERANCES, assert_close, check_layer, random_array

import convdsl
from convdsl.codegen.layer import Mode, build_layer, layer_setups
from convdsl.runtime import reference
from convdsl.runtime.random import dropout_mask

SETTINGS = settings(max_examples=10, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

DTYPES = st.sampled_from(["float32", "float64"])
SEEDS = st.integers(0, 1000)
# input sizes per spatial rank: big enough for any drawn window (span <= 5)
MAPS = {1: (3, 9), 2: (2, 6, 7), 3: (2, 5, 4, 5)}
ELEMENTWISE = ["identity", "relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh"]
ACTS = st.sampled_from([*ELEMENTWISE, "softmax"])


def sizes(values: tuple[int, ...]) -> str:
    return "x".join(map(str, values))


def shape_text(shape: tuple[int, ...]) -> str:
    """An input shape in the language; flat vectors come from a flatten of Fx1."""
    return sizes(shape) if len(shape) > 1 else f"{shape[0]}x1"


def network(shape: tuple[int, ...], layer: str) -> str:
    """input x -> (flatten, for a flat shape) -> layer `y`."""
    if len(shape) > 1:
        return f"input x: {sizes(shape)}\ny = {layer}\noutput y"
    return f"input x: {shape[0]}x1\nf = flatten\ny = f -> {layer}\noutput y"


@st.composite
def pool_options(draw: st.DrawFn, dilated: bool) -> tuple[int, str]:
    """A spatial rank and the option text of a pooling layer valid on MAPS[rank]."""
    rank = draw(st.sampled_from([1, 2, 3]))
    window = [draw(st.integers(1, 3)) for _ in range(rank)]
    stride = [draw(st.integers(1, 3)) for _ in range(rank)]
    pad = [draw(st.integers(0, k // 2)) for k in window]
    text = f"{sizes(tuple(window))}, stride={sizes(tuple(stride))}, pad={sizes(tuple(pad))}"
    if dilated:
        text += f", dilation={sizes(tuple(draw(st.integers(1, 2)) for _ in range(rank)))}"
    if draw(st.booleans()):
        text += ", round=ceil"
    return rank, text


# --- pooling ------------------------------------------------------------------------------


@SETTINGS
@given(pool_options(dilated=True), st.booleans(), DTYPES, SEEDS)
@example((2, "3x2, stride=2x1, pad=1x1, dilation=1x2, round=ceil"), False, "float32", 1)
@example((2, "2, stride=2"), False, "float32", 1)  # windows inside: written out tap by tap
@example((2, "2, stride=2"), True, "float32", 1)
@example((2, "3, stride=1, pad=1"), True, "float32", 1)  # tap by tap over rows of outputs
@example((2, "3, stride=1, pad=1"), False, "float64", 2)
@example((3, "2x3x2, stride=1x2x1, pad=1, dilation=2x1x1"), True, "float32", 1)
def test_maxpool(options: tuple[int, str], train: bool, dtype: str, seed: int) -> None:
    """Training records the positions as it pools; inference keeps only the maxima,
    and a backward after it finds the positions again (check_layer runs backward)."""
    rank, text = options
    check_layer(network(MAPS[rank], f"maxpool({text})"), "y", dtype=dtype, seed=seed,
                train=train)


@pytest.mark.parametrize("layer", ["maxpool(2, stride=2)", "maxpool(3, stride=2, pad=1)",
                                   "maxpool(3, stride=1, pad=1)", "global_maxpool"])
def test_maxpool_inference_keeps_nan_and_minus_infinity_as_training_does(layer: str) -> None:
    net = convdsl.loads(f"input x: 2x6x6\ny = {layer}\noutput y")
    kernel = build_layer(layer_setups(net, 2, "float32")["y"])
    x = random_array(np.random.default_rng(5), (2, 2, 6, 6)).astype(np.float32)
    x[0, 0, 0, 1] = np.nan  # first window's second tap: NaN wins from then on
    x[0, 1, :2, :2] = -np.inf  # a window of -inf alone
    x[1, 0, 3, 3] = np.nan
    trained = kernel.forward([x], {}, Mode(train=True)).copy()
    inferred = kernel.forward([x], {}, Mode(train=False))
    np.testing.assert_array_equal(inferred, trained)  # NaN equal to NaN here
    assert np.isnan(inferred[0, 0].flat[0])


@SETTINGS
@given(pool_options(dilated=False), st.booleans(), DTYPES, SEEDS)
@example((2, "3, stride=2, pad=1, round=ceil"), True, "float32", 1)
@example((2, "3, stride=2, pad=1, round=ceil"), False, "float32", 2)
def test_avgpool(options: tuple[int, str], count_pad: bool, dtype: str, seed: int) -> None:
    rank, text = options
    layer = f"avgpool({text}, count_pad={'yes' if count_pad else 'no'})"
    check_layer(network(MAPS[rank], layer), "y", dtype=dtype, seed=seed)


@SETTINGS
@given(pool_options(dilated=False), DTYPES, SEEDS)
@example((2, "3x2, stride=2, pad=1x1, round=ceil"), "float32", 1)
def test_softpool(options: tuple[int, str], dtype: str, seed: int) -> None:
    rank, text = options
    check_layer(network(MAPS[rank], f"softpool({text})"), "y", dtype=dtype, seed=seed)


@settings(SETTINGS, max_examples=8)
@given(st.sampled_from(["global_maxpool", "global_avgpool"]), st.sampled_from([1, 2, 3]),
       DTYPES, SEEDS)
def test_global_pool(kind: str, rank: int, dtype: str, seed: int) -> None:
    check_layer(network(MAPS[rank], kind), "y", batch=3, dtype=dtype, seed=seed)


def test_maxpool_ties_go_to_the_first_maximum() -> None:
    """Whole numbers make ties everywhere: each window's gradient goes to its first
    maximum in row-major window order, overlapping windows adding up."""
    rng = np.random.default_rng(7)
    for text in ("input x: 2x6x7\ny = maxpool(3, stride=2, pad=1, round=ceil)\noutput y",
                 "input x: 3x8\ny = maxpool(3, stride=1, dilation=2)\noutput y",
                 "input x: 2x3x3\ny = global_maxpool\noutput y"):
        shape = (2, *convdsl.loads(text).input_shape)
        values = rng.integers(1, 4, shape).astype(np.float64)  # 1, 2 or 3: no zeros
        check_layer(text, "y", dtype="float64", inputs=[values])


def test_pooling_matches_torch() -> None:
    """The divisor, ceil and dilation rules are PyTorch's: check a few cases there too."""
    torch = pytest.importorskip("torch")
    functional = torch.nn.functional
    rng = np.random.default_rng(3)
    x = random_array(rng, (2, 3, 7, 6))
    cases = [
        ("maxpool(3, stride=2, pad=1, dilation=2, round=ceil)",
         lambda t: functional.max_pool2d(t, 3, 2, 1, dilation=2, ceil_mode=True)),
        ("avgpool(3, stride=2, pad=1, round=ceil)",
         lambda t: functional.avg_pool2d(t, 3, 2, 1, ceil_mode=True)),
        ("avgpool(3x2, stride=2, pad=1, round=ceil, count_pad=no)",
         lambda t: functional.avg_pool2d(t, (3, 2), 2, 1, ceil_mode=True,
                                         count_include_pad=False)),
    ]
    for layer, torch_pool in cases:
        net = convdsl.loads(f"input x: 3x7x6\ny = {layer}\noutput y")
        kernel = build_layer(layer_setups(net, 2, "float64")["y"])
        y = kernel.forward([x], {}, Mode())
        tx = torch.tensor(x, requires_grad=True)
        ty = torch_pool(tx)
        gy = random_array(rng, y.shape)
        ty.backward(torch.tensor(gy))
        assert_close(y, ty.detach().numpy(), 1e-12, f"{layer} forward")
        (dx,) = kernel.backward(gy.copy(), {}, {})
        assert dx is not None
        assert_close(dx, tx.grad.numpy(), 1e-12, f"{layer} backward")


# --- batch norm ---------------------------------------------------------------------------


@settings(SETTINGS, max_examples=10)
@given(st.sampled_from([(5,), (3, 7), (2, 4, 3), (2, 3, 2, 3)]), st.booleans(), ACTS,
       st.booleans(), st.sampled_from([0.1, 0.3]), DTYPES, SEEDS)
@example((5,), True, "softmax", True, 0.1, "float32", 1)  # flat, training
@example((3, 7), False, "sigmoid", True, 0.3, "float64", 2)
@example((2, 4, 3), True, "softmax", False, 0.1, "float32", 3)
def test_batchnorm(shape: tuple[int, ...], affine: bool, act: str, train: bool,
                   momentum: float, dtype: str, seed: int) -> None:
    layer = f"bn(momentum={momentum}, eps=1e-3, affine={'yes' if affine else 'no'}, act={act})"
    check_layer(network(shape, layer), "y", batch=3, dtype=dtype, train=train, seed=seed)


def test_batchnorm_running_statistics_over_steps() -> None:
    """Three training steps then inference: running statistics and the batch count
    follow the reference step by step, updated in the caller's arrays."""
    text = network((3, 4, 5), "bn(momentum=0.2)")
    net = convdsl.loads(text)
    setup = layer_setups(net, 4, "float64")["y"]
    kernel = build_layer(setup)
    rng = np.random.default_rng(11)
    params = {"weight": random_array(rng, (3,)), "bias": random_array(rng, (3,)),
              "running_mean": random_array(rng, (3,)), "running_var": rng.uniform(0.5, 2, 3),
              "num_batches_tracked": np.zeros((), dtype=np.int64)}
    expected = {field: array.copy() for field, array in params.items()}
    arrays = {field: id(array) for field, array in params.items()}
    for step in range(4):
        train = step < 3
        x = random_array(rng, setup.batched_inputs[0]) * (step + 1) + step
        want, _ = reference.layer_forward(setup.layer, [x], expected, setup.window,
                                          reference.RunContext(train=train))
        got = kernel.forward([x], params, Mode(train=train))
        assert_close(got, want, 1e-10, f"output, step {step}")
        for field in ("running_mean", "running_var"):
            assert_close(params[field], expected[field], 1e-12, f"{field}, step {step}")
        assert int(params["num_batches_tracked"]) == min(step + 1, 3)
    assert {field: id(array) for field, array in params.items()} == arrays


def test_batchnorm_training_needs_two_values_per_channel() -> None:
    net = convdsl.loads(network((4,), "bn"))
    kernel = build_layer(layer_setups(net, 1, "float64")["y"])
    params = {"weight": np.ones(4), "bias": np.zeros(4), "running_mean": np.zeros(4),
              "running_var": np.ones(4), "num_batches_tracked": np.zeros((), np.int64)}
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernel.forward([np.ones((1, 4))], params, Mode(train=True))
    kernel.forward([np.ones((1, 4))], params, Mode(train=False))  # inference is fine


# --- dense, merges, reshapes --------------------------------------------------------------


@settings(SETTINGS, max_examples=12)
@given(st.integers(1, 9), st.integers(1, 6), st.booleans(), ACTS, DTYPES, SEEDS)
def test_dense(features: int, units: int, bias: bool, act: str, dtype: str, seed: int) -> None:
    layer = f"dense({units}, bias={'yes' if bias else 'no'}, act={act})"
    check_layer(network((features,), layer), "y", batch=3, dtype=dtype, seed=seed)


@st.composite
def merge_inputs(draw: st.DrawFn, same_channels: bool) -> tuple[list[str], tuple[int, ...]]:
    """2 to 4 input declarations sharing a spatial shape (or flat), and that shape."""
    spatial = draw(st.sampled_from([(), (5,), (3, 4), (2, 3, 2)]))
    count = draw(st.integers(2, 4))
    first = draw(st.integers(1, 4))
    channels = [first if same_channels else draw(st.integers(1, 4)) for _ in range(count)]
    names = [f"x{i}" for i in range(count)]
    lines = []
    for name, c in zip(names, channels):
        if spatial:
            lines.append(f"input {name}: {sizes((c, *spatial))}")
        else:  # a flat vector: flatten a Cx1 input
            lines.append(f"input {name}_in: {c}x1\n{name} = {name}_in -> flatten")
    return lines, spatial


@settings(SETTINGS, max_examples=8)
@given(merge_inputs(same_channels=False), ACTS, DTYPES, SEEDS)
def test_concat(inputs: tuple[list[str], tuple[int, ...]], act: str, dtype: str,
                seed: int) -> None:
    lines, _ = inputs
    names = ", ".join(f"x{i}" for i in range(len(lines)))
    text = "\n".join([*lines, f"y = concat({names}, act={act})", "output y"])
    check_layer(text, "y", dtype=dtype, seed=seed)


@settings(SETTINGS, max_examples=12)
@given(merge_inputs(same_channels=True), ACTS, DTYPES, SEEDS)
def test_add(inputs: tuple[list[str], tuple[int, ...]], act: str, dtype: str,
             seed: int) -> None:
    lines, _ = inputs
    names = ", ".join(f"x{i}" for i in range(len(lines)))
    text = "\n".join([*lines, f"y = add({names}, act={act})", "output y"])
    kernel = check_layer(text, "y", dtype=dtype, seed=seed)
    grads = kernel.backward(np.ones(kernel.setup.batched_output, dtype=dtype), {}, {})
    assert len({id(g) for g in grads}) == len(grads), "inputs must not share a gradient"


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), (2, 2, 3, 2), (6,)])
def test_flatten_is_a_view(shape: tuple[int, ...]) -> None:
    text = f"input x: {shape_text(shape)}\ny = flatten\noutput y"
    kernel = check_layer(text, "y", dtype="float32")
    x = np.ones((2, *convdsl.loads(text).input_shape), dtype=np.float32)
    y = kernel.forward([x], {}, Mode())
    assert np.shares_memory(x, y) and y.shape == kernel.setup.batched_output
    (dx,) = kernel.backward(y, {}, {})
    assert dx is not None and np.shares_memory(dx, y) and dx.shape == x.shape


# --- activations and dropout --------------------------------------------------------------


@settings(SETTINGS, max_examples=8)
@given(st.sampled_from([*ELEMENTWISE, "softmax", "leaky_relu(0.2)", "elu(0.5)"]),
       st.sampled_from([(6,), (3, 5), (2, 3, 4)]), DTYPES, SEEDS)
@example("relu6", (3, 5), "float32", 1)
@example("tanh", (2, 3, 4), "float32", 2)
@example("leaky_relu(0.2)", (3, 5), "float64", 3)
@example("softmax", (2, 3, 4), "float32", 4)
def test_activation(act: str, shape: tuple[int, ...], dtype: str, seed: int) -> None:
    check_layer(network(shape, act), "y", dtype=dtype, seed=seed)


@settings(SETTINGS, max_examples=8)
@given(st.sampled_from([0.0, 0.3, 0.5, 0.9]), st.sampled_from([(7,), (3, 5), (2, 3, 4)]),
       st.booleans(), DTYPES, SEEDS)
def test_dropout(p: float, shape: tuple[int, ...], train: bool, dtype: str, seed: int) -> None:
    text = network(shape, f"dropout({p})")
    kernel = check_layer(text, "y", dtype=dtype, train=train, seed=seed)
    x = random_array(np.random.default_rng(seed), kernel.setup.batched_inputs[0]).astype(dtype)
    y = kernel.forward([x], {}, Mode(train=train, seed=seed, step=5))
    if not train:
        assert y is x  # the identity, no copy
        return
    mask = dropout_mask(seed, 5, "y", x.shape, p, dtype)
    assert np.array_equal(y, x * mask)


# --- skipping a softmax's chain rule ------------------------------------------------------

SOFTMAX_LAYERS = [
    ((2, 3, 4), "softmax"),
    ((6,), "softmax"),
    ((2, 3, 4), "bn(act=softmax)"),
    ((5,), "dense(4, act=softmax)"),
    ((2, 3), "add(x, x, act=softmax)"),
    ((2, 3), "concat(x, x, act=softmax)"),
]


@pytest.mark.parametrize(("shape", "layer"), SOFTMAX_LAYERS)
@pytest.mark.parametrize("train", [False, True])
def test_skip_act_passes_the_gradient_before_softmax(shape: tuple[int, ...], layer: str,
                                                     train: bool) -> None:
    """With skip_act (cross-entropy through a softmax), the gradient is already with
    respect to the value before the softmax; the layer must not apply its derivative."""
    net = convdsl.loads(network(shape, layer))
    setup = layer_setups(net, 3, "float64")["y"]
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
    assert_close(kernel.forward(inputs, params, Mode(train=train)), want, 1e-10, "forward")
    grad = random_array(rng, want.shape)
    want_inputs, want_params = reference.layer_backward(setup.layer, grad, saved, params,
                                                        skip_act=True)
    grads = {field: np.zeros_like(array) for field, array in want_params.items()}
    got_inputs = kernel.backward(grad.copy(), params, grads, skip_act=True)
    for got, expected in zip(got_inputs, want_inputs, strict=True):
        assert got is not None
        assert_close(got, expected, TOLERANCES["float64"][1], "input gradient")
    for field, expected in want_params.items():
        assert_close(grads[field], expected, TOLERANCES["float64"][1], field)


def test_relu6_clips_above_six() -> None:
    """Normal values rarely pass 6: scale them so that both clips and their zero
    gradients show, in a relu6 layer and fused into add."""
    rng = np.random.default_rng(13)
    check_layer("input x: 3x5\ny = x -> relu6\noutput y", "y", dtype="float64",
                inputs=[random_array(rng, (2, 3, 5)) * 6])
    check_layer("input a: 3x5\ninput b: 3x5\ny = add(a, b, act=relu6)\noutput y", "y",
                dtype="float64",
                inputs=[random_array(rng, (2, 3, 5)) * 4, random_array(rng, (2, 3, 5)) * 4])
