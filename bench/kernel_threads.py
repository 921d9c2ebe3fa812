"""When do a kernel's threads pay? One layer's forward and backward, on the calling thread
and on Numba's threads, from tiny to large work.

    python bench/kernel_threads.py [--repeats N] [--only KIND]
    python bench/kernel_threads.py --network networks/lenet5.cnn:64 [--network ...]

For each layer the kernels are generated twice in one process, with
CONVDSL_THREADS_FROM above the layer's work (its prange loops run serially) and at 0
(on Numba's threads), and each version's forward + backward is timed (the fastest of
--repeats runs after a warm-up). The table shows the work that decides
(codegen/source.py: multiply-adds of a direct convolution, im2col entries of the
other algorithms, elements of the largest array otherwise) and threaded / serial: below
1.0 the threads pay. convdsl's default, THREADS_FROM, should sit where the ratio
crosses 1.0.

With --network, whole networks instead: each compiled cold (in an empty kernel cache)
with every kernel on threads, as before the threshold, and with the default, then the
fastest and the median of --repeats training passes (forward and backward) of each.
docs/kernels.md ("Threads") has the figures of the development machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import convdsl
from convdsl import threads
from convdsl.codegen import cache, source
from convdsl.codegen.layer import KernelLayer, Mode, build_layer, layer_setups
from convdsl.network import Network
from convdsl.runtime.params import init_params


@dataclass(frozen=True)
class Layer:
    kind: str
    text: str  # the layer, after an input of `shape`
    shape: str
    batch: int


def layers() -> list[Layer]:
    """Each kind of kernel on maps from 4x4 to 32x32 and batches of 2 to 32."""
    cases = []
    for channels, size, batch in ((4, 4, 2), (8, 8, 2), (8, 8, 8), (16, 16, 4), (16, 16, 16),
                                  (32, 16, 16), (32, 32, 16), (32, 32, 32)):
        shape = f"{channels}x{size}x{size}"
        cases += [
            Layer("conv direct 3x3", f"conv({channels}, 3, pad=1, algo=direct)", shape, batch),
            Layer("conv gemm 3x3", f"conv({channels}, 3, pad=1, algo=gemm)", shape, batch),
            Layer("maxpool 2", "maxpool(2)", shape, batch),
            Layer("relu", "relu", shape, batch),
            Layer("batch norm", "bn", shape, batch),
        ]
    return cases


def parse(layer: Layer) -> Network:
    return convdsl.loads(f"input {layer.shape}\nl = {layer.text}\noutput l")


def build(network: Network, layer: Layer, threads_from: int) -> tuple[KernelLayer, int]:
    os.environ[source.THREADS_VARIABLE] = str(threads_from)
    setup = layer_setups(network, layer.batch, "float32")["l"]
    kernel = build_layer(setup)
    return kernel, max(cache.work(spec) for spec in kernel.specs)


def seconds(kernel: KernelLayer, network: Network, layer: Layer, repeats: int) -> float:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((layer.batch, *network.input_shape)).astype(np.float32)
    params = {name.rpartition(".")[2]: array.astype(np.float32)
              for name, array in init_params(network).items()}
    grads = {field: np.zeros_like(array) for field, array in params.items()
             if field in ("weight", "bias")}
    mode = Mode(train=True)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run compiles or loads the machine code
        start = time.perf_counter()
        y = kernel.forward([x], params, mode)
        kernel.backward(np.ones_like(y), params, grads)
        best = min(best, time.perf_counter() - start)
    return best


def network_row(path: str, batch: int, threads_from: int | None, repeats: int) -> str:
    """Cold compile and training passes of one network at one threshold."""
    if threads_from is None:
        os.environ.pop(source.THREADS_VARIABLE, None)
    else:
        os.environ[source.THREADS_VARIABLE] = str(threads_from)
    os.environ["CONVDSL_CACHE"] = tempfile.mkdtemp(prefix="convdsl-threads-")
    start = time.perf_counter()
    net = convdsl.compile(path, batch=batch)
    compile_s = time.perf_counter() - start
    specs = {spec.key: spec for stage in net.stages for spec in stage.kernel.specs}
    threaded = sum(cache.load(spec).PARALLEL for spec in specs.values())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *net.network.input_shape)).astype(np.float32)
    grad = np.ones((batch, *net.network.output_shape), np.float32)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.forward(x, train=True)
        net.backward(grad)
        runs.append(time.perf_counter() - start)
    label = "all" if threads_from == 0 else "default"
    return (f"{os.path.basename(path):<20} {batch:>5} {label:>8} {threaded:>4}/{len(specs):<4} "
            f"{compile_s:>9.1f} {min(runs) * 1e3:>9.3f} {float(np.median(runs)) * 1e3:>9.3f}")


def compare_networks(networks: list[str], repeats: int) -> None:
    print(f"{'network':<20} {'batch':>5} {'threads':>8} {'on threads':>9} {'compile s':>9} "
          f"{'min ms':>9} {'median ms':>9}")
    # Numba's first compile in a process sets up its compiler; neither row should pay it
    os.environ["CONVDSL_CACHE"] = tempfile.mkdtemp(prefix="convdsl-threads-")
    convdsl.compile("input 1x4\nc = conv(2, 3)\noutput c", batch=1)
    for item in networks:
        path, _, batch = item.rpartition(":")
        for threads_from in (0, None):
            print(network_row(path, int(batch), threads_from, repeats), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--only", help="one kind of layer, such as 'relu'")
    parser.add_argument("--network", action="append", metavar="PATH:BATCH",
                        help="compare whole networks instead (repeatable)")
    args = parser.parse_args()
    print(threads.describe())
    if args.network:
        compare_networks(args.network, args.repeats)
        return
    print(f"{'layer':<16} {'input':>12} {'batch':>5} {'work':>10} {'serial us':>10} "
          f"{'threads us':>10} {'ratio':>6}")
    for layer in layers():
        if args.only and layer.kind != args.only:
            continue
        network = parse(layer)
        serial, work = build(network, layer, 1 << 62)
        threaded, _ = build(network, layer, 0)
        one = seconds(serial, network, layer, args.repeats)
        many = seconds(threaded, network, layer, args.repeats)
        print(f"{layer.kind:<16} {layer.shape:>12} {layer.batch:>5} {work:>10} "
              f"{one * 1e6:>10.1f} {many * 1e6:>10.1f} {many / one:>6.2f}")


if __name__ == "__main__":
    main()
