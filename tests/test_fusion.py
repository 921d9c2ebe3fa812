"""Fusion: which layers join a stage, and that fused stages compute what the layers
compute one by one, on every network of the zoo (forward, loss, every gradient and
the running statistics, in training and in inference)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from reference_check import assert_matches_reference

import convdsl
from convdsl.cli import main
from convdsl.errors import ConvDslError, RunError
from convdsl.passes.fusion import concat_writes, fusion_groups

ROOT = Path(__file__).resolve().parent.parent
ZOO = sorted([*ROOT.glob("networks/*.cnn"), *ROOT.glob("examples/*.cnn")])

# Every fusion pattern in one small network: conv+bn+relu, conv+relu, add+relu,
# conv+bn+add (its residual the add's first input) with an activation and pooling after,
# dense+bn+relu, dense+relu, and a softmax folded into the output layer.
PATTERNS = """network patterns
input 3x10x10
c1 = conv(8, 3, pad=1, bias=no) -> bn -> relu
c2 = conv(8, 3, pad=1) -> relu
d = add(c1, c2) -> relu
c3 = conv(8, 3, pad=1, bias=no) -> bn
r = add(d, c3) -> tanh
p = maxpool(2)
flatten
fc = dense(6) -> bn -> relu
hidden = dense(5) -> relu
out = dense(4) -> softmax
output out
"""

# The pooling fusions the networks above lack: max, average and global max pooling
# after a product (with its own activation, a standalone one, or batch norm and one)
# and after concat; overlapping and padded windows, and activations whose derivatives
# differ. Kept small: each pattern compiles its kernels twice, fused and not.
POOL_PATTERNS = """network pooled
input 2x8x8
a = conv(3, 3, pad=1) -> relu -> maxpool(3, stride=2, pad=1)
b = conv(3, 3, pad=1, bias=no) -> bn -> relu -> maxpool(2, stride=1)
d = conv(3, 3, pad=1, act=leaky_relu) -> avgpool(2, stride=1, pad=1, count_pad=no)
e = d -> conv(2, 1, act=tanh) -> maxpool(3, stride=1, pad=1)
h = concat(d, e, act=relu) -> maxpool(2)
m = h -> conv(2, 1, act=sigmoid) -> global_maxpool
out = dense(3)
output out
"""

# Branches written straight into a concatenation's channels (passes/fusion.py,
# concat_writes), by each convolution algorithm, with and without batch norm (in
# inference folded into the weights), beside branches the concatenation still copies: a
# pooling, a direct convolution (which declines), a value read twice, flat vectors.
# Batch 3, so that every slice is strided across examples.
CONCAT_PATTERNS = """network joined
input x: 4x6x6
a = conv(5, 1, act=relu, algo=gemm)
b = x -> conv(3, 3, pad=1, bias=no, algo=winograd) -> bn -> relu
c = x -> conv(2, 3, pad=1, bias=no, algo=gemm) -> bn
d = x -> maxpool(3, stride=1, pad=1)
e = x -> conv(2, 3, pad=1, algo=fft, act=tanh)
f = x -> conv(2, 3, pad=1, algo=direct, act=elu)
g = x -> conv(3, 1, algo=gemm)
j = concat(a, b, c, d, e, f, g) -> maxpool(2)
side = g -> global_avgpool -> flatten
k = j -> global_avgpool -> flatten
both = concat(k, side)
out = dense(3)
output out
"""

# Each network is compiled at the batch its PyTorch parity test uses, so that the
# two tests share kernels. Cold compiles dominate this test (VGG-16-BN alone took
# 107 s in CI), so CI runs the zoo networks whose kernels the parity tests share,
# and PATTERNS stands in for the patterns only the ImageNet networks have (conv+relu
# in AlexNet and VGG, conv+bn+relu in VGG-16-BN). CONVDSL_FUSION_ZOO=all runs every
# network of the zoo with a fused group.
PARITY_BATCH = {"resnet20_cifar": 2, "voxel3d": 2, "inception_module": 1,
                "every_op_image": 3, "every_op_signal": 4, "every_op_volume": 3}


def groups(text: str) -> list[list[str]]:
    return [[layer.name for layer in group.layers]
            for group in fusion_groups(convdsl.loads(text))]


def test_a_product_swallows_batch_norm_and_an_activation() -> None:
    assert groups("input 3x8x8\nc = conv(4, 3) -> bn -> relu\nflatten\nfc = dense(2)\n"
                  "output fc") == [["c.0", "c.1", "c.2"], ["flatten_1"], ["fc"]]


def test_layers_with_other_readers_or_outputs_are_not_swallowed() -> None:
    text = """input 3x8x8
    c = conv(4, 3)
    r = c -> relu
    side = c -> global_avgpool -> flatten -> dense(2)
    top = r -> global_avgpool -> flatten -> dense(2)
    output top
    aux side"""
    assert ["c"] in groups(text)  # c has two readers: the relu keeps its own stage
    out = "input 3x8x8\nc = conv(4, 3)\nr = relu\nf = flatten\nfc = dense(2)\noutput fc\naux c"
    assert ["c"] in groups(out)  # c is an output: someone reads its own value


def test_fusion_stops_where_the_rules_say() -> None:
    # bn after a convolution with its own activation cannot fold (relu is in between);
    # an activation cannot join a layer that already has one; pooling keeps its stage.
    text = """input 3x8x8
    a = conv(4, 3, act=relu) -> bn
    b = conv(4, 3, act=relu) -> tanh
    p = maxpool(2) -> relu
    flatten
    fc = dense(2)
    output fc"""
    assert groups(text)[:5] == [["a.0"], ["a.1"], ["b.0"], ["b.1"], ["p.0"]]


def test_no_fuse_gives_one_stage_per_layer() -> None:
    net = convdsl.loads("input 3x8x8\nc = conv(4, 3) -> bn -> relu\nflatten\nfc = dense(2)\n"
                        "output fc")
    assert [len(g.layers) for g in fusion_groups(net, fuse=False)] == [1] * 5


def test_a_fused_layer_cannot_be_read_and_says_why() -> None:
    net = convdsl.compile("input 3x8x8\nc = conv(4, 3) -> bn -> relu\nflatten\n"
                          "fc = dense(2)\noutput fc", batch=2, warm=False)
    net.forward(np.ones((2, 3, 8, 8), np.float32))
    with pytest.raises(RunError, match=r"fused into stage 'c\.2'"):
        net.activation("c.1")
    assert net.activation("c.2").shape == (2, 4, 6, 6)


# --- fused and unfused agree on the whole zoo ------------------------------------------

def smaller(path: Path) -> convdsl.Network:
    """The network with its image input shrunk (the zoo's ImageNet networks run at
    224x224), to the smallest size it still checks at: fusion does not depend on it."""
    text = path.read_text()
    match = re.search(r"^input (?:\w+: )?(\d+)x(\d+)x(\d+)\s*$", text, re.M)
    if match is None or int(match.group(2)) <= 64:
        return convdsl.load(path)
    for size in (64, 96, 128, 160, 192):
        try:
            return convdsl.loads(text.replace(match.group(0), match.group(0).replace(
                f"{match.group(2)}x{match.group(3)}", f"{size}x{size}")), str(path))
        except ConvDslError:
            continue
    return convdsl.load(path)


def fused_networks() -> list[Path]:
    fusable = [p for p in ZOO if any(g.fused for g in fusion_groups(convdsl.load(p)))]
    if os.environ.get("CONVDSL_FUSION_ZOO") == "all":
        return fusable
    return [p for p in fusable if p.stem in PARITY_BATCH]


def test_the_ci_selection_covers_every_pattern_of_the_zoo() -> None:
    def patterns(networks: list[convdsl.Network]) -> set[str]:
        return {group.describe().split(" (")[-1] for network in networks
                for group in fusion_groups(network) if group.fused}

    everything = [convdsl.load(p) for p in ZOO]
    tested = [convdsl.load(p) for p in fused_networks()] + [
        convdsl.loads(text) for text in (PATTERNS, POOL_PATTERNS, CONCAT_PATTERNS)]
    assert patterns(everything) <= patterns(tested)


def test_every_pattern_computes_what_its_layers_compute() -> None:
    assert_fusion_changes_nothing(convdsl.loads(PATTERNS), batch=3)


def test_a_winograd_convolution_adds_the_residual_in_its_epilogue() -> None:
    # In inference a Winograd layer with batch norm folded in adds the residual (either
    # input of the add) before the activation in its epilogue module; other algorithms
    # run the add's kernel after the convolution (the tests above).
    network = convdsl.loads("""input 4x6x6
    stem = conv(4, 3, pad=1)
    a = conv(4, 3, pad=1, bias=no) -> bn
    first = add(a, stem, act=elu)
    b = conv(4, 3, pad=1, bias=no) -> bn
    second = add(first, b) -> sigmoid
    flatten
    out = dense(3)
    output out""")
    net = convdsl.compile(network, batch=2, dtype="float64", warm=False, algo="winograd")
    stages = {stage.name: stage for stage in net.stages}
    assert stages["first"].description.endswith("(conv+bn+add)")
    assert stages["second.1"].description.endswith("(conv+bn+add+sigmoid)")
    assert all(any(spec.template == "conv_epilogue" and ("residual", True) in spec.options
                   for spec in stages[name].kernel.specs) for name in ("first", "second.1"))
    assert_fusion_changes_nothing(network, batch=2, algo="winograd")


def test_branches_write_into_their_concatenation_and_compute_the_same(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    network = convdsl.loads(CONCAT_PATTERNS)
    assert set(concat_writes(network, fusion_groups(network))) == {
        "a", "b.2", "c.1", "e", "f"}  # not d (pooling), g (read twice), k, side (flat)
    assert_fusion_changes_nothing(network, batch=3)
    net = convdsl.compile(network, batch=3, dtype="float64", warm=False)
    x = np.random.default_rng(1).standard_normal((3, 4, 6, 6))
    for train in (True, False):
        net.forward(x, train=train)
        assert set(net.written_in_place()) == {"a", "b.2", "c.1", "e"}  # f declines
    path = tmp_path / "joined.cnn"
    path.write_text(CONCAT_PATTERNS)
    assert main(["compile", str(path), "--batch", "3", "--dtype", "float64"]) == 0
    assert ("written into concatenations in inference (1): j.0 <- a, b.2, c.1, e "
            "(copies f)") in capsys.readouterr().out


def test_a_concatenation_with_an_activation_copies_its_inputs() -> None:
    # its values are act(branch), not the branches' outputs, so no branch writes them
    network = convdsl.loads("""input x: 2x4x4
    a = conv(2, 1)
    b = x -> conv(2, 1)
    j = concat(a, b, act=relu)
    k = x -> conv(2, 1)
    m = concat(k, j) -> relu
    flatten
    out = dense(2)
    output out""")
    assert concat_writes(network, fusion_groups(network)) == {}


def test_every_pooling_pattern_computes_what_its_layers_compute() -> None:
    assert_fusion_changes_nothing(convdsl.loads(POOL_PATTERNS), batch=3)


@pytest.mark.parametrize("path", fused_networks(), ids=lambda p: p.stem)
def test_fused_stages_compute_what_the_layers_compute(path: Path) -> None:
    assert_fusion_changes_nothing(smaller(path), PARITY_BATCH.get(path.stem, 2))


def assert_fusion_changes_nothing(network: convdsl.Network, batch: int,
                                  algo: str | None = None) -> None:
    """The fused network computes what the NumPy reference computes layer by layer, in
    float64 (the reference, not the network compiled without fusion: it is independent
    of the kernels, and it halves the test's cold compiles)."""
    fused = convdsl.compile(network, batch=batch, dtype="float64", warm=False, algo=algo,
                            seed=0)
    assert len(fused.stages) < len(fusion_groups(network, fuse=False))
    assert_matches_reference(fused)
