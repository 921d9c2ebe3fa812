"""End-to-end behaviour of the `convdsl` command line and the Python API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import convdsl
from convdsl import cli

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
