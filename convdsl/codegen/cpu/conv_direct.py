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
    emit_prepare,
    names,
    position_loops,
    prepare_call,
    weight_index,
    window_loops,
)
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec


def _forward(code: Code, g: Geometry) -> None:
    rank, maps = g.rank, g.out_channels
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
            ranges = window_loops(code, stack, g)
            code.line(f"v = w[o, c, {weight_index(g)}]")
            at = position_loops(code, stack, g, ranges)
            code.line(f"y[{here}] += v * x[n, uintp(first + c), {at}]")
        if g.has_act:
            with code.loops(full):
                code.line(f"v = y[{here}]")
                code.line(f"y[{here}] = {forward_expression(g.act, 'v')}")
    code.line()


def _input_grad(code: Code, g: Geometry) -> None:
    rank, channels = g.rank, g.channels
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
            ranges = window_loops(code, stack, g)
            code.line(f"v = w[o, c, {weight_index(g)}]")
            at = position_loops(code, stack, g, ranges)
            code.line(f"dx[n, ci, {at}] += v * dy[n, o, {names('q', rank)}]")
    code.line()


def _weight_grad(code: Code, g: Geometry) -> None:
    rank, last = g.rank, g.rank - 1
    code.line(jit())
    with code.block("def conv_weight_grad(x, dy, dw, rows)"), \
            code.block(f"for job in prange({g.out_channels * g.cg})"):
        code.line(f"o = job // {g.cg}")
        code.line(f"c = job - o * {g.cg}")
        code.line(f"ci = (o // {g.og}) * {g.cg} + c")
        with ExitStack() as stack:
            ranges = window_loops(code, stack, g)
            with code.block(f"for t in range({g.out[last]})"):
                code.line(f"rows[job, t] = {g.zero}")
            with ExitStack() as inner:
                inner.enter_context(code.block(f"for n in range({g.batch})"))
                at = position_loops(code, inner, g, ranges)
                code.line(f"rows[job, q{last}] += dy[n, o, {names('q', rank)}] * x[n, ci, {at}]")
            code.line(f"total = {g.zero}")
            with code.block(f"for t in range({g.out[last]})"):
                code.line("total += rows[job, t]")
            code.line(f"dw[o, c, {weight_index(g)}] = total")
    code.line()


def _driver(code: Code, g: Geometry, prepared: bool) -> None:
    code.line("def workspace():")
    code.line('    """One scratch row per weight-gradient iteration."""')
    rows = f"np.zeros(({g.out_channels * g.cg}, {g.out[-1]}), dtype=np.{g.dtype})"
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
        code.line("conv_input_grad(dy, w, dx)")
        if g.weight_grad:
            code.line("conv_weight_grad(x, dy, dw, ws['rows'])")


@cache.template("conv_direct")
def render(spec: KernelSpec) -> str:
    g = Geometry.from_spec(spec)
    code = Code()
    code.line(PRELUDE + IMPORTS)
    _forward(code, g)
    _input_grad(code, g)
    if g.weight_grad:
        _weight_grad(code, g)
    prepared = emit_prepare(code, g)
    code.line()
    _driver(code, g, prepared)
    return code.text()
