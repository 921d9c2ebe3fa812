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

    net = convdsl.compile("networks/lenet5.cnn", batch=64)
    timing = time_network(net, iterations=10)
    print(timing_table(timing))
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from convdsl import threads
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
        }


def time_network(net: CompiledNetwork, iterations: int = 10, seed: int = 0) -> Timing:
    """Median times over `iterations` of every stage and of whole steps. The network's
    parameters, running statistics and step counter are left as they were."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, not {iterations}")
    rng = np.random.default_rng(seed)
    inputs = {name: rng.standard_normal((net.batch, *shape)).astype(net.dtype)
              for name, shape in net.input_shapes.items()}
    targets = random_targets(net, rng)
    saved, step = net.state_dict(), net.step
    try:
        forward, backward = _time_stages(net, inputs, targets, iterations, rng)
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
    pools = threads.describe() if net.device.name == "cpu" else ""
    return Timing(net.network.name, net.batch, net.dtype, iterations, stages,
                  train_step, inference, net.device.name, pools)


# --- measuring ------------------------------------------------------------------


def _time_stages(net: CompiledNetwork, inputs: Mapping[str, np.ndarray],
                 targets: Mapping[str, np.ndarray], iterations: int,
                 rng: np.random.Generator) -> tuple[dict[str, float], dict[str, float]]:
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
        for stage in net.stages:
            sources = [values[source] for source in stage.inputs]
            device.synchronize()
            start = time.perf_counter()
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
            stage.kernel.backward(grad, stage.params, stage.grads, skip_act=stage.name in skip)
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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = 3  # name, ops and algorithm read left to right; numbers line up on the right
    lines = [f"{timing.network}: batch {timing.batch}, {timing.dtype}, {timing.device}, median of "
             f"{timing.iterations} iteration{'s' if timing.iterations != 1 else ''} "
             f"after {WARM_UP} warm-up"]
    if timing.threads:
        lines.append(f"threads: {timing.threads}")
    for index, row in enumerate(rows):
        if index == len(rows) - 1:
            lines.append("  ".join("-" * width for width in widths))
        cells = [cell.ljust(width) if column < left else cell.rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    lines.append(_total_line("training step (forward + loss + backward)", timing.train_step_s,
                             timing.train_flops, timing.train_examples_per_s))
    lines.append(_total_line("inference (forward, train=False)", timing.inference_s,
                             timing.forward_flops, timing.inference_examples_per_s))
    return "\n".join(lines)


def _total_line(what: str, seconds: float, flops: int, examples_per_s: float) -> str:
    rate = _rate(flops, seconds)
    gflops = f", {_gflops_cell(rate)} GFLOP/s" if rate is not None else ""
    return f"{what}: {seconds * 1e3:.3f} ms, {examples_per_s:,.0f} examples/s{gflops}"


def _gflops_cell(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"  # tiny layers keep a digit
