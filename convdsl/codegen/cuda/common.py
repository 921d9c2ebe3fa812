"""What every CUDA kernel shares: the numba.cuda module, the decorator, launch sizes.

Generated CUDA kernels live in the same cache as the CPU ones (codegen/cache.py): a
spec renders to a `.py` file whose kernels carry `@cuda.jit(cache=True)`, so that
Numba keeps their machine code per compute capability next to the source. Under the
CUDA simulator (NUMBA_ENABLE_CUDASIM=1) the same source runs on the CPU, slowly,
which is how the tests check every kernel on a machine without a GPU.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from convdsl.errors import RunError

# A device array (numba.cuda DeviceNDArray, or the simulator's stand-in): typed as Any,
# since numba.cuda ships no type information.
DeviceArray = Any

PRELUDE = "import math\n\nfrom numba import cuda\n"
JIT = "@cuda.jit(cache=True, fastmath=False)"
DEVICE_JIT = "@cuda.jit(device=True, inline=True)"
THREADS = 256  # threads per block of the one-thread-per-element kernels

_CUDA: Any = None


def cuda() -> Any:
    """numba.cuda, once a usable GPU (or the simulator) is known to be there.

    Never falls back to the CPU: without numba-cuda or without a GPU the error says
    so and how to fix it."""
    global _CUDA
    if _CUDA is not None:
        return _CUDA
    if not hasattr(np, "row_stack"):  # numba-cuda 0.30 still calls it; NumPy 2.5 removed it
        vars(np)["row_stack"] = np.vstack
    try:
        from numba import cuda as module
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RunError(f"--device cuda needs numba's CUDA target, which failed to load "
                       f"({exc})", 'install it with: pip install "convdsl[cuda]"') from None
    if not _has_numba_cuda() and not module.simulator_enabled:
        raise RunError("--device cuda needs NVIDIA's numba-cuda package",
                       'install it with: pip install "convdsl[cuda]"')
    try:
        available = bool(module.is_available())
    except Exception:  # a broken driver raises many kinds of error
        available = False
    if not available:
        raise RunError("--device cuda found no usable NVIDIA GPU (no CUDA driver, or no "
                       "device)", "run on a machine with an NVIDIA GPU and its driver, or "
                       "use --device cpu; NUMBA_ENABLE_CUDASIM=1 runs the CUDA kernels "
                       "in Numba's simulator, slowly, for testing")
    _CUDA = module
    return module


def _has_numba_cuda() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba_cuda") is not None


def blocks(count: int, threads: int = THREADS) -> int:
    """Blocks of `threads` threads that cover `count` elements (at least one)."""
    return max(1, math.ceil(count / threads))


def zeros(shape: tuple[int, ...], dtype: Any) -> DeviceArray:
    """A device array of zeros (cuda.device_array leaves memory unset)."""
    return cuda().to_device(np.zeros(shape, dtype=dtype))


def empty(shape: tuple[int, ...], dtype: Any) -> DeviceArray:
    """A device array whose values the next kernel overwrites."""
    return cuda().device_array(shape, dtype=np.dtype(dtype))


def is_device_array(value: Any) -> bool:
    return hasattr(value, "copy_to_host")
