"""`convdsl time` and `convdsl.report.timing`: the structure and arithmetic of the
report, never the times themselves (the machine may be busy)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import convdsl
from convdsl import cli
from convdsl.report.timing import StageTime, Timing, time_network, timing_table

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "networks" / "lenet5.cnn"

# Batch norm and dropout (state a timing run must leave alone), a layer with weights
# and one without, and an output with no loss.
TINY = """network tiny
input x: 2x12
c = conv(4, 3, pad=1)
b = bn(act=relu)
d = dropout(0.5)
p = maxpool(2)
flatten
fc = dense(3)
output fc
"""


@pytest.fixture(scope="module")
def lenet_timing() -> tuple[convdsl.CompiledNetwork, Timing]:
    net = convdsl.compile(LENET, batch=2)  # as in tests/test_torch_parity.py: shared kernels
    return net, time_network(net, iterations=2)


def test_one_row_per_stage_in_forward_order(
        lenet_timing: tuple[convdsl.CompiledNetwork, Timing]) -> None:
    net, timing = lenet_timing
    assert [s.name for s in timing.stages] == [stage.name for stage in net.stages]
    assert (timing.network, timing.batch, timing.dtype, timing.iterations) == (
        "lenet5", 2, "float32", 2)
    ops = {s.name: s.ops for s in timing.stages}
    # a stage is named by its last layer: c1 and the pooling after it are stage s2
    assert ops["s2"] == "conv+relu+maxpool" and ops["out"] == "dense"
    assert all(s.forward_s >= 0 and s.backward_s >= 0 for s in timing.stages)


def test_shares_sum_to_one(lenet_timing: tuple[convdsl.CompiledNetwork, Timing]) -> None:
    _, timing = lenet_timing
    assert math.isclose(sum(timing.share(s) for s in timing.stages), 1.0, rel_tol=1e-9)
    assert math.isclose(timing.stages_s, sum(s.forward_s + s.backward_s
                                             for s in timing.stages))


def test_flops_follow_the_macs(lenet_timing: tuple[convdsl.CompiledNetwork, Timing]) -> None:
    net, timing = lenet_timing
    stages = {s.name: s for s in timing.stages}
    # stages with weights (s2 and s4: c1 and c3 with the pooling after each)
    for name, layer in (("s2", "c1"), ("s4", "c3"), ("f5", "f5"), ("f6", "f6"), ("out", "out")):
        flops = 2 * net.network.counts[layer].macs * net.batch
        assert stages[name].forward_flops == flops > 0
        # the first layer skips the input's gradient in a training step
        assert stages[name].backward_flops == (flops if name == "s2" else 2 * flops)
    for name in ("flatten_1",):  # no multiply-adds: no rate to show
        assert stages[name].forward_flops == stages[name].backward_flops == 0
        assert stages[name].forward_gflops is None and stages[name].backward_gflops is None
    assert timing.forward_flops == 2 * net.network.macs * net.batch
    c1 = stages["s2"].forward_flops
    assert timing.train_flops == 3 * timing.forward_flops - c1


def test_rates_are_flops_over_time() -> None:
    stage = StageTime("c", "conv", "direct", forward_s=0.002, backward_s=0.004,
                      forward_flops=6_000_000, backward_flops=12_000_000)
    assert stage.forward_gflops == pytest.approx(3.0)
    assert stage.backward_gflops == pytest.approx(3.0)
    assert stage.total_s == pytest.approx(0.006)
    idle = StageTime("p", "maxpool", "direct", 0.001, 0.0, 0, 0)
    timing = Timing("n", 8, "float32", 1, (stage, idle), train_step_s=0.01,
                    inference_s=0.004)
    assert timing.share(stage) == pytest.approx(6 / 7)
    assert timing.train_examples_per_s == pytest.approx(800)
    assert timing.inference_examples_per_s == pytest.approx(2000)
    data = timing.to_dict()
    assert data["train_step"]["gflops"] == pytest.approx(18e6 / 0.01 / 1e9)
    assert data["inference"]["gflops"] == pytest.approx(6e6 / 0.004 / 1e9)
    assert data["stages"][1]["forward_gflops"] is None
    text = timing_table(timing)
    assert "85.7%" in text and "14.3%" in text and "100.0%" in text
    assert "800 examples/s" in text and "2,000 examples/s" in text


def test_timing_leaves_the_network_as_it_was() -> None:
    net = convdsl.compile(TINY, batch=4, fuse=False)
    before, step = net.state_dict(), net.step
    timing = time_network(net, iterations=1)
    assert net.step == step
    for name, array in net.state_dict().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    assert all(not grad.any() for grad in net.grads.values())
    # The output has no loss: the step still runs backward, from a gradient.
    assert timing.train_step_s > 0
    assert [s.ops for s in timing.stages] == [
        "conv", "bn+relu", "dropout", "maxpool", "flatten", "dense"]
    with pytest.raises(ValueError, match="at least 1"):
        time_network(net, iterations=0)


def test_the_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["time", str(LENET), "--batch", "2", "--iterations", "1"])
    out, err = capsys.readouterr()
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "lenet5: batch 2, float32, cpu, median of 1 iteration after 1 warm-up"
    # which pools ran the kernels, and which kernels: timings on another pool, or with
    # other kernels on threads, are not comparable
    assert re.fullmatch(r"threads: \d+ threads on Numba's \w+ pool, "
                        r"OPENBLAS_THREAD_TIMEOUT=\S+; kernels of [\d,]+ multiply-adds or "
                        r"more on threads \(CONVDSL_THREADS_FROM\)", lines[1])
    assert lines[2].split()[:3] == ["stage", "ops", "algorithm"]
    rows = [line for line in lines if line.split()[0] in
            ("s2", "s4", "flatten_1", "f5", "f6", "out")]
    assert len(rows) == 6 and rows[0].split()[1] == "conv+relu+maxpool"
    shares = [float(row.split()[-1].rstrip("%")) for row in rows]
    assert sum(shares) == pytest.approx(100, abs=0.5)  # each share is rounded to 0.1
    status = cli.main(["time", str(LENET), "--batch", "2", "--iterations", "1", "--no-fuse"])
    assert status == 0 and "training step" in capsys.readouterr().out
    assert lines[-2].startswith("training step (forward + loss + backward): ")
    assert lines[-1].startswith("inference (forward, train=False): ")
    assert "examples/s" in lines[-1] and "GFLOP/s" in lines[-1]


def test_the_command_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "tiny.cnn"
    path.write_text("train batch=3\n" + TINY, encoding="utf-8")
    status = cli.main(["time", str(path), "--iterations", "1", "--json", "--dtype", "float64"])
    out, _ = capsys.readouterr()
    assert status == 0
    data = json.loads(out)
    assert (data["batch"], data["dtype"]) == (3, "float64")  # the file's train batch
    # c and b run as one fused stage, named by its last layer, with the conv's arithmetic
    assert [s["name"] for s in data["stages"]] == ["b", "d", "p", "flatten_1", "fc"]
    fused = data["stages"][0]
    assert fused["ops"] == "conv+bn+relu"
    macs = convdsl.loads(TINY).counts["c"].macs
    # backward: the weight gradient only (a training step skips the input's gradient)
    assert (fused["forward_flops"], fused["backward_flops"]) == (2 * macs * 3, 2 * macs * 3)
    assert sum(s["share"] for s in data["stages"]) == pytest.approx(1)
    for stage in data["stages"]:
        if stage["forward_flops"] and stage["forward_ms"] > 0:
            assert stage["forward_gflops"] == pytest.approx(
                stage["forward_flops"] / (stage["forward_ms"] / 1e3) / 1e9)
    train = data["train_step"]
    assert train["examples_per_s"] == pytest.approx(3 / (train["ms"] / 1e3))
    assert data["stages_ms"] == pytest.approx(
        sum(s["forward_ms"] + s["backward_ms"] for s in data["stages"]))


def test_bad_iterations_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["time", str(LENET), "--iterations", "0"])
    assert exit_info.value.code == 2
    assert "expected at least 1" in capsys.readouterr().err


def test_kernel_times_are_for_the_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["time", str(LENET), "--batch", "2", "--kernels"]) == 1
    error = capsys.readouterr().err
    assert "--kernels times the launches of the CUDA target" in error
    assert "add --device cuda" in error
    net = convdsl.compile(LENET, batch=2, warm=False)
    with pytest.raises(ValueError, match="per-kernel times are for the CUDA target"):
        time_network(net, iterations=1, kernels=True)
