"""How a CUDA network's kernels get ready (convdsl/codegen/parallel.py): on a GPU a cold
cache is compiled in worker processes, as on the CPU; under the simulator, which compiles
nothing, no worker starts. Behaviour only, never timings.

In the simulator these tests check that a worker builds exactly the parent's kernels for
the CUDA target and runs them; with CONVDSL_TEST_GPU=1 the same tests compile them with
NVVM, and the parent then loads every kernel from the cache its workers filled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl.codegen import cache, parallel
from convdsl.codegen.cuda.common import simulated

pytestmark = [pytest.mark.cuda,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

# Stages of several kinds: convolution + batch norm, a strided one fused with pooling,
# a dense layer.
TEXT = ("input x: 2x7x7\na = conv(4, 3, pad=1, bias=no)\nb = bn(act=relu)\n"
        "c = conv(4, 3, pad=1, bias=no, stride=2)\nd = bn(act=relu)\np = maxpool(2)\n"
        "flatten\nfc = dense(3)\noutput fc\n")


def test_workers_build_and_run_the_parents_cuda_kernels(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each worker's request names the CUDA device, and builds every stage it is given
    with the same kernel specs as the parent (a stage whose specs differ would be
    skipped, and its kernels compiled in the parent after all)."""
    net = convdsl.compile(TEXT, batch=2, device="cuda", warm=False)
    monkeypatch.setattr(cache, "has_machine_code", lambda spec: False)  # all cold
    shares = parallel.plan(net.stages, 3)
    assert len(shares) == 3
    ran = []
    for request in parallel._requests(net, shares):
        assert request["device"] == "cuda"
        ran += parallel.run_request(request)
    assert sorted(ran) == sorted(name for share in shares for name in share)


def test_kernel_functions_of_a_cuda_module_are_counted() -> None:
    """The plan balances workers by the functions each kernel module compiles: on CUDA
    its kernels and device functions, not its imports or constant tables."""
    net = convdsl.compile(TEXT, batch=2, device="cuda", warm=False)
    for stage in net.stages:
        for spec in stage.kernel.specs:
            functions = cache.functions(spec)
            assert functions, spec.template
            assert all(callable(f) and hasattr(f, "py_func") for f in functions.values())
            assert not {"cuda", "math", "np"} & set(functions)


# A new process on an empty cache: compile without warming, then warm, and report how,
# and (on a GPU) how many kernel versions the parent compiled itself.
CHILD = """
import json, sys
import numpy as np
import convdsl
from convdsl.codegen import cache, parallel

net = convdsl.compile(sys.argv[1], batch=2, seed=3, device="cuda", warm=False)
report = {"how": parallel.warm(net)}
functions = [f for stage in net.stages for spec in stage.kernel.specs
             for f in cache.functions(spec).values()]
report["compiled"] = sum(sum(getattr(f, "_cache_misses", {}).values()) for f in functions)
x = np.random.default_rng(1).standard_normal((2, *net.input_shape)).astype(net.dtype)
report["scores"] = net.forward(x).tolist()
print(json.dumps(report))
"""


def test_a_cold_cuda_compile_uses_workers_on_a_gpu_only(tmp_path: Path) -> None:
    env = {**os.environ, "CONVDSL_CACHE": str(tmp_path / "cache"),
           parallel.WORKERS_VARIABLE: "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, TEXT], capture_output=True,
                          text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if simulated():
        assert report["how"] == "here"  # nothing to compile, so no worker
    else:
        assert report["how"] == "workers"
        assert report["compiled"] == 0  # every kernel came from the workers' cache
    net = convdsl.compile(TEXT, batch=2, seed=3, device="cuda")
    x = np.random.default_rng(1).standard_normal((2, *net.input_shape)).astype(net.dtype)
    np.testing.assert_allclose(np.array(report["scores"], dtype=net.dtype), net.forward(x),
                               rtol=1e-6, atol=1e-6)


def test_cuda_workers_are_capped_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CUDA worker holds a context on the GPU: one per core, at most CUDA_WORKERS,
    unless CONVDSL_COMPILE_WORKERS names a number."""
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, str(parallel.CUDA_WORKERS + 4))
    assert parallel.cuda_worker_count() == parallel.CUDA_WORKERS + 4
    monkeypatch.delenv(parallel.WORKERS_VARIABLE)
    monkeypatch.setattr(parallel, "worker_count", lambda: 64)  # cores
    assert parallel.cuda_worker_count() == parallel.CUDA_WORKERS
    monkeypatch.setattr(parallel, "worker_count", lambda: 2)
    assert parallel.cuda_worker_count() == 2
