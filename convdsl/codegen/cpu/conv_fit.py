"""How this machine's convolution kernels run against the cost model, per algorithm.

The cost model (codegen/cost.py) turns rates measured by micro-benchmarks into seconds,
with constants fitted on one machine. On another machine the kernels can run faster or
slower than those rates say, and not by the same factor for every algorithm: on an Intel
Xeon with AVX-512 and 2 MB of L2 cache per core, GEMM's kernels ran at 0.38 of their
estimates and the direct loops at 0.66 (geometric means over 57 layers), so the model
sent LeNet-5's second convolution to the direct loops, which took 2.7 times GEMM's time
there.

`fit(rates)` times the direct, GEMM and FFT algorithms on one reference layer (forward
and backward, the fastest of ten rounds taken in turn, so that other work slows all of
them alike) and returns the rates with each algorithm's measured over estimated seconds.
Winograd takes GEMM's fit: its constants were fitted as ratios to GEMM's times, and on
the machine above its kernels ran at 0.31 of their estimate against GEMM's 0.38 (the
geometric means over 57 layers of nine networks).

The reference is a 5x5 layer like an Inception module's (16 -> 32 channels on 28x28
maps, batch 8). On the machine above, with fits from it the model chose the fastest
algorithm for 52-54 of those 57 layers (the others, near ties, took at most 1.25 times
the fastest), and the layers as chosen took 1.003 times the fastest in total; without
fits, 13 layers and 1.14 (`python bench/conv_layers.py --network FILE:BATCH ...`).
Fits from a smaller 3x3 layer (32 channels on 16x16) came out direct 0.88, GEMM 0.29,
FFT 0.35-0.47 against 0.40-0.44, 0.24-0.25 and 0.44-0.49 here, and sent two of the Inception
module's 5x5 layers to FFT at 1.4 and 2.3 times GEMM's time: FFT's estimate is the
least sure (its ratio to the measured time spreads 1.5x from layer to layer), and the
larger layer puts it where FFT and GEMM are close. The reference layer's kernels are
compiled the first time, in worker processes where there are cores for them
(`compile_in_workers`), and kept in the kernel cache like any others.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from convdsl.codegen import cache, cost, parallel
from convdsl.codegen.cpu.conv import ConvLayer, conv_spec
from convdsl.codegen.layer import LayerSetup, Mode, layer_setups
from convdsl.network import loads

log = logging.getLogger(__name__)

LAYER = "c"  # the reference network's one layer


@dataclass(frozen=True)
class Reference:
    """A square convolution with "same" padding and ReLU, as in ResNet and Inception."""

    channels: int
    outputs: int
    size: int
    window: int
    batch: int

    def text(self) -> str:
        return (f"input x: {self.channels}x{self.size}x{self.size}\n"
                f"{LAYER} = conv({self.outputs}, {self.window}, pad={self.window // 2}, act=relu)\n"
                f"output {LAYER}")

    def describe(self) -> str:
        return (f"{self.window}x{self.window} layer, {self.channels} -> {self.outputs} channels "
                f"on {self.size}x{self.size} maps, batch {self.batch}")

    def setup(self) -> LayerSetup:
        return layer_setups(loads(self.text()), self.batch, "float32", "auto")[LAYER]


REFERENCE = Reference(channels=16, outputs=32, size=28, window=5, batch=8)
# Not Winograd: its spec asks the cost model for a tile, and the cost model's rates are
# what is being measured here (it takes GEMM's fit)
FITTED = ("direct", "gemm", "fft")
# NumPy's FFTs take four or five rounds to reach their speed (11.5 ms, then 9.0, 8.8,
# 8.5, 8.1 on a 3x3 layer)
ROUNDS = 10


def fit(rates: cost.Rates) -> cost.Rates:
    """`rates` with direct_fit, gemm_fit and fft_fit measured on the reference layer."""
    compile_in_workers(REFERENCE)
    setup = REFERENCE.setup()
    layers = {name: ConvLayer(dataclasses.replace(setup, algo=name), name,
                              "reference layer of the cost model's fit", None)
              for name in FITTED}
    x, dy, params = random_pass(setup)
    fits = {f"{name}_fit": min(seconds) / cost.modelled(conv_spec(setup, name), rates)
            for name, seconds in timed_rounds(layers, x, dy, params, ROUNDS).items()}
    return dataclasses.replace(rates, **fits)


def compile_in_workers(reference: Reference) -> int:
    """Compile the reference layer's kernels of each algorithm that has no machine code
    yet, each in a worker process of its own, where this process may run on more than
    one core; returns how many workers did (0: none started, the first timed round
    compiles here). Numba compiles on one core: on the 2-core machine above the three
    modules took 12.3 s one after the other, 8.5-8.9 s in three workers, and the whole
    first measurement 10.7-10.9 s instead of 13.9-14.6. The workers neither measure nor
    read the rates (the algorithm is given), so they never wait for the lock this
    process holds while it measures."""
    setup = reference.setup()
    cold = {name: spec for name in FITTED
            if not cache.has_machine_code(spec := conv_spec(setup, name))}
    if parallel.worker_count() < 2 or len(cold) < 2:
        return 0
    log.info("compiling the reference layer's kernels in %d processes", len(cold))
    requests = [parallel.layer_request(reference.text(), reference.batch, "float32",
                                       LAYER, name, [spec])
                for name, spec in cold.items()]
    try:
        return parallel.run_workers(requests, {cost.NO_CALIBRATE: "1"})
    except Exception:  # only ever a shortcut: the first timed round compiles what is missing
        log.debug("compiling in worker processes failed", exc_info=True)
        return 0


def random_pass(setup: LayerSetup) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Random float32 input, output gradient and parameters for timing the layer: a
    kernel's time does not depend on the values."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(setup.batched_inputs[0], dtype=np.float32)
    dy = rng.standard_normal(setup.batched_output, dtype=np.float32)
    params = {field: rng.standard_normal(shape, dtype=np.float32)
              for field, shape in setup.param_shapes}
    return x, dy, params


def timed_rounds(layers: dict[str, ConvLayer], x: np.ndarray, dy: np.ndarray,
                 params: dict[str, np.ndarray], rounds: int) -> dict[str, list[float]]:
    """Seconds of one forward + backward of each layer, in turn each round, after a first
    round that compiles or loads the kernels."""
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    seconds: dict[str, list[float]] = {name: [] for name in layers}
    for round_ in range(rounds + 1):
        for name, kernel in layers.items():
            gradient = dy.copy()  # backward scales it by the activation's derivative
            started = time.perf_counter()
            kernel.forward([x], params, Mode(train=True))
            kernel.backward(gradient, params, grads)
            if round_:
                seconds[name].append(max(time.perf_counter() - started, math.ulp(1.0)))
    return seconds
