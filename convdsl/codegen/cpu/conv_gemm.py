"""The GEMM algorithm: im2col, one BLAS matrix product per group, col2im.

The lecture's Toeplitz view made dense: for a chunk of m samples, the generated
`im2col` kernel writes the columns

    col[g, c*V + k~, j*P + q] = xpad[n0+j, g*(C/G)+c, q*s + k*d]     (V = prod(K), P = prod(Q))

(zero where the window reads padding), so that the convolution of group g is the product
W_g (O/G x (C/G)V) @ col_g ((C/G)V x mP), with W_g the weight reshaped without a copy.
NumPy's `np.matmul` runs it on contiguous arrays, outside any jitted function, through
BLAS. Backward, per chunk:

    dW_g += dY_g @ col_g^T          dcol_g = W_g^T @ dY_g          dx = col2im(dcol)

where dY_g (O/G x mP) gathers the chunk's output gradients, and `col2im` adds each
column entry back to the input position it was copied from (prange over (sample,
channel): each iteration owns one dx map). The flip of a true convolution is folded into
the column order (row c*V + k~ holds offset k), so the weight is used as it is.

Batches whose columns would exceed the chunk budget run in chunks of `chunk` samples;
backward visits chunks last first, so the columns forward left behind are reused.
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
    flat_position,
    input_position,
    ix,
    position_loops,
    prepare_call,
    weight_index,
    window_loops,
)
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec


def _row(g: Geometry) -> str:
    """The column row that offset k (weight index k~) of channel c fills."""
    kk = [f"({part})" if " " in part else part for part in weight_index(g).split(", ")]
    return affine([("c", g.volume)]) + " + " + flat_position(kk, g.window)


def _job(code: Code, g: Geometry) -> None:
    """Bind j (sample in the chunk), n, ci (channel), grp, c (channel in the group)."""
    code.line(f"j = job // {g.channels}")
    code.line(f"ci = job - j * {g.channels}")
    code.line("n = n0 + j")
    code.line(f"grp = ci // {g.cg}")
    code.line(f"c = ci - grp * {g.cg}")


def _im2col(code: Code, g: Geometry) -> None:
    rank, last = g.rank, g.rank - 1
    code.line(jit())
    with code.block("def im2col(x, col, n0, m)"), \
            code.block(f"for job in prange(m * {g.channels})"):
        _job(code, g)
        code.line(f"base = j * {g.positions}")
        with ExitStack() as stack:
            window_loops(code, stack, g)
            code.line(f"r = {_row(g)}")
            # every output position of the outer axes; the inner axis is cut in three
            # (padding before, real input, padding after) so that its loops never branch
            for axis in range(rank - 1):
                stack.enter_context(code.block(f"for q{axis} in range({g.out[axis]})"))
            at = affine([("base", 1), *((f"q{axis}", _stride(g, axis)) for axis in range(last))])
            code.line(f"at = {at}")
            checks = [f"lo{axis} <= q{axis} < hi{axis}" for axis in range(last)
                      if not g.full_axis(axis)]
            if checks:
                with code.block(f"if {' and '.join(checks)}"):
                    _copy_row(code, g)
                # else the window row lies in the padding
                with code.block("else"), code.block(f"for q{last} in range({g.out[last]})"):
                    code.line(f"col[grp, r, uintp(at + q{last})] = {g.zero}")
            else:
                _copy_row(code, g)
    code.line()


def _copy_row(code: Code, g: Geometry) -> None:
    """One row of columns along the last axis: zeros, real input, zeros."""
    last = g.rank - 1
    for axis in range(last):
        code.line(f"i{axis} = {input_position(g, axis)}")
    here = ", ".join([*(f"i{axis}" for axis in range(last)), ix(input_position(g, last))])
    if g.full_axis(last):
        with code.block(f"for q{last} in range({g.out[last]})"):
            code.line(f"col[grp, r, uintp(at + q{last})] = x[n, ci, {here}]")
        return
    with code.block(f"for q{last} in range(min(lo{last}, {g.out[last]}))"):
        code.line(f"col[grp, r, uintp(at + q{last})] = {g.zero}")
    with code.block(f"for q{last} in range(lo{last}, hi{last})"):
        code.line(f"col[grp, r, uintp(at + q{last})] = x[n, ci, {here}]")
    with code.block(f"for q{last} in range(max(lo{last}, hi{last}), {g.out[last]})"):
        code.line(f"col[grp, r, uintp(at + q{last})] = {g.zero}")


def _stride(g: Geometry, axis: int) -> int:
    """Row-major stride of output axis `axis` within one output map."""
    stride = 1
    for size in g.out[axis + 1:]:
        stride *= size
    return stride


def _col2im(code: Code, g: Geometry) -> None:
    rank = g.rank
    code.line(jit())
    with code.block("def col2im(dcol, dx, n0, m)"), \
            code.block(f"for job in prange(m * {g.channels})"):
        _job(code, g)
        code.line(f"base = j * {g.positions}")
        with code.loops([(f"i{axis}", f"range({size})") for axis, size in enumerate(g.sizes)]):
            code.line(f"dx[n, ci, {', '.join(f'i{axis}' for axis in range(rank))}] = {g.zero}")
        with ExitStack() as stack:
            ranges = window_loops(code, stack, g)
            code.line(f"r = {_row(g)}")
            at = position_loops(code, stack, g, ranges)
            flat = flat_position([f"q{axis}" for axis in range(rank)], g.out)
            code.line(f"dx[n, ci, {at}] += dcol[grp, r, uintp(base + {flat})]")
    code.line()


def _scatter_output(code: Code, g: Geometry) -> None:
    """yt (G, O/G, mP) -> y (N, O, P): add the bias, apply the activation."""
    maps, positions = g.out_channels, g.positions
    code.line(jit())
    with code.block(f"def scatter_output(yt, {'b, ' if g.bias else ''}y, n0, m)"), \
            code.block(f"for job in prange(m * {maps})"):
        code.line(f"j = job // {maps}")
        code.line(f"o = job - j * {maps}")
        code.line(f"grp = o // {g.og}")
        code.line(f"oo = o - grp * {g.og}")
        code.line("start = b[o]" if g.bias else f"start = {g.zero}")
        with code.block(f"for q in range({positions})"):
            code.line(f"v = yt[grp, oo, uintp(j * {positions} + q)] + start")
            code.line(f"y[uintp(n0 + j), o, q] = {forward_expression(g.act, 'v')}")
    code.line()


def _gather_grad(code: Code, g: Geometry) -> None:
    """dy (N, O, P) -> dyt (G, O/G, mP): the chunk's output gradients as matrices."""
    maps, positions = g.out_channels, g.positions
    code.line(jit())
    with code.block("def gather_grad(dy, dyt, n0, m)"), \
            code.block(f"for job in prange(m * {maps})"):
        code.line(f"j = job // {maps}")
        code.line(f"o = job - j * {maps}")
        code.line(f"grp = o // {g.og}")
        code.line(f"oo = o - grp * {g.og}")
        with code.block(f"for q in range({positions})"):
            code.line(f"dyt[grp, oo, uintp(j * {positions} + q)] = dy[uintp(n0 + j), o, q]")
    code.line()


def _driver(code: Code, g: Geometry, chunk: int, prepared: bool) -> None:
    groups, og, rows, positions = g.groups, g.og, g.cg * g.volume, g.positions
    starts = list(range(0, g.batch, chunk))
    width = chunk * positions
    dtype = f"np.{g.dtype}"
    maps = f"({g.batch}, {g.out_channels}, {positions})"
    with code.block("def workspace()"):
        code.line('"""col: the columns of one chunk (and, backward, their gradient);')
        code.line('yt: the chunk\'s outputs (and, backward, its output gradients)."""')
        code.line("return {")
        code.line(f"    'col': np.zeros(({groups}, {rows}, {width}), dtype={dtype}),")
        code.line(f"    'yt': np.zeros(({groups}, {og}, {width}), dtype={dtype}),")
        if g.weight_grad and len(starts) > 1:
            code.line(f"    'dw': np.zeros(({groups}, {og}, {rows}), dtype={dtype}),")
        code.line("    'fresh': False,  # col holds the last chunk's columns of the last forward")
        code.line("}")
    code.line()
    code.line()
    with code.block("def forward(x, w, b, y, ws)"):
        code.line("col, yt = ws['col'], ws['yt']")
        code.line(f"w3 = w.reshape(({groups}, {og}, {rows}))")
        code.line(f"y3 = y.reshape({maps})")
        with code.block(f"for n0 in {tuple(starts)!r}"):
            code.line(f"m = min({chunk}, {g.batch} - n0)")
            code.line(f"cols = m * {positions}")
            code.line("im2col(x, col, n0, m)")
            code.line("np.matmul(w3, col[:, :, :cols], out=yt[:, :, :cols])")
            code.line(f"scatter_output(yt, {'b, ' if g.bias else ''}y3, n0, m)")
        code.line("ws['fresh'] = True")
    code.line()
    code.line()
    with code.block("def backward(x, w, y, dy, dx, dw, db, ws, apply_act)"):
        if prepared:
            code.line(prepare_call(g))
        code.line("col, yt = ws['col'], ws['yt']")
        code.line(f"w3 = w.reshape(({groups}, {og}, {rows}))")
        code.line(f"dy3 = dy.reshape({maps})")
        if g.weight_grad:
            code.line(f"dw3 = dw.reshape(({groups}, {og}, {rows}))")
        with code.block(f"for n0 in {tuple(reversed(starts))!r}"):
            code.line(f"m = min({chunk}, {g.batch} - n0)")
            code.line(f"cols = m * {positions}")
            code.line("gather_grad(dy3, yt, n0, m)")
            if g.weight_grad:
                with code.block(f"if not (ws['fresh'] and n0 == {starts[-1]})"):
                    code.line("im2col(x, col, n0, m)")
                product = "np.matmul(yt[:, :, :cols], col[:, :, :cols].transpose(0, 2, 1), out={})"
                if len(starts) == 1:
                    code.line(product.format("dw3"))
                else:
                    with code.block(f"if n0 == {starts[-1]}"):
                        code.line(product.format("dw3"))
                    with code.block("else"):
                        code.line(product.format("ws['dw']"))
                        code.line("dw3 += ws['dw']")
            code.line("np.matmul(w3.transpose(0, 2, 1), yt[:, :, :cols], out=col[:, :, :cols])")
            code.line("ws['fresh'] = False  # col now holds column gradients")
            code.line("col2im(col, dx, n0, m)")


@cache.template("conv_gemm")
def render(spec: KernelSpec) -> str:
    g = Geometry.from_spec(spec)
    code = Code()
    code.line(PRELUDE + IMPORTS)
    _im2col(code, g)
    _col2im(code, g)
    _scatter_output(code, g)
    _gather_grad(code, g)
    prepared = emit_prepare(code, g)
    code.line()
    _driver(code, g, int(spec.option("chunk")), prepared)
    return code.text()
