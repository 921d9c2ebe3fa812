"""CUDA convolution, filter and dense kernels against the NumPy reference, in the simulator.

Every case runs forward and backward through tests/kernel_harness.py (device="cuda").
The shapes are tiny (the simulator runs a few thousand threads per second) and chosen
so that no product is a multiple of its tile: the tiled kernels' edge checks are
exercised. `algo=gemm` forces the tiled kernels on every pass, `algo=direct` the simple
ones; `auto` mixes them by shape.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from kernel_harness import check_layer
from random_layers import NumpyPicker, conv_layer

import convdsl
from convdsl.codegen.cpu.conv_common import Geometry
from convdsl.codegen.cuda import conv as cuda_conv
from convdsl.codegen.cuda import conv_gemm
from convdsl.codegen.cuda.phases import axis_phases

pytestmark = pytest.mark.cuda

# (network text, layer, dtype, algo): together every option of the CUDA kernels.
CASES = [
    pytest.param("input x: 4x11\n"
                 "c = conv(6, 3, stride=2, pad=same, dilation=2, groups=2, mode=convolution,"
                 " act=leaky_relu)\noutput c", "c", "float64", "gemm",
                 id="1d-same-stride-dil-groups-flip"),
    pytest.param("input x: 3x7x8\n"
                 "c = conv(4, 3x2, stride=1x2, pad=[1 0 0 2], bias=no, act=softmax)\noutput c",
                 "c", "float32", "gemm", id="2d-asym-pad-softmax-nobias"),
    pytest.param("input x: 3x6x7\nc = conv(10, 3, stride=2, pad=1, act=relu)\noutput c",
                 "c", "float64", "auto", id="2d-explicit-pad-stride-auto"),
    pytest.param("input x: 2x3x4x3\n"
                 "c = conv(3, 2x3x1, pad=full, dilation=1x1x2, mode=convolution, act=elu)\n"
                 "output c", "c", "float32", "gemm", id="3d-full-dil-flip"),
    pytest.param("input x: 4x5x5\nc = conv(4, 3, groups=4, pad=same, act=relu)\noutput c",
                 "c", "float32", "auto", id="2d-depthwise"),
    pytest.param("input x: 4x4x6\n"
                 "c = conv(2, 2x3, pad=[4 0 1 5], dilation=1x2, groups=2, mode=convolution,"
                 " act=sigmoid)\noutput c", "c", "float64", "direct", id="2d-pad-beyond-direct"),
    pytest.param("input x: 3x9\nc = conv(5, 4, pad=valid, act=tanh)\noutput c", "c",
                 "float64", "direct", id="1d-valid-direct"),
    pytest.param("input x: 2x6x7\n"
                 "f = filter(3, kernel=[[1 2 1] [0 0 0] [-1 -2 -1]] / 4, pad=same, stride=2,"
                 " mode=convolution, act=tanh)\noutput f", "f", "float64", "auto",
                 id="filter-2d"),
    pytest.param("input x: 2x13\nf = filter(4, kernel=[1 -3 3 -1], dilation=2)\noutput f",
                 "f", "float32", "gemm", id="filter-1d-valid-tiled"),
    pytest.param("input x: 3x7x6\nc = conv(5, 3x1, stride=3x2, pad=[2 1 0 0], dilation=2x1,"
                 " act=relu)\noutput c", "c", "float64", "gemm",
                 id="2d-stride-3x2-phases-without-taps"),
    pytest.param("input x: 2x5x5x4\nc = conv(3, 2, stride=2, pad=same, mode=convolution)"
                 "\noutput c", "c", "float32", "auto", id="3d-stride-2-flip-eight-phases"),
    pytest.param("input x: 4x7x7\nc = conv(6, 1, stride=2, bias=no)\noutput c", "c",
                 "float64", "gemm", id="2d-1x1-stride-2-downsample"),
    pytest.param("input x: 13x1\nf = flatten\nd = f -> dense(10, act=relu)\noutput d", "d",
                 "float64", "gemm", id="dense-tiled"),
    pytest.param("input x: 9x1\nf = flatten\nd = f -> dense(5, bias=no, act=softmax)\n"
                 "output d", "d", "float32", "auto", id="dense-softmax-nobias"),
]


@pytest.mark.parametrize(("text", "name", "dtype", "algo"), CASES)
def test_cases(text: str, name: str, dtype: str, algo: str) -> None:
    check_layer(text, name, batch=2, dtype=dtype, algo=algo, device="cuda")


@pytest.mark.parametrize("seed", range(8))
def test_random_layers(seed: int) -> None:
    """Layers drawn at random as for the CPU's kernels (tests/random_layers.py): rank,
    sizes, window, stride, dilation, padding, groups, flip, bias and activation in
    combinations no fixed case chose, on the tiled products (every third a filter)."""
    fixed = seed % 3 == 2
    text, batch, dtype = conv_layer(NumpyPicker(np.random.default_rng(seed)), fixed)
    check_layer(text, "c", batch=batch, dtype=dtype, algo="gemm", device="cuda")


# The conv cases whose layer is a convolution or filter (dense layers have no k tables).
CONV_CASES = [case for case in CASES if "dense" not in str(case.id)]


@pytest.mark.parametrize(("text", "name", "dtype", "algo"), CONV_CASES)
def test_cases_without_k_tables(text: str, name: str, dtype: str, algo: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The same cases with the operands' index arithmetic computed in the kernel instead
    of read from constant tables (a layer whose tables do not fit, or
    CONVDSL_CUDA_K_TABLES=0): both ways must agree with the reference."""
    monkeypatch.setattr(cuda_conv, "USE_TABLES", False)
    check_layer(text, name, batch=2, dtype=dtype, algo=algo, device="cuda")


def test_k_tables_are_used_where_they_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small layers read their k tables; a layer whose tables pass TABLE_BYTES does not,
    and the forward table holds what the operand's arithmetic would compute."""
    net = convdsl.compile("input x: 3x6x7\nc = conv(4, 3x2, stride=1x2, pad=same, "
                          "dilation=2x1, mode=convolution)\noutput c", batch=2,
                          device="cuda", warm=False)
    layer = net.stages[0].kernel
    spec = layer.specs[0]
    assert spec.option("k_tables") == (True, True)
    forward, backward, _ = cuda_conv.products(spec)
    offset, reach = forward.tables
    g = Geometry.from_spec(spec)
    c, kw = 2, 4  # weight tap (2, 0) flipped to (0, 1): reach (0 * 2, 1 * 1)
    assert reach.values[(c * g.volume + kw) * 2:][:2] == (0, 1)
    assert offset.values[c * g.volume + kw] == c * 6 * 7 + 0 * 7 + 1
    assert [table.name for table in backward[0].tables] == ["offset", "shift"]
    monkeypatch.setattr(cuda_conv, "TABLE_BYTES", 8)
    net = convdsl.compile("input x: 3x6x7\nc = conv(4, 3)\noutput c", batch=2,
                          device="cuda", warm=False)
    assert net.stages[0].kernel.specs[0].option("k_tables") == (False, False)


def test_weight_grad_split_along_k(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight gradient reduced in several splits of K, then summed in order."""
    monkeypatch.setattr(conv_gemm, "MIN_SPLIT_SLICES", 1)
    kernel = check_layer("input x: 3x5x6\nc = conv(9, 2, pad=same)\noutput c", "c",
                         dtype="float64", algo="gemm", device="cuda")
    assert getattr(kernel, "splits", 1) > 1


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_slices_loaded_ahead_or_in_turn(monkeypatch: pytest.MonkeyPatch,
                                        prefetch: bool) -> None:
    """Products of several K-slices, the last one partial (the forward product's K is
    11 x 6 = 66 in slices of 16; the weight gradient's K is split in parts, each with a
    partial slice), whose threads load the next slice while they multiply this one (the
    default) or only after it (CONVDSL_CUDA_PREFETCH=0): both must agree with the
    reference, and the choice is part of the kernel's spec."""
    monkeypatch.setattr(conv_gemm, "PREFETCH", prefetch)
    monkeypatch.setattr(conv_gemm, "MIN_SPLIT_SLICES", 1)
    kernel = check_layer("input x: 11x5x4\nc = conv(10, 2x3, pad=same, act=relu6)\noutput c",
                         "c", dtype="float32", algo="gemm", device="cuda")
    assert getattr(kernel, "splits", 1) > 1
    assert kernel.specs[0].option("forward_tiles")[-1] == int(prefetch)


def test_tiles_grow_with_the_product() -> None:
    big = conv_gemm.choose_tiles(64, 131072, 576)
    assert (big.bm, big.bn, big.tm, big.tn, big.threads) == (64, 64, 4, 4, 256)
    small = conv_gemm.choose_tiles(3, 20, 5)
    assert (small.bm, small.bn, small.bk, small.threads) == (4, 32, 8, 64)
    # each thread of a full tile prefetches 4 + 4 elements of a slice; a thread of a
    # 4 x 64 tile of 64 threads would hold 1 + 16, too many registers: it loads in turn
    assert big.prefetch
    thin = conv_gemm.choose_tiles(3, 64, 1000)
    assert (thin.bm, thin.bn, thin.threads, thin.prefetch) == (4, 64, 64, False)
    # a weight gradient with few tiles and a long reduction is split along K
    assert conv_gemm.choose_splits(64, 576, 131072, 1, big) > 1
    assert conv_gemm.choose_splits(512, 4608, 2048, 1, big) == 1


def test_register_blocks_and_many_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 8 with 2 x 2 register blocks: several blocks along M and N, each thread
    owning four elements, and products that end mid-tile on every edge."""
    monkeypatch.setattr(conv_gemm, "MAX_TILE", 8)
    monkeypatch.setattr(conv_gemm, "THREAD_SPAN", 4)
    kernel = check_layer("input x: 11x5x4\nc = conv(10, 2x3, pad=same, act=relu6)\noutput c",
                         "c", dtype="float32", algo="gemm", device="cuda")
    assert "tiled 8x8x" in kernel.reason


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_wide_register_blocks(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """Tiles of 32 with 8 x 8 register blocks, as CONVDSL_CUDA_MAX_TILE=128 gives at
    full size: each thread's eight elements of a slice's row take two vector loads of
    float32 and four of float64, from rows padded to stay aligned."""
    monkeypatch.setattr(conv_gemm, "MAX_TILE", 32)
    monkeypatch.setattr(conv_gemm, "THREAD_SPAN", 4)
    kernel = check_layer("input x: 4x5x4\nc = conv(36, 3, pad=same, act=relu)\noutput c",
                         "c", dtype=dtype, algo="gemm", device="cuda")
    assert "tiled 32x32x" in kernel.reason


def test_input_phases_pair_each_input_with_exactly_the_taps_that_reach_it() -> None:
    """Split into phases, the input gradient sees every input position once and, at
    each, exactly the (tap, output) pairs of the convolution's definition: every
    combination of small sizes, windows, strides, dilations, paddings and flips."""
    for size, window, stride, dilation, pad, pad_after, flip in itertools.product(
            range(1, 10), range(1, 5), range(1, 4), range(1, 3), range(4), range(3),
            (False, True)):
        span = size + pad + pad_after - dilation * (window - 1)
        if span < 1:
            continue
        out = (span - 1) // stride + 1
        expected: dict[int, set[tuple[int, int]]] = {i: set() for i in range(size)}
        for q, w in itertools.product(range(out), range(window)):
            i = q * stride + (window - 1 - w if flip else w) * dilation - pad
            if 0 <= i < size:
                expected[i].add((w, q))
        found: dict[int, set[tuple[int, int]]] = {}
        for phase in axis_phases(size, window, stride, dilation, pad, flip):
            for j in range(phase.count):
                i = phase.first + j * phase.stride
                assert i not in found
                found[i] = set()
                for t in range(phase.taps):
                    q = j + phase.shift0 + phase.shift_step * t
                    if 0 <= q < out:
                        found[i].add((phase.w0 + phase.wstep * t, q))
        assert found == expected, (size, window, stride, dilation, pad, pad_after, flip)


def test_a_strided_input_gradient_runs_one_product_per_phase() -> None:
    """Stride 2 in two axes: four phases with 4, 2, 2 and 1 of a 3x3 window's taps."""
    net = convdsl.compile("input x: 3x8x8\nc = conv(4, 3, stride=2, pad=1)\noutput c",
                          batch=2, device="cuda", warm=False)
    layer = net.stages[0].kernel
    _, backward, _ = cuda_conv.products(layer.specs[0])
    assert sorted(product.k for product in backward) == [4, 8, 8, 16]
    assert sum(product.n for product in backward) == 2 * 8 * 8
    assert "input in 4 phases" in layer.reason
