"""convdsl against PyTorch on this machine, side by side, interleaved.

    python bench/run.py                      # the full benchmark (about 3 minutes, 2 cores)
    python bench/run.py --quick              # every case briefly: a smoke test
    python bench/run.py --only resnet18_cifar --threads 2 --markdown results.md

Both sides get the same thread count (NUMBA_NUM_THREADS and the BLAS libraries' variables
are set here before NumPy, Numba or PyTorch is imported; torch.set_num_threads after),
the same batch of random data and the same weights. Each side runs in a worker process
of its own (`--serve convdsl|torch`, bench/sides.py), asked in turn for one timed run
after another. See bench/README.md for what each
column means. Compile time and peak memory are measured in child processes of this
script (`--child ...`), so that each starts from nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from suite import Row

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")
COMPILE_NETWORK = {False: "resnet18_cifar", True: "lenet5"}  # by --quick
MEMORY_CASE = {False: ("resnet18_cifar", 32, 5), True: ("lenet5", 64, 3)}  # net, batch, steps
CHILD_TIMEOUT_S = 1200


def set_threads(threads: int) -> None:
    """Fix every thread pool's size; must run before NumPy, Numba or torch is imported."""
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- child processes: compile time and peak memory ------------------------------------


def child(argv: list[str]) -> dict[str, Any]:
    """Run in a child process: `compile NET BATCH` or `memory SIDE NET BATCH STEPS`."""
    kind = argv[0]
    start = time.perf_counter()
    import convdsl  # timed: part of what a user waits for
    if kind == "compile":
        imported = time.perf_counter()
        convdsl.compile(ROOT / "networks" / f"{argv[1]}.cnn", batch=int(argv[2]))
        return {"import_s": imported - start, "compile_s": time.perf_counter() - imported}
    side, network, batch, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
    import suite
    import torch  # noqa: F401  (both sides pay for both imports before the baseline)
    baseline_mb = _current_rss_mb()
    path = ROOT / "networks" / f"{network}.cnn"
    if side == "convdsl":
        net = convdsl.compile(path, batch=batch)
        x, y = suite.random_batch(net.network, batch)
        train, _ = suite.convdsl_steps(net, x, y)
    else:  # PyTorch alone: no convdsl kernels compiled or loaded
        model, x, y = suite.torch_model(path, batch)
        train, _ = suite.torch_steps(model, x, y)
    for _ in range(steps):
        train()
    return {"peak_mb": _peak_rss_mb(), "baseline_mb": baseline_mb}


def _peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that
    over from the parent through fork and exec, so every child would report at least
    this (large) benchmark process's peak. VmHWM starts afresh with the new program."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mb() -> float:
    """Resident memory now (Linux /proc), to separate the imports from the run."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(args: list[str], threads: int, env: dict[str, str] | None = None
              ) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
               "--child", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compile_table(network: str, threads: int, batch: int = 32) -> list[str]:
    """Cold (fresh, empty kernel cache) and warm (the cache the cold run filled) compile,
    each in a new process: `convdsl.compile(path, batch)`, which builds every kernel."""
    log(f"compile time of {network} (cold, then warm)")
    with tempfile.TemporaryDirectory(prefix="convdsl-bench-cache-") as cache:
        env = {"CONVDSL_CACHE": cache}
        cold = run_child(["compile", network, str(batch)], threads, env)
        warm = run_child(["compile", network, str(batch)], threads, env)
    return ["", "| compile, new process | network | batch | seconds | import convdsl s |",
            "|---|---|---:|---:|---:|",
            f"| cold (empty kernel cache) | {network} | {batch} | {cold['compile_s']:.1f} | "
            f"{cold['import_s']:.2f} |",
            f"| warm (cache hit) | {network} | {batch} | {warm['compile_s']:.2f} | "
            f"{warm['import_s']:.2f} |"]


def memory_table(network: str, batch: int, steps: int, threads: int) -> list[str]:
    """Peak resident memory of a few training steps, each side in its own process."""
    log(f"peak memory of {steps} training steps of {network}, batch {batch}")
    peaks = {side: run_child(["memory", side, network, str(batch), str(steps)], threads)
             for side in ("convdsl", "torch")}
    lines = ["", f"| peak RSS, {steps} training steps of {network}, batch {batch} | "
             "peak MB | after imports MB | peak - imports MB |", "|---|---:|---:|---:|"]
    for side, result in peaks.items():
        lines.append(f"| {side} | {result['peak_mb']:.0f} | {result['baseline_mb']:.0f} | "
                     f"{result['peak_mb'] - result['baseline_mb']:.0f} |")
    ours, theirs = (peaks[side]["peak_mb"] - peaks[side]["baseline_mb"]
                    for side in ("convdsl", "torch"))
    total = ratio(peaks["convdsl"]["peak_mb"], peaks["torch"]["peak_mb"])
    lines.append(f"| convdsl / torch | {total} | | {ratio(ours, theirs)} |")
    return lines


# --- the report -----------------------------------------------------------------------


def machine() -> list[str]:
    """CPU model, cores, and the versions that decide the numbers."""
    import numba
    import numpy
    import torch

    from convdsl import threads  # main imported convdsl before torch, as its worker does
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return [f"CPU: {cpu}, {os.cpu_count()} logical cores; {platform.platform()}",
            f"Python {platform.python_version()}, NumPy {numpy.__version__}, "
            f"Numba {numba.__version__}, PyTorch {torch.__version__}; convdsl {commit or '?'}",
            f"convdsl's kernels: {threads.describe()}; each side in its own process"]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}"


def table(rows: Sequence[Row]) -> list[str]:
    lines = ["| case | batch | mode | convdsl algo | convdsl ms | torch eager ms | "
             "torch.compile ms | convdsl / eager | convdsl / best torch |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        compiled = "-" if row.compiled_ms is None else f"{row.compiled_ms:.2f}"
        lines.append(f"| {row.title} | {row.batch} | {row.mode} | {row.algo} | "
                     f"{row.convdsl_ms:.2f} | {row.eager_ms:.2f} | {compiled} | "
                     f"{ratio(row.convdsl_ms, row.eager_ms)} | "
                     f"{ratio(row.convdsl_ms, row.best_torch_ms)} |")
    return lines


def notes(rows: Sequence[Row]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        for note in row.notes:
            line = f"- {row.title}, batch {row.batch}: {note}"
            if line not in seen:
                seen.append(line)
    return seen


# --- main -----------------------------------------------------------------------------


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="every case with 2-3 repetitions, no torch.compile, compile time "
                             "and memory on LeNet-5: a smoke test of a few minutes")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only the cases of this network (file stem, e.g. lenet5); "
                             "repeatable; skips compile and memory unless named "
                             "'compile' or 'memory'")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="threads for both sides (default: every core)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each variant")
    parser.add_argument("--markdown", type=Path, metavar="PATH",
                        help="also write the table and the machine to this file")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=("convdsl", "torch"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    if args.serve:
        from sides import serve
        serve(args.serve, args.threads)
        return 0
    import suite
    from sides import Worker
    started = time.perf_counter()
    wanted = set(args.only or [])
    rows: list[Row] = []
    chosen = [case for case in suite.cases(args.quick) if not wanted or case.network in wanted]
    if chosen:
        sides = {side: Worker(side, args.threads) for side in ("convdsl", "torch")}
        try:
            for case in chosen:
                log(f"{case.title}, batch {case.batch}")
                rows.extend(suite.run_case(case, args.warmup if not args.quick else 1, log,
                                           sides))
        finally:
            for worker in sides.values():
                worker.close()
    extra: list[str] = []
    if not wanted or "compile" in wanted:
        extra += compile_table(COMPILE_NETWORK[args.quick], args.threads)
    if not wanted or "memory" in wanted:
        extra += memory_table(*MEMORY_CASE[args.quick], args.threads)
    report = [f"Medians of interleaved runs, {args.threads} threads on each side"
              f"{' (--quick)' if args.quick else ''}; {time.perf_counter() - started:.0f} s "
              "in all.", "", *machine(), "", *table(rows)]
    report += extra
    if rows and notes(rows):
        report += ["", "Notes:", *notes(rows)]
    text = "\n".join(report) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
