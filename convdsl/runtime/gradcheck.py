"""Finite-difference check of a whole compiled network, in float64.

For each trained array, a sample of its entries is nudged by +-h and the loss
recomputed; the central difference (L(w+h) - L(w-h)) / 2h is compared with the
gradient backward() computed. Training mode is used with a fixed dropout step,
so both sides see the same masks and batch statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convdsl.ir.ops import Loss
from convdsl.runtime.executor import CompiledNetwork

STEP = 1e-6
TOLERANCE = 1e-5


@dataclass(frozen=True)
class GradCheck:
    name: str  # a parameter, or "input"
    entries: int  # how many entries were checked
    worst: float  # the worst relative error among them

    @property
    def ok(self) -> bool:
        return self.worst <= TOLERANCE


def random_targets(net: CompiledNetwork, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Targets that every output's loss accepts: class indices, or values."""
    targets: dict[str, np.ndarray] = {}
    for output in net.network.outputs:
        shape = (net.batch, *net.network.shapes[output.name])
        if output.loss is Loss.CROSS_ENTROPY:
            targets[output.name] = rng.integers(0, shape[1], (shape[0], *shape[2:]))
        elif output.loss is Loss.MSE:
            targets[output.name] = rng.standard_normal(shape)
    return targets


def gradcheck(net: CompiledNetwork, samples: int = 12, seed: int = 0) -> list[GradCheck]:
    """Worst relative error per trained array (and for the input), `samples` entries each."""
    if net.dtype != "float64":
        raise ValueError("finite differences need float64: compile with dtype='float64'")
    if net.device.name != "cpu":  # it nudges parameters in place, as NumPy arrays
        raise ValueError("gradcheck runs on the CPU: compile with device='cpu' (the CUDA "
                         "target is checked against the CPU in tests/test_cuda_runtime.py)")
    rng = np.random.default_rng(seed)
    x = {name: rng.standard_normal((net.batch, *shape))
         for name, shape in net.input_shapes.items()}
    targets = random_targets(net, rng)
    if not targets:
        raise ValueError("the network has no output with a loss to differentiate")

    def loss() -> float:
        net.forward(x, train=True, step=0)
        return net.loss(targets)

    loss()
    grad_input = net.backward()
    analytic = {name: grad.copy() for name, grad in net.grads.items()}
    results = [_check_array(name, net.params[name], analytic[name], loss, samples, rng)
               for name in analytic]
    inputs = grad_input if isinstance(grad_input, dict) else {next(iter(x)): grad_input}
    for name, grad in inputs.items():
        results.append(_check_array(f"input '{name}'", x[name], grad, loss, samples, rng))
    return results


def _check_array(name: str, array: np.ndarray, analytic: np.ndarray,
                 loss: Callable[[], float], samples: int, rng: np.random.Generator
                 ) -> GradCheck:
    flat = array.reshape(-1)
    chosen = rng.choice(flat.size, size=min(samples, flat.size), replace=False)
    scale = max(float(np.max(np.abs(analytic))), 1e-12)
    worst = 0.0
    for index in chosen:
        kept = flat[index]
        flat[index] = kept + STEP
        above = loss()
        flat[index] = kept - STEP
        below = loss()
        flat[index] = kept
        numeric = (above - below) / (2 * STEP)
        error = abs(numeric - float(analytic.reshape(-1)[index])) / scale
        worst = max(worst, error)
    return GradCheck(name, len(chosen), worst)
