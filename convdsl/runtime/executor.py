"""The executor: a checked network, compiled to kernels, run forward and backward.

    net = convdsl.compile("networks/lenet5.cnn", batch=64)
    scores = net.forward(images, train=True)
    loss = net.loss(labels)
    net.backward()            # fills net.grads
    net.params["c1.weight"]   # (6, 1, 5, 5), as PyTorch lays it out
    net.trained               # the trained ones, packed as net.grads is (devices.Packed)

Each layer runs its own generated kernels (convdsl/codegen); the executor
walks the graph in topological order, forward, and in reverse, backward,
summing the gradients of layers that feed several others. On the CPU the gradients
share memory where their lifetimes allow (passes/memory.py, plan_gradients).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from convdsl.codegen.buffers import with_buffers
from convdsl.codegen.cost import CHOICES as ALGORITHM_CHOICES
from convdsl.codegen.fused import build_stage, stage_arrays
from convdsl.codegen.layer import KernelLayer, LayerSetup, Mode, layer_setups
from convdsl.errors import RunError
from convdsl.ir.ops import Activation, Layer, Loss
from convdsl.ir.training import DTYPES, INITS
from convdsl.network import Network, load, loads
from convdsl.passes.fusion import ConcatWrite, FusionGroup, concat_writes, fusion_groups
from convdsl.passes.fusion import kind as _kind
from convdsl.passes.memory import BufferPlan, plan_gradients, plan_transient_outputs
from convdsl.runtime import losses
from convdsl.runtime.devices import Array, Device, Packed, device_named
from convdsl.runtime.params import init_params, network_params

if TYPE_CHECKING:
    from convdsl.runtime.optim import Optimizer

Arrays = dict[str, Array]  # NumPy arrays on the CPU, device arrays on CUDA


@dataclass(frozen=True)
class Stage:
    """One step of the forward pass (and, reversed, of the backward pass): a kernel
    layer that computes `layers` (one layer, or several fused) from the outputs
    named in `inputs`, and writes the output named `name`."""

    name: str
    kernel: KernelLayer
    inputs: tuple[str, ...]
    layers: tuple[Layer, ...]
    params: Arrays = field(default_factory=dict, compare=False)  # what the kernel reads
    grads: Arrays = field(default_factory=dict, compare=False)  # and writes, going back
    description: str = ""  # "c1 + bn1 + relu1 (conv+bn+relu)" for a fused group

    @property
    def layer(self) -> Layer:
        """The layer whose output this stage writes."""
        return self.layers[-1]


@dataclass(frozen=True)
class QueuedLoss:
    """One output's loss, started: on a GPU its partial sums are still on the device."""

    weight: float  # the output's weight in the total
    sums: Array  # partial sums (one on the CPU)
    count: int  # what their total is divided by: the loss is a mean

    def value(self, device: Device) -> float:
        """The loss; on a GPU the host waits here for the kernels queued before."""
        return float(np.sum(device.get(self.sums)) / self.count)


@dataclass(frozen=True)
class TrainStep:
    """What one training step reports (CompiledNetwork.train_step)."""

    loss: float  # the weighted total of the outputs' losses
    scores: np.ndarray  # the main output, as forward() returns it
    nonfinite: str | None  # what held NaN or infinity, when the step changed nothing


@dataclass(frozen=True)
class KernelReport:
    """One layer's compiled kernels, for `convdsl compile`."""

    layer: str
    op: str
    algorithm: str
    reason: str
    kernels: tuple[str, ...]  # spec hashes
    seconds: float  # first forward and backward: Numba compiles (or loads) here


class CompiledNetwork:
    """A network with its kernels, parameters and buffers for one batch size and dtype."""

    def __init__(self, network: Network, batch: int = 1, dtype: str = "float32",
                 algo: str | None = None, seed: int = 0, init: str = "pytorch",
                 check: bool = False, fuse: bool = True, device: str = "cpu",
                 share: bool = True) -> None:
        _check_options(batch, dtype, algo, init)
        # Opened first: no GPU, or no numba-cuda, is said before anything compiles.
        self.device: Device = device_named(device)
        self.network = network
        self.batch = batch
        self.dtype = dtype
        self.seed = seed
        self.check = check  # look for NaN and infinity after every layer
        self.step = 0  # training forwards so far: decides dropout masks
        self.fuse = fuse
        self.setups: dict[str, LayerSetup] = layer_setups(network, batch, dtype, algo,
                                                          device)
        initial = init_params(network, seed, init, dtype)
        shapes = {info.name: info.shape for info in network_params(network) if info.trained}
        # The trained parameters, and their gradients, are views into one flat array
        # each (in the same layout), so that an optimizer step or a NaN check is one
        # pass over all of them: on a GPU one launch, not one per parameter.
        self.trained: Packed = self.device.packed(shapes, dtype)
        self.grads: Packed = self.device.packed(shapes, dtype)
        for name in shapes:
            self.device.assign(self.trained[name], initial[name])
        self.params: Arrays = {name: self.trained[name] if name in shapes
                               else self.device.put(array) for name, array in initial.items()}
        self._layer_params = _by_layer(self.params)
        self._layer_grads = _by_layer(self.grads)
        groups = fusion_groups(network, fuse)
        # On the CPU, gradients whose lifetimes never overlap share memory (a plan made
        # once); CUDA kernels allocate their own. share=False: a buffer per gradient.
        self.gradient_plan: BufferPlan | None = (
            plan_gradients(network, groups, batch, dtype)
            if share and self.device.name == "cpu" else None)
        self._gradient_arrays = _planned_arrays(self.gradient_plan, dtype)
        # ... and so do outputs no backward reads, once the stages reading them have run
        self.output_plan: BufferPlan | None = (
            plan_transient_outputs(network, groups, batch, dtype)
            if share and self.device.name == "cpu" else None)
        transient = _planned_arrays(self.output_plan, dtype)
        self._transient = {name.removeprefix("out:") for name in transient}
        # ... and on the CPU a branch's last stage writes straight into its channels of a
        # concatenation, where it can: the concatenation copies only the others
        self.concat_writes: dict[str, ConcatWrite] = (
            concat_writes(network, groups) if fuse and self.device.name == "cpu" else {})
        self._concats = _concat_buffers(network, self.concat_writes, batch, dtype)
        setups = _with_planned_buffers(groups, self.setups, self._gradient_arrays,
                                       transient, self._concats,
                                       _concat_slices(self.concat_writes, self._concats))
        self.stages: list[Stage] = [
            Stage(group.name, build_stage(group, setups), group.inputs, group.layers,
                  stage_arrays(group, self._layer_params),
                  stage_arrays(group, self._layer_grads),
                  group.describe() if group.fused else "")
            for group in groups]
        # stage name -> its kernel layer (a fused stage is named by its last layer)
        self.kernels: dict[str, KernelLayer] = {s.name: s.kernel for s in self.stages}
        self._fused_into = {layer.name: stage.name for stage in self.stages
                            for layer in stage.layers[:-1]}
        inputs = set(network.input_shapes)
        # The stages that read only network inputs: their inputs' gradients are only
        # backward()'s return value, which training does not ask for.
        self.input_stages: set[str] = {stage.name for stage in self.stages
                                   if all(source in inputs for source in stage.inputs)}
        self._values: Arrays = {}  # every layer's output in the last forward
        self._warm_up_values: Arrays = {}  # warm_up's, of the stages in concat_writes
        self._loss_grads: Arrays = {}
        self._through_softmax: set[str] = set()
        self._nonfinite: Array = self.device.zeros((1,), np.int32)  # train_step's count
        # on a GPU, a training step and an inference that repeat run as CUDA graphs
        self._recorders = {"train_step": self.device.recorder(),
                           "inference": self.device.recorder()}
        # CUDA: where the gradients of a value read by several stages are added
        self._accumulators: Arrays = {}
        self._input_buffers: Arrays = {}  # where inputs and targets land on the device
        self._work_buffers: Arrays = {}  # loss gradients and their copies, made once
        self.compile_seconds: dict[str, float] = {}

    # --- shapes -----------------------------------------------------------

    @property
    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.network.input_shapes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.network.input_shape

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.network.output_shape

    @property
    def main_output(self) -> str:
        return next(output.name for output in self.network.outputs if not output.aux)

    # --- forward ----------------------------------------------------------

    def forward(self, x: np.ndarray | Mapping[str, np.ndarray], train: bool = False,
                step: int | None = None) -> np.ndarray:
        """The main output for a batch; every declared output lands in `outputs`."""
        inputs = self._checked_inputs(x)
        with self._recorded("inference" if not train else None):
            self._forward(inputs, train, step)
        return self.device.get(self._values[self.main_output])

    def _recorded(self, pass_: str | None) -> contextlib.AbstractContextManager[None]:
        """Run a pass that repeats (a training step, an inference: `pass_`) so that the
        GPU can replay it as CUDA graphs (codegen/cuda/graphs.py). Not with `check`, which
        reads every stage's output in the middle of the pass."""
        if pass_ is None or self.check:
            return contextlib.nullcontext()
        return self._recorders[pass_].pass_()

    def _forward(self, inputs: Arrays, train: bool, step: int | None) -> None:
        """Send checked inputs and run every stage (on a GPU, queue them): each stage's
        output lands in `_values`. A training forward without a step takes the next."""
        if train and step is None:
            step = self.step
            self.step += 1
        mode = Mode(train=train, seed=self.seed, step=step or 0)
        values = {name: self._send(name, array) for name, array in inputs.items()}
        for stage in self._run_stages(values, mode):
            if self.check:
                self._check_finite(values[stage.name], stage.layer, "output")
        self._values = values
        self._loss_grads = {}

    def _run_stages(self, values: Arrays, mode: Mode) -> Iterator[Stage]:
        """Run the stages in order, each output into `values`; yields each stage once
        its output is there. What they need from the host goes first (KernelLayer.send)."""
        for stage in self.stages:
            stage.kernel.send(mode)
        for stage in self.stages:
            sources = [values[source] for source in stage.inputs]
            values[stage.name] = stage.kernel.forward(sources, stage.params, mode)
            yield stage

    def _send(self, name: str, array: np.ndarray) -> Array:
        """A batch (of inputs, or of targets) where the kernels read it: the array itself
        on the CPU, a device buffer kept under `name` on CUDA (one copy per batch)."""
        if self.device.name == "cpu":
            return array
        buffer = self._input_buffers.get(name)
        if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
            buffer = self._input_buffers[name] = self.device.zeros(array.shape, array.dtype)
        self.device.assign(buffer, array)
        return buffer

    def _copy(self, name: str, array: Array) -> Array:
        """`array` copied into the work array `name`."""
        buffer = self._buffer(name, array.shape)
        self.device.copy(array, buffer)
        return buffer

    def _buffer(self, name: str, shape: tuple[int, ...]) -> Array:
        """A work array of this network's dtype kept under `name`, made on first use."""
        buffer = self._work_buffers.get(name)
        if buffer is None:
            buffer = self._work_buffers[name] = self.device.zeros(shape, self.dtype)
        return buffer

    def written_in_place(self) -> dict[str, ConcatWrite]:
        """The stages whose last forward (or warm_up's) wrote their output straight into
        a concatenation's channels: those of `concat_writes` but a direct convolution's,
        which writes memory of its own that the concatenation copies (conv.py,
        STRIDED_OUTPUT_SLOW). Empty before the first forward."""
        values = self._values or self._warm_up_values
        return {stage: write for stage, write in self.concat_writes.items()
                if stage in values and np.may_share_memory(
                    values[stage], self._concats[write.concat])}

    def first_nonfinite(self, x: np.ndarray | Mapping[str, np.ndarray], train: bool = False,
                        step: int | None = None) -> Stage | None:
        """Run a forward pass checking every stage's output; the first stage whose output
        holds NaN or infinity, or None. With the step of a training forward, the same
        dropout masks are drawn, so this reruns that forward exactly."""
        inputs = self._checked_inputs(x)
        mode = Mode(train=train, seed=self.seed, step=step if step is not None else self.step)
        values = {name: self._send(name, array) for name, array in inputs.items()}
        for stage in self._run_stages(values, mode):
            if self.device.count_nonfinite(values[stage.name]):
                return stage
        return None

    @property
    def outputs(self) -> Arrays:
        """Copies of every declared output (main and auxiliary) of the last forward."""
        return {output.name: self.device.get(self._values[output.name])
                for output in self.network.outputs if output.name in self._values}

    def activation(self, layer: str) -> np.ndarray:
        """A copy of one layer's output in the last forward."""
        if layer in self._fused_into:
            raise RunError(f"layer '{layer}' is fused into stage '{self._fused_into[layer]}', "
                           "so its output is never stored",
                           "compile with fuse=False (or --no-fuse) to read every layer")
        if layer not in self._values:
            raise RunError(f"no output of '{layer}' from the last forward",
                           "run forward first, and name a layer of this network")
        if layer in self._transient:
            raise RunError(f"the output of '{layer}' is not kept: no backward reads it, so "
                           "its memory serves later layers once its readers have run",
                           "compile with share=False to read it")
        return self.device.get(self._values[layer])

    # --- loss -------------------------------------------------------------

    def loss(self, targets: np.ndarray | Mapping[str, np.ndarray]) -> float:
        """The weighted sum of the outputs' losses for the last forward; `backward()`
        then starts from their gradients. An array is the target of the only output
        with a loss; a mapping gives targets by output name."""
        if not self._values:
            raise RunError("loss() needs a forward pass first", "call net.forward(x) first")
        return self._total(self._queue_losses(self._send_targets(targets)))

    def _total(self, queued: list[QueuedLoss]) -> float:
        """The weighted sum of queued losses; on a GPU the host waits here."""
        return float(sum(loss.weight * loss.value(self.device) for loss in queued))

    def _send_targets(self, targets: np.ndarray | Mapping[str, np.ndarray]) -> Arrays:
        """The targets of each output with a loss, checked against its shape and sent
        where the loss kernels read them (on a GPU one copy per batch)."""
        by_output = self._targets_by_output(targets)
        sent: Arrays = {}
        for output in self.network.outputs:
            if output.loss is Loss.NONE:
                continue
            target = np.asarray(by_output[output.name])
            shape = (self.batch, *self.network.shapes[output.name])
            try:
                losses.check_targets(output.loss, shape, target, output.name)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            if output.loss is Loss.MSE:  # compared in the output's dtype, as on the CPU
                target = target.astype(self.dtype)
            sent[output.name] = self._send(f"target/{output.name}", target)
        return sent

    def _queue_losses(self, targets: Arrays) -> list[QueuedLoss]:
        """Start each output's loss on the last forward, from sent targets: its gradient
        (scaled by the output's weight) is what `backward()` starts from; its value is
        read only when asked for (QueuedLoss.value)."""
        self._loss_grads, self._through_softmax = {}, set()
        queued = []
        for output in self.network.outputs:
            if output.loss is Loss.NONE:
                continue
            layer = self.network.graph.layer(output.name)
            softmax = layer.act is not None and layer.act.kind is Activation.SOFTMAX
            # The gradient may skip the softmax only if nothing else reads its output.
            feeds_others = bool(self.network.graph.consumers(output.name))
            sums, count, grad, through_softmax = self._output_loss(
                output.loss, self._values[output.name], targets[output.name], softmax,
                grad_at_logits=not feeds_others, name=output.name)
            if output.weight != 1.0:
                self.device.scale(grad, output.weight)
            self._loss_grads[output.name] = grad
            if through_softmax:
                self._through_softmax.add(output.name)
            queued.append(QueuedLoss(output.weight, sums, count))
        return queued

    def _output_loss(self, loss: Loss, value: Array, target: Array, softmax: bool,
                     grad_at_logits: bool, name: str) -> tuple[Array, int, Array, bool]:
        """One output's loss: its partial sums and their divisor, its gradient (an array
        where the kernels read it), and whether that gradient skips the softmax. On
        CUDA the loss runs on the device and nothing comes back yet."""
        if self.device.name == "cpu":
            result = losses.evaluate(loss, value, target, softmax, grad_at_logits)
            return (np.array([result.value]), 1, result.grad.astype(self.dtype),
                    result.through_softmax)
        from convdsl.codegen.cuda import losses as device_losses

        grad = self._buffer(f"loss/{name}", value.shape)  # one per output: aux heads too
        queued = device_losses.queue(loss, value, target, softmax, grad_at_logits, grad)
        return queued.partial, queued.count, grad, queued.through_softmax

    def _targets_by_output(self, targets: np.ndarray | Mapping[str, np.ndarray]
                           ) -> Mapping[str, np.ndarray]:
        with_loss = [o.name for o in self.network.outputs if o.loss is not Loss.NONE]
        if isinstance(targets, Mapping):
            missing = [name for name in with_loss if name not in targets]
            if missing:
                raise RunError(f"no targets for output{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(repr(m) for m in missing)}",
                               f"give targets for {', '.join(with_loss)}")
            return targets
        if len(with_loss) != 1:
            raise RunError(f"this network has {len(with_loss)} outputs with a loss "
                           f"({', '.join(with_loss)}), so one target array is ambiguous",
                           "pass a dict of targets by output name")
        return {with_loss[0]: targets}

    # --- backward ---------------------------------------------------------

    @overload
    def backward(self, grad: np.ndarray | Mapping[str, np.ndarray] | None = None, *,
                 input_grad: Literal[True] = True) -> np.ndarray | Arrays: ...

    @overload
    def backward(self, grad: np.ndarray | Mapping[str, np.ndarray] | None = None, *,
                 input_grad: Literal[False]) -> None: ...

    def backward(self, grad: np.ndarray | Mapping[str, np.ndarray] | None = None, *,
                 input_grad: bool = True) -> np.ndarray | Arrays | None:
        """Gradients of every trained parameter into `grads`; returns the gradient of
        the input (a dict by name when the network has several inputs), or None with
        input_grad=False, which training uses: on a GPU the input's gradient then never
        crosses to the host. Without `grad`, starts from the losses of the last `loss()`
        call. The input's gradient comes back as a copy: inside, on the CPU, it lives in
        a buffer that the next backward() reuses for other gradients (gradient_plan)."""
        if not self._values:
            raise RunError("backward() needs a forward pass first", "call net.forward(x)")
        pending, skip = self._initial_grads(grad)
        handed: set[int] = set()
        for stage in reversed(self.stages):
            grad_output = pending.pop(stage.name, None)
            if grad_output is None:
                for array in stage.grads.values():
                    self.device.fill(array, 0.0)  # no gradient reaches this stage
                continue
            stage.kernel.input_grad_needed = (input_grad
                                              or stage.name not in self.input_stages)
            results = stage.kernel.backward(grad_output, stage.params, stage.grads,
                                            skip_act=stage.name in skip)
            for source, result in zip(stage.inputs, results):
                if result is None:
                    continue
                if id(result) in handed:  # never let two layers share one gradient
                    result = self.device.duplicate(result)
                handed.add(id(result))
                self._accumulate(pending, source, result)
        if not input_grad:
            return None
        grads = {layer.name: (self.device.get(pending[layer.name]) if layer.name in pending
                              else np.zeros((self.batch, *self.network.shapes[layer.name]),
                                            self.dtype))
                 for layer in self.network.graph.inputs()}
        if len(grads) == 1:
            return next(iter(grads.values()))
        return grads

    def _initial_grads(self, grad: np.ndarray | Mapping[str, np.ndarray] | None
                       ) -> tuple[Arrays, set[str]]:
        if grad is None:
            if not self._loss_grads:
                raise RunError("backward() without a gradient needs loss() first",
                               "call net.loss(targets), or pass the output's gradient")
            # copies, since a backward may overwrite its incoming gradient and loss()'s
            # gradients must serve every backward() until the next loss()
            return ({name: self._copy(f"backward/{name}", g)
                     for name, g in self._loss_grads.items()}, set(self._through_softmax))
        given = grad if isinstance(grad, Mapping) else {self.main_output: grad}
        pending: Arrays = {}
        for name, array in given.items():
            if name not in self._values or not any(o.name == name
                                                   for o in self.network.outputs):
                raise RunError(f"'{name}' is not an output of this network",
                               f"outputs: {', '.join(o.name for o in self.network.outputs)}")
            expected = (self.batch, *self.network.shapes[name])
            pending[name] = self.device.put(
                self._checked_array(array, expected, f"gradient of '{name}'").copy())
        return pending, set()

    def _accumulate(self, pending: Arrays, source: str, grad: np.ndarray) -> None:
        """Add `grad` to what `source` has received. On the CPU into the first
        contribution itself: no one else reads it (a kernel rewrites its input gradient
        at every backward, loss() gradients are copied, flatten's views and duplicates
        are the executor's own), and the plan keeps it alive until the source's stage
        reads it (passes/memory.py, plan_gradients)."""
        if source not in pending:
            pending[source] = grad
            return
        if self.device.name == "cpu":
            self.device.add(pending[source], grad, pending[source])
            return
        total = self._accumulators.get(source)
        if total is None:
            total = self._accumulators[source] = self.device.zeros(grad.shape, self.dtype)
        self.device.add(pending[source], grad, total)
        pending[source] = total

    # --- one training step ------------------------------------------------

    def train_step(self, x: np.ndarray | Mapping[str, np.ndarray],
                   targets: np.ndarray | Mapping[str, np.ndarray], optimizer: Optimizer,
                   lr: float) -> TrainStep:
        """One step of training as `convdsl train` takes it: a training forward, the
        losses, backward (no input gradient), a count of NaN and infinity in the losses
        and in every gradient, and the optimizer's update, gated by that count: a step
        that finds one changes no parameter (batch norm's running statistics have moved,
        as after any training forward).

        On a GPU the host waits for the device once, at the end, to read the count, the
        losses and the scores; everything before is queued. The batch, its targets and
        what the update reads on the device (Optimizer.send) go out first, because a copy
        from host memory waits for every kernel queued before it; the queued part is one
        recorded pass, replayed as CUDA graphs once it repeats (codegen/cuda/graphs.py)."""
        inputs = self._checked_inputs(x)
        targets_sent = self._send_targets(targets)
        optimizer.send(lr)
        gate = self._nonfinite
        with self._recorded("train_step"):
            self._forward(inputs, train=True, step=None)
            self.device.fill(gate, 0)
            queued = self._queue_losses(targets_sent)
            for loss in queued:
                self.device.add_nonfinite(loss.sums, gate)
            self.backward(input_grad=False)
            self.device.add_nonfinite(self.grads.flat, gate)
            optimizer.step(self.trained, self.grads, lr, skip_if=gate)
        # the one wait: everything above has run once the first copy is back
        closed = bool(self.device.get(gate)[0])
        value = self._total(queued)
        scores = self.device.get(self._values[self.main_output])
        if not closed:
            return TrainStep(value, scores, None)
        optimizer.skipped()
        if not math.isfinite(value):
            return TrainStep(value, scores, f"the loss is {value}")
        bad = self.device.first_nonfinite(self.grads)
        return TrainStep(value, scores, f"the gradient of '{bad}' holds NaN or infinity")

    # --- parameters -------------------------------------------------------

    def state_dict(self) -> Arrays:
        """Host copies of every parameter and buffer, by PyTorch name."""
        return {name: self.device.get(array) for name, array in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Copy arrays in (NumPy arrays, or anything np.asarray takes, such as CPU
        tensors), checking names and shapes first so that a bad file changes nothing."""
        missing = [name for name in self.params if name not in state]
        unexpected = [name for name in state if name not in self.params]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing {_some(missing)}")
            if unexpected:
                parts.append(f"unexpected {_some(unexpected)}")
            raise RunError(f"the state does not fit network '{self.network.name}': "
                           + "; ".join(parts),
                           "was it saved from another network? strict=False loads the "
                           "names that match")
        arrays = {}
        for name in self.params:
            if name not in state:
                continue
            value = np.asarray(state[name])
            if value.shape != self.params[name].shape:
                raise RunError(f"'{name}' has shape {value.shape} in the state but "
                               f"{self.params[name].shape} in network '{self.network.name}'")
            arrays[name] = value
        for name, value in arrays.items():
            self.device.assign(self.params[name], value)

    # --- compilation ------------------------------------------------------

    def warm_up(self) -> dict[str, float]:
        """Run every kernel once (training forward and backward, then inference) so that
        Numba compiles or loads them now; returns the seconds per layer. Parameters,
        buffers and the step counter are left as they were."""
        # Only what a forward changes is saved: batch norm's running statistics (no
        # copy of the trained parameters, which would add their size to the peak).
        saved = {name: self.device.get(array) for name, array in self.params.items()
                 if name not in self.grads}
        step = self.step
        rng = np.random.default_rng(0)
        inputs = {name: self._send(name, rng.standard_normal((self.batch, *shape))
                                   .astype(self.dtype))
                  for name, shape in self.input_shapes.items()}
        values = dict(inputs)
        seconds: dict[str, float] = {}
        for train in (True, False):
            for stage in self.stages:
                start = time.perf_counter()
                values[stage.name] = stage.kernel.forward(
                    [values[s] for s in stage.inputs], stage.params,
                    Mode(train=train, seed=self.seed))
                seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - start
            if train:
                for stage in reversed(self.stages):
                    start = time.perf_counter()
                    grad = self.device.put(np.ones(values[stage.name].shape, self.dtype))
                    stage.kernel.backward(grad, stage.params, stage.grads)
                    seconds[stage.name] += time.perf_counter() - start
        self._warm_up_values = {name: values[name] for name in self.concat_writes}
        self.load_state_dict(saved, strict=False)
        self.step = step
        self.device.fill(self.grads.flat, 0.0)
        self.device.synchronize()
        self.compile_seconds = seconds
        return seconds

    def report(self) -> list[KernelReport]:
        """One line per layer: its kernels, algorithm, and first-run seconds."""
        return [KernelReport(stage.name, "+".join(_kind(layer) for layer in stage.layers),
                             stage.kernel.algorithm, stage.kernel.reason,
                             tuple(spec.key for spec in stage.kernel.specs),
                             self.compile_seconds.get(stage.name, 0.0))
                for stage in self.stages]

    # --- input checks -----------------------------------------------------

    def _checked_inputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> Arrays:
        shapes = self.input_shapes
        if not isinstance(x, Mapping):
            if len(shapes) != 1:
                raise RunError(f"this network has {len(shapes)} inputs "
                               f"({', '.join(shapes)})", "pass a dict of arrays by input name")
            x = {next(iter(shapes)): x}
        unknown = [name for name in x if name not in shapes]
        if unknown:
            raise RunError(f"'{unknown[0]}' is not an input of this network",
                           f"inputs: {', '.join(shapes)}")
        arrays = {}
        for name, shape in shapes.items():
            if name not in x:
                raise RunError(f"no array for input '{name}'")
            arrays[name] = self._checked_array(x[name], (self.batch, *shape), f"input '{name}'")
            if self.check:
                self._check_finite(arrays[name], self.network.graph.layer(name), "input")
        return arrays

    def _checked_array(self, value: Any, expected: tuple[int, ...], what: str) -> np.ndarray:
        if not isinstance(value, np.ndarray):
            raise RunError(f"{what} must be a NumPy array, not {type(value).__name__}",
                           "convert it with np.asarray(...)")
        if value.ndim != len(expected):
            raise RunError(f"{what} has {value.ndim} axes {value.shape} but this network "
                           f"takes {len(expected)}: batch x {'x'.join(map(str, expected[1:]))}",
                           _shape_hint(value.shape, expected))
        if value.shape[0] != expected[0] and value.shape[1:] == expected[1:]:
            raise RunError(f"{what} holds a batch of {value.shape[0]} but the network was "
                           f"compiled for batch {expected[0]}",
                           f"compile with batch={value.shape[0]}, or pass {expected[0]} "
                           "examples at a time")
        if value.shape != expected:
            raise RunError(f"{what} has shape {value.shape} but this network takes "
                           f"{expected}", _shape_hint(value.shape, expected))
        if value.dtype != np.dtype(self.dtype):
            raise RunError(f"{what} has dtype {value.dtype} but the network was compiled for "
                           f"{self.dtype}", f"convert with x.astype('{self.dtype}'), or compile "
                           f"with dtype='{value.dtype}'" if value.dtype.name in DTYPES else
                           f"convert with x.astype('{self.dtype}')")
        return np.ascontiguousarray(value)

    def _check_finite(self, values: Array, layer: Layer, what: str) -> None:
        bad = (Device().count_nonfinite(values) if isinstance(values, np.ndarray)
               else self.device.count_nonfinite(values))
        if bad:
            raise RunError(f"{what} of '{layer.name}' ({layer.op.value}) holds {bad} NaN or "
                           "infinite value" + ("s" if bad > 1 else ""),
                           "check the input data, or lower the learning rate"
                           if what == "output" else
                           "clean the data before it reaches the network")


def compile(source: str | Path | Network, batch: int = 1, dtype: str = "float32",
            algo: str | None = None, seed: int = 0, init: str = "pytorch",
            check: bool = False, warm: bool = True, fuse: bool = True,
            device: str = "cpu", share: bool = True) -> CompiledNetwork:
    """Compile a `.cnn` file (a path), `.cnn` text, or a loaded Network.

    batch: the batch size the kernels are specialised for. dtype: float32 or
    float64. algo: direct, gemm, fft or winograd (auto, tune) for every convolution,
    overriding the file; winograd falls back to the automatic choice where it does not
    apply. seed/init: the parameters' initialisation (see runtime/params.py).
    check: stop with an error at the first NaN or infinity. warm: compile every
    kernel now (otherwise at first use). fuse: run fusable layers as one stage
    (convdsl/passes/fusion.py); False gives one stage per layer. device: "cpu", or
    "cuda" for an NVIDIA GPU through numba.cuda (pip install "convdsl[cuda]"); there
    `params` and `grads` are device arrays, and state_dict() gives host copies.
    share: on the CPU, let gradients whose lifetimes never overlap share memory
    (passes/memory.py, plan_gradients); False gives each its own, with the same
    results bit for bit."""
    network = _as_network(source)
    compiled = CompiledNetwork(network, batch, dtype, algo, seed, init, check, fuse, device,
                               share)
    if warm:
        from convdsl.codegen import parallel  # it reads this module's classes

        parallel.warm(compiled)
    return compiled


def _as_network(source: str | Path | Network) -> Network:
    if isinstance(source, Network):
        return source
    if isinstance(source, Path):
        return load(source)
    looks_like_path = "\n" not in source and (source.endswith(".cnn") or Path(source).is_file())
    return load(source) if looks_like_path else loads(source)


def _check_options(batch: int, dtype: str, algo: str | None, init: str) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise RunError(f"batch must be a whole number of at least 1, not {batch!r}")
    if dtype not in DTYPES:
        raise RunError(f"dtype must be float32 or float64, not {dtype!r}")
    if algo is not None and algo not in ALGORITHM_CHOICES:
        raise RunError(f"unknown convolution algorithm {algo!r}",
                       f"choose one of {', '.join(ALGORITHM_CHOICES)}")
    if init not in INITS:
        raise RunError(f"unknown initialisation {init!r}", f"choose one of {', '.join(INITS)}")


def _planned_arrays(plan: BufferPlan | None, dtype: str) -> dict[str, np.ndarray]:
    """Every planned tensor as a view of its buffer (tensors of one buffer never are
    alive at once); nothing without a plan."""
    if plan is None:
        return {}
    itemsize = np.dtype(dtype).itemsize
    memory = [np.zeros(size // itemsize, dtype=dtype) for size in plan.buffers]
    return {name: memory[plan.assignment[name]][:math.prod(shape)].reshape(shape)
            for name, shape in plan.shapes.items()}


def _concat_buffers(network: Network, writes: Mapping[str, ConcatWrite], batch: int,
                    dtype: str) -> dict[str, np.ndarray]:
    """The output of every concatenation some stage writes into, by its name."""
    return {concat: np.zeros((batch, *network.shapes[concat]), dtype=dtype)
            for concat in dict.fromkeys(write.concat for write in writes.values())}


def _concat_slices(writes: Mapping[str, ConcatWrite], concats: Mapping[str, np.ndarray]
                   ) -> dict[str, np.ndarray]:
    """The channels of its concatenation each stage of `writes` writes, by stage."""
    return {stage: concats[write.concat][:, write.offset:write.offset + write.channels]
            for stage, write in writes.items()}


def _with_planned_buffers(groups: list[FusionGroup], setups: dict[str, LayerSetup],
                          grads: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                          concats: Mapping[str, np.ndarray], slices: Mapping[str, np.ndarray]
                          ) -> dict[str, LayerSetup]:
    """The setups a stage's kernels are built from: the head's with the planned buffers
    of the stage's input gradients (a fused add's, for its residual's), and the layer
    that writes a stage's output (the batch norm's, if any, else the head's) with the
    output's given buffer: planned memory for a transient output (transient_outputs
    takes only batch norm stages), a concatenation's channels for a stage that writes
    into one, and the concatenation's own array for the concatenation."""
    shared: dict[str, LayerSetup] = dict(setups)
    for group in groups:
        head = group.head.name
        if grads:
            shared[head] = with_buffers(shared[head], input_grads=tuple(
                grads.get(f"grad:{group.name}:{index}")
                for index in range(len(group.head.inputs))))
        add = group.residual
        if grads and add is not None:  # the residual's gradient: the add's input buffer
            planned = grads.get(f"grad:{group.name}:{len(group.head.inputs)}")
            shared[add.name] = with_buffers(shared[add.name], input_grads=tuple(
                planned if source == group.residual_source else None
                for source in add.inputs))
        writer = group.norm.name if group.norm is not None else head
        output = outputs.get(f"out:{group.name}")
        if output is not None:
            shared[writer] = with_buffers(shared[writer], output=output)
        if group.name in slices:  # never also a transient output (transient_outputs)
            shared[writer] = with_buffers(shared[writer], output=slices[group.name],
                                          into_concat=True)
        if head in concats:  # a concatenation, maybe pooled after
            shared[head] = with_buffers(shared[head], output=concats[head])
    return shared


def _by_layer(arrays: Mapping[str, Array]) -> dict[str, Arrays]:
    """{'c1.weight': w} -> {'c1': {'weight': w}}: the same array objects, grouped."""
    grouped: dict[str, Arrays] = {}
    for name, array in arrays.items():
        layer, _, field = name.rpartition(".")
        grouped.setdefault(layer, {})[field] = array
    return grouped


def _some(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _shape_hint(shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    if len(shape) == len(expected) - 1 and shape == expected[1:]:
        return "add the batch axis: x[None] for one example"
    if len(shape) == len(expected) - 1 and shape[1:] == expected[2:]:
        return "add the channel axis: x[:, None]"
    return f"reshape to {expected}"
