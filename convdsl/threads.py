"""How the two thread pools of a CPU run share the cores.

Generated kernels run their parallel loops on one of Numba's thread pools, and matrix
products run on OpenBLAS's own threads. On a small machine the two take turns many
times per step, and how each pool waits between its jobs decides much of the speed:

- **OpenBLAS** keeps its threads spinning for 2^28 cycles (about a tenth of a second)
  after a product, in case another follows. The kernel that runs next then finds a core
  taken, and its static share of the loop runs at half speed. convdsl sets
  OPENBLAS_THREAD_TIMEOUT=4 (OpenBLAS's least) unless the user set it: the threads
  sleep at once, and a product wakes them at a cost of microseconds. OpenBLAS reads the
  variable when it starts, which is when NumPy is first imported; if NumPy came first,
  the libraries already loaded are asked to read it again and to stop their threads,
  which they start again at the next product.
- **Numba's workqueue pool** puts its threads to sleep after every kernel; waking them
  took 50-90 microseconds per kernel on the 2-core development machine, and a LeNet-5
  step at batch 64 runs dozens of kernels. **Its OpenMP pool** (GNU libgomp) wakes
  faster and lets the calling thread work too, but by default spins for 300,000 rounds
  after each kernel, taking a core from the OpenBLAS product that follows (a LeNet-5
  step took 52 ms with both spinning, instead of 3). convdsl therefore prefers the
  OpenMP pool with GOMP_SPINCOUNT=1000, set while libgomp loads and put back afterwards
  so that other libraries' OpenMP (PyTorch's) keeps its own setting. It falls back to
  the workqueue pool where libgomp cannot load, or was loaded before convdsl (its
  spinning then is whatever its loader chose), or the user chose a threading layer.

Measured on that machine (`python bench/blas_threads.py`, docs/performance.md): with
both changes LeNet-5's training step at batch 64 went from 7.2-7.7 ms to 3.0-3.8 ms and
ResNet-18-CIFAR's at batch 32 from 0.93-0.96 s to 0.85 s.

quiet_blas_threads imports nothing heavy: it must run before NumPy is imported.
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
    return [path for path in _loaded_libraries()
            if "openblas" in os.path.basename(path) and path.startswith("/")]


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


SPIN_VARIABLE = "GOMP_SPINCOUNT"
SHORT_SPIN = "1000"  # rounds libgomp's threads spin before they sleep (default 300,000)
LAYER_VARIABLE = "NUMBA_THREADING_LAYER"


def choose_kernel_threads() -> str:
    """Pick the Numba thread pool for generated kernels (see the module's docstring)
    and start it now, while the spin setting can still reach libgomp; returns the
    layer's name."""
    if LAYER_VARIABLE in os.environ:
        return os.environ[LAYER_VARIABLE]  # the user's choice, which Numba reads itself
    gomp_loaded = any(os.path.basename(path).startswith("libgomp")
                      for path in _loaded_libraries())
    if not gomp_loaded and _start_pool("omp"):
        return "omp"
    _start_pool("workqueue")
    return "workqueue"


def _start_pool(layer: str) -> bool:
    """Ask Numba for `layer` and start its threads, with libgomp's short spin in the
    environment while it loads; False if that layer cannot start here."""
    import numba
    from numba.np.ufunc import parallel

    if parallel._is_initialized:  # started before convdsl: keep what runs
        return str(numba.threading_layer()) == layer  # type: ignore[attr-defined]
    numba.config.THREADING_LAYER = layer  # type: ignore[attr-defined]
    before = os.environ.get(SPIN_VARIABLE)
    if before is None:
        os.environ[SPIN_VARIABLE] = SHORT_SPIN
    try:
        parallel._launch_threads()  # type: ignore[no-untyped-call]
    except (ValueError, ImportError, OSError):
        return False
    finally:
        if before is None:
            del os.environ[SPIN_VARIABLE]
    return str(numba.threading_layer()) == layer  # type: ignore[attr-defined]


def _loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process; none without /proc."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            return sorted({line.split()[-1] for line in maps if ".so" in line})
    except OSError:
        return []


def describe() -> str:
    """The CPU thread pools of this process in a few words, for reports: timings on
    another pool or with spinning BLAS threads are not comparable."""
    import numba

    try:
        pool = f"Numba's {numba.threading_layer()} pool"  # type: ignore[attr-defined]
    except ValueError:  # no parallel kernel has started it yet
        pool = "Numba's pool not started"
    timeout = os.environ.get(VARIABLE, "OpenBLAS's default")
    return (f"{numba.get_num_threads()} threads on {pool}, "
            f"OPENBLAS_THREAD_TIMEOUT={timeout}")
