"""Random convolution, filter and pooling layers, drawn by either Hypothesis or a seeded
NumPy generator: the CPU tests shrink failures with Hypothesis, while the CUDA tier, which
a GPU machine may run without Hypothesis installed, draws from NumPy.

    text, batch, dtype = conv_layer(NumpyPicker(np.random.default_rng(3)), fixed=False)
    shape, layer, dtype = pool_layer(NumpyPicker(np.random.default_rng(3)), "maxpool")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

T = TypeVar("T")

ACTS = ("none", "relu", "relu6", "leaky_relu", "elu", "sigmoid", "tanh", "softmax")
FILTER_TAPS = tuple(tap for tap in range(-8, 9) if tap)  # eighths, never zero


class Picker(Protocol):
    """Where the random choices come from."""

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high], both included."""
        ...

    def choice(self, options: Sequence[T]) -> T:
        ...


class NumpyPicker:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def integer(self, low: int, high: int) -> int:
        return int(self.rng.integers(low, high + 1))

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]


def out_size(n: int, k: int, s: int, d: int, pads: tuple[int, int]) -> int:
    return (n + pads[0] + pads[1] - d * (k - 1) - 1) // s + 1


def conv_layer(pick: Picker, fixed: bool) -> tuple[str, int, str]:
    """A random conv (or, if `fixed`, filter) layer `c` whose output is not empty, over
    1 to 3 axes with every option drawn: (network text, batch, dtype)."""
    rank = pick.integer(1, 3)
    top = (9, 7, 5)[rank - 1]
    sizes = [pick.integer(2, top) for _ in range(rank)]
    window = [pick.integer(1, min(4, n)) for n in sizes]
    stride = [pick.integer(1, 3) for _ in sizes]
    dilation = [pick.integer(1, 2) for _ in sizes]
    pad, pads = _padding(pick, rank)
    if pads is not None:  # same and full never empty the output
        for axis, (n, s, d, p) in enumerate(zip(sizes, stride, dilation, pads)):
            if out_size(n, window[axis], s, d, p) < 1:
                window[axis] = 1  # a window of 1 always fits
    groups = pick.choice((1, 1, 2, 3))
    channels = groups * pick.integer(1, 2)
    flip = pick.choice((False, True))
    act = pick.choice(ACTS)
    joined = {name: _joined(values) for name, values in
              (("size", sizes), ("window", window), ("stride", stride),
               ("dilation", dilation))}
    common = (f"stride={joined['stride']}, pad={pad}, dilation={joined['dilation']}, "
              f"mode={'convolution' if flip else 'correlation'}, act={act}")
    if fixed:
        kernel = " ".join(str(pick.choice(FILTER_TAPS)) for _ in range(math.prod(window)))
        layer = f"c = filter({joined['window']}, kernel=[{kernel}] / 8, {common})"
    else:
        out = groups * pick.integer(1, 2)
        bias = pick.choice(("yes", "no"))
        layer = f"c = conv({out}, {joined['window']}, {common}, groups={groups}, bias={bias})"
    text = f"input x: {channels}x{joined['size']}\n{layer}\noutput c"
    return text, pick.integer(1, 3), pick.choice(("float32", "float64"))


def _padding(pick: Picker, rank: int) -> tuple[str, list[tuple[int, int]] | None]:
    """The `pad=` text and, unless it is same or full, the padding of each axis."""
    mode = pick.choice(("valid", "same", "full", "one", "pair", "axes"))
    if mode in ("same", "full"):
        return mode, None
    if mode == "valid":
        return mode, [(0, 0)] * rank
    if mode == "one":
        p = pick.integer(0, 2)
        return str(p), [(p, p)] * rank
    if mode == "pair":
        pair = (pick.integer(0, 2), pick.integer(0, 2))
        return f"[{pair[0]} {pair[1]}]", [pair] * rank
    pads = [(pick.integer(0, 2), pick.integer(0, 2)) for _ in range(rank)]
    return "[" + " ".join(f"{a} {b}" for a, b in pads) + "]", pads


POOL_KINDS = ("maxpool", "avgpool", "softpool")


def pool_layer(pick: Picker, kind: str) -> tuple[tuple[int, ...], str, str]:
    """A random pooling layer of `kind` (one of POOL_KINDS) over 1 to 3 axes, with every
    option drawn and a window that fits: (input shape without the batch, layer text,
    dtype)."""
    rank = pick.integer(1, 3)
    sizes = [pick.integer(2, (9, 7, 5)[rank - 1]) for _ in range(rank)]
    window = [pick.integer(1, min(3, n)) for n in sizes]
    pads = [pick.integer(0, k // 2) for k in window]
    dilation = [pick.integer(1, 2) if kind == "maxpool" else 1 for _ in sizes]
    dilation = [d if d * (k - 1) + 1 <= n + 2 * p else 1  # the dilated window fits
                for d, k, n, p in zip(dilation, window, sizes, pads)]
    options = [_joined(window), f"stride={_joined([pick.integer(1, 3) for _ in sizes])}",
               f"pad={_joined(pads)}", f"round={pick.choice(('floor', 'ceil'))}"]
    if kind == "maxpool":
        options.append(f"dilation={_joined(dilation)}")
    if kind == "avgpool":
        options.append(f"count_pad={pick.choice(('yes', 'no'))}")
    shape = (pick.integer(1, 3), *sizes)
    return shape, f"{kind}({', '.join(options)})", pick.choice(("float32", "float64"))


def _joined(values: Sequence[int]) -> str:
    return "x".join(map(str, values))
