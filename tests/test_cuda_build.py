"""The CUDA kernels built for a real GPU, without one (bench/cuda_build.py).

The simulator checks what each kernel computes, but runs its Python source: it cannot
tell whether NVIDIA's compiler takes the kernel, nor what machine code it becomes. Here
every kernel of LeNet-5 and of the three every-op examples goes the whole way for an
H100 (sm_90): Numba to NVVM IR, NVVM to PTX, nvJitLink to machine code. That needs
NVIDIA's compiler libraries from PyPI, which the `dev` extra installs on Linux x86-64;
elsewhere the test is skipped, but never in CI.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ["networks/lenet5.cnn:64", "examples/every_op_image.cnn:2",
            "examples/every_op_signal.cnn:2", "examples/every_op_volume.cnn:2"]


def _compilers_missing() -> str | None:
    for package in ("numba_cuda", "cuda.bindings", "cuda.pathfinder"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
    from cuda.pathfinder import find_nvidia_binary_utility, load_nvidia_dynamic_lib

    try:
        for library in ("nvvm", "nvrtc", "nvJitLink"):
            load_nvidia_dynamic_lib(library)
    except Exception as exc:
        return f"NVIDIA's compiler libraries are not installed ({exc})"
    if find_nvidia_binary_utility("nvdisasm") is None:
        return "nvdisasm is not installed"
    return None


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    missing = _compilers_missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the CUDA kernels, but {missing}")
        pytest.skip(missing)
    env = {name: value for name, value in os.environ.items() if name != "NUMBA_ENABLE_CUDASIM"}
    out = ROOT / ".convdsl-cache" / f"cuda_build_{os.getpid()}.json"
    command = [sys.executable, str(ROOT / "bench" / "cuda_build.py"), "--json", str(out)]
    for network in NETWORKS:
        command += ["--network", network]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report: dict[str, list[dict[str, Any]]] = json.loads(out.read_text())
    out.unlink()
    return report


def test_every_kernel_builds_for_an_h100(built: dict[str, list[dict[str, Any]]]) -> None:
    assert set(built) == set(NETWORKS)
    for network, kernels in built.items():
        assert len(kernels) >= 10, network
        failed = [kernel["name"] for kernel in kernels if "error" in kernel]
        assert not failed, f"{network}: {failed}"


def test_no_kernel_spills_registers(built: dict[str, list[dict[str, Any]]]) -> None:
    spilling = [(network, kernel["name"]) for network, kernels in built.items()
                for kernel in kernels if kernel["spill_stores"] or kernel["spill_loads"]]
    assert not spilling


def test_every_block_fits_an_sm(built: dict[str, list[dict[str, Any]]]) -> None:
    """A block's threads take their registers on one SM, and a block holds at most 1024
    threads: a kernel asking for more builds, and fails only at launch, on a GPU."""
    too_big = [(network, kernel["name"], kernel["threads"], kernel["registers"])
               for network, kernels in built.items() for kernel in kernels
               if kernel["threads"] > 1024 or kernel["warps"] < math.ceil(kernel["threads"] / 32)]
    assert not too_big


def test_a_full_register_block_multiplies_from_vector_loads(
        built: dict[str, list[dict[str, Any]]]) -> None:
    """A thread's 4x4 register block, four rows of the slice a pass: 64 FFMA fed by two
    LDS.128 a row, and little else in the loop (docs/cuda.md, section 3). LeNet-5's
    dense layers have such blocks; the one whose K is 10 keeps some loop overhead."""
    full = [kernel["hottest"] for kernels in built.values() for kernel in kernels
            if kernel["hottest"] and kernel["hottest"]["ffma"] == 64]
    assert len(full) >= 6
    assert all(loop["lds"] == 8 for loop in full), full
    shares = sorted(loop["ffma"] / loop["instructions"] for loop in full)
    assert shares[0] >= 0.5 and shares[len(shares) // 2] >= 0.75, shares
