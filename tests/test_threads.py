"""convdsl asks OpenBLAS's threads to sleep after a product (convdsl/threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.skipif(not threads._loaded_openblas(), reason="NumPy here does not use OpenBLAS")
def test_openblas_restarts_with_the_timeout_and_products_stay_right(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NumPy was imported first here, so OpenBLAS is restarted in place; its products
    must give the same results afterwards, on both of its threads."""
    monkeypatch.delenv(threads.VARIABLE, raising=False)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200))
    b = rng.standard_normal((200, 250))
    before = a @ b
    assert threads.quiet_blas_threads()
    assert os.environ[threads.VARIABLE] == threads.SHORTEST
    np.testing.assert_array_equal(a @ b, before)


def test_libraries_that_cannot_be_restarted_are_skipped(tmp_path: object) -> None:
    assert not threads._restart_loaded(["/nonexistent/libopenblas.so"])
    assert not threads._restart_loaded([])
