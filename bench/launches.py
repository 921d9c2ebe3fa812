"""Kernel launches and host waits per training step on the CUDA target, counted
without a GPU.

    NUMBA_ENABLE_CUDASIM=1 python bench/launches.py [--network FILE:BATCH ...]

A small network's step on a GPU is bound by the Python work of each launch, not by
the GPU (docs/performance.md), so the number of launches per step is a figure that
matters there and that any machine can count. So is the number of times the host waits
for the GPU: a copy to the host, and a copy from host memory, both wait for every
kernel queued before them, and the GPU then idles until the host queues the next. The
kernels are never run: every launch site (codegen/cuda/common.Launch) is replaced by a
counter, and the simulator's copies are watched, which the simulator makes possible
without a driver. A step is what `convdsl train` does (CompiledNetwork.train_step):
forward, loss, backward, the check for NaN, and an SGD update with momentum. Once a
step repeats, its launches go to the driver as CUDA graphs of graphs.CHUNK launches each
(codegen/cuda/graphs.py; tests/test_cuda_graphs.py checks it): the last column.
"""

from __future__ import annotations

import argparse
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
        """Forward, loss, backward, the NaN check, the update: as `convdsl train`."""
        self.net.train_step(self.inputs, self.targets, self.optimizer, 0.1)

    def inference(self) -> None:
        self.net.forward(self.inputs, train=False)


class Events:
    """What the host does to the GPU, in order: "launch", "copy" (host to device or
    back: the host waits for the kernels queued before) or "device copy" (within the
    GPU, queued like a kernel)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def launches(self) -> int:
        return self.seen.count("launch")

    def queued(self) -> bool:
        """Whether the events end with kernels queued: a launch after the last copy."""
        copies_and_launches = [event for event in self.seen if event != "device copy"]
        return bool(copies_and_launches) and copies_and_launches[-1] == "launch"

    def waits(self, queued: bool = False) -> int:
        """Copies that found kernels queued before them (`queued`: some were when the
        events began): each is a wait of the host."""
        waits = 0
        for event in self.seen:
            if event == "copy":
                waits += queued
                queued = False
            elif event == "launch":
                queued = True
        return waits

    def watch(self) -> None:
        """Count every launch instead of running it, and note the simulator's copies."""
        from numba import cuda
        from numba.cuda.simulator.cudadrv import devicearray

        from convdsl.codegen.cuda import common

        seen = self.seen
        to_host, to_device = (devicearray.FakeCUDAArray.copy_to_host,
                              devicearray.FakeCUDAArray.copy_to_device)
        new_on_device, new_array = cuda.to_device, cuda.device_array

        def launched(site: Any, *args: Any) -> None:
            seen.append("launch")

        def copied_to_host(array: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append("copy")
            return to_host(array, *args, **kwargs)

        def copied_to_device(array: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
            within = isinstance(source, devicearray.FakeCUDAArray)
            seen.append("device copy" if within else "copy")
            return to_device(array, source, *args, **kwargs)

        def sent(source: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append("copy")
            return new_on_device(source, *args, **kwargs)

        def zeroed(*args: Any, **kwargs: Any) -> Any:
            # no kernel runs, so none fills memory: zeros keep a step on its usual path
            # (an open NaN gate, finite losses)
            array = new_array(*args, **kwargs)
            array._ary.fill(0)
            return array

        setattr(common.Launch, "__call__", launched)  # noqa: B010 (a method, replaced)
        setattr(devicearray.FakeCUDAArray, "copy_to_host", copied_to_host)  # noqa: B010
        setattr(devicearray.FakeCUDAArray, "copy_to_device", copied_to_device)  # noqa: B010
        setattr(cuda, "to_device", sent)  # noqa: B010
        setattr(cuda, "device_array", zeroed)  # noqa: B010


def count_step(path: str, batch: int, events: Events) -> tuple[int, int, int]:
    """The network's trained arrays, and the launches and host waits of one training
    step in a run of them (the third: the first sets things up, and a step's first copy
    waits for the step before if that one ended with kernels queued)."""
    stepper = Stepper(path, batch)
    for _ in range(2):
        stepper.train_step()
    queued = events.queued()
    events.seen.clear()
    stepper.train_step()
    return len(stepper.net.trained), events.launches(), events.waits(queued)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", action="append", metavar="FILE:BATCH",
                        help=f"a network and batch (repeatable; default {' '.join(DEFAULT)})")
    args = parser.parse_args()
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        sys.exit("run it with NUMBA_ENABLE_CUDASIM=1: launches are counted, never run")
    events = Events()
    events.watch()
    from convdsl.codegen.cuda.graphs import CHUNK

    print("| network | batch | trained arrays | launches per training step "
          "| host waits per step | driver calls per repeated step (graphs) |")
    print("|---|---:|---:|---:|---:|---:|")
    for entry in args.network or DEFAULT:
        path, _, batch = entry.rpartition(":")
        arrays, launches, waits = count_step(path, int(batch), events)
        graphs = -(-launches // CHUNK)  # a graph per CHUNK launches (codegen/cuda/graphs.py)
        print(f"| {path} | {batch} | {arrays} | {launches} | {waits} | {graphs} |")


if __name__ == "__main__":
    main()
