"""The FFT algorithm: convolution theorem on zero-padded transforms.

Per spatial axis the transforms have a length L >= R = (Q-1)*s + d*(K-1) + 1, the padded
positions the windows reach (the next 2^a 3^b 5^c 7^d, sizes pocketfft is fast at). With
xp the zero-padded input cut to R and wd the kernel spread by the dilation
(wd[k~*d] = w[k], k~ flipped for a true convolution), all of length L:

    forward   y[q] = r[q*s],  r = irfft(X * conj(W))   (circular correlation; no index
              i + j < R wraps, so it equals the linear one); then bias and activation.
    input     dxp = irfft(Gz * W): the transposed operation, a true convolution of the
              gradient Gz spread by the stride (gz[q*s] = dy[q], zeros between) with the
              kernel; wrapped terms read the zeros of gz beyond (Q-1)*s, since L >= R.
    weight    dw[k] = rw[k~*d],  rw = irfft(conj(Gz) * X), the correlation of x with dy.

The products are summed over channels, per group and frequency f, as stacked complex
matrix products through BLAS (np.matmul on (G, F, ., .) arrays): X_f (N x C/G) times
conj(W_f) (C/G x O/G). Conjugates ride along with the transposes into that layout
(np.conjugate with out=), and the input gradient is computed conjugated,
conj(dX_f) = conj(G_f) conj(W_f), to reuse both stored operands. numpy.fft (rfftn,
irfftn with out=) runs outside jitted code; the generated kernels do the padding, the
spreading and gathering by stride and dilation, and the epilogue.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.activations import forward_expression
from convdsl.codegen.cpu.conv_common import (
    IMPORTS,
    Geometry,
    affine,
    columns,
    emit_prepare,
    ix,
    names,
    prepare_call,
    weight_index,
)
from convdsl.codegen.source import PRELUDE, Code, jit
from convdsl.codegen.spec import KernelSpec

# Generated modules import this after PRELUDE: numpy's transforms run on one thread.
FFT_IMPORTS = "from convdsl.codegen.cpu.conv_fft import in_threads\n\n"

_POOLS: dict[int, ThreadPoolExecutor] = {}  # by thread count


def in_threads(transform: Callable[..., Any], a: np.ndarray, out: np.ndarray,
               **options: Any) -> None:
    """transform(a, out=out, **options), the leading axis (batch or output channels)
    split across Numba's thread count: numpy's FFTs run on one thread each and release
    the GIL, so the parts run side by side (measured: 1.6x on 2 busy cores). Only numpy
    runs on these threads: Numba's workqueue pool must not be entered from two threads."""
    parts = min(numba.get_num_threads(), a.shape[0])
    if parts <= 1:
        transform(a, out=out, **options)
        return
    pool = _POOLS.get(parts)
    if pool is None:
        pool = _POOLS[parts] = ThreadPoolExecutor(parts, thread_name_prefix="convdsl-fft")
    bounds = [a.shape[0] * part // parts for part in range(parts + 1)]
    futures = [pool.submit(transform, a[start:stop], out=out[start:stop], **options)
               for start, stop in itertools.pairwise(bounds)]
    for future in futures:
        future.result()


def fast_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= n."""
    size = max(n, 1)
    while True:
        rest = size
        for factor in (2, 3, 5, 7):
            while rest % factor == 0:
                rest //= factor
        if rest == 1:
            return size
        size += 1


def transform_sizes(g: Geometry) -> tuple[int, ...]:
    """L per spatial axis."""
    return tuple(fast_size(g.reach(axis)) for axis in range(g.rank))


def _spread_weight(code: Code, g: Geometry) -> None:
    """wpad[o, c, k~*d] = w[o, c, k]: the kernel, flipped for convolution, dilated."""
    at = ", ".join(ix(affine([(f"kk{axis}", g.dilation[axis])])) for axis in range(g.rank))
    code.line(jit(parallel=False))
    with code.block("def spread_weight(w, wpad)"), \
            code.loops([("o", f"range({g.out_channels})"), ("c", f"range({g.cg})")]), \
            code.loops([(f"k{axis}", f"range({size})") for axis, size in enumerate(g.window)]):
        for axis, offset in enumerate(weight_index(g).split(", ")):
            code.line(f"kk{axis} = {offset}")
        code.line(f"wpad[o, c, {at}] = w[o, c, {names('k', g.rank)}]")
    code.line()


def _gather_weight(code: Code, g: Geometry) -> None:
    """dw[o, c, k] = rw[o, c, k~*d]."""
    at = ", ".join(ix(affine([(f"kk{axis}", g.dilation[axis])])) for axis in range(g.rank))
    code.line(jit(parallel=False))
    with code.block("def gather_weight(rw, dw)"), \
            code.loops([("o", f"range({g.out_channels})"), ("c", f"range({g.cg})")]), \
            code.loops([(f"k{axis}", f"range({size})") for axis, size in enumerate(g.window)]):
        for axis, offset in enumerate(weight_index(g).split(", ")):
            code.line(f"kk{axis} = {offset}")
        code.line(f"dw[o, c, {names('k', g.rank)}] = rw[o, c, {at}]")
    code.line()


def _kept(g: Geometry, axis: int) -> int:
    """Input positions on `axis` that some window reaches (the rest never matter)."""
    return max(0, min(g.sizes[axis], g.reach(axis) - g.pads[axis][0]))


def _pad_input(code: Code, g: Geometry) -> None:
    """xpad[n, c, i + p] = x[n, c, i] for the reached positions; the rest stays zero."""
    channels = g.channels
    at = ", ".join(ix(affine([(f"i{axis}", 1)], g.pads[axis][0])) for axis in range(g.rank))
    code.line(jit())
    with code.block("def pad_input(x, xpad)"), \
            code.block(f"for job in prange({g.batch * channels})"):
        code.line(f"n = job // {channels}")
        code.line(f"c = job - n * {channels}")
        with code.loops([(f"i{axis}", f"range({_kept(g, axis)})") for axis in range(g.rank)]):
            code.line(f"xpad[n, c, {at}] = x[n, c, {names('i', g.rank)}]")
    code.line()


def _crop_input(code: Code, g: Geometry) -> None:
    """dx[n, c, i] = dxp[n, c, i + p]; zero past the reached positions."""
    channels = g.channels
    at = ", ".join(ix(affine([(f"i{axis}", 1)], g.pads[axis][0])) for axis in range(g.rank))
    code.line(jit())
    with code.block("def crop_input(dxp, dx)"), \
            code.block(f"for job in prange({g.batch * channels})"):
        code.line(f"n = job // {channels}")
        code.line(f"c = job - n * {channels}")
        here = f"n, c, {names('i', g.rank)}"
        with code.loops([(f"i{axis}", f"range({size})") for axis, size in enumerate(g.sizes)]):
            unreached = [f"i{axis} >= {_kept(g, axis)}" for axis in range(g.rank)
                         if _kept(g, axis) < g.sizes[axis]]
            if unreached:
                code.line(f"dx[{here}] = {g.zero} if {' or '.join(unreached)} "
                          f"else dxp[n, c, {at}]")
            else:
                code.line(f"dx[{here}] = dxp[n, c, {at}]")
    code.line()


def _strided(g: Geometry) -> str:
    return ", ".join(ix(affine([(f"q{axis}", g.stride[axis])])) for axis in range(g.rank))


def _finish(code: Code, g: Geometry) -> None:
    """y[n, o, q] = act(r[n, o, q*s] + b[o])."""
    maps = g.out_channels
    code.line(jit())
    with code.block(f"def finish(r, {'b, ' if g.bias else ''}y)"), \
            code.block(f"for job in prange({g.batch * maps})"):
        code.line(f"n = job // {maps}")
        code.line(f"o = job - n * {maps}")
        code.line("start = b[o]" if g.bias else f"start = {g.zero}")
        with code.loops([(f"q{axis}", f"range({size})") for axis, size in enumerate(g.out)]):
            code.line(f"v = r[n, o, {_strided(g)}] + start")
            code.line(f"y[n, o, {names('q', g.rank)}] = {forward_expression(g.act, 'v')}")
    code.line()


def _spread_grad(code: Code, g: Geometry) -> None:
    """gz[n, o, q*s] = dy[n, o, q]; the positions between stay zero."""
    maps = g.out_channels
    code.line(jit())
    with code.block("def spread_grad(dy, gz)"), \
            code.block(f"for job in prange({g.batch * maps})"):
        code.line(f"n = job // {maps}")
        code.line(f"o = job - n * {maps}")
        with code.loops([(f"q{axis}", f"range({size})") for axis, size in enumerate(g.out)]):
            code.line(f"gz[n, o, {_strided(g)}] = dy[n, o, {names('q', g.rank)}]")
    code.line()


def _driver(code: Code, g: Geometry, prepared: bool) -> None:
    sizes = transform_sizes(g)
    half = (*sizes[:-1], sizes[-1] // 2 + 1)  # rfft keeps half of the last axis
    freqs = math.prod(half)
    batch, channels, maps, groups, cg, og = (g.batch, g.channels, g.out_channels, g.groups,
                                            g.cg, g.og)
    real = f"np.{g.dtype}"
    cplx = "np.complex64" if g.dtype == "float32" else "np.complex128"
    axes = tuple(range(2, 2 + g.rank))
    buffers = [
        ("xpad", (batch, channels, *sizes), real, "the input, zero-padded to L"),
        ("xf", (batch, channels, *half), cplx, "its transform (backward: the input grad's)"),
        ("xt", (groups, freqs, batch, cg), cplx, "the same, as matrices per frequency"),
        ("wpad", (maps, cg, *sizes), real, "the kernel, spread by the dilation"),
        ("wf", (maps, cg, *half), cplx, "its transform (backward: the weight grad's)"),
        ("wt", (groups, freqs, cg, og), cplx, "its conjugate, as matrices per frequency"),
        ("yt", (groups, freqs, batch, og), cplx, "the products"),
        ("yf", (batch, maps, *half), cplx, "the output's transform (backward: dy's)"),
        ("yr", (batch, maps, *sizes), real, "the full circular correlation"),
        ("gz", (batch, maps, *sizes), real, "dy spread by the stride"),
        ("gtc", (groups, freqs, og, batch), cplx, "conj(transform of gz), as matrices"),
        ("dxt", (groups, freqs, batch, cg), cplx, "conj(input grad's transform)"),
        ("dxr", (batch, channels, *sizes), real, "the padded input's gradient"),
    ]
    if g.weight_grad:
        buffers += [
            ("dwt", (groups, freqs, og, cg), cplx, "the weight grad's transform"),
            ("dwr", (maps, cg, *sizes), real, "the weight grad at every lag"),
        ]
    with code.block("def workspace()"):
        code.line(f'"""Transform length per axis L = {sizes}."""')
        code.line("return {")
        for name, shape, dtype, what in buffers:
            code.line(f"    {name!r}: np.zeros({shape}, dtype={dtype}),  # {what}")
        code.line("}")
    code.line()
    code.line()
    bias = "b, " if g.bias else ""
    with code.block("def forward(x, w, b, y, ws)"):
        code.lines([
            "pad_input(x, ws['xpad'])",
            f"in_threads(np.fft.rfftn, ws['xpad'], ws['xf'], axes={axes})",
            f"np.copyto(ws['xt'], ws['xf'].reshape({(batch, groups, cg, freqs)})"
            ".transpose(1, 3, 0, 2))",
            "spread_weight(w, ws['wpad'])",
            f"in_threads(np.fft.rfftn, ws['wpad'], ws['wf'], axes={axes})",
            f"np.conjugate(ws['wf'].reshape({(groups, og, cg, freqs)}).transpose(0, 3, 2, 1), "
            "out=ws['wt'])",
            "np.matmul(ws['xt'], ws['wt'], out=ws['yt'])  # sum over input channels",
            f"np.copyto(ws['yf'].reshape({(batch, groups, og, freqs)}), "
            "ws['yt'].transpose(2, 0, 3, 1))",
            f"in_threads(np.fft.irfftn, ws['yf'], ws['yr'], s={sizes}, axes={axes})",
            f"finish(ws['yr'], {bias}y)",
        ])
    code.line()
    code.line()
    with code.block("def backward(x, w, y, dy, dx, dw, db, ws, apply_act)"):
        if prepared:
            code.line(prepare_call(g))
        code.lines([
            "spread_grad(dy, ws['gz'])",
            f"in_threads(np.fft.rfftn, ws['gz'], ws['yf'], axes={axes})",
            f"np.conjugate(ws['yf'].reshape({(batch, groups, og, freqs)}).transpose(1, 3, 2, 0), "
            "out=ws['gtc'])",
        ])
        if g.weight_grad:
            code.lines([
                "np.matmul(ws['gtc'], ws['xt'], out=ws['dwt'])  # sum over the batch",
                f"np.copyto(ws['wf'].reshape({(groups, og, cg, freqs)}), "
                "ws['dwt'].transpose(0, 2, 3, 1))",
                f"in_threads(np.fft.irfftn, ws['wf'], ws['dwr'], s={sizes}, axes={axes})",
                "gather_weight(ws['dwr'], dw)",
            ])
        code.line("# dx is None when no one needs the input's gradient")
        with code.block("if dx is not None"):
            code.lines([
                "# conj(dX) = conj(G) conj(W), summed over output channels",
                "np.matmul(ws['gtc'].transpose(0, 1, 3, 2), ws['wt'].transpose(0, 1, 3, 2), "
                "out=ws['dxt'])",
                f"np.conjugate(ws['dxt'].transpose(2, 0, 3, 1), "
                f"out=ws['xf'].reshape({(batch, groups, cg, freqs)}))",
                f"in_threads(np.fft.irfftn, ws['xf'], ws['dxr'], s={sizes}, axes={axes})",
                "crop_input(ws['dxr'], dx)",
            ])


@cache.template("conv_fft", work=columns)
def render(spec: KernelSpec) -> str:
    g = Geometry.from_spec(spec)
    code = Code()
    code.line(PRELUDE + IMPORTS + FFT_IMPORTS)
    _pad_input(code, g)
    _spread_weight(code, g)
    _finish(code, g)
    _spread_grad(code, g)
    _crop_input(code, g)
    if g.weight_grad:
        _gather_weight(code, g)
    prepared = emit_prepare(code, g.epilogue)
    code.line()
    _driver(code, g, prepared)
    return code.text()
