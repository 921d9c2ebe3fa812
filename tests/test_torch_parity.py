"""Parity with PyTorch: the NumPy reference and the compiled kernels against the same
network computed by PyTorch (tests/torch_bridge.py), forward and backward.

Three layers of checks:

1. The bridge itself against the op contract: each windowed op, activation kink, batch
   norm, dropout and loss against a plain NumPy transcription of the contract, hand-written
   torchvision-style modules (whose own state_dict loads by convdsl names), shapes of every
   network in the zoo, and float32 against float64 (so the tolerances below are reachable).
2. `ReferenceNetwork` (float64) against PyTorch (float64): every layer's output, the loss,
   the gradient of the input and of every trained array, and every array after the step
   (batch-norm statistics), in training and in inference mode.
3. `convdsl.compile(...)` in float64 and float32, with every convolution algorithm for the
   small networks, against the same PyTorch results.

Weights and inputs are float32 values held in float64, so that one float64 PyTorch run is
the exact answer for every back end and dtype. Nothing is zero: batch-norm statistics,
scales and shifts are randomised too.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch_bridge import TorchNetwork, activate, ends_in_softmax, output_loss, torch_loss

import convdsl
from convdsl.ir.ops import Loss, Op, PoolAttrs
from convdsl.network import Network
from convdsl.passes.shapes import Window
from convdsl.runtime import losses
from convdsl.runtime.params import init_params, network_params
from convdsl.runtime.random import dropout_mask

ROOT = Path(__file__).resolve().parents[1]
SEED = 0  # dropout masks
STEP = 3  # a step other than 0, so that a back end ignoring `step` is caught

# Relative tolerances, measured against the largest magnitude of each expected array.
FORWARD_TOL = {"float64": 1e-10, "float32": 1e-5}
GRAD_TOL = {"float64": 1e-10, "float32": 1e-4}
# A parameter gradient is measured against at least this fraction of the largest one in the
# network: the bias of a layer feeding batch norm has a gradient of exactly 0 in training,
# which any implementation computes as rounding noise of the gradients that cancel there.
GRAD_FLOOR = 1e-2


@dataclass(frozen=True)
class Case:
    source: str  # a path from the repository root, or .cnn text
    batch: int

    @property
    def is_text(self) -> bool:
        return "\n" in self.source

    @property
    def id(self) -> str:
        if self.is_text:
            return self.source.split("\n", 1)[0].removeprefix("network ")
        return Path(self.source).stem

    def load(self) -> Network:
        return convdsl.loads(self.source) if self.is_text else convdsl.load(ROOT / self.source)

    @property
    def compile_source(self) -> str:
        return self.source if self.is_text else str(ROOT / self.source)


# A softmax output that other layers read too: cross-entropy still reads it as
# probabilities, but no back end may take its gradient at the logits alone.
SOFTMAX_FEEDS_ON = """network softmax_feeds_on
input x: 3x6
h = conv(4, 3, act=tanh) -> flatten
probs = dense(5, act=softmax)
score = probs -> dense(2)
output score loss=mse
aux probs loss=cross_entropy weight=0.5
"""


CASES = [
    Case("networks/lenet5.cnn", 2),
    Case("networks/mnist1d_cnn.cnn", 3),
    Case("networks/digits_cnn.cnn", 3),
    Case("networks/gaussian_signal.cnn", 2),
    Case("networks/resnet20_cifar.cnn", 2),
    Case("examples/inception_module.cnn", 1),
    Case("networks/voxel3d.cnn", 2),
    Case("examples/toeplitz_signal.cnn", 3),
    Case("examples/every_op_image.cnn", 3),
    Case("examples/every_op_signal.cnn", 4),
    Case("examples/every_op_volume.cnn", 3),
    Case(SOFTMAX_FEEDS_ON, 3),
]
CASE_BY_ID = {case.id: case for case in CASES}
# Every algorithm on every option is checked layer by layer against the reference
# (tests/test_kernels_conv.py); here on whole networks, in float64, to keep CI's cold
# compile short.
ALGORITHM_CASES = [CASE_BY_ID[stem] for stem in ("lenet5", "every_op_image", "every_op_signal")]
# float32 kernels are the float64 ones' source with another dtype. Every op reaches them
# through the every-op examples, a deep stack through ResNet-20 and a classic through
# LeNet-5; the other networks add only layer shapes, whose cold compiles cost CI some
# 190 s, so they run in float64 alone.
FLOAT32_CASES = [CASE_BY_ID[stem] for stem in (
    "lenet5", "resnet20_cifar", "every_op_image", "every_op_signal", "every_op_volume",
    "softmax_feeds_on")]
ALGORITHMS = ["direct", "gemm", "fft"]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def case_params(cases: list[Case]) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in cases]


# --- problems: one network, its weights, inputs and targets ------------------------------


def random_array(rng: np.random.Generator, shape: tuple[int, ...],
                 scale: float = 1.0) -> np.ndarray:
    """Normal values pushed away from zero, as float32 numbers held in float64."""
    values = rng.standard_normal(shape)
    values = (values + np.sign(values) * 0.05) * scale
    return values.astype(np.float32).astype(np.float64)


def as_float32_values(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind != "f":
        return array.copy()
    return array.astype(np.float32).astype(np.float64)


def seeded_arrays(network: Network, seed: int) -> dict[str, np.ndarray]:
    """Seeded weights, with every batch-norm array randomised (never 0 or 1)."""
    rng = np.random.default_rng(seed)
    arrays = init_params(network, seed=seed)
    for info in network_params(network):
        array = arrays[info.name]
        if info.field == "running_mean" or (info.field == "bias" and array.ndim == 1
                                            and not array.any()):
            array = random_array(rng, info.shape, 0.2)
        elif info.field == "running_var" or (info.field == "weight" and array.ndim == 1):
            array = rng.uniform(0.5, 1.5, info.shape)
        elif info.field == "num_batches_tracked":
            array = np.array(5, dtype=np.int64)
        arrays[info.name] = as_float32_values(array)
    return arrays


def random_targets(network: Network, rng: np.random.Generator, batch: int
                   ) -> dict[str, np.ndarray]:
    targets = {}
    for output in network.outputs:
        shape = (batch, *network.shapes[output.name])
        if output.loss is Loss.CROSS_ENTROPY:
            targets[output.name] = rng.integers(0, shape[1], (shape[0], *shape[2:]))
        else:
            targets[output.name] = random_array(rng, shape)
    return targets


@dataclass(frozen=True)
class Problem:
    case: Case
    network: Network
    arrays: dict[str, np.ndarray]  # float64 holding float32 values; buffers included
    x: np.ndarray
    targets: dict[str, np.ndarray]

    def arrays_as(self, dtype: str) -> dict[str, np.ndarray]:
        return {name: (array.astype(dtype) if array.dtype.kind == "f" else array.copy())
                for name, array in self.arrays.items()}


@functools.cache
def problem(case: Case) -> Problem:
    network = case.load()
    rng = np.random.default_rng(sum(map(ord, case.id)))
    x = random_array(rng, (case.batch, *network.input_shape), 2.0)
    return Problem(case, network, seeded_arrays(network, seed=int(rng.integers(1 << 30))), x,
                   random_targets(network, rng, case.batch))


# --- one forward and backward step, as every back end reports it --------------------------


@dataclass(frozen=True)
class Step:
    activations: dict[str, np.ndarray]  # every layer (the reference, PyTorch) or the outputs
    loss: float
    input_grad: np.ndarray
    grads: dict[str, np.ndarray]  # trained arrays
    arrays: dict[str, np.ndarray]  # every array after the step, buffers included


def torch_step(problem: Problem, train: bool, dtype: torch.dtype = torch.float64) -> Step:
    network = problem.network
    net = TorchNetwork(network, dtype)
    net.load_arrays(problem.arrays)
    x = torch.from_numpy(problem.x).to(dtype).requires_grad_()
    values = net(x, train=train, seed=SEED, step=STEP)
    loss = torch_loss(network, values, problem.targets)
    loss.backward()
    assert x.grad is not None
    activations = {name: value.detach().numpy() for name, value in values.items()
                   if network.graph.layer(name).inputs}
    return Step(activations, loss.item(), x.grad.numpy(), net.grads(), net.arrays())


@functools.cache
def expected_step(case: Case, train: bool) -> Step:
    return torch_step(problem(case), train)


def named_outputs(network: Network, outputs: Any) -> dict[str, np.ndarray]:
    """A back end's declared outputs, as a dict by output name (from a dict or a sequence)."""
    if isinstance(outputs, Mapping):
        return {str(name): np.asarray(value) for name, value in outputs.items()}
    return {output.name: np.asarray(value) for output, value in zip(network.outputs, outputs)}


def reference_step(problem: Problem, train: bool) -> Step:
    from convdsl.runtime.reference import ReferenceNetwork

    ref = ReferenceNetwork(problem.network, params=problem.arrays_as("float64"), seed=SEED)
    ref.forward(problem.x.copy(), train=train, step=STEP)
    loss = ref.loss(problem.targets)
    input_grad = ref.backward()
    return Step(dict(ref.activations), float(loss), np.asarray(input_grad), dict(ref.grads),
                dict(ref.params))


@functools.cache
def compiled(case: Case, dtype: str, algo: str | None) -> Any:
    return convdsl.compile(case.compile_source, batch=case.batch, dtype=dtype,
                           seed=SEED, algo=algo)


def compiled_step(problem: Problem, train: bool, dtype: str, algo: str | None) -> Step:
    net = compiled(problem.case, dtype, algo)
    net.load_state_dict(problem.arrays_as(dtype))
    net.forward(problem.x.astype(dtype), train=train, step=STEP)
    outputs = named_outputs(problem.network, net.outputs)
    targets = {name: (t.astype(dtype) if t.dtype.kind == "f" else t)
               for name, t in problem.targets.items()}
    loss = net.loss(targets)
    input_grad = net.backward()
    return Step(outputs, float(loss), np.array(input_grad),
                {name: grad.copy() for name, grad in net.grads.items()},
                {name: np.asarray(value) for name, value in net.state_dict().items()})


# --- comparison: every mismatch in one message ----------------------------------------------


def mismatch(what: str, actual: Any, expected: np.ndarray, rtol: float,
             floor: float = 0.0) -> str | None:
    """None when within rtol x the largest expected magnitude (or `floor`, if larger);
    else a line saying how far off, and where."""
    if actual is None:
        return f"{what}: missing"
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return f"{what}: shape {actual.shape}, expected {expected.shape}"
    if expected.dtype.kind == "i":
        return None if np.array_equal(actual, expected) else (
            f"{what}: {actual.tolist()}, expected {expected.tolist()}")
    if expected.size == 0:
        return None
    if not np.all(np.isfinite(actual)):
        return f"{what}: {int(np.sum(~np.isfinite(actual)))} values not finite"
    scale = max(float(np.max(np.abs(expected))), floor, 1e-30)
    errors = np.abs(actual.astype(np.float64) - expected)
    worst = np.unravel_index(int(np.argmax(errors)), errors.shape)
    error = float(errors[worst])
    if error <= rtol * scale:
        return None
    wrong = int(np.sum(errors > rtol * scale))
    return (f"{what}: max error {error:.3g} = {error / scale:.2g} x max|expected| {scale:.3g} "
            f"at {tuple(int(i) for i in worst)} (got {float(actual[worst]):.6g}, expected "
            f"{float(expected[worst]):.6g}); {wrong} of {expected.size} values off")


def compare_steps(actual: Step, expected: Step, dtype: str, names: Iterable[str]) -> list[str]:
    """Every mismatch: the outputs of the named layers, the loss, every gradient, and every
    array after the step."""
    forward, grad = FORWARD_TOL[dtype], GRAD_TOL[dtype]
    floor = GRAD_FLOOR * max((float(np.max(np.abs(g))) for g in expected.grads.values()
                              if g.size), default=0.0)
    problems = [mismatch(f"output of {name}", actual.activations.get(name),
                         expected.activations[name], forward) for name in names]
    problems.append(mismatch("loss", np.array(actual.loss), np.array(expected.loss), forward))
    problems.append(mismatch("grad of the input", actual.input_grad, expected.input_grad, grad))
    for name, want in expected.grads.items():
        problems.append(mismatch(f"grad of {name}", actual.grads.get(name), want, grad,
                                 floor))
    for name, want in expected.arrays.items():
        problems.append(mismatch(f"{name} after the step", actual.arrays.get(name), want,
                                 forward))
    return [line for line in problems if line is not None]


def assert_same(actual: Step, expected: Step, dtype: str, names: Iterable[str],
                label: str) -> None:
    problems = compare_steps(actual, expected, dtype, names)
    assert not problems, f"{label}: {len(problems)} mismatches\n  " + "\n  ".join(problems)


def every_layer(network: Network) -> list[str]:
    return [layer.name for layer in network.layers if layer.inputs]


def declared(network: Network) -> list[str]:
    return [output.name for output in network.outputs]


# === 1. the bridge against the contract ======================================================


def tiny(shape: str, chain: str, loss: str = "mse") -> Network:
    """A network `y = chain` on an input of the given shape; a flat shape ("6") is a 6x1
    map through flatten."""
    flat = "x" not in shape
    text = f"input x: {shape}x1\nflat = flatten\n" if flat else f"input x: {shape}\n"
    return convdsl.loads(f"{text}y = {chain}\noutput y loss={loss}\n")


def batch_of(network: Network, rng: np.random.Generator, batch: int) -> np.ndarray:
    return random_array(rng, (batch, *network.input_shape))


def bridge_run(network: Network, x: np.ndarray, grad: np.ndarray | None = None,
               train: bool = False) -> tuple[np.ndarray, np.ndarray | None, TorchNetwork]:
    """y and, given the output gradient, the input gradient, from the bridge (float64)."""
    net = TorchNetwork(network)
    net.load_arrays(seeded_arrays(network, seed=1))
    inputs = torch.from_numpy(x).requires_grad_()
    y = net(inputs, train=train, seed=SEED, step=STEP)["y"]
    if grad is None:
        return y.detach().numpy(), None, net
    y.backward(torch.from_numpy(grad))
    assert inputs.grad is not None
    return y.detach().numpy(), inputs.grad.numpy(), net


def window_indices(position: tuple[int, ...], window: Window) -> list[list[int]]:
    """Per axis, the input indices a window covers (padding and overhang included)."""
    return [[i * s - before + t * d for t in range(k)]
            for i, k, s, d, (before, _) in zip(position, window.window, window.stride,
                                                 window.dilation, window.pads)]


def contract_pool(op: str, attrs: PoolAttrs, window: Window, x: np.ndarray,
                  out_sizes: tuple[int, ...], grad: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The semantics notes' pooling, forward and backward, one window at a time."""
    sizes = x.shape[2:]
    y = np.zeros((*x.shape[:2], *out_sizes))
    dx = np.zeros_like(x)
    for position in itertools.product(*map(range, out_sizes)):
        axes = window_indices(position, window)
        inside = [p for p in itertools.product(*axes)
                  if all(0 <= i < n for i, n in zip(p, sizes))]
        values = np.stack([x[(slice(None), slice(None), *p)] for p in inside])  # (P, N, C)
        g = grad[(slice(None), slice(None), *position)]
        at = (slice(None), slice(None), *position)
        if op == "maxpool":
            first = np.argmax(values, axis=0)  # the first maximum, row-major
            y[at] = np.max(values, axis=0)
            for index, p in enumerate(inside):
                dx[(slice(None), slice(None), *p)] += np.where(first == index, g, 0.0)
        elif op == "avgpool":
            divisor = 1
            for n, k, (before, _), index in zip(sizes, window.window, window.pads, axes):
                start = index[0]
                end = min(start + k, n + before)
                divisor *= (end - start) if attrs.count_pad else (min(end, n) - max(start, 0))
            y[at] = values.sum(axis=0) / divisor
            for p in inside:
                dx[(slice(None), slice(None), *p)] += g / divisor
        else:
            weights = np.exp(values - values.max(axis=0))
            weights /= weights.sum(axis=0)
            y[at] = (weights * values).sum(axis=0)
            for index, p in enumerate(inside):
                dx[(slice(None), slice(None), *p)] += g * weights[index] * (
                    1 + values[index] - y[at])
    return y, dx


POOLS = [
    ("2x9", "maxpool(3, stride=2, pad=1, round=ceil)"),
    ("2x10", "maxpool(3, stride=3, dilation=2, pad=1, round=ceil)"),
    ("2x7x8", "maxpool(2, stride=2, pad=1, round=ceil)"),
    ("1x5x6x7", "maxpool(2x3x2, stride=2, dilation=1x1x2, round=ceil)"),
    ("2x9", "avgpool(3, stride=2, pad=1, round=ceil)"),
    ("2x7x8", "avgpool(3, stride=2, pad=1, round=ceil, count_pad=no)"),
    ("2x7x8", "avgpool(2, stride=2, pad=1, round=ceil)"),
    ("2x6x7", "avgpool(4x3, stride=3x2, pad=2x1, round=ceil)"),
    ("1x5x6x7", "avgpool(2, pad=1, round=ceil, count_pad=no)"),
    ("2x9", "softpool(3, stride=2, pad=1, round=ceil)"),
    ("2x7x8", "softpool(3, stride=2, pad=1)"),
    ("2x7x8", "softpool(2x3, stride=2, pad=1, round=ceil)"),
    ("1x5x6x7", "softpool(2, pad=1, round=ceil)"),
]


@pytest.mark.parametrize(("shape", "chain"), POOLS)
def test_bridge_pooling_follows_the_contract(shape: str, chain: str) -> None:
    network = tiny(shape, chain)
    attrs = network.graph.layer("y").attrs
    assert isinstance(attrs, PoolAttrs)
    rng = np.random.default_rng(7)
    x = random_array(rng, (2, *network.input_shape))
    if chain.startswith("maxpool"):
        x = np.round(x)  # ties: the gradient goes to the first maximum
    out_shape = network.shapes["y"]
    grad = random_array(rng, (2, *out_shape))
    y, dx, _ = bridge_run(network, x, grad)
    want_y, want_dx = contract_pool(chain.split("(")[0], attrs, network.windows["y"], x,
                                    out_shape[1:], grad)
    np.testing.assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-12)


def contract_conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, window: Window,
                  groups: int, flip: bool, out_sizes: tuple[int, ...]) -> np.ndarray:
    """y[n,o,i] = b[o] + sum_{c,k} w[o,c,k] xpad[n, g*C/G + c, i*stride + k*dilation]."""
    xpad = np.pad(x, ((0, 0), (0, 0), *window.pads))
    if flip:
        weight = np.flip(weight, axis=tuple(range(2, weight.ndim)))
    out_channels, per_group = weight.shape[:2]
    y = np.zeros((x.shape[0], out_channels, *out_sizes))
    outs_per_group = out_channels // groups
    for offset in itertools.product(*map(range, window.window)):
        taken = xpad[(slice(None), slice(None),
                      *(slice(t * d, t * d + s * (o - 1) + 1, s)
                        for t, d, s, o in zip(offset, window.dilation, window.stride,
                                              out_sizes)))]
        for g in range(groups):
            outs = slice(g * outs_per_group, (g + 1) * outs_per_group)
            ins = taken[:, g * per_group:(g + 1) * per_group]
            w = weight[(outs, slice(None), *offset)]
            y[:, outs] += np.einsum("nc...,oc->no...", ins, w)
    if bias is not None:
        y += bias.reshape(-1, *([1] * len(out_sizes)))
    return y


CONVS = [
    ("3x11", "conv(4, 3, stride=2, pad=[2 1], dilation=2, mode=convolution)"),
    ("4x9x8", "conv(6, 2x3, stride=2x1, pad=same, groups=2, act=elu)"),
    ("4x9x8", "conv(4, 3, pad=[0 1 2 3], dilation=2x1, groups=4, bias=no, mode=convolution)"),
    ("2x4x5x6", "conv(2, 3x1x2, stride=1x2x1, pad=[1 0 0 1 2 2], dilation=2x1x1)"),
    ("2x12", "filter(5, kernel=[1 4 6 4 1] / 16, mode=convolution, pad=full)"),
    ("2x6x7", "filter(2x3, kernel=[[1 0 -1] [2 0 -2]], stride=2, pad=same, act=tanh)"),
]


@pytest.mark.parametrize(("shape", "chain"), CONVS)
def test_bridge_convolution_follows_the_contract(shape: str, chain: str) -> None:
    network = tiny(shape, chain)
    layer = network.graph.layer("y")
    window = network.windows["y"]
    x = random_array(np.random.default_rng(3), (2, *network.input_shape))
    y, _, net = bridge_run(network, x)
    arrays = net.arrays()
    if chain.startswith("filter"):
        kernel = np.array(layer.attrs.kernel).reshape(window.window)  # type: ignore[union-attr]
        weight = np.broadcast_to(kernel, (x.shape[1], 1, *window.window))
        want = contract_conv(x, weight, None, window, x.shape[1],
                             layer.attrs.flip, network.shapes["y"][1:])  # type: ignore[union-attr]
    else:
        want = contract_conv(x, arrays["y.weight"], arrays.get("y.bias"), window,
                             layer.attrs.groups, layer.attrs.flip,  # type: ignore[union-attr]
                             network.shapes["y"][1:])
    act = layer.act
    np.testing.assert_allclose(y, activate(torch.from_numpy(want), act).numpy(), rtol=1e-12,
                               atol=1e-12)


def test_a_flipped_full_filter_is_numpy_convolve() -> None:
    """The lecture's Toeplitz product: mode=convolution, pad=full is np.convolve(x, h)."""
    network = tiny("1x20", "filter(5, kernel=[1 4 6 4 2] / 16, mode=convolution, pad=full)")
    x = random_array(np.random.default_rng(0), (1, 1, 20))
    y, _, _ = bridge_run(network, x)
    np.testing.assert_allclose(y[0, 0], np.convolve(x[0, 0], np.array([1, 4, 6, 4, 2]) / 16),
                               rtol=1e-13)


KINKS = [  # activation, input values, the contract's gradient there
    ("relu", [-1.0, 0.0, 2.0], [0.0, 0.0, 1.0]),
    ("relu6", [-1.0, 0.0, 3.0, 6.0, 7.0], [0.0, 0.0, 1.0, 0.0, 0.0]),
    ("leaky_relu(0.2)", [-1.0, 0.0, 2.0], [0.2, 0.2, 1.0]),
    ("elu(0.7)", [-1.0, 0.0, 2.0], [0.7 * np.exp(-1.0), 0.7, 1.0]),
]


@pytest.mark.parametrize(("chain", "values", "slopes"), KINKS)
def test_bridge_activation_gradients_at_the_kinks(chain: str, values: list[float],
                                                  slopes: list[float]) -> None:
    network = tiny(f"1x{len(values)}", chain)
    x = np.array([[values]])
    _, dx, _ = bridge_run(network, x, np.ones_like(x))
    np.testing.assert_allclose(dx, [[slopes]], rtol=1e-15)


def test_bridge_softmax_is_over_channels() -> None:
    network = tiny("3x4x5", "softmax")
    x = random_array(np.random.default_rng(0), (2, 3, 4, 5))
    y, _, _ = bridge_run(network, x)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(y, np.exp(x) / np.exp(x).sum(axis=1, keepdims=True), rtol=1e-13)


@pytest.mark.parametrize("shape", ["3x5x4", "6"])
def test_bridge_batch_norm_follows_the_contract(shape: str) -> None:
    network = tiny(shape, "bn(momentum=0.3, eps=1e-3)")
    feed = batch_of(network, np.random.default_rng(2), 4)
    x = feed.reshape(4, *network.shapes["y"])
    axes = (0, *range(2, x.ndim))
    y, _, net = bridge_run(network, feed, train=True)
    start = seeded_arrays(network, seed=1)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    count = x.size // x.shape[1]
    view = (1, -1, *([1] * (x.ndim - 2)))
    want = ((x - mean.reshape(view)) / np.sqrt(var.reshape(view) + 1e-3)
            * start["y.weight"].reshape(view) + start["y.bias"].reshape(view))
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    after = net.arrays()
    np.testing.assert_allclose(after["y.running_mean"], 0.7 * start["y.running_mean"]
                               + 0.3 * mean, rtol=1e-13)
    np.testing.assert_allclose(after["y.running_var"], 0.7 * start["y.running_var"]
                               + 0.3 * var * count / (count - 1), rtol=1e-13)
    assert int(after["y.num_batches_tracked"]) == int(start["y.num_batches_tracked"]) + 1
    y_eval, _, net = bridge_run(network, feed, train=False)
    np.testing.assert_allclose(y_eval, (x - start["y.running_mean"].reshape(view))
                               / np.sqrt(start["y.running_var"].reshape(view) + 1e-3)
                               * start["y.weight"].reshape(view)
                               + start["y.bias"].reshape(view), rtol=1e-12, atol=1e-12)
    assert int(net.arrays()["y.num_batches_tracked"]) == int(start["y.num_batches_tracked"])


def test_bridge_dropout_uses_the_shared_mask() -> None:
    network = tiny("3x8", "dropout(0.4)")
    x = random_array(np.random.default_rng(5), (2, 3, 8))
    y, _, _ = bridge_run(network, x, train=True)
    np.testing.assert_array_equal(y, x * dropout_mask(SEED, STEP, "y", x.shape, 0.4))
    assert (y == 0).any() and (y != 0).any()
    y, _, _ = bridge_run(network, x, train=False)
    np.testing.assert_array_equal(y, x)


LOSSES = [  # output layer, loss
    ("4", "dense(5)", "cross_entropy"),
    ("4", "dense(5, act=softmax)", "cross_entropy"),
    ("3x6", "conv(4, 1)", "cross_entropy"),
    ("3x6", "conv(4, 1) -> softmax", "cross_entropy"),
    ("3x6", "conv(2, 3, act=tanh)", "mse"),
]


@pytest.mark.parametrize(("shape", "chain", "loss"), LOSSES)
def test_bridge_loss_matches_runtime_losses(shape: str, chain: str, loss: str) -> None:
    """Value and gradient; for a softmax output the gradient with respect to its logits."""
    network = tiny(shape, chain, loss)
    name = network.outputs[0].name
    rng = np.random.default_rng(11)
    x = batch_of(network, rng, 3)
    targets = random_targets(network, rng, 3)
    net = TorchNetwork(network)
    net.load_arrays(seeded_arrays(network, seed=1))
    values = net(torch.from_numpy(x))
    layer = network.graph.layer(name)
    before_softmax = values[layer.inputs[0]] if layer.op is Op.ACTIVATION else None
    softmax = ends_in_softmax(network, name)
    if softmax and before_softmax is None:  # fused: recompute the logits as a leaf
        logits = values[name].detach().log().requires_grad_()
        output = torch.softmax(logits, dim=1)
    elif softmax:
        logits = before_softmax.detach().requires_grad_()  # type: ignore[union-attr]
        output = torch.softmax(logits, dim=1)
    else:
        logits = values[name].detach().requires_grad_()
        output = logits
    value = torch_loss(network, {name: output}, targets)
    value.backward()
    want = losses.evaluate(Loss(loss), values[name].detach().numpy(), targets[name], softmax)
    assert want.through_softmax == softmax
    assert value.item() == pytest.approx(want.value, rel=1e-12)
    assert logits.grad is not None
    np.testing.assert_allclose(logits.grad.numpy(), want.grad, rtol=1e-10, atol=1e-14)


def test_bridge_loss_weights_auxiliary_outputs() -> None:
    p = problem(CASE_BY_ID["every_op_image"])
    net = TorchNetwork(p.network)
    net.load_arrays(p.arrays)
    values = net(torch.from_numpy(p.x))
    weights = {o.name: o.weight for o in p.network.outputs}
    assert weights == {"out": 1.0, "side.2": 0.3, "spread_head.1": 0.5}
    each = {o.name: output_loss(p.network, o.name, o.loss, values[o.name],
                                p.targets[o.name]).item() for o in p.network.outputs}
    total = torch_loss(p.network, values, p.targets).item()
    assert total == pytest.approx(sum(weights[n] * each[n] for n in each), rel=1e-12)


@pytest.mark.parametrize("path", sorted([*ROOT.glob("networks/*.cnn"),
                                          *ROOT.glob("examples/*.cnn")]),
                         ids=lambda p: p.stem)
def test_bridge_shapes_agree_with_the_shape_pass(path: Path) -> None:
    """PyTorch's window arithmetic (ceil mode included) gives convdsl's shapes, every layer."""
    network = convdsl.load(path)
    net = TorchNetwork(network, device="meta")
    x = torch.empty((2, *network.input_shape), dtype=torch.float64, device="meta")
    shapes = {name: tuple(value.shape[1:]) for name, value in net(x).items()}
    assert shapes == network.shapes


@pytest.mark.parametrize("case", case_params(CASES))
def test_bridge_float32_is_within_the_tolerances(case: Case) -> None:
    """A correct float32 computation (PyTorch's) meets the float32 tolerances used below
    (in training, where batch norm's batch statistics make it hardest)."""
    p = problem(case)
    assert_same(torch_step(p, True, torch.float32), expected_step(case, True), "float32",
                every_layer(p.network), label=f"PyTorch float32 {case.id}")


# --- hand-written PyTorch modules, named as torchvision names them -----------------------------


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5, padding=2)
        self.c3 = nn.Conv2d(6, 16, 5)
        self.f5 = nn.Linear(400, 120)
        self.f6 = nn.Linear(120, 84)
        self.out = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c3(x)), 2)
        x = torch.relu(self.f5(x.flatten(1)))
        return self.out(torch.relu(self.f6(x)))


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module | None = None
        if stride != 1:
            self.shortcut = nn.Sequential(nn.Conv2d(channels_in, channels, 1, stride,
                                                    bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*(BasicBlock(16, 16, 1) for _ in range(3)))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32, 1),
                                    BasicBlock(32, 32, 1))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64, 1),
                                    BasicBlock(64, 64, 1))
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


MODULES: list[tuple[str, Callable[[], nn.Module]]] = [("lenet5", LeNet5),
                                                       ("resnet20_cifar", ResNet20)]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize(("stem", "module"), MODULES, ids=[stem for stem, _ in MODULES])
def test_bridge_matches_a_torchvision_style_module(stem: str, module: Callable[[], nn.Module],
                                                   train: bool) -> None:
    """The module's own state_dict has exactly the convdsl names and shapes; loaded into the
    bridge it gives the same outputs, gradients and batch-norm statistics."""
    case = CASE_BY_ID[stem]
    p = problem(case)
    model = module().double()
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        info.name: info.shape for info in network_params(p.network)}
    model.load_state_dict({name: torch.from_numpy(p.arrays[name]) for name in state})
    model.train(train)
    x = torch.from_numpy(p.x).requires_grad_()
    logits = model(x)
    nn.functional.cross_entropy(logits, torch.from_numpy(p.targets["out" if stem == "lenet5"
                                                                   else "fc"])).backward()
    assert x.grad is not None
    want = Step({p.network.outputs[0].name: logits.detach().numpy()}, 0.0, x.grad.numpy(),
                {name: param.grad.numpy() for name, param in model.named_parameters()
                 if param.grad is not None},
                {name: value.detach().numpy() for name, value in model.state_dict().items()})
    got = expected_step(case, train)
    got = Step({name: got.activations[name] for name in want.activations}, 0.0,
               got.input_grad, got.grads, got.arrays)
    assert_same(got, want, "float64", list(want.activations), label=f"bridge vs {stem} module")


def test_bridge_state_dict_loads_into_a_torch_module() -> None:
    p = problem(CASE_BY_ID["resnet20_cifar"])
    net = TorchNetwork(p.network)
    net.load_arrays(p.arrays)
    model = ResNet20().double()
    model.load_state_dict(net.convdsl_state_dict())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), p.arrays[name])


# === 2. the NumPy reference against PyTorch ===================================================


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("case", case_params(CASES))
def test_reference_matches_torch(case: Case, train: bool) -> None:
    p = problem(case)
    assert_same(reference_step(p, train), expected_step(case, train), "float64",
                every_layer(p.network), label=f"reference {case.id}")


# === 3. the compiled network against PyTorch ===================================================


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize(("case", "dtype"), [
    *(pytest.param(case, "float64", id=f"{case.id}-float64") for case in CASES),
    *(pytest.param(case, "float32", id=f"{case.id}-float32") for case in FLOAT32_CASES)])
def test_compiled_matches_torch(case: Case, train: bool, dtype: str) -> None:
    p = problem(case)
    net = compiled(case, dtype, None)
    assert tuple(net.input_shape) == p.network.input_shape
    assert tuple(net.output_shape) == p.network.output_shape
    actual = compiled_step(p, train, dtype, None)
    for name, value in actual.activations.items():
        assert value.dtype == np.dtype(dtype), f"output {name} is {value.dtype}"
    assert_same(actual, expected_step(case, train), dtype, declared(p.network),
                label=f"compiled {case.id} {dtype}")


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize("dtype", ["float64"])
@pytest.mark.parametrize("case", case_params(ALGORITHM_CASES))
def test_compiled_algorithm_matches_torch(case: Case, dtype: str, algo: str) -> None:
    p = problem(case)
    actual = compiled_step(p, True, dtype, algo)
    assert_same(actual, expected_step(case, True), dtype, declared(p.network),
                label=f"compiled {case.id} {dtype} algo={algo}")


def test_compiled_loads_a_torch_state_dict() -> None:
    """A PyTorch module's own state_dict (tensors, torchvision names) loads as it is, and
    the compiled network's state_dict loads back into the module and into the bridge."""
    case = CASE_BY_ID["resnet20_cifar"]
    p = problem(case)
    model = ResNet20().double()
    model.load_state_dict({name: torch.from_numpy(p.arrays[name]) for name in
                           model.state_dict()})
    net = compiled(case, "float64", None)
    net.load_state_dict(model.state_dict())
    state = net.state_dict()
    assert list(state) == list(model.state_dict())
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(np.asarray(state[name]), value.numpy(), err_msg=name)
    back = ResNet20().double()
    back.load_state_dict({name: torch.as_tensor(np.asarray(value)) for name, value in
                          state.items()})
    bridge = TorchNetwork(p.network)
    bridge.load_arrays(state)
    for name, value in bridge.arrays().items():
        np.testing.assert_array_equal(value, p.arrays[name], err_msg=name)
