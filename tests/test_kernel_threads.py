"""Threads only where they pay (codegen/source.py, `parallel_line`): a kernel whose work is
under CONVDSL_THREADS_FROM runs its prange loops on the calling thread, a larger one on
Numba's threads; and every template's loops, run on threads, compute what the NumPy
reference computes.

Most kernels of the other tests are small and so run serially; the reference checks here
are what drive every template's parallel loops (with two Numba threads under xdist, so
that a race between iterations can show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from reference_check import assert_matches_reference

import convdsl
from convdsl.cli import main
from convdsl.codegen import cache, parallel, source
from convdsl.codegen.layer import ALGORITHMS
from convdsl.codegen.spec import KernelSpec
from convdsl.errors import RunError

ROOT = Path(__file__).resolve().parent.parent

SMALL = """input 2x6x6
c = conv(3, 3) -> relu
flatten
out = dense(2)
output out"""

# A Winograd convolution (3x3, stride 1: none of the examples has one) with batch norm
# and a residual added in its epilogue.
WINOGRAD = """input 4x6x6
stem = conv(4, 3, pad=1)
a = conv(4, 3, pad=1, bias=no) -> bn
first = add(a, stem, act=elu)
flatten
out = dense(3)
output out"""

# The examples at the batch their float64 parity tests use (tests/test_torch_parity.py),
# every_op_image by every convolution algorithm; between them they use every CPU
# template (test_the_threaded_cases_use_every_template).
EXAMPLES = ROOT / "examples"
THREADED_CASES = [
    *((f"every_op_image-{algo}", EXAMPLES / "every_op_image.cnn", 3, algo)
      for algo in ALGORITHMS),
    ("every_op_signal", EXAMPLES / "every_op_signal.cnn", 4, None),
    ("every_op_volume", EXAMPLES / "every_op_volume.cnn", 3, None),
    ("winograd_residual", WINOGRAD, 2, "winograd")]


def compiled(network: str | Path, batch: int, algo: str | None,
             warm: bool = True) -> convdsl.CompiledNetwork:
    return convdsl.compile(network, batch=batch, dtype="float64", algo=algo, seed=0,
                           warm=warm)


def specs(net: convdsl.CompiledNetwork) -> dict[str, KernelSpec]:
    return {spec.key: spec for stage in net.stages for spec in stage.kernel.specs}


def threaded(spec: KernelSpec) -> bool:
    """Whether the kernel file rendered now runs its loops on threads."""
    return "\nPARALLEL = True" in cache.render(spec)


def test_a_small_network_runs_every_kernel_on_the_calling_thread() -> None:
    net = convdsl.compile(SMALL, batch=2, warm=False)
    assert not any(threaded(spec) for spec in specs(net).values())
    assert net.forward(np.ones((2, 2, 6, 6), np.float32)).shape == (2, 2)


def test_a_kernel_runs_on_threads_from_the_work_threads_from_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    net = convdsl.compile(ROOT / "networks" / "lenet5.cnn", batch=2, warm=False)
    stages = {stage.name: stage.kernel.specs for stage in net.stages}
    c1 = stages["s2"][0]  # c1 (fused with s2): 2 x 6 x 28 x 28 outputs of 25 multiply-adds
    assert c1.template == "conv_direct" and cache.work(c1) == 235_200 and threaded(c1)
    last = stages["out"][-1]  # the output layer's epilogue: 2 x 10 values
    assert cache.work(last) == 20 // source.VALUES_PER_MAC and not threaded(last)
    monkeypatch.setenv(source.THREADS_VARIABLE, str(235_201))
    assert not threaded(c1)
    monkeypatch.setenv(source.THREADS_VARIABLE, "0")
    assert all(threaded(spec) for spec in specs(net).values())


def test_the_choice_is_part_of_the_kernel_file_and_of_the_loaded_module(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that changes its mind loads the other kernel, never the one it already
    holds: the two differ in their source, so in their file and in Numba's cache."""
    spec = next(iter(specs(convdsl.compile(SMALL, batch=2, warm=False)).values()))
    serial = cache.load(spec)
    monkeypatch.setenv(source.THREADS_VARIABLE, "0")
    on_threads = cache.load(spec)
    assert on_threads is not serial
    assert (serial.PARALLEL, on_threads.PARALLEL) == (False, True)
    assert cache.load(spec) is on_threads


def test_a_warm_up_record_belongs_to_one_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record lists the versions a warm-up loads from one set of kernel files; under
    another threshold the files differ, so the record must too."""
    net = convdsl.compile(SMALL, batch=2, warm=False)
    default = parallel.record_name(net.stages)
    monkeypatch.setenv(source.THREADS_VARIABLE, "0")
    assert parallel.record_name(net.stages) != default


def test_a_threads_from_that_is_no_number_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(source.THREADS_VARIABLE, "lots")
    with pytest.raises(RunError, match="CONVDSL_THREADS_FROM='lots' is not a whole number"):
        source.threads_from()
    assert main(["compile", str(ROOT / "networks" / "lenet5.cnn"), "--batch", "2"]) == 1
    error = capsys.readouterr().err
    assert "hint: set it to 0 to run every kernel on threads" in error
    assert "Traceback" not in error


def test_the_threaded_cases_use_every_template(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(source.THREADS_VARIABLE, "0")
    used = {spec.template for _, text, batch, algo in THREADED_CASES
            for spec in specs(compiled(text, batch, algo, warm=False)).values()
            if threaded(spec)}
    cpu_templates = {name for name in cache.templates() if not name.startswith("cuda_")}
    assert used == cpu_templates


@pytest.mark.parametrize(("text", "batch", "algo"),
                         [case[1:] for case in THREADED_CASES],
                         ids=[case[0] for case in THREADED_CASES])
def test_every_template_computes_the_reference_on_threads(
        monkeypatch: pytest.MonkeyPatch, text: str | Path, batch: int,
        algo: str | None) -> None:
    monkeypatch.setenv(source.THREADS_VARIABLE, "0")
    network = compiled(text, batch, algo)
    assert all(threaded(spec) for spec in specs(network).values())
    assert_matches_reference(network)
    assert not compiled_twice_for_the_index(network)


def compiled_twice_for_the_index(net: convdsl.CompiledNetwork) -> list[str]:
    """Kernel functions with two versions whose arguments differ only between int64 and
    uint64: a helper called from a prange loop with the loop's index, which Numba types
    both ways, so that a cold compile builds it twice (Winograd's did, 1.2 s a module).
    On a warm cache, or where compile workers built the kernels, such helpers are never
    compiled in this process: only a cold run without workers (CI's, under xdist) sees
    them."""
    return [f"{spec.template}.{name}" for spec in specs(net).values()
            for name, function in cache.dispatchers(spec).items()
            if len({str(types).replace("uint64", "int64") for types in function.signatures})
            < len(function.signatures)]
