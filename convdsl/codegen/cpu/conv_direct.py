"""The direct algorithm: generated loop nests over (channel, window offset, position).

    forward          prange over (n, o): y[n,o] starts at b[o], then for every input
                     channel c of o's group and window offset k, the whole output map
                     takes w[o,c,k~] * (the input map seen through offset k): an axpy
                     whose inner loop runs along the last axis (contiguous for stride 1).
    input gradient   prange over (n, c): dx[n,c] gathers the scatter of dy[n,o] through
                     every offset, for the O/G outputs o of c's group. Each iteration
                     owns its dx[n,c] map, so overlapping windows never race.
    weight gradient  prange over (o, c): each iteration owns dw[o,c]; for every offset k
                     it adds dy[n,o] * x[n,c seen through k] over the batch into a row of
                     scratch (one per iteration, vectorisable) and sums the row once.

Best for few channels per group (depthwise layers, filters, the first layer of a
network), where im2col's copy buys no reuse.
"""

from __future__ import annotations

from contextlib import ExitStack

from convdsl.codegen import cache
from convdsl.codegen.activations import forward_expression
from convdsl.codegen.cpu.conv_common import (
    IMPORTS,
    Geometry,
    affine,
    emit_prepare,
    ix,
    macs,
    names,
    position_loops,
    prepare_call,
    weight_index,
    weight_offset,
    window_loops,
)
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec

# Up to this many window taps along the last axis are written out one by one, so that
# each output position is one sum (one load and store of the output, not one per tap);
# wider windows loop over their taps.
UNROLL = 16


def _taps(code: Code, g: Geometry) -> None:
    """tap<t> = the weight of window offset t along the last axis (outer offsets k<axis>)."""
    last = g.rank - 1
    outer = [weight_offset(g, axis) for axis in range(last)]
    for t in range(g.window[last]):
        kk = g.window[last] - 1 - t if g.flip else t
        code.line(f"tap{t} = w[o, c, {', '.join([*outer, str(kk)])}]")


def _all_inside(count: int, offsets: list[int], factor: int, limit: int) -> tuple[int, int]:
    """The range [lo, hi) of var < count where every var*factor + offset is in [0, limit)."""
    lo = max(0, *(-(off // factor) for off in offsets))  # ceil(-off / factor)
    hi = min(count, *((limit - 1 - off) // factor + 1 for off in offsets))
    return lo, hi


def _borders(count: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The non-empty ranges of var < count outside [lo, hi)."""
    return [(a, b) for a, b in ((0, min(lo, count)), (max(lo, hi), count)) if a < b]


def _tap_sums(code: Code, g: Geometry, target: str, source: str, var: str, count: int,
              offsets: list[int], factor: int, limit: int) -> None:
    """target[var] += sum_t tap<t> * source[var*factor + offsets[t]] for var < count,
    skipping terms outside 0 <= position < limit. The positions where every term is
    inside get one branch-free (vectorisable) loop; the few near the borders test."""
    lo, hi = _all_inside(count, offsets, factor, limit)
    inside = [(t, affine([(var, factor)], off)) for t, off in enumerate(offsets)]
    for first, stop in _borders(count, lo, hi):
        with code.block(f"for {var} in range({first}, {stop})"):
            code.line(f"total = {g.zero}")
            for t, position in inside:
                with code.block(f"if 0 <= {position} < {limit}"):
                    code.line(f"total += tap{t} * {source.format(ix(position))}")
            code.line(f"{target.format(var)} += total")
    if lo < hi:
        with code.block(f"for {var} in range({lo}, {hi})"):
            terms = [f"tap{t} * {source.format(ix(position))}" for t, position in inside]
            if len(terms) == 1:
                code.line(f"{target.format(var)} += {terms[0]}")
                return
            code.line(f"{target.format(var)} += ({terms[0]}")
            for term in terms[1:-1]:
                code.line(f"    + {term}")
            code.line(f"    + {terms[-1]})")


def _forward(code: Code, g: Geometry) -> None:
    rank, maps, last = g.rank, g.out_channels, g.rank - 1
    here = f"n, o, {names('q', rank)}"
    full = [(f"q{axis}", f"range({size})") for axis, size in enumerate(g.out)]
    code.line(jit())
    with code.block(f"def conv_forward(x, w, {'b, ' if g.bias else ''}y)"), \
            code.block(f"for job in prange({g.batch * maps})"):
        code.line(f"n = job // {maps}")
        code.line(f"o = job - n * {maps}")
        code.line(f"first = (o // {g.og}) * {g.cg}  # the first input channel of o's group")
        code.line("start = b[o]" if g.bias else f"start = {g.zero}")
        with code.loops(full):
            code.line(f"y[{here}] = start")
        with ExitStack() as stack:
            stack.enter_context(code.block(f"for c in range({g.cg})"))
            code.line("ci = first + c")
            if g.window[last] <= UNROLL:
                ranges = window_loops(code, stack, g, last)
                _taps(code, g)
                rows = position_loops(code, stack, g, ranges)
                outer = "".join(f"q{axis}, " for axis in range(last))
                s, d, (p, _) = g.stride[last], g.dilation[last], g.pads[last]
                source = f"x[n, ci, {rows}{', ' if rows else ''}{{}}]"
                _tap_sums(code, g, f"y[n, o, {outer}{{}}]", source, f"q{last}", g.out[last],
                          [t * d - p for t in range(g.window[last])], s, g.sizes[last])
            else:
                ranges = window_loops(code, stack, g)
                code.line(f"v = w[o, c, {weight_index(g)}]")
                at = position_loops(code, stack, g, ranges)
                code.line(f"y[{here}] += v * x[n, ci, {at}]")
        if g.has_act:
            with code.loops(full):
                code.line(f"v = y[{here}]")
                code.line(f"y[{here}] = {forward_expression(g.act, 'v')}")
    code.line()


def _input_grad(code: Code, g: Geometry) -> None:
    """With stride 1 along the last axis, each dx position gathers its taps (one sum per
    position); otherwise each tap scatters dy into dx (one update per tap)."""
    rank, channels, last = g.rank, g.channels, g.rank - 1
    code.line(jit())
    with code.block("def conv_input_grad(dy, w, dx)"), \
            code.block(f"for job in prange({g.batch * channels})"):
        code.line(f"n = job // {channels}")
        code.line(f"ci = job - n * {channels}")
        code.line(f"c = ci % {g.cg}  # position within the group")
        code.line(f"first = (ci // {g.cg}) * {g.og}  # the group's first output channel")
        with code.loops([(f"i{axis}", f"range({size})") for axis, size in enumerate(g.sizes)]):
            code.line(f"dx[n, ci, {names('i', rank)}] = {g.zero}")
        with ExitStack() as stack:
            stack.enter_context(code.block(f"for o in range(first, first + {g.og})"))
            if g.stride[last] == 1 and g.window[last] <= UNROLL:
                ranges = window_loops(code, stack, g, last)
                _taps(code, g)
                rows = position_loops(code, stack, g, ranges)
                outer = "".join(f"q{axis}, " for axis in range(last))
                d, (p, _) = g.dilation[last], g.pads[last]
                _tap_sums(code, g, f"dx[n, ci, {rows}{', ' if rows else ''}{{}}]",
                          f"dy[n, o, {outer}{{}}]", f"i{last}", g.sizes[last],
                          [p - t * d for t in range(g.window[last])], 1, g.out[last])
            else:
                ranges = window_loops(code, stack, g)
                code.line(f"v = w[o, c, {weight_index(g)}]")
                at = position_loops(code, stack, g, ranges)
                code.line(f"dx[n, ci, {at}] += v * dy[n, o, {names('q', rank)}]")
    code.line()


def _weight_grad(code: Code, g: Geometry) -> None:
    """rows[job, t, q] collects dy * x over the batch for tap t of the last axis (all taps
    in one pass when unrolled), then each row is summed into its weight."""
    rank, last = g.rank, g.rank - 1
    unrolled = g.window[last] <= UNROLL
    taps, width = (g.window[last] if unrolled else 1), g.out[last]
    code.line(jit())
    with code.block("def conv_weight_grad(x, dy, dw, rows)"), \
            code.block(f"for job in prange({g.out_channels * g.cg})"):
        code.line(f"o = job // {g.cg}")
        code.line(f"c = job - o * {g.cg}")
        code.line(f"ci = (o // {g.og}) * {g.cg} + c")
        with ExitStack() as stack:
            ranges = window_loops(code, stack, g, last if unrolled else None)
            with code.loops([("t", f"range({taps})"), ("q", f"range({width})")]):
                code.line(f"rows[job, t, q] = {g.zero}")
            with ExitStack() as inner:
                inner.enter_context(code.block(f"for n in range({g.batch})"))
                at = position_loops(code, inner, g, ranges)
                if unrolled:
                    _tap_products(code, g, at)
                else:
                    code.line(f"rows[job, 0, q{last}] += dy[n, o, {names('q', rank)}] "
                              f"* x[n, ci, {at}]")
            with code.block(f"for t in range({taps})"):
                code.line(f"total = {g.zero}")
                with code.block(f"for q in range({width})"):
                    code.line("total += rows[job, t, q]")
                if unrolled:
                    outer = [weight_offset(g, axis) for axis in range(last)]
                    tap = ix(f"{g.window[last] - 1} - t") if g.flip else "t"
                    code.line(f"dw[o, c, {', '.join([*outer, tap])}] = total")
                else:
                    code.line(f"dw[o, c, {weight_index(g)}] = total")
    code.line()


def _tap_products(code: Code, g: Geometry, rows: str) -> None:
    """rows[job, t, q] += dy[.., q] * x[.., q*s + t*d - p] for every tap t of the last
    axis whose input position is real; branch-free where all of them are."""
    last = g.rank - 1
    s, d, (p, _), n = g.stride[last], g.dilation[last], g.pads[last], g.sizes[last]
    offsets = [t * d - p for t in range(g.window[last])]
    lo, hi = _all_inside(g.out[last], offsets, s, n)
    var = f"q{last}"
    grad = f"dy[n, o, {names('q', g.rank)}]"
    source = f"x[n, ci, {rows}{', ' if rows else ''}{{}}]"
    inside = [(t, affine([(var, s)], off)) for t, off in enumerate(offsets)]
    for first, stop in _borders(g.out[last], lo, hi):
        with code.block(f"for {var} in range({first}, {stop})"):
            code.line(f"v = {grad}")
            for t, position in inside:
                with code.block(f"if 0 <= {position} < {n}"):
                    code.line(f"rows[job, {t}, {var}] += v * {source.format(ix(position))}")
    if lo < hi:
        with code.block(f"for {var} in range({lo}, {hi})"):
            code.line(f"v = {grad}")
            for t, position in inside:
                code.line(f"rows[job, {t}, {var}] += v * {source.format(ix(position))}")


def _driver(code: Code, g: Geometry, prepared: bool) -> None:
    code.line("def workspace():")
    code.line('    """Scratch rows for the weight gradient: per iteration, one per tap."""')
    taps = g.window[-1] if g.window[-1] <= UNROLL else 1
    rows = f"np.zeros(({g.out_channels * g.cg}, {taps}, {g.out[-1]}), dtype=np.{g.dtype})"
    code.line(f"    return {{'rows': {rows}}}" if g.weight_grad else "    return {}")
    code.line()
    code.line()
    with code.block("def forward(x, w, b, y, ws)"):
        code.line(f"conv_forward(x, w, {'b, ' if g.bias else ''}y)")
    code.line()
    code.line()
    with code.block("def backward(x, w, y, dy, dx, dw, db, ws, apply_act)"):
        if prepared:
            code.line(prepare_call(g))
        code.line("# dx is None when no one needs the input's gradient")
        with code.block("if dx is not None"):
            code.line("conv_input_grad(dy, w, dx)")
        if g.weight_grad:
            code.line("conv_weight_grad(x, dy, dw, ws['rows'])")


@cache.template("conv_direct", work=macs)
def render(spec: KernelSpec) -> str:
    g = Geometry.from_spec(spec)
    code = Code()
    code.line(PRELUDE + IMPORTS)
    _forward(code, g)
    _input_grad(code, g)
    if g.weight_grad:
        _weight_grad(code, g)
    prepared = emit_prepare(code, g.epilogue)
    code.line()
    _driver(code, g, prepared)
    return code.text()
