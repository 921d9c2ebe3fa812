"""Getting a compiled network's kernels ready fast: from a record when the cache is warm,
in several processes when it is cold.

`warm(compiled)` does what `CompiledNetwork.warm_up()` does (every kernel compiled or
loaded, nothing about the network changed) in the quickest way it can:

- **Warm cache.** After a full warm-up, the argument types every kernel function was
  compiled for are kept in a record named by the stages' kernels. With a record, each of
  those versions is loaded from Numba's disk cache (`Dispatcher.compile`, which finds it
  there), and nothing runs: a warm-up's forward and backward passes on ResNet-18 cost
  more than the loading itself.
- **Cold cache, several cores.** Numba compiles one function at a time, on one core. The
  stages whose kernels have no machine code yet are shared among worker processes
  (`python -m convdsl.codegen.parallel`), each of which builds them and runs them once on
  random data of the right shapes, so that Numba writes their machine code to the disk
  cache; the full warm-up here then loads it. Stages that share a kernel go to the same
  worker, so no kernel is compiled twice.

On CUDA only the workers apply (records are for the CPU's dispatchers): each worker
compiles its stages' kernels with NVVM, one core per process, and numba.cuda writes
their machine code to the same disk cache, from which the parent's warm-up loads it.
Under the CUDA simulator nothing is compiled, so no worker starts.

Either shortcut only ever saves time: a version missing from the cache is compiled where
it is needed, as without them. Any failure falls back to the plain warm-up.
CONVDSL_COMPILE_WORKERS sets the number of workers (1: none, compile here). `convdsl
compile` and `gradcheck` use the workers too (compile_cold_stages), and so does the cost
model's first calibration, for its reference layer (layer_request, codegen/cpu/conv_fit.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from convdsl.codegen import cache, source
from convdsl.codegen.spec import KernelSpec

if TYPE_CHECKING:
    from convdsl.runtime.executor import CompiledNetwork, Stage

WORKERS_VARIABLE = "CONVDSL_COMPILE_WORKERS"
WORKER_TIMEOUT_S = 1800
CONV_OPS = ("conv", "filter")  # the ops whose builder chooses an algorithm

log = logging.getLogger(__name__)


def warm(compiled: CompiledNetwork) -> str:
    """Compile or load every kernel of `compiled` now, as `compiled.warm_up()` does;
    returns how: "record" (loaded, nothing run), "workers" (compiled in worker processes,
    then warmed up here) or "here" (the plain warm-up)."""
    if compiled.device.name == "cpu":
        wanted = cache.read_record(record_name(compiled.stages))
        if wanted is not None and _load_recorded(compiled, wanted):
            return "record"
    workers = compile_cold_stages(compiled)
    compiled.warm_up()
    remember(compiled)
    return "workers" if workers else "here"


def compile_cold_stages(compiled: CompiledNetwork) -> int:
    """The stages of `compiled` without machine code, compiled in worker processes
    where the device and the cores allow; returns how many workers worked (0: none, the
    warm-up compiles everything). Under the CUDA simulator nothing is compiled."""
    if compiled.device.name == "cpu":
        return compile_in_workers(compiled)
    from convdsl.codegen.cuda.common import simulated

    return 0 if simulated() else compile_in_workers(compiled, cuda_worker_count())


def remember(compiled: CompiledNetwork) -> None:
    """After a full warm-up on the CPU, record which versions every kernel function was
    compiled for, so that the next process with these stages loads them without running
    anything (warm)."""
    if compiled.device.name == "cpu":
        cache.write_record(record_name(compiled.stages), _compiled_signatures(compiled.stages))


def record_name(stages: Sequence[Stage]) -> str:
    """Names the record of a list of stages: their kernel classes and kernels, in order
    (the same list runs the same kernel functions in a warm-up), and the threshold of
    threads, which decides which of a spec's two kernel files holds them."""
    return cache.record_name([
        *(f"{stage.name}:{type(stage.kernel).__name__}:"
          + ",".join(spec.key for spec in stage.kernel.specs) for stage in stages),
        f"threads from {source.threads_from()}", "signatures by kernel file"])


def _compiled_signatures(stages: Sequence[Stage]) -> dict[str, cache.Signatures]:
    """The versions of every kernel file's functions, by the file's name."""
    return {cache.source_path(spec).name: cache.signatures(spec)
            for spec in _unique_specs(stages)}


def _load_recorded(compiled: CompiledNetwork,
                   wanted: Mapping[str, cache.Signatures]) -> bool:
    """Load the recorded versions; False (and the caller warms up) if that fails."""
    seconds: dict[str, float] = {}
    done: set[str] = set()
    try:
        for stage in compiled.stages:
            start = time.perf_counter()
            for spec in stage.kernel.specs:
                name = cache.source_path(spec).name
                if name not in done:
                    cache.load_signatures(spec, wanted.get(name, {}))
                    done.add(name)
            seconds[stage.name] = time.perf_counter() - start
    except Exception:  # a stale or damaged record: the warm-up still gives every kernel
        log.debug("kernel record unusable; warming up instead", exc_info=True)
        return False
    compiled.compile_seconds = seconds
    return True


def _unique_specs(stages: Sequence[Stage]) -> list[KernelSpec]:
    """One spec for each kernel file the stages use (specs of a template that reads its
    sizes at run time share a file where only their shapes differ)."""
    specs: dict[Path, KernelSpec] = {}
    for stage in stages:
        for spec in stage.kernel.specs:
            specs.setdefault(cache.source_path(spec), spec)
    return list(specs.values())


# --- cold cache: worker processes -------------------------------------------------------


def worker_count() -> int:
    """$CONVDSL_COMPILE_WORKERS, else one per core this process may run on."""
    configured = os.environ.get(WORKERS_VARIABLE, "").strip()
    if configured:
        try:
            return max(1, int(configured))
        except ValueError:
            return 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# Each CUDA worker opens a context of its own on the GPU (some hundreds of MB), so unless
# CONVDSL_COMPILE_WORKERS says otherwise, a CUDA compile starts at most this many.
CUDA_WORKERS = 8


def cuda_worker_count() -> int:
    """$CONVDSL_COMPILE_WORKERS, else one per core up to CUDA_WORKERS."""
    if os.environ.get(WORKERS_VARIABLE, "").strip():
        return worker_count()
    return min(worker_count(), CUDA_WORKERS)


def compile_in_workers(compiled: CompiledNetwork, workers: int | None = None) -> int:
    """Fill the disk cache with the machine code of the stages that have none, in
    `workers` processes; returns how many worked (0: nothing to share, or no workers)."""
    workers = worker_count() if workers is None else workers
    if workers < 2:
        return 0
    try:
        shares = plan(compiled.stages, workers)
        if len(shares) < 2:
            return 0
        return run_workers(_requests(compiled, shares))
    except Exception:  # only ever a shortcut: the warm-up compiles what is missing
        log.debug("compiling in worker processes failed", exc_info=True)
        return 0


def plan(stages: Sequence[Stage], workers: int) -> list[list[str]]:
    """The stages without machine code, as at most `workers` lists of stage names: stages
    that share a kernel with its sizes in its source in the same list, lists balanced by
    their number of new kernel functions (each takes Numba about the same time to
    compile).

    A kernel that serves every size (batch norm, epilogues, elementwise) does not tie
    stages together: in ResNet-20 one such kernel serves every stage, which would put all
    of them in one list. Every worker whose stages use it may compile it; it is small,
    and one compiled version of it serves all its stages."""
    cold = [stage for stage in stages
            if any(not cache.has_machine_code(spec) for spec in stage.kernel.specs)]
    groups: list[tuple[set[Path], list[str]]] = []  # (kernel files, stage names)
    for stage in cold:
        files = {cache.source_path(spec) for spec in stage.kernel.specs}
        ties = {cache.source_path(spec) for spec in stage.kernel.specs if cache.sized(spec)}
        touching = [group for group in groups if group[0] & ties]
        merged = (files.union(*(g[0] for g in touching)),
                  [name for g in touching for name in g[1]] + [stage.name])
        groups = [group for group in groups if group not in touching] + [merged]
    specs = {cache.source_path(spec): spec for spec in _unique_specs(cold)}
    costs = [sum(len(cache.functions(specs[file])) for file in files)
             for files, _ in groups]
    shares: list[list[str]] = [[] for _ in range(min(workers, len(groups)))]
    loads = [0] * len(shares)
    for cost, (_, names) in sorted(zip(costs, groups), key=lambda item: -item[0]):
        lightest = loads.index(min(loads))
        shares[lightest] += names
        loads[lightest] += cost
    order = {stage.name: index for index, stage in enumerate(stages)}
    return [sorted(share, key=order.__getitem__) for share in shares if share]


def _requests(compiled: CompiledNetwork, shares: list[list[str]]) -> list[dict[str, Any]]:
    """What each worker needs to build its stages exactly as here."""
    network = compiled.network
    kernels = {stage.name: stage for stage in compiled.stages}
    # The algorithm each convolution chose here, so that a worker neither measures nor
    # tunes, and builds the same kernels even on a machine busy with the other workers.
    # (On CUDA the plan follows from the shapes and the algorithm asked for, which the
    # setups carry; the one it reports, "gemm" under auto, would force tiles everywhere.)
    algos = {} if compiled.device.name != "cpu" else {
        stage.kernel.setup.layer.name: stage.kernel.algorithm
        for stage in compiled.stages if stage.kernel.setup.layer.op.value in CONV_OPS}
    base = {"cache": str(cache.cache_dir()), "text": network.source.text,
            "filename": network.source.name, "batch": compiled.batch,
            "dtype": compiled.dtype, "fuse": compiled.fuse, "seed": compiled.seed,
            "device": compiled.device.name,
            "algos": {name: setup.algo for name, setup in compiled.setups.items()} | algos}
    return [{**base, "stages": {name: [spec.key for spec in kernels[name].kernel.specs]
                                for name in share}} for share in shares]


def layer_request(text: str, batch: int, dtype: str, layer: str, algo: str,
                  specs: Sequence[KernelSpec]) -> dict[str, Any]:
    """A worker's request to compile the kernels `specs` of `layer`, in a network
    `text` of that one layer (its own stage), computed by the convolution algorithm
    `algo`."""
    return {"cache": str(cache.cache_dir()), "text": text, "filename": f"<{layer}>",
            "batch": batch, "dtype": dtype, "fuse": True, "seed": 0, "device": "cpu",
            "algos": {layer: algo}, "stages": {layer: [spec.key for spec in specs]}}


def run_workers(requests: list[dict[str, Any]],
                environment: Mapping[str, str] | None = None) -> int:
    """Start one worker per request (with `environment` added to this process's),
    wait for all; returns how many finished; every process is reaped, whatever happens
    here (an interrupt included)."""
    processes: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
    finished = 0
    variables = {**os.environ, **(environment or {})}
    with contextlib.ExitStack() as files:
        try:
            for request in requests:
                errors = files.enter_context(tempfile.TemporaryFile())
                process = subprocess.Popen([sys.executable, "-m", __name__],
                                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                           stderr=errors, env=variables)
                processes.append((process, errors))
                assert process.stdin is not None
                process.stdin.write(json.dumps(request).encode())
                process.stdin.close()
            deadline = time.monotonic() + WORKER_TIMEOUT_S
            for process, stream in processes:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code == 0:
                    finished += 1
                else:
                    stream.seek(0)
                    log.debug("kernel worker failed (%s): %s", code,
                              stream.read()[-2000:].decode(errors="replace"))
        finally:
            for process, _ in processes:
                if process.poll() is None:
                    process.kill()
                process.wait()
    return finished


def run_request(request: Mapping[str, Any]) -> list[str]:
    """In a worker: build the requested stages as the parent did, and run each once
    (training forward, backward, inference forward) on random data, on the parent's
    device; returns the stages run. A stage whose kernels come out different from the
    parent's is skipped."""
    from convdsl.codegen.fused import build_stage, stage_arrays
    from convdsl.codegen.layer import Mode, layer_setups
    from convdsl.network import loads
    from convdsl.passes.fusion import fusion_groups
    from convdsl.runtime.devices import device_named
    from convdsl.runtime.params import init_params, network_params

    network = loads(request["text"], request["filename"])
    batch, dtype = int(request["batch"]), str(request["dtype"])
    device = device_named(str(request.get("device", "cpu")))
    setups = {name: dataclasses.replace(setup, algo=request["algos"].get(name, setup.algo))
              for name, setup in layer_setups(network, batch, dtype,
                                              device=device.name).items()}
    params = {name: device.put(array) for name, array
              in init_params(network, int(request["seed"]), dtype=dtype).items()}
    grads = {info.name: device.zeros(info.shape, dtype)
             for info in network_params(network) if info.trained}
    wanted: dict[str, list[str]] = request["stages"]
    rng = np.random.default_rng(0)
    done: list[str] = []
    for group in fusion_groups(network, bool(request["fuse"])):
        if group.name not in wanted:
            continue
        kernel = build_stage(group, setups)
        if [spec.key for spec in kernel.specs] != wanted[group.name]:
            continue
        stage_params = stage_arrays(group, _by_layer(params))
        stage_grads = stage_arrays(group, _by_layer(grads))
        inputs = [device.put(rng.standard_normal((batch, *network.shapes[name]))
                             .astype(dtype)) for name in group.inputs]
        output = kernel.forward(inputs, stage_params, Mode(train=True))
        kernel.backward(device.put(np.ones(output.shape, dtype)), stage_params, stage_grads)
        kernel.forward(inputs, stage_params, Mode(train=False))
        done.append(group.name)
    return done


def _by_layer(arrays: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    grouped: dict[str, dict[str, Any]] = {}
    for name, array in arrays.items():
        layer, _, field = name.rpartition(".")
        grouped.setdefault(layer, {})[field] = array
    return grouped


def main() -> int:
    request = json.loads(sys.stdin.read())
    os.environ["CONVDSL_CACHE"] = request["cache"]
    run_request(request)
    return 0


if __name__ == "__main__":
    sys.exit(main())
