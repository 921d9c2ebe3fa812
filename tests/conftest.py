"""Test-wide settings: generated kernels go to a cache inside the checkout, kept between
runs so that a second run compiles nothing."""

from __future__ import annotations

import os
from pathlib import Path

import cuda_simulator

os.environ.setdefault("CONVDSL_CACHE", str(Path(__file__).resolve().parent.parent
                                           / ".convdsl-cache"))
# The convolution cost model's built-in machine rates: the same algorithm choices on
# every machine, and no calibration run inside the tests.
os.environ.setdefault("CONVDSL_NO_CALIBRATE", "1")

# The CUDA tier (tests/test_cuda_*.py, marker `cuda`) runs in Numba's CUDA simulator
# unless CONVDSL_TEST_GPU=1 asks for the real GPU. It must be set before numba.cuda loads.
if os.environ.get("CONVDSL_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Under pytest-xdist (`-n 2`, the README's command) the workers share the cores: BLAS and
# PyTorch get one thread each, whose pools spin while idle and would starve the other
# worker. Numba keeps two threads, so that parallel kernels still run in parallel (and a
# race between their threads can show); its workqueue pool sleeps while idle.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    os.environ.setdefault("NUMBA_NUM_THREADS", "2")
    # A cold compile would start worker processes (codegen/parallel.py) on cores the
    # other test worker already uses: each would only add its start-up. The worker path
    # has its own tests, which ask for workers explicitly.
    os.environ.setdefault("CONVDSL_COMPILE_WORKERS", "1")

# The simulator's switch interval and shared memory made fit for the tests
# (tests/cuda_simulator.py). Last: it imports Numba, which reads the settings above.
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    cuda_simulator.prepare()
