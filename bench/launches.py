"""Kernel launches per training step on the CUDA target, counted without a GPU.

    NUMBA_ENABLE_CUDASIM=1 python bench/launches.py [--network FILE:BATCH ...]

A small network's step on a GPU is bound by the Python work of each launch, not by
the GPU (docs/performance.md), so the number of launches per step is a figure that
matters there and that any machine can count. The kernels are never run: every launch
site (codegen/cuda/common.Launch) is replaced by a counter, which the simulator makes
possible without a driver. A step is what `convdsl train` does: forward, loss,
backward, the check of the gradients for NaN, and an SGD update with momentum.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any

import numpy as np

DEFAULT = ["networks/lenet5.cnn:64", "networks/resnet18_cifar.cnn:128"]


class Stepper:
    """A network compiled for the CUDA target, a random batch, and an SGD optimizer:
    what a training step as `convdsl train` runs it needs."""

    def __init__(self, path: str, batch: int) -> None:
        import convdsl
        from convdsl.ir.ops import Loss
        from convdsl.ir.training import TrainSettings
        from convdsl.runtime.optim import make_optimizer

        self.net = convdsl.compile(path, batch=batch, dtype="float32", device="cuda",
                                   warm=False)
        self.optimizer = make_optimizer(TrainSettings(lr=0.1, momentum=0.9), self.net.trained)
        rng = np.random.default_rng(0)
        self.inputs = {name: rng.standard_normal((batch, *shape)).astype(np.float32)
                       for name, shape in self.net.input_shapes.items()}
        self.targets = {}  # zeros of each output's loss: class 0, or a zero map
        for output in self.net.network.outputs:
            shape = (batch, *self.net.network.shapes[output.name])
            if output.loss is Loss.CROSS_ENTROPY:
                self.targets[output.name] = np.zeros((batch, *shape[2:]), dtype=np.int64)
            elif output.loss is Loss.MSE:
                self.targets[output.name] = np.zeros(shape, dtype=np.float32)

    def train_step(self) -> None:
        """Forward, loss, backward, the NaN check of the gradients, the update."""
        net = self.net
        net.forward(self.inputs, train=True)
        net.loss(self.targets)
        net.backward(input_grad=False)
        net.device.first_nonfinite(net.grads)
        self.optimizer.step(net.trained, net.grads, 0.1)

    def inference(self) -> None:
        self.net.forward(self.inputs, train=False)


def count_step(path: str, batch: int, counts: collections.Counter[str]) -> tuple[int, int]:
    """The network's trained arrays, and the launches of one training step (the second:
    the first may set things up)."""
    stepper = Stepper(path, batch)
    for _ in range(2):
        counts.clear()
        stepper.train_step()
    return len(stepper.net.trained), sum(counts.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", action="append", metavar="FILE:BATCH",
                        help=f"a network and batch (repeatable; default {' '.join(DEFAULT)})")
    args = parser.parse_args()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("run it with NUMBA_ENABLE_CUDASIM=1: launches are counted, never run")
    from convdsl.codegen.cuda import common

    counts: collections.Counter[str] = collections.Counter()

    def counted(site: Any, *args: Any) -> None:
        counts[site.name] += 1

    setattr(common.Launch, "__call__", counted)  # noqa: B010 (a method, replaced)
    print("| network | batch | trained arrays | launches per training step |")
    print("|---|---:|---:|---:|")
    for entry in args.network or DEFAULT:
        path, _, batch = entry.rpartition(":")
        arrays, launches = count_step(path, int(batch), counts)
        print(f"| {path} | {batch} | {arrays} | {launches} |")


if __name__ == "__main__":
    main()
