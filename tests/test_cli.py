"""End-to-end behaviour of the `convdsl` command line and the Python API."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convdsl
from convdsl import cli
from convdsl.codegen import cost

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "networks" / "lenet5.cnn"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_check_accepts_a_valid_file(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "check", str(LENET))
    assert status == 0
    assert "ok" in out and "61,706 params" in out
    assert err == ""


def test_check_reports_every_bad_file_and_exits_1(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "bad.cnn", "input 1x8x8\nc = conv(4, 3, strde=2)\noutput c\n")
    status, out, err = run(capsys, "check", str(bad), str(LENET))
    assert status == 1
    assert f"{bad}:2:16: error: unknown option 'strde' for 'conv'" in err
    assert "did you mean 'stride'?" in err
    assert "ok" in out  # the good file is still checked


def test_missing_and_binary_files_are_clear_errors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(capsys, "check", str(tmp_path / "nope.cnn"))
    assert status == 1 and "cannot read" in err
    binary = tmp_path / "image.cnn"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    status, _, err = run(capsys, "check", str(binary))
    assert status == 1 and "not UTF-8 text" in err
    status, _, err = run(capsys, "check", str(tmp_path))
    assert status == 1 and "is a folder" in err


def test_summary_table_has_layers_and_footers(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "summary", str(LENET))
    assert status == 0
    for text in ("c1 (conv+relu)", "6x28x28", "Trainable params: 61,706",
                 "Non-trainable buffers", "MACs (multiply-accumulates, one example): 416,520",
                 "FLOPs (2 x MACs): 833,040", "Forward/backward pass size (MB)"):
        assert text in out


def test_summary_json_has_the_documented_keys(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "summary", "--json", str(LENET))
    assert status == 0
    data = json.loads(out)
    assert data["params"] == 61706 and data["params_without_aux"] == 61706
    assert data["buffers"] == 0 and data["macs"] == 416520
    first = data["layers"][1]
    assert {"name", "op", "output_shape", "params", "macs", "receptive_field"} <= set(first)
    assert first["name"] == "c1" and first["output_shape"] == [6, 28, 28]
    assert first["receptive_field"] == [5, 5]


def test_graph_writes_dot_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, "graph", str(LENET))
    assert status == 0 and out.startswith('digraph "lenet5"') and '"c1" -> "s2"' in out
    target = tmp_path / "lenet.dot"
    status, out, _ = run(capsys, "graph", str(LENET), "-o", str(target))
    assert status == 0 and target.read_text().startswith("digraph")


def test_graph_rendering_needs_graphviz(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "lenet.svg"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    status, _, err = run(capsys, "graph", str(LENET), "-o", str(target))
    assert status == 1
    assert "'dot' program is not installed" in err and "install Graphviz" in err
    assert (tmp_path / "lenet.dot").read_text().startswith("digraph")


def fake_dot(tmp_path: Path, exit_code: int = 0) -> Path:
    """A stand-in for Graphviz's `dot`: writes a tiny SVG holding the DOT text it read."""
    script = tmp_path / "bin" / "dot"
    script.parent.mkdir(exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "text = sys.stdin.read()\n"
        f"if {exit_code}:\n"
        "    sys.exit('dot: syntax error in line 1')\n"
        "out = sys.argv[sys.argv.index('-o') + 1]\n"
        "open(out, 'w').write('<svg><!-- ' + text + ' --></svg>')\n")
    script.chmod(0o755)
    return script


def test_graph_renders_svg_with_graphviz(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The real Graphviz when it is installed (CI installs it), else a stand-in.
    if shutil.which("dot") is None:
        stand_in = str(fake_dot(tmp_path))
        monkeypatch.setattr(shutil, "which", lambda name: stand_in)
    target = tmp_path / "lenet.svg"
    status, out, _ = run(capsys, "graph", str(LENET), "-o", str(target))
    assert status == 0 and "rendered by Graphviz" in out
    assert "<svg" in target.read_text()


def test_a_graphviz_failure_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    failing = str(fake_dot(tmp_path, exit_code=1))
    monkeypatch.setattr(shutil, "which", lambda name: failing)
    status, _, err = run(capsys, "graph", str(LENET), "-o", str(tmp_path / "lenet.png"))
    assert status == 1 and "Graphviz failed to render lenet.png" in err
    assert "syntax error in line 1" in err


def test_fmt_check_rewrite_and_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    messy = write(tmp_path, "messy.cnn",
                  "input   1x8x8 # in\r\n\r\n\r\nc=conv( 4,3 ,act = relu)\r\nflatten\r\n"
                  "fc = dense(10)\r\noutput fc\r\n")
    status, _, err = run(capsys, "fmt", "--check", str(messy))
    assert status == 1 and "would be reformatted" in err
    status, out, _ = run(capsys, "fmt", "--stdout", str(messy))
    assert status == 0 and "c = conv(4, 3, act=relu)\n" in out
    status, _, _ = run(capsys, "fmt", str(messy))
    assert status == 0
    assert messy.read_text() == ("input 1x8x8  # in\n\nc = conv(4, 3, act=relu)\nflatten\n"
                                 "fc = dense(10)\noutput fc\n")
    status, _, _ = run(capsys, "fmt", "--check", str(messy))
    assert status == 0


def test_internal_errors_are_reported_without_a_traceback(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_load", broken)
    monkeypatch.delenv("CONVDSL_DEBUG", raising=False)
    status, _, err = run(capsys, "summary", str(LENET))
    assert status == cli.EXIT_INTERNAL
    assert "internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_the_console_script_runs_as_a_module() -> None:
    result = subprocess.run([sys.executable, "-m", "convdsl.cli", "check", str(LENET)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_python_api_loads_text_and_files() -> None:
    net = convdsl.loads("input 1x28x28\nconv(6, 5)\nflatten\nfc = dense(10)\noutput fc\n")
    assert net.params == 6 * 25 + 6 + 6 * 24 * 24 * 10 + 10
    assert net.input_shape == (1, 28, 28) and net.output_shape == (10,)
    assert convdsl.load(LENET).params == 61706
    with pytest.raises(convdsl.ConvDslError) as caught:
        convdsl.loads("input 1x8x8\nfc = dense(10)\noutput fc\n", "x.cnn")
    assert "x.cnn:2:6: error:" in str(caught.value)
    assert "insert 'flatten'" in str(caught.value)


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_readme_network_is_valid() -> None:
    (text,) = [block.split("\n", 1)[1] for block in readme().split("```")[1::2]
               if block.startswith("cnn\n")]
    assert convdsl.loads(text, "README.md").params == 61706


def test_ci_runs_the_readme_test_command() -> None:
    (command,) = [line for line in readme().splitlines() if "pytest" in line and "pip" in line]
    steps = [step.strip() for step in command.split("&&")]
    tests = steps[steps.index('pip install -e ".[dev]"') + 1:]
    ci_lines = {line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    assert tests and all(step in ci_lines for step in tests), tests


def _measured_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> cost.Rates:
    """Calibration on, in an empty cache, with made-up measurements (nothing compiled)."""
    monkeypatch.delenv(cost.NO_CALIBRATE)
    monkeypatch.setenv("CONVDSL_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "_RATES", None)
    measured = cost.Rates(blas=2.4e11, loops=7.7e10, fft=6e9, copy=2.7e10, call=2e-6)
    monkeypatch.setattr(cost, "calibrate", lambda: measured)
    monkeypatch.setattr(cost, "fit_kernels", lambda rates: dataclasses.replace(
        rates, direct_fit=0.87, gemm_fit=0.3, fft_fit=0.47))
    return measured


def test_calibrate_measures_keeps_and_shows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _measured_machine(monkeypatch, tmp_path)
    status, out, err = run(capsys, "calibrate", "--show")
    assert status == 0
    assert "not measured yet" in out
    assert not (tmp_path / cost.CALIBRATION_FILE).exists()  # --show measures nothing
    status, out, err = run(capsys, "calibrate")
    assert status == 0, err
    assert f"kept in {tmp_path / cost.CALIBRATION_FILE}" in out
    assert "BLAS products         240.0 GFLOP/s" in out
    assert "generated loops        77.0 GFLOP/s (the model counts at most 30.0" in out
    assert "of a 5x5 layer, 16 -> 32 channels on 28x28 maps, batch 8" in out
    assert "direct 0.87, GEMM and Winograd 0.30, FFT 0.47" in out
    assert "convdsl: measuring this machine for the cost model" in err
    monkeypatch.setattr(cost, "calibrate", lambda: pytest.fail("measured again"))
    status, out, _ = run(capsys, "calibrate", "--show")
    assert status == 0
    assert "measured on this machine" in out and "GEMM and Winograd 0.30" in out


def test_the_first_compile_says_it_measures_the_machine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _measured_machine(monkeypatch, tmp_path)
    network = write(tmp_path, "net.cnn", "input x: 1x8x8\nc = conv(4, 3)\noutput c\n")
    status, out, err = run(capsys, "compile", str(network))
    assert status == 0, err
    assert "convdsl: measuring this machine for the cost model" in err
    assert "convdsl: measured in " in err
    assert ("algorithms chosen by the cost model, rates measured on this machine, kept in "
            f"{tmp_path / cost.CALIBRATION_FILE}") in out
    status, _, err = run(capsys, "compile", str(network))  # measured: nothing said
    assert status == 0
    assert "measuring" not in err


def test_compile_says_which_rates_chose_the_algorithms(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    network = write(tmp_path, "net.cnn", "input x: 1x8x8\nc = conv(4, 3)\noutput c\n")
    status, out, _ = run(capsys, "compile", str(network))  # tests run with the built-in rates
    assert status == 0
    assert ("algorithms chosen by the cost model, rates built in (CONVDSL_NO_CALIBRATE is "
            "set)") in out
    status, out, _ = run(capsys, "compile", str(network), "--algo", "gemm")  # asked for
    assert status == 0
    assert "chosen by the cost model" not in out


def test_calibrate_refuses_when_the_built_in_rates_are_forced(
        capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, "calibrate")  # tests run with CONVDSL_NO_CALIBRATE=1
    assert status == 1
    assert "convdsl: error: CONVDSL_NO_CALIBRATE is set" in err
    assert "hint: unset CONVDSL_NO_CALIBRATE to measure" in err
    status, out, _ = run(capsys, "calibrate", "--show")
    assert status == 0
    assert "built in (CONVDSL_NO_CALIBRATE is set)" in out


def test_calibrate_keeps_nothing_from_a_disturbed_machine(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    measured = _measured_machine(monkeypatch, tmp_path)
    monkeypatch.setattr(cost, "calibrate", lambda: dataclasses.replace(measured, blas=4e9))
    status, _, err = run(capsys, "calibrate")
    assert status == 1
    assert "measurements look disturbed" in err
    assert "hint: measure again when the machine is idle" in err
    assert not (tmp_path / cost.CALIBRATION_FILE).exists()
