"""Losses at the network's outputs, and their gradients.

Every loss is a mean: cross-entropy over the examples (and positions, for a
map-shaped output), squared error over every value, as PyTorch's default
`reduction="mean"`. The total is the weighted sum over outputs, auxiliary heads
included with their weights.

Cross-entropy reads its output as logits (log-softmax, then the negative log
likelihood of the true class), unless the output layer ends in a softmax: then
the output already holds probabilities and the loss is -log p[true class]
(PyTorch's NLLLoss of log p, not CrossEntropyLoss of p, which would apply a
second softmax). When no other layer reads that output, its gradient is taken
with respect to the logits before the softmax (p - onehot), which is exact and
never divides by a vanishing probability; otherwise with respect to p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convdsl.ir.ops import Loss


@dataclass(frozen=True)
class LossValue:
    value: float
    grad: np.ndarray  # d loss / d output; for softmax outputs, d loss / d logits
    through_softmax: bool = False  # the grad skips the output layer's softmax


def check_targets(loss: Loss, shape: tuple[int, ...], targets: np.ndarray, name: str) -> None:
    """Raise ValueError with a clear message if targets cannot go with an output of
    this (batched) shape."""
    if loss is Loss.CROSS_ENTROPY:
        expected = (shape[0], *shape[2:])
        if targets.shape != expected:
            raise ValueError(
                f"targets for '{name}' have shape {targets.shape} but cross-entropy needs "
                f"one class index per example, shape {expected}")
        if not np.issubdtype(targets.dtype, np.integer):
            raise ValueError(f"targets for '{name}' must be whole class indices, "
                             f"not {targets.dtype}")
        classes = shape[1]
        if targets.size and (targets.min() < 0 or targets.max() >= classes):
            raise ValueError(f"targets for '{name}' must lie in 0..{classes - 1}, found "
                             f"{int(targets.min())}..{int(targets.max())}")
    elif loss is Loss.MSE and targets.shape != shape:
        raise ValueError(f"targets for '{name}' have shape {targets.shape} but squared "
                         f"error needs the output's shape {shape}")


def cross_entropy(output: np.ndarray, targets: np.ndarray, probabilities: bool,
                  grad_at_logits: bool = True) -> LossValue:
    """Mean cross-entropy; `probabilities` says the output is already a softmax.
    For such an output, `grad_at_logits=False` gives the gradient with respect to the
    probabilities themselves (-1/(p count) at the true class), for an output that other
    layers also read, so that its softmax's backward must run."""
    count = targets.size
    picked = np.expand_dims(targets, 1)
    if probabilities:
        p = output
    else:
        shifted = output - output.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        p = exp / exp.sum(axis=1, keepdims=True)
    p_true = np.take_along_axis(p, picked, axis=1)
    if probabilities:
        value = -np.log(np.maximum(p_true, np.finfo(output.dtype).tiny)).sum() / count
    else:
        log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        value = -(np.take_along_axis(shifted, picked, axis=1) - log_sum).sum() / count
    if probabilities and not grad_at_logits:
        grad = np.zeros_like(p)
        tiny = np.finfo(output.dtype).tiny
        np.put_along_axis(grad, picked, -1 / (np.maximum(p_true, tiny) * count), axis=1)
        return LossValue(float(value), grad.astype(output.dtype))
    grad = p.copy()
    np.put_along_axis(grad, picked, p_true - 1, axis=1)
    grad /= count
    return LossValue(float(value), grad.astype(output.dtype), through_softmax=probabilities)


def mean_squared_error(output: np.ndarray, targets: np.ndarray) -> LossValue:
    diff = output - targets.astype(output.dtype)
    return LossValue(float(np.mean(diff * diff)), (2.0 / diff.size) * diff)


def evaluate(loss: Loss, output: np.ndarray, targets: np.ndarray,
             softmax_output: bool, grad_at_logits: bool = True) -> LossValue:
    """The loss of one output and its gradient (zero for loss=none)."""
    if loss is Loss.CROSS_ENTROPY:
        return cross_entropy(output, targets, softmax_output, grad_at_logits)
    if loss is Loss.MSE:
        return mean_squared_error(output, targets)
    return LossValue(0.0, np.zeros_like(output))
