"""convdsl on an NVIDIA GPU against PyTorch with cuDNN on the same GPU, in one process.

    python bench/gpu.py                         # the GPU benchmark (a few minutes, mostly
                                                 # Numba compiling convdsl's kernels cold)
    python bench/gpu.py --quick --markdown gpu.md
    python bench/gpu.py --only lenet5 --reps 20
    NUMBA_ENABLE_CUDASIM=1 python bench/gpu.py --dry-run   # no GPU: exercise the code

Cases (float32): LeNet-5 (networks/lenet5.cnn) at batch 64 and 256, ResNet-18-CIFAR
(networks/resnet18_cifar.cnn) at batch 128; each a training step (forward, cross-entropy,
backward, SGD with momentum) and an inference. The PyTorch model is bench/torch_net.py's
translation of the same network, loaded with the same weights and moved to the GPU; a
check first runs both on one batch (see `agreement`). The two sides then run in turn
(convdsl, torch, convdsl, ...) after warm-up; every timed run is bracketed by
synchronising both CUDA runtimes (PyTorch's and Numba's), so a time is the whole work of
a step. The table gives medians and the ratio convdsl / torch (below 1: convdsl faster).
Then `convdsl time --kernels`'s profile of ResNet-18-CIFAR: per stage (synchronised
around each) and per kernel (synchronised around each launch).

--dry-run runs the same code on a machine without a GPU: convdsl in Numba's CUDA
simulator, PyTorch on the CPU (or the GPU if there is one), LeNet-5 at batch 2, one
repetition. Its numbers mean nothing; it shows the script works before GPU time is spent.
See bench/README.md, "The GPU benchmark".
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NETWORKS = ROOT / "networks"
PROFILE_NETWORK = "resnet18_cifar"  # whose per-stage profile is printed (lenet5 in a dry run)
PROFILE_ITERATIONS = 10
CASE_BUDGET_S = 60.0  # timed runs of one case and mode shrink to fit about this
MIN_REPS = 3
AGREEMENT = 1e-3  # largest relative difference of outputs (and loss) the check accepts


@dataclass(frozen=True)
class GpuCase:
    title: str
    network: str  # file stem in networks/
    batch: int
    reps: int  # timed repetitions of each side (warm-up comes on top)


@dataclass
class GpuRow:
    """One line of the table: a case in one mode (train or infer)."""

    title: str
    batch: int
    mode: str
    convdsl_ms: float
    torch_ms: float
    reps: int

    @property
    def ratio(self) -> float:
        return self.convdsl_ms / self.torch_ms


@dataclass
class Report:
    """What the run found so far; written out after every case, so that a run stopped
    by a time limit still leaves the finished cases behind."""

    header: list[str]
    rows: list[GpuRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def text(self, elapsed_s: float) -> str:
        lines = [*self.header, f"Elapsed: {elapsed_s:.0f} s.", "", *table(self.rows)]
        lines += targets(self.rows)
        if self.notes:
            lines += ["", "Notes:", *(f"- {note}" for note in self.notes)]
        if self.failed:
            lines += ["", "FAILED:", *(f"- {failure}" for failure in self.failed)]
        if self.profile:
            lines += ["", "convdsl per-stage and per-kernel profile "
                      "(`convdsl time --device cuda --kernels`):", "",
                      "```", *self.profile, "```"]
        return "\n".join(lines) + "\n"


def cases(quick: bool, dry_run: bool) -> list[GpuCase]:
    """The issue's cases; --quick times each a few times; a dry run is LeNet-5 at batch 2
    (the simulator runs a few thousand GPU threads per second)."""
    if dry_run:
        return [GpuCase("LeNet-5", "lenet5", 2, 1), GpuCase("ResNet-18-CIFAR",
                                                             "resnet18_cifar", 2, 1)]
    full = [GpuCase("LeNet-5", "lenet5", 64, 50), GpuCase("LeNet-5", "lenet5", 256, 30),
            GpuCase("ResNet-18-CIFAR", "resnet18_cifar", 128, 10)]
    if not quick:
        return full
    return [GpuCase(c.title, c.network, c.batch, 5 if c.reps > 10 else 3) for c in full]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_bench_module(name: str) -> ModuleType:
    """bench/<name>.py, imported by file, whatever the current directory."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --- the two sides ---------------------------------------------------------------------


class Bench:
    """The modules and devices of one run: imported after the simulator switch is set."""

    def __init__(self, torch_device: str, tf32: bool) -> None:
        import torch
        from numba import cuda

        import convdsl

        self.torch = torch
        self.numba_cuda = cuda
        self.convdsl = convdsl
        self.torch_net = load_bench_module("torch_net")
        self.suite = load_bench_module("suite")  # imports torch_net by name
        self.device = torch_device
        if torch_device == "cuda":
            # The fastest cuDNN algorithms for these shapes (found during warm-up), as a
            # PyTorch user training a CNN sets; TF32 only when asked, since convdsl
            # computes in true float32.
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def synchronize(self) -> None:
        """Wait for both runtimes' queued work."""
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        self.numba_cuda.synchronize()

    def compile(self, case: GpuCase) -> Any:
        return self.convdsl.compile(NETWORKS / f"{case.network}.cnn", batch=case.batch,
                                    device="cuda")

    def torch_model(self, net: Any) -> Any:
        """PyTorch's model of the network, with the convdsl network's weights, on the GPU."""
        model = self.torch_net.TorchModel(net.network)
        model.load_arrays(net.state_dict())  # host copies of the device arrays
        return model.to(self.device)

    def torch_steps(self, model: Any, x: Any, y: Any
                    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """PyTorch's training step and inference, from the same host batch as convdsl's:
        the batch goes to the GPU in each step (as convdsl's forward sends it), and the
        inference's scores come back (as convdsl's forward returns them)."""
        torch, device = self.torch, self.device
        functional = torch.nn.functional
        inputs, labels = torch.from_numpy(x), torch.from_numpy(y).long()
        suite = self.suite
        optimizer = torch.optim.SGD(model.parameters(), lr=suite.LR, momentum=suite.MOMENTUM)

        def train() -> None:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            scores = model(inputs.to(device))
            functional.cross_entropy(scores, labels.to(device)).backward()
            optimizer.step()

        def infer() -> None:
            model.eval()
            with torch.inference_mode():
                model(inputs.to(device)).cpu()

        return train, infer

    def agreement(self, net: Any, model: Any, x: Any, y: Any) -> list[str]:
        """Notes where the two sides disagree on one batch: the inference scores, then the
        loss of a training forward (batch statistics in batch norm). An empty list: they
        compute the same network."""
        import numpy as np

        torch = self.torch
        inputs = torch.from_numpy(x).to(self.device)
        labels = torch.from_numpy(y).long().to(self.device)
        expected = net.forward(x, train=False)
        model.eval()
        with torch.inference_mode():
            got = model(inputs).cpu().numpy()
        scale = max(float(np.abs(expected).max()), 1e-6)
        notes = []
        error = float(np.abs(got - expected).max()) / scale
        if not error < AGREEMENT:
            notes.append(f"inference OUTPUTS DIFFER from PyTorch's (relative {error:.1e})")
        net.forward(x, train=True)
        ours = net.loss(y)
        model.train()
        with torch.no_grad():
            theirs = float(torch.nn.functional.cross_entropy(model(inputs), labels))
        loss_error = abs(ours - theirs) / max(abs(theirs), 1e-6)
        if not loss_error < AGREEMENT:
            notes.append(f"training LOSS DIFFERS: convdsl {ours:.6f}, PyTorch {theirs:.6f}")
        return notes


# --- timing ------------------------------------------------------------------------------


def interleaved(variants: dict[str, Callable[[], None]], reps: int, warmup: int,
                synchronize: Callable[[], None], budget_s: float) -> tuple[dict[str, float], int]:
    """Median milliseconds of each variant, run in turn A B A B ... after `warmup` untimed
    rounds, each run bracketed by `synchronize`; and the repetitions done. Repetitions
    shrink (to no fewer than MIN_REPS) so that the timed rounds take about `budget_s`,
    judged by the last warm-up round."""
    round_s = 0.0
    for _ in range(warmup):
        synchronize()
        start = time.perf_counter()
        for run in variants.values():
            run()
            synchronize()
        round_s = time.perf_counter() - start
    if round_s > 0:
        reps = min(reps, max(MIN_REPS, int(budget_s / round_s)))
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * median(values) for name, values in times.items()}, reps


def run_case(bench: Bench, case: GpuCase, warmup: int, budget_s: float,
             report: Report) -> Any:
    """Time one case, train and inference; returns the compiled convdsl network."""
    start = time.perf_counter()
    net = bench.compile(case)
    compile_s = time.perf_counter() - start
    model = bench.torch_model(net)
    x, y = bench.suite.random_batch(net.network, case.batch)
    report.notes.append(f"{case.title}, batch {case.batch}: convdsl.compile (kernels "
                        f"generated, compiled or loaded, run once) took {compile_s:.1f} s")
    for note in bench.agreement(net, model, x, y):
        report.notes.append(f"{case.title}, batch {case.batch}: {note}")
    convdsl_train, convdsl_infer = bench.suite.convdsl_steps(net, x, y)
    torch_train, torch_infer = bench.torch_steps(model, x, y)
    for mode, ours, theirs in (("train", convdsl_train, torch_train),
                               ("infer", convdsl_infer, torch_infer)):
        log(f"  {case.title} batch {case.batch} {mode}: up to {case.reps} x 2 runs")
        medians, reps = interleaved({"convdsl": ours, "torch": theirs}, case.reps, warmup,
                                    bench.synchronize, budget_s)
        row = GpuRow(case.title, case.batch, mode, medians["convdsl"], medians["torch"], reps)
        log(f"    convdsl {row.convdsl_ms:.3f} ms, torch {row.torch_ms:.3f} ms, "
            f"ratio {row.ratio:.2f}")
        report.rows.append(row)
    del model
    return net


def profile(net: Any, iterations: int) -> list[str]:
    """convdsl's times per stage and per kernel (each synchronised on its own), as
    `convdsl time --kernels`."""
    from convdsl.report.timing import time_network, timing_table

    return timing_table(time_network(net, iterations=iterations, kernels=True)).splitlines()


# --- the report ----------------------------------------------------------------------------


def machine(bench: Bench, dry_run: bool) -> list[str]:
    """The GPU, its driver, and the versions that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import numba
    import numpy

    torch = bench.torch
    lines = []
    if bench.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
                     f"SMs; driver {nvidia_driver()}")
        lines.append(f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
                     f"{torch.backends.cudnn.version()}), cudnn.benchmark="
                     f"{torch.backends.cudnn.benchmark}, TF32 "
                     f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}")
    else:
        lines.append(f"no GPU: PyTorch {torch.__version__} on the CPU")
    try:
        numba_cuda = version("numba-cuda")
    except PackageNotFoundError:
        numba_cuda = "not installed"
    simulated = bool(getattr(numba.config, "ENABLE_CUDASIM", 0))  # untyped in numba.config
    simulator = " (CUDA SIMULATOR)" if simulated else ""
    lines.append(f"Numba {numba.__version__}, numba-cuda {numba_cuda}{simulator}, NumPy "
                 f"{numpy.__version__}, Python {platform.python_version()}; {cpu_name()}, "
                 f"{os.cpu_count()} logical cores; convdsl {git_commit()}")
    lines.append("convdsl CUDA settings: packed launches "
                 f"{_switch('CONVDSL_CUDA_PACKED_LAUNCH')}, k tables "
                 f"{_switch('CONVDSL_CUDA_K_TABLES')}, prefetch "
                 f"{_switch('CONVDSL_CUDA_PREFETCH')}, graphs "
                 f"{_switch('CONVDSL_CUDA_GRAPHS')}, largest tile "
                 f"{os.environ.get('CONVDSL_CUDA_MAX_TILE', '64')}")
    if dry_run:
        lines.append("DRY RUN: tiny batches, one repetition; the numbers mean nothing.")
    return lines


def _switch(variable: str) -> str:
    """'on' or 'off' for one of convdsl's CUDA switches (on unless set to 0)."""
    return "off" if os.environ.get(variable, "1") == "0" else "on"


def launch_note() -> str:
    """How many launch sites packed their arguments (codegen/cuda/common.Launch), and
    how many passes ran as CUDA graphs (codegen/cuda/graphs.py)."""
    from convdsl.codegen.cuda import common, graphs

    counts, passes = common.LAUNCH_COUNTS, graphs.GRAPH_COUNTS
    note = (f"launch arguments packed {counts['packed']} times; "
            f"{counts['unpacked']} launches could not be packed; CUDA graphs built "
            f"{passes['built']}, passes launched as a graph {passes['replayed']}, "
            f"launch by launch {passes['plain']}")
    if graphs.FAILURE:
        note += f"; graphs switched off after: {graphs.FAILURE[0][:300]}"
    return note


def nvidia_driver() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else "unknown"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return done.stdout.strip() or "?"


def table(rows: Sequence[GpuRow]) -> list[str]:
    lines = ["| case | batch | mode | convdsl ms | PyTorch (cuDNN) ms | convdsl / torch | reps |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.title} | {row.batch} | {row.mode} | {row.convdsl_ms:.3f} | "
                     f"{row.torch_ms:.3f} | {row.ratio:.2f} | {row.reps} |")
    return lines


def targets(rows: Sequence[GpuRow]) -> list[str]:
    """Issue 6's targets, judged on the training steps: ResNet-18-CIFAR at batch 128
    within 3x of cuDNN; LeNet-5 faster than PyTorch."""
    lines = []
    resnet = [r for r in rows if r.title.startswith("ResNet-18") and r.mode == "train"
              and r.batch == 128]
    lenet = [r for r in rows if r.title == "LeNet-5" and r.mode == "train"]
    if resnet:
        met = "met" if resnet[0].ratio <= 3 else "NOT met"
        lines.append(f"- ResNet-18-CIFAR training step, batch 128, within 3x of cuDNN: "
                     f"{resnet[0].ratio:.2f}x, {met}")
    if lenet:
        ratios = ", ".join(f"batch {r.batch}: {r.ratio:.2f}x" for r in lenet)
        met = "met" if all(r.ratio < 1 for r in lenet) else "NOT met"
        lines.append(f"- LeNet-5 training step faster than PyTorch: {ratios}, {met}")
    return ["", "Targets (issue 6):", *lines] if lines else []


# --- main ------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this network's cases (lenet5, resnet18_cifar); "
                             "repeatable; 'profile' runs the per-stage profile, which is "
                             "otherwise skipped when --only is given")
    parser.add_argument("--reps", type=int, help="timed repetitions of every case "
                        "(default: 50 and 30 for LeNet-5, 10 for ResNet-18)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    parser.add_argument("--budget", type=float, default=CASE_BUDGET_S, metavar="SECONDS",
                        help="fewer repetitions (at least 3) where a case's timed runs in "
                             f"one mode would take longer (default {CASE_BUDGET_S:.0f} s)")
    parser.add_argument("--profile-iterations", type=int, default=PROFILE_ITERATIONS)
    parser.add_argument("--quick", action="store_true",
                        help="3-5 repetitions per case: a smoke test on a GPU")
    parser.add_argument("--tf32", action="store_true",
                        help="let PyTorch use TF32 tensor cores (default: true float32)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: convdsl in Numba's CUDA simulator, tiny batch")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help="also write the report to this file (after every case)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.dry_run:  # before numba is imported, which reads it once
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        log("bench/gpu.py: PyTorch sees no GPU, so there is nothing to compare; "
            "--dry-run checks the script without one (convdsl in Numba's CUDA simulator)")
        return 2
    bench = Bench("cuda" if torch.cuda.is_available() else "cpu", args.tf32)
    started = time.perf_counter()
    report = Report([f"convdsl (numba.cuda) against PyTorch (cuDNN) on one GPU, float32, "
                     f"medians of interleaved runs, each synchronised"
                     f"{' (--quick)' if args.quick else ''}.", "", *machine(bench, args.dry_run)])

    def write() -> None:
        text = report.text(time.perf_counter() - started)
        if args.markdown:
            args.markdown.write_text(text, encoding="utf-8")

    wanted = set(args.only or [])
    profile_network = "lenet5" if args.dry_run else PROFILE_NETWORK
    profiled: Any = None
    chosen = cases(args.quick, args.dry_run)
    if wanted:
        chosen = [case for case in chosen if case.network in wanted]
    elif args.dry_run:  # ResNet-18 takes hours in the simulator, even at batch 2
        chosen = [case for case in chosen if case.network == "lenet5"]
    for case in chosen:
        if args.reps is not None:
            case = GpuCase(case.title, case.network, case.batch, args.reps)
        log(f"{case.title}, batch {case.batch}")
        try:
            net = run_case(bench, case, 0 if args.dry_run else args.warmup, args.budget,
                           report)
        except Exception as exc:  # one failed case must not cost the others
            traceback.print_exc()
            report.failed.append(f"{case.title}, batch {case.batch}: "
                                 f"{type(exc).__name__}: {str(exc)[:300]}")
            net = None
        if net is not None and case.network == profile_network:
            profiled = net  # the last (largest) batch of that network
        gc.collect()
        if bench.device == "cuda":
            torch.cuda.empty_cache()
        write()
    if not wanted or "profile" in wanted:
        iterations = 1 if args.dry_run else args.profile_iterations
        log(f"per-stage profile of {profile_network}")
        try:
            if profiled is None:  # its cases were not run: compile it for the profile
                batch = max(c.batch for c in cases(args.quick, args.dry_run)
                            if c.network == profile_network)
                profiled = bench.compile(GpuCase("", profile_network, batch, 1))
            report.profile = profile(profiled, iterations)
        except Exception as exc:
            traceback.print_exc()
            report.failed.append(f"profile: {type(exc).__name__}: {str(exc)[:300]}")
    report.notes.append(launch_note())
    text = report.text(time.perf_counter() - started)
    print(text)
    write()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
