"""Numba's CUDA simulator, set up for the CUDA tier (conftest.py calls `prepare`).

The simulator runs each GPU thread of a block as a Python thread. Two of its habits cost
the tests time, and one of them correctness:

- its block manager polls the block's threads in a loop that holds the GIL, so with
  Python's default switch interval (5 ms) a thread waits up to that long for the GIL
  after every barrier: a batch norm kernel of 96 threads took 0.5 s, at 0.1 ms 0.06 s;
- `cuda.shared.array` makes a block's array on the first thread that asks, in a
  check-then-set without a lock. Two threads that interleave there get arrays of their
  own, and a block's sum comes out wrong. At 5 ms that almost never happens; at 0.1 ms
  it made a test fail one run in a few. It also found its key by walking the whole stack,
  source lines included, for every call of every thread.

`prepare` shortens the switch interval and replaces the shared-array call by one that
takes a lock and keys the array by the caller's file and line, as the simulator does.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

SWITCH_INTERVAL = 1e-4  # seconds


def prepare() -> None:
    """Make the simulator faster and its shared memory safe (see the module's text)."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    simulator_array = shared.array
    lock = threading.Lock()

    def array(self: Any, shape: Any, dtype: Any, alignment: Any = None) -> Any:
        if shape == 0 or alignment is not None:  # dynamic shared memory, or an error
            return simulator_array(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            allocated = self._allocations.get(key)
            if allocated is None:
                allocated = self._allocations[key] = kernelapi.np.empty(shape, dtype)
        return allocated

    shared.array = array
