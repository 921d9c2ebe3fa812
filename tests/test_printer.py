"""The printer: `parse(format_module(tree)) == tree` for random trees, idempotent
formatting, the canonical layout, and `convdsl fmt`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.cli import main
from convdsl.frontend import syntax as ast
from convdsl.frontend.parser import parse
from convdsl.frontend.printer import LINE_WIDTH, format_module, format_value
from convdsl.network import read_source

ROOT = Path(__file__).resolve().parents[1]

# Words that start statements. At the start of a line they always mean the
# statement, so a layer statement can neither be named after one nor start with
# a call of one; elsewhere (values, option and parameter names, after "->")
# the grammar reads them as ordinary names. `else` is special only after '}'.
STATEMENT_KEYWORDS = ("network", "input", "block", "output", "aux", "train", "if")
RESERVED = (*STATEMENT_KEYWORDS, "else")


# --- strategies for syntax trees ------------------------------------------------------

_first = string.ascii_letters + "_"
_rest = string.ascii_letters + string.digits + "_"

plain_names = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(_first),
    st.text(_rest, max_size=8),
).filter(lambda name: name not in RESERVED)
# Anywhere the grammar accepts a keyword as a plain name.
any_names = st.one_of(plain_names, st.sampled_from(RESERVED))

ints = st.integers(min_value=0, max_value=10**12).map(ast.Int)


def _float(text: str) -> ast.Float:
    return ast.Float(float(text), text)


floats = st.one_of(
    # repr() of a non-negative finite float: '0.5', '1e-05', '1e+16', '123.0'
    st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False)
    .map(lambda f: _float(repr(f))),
    # other spellings the grammar accepts, kept as written
    st.sampled_from([".5", "1.", "0.000", "1E3", "2.5e-3", "12.e2", ".25E+1", "7e0", "3.14"])
    .map(_float),
)
dims = st.lists(st.integers(0, 4096), min_size=2, max_size=4).map(lambda v: ast.Dims(tuple(v)))
words = any_names.map(ast.Word)

expr_leaves = st.one_of(ints, floats, dims, words)
exprs = st.recursive(
    expr_leaves,
    lambda inner: st.one_of(
        st.builds(ast.Neg, inner),
        st.builds(ast.BinOp, st.sampled_from("+-*/"), inner, inner),
    ),
    max_leaves=8,
)

# List items are signed numbers or words, or lists; never sums or sizes.
_list_atoms = st.one_of(ints, floats, words)
_signed = st.one_of(_list_atoms, _list_atoms.map(ast.Neg))
lists = st.recursive(
    st.builds(ast.ListValue, st.lists(_signed, max_size=5).map(tuple),
              st.one_of(st.none(), exprs)),
    lambda inner: st.builds(ast.ListValue,
                            st.lists(st.one_of(_signed, inner), max_size=4).map(tuple),
                            st.one_of(st.none(), exprs)),
    max_leaves=6,
)
values = st.one_of(exprs, exprs, lists)

positional = st.builds(ast.Arg, st.none(), values)
keyword = st.builds(ast.Arg, any_names, values)


@st.composite
def calls(draw, first_of_line: bool = False):
    op = draw(plain_names if first_of_line else any_names)
    parens = draw(st.booleans())
    if not parens:
        return ast.Call(op)
    # Positional values come first: the grammar refuses one after a named option.
    args = draw(st.lists(positional, max_size=2)) + draw(st.lists(keyword, max_size=2))
    return ast.Call(op, tuple(args), True)


@st.composite
def chains(draw, named: bool):
    length = draw(st.integers(1, 5))
    elements = []
    for index in range(length):
        call = draw(calls(first_of_line=index == 0 and not named))
        repeat = draw(st.one_of(st.none(), st.none(), exprs))
        elements.append(ast.Element(call, repeat))
    return tuple(elements)


@st.composite
def layer_statements(draw):
    name = draw(st.one_of(st.none(), any_names.filter(lambda n: n not in STATEMENT_KEYWORDS)))
    return ast.LayerStmt(name, draw(chains(named=name is not None)))


network_statements = st.builds(ast.NetworkStmt, any_names)
input_statements = st.builds(
    ast.InputStmt, st.one_of(st.none(), any_names),
    st.lists(st.integers(0, 512), min_size=1, max_size=4).map(tuple))
output_statements = st.builds(
    ast.OutputStmt, st.booleans(), any_names,
    st.lists(st.builds(ast.Arg, any_names, values), max_size=3).map(tuple))
params = st.builds(ast.Param, any_names, st.one_of(st.none(), values))

comment_text = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30,
).map(str.strip)


def tidy(lines: list[ast.Line]) -> tuple[ast.Line, ...]:
    """Blank lines are layout: no runs, none at either end (what the parser keeps)."""
    out: list[ast.Line] = []
    for line in lines:
        if line == ast.Line() and (not out or out[-1] == ast.Line()):
            continue
        out.append(line)
    while out and out[-1] == ast.Line():
        out.pop()
    return tuple(out)


def line_lists(statements):
    line = st.one_of(
        st.builds(ast.Line, statements, st.one_of(st.none(), st.none(), comment_text)),
        st.builds(ast.Line, st.none(), comment_text),
        st.just(ast.Line()),
    )
    return st.lists(line, max_size=6).map(tidy)


simple_statements = st.one_of(layer_statements(), layer_statements(), network_statements,
                              input_statements, output_statements)


def _nested(inner):
    body = line_lists(inner)
    return st.one_of(
        st.builds(ast.BlockDef, any_names, st.lists(params, max_size=4).map(tuple), body),
        st.builds(ast.IfStmt, any_names, body, st.one_of(st.none(), body)),
    )


statements = st.recursive(simple_statements, lambda inner: st.one_of(inner, _nested(inner)),
                          max_leaves=6)
modules = line_lists(statements).map(ast.Module)


# --- the round trip -------------------------------------------------------------------


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(modules)
def test_format_then_parse_gives_the_same_tree(module):
    text = format_module(module)
    assert parse(text) == module, text
    assert format_module(parse(text)) == text


@settings(max_examples=300, deadline=None)
@given(values)
def test_values_round_trip(value):
    text = format_value(value)
    statement = parse(f"f({text})\n").statements[0]
    assert statement.chain[0].call.args[0].value == value, text


@pytest.mark.parametrize(("tree", "text"), [
    (ast.BinOp("-", ast.Word("a"), ast.BinOp("-", ast.Word("b"), ast.Word("c"))), "a - (b - c)"),
    (ast.BinOp("-", ast.BinOp("-", ast.Word("a"), ast.Word("b")), ast.Word("c")), "a - b - c"),
    (ast.BinOp("*", ast.BinOp("+", ast.Int(1), ast.Int(2)), ast.Int(3)), "(1 + 2) * 3"),
    (ast.BinOp("+", ast.Int(1), ast.BinOp("*", ast.Int(2), ast.Int(3))), "1 + 2 * 3"),
    (ast.BinOp("/", ast.Int(8), ast.BinOp("*", ast.Int(2), ast.Int(2))), "8 / (2 * 2)"),
    (ast.Neg(ast.Neg(ast.Int(1))), "-(-1)"),
    (ast.Neg(ast.BinOp("+", ast.Word("a"), ast.Int(1))), "-(a + 1)"),
    (ast.BinOp("*", ast.Neg(ast.Word("a")), ast.Word("b")), "-a * b"),
    (ast.ListValue((ast.Neg(ast.Int(1)), ast.Int(0), ast.Int(1))), "[-1 0 1]"),
    (ast.ListValue((ast.Int(1), ast.Int(4), ast.Int(6), ast.Int(4), ast.Int(1)), ast.Int(16)),
     "[1 4 6 4 1] / 16"),
    (ast.ListValue((ast.Int(1),), ast.Neg(ast.Int(2))), "[1] / (-2)"),
    (ast.ListValue((ast.Int(1),), ast.BinOp("*", ast.Int(2), ast.Word("n"))), "[1] / (2 * n)"),
    (ast.Float(1e-5, "1e-5"), "1e-5"),
    (ast.Dims((3, 224, 224)), "3x224x224"),
])
def test_value_spelling(tree, text):
    assert format_value(tree) == text


# --- the canonical layout ----------------------------------------------------------------

MESSY = (
    "\n\n# LeNet, messily\r\n"
    "network   lenet\t# name\r\n"
    "input image :1x28x28\n"
    "\n\n\n"
    "c1=conv( 6,5 ,pad = 2,act=relu, )   #   first   \n"
    "s2 = maxpool (2)\n"
    "c3 = conv(16,\n"
    "          5,\n"
    "          act=relu)\n"
    "s4 = maxpool(2) ->\n"
    "     flatten\n"
    "    -> dense(120,act=relu)\n"
    "  -> dense(84 , act = relu)\n"
    "out=dense(10)\n"
    "#\n"
    "   ##  trailing  ##   \n"
    "output   out   loss=cross_entropy   weight=1.0\n"
    "\n\n"
)
MESSY_FORMATTED = """\
# LeNet, messily
network lenet  # name
input image: 1x28x28

c1 = conv(6, 5, pad=2, act=relu)  # first
s2 = maxpool(2)
c3 = conv(16, 5, act=relu)
s4 = maxpool(2) -> flatten -> dense(120, act=relu) -> dense(84, act=relu)
out = dense(10)
#
# #  trailing  ##
output out loss=cross_entropy weight=1.0
"""

MESSY_BLOCK = (
    "block   basic ( planes , stride = 1 , downsample = no , ) {   # a block\n"
    "\n\n"
    "  conv1 = conv(planes,3,stride=stride,pad=1,bias=no)\n"
    "\tbn1 = bn(act = relu)\n"
    "      if downsample {\n"
    "short = input->conv(planes,1,stride=stride,bias=no)->bn\n"
    "  out = add(bn1,short)\n"
    "  }else{\n"
    "  out = add(bn1, input)\n"
    "\n"
    "  }\n"
    "\n\n"
    "}   # end\n"
    "input 8x8x8\n"
    "x = basic(8)*2\n"
    "output x\n"
)
MESSY_BLOCK_FORMATTED = """\
block basic(planes, stride=1, downsample=no) {
    # a block

    conv1 = conv(planes, 3, stride=stride, pad=1, bias=no)
    bn1 = bn(act=relu)
    if downsample {
        short = input -> conv(planes, 1, stride=stride, bias=no) -> bn
        out = add(bn1, short)
    } else {
        out = add(bn1, input)
    }
}  # end
input 8x8x8
x = basic(8) * 2
output x
"""


@pytest.mark.parametrize(("messy", "canonical"), [
    (MESSY, MESSY_FORMATTED),
    (MESSY.replace("\r\n", "\n").replace("\n", "\r\n"), MESSY_FORMATTED),
    (MESSY_BLOCK, MESSY_BLOCK_FORMATTED),
])
def test_messy_input_formats_canonically(messy, canonical):
    formatted = format_module(parse(messy))
    assert formatted == canonical
    assert format_module(parse(formatted)) == formatted
    assert parse(formatted) == parse(messy)
    net_messy, net_formatted = convdsl.loads(messy), convdsl.loads(formatted)
    assert net_messy.shapes == net_formatted.shapes
    assert net_messy.params == net_formatted.params


def test_long_chains_break_before_each_arrow():
    chain = " -> ".join(["conv(64, 3, pad=same, act=relu)"] * 4)
    text = format_module(parse(f"features = {chain}  # deep\n"))
    assert text == (
        "features = conv(64, 3, pad=same, act=relu)\n"
        "    -> conv(64, 3, pad=same, act=relu)\n"
        "    -> conv(64, 3, pad=same, act=relu)\n"
        "    -> conv(64, 3, pad=same, act=relu)  # deep\n"
    )
    inside = format_module(parse(f"block b() {{\n{chain}\n}}\n"))
    assert inside.splitlines()[2] == "        -> conv(64, 3, pad=same, act=relu)"
    assert all(len(line) <= LINE_WIDTH for line in text.splitlines())
    short = "x = relu -> tanh\n"
    assert format_module(parse(short)) == short
    # one long call stays on its line: the printer only breaks at arrows
    long_call = "x = conv(" + ", ".join(f"o{i}={i}" for i in range(30)) + ")\n"
    assert format_module(parse(long_call)) == long_call


def test_parentheses_and_empty_bodies_are_kept_as_written():
    text = "relu()\nrelu\nblock b() {\n}\n"
    assert format_module(parse(text)) == text
    assert format_module(parse("block b() {}\n")) == "block b() {\n}\n"
    assert format_module(parse("block b() {\n}\nif c {\n} else {\n}\n")) == (
        "block b() {\n}\nif c {\n} else {\n}\n")


def network_files() -> list[Path]:
    return sorted((ROOT / "networks").glob("*.cnn"))


def doc_examples() -> list[str]:
    text = (ROOT / "docs" / "language.md").read_text("utf-8")
    return re.findall(r"^```cnn\n(.*?)^```", text, re.S | re.M)


@pytest.mark.parametrize("path", network_files(), ids=lambda p: p.name)
def test_formatting_network_files_is_idempotent(path):
    text = read_source(path)
    once = format_module(parse(text))
    assert format_module(parse(once)) == once
    assert parse(once) == parse(text)


@pytest.mark.parametrize("text", doc_examples())
def test_formatting_documentation_examples_keeps_their_meaning(text):
    once = format_module(parse(text))
    assert format_module(parse(once)) == once
    before, after = convdsl.loads(text), convdsl.loads(once)
    assert before.shapes == after.shapes
    assert before.counts == after.counts


def test_the_shipped_lenet_is_canonical():
    path = ROOT / "networks" / "lenet5.cnn"
    text = path.read_text("utf-8")
    assert format_module(parse(text)) == text


# --- convdsl fmt ---------------------------------------------------------------------------


def test_fmt_check_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.cnn"
    good.write_text(MESSY_FORMATTED, encoding="utf-8")
    bad = tmp_path / "bad.cnn"
    bad.write_text(MESSY, encoding="utf-8", newline="")
    crlf = tmp_path / "crlf.cnn"
    crlf.write_bytes(MESSY_FORMATTED.replace("\n", "\r\n").encode())

    assert main(["fmt", "--check", str(good)]) == 0
    assert capsys.readouterr().err == ""
    assert main(["fmt", "--check", str(bad)]) == 1
    assert "bad.cnn" in capsys.readouterr().err
    assert main(["fmt", "--check", str(crlf)]) == 1  # canonical files use LF
    capsys.readouterr()
    assert main(["fmt", "--check", str(good), str(bad)]) == 1
    capsys.readouterr()
    # --check changes nothing
    assert bad.read_bytes().decode() == MESSY


def test_fmt_rewrites_then_check_passes(tmp_path, capsys):
    path = tmp_path / "net.cnn"
    path.write_text(MESSY, encoding="utf-8", newline="")
    assert main(["fmt", str(path)]) == 0
    assert path.read_bytes().decode() == MESSY_FORMATTED
    assert main(["fmt", "--check", str(path)]) == 0
    assert main(["fmt", str(path)]) == 0  # nothing to do
    assert path.read_bytes().decode() == MESSY_FORMATTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.cnn"]  # no temporary left


def test_fmt_stdout_prints_without_rewriting(tmp_path, capsys):
    path = tmp_path / "net.cnn"
    path.write_text(MESSY, encoding="utf-8", newline="")
    assert main(["fmt", "--stdout", str(path)]) == 0
    assert capsys.readouterr().out == MESSY_FORMATTED
    assert path.read_bytes().decode() == MESSY


def test_fmt_errors(tmp_path, capsys):
    broken = tmp_path / "broken.cnn"
    broken.write_text("x = conv(6, 5\n", encoding="utf-8")
    assert main(["fmt", "--check", str(broken)]) == 1
    assert "broken.cnn:1:" in capsys.readouterr().err
    assert main(["fmt", str(broken)]) == 1
    assert broken.read_text(encoding="utf-8") == "x = conv(6, 5\n"
    assert main(["fmt", "--check", str(tmp_path / "missing.cnn")]) == 1
    with pytest.raises(SystemExit) as info:
        main(["fmt", "--check", "--stdout", str(broken)])
    assert info.value.code == 2


def test_fmt_only_needs_syntax(tmp_path):
    # fmt parses but does not build: a file with an undefined layer still formats
    path = tmp_path / "partial.cnn"
    path.write_text("y = x  ->  relu\n", encoding="utf-8")
    assert main(["fmt", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == "y = x -> relu\n"
