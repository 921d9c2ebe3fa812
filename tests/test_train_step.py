"""One training step as `convdsl train` takes it (CompiledNetwork.train_step), on the CPU
and on the CUDA target (in the simulator, like the rest of the CUDA tier):

1. It is forward, loss, backward and the optimizer's update, to the last bit.
2. A step whose loss or gradients hold NaN or infinity changes no trained parameter and
   no optimizer buffer, says what it found, and does not count: the next good step is
   the one it would have been.
3. On CUDA the host waits for the GPU once a step: every copy from host memory comes
   before the first launch, every copy back after the last.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from kernel_harness import random_array

import convdsl
from convdsl.ir.training import TrainSettings
from convdsl.runtime.executor import CompiledNetwork
from convdsl.runtime.optim import Optimizer, make_optimizer

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# Two outputs with losses (one weighted), batch norm, dropout: every part of a step.
NETWORK = """
input x: 2x6x6
c = conv(3, 3, act=relu)
n = bn
p = maxpool(2)
f = flatten
d = dropout(0.5)
y = d -> dense(4, act=softmax)
h = f -> dense(3)
output y loss=cross_entropy
aux h loss=cross_entropy weight=0.3
"""

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
MOMENTUM = TrainSettings(optimizer="sgd", lr=0.1, momentum=0.9)
SETTINGS = [pytest.param(MOMENTUM, id="momentum"),
            pytest.param(TrainSettings(optimizer="adam", lr=0.01), id="adam")]
TARGETS = {"y": np.array([1, 3]), "h": np.array([0, 2])}


def compiled(device: str) -> CompiledNetwork:
    return convdsl.compile(NETWORK, batch=2, dtype="float64", seed=3, device=device,
                           warm=False)


def batches(count: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [random_array(rng, (2, 2, 6, 6)) for _ in range(count)]


def trained(net: CompiledNetwork) -> dict[str, np.ndarray]:
    return {name: net.device.get(array) for name, array in net.trained.items()}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_step_is_forward_loss_backward_and_update(device: str,
                                                    settings: TrainSettings) -> None:
    by_hand, stepped = compiled(device), compiled(device)
    hand_optimizer = make_optimizer(settings, by_hand.trained)
    optimizer = make_optimizer(settings, stepped.trained)
    for x in batches(3):
        scores = by_hand.forward(x, train=True)
        loss = by_hand.loss(TARGETS)
        by_hand.backward(input_grad=False)
        hand_optimizer.step(by_hand.trained, by_hand.grads, settings.lr)
        result = stepped.train_step(x, TARGETS, optimizer, settings.lr)
        assert result.nonfinite is None
        assert result.loss == loss
        np.testing.assert_array_equal(result.scores, scores)
    assert_same(stepped.state_dict(), by_hand.state_dict())
    assert_same(optimizer.state_dict(), hand_optimizer.state_dict())
    assert optimizer.steps == 3


def _nan_in_the_input(net: CompiledNetwork, x: np.ndarray,
                      monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, str]:
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    return bad, "the loss is nan"


def _infinity_in_a_gradient(net: CompiledNetwork, x: np.ndarray,
                            monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, str]:
    """A finite loss whose backward leaves infinity in one gradient."""
    name = list(net.grads)[2]
    backward = net.backward

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        result = backward(*args, **kwargs)
        net.device.assign(net.grads[name], np.full(net.grads[name].shape, np.inf))
        return result

    monkeypatch.setattr(net, "backward", poisoned)
    return x, f"the gradient of '{name}' holds NaN or infinity"


Poison = Callable[[CompiledNetwork, np.ndarray, pytest.MonkeyPatch], tuple[np.ndarray, str]]


@pytest.mark.parametrize("poison", [_nan_in_the_input, _infinity_in_a_gradient],
                         ids=["loss", "gradient"])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("device", DEVICES)
def test_a_step_that_finds_nan_changes_nothing_and_does_not_count(
        device: str, settings: TrainSettings, poison: Poison,
        monkeypatch: pytest.MonkeyPatch) -> None:
    net, twin = compiled(device), compiled(device)  # the twin never sees the bad step
    optimizer, twin_optimizer = (make_optimizer(settings, net.trained),
                                 make_optimizer(settings, twin.trained))
    first, second, third = batches(3)
    for network, opt in ((net, optimizer), (twin, twin_optimizer)):
        network.train_step(first, TARGETS, opt, settings.lr)
    params, state = trained(net), optimizer.state_dict()

    with monkeypatch.context() as patch:
        x, found = poison(net, second, patch)
        result = net.train_step(x, TARGETS, optimizer, settings.lr)
    assert result.nonfinite == found
    assert_same(trained(net), params)
    assert_same(optimizer.state_dict(), state)  # buffers, and the step count

    # The next good step is the one the bad step would have been (the training forward
    # draws its dropout masks by step, so the twin skips a step too).
    twin.step += 1
    for network, opt in ((net, optimizer), (twin, twin_optimizer)):
        assert network.train_step(third, TARGETS, opt, settings.lr).nonfinite is None
    assert_same(trained(net), trained(twin))
    assert_same(optimizer.state_dict(), twin_optimizer.state_dict())


def _a_closed_gate(optimizer: Optimizer) -> Any:
    return optimizer.device.put(np.ones(1, dtype=np.int32))


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("device", DEVICES)
def test_an_optimizer_step_behind_a_closed_gate_changes_nothing(
        device: str, settings: TrainSettings) -> None:
    net = compiled(device)
    optimizer = make_optimizer(settings, net.trained)
    net.device.assign(net.grads.flat, np.random.default_rng(0).standard_normal(
        net.grads.flat.size))
    params = trained(net)
    optimizer.step(net.trained, net.grads, settings.lr, skip_if=_a_closed_gate(optimizer))
    assert_same(trained(net), params)
    assert optimizer.steps == 1  # until the caller, having read the gate, says otherwise
    optimizer.skipped()
    assert optimizer.steps == 0
    open_gate = net.device.zeros((1,), np.int32)
    optimizer.step(net.trained, net.grads, settings.lr, skip_if=open_gate)
    assert not np.array_equal(trained(net)["c.weight"], params["c.weight"])


@pytest.mark.cuda
def test_on_the_gpu_a_step_waits_for_it_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy from host memory, or back to it, waits for every kernel queued before it
    (and the GPU idles until the next launch), so train_step sends the batch and its
    targets (and the dropout mask: KernelLayer.send) first and reads the NaN count, the
    losses and the scores last."""
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from convdsl.codegen.cuda import common

    net = compiled("cuda")
    optimizer = make_optimizer(MOMENTUM, net.trained)
    first, second = batches(2)
    net.train_step(first, TARGETS, optimizer, 0.1)  # every buffer made
    events: list[str] = []

    def noted(event: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            events.append(event)
            return original(*args, **kwargs)
        return wrapper

    copy_to_device = FakeCUDAArray.copy_to_device

    def copied_to_device(array: Any, source: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("within" if isinstance(source, FakeCUDAArray) else "to device")
        return copy_to_device(array, source, *args, **kwargs)

    monkeypatch.setattr(common.Launch, "__call__", noted("launch", common.Launch.__call__))
    monkeypatch.setattr(FakeCUDAArray, "copy_to_host",
                        noted("to host", FakeCUDAArray.copy_to_host))
    monkeypatch.setattr(FakeCUDAArray, "copy_to_device", copied_to_device)
    monkeypatch.setattr(cuda, "to_device", noted("to device", cuda.to_device))
    assert net.train_step(second, TARGETS, optimizer, 0.1).nonfinite is None

    start = events.index("launch")
    end = len(events) - events[::-1].index("launch")
    # the targets of y and h, the batch, the dropout mask
    assert events[:start] == ["to device"] * 4
    assert not {"to device", "to host"} & set(events[start:end])
    assert events[end:] == ["to host"] * 4  # the NaN count, two losses, the scores
