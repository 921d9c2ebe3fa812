"""Matrix-product kernels on the GPU: the family behind convolution and dense layers.

Every pass of a convolution or a dense layer is a product C (M x N) = A (M x K) @ B (K x N)
per group, where A and B are never stored: an `Operand` is the generated code that reads
one element of a factor straight from the layer's arrays (the im2col arithmetic of an
implicit GEMM, baked in with constant shapes), and a `Product` adds the code that stores
one element of C. This module turns a product into one of two kernels:

    tiled   (Tiles given) one block per BM x BN tile of C (per group and per split of K).
            Each K-slice of BK columns of A and rows of B is loaded cooperatively into
            shared memory (zero outside the matrices), and each thread accumulates a
            TM x TN register block, the elements (ty*TM + i, tx*TN + j). A thread's TM
            (TN) elements of a row of the slice are whole aligned vectors in shared
            memory (`Shared`), which one load each fetches (LDS.128 for four float32),
            and the loop over the slice is unrolled UNROLL times in the source, so that
            its shared-memory addresses are constant offsets from one register. The
            machine code of the inner loop is then almost only FFMA (bench/cuda_build.py
            counts it). Each thread loads its share of the next slice into registers
            before it multiplies the current one (`Tiles.prefetch`), so that the
            latency of global memory runs under the multiply-adds.
    simple  (Tiles None) one thread per element of C, looping over k with the same
            operand code: obviously right, and the better choice for products with very
            few rows (depthwise convolutions, filters, a first layer's input gradient).

Race-free: each element of C is written by the one thread that owns it, after the whole
reduction. A product with a long K and few tiles (a weight gradient, K = batch x
positions) is split along K: block `split` reduces its own range of K and stores its
partial product into its own slice of a workspace, and a second kernel (`reduce_splits`,
one thread per element) sums the slices in a fixed order. Deterministic, no atomics.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from convdsl.codegen.cuda.common import FLAT, JIT, PRELUDE, Launch
from convdsl.codegen.source import Code

# (code, suffix, mn): bind the variables of one row of A (column of B) named with `suffix`
Setup = Callable[[Code, str, str], None]
# (code, suffix, k, target): assign the element at (mn, k) to `target`, which holds zero
# (leave it, where the element lies in padding)
Load = Callable[[Code, str, str, str], None]
# (code, m, n, value): store C's element (m, n)
Store = Callable[[Code, str, str, str], None]

# Types and zeros of the generated kernels, per dtype; NumPy for constant tables.
IMPORTS = ("import numpy as np  # noqa: F401\n"
           "from numba import config, float32, float64, uint64  # noqa: F401\n\n"
           "# aligned shared arrays, for vector loads (the CUDA simulator cannot align them)\n"
           "VECTOR_ALIGN = None if config.ENABLE_CUDASIM else 16\n")


def unsigned(index: str) -> str:
    """An index the kernel has already kept inside its array, as an unsigned integer.
    Numba wraps negative indices around (Python's a[-1]) unless the index is unsigned:
    on sm_90 that was six instructions per load, a quarter of loading a K-slice."""
    return f"uint64({index})"


def zero(dtype: str) -> str:
    """A zero of `dtype` as source, so that sums accumulate in that dtype."""
    return "float32(0.0)" if dtype == "float32" else "float64(0.0)"


@dataclass(frozen=True)
class Tiles:
    """A tiled kernel's shape: BM x BN of C per block, K in slices of BK, TM x TN per
    thread; and whether each slice is loaded while the one before it is multiplied."""

    bm: int
    bn: int
    bk: int
    tm: int
    tn: int
    prefetch: bool = True

    @property
    def rows(self) -> int:
        """Threads along M: thread (ty, tx) owns rows ty*tm + i of the tile."""
        return self.bm // self.tm

    @property
    def cols(self) -> int:
        return self.bn // self.tn

    @property
    def threads(self) -> int:
        return self.rows * self.cols

    def as_option(self) -> tuple[int, ...]:
        return (self.bm, self.bn, self.bk, self.tm, self.tn, int(self.prefetch))

    @staticmethod
    def from_option(value: tuple[int, ...] | None) -> Tiles | None:
        if value is None:
            return None
        bm, bn, bk, tm, tn, prefetch = (int(v) for v in value)
        return Tiles(bm, bn, bk, tm, tn, prefetch=bool(prefetch))


# Tile edges grow with the product up to these; a 64 x 64 tile of 256 threads, each
# with a 4 x 4 register block, is the classic choice for large products.
# CONVDSL_CUDA_MAX_TILE=128 gives 128 x 128 tiles with 8 x 8 register blocks instead (the
# tile is part of each kernel's spec, so both kinds of kernel can sit in one cache).
MAX_TILE = int(os.environ.get("CONVDSL_CUDA_MAX_TILE", "64"))
MIN_TILE = 4
# CONVDSL_CUDA_PREFETCH=0 loads each K-slice only once the last one is multiplied (for
# timing one against the other; part of the tiles, so both kinds can sit in one cache).
PREFETCH = os.environ.get("CONVDSL_CUDA_PREFETCH", "1") != "0"
THREAD_SPAN = 16  # threads along each edge of a full tile


def _edge(size: int) -> int:
    """The smallest power of two covering `size`, within [MIN_TILE, MAX_TILE]: small
    products get small tiles (less work in padding, and fast in the simulator)."""
    return min(MAX_TILE, max(MIN_TILE, 1 << max(0, size - 1).bit_length()))


# A thread prefetches only if it loads at most this many elements of a slice: each is a
# register held across the slice's products, beside the index state of its load. (A
# weight gradient's 4 x 64 tile of 64 threads loads 17 a thread, and with them spilled
# at 255 registers on sm_90; 64 x 64 tiles load 8, 128 x 128 tiles 16.)
PREFETCH_LOADS = 16


def choose_tiles(m: int, n: int, k: int) -> Tiles:
    bm, bn = _edge(m), _edge(n)
    bk = 16 if k >= 16 else 8
    tiles = Tiles(bm, bn, bk, max(1, bm // THREAD_SPAN), max(1, bn // THREAD_SPAN))
    loads = math.ceil(bk * bm / tiles.threads) + math.ceil(bk * bn / tiles.threads)
    return replace(tiles, prefetch=PREFETCH and loads <= PREFETCH_LOADS)


# Split K until the product has about this many blocks (an H100 has 132 SMs), keeping
# at least MIN_SPLIT_SLICES slices of K per split.
TARGET_BLOCKS = 512
MIN_SPLIT_SLICES = 8


def choose_splits(m: int, n: int, k: int, groups: int, tiles: Tiles | None) -> int:
    """How many parts the reduction over K runs in (1: no split)."""
    if tiles is None:
        return 1
    blocks = math.ceil(m / tiles.bm) * math.ceil(n / tiles.bn) * groups
    if 2 * blocks >= TARGET_BLOCKS:
        return 1
    most = max(1, k // (tiles.bk * MIN_SPLIT_SLICES))
    splits = min(math.ceil(TARGET_BLOCKS / blocks), most)
    return split_count(k, splits, tiles)


def split_chunk(k: int, splits: int, tiles: Tiles) -> int:
    """The length of K each split reduces: a multiple of BK."""
    return math.ceil(math.ceil(k / splits) / tiles.bk) * tiles.bk


def split_count(k: int, splits: int, tiles: Tiles) -> int:
    """Splits actually needed once chunks are rounded to BK (none empty)."""
    return max(1, math.ceil(k / split_chunk(k, max(1, splits), tiles)))


# (code, k): bind what depends on k alone (its decomposition into a channel and tap, or
# an example and position), for `load` to read; only for operands loaded along k, whose
# tiled loads then decompose k once per slice rather than once per element
KSetup = Callable[[Code, str], None]


@dataclass(frozen=True)
class Operand:
    """How a kernel reads one factor: A (rows m, columns k) or B (rows k, columns n)."""

    k_fast: bool  # consecutive threads load consecutive k (else consecutive m or n)
    setup: Setup
    load: Load
    k_setup: KSetup | None = None  # emitted before `load`, for the k it loads


@dataclass(frozen=True)
class Table:
    """A table of integers a kernel reads from the GPU's constant memory, which serves
    a whole warp in one go when its threads read the same entry (as they do for an
    operand loaded along m or n: the threads of a warp share k)."""

    name: str  # as the kernel's code reads it
    dtype: str  # "int32" or "int16"
    shape: tuple[int, ...]
    values: tuple[int, ...]  # row-major

    @property
    def nbytes(self) -> int:
        return len(self.values) * (4 if self.dtype == "int32" else 2)


@dataclass(frozen=True)
class Product:
    """C[g] = A[g] @ B[g] for every group g (named `g` in the generated code)."""

    name: str
    params: str  # the kernel's parameters, "x, w, y"
    m: int
    n: int
    k: int
    groups: int
    a: Operand
    b: Operand
    store: Store  # may use `split` (the split of K) when splits > 1
    dtype: str
    tiles: Tiles | None
    splits: int = 1
    tables: tuple[Table, ...] = ()

    def launch(self) -> tuple[tuple[int, ...], int]:
        """(grid, threads per block) of the kernel."""
        if self.tiles is None:
            count = self.groups * self.m * self.n
            return (max(1, math.ceil(count / SIMPLE_THREADS)),), SIMPLE_THREADS
        t = self.tiles
        grid = (math.ceil(self.n / t.bn), math.ceil(self.m / t.bm), self.groups * self.splits)
        return grid, t.threads


SIMPLE_THREADS = 128


def configured(module: Any, product: Product) -> Launch:
    """The product's kernel in the generated `module`, as a launch site of its size
    (every array argument seen flat, as the kernel indexes it)."""
    grid, threads = product.launch()
    return Launch(getattr(module, product.name), grid, threads, every=FLAT)


def render(code: Code, product: Product) -> None:
    """Emit the product's kernel (tiled or simple) into `code`, after its tables."""
    for table in product.tables:
        _render_table(code, product, table)
    if product.tiles is None:
        _render_simple(code, product)
    else:
        _render_tiled(code, product, product.tiles)
    code.line()


def prelude() -> str:
    return PRELUDE + IMPORTS


TABLE_ROW = 16  # values per line of a table's source


def _table_global(product: Product, table: Table) -> str:
    return f"_{product.name.upper()}_{table.name.upper()}"


def _render_table(code: Code, product: Product, table: Table) -> None:
    """The table as a module-level NumPy array (constant memory takes it from there)."""
    code.line(f"{_table_global(product, table)} = np.array([")
    values = table.values
    for start in range(0, len(values), TABLE_ROW):
        code.line("    " + ", ".join(str(v) for v in values[start:start + TABLE_ROW]) + ",")
    code.line(f"], dtype=np.{table.dtype}).reshape({table.shape})")
    code.line()


def _bind_tables(code: Code, product: Product) -> None:
    for table in product.tables:
        code.line(f"{table.name} = cuda.const.array_like({_table_global(product, table)})")


def _render_simple(code: Code, p: Product) -> None:
    assert p.splits == 1
    code.line(JIT)
    with code.block(f"def {p.name}({p.params})"):
        _bind_tables(code, p)
        code.line("t = cuda.grid(1)")
        with code.block(f"if t < {p.groups * p.m * p.n}"):
            code.line(f"g = t // {p.m * p.n}")
            code.line(f"r = t - g * {p.m * p.n}")
            code.line(f"m = r // {p.n}")
            code.line(f"n = r - m * {p.n}")
            p.a.setup(code, "a", "m")
            p.b.setup(code, "b", "n")
            code.line(f"acc = {zero(p.dtype)}")
            with code.block(f"for k in range({p.k})"):
                for operand, name in ((p.a, "a"), (p.b, "b")):
                    code.line(f"{name}v = {zero(p.dtype)}")
                    if operand.k_setup is not None:
                        operand.k_setup(code, "k")
                    operand.load(code, name, "k", f"{name}v")
                code.line("acc += av * bv")
            p.store(code, "m", "n", "acc")


def _slots(code: Code, t: Tiles, operand: Operand, name: str, edge: int, size: int
           ) -> list[tuple[str, str | None]]:
    """Bind, for each load slot s of this thread, k-offset `<name>k<s>`, tile index
    `<name>i<s>`, global index `<name>g<s>`, and the operand's setup. Returns per slot
    (suffix, guard): the guard is the test that the slot lies inside the tile."""
    per_tile = t.bk * edge
    slots = []
    for s in range(math.ceil(per_tile / t.threads)):
        e = f"tid + {s * t.threads}" if s else "tid"
        suffix = f"{name}{s}"
        if operand.k_fast:
            code.line(f"{name}k{s} = ({e}) % {t.bk}")
            code.line(f"{name}i{s} = ({e}) // {t.bk}")
        else:
            code.line(f"{name}k{s} = ({e}) // {edge}")
            code.line(f"{name}i{s} = ({e}) % {edge}")
        base = "m0" if name == "a" else "n0"
        code.line(f"{name}g{s} = {base} + {name}i{s}")
        operand.setup(code, suffix, f"{name}g{s}")
        inside = (s + 1) * t.threads <= per_tile
        slots.append((suffix, None if inside else f"{e} < {per_tile}"))
        code.line(f"{name}ok{s} = {name}g{s} < {size}")
    return slots


def _fetch_slice(code: Code, operand: Operand, name: str, slots: list[tuple[str, str | None]],
                 dtype: str, t: Tiles, start: str) -> None:
    """Every slot s of this thread reads its element of the K-slice starting at `start`
    into the register `<name>p<s>` (zero outside the matrices). Slot s is element
    tid + s*threads of the slice; loads along k therefore give all of a thread's slots
    one k (the threads are a whole number of BK), and what depends on k alone
    (`k_setup`) is worked out once for them."""
    if operand.k_fast:
        assert t.threads % t.bk == 0
        code.line(f"k = {start} + {name}k0")
        code.line(f"{name}kin = k < kstop")
        if operand.k_setup is not None:
            operand.k_setup(code, "k")
    else:
        assert operand.k_setup is None, "k_setup is for operands loaded along k"
    for s, (suffix, guard) in enumerate(slots):
        code.line(f"{name}p{s} = {zero(dtype)}")

        def body(s: int = s, suffix: str = suffix) -> None:
            if not operand.k_fast:
                code.line(f"k = {start} + {name}k{s}")
            inside = f"{name}kin" if operand.k_fast else "k < kstop"
            with code.block(f"if {name}ok{s} and {inside}"):
                operand.load(code, suffix, "k", f"{name}p{s}")
        _guarded(code, guard, body)


def _store_slice(code: Code, name: str, slots: list[tuple[str, str | None]],
                 shared: Shared) -> None:
    """The registers `_fetch_slice` filled, into the slice's shared memory."""
    for s, (_, guard) in enumerate(slots):
        def body(s: int = s) -> None:
            code.line(f"{shared.at(f'{name}k{s}', f'{name}i{s}')} = {name}p{s}")
        _guarded(code, guard, body)


def _guarded(code: Code, guard: str | None, body: Callable[[], None]) -> None:
    """`body` under `if guard` (a slot past the end of the tile), or as it is."""
    if guard is None:
        body()
    else:
        with code.block(f"if {guard}"):
            body()


def _render_tiled(code: Code, p: Product, t: Tiles) -> None:
    dtype = p.dtype
    code.line(JIT)
    with code.block(f"def {p.name}({p.params})"):
        _bind_tables(code, p)
        code.line("tid = cuda.threadIdx.x")
        code.line(f"tx = tid % {t.cols}")
        code.line(f"ty = tid // {t.cols}")
        code.line(f"m0 = cuda.blockIdx.y * {t.bm}")
        code.line(f"n0 = cuda.blockIdx.x * {t.bn}")
        if p.splits > 1:
            chunk = split_chunk(p.k, p.splits, t)
            code.line(f"g = cuda.blockIdx.z // {p.splits}")
            code.line(f"split = cuda.blockIdx.z - g * {p.splits}")
            code.line(f"kstart = split * {chunk}")
            code.line(f"kstop = min({p.k}, kstart + {chunk})")
        else:
            code.line("g = cuda.blockIdx.z")
            code.line("kstart = 0")
            code.line(f"kstop = {p.k}")
        sa = Shared.of("sa", t.bm, t.tm, p.a.k_fast, dtype)
        sb = Shared.of("sb", t.bn, t.tn, p.b.k_fast, dtype)
        for shared in (sa, sb):
            code.line(f"{shared.name} = cuda.shared.array({shared.shape(t.bk)}, {dtype}, "
                      "alignment=VECTOR_ALIGN)")
        a_slots = _slots(code, t, p.a, "a", t.bm, p.m)
        b_slots = _slots(code, t, p.b, "b", t.bn, p.n)
        code.line(f"ra = ty * {t.tm}")  # this thread's first row of C in the tile
        code.line(f"rb = tx * {t.tn}")  # and its first column
        code.line(f"ga = ty * {t.tm // sa.vector}")  # their first vectors in shared memory
        code.line(f"gb = tx * {t.tn // sb.vector}")
        for i in range(t.tm):
            for j in range(t.tn):
                code.line(f"c{i}_{j} = {zero(dtype)}")

        def fetch(start: str) -> None:
            _fetch_slice(code, p.a, "a", a_slots, dtype, t, start)
            _fetch_slice(code, p.b, "b", b_slots, dtype, t, start)

        if t.prefetch:
            # The next slice's global loads are issued before this slice's products and
            # land in registers while they run; a warp waits for memory only if a whole
            # slice of FFMA is shorter than the loads' latency.
            fetch("kstart")
        with code.block(f"for k0 in range(kstart, kstop, {t.bk})"):
            if not t.prefetch:
                fetch("k0")
            _store_slice(code, "a", a_slots, sa)
            _store_slice(code, "b", b_slots, sb)
            code.line("cuda.syncthreads()")
            if t.prefetch:  # past kstop every load is skipped: its slots stay zero
                fetch(f"k0 + {t.bk}")
            _multiply_slice(code, t, sa, sb)
            code.line("cuda.syncthreads()")
        for j in range(t.tn):
            code.line(f"n = n0 + {_plus('rb', j)}")
            with code.block(f"if n < {p.n}"):
                for i in range(t.tm):
                    code.line(f"m = m0 + {_plus('ra', i)}")
                    with code.block(f"if m < {p.m}"):
                        p.store(code, "m", "n", f"c{i}_{j}")


# The inner loop over a slice's BK rows runs UNROLL rows per pass: enough that its
# shared-memory addresses become constant offsets and the loop's own counting vanishes
# (with 4 rows a pass, 64 FFMA of 81 instructions on sm_90), without the compile time of
# unrolling the whole slice (which took each tiled kernel from 2 to 3.5 s in NVVM).
UNROLL = 4
VECTOR_BYTES = 16  # the widest shared-memory load, LDS.128 (VECTOR_ALIGN in the kernels)


@dataclass(frozen=True)
class Shared:
    """A K-slice of one factor in shared memory, shaped (BK, groups, vector): each row of
    the slice is `groups` vectors of `vector` elements, so that a thread's elements of a
    row are whole vectors, which the compiler then reads with one load each (indexed as
    one flat row, LLVM sometimes gave neighbouring elements separate addresses and lost
    the vector). Where loads run along k, one more vector pads each row, so that
    consecutive threads (consecutive k, one column) store into other banks."""

    name: str
    groups: int
    vector: int

    @staticmethod
    def of(name: str, edge: int, per_thread: int, k_fast: bool, dtype: str) -> Shared:
        itemsize = 4 if dtype == "float32" else 8
        vector = max(1, min(per_thread, VECTOR_BYTES // itemsize))
        return Shared(name, edge // vector + (1 if k_fast else 0), vector)

    def shape(self, bk: int) -> tuple[int, int, int]:
        return bk, self.groups, self.vector

    def at(self, k: str, index: str) -> str:
        """The element at row k, column `index` (both known non-negative)."""
        if self.vector == 1:
            return f"{self.name}[{unsigned(k)}, {unsigned(index)}, 0]"
        return (f"{self.name}[{unsigned(k)}, {unsigned(index)} // {self.vector}, "
                f"{unsigned(index)} % {self.vector}]")

    def own(self, k: str, first: str, element: int) -> str:
        """A thread's `element`-th element of row k, its vectors starting at `first`."""
        group, lane = divmod(element, self.vector)
        return f"{self.name}[{k}, {_plus(first, group)}, {lane}]"


def _plus(name: str, offset: int) -> str:
    return f"{name} + {offset}" if offset else name


def _multiply_slice(code: Code, t: Tiles, sa: Shared, sb: Shared) -> None:
    """C's register block += the slice's columns of A times its rows of B."""
    unroll = math.gcd(UNROLL, t.bk)
    with code.block(f"for kq in range(0, {t.bk}, {unroll})"):
        for step in range(unroll):
            kk = f"kq + {step}" if step else "kq"
            for i in range(t.tm):
                code.line(f"a{i} = {sa.own(kk, 'ga', i)}")
            for j in range(t.tn):
                code.line(f"b{j} = {sb.own(kk, 'gb', j)}")
            for i in range(t.tm):
                for j in range(t.tn):
                    code.line(f"c{i}_{j} += a{i} * b{j}")


def render_reduce_splits(code: Code, splits: int, size: int) -> None:
    """reduce_splits(part, out): out[e] = the sum over s of part[s*size + e], in order."""
    code.line(JIT)
    with code.block("def reduce_splits(part, out)"):
        code.line("e = cuda.grid(1)")
        with code.block(f"if e < {size}"):
            code.line("total = part[e]")
            with code.block(f"for s in range(1, {splits})"):
                code.line(f"total += part[s * {size} + e]")
            code.line("out[e] = total")
    code.line()


def unflatten(code: Code, flat: str, sizes: tuple[int, ...], prefix: str) -> list[str]:
    """Emit `<prefix>0, <prefix>1, ...`, the row-major multi-index of `flat` in an array
    of `sizes`; return their names (`flat` itself for one axis)."""
    if len(sizes) == 1:
        return [flat]
    names = [f"{prefix}{axis}" for axis in range(len(sizes))]
    rest = flat
    for axis in range(len(sizes) - 1):
        stride = math.prod(sizes[axis + 1:])
        code.line(f"{names[axis]} = {rest} // {stride}")
        remainder = f"{prefix}r{axis}"
        code.line(f"{remainder} = {rest} - {names[axis]} * {stride}")
        rest = remainder
    code.line(f"{names[-1]} = {rest}")
    return names


def flatten(names: list[str], sizes: tuple[int, ...], base: str | None = None) -> str:
    """Row-major flat index of `names` in an array of `sizes`, after `base` leading
    entries (Horner form: ((base*n0 + i0)*n1 + i1)...)."""
    text = base
    for name, size in zip(names, sizes):
        text = name if text is None else f"({text}) * {size} + {name}"
    assert text is not None
    return text
