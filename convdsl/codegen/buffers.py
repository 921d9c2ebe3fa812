"""Buffers a kernel layer writes, handed in from outside: memory shared between layers.

A kernel layer allocates what it writes through its setup: `setup.output_buffer()` for
its output and `setup.input_buffer(i)` for the gradient of its input i. The CPU builders
do; the CUDA ones allocate device memory themselves and never call these, so a
`SharedSetup` changes nothing there.

A `SharedSetup` is a setup whose calls return arrays given in advance instead of new
ones. Its users:
- the executor places input gradients, and outputs no backward reads, whose lifetimes
  never overlap in one memory (passes/memory.py, plan_gradients and
  plan_transient_outputs; runtime/executor.py);
- a convolution or dense layer followed by batch norm writes its inference twin's output
  where its training product goes, or into the concatenation's channels batch norm was
  given (codegen/fused.py);
- a branch's last stage writes its output into its channels of a concatenation
  (passes/fusion.py, concat_writes): an output given as a channel slice, contiguous
  within each example but not across them, which only layers that write their output
  by subscript are given (a convolution, batch norm).

Whoever hands memory in answers for the lifetimes: the layer overwrites a given array
whenever it would overwrite its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from convdsl.codegen.layer import LayerSetup


@dataclass(frozen=True)
class SharedSetup(LayerSetup):
    """A layer setup with given buffers: `output` for the output, `input_grads[i]` for
    input i's gradient; None (or a missing index) means a buffer of the layer's own."""

    output: np.ndarray | None = field(default=None, compare=False, repr=False)
    input_grads: tuple[np.ndarray | None, ...] = field(default=(), compare=False,
                                                        repr=False)
    into_concat: bool = False  # `output` is a concatenation's channel slice

    def output_buffer(self) -> np.ndarray:
        if self.output is None:
            return super().output_buffer()
        _check(self.output, self.batched_output, self.dtype, "output", per_example=True)
        return self.output

    def input_buffer(self, index: int = 0) -> np.ndarray:
        given = self.input_grads[index] if index < len(self.input_grads) else None
        if given is None:
            return super().input_buffer(index)
        _check(given, self.batched_inputs[index], self.dtype, f"input {index}'s gradient")
        return given


def with_buffers(setup: LayerSetup, output: np.ndarray | None = None,
                 input_grads: tuple[np.ndarray | None, ...] | None = None,
                 into_concat: bool = False) -> SharedSetup:
    """`setup` with the buffers given; what is not given stays as `setup` had it.
    into_concat: `output` is a concatenation's channel slice (see the module's doc)."""
    fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(LayerSetup)}
    if isinstance(setup, SharedSetup):
        if output is None:
            output, into_concat = setup.output, setup.into_concat
        input_grads = setup.input_grads if input_grads is None else input_grads
    return SharedSetup(**fields, output=output, input_grads=input_grads or (),
                       into_concat=into_concat)


def _check(array: np.ndarray, shape: tuple[int, ...], dtype: str, what: str,
           per_example: bool = False) -> None:
    """A given buffer has the layer's shape and dtype, and is contiguous: as a whole, or
    (per_example, a concatenation's channel slice) within each example."""
    contiguous = array.flags.c_contiguous or (per_example and array[0].flags.c_contiguous)
    if array.shape != shape or array.dtype != np.dtype(dtype) or not contiguous:
        raise ValueError(f"the {what} buffer given is {array.dtype} {array.shape}, not a "
                         f"contiguous {dtype} {shape}")
