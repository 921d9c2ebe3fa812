"""How the two thread pools of a CPU run share the cores.

Generated kernels run their parallel loops on Numba's workqueue pool (codegen/cache.py
chooses it) and matrix products run on OpenBLAS's own threads. When a product returns,
OpenBLAS's threads keep spinning for 2^28 cycles (about a tenth of a second) in case
another product follows. The kernel that runs next then finds a core taken, and its
static share of the loop runs at half speed. On the 2-core development machine
LeNet-5's inference at batch 64 took 2.2 ms instead of 1.5 ms, and a ResNet-18-CIFAR
training step 1.03-1.21 s instead of 0.91-0.96 s.

OpenBLAS reads OPENBLAS_THREAD_TIMEOUT (a power of two of cycles; 4 is its least) when
it starts its threads. convdsl sets it to 4 unless the user set it: a product then
wakes its threads at a cost of microseconds instead of leaving them spinning. OpenBLAS
starts when NumPy is first imported; if NumPy came before convdsl, the libraries already
loaded are asked to read the variable again and to stop their threads, which they start
again at the next product.

This module imports nothing heavy: it must run before NumPy is imported.
"""

from __future__ import annotations

import ctypes
import os
import sys

VARIABLE = "OPENBLAS_THREAD_TIMEOUT"
SHORTEST = "4"  # OpenBLAS's least: 2^4 cycles of spinning before its threads sleep


def quiet_blas_threads() -> bool:
    """Ask OpenBLAS's threads to sleep as soon as a product is done; False if the user
    chose a timeout (it is kept) or OpenBLAS could not be reached."""
    if VARIABLE in os.environ:
        return False
    os.environ[VARIABLE] = SHORTEST
    if "numpy" not in sys.modules:
        return True  # OpenBLAS reads the variable when NumPy loads it
    return _restart_loaded(_loaded_openblas())


def _loaded_openblas() -> list[str]:
    """Paths of the OpenBLAS libraries in this process (NumPy's, and SciPy's if loaded),
    from the process's memory map; none where there is no /proc."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line}
    except OSError:
        return []
    return sorted(path for path in paths if path.startswith("/") and ".so" in path)


def _restart_loaded(paths: list[str]) -> bool:
    """Make each library read its variables again and stop its threads (the same steps
    as OpenBLAS's own handler before a fork); the next product starts them with the
    new timeout."""
    restarted = False
    for path in paths:
        try:
            library = ctypes.CDLL(path)
            read_environment = library.openblas_read_env
            stop_threads = library.blas_thread_shutdown_
        except (OSError, AttributeError):
            continue  # another build: it keeps its spinning, which is only slower
        read_environment()
        stop_threads()
        restarted = True
    return restarted
