"""What `convdsl time` measures and prints: where the time of a training step goes.

Like `caffe time`: each stage (one layer today, a fused group of layers later) is
timed on its own, forward and backward, by calling its kernels directly in the
executor's order, with the real inputs that the earlier stages compute. The backward
pass of a stage is fed a random gradient of its output's shape: a kernel's time does
not depend on the values it reads, and building the true gradients would repeat the
executor's bookkeeping. Every figure is a median over the iterations, after warm-up
runs that compile (or load) the kernels and warm the caches.

The totals are measured whole, not summed from the stages: a training step (forward,
loss, backward through `CompiledNetwork`) and an inference (forward, train=False). The
difference between a step and the sum of its stages is the executor's own cost.

On a GPU a stage is several kernel launches (a product per pass, a bias reduction, a
pooling...). `kernels=True` (`convdsl time --kernels`) runs the stages once more with
every launch between two synchronisations of its own, and reports each kernel's time
by stage and pass: which of a convolution's three products costs most, for instance.

    net = convdsl.compile("networks/lenet5.cnn", batch=64)
    timing = time_network(net, iterations=10)
    print(timing_table(timing))
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from convdsl import threads
from convdsl.codegen import source
from convdsl.codegen.layer import Mode
from convdsl.ir.ops import Activation, Layer, Op
from convdsl.runtime.executor import CompiledNetwork, Stage
from convdsl.runtime.gradcheck import random_targets

WARM_UP = 1  # untimed runs of everything before the timed ones


@dataclass(frozen=True)
class StageTime:
    """One stage's median times (seconds) and the arithmetic it does per batch."""

    name: str  # the layer whose output the stage writes
    ops: str  # what it computes, e.g. "conv+relu"
    algorithm: str
    forward_s: float
    backward_s: float
    forward_flops: int  # 2 x MACs x batch
    backward_flops: int  # twice the forward's where the layer has weights, else once

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def forward_gflops(self) -> float | None:
        return _rate(self.forward_flops, self.forward_s)

    @property
    def backward_gflops(self) -> float | None:
        return _rate(self.backward_flops, self.backward_s)


@dataclass(frozen=True)
class KernelTime:
    """One kernel of a stage's pass on a GPU: launches per pass, median seconds of them all."""

    stage: str
    pass_: str  # "forward" or "backward"
    kernel: str  # the generated function's name, e.g. "weight_grad"
    launches: int
    seconds: float


@dataclass(frozen=True)
class Timing:
    """The result of `time_network`: per stage, and whole steps."""

    network: str
    batch: int
    dtype: str
    iterations: int
    stages: tuple[StageTime, ...]
    train_step_s: float  # forward (train=True) + loss + backward, measured whole
    inference_s: float  # forward (train=False), measured whole
    device: str = "cpu"
    threads: str = ""  # the CPU's thread pools (convdsl.threads.describe)
    kernels: tuple[KernelTime, ...] = ()  # on a GPU, when asked for

    @property
    def kernels_s(self) -> float:
        return sum(kernel.seconds for kernel in self.kernels)

    @property
    def stages_s(self) -> float:
        """The sum of every stage's forward and backward."""
        return sum(stage.total_s for stage in self.stages)

    def share(self, stage: StageTime) -> float:
        """The stage's part of the sum over stages, 0 to 1."""
        return stage.total_s / self.stages_s if self.stages_s > 0 else 0.0

    @property
    def forward_flops(self) -> int:
        return sum(stage.forward_flops for stage in self.stages)

    @property
    def train_flops(self) -> int:
        return sum(stage.forward_flops + stage.backward_flops for stage in self.stages)

    @property
    def train_examples_per_s(self) -> float:
        return self.batch / self.train_step_s

    @property
    def inference_examples_per_s(self) -> float:
        return self.batch / self.inference_s

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain numbers, times in milliseconds, for `--json`."""
        kernels_s = self.kernels_s
        return {
            "network": self.network, "batch": self.batch, "dtype": self.dtype,
            "device": self.device, "threads": self.threads,
            "iterations": self.iterations,
            "stages": [{
                "name": s.name, "ops": s.ops, "algorithm": s.algorithm,
                "forward_ms": s.forward_s * 1e3, "backward_ms": s.backward_s * 1e3,
                "forward_flops": s.forward_flops, "backward_flops": s.backward_flops,
                "forward_gflops": s.forward_gflops, "backward_gflops": s.backward_gflops,
                "share": self.share(s)} for s in self.stages],
            "stages_ms": self.stages_s * 1e3,
            "train_step": {"ms": self.train_step_s * 1e3, "flops": self.train_flops,
                           "gflops": _rate(self.train_flops, self.train_step_s),
                           "examples_per_s": self.train_examples_per_s},
            "inference": {"ms": self.inference_s * 1e3, "flops": self.forward_flops,
                          "gflops": _rate(self.forward_flops, self.inference_s),
                          "examples_per_s": self.inference_examples_per_s},
            "kernels": [{"stage": k.stage, "pass": k.pass_, "kernel": k.kernel,
                         "launches": k.launches, "ms": k.seconds * 1e3,
                         "share": k.seconds / kernels_s if kernels_s else 0.0}
                        for k in self.kernels],
        }


def time_network(net: CompiledNetwork, iterations: int = 10, seed: int = 0,
                 kernels: bool = False) -> Timing:
    """Median times over `iterations` of every stage and of whole steps, and with
    `kernels` (a GPU only) of every kernel. The network's parameters, running
    statistics and step counter are left as they were."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    if kernels and net.device.name != "cuda":
        raise ValueError("per-kernel times are for the CUDA target, whose stages launch "
                         "several kernels; on the CPU the stage table is the finest")
    rng = np.random.default_rng(seed)
    inputs = {name: rng.standard_normal((net.batch, *shape)).astype(net.dtype)
              for name, shape in net.input_shapes.items()}
    targets = random_targets(net, rng)
    saved, step = net.state_dict(), net.step
    try:
        forward, backward = _time_stages(net, inputs, targets, iterations, rng)
        per_kernel = _time_kernels(net, inputs, targets, iterations, rng) if kernels else ()
        train_step = _median_seconds(lambda: _train_step(net, inputs, targets, rng), iterations,
                                     net.device.synchronize)
        inference = _median_seconds(lambda: net.forward(inputs, train=False), iterations,
                                    net.device.synchronize)
    finally:
        net.load_state_dict(saved)
        net.step = step
        net.device.fill(net.grads.flat, 0.0)
    stages = tuple(_stage_time(net, stage, forward[stage.name], backward[stage.name])
                   for stage in net.stages)
    pools = (f"{threads.describe()}; {source.describe_threads()}"
             if net.device.name == "cpu" else "")
    return Timing(net.network.name, net.batch, net.dtype, iterations, stages,
                  train_step, inference, net.device.name, pools, per_kernel)


# --- measuring ------------------------------------------------------------------


class KernelClock:
    """Times each launch it is handed between two synchronisations of the device, and
    files the seconds under the stage and pass running (`at`) and the kernel's name."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.at: tuple[str, str] | None = None  # (stage, pass); None between stages
        self.runs: list[dict[tuple[str, str, str], list[float]]] = []

    def new_run(self) -> None:
        self.runs.append(defaultdict(list))

    def __call__(self, kernel: str, launch: Callable[[], None]) -> None:
        if self.at is None:  # not a stage's (the loss, a set-up): not timed
            launch()
            return
        self.synchronize()
        start = time.perf_counter()
        launch()
        self.synchronize()
        self.runs[-1][(*self.at, kernel)].append(time.perf_counter() - start)

    def medians(self) -> tuple[KernelTime, ...]:
        """Per kernel of a stage's pass, in the order first launched: its launches in a
        run and the median over the timed runs of their summed seconds."""
        timed = self.runs[WARM_UP:]
        kernels = []
        for key, launches in timed[-1].items():
            stage, pass_, kernel = key
            seconds = statistics.median(sum(run[key]) for run in timed)
            kernels.append(KernelTime(stage, pass_, kernel, len(launches), seconds))
        return tuple(kernels)


def _time_kernels(net: CompiledNetwork, inputs: Mapping[str, np.ndarray],
                  targets: Mapping[str, np.ndarray], iterations: int,
                  rng: np.random.Generator) -> tuple[KernelTime, ...]:
    """The stages run again, every launch timed on its own (codegen/cuda/common.py)."""
    from convdsl.codegen.cuda import common

    clock = KernelClock(net.device.synchronize)
    common.LAUNCH_TIMER = clock
    try:
        _time_stages(net, inputs, targets, iterations, rng, clock)
    finally:
        common.LAUNCH_TIMER = None
    return clock.medians()


@contextmanager
def _at(clock: KernelClock | None, stage: str, pass_: str) -> Iterator[None]:
    """Launches within are the stage's pass (for the clock, if there is one)."""
    if clock is None:
        yield
        return
    clock.at = (stage, pass_)
    try:
        yield
    finally:
        clock.at = None


def _time_stages(net: CompiledNetwork, inputs: Mapping[str, np.ndarray],
                 targets: Mapping[str, np.ndarray], iterations: int,
                 rng: np.random.Generator, clock: KernelClock | None = None
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Median forward and backward seconds of each stage, kernels called one by one.
    On a GPU, kernels run asynchronously: the device is synchronised before and after
    each stage, so that each time is that stage's own work."""
    skip = _softmax_skipped(net, inputs, targets)
    device = net.device
    grads_out = {stage.name: device.put(rng.standard_normal(
        (net.batch, *net.network.shapes[stage.name])).astype(net.dtype))
        for stage in net.stages}
    on_device = {name: device.put(array) for name, array in inputs.items()}
    forward: dict[str, list[float]] = {stage.name: [] for stage in net.stages}
    backward: dict[str, list[float]] = {stage.name: [] for stage in net.stages}
    for run in range(WARM_UP + iterations):
        mode = Mode(train=True, seed=net.seed, step=run)
        values: dict[str, Any] = dict(on_device)
        if clock is not None:
            clock.new_run()
        for stage in net.stages:
            sources = [values[source] for source in stage.inputs]
            device.synchronize()
            start = time.perf_counter()
            with _at(clock, stage.name, "forward"):
                values[stage.name] = stage.kernel.forward(sources, stage.params, mode)
            device.synchronize()
            forward[stage.name].append(time.perf_counter() - start)
        for stage in reversed(net.stages):
            # as in a training step, which never asks for the input's gradient
            stage.kernel.input_grad_needed = stage.name not in net.input_stages
            # a backward may overwrite its gradient
            grad = device.duplicate(grads_out[stage.name])
            device.synchronize()
            start = time.perf_counter()
            with _at(clock, stage.name, "backward"):
                stage.kernel.backward(grad, stage.params, stage.grads,
                                      skip_act=stage.name in skip)
            device.synchronize()
            backward[stage.name].append(time.perf_counter() - start)
    return ({name: statistics.median(times[WARM_UP:]) for name, times in forward.items()},
            {name: statistics.median(times[WARM_UP:]) for name, times in backward.items()})


def _softmax_skipped(net: CompiledNetwork, inputs: Mapping[str, np.ndarray],
                     targets: Mapping[str, np.ndarray]) -> set[str]:
    """The outputs whose loss gradient skips their softmax in a real training step, so
    that their stages' backward is timed doing what a step makes it do."""
    if not targets:
        return set()
    net.forward(dict(inputs), train=True)
    net.loss(dict(targets))
    return set(net._through_softmax)


def _train_step(net: CompiledNetwork, inputs: Mapping[str, np.ndarray],
                targets: Mapping[str, np.ndarray], rng: np.random.Generator) -> None:
    net.forward(dict(inputs), train=True)
    if targets:
        net.loss(dict(targets))
        net.backward(input_grad=False)
        return
    # No output has a loss: start the backward pass from a gradient for every output.
    net.backward({output.name: rng.standard_normal(
        (net.batch, *net.network.shapes[output.name])).astype(net.dtype)
        for output in net.network.outputs}, input_grad=False)


def _median_seconds(run: Callable[[], object], iterations: int,
                    synchronize: Callable[[], None]) -> float:
    for _ in range(WARM_UP):
        run()
    times = []
    for _ in range(iterations):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- arithmetic -------------------------------------------------------------------


def _stage_time(net: CompiledNetwork, stage: Stage, forward_s: float,
                backward_s: float) -> StageTime:
    forward_flops = backward_flops = 0
    for index, layer in enumerate(stage.layers):
        flops = 2 * net.network.counts[layer.name].macs * net.batch
        forward_flops += flops
        # With weights, backward computes two products as large as the forward's (the
        # gradients of the input and of the weights); without, only the input's. A stage
        # that reads only network inputs skips its first layer's input gradient.
        input_grad = not (index == 0 and stage.name in net.input_stages)
        trained = f"{layer.name}.weight" in net.grads
        backward_flops += flops * (int(trained) + int(input_grad))
    return StageTime(stage.name, "+".join(_op_label(layer) for layer in stage.layers),
                     stage.kernel.algorithm, forward_s, backward_s, forward_flops,
                     backward_flops)


def _op_label(layer: Layer) -> str:
    act = layer.act
    if layer.op is Op.ACTIVATION and act is not None:
        return act.kind.value
    if act is None or act.kind is Activation.IDENTITY:
        return layer.op.value
    return f"{layer.op.value}+{act.kind.value}"


def _rate(flops: int, seconds: float) -> float | None:
    """GFLOP/s, or None for a stage that does no multiply-adds (pooling, activations)."""
    if flops == 0 or seconds <= 0:
        return None
    return flops / seconds / 1e9


# --- the table ------------------------------------------------------------------------


def timing_table(timing: Timing) -> str:
    """The per-stage table and the totals, as `convdsl time` prints them."""
    header = ("stage", "ops", "algorithm", "forward ms", "backward ms", "fwd GFLOP/s",
              "bwd GFLOP/s", "share")
    rows = [header]
    for s in timing.stages:
        rows.append((s.name, s.ops, s.algorithm, f"{s.forward_s * 1e3:.3f}",
                     f"{s.backward_s * 1e3:.3f}", _gflops_cell(s.forward_gflops),
                     _gflops_cell(s.backward_gflops), f"{timing.share(s):.1%}"))
    forward_sum = sum(s.forward_s for s in timing.stages)
    backward_sum = sum(s.backward_s for s in timing.stages)
    rows.append(("all stages", "", "", f"{forward_sum * 1e3:.3f}",
                 f"{backward_sum * 1e3:.3f}", "", "", "100.0%" if timing.stages else ""))
    lines = [f"{timing.network}: batch {timing.batch}, {timing.dtype}, {timing.device}, median of "
             f"{timing.iterations} iteration{'s' if timing.iterations != 1 else ''} "
             f"after {WARM_UP} warm-up"]
    if timing.threads:
        lines.append(f"threads: {timing.threads}")
    # name, ops and algorithm read left to right; numbers line up on the right
    lines += _aligned(rows, left=3)
    lines.append(_total_line("training step (forward + loss + backward)", timing.train_step_s,
                             timing.train_flops, timing.train_examples_per_s))
    lines.append(_total_line("inference (forward, train=False)", timing.inference_s,
                             timing.forward_flops, timing.inference_examples_per_s))
    if timing.kernels:
        lines += ["", "kernels, each launch between two synchronisations of its own:"]
        lines += _aligned(_kernel_rows(timing), left=3)
    return "\n".join(lines)


def _kernel_rows(timing: Timing) -> list[tuple[str, ...]]:
    total = timing.kernels_s
    rows: list[tuple[str, ...]] = [("stage", "pass", "kernel", "launches", "ms", "share")]
    for k in timing.kernels:
        rows.append((k.stage, k.pass_, k.kernel, str(k.launches), f"{k.seconds * 1e3:.3f}",
                     f"{k.seconds / total:.1%}" if total > 0 else ""))
    rows.append(("all kernels", "", "", str(sum(k.launches for k in timing.kernels)),
                 f"{total * 1e3:.3f}", "100.0%"))
    return rows


def _aligned(rows: Sequence[tuple[str, ...]], left: int) -> list[str]:
    """Rows as columns: the first `left` columns flush left, the rest flush right, a
    rule above the last row (the total)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        if index == len(rows) - 1:
            lines.append("  ".join("-" * width for width in widths))
        cells = [cell.ljust(width) if column < left else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _total_line(what: str, seconds: float, flops: int, examples_per_s: float) -> str:
    rate = _rate(flops, seconds)
    gflops = f", {_gflops_cell(rate)} GFLOP/s" if rate is not None else ""
    return f"{what}: {seconds * 1e3:.3f} ms, {examples_per_s:,.0f} examples/s{gflops}"


def _gflops_cell(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"  # tiny layers keep a digit
