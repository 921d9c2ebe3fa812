"""How compile gets its kernels ready (convdsl/codegen/parallel.py): worker processes on
a cold cache, a record of the compiled versions on a warm one. Behaviour only: the same
kernels, the same outputs, nothing compiled twice; never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import convdsl
from convdsl.codegen import cache, parallel, source
from convdsl.codegen.cpu import conv
from convdsl.codegen.layer import Mode, layer_setups
from convdsl.runtime.executor import Stage

# Two stages with kernels of their own (conv + relu, dense): something to share.
TEXT = "input x: 2x7x7\nc = conv(3, 3, act=relu)\nflatten\nfc = dense(4)\noutput fc\n"
BATCH = 3
# Three identical blocks: the two later ones share every kernel.
BLOCKS = ("input x: 2x7x7\na = conv(4, 3, pad=1, bias=no)\nb = bn(act=relu)\n"
          "c = conv(4, 3, pad=1, bias=no)\nd = bn(act=relu)\n"
          "e = conv(4, 3, pad=1, bias=no)\nf = bn(act=relu)\n"
          "flatten\nfc = dense(3)\noutput fc\n")

# Run in a new process, on the cache the test chooses: compile without warming, then
# warm the way `mode` says, and report what Numba did and what the network computes.
CHILD = """
import json, sys
import numpy as np
import convdsl
from convdsl.codegen import cache, parallel

text, batch, mode, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
net = convdsl.compile(text, batch=batch, seed=3, warm=False)
report = {"cold_stages": sum(len(share) for share in parallel.plan(net.stages, 2))}
if mode == "record":
    def refuse():
        raise AssertionError("warm_up ran")
    net.warm_up = refuse
report["how"] = parallel.warm(net)
functions = [f for stage in net.stages for spec in stage.kernel.specs
             for f in cache.dispatchers(spec).values()]
report["compiled"] = sum(sum(f._cache_misses.values()) for f in functions)
report["loaded"] = sum(sum(f._cache_hits.values()) for f in functions)
report["specs"] = sorted({spec.key for s in net.stages for spec in s.kernel.specs})
x = np.random.default_rng(1).standard_normal((batch, *net.input_shape)).astype(net.dtype)
train = net.forward(x, train=True).copy()
net.backward(np.ones_like(train))
np.savez(out, train=train, infer=net.forward(x), **{k: v for k, v in net.grads.items()})
print(json.dumps(report))
"""


def _child(tmp_path: Path, cache_dir: Path, mode: str, name: str) -> dict[str, object]:
    env = {**os.environ, "CONVDSL_CACHE": str(cache_dir), parallel.WORKERS_VARIABLE: "2"}
    done = subprocess.run([sys.executable, "-c", CHILD, TEXT, str(BATCH), mode,
                           str(tmp_path / name)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _outputs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def test_workers_fill_a_cold_cache_and_a_new_process_only_loads(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cold = _child(tmp_path, cache_dir, "workers", "cold.npz")
    assert cold["cold_stages"] == 2 and cold["how"] == "workers"
    assert cold["compiled"] == 0 and cold["loaded"]  # the workers compiled everything

    warm = _child(tmp_path, cache_dir, "record", "warm.npz")
    assert warm["cold_stages"] == 0 and warm["how"] == "record"
    assert warm["compiled"] == 0 and warm["loaded"] == cold["loaded"]
    assert warm["specs"] == cold["specs"]

    # The same numbers as a network warmed up the plain way, in this process.
    net = convdsl.compile(TEXT, batch=BATCH, seed=3)
    x = np.random.default_rng(1).standard_normal((BATCH, *net.input_shape)).astype(net.dtype)
    train = net.forward(x, train=True).copy()
    net.backward(np.ones_like(train))
    want = {"train": train, "infer": net.forward(x), **net.grads}
    assert sorted(spec.key for s in net.stages for spec in s.kernel.specs) == cold["specs"]
    for got in (_outputs(tmp_path / "cold.npz"), _outputs(tmp_path / "warm.npz")):
        assert got.keys() == want.keys()
        for name, value in want.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_the_compile_command_uses_the_workers_and_leaves_a_record(tmp_path: Path) -> None:
    """`convdsl compile` on a cold cache compiles in workers, then times each layer's
    first run here; it leaves the record that lets the next process load without a run."""
    network = tmp_path / "net.cnn"
    network.write_text(TEXT)
    env = {**os.environ, "CONVDSL_CACHE": str(tmp_path / "cache"),
           parallel.WORKERS_VARIABLE: "2"}
    command = [sys.executable, "-m", "convdsl.cli", "compile", str(network), "--batch",
               str(BATCH)]

    def compile_once() -> str:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600,
                              check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    assert "compile in 2 worker processes" in compile_once()
    again = compile_once()  # nothing cold: no worker starts
    assert "then compile or load from the cache and run once" in again
    assert "worker" not in again
    warm = _child(tmp_path, tmp_path / "cache", "record", "warm.npz")
    assert warm["how"] == "record" and warm["compiled"] == 0


def test_stages_sharing_a_kernel_go_to_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    net = convdsl.compile(BLOCKS, batch=2, warm=False)
    monkeypatch.setattr(cache, "has_machine_code", lambda spec: False)  # all cold
    shares = parallel.plan(net.stages, 2)
    assert len(shares) == 2
    assert sorted(name for share in shares for name in share) == sorted(
        stage.name for stage in net.stages if stage.kernel.specs)
    owner = {name: index for index, share in enumerate(shares) for name in share}

    def sized_files(stage: Stage) -> set[Path]:
        return {cache.source_path(s) for s in stage.kernel.specs if cache.sized(s)}

    for first in net.stages:
        for second in net.stages:
            if sized_files(first) & sized_files(second):
                assert owner[first.name] == owner[second.name]
    assert owner["d"] == owner["f"]  # the same conv + bn + relu
    assert len(parallel.plan(net.stages, 1)) == 1


def test_a_kernel_for_every_size_ties_no_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three batch norms share one kernel file, which serves every size; only the
    two stages that share their convolution must go to one worker."""
    net = convdsl.compile(BLOCKS, batch=2, warm=False)
    monkeypatch.setattr(cache, "has_machine_code", lambda spec: False)
    stages = {stage.name: stage for stage in net.stages}
    norms = [spec for name in ("b", "d", "f")
             for spec in stages[name].kernel.specs if spec.template == "batchnorm"]
    assert len(norms) == 3 and not any(cache.sized(spec) for spec in norms)
    assert len({cache.source_path(spec) for spec in norms}) == 1
    shares = parallel.plan(net.stages, 3)
    assert sorted(map(sorted, shares)) == [["b"], ["d", "f"], ["fc"]]


def test_plan_skips_stages_with_machine_code(monkeypatch: pytest.MonkeyPatch) -> None:
    net = convdsl.compile(BLOCKS, batch=2, warm=False)
    cold = {spec.key for spec in net.stages[-1].kernel.specs}
    monkeypatch.setattr(cache, "has_machine_code", lambda spec: spec.key not in cold)
    assert parallel.plan(net.stages, 2) == [[net.stages[-1].name]]
    # one stage only: nothing to share, so no worker starts
    assert parallel.compile_in_workers(net, workers=2) == 0


def test_one_worker_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "1")
    assert parallel.worker_count() == 1
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "many")
    assert parallel.worker_count() == 1
    monkeypatch.delenv(parallel.WORKERS_VARIABLE)
    assert parallel.worker_count() >= 1
    net = convdsl.compile(TEXT, batch=BATCH, warm=False)
    assert parallel.compile_in_workers(net, workers=1) == 0


def test_a_damaged_record_falls_back_to_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    net = convdsl.compile(TEXT, batch=BATCH, warm=False)
    calls: list[int] = []
    monkeypatch.setattr(net, "warm_up", lambda: calls.append(1) or {})
    monkeypatch.setattr(parallel, "compile_in_workers", lambda compiled: 0)
    monkeypatch.setattr(cache, "write_record", lambda record, value: None)
    spec = net.stages[0].kernel.specs[0]
    # e.g. written by another version
    broken = {cache.source_path(spec).name: {"no_such_function": [()]}}
    monkeypatch.setattr(cache, "read_record", lambda record: broken)
    parallel.warm(net)
    assert calls == [1]


def test_the_bias_gradient_stays_small_in_machine_code() -> None:
    """LLVM's O3 unrolled `prepare` (dy *= act'(y), db = sum of dy) of LeNet-5's c3 at
    batch 32 into 14,000 lines of IR and took 18 s over it, while batch 64 took 0.5 s: the
    loop bounds were constants. They are read from the arrays now. Compiled afresh here,
    so that a copy in Numba's disk cache cannot hide the size."""
    text = "input x: 6x14x14\nc = conv(16, 5, act=relu)\noutput c"
    setup = layer_setups(convdsl.loads(text), 32, "float32", "direct")["c"]
    module = cache.load(conv.conv_spec(setup, "direct"))
    prepare = numba.njit(parallel=True, nogil=True)(module.prepare.py_func)
    dy = np.random.default_rng(0).standard_normal((32, 16, 100)).astype(np.float32)
    y, db = dy.copy(), np.zeros(16, np.float32)
    expected = np.where(y > 0, dy, 0)
    prepare(y, dy, db, True)
    np.testing.assert_allclose(dy, expected)
    np.testing.assert_allclose(db, expected.sum(axis=(0, 2)), rtol=1e-5)
    (ir,) = prepare.inspect_llvm().values()
    assert ir.count("\n") < 4000


def test_winograd_helpers_compile_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Winograd layer's per-channel helpers, called from a prange loop, were compiled
    twice on a cold cache: for the loop index as typed first (int64) and as the parallel
    lowering types it again (uint64), 1.2 s of an 11.6 s module. Every function of the
    module compiles for one signature. (A shape no other test uses, in a cache of its
    own, so that nothing is loaded instead of compiled; on threads, as a large layer
    runs.)"""
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    monkeypatch.setenv(source.THREADS_VARIABLE, "0")
    text = "input x: 3x5x5\nc = conv(2, 3, pad=1, bias=no)\noutput c"
    setup = layer_setups(convdsl.loads(text), 2, "float32", "winograd")["c"]
    layer = conv.ConvLayer(setup, "winograd", "test", None, tile=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    params = {"weight": rng.standard_normal((2, 3, 3, 3)).astype(np.float32)}
    grads = {"weight": np.zeros((2, 3, 3, 3), np.float32)}
    layer.forward([x], params, Mode(train=True))
    layer.backward(rng.standard_normal((2, 2, 5, 5)).astype(np.float32), params, grads)
    functions = {name: function for spec in layer.specs
                 for name, function in cache.dispatchers(spec).items()}
    assert {"transform_weight_row", "store_weight_grad_row"} <= functions.keys()
    assert all(len(function._cache_misses) == 1 for function in functions.values()), {
        name: list(function._cache_misses) for name, function in functions.items()}
