"""What the three convolution algorithms share: the geometry a spec describes, and the
pieces of generated source they all emit.

Notation, used in the generated code and its comments (notes/semantics.md):

    x  (N, C, *n)   input           w  (O, C/G, *K)   weight (PyTorch layout)
    y  (N, O, *Q)   output          b  (O,)           bias
    y[n,o,q] = act(b[o] + sum_{c,k} w[o,c,k~] x[n, g*(C/G)+c, q*s + k*d - p]),  g = o // (O/G)

with k~ = k for cross-correlation and k~ = K-1-k (every axis) for `flip` (convolution
proper). A filter layer is the depthwise case C = O = G with a fixed weight and no
weight gradient.

Every generated module, whatever its algorithm, exposes the same plain-Python driver:

    workspace() -> dict        scratch buffers, allocated once by the layer's builder
                               (im2col + GEMM modules also have SCRATCH, the sizes of
                               two flat buffers that conv.py's Scratch shares between
                               layers, and own_buffers(), what each layer keeps)
    forward(x, w, b, y, ws)    y = act(conv(x, w) + b); b is None without bias
    backward(x, w, y, dy, dx, dw, db, ws, apply_act)
                               dx, dw (None for a filter), db (None without bias) from dy;
                               dy is first turned into dy*act'(y) in place if apply_act.

Padding is never materialised by the direct and GEMM kernels: for each window offset k
they loop only over the output positions q whose input position q*s + k*d - p lies
inside the input (`valid_range`), which also keeps the inner loops branch-free.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from convdsl.codegen.activations import act_from_spec, derivative_expression, is_identity
from convdsl.codegen.layer import LayerSetup
from convdsl.codegen.source import VALUES_PER_MAC, Code, jit
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ActSpec, ConvAttrs, FilterAttrs


@dataclass(frozen=True)
class Epilogue:
    """What a convolution's epilogue (bias, activation) bakes in. Its kernels read
    their sizes from their arrays, so one epilogue serves every shape."""

    dtype: str
    bias: bool
    act: ActSpec

    @staticmethod
    def from_spec(spec: KernelSpec) -> Epilogue:
        return Epilogue(spec.dtype, bool(spec.option("bias")), act_from_spec(spec))

    @property
    def zero(self) -> str:
        """A zero of the arrays' dtype, so that sums accumulate in that dtype."""
        return "np.float32(0.0)" if self.dtype == "float32" else "0.0"

    @property
    def has_act(self) -> bool:
        return not is_identity(self.act)


@dataclass(frozen=True)
class Geometry:
    """Everything about one convolution that its kernels bake in, read from the spec."""

    dtype: str
    batch: int
    channels: int  # C, input channels
    out_channels: int  # O
    groups: int  # G
    sizes: tuple[int, ...]  # n, input size per spatial axis
    window: tuple[int, ...]  # K
    out: tuple[int, ...]  # Q, output size per spatial axis
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    flip: bool
    bias: bool
    weight_grad: bool  # False for a filter: its kernel is fixed
    act: ActSpec  # elementwise; a fused softmax runs outside, as an ActivationStep

    @staticmethod
    def from_spec(spec: KernelSpec) -> Geometry:
        (batch, channels, *sizes), (out_channels, _, *window), (_, _, *out) = spec.shapes[:3]
        return Geometry(
            dtype=spec.dtype, batch=batch, channels=channels, out_channels=out_channels,
            groups=spec.option("groups"), sizes=tuple(sizes), window=tuple(window),
            out=tuple(out), stride=tuple(spec.option("stride")),
            dilation=tuple(spec.option("dilation")),
            pads=tuple((int(a), int(b)) for a, b in spec.option("pads")),
            flip=spec.option("flip"), bias=spec.option("bias"),
            weight_grad=spec.option("weight_grad"), act=act_from_spec(spec))

    @property
    def rank(self) -> int:
        return len(self.sizes)

    @property
    def cg(self) -> int:
        """Input channels per group (the weight's second axis)."""
        return self.channels // self.groups

    @property
    def og(self) -> int:
        """Output channels per group."""
        return self.out_channels // self.groups

    @property
    def volume(self) -> int:
        """Window positions, prod(K)."""
        return math.prod(self.window)

    @property
    def positions(self) -> int:
        """Output positions per map, prod(Q)."""
        return math.prod(self.out)

    @property
    def macs(self) -> int:
        """Multiply-adds of one pass over the batch."""
        return self.batch * self.out_channels * self.positions * self.cg * self.volume

    @property
    def epilogue(self) -> Epilogue:
        return Epilogue(self.dtype, self.bias, self.act)

    @property
    def zero(self) -> str:
        return self.epilogue.zero

    @property
    def has_act(self) -> bool:
        return self.epilogue.has_act

    def reach(self, axis: int) -> int:
        """Padded positions the windows touch on `axis`: (Q-1)*s + d*(K-1) + 1."""
        return ((self.out[axis] - 1) * self.stride[axis]
                + self.dilation[axis] * (self.window[axis] - 1) + 1)

    def full_axis(self, axis: int) -> bool:
        """True when every window offset sees real input at every output position, so the
        loop over output positions needs no clipping (no padding touched on this axis)."""
        before = self.pads[axis][0]
        last = (self.out[axis] - 1) * self.stride[axis] \
            + (self.window[axis] - 1) * self.dilation[axis] - before
        return before == 0 and last <= self.sizes[axis] - 1


# Generated modules import this after PRELUDE. Numba adds a wrap-around test (a negative
# index counts from the end) to every subscript it cannot prove non-negative, and that
# test stops LLVM from vectorising the loop; a computed subscript cast to unsigned skips
# it (measured: im2col and the epilogues run 2.5-4x faster).
IMPORTS = "from numba import uintp  # unsigned subscripts: no wrap-around test\n\n"


# The work of a convolution kernel, for the choice of threads (source.parallel_line).

def macs(spec: KernelSpec) -> int:
    """The direct algorithm's loops do every multiply-add."""
    return Geometry.from_spec(spec).macs


def columns(spec: KernelSpec) -> int:
    """The other algorithms' loops move values (im2col, transforms, spreading by stride),
    about one per im2col column entry, and leave the multiply-adds to BLAS or NumPy."""
    g = Geometry.from_spec(spec)
    return g.macs // g.og // VALUES_PER_MAC


def spec_layout(setup: LayerSetup) -> tuple[tuple[int, ...], dict[str, Any]]:
    """A conv or filter layer's weight shape and the spec options every target's
    convolution kernels record (groups, stride, dilation, padding, flip, bias, whether
    the weight is trained). A filter is a depthwise convolution by a fixed kernel."""
    attrs = setup.layer.attrs
    window = setup.window
    assert window is not None and isinstance(attrs, (ConvAttrs, FilterAttrs))
    channels = setup.in_shapes[0][0]
    if isinstance(attrs, ConvAttrs):
        groups, bias, weight_grad = attrs.groups, attrs.bias, True
        weight = (attrs.out_channels, channels // groups, *window.window)
    else:
        groups, bias, weight_grad = channels, False, False
        weight = (channels, 1, *window.window)
    return weight, {"groups": groups, "stride": window.stride, "dilation": window.dilation,
                    "pads": window.pads, "flip": attrs.flip, "bias": bias,
                    "weight_grad": weight_grad}


def ix(expr: str) -> str:
    """A subscript: a plain name or number as it is, anything computed cast to uintp
    (every subscript the generators compute is non-negative by construction)."""
    return expr if expr.isidentifier() or expr.isdigit() else f"uintp({expr})"


def affine(terms: list[tuple[str, int]], constant: int = 0) -> str:
    """sum(coefficient * name) + constant, written plainly: `q0 * 2 + k0 - 1`."""
    parts = [(factor < 0, name if abs(factor) == 1 else f"{name} * {abs(factor)}")
             for name, factor in terms if factor]
    if constant or not parts:
        parts.append((constant < 0, str(abs(constant))))
    text = ("-" if parts[0][0] else "") + parts[0][1]
    for negative, part in parts[1:]:
        text += f" - {part}" if negative else f" + {part}"
    return text


def input_position(g: Geometry, axis: int, q: str = "q", k: str = "k") -> str:
    """Where output position q<axis> with window offset k<axis> reads the input."""
    return affine([(f"{q}{axis}", g.stride[axis]), (f"{k}{axis}", g.dilation[axis])],
                  -g.pads[axis][0])


def weight_offset(g: Geometry, axis: int, k: str = "k") -> str:
    """The weight's index along `axis` for window offset k<axis>: flipped for convolution."""
    return f"{g.window[axis] - 1} - {k}{axis}" if g.flip else f"{k}{axis}"


def valid_range(code: Code, g: Geometry, axis: int, k: str = "k") -> str:
    """Emit lo<axis>, hi<axis> (if needed) and return the range of output positions q
    for which window offset k<axis> reads real input: 0 <= q*s + k*d - p < n."""
    if g.full_axis(axis):
        return f"range({g.out[axis]})"
    s, d, (p, _) = g.stride[axis], g.dilation[axis], g.pads[axis]
    n, q_count = g.sizes[axis], g.out[axis]
    if s == 1:  # p - k*d <= q < n + p - k*d
        code.line(f"lo{axis} = max(0, {affine([(str(p), 1), (f'{k}{axis}', -d)])})")
        code.line(f"hi{axis} = min({q_count}, {affine([(str(n + p), 1), (f'{k}{axis}', -d)])})")
        return f"range(lo{axis}, hi{axis})"
    # q >= ceil((p - k*d) / s) and q <= floor((n - 1 + p - k*d) / s)
    code.line(f"lo{axis} = max(0, -(({affine([(f'{k}{axis}', d)], -p)}) // {s}))")
    code.line(f"hi{axis} = min({q_count}, ({affine([(str(n - 1 + p), 1), (f'{k}{axis}', -d)])})"
              f" // {s} + 1)")
    return f"range(lo{axis}, hi{axis})"


def flat_position(names: list[str], sizes: tuple[int, ...]) -> str:
    """Row-major flat index of the multi-index `names` in an array of `sizes`."""
    terms = [(name, math.prod(sizes[axis + 1:])) for axis, name in enumerate(names)]
    return affine(terms)


def emit_prepare(code: Code, e: Epilogue) -> bool:
    """`prepare(y, dy[, db], apply_act)` on (N, O, P) views of any size: dy *= act'(y) in
    place when apply_act, and db = the sum of dy over batch and positions. Returns False
    (and emits nothing) when there is neither an activation nor a bias."""
    if not e.bias and not e.has_act:
        return False
    derivative = derivative_expression(e.act, "y[n, o, q]")
    scale = f"dy[n, o, q] * {derivative}" if e.has_act else "dy[n, o, q]"
    code.line(jit())
    # The bounds are read from dy, not written in: with constant bounds LLVM's O3 unrolls
    # the unvectorisable sum for some shapes (ten times the code) and takes seconds over
    # it: 18 s for LeNet-5's c3 at batch 32, against 0.5 s at batch 64. It runs as fast
    # either way, and one epilogue module then serves every size.
    if e.bias:  # parallel over channels: each iteration owns db[o]
        with code.block("def prepare(y, dy, db, apply_act)"), \
                code.block("for o in prange(dy.shape[1])"):
            code.line(f"total = {e.zero}")
            with code.loops([("n", "range(dy.shape[0])"), ("q", "range(dy.shape[2])")]):
                if e.has_act:
                    code.line(f"v = {scale} if apply_act else dy[n, o, q]")
                    code.line("dy[n, o, q] = v")
                else:
                    code.line("v = dy[n, o, q]")
                code.line("total += v")
            code.line("db[o] = total")
    else:
        with code.block("def prepare(y, dy, apply_act)"):
            code.line("batch, maps, positions = dy.shape")
            with code.block("for job in prange(batch * maps)"):
                code.line("n = job // maps")
                code.line("o = job - n * maps")
                with code.block("if apply_act"), code.block("for q in range(positions)"):
                    code.line(f"dy[n, o, q] = {scale}")
    code.line()
    return True


def prepare_call(g: Geometry) -> str:
    """The driver's call of `prepare` (y, dy and db as the driver names them)."""
    maps = f"({g.batch}, {g.out_channels}, {g.positions})"
    db = "db, " if g.bias else ""
    return f"prepare(y.reshape({maps}), dy.reshape({maps}), {db}apply_act)"


def window_loops(code: Code, stack: ExitStack, g: Geometry, axes: int | None = None
                 ) -> list[str]:
    """Open `for k<axis>` over every window offset of the first `axes` axes (all by
    default), outermost first, and return per axis the range of output positions that
    offset reads real input for."""
    ranges = []
    for axis in range(g.rank if axes is None else axes):
        stack.enter_context(code.block(f"for k{axis} in range({g.window[axis]})"))
        ranges.append(valid_range(code, g, axis))
    return ranges


def position_loops(code: Code, stack: ExitStack, g: Geometry, ranges: list[str]) -> str:
    """Open `for q<axis> in ranges[axis]` for the axes `ranges` covers, binding the input
    row i<axis> of every axis but the last; return the subscript of the input position
    (`i0, q1 + k1 - 1`), or of the input row (`i0`) when the last axis is not covered."""
    last = g.rank - 1
    for axis, positions in enumerate(ranges):
        stack.enter_context(code.block(f"for q{axis} in {positions}"))
        if axis < last:
            code.line(f"i{axis} = {input_position(g, axis)}")
    rows = [f"i{axis}" for axis in range(min(len(ranges), last))]
    if len(ranges) == g.rank:
        rows.append(ix(input_position(g, last)))
    return ", ".join(rows)


def names(prefix: str, rank: int) -> str:
    """`q0, q1, q2`: a subscript over the spatial axes."""
    return ", ".join(f"{prefix}{axis}" for axis in range(rank))


def weight_index(g: Geometry) -> str:
    """The weight's spatial subscript for offsets k<axis> (flipped for convolution)."""
    return ", ".join(weight_offset(g, axis) for axis in range(g.rank))
