"""Shapes, parameters, buffers, fixed weights, MACs, units, receptive fields and aux totals.

Every expected number is either computed by hand (the arithmetic is in the
comment next to it) or by the small reference functions below, which are
written independently of convdsl: they count window positions one by one
instead of using the closed formula the compiler uses.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl import ConvDslError
from convdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def load(text: str) -> convdsl.Network:
    return convdsl.loads(textwrap.dedent(text).strip() + "\n")


def one_layer(input_shape: tuple[int, ...], call: str) -> convdsl.Network:
    """A network with one input and one layer named `y`, which is the output."""
    dims = "x".join(map(str, input_shape))
    return convdsl.loads(f"input {dims}\ny = {call}\noutput y\n")


def shape_of(input_shape: tuple[int, ...], call: str) -> tuple[int, ...]:
    return one_layer(input_shape, call).shapes["y"]


def fails(input_shape: tuple[int, ...], call: str, *fragments: str) -> ConvDslError:
    """The one-layer network is refused with a located error naming each fragment.

    Messages are matched loosely (the option, value or layer involved, not the
    wording) so that rewording a diagnostic does not break these tests."""
    with pytest.raises(ConvDslError) as info:
        one_layer(input_shape, call)
    diagnostic = info.value.diagnostics[0]
    assert diagnostic.span is not None and diagnostic.span.line == 2, diagnostic.render()
    for fragment in fragments:
        assert fragment in diagnostic.message, (fragment, diagnostic.render())
    return info.value


# --- independent references ---------------------------------------------------


def ref_positions(n: int, k: int, s: int = 1, d: int = 1, before: int = 0, after: int = 0) -> int:
    """Window positions along one axis, rounding down: count starts one by one."""
    padded = n + before + after
    extent = d * (k - 1) + 1
    count = 0
    start = 0
    while start + extent <= padded:
        count += 1
        start += s
    return count


def ref_pool_ceil(n: int, k: int, s: int, p: int = 0, d: int = 1) -> int:
    """PyTorch's ceil_mode, by enumeration: keep adding windows until one reaches the
    end of the padded input, but never keep a window that starts in the right padding."""
    padded = n + 2 * p
    extent = d * (k - 1) + 1
    count = 0
    start = 0
    while True:
        if start >= n + p:  # starts inside the right padding: PyTorch drops it
            break
        count += 1
        if start + extent >= padded:
            break
        start += s
    return count


def ref_same_pads(n: int, k: int, s: int, d: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME: the smallest padding giving ceil(n/s) outputs, odd extra after."""
    out = -(-n // s)
    needed = (out - 1) * s + d * (k - 1) + 1
    total = max(needed - n, 0)
    return total // 2, total - total // 2


# The references themselves, on numbers worked out by hand.
def test_reference_functions_on_hand_computed_cases():
    assert ref_positions(32, 5) == 28
    assert ref_positions(28, 2, 2) == 14
    assert ref_positions(7, 3, 2) == 3
    assert ref_positions(10, 3, 1, 2) == 6  # extent 5: starts 0..5
    assert ref_pool_ceil(6, 3, 2) == 3  # starts 0, 2, 4 (the last one sticks out)
    assert ref_pool_ceil(5, 2, 2, 1) == 3  # starts 0, 2, 4; 6 would start in the padding
    assert ref_same_pads(8, 4, 1) == (1, 2)
    assert ref_same_pads(7, 3, 2) == (1, 1)
    assert ref_same_pads(8, 3, 2) == (0, 1)


# --- conv: shapes in 1-D, 2-D and 3-D -----------------------------------------


@pytest.mark.parametrize(("input_shape", "call", "expected"), [
    # 1-D: (C, L)
    ((1, 40), "conv(4, 5)", (4, 36)),  # 40 - 5 + 1
    ((1, 40), "conv(4, 5, stride=2)", (4, 18)),  # floor(35/2) + 1
    ((1, 40), "conv(4, 5, stride=3, pad=2)", (4, 14)),  # floor((40+4-5)/3) + 1 = 13 + 1
    ((1, 40), "conv(4, 3, dilation=4)", (4, 32)),  # extent 9: 40 - 9 + 1
    ((1, 40), "conv(4, 5, pad=full)", (4, 44)),  # n + k - 1
    ((1, 40), "conv(4, 5, pad=same)", (4, 40)),
    ((1, 40), "conv(4, 5, pad=same, stride=3)", (4, 14)),  # ceil(40/3)
    ((1, 40), "conv(4, 5, pad=[3 0])", (4, 39)),  # 43 - 5 + 1
    ((2, 16000), "conv(16, 80, stride=4)", (16, 3981)),  # floor(15920/4) + 1
    # 2-D: (C, H, W)
    ((1, 32, 32), "conv(6, 5)", (6, 28, 28)),  # LeNet C1 on 32x32
    ((1, 28, 28), "conv(6, 5, pad=2)", (6, 28, 28)),
    ((3, 224, 224), "conv(64, 7, stride=2, pad=3)", (64, 112, 112)),  # floor(223/2)+1
    ((3, 224, 224), "conv(96, 11, stride=4, pad=2)", (96, 55, 55)),  # AlexNet: floor(217/4)+1
    ((3, 227, 227), "conv(96, 11, stride=4)", (96, 55, 55)),  # (227-11)/4 + 1
    ((3, 10, 20), "conv(2, 3x5)", (2, 8, 16)),
    ((3, 10, 20), "conv(2, 3x5, stride=1x2, pad=1x2)", (2, 10, 10)),  # 12-3+1; floor(19/2)+1
    ((3, 10, 20), "conv(2, 3, pad=[0 1 2 3])", (2, 9, 23)),  # H 11-3+1, W 25-3+1
    ((3, 10, 20), "conv(2, 3, pad=[1 2])", (2, 11, 21)),  # one pair on both axes
    ((3, 10, 20), "conv(2, 3, dilation=2x3, pad=full)", (2, 14, 26)),  # n + d(k-1)
    ((3, 9, 9), "conv(2, 3, stride=2, pad=same)", (2, 5, 5)),
    # 3-D: (C, D, H, W)
    ((1, 16, 32, 32), "conv(8, 3)", (8, 14, 30, 30)),
    ((1, 16, 32, 32), "conv(8, 3, pad=same)", (8, 16, 32, 32)),
    ((1, 16, 32, 32), "conv(8, 3x1x1, stride=1x2x2)", (8, 14, 16, 16)),
    ((3, 4, 5, 6), "conv(4, 3x1x2, stride=1x2x1, pad=[1 0 0 1 2 2], dilation=2x1x1)",
     (4, 1, 3, 9)),  # D: 5-5+1, H: floor((6-1)/2)+1, W: 10-2+1
])
def test_conv_output_shapes(input_shape, call, expected):
    assert shape_of(input_shape, call) == expected


def _conv_reference(n: int, k: int, s: int, d: int, pad: str) -> int:
    if pad == "valid":
        return ref_positions(n, k, s, d)
    if pad == "full":
        return ref_positions(n, k, s, d, d * (k - 1), d * (k - 1))
    if pad == "same":
        return ref_positions(n, k, s, d, *ref_same_pads(n, k, s, d))
    before, after = map(int, pad.split())
    return ref_positions(n, k, s, d, before, after)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 40), k=st.integers(1, 7), s=st.integers(1, 4), d=st.integers(1, 3),
       pad=st.sampled_from(["valid", "same", "full", "0 0", "1 0", "0 2", "3 3"]),
       axes=st.integers(1, 3))
def test_conv_shape_matches_reference(n, k, s, d, pad, axes):
    option = pad if pad in ("valid", "same", "full") else "[" + pad + "]"
    expected = _conv_reference(n, k, s, d, pad)
    input_shape = (2, *([n] * axes))
    call = f"conv(3, {k}, stride={s}, dilation={d}, pad={option})"
    if expected < 1:
        fails(input_shape, call, "'y'")
        return
    assert shape_of(input_shape, call) == (3, *([expected] * axes))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), k=st.integers(1, 9), s=st.integers(1, 5), d=st.integers(1, 3))
def test_same_padding_gives_ceil_n_over_s(n, k, s, d):
    assert shape_of((1, n), f"conv(1, {k}, stride={s}, dilation={d}, pad=same)") == (1, -(-n // s))


@pytest.mark.parametrize(("n", "k", "s", "pads", "out"), [
    (8, 4, 1, (1, 2), 8),  # odd total: the extra goes after
    (7, 3, 2, (1, 1), 4),
    (8, 3, 2, (0, 1), 4),
    (5, 1, 2, (0, 0), 3),
    (4, 7, 1, (3, 3), 4),  # a window larger than the input
])
def test_same_padding_as_tensorflow(n, k, s, pads, out):
    net = one_layer((1, n), f"conv(1, {k}, stride={s}, pad=same)")
    assert net.windows["y"].pads == (pads,)
    assert net.shapes["y"] == (1, out)
    assert ref_same_pads(n, k, s) == pads


def test_explicit_padding_forms_resolve_per_axis():
    def pads(call: str, input_shape=(1, 10, 12)):
        return one_layer(input_shape, call).windows["y"].pads

    assert pads("conv(1, 3, pad=2)") == ((2, 2), (2, 2))
    assert pads("conv(1, 3, pad=1x2)") == ((1, 1), (2, 2))
    assert pads("conv(1, 3, pad=[1 2])") == ((1, 2), (1, 2))
    assert pads("conv(1, 3, pad=[0 1 2 3])") == ((0, 1), (2, 3))
    assert pads("conv(1, 3, pad=valid)") == ((0, 0), (0, 0))
    assert pads("conv(1, 3, pad=full)") == ((2, 2), (2, 2))
    assert pads("conv(1, 3, dilation=2, pad=full)") == ((4, 4), (4, 4))
    assert pads("conv(1, 3, pad=[1 2 3 4 5 6])", (1, 4, 4, 4)) == ((1, 2), (3, 4), (5, 6))


@pytest.mark.parametrize("call", [
    "conv(1, 3, pad=[1 2 3 4 5 6])",  # three axes for a 2-D input
    "conv(1, 3, pad=1x2x3)",
    "conv(1, 3x3x3)",
    "conv(1, 3, stride=1x2x1)",
    "conv(1, 3, dilation=1x1x1)",
])
def test_per_axis_options_must_match_the_axes(call):
    fails((1, 10, 10), call, "'y'")


@pytest.mark.parametrize("option", [
    "pad=[1 2 3]", "pad=[]", "pad=-1", "pad=middle", "pad=[1 2 3 4 5 6 7 8]", "pad=[1 -1]",
    "stride=0", "window=0", "dilation=0", "stride=1.5", "window=1x1x1x1", "groups=0",
])
def test_invalid_conv_option_values(option):
    call = f"conv(1, {option})" if option.startswith("window") else f"conv(1, 3, {option})"
    fails((1, 10, 10), call, option.split("=")[0])


def test_window_larger_than_input_reports_the_arithmetic():
    err = fails((1, 4, 4), "conv(1, 5)", "'y'")
    assert "(4 + 0 + 0 - 1*(5-1) - 1)" in err.diagnostics[0].message


# --- pooling: floor and ceil exactly as PyTorch ---------------------------------


# The rows with n <= 13 were checked against PyTorch 2.11 (F.max_pool1d and
# F.avg_pool1d with ceil_mode False and True); the others follow the same rule.
@pytest.mark.parametrize(("n", "k", "s", "p", "floor_out", "ceil_out"), [
    (28, 2, 2, 0, 14, 14),
    (5, 2, 2, 0, 2, 3),  # ceil keeps the half-empty window at 4
    (6, 3, 2, 0, 2, 3),  # windows at 0, 2; ceil adds 4 (sticks out by 1)
    (7, 3, 2, 0, 3, 3),
    (5, 2, 2, 1, 3, 3),  # ceil would add a window at 6 = n + p: in the padding, dropped
    (3, 2, 2, 1, 2, 2),  # same drop: the window at 4 = 3 + 1 starts in the padding
    (7, 2, 2, 1, 4, 4),  # and again at 8
    (6, 2, 2, 1, 4, 4),  # the window at 6 < 7 starts in the input: kept either way
    (4, 3, 2, 1, 2, 3),  # ceil adds a window at 4 < 5 that covers input position 3
    (112, 3, 2, 1, 56, 57),  # ResNet's stem pooling (floor); ceil adds a window at 112
    (55, 3, 2, 0, 27, 27),  # AlexNet
    (13, 3, 2, 0, 6, 6),
    (14, 3, 2, 0, 6, 7),  # GoogLeNet uses ceil_mode: 112 -> 56 -> 28 -> 14 -> 7
    (10, 4, 3, 2, 4, 4),
    (11, 4, 3, 2, 4, 5),
])
def test_pool_rounding_matches_pytorch(n, k, s, p, floor_out, ceil_out):
    for op in ("maxpool", "avgpool", "softpool"):
        floor_call = f"{op}({k}, stride={s}, pad={p})"
        assert shape_of((3, n), floor_call) == (3, floor_out)
        assert shape_of((3, n), floor_call.replace(")", ", round=floor)")) == (3, floor_out)
        assert shape_of((3, n), floor_call.replace(")", ", round=ceil)")) == (3, ceil_out)
    assert ref_positions(n, k, s, 1, p, p) == floor_out
    assert ref_pool_ceil(n, k, s, p) == ceil_out


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 6), s=st.integers(1, 4), d=st.integers(1, 3),
       data=st.data())
def test_maxpool_shape_matches_reference(n, k, s, d, data):
    p = data.draw(st.integers(0, k // 2))
    ceil = data.draw(st.booleans())
    call = f"maxpool({k}, stride={s}, pad={p}, dilation={d}, round={'ceil' if ceil else 'floor'})"
    expected = ref_pool_ceil(n, k, s, p, d) if ceil else ref_positions(n, k, s, d, p, p)
    if d * (k - 1) + 1 > n + 2 * p:
        if ceil:
            # PyTorch's own arithmetic (ATen's pooling_output_shape): rounding up may
            # still leave one partial window, e.g. MaxPool1d(2, ceil_mode=True) on 1.
            size = -(-(n + 2 * p - d * (k - 1) - 1) // s) + 1
            if (size - 1) * s >= n + p:
                size -= 1
            if size >= 1:
                assert shape_of((1, n), call) == (1, size)
                return
        with pytest.raises(ConvDslError):  # as PyTorch: "output size is too small"
            shape_of((1, n), call)
        return
    assert shape_of((1, n), call) == (1, expected)


@pytest.mark.parametrize(("input_shape", "call", "expected"), [
    ((6, 28, 28), "maxpool(2)", (6, 14, 14)),  # stride defaults to the window
    ((6, 27, 27), "maxpool(2)", (6, 13, 13)),
    ((6, 27, 27), "maxpool(2, round=ceil)", (6, 14, 14)),
    ((6, 28, 28), "maxpool(3, stride=1, pad=1)", (6, 28, 28)),
    ((6, 28, 28), "avgpool(2x4)", (6, 14, 7)),
    ((6, 28, 28), "avgpool(2x4, stride=1x2, pad=1x2)", (6, 29, 15)),  # 30-2+1; floor(28/2)+1
    ((6, 28, 28), "avgpool(3, pad=valid)", (6, 9, 9)),
    ((6, 28, 28), "avgpool(2, count_pad=no)", (6, 14, 14)),
    ((6, 28, 28), "softpool(2)", (6, 14, 14)),
    ((6, 10, 10), "maxpool(3, stride=1, dilation=2)", (6, 6, 6)),  # extent 5
    ((2, 8, 9, 10), "maxpool(2)", (2, 4, 4, 5)),
    ((2, 8, 9, 10), "maxpool(2, round=ceil)", (2, 4, 5, 5)),
    ((2, 8, 9, 10), "avgpool(2x3x1, stride=2x3x1)", (2, 4, 3, 10)),
    ((4, 40), "maxpool(4)", (4, 10)),
    ((4, 41), "softpool(4, round=ceil)", (4, 11)),
])
def test_pool_output_shapes(input_shape, call, expected):
    assert shape_of(input_shape, call) == expected


@pytest.mark.parametrize(("call", "fragment"), [
    ("maxpool(2, pad=2)", "2"),  # more than half the window
    ("maxpool(3, pad=2)", "2"),
    ("maxpool(2, pad=same)", "same"),  # pooling takes explicit, symmetric padding only
    ("maxpool(2, pad=[0 1])", "pad"),
    ("maxpool(2, round=up)", "up"),
    ("avgpool(2, dilation=2)", "dilation"),  # maxpool only
    ("softpool(2, count_pad=no)", "count_pad"),  # avgpool only
    ("maxpool(2, count_pad=no)", "count_pad"),
    ("maxpool", "window"),
])
def test_pool_option_errors(call, fragment):
    fails((1, 8, 8), call, fragment)


def test_pool_padding_up_to_half_the_window_is_accepted():
    assert shape_of((1, 8, 8), "maxpool(3, pad=1)") == (1, 3, 3)  # floor(8/3)+1
    assert shape_of((1, 8, 8), "maxpool(5, stride=1, pad=2)") == (1, 8, 8)
    assert shape_of((1, 8, 8), "maxpool(4x2, pad=2x1)") == (1, 3, 5)  # floor(12/4)+1, 10/2+1


@pytest.mark.parametrize("op", ["global_avgpool", "global_maxpool"])
@pytest.mark.parametrize(("input_shape", "out"), [((4, 40), (4,)), ((5, 7, 9), (5,)),
                                                  ((6, 2, 3, 4), (6,))])
def test_global_pools(op, input_shape, out):
    net = one_layer(input_shape, op)
    assert net.shapes["y"] == out
    assert net.counts["y"].params == net.counts["y"].macs == 0
    field = net.counts["y"].receptive_field
    assert field.size == field.jump == input_shape[1:]  # they see the whole input


# --- layers that keep or reshape their input ---------------------------------


@pytest.mark.parametrize("call", [
    "identity", "relu", "relu()", "relu6", "leaky_relu", "leaky_relu(0.2)",
    "leaky_relu(slope=0.5)", "elu", "elu(2)", "elu(alpha=0.5)", "sigmoid", "tanh", "softmax",
    "bn", "bn(eps=1e-3, momentum=0.01, affine=no, act=relu)", "dropout", "dropout(0.3)",
    "dropout(p=0)",
])
@pytest.mark.parametrize("input_shape", [(3, 10), (3, 10, 11), (3, 4, 5, 6), (7,)])
def test_shape_preserving_layers(call, input_shape):
    if len(input_shape) == 1:
        dims = "x".join(map(str, (1, *input_shape)))
        net = convdsl.loads(f"input {dims}\nflatten\ny = {call}\noutput y\n")
    else:
        net = one_layer(input_shape, call)
    assert net.shapes["y"] == input_shape
    assert net.counts["y"].macs == 0


@pytest.mark.parametrize(("call", "fragment"), [
    ("leaky_relu(slope=yes)", "slope"),
    ("elu(0)", "alpha"),
    ("elu(-1)", "alpha"),
    ("dropout(1)", "'p'"),
    ("dropout(-0.1)", "'p'"),
    ("bn(eps=0)", "eps"),
    ("bn(momentum=1)", "momentum"),
    ("bn(affine=maybe)", "affine"),
    ("relu(2)", "relu"),
    ("relu(act=relu)", "act"),
    ("sigmoid(slope=1)", "slope"),
    ("bn(act=swish)", "swish"),
])
def test_activation_bn_dropout_option_errors(call, fragment):
    fails((3, 8), call, fragment)


@pytest.mark.parametrize(("input_shape", "flat"), [((16, 5, 5), 400), ((4, 40), 160),
                                                   ((2, 3, 4, 5), 120)])
def test_flatten(input_shape, flat):
    assert shape_of(input_shape, "flatten") == (flat,)


def test_flatten_of_a_flat_vector_is_unchanged():
    net = load("""
        input 2x3x4
        x = flatten -> flatten
        output x
    """)
    assert net.shapes["x.1"] == (24,)


def test_dense_needs_a_flat_input_and_windows_need_a_map():
    fails((3, 8, 8), "dense(10)", "'y'", "3x8x8")
    for call in ("conv(2, 1)", "maxpool(1)", "filter(1, kernel=[1])", "global_avgpool"):
        with pytest.raises(ConvDslError) as info:
            load(f"input 3x8\nflatten\ny = {call}\noutput y")
        assert "'y'" in info.value.diagnostics[0].message
        assert "24" in info.value.diagnostics[0].message  # the flat input's size


def test_concat_and_add_shapes():
    net = load("""
        input 3x16x16
        a = conv(8, 3, pad=same)
        b = input -> conv(4, 1)
        c = input -> maxpool(3, stride=1, pad=1)
        cat = concat(a, b, c)
        s = a -> add(a, act=relu)
        flat = cat -> flatten
        f2 = s -> global_avgpool
        both = concat(flat, f2)
        output both
    """)
    assert net.shapes["cat"] == (15, 16, 16)
    assert net.shapes["s"] == (8, 16, 16)
    assert net.shapes["both"] == (15 * 256 + 8,)
    assert net.graph.layer("s").inputs == ("a", "a")


@pytest.mark.parametrize(("lines", "shapes"), [
    ("a = conv(8, 3)\nb = input -> conv(8, 1)\nc = add(a, b)", ("8x14x14", "8x16x16")),
    ("a = conv(8, 1)\nb = input -> conv(4, 1)\nc = add(a, b)", ("8x16x16", "4x16x16")),
    ("a = conv(8, 3)\nb = input -> conv(8, 1)\nc = concat(a, b)", ("8x14x14", "8x16x16")),
    ("a = flatten\nb = input -> conv(8, 1)\nc = concat(a, b)", ("768", "8x16x16")),
])
def test_merge_shape_errors(lines, shapes):
    with pytest.raises(ConvDslError) as info:
        convdsl.loads(f"input 3x16x16\n{lines}\noutput c\n")
    diagnostic = info.value.diagnostics[0]
    assert diagnostic.span.line == 4
    for shape in shapes:
        assert shape in diagnostic.message


# --- parameters, buffers, fixed weights, MACs, units ----------------------------


def conv_params(c_in, c_out, window, groups=1, bias=True):
    return c_out * (c_in // groups) * math.prod(window) + (c_out if bias else 0)


@pytest.mark.parametrize(("input_shape", "call", "params", "macs"), [
    # the lecture's #r * #u * window (+ one bias per output channel)
    ((1, 32, 32), "conv(6, 5)", 6 * 1 * 25 + 6, 6 * 28 * 28 * 25),
    ((6, 14, 14), "conv(16, 5)", 16 * 6 * 25 + 16, 16 * 10 * 10 * 6 * 25),
    ((6, 14, 14), "conv(16, 5, bias=no)", 16 * 6 * 25, 16 * 10 * 10 * 6 * 25),
    ((384, 13, 13), "conv(384, 3, pad=1)", 384 * 384 * 9 + 384, 384 * 169 * 384 * 9),
    ((4, 8, 8), "conv(8, 3, groups=4, bias=off)", 72, 8 * 36 * 1 * 9),
    ((4, 8, 8), "conv(4, 3, groups=4)", 4 * 9 + 4, 4 * 36 * 9),  # depthwise
    ((6, 8, 8), "conv(9, 3x1, groups=3)", 9 * 2 * 3 + 9, 9 * 6 * 8 * 2 * 3),
    ((2, 50), "conv(3, 5, stride=5)", 3 * 2 * 5 + 3, 3 * 10 * 2 * 5),
    ((2, 6, 7, 8), "conv(4, 3x2x1, bias=false)", 4 * 2 * 6, 4 * 4 * 6 * 8 * 2 * 6),
    ((3, 10, 10), "conv(5, 3, dilation=2, stride=2, pad=same)", 5 * 3 * 9 + 5, 5 * 25 * 3 * 9),
    ((3, 10, 10), "conv(5, 3, mode=convolution, algo=fft)", 5 * 3 * 9 + 5, 5 * 64 * 3 * 9),
])
def test_conv_params_and_macs(input_shape, call, params, macs):
    net = one_layer(input_shape, call)
    counts = net.counts["y"]
    assert counts.params == params
    assert counts.macs == macs
    assert counts.flops == 2 * macs
    assert counts.buffers == counts.fixed == 0
    assert counts.units == math.prod(net.shapes["y"])


@settings(max_examples=60, deadline=None)
@given(c_in=st.integers(1, 12), groups=st.integers(1, 4), out_mult=st.integers(1, 4),
       kh=st.integers(1, 4), kw=st.integers(1, 4), bias=st.booleans())
def test_conv_params_formula(c_in, groups, out_mult, kh, kw, bias):
    c_in *= groups
    c_out = out_mult * groups
    net = one_layer((c_in, 9, 9), f"conv({c_out}, {kh}x{kw}, groups={groups}, "
                                  f"bias={'yes' if bias else 'no'})")
    assert net.counts["y"].params == conv_params(c_in, c_out, (kh, kw), groups, bias)
    out_elems = c_out * (10 - kh) * (10 - kw)
    assert net.counts["y"].macs == out_elems * (c_in // groups) * kh * kw


@pytest.mark.parametrize(("channels", "out", "groups"), [(4, 8, 3), (6, 4, 4), (5, 10, 2)])
def test_groups_must_divide_both_channel_counts(channels, out, groups):
    fails((channels, 8, 8), f"conv({out}, 3, groups={groups})", str(groups))


@pytest.mark.parametrize("value", ["yes", "true", "on", "1"])
def test_true_spellings(value):
    assert one_layer((2, 8), f"conv(3, 1, bias={value})").counts["y"].params == 9


@pytest.mark.parametrize("value", ["no", "false", "off", "0"])
def test_false_spellings(value):
    assert one_layer((2, 8), f"conv(3, 1, bias={value})").counts["y"].params == 6


def test_dense_params_and_macs():
    net = load("""
        input 16x5x5
        flatten
        f5 = dense(120, act=relu)
        f6 = dense(84, bias=no)
        out = dense(units=10, act=softmax)
        output out
    """)
    assert net.counts["f5"].params == 400 * 120 + 120
    assert net.counts["f5"].macs == 400 * 120
    assert net.counts["f6"].params == 120 * 84
    assert net.counts["out"].params == 84 * 10 + 10
    assert net.shapes["out"] == (10,)


@pytest.mark.parametrize(("input_shape", "call", "params", "buffers"), [
    ((16, 8, 8), "bn", 32, 32),
    ((16, 8, 8), "bn(affine=no)", 0, 32),
    ((16, 8), "bn(act=relu)", 32, 32),
    ((5, 2, 2, 2), "bn", 10, 10),
])
def test_batchnorm_params_and_buffers(input_shape, call, params, buffers):
    counts = one_layer(input_shape, call).counts["y"]
    assert (counts.params, counts.buffers, counts.macs) == (params, buffers, 0)


def test_batchnorm_on_a_flat_vector_counts_per_feature():
    net = load("input 3x4\nflatten\ny = bn\noutput y")
    assert (net.counts["y"].params, net.counts["y"].buffers) == (24, 24)


@pytest.mark.parametrize(("input_shape", "call", "fixed", "out"), [
    ((3, 20), "filter(5, kernel=[1 4 6 4 1] / 16)", 5, (3, 16)),
    ((3, 20), "filter(3, kernel=[-1 0 1], pad=same)", 3, (3, 20)),
    ((3, 20), "filter(3, kernel=[-1 0 1], mode=convolution, stride=2)", 3, (3, 9)),
    ((2, 8, 8), "filter(3, kernel=[[1 2 1] [2 4 2] [1 2 1]] / 16)", 9, (2, 6, 6)),
    ((2, 8, 8), "filter(3, kernel=[1 2 1 2 4 2 1 2 1] / 16, pad=full)", 9, (2, 10, 10)),
    ((2, 8, 8), "filter(1x3, kernel=[-1 0 1], dilation=2, act=relu)", 3, (2, 8, 4)),
    ((1, 4, 4, 4), "filter(2, kernel=[1 1 1 1 1 1 1 1] / 8)", 8, (1, 3, 3, 3)),
])
def test_filter_fixed_weights(input_shape, call, fixed, out):
    net = one_layer(input_shape, call)
    counts = net.counts["y"]
    assert net.shapes["y"] == out
    assert (counts.params, counts.buffers, counts.fixed) == (0, 0, fixed)
    assert counts.macs == math.prod(out) * fixed
    assert net.fixed == fixed


def test_filter_kernel_values_are_scaled_and_kept():
    net = one_layer((1, 8, 8), "filter(3, kernel=[[1 2 1] [2 4 2] [1 2 1]] / 16)")
    attrs = net.graph.layer("y").attrs
    assert attrs.kernel == (1 / 16, 2 / 16, 1 / 16, 2 / 16, 4 / 16, 2 / 16, 1 / 16, 2 / 16, 1 / 16)
    assert attrs.kernel_shape == (3, 3)
    assert attrs.flip is False
    flipped = one_layer((1, 8), "filter(3, kernel=[-1 0 1], mode=convolution)")
    assert flipped.graph.layer("y").attrs.flip is True
    assert flipped.graph.layer("y").attrs.kernel == (-1.0, 0.0, 1.0)
    assert flipped.graph.layer("y").attrs.kernel_shape == ()


@pytest.mark.parametrize(("call", "fragments"), [
    ("filter(3, kernel=[1 2])", ("2", "3x3", "9")),
    ("filter(3, kernel=[[1 2 1] [2 4 2]])", ("2x3", "3x3")),
    ("filter(2x3, kernel=[[1 2] [3 4] [5 6]])", ("3x2", "2x3")),
    ("filter(3, kernel=[[1 2 1] [2 4]])", ("kernel",)),
    ("filter(3, kernel=[a b c d e f g h i])", ("kernel",)),
    ("filter(3)", ("kernel",)),
    ("filter(3, kernel=3)", ("kernel",)),
    ("filter(3, kernel=[])", ("kernel",)),
    ("filter(3, kernel=[1 2 3] / 0)", ("zero",)),
])
def test_filter_kernel_errors(call, fragments):
    fails((1, 8, 8), call, *fragments)


def test_units_follow_the_lecture_for_lenet5():
    net = convdsl.load(ROOT / "networks" / "lenet5.cnn")
    units = {name: net.counts[name].units for name in net.shapes}
    assert units["c1"] == 4704  # 6 x 28 x 28
    assert units["c3"] == 1600  # 16 x 10 x 10
    assert units["s4"] == 400
    assert units["image"] == 784
    assert net.units == sum(units.values()) - units["image"]  # inputs are not units
    assert net.activation_bytes == 4 * net.units


def test_lenet5_totals():
    net = convdsl.load(ROOT / "networks" / "lenet5.cnn")
    assert net.params == 156 + 2416 + 48120 + 10164 + 850 == 61706
    assert net.macs == 117600 + 240000 + 48000 + 10080 + 840 == 416520
    assert net.flops == 2 * net.macs
    assert net.buffers == net.fixed == 0
    assert net.output_shape == (10,)
    assert net.shapes["s2"] == (6, 14, 14)


def test_pooling_activations_and_merges_cost_no_macs():
    net = load("""
        input 3x8x8
        a = conv(3, 1)
        b = maxpool(2, stride=1) -> avgpool(2, stride=1, pad=1) -> softpool(1) -> relu
        c = add(a, b)
        d = concat(a, c) -> bn -> dropout -> global_maxpool
        output d
    """)
    for layer in net.layers:
        if layer.name != "a" and layer.op.value not in ("bn",):
            assert net.counts[layer.name].macs == 0, layer.name
    assert net.macs == 3 * 64 * 3


def test_resnet18_matches_torchvision():
    text = (ROOT / "docs" / "language.md").read_text("utf-8")
    start = text.index("```cnn\nnetwork resnet18")
    source = text[start + len("```cnn\n"):text.index("```", start + 6)]
    net = convdsl.loads(source)
    assert net.params == 11_689_512  # torchvision.models.resnet18
    assert net.buffers == 9_600
    assert net.macs == 1_814_073_344  # torchvision's "GFLOPS" column: 1.81
    assert net.shapes["layer4.1.out"] == (512, 7, 7)
    assert net.counts["layer4.1.out"].receptive_field.size == (435, 435)
    assert net.counts["layer4.1.out"].receptive_field.jump == (32, 32)


# --- receptive field and jump ---------------------------------------------------


def fields(net: convdsl.Network, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    field = net.counts[name].receptive_field
    return field.size, field.jump


def test_two_3x3_convs_see_5x5_and_three_see_7x7():
    net = load("""
        input 1x32x32
        a = conv(4, 3)
        b = conv(4, 3)
        c = conv(4, 3)
        one = input -> conv(4, 7)
        output c
        aux one
    """)
    assert fields(net, "input") == ((1, 1), (1, 1))
    assert fields(net, "a") == ((3, 3), (1, 1))
    assert fields(net, "b") == ((5, 5), (1, 1))
    assert fields(net, "c") == ((7, 7), (1, 1)) == (fields(net, "one")[0], (1, 1))
    # the lecture's VGG argument: 3 * (3x3) = 27 < 49 (7x7) weights per channel pair
    per_pair = sum(net.counts[n].params - 4 for n in "bc") + net.counts["a"].params - 4
    assert per_pair == 4 * 9 + 2 * 4 * 4 * 9
    assert net.counts["one"].params - 4 == 4 * 49


def test_pooling_doubles_the_jump():
    net = load("""
        input 1x32x32
        a = conv(4, 3)
        p = maxpool(2)
        b = conv(4, 3)
        q = avgpool(3, stride=3)
        c = conv(4, 3)
        output c
    """)
    assert fields(net, "a") == ((3, 3), (1, 1))
    assert fields(net, "p") == ((4, 4), (2, 2))  # 3 + (2-1)*1
    assert fields(net, "b") == ((8, 8), (2, 2))  # 4 + (3-1)*2: a 3x3 conv now adds 4
    assert fields(net, "q") == ((12, 12), (6, 6))  # 8 + 2*2
    assert fields(net, "c") == ((24, 24), (6, 6))  # 12 + 2*6


def test_receptive_field_with_stride_dilation_and_per_axis_windows():
    net = load("""
        input 1x64x64
        a = conv(2, 3, dilation=2)
        b = conv(2, 5x1, stride=2x1)
        c = conv(2, 3, dilation=1x3, pad=same)
        output c
    """)
    assert fields(net, "a") == ((5, 5), (1, 1))
    assert fields(net, "b") == ((9, 5), (2, 1))
    assert fields(net, "c") == ((13, 11), (2, 1))  # 9 + 2*2, 5 + 3*2*1


def test_receptive_field_in_1d_and_3d_and_padding_does_not_matter():
    net = load("""
        input sig: 1x100
        a = conv(2, 5, stride=2)
        b = conv(2, 5, stride=2, pad=2)
        output b
    """)
    assert fields(net, "a") == ((5,), (2,))
    assert fields(net, "b") == ((13,), (4,))
    net3 = load("""
        input 1x8x16x16
        a = conv(2, 3x1x1)
        b = maxpool(1x2x2)
        c = conv(2, 3)
        output c
    """)
    assert fields(net3, "b") == ((3, 2, 2), (1, 2, 2))
    assert fields(net3, "c") == ((5, 6, 6), (1, 2, 2))  # 3 + 2*1, 2 + 2*2


def test_receptive_field_passes_through_windowless_layers_and_merges_take_the_max():
    net = load("""
        input 1x32x32
        a = conv(2, 3, pad=same) -> relu -> bn -> dropout
        b = input -> conv(2, 5, stride=2) -> maxpool(1, stride=1)
        c = input -> conv(2, 7, pad=same)
        s = concat(a, c)
        f = a -> flatten
        d = b -> global_avgpool -> dense(3)
        output s
        output d
        aux f
    """)
    assert fields(net, "a.3") == ((3, 3), (1, 1))
    assert fields(net, "f") == ((3, 3), (1, 1))  # flatten keeps its input's field
    assert fields(net, "b.1") == ((5, 5), (2, 2))
    assert fields(net, "s") == ((7, 7), (1, 1))
    assert fields(net, "d.0") == ((32, 32), (32, 32))  # the whole input
    assert fields(net, "d.1") == ((32, 32), (32, 32))


def test_lenet_receptive_fields():
    net = convdsl.load(ROOT / "networks" / "lenet5.cnn")
    assert fields(net, "c1") == ((5, 5), (1, 1))
    assert fields(net, "s2") == ((6, 6), (2, 2))
    assert fields(net, "c3") == ((14, 14), (2, 2))
    assert fields(net, "s4") == ((16, 16), (4, 4))
    assert fields(net, "out") == ((28, 28), (28, 28))


# --- auxiliary heads ---------------------------------------------------------------

AUX_NET = """
    input 3x16x16
    stem = conv(8, 3, pad=same, act=relu)
    trunk = bn -> conv(8, 3, pad=same)
    head = global_avgpool -> dense(10)
    side = stem -> avgpool(4) -> conv(4, 1) -> bn -> flatten -> dense(10)
    side2 = trunk -> global_maxpool -> dense(5)
    output head
    aux side loss=mse weight=0.3
    aux side2
"""


def test_aux_layers_are_those_only_aux_outputs_need():
    net = load(AUX_NET)
    aux = {name for name, counts in net.counts.items() if counts.aux}
    assert aux == {"side.0", "side.1", "side.2", "side.3", "side.4", "side2.0", "side2.1"}
    for shared in ("input", "stem", "trunk.0", "trunk.1", "head.0", "head.1"):
        assert not net.counts[shared].aux
    outputs = {o.name: o for o in net.outputs}  # keyed by the layer each statement names
    assert set(outputs) == {"head.1", "side.4", "side2.1"}
    assert outputs["head.1"].aux is False and outputs["head.1"].loss.value == "cross_entropy"
    assert outputs["head.1"].weight == 1.0
    assert outputs["side.4"].aux and outputs["side.4"].loss.value == "mse"
    assert outputs["side.4"].weight == 0.3
    assert outputs["side2.1"].aux


def test_totals_with_and_without_aux():
    net = load(AUX_NET)
    side_params = (8 * 4 * 1 + 4) + 2 * 4 + (4 * 16 * 10 + 10)
    side2_params = 8 * 5 + 5
    main_params = (8 * 3 * 9 + 8) + 16 + (8 * 8 * 9 + 8) + (8 * 10 + 10)
    assert net.params == main_params + side_params + side2_params
    assert net.params_without_aux == main_params
    assert net.buffers == 16 + 8
    assert net.buffers_without_aux == 16
    side_macs = 4 * 16 * 8 + 64 * 10 + 8 * 5
    assert net.macs - net.macs_without_aux == side_macs


def test_a_layer_shared_by_main_and_aux_outputs_is_not_aux():
    net = load("""
        input 1x8
        a = conv(2, 3)
        b = flatten -> dense(2)
        output b
        aux a
    """)
    assert not any(c.aux for c in net.counts.values())
    assert net.params == net.params_without_aux


# --- the JSON summary ---------------------------------------------------------------


def run_json(capsys, path: Path) -> dict:
    assert main(["summary", "--json", str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def test_summary_json_of_lenet5(capsys):
    data = run_json(capsys, ROOT / "networks" / "lenet5.cnn")
    for key in ("params", "params_without_aux", "buffers", "macs", "layers"):
        assert key in data
    assert data["params"] == data["params_without_aux"] == 61706
    assert data["buffers"] == 0
    assert data["macs"] == 416520
    assert data["name"] == "lenet5"
    names = [layer["name"] for layer in data["layers"]]
    assert names == ["image", "c1", "s2", "c3", "s4", "flatten_1", "f5", "f6", "out"]
    for layer in data["layers"]:
        for key in ("name", "op", "output_shape", "params", "macs", "receptive_field"):
            assert key in layer
    c1 = data["layers"][1]
    assert c1 == {**c1, "name": "c1", "op": "conv", "output_shape": [6, 28, 28], "params": 156,
                  "macs": 117600, "receptive_field": [5, 5], "jump": [1, 1], "units": 4704}
    assert data["layers"][5]["output_shape"] == [400]
    assert data["outputs"] == [{"name": "out", "loss": "cross_entropy", "weight": 1.0,
                                "aux": False, "shape": [10]}]


def test_summary_json_with_aux_and_batchnorm(capsys, tmp_path):
    path = tmp_path / "aux.cnn"
    path.write_text(textwrap.dedent(AUX_NET), encoding="utf-8")
    data = run_json(capsys, path)
    net = load(AUX_NET)
    assert data["params"] == net.params
    assert data["params_without_aux"] == net.params_without_aux < data["params"]
    assert data["buffers"] == 24
    assert data["macs"] == net.macs
    assert data["name"] == "aux"  # the file's stem
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["side.2"]["op"] == "bn" and by_name["side.2"]["aux"] is True
    assert by_name["trunk.0"]["buffers"] == 16
    assert by_name["head.0"]["receptive_field"] == [16, 16]
    assert [o["aux"] for o in data["outputs"]] == [False, True, True]


def test_summary_json_reports_fixed_weights(capsys, tmp_path):
    path = tmp_path / "f.cnn"
    path.write_text("input 1x8x8\ny = filter(3, kernel=[1 2 1 2 4 2 1 2 1] / 16)\noutput y\n")
    data = run_json(capsys, path)
    assert data["fixed"] == 9 and data["params"] == 0
    assert data["layers"][1]["fixed"] == 9


def test_summary_json_on_an_invalid_file_exits_1(capsys, tmp_path):
    path = tmp_path / "bad.cnn"
    path.write_text("input 1x8\ny = conv(2, 9)\noutput y\n")
    assert main(["summary", "--json", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "larger than its padded input" in captured.err


# --- optional: cross-check against PyTorch ------------------------------------------


def test_shapes_and_params_agree_with_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cases = [
        ((3, 7), "maxpool(3, stride=2, round=ceil)", nn.MaxPool1d(3, 2, ceil_mode=True)),
        ((3, 5), "maxpool(2, pad=1, round=ceil)", nn.MaxPool1d(2, 2, 1, ceil_mode=True)),
        ((3, 6), "maxpool(3, stride=2, round=ceil)", nn.MaxPool1d(3, 2, ceil_mode=True)),
        ((3, 4), "avgpool(3, stride=2, pad=1, round=ceil)",
         nn.AvgPool1d(3, 2, 1, ceil_mode=True)),
        ((3, 11), "avgpool(4, stride=3, pad=2, round=ceil)",
         nn.AvgPool1d(4, 3, 2, ceil_mode=True)),
        ((3, 14, 13), "maxpool(3, stride=2, round=ceil)", nn.MaxPool2d(3, 2, ceil_mode=True)),
        ((3, 10, 10), "maxpool(3, stride=1, dilation=2, pad=1)",
         nn.MaxPool2d(3, 1, 1, dilation=2)),
        ((4, 9, 9), "conv(8, 3, stride=2, pad=1, groups=2)", nn.Conv2d(4, 8, 3, 2, 1, groups=2)),
        ((4, 9, 9), "conv(8, 3, dilation=2, pad=same)",
         nn.Conv2d(4, 8, 3, dilation=2, padding="same")),
        ((4, 9, 9), "conv(8, 4, pad=same, bias=no)",
         nn.Conv2d(4, 8, 4, padding="same", bias=False)),
        ((2, 5, 6, 7), "conv(3, 3x1x2, stride=2)", nn.Conv3d(2, 3, (3, 1, 2), 2)),
        ((5, 20), "conv(4, 5, pad=3, dilation=2)", nn.Conv1d(5, 4, 5, padding=3, dilation=2)),
        ((6, 8, 8), "bn", nn.BatchNorm2d(6)),
    ]
    for input_shape, call, module in cases:
        net = one_layer(input_shape, call)
        out = module(torch.zeros(1, *input_shape))
        assert net.shapes["y"] == tuple(out.shape[1:]), call
        trainable = sum(p.numel() for p in module.parameters())
        assert net.counts["y"].params == trainable, call
        buffers = sum(b.numel() for name, b in module.named_buffers()
                      if name != "num_batches_tracked")
        assert net.counts["y"].buffers == buffers, call
