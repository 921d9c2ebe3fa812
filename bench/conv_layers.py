"""Each convolution algorithm on single layers, forward and backward, interleaved.

    python bench/conv_layers.py                      # ResNet's 3x3 layers, batch 32
    python bench/conv_layers.py --layer 64x32x32:64 --layer 3x32x32:64 --rounds 9
    python bench/conv_layers.py --network examples/inception_module.cnn:32 \
        --network networks/lenet5.cnn:64 --network networks/resnet20_cifar.cnn:32

With --network, every convolution of each file (one per distinct geometry) runs in each
algorithm that applies (Winograd with the tile the model would take), except those the
cost model expects to take more than conv.TUNE_WITHIN times the best estimate (as `tune`
skips them), and the table gives the model's choice against the fastest measured (after
WARMUP_ROUNDS untimed rounds), each algorithm's measured and estimated milliseconds, and
at the end how many layers the model put on a slower algorithm and how much slower the
layers as chosen are in total. docs/performance.md has this for 57 layers of nine
networks, before and after the cost model's fits.

A layer is `CxHxW:O` (a 3x3 convolution with padding 1 and ReLU, C input channels on
HxW maps, O outputs). For each layer GEMM and Winograd with each tile size (and FFT with
--fft) run one forward and one backward (input, weight and bias gradients) per round, in
turn, after an untimed round that compiles or loads the kernels; the table gives median
milliseconds, the ratio of each to GEMM, and the algorithm the cost model
(codegen/cost.py, this machine's calibration) chooses. The Winograd constants of the
model were fitted to these ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import numpy as np

import convdsl
from convdsl.codegen import cost
from convdsl.codegen.cpu import conv, conv_fit, conv_winograd
from convdsl.codegen.layer import ALGORITHMS, LayerSetup, layer_setups
from convdsl.ir.ops import Op

# Winograd with each tile size, as a column of its own: name -> (algorithm, tile)
VARIANTS = {f"winograd{tile}": ("winograd", tile) for tile in conv_winograd.TILINGS}

RESNET_LAYERS = ("3x32x32:64", "16x32x32:16", "32x16x16:32", "64x32x32:64",
                 "128x16x16:128", "256x8x8:256", "512x4x4:512")


def parse(layer: str) -> tuple[int, int, int, int]:
    shape, _, outputs = layer.partition(":")
    channels, height, width = (int(part) for part in shape.split("x"))
    return channels, height, width, int(outputs)


def time_layer(layer: str, batch: int, rounds: int, algorithms: tuple[str, ...]
               ) -> dict[str, float]:
    """Median seconds of one forward + backward per algorithm that applies; `winograd2`
    and `winograd4` are Winograd with 2x2 and 4x4 output tiles."""
    channels, height, width, outputs = parse(layer)
    network = convdsl.loads(f"input x: {channels}x{height}x{width}\n"
                            f"c = conv({outputs}, 3, pad=1, act=relu)\noutput c")
    layers = {}
    for name in algorithms:
        algorithm, tile = VARIANTS.get(name, (name, None))
        setup = layer_setups(network, batch, "float32", algorithm)["c"]
        if conv.applies(setup, algorithm):
            layers[name] = conv.ConvLayer(setup, algorithm, "bench", None, tile)
    x, dy, params = conv_fit.random_pass(setup)  # the same arrays for every algorithm
    return interleaved(layers, x, dy, params, rounds)


def interleaved(layers: dict[str, conv.ConvLayer], x: np.ndarray, dy: np.ndarray,
                params: dict[str, np.ndarray], rounds: int) -> dict[str, float]:
    """Median seconds of one forward + backward of each layer, in turn each round, after
    a first round that compiles or loads the kernels."""
    return {name: statistics.median(seconds) for name, seconds in
            conv_fit.timed_rounds(layers, x, dy, params, rounds).items()}


# Untimed rounds before a network's layers are timed: NumPy's FFTs take four or five
# rounds to reach their speed (codegen/cpu/conv_fit.py)
WARMUP_ROUNDS = 4


def fastest_of_setups(setups: dict[str, LayerSetup], rounds: int) -> dict[str, float]:
    """Fastest seconds of one forward + backward of each named layer setup, in turn each
    round, after WARMUP_ROUNDS untimed ones."""
    x, dy, params = conv_fit.random_pass(next(iter(setups.values())))
    layers = {name: conv.ConvLayer(setup, setup.algo, "bench", None)
              for name, setup in setups.items()}
    seconds = conv_fit.timed_rounds(layers, x, dy, params, WARMUP_ROUNDS + rounds)
    return {name: min(values[WARMUP_ROUNDS:]) for name, values in seconds.items()}


@dataclasses.dataclass
class Choice:
    """One layer: the milliseconds of the model's choice and of the fastest measured."""

    chosen_ms: float
    fastest_ms: float


def network_choices(path: str, batch: int, rounds: int) -> list[Choice]:
    """The model's choice against the fastest measured, per distinct convolution."""
    network = convdsl.load(path)
    seen: set[str] = set()
    choices = []
    print(f"{network.name}, batch {batch}, forward + backward, fastest of {rounds} rounds "
          f"after {WARMUP_ROUNDS}")
    print(f"{'layer':>28}  {'model':>8}  {'fastest':>8}  {'model/fastest':>13}  "
          "measured / estimated ms")
    for name, setup in layer_setups(network, batch, "float32", "auto").items():
        if setup.layer.op is not Op.CONV:
            continue
        key = conv.conv_spec(setup, "direct").key
        if key in seen:
            continue
        seen.add(key)
        chosen, _ = conv.choose_algorithm(setup)
        rates = cost.rates()
        estimates = {algorithm: cost.estimate(conv.conv_spec(setup, algorithm), rates)
                     for algorithm in ALGORITHMS if conv.applies(setup, algorithm)}
        best = min(estimates.values())
        candidates = {algorithm: dataclasses.replace(setup, algo=algorithm)
                      for algorithm, estimate in estimates.items()
                      if estimate <= conv.TUNE_WITHIN * best}
        ms = {algorithm: 1e3 * value
              for algorithm, value in fastest_of_setups(candidates, rounds).items()}
        fastest = min(ms, key=ms.__getitem__)
        listing = ", ".join(f"{algorithm} {value:.2f} / {1e3 * estimates[algorithm]:.2f}"
                            for algorithm, value in ms.items())
        print(f"{name:>28}  {chosen:>8}  {fastest:>8}  {ms[chosen] / ms[fastest]:13.2f}  "
              f"{listing}", flush=True)
        choices.append(Choice(ms[chosen], ms[fastest]))
    return choices


def summary(choices: list[Choice]) -> str:
    """How far the model's choices are from the fastest, over every layer timed."""
    slower = [choice.chosen_ms / choice.fastest_ms for choice in choices
              if choice.chosen_ms > choice.fastest_ms]
    total = sum(c.chosen_ms for c in choices) / sum(c.fastest_ms for c in choices)
    worst = f", the worst {max(slower):.2f} times" if slower else ""
    return (f"{len(choices)} layers: {len(slower)} not on the fastest algorithm measured"
            f"{worst}; as chosen they take {total:.3f} times the fastest in total")


def model_choice(layer: str, batch: int) -> str:
    channels, height, width, outputs = parse(layer)
    network = convdsl.loads(f"input x: {channels}x{height}x{width}\n"
                            f"c = conv({outputs}, 3, pad=1, act=relu)\noutput c")
    return conv.choose_algorithm(layer_setups(network, batch, "float32", None)["c"])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", action="append", help="CxHxW:O (repeatable)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fft", action="store_true", help="time FFT too (slow on these)")
    parser.add_argument("--network", action="append", metavar="FILE[:BATCH]",
                        help="a .cnn file: its own convolutions, every algorithm (repeatable; "
                        "BATCH defaults to --batch)")
    args = parser.parse_args()
    if args.network:
        print(f"cost model: {cost.rates()}")
        choices = []
        for item in args.network:
            path, _, batch = item.partition(":")
            choices += network_choices(path, int(batch or args.batch), args.rounds)
        print(summary(choices))
        return
    algorithms = tuple(name for name in ALGORITHMS
                       if name not in ("direct", "winograd") and (args.fft or name != "fft"))
    algorithms += tuple(VARIANTS)
    print(f"batch {args.batch}, 3x3 pad 1 + ReLU, forward + backward, median of "
          f"{args.rounds} rounds; model rates: {cost.rates()}")
    header = ["layer", *(f"{name} ms" for name in algorithms),
              *(f"{name}/gemm" for name in algorithms if name != "gemm"), "model"]
    print("  ".join(f"{cell:>14}" for cell in header))
    for layer in args.layer or RESNET_LAYERS:
        ms = {name: 1e3 * value for name, value in
              time_layer(layer, args.batch, args.rounds, algorithms).items()}
        cells = [layer, *(f"{ms[name]:.2f}" if name in ms else "-" for name in algorithms),
                 *(f"{ms[name] / ms['gemm']:.2f}" if name in ms else "-"
                   for name in algorithms if name != "gemm"),
                 model_choice(layer, args.batch)]
        print("  ".join(f"{cell:>14}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
