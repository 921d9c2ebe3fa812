"""convdsl asks OpenBLAS's threads to sleep after a product (convdsl/threads.py)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from convdsl import threads


def test_importing_convdsl_sets_a_short_timeout_unless_the_user_chose_one() -> None:
    code = "import convdsl, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    env = {k: v for k, v in os.environ.items() if k != threads.VARIABLE}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    assert shown == [threads.SHORTEST]
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, threads.VARIABLE: "9"},
                            capture_output=True, text=True, check=True).stdout.split()
    assert chosen == ["9"]


def test_a_timeout_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(threads.VARIABLE, "12")
    assert not threads.quiet_blas_threads()
    assert os.environ[threads.VARIABLE] == "12"


def test_openblas_restarts_with_the_timeout_and_products_stay_right(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy was imported first here, so OpenBLAS is restarted in place (where NumPy uses
    another BLAS, nothing is restarted); products give the same results afterwards."""
    monkeypatch.delenv(threads.VARIABLE, raising=False)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200))
    b = rng.standard_normal((200, 250))
    before = a @ b
    assert threads.quiet_blas_threads() == bool(threads._loaded_openblas())
    assert os.environ[threads.VARIABLE] == threads.SHORTEST
    np.testing.assert_array_equal(a @ b, before)


def test_libraries_that_cannot_be_restarted_are_skipped() -> None:
    assert not threads._restart_loaded(["/nonexistent/libopenblas.so"])
    assert not threads._restart_loaded([])


def _fresh_process(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items()
             if k not in (threads.LAYER_VARIABLE, threads.SPIN_VARIABLE)}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, check=True).stdout.strip()


SHOW_POOL = ("import os, convdsl, numba; print(numba.threading_layer(), "
             "os.environ.get('GOMP_SPINCOUNT'))")


def test_kernels_run_on_the_openmp_pool_and_the_spin_setting_is_put_back() -> None:
    """Where libgomp loads, the OpenMP pool is chosen; GOMP_SPINCOUNT was set only while
    it loaded, so that other libraries' OpenMP later keeps its own default."""
    layer, spin = _fresh_process(SHOW_POOL).split()
    assert layer == ("omp" if ctypes.util.find_library("gomp") else "workqueue")
    assert spin == "None"


def test_a_threading_layer_the_user_chose_is_kept() -> None:
    code = "import convdsl, numba; print(numba.config.THREADING_LAYER)"
    assert _fresh_process(code, NUMBA_THREADING_LAYER="workqueue") == "workqueue"


def test_a_libgomp_loaded_before_convdsl_means_the_workqueue_pool() -> None:
    """Its spinning was set by whoever loaded it (300,000 rounds by default), which
    would take cores from OpenBLAS's products."""
    code = ("import ctypes, ctypes.util\n"
            "name = ctypes.util.find_library('gomp')\n"
            "if name is None: print('workqueue'); raise SystemExit\n"
            "ctypes.CDLL(name)\n"
            "import convdsl, numba; print(numba.threading_layer())")
    assert _fresh_process(code) == "workqueue"


def test_results_are_the_same_on_either_pool() -> None:
    lenet = Path(__file__).resolve().parents[1] / "networks" / "lenet5.cnn"
    code = ("import numpy as np, convdsl\n"
            f"net = convdsl.compile({str(lenet)!r}, batch=4)\n"
            "x = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)\n"
            "print(net.forward(x, train=False).tobytes().hex())")
    assert _fresh_process(code) == _fresh_process(code, NUMBA_THREADING_LAYER="workqueue")
