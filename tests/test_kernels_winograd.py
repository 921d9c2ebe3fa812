"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions against the NumPy reference, and
when they apply.

The transforms are exact in rational arithmetic, so the float64 results must match the
reference to rounding; every case runs forward and backward (input, weight and bias
gradients) through tests/kernel_harness.py, with each tile size. Fixed cases cover what
changes the generated code: output sizes that the tiles divide or not (the last tile
sticks out), every padding mode, asymmetric and wide padding, flip, bias, activations
(softmax runs outside), one input channel (a filter), and several batch chunks.
Hypothesis then draws random 3x3 layers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_harness import check_layer, random_array

import convdsl
from convdsl.codegen import cost
from convdsl.codegen.cpu import conv, conv_winograd
from convdsl.codegen.cpu.conv_common import Geometry
from convdsl.codegen.layer import layer_setups

CASES = [
    pytest.param("input x: 3x8x8\nc = conv(4, 3, pad=same, act=relu)\noutput c", "c", 2,
                 "float32", id="even-same-relu"),
    pytest.param("input x: 3x7x9\nc = conv(5, 3, pad=[1 1 0 2], mode=convolution, act=elu)\n"
                 "output c", "c", 3, "float64", id="odd-asym-flip"),
    pytest.param("input x: 2x5x6\nc = conv(3, 3, bias=no)\noutput c", "c", 2, "float32",
                 id="valid-odd-rows-no-bias"),
    pytest.param("input x: 2x6x5\nc = conv(2, 3, pad=full, act=softmax)\noutput c", "c", 2,
                 "float64", id="full-softmax"),
    pytest.param("input x: 2x4x4\nc = conv(3, 3, pad=[3 0 0 4], act=tanh)\noutput c", "c", 1,
                 "float64", id="pad-beyond-window"),
    pytest.param("input x: 1x3x3\nc = conv(2, 3, act=sigmoid)\noutput c", "c", 2, "float64",
                 id="one-output"),
    pytest.param("input x: 1x6x5\nf = filter(3, kernel=[[1 2 1] [0 0 0] [-1 -2 -1]] / 4, "
                 "pad=same, mode=convolution, act=leaky_relu)\noutput f", "f", 2, "float64",
                 id="filter"),
]


@pytest.fixture(params=sorted(conv_winograd.TILINGS))
def tile(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Each tile size in turn, as the only one the layers may choose."""
    monkeypatch.setattr(conv, "WINOGRAD_TILES", (request.param,))
    return int(request.param)


@pytest.mark.parametrize(("text", "name", "batch", "dtype"), CASES)
def test_fixed_cases(text: str, name: str, batch: int, dtype: str, tile: int) -> None:
    kernel = check_layer(text, name, batch=batch, dtype=dtype, algo="winograd")
    assert (kernel.algorithm, kernel.specs[0].template) == ("winograd", "conv_winograd")
    assert kernel.specs[0].option("tile") == tile


@st.composite
def layers(draw: st.DrawFn) -> tuple[str, int, str]:
    """A random 3x3 stride-1 layer: (text, batch, dtype)."""
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    pads = [draw(st.integers(0, 2)) for _ in range(4)]  # before and after, per axis
    pads[1] += max(0, 3 - rows - pads[0] - pads[1])  # the window must fit
    pads[3] += max(0, 3 - cols - pads[2] - pads[3])
    channels, out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    act = draw(st.sampled_from(("none", "relu", "tanh", "softmax")))
    flip = draw(st.booleans())
    bias = draw(st.sampled_from(("yes", "no")))
    text = (f"input x: {channels}x{rows}x{cols}\n"
            f"c = conv({out}, 3, pad=[{' '.join(map(str, pads))}], act={act}, bias={bias}, "
            f"mode={'convolution' if flip else 'correlation'})\noutput c")
    return text, draw(st.integers(1, 3)), draw(st.sampled_from(("float32", "float64")))


@pytest.mark.usefixtures("tile")
@settings(max_examples=4, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=layers())
def test_random_layers(case: tuple[str, int, str]) -> None:
    text, batch, dtype = case
    check_layer(text, "c", batch=batch, dtype=dtype, algo="winograd")


def test_batch_chunks_sum_the_weight_gradient(monkeypatch: pytest.MonkeyPatch,
                                              tile: int) -> None:
    """A small budget splits the batch (5 = 2 + 2 + 1): backward visits the chunks last
    first, transforms the earlier chunks' patches again and adds their gradients."""
    tiling = conv_winograd.TILINGS[tile]
    tiles = (4 // tile) ** 2  # a 4x4 output
    monkeypatch.setattr(conv, "GEMM_CHUNK_BYTES", 2 * tiling.points * 4 * tiles * 8)
    kernel = check_layer("input x: 3x4x4\nc = conv(4, 3, pad=1, act=relu)\noutput c", "c",
                         batch=5, dtype="float64", algo="winograd")
    assert kernel.specs[0].option("chunk") == 2


@pytest.mark.usefixtures("tile")
def test_shares_the_scratch_with_gemm_layers() -> None:
    """Winograd and GEMM layers borrow the same scratch buffers, interleaved forward and
    backward; the gradients still equal those of a network computed directly."""
    text = ("input x: 3x9x9\na = conv(5, 3, pad=1, algo=winograd)\n"
            "b = a -> conv(4, 3, stride=2, algo=gemm)\nc = b -> conv(6, 3, algo=winograd)\n"
            "output c")
    mixed = convdsl.compile(text, batch=3, dtype="float64", seed=1, warm=False)
    assert [stage.kernel.algorithm for stage in mixed.stages] == ["winograd", "gemm",
                                                                  "winograd"]
    alone = convdsl.compile(text, batch=3, dtype="float64", algo="direct", seed=1, warm=False)
    x = random_array(np.random.default_rng(4), (3, 3, 9, 9))
    grad = random_array(np.random.default_rng(5), (3, 6, 2, 2))
    for net in (mixed, alone):
        net.forward(x, train=True)
        net.backward(grad.copy())
    for name, value in alone.grads.items():
        np.testing.assert_allclose(mixed.grads[name], value, rtol=1e-10, atol=1e-12)


def _geometry(text: str) -> Geometry:
    setup = layer_setups(convdsl.loads(text + "\noutput c"), 2, "float32", "direct")["c"]
    return Geometry.from_spec(conv.conv_spec(setup, "direct"))


@pytest.mark.parametrize(("layer", "why"), [
    ("input x: 3x9\nc = conv(4, 3)", "1-D"),
    ("input x: 3x9x9\nc = conv(4, 5)", "5x5 window"),
    ("input x: 3x9x9\nc = conv(4, 3, stride=2)", "strided"),
    ("input x: 3x9x9\nc = conv(4, 3, dilation=2)", "dilated"),
    ("input x: 4x9x9\nc = conv(4, 3, groups=2)", "2 groups"),
])
def test_what_it_does_not_compute(layer: str, why: str) -> None:
    """Asked for where it does not apply, the layer falls back to the model's choice
    among the others and says why."""
    g = _geometry(layer)
    assert not conv_winograd.applies(g)
    assert conv_winograd.why_not(g) == why
    setup = layer_setups(convdsl.loads(layer + "\noutput c"), 2, "float32", "winograd")["c"]
    algorithm, reason = conv.choose_algorithm(setup)
    assert algorithm in ("direct", "gemm", "fft")
    assert reason.startswith(f"winograd does not apply ({why}); estimated")


def test_the_model_takes_it_for_wide_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the built-in rates: 16 and more channels go to Winograd, 4x4 tiles where the
    maps hold several; a 3-channel input layer stays with GEMM (its products would be 3
    deep), and so does a strided one."""
    monkeypatch.setenv(cost.NO_CALIBRATE, "1")
    for layer, expected, tile in [
            ("input x: 16x32x32\nc = conv(16, 3, pad=1)", "winograd", 4),
            ("input x: 64x32x32\nc = conv(64, 3, pad=1)", "winograd", 4),
            ("input x: 256x8x8\nc = conv(256, 3, pad=1)", "winograd", 4),
            ("input x: 512x4x4\nc = conv(512, 3, pad=1)", "winograd", 2),
            ("input x: 3x32x32\nc = conv(64, 3, pad=1)", "gemm", None),
            ("input x: 64x32x32\nc = conv(64, 3, stride=2, pad=1)", "gemm", None)]:
        setup = layer_setups(convdsl.loads(layer + "\noutput c"), 32, "float32", None)["c"]
        algorithm, reason = conv.choose_algorithm(setup)
        assert algorithm == expected, (layer, reason)
        if tile:
            assert reason.endswith(f"; {tile}x{tile} output tiles")
            assert conv.conv_spec(setup, algorithm).option("tile") == tile


@pytest.mark.usefixtures("tile")
def test_batch_norm_folded_into_a_winograd_weight() -> None:
    """In inference the weight with batch norm folded in is lent from the shared scratch
    (fused.py); the Winograd forward writes its transformed weight into another part of
    it while reading the folded one. Both layers, one after another, agree with GEMM."""
    text = ("input x: 3x8x8\na = conv(6, 3, pad=1, bias=no, algo=winograd)\nb = bn(act=relu)\n"
            "c = conv(5, 3, pad=1, algo=winograd)\nd = bn\noutput d")
    rng = np.random.default_rng(2)
    x = random_array(rng, (2, 3, 8, 8))
    outputs = []
    for algo in ("winograd", "gemm"):
        net = convdsl.compile(text, batch=2, dtype="float64", algo=algo, seed=3, warm=False)
        for _ in range(2):  # training steps move the running statistics off 0 and 1
            net.forward(x, train=True)
            net.backward(random_array(rng, (2, 5, 8, 8)))
        net.load_state_dict({**net.state_dict(), **{  # the same statistics both times
            name: np.linspace(0.5, 1.5, value.size).reshape(value.shape)
            for name, value in net.state_dict().items() if "running" in name}})
        outputs.append(net.forward(x, train=False).copy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
