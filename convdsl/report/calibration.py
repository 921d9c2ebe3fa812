"""What `convdsl calibrate` prints: the rates and fits the cost model chooses algorithms by.

    BLAS products         247.3 GFLOP/s
    generated loops        77.4 GFLOP/s (the model counts at most 30.9: 1/8 of BLAS)
    ...
    kernels against the model (measured / estimated seconds, forward and backward
    of a 5x5 layer, 16 -> 32 channels on 28x28 maps, batch 8):
      direct 0.43, GEMM and Winograd 0.25, FFT 0.48
"""

from __future__ import annotations

import os

from convdsl.codegen import cache, cost
from convdsl.codegen.cpu import conv_fit


def built_in_forced() -> bool:
    """Whether CONVDSL_NO_CALIBRATE makes every compile use the built-in rates."""
    return os.environ.get(cost.NO_CALIBRATE, "") not in ("", "0")


def rates_in_use() -> str:
    """Which rates the cost model's choices use now, for a line after "rates: "."""
    if built_in_forced():
        return f"built in ({cost.NO_CALIBRATE} is set)"
    if cost.stored_rates() is None:
        return ("built in; this machine is not measured yet (the first compile that chooses "
                "an algorithm measures it, or `convdsl calibrate`)")
    return f"measured on this machine, kept in {cache.cache_dir() / cost.CALIBRATION_FILE}"


def calibration_lines(rates: cost.Rates) -> list[str]:
    """The rates, one per line with its unit, then the kernels' fits."""
    capped = cost.LOOPS_PER_BLAS * rates.blas
    loops_note = (f" (the model counts at most {capped / 1e9:.1f}: "
                  f"1/{1 / cost.LOOPS_PER_BLAS:.0f} of BLAS)" if rates.loops > capped else "")
    return [
        f"  BLAS products      {rates.blas / 1e9:8.1f} GFLOP/s",
        f"  generated loops    {rates.loops / 1e9:8.1f} GFLOP/s{loops_note}",
        f"  FFTs               {rates.fft / 1e9:8.1f} GFLOP/s",
        f"  strided copies     {rates.copy / 1e9:8.1f} GB/s",
        f"  a kernel call      {rates.call * 1e6:8.1f} us",
        "  kernels against the model (measured / estimated seconds, forward and backward",
        f"  of a {conv_fit.REFERENCE.describe()}):",
        f"    direct {rates.direct_fit:.2f}, GEMM and Winograd {rates.gemm_fit:.2f}, "
        f"FFT {rates.fft_fit:.2f}",
    ]
