"""The benchmark's cases and how they are measured.

A case is one network at one batch size. Its convdsl network (one per requested
algorithm) and its PyTorch model (bench/torch_net.py, loaded with the same weights)
run on the same random batch, each side in a worker process of its own (bench/sides.py,
which says why). The variants are timed interleaved (A B A B ...) after warm-up, so that
a slow phase of a shared machine hits every variant alike, and each row reports the
medians. The workers import this module after bench/run.py has fixed the thread counts,
since Numba and the BLAS libraries read them at import; PyTorch is imported only on its
side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

import numpy as np

import convdsl
from convdsl.network import Network
from convdsl.runtime.optim import SGD
from convdsl.runtime.params import init_params

if TYPE_CHECKING:
    from sides import Worker
    from torch_net import TorchModel

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ROOT / "networks"
EXAMPLES = ROOT / "examples"
LR = 1e-3  # small enough that random labels never drive the weights to overflow
MOMENTUM = 0.9


@dataclass(frozen=True)
class Case:
    title: str
    network: str  # file stem in networks/ or, failing that, examples/
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
        Case("Inception module", "inception_module", 32, 5),
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
    from torch_net import TorchModel

    network = convdsl.load(path)
    model = TorchModel(network)
    model.load_arrays(init_params(network, 0, "pytorch", "float32"))
    return (model, *random_batch(network, batch))


# --- one training step and one inference, each side ---------------------------------


def convdsl_steps(net: convdsl.CompiledNetwork, x: np.ndarray, y: np.ndarray
                  ) -> tuple[Callable[[], None], Callable[[], None]]:
    """convdsl's training step as `convdsl train` takes it (forward, loss, backward, the
    check for NaN, SGD with momentum: CompiledNetwork.train_step) and inference."""
    optimizer = SGD(net.trained, momentum=MOMENTUM)

    def train() -> None:
        net.train_step(x, y, optimizer, LR)

    def infer() -> None:
        net.forward(x, train=False)

    return train, infer


def torch_steps(model: TorchModel, x: np.ndarray, y: np.ndarray
                ) -> tuple[Callable[[], None], Callable[[], None]]:
    """The same for PyTorch eager: the step a PyTorch user writes."""
    import torch
    import torch.nn.functional as F

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
    import torch

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


# --- each side of a case, in its worker ----------------------------------------------


Made = tuple[dict[str, Callable[[], None]], dict[str, list[list[float]]], list[str]]


def network_file(stem: str) -> Path:
    """A case's network: networks/STEM.cnn, else examples/STEM.cnn."""
    path = NETWORKS / f"{stem}.cnn"
    return path if path.exists() else EXAMPLES / f"{stem}.cnn"


def convdsl_side(case: Case) -> Made:
    """convdsl's runs of a case, named `convdsl:ALGO:MODE`, and each network's inference
    outputs on the batch (compared with PyTorch's by the coordinator)."""
    path = network_file(case.network)
    runs: dict[str, Callable[[], None]] = {}
    outputs: dict[str, list[list[float]]] = {}
    for algo in case.algos:
        net = convdsl.compile(path, batch=case.batch, algo=algo)
        x, y = random_batch(net.network, case.batch)
        outputs[algo] = net.forward(x, train=False).tolist()
        runs[f"convdsl:{algo}:train"], runs[f"convdsl:{algo}:infer"] = convdsl_steps(net, x, y)
    return runs, outputs, []


def torch_side(case: Case) -> Made:
    """PyTorch's runs of a case (`eager:MODE`, and `compiled:infer` where torch.compile
    works), with convdsl's initial weights (seed 0), and eager's inference outputs."""
    import torch

    model, x, y = torch_model(network_file(case.network), case.batch)
    model.eval()
    with torch.inference_mode():
        outputs = {"eager": model(torch.from_numpy(x)).numpy().tolist()}
    runs: dict[str, Callable[[], None]] = {}
    runs["eager:train"], runs["eager:infer"] = torch_steps(model, x, y)
    notes: list[str] = []
    if case.torch_compile:
        compiled, note = compiled_inference(model, x)
        notes.append(note)
        if compiled is not None:
            runs["compiled:infer"] = compiled
    return runs, outputs, notes


# --- timing, from the coordinator ---------------------------------------------------------


def interleaved(variants: dict[str, Callable[[], float]], reps: int, warmup: int = 2
                ) -> dict[str, float]:
    """Median milliseconds of each variant, run in turn A B C A B C ... after warm-up;
    each call runs its variant once and returns the seconds it took."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            times[name].append(run())
    return {name: 1e3 * median(values) for name, values in times.items()}


def difference(ours: list[list[float]], theirs: list[list[float]]) -> str | None:
    """None when both computed the same inference outputs (float32 tolerance), else a
    note: the benchmark compares the same network or nothing."""
    expected, got = np.asarray(ours), np.asarray(theirs)
    scale = max(float(np.abs(expected).max()), 1e-6)
    error = float(np.abs(got - expected).max()) / scale
    return None if error < 1e-3 else f"OUTPUTS DIFFER from PyTorch's (relative {error:.1e})"


def run_case(case: Case, warmup: int, log: Callable[[str], None],
             sides: dict[str, Worker]) -> list[Row]:
    """Time a case's convdsl variants against PyTorch, train and inference, each side in
    its worker."""
    setup = {**asdict(case), "algos": list(case.algos)}
    ours, theirs = sides["convdsl"].ask(setup=setup), sides["torch"].ask(setup=setup)
    notes = [note for algo in case.algos
             if (note := difference(ours["outputs"][algo], theirs["outputs"]["eager"]))]
    rows: list[Row] = []
    for mode in ("train", "infer"):
        variants: dict[str, Callable[[], float]] = {}
        for side, reply in (("convdsl", ours), ("torch", theirs)):
            for name in reply["variants"]:
                if name.endswith(f":{mode}"):
                    variants[name.rsplit(":", 1)[0]] = _runner(sides[side], name)
        mode_notes = notes + (theirs["notes"] if mode == "infer" else [])
        log(f"  {case.title} batch {case.batch} {mode}: {case.reps} x {len(variants)} runs")
        medians = interleaved(variants, case.reps, warmup)
        for algo in case.algos:
            rows.append(Row(case.title, case.network, case.batch, mode, algo,
                            medians[f"convdsl:{algo}"], medians["eager"],
                            medians.get("compiled"), mode_notes))
    return rows


def _runner(worker: Worker, name: str) -> Callable[[], float]:
    def run() -> float:
        seconds: float = worker.ask(run=name)["seconds"]
        return seconds
    return run


__all__ = ["Case", "Row", "cases", "convdsl_side", "convdsl_steps", "random_batch",
           "run_case", "torch_model", "torch_side", "torch_steps"]
