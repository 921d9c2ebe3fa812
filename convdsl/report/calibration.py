"""What `convdsl calibrate` prints: the rates and fits the cost model chooses algorithms by.

    BLAS products         247.3 GFLOP/s
    generated loops        77.4 GFLOP/s (the model counts at most 30.9: 1/8 of BLAS)
    ...
    kernels against the model (measured / estimated seconds, forward and backward
    of a 5x5 layer, 16 -> 32 channels on 28x28 maps, batch 8):
      direct 0.43, GEMM and Winograd 0.25, FFT 0.48
"""

from __future__ import annotations

from convdsl.codegen import cost
from convdsl.codegen.cpu import conv_fit


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
