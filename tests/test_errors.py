"""The golden error catalog: networks/errors/NAME.cnn holds one mistake each, and
networks/errors/NAME.expected the exact stderr of `convdsl check` on it, run from
the repository root.

Both the Python API and the command line must reproduce the golden text. After
a deliberate change of wording, rewrite the goldens and review the diff:

    CONVDSL_UPDATE_GOLDEN=1 pytest -q tests/test_errors.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import convdsl
from convdsl import ConvDslError

ROOT = Path(__file__).resolve().parents[1]
ERRORS = ROOT / "networks" / "errors"
UPDATE = os.environ.get("CONVDSL_UPDATE_GOLDEN") == "1"

# Files that are valid networks: `check` prints warnings and succeeds.
WARNING_ONLY = {"unused_layer"}

CASES = sorted(path.stem for path in ERRORS.glob("*.cnn"))


def relative(name: str) -> str:
    """The path as a user types it at the repository root, as goldens show it."""
    return f"networks/errors/{name}.cnn"


def golden(name: str) -> Path:
    return ERRORS / f"{name}.expected"


def run_check(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convdsl.cli", "check", relative(name)],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def test_the_catalog_is_complete() -> None:
    assert len(CASES) >= 35
    missing = [name for name in CASES if not golden(name).exists()]
    assert UPDATE or not missing, f"no golden file for {missing}; set CONVDSL_UPDATE_GOLDEN=1"
    orphans = sorted(p.stem for p in ERRORS.glob("*.expected") if p.stem not in CASES)
    assert not orphans, f"golden files without a network: {orphans}"
    assert set(CASES) >= WARNING_ONLY


@pytest.mark.parametrize("name", CASES)
def test_command_line(name: str) -> None:
    result = run_check(name)
    if UPDATE:
        golden(name).write_text(result.stderr, encoding="utf-8", newline="\n")
    expected = golden(name).read_text(encoding="utf-8")
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == (0 if name in WARNING_ONLY else 1), result.stderr
    assert result.stderr == expected


@pytest.mark.parametrize("name", CASES)
def test_python_api(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # so that messages name the file as the goldens do
    if name in WARNING_ONLY:
        network = convdsl.load(relative(name))
        diagnostics = network.warnings
        assert diagnostics
    else:
        with pytest.raises(ConvDslError) as caught:
            convdsl.load(relative(name))
        diagnostics = caught.value.diagnostics
    rendered = "".join(diagnostic.render() + "\n" for diagnostic in diagnostics)
    if UPDATE:
        return  # the command-line test writes the goldens
    assert rendered == golden(name).read_text(encoding="utf-8")


@pytest.mark.parametrize("name", CASES)
def test_messages_hide_the_parser(name: str) -> None:
    """No lark terminal names, no Python reprs of internal objects."""
    text = golden(name).read_text(encoding="utf-8")
    for internal in ("__ANON", "_NL", "RPAR", "LPAR", "RSQB", "$END", "Token(", "Tree(",
                     "lark", "Traceback"):
        assert internal not in text, (internal, text)


def test_text_and_api_agree_on_nul_bytes() -> None:
    """A NUL in text handed to loads() is refused the same way as in a file."""
    with pytest.raises(ConvDslError, match="NUL bytes"):
        convdsl.loads("input 1x8\n\x00relu\n", "x.cnn")


def test_crlf_columns_match_lf_columns() -> None:
    """Carriage returns shift no column: the CRLF golden points where LF would."""
    text = (ERRORS / "crlf_line_endings.cnn").read_bytes().decode("utf-8")
    assert "\r\n" in text
    with pytest.raises(ConvDslError) as crlf:
        convdsl.loads(text, "x.cnn")
    with pytest.raises(ConvDslError) as lf:
        convdsl.loads(text.replace("\r\n", "\n"), "x.cnn")
    assert crlf.value.diagnostics[0].render() == lf.value.diagnostics[0].render()
