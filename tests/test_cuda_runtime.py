"""The CUDA target's runtime: device arrays, optimizers, batch-norm folding, whole
networks against the CPU target, and the errors a user without a GPU sees.

Runs in Numba's CUDA simulator unless CONVDSL_TEST_GPU=1 (see conftest.py), so every
network here is tiny. The CPU target is itself checked against the NumPy reference
and PyTorch; here the CUDA target must agree with it in float64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kernel_harness import assert_close, random_array
from test_train import TINY, write_data

import convdsl
from convdsl.cli import main
from convdsl.errors import RunError
from convdsl.ir.training import TrainSettings
from convdsl.runtime import checkpoint as ckpt
from convdsl.runtime.devices import device_named
from convdsl.runtime.optim import make_optimizer

pytestmark = [pytest.mark.cuda,
              # the simulator runs kernels in NumPy, which warns where a GPU stays silent
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture(scope="module")
def gpu():  # type: ignore[no-untyped-def]
    return device_named("cuda")


def test_array_operations(gpu) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    a, b = random_array(rng, (3, 4)), random_array(rng, (3, 4))
    da, db = gpu.put(a), gpu.put(b)
    out = gpu.zeros((3, 4), "float64")
    gpu.add(da, db, out)
    assert_close(gpu.get(out), a + b, 1e-15, "add")
    gpu.fill(out, 2.5)
    assert (gpu.get(out) == 2.5).all()
    copy = gpu.duplicate(da)
    gpu.fill(da, 0.0)
    assert_close(gpu.get(copy), a, 0, "duplicate")
    gpu.assign(copy, b.astype(np.float32))
    assert_close(gpu.get(copy), b.astype(np.float32), 0, "assign")
    bad = np.array([1.0, np.nan, np.inf, -np.inf, 3.0])
    assert gpu.count_nonfinite(gpu.put(bad)) == 3
    assert gpu.first_nonfinite({"ok": da, "bad": gpu.put(bad)}) == "bad"
    assert gpu.first_nonfinite({"ok": da}) is None


@pytest.mark.parametrize("recipe", [
    {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01},
    {"optimizer": "sgd", "momentum": 0.9, "nesterov": True},
    {"optimizer": "sgd"},
    {"optimizer": "adam", "weight_decay": 0.01},
    {"optimizer": "adamw", "weight_decay": 0.05},
], ids=["sgd-momentum", "sgd-nesterov", "sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("packed", [False, True], ids=["per-array", "packed"])
def test_optimizers_match_the_cpu(gpu, recipe: dict[str, object], dtype: str,  # type: ignore[no-untyped-def]
                                  packed: bool) -> None:
    """Per array, or packed (one launch over the flat arrays, as in training)."""
    rng = np.random.default_rng(1)
    shapes = {"c.weight": (4, 2, 3), "c.bias": (4,)}
    host = {name: random_array(rng, shape).astype(dtype) for name, shape in shapes.items()}
    device = gpu.packed(shapes, dtype) if packed else {}
    for name, array in host.items():
        if packed:
            gpu.assign(device[name], array)
        else:
            device[name] = gpu.put(array.copy())
    settings = TrainSettings(**{"lr": 0.05, **recipe})  # type: ignore[arg-type]
    on_cpu, on_gpu = make_optimizer(settings, host), make_optimizer(settings, device)
    assert on_gpu.device.name == "cuda"
    for step in range(4):
        grads = {name: random_array(rng, shape).astype(dtype)
                 for name, shape in shapes.items()}
        on_cpu.step(host, grads, 0.05 / (step + 1))
        on_device = gpu.packed(shapes, dtype) if packed else {}
        for name, grad in grads.items():
            if packed:
                gpu.assign(on_device[name], grad)
            else:
                on_device[name] = gpu.put(grad)
        on_gpu.step(device, on_device, 0.05 / (step + 1))
    tolerance = 1e-12 if dtype == "float64" else 2e-6
    for name in shapes:
        assert_close(gpu.get(device[name]), host[name], tolerance, name)
    cpu_state, gpu_state = on_cpu.state_dict(), on_gpu.state_dict()
    assert cpu_state.keys() == gpu_state.keys()
    for key in cpu_state:
        assert_close(np.asarray(gpu_state[key], dtype=np.float64),
                     np.asarray(cpu_state[key], dtype=np.float64), tolerance, key)
    # A state saved on the GPU loads on the CPU and back (a run may move between them).
    on_gpu.load_state_dict(cpu_state)
    assert int(on_gpu.state_dict()["step"]) == 4


# A network with the main kinds of op, small enough for the simulator: convolution +
# batch norm + relu (fused), a residual add with relu (fused after convolution and
# batch norm, and max pooling after it), max and average pooling, a
# concatenation, dropout, dense with softmax and an auxiliary head.
NETWORK = """
input x: 2x6x6
c1 = conv(3, 3, pad=same, bias=no)
b1 = bn
r1 = relu
c2 = conv(3, 3, pad=same, bias=no) -> bn
s = add(c2, r1, act=relu)
p = s -> maxpool(2)
a = p -> avgpool(3, stride=1, pad=1)
g = p -> conv(2, 1, act=tanh)
j = concat(a, g)
d = j -> dropout(0.25)
f = d -> flatten
y = f -> dense(4, act=softmax)
h = f -> dense(3)
output y loss=cross_entropy
aux h loss=cross_entropy weight=0.3
"""


def _pair(fuse: bool = True) -> tuple[convdsl.CompiledNetwork, convdsl.CompiledNetwork]:
    nets = tuple(convdsl.compile(NETWORK, batch=2, dtype="float64", seed=3, fuse=fuse,
                                 device=device, warm=False) for device in ("cpu", "cuda"))
    return nets  # type: ignore[return-value]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_network_trains_on_the_gpu_as_on_the_cpu(fuse: bool) -> None:
    cpu, gpu = _pair(fuse)
    rng = np.random.default_rng(7)
    x = random_array(rng, (2, 2, 6, 6))
    targets = {"y": np.array([1, 3]), "h": np.array([0, 2])}
    for step in range(2):  # the second step reads the running statistics the first wrote
        out_cpu, out_gpu = cpu.forward(x, train=True), gpu.forward(x, train=True)
        assert isinstance(out_gpu, np.ndarray)
        assert_close(out_gpu, out_cpu, 1e-10, f"step {step} output")
        loss_cpu, loss_gpu = cpu.loss(targets), gpu.loss(targets)
        assert abs(loss_gpu - loss_cpu) <= 1e-10 * abs(loss_cpu)
        if step == 0:
            assert_close(gpu.backward(), cpu.backward(), 1e-10, "input gradient")  # type: ignore[arg-type]
        else:  # as training calls it: the input's gradient stays where it is
            assert gpu.backward(input_grad=False) is None
            assert cpu.backward(input_grad=False) is None
        for name, grad in cpu.grads.items():
            assert_close(gpu.device.get(gpu.grads[name]), grad, 1e-10, f"grad of {name}")
    for name, value in cpu.state_dict().items():
        assert_close(gpu.state_dict()[name].astype(np.float64), value.astype(np.float64),
                     1e-10, name)
    # Inference: batch norm folded into the convolution's weights, on the device.
    assert_close(gpu.forward(x), cpu.forward(x), 1e-10, "inference")


def _two_sgd_steps(packed: bool, monkeypatch: pytest.MonkeyPatch
                     ) -> tuple[list[float], dict[str, np.ndarray]]:
    from convdsl.codegen.cuda import common

    monkeypatch.setattr(common, "PACKED", packed)
    net = convdsl.compile(NETWORK, batch=2, dtype="float64", seed=3, device="cuda",
                          warm=False)
    trained = net.trained
    optimizer = make_optimizer(TrainSettings(lr=0.1, momentum=0.9), trained)
    rng = np.random.default_rng(7)
    x = random_array(rng, (2, 2, 6, 6))
    targets = {"y": np.array([1, 3]), "h": np.array([0, 2])}
    losses = []
    for _ in range(2):
        net.forward(x, train=True)
        losses.append(net.loss(targets))
        net.backward(input_grad=False)
        optimizer.step(trained, net.grads, 0.1)
    return losses, net.state_dict()


def test_packed_launches_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU, a launch site packs its arguments once and hands them straight to the
    driver afterwards (codegen/cuda/common.Launch); the simulator never packs. Two
    training steps (with momentum, so the second reads the first) agree bit for bit with
    packing on and off, and on a GPU every launch packed."""
    from convdsl.codegen.cuda import common

    before = dict(common.LAUNCH_COUNTS)
    losses, state = _two_sgd_steps(True, monkeypatch)
    packed = common.LAUNCH_COUNTS["packed"] - before["packed"]
    assert common.LAUNCH_COUNTS["unpacked"] == before["unpacked"]
    assert packed == 0 if common.simulated() else packed > 0
    plain_losses, plain_state = _two_sgd_steps(False, monkeypatch)
    assert common.LAUNCH_COUNTS["packed"] - before["packed"] == packed
    assert losses == plain_losses
    for name, value in plain_state.items():
        assert np.array_equal(state[name], value), name


def test_an_update_and_the_nan_check_launch_once_for_all_parameters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A network's parameters and gradients are packed (runtime/devices.Packed): the
    optimizer's step is one launch and the NaN check of the gradients two (zero the
    counter, count), however many arrays the network trains."""
    from convdsl.codegen.cuda import common

    net = convdsl.compile(NETWORK, batch=2, dtype="float64", device="cuda", warm=False)
    assert len(net.trained) > 4
    optimizer = make_optimizer(TrainSettings(lr=0.1, momentum=0.9), net.trained)
    launched: list[str] = []
    launch = common.Launch.__call__

    def counted(site: common.Launch, *args: object) -> None:
        launched.append(site.name)
        launch(site, *args)

    monkeypatch.setattr(common.Launch, "__call__", counted)
    assert net.device.first_nonfinite(net.grads) is None
    assert len(launched) == 2
    optimizer.step(net.trained, net.grads, 0.1)
    assert len(launched) == 3
    third = list(net.grads)[2]  # found by name, once the packed count says something is
    net.device.assign(net.grads[third], np.full(net.grads[third].shape, np.nan))
    assert net.device.first_nonfinite(net.grads) == third


def test_time_reports_every_kernel_of_every_stage(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`convdsl time --device cuda --kernels`: each launch timed on its own, filed under
    its stage and pass with its template and function, for every stage; nothing is
    left timing launches afterwards."""
    from convdsl.codegen.cuda import common
    from convdsl.report.timing import time_network

    text = ("input x: 1x5x5\nc1 = conv(2, 3)\nc2 = conv(2, 2, act=relu)\np = maxpool(2)\n"
            "flatten\nout = dense(3)\noutput out loss=cross_entropy\n")
    net = convdsl.compile(text, batch=2, dtype="float32", device="cuda", warm=False)
    timing = time_network(net, iterations=1, kernels=True)
    assert common.LAUNCH_TIMER is None
    assert [(k.stage, k.kernel) for k in timing.kernels if k.pass_ == "forward"] == [
        ("c1", "conv.forward"), ("p", "conv.forward"), ("p", "maxpool.forward"),
        ("out", "dense.forward")]
    assert {k.kernel for k in timing.kernels if k.stage == "p" and k.pass_ == "backward"} == {
        "maxpool.backward", "conv.prepare", "conv.input_grad0", "conv.weight_grad"}
    assert all(k.launches == 1 and k.seconds > 0 for k in timing.kernels)
    data = timing.to_dict()
    assert len(data["kernels"]) == len(timing.kernels)
    assert sum(k["share"] for k in data["kernels"]) == pytest.approx(1.0)
    path = tmp_path / "net.cnn"
    path.write_text(text)
    assert cli("time", path, "--batch", "2", "--iterations", "1", "--device", "cuda",
               "--kernels") == 0
    out = capsys.readouterr().out
    assert "kernels, each launch between two synchronisations of its own:" in out
    assert "conv.weight_grad" in out and "all kernels" in out


def test_whole_array_launch_sites_are_kept_per_set_of_arrays(
        gpu, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from convdsl.codegen.cuda import common

    monkeypatch.setattr(common, "_SITES", common.OrderedDict())
    monkeypatch.setattr(common, "SITES_KEPT", 2)
    a, b, c = (gpu.put(np.full((2, 3), value)) for value in (1.0, 2.0, 3.0))
    for x in (a, a, b):
        gpu.scale(x, 2.0)  # the same site for `a` twice; the factor is an argument
    assert len(common._SITES) == 2
    gpu.scale(c, 0.5)  # a third set of arrays: the least recent site (a's) goes
    assert len(common._SITES) == 2
    assert not any(site._last and site._last[0] is a for site in common._SITES.values())
    gpu.scale(a, 0.25)  # and comes back, packed afresh
    assert [gpu.get(x)[0, 0] for x in (a, b, c)] == [1.0, 4.0, 1.5]


def test_a_launch_site_reuses_its_arguments_only_for_the_same_objects() -> None:
    from convdsl.codegen.cuda.common import _same

    x, y = np.zeros(2), np.zeros(2)
    assert _same((x, 1, np.float32(0.5)), (x, 1, np.float32(0.5)))
    assert not _same((y, 1), (x, 1))  # equal values, but another array
    assert not _same((x, 2), (x, 1))
    assert not _same((x, 1.0), (x, 1))  # another type packs differently
    assert not _same((x,), None)


def test_weights_move_between_devices() -> None:
    cpu, gpu = _pair()
    gpu.load_state_dict(cpu.state_dict())
    x = random_array(np.random.default_rng(2), (2, 2, 6, 6))
    assert_close(gpu.forward(x), cpu.forward(x), 1e-10, "after load_state_dict")
    with pytest.raises(RunError, match="has shape"):
        gpu.load_state_dict({**cpu.state_dict(), "c1.weight": np.zeros((1, 1))})


def test_nan_check_names_the_stage_on_the_gpu() -> None:
    net = convdsl.compile(NETWORK, batch=2, dtype="float64", device="cuda", check=True,
                          warm=False)
    net.load_state_dict({**net.state_dict(),
                         "h.weight": np.full(net.state_dict()["h.weight"].shape, np.inf)})
    with pytest.raises(RunError, match="'h'"):
        net.forward(random_array(np.random.default_rng(0), (2, 2, 6, 6)), train=True)


def test_without_a_gpu_the_error_says_so_and_how_to_fix_it() -> None:
    # A child process without the simulator: this machine's real answer.
    code = ("import convdsl\n"
            "from convdsl.errors import RunError\n"
            "try:\n"
            "    convdsl.compile('input x: 1x4x4\\nc = conv(1, 3)\\noutput c', device='cuda')\n"
            "except RunError as exc:\n"
            "    print('RunError:', exc.message, '|', exc.hint)\n"
            "else:\n"
            "    print('compiled')\n")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    if "compiled" in result.stdout:
        pytest.skip("this machine has a usable GPU")
    assert "RunError: --device cuda found no usable NVIDIA GPU" in result.stdout, result
    assert "--device cpu" in result.stdout


def test_without_numba_cuda_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from convdsl.codegen.cuda import common

    monkeypatch.setattr(common, "_CUDA", None)
    monkeypatch.setattr(common, "_has_numba_cuda", lambda: False)
    monkeypatch.setattr(common, "simulated", lambda: False)
    with pytest.raises(RunError) as caught:
        common.cuda()
    assert "numba-cuda" in caught.value.message
    assert 'pip install "convdsl[cuda]"' in (caught.value.hint or "")


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(RunError, match="unknown device 'tpu'"):
        convdsl.compile("input x: 1x4x4\nc = conv(1, 3)\noutput c", device="tpu")


def cli(*args: str | Path) -> int:
    return main([str(arg) for arg in args])


def test_train_on_the_gpu_resume_and_test_on_the_cpu(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`convdsl train --device cuda` end to end: a run stopped after one epoch resumes on
    the GPU, ends where the same run on the CPU ends (float64), and its checkpoint is
    scored on the CPU."""
    network = tmp_path / "tiny.cnn"
    network.write_text(TINY)
    data = write_data(tmp_path / "data.npz", 24, test=8)  # 2 steps an epoch: the simulator is slow
    recipe = ["--data", data, "--dtype", "float64", "--no-progress"]
    on_gpu, on_cpu = tmp_path / "gpu", tmp_path / "cpu"
    assert cli("train", network, *recipe, "--epochs", "1", "--device", "cuda",
               "--out", on_gpu) == 0
    assert cli("train", network, "--epochs", "2", "--device", "cuda", "--out", on_gpu,
               "--resume", "--no-progress") == 0
    assert cli("train", network, *recipe, "--epochs", "2", "--out", on_cpu) == 0
    gpu_weights = ckpt.load(on_gpu / "checkpoint.npz")
    cpu_weights = ckpt.load(on_cpu / "checkpoint.npz")
    for name, value in cpu_weights.params.items():
        assert_close(gpu_weights.params[name].astype(np.float64), value.astype(np.float64),
                     1e-9, name)
    for name, value in cpu_weights.optimizer.items():
        assert_close(np.asarray(gpu_weights.optimizer[name], np.float64),
                     np.asarray(value, np.float64), 1e-9, name)
    capsys.readouterr()
    assert cli("test", network, "--weights", on_gpu, "--data", data, "--json") == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 8


def test_every_op_has_cuda_kernels() -> None:
    from convdsl.codegen.layer import registered_ops
    from convdsl.ir.ops import Op

    assert registered_ops("cuda") == set(Op) - {Op.INPUT}
