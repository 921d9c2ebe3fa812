"""The benchmark's cases and how they are measured (imported by bench/run.py only after
it has fixed the thread counts, since Numba and the BLAS libraries read them at import).

A case is one network at one batch size. Its convdsl network (one per requested
algorithm) and its PyTorch model (bench/torch_net.py, loaded with the same weights)
run on the same random batch; the variants are timed interleaved (A B A B ...) after
warm-up, so that a slow phase of a shared machine hits every variant alike, and each
row reports the medians.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import numpy as np
import torch
import torch.nn.functional as F
from torch_net import TorchModel

import convdsl
from convdsl.network import Network
from convdsl.runtime.optim import SGD
from convdsl.runtime.params import init_params

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ROOT / "networks"
LR = 1e-3  # small enough that random labels never drive the weights to overflow
MOMENTUM = 0.9


@dataclass(frozen=True)
class Case:
    title: str
    network: str  # file stem in networks/
    batch: int
    reps: int  # timed repetitions of each variant (warm-up comes on top)
    algos: tuple[str, ...] = ("auto",)  # convdsl variants, each compiled with algo=
    torch_compile: bool = True  # also time torch.compile'd inference


@dataclass
class Row:
    """One line of the table: a case in one mode (train or infer) for one convdsl algo."""

    title: str
    network: str
    batch: int
    mode: str  # "train" or "infer"
    algo: str
    convdsl_ms: float
    eager_ms: float
    compiled_ms: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def best_torch_ms(self) -> float:
        if self.compiled_ms is None:
            return self.eager_ms
        return min(self.eager_ms, self.compiled_ms)


def cases(quick: bool) -> list[Case]:
    """The issue's cases; --quick runs each two or three times and skips torch.compile
    (about 45 s per network on a busy 2-core machine), to check that everything runs."""
    full = [
        Case("LeNet-5", "lenet5", 64, 50),
        Case("LeNet-5", "lenet5", 256, 30),
        Case("ResNet-20-CIFAR", "resnet20_cifar", 32, 10),
        Case("ResNet-18-CIFAR", "resnet18_cifar", 32, 3),
        Case("MNIST-1D CNN", "mnist1d_cnn", 100, 50),
        Case("long-window 1-D conv", "long_window_signal", 32, 5,
             algos=("auto", "direct", "gemm", "fft")),
        Case("3-D (voxel3d)", "voxel3d", 8, 5),
    ]
    if not quick:
        return full
    return [Case(c.title, c.network, c.batch, 3 if c.reps > 5 else 2, c.algos,
                 torch_compile=False) for c in full]


# --- data -------------------------------------------------------------------------


def random_batch(network: Network, batch: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A random float32 input batch and random class labels for the network's output."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *network.input_shape)).astype(np.float32)
    y = rng.integers(0, network.output_shape[0], batch)
    return x, y


def torch_model(path: Path, batch: int) -> tuple[TorchModel, np.ndarray, np.ndarray]:
    """The PyTorch model alone, with convdsl's initial weights (seed 0) and the same batch
    as a convdsl network compiled from `path` gets, without compiling any kernel."""
    network = convdsl.load(path)
    model = TorchModel(network)
    model.load_arrays(init_params(network, 0, "pytorch", "float32"))
    return (model, *random_batch(network, batch))


# --- one training step and one inference, each side ---------------------------------


def convdsl_steps(net: convdsl.CompiledNetwork, x: np.ndarray, y: np.ndarray
                  ) -> tuple[Callable[[], None], Callable[[], None]]:
    """convdsl's training step (forward, loss, backward, SGD with momentum) and inference."""
    optimizer = SGD(net.grads, momentum=MOMENTUM)

    def train() -> None:
        net.forward(x, train=True)
        net.loss(y)
        net.backward(input_grad=False)
        optimizer.step(net.params, net.grads, LR)

    def infer() -> None:
        net.forward(x, train=False)

    return train, infer


def torch_steps(model: TorchModel, x: np.ndarray, y: np.ndarray
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    """The same for PyTorch eager: the step a PyTorch user writes."""
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(inputs)

    return train, infer


def compiled_inference(model: TorchModel, x: np.ndarray
                       ) -> tuple[Callable[[], None] | None, str]:
    """torch.compile'd inference, compiled now; (None, why) when compiling fails."""
    inputs = torch.from_numpy(x)
    model.eval()
    start = time.perf_counter()
    try:
        compiled = torch.compile(model)
        with torch.inference_mode():
            compiled(inputs)
    except Exception as exc:  # any failure of the compiler stack only skips the column
        return None, f"torch.compile failed ({type(exc).__name__}: {str(exc)[:80]})"
    seconds = time.perf_counter() - start

    def infer() -> None:
        with torch.inference_mode():
            compiled(inputs)

    return infer, f"torch.compile took {seconds:.0f} s"


# --- timing --------------------------------------------------------------------------


def interleaved(variants: dict[str, Callable[[], None]], reps: int, warmup: int = 2
                ) -> dict[str, float]:
    """Median milliseconds of each variant, run in turn A B C A B C ... after warm-up."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * median(values) for name, values in times.items()}


# --- a case --------------------------------------------------------------------------


def same_outputs(net: convdsl.CompiledNetwork, model: TorchModel, x: np.ndarray) -> str | None:
    """None when both compute the same inference outputs (float32 tolerance), else a note:
    the benchmark compares the same network or nothing."""
    expected = net.forward(x, train=False)
    model.eval()
    with torch.inference_mode():
        got = model(torch.from_numpy(x)).numpy()
    scale = max(float(np.abs(expected).max()), 1e-6)
    error = float(np.abs(got - expected).max()) / scale
    return None if error < 1e-3 else f"OUTPUTS DIFFER from PyTorch's (relative {error:.1e})"


def run_case(case: Case, warmup: int, log: Callable[[str], None]) -> list[Row]:
    """Time a case's convdsl variants against PyTorch, train and inference."""
    path = NETWORKS / f"{case.network}.cnn"
    nets = {algo: convdsl.compile(path, batch=case.batch, algo=algo) for algo in case.algos}
    first = nets[case.algos[0]]
    model = TorchModel(first.network)
    model.load_arrays(first.params)  # every variant starts from the same weights (seed 0)
    x, y = random_batch(first.network, case.batch)
    notes = [note for net in nets.values() if (note := same_outputs(net, model, x))]
    rows: list[Row] = []
    for mode in ("train", "infer"):
        variants: dict[str, Callable[[], None]] = {}
        for algo, net in nets.items():
            train, infer = convdsl_steps(net, x, y)
            variants[f"convdsl:{algo}"] = train if mode == "train" else infer
        torch_train, torch_infer = torch_steps(model, x, y)
        variants["eager"] = torch_train if mode == "train" else torch_infer
        mode_notes = list(notes)
        if mode == "infer" and case.torch_compile:
            compiled, note = compiled_inference(model, x)
            mode_notes.append(note)
            if compiled is not None:
                variants["compiled"] = compiled
        log(f"  {case.title} batch {case.batch} {mode}: {case.reps} x {len(variants)} runs")
        medians = interleaved(variants, case.reps, warmup)
        for algo in case.algos:
            rows.append(Row(case.title, case.network, case.batch, mode, algo,
                            medians[f"convdsl:{algo}"], medians["eager"],
                            medians.get("compiled"), mode_notes))
    return rows


__all__ = ["Case", "Row", "cases", "convdsl_steps", "random_batch", "run_case", "torch_model",
           "torch_steps"]
