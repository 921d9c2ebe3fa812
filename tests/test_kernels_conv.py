"""Convolution and filter kernels (direct, GEMM, FFT) against the NumPy reference
(Winograd: tests/test_kernels_winograd.py).

Every case runs forward and backward through tests/kernel_harness.py. Fixed cases cover
each option at least once for every algorithm (1-D, 2-D and 3-D; every padding mode,
asymmetric padding; stride, dilation, groups, bias, flip; elementwise and softmax
activations; float32 and float64); Hypothesis then draws random layers. Each new shape
compiles new kernels (seconds each), so example counts are small and derandomised: a
second run finds every kernel in the test cache and takes seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_harness import check_layer, random_array
from random_layers import conv_layer

import convdsl
from convdsl.codegen import cache, cost
from convdsl.codegen.cpu import conv
from convdsl.codegen.layer import LayerSetup, Mode, build_layer, layer_setups
from convdsl.runtime import reference

ALGORITHMS = ("direct", "gemm", "fft")
T = TypeVar("T")

# (network text, layer, batch, dtype): together every option for every algorithm.
CASES = [
    pytest.param("input x: 4x11\n"
                 "c = conv(6, 3, stride=2, pad=same, dilation=2, groups=2, mode=convolution,"
                 " act=leaky_relu)\noutput c", "c", 3, "float64", id="1d-same-stride-dil-groups"),
    pytest.param("input x: 3x7x8\n"
                 "c = conv(4, 3x2, stride=1x2, pad=[1 0 0 2], bias=no, act=softmax)\noutput c",
                 "c", 2, "float32", id="2d-asym-pad-softmax"),
    pytest.param("input x: 2x4x5x6\n"
                 "c = conv(3, 2x3x1, pad=full, dilation=1x1x2, mode=convolution, act=elu)\n"
                 "output c", "c", 2, "float32", id="3d-full-flip"),
    pytest.param("input x: 6x9x9\nc = conv(4, 3, stride=2, pad=2, groups=2, act=relu)\noutput c",
                 "c", 1, "float64", id="2d-pad-groups"),
    pytest.param("input x: 4x4x6\n"
                 "c = conv(2, 2x3, pad=[4 0 1 5], dilation=1x2, groups=2, mode=convolution,"
                 " act=sigmoid)\noutput c",
                 "c", 2, "float64", id="2d-pad-beyond-window"),
    pytest.param("input x: 6x9x9\nc = conv(4, 1, groups=2, act=relu6)\noutput c", "c", 3,
                 "float32", id="2d-pointwise"),
    pytest.param("input x: 3x10x9\n"
                 "f = filter(3, kernel=[[1 2 1] [0 0 0] [-1 -2 -1]] / 4, pad=same, stride=2,"
                 " mode=convolution, act=tanh)\noutput f", "f", 2, "float64", id="filter-2d"),
    pytest.param("input x: 2x13\nf = filter(4, kernel=[1 -3 3 -1], dilation=2)\noutput f",
                 "f", 3, "float32", id="filter-1d-valid"),
]


@pytest.mark.parametrize("algo", ALGORITHMS)
@pytest.mark.parametrize(("text", "name", "batch", "dtype"), CASES)
def test_fixed_cases(text: str, name: str, batch: int, dtype: str, algo: str) -> None:
    kernel = check_layer(text, name, batch=batch, dtype=dtype, algo=algo)
    assert kernel.algorithm == algo


class HypothesisPicker:
    """Hypothesis's draws behind random_layers.Picker, so that failures shrink."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(options))


@st.composite
def layers(draw: st.DrawFn, fixed: bool) -> tuple[str, int, str]:
    """A random conv (or filter) layer whose output is not empty: (text, batch, dtype)."""
    return conv_layer(HypothesisPicker(draw), fixed)


SETTINGS = settings(max_examples=6, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("algo", ALGORITHMS)
@SETTINGS
@given(case=layers(fixed=False))
def test_random_conv(algo: str, case: tuple[str, int, str]) -> None:
    text, batch, dtype = case
    check_layer(text, "c", batch=batch, dtype=dtype, algo=algo)


@pytest.mark.parametrize("algo", ALGORITHMS)
@settings(SETTINGS, max_examples=3)
@given(case=layers(fixed=True))
def test_random_filter(algo: str, case: tuple[str, int, str]) -> None:
    text, batch, dtype = case
    check_layer(text, "c", batch=batch, dtype=dtype, algo=algo)


def test_gemm_in_batch_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A small column budget splits the batch (5 = 2 + 2 + 1): backward revisits the
    chunks last first and sums the weight gradient over them."""
    monkeypatch.setattr(conv, "GEMM_CHUNK_BYTES", 2 * 3 * 9 * 25 * 4)
    kernel = check_layer("input x: 3x7x7\nc = conv(4, 3, stride=1, act=relu)\noutput c", "c",
                         batch=5, dtype="float32", algo="gemm")
    assert kernel.specs[0].option("chunk") == 2


def test_gemm_layers_share_one_im2col_scratch() -> None:
    """Two GEMM convolutions of one network use one pair of scratch buffers, as large as
    the larger layer's; interleaved forwards and backwards still agree with the same
    network run without sharing (direct), in float64."""
    text = ("input x: 3x9x9\na = conv(5, 3, pad=1)\nb = a -> conv(4, 3, stride=2)\n"
            "c = b -> conv(6, 2)\noutput c")
    shared = convdsl.compile(text, batch=3, dtype="float64", algo="gemm", seed=1, warm=False)
    alone = convdsl.compile(text, batch=3, dtype="float64", algo="direct", seed=1, warm=False)
    x = random_array(np.random.default_rng(4), (3, 3, 9, 9))
    grad = random_array(np.random.default_rng(5), (3, 6, 3, 3))
    for net in (shared, alone):
        net.forward(x, train=True)
        net.backward(grad.copy())
    for name, value in alone.grads.items():
        np.testing.assert_allclose(shared.grads[name], value, rtol=1e-10, atol=1e-12)
    scratch = conv._scratch("float64")
    modules = [stage.kernel._module for stage in shared.stages]  # type: ignore[attr-defined]
    assert scratch.cols.size >= max(module.SCRATCH[0] for module in modules)
    assert scratch.owner is not None and scratch.owner() is shared.stages[0].kernel


def test_skip_act_passes_the_gradient_before_softmax() -> None:
    text = "input x: 3x7x8\nc = conv(4, 3x2, stride=1x2, pad=[1 0 0 2], bias=no, act=softmax)"
    network = convdsl.loads(text + "\noutput c")
    setup = layer_setups(network, 2, "float32", "direct")["c"]
    rng = np.random.default_rng(1)
    x = random_array(rng, setup.batched_inputs[0])
    weight = random_array(rng, dict(setup.param_shapes)["weight"])
    kernel = build_layer(setup)
    kernel.forward([x.astype(np.float32)], {"weight": weight.astype(np.float32)}, Mode())
    _, saved = reference.layer_forward(setup.layer, [x], {"weight": weight}, setup.window,
                                       reference.RunContext())
    dy = random_array(rng, setup.batched_output)
    (want,), grads = reference.layer_backward(setup.layer, dy, saved, {"weight": weight},
                                              skip_act=True)
    got = {"weight": np.zeros(weight.shape, np.float32)}
    (dx,) = kernel.backward(dy.astype(np.float32), {"weight": weight.astype(np.float32)}, got,
                            skip_act=True)
    assert dx is not None
    np.testing.assert_allclose(dx, want, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(got["weight"], grads["weight"],
                               atol=1e-4 * np.abs(grads["weight"]).max())


def _setup(text: str, algo: str | None = None, name: str = "c") -> LayerSetup:
    return layer_setups(convdsl.loads(text), 8, "float32", algo)[name]


def test_algorithm_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model's choice with its built-in rates (tests/test_cost.py tests more)."""
    monkeypatch.setenv(cost.NO_CALIBRATE, "1")
    cases = {
        "input x: 4x256\nc = conv(4, 64)\noutput c": "fft",  # large window, stride 1
        "input x: 64x8x8\nc = conv(64, 3, stride=2, pad=1)\noutput c": "gemm",  # 576 products
        "input x: 64x8x8\nc = conv(64, 3, pad=1)\noutput c": "winograd",  # at stride 1
        "input x: 1x28x28\nc = conv(6, 5, pad=2)\noutput c": "direct",  # 6 outputs
        "input x: 3x32x32\nc = conv(64, 3, pad=1)\noutput c": "gemm",  # 27 products
        "input x: 32x8x8\nc = conv(32, 3, groups=32)\noutput c": "direct",  # depthwise
        "input x: 3x8x8\nc = filter(3, kernel=[1 2 1 2 4 2 1 2 1])\noutput c": "direct",
        # one output position: nothing for a transform to share
        "input x: 3x64\nc = filter(64, kernel=[" + " 1" * 64 + "])\noutput c": "direct",
        "input x: 64x8x8\nc = conv(64, 3, pad=1, algo=direct)\noutput c": "direct",
    }
    for text, expected in cases.items():
        algorithm, reason = conv.choose_algorithm(_setup(text))
        assert algorithm == expected, (text, reason)
        assert reason
    assert conv.choose_algorithm(_setup("input x: 64x8x8\nc = conv(64, 3)\noutput c",
                                        "fft")) == ("fft", "requested")
    with pytest.raises(ValueError, match="unknown convolution algorithm"):
        conv.choose_algorithm(_setup("input x: 4x8\nc = conv(4, 3)\noutput c", "strassen"))


def test_layer_reports_its_algorithm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cost.NO_CALIBRATE, "1")
    kernel = build_layer(_setup("input x: 64x8x8\nc = conv(64, 3, stride=2, pad=1)\noutput c"))
    assert (kernel.algorithm, kernel.specs[0].template) == ("gemm", "conv_gemm")
    assert "products per output" in kernel.reason


def test_identical_layers_share_one_kernel() -> None:
    network = convdsl.loads(
        "input x: 4x6x6\n"
        "a = conv(4, 3, pad=same, act=relu)\n"
        "b = conv(4, 3, pad=same, act=relu)\n"
        "f = x -> filter(3, kernel=[1 2 1 2 4 2 1 2 1] / 16, pad=same)\n"
        "g = filter(3, kernel=[1 2 1 2 4 2 1 2 1] / 16, pad=same)\n"
        "output b\noutput g")
    setups = layer_setups(network, 2, "float32", "direct")
    kernels = {name: build_layer(setup) for name, setup in setups.items()}
    assert kernels["a"].specs == kernels["b"].specs
    assert kernels["f"].specs == kernels["g"].specs
    assert kernels["a"].specs != kernels["f"].specs
    assert cache.load(kernels["a"].specs[0]) is cache.load(kernels["b"].specs[0])


_SECOND_PROCESS = textwrap.dedent("""
    import numpy as np
    import convdsl
    from convdsl.codegen.layer import Mode, build_layer, layer_setups
    network = convdsl.loads("input x: 3x6x6\\nc = conv(5, 3, pad=[0 1], act=tanh)\\noutput c")
    kernel = build_layer(layer_setups(network, 2, "float64", "direct")["c"])
    params = {"weight": np.ones((5, 3, 3, 3)), "bias": np.ones(5)}
    grads = {key: np.zeros_like(value) for key, value in params.items()}
    y = kernel.forward([np.ones((2, 3, 6, 6))], params, Mode())
    kernel.backward(np.ones_like(y), params, grads)
""")


def test_second_process_loads_compiled_kernels(tmp_path: Path) -> None:
    """The first process writes the kernel sources and Numba's machine code; a second
    one with the same cache compiles nothing (no new file) and starts fast."""
    env = {**os.environ, "CONVDSL_CACHE": str(tmp_path)}

    def run() -> tuple[float, dict[Path, int]]:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", _SECOND_PROCESS], env=env, check=True,
                       capture_output=True, text=True)
        seconds = time.perf_counter() - started
        return seconds, {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}

    cold, files = run()
    sources = {path for path in files if path.suffix == ".py"}
    assert len(sources) == 1
    assert {path.suffix for path in files} >= {".nbi", ".nbc"}  # Numba's index and code
    warm, files_again = run()
    assert files_again == files  # nothing written, nothing rewritten
    assert warm < cold
