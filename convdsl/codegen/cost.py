"""A cost model for the four convolution algorithms, and tuning by measurement.

`estimate(spec, rates)` says how many seconds one forward plus one backward pass of a
convolution kernel spec (conv_direct, conv_gemm, conv_fft or conv_winograd) should take,
from what the kernels do (see their module docstrings) and from what this machine does
per second (`Rates`):

    direct  multiply-adds along rows, in generated loops: every pass (forward, input
            gradient, weight gradient) does all MACs, plus a cost per row (short rows,
            as in 1-D maps of a few positions, run far from the loop's peak);
    gemm    the im2col copies (bytes), and BLAS products whose rate falls with the
            smallest side of the matrices (6 outputs per group use BLAS badly);
    fft     2.5 L log2 L flops per real transform of L points, for every input, output
            and kernel map, plus the per-frequency complex products and the copies
            that reorder the spectra;
    winograd  (m+2)^2 BLAS products per pass over a reduction of C only, and the
            transforms as copies of as many planes, times a slack fitted to measurements.

The rates are measured once per machine by tiny micro-benchmarks (a few seconds,
most of it compiling one small Numba kernel). Then a reference layer runs in the
direct, GEMM and FFT algorithms, and each one's measured over estimated seconds is kept
as its fit, which multiplies its estimates (`cpu/conv_fit.py`: the micro-benchmarks
alone did not carry the model from one machine to another). Rates and fits are kept as
JSON in the kernel cache (`calibration.json`); `convdsl calibrate` measures them again.
With CONVDSL_NO_CALIBRATE=1 the built-in rates of the 2-core machine the model was
fitted on are used instead, with fits of 1, so that choices are deterministic.

The algorithm `tune` refines the model by measurement: the builder times each
candidate's forward and backward once, and `tuned` keeps the decision in
`tuning.json` in the same cache, keyed by the layer's kernel spec, so that the next
compile does not time again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from convdsl.codegen import cache
from convdsl.codegen.cpu import conv_fft, conv_gemm, conv_winograd
from convdsl.codegen.cpu.conv_common import Geometry
from convdsl.codegen.cpu.conv_direct import UNROLL
from convdsl.codegen.spec import KernelSpec

CHOICES = ("auto", "tune", "direct", "gemm", "fft", "winograd")
NO_CALIBRATE = "CONVDSL_NO_CALIBRATE"
CALIBRATION_FILE = "calibration.json"
LOCK_FILE = "calibration.lock"
TUNING_FILE = "tuning.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rates:
    """What this machine does per second, in float32 on all of Numba's threads, and how
    its convolution kernels run against the estimates those rates give."""

    blas: float  # flop/s of a large matrix product
    loops: float  # flop/s of a generated multiply-add loop along rows
    fft: float  # flop/s of real FFTs, counted as 2.5 L log2 L per transform
    copy: float  # bytes/s (read + written) of a strided copy, as in im2col
    call: float  # seconds per kernel call: Python, and waking the thread pools
    # Measured over estimated seconds of each algorithm on a reference layer
    # (cpu/conv_fit.py). The micro-benchmarks above miss much of what makes one machine's
    # kernels faster than another's (caches, vector width); these catch it. They are 1
    # where the model's constants were fitted, which is what the built-in rates assume.
    direct_fit: float = 1.0
    gemm_fit: float = 1.0  # Winograd's too: its constants are fitted as ratios to GEMM
    fft_fit: float = 1.0

    def fit(self, template: str) -> float:
        """The fit that applies to a convolution kernel template's estimate."""
        return {"conv_direct": self.direct_fit, "conv_gemm": self.gemm_fit,
                "conv_winograd": self.gemm_fit, "conv_fft": self.fft_fit}[template]


# Measured by `calibrate` on the 2-core development machine (best of 5 runs each; the
# machine was shared, the best runs are the least disturbed).
DEFAULT_RATES = Rates(blas=200e9, loops=25e9, fft=7e9, copy=68e9, call=30e-6)

# Shape of the model, set by hand against timings of the three algorithms on 30 layers
# (LeNet-5, ResNet-20/18 CIFAR, NiN, MNIST-1D, digits, long 1-D windows, 3-D; fastest of
# 3-25 runs on a loaded 2-core machine): a least-squares fit was no better, the data
# being too noisy for eleven constants.
ROW_FLOPS = 115.0  # a loop over one row costs as much as this many flops besides its work
LONG_WINDOW = 1.3  # loops over taps one by one (more than UNROLL): this many times slower
STRIDED = 2.0  # loops along a strided row: this many times slower
BLAS_HALF = (12.0, 16.0, 16.0)  # sides (m, k, n) at which a product runs at half speed
IM2COL_PASSES = 2.0  # bytes moved per column byte (read of x, write of the column)
SPECTRUM_PASSES = 2.0  # complex bytes moved per spectrum entry and reordering
# Winograd's estimate times (WINOGRAD_SLACK + WINOGRAD_FEW / channels): its products
# are short (a reduction over C, not 9C) and its transforms touch 16 or 36 planes, so
# few channels cost more than the products and copies say. Fitted to forward + backward
# times of 2x2 tiles against GEMM (`python bench/conv_layers.py`: 3x3, pad 1, batch
# 32): 64 channels on 32x32 maps 0.81 of GEMM's time, 128 on 16x16 0.64, 256 on 8x8
# 0.55, 512 on 4x4 0.57, 16 and 32 channels 1.0-1.05, 3 -> 64 channels 2.3.
WINOGRAD_SLACK = 1.15
WINOGRAD_FEW = 16.0
# ... and times this per tile size: 4x4 tiles' transforms combine 36 values with
# coefficients up to 8, and on small maps their products are thin (a 4x4 map is one
# tile). Fitted the same way: F4 / GEMM measured 0.77 (16 channels), 0.62, 0.67, 0.56,
# 0.44 and 0.70 (512 channels on 4x4 maps, where F2's 0.56 wins).
WINOGRAD_TILE_SLACK = {2: 1.0, 4: 1.45}
SMALL_PRODUCT = 0.2e-6  # seconds per (group, frequency) matrix product of the FFT path
FFT_ROW = 0.1e-6  # seconds per 1-D transform that a transform of a map is made of
# What the kernels reach of the micro-benchmarks' rates: their products are smaller and
# their copies less regular; numpy's transforms of many maps at once beat the benchmark's.
EFFICIENCY = {"loops": 1.0, "blas": 0.3, "fft": 1.5, "copy": 0.15}


# The generated loops' rate is taken as at most this fraction of the BLAS rate. The
# constants above were fitted where the loop benchmark (a 5-tap correlation along rows
# of 1,024) measured about an eighth of the BLAS rate (DEFAULT_RATES). On a machine with
# AVX-512 it measured 91 GFLOP/s against BLAS's 188, while the direct kernels, whose rows
# are 8-32 outputs long, ran ResNet-20's 3x3 layers at 40-50: uncapped, the model chose
# direct for layers where Winograd was 2.5-11x faster (bench/conv_layers.py --network).
LOOPS_PER_BLAS = DEFAULT_RATES.loops / DEFAULT_RATES.blas


def _effective(rates: Rates) -> Rates:
    """The rates the kernels reach: the measured ones (loops capped, LOOPS_PER_BLAS)
    times EFFICIENCY."""
    loops = min(rates.loops, LOOPS_PER_BLAS * rates.blas)
    return replace(rates, blas=rates.blas * EFFICIENCY["blas"],
                   loops=loops * EFFICIENCY["loops"], fft=rates.fft * EFFICIENCY["fft"],
                   copy=rates.copy * EFFICIENCY["copy"])


def _scale(spec: KernelSpec) -> float:
    """Compute rates are for float32; float64 halves the SIMD lanes."""
    return np.dtype(spec.dtype).itemsize / 4


def _blas_seconds(flops: float, m: int, k: int, n: int, rates: Rates) -> float:
    """A product of (m x k) by (k x n): its rate drops when any side is small."""
    slowdown = 1 + sum(half / max(side, 1) for half, side in zip(BLAS_HALF, (m, k, n)))
    return flops * slowdown / rates.blas


def estimate_direct(g: Geometry, rates: Rates, scale: float = 1.0) -> float:
    """Forward, input gradient and (unless fixed) weight gradient: each does every MAC,
    in one loop per row of the last axis, or per row and tap (conv_direct.py)."""
    macs = g.batch * g.out_channels * g.positions * g.cg * g.volume
    taps, width = g.window[-1], g.out[-1]
    rows = g.batch * g.out_channels * g.cg * (g.volume // taps) * (g.positions // width)
    unrolled, strided = taps <= UNROLL, g.stride[-1] > 1
    slow = 1.0 if unrolled else LONG_WINDOW
    per_tap = rows if unrolled else rows * taps

    def loops(slowdown: float, row_count: int) -> float:
        return (2 * macs * slowdown + row_count * ROW_FLOPS) * scale / rates.loops

    forward = loops(slow * (STRIDED if strided else 1.0), per_tap)
    # along a strided row the input gradient scatters dy tap by tap
    input_grad = loops(LONG_WINDOW * STRIDED, rows * taps) if strided else forward
    weight_grad = loops(slow, per_tap) if g.weight_grad else 0.0
    epilogue = 2 * g.batch * g.out_channels * g.positions * 4 * scale / rates.copy
    return forward + input_grad + weight_grad + epilogue + 4 * rates.call


def estimate_gemm(g: Geometry, chunk: int, rates: Rates, scale: float = 1.0) -> float:
    """im2col + one product per group and chunk, forward; backward the weight gradient's
    product and the input gradient, as a convolution of dy or through col2im
    (conv_gemm.py). A pointwise layer multiplies the maps as they are."""
    item = 4 * scale
    macs = g.batch * g.out_channels * g.positions * g.cg * g.volume
    out_bytes = g.batch * g.out_channels * g.positions * item
    chunks = -(-g.batch // chunk)
    calls = 8 * rates.call * chunks
    if conv_gemm.pointwise(g):
        samples = g.batch * g.groups  # one product per sample and group
        products = _blas_seconds(2 * macs * scale, g.og, g.cg, g.positions, rates)
        grads = 2 if g.weight_grad else 1
        return products * (1 + grads) + 2 * out_bytes / rates.copy \
            + samples * 3 * SMALL_PRODUCT + calls
    rows, columns = g.cg * g.volume, chunk * g.positions
    col_bytes = g.batch * g.channels * g.volume * g.positions * item
    copies = col_bytes * IM2COL_PASSES * (1 if chunks == 1 else 2) + 4 * out_bytes
    seconds = _blas_seconds(2 * macs * scale, g.og, rows, columns, rates)  # forward
    if g.weight_grad:
        seconds += _blas_seconds(2 * macs * scale, rows, columns, g.og, rates)
    if conv_gemm.as_convolution(g):
        t = conv_gemm.transposed(g)
        copies += (g.batch * g.out_channels * g.volume * t.positions * item * IM2COL_PASSES
                   + 2 * g.batch * g.channels * t.positions * item)
        seconds += _blas_seconds(2 * macs * scale * t.positions / g.positions, g.cg,
                                 g.og * g.volume, chunk * t.positions, rates)
    else:
        copies += col_bytes * IM2COL_PASSES
        seconds += _blas_seconds(2 * macs * scale, rows, g.og, columns, rates)
    return seconds + copies / rates.copy + calls


def estimate_fft(g: Geometry, rates: Rates, scale: float = 1.0) -> float:
    """Transforms of every input, output and kernel map, forward and backward, the
    complex products per frequency, and the reordering copies (conv_fft.py)."""
    sizes = conv_fft.transform_sizes(g)
    points = math.prod(sizes)
    freqs = math.prod((*sizes[:-1], sizes[-1] // 2 + 1))
    n, c, o, kernels = g.batch, g.channels, g.out_channels, g.out_channels * g.cg
    transforms = 2 * n * c + 2 * n * o + kernels * (2 if g.weight_grad else 1)
    # a map's transform runs one 1-D transform per row along each axis: many small maps
    # (the kernels of a 256-channel 3x3 layer) cost more than their flops say
    rows = sum(points // size for size in sizes)
    transform = transforms * (2.5 * points * math.log2(max(points, 2)) * scale / rates.fft
                              + rows * FFT_ROW)
    products = 3 if g.weight_grad else 2
    flops = 8 * n * g.cg * g.og * g.groups * freqs * scale  # one complex product
    multiply = products * (_blas_seconds(flops, n, g.cg, g.og, rates)
                           + g.groups * freqs * SMALL_PRODUCT)
    spectra = (2 * n * c + 2 * n * o + 2 * kernels) * freqs * 8 * scale * SPECTRUM_PASSES
    real = (2 * n * c + 3 * n * o + 2 * kernels) * points * 4 * scale
    return transform + multiply + (spectra + real) / rates.copy + 12 * rates.call


def estimate_winograd(g: Geometry, chunk: int, tile: int, rates: Rates,
                      scale: float = 1.0) -> float:
    """(m+2)^2 products per chunk and pass (16 for 2x2 tiles, 36 for 4x4), with 4/9 or
    2.25/9 of GEMM's multiply-adds per output, and the transforms: patches (forward, and
    backward again unless one chunk), products to outputs, output gradients, and patch
    gradients back to the input (conv_winograd.py). The transforms move (m+2)^2 values
    per tile and map through memory, so they are costed as copies."""
    item = 4 * scale
    t = conv_winograd.TILINGS[tile]
    points, per_sample = t.points, conv_winograd.tiles_per_sample(g, t)
    columns = chunk * per_sample
    flops = 2 * g.batch * per_sample * points * g.out_channels * g.channels * scale
    o, c = g.out_channels, g.channels
    seconds = _blas_seconds(flops, o, c, columns, rates)  # forward
    seconds += _blas_seconds(flops, c, o, columns, rates)  # input gradient
    if g.weight_grad:
        seconds += _blas_seconds(flops, c, columns, o, rates)
    chunks = -(-g.batch // chunk)
    patches = g.batch * per_sample * points * item  # one transformed map
    inputs = g.batch * math.prod(g.sizes) * item
    outputs = g.batch * g.positions * item
    input_passes = 1 + (1 if g.weight_grad and chunks > 1 else 0)
    copies = (c * (patches + inputs) * (input_passes + 1)  # patches in, their gradient out
              + o * (patches + outputs) * 2)  # products out, output gradients in
    calls = 8 * rates.call * chunks
    slack = (WINOGRAD_SLACK + WINOGRAD_FEW / min(c, o)) * WINOGRAD_TILE_SLACK[tile]
    return (seconds + copies / rates.copy) * slack + calls


def estimate(spec: KernelSpec, rates: Rates) -> float:
    """Seconds of one forward and one backward pass of a convolution kernel spec: the
    model's, times how this machine's kernels of that algorithm measured against it."""
    return modelled(spec, rates) * rates.fit(spec.template)


def modelled(spec: KernelSpec, rates: Rates) -> float:
    """The model's seconds from the rates alone, before the fit."""
    g, scale, rates = Geometry.from_spec(spec), _scale(spec), _effective(rates)
    if spec.template == "conv_direct":
        return estimate_direct(g, rates, scale)
    if spec.template == "conv_gemm":
        return estimate_gemm(g, int(spec.option("chunk")), rates, scale)
    if spec.template == "conv_fft":
        return estimate_fft(g, rates, scale)
    if spec.template == "conv_winograd":
        return estimate_winograd(g, int(spec.option("chunk")), int(spec.option("tile")),
                                 rates, scale)
    raise ValueError(f"no cost model for kernel template {spec.template!r}")


# --- the machine's rates ------------------------------------------------------------

_RATES: Rates | None = None  # this process's, once read or measured


def rates() -> Rates:
    """This machine's rates: built in with CONVDSL_NO_CALIBRATE=1, else read from the
    cache, else measured (once per machine) and written there."""
    global _RATES
    if os.environ.get(NO_CALIBRATE, "") not in ("", "0"):
        return DEFAULT_RATES
    if _RATES is None:
        _RATES = stored_rates()
    if _RATES is None:
        with _one_measurement_at_a_time():
            # another process may have measured while this one waited
            _RATES = stored_rates() or measure() or DEFAULT_RATES
    return _RATES


@contextmanager
def _one_measurement_at_a_time() -> Iterator[None]:
    """Hold an exclusive lock on the cache's calibration while measuring: processes that
    start together on a new machine (a sweep of trainings) would measure each other's
    load, and keep it. The lock goes with its process, however that ends. Where there
    is no fcntl (Windows), measurements are not serialised."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = cache.cache_dir() / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def measure() -> Rates | None:
    """Measure this machine's rates and its kernels' fits now, and keep them in the cache
    for every later compile; None when the measurements look disturbed (nothing kept)."""
    global _RATES
    log.info("measuring this machine for the cost model: micro-benchmarks, then a "
             "reference layer in each algorithm (compiled the first time)")
    started = time.perf_counter()
    measured = calibrate()
    # On a busy machine BLAS threads lose their turns and a product can measure 40x
    # slower than idle (seen here: 4.7 against 203 GFLOP/s), which would steer every
    # layer away from GEMM for good. Such rates are not kept, and not fitted to.
    if plausible(measured):
        measured = fit_kernels(measured)
    if not plausible(measured):
        log.warning("the measurements look disturbed by other work (%s); using the "
                    "built-in rates; `convdsl calibrate` measures again", measured)
        return None
    _RATES = _write_calibration(measured)
    log.info("measured in %.1f s; kept in %s", time.perf_counter() - started,
             cache.cache_dir() / CALIBRATION_FILE)
    return _RATES


# A fit outside these bounds (measured over estimated seconds) is taken for a timing
# that other work disturbed: on the Intel Xeon of conv_fit.py the fits were 0.2-0.5, and
# they are 1 by construction where the model's constants were fitted.
FIT_BOUNDS = (0.05, 20.0)


def plausible(measured: Rates) -> bool:
    """Whether measured rates look like an idle machine's: BLAS beats plain loops, and
    no kernel ran absurdly far from its estimate."""
    low, high = FIT_BOUNDS
    fits = (measured.direct_fit, measured.gemm_fit, measured.fft_fit)
    return measured.blas >= measured.loops and all(low <= fit <= high for fit in fits)


def fit_kernels(measured: Rates) -> Rates:
    """`measured` with the fits of its kernels, timed on the reference layer."""
    # imported here: the reference layer is built by the convolution builder, which
    # imports this module for its choices
    from convdsl.codegen.cpu import conv_fit

    return conv_fit.fit(measured)


def _machine() -> dict[str, object]:
    """What the rates depend on: a change (more threads, a new NumPy) measures again."""
    import numba

    return {"cpus": os.cpu_count(), "threads": numba.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(),
            "numpy": np.__version__, "numba": numba.__version__}


KEPT_CALIBRATIONS = 8  # machine signatures remembered, the least recent dropped


def _stored_calibrations() -> list[dict[str, Any]]:
    """The calibrations in the cache, one per machine signature (thread count, NumPy,
    ...): a run with another thread count adds its own instead of replacing the others,
    each of which cost a measurement and could come out disturbed the next time."""
    try:
        stored = json.loads((cache.cache_dir() / CALIBRATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # missing or unreadable: measure again
    if not isinstance(stored, dict):
        return []
    if "machine" in stored:  # the one-entry layout of earlier versions
        return [stored]
    entries = stored.get("calibrations", [])
    return [entry for entry in entries if isinstance(entry, dict)] if isinstance(
        entries, list) else []


def stored_rates() -> Rates | None:
    """This machine's stored rates; None when there are none, or they are damaged, or
    they come from a version without the kernels' fits: then they are measured again."""
    machine = _machine()
    for entry in _stored_calibrations():
        if entry.get("machine") == machine:
            stored = entry.get("rates")
            names = {field.name for field in fields(Rates)}
            if not isinstance(stored, dict) or set(stored) != names or not all(
                    isinstance(value, (int, float)) for value in stored.values()):
                return None
            return Rates(**stored)
    return None


def _write_calibration(measured: Rates) -> Rates:
    machine = _machine()
    others = [entry for entry in _stored_calibrations() if entry.get("machine") != machine]
    kept = [*others, {"machine": machine, "rates": asdict(measured)}][-KEPT_CALIBRATIONS:]
    _write_json(cache.cache_dir() / CALIBRATION_FILE, {"calibrations": kept})
    return measured


def _best_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """The fastest of a few runs: other jobs only ever make a run slower."""
    run()  # warm up: caches, thread pools
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


# Each rate is the best of this many rounds of every measurement: on a shared machine a
# round can run at half speed throughout (seen here: BLAS at 106 against 201 GFLOP/s),
# and a stored calibration steers every later compile (ResNet-18-CIFAR's 64-channel
# layers went to FFT, and its training step took 1.45 s instead of 1.0 s).
CALIBRATION_ROUNDS = 3


def calibrate() -> Rates:
    """Measure the rates with a few tiny benchmarks (float32), keeping each one's best
    over a few rounds."""
    measure = _measurements()
    rounds = [measure() for _ in range(CALIBRATION_ROUNDS)]
    return Rates(blas=max(r.blas for r in rounds), loops=max(r.loops for r in rounds),
                 fft=max(r.fft for r in rounds), copy=max(r.copy for r in rounds),
                 call=min(r.call for r in rounds))


def _measurements() -> Callable[[], Rates]:
    """One round of the tiny benchmarks, with their arrays and kernel made once."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((384, 384), dtype=np.float32)
    product = np.empty_like(a)
    signals = rng.standard_normal((64, 2048), dtype=np.float32)
    spectra = np.empty((64, 1025), dtype=np.complex64)
    source = rng.standard_normal((64, 64, 256), dtype=np.float32)
    target = np.empty((64, 64, 256), dtype=np.float32)
    rows, taps = _row_kernel()
    x = rng.standard_normal((256, 1024 + 4), dtype=np.float32)
    y = np.zeros((256, 1024), dtype=np.float32)
    tiny_x, tiny_y = x[:2, :12], y[:2, :8]

    def measure() -> Rates:
        blas = 2 * 384**3 / _best_seconds(lambda: np.matmul(a, a, out=product))
        fft = 64 * 2.5 * 2048 * 11 / _best_seconds(
            lambda: conv_fft.in_threads(np.fft.rfftn, signals, spectra, axes=(1,)))
        copy = 2 * source.nbytes / _best_seconds(
            lambda: np.copyto(target, source.transpose(1, 0, 2)))
        loops = 2 * 5 * 256 * 1024 / _best_seconds(lambda: rows(x, y, taps))
        call = _best_seconds(lambda: rows(tiny_x, tiny_y, taps), repeats=20)
        return Rates(blas=blas, loops=loops, fft=fft, copy=copy, call=call)

    return measure


def _row_kernel() -> tuple[Callable[..., None], np.ndarray]:
    """A 5-tap correlation along rows, parallel over rows, written like the direct
    kernels' inner loops (compiled here, once per machine)."""
    import numba

    @numba.njit(parallel=True, nogil=True)
    def rows(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:  # pragma: no cover
        for r in numba.prange(y.shape[0]):
            w0, w1, w2, w3, w4 = w[0], w[1], w[2], w[3], w[4]
            for q in range(y.shape[1]):
                y[r, q] += (w0 * x[r, q] + w1 * x[r, q + 1] + w2 * x[r, q + 2]
                            + w3 * x[r, q + 3] + w4 * x[r, q + 4])

    return rows, np.array([0.1, 0.2, 0.4, 0.2, 0.1], dtype=np.float32)


# --- tuning by measurement ----------------------------------------------------------


def tuned(key: str, candidates: Sequence[str], measure: Callable[[str], float]
          ) -> tuple[str, dict[str, float], bool]:
    """The fastest of `candidates`, its measured milliseconds per candidate, and whether
    the decision came from the cache (then nothing was timed). `measure(name)` returns
    the seconds of one forward and backward; `key` names the layer."""
    path = cache.cache_dir() / TUNING_FILE
    stored = _read_json(path).get(key)
    if isinstance(stored, dict) and stored.get("algorithm") in candidates:
        return str(stored["algorithm"]), {k: float(v) for k, v in stored["ms"].items()}, True
    ms = {name: measure(name) * 1e3 for name in candidates}
    best = min(ms, key=ms.__getitem__)
    decisions = _read_json(path)  # again: another process may have added some
    decisions[key] = {"algorithm": best, "ms": ms}
    _write_json(path, decisions)
    return best, ms, False


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, object]) -> None:
    """Write atomically (temporary file, then rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
