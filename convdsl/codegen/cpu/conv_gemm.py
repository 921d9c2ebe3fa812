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
A pointwise (1x1, stride 1, unpadded) convolution needs no columns at all: the input
maps are the columns, and one product per sample and group computes it.
"""

from __future__ import annotations

import math
from contextlib import ExitStack

from convdsl.codegen import cache
from convdsl.codegen.activations import forward_expression
from convdsl.codegen.cpu.conv_common import (
    IMPORTS,
    Epilogue,
    Geometry,
    affine,
    columns,
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
from convdsl.ir.ops import Activation, ActSpec


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


def _im2col(code: Code, g: Geometry, name: str = "im2col") -> None:
    rank, last = g.rank, g.rank - 1
    code.line(jit())
    with code.block(f"def {name}(x, col, n0, m)"), \
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


def _scatter_output(code: Code, g: Geometry, name: str = "scatter_output") -> None:
    """yt (G, O/G, mP) -> y (N, O, P): add the bias, apply the activation."""
    maps, positions = g.out_channels, g.positions
    code.line(jit())
    with code.block(f"def {name}(yt, {'b, ' if g.bias else ''}y, n0, m)"), \
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


# Side of the square blocks the weight gradient is transposed in: a 32 x 32 block of
# float32 is 4 KiB, so a block's rows and columns both stay in the L1 cache.
TRANSPOSE_BLOCK = 32


def _store_weight_grad(code: Code, g: Geometry) -> None:
    """dw[g, o, r] (+)= dwt[g, r, o] in square blocks. NumPy's transposing copy walks one
    side with a stride of the other: 12 ms for ResNet's 512-channel 3x3 layer (4608 x 512),
    against 1.7 ms blocked."""
    rows, og, block = g.cg * g.volume, g.og, TRANSPOSE_BLOCK
    blocks = -(-og // block)
    code.line(jit())
    with code.block("def store_weight_grad(dwt, dw, add)"), \
            code.block(f"for job in prange({g.groups * blocks})"):
        code.line(f"grp = job // {blocks}")
        code.line(f"o0 = (job - grp * {blocks}) * {block}")
        code.line(f"o1 = min(o0 + {block}, {og})")
        with code.block(f"for r0 in range(0, {rows}, {block})"):
            code.line(f"r1 = min(r0 + {block}, {rows})")
            with code.block("for o in range(o0, o1)"):
                with code.block("if add"), code.block("for r in range(r0, r1)"):
                    code.line("dw[grp, o, r] += dwt[grp, r, o]")
                with code.block("else"), code.block("for r in range(r0, r1)"):
                    code.line("dw[grp, o, r] = dwt[grp, r, o]")
    code.line()


def transposed(g: Geometry) -> Geometry:
    """The input gradient of a stride-1 convolution as a convolution of dy: correlation
    with the kernel transposed (channels swapped) and flipped, dilation kept, padded by
    d*(K-1) - p before (so output position i reads dy[i + p - k*d])."""
    pads = tuple((d * (k - 1) - before, d * (k - 1) - after)
                 for k, d, (before, after) in zip(g.window, g.dilation, g.pads))
    return Geometry(
        dtype=g.dtype, batch=g.batch, channels=g.out_channels, out_channels=g.channels,
        groups=g.groups, sizes=g.out, window=g.window, out=g.sizes, stride=g.stride,
        dilation=g.dilation, pads=pads, flip=not g.flip, bias=False, weight_grad=False,
        act=ActSpec(Activation.IDENTITY))


def as_convolution(g: Geometry) -> bool:
    """Backward computes dx as a convolution of dy (stride 1: one product with a long
    reduction, O/G * prod(K), and no scatter) rather than scattering W^T dy back with
    col2im. Only where O/G <= C/G: otherwise dy's columns outgrow x's (a first layer,
    3 -> 64 channels, would copy dy nine times over to compute a gradient of 3 maps)."""
    return all(s == 1 for s in g.stride) and g.og <= g.cg


def own_shapes(g: Geometry) -> dict[str, tuple[int, ...]]:
    """The shapes of the generated own_buffers(), only a backward's (dwt: the weight
    gradient before it is transposed back; wt: the transposed weight), for a caller
    that lends the memory (codegen/cpu/conv.py, Scratch) and so allocates none here."""
    shapes: dict[str, tuple[int, ...]] = {}
    if g.weight_grad:
        shapes["dwt"] = (g.groups, g.cg * g.volume, g.og)
    if as_convolution(g):
        shapes["wt"] = (g.groups, g.cg, g.og * g.volume)
    return shapes


def _driver(code: Code, g: Geometry, chunk: int, prepared: bool) -> None:
    groups, og, cg, rows, positions = g.groups, g.og, g.cg, g.cg * g.volume, g.positions
    starts = list(range(0, g.batch, chunk))
    dtype = f"np.{g.dtype}"
    maps = f"({g.batch}, {g.out_channels}, {positions})"
    by_conv = as_convolution(g)
    t = transposed(g)
    in_positions = t.positions
    shapes = {"col": (groups, rows, chunk * positions), "yt": (groups, og, chunk * positions)}
    if by_conv:  # sharing memory with col and yt, which are free by then
        shapes["gcol"] = (groups, og * g.volume, chunk * in_positions)
        shapes["dxt"] = (groups, cg, chunk * in_positions)
    col_size = max(math.prod(shapes["col"]), math.prod(shapes.get("gcol", (0,))))
    yt_size = max(math.prod(shapes["yt"]), math.prod(shapes.get("dxt", (0,))))
    code.line("# The two flat scratch buffers' sizes: a caller may share larger ones between")
    code.line("# layers (codegen/cpu/conv.py), since a layer needs them only while it runs.")
    code.line(f"SCRATCH = ({col_size}, {yt_size})")
    code.line()
    code.line()
    with code.block("def own_buffers()"):
        code.line('"""What each layer keeps for itself: wt, the transposed weight, and dwt,')
        code.line('the weight gradient before it is transposed back."""')
        code.line("return {")
        for name, shape in own_shapes(g).items():
            code.line(f"    {name!r}: np.zeros({shape}, dtype={dtype}),")
        code.line("}")
    code.line()
    code.line()
    with code.block("def workspace(cols=None, outs=None, own=None)"):
        code.line('"""col: the columns of one chunk (backward: also their gradient, or the')
        code.line("columns of dy, gcol); yt: the chunk's outputs (backward: its output")
        code.line("gradients, then the input gradient, dxt), as views of two flat buffers:")
        code.line("`cols` and `outs` if given (at least SCRATCH long), else new ones; `own`:")
        code.line('the layer\'s own_buffers(), made here if not given."""')
        with code.block("if cols is None"):
            code.line(f"cols = np.zeros({col_size}, dtype={dtype})")
        with code.block("if outs is None"):
            code.line(f"outs = np.zeros({yt_size}, dtype={dtype})")
        code.line("ws = {")
        for name, shape in shapes.items():
            flat = "cols" if name in ("col", "gcol") else "outs"
            code.line(f"    {name!r}: {flat}[:{math.prod(shape)}].reshape({shape}),")
        code.line("    'fresh': False,  # col holds the last chunk's columns of the last forward")
        code.line("}")
        code.line("ws.update(own_buffers() if own is None else own)")
        code.line("return ws")
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
        if by_conv:
            code.line("# dx is None when no one needs the input's gradient")
            with code.block("if dx is not None"):
                code.line("# the transposed kernel: wt[g, c, o*V + k] = w[g*O/G + o, c, k]")
                code.line(f"np.copyto(ws['wt'].reshape(({groups}, {cg}, {og}, {g.volume})), "
                          f"w.reshape(({groups}, {og}, {cg}, {g.volume})).transpose(0, 2, 1, 3))")
                code.line(f"dx3 = dx.reshape(({g.batch}, {g.channels}, {in_positions}))")
        with code.block(f"for n0 in {tuple(reversed(starts))!r}"):
            code.line(f"m = min({chunk}, {g.batch} - n0)")
            code.line(f"cols = m * {positions}")
            code.line("gather_grad(dy3, yt, n0, m)")
            if g.weight_grad:
                with code.block(f"if not (ws['fresh'] and n0 == {starts[-1]})"):
                    code.line("im2col(x, col, n0, m)")
                # dW^T = col @ dY^T: BLAS runs this orientation steadily; dY @ col^T (a
                # 64-row result over a long reduction) can drop to a few GFLOP/s
                code.line("np.matmul(col[:, :, :cols], yt[:, :, :cols].transpose(0, 2, 1), "
                          "out=ws['dwt'])")
                # the first chunk visited (the last) stores, later ones add
                add = "False" if len(starts) == 1 else f"n0 != {starts[-1]}"
                code.line(f"store_weight_grad(ws['dwt'], dw3, {add})")
            code.line("ws['fresh'] = False  # col is overwritten next")
            with code.block("if dx is not None"):
                if by_conv:
                    code.line(f"cols = m * {in_positions}")
                    code.line("im2col_grad(dy, ws['gcol'], n0, m)")
                    code.line("np.matmul(ws['wt'], ws['gcol'][:, :, :cols], "
                              "out=ws['dxt'][:, :, :cols])")
                    code.line("scatter_input(ws['dxt'], dx3, n0, m)")
                else:
                    code.line("np.matmul(w3.transpose(0, 2, 1), yt[:, :, :cols], "
                              "out=col[:, :, :cols])")
                    code.line("col2im(col, dx, n0, m)")


def pointwise(g: Geometry) -> bool:
    """A 1x1 window at stride 1 without padding reads each input column as it is: no
    im2col is needed, one matrix product per sample and group does (if the maps are
    large enough for BLAS to run well on one sample)."""
    plain = all(s == 1 for s in g.stride) and all(p == (0, 0) for p in g.pads)
    return g.volume == 1 and plain and g.positions >= POINTWISE_MIN_POSITIONS


# Positions per map from which per-sample matrix products run well (else im2col gathers
# the batch into one product).
POINTWISE_MIN_POSITIONS = 64


def finish_in_place(code: Code, e: Epilogue, residual: bool = False) -> bool:
    """finish(y[, b][, r]) on (N, O, P) views of any size: y = act(y + b + r), r a
    residual added before the activation. False if there is nothing to do."""
    if not e.bias and not e.has_act and not residual:
        return False
    code.line(jit())
    with code.block(f"def finish(y{', b' if e.bias else ''}{', r' if residual else ''})"):
        code.line("batch, maps, positions = y.shape")
        with code.block("for job in prange(batch * maps)"):
            code.line("n = job // maps")
            code.line("o = job - n * maps")
            code.line("start = b[o]" if e.bias else f"start = {e.zero}")
            with code.block("for q in range(positions)"):
                code.line("v = y[n, o, q] + start")
                if residual:
                    code.line("v = v + r[n, o, q]")
                code.line(f"y[n, o, q] = {forward_expression(e.act, 'v')}")
    code.line()
    return True


def _pointwise_driver(code: Code, g: Geometry, finished: bool, prepared: bool) -> None:
    batch, groups, og, cg, positions = g.batch, g.groups, g.og, g.cg, g.positions
    weight = f"w.reshape((1, {groups}, {og}, {cg}))"
    inputs = f"x.reshape(({batch}, {groups}, {cg}, {positions}))"
    outputs = f"({batch}, {groups}, {og}, {positions})"
    with code.block("def workspace()"):
        code.line('"""part: the weight gradient of each sample, before the sum."""')
        if g.weight_grad:
            code.line(f"return {{'part': np.zeros(({batch}, {groups}, {cg}, {og}), "
                      f"dtype=np.{g.dtype})}}")
        else:
            code.line("return {}")
    code.line()
    code.line()
    with code.block("def forward(x, w, b, y, ws)"):
        code.line("# y[n, g] = W_g @ x[n, g], a 1x1 convolution as a product per sample")
        code.line(f"np.matmul({weight}, {inputs}, out=y.reshape({outputs}))")
        if finished:
            maps = f"({batch}, {g.out_channels}, {positions})"
            code.line(f"finish(y.reshape({maps}){', b' if g.bias else ''})")
    code.line()
    code.line()
    with code.block("def backward(x, w, y, dy, dx, dw, db, ws, apply_act)"):
        if prepared:
            code.line(prepare_call(g))
        code.line(f"dyv = dy.reshape({outputs})")
        if g.weight_grad:
            # dW_g^T = sum_n x[n, g] @ dy[n, g]^T (the orientation BLAS runs steadily)
            code.line(f"np.matmul({inputs}, dyv.transpose(0, 1, 3, 2), out=ws['part'])")
            code.line(f"np.sum(ws['part'], axis=0, "
                      f"out=dw.reshape(({groups}, {og}, {cg})).transpose(0, 2, 1))")
        code.line("# dx is None when no one needs the input's gradient")
        with code.block("if dx is not None"):
            code.line(f"np.matmul({weight}.transpose(0, 1, 3, 2), dyv, "
                      f"out=dx.reshape(({batch}, {groups}, {cg}, {positions})))")


@cache.template("conv_gemm", work=columns)
def render(spec: KernelSpec) -> str:
    g = Geometry.from_spec(spec)
    code = Code()
    code.line(PRELUDE + IMPORTS)
    if pointwise(g):
        finished = finish_in_place(code, g.epilogue)
        prepared = emit_prepare(code, g.epilogue)
        code.line()
        _pointwise_driver(code, g, finished, prepared)
        return code.text()
    _im2col(code, g)
    _scatter_output(code, g)
    _gather_grad(code, g)
    if g.weight_grad:
        _store_weight_grad(code, g)
    if as_convolution(g):
        _im2col(code, transposed(g), "im2col_grad")
        _scatter_output(code, transposed(g), "scatter_input")
    else:
        _col2im(code, g)
    prepared = emit_prepare(code, g.epilogue)
    code.line()
    _driver(code, g, int(spec.option("chunk")), prepared)
    return code.text()
