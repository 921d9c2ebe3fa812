"""Pooling windows as generated source, shared by the CPU and CUDA targets.

A pooling spec names its window, stride, dilation and padding per side; these helpers
write the loops and index arithmetic both targets' kernels use to visit a window, so that
the two read the same positions (and PyTorch's average-pooling divisor) by construction.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.passes.shapes import Window


def geometry(spec: KernelSpec) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Planes (N*C), input sizes and output sizes of a pooling spec."""
    (batch, channels, *sizes), (_, _, *outs) = spec.shapes
    return batch * channels, tuple(sizes), tuple(outs)


def window_options(window: Window) -> dict[str, tuple[int, ...] | tuple[tuple[int, int], ...]]:
    return {"window": window.window, "stride": window.stride, "dilation": window.dilation,
            "pads": window.pads}


def flat(names: list[str], sizes: tuple[int, ...]) -> str:
    """The flat row-major position of the multi-index `names` in a plane of `sizes`."""
    strides = [math.prod(sizes[axis + 1:]) for axis in range(len(sizes))]
    return " + ".join(name if stride == 1 else f"{name} * {stride}"
                      for name, stride in zip(names, strides))


def window_starts(code: Code, spec: KernelSpec) -> None:
    """a<axis>: where the window of output position o<axis> starts, in real coordinates."""
    for axis, (step, (before, _)) in enumerate(zip(spec.option("stride"), spec.option("pads"))):
        code.line(f"a{axis} = o{axis} * {step} - {before}")


def real_positions(code: Code, stack: ExitStack, spec: KernelSpec) -> None:
    """Nested loops binding i<axis> to every real input position of the current window,
    in row-major window order; padding and overhang are skipped."""
    _, sizes, _ = geometry(spec)
    for axis, (size, width, spread) in enumerate(
            zip(sizes, spec.option("window"), spec.option("dilation"))):
        if spread == 1:  # a contiguous window: clip its range to the input
            stack.enter_context(code.block(
                f"for i{axis} in range(max(a{axis}, 0), min(a{axis} + {width}, {size}))"))
        else:  # a dilated window: step through its taps and skip those outside
            stack.enter_context(code.block(f"for k{axis} in range({width})"))
            code.line(f"i{axis} = a{axis} + k{axis} * {spread}")
            with code.block(f"if i{axis} < 0 or i{axis} >= {size}"):
                code.line("continue")


def window_maximum(code: Code, spec: KernelSpec, there: str, minus_infinity: str,
                   positions: bool) -> None:
    """best = the maximum of x[there] over the real positions of the current window
    (after window_starts); with `positions`, also where = the flat position of its first
    maximum in row-major window order, as PyTorch records it. NaN propagates."""
    _, sizes, _ = geometry(spec)
    code.line(f"best = {minus_infinity}")
    if positions:
        code.line("where = -1")
    with ExitStack() as stack:
        real_positions(code, stack, spec)
        code.line(f"v = x[{there}]")
        if not positions:
            with code.block("if v > best or v != v"):
                code.line("best = v")
            return
        # the first real position always counts, so that a window of -inf still routes
        # its gradient somewhere
        with code.block("if where < 0 or v > best or v != v"):
            code.line("best = v")
            code.line(f"where = {flat([f'i{axis}' for axis in range(len(sizes))], sizes)}")


def avg_divisor(code: Code, spec: KernelSpec, clip: bool = True) -> None:
    """PyTorch's rule (notes/semantics.md): per axis, the window clipped to the padded
    input counts when count_pad, else only its real part. Leaves `div`, and with
    `clip` a<axis>, e<axis>: the real part's range."""
    _, sizes, _ = geometry(spec)
    sides = []
    for axis, (size, width, (_, after)) in enumerate(
            zip(sizes, spec.option("window"), spec.option("pads"))):
        code.line(f"e{axis} = min(a{axis} + {width}, {size + after})")
        code.line(f"n{axis} = e{axis} - a{axis}")
        if clip or not spec.option("count_pad"):
            code.line(f"a{axis} = max(a{axis}, 0)")
            code.line(f"e{axis} = min(e{axis}, {size})")
        sides.append(f"n{axis}" if spec.option("count_pad") else f"(e{axis} - a{axis})")
    code.line(f"div = {' * '.join(sides)}")


def softpool_window(code: Code, spec: KernelSpec, there: str, here: str) -> None:
    """Soft pooling of the current window (after window_starts): y = sum(e^v v) / sum(e^v),
    shifted by the window's largest value; keeps that value in `top` and the sum of
    weights in `total` for the backward pass. `there`/`here`: x's and y's indices."""
    code.line("peak = -math.inf")  # subtracted before exp, for stability
    with ExitStack() as stack:
        real_positions(code, stack, spec)
        code.line(f"peak = max(peak, x[{there}])")
    code.line("weights = 0.0")
    code.line("weighted = 0.0")
    with ExitStack() as stack:
        real_positions(code, stack, spec)
        code.line(f"v = x[{there}]")
        code.line("e = math.exp(v - peak)")
        code.line("weights += e")
        code.line("weighted += e * v")
    code.line(f"y[{here}] = weighted / weights")
    code.line(f"top[{here}] = peak")
    code.line(f"total[{here}] = weights")
