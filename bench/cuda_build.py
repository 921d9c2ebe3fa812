"""The CUDA kernels of networks, built for a GPU that is not there.

    python bench/cuda_build.py [--network FILE:BATCH ...] [--arch sm_90] [--json PATH]

The CUDA simulator runs the kernels' Python source, so it proves what they compute but
not that NVIDIA's compiler accepts them, nor what machine code they become. This script
builds them as numba.cuda would on a GPU, with no GPU and no driver, from NVIDIA's
compiler libraries on PyPI (bench/README.md):

1. In a child process under the simulator, it runs one training step (as `convdsl
   train` does) and one inference of each network with every launch recorded, not
   run: the kernel, its argument types, its threads per block (bench/launches.py).
2. Here, without the simulator, it compiles each kernel for those types: Numba to
   NVVM IR, NVVM to PTX, nvJitLink to the architecture's machine code (SASS), whose
   report gives registers, spills and shared memory; nvdisasm lists the SASS.

For each kernel it prints its registers, spilled bytes, static shared memory, the warps
an SM then holds (of 64 on sm_80/sm_90), and its hottest loop (the innermost loop with
the most FFMA): its instructions and the share that are FFMA, the multiply-adds that
are the work, and the other instructions of the loop around it (in a tiled product,
loading the next slice of K into shared memory). It exits 1 if any kernel fails to
build.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT = ["networks/lenet5.cnn:64", "networks/resnet18_cifar.cnn:128"]

# An argument's type as recorded: ["array", dtype, ndim, layout] or ["scalar", dtype].
ArgKind = list[Any]


@dataclass(frozen=True)
class Recorded:
    """A kernel as one launch site used it."""

    name: str  # conv.forward, fill...
    path: str  # the file of its module
    module: str
    function: str
    args: tuple[tuple[Any, ...], ...]  # ArgKind per argument
    threads: int  # per block

    @property
    def build_key(self) -> tuple[str, str, tuple[tuple[Any, ...], ...]]:
        return self.path, self.function, self.args


@dataclass(frozen=True)
class Loop:
    """A loop of the SASS, from its label to its backward branch."""

    start: int  # the index of its first instruction in the listing
    instructions: int
    ffma: int
    lds: int  # shared-memory loads (LDS, any width)

    def within(self, other: Loop) -> bool:
        return (other.start <= self.start and self.start + self.instructions
                <= other.start + other.instructions and other != self)

    @property
    def ffma_share(self) -> float:
        return self.ffma / self.instructions


@dataclass(frozen=True)
class Built:
    registers: int
    spill_stores: int  # bytes
    spill_loads: int
    shared: int  # static shared memory, bytes
    seconds: float  # Numba and NVVM to PTX, and nvJitLink to SASS
    hottest: Loop | None
    # the instructions of the loop around the hottest one, less the hottest loop's own
    # (in a tiled product: loading a slice of K into shared memory)
    around: int | None


# --- 1. Recording the launches, in the simulator ----------------------------------------


def record(networks: list[str]) -> dict[str, list[Recorded]]:
    """Each network's kernels, in launch order, each (kernel, types, threads) once."""
    import launches  # bench/launches.py, on sys.path as this script's folder

    from convdsl.codegen.cuda import common

    seen: list[Recorded] = []

    def recorded(site: Any, *args: Any) -> None:
        seen.append(_recorded(site, site._shaped(args)))

    setattr(common.Launch, "__call__", recorded)  # noqa: B010 (a method, replaced)
    kernels = {}
    for entry in networks:
        path, _, batch = entry.rpartition(":")
        seen.clear()
        stepper = launches.Stepper(path, int(batch))
        stepper.train_step()
        stepper.inference()
        kernels[entry] = list(dict.fromkeys(seen))
    return kernels


def _recorded(site: Any, args: tuple[Any, ...]) -> Recorded:
    function = site.kernel.py_func
    threads = site.threads if isinstance(site.threads, int) else math.prod(site.threads)
    return Recorded(site.name, function.__code__.co_filename, function.__module__,
                    function.__name__, tuple(tuple(_kind(arg)) for arg in args), threads)


def _kind(arg: Any) -> ArgKind:
    """The argument's type, as numba.cuda would see it on a GPU."""
    import numpy as np

    if isinstance(arg, bool):
        return ["scalar", "bool"]
    if isinstance(arg, (int, float, np.generic)):
        return ["scalar", np.asarray(arg).dtype.str]
    array = getattr(arg, "_ary", arg)  # the simulator's device array holds a NumPy one
    layout = "C" if array.flags.c_contiguous else "F" if array.flags.f_contiguous else "A"
    return ["array", array.dtype.str, array.ndim, layout]


def record_in_simulator(networks: list[str]) -> dict[str, list[Recorded]]:
    """`record`, run in a child process with NUMBA_ENABLE_CUDASIM=1."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "kernels.json"
        env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
        command = [sys.executable, __file__, "--record", str(out)]
        for entry in networks:
            command += ["--network", entry]
        subprocess.run(command, env=env, check=True)
        data = json.loads(out.read_text())
    return {entry: [Recorded(**{**k, "args": tuple(tuple(a) for a in k["args"])})
                    for k in kernels] for entry, kernels in data.items()}


# --- 2. Building the machine code, without the simulator ---------------------------------


class Builder:
    """Compiles recorded kernels for one architecture, each (kernel, types) once."""

    def __init__(self, arch: str) -> None:
        from numba import cuda

        self.arch = arch
        self.cc = (int(arch[3:-1]), int(arch[-1]))  # sm_90 -> (9, 0)
        self._cuda = cuda
        self._modules: dict[str, ModuleType] = {}
        self._built: dict[tuple[Any, ...], Built] = {}

    def build(self, kernel: Recorded) -> Built:
        if kernel.build_key not in self._built:
            self._built[kernel.build_key] = self._build(kernel)
        return self._built[kernel.build_key]

    def _build(self, kernel: Recorded) -> Built:
        function = getattr(self._module(kernel), kernel.function).py_func
        start = time.perf_counter()
        ptx, _ = self._cuda.compile_ptx(function, _signature(kernel.args), cc=self.cc)
        cubin, log = _link(ptx, self.arch)
        seconds = time.perf_counter() - start
        usage = re.search(r"used (\d+) registers.*?(\d+) bytes smem", log)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if usage is None or spills is None:
            raise RuntimeError(f"nvJitLink's report did not say the resources:\n{log}")
        found = loops(disassemble(cubin))
        hottest = hottest_loop(found)
        around = None if hottest is None else enclosing(found, hottest)
        others = (None if hottest is None or around is None
                  else around.instructions - hottest.instructions)
        return Built(int(usage[1]), int(spills[1]), int(spills[2]), int(usage[2]), seconds,
                     hottest, others)

    def _module(self, kernel: Recorded) -> ModuleType:
        """The kernel's module, imported from its file (the generated kernels live in
        convdsl's cache; importing them by path needs no GPU)."""
        if kernel.module not in self._modules:
            spec = importlib.util.spec_from_file_location(kernel.module, kernel.path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[kernel.module] = module
            spec.loader.exec_module(module)
            self._modules[kernel.module] = module
        return self._modules[kernel.module]


def _signature(args: tuple[tuple[Any, ...], ...]) -> tuple[Any, ...]:
    import numba
    import numpy as np
    from numba import types

    def one(kind: tuple[Any, ...]) -> Any:
        if kind[0] == "scalar":
            return types.boolean if kind[1] == "bool" else numba.from_dtype(np.dtype(kind[1]))
        _, dtype, ndim, layout = kind
        return types.Array(numba.from_dtype(np.dtype(dtype)), ndim, layout)

    return tuple(one(kind) for kind in args)


def _link(ptx: str, arch: str) -> tuple[bytes, str]:
    """PTX to the architecture's machine code with nvJitLink: the cubin, and the report."""
    from cuda.bindings import nvjitlink

    options = [f"-arch={arch}", "-verbose"]
    handle = nvjitlink.create(len(options), options)
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        try:
            nvjitlink.complete(handle)
        except Exception as exc:
            raise RuntimeError(f"nvJitLink failed: {exc}\n{_log(handle)}") from None
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin), _log(handle)
    finally:
        nvjitlink.destroy(handle)


def _log(handle: int) -> str:
    from cuda.bindings import nvjitlink

    log = bytearray(nvjitlink.get_info_log_size(handle))
    nvjitlink.get_info_log(handle, log)
    return log.decode(errors="replace")


def disassemble(cubin: bytes) -> str:
    from cuda.pathfinder import find_nvidia_binary_utility

    nvdisasm = find_nvidia_binary_utility("nvdisasm")
    if nvdisasm is None:
        raise RuntimeError("nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([nvdisasm, "-c", file.name], capture_output=True, text=True,
                              check=True).stdout


_LABEL = re.compile(r"^\s*(\.L_\w+):")
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


def loops(sass: str) -> list[Loop]:
    """Every loop of the listing: a branch back to a label, and what lies between."""
    opcodes: list[str] = []
    labels: dict[str, int] = {}
    found = []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label[1]] = len(opcodes)
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction is None:
            continue
        opcode = instruction[1].split(".")[0]
        opcodes.append(opcode)
        target = _TARGET.search(instruction[2])
        if opcode == "BRA" and target and labels.get(target[1], len(opcodes)) < len(opcodes):
            start = labels[target[1]]
            body = opcodes[start:]
            found.append(Loop(start, len(body), body.count("FFMA"), body.count("LDS")))
    return found


def hottest_loop(found: list[Loop]) -> Loop | None:
    """The loop with the most FFMA, the smallest of those (the innermost); None where no
    loop multiplies."""
    multiplying = [loop for loop in found if loop.ffma]
    return min(multiplying, key=lambda loop: (-loop.ffma, loop.instructions), default=None)


def enclosing(found: list[Loop], inner: Loop) -> Loop | None:
    """The smallest loop around `inner`."""
    outer = [loop for loop in found if inner.within(loop)]
    return min(outer, key=lambda loop: loop.instructions, default=None)


# (registers per SM, most warps per SM, most blocks per SM, shared memory per SM in bytes)
LIMITS = {"sm_80": (65536, 64, 32, 167936), "sm_86": (65536, 48, 16, 102400),
          "sm_89": (65536, 48, 24, 102400), "sm_90": (65536, 64, 32, 233472)}


def warps_per_sm(built: Built, threads: int, arch: str) -> int | None:
    """How many warps of this kernel an SM can hold: registers are given out per warp in
    units of 256, so a block's warps take ceil(registers * 32 / 256) * 256 each."""
    if arch not in LIMITS:
        return None
    registers, most_warps, most_blocks, shared = LIMITS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(built.registers, 1) * 32 / 256) * 256
    blocks = min(most_blocks, (registers // per_warp) // warps, most_warps // warps)
    if built.shared:
        blocks = min(blocks, shared // (built.shared + 1024))  # 1 KiB reserved per block
    return blocks * warps


# --- Report ------------------------------------------------------------------------------


def table(kernels: list[Recorded], builder: Builder) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown rows, and the same as records, of each kernel's build."""
    lines = ["| kernel | threads | registers | spilled bytes | shared bytes | warps/SM "
             "| hottest loop: instructions | FFMA | FFMA share | LDS | loop around it: "
             "other instructions | build s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    records: list[dict[str, Any]] = []
    for kernel in kernels:
        try:
            built = builder.build(kernel)
        except Exception as exc:
            lines.append(f"| {kernel.name} | FAILED: {str(exc).splitlines()[0][:200]} |")
            records.append({"name": kernel.name, "error": str(exc)})
            continue
        warps = warps_per_sm(built, kernel.threads, builder.arch)
        loop = built.hottest
        looped = ("- | - | - | - | -" if loop is None else
                  f"{loop.instructions} | {loop.ffma} | {loop.ffma_share:.0%} | {loop.lds} | "
                  f"{'-' if built.around is None else built.around}")
        lines.append(f"| {kernel.name} | {kernel.threads} | {built.registers} | "
                     f"{built.spill_stores + built.spill_loads} | {built.shared} | "
                     f"{'-' if warps is None else warps} | {looped} | {built.seconds:.1f} |")
        records.append({"name": kernel.name, "threads": kernel.threads, "warps": warps,
                        **asdict(built)})
    return lines, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", action="append", metavar="FILE:BATCH",
                        help=f"a network and batch (repeatable; default {' '.join(DEFAULT)})")
    parser.add_argument("--arch", default="sm_90", help="the GPU architecture (sm_90: H100)")
    parser.add_argument("--json", metavar="PATH", help="also write every kernel's figures")
    parser.add_argument("--record", metavar="PATH", help=argparse.SUPPRESS)  # step 1's child
    args = parser.parse_args()
    networks = args.network or DEFAULT
    if args.record:
        recorded = record(networks)
        Path(args.record).write_text(json.dumps(
            {entry: [asdict(k) for k in found] for entry, found in recorded.items()}))
        return
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        sys.exit("run it without NUMBA_ENABLE_CUDASIM=1: it builds for a real GPU")
    builder = Builder(args.arch)
    report: dict[str, list[dict[str, Any]]] = {}
    for entry, kernels in record_in_simulator(networks).items():
        lines, report[entry] = table(kernels, builder)
        print(f"\n{entry}, {args.arch}: {len(kernels)} kernels\n")
        print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if any("error" in kernel for kernels in report.values() for kernel in kernels):
        sys.exit(1)


if __name__ == "__main__":
    main()
