"""The kernels behind codegen/cuda/arrays.py; imported only once numba.cuda is known
to work (see common.cuda), since the decorators need it."""

import math
from typing import Any

from numba import cuda


@cuda.jit(cache=True)
def fill(x: Any, value: Any) -> None:
    i = cuda.grid(1)
    if i < x.size:
        x[i] = value


@cuda.jit(cache=True)
def scale(x: Any, factor: Any) -> None:
    i = cuda.grid(1)
    if i < x.size:
        x[i] = x[i] * factor


@cuda.jit(cache=True)
def copy(source: Any, target: Any) -> None:
    i = cuda.grid(1)
    if i < target.size:
        target[i] = source[i]


@cuda.jit(cache=True)
def add(a: Any, b: Any, out: Any) -> None:
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a[i] + b[i]


@cuda.jit(cache=True)
def count_nonfinite(x: Any, counts: Any, slot: Any) -> None:
    """counts[slot] += the number of NaN or infinite values in x (an atomic add: the
    order of the additions cannot change a count)."""
    i = cuda.grid(1)
    if i < x.size and not math.isfinite(x[i]):  # `and` short-circuits: no read past the end
        cuda.atomic.add(counts, slot, 1)


@cuda.jit(cache=True)
def fold_weight(weight: Any, per_output: Any, gamma: Any, var: Any, eps: Any, affine: Any,
                out: Any) -> None:
    """out = weight * gamma / sqrt(var + eps), per output channel, in float64."""
    i = cuda.grid(1)
    if i < weight.size:
        c = i // per_output
        scale = 1.0 / math.sqrt(float(var[c]) + eps)
        if affine:
            scale = scale * float(gamma[c])
        out[i] = float(weight[i]) * scale


@cuda.jit(cache=True)
def fold_bias(bias: Any, has_bias: Any, gamma: Any, beta: Any, mean: Any, var: Any, eps: Any,
              affine: Any, out: Any) -> None:
    """out = (bias - mean) * gamma / sqrt(var + eps) + beta, in float64."""
    c = cuda.grid(1)
    if c < out.size:
        scale = 1.0 / math.sqrt(float(var[c]) + eps)
        shift = -float(mean[c]) * scale
        if affine:
            scale = scale * float(gamma[c])
            shift = shift * float(gamma[c]) + float(beta[c])
        if has_bias:
            shift = shift + float(bias[c]) * scale
        out[c] = shift


@cuda.jit(cache=True)
def sgd_step(param: Any, grad: Any, buffer: Any, lr: Any, weight_decay: Any, momentum: Any,
             nesterov: Any, first: Any, skip: Any) -> None:
    """runtime/optim.py's SGD, one thread per value; momentum 0 leaves `buffer` unread.
    Nothing changes where skip[0] is not 0 (a gate: NaN or infinity found this step)."""
    i = cuda.grid(1)
    if i < param.size and skip[0] == 0:
        d = grad[i]
        if weight_decay != 0:
            d = d + weight_decay * param[i]
        if momentum != 0:
            b = d if first else buffer[i] * momentum + d
            buffer[i] = b
            d = d + momentum * b if nesterov else b
        param[i] = param[i] - lr * d


@cuda.jit(cache=True)
def adam_step(param: Any, grad: Any, m: Any, v: Any, weight_decay: Any, decoupled: Any,
              factors: Any, one_minus_beta1: Any, beta2: Any, one_minus_beta2: Any,
              eps: Any, skip: Any) -> None:
    """runtime/optim.py's Adam and AdamW, one thread per value, in PyTorch's order;
    nothing changes where skip[0] is not 0. What changes from step to step comes in
    device memory, so that every step launches the same (codegen/cuda/graphs.py):
    factors = (1 - lr * weight_decay, the step size, the root of v's bias correction)."""
    i = cuda.grid(1)
    if i < param.size and skip[0] == 0:
        g = grad[i]
        p = param[i]
        step_size = factors[1]
        bias2_root = factors[2]
        if weight_decay != 0:
            if decoupled:
                p = p * factors[0]
            else:
                g = g + weight_decay * p
        mi = m[i] + one_minus_beta1 * (g - m[i])
        vi = v[i] * beta2 + one_minus_beta2 * g * g
        m[i] = mi
        v[i] = vi
        param[i] = p - step_size * mi / (math.sqrt(vi) / bias2_root + eps)
