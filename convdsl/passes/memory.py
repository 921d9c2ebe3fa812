"""The memory plan: when each tensor is alive, and which reusable buffer holds it.

    >>> plan = plan_memory(convdsl.load("networks/resnet18.cnn"), batch=32,
    ...                    dtype="float32", training=True)
    >>> plan.peak_bytes < plan.unplanned_bytes
    True

Time runs in steps. The inputs arrive at step 0 and the i-th layer of the forward
pass runs at step i. In training the loss follows (it reads the outputs and writes
their gradients), then the backward pass visits the layers that a gradient reaches,
in reverse order, one step each. A tensor is alive from the step that writes it to
the last step that reads it, both included: a kernel reads its inputs while it writes
its output, so those never share memory.

What a layer's backward reads decides how long a forward value lives in training:
- its input, where the arithmetic needs it: the weight gradient of conv and dense,
  the normalised input of batch norm, softpool's exponential weights;
- its output, where a non-identity activation is fused in (every derivative is
  written in terms of the activation's output y), and for softpool;
- state it saved: maxpool's argmax indices (int64), dropout's mask, softpool's sums.
flatten is a view, forward and backward, and dropout at inference returns its input:
such a layer owns no memory, and reading its value reads the tensor under it.

Gradients: a layer's output gradient is written by the backward of its consumer that
runs first (or by the loss, for an output) and read by the layer's own backward. The
gradient of a network input is returned to the caller, so it lives to the end. A
further consumer's contribution is written by its kernel into a temporary that is
added in and freed in the same step, because today's kernels overwrite their input
gradients rather than accumulate.

Not planned: kernel workspaces (im2col and FFT buffers, chosen when the kernels are
compiled) and per-channel batch-norm statistics (a few bytes per channel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from convdsl.errors import RunError
from convdsl.ir.ops import Activation, Layer, Loss, Op
from convdsl.network import Network
from convdsl.passes.fusion import FusionGroup, concat_writes

DTYPE_BYTES = {"float32": 4, "float64": 8}
INDEX_BYTES = 8  # maxpool's argmax indices are int64 whatever the dtype


@dataclass(frozen=True)
class Tensor:
    """A value that needs memory from step `start` to step `end`, both included."""

    name: str
    size: int  # bytes
    start: int
    end: int

    def overlaps(self, other: Tensor) -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class MemoryPlan:
    """Tensors with lifetimes, assigned to buffers that tensors with disjoint lifetimes
    share. Bytes count the parameters (and in training their gradients, but no
    optimizer state) plus the buffers."""

    batch: int
    dtype: str
    training: bool
    steps: tuple[str, ...]  # what runs at each step, for reading a plan
    tensors: tuple[Tensor, ...]
    aliases: dict[str, str]  # a view's name -> the tensor it reads
    buffers: tuple[int, ...]  # bytes of each buffer
    assignment: dict[str, int]  # tensor name -> index into buffers
    weight_bytes: int

    @property
    def peak_bytes(self) -> int:
        """What the plan allocates: weights plus every buffer."""
        return self.weight_bytes + sum(self.buffers)

    @property
    def unplanned_bytes(self) -> int:
        """What a memory of its own per tensor would take: weights plus every tensor."""
        return self.weight_bytes + sum(tensor.size for tensor in self.tensors)

    @property
    def live_bytes(self) -> int:
        """Weights plus the most bytes alive at one step: no plan can go below this."""
        alive = [0] * len(self.steps)
        for tensor in self.tensors:
            for step in range(tensor.start, tensor.end + 1):
                alive[step] += tensor.size
        return self.weight_bytes + max(alive, default=0)

    def to_dict(self) -> dict[str, Any]:
        """The figures `convdsl summary --json` prints."""
        return {"peak_bytes": self.peak_bytes, "unplanned_bytes": self.unplanned_bytes,
                "live_bytes": self.live_bytes, "weight_bytes": self.weight_bytes,
                "buffers": len(self.buffers), "tensors": len(self.tensors)}


def plan_memory(network: Network, batch: int = 1, dtype: str = "float32",
                training: bool = False) -> MemoryPlan:
    """Lifetimes of every tensor of a forward pass (and, in training, of the loss and
    the backward pass) for `batch` examples, and a greedy best-fit reuse of buffers."""
    _check(batch, dtype)
    itemsize = DTYPE_BYTES[dtype]
    timeline = _timeline(network, batch, itemsize, training)
    tensors = timeline.tensors()
    buffers, assignment = assign_buffers(tensors)
    weights = network.params + network.buffers + network.fixed
    if training:
        weights += network.params  # one gradient per trained parameter
    return MemoryPlan(batch, dtype, training, tuple(timeline.labels), tuple(tensors),
                      dict(timeline.aliases), tuple(buffers), assignment, itemsize * weights)


def assign_buffers(tensors: list[Tensor]) -> tuple[list[int], dict[str, int]]:
    """Greedy by size, best fit: the largest tensors first, each into the smallest
    buffer whose tensors all have lifetimes disjoint from its own, else a new buffer.
    Largest first means a buffer is never smaller than a tensor placed in it later."""
    sizes: list[int] = []
    members: list[list[Tensor]] = []
    assignment: dict[str, int] = {}
    for tensor in sorted(tensors, key=lambda t: (-t.size, t.start, t.name)):
        free = [index for index, held in enumerate(members)
                if not any(tensor.overlaps(other) for other in held)]
        if free:
            index = min(free, key=lambda i: (sizes[i], i))
        else:
            index = len(sizes)
            sizes.append(tensor.size)
            members.append([])
        members[index].append(tensor)
        assignment[tensor.name] = index
    return sizes, assignment


def assign_in_order(tensors: list[Tensor]) -> tuple[list[int], dict[str, int]]:
    """Linear scan: tensors in the order they start (larger first on a tie), each into
    a buffer whose tensors have all ended, the smallest that is large enough, else the
    largest, which grows; else a new buffer. Often tighter than assign_buffers where
    tensors of a few sizes come and go in waves (a backward pass)."""
    sizes: list[int] = []
    ends: list[int] = []
    assignment: dict[str, int] = {}
    for tensor in sorted(tensors, key=lambda t: (t.start, -t.size, t.name)):
        free = [index for index, end in enumerate(ends) if end < tensor.start]
        large = [index for index in free if sizes[index] >= tensor.size]
        if large:
            index = min(large, key=lambda i: (sizes[i], i))
        elif free:
            index = max(free, key=lambda i: (sizes[i], -i))
            sizes[index] = tensor.size
        else:
            index = len(sizes)
            sizes.append(tensor.size)
            ends.append(-1)
        ends[index] = tensor.end
        assignment[tensor.name] = index
    return sizes, assignment


def _tightest(tensors: list[Tensor]) -> tuple[list[int], dict[str, int]]:
    """The smaller in bytes of the two assignments."""
    return min(assign_buffers(tensors), assign_in_order(tensors), key=lambda a: sum(a[0]))


def _check(batch: int, dtype: str) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise RunError(f"batch must be a whole number of at least 1, not {batch!r}")
    if dtype not in DTYPE_BYTES:
        raise RunError(f"dtype must be float32 or float64, not {dtype!r}",
                       f"choose one of {', '.join(DTYPE_BYTES)}")


# --- lifetimes ----------------------------------------------------------------------


@dataclass
class _Timeline:
    """Tensors as they are written and read, step by step; views read their base."""

    labels: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    uses: dict[str, list[int]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    saved: dict[str, list[str]] = field(default_factory=dict)  # layer -> its state

    def step(self, label: str) -> int:
        self.labels.append(label)
        return len(self.labels) - 1

    def knows(self, name: str) -> bool:
        return name in self.sizes or name in self.aliases

    def write(self, name: str, size: int, step: int) -> None:
        assert not self.knows(name), f"tensor {name!r} written twice"
        self.sizes[name] = size
        self.uses[name] = [step]

    def view(self, name: str, base: str, step: int) -> None:
        """`name` shares the memory of `base`, which stays alive while either is read."""
        self.aliases[name] = self.base(base)
        self.use(name, step)

    def base(self, name: str) -> str:
        return self.aliases.get(name, name)

    def use(self, name: str, step: int) -> None:
        self.uses[self.base(name)].append(step)

    def tensors(self) -> list[Tensor]:
        return [Tensor(name, size, min(self.uses[name]), max(self.uses[name]))
                for name, size in self.sizes.items()]


def _value(layer: str) -> str:
    return f"out:{layer}"


def _grad(layer: str) -> str:
    return f"grad:{layer}"


def _timeline(network: Network, batch: int, itemsize: int, training: bool) -> _Timeline:
    timeline = _Timeline()

    def size(layer: str) -> int:
        return batch * math.prod(network.shapes[layer]) * itemsize

    start = timeline.step("inputs")
    for layer in network.graph.inputs():
        timeline.write(_value(layer.name), size(layer.name), start)
    layers = [layer for layer in network.layers if layer.op is not Op.INPUT]
    for layer in layers:
        step = timeline.step(f"forward {layer.name}")
        for source in layer.inputs:
            timeline.use(_value(source), step)
        if _is_view(layer, training):
            timeline.view(_value(layer.name), _value(layer.inputs[0]), step)
        else:
            timeline.write(_value(layer.name), size(layer.name), step)
        timeline.saved[layer.name] = []
        for name, nbytes in _saved(layer, batch * math.prod(network.shapes[layer.name]),
                                   itemsize, training):
            timeline.write(name, nbytes, step)
            timeline.saved[layer.name].append(name)
    for output in network.outputs:  # the caller reads every output after the pass
        timeline.use(_value(output.name), len(timeline.labels) - 1)
    if training:
        _backward(network, layers, timeline, size)
    return timeline


def _backward(network: Network, layers: list[Layer], timeline: _Timeline,
              size: Callable[[str], int]) -> None:
    step = timeline.step("loss")
    for output in network.outputs:
        timeline.use(_value(output.name), step)
    starts = [o.name for o in network.outputs if o.loss is not Loss.NONE]
    if not starts:  # backward(grad) with a gradient given for the main output
        starts = [next(o.name for o in network.outputs if not o.aux)]
    for name in starts:
        timeline.write(_grad(name), size(name), step)
    reached = set().union(*(network.graph.ancestors(name) for name in starts))
    for layer in reversed(layers):
        if layer.name not in reached:
            continue  # no gradient arrives: the executor skips this layer
        step = timeline.step(f"backward {layer.name}")
        timeline.use(_grad(layer.name), step)
        if _needs_output(layer):
            timeline.use(_value(layer.name), step)
        if layer.op in _NEEDS_INPUT:
            for source in layer.inputs:
                timeline.use(_value(source), step)
        for name in timeline.saved[layer.name]:
            timeline.use(name, step)
        for source in layer.inputs:
            _contribute(timeline, source, layer, step, size(source))
    end = len(timeline.labels) - 1
    for layer in network.graph.inputs():  # backward() returns the input's gradient
        if timeline.knows(_grad(layer.name)):
            timeline.use(_grad(layer.name), end)


def _contribute(timeline: _Timeline, source: str, layer: Layer, step: int,
                nbytes: int) -> None:
    """`layer`'s backward hands `source` a gradient: the first one becomes the source's
    gradient tensor; a later one lands in a temporary that is added in at once."""
    view = layer.op is Op.FLATTEN  # its backward reshapes the incoming gradient
    if not timeline.knows(_grad(source)):
        if view:
            timeline.view(_grad(source), _grad(layer.name), step)
        else:
            timeline.write(_grad(source), nbytes, step)
        return
    timeline.use(_grad(source), step)
    if view:
        return  # the flattened gradient is added in directly
    name, copy = f"{_grad(source)}+{layer.name}", 1
    while timeline.knows(name):  # add(x, x): two contributions from one layer
        copy += 1
        name = f"{_grad(source)}+{layer.name}#{copy}"
    timeline.write(name, nbytes, step)


# --- what each layer keeps ------------------------------------------------------------

_NEEDS_INPUT = {Op.CONV, Op.DENSE, Op.BATCHNORM, Op.SOFTPOOL}


def _is_view(layer: Layer, training: bool) -> bool:
    return layer.op is Op.FLATTEN or (layer.op is Op.DROPOUT and not training)


def _needs_output(layer: Layer) -> bool:
    activated = layer.act is not None and layer.act.kind is not Activation.IDENTITY
    return activated or layer.op is Op.SOFTPOOL


def _saved(layer: Layer, units: int, itemsize: int, training: bool
           ) -> list[tuple[str, int]]:
    """State a layer's forward writes besides its output (of `units` values): (name,
    bytes). Inference keeps it for the layer's own step only."""
    if layer.op in (Op.MAXPOOL, Op.GLOBAL_MAXPOOL):
        return [(f"argmax:{layer.name}", units * INDEX_BYTES)]
    if layer.op is Op.SOFTPOOL:
        return [(f"sums:{layer.name}", 2 * units * itemsize)]
    if layer.op is Op.DROPOUT and training:
        return [(f"mask:{layer.name}", units * itemsize)]
    return []


# --- the executor's gradient buffers ------------------------------------------------


@dataclass(frozen=True)
class BufferPlan:
    """Tensors of the executor (runtime/executor.py) placed in shared buffers: the
    gradients of its backward pass (plan_gradients, described here) or the transient
    outputs of its forward pass (plan_transient_outputs).

    Tensors, by name, `grad:STAGE:I`: the gradient a stage's backward writes for its
    input I. (Inside a stage of a product and batch norm, the batch norm writes the
    gradient it hands the product over the stage's incoming gradient.) The gradients
    of a value read by several stages are added into the first that arrives.
    Steps count the stages in backward order (the last stage is step 0); the step
    after the last is the end of backward(), where a network input's gradient is
    copied out."""

    steps: tuple[str, ...]  # the stage run at each step
    tensors: tuple[Tensor, ...]
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, batch first
    buffers: tuple[int, ...]  # bytes of each buffer
    assignment: dict[str, int]  # tensor name -> index into buffers

    @property
    def bytes(self) -> int:
        return sum(self.buffers)

    @property
    def unplanned_bytes(self) -> int:
        """What a buffer of its own per tensor would take."""
        return sum(tensor.size for tensor in self.tensors)


# Stages whose backward may hand on the gradient it received (a view of it) rather
# than a buffer of its own: flatten always, dropout after an inference forward.
PASS_THROUGH = {Op.FLATTEN, Op.DROPOUT}


def plan_gradients(network: Network, groups: list[FusionGroup], batch: int,
                   dtype: str) -> BufferPlan:
    """Lifetimes of the executor's gradient buffers, and buffers shared between those
    whose lifetimes never overlap.

    The lifetimes hold for any backward() the executor may run: whichever stages a
    gradient reaches, whether the first stages skip their input's gradient, and so
    which contribution to a value arrives first and takes the others' sum. So every
    contribution to a value lives from the step that writes it to the step that reads
    the value's gradient (the value's own stage, or the end for a network input); a
    view handed on keeps what it views alive as long."""
    _check(batch, dtype)
    itemsize = DTYPE_BYTES[dtype]
    order = list(reversed(groups))
    shapes: dict[str, tuple[int, ...]] = {}
    uses: dict[str, list[int]] = {}

    def use(name: str, step: int, source: str | None = None) -> None:
        if name not in uses:
            assert source is not None
            shapes[name] = (batch, *network.shapes[source])
            uses[name] = []
        uses[name].append(step)

    # names that may be pending[X]: what X's stage reads as its output's gradient
    holders: dict[str, set[str]] = {}
    for step, group in enumerate(order):
        received = holders.pop(group.name, set())
        for name in received:
            use(name, step)
        for index, source in enumerate(group.inputs):
            handed = set(received) if group.head.op in PASS_THROUGH else set()
            if group.head.op is not Op.FLATTEN:
                handed.add(f"grad:{group.name}:{index}")
            for name in handed:
                use(name, step, source)
            holders.setdefault(source, set()).update(handed)
    end = len(order)
    for names in holders.values():  # network inputs: copied out at the end
        for name in names:
            use(name, end)
    tensors = [Tensor(name, itemsize * math.prod(shapes[name]), min(steps), max(steps))
               for name, steps in uses.items()]
    buffers, assignment = _tightest(tensors)
    return BufferPlan(tuple(group.name for group in order), tuple(tensors), shapes,
                        tuple(buffers), assignment)


# Stages whose backward reads neither its inputs nor (without an activation) its output.
_MERGES = {Op.ADD, Op.CONCAT}


def transient_outputs(network: Network, groups: list[FusionGroup]) -> dict[str, int]:
    """Stage outputs that no backward reads, by name, with the step (index in `groups`)
    of the last stage that reads them; once it has run, their memory is free.

    Kept narrow, to what a residual network needs: the output of batch norm with no
    activation (alone, or after a product in one stage), every reader of which is an
    add or concat stage or reads it as the residual of a fused add, and which is no
    declared output (the caller reads those) and not written into a concatenation
    (fusion.concat_writes: its memory is the concatenation's)."""
    step = {group.name: index for index, group in enumerate(groups)}
    # the stage of each layer a reader may be: a group's head, or its fused add
    by_stage = {layer.name: group for group in groups for layer in group.layers
                if layer is group.head or layer is group.residual}
    declared = {output.name for output in network.outputs}
    in_concat = concat_writes(network, groups)
    transient: dict[str, int] = {}
    for group in groups:
        last = group.layers[-1]
        plain_norm = (last.op is Op.BATCHNORM
                      and (last.act is None or last.act.kind is Activation.IDENTITY))
        readers = [by_stage.get(name) for name in network.graph.consumers(group.name)]
        if (not plain_norm or group.name in declared or group.name in in_concat
                or not readers
                or any(reader is None or (reader.head.op not in _MERGES
                                          and reader.residual_source != group.name)
                       for reader in readers)):
            continue
        transient[group.name] = max(step[reader.name] for reader in readers
                                    if reader is not None)
    return transient


def plan_transient_outputs(network: Network, groups: list[FusionGroup], batch: int,
                           dtype: str) -> BufferPlan:
    """Buffers for the transient outputs (see transient_outputs) of a forward, shared
    where their lifetimes, from the stage that writes one to the last that reads it,
    never overlap. Steps are the stages in forward order."""
    _check(batch, dtype)
    itemsize = DTYPE_BYTES[dtype]
    step = {group.name: index for index, group in enumerate(groups)}
    shapes = {f"out:{name}": (batch, *network.shapes[name])
              for name in transient_outputs(network, groups)}
    tensors = [Tensor(name, itemsize * math.prod(shapes[name]), step[name[4:]], end)
               for name, end in ((f"out:{n}", e) for n, e
                                 in transient_outputs(network, groups).items())]
    buffers, assignment = _tightest(tensors)
    return BufferPlan(tuple(group.name for group in groups), tuple(tensors), shapes,
                        tuple(buffers), assignment)


__all__ = ["DTYPE_BYTES", "BufferPlan", "MemoryPlan", "Tensor", "assign_buffers",
           "assign_in_order",
           "plan_gradients", "plan_memory", "plan_transient_outputs",
           "transient_outputs"]
