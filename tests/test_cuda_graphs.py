"""A training step or an inference that repeats runs as one CUDA graph
(codegen/cuda/graphs.py), and a launch site keeps several sets of packed arguments
(codegen/cuda/common.Launch).

On a GPU (CONVDSL_TEST_GPU=1) these tests run cuda.core's graphs themselves. The
simulator packs nothing and has no graphs, so there a stand-in packs each launch as a
call of the simulated kernel and a stand-in graph builder records those calls and
replays them in order: everything but the driver's part runs as on a GPU. Either way a
network trained with graphs must end bit for bit where its twin without them ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kernel_harness import random_array

import convdsl
from convdsl.ir.ops import Loss
from convdsl.ir.training import TrainSettings
from convdsl.runtime.executor import CompiledNetwork
from convdsl.runtime.optim import make_optimizer

pytestmark = pytest.mark.cuda

# Batch norm, dropout, a flatten, a residual add, two losses: a step touches every kind
# of launch site (generated kernels, whole-array kernels, the optimizer's, copies).
NETWORK = """
input x: 2x4x4
c = conv(3, 3, pad=same, act=relu)
n = c -> conv(3, 3, pad=same, bias=no) -> bn
s = add(n, c, act=relu)
p = s -> maxpool(2)
f = flatten
d = dropout(0.5)
y = d -> dense(4, act=softmax)
h = f -> dense(3)
output y loss=cross_entropy
aux h loss=cross_entropy weight=0.3
"""
TARGETS = {"y": np.array([1, 3]), "h": np.array([0, 2])}
MOMENTUM = TrainSettings(optimizer="sgd", lr=0.1, momentum=0.9)


class StandInGraph:
    """What the stand-in builder completes to: its calls, replayed in order."""

    def __init__(self, calls: list[tuple[Any, tuple[Any, ...]]]) -> None:
        self.calls = calls
        self.launched = 0

    def launch(self, stream: Any) -> None:
        self.launched += 1
        for function, args in self.calls:
            function(*args)


class StandInBuilder:
    """cuda.core's GraphBuilder as graphs.build uses it, for the simulator."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def begin_building(self) -> StandInBuilder:
        return self

    @property
    def stream(self) -> StandInBuilder:  # the capturing stream: launches land here
        return self

    def end_building(self) -> StandInBuilder:
        return self

    def complete(self) -> StandInGraph:
        return StandInGraph(self.calls)


def stand_in_launch(target: Any, config: Any, function: Any, *args: Any) -> None:
    """cuda.core's launch: into a graph being built, or now (function is the simulator's
    configured kernel, args its arguments in their views)."""
    if isinstance(target, StandInBuilder):
        target.calls.append((function, args))
    else:
        function(*args)


@pytest.fixture
def graphs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """codegen/cuda/graphs with fresh counts; in the simulator, the stand-ins."""
    from convdsl.codegen.cuda import common, graphs

    monkeypatch.setattr(graphs, "GRAPHS", True)
    monkeypatch.setattr(graphs, "CHUNK", 8)  # a step is several graphs
    monkeypatch.setattr(graphs, "GRAPH_COUNTS", counts())
    monkeypatch.setattr(graphs, "FAILURE", [])
    monkeypatch.setattr(common, "PACKED", True)
    if common.simulated():
        def pack(configured: Any, shaped: tuple[Any, ...], args: tuple[Any, ...]
                 ) -> common.PackedLaunch:
            common.LAUNCH_COUNTS["packed"] += 1
            return common.PackedLaunch(stand_in_launch, "stream", None, configured, shaped,
                                       (*args, *shaped))

        monkeypatch.setattr(common, "_pack", pack)
        monkeypatch.setattr(graphs, "new_builder", StandInBuilder)
    yield graphs


def counts() -> dict[str, int]:
    return {"built": 0, "launched": 0, "replayed": 0, "plain": 0}


def compiled() -> CompiledNetwork:
    return convdsl.compile(NETWORK, batch=2, dtype="float64", seed=3, device="cuda",
                           warm=False)


def train(net: CompiledNetwork, rates: list[float], settings: TrainSettings = MOMENTUM
          ) -> tuple[list[float], dict[str, np.ndarray]]:
    """A step per learning rate in `rates`, each on a new batch: the losses, the state."""
    optimizer = make_optimizer(settings, net.trained)
    rng = np.random.default_rng(7)
    losses = []
    for lr in rates:
        step = net.train_step(random_array(rng, (2, 2, 4, 4)), TARGETS, optimizer, lr)
        assert step.nonfinite is None
        losses.append(step.loss)
    return losses, net.state_dict()


def plain(graphs: Any, rates: list[float], settings: TrainSettings = MOMENTUM
          ) -> tuple[list[float], dict[str, np.ndarray]]:
    """The same training with graphs off: what the graphs must reproduce. The counts
    start again after it."""
    graphs.GRAPHS = False
    try:
        return train(compiled(), rates, settings)
    finally:
        graphs.GRAPHS = True
        graphs.GRAPH_COUNTS.update(counts())


def assert_same(got: tuple[list[float], dict[str, np.ndarray]],
                want: tuple[list[float], dict[str, np.ndarray]]) -> None:
    assert got[0] == want[0]
    assert got[1].keys() == want[1].keys()
    for name, value in want[1].items():
        np.testing.assert_array_equal(got[1][name], value, err_msg=name)


def test_a_repeating_training_step_runs_as_graphs(graphs: Any) -> None:
    """The first step compiles and packs, and starts the momentum (an argument of the
    update); the third launches what the second did, so the fourth holds its launches
    back and launches them as graphs of CHUNK launches, built once and replayed by every
    step after."""
    rates = [0.1] * 5
    want = plain(graphs, rates)
    assert_same(train(compiled(), rates), want)
    built = graphs.GRAPH_COUNTS["built"]
    assert built >= 3  # the step's launches, 8 to a graph
    assert dict(graphs.GRAPH_COUNTS) == {"built": built, "launched": 2 * built,
                                         "replayed": 2, "plain": 3}
    assert not graphs.FAILURE


EVERY_OP = ["examples/every_op_image.cnn", "examples/every_op_signal.cnn",
            "examples/every_op_volume.cnn", "networks/lenet5.cnn"]


@pytest.mark.parametrize("path", EVERY_OP)
def test_between_its_first_and_last_launch_a_pass_only_launches(
        monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Held launches go out later than the host reached them, which is only right if
    nothing else reaches the GPU in between: no copy from the host or back, and no
    copy between device arrays (numba.cuda's, which no recorder sees). Checked for a
    training step and an inference of every layer of the language in 1-D, 2-D and
    3-D, in the simulator with no kernel run: only the order of the host's calls."""
    from numba import cuda

    from convdsl.codegen.cuda import common

    if not common.simulated():
        pytest.skip("watches the simulator's copies")
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    events: list[str] = []
    copy_to_device, copy_to_host = FakeCUDAArray.copy_to_device, FakeCUDAArray.copy_to_host
    device_array, to_device = cuda.device_array, cuda.to_device

    def copied_to_device(array: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("within" if isinstance(source, FakeCUDAArray) else "to device")
        return copy_to_device(array, source, *args, **kwargs)

    def copied_to_host(array: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("to host")
        return copy_to_host(array, *args, **kwargs)

    def sent(*args: Any, **kwargs: Any) -> Any:
        events.append("to device")
        return to_device(*args, **kwargs)

    def zeroed(*args: Any, **kwargs: Any) -> Any:  # no kernel fills it: zeros, not NaN
        array = device_array(*args, **kwargs)
        array._ary.fill(0)
        return array

    monkeypatch.setattr(common.Launch, "__call__", lambda site, *args: events.append("launch"))
    monkeypatch.setattr(FakeCUDAArray, "copy_to_device", copied_to_device)
    monkeypatch.setattr(FakeCUDAArray, "copy_to_host", copied_to_host)
    monkeypatch.setattr(cuda, "to_device", sent)
    monkeypatch.setattr(cuda, "device_array", zeroed)
    root = Path(__file__).resolve().parent.parent
    net = convdsl.compile(root / path, batch=2, dtype="float32", device="cuda", warm=False)
    rng = np.random.default_rng(11)
    inputs = {name: random_array(rng, (2, *shape)).astype(np.float32)
              for name, shape in net.input_shapes.items()}
    targets = {}
    for output in net.network.outputs:
        shape = (2, *net.network.shapes[output.name])
        targets[output.name] = (np.zeros((2, *shape[2:]), dtype=np.int64)
                                if output.loss is Loss.CROSS_ENTROPY
                                else np.zeros(shape, dtype=np.float32))
    optimizer = make_optimizer(TrainSettings(optimizer="adam", lr=0.01), net.trained)
    passes: dict[str, Callable[[], object]] = {
        "training step": lambda: net.train_step(inputs, targets, optimizer, 0.01),
        "inference": lambda: net.forward(inputs)}
    for name, run in passes.items():
        run()  # every buffer made, batch norm folded
        events.clear()
        run()
        start = events.index("launch")
        end = len(events) - events[::-1].index("launch")
        assert set(events[start:end]) == {"launch"}, (name, events)
        assert set(events[:start]) == {"to device"} and set(events[end:]) == {"to host"}


def test_a_new_learning_rate_sends_the_held_launches_and_builds_again(graphs: Any) -> None:
    """At a new rate the update's packed arguments change: the step that meets it sends
    what it held and goes on launch by launch; two steps later the new step is a graph."""
    rates = [0.1] * 4 + [0.05] * 3
    want = plain(graphs, rates)
    net = compiled()
    assert_same(train(net, rates), want)
    launches = len(net._recorders["train_step"]._previous)  # type: ignore[attr-defined]
    per_step = -(-launches // 8)
    before_the_update = (launches - 1) // 8  # the update is the last launch
    assert dict(graphs.GRAPH_COUNTS) == {"built": 2 * per_step,
                                         "launched": 2 * per_step + before_the_update,
                                         "replayed": 2, "plain": 5}


def test_adams_steps_repeat_too(graphs: Any) -> None:
    """Adam's step count and rate reach its update in device memory (sent before the
    step's launches), not as arguments, so its steps launch the same and run as graphs."""
    settings = TrainSettings(optimizer="adamw", lr=0.01, weight_decay=0.1)
    rates = [0.01] * 5
    want = plain(graphs, rates, settings)
    assert_same(train(compiled(), rates, settings), want)
    built = graphs.GRAPH_COUNTS["built"]
    assert built >= 3
    assert dict(graphs.GRAPH_COUNTS) == {"built": built, "launched": 2 * built,
                                         "replayed": 2, "plain": 3}


def test_a_pass_that_differs_every_time_never_waits(graphs: Any) -> None:
    """A rate that changes every step (a warm-up) changes the update's arguments: no
    step is held back and no graph is built."""
    rates = [0.01 * (step + 1) for step in range(4)]
    want = plain(graphs, rates)
    assert_same(train(compiled(), rates), want)
    assert dict(graphs.GRAPH_COUNTS) == {"built": 0, "launched": 0, "replayed": 0,
                                         "plain": 4}


def test_inference_repeats_as_a_graph_between_training_steps(graphs: Any) -> None:
    """An inference has its own graph; a training step in between does not disturb it
    (batch norm folds its statistics on the first inference after training, so that
    one launches more and is not held)."""
    net = compiled()
    x = random_array(np.random.default_rng(5), (2, 2, 4, 4))
    want = net.forward(x)
    optimizer = make_optimizer(MOMENTUM, net.trained)
    for _ in range(3):
        net.train_step(x, TARGETS, optimizer, 0.1)
    graphs.GRAPH_COUNTS.update(counts())
    outputs = [net.forward(x) for _ in range(4)]
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])
    assert not np.array_equal(outputs[0], want)  # trained in between
    assert graphs.GRAPH_COUNTS["built"] >= 1 and graphs.GRAPH_COUNTS["replayed"] >= 1
    twin = compiled()
    twin.load_state_dict(net.state_dict())
    graphs.GRAPHS = False
    np.testing.assert_array_equal(twin.forward(x), outputs[0])


def test_a_graph_that_cannot_be_built_switches_graphs_off(
        graphs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver or cuda.core without graphs: the held launches go out one by one, the
    reason is kept for the benchmark's note, and later passes are not recorded."""
    def no_graphs() -> Any:
        raise RuntimeError("graphs are not supported here")

    monkeypatch.setattr(graphs, "new_builder", no_graphs)
    rates = [0.1] * 5
    want = plain(graphs, rates)
    assert_same(train(compiled(), rates), want)
    assert graphs.FAILURE == ["RuntimeError: graphs are not supported here"]
    assert graphs.GRAPH_COUNTS["built"] == 0


def test_a_failing_pass_sends_what_it_held_and_starts_over(graphs: Any) -> None:
    """An error inside a recorded pass (here after the forward) lets the launches it
    held run and forgets the pass, so the next one is launched by launch."""
    from convdsl.codegen.cuda import common

    net = compiled()
    recorder = net.device.recorder()
    ran = []

    class Launched:
        def __call__(self) -> None:
            ran.append(self)

    launches = [Launched() for _ in range(3)]
    for _ in range(2):
        with recorder.pass_():
            for launch in launches:
                common._run(launch)  # type: ignore[arg-type]
    assert len(ran) == 6
    with pytest.raises(KeyError), recorder.pass_():
        common._run(launches[0])  # type: ignore[arg-type]
        assert len(ran) == 6  # held: it repeats the pass before
        raise KeyError("stop")
    assert ran[-1] is launches[0] and len(ran) == 7
    assert common.RECORDER is None


def test_a_launch_site_keeps_sets_of_arguments_it_is_called_on_in_turn(
        graphs: Any) -> None:
    """Dropout's multiply runs forward on (x, mask, y) and backward on (dy, mask, dx):
    each set is packed once, then recalled."""
    from convdsl.codegen.cuda import arrays, common

    gpu = compiled().device
    a, b, c = (gpu.put(np.full(4, value)) for value in (1.0, 2.0, 3.0))
    before = common.LAUNCH_COUNTS["packed"]
    site = common.Launch(arrays._kernels().add, 1, 32, every=common.FLAT)
    for _ in range(3):
        site(a, b, c)
        site(c, a, b)
    assert common.LAUNCH_COUNTS["packed"] - before == 2
    np.testing.assert_array_equal(gpu.get(c), [7.0] * 4)  # c = a + b, b = c + a, 3 times
    np.testing.assert_array_equal(gpu.get(b), [8.0] * 4)
