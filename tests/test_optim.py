"""Optimizers and schedules (convdsl/runtime/optim.py) against torch.optim.

1. Each optimizer against its torch.optim twin on random arrays, step by step, with a
   learning rate that changes between steps, in float64 and float32.
2. Each schedule against torch.optim.lr_scheduler (LinearLR per step for the warm-up,
   then StepLR or CosineAnnealingLR once per epoch), and a few values by hand.
3. The optimizer state: names, copies, a checkpoint round trip (through an .npz file)
   that continues bit for bit, and every way a saved state can fail to fit.
4. The issue's acceptance test: LeNet-5 compiled in float64 and the same network in
   PyTorch (tests/torch_bridge.py), from the same weights, trained for 100 steps on the
   same batches, agree to 1e-6 relative in every step's loss, the final loss, every
   weight and every optimizer buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convdsl
from convdsl.errors import RunError
from convdsl.ir.training import TrainSettings
from convdsl.runtime import optim
from convdsl.runtime.devices import device_named
from convdsl.runtime.executor import CompiledNetwork
from convdsl.runtime.optim import SGD, Adam, Optimizer, Schedule, make_optimizer

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {"c.weight": (4, 3, 3), "c.bias": (4,), "d.weight": (5, 12), "d.bias": (5,)}
# Relative to each array's largest magnitude. PyTorch's CPU kernels fuse some
# multiply-adds, so the two agree to the last bit or two, not bit for bit.
RANDOM_TOL = {"float64": 1e-14, "float32": 1e-6}

OPTIMIZERS = [
    pytest.param(TrainSettings(optimizer="sgd", momentum=0.0), id="sgd"),
    pytest.param(TrainSettings(optimizer="sgd", momentum=0.0, weight_decay=0.01),
                 id="sgd-decay"),
    pytest.param(TrainSettings(optimizer="sgd", momentum=0.9), id="momentum"),
    pytest.param(TrainSettings(optimizer="sgd", momentum=0.5, weight_decay=0.01),
                 id="momentum-decay"),
    pytest.param(TrainSettings(optimizer="sgd", momentum=0.9, nesterov=True), id="nesterov"),
    pytest.param(TrainSettings(optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=0.01),
                 id="nesterov-decay"),
    pytest.param(TrainSettings(optimizer="adam", lr=0.001), id="adam"),
    pytest.param(TrainSettings(optimizer="adam", lr=0.001, beta1=0.8, beta2=0.99, eps=1e-6,
                               weight_decay=0.01), id="adam-decay"),
    pytest.param(TrainSettings(optimizer="adamw", lr=0.001, weight_decay=0.1), id="adamw"),
]


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def random_params(rng: np.random.Generator, dtype: str) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def torch_optimizer(torch: Any, settings: TrainSettings, params: Any) -> Any:
    """torch.optim's optimizer for the settings."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               nesterov=settings.nesterov, weight_decay=settings.weight_decay)
    kind = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=settings.lr, betas=(settings.beta1, settings.beta2),
                eps=settings.eps, weight_decay=settings.weight_decay)


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """The largest error, over the largest magnitude expected."""
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    return float(np.max(np.abs(actual.astype(np.float64) - expected))) / scale


# === 1. optimizers against torch.optim, on random arrays ====================================


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("settings", OPTIMIZERS)
def test_optimizer_matches_torch(torch: Any, settings: TrainSettings, dtype: str) -> None:
    rng = np.random.default_rng(7)
    params = random_params(rng, dtype)
    originals = dict(params)
    tensors = {name: torch.tensor(array.copy(), requires_grad=True)
               for name, array in params.items()}
    ours = make_optimizer(settings, params)
    theirs = torch_optimizer(torch, settings, list(tensors.values()))
    for step in range(25):
        lr = settings.lr * (1 + step % 3) / 2  # changes between steps, as a schedule does
        grads = random_params(rng, dtype)
        kept = {name: grad.copy() for name, grad in grads.items()}
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grads[name].copy())
        set_lr(theirs, lr)
        theirs.step()
        ours.step(params, grads, lr)
        for name, grad in grads.items():
            np.testing.assert_array_equal(grad, kept[name], err_msg="a gradient changed")
    for name, tensor in tensors.items():
        assert params[name] is originals[name], "updated in place"
        assert params[name].dtype == np.dtype(dtype)
        error = relative_error(params[name], tensor.detach().numpy())
        assert error <= RANDOM_TOL[dtype], f"{name}: {error:.2g}"
    assert all(array.dtype == np.dtype(dtype) for name, array in ours.state_dict().items()
               if name != "step")


@pytest.mark.parametrize("part", [None, 7], ids=["whole", "parts-of-7"])
@pytest.mark.parametrize("settings", OPTIMIZERS)
def test_a_packed_step_is_the_same_as_one_per_parameter(
        settings: TrainSettings, part: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters and gradients packed into one flat array each (a network's `trained`
    and `grads`) update in one pass over the flat arrays, on the CPU in parts (which
    here cut across arrays): the same bits as a parameter at a time, buffers included."""
    if part is not None:
        monkeypatch.setattr(optim, "CPU_PART", part)
    rng = np.random.default_rng(3)
    cpu = device_named("cpu")
    shapes = {name: tuple(shape) for name, shape in SHAPES.items()}
    separate = random_params(rng, "float32")
    packed = cpu.packed(shapes, "float32")
    for name, array in separate.items():
        cpu.assign(packed[name], array)
    one_by_one, at_once = make_optimizer(settings, separate), make_optimizer(settings, packed)
    flat_before = packed.flat
    for step in range(5):
        grads = random_params(rng, "float32")
        packed_grads = cpu.packed(shapes, "float32")
        for name, grad in grads.items():
            cpu.assign(packed_grads[name], grad)
        one_by_one.step(separate, grads, settings.lr / (step + 1))
        at_once.step(packed, packed_grads, settings.lr / (step + 1))
    assert packed.flat is flat_before
    for name, array in separate.items():
        np.testing.assert_array_equal(packed[name], array, err_msg=name)
    ours, theirs = at_once.state_dict(), one_by_one.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_make_optimizer_picks_the_method() -> None:
    params = random_params(np.random.default_rng(0), "float64")
    sgd = make_optimizer(TrainSettings(optimizer="sgd", momentum=0.5, nesterov=True), params)
    assert isinstance(sgd, SGD) and sgd.momentum == 0.5 and sgd.nesterov
    adam = make_optimizer(TrainSettings(optimizer="adam", weight_decay=0.1), params)
    adamw = make_optimizer(TrainSettings(optimizer="adamw", weight_decay=0.1), params)
    assert isinstance(adam, Adam) and not adam.decoupled
    assert isinstance(adamw, Adam) and adamw.decoupled


def test_nesterov_needs_momentum() -> None:
    with pytest.raises(RunError, match="Nesterov momentum needs a momentum") as info:
        make_optimizer(TrainSettings(momentum=0.0, nesterov=True), {})
    assert info.value.hint is not None and "momentum" in info.value.hint


def test_step_needs_the_optimizers_parameters() -> None:
    params = random_params(np.random.default_rng(0), "float64")
    optimizer = make_optimizer(TrainSettings(), params)
    grads = {name: np.ones_like(array) for name, array in params.items()}
    before = {name: array.copy() for name, array in params.items()}
    extra = {**grads, "e.weight": np.ones(3)}
    with pytest.raises(RunError, match=r"unknown: e\.weight"):
        optimizer.step(params, extra, 0.1)
    del grads["c.bias"]
    with pytest.raises(RunError, match=r"missing: c\.bias"):
        optimizer.step(params, grads, 0.1)
    for name, array in params.items():
        np.testing.assert_array_equal(array, before[name])  # nothing half-done
    assert optimizer.steps == 0


# === 2. schedules ================================================================================


SCHEDULES = [
    pytest.param({}, id="constant"),
    pytest.param({"warmup": 3}, id="constant-warmup"),
    pytest.param({"schedule": "step", "step_size": 3, "gamma": 0.5}, id="step"),
    pytest.param({"schedule": "step", "step_size": 2, "gamma": 0.1, "warmup": 1},
                 id="step-warmup"),
    pytest.param({"schedule": "cosine"}, id="cosine"),
    pytest.param({"schedule": "cosine", "min_lr": 0.001, "warmup": 2}, id="cosine-warmup"),
    pytest.param({"schedule": "cosine", "warmup": 10}, id="all-warmup"),
]
STEPS_PER_EPOCH = 4


def torch_rates(torch: Any, settings: TrainSettings, steps_per_epoch: int) -> list[float]:
    """Every step's rate from torch's schedulers: LinearLR stepped per step through the
    warm-up, then StepLR or CosineAnnealingLR stepped once per epoch."""
    rates: list[float] = []
    warmup_steps = settings.warmup * steps_per_epoch
    weight = torch.zeros(1, requires_grad=True)
    if warmup_steps:
        optimizer = torch.optim.SGD([weight], lr=settings.lr)
        warmup = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=1 / warmup_steps, end_factor=1.0,
            total_iters=warmup_steps - 1)
        for _ in range(warmup_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            warmup.step()
    optimizer = torch.optim.SGD([weight], lr=settings.lr)
    epochs = settings.epochs - settings.warmup
    scheduler: Any = None
    if settings.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, settings.step_size,
                                                    settings.gamma)
    elif settings.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs,
                                                               settings.min_lr)
    for _ in range(epochs):
        rates += [optimizer.param_groups[0]["lr"]] * steps_per_epoch
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


def all_rates(schedule: Schedule) -> list[float]:
    return [schedule.lr(epoch, index) for epoch in range(schedule.settings.epochs)
            for index in range(schedule.steps_per_epoch)]


@pytest.mark.parametrize("changes", SCHEDULES)
def test_schedule_matches_torch(torch: Any, changes: dict[str, Any]) -> None:
    settings = TrainSettings(lr=0.1, epochs=10).replace(**changes)
    ours = all_rates(Schedule(settings, STEPS_PER_EPOCH))
    theirs = torch_rates(torch, settings, STEPS_PER_EPOCH)
    assert len(ours) == len(theirs) == 40
    # torch's schedulers multiply their previous rate; the closed forms here agree to rounding.
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_schedule_values_by_hand() -> None:
    base = TrainSettings(lr=0.1, epochs=10, warmup=2)
    warm = Schedule(base, 5)
    assert warm.lr(0, 0) == pytest.approx(0.1 / 10)
    assert warm.lr(1, 4) == pytest.approx(0.1)  # the last warm-up step reaches lr
    assert warm.lr(9, 4) == 0.1
    step = Schedule(base.replace(schedule="step", step_size=3, gamma=0.5), 5)
    assert [step.lr(epoch, 0) for epoch in range(2, 10)] == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025])
    cosine = Schedule(base.replace(schedule="cosine", min_lr=0.02), 5)
    assert cosine.lr(2, 0) == pytest.approx(0.1)  # starts at lr after the warm-up
    assert cosine.lr(6, 3) == pytest.approx(0.06)  # halfway: the middle of lr and min_lr
    assert cosine.lr(9, 4) > 0.02


def test_schedule_depends_only_on_the_position() -> None:
    schedule = Schedule(TrainSettings(lr=0.1, epochs=6, warmup=1, schedule="cosine"), 3)
    positions = [(epoch, index) for epoch in range(6) for index in range(3)]
    in_order = {position: schedule.lr(*position) for position in positions}
    shuffled = np.random.default_rng(0).permutation(len(positions))
    again = Schedule(schedule.settings, 3)  # as after a resume
    for i in shuffled:
        position = positions[int(i)]
        assert again.lr(*position) == in_order[position]


def test_schedule_errors() -> None:
    with pytest.raises(RunError, match=r"warm-up \(11 epochs\) is longer than the training "
                                       r"\(10 epochs\)"):
        Schedule(TrainSettings(epochs=10, warmup=11), 5)
    with pytest.raises(RunError, match="at least 1 step per epoch"):
        Schedule(TrainSettings(), 0)
    schedule = Schedule(TrainSettings(epochs=3), 5)
    for position in [(3, 0), (0, 5), (-1, 0), (0, -1)]:
        with pytest.raises(RunError, match="3 epochs of 5 steps"):
            schedule.lr(*position)


# === 3. optimizer state ===========================================================================


def run_steps(optimizer: Optimizer, params: dict[str, np.ndarray], seed: int,
              count: int) -> None:
    rng = np.random.default_rng(seed)
    for step in range(count):
        grads = {name: rng.standard_normal(array.shape).astype(array.dtype)
                 for name, array in params.items()}
        optimizer.step(params, grads, 0.01 * (1 + step % 2))


def test_state_names() -> None:
    params = random_params(np.random.default_rng(0), "float32")
    names = sorted(SHAPES)
    sgd = make_optimizer(TrainSettings(momentum=0.0), params).state_dict()
    assert sorted(sgd) == ["step"]
    momentum = make_optimizer(TrainSettings(momentum=0.9), params).state_dict()
    assert sorted(momentum) == [f"momentum/{name}" for name in names] + ["step"]
    adam = make_optimizer(TrainSettings(optimizer="adam"), params).state_dict()
    assert sorted(adam) == ([f"exp_avg/{name}" for name in names]
                            + [f"exp_avg_sq/{name}" for name in names] + ["step"])
    assert adam["step"].dtype == np.int64 and int(adam["step"]) == 0
    assert adam["exp_avg/c.weight"].shape == SHAPES["c.weight"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("settings", OPTIMIZERS)
def test_state_round_trip_continues_bit_exactly(settings: TrainSettings, dtype: str,
                                                tmp_path: Path) -> None:
    """Stopping after 5 steps, saving, and resuming in a new optimizer gives exactly the
    arrays of 12 steps in one go."""
    start = random_params(np.random.default_rng(3), dtype)
    params = {name: array.copy() for name, array in start.items()}
    straight = make_optimizer(settings, params)
    run_steps(straight, params, seed=1, count=5)
    path = tmp_path / "optimizer.npz"
    np.savez(path, **straight.state_dict())
    resumed_params = {name: array.copy() for name, array in params.items()}
    run_steps(straight, params, seed=2, count=7)

    resumed = make_optimizer(settings, start)
    with np.load(path, allow_pickle=False) as saved:
        resumed.load_state_dict(dict(saved))
    assert resumed.steps == 5
    run_steps(resumed, resumed_params, seed=2, count=7)
    for name, array in params.items():
        np.testing.assert_array_equal(resumed_params[name], array, err_msg=name)
        assert resumed_params[name].dtype == np.dtype(dtype)
    final = straight.state_dict()
    for name, array in resumed.state_dict().items():
        np.testing.assert_array_equal(array, final[name], err_msg=name)


def test_state_dict_holds_copies() -> None:
    params = random_params(np.random.default_rng(0), "float64")
    optimizer = make_optimizer(TrainSettings(optimizer="adam"), params)
    run_steps(optimizer, params, seed=1, count=2)
    state = optimizer.state_dict()
    state["exp_avg/c.bias"][...] = 0
    state["step"][...] = 9
    assert optimizer.buffers["exp_avg"]["c.bias"].any()
    assert optimizer.steps == 2
    fresh = make_optimizer(TrainSettings(optimizer="adam"), params)
    loaded = optimizer.state_dict()
    fresh.load_state_dict(loaded)
    loaded["exp_avg/c.bias"][...] = 0
    assert fresh.buffers["exp_avg"]["c.bias"].any()


def bad_states(good: dict[str, np.ndarray]) -> Iterator[tuple[dict[str, Any], str]]:
    """States that do not fit, each with the message it must give."""
    yield {k: v for k, v in good.items() if k != "momentum/c.bias"}, "missing: momentum/c.bias"
    yield {k: v for k, v in good.items() if k != "step"}, "missing: step"
    yield {**good, "exp_avg/c.bias": np.zeros(4)}, "unexpected: exp_avg/c.bias"
    yield {**good, "momentum/d.weight": np.zeros((12, 5))}, (
        r"'momentum/d.weight' has shape \(12, 5\), expected \(5, 12\)")
    yield {**good, "step": np.array([3])}, r"'step' has shape \(1,\)"
    yield {**good, "step": np.array(-1)}, "expected a whole number"
    yield {**good, "step": np.array(2.5)}, "expected a whole number"
    yield {**good, "momentum/c.bias": np.array(["a"] * 4)}, "expected floating-point"


def test_load_state_dict_errors() -> None:
    params = random_params(np.random.default_rng(0), "float64")
    optimizer = make_optimizer(TrainSettings(momentum=0.9), params)
    run_steps(optimizer, params, seed=1, count=3)
    good = optimizer.state_dict()
    for state, message in bad_states(good):
        with pytest.raises(RunError, match=message):
            optimizer.load_state_dict(state)
        after = optimizer.state_dict()  # unchanged by a state that does not fit
        for name, array in good.items():
            np.testing.assert_array_equal(after[name], array, err_msg=name)
    with pytest.raises(RunError) as info:
        optimizer.load_state_dict(make_optimizer(TrainSettings(optimizer="adam"),
                                                 params).state_dict())
    assert "SGD" in info.value.message
    assert info.value.hint is not None and "another optimizer" in info.value.hint


# === 4. LeNet-5, 100 steps, against PyTorch =======================================================

LENET = ROOT / "networks" / "lenet5.cnn"
BATCH = 2  # LeNet-5's batch in test_torch_parity.py, so both use the same compiled kernels
STEPS = 100
EPOCH = 10  # steps per epoch, for the schedules: 10 epochs of 10 steps
PARITY_RTOL = 1e-6  # the acceptance bound, on every loss, weight and buffer
# A value passing near zero is held to this fraction of its array's largest magnitude
# instead: every other value is compared one by one, relative to itself.
PARITY_FLOOR = 1e-10

PARITY = [
    pytest.param(TrainSettings(optimizer="sgd", lr=0.02, momentum=0.9), id="sgd-momentum"),
    pytest.param(TrainSettings(optimizer="sgd", lr=0.02, momentum=0.9, nesterov=True),
                 id="sgd-nesterov"),
    pytest.param(TrainSettings(optimizer="adam", lr=0.002), id="adam"),
    # A rate that changes every step (warm-up), then every few epochs: a slip such as
    # folding lr into the momentum buffer only shows when the rate changes.
    pytest.param(TrainSettings(optimizer="sgd", lr=0.02, momentum=0.9, nesterov=True,
                               weight_decay=5e-4, warmup=2, schedule="step", step_size=3,
                               gamma=0.5), id="nesterov-decay-warmup-step"),
    pytest.param(TrainSettings(optimizer="adamw", lr=0.002, weight_decay=0.05, warmup=1,
                               schedule="cosine"), id="adamw-warmup-cosine"),
]
TORCH_BUFFERS = {"momentum": "momentum_buffer", "exp_avg": "exp_avg",
                 "exp_avg_sq": "exp_avg_sq"}


@functools.cache
def lenet() -> tuple[CompiledNetwork, dict[str, np.ndarray]]:
    """LeNet-5 compiled once in float64, and its initial weights."""
    net = convdsl.compile(LENET, batch=BATCH, dtype="float64")
    return net, net.state_dict()


Batch = tuple[np.ndarray, np.ndarray]


@functools.cache
def digit_like_batches() -> tuple[list[Batch], Batch]:
    """A task the network can learn in 100 steps: each class is a fixed random image,
    seen through noise. The training batches, and one more to measure the final loss."""
    rng = np.random.default_rng(2024)
    shape = (1, 28, 28)
    templates = rng.standard_normal((10, *shape))

    def batch() -> Batch:
        labels = rng.integers(0, 10, BATCH)
        return templates[labels] + 0.3 * rng.standard_normal((BATCH, *shape)), labels

    return [batch() for _ in range(STEPS)], batch()


def close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    floor = PARITY_FLOOR * float(np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=PARITY_RTOL, atol=floor, err_msg=what)


@pytest.fixture
def one_thread_torch(torch: Any) -> Iterator[Any]:
    """torch on one thread: at a batch of 2 its thread pool has nothing to share out, and
    on a busy machine its threads' waiting made these tests tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def test_a_networks_parameters_update_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A network's trained parameters and gradients are views into one flat array each,
    laid out alike, and an optimizer made from them updates the flat arrays at once."""
    net, initial = lenet()
    net.load_state_dict(initial)
    assert net.trained.layout == net.grads.layout
    assert list(net.trained) == [name for name in net.params if name in net.grads]
    for name in net.trained:
        assert np.shares_memory(net.params[name], net.trained.flat), name
        assert np.shares_memory(net.grads[name], net.grads.flat), name
    optimizer = make_optimizer(TrainSettings(momentum=0.9), net.trained)
    updated: list[int] = []
    update = optimizer._update
    monkeypatch.setattr(optimizer, "_update", lambda param, *rest: (
        updated.append(param.size), update(param, *rest)))
    x, labels = digit_like_batches()[0][0]
    before = net.state_dict()
    net.forward(x, train=True)
    net.loss(labels)
    net.backward()
    optimizer.step(net.trained, net.grads, 0.1)
    assert updated == [net.trained.flat.size]
    for name in net.trained:  # every view moved, by -lr * gradient on the first step
        np.testing.assert_allclose(net.params[name], before[name] - 0.1 * net.grads[name],
                                   rtol=1e-12, atol=1e-15, err_msg=name)
    net.load_state_dict(initial)


@pytest.mark.parametrize("settings", PARITY)
def test_lenet5_trains_as_pytorch_does(one_thread_torch: Any, settings: TrainSettings) -> None:
    torch = one_thread_torch
    from torch_bridge import SEPARATOR, TorchNetwork, torch_loss

    net, initial = lenet()
    net.load_state_dict(initial)
    model = TorchNetwork(net.network, torch.float64)
    model.load_arrays(initial)
    ours = make_optimizer(settings, net.trained)
    theirs = torch_optimizer(torch, settings, model.parameters())
    schedule = Schedule(settings, EPOCH)
    batches, held_out = digit_like_batches()
    our_losses, their_losses = [], []
    for step, (x, labels) in enumerate(batches):
        lr = schedule.lr(*divmod(step, EPOCH))
        net.forward(x, train=True)
        our_losses.append(net.loss(labels))
        net.backward()
        ours.step(net.trained, net.grads, lr)  # packed: one pass over every parameter

        theirs.zero_grad()
        loss = torch_loss(net.network, model(torch.from_numpy(x), train=True), labels)
        loss.backward()
        set_lr(theirs, lr)
        theirs.step()
        their_losses.append(loss.item())

    net.forward(held_out[0])
    final = net.loss(held_out[1])
    with torch.no_grad():
        their_final = torch_loss(net.network, model(torch.from_numpy(held_out[0])),
                                 held_out[1]).item()
    expected = model.arrays()
    their_state = theirs.state_dict()["state"]
    errors = {"loss": max(abs(a - b) / abs(b) for a, b in zip(our_losses, their_losses)),
              "final loss": abs(final - their_final) / abs(their_final),
              "weights": max(relative_error(net.params[name], expected[name])
                             for name in net.grads)}
    print(f"\n{settings.optimizer} nesterov={settings.nesterov} {settings.schedule}: "
          "largest relative differences "
          + ", ".join(f"{what} {error:.1e}" for what, error in errors.items()))

    np.testing.assert_allclose(our_losses, their_losses, rtol=PARITY_RTOL, atol=0)
    assert final == pytest.approx(their_final, rel=PARITY_RTOL, abs=0)
    for name in net.grads:
        close(net.params[name], expected[name], name)
    # The optimizer's buffers too; torch keeps them by the position of the parameter.
    position = {key.replace(SEPARATOR, "."): i for i, key in enumerate(model.weights)}
    for kind, arrays in ours.buffers.items():
        for name, array in arrays.items():
            close(array, their_state[position[name]][TORCH_BUFFERS[kind]].numpy(),
                  f"{kind}/{name}")

    # The comparison means something: training moved every array far beyond the
    # tolerance, and the loss fell.
    for name in net.grads:
        assert relative_error(net.params[name], initial[name]) > 1e-2, name
    assert np.mean(their_losses[-20:]) < 0.95 * np.mean(their_losses[:20])
