"""The benchmark's own networks (networks/resnet18_cifar.cnn, long_window_signal.cnn) and
its PyTorch opponent (bench/torch_net.py): the figures are the published ones, and the
PyTorch model computes the same network. Nothing here is timed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import convdsl
from convdsl.ir.ops import ConvAttrs, Op
from convdsl.network import Network
from convdsl.runtime.params import init_params

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ROOT / "networks"


def load(stem: str) -> Network:
    return convdsl.load(NETWORKS / f"{stem}.cnn")


# --- ResNet-18 for CIFAR ---------------------------------------------------------------


def test_resnet18_cifar_figures() -> None:
    net = load("resnet18_cifar")
    assert net.warnings == ()
    assert net.input_shape == (3, 32, 32)
    assert net.output_shape == (10,)
    # The common PyTorch CIFAR ResNet-18 (3x3 stem, no max pooling, 10 classes).
    assert net.params == 11_173_962
    assert net.buffers == 9_600  # 20 batch norms' running means and variances
    # torchvision's ResNet-18 less its 7x7 stem and 1000-way head, plus these:
    assert net.params == 11_689_512 - 64 * 3 * 49 - 1000 * 513 + 64 * 3 * 9 + 10 * 513
    assert net.shapes["conv1"] == (64, 32, 32)  # no stride, no max pooling
    stages = [net.shapes[f"layer{i}.1.out"] for i in (1, 2, 3, 4)]
    assert stages == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    ops = [layer.op for layer in net.layers]
    assert Op.MAXPOOL not in ops
    assert (ops.count(Op.CONV), ops.count(Op.BATCHNORM), ops.count(Op.DENSE)) == (20, 20, 1)


def test_resnet18_cifar_macs_by_hand() -> None:
    net = load("resnet18_cifar")
    stem = 64 * 3 * 9 * 32 * 32
    stage1 = 4 * 64 * 64 * 9 * 32 * 32
    later = 0
    for channels, size in ((128, 16), (256, 8), (512, 4)):
        first = channels // 2 * channels * 9 * size * size  # the strided 3x3
        rest = 3 * channels * channels * 9 * size * size
        downsample = channels // 2 * channels * size * size
        later += first + rest + downsample
    assert net.macs == stem + stage1 + later + 512 * 10 == 555_422_720


def cifar_resnet18(torch: Any) -> Any:
    """The common PyTorch CIFAR ResNet-18, written out independently of convdsl, with
    torchvision's attribute names (so state_dict keys are comparable)."""
    nn = torch.nn
    module: Any = nn.Module  # torch is imported only where present

    class BasicBlock(module):  # type: ignore[misc]
        def __init__(self, inputs: int, channels: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, channels, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)
            self.downsample = None
            if stride != 1 or inputs != channels:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inputs, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

        def forward(self, x: Any) -> Any:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x if self.downsample is None else self.downsample(x)
            return torch.relu(out + shortcut)

    class ResNet18(module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            inputs = 64
            for index, channels in enumerate((64, 128, 256, 512), start=1):
                stride = 1 if index == 1 else 2
                blocks = nn.Sequential(BasicBlock(inputs, channels, stride),
                                       BasicBlock(channels, channels, 1))
                setattr(self, f"layer{index}", blocks)
                inputs = channels
            self.fc = nn.Linear(512, 10)

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.bn1(self.conv1(x)))
            for index in (1, 2, 3, 4):
                x = getattr(self, f"layer{index}")(x)
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet18()


def torch_macs(torch: Any, model: Any, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions and dense layers for one example."""
    total = 0

    def count(module: Any, inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * int(np.prod(module.kernel_size))
            total += output[0].numel() * per_output
        elif isinstance(module, torch.nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for hook in hooks:
        hook.remove()
    return total


def test_resnet18_cifar_matches_a_pytorch_model() -> None:
    torch = pytest.importorskip("torch")
    net = load("resnet18_cifar")
    model = cifar_resnet18(torch)
    assert sum(p.numel() for p in model.parameters()) == net.params
    running = sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    assert running == net.buffers
    assert torch_macs(torch, model, net.input_shape) == net.macs
    # Same names and shapes as torch's state_dict: a checkpoint loads either way.
    ours = {name: array.shape for name, array in init_params(net).items()}
    theirs = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    assert ours == theirs


# --- the long-window 1-D network -------------------------------------------------------


def test_long_window_signal_has_long_windows_at_stride_1() -> None:
    net = load("long_window_signal")
    assert net.warnings == ()
    assert net.input_shape == (1, 4096)
    assert net.output_shape == (4,)
    convs = [layer for layer in net.layers if layer.op is Op.CONV]
    assert all(isinstance(layer.attrs, ConvAttrs) for layer in convs)
    windows = {layer.name: net.windows[layer.name] for layer in convs}
    assert {name: w.window for name, w in windows.items()} == {"conv1": (129,), "conv2": (65,)}
    assert all(w.stride == (1,) for w in windows.values())
    assert net.shapes["conv1"] == (16, 4096) and net.shapes["conv2"] == (32, 1024)
    assert net.params == (16 * 129 + 16) + (32 * 16 * 65 + 32) + (32 * 4 + 4) == 35_524


# --- the benchmark's PyTorch model ------------------------------------------------------


@pytest.fixture(scope="module")
def torch_net() -> Any:
    pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "bench"))  # bench/ is scripts, not a package
    try:
        import torch_net as module  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


@pytest.mark.parametrize("stem", ["lenet5", "resnet20_cifar", "resnet18_cifar",
                                  "mnist1d_cnn", "long_window_signal", "voxel3d"])
def test_the_benchmark_model_has_convdsl_parameters(torch_net: Any, stem: str) -> None:
    net = load(stem)
    model = torch_net.TorchModel(net)
    model.load_arrays(init_params(net, 0, "pytorch", "float32"))  # every name, every shape
    assert sum(p.numel() for p in model.parameters()) == net.params


# The batch each network's parity test (tests/test_torch_parity.py) compiles: shared kernels.
@pytest.mark.parametrize(("stem", "batch"), [("lenet5", 2), ("mnist1d_cnn", 3)])
def test_the_benchmark_model_computes_the_same_network(torch_net: Any, stem: str,
                                                       batch: int) -> None:
    import torch
    compiled = convdsl.compile(NETWORKS / f"{stem}.cnn", batch=batch, dtype="float64")
    model = torch_net.TorchModel(compiled.network).double()
    model.load_arrays(compiled.params)
    x = np.random.default_rng(1).standard_normal((batch, *compiled.input_shape))
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, compiled.forward(x), rtol=1e-9, atol=1e-9)
