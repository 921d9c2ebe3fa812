"""The memory plan: lifetimes of values and gradients, and buffers shared between them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convdsl
from convdsl import cli
from convdsl.codegen import cache
from convdsl.codegen.cpu import conv, conv_gemm
from convdsl.codegen.cpu.conv_common import Geometry
from convdsl.codegen.layer import layer_setups
from convdsl.errors import RunError
from convdsl.network import Network
from convdsl.passes.fusion import fusion_groups
from convdsl.passes.memory import (
    MemoryPlan,
    Tensor,
    assign_buffers,
    assign_in_order,
    plan_gradients,
    plan_memory,
    transient_outputs,
)
from convdsl.runtime.gradcheck import random_targets

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "networks").glob("*.cnn"))

# 1-D, batch 2, float32: x 80 bytes, c and r 160, d 40; flatten is a view of r.
CHAIN = """\
input x: 1x10
c = conv(2, 3, pad=1, bias=no)
r = relu
flatten
d = dense(5)
output d loss=mse
"""
CHAIN_WEIGHTS = 4 * (2 * 3 + 20 * 5 + 5)  # conv weight, dense weight and bias


def lifetimes(plan: MemoryPlan) -> dict[str, tuple[int, int]]:
    return {t.name: (t.start, t.end) for t in plan.tensors}


def step_of(plan: MemoryPlan, label: str) -> int:
    return plan.steps.index(label)


def alive(plan: MemoryPlan, name: str, step: int) -> bool:
    tensor = next(t for t in plan.tensors if t.name == plan.aliases.get(name, name))
    return tensor.start <= step <= tensor.end


# --- a small chain, checked by hand ----------------------------------------------------


def test_inference_of_a_small_chain() -> None:
    plan = plan_memory(convdsl.loads(CHAIN), batch=2, dtype="float32", training=False)
    assert plan.steps == ("inputs", "forward c", "forward r", "forward flatten_1",
                          "forward d")
    assert plan.aliases == {"out:flatten_1": "out:r"}
    # r lives until d reads it through the flatten view; d is an output: to the end
    assert lifetimes(plan) == {"out:x": (0, 1), "out:c": (1, 2), "out:r": (2, 4),
                               "out:d": (4, 4)}
    assert plan.buffers == (160, 160)  # c, then x and d take the buffers c and r free
    assert plan.assignment == {"out:c": 0, "out:r": 1, "out:x": 1, "out:d": 0}
    assert plan.weight_bytes == CHAIN_WEIGHTS
    assert plan.peak_bytes == CHAIN_WEIGHTS + 320
    assert plan.unplanned_bytes == CHAIN_WEIGHTS + 80 + 160 + 160 + 40


def test_training_of_a_small_chain() -> None:
    plan = plan_memory(convdsl.loads(CHAIN), batch=2, dtype="float32", training=True)
    assert plan.steps[5:] == ("loss", "backward d", "backward flatten_1", "backward r",
                              "backward c")
    assert plan.aliases == {"out:flatten_1": "out:r", "grad:r": "grad:flatten_1"}
    assert lifetimes(plan) == {
        "out:x": (0, 9),  # the conv's weight gradient reads its input
        "out:c": (1, 2),  # no activation in c: its backward needs no output
        "out:r": (2, 8),  # read by d's backward (its input) and relu's (its output)
        "out:d": (4, 5),  # the loss reads it
        "grad:d": (5, 6),
        "grad:flatten_1": (6, 8),  # reshaped, it is r's gradient too
        "grad:c": (8, 9),
        "grad:x": (9, 9),  # returned by backward()
    }
    assert plan.buffers == (160, 160, 160, 80)
    assert plan.weight_bytes == 2 * CHAIN_WEIGHTS  # parameters and their gradients
    assert plan.peak_bytes == 2 * CHAIN_WEIGHTS + 560
    assert plan.unplanned_bytes == 2 * CHAIN_WEIGHTS + 880
    # step 8 holds x, r, grad:flatten_1 and grad:c: this plan reaches the bound
    assert plan.live_bytes == plan.peak_bytes


def test_a_second_gradient_contribution_is_a_temporary() -> None:
    net = convdsl.loads("input x: 2x4x4\na = conv(2, 3, pad=1)\ns = add(a, x)\n"
                        "output s loss=mse\n")
    plan = plan_memory(net, batch=1, dtype="float32", training=True)
    spans = lifetimes(plan)
    add, conv = step_of(plan, "backward s"), step_of(plan, "backward a")
    assert spans["grad:x"] == (add, conv)  # written by add, completed by the conv
    assert spans["grad:x+a"] == (conv, conv)
    assert plan.assignment["grad:x+a"] != plan.assignment["grad:x"]


def test_dropout_is_a_view_at_inference_and_keeps_a_mask_in_training() -> None:
    net = convdsl.loads("input x: 2x8\nd = dropout(0.5)\nflatten\nf = dense(3)\n"
                        "output f loss=mse\n")
    inference = plan_memory(net, batch=4, training=False)
    assert inference.aliases == {"out:d": "out:x", "out:flatten_1": "out:x"}
    training = plan_memory(net, batch=4, training=True)
    spans = lifetimes(training)
    assert spans["mask:d"] == (step_of(training, "forward d"), step_of(training, "backward d"))
    # the dense reads its input, a view of d, in its backward
    assert spans["out:d"][1] == step_of(training, "backward f")
    assert spans["out:x"] == (0, step_of(training, "forward d"))


def test_maxpool_indices_are_int64_and_scratch_at_inference() -> None:
    net = convdsl.loads("input x: 1x4x4\np = maxpool(2)\noutput p\n")
    plan = plan_memory(net, batch=1, dtype="float32", training=False)
    argmax = next(t for t in plan.tensors if t.name == "argmax:p")
    assert argmax.size == 4 * 8 and argmax.start == argmax.end == 1


def test_batch_scales_every_buffer() -> None:
    net = convdsl.loads(CHAIN)
    one, eight = (plan_memory(net, batch, training=True) for batch in (1, 8))
    assert eight.buffers == tuple(8 * size for size in one.buffers)
    assert eight.weight_bytes == one.weight_bytes


def test_float64_doubles_everything() -> None:
    net = convdsl.loads(CHAIN)
    single, double = (plan_memory(net, 2, dtype, training=True)
                      for dtype in ("float32", "float64"))
    assert double.peak_bytes == 2 * single.peak_bytes


@pytest.mark.parametrize("batch, dtype", [(0, "float32"), (True, "float32"),
                                          (2, "int8")])
def test_bad_batch_or_dtype_is_a_run_error(batch: int, dtype: str) -> None:
    with pytest.raises(RunError):
        plan_memory(convdsl.loads(CHAIN), batch, dtype)


# --- the zoo: properties that hold for every network ----------------------------------


@pytest.fixture(scope="module", params=ZOO, ids=[path.stem for path in ZOO])
def zoo_network(request: pytest.FixtureRequest) -> Network:
    return convdsl.load(request.param)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_zoo_plans_never_share_a_buffer_between_live_tensors(
        zoo_network: Network, training: bool) -> None:
    plan = plan_memory(zoo_network, batch=2, training=training)
    check_buffers(plan.tensors, plan.buffers, plan.assignment)
    assert all(0 <= t.start <= t.end < len(plan.steps) for t in plan.tensors)
    assert plan.live_bytes <= plan.peak_bytes <= plan.unplanned_bytes


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_zoo_plans_keep_what_each_step_reads(zoo_network: Network, training: bool) -> None:
    plan = plan_memory(zoo_network, batch=2, training=training)
    for layer in zoo_network.layers:
        label = f"forward {layer.name}"
        if label in plan.steps:
            step = step_of(plan, label)
            assert alive(plan, f"out:{layer.name}", step)
            assert all(alive(plan, f"out:{source}", step) for source in layer.inputs)
        label = f"backward {layer.name}"
        if label not in plan.steps:
            continue
        step = step_of(plan, label)
        assert alive(plan, f"grad:{layer.name}", step)
        if layer.op.value in ("conv", "dense", "bn"):  # weight or normalisation gradients
            assert all(alive(plan, f"out:{source}", step) for source in layer.inputs)
        if layer.act is not None and layer.act.kind.value != "identity":
            assert alive(plan, f"out:{layer.name}", step)
    last = len(plan.steps) - 1
    for output in zoo_network.outputs:
        assert alive(plan, f"out:{output.name}", step_of(plan, "loss") if training else last)


def check_buffers(tensors: Sequence[Tensor], buffers: Sequence[int],
                  assignment: dict[str, int]) -> None:
    assert sorted(assignment) == sorted(t.name for t in tensors)
    by_buffer: dict[int, list[Tensor]] = {}
    for tensor in tensors:
        index = assignment[tensor.name]
        assert tensor.size <= buffers[index]
        by_buffer.setdefault(index, []).append(tensor)
    assert sorted(by_buffer) == list(range(len(buffers)))  # no buffer left empty
    for held in by_buffer.values():
        for i, first in enumerate(held):
            assert not any(first.overlaps(second) for second in held[i + 1:])


lifetime = st.tuples(st.integers(1, 64), st.integers(0, 20), st.integers(0, 5))


@settings(max_examples=150, deadline=None)
@given(st.lists(lifetime, max_size=30))
def test_greedy_assignment_is_valid_for_any_lifetimes(
        spans: list[tuple[int, int, int]]) -> None:
    tensors = [Tensor(f"t{i}", size, start, start + length)
               for i, (size, start, length) in enumerate(spans)]
    for buffers, assignment in (assign_buffers(tensors), assign_in_order(tensors)):
        check_buffers(tensors, buffers, assignment)
        busiest = max((sum(t.size for t in tensors if t.start <= step <= t.end)
                       for step in range(26)), default=0)
        assert busiest <= sum(buffers) <= sum(t.size for t in tensors)


# --- the executor's gradient buffers --------------------------------------------------

# A residual block with a strided 1x1 shortcut (whose input gradient has positions no
# window reads), flatten and dropout (which may hand on the gradient they receive), an
# auxiliary head, and an input read twice.
RESIDUAL = """\
input x: 3x8x8
stem = conv(4, 3, pad=1, bias=no) -> bn(act=relu)
a = stem -> conv(8, 3, stride=2, pad=1, bias=no) -> bn(act=relu) -> conv(8, 3, pad=1)
    -> bn
short = stem -> conv(8, 1, stride=2, bias=no) -> bn
out = add(a, short, act=relu)
twice = add(x, x)
side = twice -> global_avgpool -> flatten -> dense(2)
head = out -> flatten -> dropout(0.5) -> dense(5)
output head loss=cross_entropy
aux side loss=mse weight=0.5
"""


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_gradient_plan_shares_buffers_and_never_between_live_tensors(
        zoo_network: Network, fuse: bool) -> None:
    groups = fusion_groups(zoo_network, fuse)
    plan = plan_gradients(zoo_network, groups, batch=2, dtype="float32")
    check_buffers(plan.tensors, plan.buffers, plan.assignment)
    assert all(0 <= t.start <= t.end <= len(groups) for t in plan.tensors)
    assert plan.bytes <= plan.unplanned_bytes
    if len(groups) > 4:
        assert len(plan.buffers) < len(groups)


def test_a_gradient_lives_until_the_stage_of_its_value_reads_it() -> None:
    network = convdsl.loads(RESIDUAL)
    groups = fusion_groups(network)
    plan = plan_gradients(network, groups, batch=2, dtype="float32")
    spans = {t.name: (t.start, t.end) for t in plan.tensors}
    step = {name: index for index, name in enumerate(plan.steps)}
    end = len(plan.steps)
    # stem feeds two stages: either contribution may arrive first and take the sum, so
    # both live until stem's step (a stage is named by its last layer: a.1 is a.0's
    # conv and a.1's batch norm)
    assert spans["grad:a.1:0"][1] == spans["grad:short.1:0"][1] == step["stem.1"]
    # a network input's gradient is copied out at the end; add(x, x) writes two (its
    # stage ends with the pooling that follows, side.0, and is named after it)
    assert spans["grad:side.0:0"] == spans["grad:side.0:1"] == (step["side.0"], end)
    assert not any(name.startswith("sum:") for name in spans)
    # flatten and dropout may hand on what they receive: the dense layer's gradient
    # lives until out reads it
    assert spans["grad:head.2:0"] == (step["head.2"], step["out"])
    assert "grad:head.0:0" not in spans  # flatten writes none of its own
    # inside a stage of conv and batch norm, the norm writes over what it receives
    assert "grad:a.1" not in spans


def _training_results(net: convdsl.CompiledNetwork) -> list[dict[str, np.ndarray]]:
    """Outputs, gradients and input gradients of training and inference forwards, each
    followed by two backward passes (the second must see what the first saw)."""
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((net.batch, *shape)).astype(net.dtype)
              for name, shape in net.input_shapes.items()}
    targets = random_targets(net, rng)
    results = []
    for train in (True, False, True):
        net.forward(inputs, train=train)
        net.loss(targets)
        for input_grad in (True, True, False):
            returned = net.backward(input_grad=input_grad)
            result = {f"grad/{name}": grad.copy() for name, grad in net.grads.items()}
            result.update({f"out/{name}": value for name, value in net.outputs.items()})
            if returned is not None:
                result["input"] = np.asarray(returned)
            results.append(result)
    return results


def test_outputs_no_backward_reads_share_memory_once_read() -> None:
    """The batch norms without activation that only feed an add (a residual block's
    last and its shortcut's) are read by no backward: their memory is shared once the
    add has run, and activation() says so rather than return what is there now."""
    network = convdsl.loads(RESIDUAL)
    assert set(transient_outputs(network, fusion_groups(network, fuse=False))) == {
        "a.3", "short.1"}
    # fused, a.3 is computed inside the add's stage; short.1 is that stage's residual
    assert set(transient_outputs(network, fusion_groups(network))) == {"short.1"}
    # batch 3 and GEMM, as test_shared_buffers_change_no_result: shared kernels
    net = convdsl.compile(RESIDUAL, batch=3, algo="gemm", warm=False, fuse=False)
    plan = net.output_plan
    assert plan is not None and len(plan.buffers) == 2  # both are read by one add
    net.forward(np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(RunError, match="share=False"):
        net.activation("a.3")
    separate = convdsl.compile(RESIDUAL, batch=3, algo="gemm", warm=False, share=False,
                                fuse=False)
    separate.forward(np.zeros((3, 3, 8, 8), np.float32))
    assert separate.activation("a.3").shape == (3, 8, 4, 4)
    fused = convdsl.compile(RESIDUAL, batch=3, algo="gemm", warm=False)
    fused.forward(np.zeros((3, 3, 8, 8), np.float32))
    with pytest.raises(RunError, match="share=False"):
        fused.activation("short.1")


@pytest.mark.parametrize("source, algo, fuse", [
    (RESIDUAL, "gemm", True), (RESIDUAL, "direct", True), (RESIDUAL, "fft", True),
    (RESIDUAL, "gemm", False), (ROOT / "examples" / "every_op_image.cnn", None, True)],
    ids=["residual-gemm", "residual-direct", "residual-fft", "residual-unfused",
         "every-op"])
def test_shared_buffers_change_no_result(source: str | Path, algo: str | None,
                                         fuse: bool) -> None:
    shared, separate = (convdsl.compile(source, batch=3, dtype="float32", algo=algo,
                                        seed=2, warm=False, fuse=fuse, share=share)
                        for share in (True, False))
    assert separate.gradient_plan is None and separate.output_plan is None
    plan = shared.gradient_plan
    assert plan is not None and len(plan.buffers) < len(plan.tensors)
    results = _training_results(shared)
    for got, want in zip(results, _training_results(separate), strict=True):
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # a second backward() sees what the first saw: no buffer a forward value lives in
    # was overwritten (the folded twin of conv + batch norm shares its product's output)
    for first, second in zip(results[::3], results[1::3], strict=True):
        for name in first:
            np.testing.assert_array_equal(second[name], first[name], err_msg=name)


def test_warm_up_leaves_every_parameter_and_statistic_as_it_was() -> None:
    """warm_up() saves only what a forward changes (batch norm's running statistics),
    so that no copy of the weights adds to the peak; all comes back as it was."""
    net = convdsl.compile(RESIDUAL, batch=3, dtype="float32", algo="gemm", seed=2,
                          warm=False)
    before = net.state_dict()
    net.warm_up()
    assert net.step == 0
    for name, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert all(not grad.any() for grad in net.grads.values())


def test_gemm_backward_buffers_lent_by_the_scratch_have_the_generated_shapes() -> None:
    """A GEMM layer's backward buffers come from the shared Scratch in the shapes that
    conv_gemm.own_shapes gives, which must be what the generated own_buffers() makes."""
    network = convdsl.loads(RESIDUAL)
    checked = 0
    for setup in layer_setups(network, 2, "float32", "gemm").values():
        if setup.layer.op.value != "conv":
            continue
        spec = conv.conv_spec(setup, "gemm")
        module = cache.load(spec)
        if hasattr(module, "SCRATCH"):
            made = {name: array.shape for name, array in module.own_buffers().items()}
            assert conv_gemm.own_shapes(Geometry.from_spec(spec)) == made
            checked += 1
    assert checked >= 3


# --- the command line -------------------------------------------------------------


def test_summary_shows_the_plan_for_a_batch(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["summary", str(ROOT / "networks" / "lenet5.cnn"), "--batch", "32"]) == 0
    out = capsys.readouterr().out
    net = convdsl.load(ROOT / "networks" / "lenet5.cnn")
    training = plan_memory(net, 32, "float32", training=True)
    assert "Memory plan (batch 32, float32" in out
    assert f"Training peak (MB): {training.peak_bytes / 1e6:,.2f}" in out
    assert f"without reuse: {training.unplanned_bytes / 1e6:,.2f}" in out


def test_summary_json_has_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(ROOT / "networks" / "lenet5.cnn")
    assert cli.main(["summary", "--json", "--dtype", "float64", path]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["batch"] == 1 and memory["dtype"] == "float64"
    plan = plan_memory(convdsl.load(path), 1, "float64", training=False)
    assert memory["inference"] == plan.to_dict()
    assert memory["training"]["peak_bytes"] > memory["inference"]["peak_bytes"]


def test_summary_rejects_a_batch_below_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["summary", str(ROOT / "networks" / "lenet5.cnn"), "--batch", "0"])
    assert exit_.value.code == 2
    assert "at least 1" in capsys.readouterr().err
