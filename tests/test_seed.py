"""The lecture's statements about convolution and pooling (shared/seed, "Lecture 1:
Convolutional Neural Networks"), as properties of networks run by a back end.

Every test runs networks only through the `run(text, x, params)` fixture below, so that
another back end (the generated kernels) can be added to BACKENDS and checked against the
same statements without touching the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.ir.ops import FilterAttrs
from convdsl.runtime.params import init_params
from convdsl.runtime.reference import ReferenceNetwork
from convdsl.toeplitz import toeplitz

Run = Callable[[str, np.ndarray, "dict[str, np.ndarray] | None"], np.ndarray]
ROOT = Path(__file__).resolve().parents[1]


def run_reference(text: str, x: np.ndarray, params: dict[str, np.ndarray] | None = None
                  ) -> np.ndarray:
    """The network's main output for x (batch first); parameters not given keep their
    seeded initial values."""
    network = convdsl.loads(text)
    return ReferenceNetwork(network, {**init_params(network), **(params or {})}).forward(x)


BACKENDS: dict[str, Run] = {"reference": run_reference}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def run(request: pytest.FixtureRequest) -> Run:
    return BACKENDS[request.param]


SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**32 - 1)


def sizes(values: list[int] | tuple[int, ...]) -> str:
    return "x".join(str(v) for v in values)


# --- convolution via matrices (eq. 1.12, Definition 1.7) ------------------------------------


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.sampled_from([1, 2]), st.integers(1, 4),
       st.integers(1, 3), st.integers(1, 2), st.sampled_from(["valid", "same", "full", "[2 1]"]),
       st.sampled_from(["correlation", "convolution"]), st.booleans(), seeds)
def test_conv1d_is_multiplication_by_its_toeplitz_matrix(
        run: Run, c_in: int, c_out: int, groups: int, k: int, stride: int, dilation: int,
        pad: str, mode: str, bias: bool, seed: int) -> None:
    """ravel(y) = M ravel(x) for every example, M from toeplitz(); bias added after."""
    rng = np.random.default_rng(seed)
    c_in, c_out = c_in * groups, c_out * groups
    n = dilation * (k - 1) + 1 + int(rng.integers(0, 6))
    text = (f"input x: {c_in}x{n}\ny = conv({c_out}, {k}, stride={stride}, "
            f"dilation={dilation}, pad={pad}, groups={groups}, mode={mode}, "
            f"bias={'yes' if bias else 'no'})\noutput y\n")
    network = convdsl.loads(text)
    params = {"y.weight": rng.normal(size=(c_out, c_in // groups, k))}
    if bias:
        params["y.bias"] = rng.normal(size=c_out)
    x = rng.normal(size=(3, c_in, n))
    y = run(text, x, params)
    matrix = toeplitz(network, "y", params)
    assert matrix.shape == (y[0].size, x[0].size)
    without_bias = y - (params["y.bias"][:, None] if bias else 0.0)
    for example in range(len(x)):
        np.testing.assert_allclose(without_bias[example].ravel(), matrix @ x[example].ravel(),
                                   rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 8), seeds)
def test_full_convolution_matrix_is_the_lecture_h(run: Run, m: int, n: int, seed: int) -> None:
    """Eq. 1.12: with full padding, mode=convolution and one channel, M is the
    (m+n-1) x n banded Toeplitz matrix with M[i, j] = h[i - j]: every NW-SE diagonal is
    constant (Definition 1.7), it has m degrees of freedom, and a band of width m."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=m)
    text = f"input 1x{n}\ny = conv(1, {m}, pad=full, mode=convolution, bias=no)\noutput y\n"
    matrix = toeplitz(convdsl.loads(text), "y", {"y.weight": h.reshape(1, 1, m)})
    expected = np.zeros((m + n - 1, n))
    for i in range(m + n - 1):
        for j in range(n):
            if 0 <= i - j < m:
                expected[i, j] = h[i - j]
    np.testing.assert_array_equal(matrix, expected)
    f = rng.normal(size=n)
    np.testing.assert_allclose(run(text, f.reshape(1, 1, n), {"y.weight": h.reshape(1, 1, m)}
                                   )[0, 0], matrix @ f, rtol=1e-12, atol=1e-12)


def test_fixed_filter_matrix() -> None:
    """A filter has a Toeplitz matrix too: the same kernel on each channel's diagonal
    block, nothing between channels."""
    text = "input 2x5\ny = filter(3, kernel=[1 2 3], pad=same)\noutput y\n"
    matrix = toeplitz(convdsl.loads(text), "y")
    block = np.array([[2, 3, 0, 0, 0], [1, 2, 3, 0, 0], [0, 1, 2, 3, 0], [0, 0, 1, 2, 3],
                      [0, 0, 0, 1, 2]], dtype=float)
    np.testing.assert_array_equal(matrix, np.kron(np.eye(2), block))


def test_toeplitz_refuses_other_layers() -> None:
    network = convdsl.loads("input 1x4x4\nc = conv(2, 3)\np = maxpool(2)\noutput p\n")
    with pytest.raises(ValueError, match="1-D"):
        toeplitz(network, "c")
    with pytest.raises(ValueError, match="conv or filter"):
        toeplitz(network, "p")
    with pytest.raises(ValueError, match="no layer named"):
        toeplitz(network, "q")


# --- the Gaussian example (eq. 1.8, 1.9) ---------------------------------------------------------

GAUSSIAN = "smooth = filter(5, kernel=[1 4 6 4 1] / 16, pad=same)"


def test_gaussian_network_uses_the_lecture_kernel() -> None:
    """networks/gaussian_signal.cnn smooths with the kernel the tests below check."""
    network = convdsl.load(ROOT / "networks" / "gaussian_signal.cnn")
    ours = convdsl.loads(f"input signal: 1x128\n{GAUSSIAN}\noutput smooth\n")
    attrs = network.graph.layer("smooth").attrs
    assert isinstance(attrs, FilterAttrs)
    assert attrs == ours.graph.layer("smooth").attrs
    np.testing.assert_allclose(attrs.kernel, np.array([1, 4, 6, 4, 1]) / 16)


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 3), st.sampled_from(["correlation", "convolution"]),
       seeds)
def test_gaussian_smoothing(run: Run, n: int, channels: int, mode: str, seed: int) -> None:
    """(f * h)[u] = (6f[u] + 4f[u-1] + 4f[u+1] + f[u-2] + f[u+2]) / 16, with f = 0 outside
    the signal (same padding); the kernel is symmetric, so the mode does not matter."""
    rng = np.random.default_rng(seed)
    text = f"input signal: {channels}x{n}\n{GAUSSIAN.replace(')', f', mode={mode})')}\n" \
           "output smooth\n"
    f = rng.normal(size=(2, channels, n))
    padded = np.pad(f, ((0, 0), (0, 0), (2, 2)))  # padded[u + 2] = f[u]

    def at(shift: int) -> np.ndarray:  # f[u + shift] for every u
        return padded[..., 2 + shift:2 + shift + n]

    expected = (6 * at(0) + 4 * at(-1) + 4 * at(1) + at(-2) + at(2)) / 16
    np.testing.assert_allclose(run(text, f, None), expected, rtol=1e-12, atol=1e-14)


@SETTINGS
@given(st.integers(5, 30), st.floats(-10, 10))
def test_gaussian_keeps_constants_inside(run: Run, n: int, value: float) -> None:
    """The weights sum to 1: a constant signal passes unchanged away from the borders."""
    text = f"input 1x{n}\n{GAUSSIAN}\noutput smooth\n"
    y = run(text, np.full((1, 1, n), value), None)
    np.testing.assert_allclose(y[0, 0, 2:n - 2], value, rtol=1e-12, atol=1e-12)


# --- commutativity, and correlation as flipped convolution (Remark 1.1, eq. 1.11) -------------


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 12), seeds)
def test_convolution_is_commutative(run: Run, n: int, m: int, seed: int) -> None:
    """f * h = h * f: convolve f with the kernel h, or h with the kernel f (full padding)."""
    rng = np.random.default_rng(seed)
    f, h = rng.normal(size=n), rng.normal(size=m)

    def convolve(signal: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        text = (f"input 1x{len(signal)}\ny = conv(1, {len(kernel)}, pad=full, "
                "mode=convolution, bias=no)\noutput y\n")
        return run(text, signal.reshape(1, 1, -1), {"y.weight": kernel.reshape(1, 1, -1)})[0, 0]

    f_h, h_f = convolve(f, h), convolve(h, f)
    np.testing.assert_allclose(f_h, h_f, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(f_h, np.convolve(f, h), rtol=1e-12, atol=1e-12)  # eq. 1.6


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(1, 2),
       st.sampled_from(["valid", "same", "full", "1"]), seeds)
def test_correlation_is_convolution_with_the_flipped_kernel(
        run: Run, dims: int, c_in: int, c_out: int, stride: int, pad: str, seed: int) -> None:
    """h ⊗ f = h̄ * f with h̄[t] = h[-t] (eq. 1.11), on every axis, any padding and stride."""
    rng = np.random.default_rng(seed)
    window = [int(k) for k in rng.integers(1, 4 if dims < 3 else 3, dims)]
    spatial = [k + int(rng.integers(0, 3)) for k in window]
    h = rng.normal(size=(c_out, c_in, *window))
    x = rng.normal(size=(2, c_in, *spatial))

    def layer(mode: str) -> str:
        return (f"input {sizes([c_in, *spatial])}\ny = conv({c_out}, {sizes(window)}, "
                f"stride={stride}, pad={pad}, mode={mode})\noutput y\n")

    bias = {"y.bias": rng.normal(size=c_out)}
    correlated = run(layer("correlation"), x, {"y.weight": h, **bias})
    flipped = np.flip(h, axis=tuple(range(2, h.ndim))).copy()
    convolved = run(layer("convolution"), x, {"y.weight": flipped, **bias})
    np.testing.assert_allclose(correlated, convolved, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 8), seeds)
def test_correlation_is_a_sliding_inner_product(run: Run, m: int, extra: int, seed: int
                                                ) -> None:
    """Definition 1.6: (h ⊗ f)[u] = sum_t h[t] f[u + t], NumPy's correlate."""
    rng = np.random.default_rng(seed)
    f, h = rng.normal(size=m + extra), rng.normal(size=m)
    text = f"input 1x{m + extra}\ny = conv(1, {m}, bias=no)\noutput y\n"
    y = run(text, f.reshape(1, 1, -1), {"y.weight": h.reshape(1, 1, m)})[0, 0]
    np.testing.assert_allclose(y, np.correlate(f, h, mode="valid"), rtol=1e-12, atol=1e-12)


# --- translation: shift in input = shift in feature map (Definition 1.4) -------------------------


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.sampled_from([1, 3, 5]),
       st.sampled_from([1, 3]), st.integers(0, 4), seeds)
def test_shifting_the_input_shifts_the_feature_map(run: Run, dims: int, channels: int,
                                                   k1: int, k2: int, shift: int,
                                                   seed: int) -> None:
    """Two same-padded convolutions with a nonlinearity between them: a shifted input
    gives the shifted feature map wherever the receptive field stays inside the signal."""
    rng = np.random.default_rng(seed)
    reach = (k1 - 1) // 2 + (k2 - 1) // 2  # half the receptive field
    n = 2 * reach + shift + 3  # leaves 3 positions whose field stays inside, shifted or not
    text = (f"input {sizes([channels] + [n] * dims)}\n"
            f"a = conv(3, {k1}, pad=same, act=tanh)\n"
            f"y = conv(2, {k2}, pad=same)\noutput y\n")
    longer = rng.normal(size=(1, channels, *([n + shift] * dims)))
    x = longer[(..., *[slice(0, n)] * dims)]
    moved = longer[(..., *[slice(shift, shift + n)] * dims)]  # moved[t] = x[t + shift]
    y, y_moved = run(text, x, None), run(text, moved, None)
    inside = slice(reach, n - reach - shift)  # both positions see no padding
    shifted = slice(reach + shift, n - reach)
    np.testing.assert_allclose(y_moved[(..., *[inside] * dims)], y[(..., *[shifted] * dims)],
                               rtol=1e-12, atol=1e-12)
    if shift:
        assert not np.allclose(y_moved, y)  # the feature map did move


@SETTINGS
@given(st.integers(0, 3), st.integers(2, 5), seeds)
def test_strided_layers_shift_by_whole_strides(run: Run, steps: int, k: int, seed: int
                                               ) -> None:
    """Sub-sampling keeps translation equivariance for shifts by a multiple of the
    stride: valid convolution, then 2x max pooling."""
    rng = np.random.default_rng(seed)
    n = 16
    text = f"input 2x{n}\nc = conv(3, {k}, act=relu)\ny = maxpool(2)\noutput y\n"
    longer = rng.normal(size=(1, 2, n + 2 * steps))
    y = run(text, longer[..., :n], None)
    y_moved = run(text, longer[..., 2 * steps:2 * steps + n], None)
    count = y.shape[-1] - steps
    np.testing.assert_allclose(y_moved[..., :count], y[..., steps:steps + count], rtol=1e-12)


# --- max pooling over a group of transformations (Proposition 1.1) ------------------------------


@SETTINGS
@given(st.integers(1, 2), st.integers(3, 12), st.integers(1, 4), st.integers(0, 11), seeds)
def test_global_max_pool_is_invariant_to_cyclic_shifts(run: Run, channels: int, n: int, k: int,
                                                       shift: int, seed: int) -> None:
    """With periodic input (wrapped around by k-1 values) the convolution's positions are
    the orbit of the cyclic shifts, and the max over them is f_T: invariant."""
    rng = np.random.default_rng(seed)
    text = (f"input {channels}x{n + k - 1}\nc = conv(4, {k}, act=tanh)\n"
            "y = global_maxpool\noutput y\n")
    x = rng.normal(size=(2, channels, n))

    def wrapped(signal: np.ndarray) -> np.ndarray:
        return np.concatenate([signal, signal[..., :k - 1]], axis=-1)

    np.testing.assert_allclose(run(text, wrapped(np.roll(x, shift, axis=-1)), None),
                               run(text, wrapped(x), None), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.integers(1, 2), st.integers(2, 6), st.integers(0, 3), seeds)
def test_max_over_rotated_copies_is_rotation_invariant(run: Run, channels: int, size: int,
                                                       turns: int, seed: int) -> None:
    """The four 90-degree rotations of an image, stacked along the depth of a volume, go
    through the same per-slice convolution; the global max pools over the group (and the
    positions), so rotating the image, which only permutes the slices, changes nothing."""
    rng = np.random.default_rng(seed)
    text = (f"input {channels}x4x{size}x{size}\n"
            "c = conv(3, 1x3x3, pad=[0 0 1 1 1 1], act=relu)\n"
            "y = global_maxpool\noutput y\n")
    image = rng.normal(size=(2, channels, size, size))

    def orbit(picture: np.ndarray) -> np.ndarray:
        return np.stack([np.rot90(picture, r, axes=(-2, -1)) for r in range(4)], axis=2)

    rotated = np.rot90(image, turns, axes=(-2, -1))
    np.testing.assert_allclose(run(text, orbit(rotated), None), run(text, orbit(image), None),
                               rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 4), seeds)
def test_max_pool_takes_the_largest_value_of_each_patch(run: Run, r: int, count: int,
                                                        seed: int) -> None:
    """Definition 1.8 with stride r: x_ij = max{x_(ri+k, rj+l) : 0 <= k, l < r}."""
    rng = np.random.default_rng(seed)
    n = r * count
    x = rng.normal(size=(1, 2, n, n))
    y = run(f"input 2x{n}x{n}\ny = maxpool({r})\noutput y\n", x, None)
    expected = x.reshape(1, 2, count, r, count, r).max(axis=(3, 5))
    np.testing.assert_array_equal(y, expected)
