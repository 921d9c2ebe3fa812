"""The Winograd algorithm F(m x m, 3x3): 3x3 convolutions at stride 1 in fewer products.

Lavin and Gray's minimal filtering: cut the output into m x m tiles (m = 2 or 4); the
(m+2) x (m+2) input patch d that a tile reads and the 3x3 kernel g give the tile as

    Y = A^T [ (G g G^T) . (B^T d B) ] A          (. elementwise; the matrices are below)

that is (m+2)^2 multiplications per tile and channel pair instead of 9 m^2: 16 instead
of 36 for 2x2 tiles (F2), 36 instead of 144 for 4x4 tiles (F4). Summed over input
channels, each of the P = (m+2)^2 positions (xi, nu) of the transformed tile is a matrix
product:

    U[xi,nu] (O x C) = transformed kernels      V[xi,nu] (C x tiles) = transformed patches
    M[xi,nu] = U[xi,nu] @ V[xi,nu]               then Y = A^T M A, tile by tile

Backward uses the same transforms (Y is linear in U and in V):

    Mg[xi,nu] = A dY A^T   (the output gradient of each tile, transformed)
    dU[xi,nu]   = Mg[xi,nu] @ V[xi,nu]^T   ->  dW = G^T dU G        (summed over tiles)
    dV[xi,nu]   = U[xi,nu]^T @ Mg[xi,nu]   ->  dx += B dV B^T        (tiles overlap by 2)

so a layer's three passes are 3 x P BLAS products, with 4 (F2) or 2.25 (F4)
multiplications per output where im2col needs 9. The transforms are generated loops; the
products are NumPy's. It applies to 2-D, 3x3, stride 1, undilated, ungrouped layers with
any padding: the patches are read from a zero-padded copy of each input map, and the
outputs of a last tile that sticks out past the map are not written. Batches are
processed in chunks, as im2col's are, so that V stays within the chunk budget; backward
visits the last chunk first and reuses the V that forward left, as the GEMM algorithm
does. The cost model (codegen/cost.py) picks the tile per layer.

Numerically F2's transforms add and halve, no more: float32 results differ from the
direct sum about as a GEMM's do. F4's coefficients (up to 8, and sixths) lose a few more
bits; the tests hold both to the same tolerances against the float64 reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from fractions import Fraction

from convdsl.codegen import cache
from convdsl.codegen.activations import act_options, forward_expression
from convdsl.codegen.cpu.conv_common import (
    IMPORTS,
    Epilogue,
    Geometry,
    columns,
    emit_prepare,
    prepare_call,
)
from convdsl.codegen.cpu.conv_gemm import finish_in_place
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec

Matrix = tuple[tuple[Fraction, ...], ...]


def _matrix(rows: list[list[float | Fraction]]) -> Matrix:
    return tuple(tuple(Fraction(value) for value in row) for row in rows)


def _transposed(matrix: Matrix) -> Matrix:
    return tuple(zip(*matrix, strict=True))


@dataclass(frozen=True)
class Tiling:
    """F(m x m, 3x3): m outputs per tile and axis, from patches of m + 2 inputs, through
    the input transform b_t, the kernel transform g and the output transform a_t."""

    size: int  # m
    b_t: Matrix  # (m+2) x (m+2)
    g: Matrix  # (m+2) x 3
    a_t: Matrix  # m x (m+2)

    @property
    def patch(self) -> int:
        """Inputs per patch and axis."""
        return self.size + 2

    @property
    def points(self) -> int:
        """Products per tile and channel pair: the planes of a transformed array."""
        return self.patch * self.patch


# Lavin and Gray's F(2x2, 3x3), interpolation points 0, 1, -1 (and infinity): exact in
# binary, 4 multiplications per output.
F2 = Tiling(2, b_t=_matrix([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
            g=_matrix([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]),
            a_t=_matrix([[1, 1, 1, 0], [0, 1, -1, -1]]))
# F(4x4, 3x3), points 0, 1, -1, 2, -2 (and infinity): 2.25 multiplications per output,
# at the price of coefficients up to 8 and sixths, which cost float32 some accuracy.
F4 = Tiling(4, b_t=_matrix([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                            [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
            g=_matrix([[Fraction(1, 4), 0, 0],
                       [Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)],
                       [Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)],
                       [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)],
                       [Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)],
                       [0, 0, 1]]),
            a_t=_matrix([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                         [0, 1, -1, 8, -8, 1]]))
TILINGS = {tiling.size: tiling for tiling in (F2, F4)}


def applies(g: Geometry) -> bool:
    """Whether Winograd computes this layer: 2-D, 3x3, stride 1, no dilation, one group
    (grouped layers have too few channels per product to pay for the transforms)."""
    return (g.rank == 2 and g.window == (3, 3) and g.stride == (1, 1)
            and g.dilation == (1, 1) and g.groups == 1)


def why_not(g: Geometry) -> str:
    """What keeps Winograd from a layer, for the report ('' if it applies)."""
    reasons = []
    if g.rank != 2:
        reasons.append(f"{g.rank}-D")
    elif g.window != (3, 3):
        reasons.append(f"{g.window[0]}x{g.window[1]} window")
    if any(s != 1 for s in g.stride):
        reasons.append("strided")
    if any(d != 1 for d in g.dilation):
        reasons.append("dilated")
    if g.groups != 1:
        reasons.append(f"{g.groups} groups")
    return ", ".join(reasons)


def tiles(g: Geometry, t: Tiling) -> tuple[int, int]:
    """Tiles per output map along each axis (the last may stick out past the map)."""
    rows, cols = tile_counts(g.out, t.size)
    return rows, cols


def tile_counts(out: tuple[int, ...], size: int) -> tuple[int, ...]:
    """Tiles of `size` along each axis of an output map of sizes `out`."""
    return tuple(-(-length // size) for length in out)


def tiles_per_sample(g: Geometry, t: Tiling) -> int:
    return math.prod(tiles(g, t))


def _padded(g: Geometry, t: Tiling) -> tuple[int, int]:
    """The padded map every patch is read from: the tiles' reach."""
    rows, cols = tiles(g, t)
    return (t.size * rows + 2, t.size * cols + 2)


# Elements left unused after each plane of a transformed array. Planes of a power-of-two
# size (64 x 2048 floats) put the 16 values a 2x2 tile writes in one cache set, which
# holds only 8: they evict each other on every store, and the input transform of
# ResNet's 128-channel layer took 3.2 ms instead of 0.4.
PLANE_GAP = 16


def own_shapes(g: Geometry, t: Tiling, chunks: int) -> dict[str, tuple[int, ...]]:
    """What only one call reads and writes (codegen/cpu/conv.py lends the memory): u, the
    transformed weight, and du, the transformed weight gradient of one chunk, each as
    t.points planes of O x C values and a gap (the driver views them as (planes, O, C)).
    With one chunk, backward is done with du before it needs u, and both share one buffer
    (16 MB of ResNet's 512-channel layers)."""
    plane = (t.points, g.out_channels * g.channels + PLANE_GAP)
    return {"u": plane, "du": plane} if g.weight_grad and chunks > 1 else {"u": plane}


def _planes(flat: str, t: Tiling, rows: int, columns: int, item: int) -> str:
    """Source of a (t.points, rows, columns) view of the flat array `flat`, planes
    PLANE_GAP apart."""
    plane = rows * columns + PLANE_GAP
    return (f"as_strided({flat}, ({t.points}, {rows}, {columns}), "
            f"({plane * item}, {columns * item}, {item}))")


# --- the transforms, as straight-line code ---------------------------------------------


def constant_name(value: Fraction) -> str:
    """The generated module's name for a coefficient: C1_2 for 1/2, C4 for 4."""
    return f"C{value.numerator}" if value.denominator == 1 else \
        f"C{value.numerator}_{value.denominator}"


def _constants(t: Tiling) -> list[Fraction]:
    """The coefficients other than 0 and 1 that the transforms multiply by."""
    return sorted({abs(value) for matrix in (t.b_t, t.g, t.a_t) for row in matrix
                   for value in row} - {Fraction(0), Fraction(1)})


def _combination(row: tuple[Fraction, ...], terms: list[str]) -> str:
    """sum(row[i] * terms[i]) without the zeros and ones, terms with equal factors
    grouped: `d0 - d2`, `(g0 + g1) * C1_2`."""
    by_scale: dict[Fraction, list[tuple[bool, str]]] = {}
    for weight, term in zip(row, terms, strict=True):
        if weight:
            by_scale.setdefault(abs(weight), []).append((weight < 0, term))
    parts = []
    for scale, signed in by_scale.items():
        text = ("-" if signed[0][0] else "") + signed[0][1]
        for negative, term in signed[1:]:
            text += f" - {term}" if negative else f" + {term}"
        if scale != 1:
            text = f"({text}) * {constant_name(scale)}"
        parts.append(text)
    return " + ".join(parts).replace("+ -", "- ")


def _transform(code: Code, matrix: Matrix, source: str, target: str) -> None:
    """target = matrix @ source @ matrix^T on scalars named `{source}{i}{j}`, through
    `{target}_{i}{j}` for the left product: one line per entry."""
    inner = len(matrix[0])
    for i, row in enumerate(matrix):
        for j in range(inner):
            code.line(f"{target}_{i}{j} = "
                      + _combination(row, [f"{source}{a}{j}" for a in range(inner)]))
    for i in range(len(matrix)):
        for j, row in enumerate(matrix):
            code.line(f"{target}{i}{j} = "
                      + _combination(row, [f"{target}_{i}{b}" for b in range(inner)]))


def _weight_index(g: Geometry, i: int, j: int) -> str:
    """The weight's tap (i, j) as stored: flipped for a convolution proper."""
    return f"{2 - i}, {2 - j}" if g.flip else f"{i}, {j}"


@contextmanager
def _per_output(code: Code, name: str, params: str, outputs: int) -> Iterator[None]:
    """`name(params)`, parallel over output channels o, each running the serial
    `name_row(params, o)` whose body the caller emits (see _per_map for why)."""
    code.line(jit(parallel=False))
    with code.block(f"def {name}_row({params}, o)"):
        yield
    code.line()
    code.line(jit())
    with code.block(f"def {name}({params})"), code.block(f"for o in prange({outputs})"):
        code.line(f"{name}_row({params}, uintp(o))  # one type: the loop index is retyped")
    code.line()


def _transform_weight(code: Code, g: Geometry, t: Tiling) -> None:
    """u[xi*P + nu, o, c] = (G w[o, c] G^T)[xi, nu]  (P = m + 2)."""
    with _per_output(code, "transform_weight", "w, u", g.out_channels), \
            code.block(f"for c in range({g.channels})"):
        for i in range(3):
            for j in range(3):
                code.line(f"g{i}{j} = w[o, c, {_weight_index(g, i, j)}]")
        _transform(code, t.g, "g", "u")
        _write_planes(code, t, "u[{ab}, o, c] = u{a}{b}")


def _store_weight_grad(code: Code, g: Geometry, t: Tiling) -> None:
    """dw[o, c] (+)= G^T du[:, o, c] G, back in the weight's layout."""
    with _per_output(code, "store_weight_grad", "du, dw, add", g.out_channels), \
            code.block(f"for c in range({g.channels})"):
        _read_tile(code, t, "e", t.patch, "du[{ab}, o, c]")
        _transform(code, _transposed(t.g), "e", "r")
        for header, store in (("if add", "+="), ("else", "=")):
            with code.block(header):
                for i in range(3):
                    for j in range(3):
                        code.line(f"dw[o, c, {_weight_index(g, i, j)}] {store} r{i}{j}")


@contextmanager
def _per_map(code: Code, name: str, params: str, maps: int, var: str, array: str
             ) -> Iterator[None]:
    """`name(params, n0, m)`, parallel over (map `var`, sample j) jobs, each running the
    serial `name_map(params, n, var, j)` whose body the caller emits inside the context.
    The jobs go map by map, so that a thread goes along each row of `array` in one run.
    Why two functions: Numba's parallel compilation of a loop body grows fast with the
    body's statements; a small parallel loop calling a long serial function compiles in
    less than half the time (F4's transforms: 5.7 against 2.4 s per module)."""
    code.line(jit(parallel=False))
    with code.block(f"def {name}_map({params}, n, {var}, j)"):
        yield
    code.line()
    code.line(jit())
    with code.block(f"def {name}({params}, n0, m)"), \
            code.block(f"for job in prange(m * {maps})"):
        code.line(f"{var} = job // m  # map by map: a thread goes along each row of "
                  f"{array} in one run")
        code.line(f"{name}_map({params}, uintp(n0 + job - {var} * m), {var}, job - {var} * m)")
    code.line()


def _tile_loops(code: Code, stack: ExitStack, g: Geometry, t: Tiling) -> None:
    """`for t0`, `for t1` over the sample's tiles, with p the tile's column, and r0, r1
    the tile's first row and column in the (padded) map."""
    rows, cols = tiles(g, t)
    code.line(f"base = j * {rows * cols}")
    stack.enter_context(code.loops([("t0", f"range({rows})"), ("t1", f"range({cols})")]))
    code.line(f"p = uintp(base + t0 * {cols} + t1)")
    code.line(f"r0 = {t.size} * t0")
    code.line(f"r1 = {t.size} * t1")


def _transform_input(code: Code, g: Geometry, t: Tiling) -> None:
    """v[xi*P + nu, c, j*T + t] = (B^T d B)[xi, nu], d the patch of tile t."""
    (before, _), (left, _) = g.pads
    with _per_map(code, "transform_input", "x, v", g.channels, "c", "v"), \
            ExitStack() as stack:
        code.line("# the map with its padding, and zeros where the last tiles stick out")
        code.line(f"pad = np.zeros({_padded(g, t)}, dtype=np.{g.dtype})")
        with code.loops([("i0", f"range({g.sizes[0]})"), ("i1", f"range({g.sizes[1]})")]):
            code.line(f"pad[uintp(i0 + {before}), uintp(i1 + {left})] = x[n, c, i0, i1]")
        _tile_loops(code, stack, g, t)
        _read_tile(code, t, "d", t.patch, "pad[uintp(r0 + {a}), uintp(r1 + {b})]")
        _transform(code, t.b_t, "d", "v")
        _write_planes(code, t, "v[{ab}, c, p] = v{a}{b}")


def _read_tile(code: Code, t: Tiling, name: str, size: int, source: str) -> None:
    """`{name}{a}{b} = source` for a, b below `size` (source formatted with a, b and ab,
    the plane of (a, b))."""
    for a in range(size):
        for b in range(size):
            code.line(f"{name}{a}{b} = " + source.format(a=a, b=b, ab=a * t.patch + b))


def _write_planes(code: Code, t: Tiling, statement: str) -> None:
    """`statement` for each transformed value (formatted with a, b and ab)."""
    for a in range(t.patch):
        for b in range(t.patch):
            code.line(statement.format(a=a, b=b, ab=a * t.patch + b))


def _transform_output(code: Code, g: Geometry, t: Tiling) -> None:
    """y[n, o, tile] = act(b[o] + A^T M A) from the products mm[:, o, j*T + t]."""
    with _per_map(code, "transform_output", f"mm, {'b, ' if g.bias else ''}y", g.out_channels,
                  "o", "mm"), ExitStack() as stack:
        code.line("start = b[o]" if g.bias else f"start = {g.zero}")
        _tile_loops(code, stack, g, t)
        _read_tile(code, t, "m", t.patch, "mm[{ab}, o, p]")
        _transform(code, t.a_t, "m", "s")
        for a in range(t.size):
            for b in range(t.size):
                statement = (f"y[n, o, uintp(r0 + {a}), uintp(r1 + {b})] = "
                             + forward_expression(g.act, f"(s{a}{b} + start)"))
                checks = _inside_checks(g, t, a, b)
                if checks:
                    with code.block(f"if {checks}"):
                        code.line(statement)
                else:
                    code.line(statement)


def _inside_checks(g: Geometry, t: Tiling, a: int, b: int) -> str:
    """The test that output (r0 + a, r1 + b) lies in the map, needed only where the map's
    size leaves that row or column of the last tile outside ('' if never)."""
    return " and ".join(f"r{axis} + {offset} < {g.out[axis]}"
                        for axis, offset in ((0, a), (1, b))
                        if g.out[axis] % t.size and offset >= g.out[axis] % t.size)


def _transform_grad(code: Code, g: Geometry, t: Tiling) -> None:
    """mm[xi*P + nu, o, j*T + t] = (A dy A^T)[xi, nu], dy the tile's m x m output
    gradient (zero past the map)."""
    with _per_map(code, "transform_grad", "dy, mm", g.out_channels, "o", "mm"), \
            ExitStack() as stack:
        _tile_loops(code, stack, g, t)
        for a in range(t.size):
            for b in range(t.size):
                read = f"dy[n, o, uintp(r0 + {a}), uintp(r1 + {b})]"
                checks = _inside_checks(g, t, a, b)
                code.line(f"q{a}{b} = ({read} if {checks} else {g.zero})" if checks
                          else f"q{a}{b} = {read}")
        _transform(code, _transposed(t.a_t), "q", "z")
        _write_planes(code, t, "mm[{ab}, o, p] = z{a}{b}")


def _restore_input(code: Code, g: Geometry, t: Tiling) -> None:
    """dx[n, c] = the sum over tiles of B dV B^T, each added where its patch was read."""
    (before, _), (left, _) = g.pads
    with _per_map(code, "restore_input", "dv, dx", g.channels, "c", "dx"):
        code.line(f"pad = np.zeros({_padded(g, t)}, dtype=np.{g.dtype})")
        with ExitStack() as tiles_stack:
            _tile_loops(code, tiles_stack, g, t)
            _read_tile(code, t, "e", t.patch, "dv[{ab}, c, p]")
            _transform(code, _transposed(t.b_t), "e", "r")
            _write_planes(code, t, "pad[uintp(r0 + {a}), uintp(r1 + {b})] += r{a}{b}")
        code.line("# the padding's gradient is dropped")
        with code.loops([("i0", f"range({g.sizes[0]})"), ("i1", f"range({g.sizes[1]})")]):
            code.line(f"dx[n, c, i0, i1] = pad[uintp(i0 + {before}), uintp(i1 + {left})]")


# --- the driver ---------------------------------------------------------------------


def _driver(code: Code, g: Geometry, t: Tiling, chunk: int, prepared: bool) -> None:
    starts = list(range(0, g.batch, chunk))
    per_sample = tiles_per_sample(g, t)
    dtype = f"np.{g.dtype}"
    columns = chunk * per_sample
    v_size = t.points * (g.channels * columns + PLANE_GAP)
    mm_size = t.points * (g.out_channels * columns + PLANE_GAP)
    item = 4 if g.dtype == "float32" else 8
    bias = "b, " if g.bias else ""
    code.line("# The two flat scratch buffers' sizes: a caller may share larger ones between")
    code.line("# layers (codegen/cpu/conv.py), since a layer needs them only while it runs.")
    code.line(f"SCRATCH = ({v_size}, {mm_size})")
    code.line("# the transforms' coefficients, in the arrays' dtype")
    for value in _constants(t):
        code.line(f"{constant_name(value)} = {dtype}({value.numerator} / {value.denominator})")
    code.line()
    code.line()
    with code.block("def own_buffers()"):
        code.line('"""What one call reads and writes besides the scratch: u, the transformed')
        code.line('weight, and du, the transformed weight gradient of one chunk."""')
        code.line("return {")
        for name, shape in own_shapes(g, t, len(starts)).items():
            code.line(f"    {name!r}: np.zeros({shape}, dtype={dtype}),")
        code.line("}")
    code.line()
    code.line()
    with code.block("def workspace(cols=None, outs=None, own=None)"):
        code.line('"""v: the transformed patches of one chunk (backward: then their gradient);')
        code.line("mm: the chunk's products (backward: its transformed output gradients), as")
        code.line("views of two flat buffers, `cols` and `outs` if given (at least SCRATCH")
        code.line('long), else new ones; `own`: own_buffers(), made here if not given."""')
        with code.block("if cols is None"):
            code.line(f"cols = np.zeros({v_size}, dtype={dtype})")
        with code.block("if outs is None"):
            code.line(f"outs = np.zeros({mm_size}, dtype={dtype})")
        code.line("ws = {")
        code.line(f"    'v': {_planes('cols', t, g.channels, columns, item)},")
        code.line(f"    'mm': {_planes('outs', t, g.out_channels, columns, item)},")
        code.line("    'fresh': False,  # v holds the last chunk's patches of the last forward")
        code.line("}")
        code.line("own = own_buffers() if own is None else own")
        code.line("# u and du: (planes, O, C) views of their gapped planes, one buffer for one")
        code.line("# chunk")
        for name in ("u", "du") if g.weight_grad else ("u",):
            kept = name if name in own_shapes(g, t, len(starts)) else "u"
            code.line(f"ws[{name!r}] = own[{kept!r}][:, :{g.out_channels * g.channels}]"
                      f".reshape(({t.points}, {g.out_channels}, {g.channels}))")
        code.line("return ws")
    code.line()
    code.line()
    with code.block("def forward(x, w, b, y, ws)"):
        code.line("v, mm, u = ws['v'], ws['mm'], ws['u']")
        code.line("transform_weight(w, u)")
        with code.block(f"for n0 in {tuple(starts)!r}"):
            code.line(f"m = min({chunk}, {g.batch} - n0)")
            code.line(f"cols = m * {per_sample}")
            code.line("transform_input(x, v, n0, m)")
            code.line("np.matmul(u, v[:, :, :cols], out=mm[:, :, :cols])")
            code.line(f"transform_output(mm, {bias}y, n0, m)")
        code.line("ws['fresh'] = True")
    code.line()
    code.line()
    with code.block("def backward(x, w, y, dy, dx, dw, db, ws, apply_act)"):
        if prepared:
            code.line(prepare_call(g))
        code.line("v, mm, u = ws['v'], ws['mm'], ws['u']")
        code.line("# dx is None when no one needs the input's gradient")
        single = len(starts) == 1
        if not single:
            with code.block("if dx is not None"):
                code.line("transform_weight(w, u)  # u is lent: another layer's call used it")
        with code.block(f"for n0 in {tuple(reversed(starts))!r}"):
            code.line(f"m = min({chunk}, {g.batch} - n0)")
            code.line(f"cols = m * {per_sample}")
            code.line("transform_grad(dy, mm, n0, m)")
            if g.weight_grad:
                with code.block(f"if not (ws['fresh'] and n0 == {starts[-1]})"):
                    code.line("transform_input(x, v, n0, m)")
                code.line("np.matmul(mm[:, :, :cols], v[:, :, :cols].transpose(0, 2, 1), "
                          "out=ws['du'])")
                add = "False" if len(starts) == 1 else f"n0 != {starts[-1]}"
                code.line(f"store_weight_grad(ws['du'], dw, {add})")
            code.line("ws['fresh'] = False  # v is overwritten next")
            with code.block("if dx is not None"):
                if single:
                    code.line("transform_weight(w, u)  # u is lent, and du, now used, shares it")
                code.line("np.matmul(u.transpose(0, 2, 1), mm[:, :, :cols], out=v[:, :, :cols])")
                code.line("restore_input(v, dx, n0, m)")


def split_epilogue(spec: KernelSpec) -> tuple[KernelSpec, KernelSpec | None]:
    """A Winograd layer as its products, without bias or activation, and the epilogue
    that adds them (None if there is nothing to add). A network compiles a training and
    an inference version of each convolution followed by batch norm (no bias, then the
    folded bias and the activation): kept apart, the products of both are one module, and
    cold compiles of ResNet-18 take about 15 s less (F4's transforms compile slowly).
    The epilogue reads its sizes at run time, so one serves every layer with the same
    bias and activation."""
    options = {key: value for key, value in spec.options
               if key not in ("act", "slope", "alpha", "bias")}
    core = KernelSpec.make(spec.template, spec.dtype, spec.shapes, **options, bias=False,
                           **act_options(None))
    if not spec.option("bias") and spec.option("act") == "identity":
        return core, None
    batch, maps, *positions = spec.shapes[2]  # the output's
    kept = {key: value for key, value in spec.options if key in ("act", "slope", "alpha")}
    return core, KernelSpec.make("conv_epilogue", spec.dtype,
                                 ((batch, maps, math.prod(positions)),),
                                 bias=spec.option("bias"), **kept)


@cache.template("conv_epilogue", sized=False)
def render_epilogue(spec: KernelSpec) -> str:
    """finish(y[, b][, r]): y = act(y + b + r), and prepare(y, dy[, db], apply_act)
    (conv_common), on (N, O, positions) views of any size. With the option `residual` (a
    residual add fused after an inference convolution, codegen/fused.py) finish adds r,
    and there is no prepare: the stage goes back through its unfolded layers."""
    epilogue = Epilogue.from_spec(spec)
    residual = any(key == "residual" for key, _ in spec.options)
    code = Code()
    code.line(PRELUDE + IMPORTS)
    finish_in_place(code, epilogue, residual)
    if not residual:
        emit_prepare(code, epilogue)
    return code.text()


def with_residual(epilogue: KernelSpec, act: dict[str, str | float]) -> KernelSpec:
    """An epilogue spec that also adds a residual, before the activation `act`
    (act_options of it) instead of the spec's own."""
    options = {key: value for key, value in epilogue.options
               if key not in ("act", "slope", "alpha")}
    return KernelSpec.make("conv_epilogue", epilogue.dtype, epilogue.shapes, **options,
                           residual=True, **act)


def tiling(spec: KernelSpec) -> Tiling:
    """The tiling a conv_winograd spec asks for (its option `tile`: 2 or 4)."""
    return TILINGS[int(spec.option("tile"))]


@cache.template("conv_winograd", work=columns)
def render(spec: KernelSpec) -> str:
    g, t = Geometry.from_spec(spec), tiling(spec)
    if not applies(g):
        raise ValueError(f"Winograd F({t.size}x{t.size}, 3x3) does not apply: {why_not(g)}")
    code = Code()
    code.line(PRELUDE + IMPORTS.rstrip("\n"))
    code.line("from numpy.lib.stride_tricks import as_strided")
    code.line()
    code.line()
    _transform_weight(code, g, t)
    _transform_input(code, g, t)
    _transform_output(code, g, t)
    _transform_grad(code, g, t)
    _restore_input(code, g, t)
    if g.weight_grad:
        _store_weight_grad(code, g, t)
    prepared = emit_prepare(code, g.epilogue)
    code.line()
    _driver(code, g, t, int(spec.option("chunk")), prepared)
    return code.text()
