"""The model zoo in networks/: every file loads cleanly, is in canonical layout,
and the classic networks match torchvision's published figures exactly.

The figures are torchvision's: trainable parameters as `sum(p.numel() for p in
model.parameters())`, buffers as the batch-norm running means and variances,
and MACs of convolutions and dense layers for one 224x224 image.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import convdsl
from convdsl.frontend.parser import parse
from convdsl.frontend.printer import format_module
from convdsl.ir.ops import FilterAttrs
from convdsl.network import Network

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = ROOT / "networks"
ZOO = sorted(NETWORKS.glob("*.cnn"))  # not networks/errors/, which holds bad examples

_loaded: dict[str, Network] = {}


def load(stem: str) -> Network:
    """Each network is built once per test session."""
    if stem not in _loaded:
        _loaded[stem] = convdsl.load(NETWORKS / f"{stem}.cnn")
    return _loaded[stem]


# --- every file --------------------------------------------------------------


def test_the_zoo_has_every_network() -> None:
    expected = {"lenet5", "alexnet", "vgg11", "vgg16", "vgg16_bn", "nin", "googlenet",
                "resnet18", "resnet34", "resnet50", "resnet20_cifar", "mnist1d_cnn",
                "digits_cnn", "gaussian_signal", "voxel3d"}
    assert expected <= {path.stem for path in ZOO}


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_loads_without_errors_or_warnings(path: Path) -> None:
    net = load(path.stem)
    assert net.warnings == ()
    assert net.name == path.stem
    assert [o for o in net.outputs if not o.aux], "a network needs a main output"


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_is_in_canonical_layout(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert format_module(parse(text)) == text


# --- torchvision's figures ---------------------------------------------------

# network, params, GMACs (3 decimals), batch-norm buffers (running mean + var)
TORCHVISION = [
    ("alexnet", 61_100_840, 0.714, 0),
    ("vgg11", 132_863_336, 7.609, 0),
    ("vgg16", 138_357_544, 15.470, 0),
    ("vgg16_bn", 138_365_992, 15.470, 8_448),
    ("resnet18", 11_689_512, 1.814, 9_600),
    ("resnet34", 21_797_672, 3.664, 17_024),
    ("resnet50", 25_557_032, 4.089, 53_120),
]


@pytest.mark.parametrize(("stem", "params", "gmacs", "buffers"), TORCHVISION,
                         ids=[row[0] for row in TORCHVISION])
def test_matches_torchvision(stem: str, params: int, gmacs: float, buffers: int) -> None:
    net = load(stem)
    assert net.params == params
    assert round(net.macs / 1e9, 3) == gmacs
    assert net.buffers == buffers
    assert net.input_shape == (3, 224, 224)
    assert net.output_shape == (1000,)


def test_lenet5_matches_the_lecture() -> None:
    net = load("lenet5")
    assert net.params == 61_706
    assert net.macs == 416_520
    assert round(net.macs / 1e9, 6) == 0.000417
    assert net.buffers == 0
    assert net.counts["c1"].units == 4_704  # 6 maps of 28x28
    assert net.output_shape == (10,)


def test_googlenet_with_and_without_its_auxiliary_heads() -> None:
    net = load("googlenet")
    # With the two auxiliary classifiers (training) ...
    assert net.params == 13_004_888
    assert net.buffers == 15_072
    assert round(net.macs / 1e9, 3) == 1.507
    # ... and without them (torchvision's googlenet(aux_logits=False), inference).
    assert net.params_without_aux == 6_624_904
    assert net.buffers_without_aux == 14_560
    assert round(net.macs_without_aux / 1e9, 3) == 1.498
    assert net.output_shape == (1000,)
    aux = {o.name: o for o in net.outputs if o.aux}
    assert set(aux) == {"aux1.fc2", "aux2.fc2"}
    assert all(o.weight == 0.3 and o.loss.value == "cross_entropy" for o in aux.values())
    assert all(net.shapes[name] == (1000,) for name in aux)


def test_googlenet_pools_round_up() -> None:
    net = load("googlenet")
    # Ceil mode: 112 -> 56 -> 28 -> 14 -> 7, as in torchvision (floor would give 55).
    assert net.shapes["maxpool1"] == (64, 56, 56)
    assert net.shapes["maxpool2"] == (192, 28, 28)
    assert net.shapes["maxpool3"] == (480, 14, 14)
    assert net.shapes["maxpool4"] == (832, 7, 7)
    assert net.shapes["aux1.pool"] == (512, 4, 4)
    assert net.shapes["aux2.conv.conv"] == (128, 4, 4)


# --- layer names line up with torchvision's state_dict keys -------------------


def layer_names(stem: str) -> set[str]:
    return {layer.name for layer in load(stem).layers}


@pytest.mark.parametrize(("stem", "names"), [
    ("alexnet", {"features.0", "features.3", "features.10", "classifier.1",
                 "classifier.4", "classifier.6"}),
    ("vgg16", {"features.0", "features.28", "classifier.0", "classifier.3", "classifier.6"}),
    ("vgg16_bn", {"features.0", "features.1", "features.40", "features.41", "classifier.6"}),
    ("resnet18", {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.1.conv2",
                  "layer2.0.downsample.0", "layer2.0.downsample.1", "layer4.1.bn2", "fc"}),
    ("resnet34", {"layer3.5.conv2", "layer4.2.bn2", "layer4.0.downsample.0", "fc"}),
    ("resnet50", {"layer1.0.downsample.0", "layer1.0.downsample.1", "layer4.2.conv3",
                  "layer4.2.bn3", "fc"}),
    ("googlenet", {"conv1.conv", "conv1.bn", "conv3.conv", "inception3a.branch1.conv",
                   "inception3a.branch2.0.conv", "inception3a.branch2.1.bn",
                   "inception3a.branch3.1.conv", "inception3a.branch4.1.conv",
                   "inception5b.branch4.1.bn", "aux1.conv.conv", "aux1.conv.bn", "aux1.fc1",
                   "aux1.fc2", "aux2.fc2", "fc"}),
])
def test_layer_names_follow_torchvision(stem: str, names: set[str]) -> None:
    assert names <= layer_names(stem)


def weighted_layers(stem: str) -> dict[str, str]:
    net = load(stem)
    return {layer.name: layer.op.value for layer in net.layers
            if net.counts[layer.name].params}


@pytest.mark.parametrize(("stem", "convs", "bns", "denses"), [
    ("alexnet", 5, 0, 3),
    ("vgg11", 8, 0, 3),
    ("vgg16", 13, 0, 3),
    ("vgg16_bn", 13, 13, 3),
    ("resnet18", 20, 20, 1),  # 17 + 3 downsample convolutions
    ("resnet34", 36, 36, 1),
    ("resnet50", 53, 53, 1),  # 49 + 4 downsample convolutions
    ("googlenet", 57 + 2, 57 + 2, 1 + 4),  # with the aux heads' conv and fc1, fc2
])
def test_weighted_layer_counts(stem: str, convs: int, bns: int, denses: int) -> None:
    ops = list(weighted_layers(stem).values())
    assert (ops.count("conv"), ops.count("bn"), ops.count("dense")) == (convs, bns, denses)


def test_vgg_feature_indices_match_nn_sequential() -> None:
    # torchvision's vgg16: convs at these indices of `features`, pools after each stage.
    net = load("vgg16")
    convs = [int(layer.name.split(".")[1]) for layer in net.layers
             if layer.name.startswith("features.") and layer.op.value == "conv"]
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    pools = [int(layer.name.split(".")[1]) for layer in net.layers
             if layer.name.startswith("features.") and layer.op.value == "maxpool"]
    assert pools == [4, 9, 16, 23, 30]
    bn = load("vgg16_bn")
    assert bn.shapes["features.43"] == (512, 7, 7)  # the last pool
    assert bn.graph.layer("features.43").op.value == "maxpool"


def test_resnet_shapes() -> None:
    net = load("resnet18")
    assert net.output_shape == (1000,)
    assert net.shapes["maxpool"] == (64, 56, 56)
    assert net.shapes["layer4.1.out"] == (512, 7, 7)
    assert net.shapes["avgpool"] == (512,)
    deep = load("resnet50")
    # v1.5: the stride sits on the 3x3 convolution, so conv1 keeps the map size.
    assert deep.shapes["layer2.0.conv1"] == (128, 56, 56)
    assert deep.shapes["layer2.0.conv2"] == (128, 28, 28)
    assert deep.shapes["layer4.2.conv3"] == (2048, 7, 7)


# --- small networks, counted by hand ------------------------------------------


def test_resnet20_cifar() -> None:
    net = load("resnet20_cifar")
    assert net.input_shape == (3, 32, 32)
    assert net.output_shape == (10,)
    stages = [net.shapes[f"layer{i}.2.out"] for i in (1, 2, 3)]
    assert stages == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    convs = [name for name, op in weighted_layers("resnet20_cifar").items() if op == "conv"]
    projections = [name for name in convs if ".shortcut." in name]
    assert len(convs) - len(projections) == 19  # + fc = 20 weight layers
    assert projections == ["layer2.0.shortcut.0", "layer3.0.shortcut.0"]
    stem = 3 * 16 * 9 + 2 * 16
    layer1 = 3 * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    layer2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32 + 16 * 32 + 2 * 32
              + 2 * (2 * 32 * 32 * 9 + 2 * 2 * 32))
    layer3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64 + 32 * 64 + 2 * 64
              + 2 * (2 * 64 * 64 * 9 + 2 * 2 * 64))
    fc = 64 * 10 + 10
    assert net.params == stem + layer1 + layer2 + layer3 + fc == 272_474
    # Option A (parameter-free shortcuts) would have 269,722.
    assert net.params - (16 * 32 + 2 * 32 + 32 * 64 + 2 * 64) == 269_722


def test_nin_cifar() -> None:
    net = load("nin")
    assert net.input_shape == (3, 32, 32)
    assert net.shapes["pool1"] == (96, 16, 16)
    assert net.shapes["pool2"] == (192, 8, 8)
    assert net.shapes["mlp3.cccp2"] == (10, 8, 8)
    assert net.output_shape == (10,)
    assert not [op for op in weighted_layers("nin").values() if op == "dense"]
    assert net.params == (192 * 3 * 25 + 192 + 160 * 192 + 160 + 96 * 160 + 96
                          + 192 * 96 * 25 + 192 + 2 * (192 * 192 + 192)
                          + 192 * 192 * 9 + 192 + 192 * 192 + 192 + 10 * 192 + 10)


def test_mnist1d_cnn() -> None:
    net = load("mnist1d_cnn")
    assert net.input_shape == (1, 40)
    # 40 -> 19 -> 10 -> 5 with stride 2 and padding 1
    assert [net.shapes[f"conv{i}"] for i in (1, 2, 3)] == [(25, 19), (25, 10), (25, 5)]
    conv1 = 25 * 1 * 5 + 25
    conv2 = conv3 = 25 * 25 * 3 + 25
    linear = 25 * 5 * 10 + 10
    assert net.params == conv1 + conv2 + conv3 + linear == 5_210
    assert net.output_shape == (10,)


def test_digits_cnn() -> None:
    net = load("digits_cnn")
    assert net.input_shape == (1, 8, 8)
    assert net.output_shape == (10,)
    assert net.params == (16 * 9 + 16) + (32 * 16 * 9 + 32) + (32 * 2 * 2 * 10 + 10)


def test_gaussian_signal_has_a_fixed_filter() -> None:
    net = load("gaussian_signal")
    smooth = [layer for layer in net.layers if layer.op.value == "filter"]
    assert len(smooth) == 1
    counts = net.counts[smooth[0].name]
    assert (counts.fixed, counts.params, counts.buffers) == (5, 0, 0)
    assert net.fixed == 5
    attrs = smooth[0].attrs
    assert isinstance(attrs, FilterAttrs)
    assert attrs.kernel == (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    assert net.shapes[smooth[0].name] == net.input_shape  # padded "same"
    assert net.params > 0  # trainable layers follow it


def test_voxel3d() -> None:
    net = load("voxel3d")
    assert net.input_shape == (1, 16, 32, 32)
    assert net.shapes["conv1"] == (16, 16, 32, 32)
    assert net.shapes["pool1"] == (16, 16, 16, 16)  # 1x2x2 keeps every frame
    assert net.shapes["pool2"] == (32, 8, 8, 8)
    assert net.counts["conv1"].params == 16 * 1 * 27  # 3x3x3 windows, no bias
    assert net.counts["conv1"].macs == 16 * 16 * 32 * 32 * 27
    assert net.output_shape == (10,)
