"""Convolution and fixed-filter layers on the GPU: three implicit GEMMs per layer.

Notation as on the CPU (codegen/cpu/conv_common.py): x (N, C, *n), w (O, C/G, *K),
y (N, O, *Q), V = prod(K) window taps, P = prod(Q) output positions, S = prod(n); per
group g, with kw the weight's flat tap index (the tap read is kw, or V-1-kw per axis for
`flip`, a true convolution). Each pass is a product of conv_gemm.py, whose operands
compute the im2col index arithmetic with every shape baked in as a constant:

    forward        M = O/G (o), N = N*P (n, q), K = C/G * V (c, kw)
                   A = w[o, c, kw],  B = x[n, c, q*s + tap*d - p] (0 in the padding);
                   epilogue: + b[o], the elementwise activation.
    input grad     M = C/G (c), N = N*S (n, i), K = O/G * V (o, kw): the transposed
                   implicit GEMM, A = w[o, c, kw], B = dy[n, o, (i + p - tap*d) / s] where
                   that is a whole output position (0 elsewhere). With a stride, one
                   product per phase of i (phases.py): its N holds only the phase's
                   positions and its K only the taps that reach them, so no zero is
                   multiplied and no divisibility tested.
    weight grad    M = O/G (o), N = C/G * V (c, kw), K = N*P (n, q):
                   A = dy[n, o, q], B = x[n, c, q*s + tap*d - p].

A fused elementwise activation's derivative and the bias gradient run first, in
`prepare` (one block per output channel, a shared-memory tree sum: race-free and
deterministic), or `scale` (one thread per element) when there is no bias.

Tiles are chosen from each product's shape (conv_gemm.choose_tiles: 64 x 64 tiles with
4 x 4 register blocks for large products, smaller ones for small products). Products
with fewer than SIMPLE_BELOW rows (depthwise layers and filters, a first layer's input
gradient) run the simple kernel, one thread per output element, except the weight
gradient, whose K (batch x positions) is too long for one thread; every pass runs simple
when the layer asks for algo=direct.

Race-free weight gradients: one thread owns each weight element (in its register block)
for the whole reduction over batch and positions. Where that leaves too few blocks, K
is split: each split's block writes its partial sums to its own slice of a workspace and
`reduce_splits` sums the slices in order (conv_gemm.py). No atomics: deterministic.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import forward_expression
from convdsl.codegen.cpu.conv_common import Geometry, affine, spec_layout
from convdsl.codegen.cuda import conv_gemm
from convdsl.codegen.cuda.activation import FusedAct, derivative
from convdsl.codegen.cuda.common import (
    CHANNEL_THREADS,
    FLAT,
    JIT,
    DeviceArray,
    Launch,
    cuda,
    grid_for,
    zeros,
)
from convdsl.codegen.cuda.conv_gemm import (
    Operand,
    Product,
    Table,
    Tiles,
    flatten,
    unflatten,
    unsigned,
)
from convdsl.codegen.cuda.phases import Phase, phases
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, builder
from convdsl.codegen.source import Code
from convdsl.codegen.spec import KernelSpec
from convdsl.ir.ops import ConvAttrs, FilterAttrs, Op
from convdsl.passes.shapes import Window

# Products with fewer rows than this run the simple kernel under algo=auto: a tile of
# at least MIN_TILE rows would be mostly padding.
SIMPLE_BELOW = 8


def reduce_threads(count: int) -> int:
    """Threads of the block that sums a channel's `count` values in `prepare`: a power of
    two, at most CHANNEL_THREADS."""
    return min(CHANNEL_THREADS, 1 << max(0, count - 1).bit_length())


# --- operands: the im2col arithmetic of each pass ---------------------------------------

def _taps(code: Code, g: Geometry, kw: str, suffix: str) -> list[str]:
    """Emit the tap (window offset) per axis of weight tap `kw`: flipped for `flip`."""
    names = unflatten(code, kw, g.window, f"w{suffix}_")
    taps = []
    for axis, name in enumerate(names):
        if g.flip:
            code.line(f"t{suffix}_{axis} = {g.window[axis] - 1} - {name}")
            taps.append(f"t{suffix}_{axis}")
        else:
            taps.append(name)
    return taps


def _inside(positions: list[str], sizes: tuple[int, ...]) -> str:
    return " and ".join(f"0 <= {p} < {n}" for p, n in zip(positions, sizes))


def _split(code: Code, flat_index: str, size: int, outer: str, inner: str) -> None:
    """outer, inner = divmod(flat_index, size)."""
    code.line(f"{outer} = {flat_index} // {size}")
    code.line(f"{inner} = {flat_index} - {outer} * {size}")


# --- constant tables of k -----------------------------------------------------------------
#
# The operand read along n (x in the forward pass, dy in the input gradient) turns each k
# into a channel and a window tap: two divisions and a handful of 64-bit products per
# element, which cost more than the multiply-adds they feed. With tables, the kernel reads
# per k the tap's reach along each axis (tap * dilation, for the bounds check) and its
# flat offset from the window's corner, from constant memory: the threads of a warp share
# k there, so one read serves them all. A layer uses them when they fit TABLE_BYTES.

TABLE_BYTES = 48 * 1024  # of the GPU's 64 KiB of constant memory, per kernel
USE_TABLES = os.environ.get("CONVDSL_CUDA_K_TABLES", "1") != "0"
REACH_LIMIT = 1 << 15  # reaches are int16


def _steps(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides, in elements, of an array of `sizes`."""
    return tuple(math.prod(sizes[axis + 1:]) for axis in range(len(sizes)))


def _reaches(g: Geometry) -> list[tuple[int, ...]]:
    """Per weight tap kw: tap * dilation along each axis (the tap flipped for `flip`)."""
    reaches = []
    for kw in range(g.volume):
        taps = np.unravel_index(kw, g.window)
        if g.flip:
            taps = tuple(size - 1 - tap for size, tap in zip(g.window, taps))
        reaches.append(tuple(int(tap) * d for tap, d in zip(taps, g.dilation)))
    return reaches


def _k_tables(name: str, reaches: list[tuple[int, ...]], offsets: list[int]
              ) -> tuple[Table, Table]:
    """The int32 table of offsets and the int16 table `name` of per-axis reaches."""
    rank = len(reaches[0])
    return (Table("offset", "int32", (len(offsets),), tuple(offsets)),
            Table(name, "int16", (len(reaches), rank),
                  tuple(r for reach in reaches for r in reach)))


def forward_tables(g: Geometry) -> tuple[Table, ...]:
    """For k = (c, kw): x's offset c * S + sum(reach * step) from the window's corner."""
    taps, steps, volume = _reaches(g), _steps(g.sizes), math.prod(g.sizes)
    reaches = [taps[kw] for c in range(g.cg) for kw in range(g.volume)]
    offsets = [c * volume + sum(r * st for r, st in zip(taps[kw], steps))
               for c in range(g.cg) for kw in range(g.volume)]
    return _k_tables("reach", reaches, offsets)


def forward_product(g: Geometry, tiles: Tiles | None, tables: bool = False) -> Product:
    v, rank = g.volume, g.rank
    steps = _steps(g.sizes)

    def a_setup(code: Code, s: str, m: str) -> None:
        code.line(f"row{s} = (g * {g.og} + {m}) * {g.cg * v}")

    def a_load(code: Code, s: str, k: str, target: str) -> None:
        code.line(f"{target} = w[{unsigned(f'row{s} + {k}')}]")

    def b_setup(code: Code, s: str, n: str) -> None:
        _split(code, n, g.positions, f"nb{s}", f"q{s}")
        qs = unflatten(code, f"q{s}", g.out, f"q{s}_")
        code.line(f"base{s} = nb{s} * {g.channels} + g * {g.cg}")
        for axis in range(rank):
            code.line(f"h{s}_{axis} = {qs[axis]} * {g.stride[axis]} - {g.pads[axis][0]}")
        if tables:  # the flat index of the window's corner (maybe outside the input)
            corner = " + ".join(f"h{s}_{axis} * {steps[axis]}" for axis in range(rank))
            code.line(f"corner{s} = base{s} * {math.prod(g.sizes)} + {corner}")

    def b_table_load(code: Code, s: str, k: str, target: str) -> None:
        positions = []
        for axis in range(rank):
            code.line(f"i{axis} = h{s}_{axis} + reach[{unsigned(k)}, {axis}]")
            positions.append(f"i{axis}")
        with code.block(f"if {_inside(positions, g.sizes)}"):
            code.line(f"{target} = x[{unsigned(f'corner{s} + offset[{unsigned(k)}]')}]")

    def b_load(code: Code, s: str, k: str, target: str) -> None:
        if tables:
            b_table_load(code, s, k, target)
            return
        _split(code, k, v, "c", "kw")
        taps = _taps(code, g, "kw", s)
        positions = []
        for axis in range(rank):
            code.line(f"i{axis} = h{s}_{axis} + {taps[axis]} * {g.dilation[axis]}")
            positions.append(f"i{axis}")
        with code.block(f"if {_inside(positions, g.sizes)}"):
            code.line(f"{target} = x[{unsigned(flatten(positions, g.sizes, f'base{s} + c'))}]")

    def store(code: Code, m: str, n: str, value: str) -> None:
        _split(code, n, g.positions, "nb", "q")
        code.line(f"o = g * {g.og} + {m}")
        code.line(f"v = {value} + b[o]" if g.bias else f"v = {value}")
        code.line(f"y[(nb * {g.out_channels} + o) * {g.positions} + q] = {_act(g, 'v')}")

    params = "x, w, b, y" if g.bias else "x, w, y"
    return Product("forward", params, g.og, g.batch * g.positions, g.cg * v, g.groups,
                   Operand(True, a_setup, a_load), Operand(False, b_setup, b_load), store,
                   g.dtype, tiles, tables=forward_tables(g) if tables else ())


def _phase_taps(code: Code, phase: Phase, t: str, suffix: str) -> list[str]:
    """Emit the per-axis tap counters of the phase's flat tap index `t`."""
    return unflatten(code, t, tuple(axis.taps for axis in phase.axes), f"t{suffix}_")


def _phase_kw(code: Code, g: Geometry, phase: Phase, t: str) -> str:
    """The weight's flat tap index of the phase's tap `t`."""
    if phase.every_tap(g.window):
        return t
    counters = _phase_taps(code, phase, t, "w")
    taps = [affine([(name, axis.wstep)], axis.w0) for name, axis in zip(counters, phase.axes)]
    return flatten(taps, g.window)


def input_tables(g: Geometry, phase: Phase) -> tuple[Table, ...]:
    """For k = (o, t): dy's offset o * P + sum(shift * step), and the shift along each
    axis (for the bounds check), where shift is the phase's dy position less j."""
    steps = _steps(g.out)
    shifts = [tuple(axis.shift0 + axis.shift_step * t for axis, t in zip(phase.axes, taps))
              for taps in itertools.product(*(range(axis.taps) for axis in phase.axes))]
    offsets = [o * g.positions + sum(s * st for s, st in zip(shift, steps))
               for o in range(g.og) for shift in shifts]
    return _k_tables("shift", [shift for _ in range(g.og) for shift in shifts], offsets)


def input_product(g: Geometry, number: int, phase: Phase, tiles: Tiles | None,
                  tables: bool = False) -> Product:
    """The input gradient of one phase (phases.py): M = C/G, N = batch x the phase's
    positions, K = O/G x the phase's taps; the only test left is the output's edge."""
    rank, in_positions, vp = g.rank, math.prod(g.sizes), phase.volume
    counts = tuple(axis.count for axis in phase.axes)
    out_steps = _steps(g.out)
    tables = tables and vp > 0

    def a_setup(code: Code, s: str, m: str) -> None:
        code.line(f"ch{s} = {m}")

    def a_k_setup(code: Code, k: str) -> None:
        if vp > 0:  # k = (o, t): the weight's output channel and flat tap index
            _split(code, k, vp, "ka_o", "ka_t")
            code.line(f"ka_at = (g * {g.og} + ka_o) * {g.cg * g.volume} + "
                      f"{_phase_kw(code, g, phase, 'ka_t')}")

    def a_load(code: Code, s: str, k: str, target: str) -> None:
        if vp > 0:
            code.line(f"{target} = w[{unsigned(f'ka_at + ch{s} * {g.volume}')}]")

    def b_setup(code: Code, s: str, n: str) -> None:
        _split(code, n, phase.positions, f"nb{s}", f"j{s}")
        js = unflatten(code, f"j{s}", counts, f"j{s}_")
        for axis in range(rank):
            code.line(f"e{s}_{axis} = {js[axis]}")
        code.line(f"base{s} = nb{s} * {g.out_channels} + g * {g.og}")
        if tables:  # dy's flat index of position j, which the shift moves
            corner = " + ".join(f"e{s}_{axis} * {out_steps[axis]}" for axis in range(rank))
            code.line(f"corner{s} = base{s} * {g.positions} + {corner}")

    def b_load(code: Code, s: str, k: str, target: str) -> None:
        if vp == 0:
            return  # no tap reaches this phase: its gradient is zero
        positions = [f"u{axis}" for axis in range(rank)]
        if tables:
            for axis in range(rank):
                code.line(f"u{axis} = e{s}_{axis} + shift[{unsigned(k)}, {axis}]")
        else:
            _split(code, k, vp, "o", "t")
            counters = _phase_taps(code, phase, "t", s)
            for axis, (name, a) in enumerate(zip(counters, phase.axes)):
                code.line(f"u{axis} = e{s}_{axis} + "
                          f"{affine([(name, a.shift_step)], a.shift0)}")
        with code.block(f"if {_inside(positions, g.out)}"):
            if tables:
                code.line(f"{target} = dy[{unsigned(f'corner{s} + offset[{unsigned(k)}]')}]")
            else:
                code.line(f"{target} = dy[{unsigned(flatten(positions, g.out, f'base{s} + o'))}]")

    def store(code: Code, m: str, n: str, value: str) -> None:
        _split(code, n, phase.positions, "nb", "j")
        js = unflatten(code, "j", counts, "j_")
        at = [affine([(name, axis.stride)], axis.first) for name, axis in zip(js, phase.axes)]
        code.line(f"dx[(nb * {g.channels} + g * {g.cg} + {m}) * {in_positions} + "
                  f"{flatten(at, g.sizes)}] = {value}")

    return Product(f"input_grad{number}", "dy, w, dx", g.cg, g.batch * phase.positions,
                   g.og * vp, g.groups, Operand(True, a_setup, a_load, a_k_setup),
                   Operand(False, b_setup, b_load), store, g.dtype,
                   tiles if vp > 0 else None,
                   tables=input_tables(g, phase) if tables else ())


def input_phases(g: Geometry) -> list[Phase]:
    """The phases of the layer's input (one at unit stride), in the order of `plan`'s tiles."""
    return phases(g.sizes, g.window, g.stride, g.dilation, g.pads, g.flip)


def weight_product(g: Geometry, tiles: Tiles | None, splits: int) -> Product:
    v, rank, in_positions, steps = g.volume, g.rank, math.prod(g.sizes), _steps(g.sizes)

    def a_setup(code: Code, s: str, m: str) -> None:
        code.line(f"oc{s} = g * {g.og} + {m}")

    def a_k_setup(code: Code, k: str) -> None:  # k = (example, output position)
        _split(code, k, g.positions, "ka_nb", "ka_q")
        code.line(f"ka_at = ka_nb * {g.out_channels * g.positions} + ka_q")

    def a_load(code: Code, s: str, k: str, target: str) -> None:
        code.line(f"{target} = dy[{unsigned(f'ka_at + oc{s} * {g.positions}')}]")

    def b_setup(code: Code, s: str, n: str) -> None:
        _split(code, n, v, f"c{s}", f"kw{s}")
        taps = _taps(code, g, f"kw{s}", s)
        for axis in range(rank):
            code.line(f"f{s}_{axis} = {taps[axis]} * {g.dilation[axis]} - {g.pads[axis][0]}")
        # x's flat index is this column's part (channel, tap) plus k's (example, position)
        reach = " + ".join(f"f{s}_{axis} * {steps[axis]}" for axis in range(rank))
        code.line(f"xo{s} = (g * {g.cg} + c{s}) * {in_positions} + {reach}")

    def b_k_setup(code: Code, k: str) -> None:  # the window's corner at output position q
        _split(code, k, g.positions, "kb_nb", "kb_q")
        qs = unflatten(code, "kb_q", g.out, "kb_q_")
        for axis in range(rank):
            code.line(f"kb_h{axis} = {qs[axis]} * {g.stride[axis]}")
        corner = " + ".join(f"kb_h{axis} * {steps[axis]}" for axis in range(rank))
        code.line(f"kb_at = kb_nb * {g.channels * in_positions} + {corner}")

    def b_load(code: Code, s: str, k: str, target: str) -> None:
        positions = []
        for axis in range(rank):
            code.line(f"i{axis} = kb_h{axis} + f{s}_{axis}")
            positions.append(f"i{axis}")
        with code.block(f"if {_inside(positions, g.sizes)}"):
            code.line(f"{target} = x[{unsigned(f'kb_at + xo{s}')}]")

    size = g.out_channels * g.cg * v

    def store(code: Code, m: str, n: str, value: str) -> None:
        at = f"(g * {g.og} + {m}) * {g.cg * v} + {n}"
        if splits > 1:
            code.line(f"dw[split * {size} + {at}] = {value}")
        else:
            code.line(f"dw[{at}] = {value}")

    return Product("weight_grad", "x, dy, dw", g.og, g.cg * v, g.batch * g.positions,
                   g.groups, Operand(True, a_setup, a_load, a_k_setup),
                   Operand(True, b_setup, b_load, b_k_setup), store, g.dtype, tiles, splits)


def _act(g: Geometry, value: str) -> str:
    """The layer's elementwise activation of `value` (identity when none)."""
    return forward_expression(g.act, value)


# --- the module of one layer -------------------------------------------------------------

def _render_prepare(code: Code, g: Geometry, spec: KernelSpec) -> None:
    """prepare(y, dy, db, act_grad): per output channel (one block), dy *= act'(y) when
    act_grad, and db = the sum of dy; scale(y, dy): dy *= act'(y), one thread each."""
    zero = conv_gemm.zero(g.dtype)
    count, positions, maps = g.batch * g.positions, g.positions, g.out_channels
    threads = reduce_threads(count)
    if g.bias:
        code.line(JIT)
        with code.block("def prepare(y, dy, db, act_grad)"):
            code.line("o = cuda.blockIdx.x")
            code.line("tid = cuda.threadIdx.x")
            code.line(f"part = cuda.shared.array({threads}, {g.dtype})")
            code.line(f"total = {zero}")
            with code.block(f"for j in range(tid, {count}, {threads})"):
                _split(code, "j", positions, "nb", "q")
                code.line(f"at = (nb * {maps} + o) * {positions} + q")
                code.line("v = dy[at]")
                if g.has_act:
                    with code.block("if act_grad"):
                        code.line("u = y[at]")
                        code.line(f"v = v * {derivative(spec, 'u')}")
                        code.line("dy[at] = v")
                code.line("total += v")
            code.line("part[tid] = total")
            code.line("cuda.syncthreads()")
            step = threads // 2
            while step:
                with code.block(f"if tid < {step}"):
                    code.line(f"part[tid] += part[tid + {step}]")
                code.line("cuda.syncthreads()")
                step //= 2
            with code.block("if tid == 0"):
                code.line("db[o] = part[0]")
        code.line()
    if g.has_act:
        code.line(JIT)
        with code.block("def scale(y, dy)"):
            code.line("e = cuda.grid(1)")
            with code.block(f"if e < {g.batch * maps * positions}"):
                code.line("u = y[e]")
                code.line(f"dy[e] = dy[e] * {derivative(spec, 'u')}")
        code.line()


def products(spec: KernelSpec) -> tuple[Product, list[Product], Product | None]:
    """The forward product, the input gradient's products (one per phase) and (unless
    the weight is fixed) the weight-gradient product of a layer's spec."""
    g = Geometry.from_spec(spec)
    tabled_forward, tabled_input = spec.option("k_tables")
    forward = forward_product(g, Tiles.from_option(spec.option("forward_tiles")),
                              bool(tabled_forward))
    backward = [input_product(g, number, phase, Tiles.from_option(tiles), bool(tabled_input))
                for number, (phase, tiles)
                in enumerate(zip(input_phases(g), spec.option("input_tiles"), strict=True))]
    weight = None
    if g.weight_grad:
        weight = weight_product(g, Tiles.from_option(spec.option("weight_tiles")),
                                int(spec.option("splits")))
    return forward, backward, weight


@cache.template("cuda_conv")
def render(spec: KernelSpec) -> str:
    g = Geometry.from_spec(spec)
    code = Code()
    code.line(conv_gemm.prelude())
    forward, backward, weight = products(spec)
    for product in [forward, *backward, *([weight] if weight else [])]:
        conv_gemm.render(code, product)
    splits = int(spec.option("splits"))
    if g.weight_grad and splits > 1:
        conv_gemm.render_reduce_splits(code, splits, g.out_channels * g.cg * g.volume)
    _render_prepare(code, g, spec)
    return code.text()


def plan(setup: LayerSetup) -> tuple[dict[str, Any], str, str]:
    """Tiles per pass and K splits of the weight gradient, as spec options, with the
    algorithm's name and the reason for the report."""
    attrs = setup.layer.attrs
    window = setup.window
    assert window is not None and isinstance(attrs, (ConvAttrs, FilterAttrs))
    channels = setup.in_shapes[0][0]
    groups = attrs.groups if isinstance(attrs, ConvAttrs) else channels
    out_channels = attrs.out_channels if isinstance(attrs, ConvAttrs) else channels
    cg, og, v = channels // groups, out_channels // groups, math.prod(window.window)
    batch = setup.batch
    shapes = {"forward": (og, batch * math.prod(setup.out_shape[1:]), cg * v),
              "weight": (og, cg * v, batch * math.prod(setup.out_shape[1:]))}
    simple = setup.algo == "direct"
    forced = setup.algo == "gemm"

    def tiles_of(name: str, m: int, n: int, k: int) -> Tiles | None:
        # The weight gradient always tiles (unless direct is asked for): its K is the
        # batch times the positions, far too long for one thread per weight element.
        tiled = forced or (not simple and (m >= SIMPLE_BELOW or name == "weight"))
        return conv_gemm.choose_tiles(m, n, k) if tiled and k > 0 else None

    options: dict[str, Any] = {}
    kinds = []
    for name, (m, n, k) in shapes.items():
        tiles = tiles_of(name, m, n, k)
        options[f"{name}_tiles"] = None if tiles is None else tiles.as_option()
        kinds.append(f"{name} " + (_describe(tiles) if tiles else "simple"))
        if name == "weight":
            options["splits"] = conv_gemm.choose_splits(m, n, k, groups, tiles)
    split = phases(setup.in_shapes[0][1:], window.window, window.stride, window.dilation,
                   window.pads, attrs.flip)
    input_tiles = [tiles_of("input", cg, batch * phase.positions, og * phase.volume)
                   for phase in split]
    options["input_tiles"] = tuple(None if t is None else t.as_option() for t in input_tiles)
    described = sorted({_describe(t) if t else "simple" for t in input_tiles})
    kinds.insert(1, "input " + (f"in {len(split)} phases, " if len(split) > 1 else "")
                 + " / ".join(described))
    forward_reach = max((w - 1) * d for w, d in zip(window.window, window.dilation))
    options["k_tables"] = (_fits(window, shapes["forward"][2], forward_reach),
                           _fits(window, og * max(p.volume for p in split), _shift_reach(split)))
    algorithm = "direct" if simple else "gemm"
    why = ("requested" if setup.algo in ("direct", "gemm")
           else f"{setup.algo}: implicit GEMM on the GPU")
    reason = f"{why}; {', '.join(kinds)}; weight grad in {options['splits']} split(s) of K"
    return options, algorithm, reason


def _shift_reach(split: list[Phase]) -> int:
    """The largest shift (phases.py) of any phase's taps, which its int16 table holds."""
    return max(abs(a.shift0 + a.shift_step * t) for phase in split for a in phase.axes
               for t in (0, max(0, a.taps - 1)))


def _fits(window: Window, k: int, reach: int) -> bool:
    """Whether the k tables of a product with this K fit TABLE_BYTES (and int16 reaches)."""
    rank = len(window.window)
    return USE_TABLES and k * (4 + 2 * rank) <= TABLE_BYTES and reach < REACH_LIMIT


def _describe(tiles: Tiles) -> str:
    return f"tiled {tiles.bm}x{tiles.bn}x{tiles.bk}"


def conv_spec(setup: LayerSetup, options: dict[str, Any], act: FusedAct) -> KernelSpec:
    weight, layout = spec_layout(setup)
    return KernelSpec.make(
        "cuda_conv", setup.dtype, (setup.batched_inputs[0], weight, setup.batched_output),
        **layout, **act.options(), **options)


class ConvLayer(KernelLayer):
    """A convolution (or filter) computed by one generated module of three products."""

    def __init__(self, setup: LayerSetup) -> None:
        super().__init__(setup)
        options, self.algorithm, self.reason = plan(setup)
        self.act = FusedAct(setup.layer.act, setup.batched_output, setup.dtype)
        spec = conv_spec(setup, options, self.act)
        self.specs = [spec, *self.act.specs]
        self.g = Geometry.from_spec(spec)
        module = cache.load(spec)
        forward, backward, weight = products(spec)
        self._forward = conv_gemm.configured(module, forward)
        self._input_grads = [conv_gemm.configured(module, phase) for phase in backward]
        self._weight_grad = None if weight is None else conv_gemm.configured(module, weight)
        g = self.g
        self.splits = 1 if weight is None else weight.splits
        size = g.out_channels * g.cg * g.volume
        self._part = zeros((self.splits * size,), setup.dtype) if self.splits > 1 else None
        self._reduce = (Launch(module.reduce_splits, *grid_for(size), every=FLAT)
                        if self._part is not None else None)
        out_size = math.prod(setup.batched_output)
        threads = reduce_threads(setup.batch * g.positions)
        self._prepare = (Launch(module.prepare, g.out_channels, threads, every=FLAT)
                         if g.bias else None)
        self._scale = (Launch(module.scale, *grid_for(out_size), every=FLAT)
                       if g.has_act else None)
        self.y = zeros(setup.batched_output, setup.dtype)
        self.dx = zeros(setup.batched_inputs[0], setup.dtype)
        self._fixed = _fixed_weight(setup)
        self._x: DeviceArray | None = None

    def _weight(self, params: dict[str, DeviceArray]) -> DeviceArray:
        return self._fixed if self._fixed is not None else params["weight"]

    def forward(self, inputs: list[DeviceArray], params: dict[str, DeviceArray],
                mode: Mode) -> DeviceArray:
        (x,) = inputs
        bias = [params["bias"]] if self.g.bias else []
        self._forward(x, self._weight(params), *bias, self.y)
        self.act.forward(self.y)
        self._x = x
        return self.y

    def backward(self, grad_output: DeviceArray, params: dict[str, DeviceArray],
                 grads: dict[str, DeviceArray], skip_act: bool = False
                 ) -> list[DeviceArray | None]:
        if self._x is None:
            raise RuntimeError(f"'{self.name}': backward before forward")
        act_grad = self.act.backward(self.y, grad_output, skip_act)
        dy, y = grad_output, self.y
        if self._prepare is not None:
            self._prepare(y, dy, grads["bias"], act_grad)
        elif act_grad and self._scale is not None:
            self._scale(y, dy)
        if self.input_grad_needed:
            for input_grad in self._input_grads:
                input_grad(dy, self._weight(params), self.dx)
        if self._weight_grad is not None:
            dw = grads["weight"]
            if self._part is not None and self._reduce is not None:
                self._weight_grad(self._x, dy, self._part)
                self._reduce(self._part, dw)
            else:
                self._weight_grad(self._x, dy, dw)
        return [self.dx if self.input_grad_needed else None]


def _fixed_weight(setup: LayerSetup) -> DeviceArray | None:
    """A filter layer's kernel as a flat depthwise weight on the device; None for a conv."""
    attrs = setup.layer.attrs
    if not isinstance(attrs, FilterAttrs):
        return None
    assert setup.window is not None
    kernel = np.array(attrs.kernel, dtype=setup.dtype).reshape(setup.window.window)
    channels = setup.in_shapes[0][0]
    weight = np.broadcast_to(kernel, (channels, 1, *kernel.shape))
    return cuda().to_device(np.ascontiguousarray(weight).reshape(-1))


@builder(Op.CONV, Op.FILTER, device="cuda")
def build(setup: LayerSetup) -> KernelLayer:
    return ConvLayer(setup)
