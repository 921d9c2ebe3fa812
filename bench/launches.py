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


def count_step(path: str, batch: int, counts: collections.Counter[str]) -> tuple[int, int]:
    """The network's trained arrays, and the launches of one training step (the second:
    the first may set things up)."""
    import convdsl
    from convdsl.ir.training import TrainSettings
    from convdsl.runtime.optim import make_optimizer

    net = convdsl.compile(path, batch=batch, dtype="float32", device="cuda", warm=False)
    optimizer = make_optimizer(TrainSettings(lr=0.1, momentum=0.9), net.trained)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((batch, *shape)).astype(np.float32)
              for name, shape in net.input_shapes.items()}
    labels = np.zeros(batch, dtype=np.int64)
    for _ in range(2):
        counts.clear()
        net.forward(inputs, train=True)
        net.loss(labels)
        net.backward(input_grad=False)
        net.device.first_nonfinite(net.grads)
        optimizer.step(net.trained, net.grads, 0.1)
    return len(net.trained), sum(counts.values())


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
