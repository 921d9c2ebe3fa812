"""The cost model that picks a convolution algorithm, its calibration and tuning.

Everything here runs with CONVDSL_NO_CALIBRATE=1 (the built-in rates), so choices do
not depend on the machine or on its load; no test checks a timing. Only the tuning test
and the fit's tests compile kernels (small layers, three algorithms each; one test in
worker processes)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convdsl
from convdsl.codegen import cache, cost, parallel
from convdsl.codegen.cpu import conv, conv_fit
from convdsl.codegen.layer import ALGORITHMS, LayerSetup, layer_setups


@pytest.fixture(autouse=True)
def built_in_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cost.NO_CALIBRATE, "1")


def _setup(text: str, batch: int = 32, algo: str | None = None) -> LayerSetup:
    return layer_setups(convdsl.loads(text + "\noutput c"), batch, "float32", algo)["c"]


def _estimates(setup: LayerSetup) -> dict[str, float]:
    return {name: cost.estimate(conv.conv_spec(setup, name), cost.rates())
            for name in ALGORITHMS if conv.applies(setup, name)}


LAYERS = {
    "long window": "input x: 16x1024\nc = conv(16, 65, pad=same)",
    "long window, one channel": "input x: 1x4096\nc = conv(16, 128)",
    "depthwise": "input x: 32x16x16\nc = conv(32, 3, pad=1, groups=32)",
    "filter": "input x: 3x32x32\nc = filter(3, kernel=[1 2 1 2 4 2 1 2 1] / 16, pad=same)",
    "lenet c1": "input x: 1x28x28\nc = conv(6, 5, pad=2)",
    "resnet 3x3": "input x: 64x32x32\nc = conv(64, 3, pad=1, bias=no)",
    "resnet 3x3 deep": "input x: 256x8x8\nc = conv(256, 3, pad=1, bias=no)",
    "resnet stem": "input x: 3x32x32\nc = conv(64, 3, pad=1, bias=no)",
    "resnet 3x3 stride 2": "input x: 64x32x32\nc = conv(128, 3, stride=2, pad=1, bias=no)",
    "3-d": "input x: 16x16x16x16\nc = conv(32, 3x3x3, pad=1, bias=no)",
}


@pytest.mark.parametrize(("layer", "expected"), [
    ("long window", "fft"), ("long window, one channel", "fft"), ("depthwise", "direct"),
    ("filter", "direct"), ("lenet c1", "direct"), ("resnet 3x3", "winograd"),
    ("resnet 3x3 deep", "winograd"), ("resnet stem", "gemm"), ("resnet 3x3 stride 2", "gemm"),
])
def test_the_model_picks(layer: str, expected: str) -> None:
    setup = _setup(LAYERS[layer])
    algorithm, reason = conv.choose_algorithm(setup)
    assert algorithm == expected, reason
    for name in ALGORITHMS:  # the reason lists every candidate's estimate
        assert (f"{name} " in reason) == conv.applies(setup, name)
    assert "ms forward + backward" in reason


def test_choices_without_calibration_are_deterministic() -> None:
    first = {name: conv.choose_algorithm(_setup(text)) for name, text in LAYERS.items()}
    second = {name: conv.choose_algorithm(_setup(text)) for name, text in LAYERS.items()}
    assert first == second
    assert cost.rates() == cost.DEFAULT_RATES


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_estimates_are_positive_and_grow_with_the_batch(layer: str) -> None:
    small, large = _estimates(_setup(LAYERS[layer], 8)), _estimates(_setup(LAYERS[layer], 64))
    assert small.keys() == large.keys()
    for name in small:
        assert 0 < small[name] < large[name], name


def test_float64_costs_more() -> None:
    text = LAYERS["resnet 3x3"] + "\noutput c"
    single = layer_setups(convdsl.loads(text), 8, "float32")["c"]
    double = layer_setups(convdsl.loads(text), 8, "float64")["c"]
    for name in ALGORITHMS:
        assert (cost.estimate(conv.conv_spec(single, name), cost.DEFAULT_RATES)
                < cost.estimate(conv.conv_spec(double, name), cost.DEFAULT_RATES))


def test_explicit_requests_win() -> None:
    for name in ALGORITHMS:
        layer = LAYERS["resnet 3x3" if name == "winograd" else "depthwise"]
        assert conv.choose_algorithm(_setup(layer, algo=name)) == (name, "requested")
    with pytest.raises(ValueError, match="unknown convolution algorithm"):
        conv.choose_algorithm(_setup(LAYERS["depthwise"], algo="strassen"))
    assert ("auto", "tune", *ALGORITHMS) == cost.CHOICES


def _fitted(rates: cost.Rates) -> cost.Rates:
    """What fit_kernels would return on some machine, without compiling anything."""
    return dataclasses.replace(rates, direct_fit=0.9, gemm_fit=0.3, fft_fit=0.5)


def test_calibration_is_measured_once_and_cached(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Measuring is replaced by stubs here: the test checks the caching, not the rates."""
    monkeypatch.delenv(cost.NO_CALIBRATE)
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "_RATES", None)
    measured = cost.Rates(blas=1e11, loops=1e10, fft=5e9, copy=1e10, call=1e-5)
    calls: list[int] = []

    def fake() -> cost.Rates:
        calls.append(1)
        return measured

    monkeypatch.setattr(cost, "calibrate", fake)
    monkeypatch.setattr(cost, "fit_kernels", _fitted)
    assert cost.rates() == _fitted(measured)
    stored = json.loads((tmp_path / cost.CALIBRATION_FILE).read_text())
    assert [entry["rates"]["blas"] for entry in stored["calibrations"]] == [1e11]
    assert [entry["rates"]["gemm_fit"] for entry in stored["calibrations"]] == [0.3]
    monkeypatch.setattr(cost, "_RATES", None)  # a new process reads the file
    assert cost.rates() == _fitted(measured)
    assert len(calls) == 1


def test_each_machine_signature_keeps_its_own_calibration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with another thread count measures its own rates and keeps the others'."""
    monkeypatch.delenv(cost.NO_CALIBRATE)
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    two = cost.Rates(blas=2e11, loops=2e10, fft=5e9, copy=1e10, call=1e-5, gemm_fit=0.4)
    one = cost.Rates(blas=1e11, loops=1e10, fft=3e9, copy=1e10, call=1e-5, gemm_fit=0.6)
    signature = {"threads": 2}
    monkeypatch.setattr(cost, "_machine", lambda: dict(signature))
    monkeypatch.setattr(cost, "fit_kernels", lambda rates: rates)
    for threads, rates in ((2, two), (1, one)):
        signature["threads"] = threads
        monkeypatch.setattr(cost, "_RATES", None)
        monkeypatch.setattr(cost, "calibrate", lambda rates=rates: rates)
        assert cost.rates() == rates
    monkeypatch.setattr(cost, "calibrate", lambda: pytest.fail("measured again"))
    for threads, rates in ((2, two), (1, one)):
        signature["threads"] = threads
        monkeypatch.setattr(cost, "_RATES", None)
        assert cost.rates() == rates


@pytest.mark.parametrize("layout", ["one entry", "list"])
def test_a_calibration_without_the_kernels_fits_is_measured_again(
        layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Earlier versions kept the micro-benchmarks' rates only (first as one entry, then
    as a list): their choices missed what the fits catch, so they are replaced."""
    monkeypatch.delenv(cost.NO_CALIBRATE)
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "_RATES", None)
    old = {"blas": 1e11, "loops": 1e10, "fft": 5e9, "copy": 1e10, "call": 1e-5}
    entry = {"machine": cost._machine(), "rates": old}
    (tmp_path / cost.CALIBRATION_FILE).write_text(json.dumps(
        entry if layout == "one entry" else {"calibrations": [entry]}))
    measured = cost.Rates(**old)
    monkeypatch.setattr(cost, "calibrate", lambda: measured)
    monkeypatch.setattr(cost, "fit_kernels", _fitted)
    assert cost.rates() == _fitted(measured)
    stored = json.loads((tmp_path / cost.CALIBRATION_FILE).read_text())
    assert [entry["rates"]["direct_fit"] for entry in stored["calibrations"]] == [0.9]


def test_the_fits_scale_each_algorithms_estimate() -> None:
    setup = _setup("input x: 6x14x14\nc = conv(16, 5, act=relu)")  # LeNet-5's c3
    fitted = _fitted(cost.DEFAULT_RATES)
    for name, fit in (("direct", 0.9), ("gemm", 0.3), ("fft", 0.5), ("winograd", 0.3)):
        spec = conv.conv_spec(setup, name)
        assert cost.modelled(spec, fitted) == cost.modelled(spec, cost.DEFAULT_RATES)
        assert cost.estimate(spec, fitted) == pytest.approx(
            fit * cost.estimate(spec, cost.DEFAULT_RATES))


def test_fits_can_turn_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The digits network's first layer: direct with the built-in rates; on a machine whose
    GEMM kernels run at 0.3 of their estimate and direct loops at 0.9, GEMM (an Intel Xeon
    measured 0.42 ms direct, 0.11 ms GEMM)."""
    setup = _setup("input x: 1x8x8\nc = conv(16, 3, pad=1, act=relu)")
    assert conv.choose_algorithm(setup)[0] == "direct"
    monkeypatch.setattr(cost, "rates", lambda: _fitted(cost.DEFAULT_RATES))
    assert conv.choose_algorithm(setup)[0] == "gemm"


SMALL = conv_fit.Reference(channels=2, outputs=3, size=6, window=5, batch=2)


def _small_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conv_fit, "REFERENCE", SMALL)
    monkeypatch.setattr(conv_fit, "ROUNDS", 2)


def test_the_fit_times_the_reference_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real fit, on a smaller reference layer: a fit per algorithm, the rates kept."""
    _small_reference(monkeypatch)
    fitted = conv_fit.fit(cost.DEFAULT_RATES)
    for name in conv_fit.FITTED:
        assert 0 < getattr(fitted, f"{name}_fit") < math.inf
    unfitted = dataclasses.replace(fitted, direct_fit=1.0, gemm_fit=1.0, fft_fit=1.0)
    assert unfitted == cost.DEFAULT_RATES


# A layer no other test compiles, so that this process has loaded none of its kernels
# from another cache
COLD = conv_fit.Reference(channels=3, outputs=2, size=7, window=3, batch=2)


def test_workers_compile_the_reference_kernels(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker per algorithm compiles the kernels the fit then times, and the fit
    only loads them; with the kernels in the cache no worker starts again."""
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "2")
    assert conv_fit.compile_in_workers(COLD) == len(conv_fit.FITTED)
    setup = COLD.setup()
    specs = [conv.conv_spec(setup, name) for name in conv_fit.FITTED]
    assert all(cache.has_machine_code(spec) for spec in specs)
    layers = {name: conv.ConvLayer(dataclasses.replace(setup, algo=name), name, "test", None)
              for name in conv_fit.FITTED}
    assert [layer.specs for layer in layers.values()] == [[spec] for spec in specs]
    conv_fit.timed_rounds(layers, *conv_fit.random_pass(setup), rounds=1)
    functions = [f for spec in specs for f in cache.dispatchers(spec).values()]
    assert sum(sum(f._cache_misses.values()) for f in functions) == 0  # nothing compiled
    assert sum(sum(f._cache_hits.values()) for f in functions) > 0
    assert conv_fit.compile_in_workers(COLD) == 0


def test_one_core_compiles_the_reference_kernels_here(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    monkeypatch.setattr(cache, "has_machine_code", lambda spec: False)  # all cold
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "1")

    def refuse(*_: object) -> int:
        raise AssertionError("a worker started")

    monkeypatch.setattr(parallel, "run_workers", refuse)
    assert conv_fit.compile_in_workers(COLD) == 0


def test_workers_that_cannot_start_leave_the_compile_here(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "has_machine_code", lambda spec: False)  # all cold
    monkeypatch.setenv(parallel.WORKERS_VARIABLE, "2")
    tried: list[int] = []

    def fail(requests: list[object], environment: dict[str, str]) -> int:
        tried.append(len(requests))
        assert environment == {cost.NO_CALIBRATE: "1"}  # no worker waits for the lock
        raise OSError("no processes here")

    monkeypatch.setattr(parallel, "run_workers", fail)
    assert conv_fit.compile_in_workers(COLD) == 0
    assert tried == [len(conv_fit.FITTED)]


def test_a_fit_is_the_fastest_time_over_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the timings made up: each fit is the fastest round over the model's seconds,
    so the fitted estimate of the reference layer is what was measured."""
    _small_reference(monkeypatch)
    fastest = {"direct": 2e-3, "gemm": 1e-3, "fft": 4e-3}
    monkeypatch.setattr(conv_fit, "timed_rounds", lambda layers, *_: {
        name: [3 * fastest[name], fastest[name]] for name in layers})
    fitted = conv_fit.fit(cost.DEFAULT_RATES)
    for name in conv_fit.FITTED:
        spec = conv.conv_spec(SMALL.setup(), name)
        modelled = cost.modelled(spec, cost.DEFAULT_RATES)
        assert getattr(fitted, f"{name}_fit") == pytest.approx(fastest[name] / modelled)
        assert cost.estimate(spec, fitted) == pytest.approx(fastest[name])


def test_the_reference_layer_is_what_it_says() -> None:
    reference = conv_fit.REFERENCE
    setup = reference.setup()
    assert setup.batched_inputs[0] == (reference.batch, reference.channels,
                                       reference.size, reference.size)
    assert setup.batched_output == (reference.batch, reference.outputs,
                                    reference.size, reference.size)
    assert setup.window is not None
    assert setup.window.window == (reference.window, reference.window)
    assert reference.describe() == "5x5 layer, 16 -> 32 channels on 28x28 maps, batch 8"


def test_disturbed_measurements_are_not_kept(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cost.NO_CALIBRATE)
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "_RATES", None)
    monkeypatch.setattr(cost, "calibrate", lambda: cost.DEFAULT_RATES)
    monkeypatch.setattr(cost, "fit_kernels",
                        lambda rates: dataclasses.replace(rates, fft_fit=300.0))
    assert cost.measure() is None
    assert cost.rates() == cost.DEFAULT_RATES
    assert not (tmp_path / cost.CALIBRATION_FILE).exists()


def test_tuning_times_once_and_reuses_the_decision(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    setup = _setup("input x: 4x64\nc = conv(4, 3)", batch=2, algo="tune")
    algorithm, reason = conv.choose_algorithm(setup)
    assert algorithm in ALGORITHMS
    assert reason.startswith("tune: measured ")
    decisions = json.loads((tmp_path / cost.TUNING_FILE).read_text())
    (decision,) = decisions.values()
    assert decision["algorithm"] == algorithm

    def no_timing(*_: object) -> None:
        raise AssertionError("timed again")

    monkeypatch.setattr(conv, "_time", no_timing)
    again, reason = conv.choose_algorithm(setup)
    assert again == algorithm
    assert reason.startswith("tune: measured earlier ")


def test_tuned_keeps_the_fastest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    seconds = {"direct": 0.003, "fft": 0.001}
    chosen, ms, cached = cost.tuned("layer", ("direct", "fft"), seconds.__getitem__)
    assert (chosen, cached) == ("fft", False)
    assert ms == pytest.approx({"direct": 3.0, "fft": 1.0})
    seconds = {"direct": 0.0, "fft": 1.0}  # not timed again: the cached decision holds
    assert cost.tuned("layer", ("direct", "fft"), seconds.__getitem__) == ("fft", ms, True)


def test_rates_measured_on_a_busy_machine_are_not_kept() -> None:
    # Measured while other jobs ran: BLAS at 4.7 GFLOP/s, below the loops' 19.8.
    busy = cost.Rates(blas=4.7e9, loops=19.8e9, fft=8.8e9, copy=64e9, call=5.6e-5)
    idle = cost.Rates(blas=203e9, loops=21.9e9, fft=7.6e9, copy=67e9, call=5.4e-5)
    assert not cost.plausible(busy)
    assert cost.plausible(idle)
    low, high = cost.FIT_BOUNDS
    assert cost.plausible(dataclasses.replace(idle, gemm_fit=0.3, direct_fit=0.87))
    assert not cost.plausible(dataclasses.replace(idle, direct_fit=high * 2))
    assert not cost.plausible(dataclasses.replace(idle, gemm_fit=low / 2))


# Run in two processes at once on one empty cache: measuring is a stub that notes each
# measurement in a file and takes a second, as the real one takes ten.
RACER = """
import dataclasses, os, sys, time
from convdsl.codegen import cost

def slow():
    with open(sys.argv[1], "a") as notes:
        print(os.getpid(), file=notes)
    time.sleep(1.0)
    return cost.Rates(blas=2e11, loops=2e10, fft=5e9, copy=1e10, call=1e-5)

cost.calibrate = slow
cost.fit_kernels = lambda rates: dataclasses.replace(rates, gemm_fit=0.3)
print(cost.rates().gemm_fit)
"""


def test_processes_that_start_together_measure_once(tmp_path: Path) -> None:
    env = {**os.environ, "CONVDSL_CACHE": str(tmp_path / "cache")}
    env.pop(cost.NO_CALIBRATE, None)
    notes = tmp_path / "measurements"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(notes)], env=env,
                               stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=120)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0]
    assert [output.strip() for output in outputs] == ["0.3", "0.3"]  # both use it
    assert len(notes.read_text().split()) == 1  # one measured, the other waited and read
