"""The compiled network as a whole: against the reference, its interface, its errors,
its cache, and the `compile` and `gradcheck` commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kernel_harness import assert_close

import convdsl
from convdsl.cli import main
from convdsl.codegen import cache
from convdsl.codegen.layer import registered_ops
from convdsl.codegen.spec import KernelSpec
from convdsl.errors import RunError
from convdsl.ir.ops import Op
from convdsl.runtime.gradcheck import random_targets
from convdsl.runtime.reference import ReferenceNetwork

ROOT = Path(__file__).resolve().parent.parent
# Batch 3, as in tests/test_torch_parity.py, so that both share compiled kernels; that
# file runs every small zoo network against PyTorch.
WHOLE_NETWORKS = ["networks/mnist1d_cnn.cnn", "networks/digits_cnn.cnn",
                  "examples/every_op_image.cnn", "examples/toeplitz_signal.cnn"]
TINY = "input x: 2x6x6\nc = conv(3, 3, act=relu)\nflatten\nfc = dense(4)\noutput fc\n"


def _inputs(net: convdsl.CompiledNetwork, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal((net.batch, *shape)).astype(net.dtype)
            for name, shape in net.input_shapes.items()}


@pytest.mark.parametrize("path", WHOLE_NETWORKS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_whole_network_matches_the_reference(path: str, train: bool) -> None:
    net = convdsl.compile(ROOT / path, batch=3, dtype="float64", seed=5, warm=False)
    _check_against_the_reference(net, train)


# Two of each kernel that serves every size (batch norm, Winograd's epilogue, dense's
# epilogue, add, dropout's multiply, max pooling's backward, concat), at different shapes
SIZES = ("input x: 3x8x8\n"
         "a = conv(4, 3, pad=same, bias=no, algo=winograd) -> bn(act=relu)\n"
         "b = conv(4, 3, pad=same, algo=winograd, act=relu)\n"
         "s = add(a, b, act=relu) -> dropout(0.3) -> maxpool(2)\n"
         "c = conv(6, 3, stride=2, pad=1, bias=no, algo=gemm) -> bn(act=relu)\n"
         "d = conv(6, 3, pad=same, algo=winograd, act=relu)\n"
         "t = add(c, d, act=relu) -> dropout(0.3) -> maxpool(2)\n"
         "u = concat(t, t)\nv = concat(u, u)\n"
         "flatten\nh = dense(8, act=relu)\ng = dense(5, act=relu)\nfc = dense(3)\noutput fc\n")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_kernels_for_every_size_serve_layers_of_every_shape(train: bool) -> None:
    net = convdsl.compile(SIZES, batch=3, dtype="float64", seed=5, warm=False)
    by_template: dict[str, list[KernelSpec]] = {}
    for stage in net.stages:
        for spec in stage.kernel.specs:
            by_template.setdefault(spec.template, []).append(spec)
    for template in ("batchnorm", "conv_epilogue", "dense_epilogue", "add", "multiply",
                     "argmax_scatter", "concat"):
        specs = list({spec.key: spec for spec in by_template[template]}.values())
        assert len({spec.shapes for spec in specs}) > 1, template
        assert len({cache.source_path(spec) for spec in specs}) < len(specs), template
    for template in ("conv_winograd", "conv_gemm"):  # sizes baked in: a file per shape
        specs = list({spec.key: spec for spec in by_template[template]}.values())
        assert len({cache.source_path(spec) for spec in specs}) == len(specs), template
    _check_against_the_reference(net, train)


def _check_against_the_reference(net: convdsl.CompiledNetwork, train: bool) -> None:
    """Outputs, losses, every gradient and the running statistics against the
    reference in float64, after one forward and backward."""
    ref = ReferenceNetwork(net.network, params=net.state_dict(), seed=5)  # same dropout
    rng = np.random.default_rng(1)
    x = _inputs(net, rng)
    targets = random_targets(net, rng)
    got = net.forward(x, train=train, step=7)
    want = ref.forward(x, train=train, step=7)
    assert_close(got, want, 1e-10, "main output")
    for name, output in net.outputs.items():
        assert_close(output, ref.outputs[name], 1e-10, f"output {name}")
    if not targets:
        return
    assert net.loss(targets) == pytest.approx(ref.loss(targets), rel=1e-10)
    got_input = net.backward()
    want_input = ref.backward()
    assert isinstance(got_input, np.ndarray) and isinstance(want_input, np.ndarray)
    assert_close(got_input, want_input, 1e-9, "input gradient", atol=1e-13)
    assert set(net.grads) == set(ref.grads)
    for name, grad in ref.grads.items():
        assert_close(net.grads[name], grad, 1e-9, f"gradient of {name}", atol=1e-13)
    for name, value in ref.params.items():  # running statistics after a training step
        assert_close(net.params[name].astype(np.float64), value.astype(np.float64), 1e-10, name)


def test_every_op_but_input_has_cpu_kernels() -> None:
    """The executor feeds inputs itself; every other op needs a registered builder."""
    assert registered_ops() == set(Op) - {Op.INPUT}


def test_float32_agrees_with_float64() -> None:
    net32 = convdsl.compile(ROOT / "networks/lenet5.cnn", batch=2, seed=2, warm=False)
    net64 = convdsl.compile(ROOT / "networks/lenet5.cnn", batch=2, dtype="float64", seed=2,
                            warm=False)
    x = np.random.default_rng(0).standard_normal((2, 1, 28, 28))
    assert_close(net32.forward(x.astype(np.float32)), net64.forward(x), 1e-5, "forward")
    labels = np.arange(2)
    net32.loss(labels), net64.loss(labels)
    net32.backward(), net64.backward()
    for name, grad in net64.grads.items():
        assert_close(net32.grads[name], grad, 1e-4, name)


def test_interface_follows_pytorch_names_and_layouts() -> None:
    net = convdsl.compile(ROOT / "networks/lenet5.cnn", batch=2, warm=False)
    assert net.input_shape == (1, 28, 28) and net.output_shape == (10,)
    shapes = {name: array.shape for name, array in net.state_dict().items()}
    assert shapes["c1.weight"] == (6, 1, 5, 5) and shapes["c1.bias"] == (6,)
    assert shapes["f5.weight"] == (120, 400) and shapes["out.bias"] == (10,)
    assert all(array.dtype == np.float32 for array in net.params.values())
    assert set(net.grads) == set(net.params)


def test_batch_norm_keeps_pytorch_buffers() -> None:
    net = convdsl.compile(ROOT / "networks/resnet20_cifar.cnn", batch=2, warm=False)
    state = net.state_dict()
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    assert "bn1.running_var" in state and "bn1.running_var" not in net.grads
    net.forward(np.ones((2, 3, 32, 32), np.float32), train=True)
    assert int(net.params["bn1.num_batches_tracked"]) == 1


def test_state_dict_round_trip_and_seeded_init() -> None:
    first = convdsl.compile(TINY, batch=2, seed=3, warm=False)
    same = convdsl.compile(TINY, batch=2, seed=3, warm=False)
    other = convdsl.compile(TINY, batch=2, seed=4, warm=False)
    for name, array in first.params.items():
        np.testing.assert_array_equal(array, same.params[name])
    assert not np.array_equal(first.params["c.weight"], other.params["c.weight"])
    other.load_state_dict(first.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(first.forward(x), other.forward(x))


def test_load_state_dict_refuses_a_mismatch_and_changes_nothing() -> None:
    net = convdsl.compile(TINY, batch=2, warm=False)
    before = net.state_dict()
    bad = net.state_dict()
    bad["c.weight"] = np.zeros((3, 2, 5, 5), np.float32)
    with pytest.raises(RunError, match=r"'c.weight' has shape \(3, 2, 5, 5\)"):
        net.load_state_dict(bad)
    missing = net.state_dict()
    del missing["fc.bias"]
    missing["head.weight"] = np.zeros(3)
    with pytest.raises(RunError, match=r"missing 'fc\.bias'; unexpected 'head\.weight'"):
        net.load_state_dict(missing)
    for name, array in before.items():
        np.testing.assert_array_equal(net.params[name], array)


def test_dropout_masks_follow_seed_and_step() -> None:
    text = "input x: 2x25\nflatten\nd = dropout(0.5)\nfc = dense(3)\noutput fc\n"
    net = convdsl.compile(text, batch=2, warm=False)
    x = np.ones((2, 2, 25), np.float32)
    first, again = net.forward(x, train=True, step=1), net.forward(x, train=True, step=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, net.forward(x, train=True, step=2))
    net.forward(x, train=False)
    np.testing.assert_array_equal(net.activation("d"), x.reshape(2, 50))


@pytest.mark.parametrize(("value", "message"), [
    (np.ones((2, 2, 6), np.float32), r"has 3 axes \(2, 2, 6\) but this network takes 4"),
    (np.ones((2, 6, 6), np.float32), r"add the batch axis: x\[None\] for one example"),
    (np.ones((3, 2, 6, 6), np.float32), r"holds a batch of 3 but the network was compiled "
                                         r"for batch 2"),
    (np.ones((2, 3, 6, 6), np.float32), r"has shape \(2, 3, 6, 6\) but this network takes"),
    (np.ones((2, 2, 6, 6), np.float64), r"dtype float64 but the network was compiled for "
                                         r"float32"),
    (np.ones((2, 2, 6, 6), np.int64), r"convert with x.astype\('float32'\)"),
    ([[1.0]], r"must be a NumPy array, not list"),
])
def test_bad_input_gets_a_clear_error(value: object, message: str) -> None:
    net = convdsl.compile(TINY, batch=2, warm=False)
    with pytest.raises(RunError, match=message):
        net.forward(value)  # type: ignore[arg-type]


def test_a_missing_channel_axis_is_named() -> None:
    net = convdsl.compile("input x: 1x6x6\nflatten\nfc = dense(2)\noutput fc\n", batch=4,
                          warm=False)
    with pytest.raises(RunError, match=r"add the channel axis: x\[:, None\]"):
        net.forward(np.ones((4, 6, 6), np.float32))


def test_nan_checks_name_the_input_and_the_first_layer() -> None:
    net = convdsl.compile(TINY, batch=2, check=True, warm=False)
    x = np.ones((2, 2, 6, 6), np.float32)
    x[1, 0, 2, 2] = np.nan
    with pytest.raises(RunError, match=r"input of 'x' \(input\) holds 1 NaN"):
        net.forward(x)
    net.params["fc.weight"][0, 0] = np.inf
    with pytest.raises(RunError, match=r"output of 'fc' \(dense\)"):
        net.forward(np.ones((2, 2, 6, 6), np.float32))
    unchecked = convdsl.compile(TINY, batch=2, warm=False)
    assert np.isnan(unchecked.forward(x)).any()


def test_loss_and_backward_misuse() -> None:
    net = convdsl.compile(TINY, batch=2, warm=False)
    with pytest.raises(RunError, match="needs a forward pass first"):
        net.loss(np.array([0, 1]))
    net.forward(np.ones((2, 2, 6, 6), np.float32))
    with pytest.raises(RunError, match="needs loss"):
        net.backward()
    with pytest.raises(RunError, match=r"must lie in 0..3, found 0..4"):
        net.loss(np.array([0, 4]))
    with pytest.raises(RunError, match="one class index per example"):
        net.loss(np.array([0, 1, 2]))
    with pytest.raises(RunError, match="'nope' is not an output"):
        net.backward({"nope": np.ones((2, 4), np.float32)})


def test_bad_options() -> None:
    for kwargs, message in [({"batch": 0}, "batch must be"), ({"dtype": "float16"}, "dtype"),
                            ({"algo": "strassen"}, "unknown convolution algorithm")]:
        with pytest.raises(RunError, match=message):
            convdsl.compile(TINY, **kwargs)  # type: ignore[arg-type]


def test_identical_layers_share_one_kernel() -> None:
    text = ("input x: 4x8x8\na = conv(4, 3, pad=same, act=relu)\n"
            "b = conv(4, 3, pad=same, act=relu)\nflatten\nfc = dense(2)\noutput fc\n")
    net = convdsl.compile(text, batch=2, warm=False)
    assert [s.key for s in net.kernels["a"].specs] == [s.key for s in net.kernels["b"].specs]


def test_a_second_process_compiles_nothing(tmp_path: Path) -> None:
    script = ("import sys, convdsl; convdsl.compile(sys.argv[1], batch=2)")
    env = {**os.environ, "CONVDSL_CACHE": str(tmp_path)}
    source = tmp_path / "tiny.cnn"
    source.write_text(TINY)
    subprocess.run([sys.executable, "-c", script, str(source)], env=env, check=True)
    kernels = tmp_path / "kernels"  # the cache's own folder
    files = sorted(p.name for p in kernels.rglob("*"))
    assert any(name.endswith(".nbi") for name in files), "Numba cached no machine code"
    subprocess.run([sys.executable, "-c", script, str(source)], env=env, check=True)
    assert sorted(p.name for p in kernels.rglob("*")) == files


def test_compile_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["compile", str(ROOT / "networks/lenet5.cnn"), "--batch", "2",
                   "--emit", str(tmp_path / "src"), "--dump", "plan"])
    out = capsys.readouterr().out
    assert status == 0
    assert "c1" in out and "conv" in out and "cold:" in out and "warm:" in out
    index = (tmp_path / "src" / "kernels.txt").read_text()
    assert index.startswith("s2: k_")  # c1 and its pooling, s2, are one stage
    emitted = sorted((tmp_path / "src").glob("k_*.py"))
    assert emitted and "@numba.njit" in emitted[0].read_text()


def test_compile_command_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", str(ROOT / "networks/lenet5.cnn"), "--dump", "nope"]) == 2
    assert "unknown dump 'nope'" in capsys.readouterr().err


def test_gradcheck_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gradcheck", str(ROOT / "networks/mnist1d_cnn.cnn"), "--samples", "4",
                 "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "conv1.weight" in out and "input 'signal'" in out and "ok" in out
    assert "FAIL" not in out


@pytest.mark.parametrize("algo", ["direct", "gemm", "fft"])
def test_training_skips_the_input_gradient_and_nothing_else(algo: str) -> None:
    """backward(input_grad=False), as training calls it, lets the first layers skip the
    input's gradient; every parameter gradient is what a full backward gives."""
    text = ("input x: 2x8x8\ninput v: 5x1\nc = x -> conv(3, 3, pad=1, act=relu)\n"
            "p = c -> flatten\nd = v -> flatten -> dense(4)\nj = concat(p, d)\n"
            "y = j -> dense(3)\noutput y loss=cross_entropy")
    net = convdsl.compile(text, batch=2, dtype="float64", algo=algo, seed=3, warm=False)
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 2, 8, 8)), "v": rng.standard_normal((2, 5, 1))}
    grads = []
    for input_grad in (True, False):
        net.forward(inputs, train=True)
        net.loss(np.array([0, 2]))
        returned = net.backward(input_grad=input_grad)
        assert (returned is None) == (not input_grad)
        grads.append({name: grad.copy() for name, grad in net.grads.items()})
    for name, grad in grads[0].items():
        np.testing.assert_array_equal(grads[1][name], grad, err_msg=name)
    assert net.backward(input_grad=True)["x"].shape == (2, 2, 8, 8)  # type: ignore[index]
