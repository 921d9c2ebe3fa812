"""OpenBLAS's threads sleeping after each product, or spinning: both ways, in one process.

    python bench/blas_threads.py lenet5 --batch 64
    python bench/blas_threads.py resnet18_cifar --batch 32 --runs 3 --rounds 4

convdsl sets OPENBLAS_THREAD_TIMEOUT=4 on import (convdsl/threads.py). This script
switches between that and OpenBLAS's default (28) by restarting OpenBLAS's threads in
place, and alternates the two in rounds, so that a change in the machine's load falls
on both sides. Each round times a training step (forward, loss, backward without the
input's gradient) and an inference; the table gives the median over rounds of each
round's median, and the ratio quiet / spinning per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import convdsl
from convdsl import threads

NETWORKS = Path(__file__).resolve().parent.parent / "networks"
TIMEOUTS = {"quiet": threads.SHORTEST, "spinning": "28"}  # 28: OpenBLAS's default


def use_timeout(value: str, libraries: list[str]) -> None:
    os.environ[threads.VARIABLE] = value
    if not threads._restart_loaded(libraries):
        sys.exit("no OpenBLAS that can be restarted is loaded: nothing to compare")


def median_ms(run: Callable[[], None], runs: int) -> float:
    run()  # the first call after a restart starts OpenBLAS's threads
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("network", help="a file stem in networks/, e.g. lenet5")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per round")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    net = convdsl.compile(NETWORKS / f"{args.network}.cnn", batch=args.batch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, *net.network.input_shape), dtype=np.float32)
    y = rng.integers(0, net.network.output_shape[0], args.batch)

    def step() -> None:
        net.forward(x, train=True)
        net.loss(y)
        net.backward(input_grad=False)

    def inference() -> None:
        net.forward(x, train=False)

    libraries = threads._loaded_openblas()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for side, value in TIMEOUTS.items():
            use_timeout(value, libraries)
            for name, run in (("training step", step), ("inference", inference)):
                times.setdefault((side, name), []).append(median_ms(run, args.runs))

    print(f"{args.network}, batch {args.batch}: medians over {args.rounds} rounds of "
          f"{args.runs} runs, in ms")
    print("| mode | quiet (timeout 4) | spinning (timeout 28) | quiet / spinning, per round |")
    print("|---|---:|---:|---|")
    for name in ("training step", "inference"):
        quiet, spinning = times[("quiet", name)], times[("spinning", name)]
        ratios = " ".join(f"{a / b:.2f}" for a, b in zip(quiet, spinning))
        print(f"| {name} | {statistics.median(quiet):.2f} | {statistics.median(spinning):.2f} "
              f"| {ratios} |")


if __name__ == "__main__":
    main()
