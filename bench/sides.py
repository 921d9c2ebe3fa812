"""The benchmark's two sides, each in a process of its own, driven in turn.

convdsl and PyTorch each tune how their threads wait between jobs: convdsl runs Numba's
OpenMP pool with a short spin and lets OpenBLAS's threads sleep (convdsl/threads.py),
while PyTorch keeps its OpenMP runtime's defaults. In one process the two share one
libgomp, so one of them would run with the other's settings. Measured on the 2-core
development machine: PyTorch's LeNet-5 inference was 5-30% slower with convdsl's short
spin, and convdsl, falling back to its workqueue pool beside PyTorch's libgomp, took
twice as long for a LeNet-5 step as it does alone. So each side runs in a process of
its own, as a user runs either, and the coordinator (bench/run.py) asks them in turn
for one timed run after another (A B A B ...), so that a slow phase of the machine still
falls on both.

A worker reads one JSON request per line and answers one JSON line:

    {"setup": {case fields}}  -> {"variants": [names], "outputs": {name: rows}, "notes": []}
    {"run": name}             -> {"seconds": s}   (untimed runs for WARM_S, then one timed)
    {"quit": true}            -> the worker exits
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# Before each timed run a worker runs the same variant untimed for this long (at least
# once). PyTorch's OpenMP threads spin for a few milliseconds after it returns, and a
# convdsl run that started at once lost a core to them: LeNet-5's step measured 10.4 ms
# against 3.2 ms alone. Pausing instead is no cure: after 20 ms idle this VM's cores
# take several runs to come back to speed (LeNet-5's step: 8.1 ms right after the
# pause, 3.9 ms after five runs). Running untimed keeps the machine busy and warms this
# side's threads and caches, as the previous steps of a training loop would.
WARM_S = 0.05


class Worker:
    """One side's process, started with the benchmark's thread count."""

    def __init__(self, side: str, threads: int) -> None:
        self.side = side
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "run.py"), "--threads", str(threads), "--serve", side],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker stopped (exit {self.process.wait()})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the {self.side} worker failed: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(RuntimeError, OSError, ValueError):
                self.ask(quit=True)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(side: str, threads: int) -> None:
    """A worker's loop. PyTorch is imported before anything else on its side, so that it
    loads its OpenMP runtime with its own defaults."""
    if side == "torch":
        import torch

        torch.set_num_threads(threads)
    import suite

    channel = os.fdopen(os.dup(1), "w")  # replies only: library prints go to stderr
    os.dup2(2, 1)
    runs: dict[str, Callable[[], None]] = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        try:
            reply = _handle(side, request, runs, suite)
        except Exception as exc:  # the coordinator reports it and stops
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        channel.write(json.dumps(reply) + "\n")
        channel.flush()


def _handle(side: str, request: dict[str, Any], runs: dict[str, Callable[[], None]],
            suite: Any) -> dict[str, Any]:
    if "setup" in request:
        case = suite.Case(**{**request["setup"], "algos": tuple(request["setup"]["algos"])})
        runs.clear()
        made, outputs, notes = (suite.convdsl_side(case) if side == "convdsl"
                                else suite.torch_side(case))
        runs.update(made)
        gc.collect()  # before the timed runs, not during them
        return {"variants": list(runs), "outputs": outputs, "notes": notes}
    run = runs[request["run"]]
    warm_until = time.perf_counter() + WARM_S
    run()
    while time.perf_counter() < warm_until:
        run()
    started = time.perf_counter()
    run()
    return {"seconds": time.perf_counter() - started}
