"""The language as docs/language.md describes it: syntax, naming, references, blocks.

Shapes and counts of each layer type are tested in test_counts.py; the
printer in test_printer.py.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

import convdsl
from convdsl import ConvDslError
from convdsl.frontend import syntax as ast
from convdsl.frontend.parser import parse
from convdsl.frontend.printer import format_module
from convdsl.ir import signatures

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "language.md"


def load(text: str, filename: str = "<string>") -> convdsl.Network:
    return convdsl.loads(textwrap.dedent(text).strip() + "\n", filename)


def names(text: str) -> list[str]:
    return [layer.name for layer in load(text).graph.layers()]


def stmt(text: str) -> ast.Statement:
    """The one statement of a one-statement text."""
    (statement,) = parse(text).statements
    return statement


def value(text: str) -> ast.Value:
    """The value of the first argument of a call."""
    statement = stmt(f"f({text})")
    assert isinstance(statement, ast.LayerStmt)
    return statement.chain[0].call.args[0].value


def error(text: str, *fragments: str) -> ConvDslError:
    """Loading fails with a located error whose message names each fragment.

    Messages are matched loosely (the names and values involved, not the
    wording) so that rewording a diagnostic does not break these tests."""
    with pytest.raises(ConvDslError) as info:
        load(text)
    diagnostic = info.value.diagnostics[0]
    for fragment in fragments:
        assert fragment.lower() in diagnostic.message.lower(), (fragment, diagnostic.render())
    return info.value


# --- the documentation's examples -------------------------------------------------


def doc_blocks(kind: str) -> list[tuple[int, str]]:
    text = DOC.read_text("utf-8")
    blocks = []
    for match in re.finditer(rf"^```{kind}\n(.*?)^```", text, re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(1)))
    return blocks


CNN_BLOCKS = doc_blocks("cnn")


def test_the_documentation_has_examples():
    assert len(CNN_BLOCKS) >= 8
    assert any("network lenet5" in block for _, block in CNN_BLOCKS)
    assert any("concat(" in block and "block inception" in block for _, block in CNN_BLOCKS)
    assert any("block basic" in block for _, block in CNN_BLOCKS)


@pytest.mark.parametrize("block", [b for _, b in CNN_BLOCKS],
                         ids=[f"line{line}" for line, _ in CNN_BLOCKS])
def test_every_cnn_example_in_the_documentation_loads(block):
    net = convdsl.loads(block, "example.cnn")
    assert not net.warnings, [w.render() for w in net.warnings]


def test_every_fenced_block_is_marked():
    text = DOC.read_text("utf-8")
    fences = re.findall(r"^```(\S*)$", text, re.M)
    openers = fences[::2]
    assert all(openers), "every opening fence names its language (cnn, text, sh)"
    assert set(openers) <= {"cnn", "text", "sh"}


def test_the_documentation_mentions_every_layer_type_and_option():
    text = DOC.read_text("utf-8")
    for op, signature in signatures.SIGNATURES.items():
        assert f"`{op}" in text, op
        for option in signature.options:
            assert option in text, (op, option)
    for word in ("correlation", "convolution", "valid", "same", "full", "floor", "ceil",
                 "cross_entropy", "mse", "auto", "direct", "gemm", "fft", "count_pad"):
        assert word in text, word


def test_the_documented_lenet_is_the_shipped_one():
    (block,) = [b for _, b in CNN_BLOCKS if "network lenet5" in b]
    documented = convdsl.loads(block)
    shipped = convdsl.load(ROOT / "networks" / "lenet5.cnn")
    assert documented.params == shipped.params == 61706
    assert documented.shapes == shipped.shapes


def test_the_documented_inception_block():
    (block,) = [b for _, b in CNN_BLOCKS if "network inception_demo" in b]
    net = convdsl.loads(block)
    assert net.shapes["inception3a.out"] == (256, 28, 28)
    assert net.shapes["inception3b.out"] == (480, 28, 28)
    params = sum(c.params for n, c in net.counts.items() if n.startswith("inception3a."))
    assert params == 163_696  # as the documentation says
    assert net.shapes["inception3a.b2.1"] == (128, 28, 28)


def test_the_documented_aux_example():
    (block,) = [b for _, b in CNN_BLOCKS if "aux side" in b]
    net = convdsl.loads(block)
    assert net.params - net.params_without_aux == 1290


# --- lines, comments, blank lines, CRLF --------------------------------------------


def test_comments_whole_line_and_trailing():
    module = parse("# heading\ninput 1x8  # the signal\n#\n##  double  \nx = relu#tight\n")
    assert module.lines == (
        ast.Line(None, "heading"),
        ast.Line(ast.InputStmt(None, (1, 8)), "the signal"),
        ast.Line(None, ""),
        ast.Line(None, "#  double"),
        ast.Line(ast.LayerStmt("x", (ast.Element(ast.Call("relu")),)), "tight"),
    )


def test_blank_lines_collapse_and_trim():
    module = parse("\n\n\ninput 1x8\n\n\n\nx = relu\n   \n\t\n")
    assert module.lines == (
        ast.Line(ast.InputStmt(None, (1, 8))),
        ast.Line(),
        ast.Line(ast.LayerStmt("x", (ast.Element(ast.Call("relu")),))),
    )


def test_empty_and_comment_only_files_parse():
    assert parse("").lines == ()
    assert parse("\n\n").lines == ()
    assert parse("# nothing").lines == (ast.Line(None, "nothing"),)


LENET = (ROOT / "networks" / "lenet5.cnn").read_text("utf-8")


def test_crlf_reads_like_lf():
    crlf = LENET.replace("\n", "\r\n")
    assert parse(crlf) == parse(LENET)
    assert convdsl.loads(crlf).params == convdsl.loads(LENET).params
    assert convdsl.loads(crlf).shapes == convdsl.loads(LENET).shapes


def test_no_final_newline_and_tabs():
    assert parse("input 1x8\nx = relu") == parse("input 1x8\nx = relu\n")
    assert parse("\tinput\t1x8\n  x\t=\trelu\n") == parse("input 1x8\nx = relu\n")


def test_byte_order_mark_is_skipped_by_load(tmp_path):
    path = tmp_path / "bom.cnn"
    path.write_bytes(b"\xef\xbb\xbf" + LENET.encode())
    assert convdsl.load(path).params == 61706


def test_nul_bytes_are_refused():
    with pytest.raises(ConvDslError, match="NUL"):
        parse("input 1x8\x00\n")


# --- continuation lines ----------------------------------------------------------------

ONE_LINE = "x = conv(6, 5, pad=2, act=relu) -> maxpool(2) -> conv(16, 5)\n"


@pytest.mark.parametrize("text", [
    "x = conv(\n    6,\n    5,\n    pad=2,\n    act=relu\n) -> maxpool(2) -> conv(16, 5)\n",
    "x = conv(6, 5,\n pad=2, act=relu,\n) -> maxpool(2) -> conv(16, 5)\n",
    "x = conv(6, 5, pad=2, act=relu) ->\n    maxpool(2) ->\n    conv(16, 5)\n",
    "x = conv(6, 5, pad=2, act=relu)\n    -> maxpool(2)\n    -> conv(16, 5)\n",
    "x = conv(6, 5, pad=2, act=relu)\n-> maxpool(2) -> conv(16, 5)\n",
    "x = conv(6, 5, pad=2, act=relu) ->\n\n  maxpool(2)\n  \t-> conv(16, 5)\n",
    "x = conv(6, 5, pad=2, act=relu)\r\n    -> maxpool(2)\r\n    -> conv(16, 5)\r\n",
])
def test_continuation_lines(text):
    assert parse(text) == parse(ONE_LINE)


def test_continuation_inside_lists_and_block_calls():
    spread = "y = filter(3, kernel=[\n  [1 2 1]\n  [2 4 2]\n  [1 2 1]\n] / 16)\n"
    assert parse(spread) == parse("y = filter(3, kernel=[[1 2 1] [2 4 2] [1 2 1]] / 16)\n")


def test_a_comment_on_the_last_line_of_a_continued_statement():
    module = parse("x = conv(6, 5)\n    -> relu  # done\n")
    assert module.lines[0].comment == "done"
    assert len(module.lines) == 1


@pytest.mark.parametrize(("text", "comment"), [
    ("x = conv(6, 5)  # first\n    -> relu\n", "first"),  # before a continuation line
    ("x = conv(6, # channels\n 5)\n", "channels"),  # inside brackets
    ("x = conv(6, # channels\n 5)  # window\n    -> relu  # act\n",
     "channels  # window  # act"),
])
def test_comments_inside_a_statement_move_to_its_end(text, comment):
    module = parse(text)
    assert len(module.lines) == 1
    assert module.lines[0].comment == comment
    assert format_module(module).endswith(f"  # {comment}\n")


@pytest.mark.parametrize("text", [
    "x = conv(6, 5)\n\n    -> relu\n",  # a blank line before a continuation line
    "x = conv(6, 5)\n# no\n    -> relu\n",
])
def test_what_does_not_continue(text):
    with pytest.raises(ConvDslError):
        parse(text)


@pytest.mark.parametrize(("text", "line"), [
    ("x = conv(6, 5\ny = relu\n", 1),  # the unclosed '('
    ("x = conv(6, 5))\n", 1),
    ("x = conv(6, [5)]\n", 1),
    ("x = f(" + "(" * 70 + "1" + ")" * 71 + "\n", 1),
    ("input 1x8\nx = conv(6, 5) $\n", 2),
    ("input 1x8\nx = \n", 2),
    ("input 1x8\nx = relu relu\n", 2),
    ("input 1x8\nx = conv(6, 5) ->\n", 2),
])
def test_syntax_errors_are_located(text, line):
    with pytest.raises(ConvDslError) as info:
        parse(text)
    span = info.value.diagnostics[0].span
    assert span is not None and span.line == line


def test_an_unclosed_block_is_an_error():
    with pytest.raises(ConvDslError):
        parse("block b() {\n  relu\n")


# --- names and reserved words ---------------------------------------------------------


@pytest.mark.parametrize("word", ["network", "input", "block", "output", "aux", "if"])
def test_reserved_words_cannot_name_layers(word):
    with pytest.raises(ConvDslError):
        parse(f"{word} = relu\n")


def test_else_and_keywords_elsewhere_are_ordinary_names():
    net = load("""
        input 1x8
        else = relu
        output else
    """)
    assert "else" in net.shapes
    statement = stmt("x = f(network, input=block, aux=output, if=else) -> network\n")
    call = statement.chain[0].call
    assert [a.key for a in call.args] == [None, "input", "aux", "if"]
    assert [a.value for a in call.args] == [ast.Word(w) for w in
                                            ("network", "block", "output", "else")]
    assert statement.chain[1].call.op == "network"
    assert stmt("output input loss=aux\n") == ast.OutputStmt(
        False, "input", (ast.Arg("loss", ast.Word("aux")),))
    assert stmt("block network(input, if=block) {\n}\n") == ast.BlockDef(
        "network", (ast.Param("input"), ast.Param("if", ast.Word("block"))), ())


def test_names_are_case_sensitive_and_may_use_underscores_and_digits():
    net = load("""
        input 1x8
        _a1 = relu
        A1 = tanh
        a1 = _a1 -> sigmoid
        output a1
        output A1
    """)
    assert {"_a1", "A1", "a1"} <= set(net.shapes)


def test_a_layer_may_have_the_name_of_a_layer_type():
    net = load("""
        input 1x16
        maxpool = maxpool(2)
        relu = relu()
        output relu
    """)
    assert net.graph.layer("relu").inputs == ("maxpool",)
    # but then a bare `relu` in that scope names the layer, not the layer type
    error("input 1x16\nrelu = relu\noutput relu", "relu")


# --- statements: network, input, output ------------------------------------------------


def test_network_statement_and_default_name():
    assert load("network lenet\ninput 1x8\nx = relu\noutput x").name == "lenet"
    assert load("input 1x8\nx = relu\noutput x", "nets/my_net.cnn").name == "my_net"
    error("network a\nnetwork b\ninput 1x8\nx = relu\noutput x", "network")


@pytest.mark.parametrize(("text", "dims"), [
    ("input 1x40", (1, 40)),
    ("input 3x32x32", (3, 32, 32)),
    ("input 1x16x32x32", (1, 16, 32, 32)),
    ("input 7", (7,)),
])
def test_input_statement_syntax(text, dims):
    assert stmt(text) == ast.InputStmt(None, dims)
    assert stmt(text.replace("input ", "input img: ")) == ast.InputStmt("img", dims)


@pytest.mark.parametrize("shape", ["3", "1x2x3x4x5", "0x8", "3x0x4"])
def test_invalid_input_shapes(shape):
    error(f"input {shape}\nx = relu\noutput x", shape)


def test_input_default_name_and_named_inputs():
    assert load("input 1x8\nx = relu\noutput x").input_shapes == {"input": (1, 8)}
    net = load("""
        input a: 1x8
        input b: 2x8x8
        x = a -> conv(2, 1)
        y = b -> global_avgpool
        z = concat(x, b) -> relu
        output y
    """.replace("z = concat(x, b) -> relu", ""))
    assert net.input_shapes == {"a": (1, 8), "b": (2, 8, 8)}


def test_an_input_statement_restarts_the_flow():
    net = load("""
        input a: 1x8
        x = conv(2, 1)
        input b: 3x8
        y = conv(2, 1)
        z = concat(x, y)
        output z
    """)
    assert net.graph.layer("x").inputs == ("a",)
    assert net.graph.layer("y").inputs == ("b",)
    assert net.shapes["z"] == (4, 8)


def test_two_unnamed_inputs_clash():
    error("input 1x8\ninput 1x8\nx = relu\noutput x", "input")


def test_output_and_aux_statements():
    assert stmt("output fc") == ast.OutputStmt(False, "fc")
    assert stmt("aux side loss=mse weight=0.3") == ast.OutputStmt(
        True, "side", (ast.Arg("loss", ast.Word("mse")),
                       ast.Arg("weight", ast.Float(0.3, "0.3"))))
    net = load("""
        input 1x8
        a = conv(2, 3)
        b = flatten -> dense(2)
        c = a -> flatten -> dense(3)
        output b loss=none weight=0
        aux c weight=2
    """)
    (main, side) = net.outputs
    assert (main.name, main.loss.value, main.weight, main.aux) == ("b.1", "none", 0.0, False)
    assert (side.name, side.loss.value, side.weight, side.aux) == ("c.1", "cross_entropy",
                                                                   2.0, True)


@pytest.mark.parametrize(("text", "fragments"), [
    ("x = relu\noutput x loss=hinge", ("hinge", "loss")),
    ("x = relu\noutput x weight=-1", ("weight",)),
    ("x = relu\noutput x weight=yes", ("yes", "weight")),
    ("x = relu\noutput x gain=2", ("gain",)),
    ("x = relu\noutput x loss=mse loss=mse", ("loss",)),
    ("x = relu\noutput y", ("'y'",)),
    ("x = relu\noutput x\noutput x", ("'x'",)),
    ("x = relu\noutput input", ("input",)),
    ("x = relu", ("output",)),
    ("x = relu\naux x", ("aux",)),
    ("relu\noutput relu_1", ("relu_1",)),  # unnamed layers cannot be referred to
])
def test_output_errors(text, fragments):
    error("input 1x8\n" + text, *fragments)


def test_unused_layers_draw_a_warning():
    net = load("""
        input 1x8
        x = conv(2, 1)
        y = relu
        z = x -> tanh
        output z
    """)
    assert [w.message for w in net.warnings] == ["layer 'y' is never used"]


# --- layer statements, chains, calls, repetition ---------------------------------------


def test_layer_statement_syntax():
    statement = stmt("feat = conv(16, 3, pad=same,) -> relu() -> maxpool * 2\n")
    assert statement == ast.LayerStmt("feat", (
        ast.Element(ast.Call("conv", (ast.Arg(None, ast.Int(16)), ast.Arg(None, ast.Int(3)),
                                      ast.Arg("pad", ast.Word("same"))), True)),
        ast.Element(ast.Call("relu", (), True)),
        ast.Element(ast.Call("maxpool"), ast.Int(2)),
    ))
    assert stmt("relu") == ast.LayerStmt(None, (ast.Element(ast.Call("relu")),))


def test_relu_and_relu_with_parentheses_build_the_same_layer():
    a = load("input 1x8\nx = relu\noutput x")
    b = load("input 1x8\nx = relu()\noutput x")
    assert a.graph.layer("x") == b.graph.layer("x")


def test_statements_flow_into_the_next():
    net = load("""
        input 1x8x8
        conv(2, 3)
        relu
        x = maxpool(2)
        output x
    """)
    assert net.graph.layer("conv_1").inputs == ("input",)
    assert net.graph.layer("relu_1").inputs == ("conv_1",)
    assert net.graph.layer("x").inputs == ("relu_1",)


def test_positional_and_keyword_arguments_are_equivalent():
    a = load("input 1x8x8\nx = conv(6, 3, stride=2)\noutput x")
    b = load("input 1x8x8\nx = conv(window=3, stride=2, channels=6)\noutput x")
    assert a.graph.layer("x").attrs == b.graph.layer("x").attrs


def test_a_positional_value_after_a_named_option_is_refused():
    with pytest.raises(ConvDslError, match="positional value cannot follow a named option"):
        load("input 1x8x8\nx = conv(stride=2, 6, 3)\noutput x")


@pytest.mark.parametrize(("call", "fragments"), [
    ("conv(6)", ("window",)),
    ("conv(6, 3, 1)", ("conv",)),
    ("conv(6, 3, channels=4)", ("channels",)),
    ("conv(6, 3, strides=2)", ("strides",)),
    ("cnov(6, 3)", ("cnov",)),
    ("flatten(1)", ("flatten",)),
    ("conv(6, 3, mode=flip)", ("flip", "mode")),
    ("conv(6, 3, algo=strassen)", ("strassen", "algo")),
    ("conv(6, 3, act=swish)", ("swish", "act")),
    ("conv(6.0, 3)", ("channels",)),
    ("conv(0, 3)", ("channels",)),
    ("conv(6, 3, bias=maybe)", ("maybe", "bias")),
    ("dense(10)", ("'x'",)),
])
def test_call_errors(call, fragments):
    error(f"input 1x8x8\nx = {call}\noutput x", *fragments)


def test_unknown_option_suggests_a_close_one():
    err = error("input 1x8x8\nx = conv(6, 3, strid=2)\noutput x", "strid")
    assert "'stride'" in err.diagnostics[0].hint


def test_a_chain_must_have_an_input():
    error("x = relu\noutput x", "relu")


@pytest.mark.parametrize(("count", "expected"), [("1", 1), ("3", 3), ("2 * 2", 4),
                                                  ("(1 + 2)", 3), ("6 / 2", 3)])
def test_repetition(count, expected):
    net = load(f"input 1x8\nx = relu * {count}\noutput x")
    assert len(net.graph) == expected + 1


def test_repetition_up_to_1000():
    assert len(load("input 1x8\nx = relu * 1000\noutput x").graph) == 1001


@pytest.mark.parametrize("count", ["0", "1001", "2.5", "-1", "3x3", "many"])
def test_invalid_repeat_counts(count):
    err = error(f"input 1x8\nx = relu * {count}\noutput x")
    assert err.diagnostics[0].span.line == 2


def test_repetition_gives_every_copy_its_own_parameters():
    net = load("input 4x8\nx = conv(4, 3, pad=same) * 3\noutput x")
    assert [n.split(".")[-1] for n in net.shapes if n != "input"] == ["0", "1", "2"]
    assert net.params == 3 * (4 * 4 * 3 + 4)


# --- naming ---------------------------------------------------------------------------


def test_naming_rules():
    assert names("""
        input 1x16x16
        c1 = conv(2, 3)
        features = conv(2, 3) -> relu -> maxpool(2)
        convs = conv(2, 1) * 2
        conv(2, 1)
        relu
        conv(2, 1) -> relu
        leaky_relu(0.1)
        y = features -> tanh
        output convs
        output y
    """) == ["input", "c1", "features.0", "features.1", "features.2", "convs.0", "convs.1",
             "conv_1", "relu_1", "conv_2", "relu_2", "leaky_relu_1", "y"]


def test_automatic_names_skip_declared_ones():
    assert names("""
        input 1x8
        relu_1 = relu
        relu
        relu_3 = relu
        relu
        x = relu
        output x
    """) == ["input", "relu_1", "relu_2", "relu_3", "relu_4", "x"]


BASIC = """
    block unit(c) {
        conv1 = conv(c, 3, pad=1)
        relu
        out = add(conv1, input)
    }
"""


def test_block_calls_open_a_prefix():
    assert names(BASIC + """
        input 2x8x8
        layer1 = unit(2) * 2
        block1 = unit(2)
        unit(2)
        chain = unit(2) -> relu -> unit(2)
        output chain
    """) == ["input",
             "layer1.0.conv1", "layer1.0.relu_1", "layer1.0.out",
             "layer1.1.conv1", "layer1.1.relu_1", "layer1.1.out",
             "block1.conv1", "block1.relu_1", "block1.out",
             "unit_1.conv1", "unit_1.relu_1", "unit_1.out",
             "chain.0.conv1", "chain.0.relu_1", "chain.0.out",
             "chain.1",
             "chain.2.conv1", "chain.2.relu_1", "chain.2.out"]


def test_nested_blocks_nest_prefixes():
    assert names(BASIC + """
        block stage(c, n=2) {
            down = conv(c, 1)
            units = unit(c) * n
        }
        input 2x8x8
        layer2 = stage(4)
        output layer2
    """) == ["input", "layer2.down",
             "layer2.units.0.conv1", "layer2.units.0.relu_1", "layer2.units.0.out",
             "layer2.units.1.conv1", "layer2.units.1.relu_1", "layer2.units.1.out"]


def test_a_named_statement_refers_to_its_last_layer():
    net = load("""
        input 1x8
        f = conv(2, 1) -> relu
        g = f -> tanh
        b = unit(2)
        output g
        output b
    """ + BASIC)
    assert net.graph.layer("g").inputs == ("f.1",)
    assert {o.name for o in net.outputs} == {"g", "b.out"}


def test_duplicate_names():
    err = error("input 1x8\nx = relu\nx = tanh\noutput x", "'x'")
    assert err.diagnostics[0].span.line == 3
    assert "line 2" in " ".join(err.diagnostics[0].notes)


# --- references -------------------------------------------------------------------------


def test_references_branch_from_named_layers():
    net = load("""
        input 3x16x16
        stem = conv(8, 3, pad=same, act=relu)
        left = conv(8, 1)
        right = stem -> conv(8, 3, pad=same)
        both = add(left, right, act=relu)
        output both
    """)
    layer = net.graph.layer
    assert layer("left").inputs == ("stem",)
    assert layer("right").inputs == ("stem",)
    assert layer("both").inputs == ("left", "right")
    assert layer("both").act.kind.value == "relu"


def test_references_to_inputs():
    net = load("""
        input 1x8
        a = conv(2, 1)
        b = input -> conv(2, 1)
        c = add(a, b) -> add(input)
        output c
    """.replace("-> add(input)", ""))
    assert net.graph.layer("b").inputs == ("input",)
    named = load("""
        input img: 1x8
        a = conv(1, 1)
        b = img -> relu
        c = add(a, b, img)
        output c
    """)
    assert named.graph.layer("c").inputs == ("a", "b", "img")


def test_references_may_come_before_the_definition():
    net = load("""
        input 1x8
        b = c -> relu
        c = input -> conv(1, 1)
        output b
    """)
    assert net.graph.layer("b").inputs == ("c",)
    assert [layer.name for layer in net.layers] == ["input", "c", "b"]


def test_cycles_are_errors():
    error("input 1x8\ny = x -> relu\nx = y -> relu\noutput y", "cycle")


def test_a_reference_alone_adds_no_layer():
    error("input 1x8\nx = relu\ny = x\noutput y", "'x'")


def test_a_name_with_parentheses_or_repetition_is_a_call_not_a_reference():
    error("input 1x8\nx = relu\ny = x()\noutput y", "'x'")
    error("input 1x8\nx = relu\ny = x * 2\noutput y", "'x'")


def test_undefined_names_in_merges():
    err = error("input 1x8\nx = relu\ny = add(x, xx)\noutput y", "'xx'")
    assert "'x'" in err.diagnostics[0].hint


def test_merges_take_the_flowing_layer_only_after_an_arrow():
    net = load("""
        input 2x8
        a = conv(2, 1)
        b = conv(2, 1)
        c = b -> add(a)
        d = conv(2, 1) -> add(a, b)
        e = concat(a, b, d)
        output e
    """)
    layer = net.graph.layer
    assert layer("c").inputs == ("b", "a")
    assert layer("d.1").inputs == ("d.0", "a", "b")
    assert layer("e").inputs == ("a", "b", "d.1")  # not the previous statement
    assert net.shapes["e"] == (6, 8)


@pytest.mark.parametrize(("text", "fragments"), [
    ("x = relu\ny = add(x)", ("add",)),
    ("x = relu\ny = add(x, 3)", ("add",)),
    ("x = relu\ny = concat(x, x, axis=1)", ("axis",)),
])
def test_merge_errors(text, fragments):
    error("input 1x8\n" + text + "\noutput y", *fragments)


# --- values --------------------------------------------------------------------------------


def test_value_kinds():
    assert value("64") == ast.Int(64)
    assert value("0.5") == ast.Float(0.5, "0.5")
    assert value("1e-5") == ast.Float(1e-5, "1e-5")
    assert value(".5") == ast.Float(0.5, ".5")
    assert value("1.") == ast.Float(1.0, "1.")
    assert value("2.5E+3") == ast.Float(2500.0, "2.5E+3")
    assert value("3x3") == ast.Dims((3, 3))
    assert value("1x16x32x32") == ast.Dims((1, 16, 32, 32))
    assert value("same") == ast.Word("same")
    assert value("-1") == ast.Neg(ast.Int(1))


def test_arithmetic_precedence_and_associativity():
    a, b, c = ast.Word("a"), ast.Word("b"), ast.Word("c")
    assert value("a + b * c") == ast.BinOp("+", a, ast.BinOp("*", b, c))
    assert value("a * b + c") == ast.BinOp("+", ast.BinOp("*", a, b), c)
    assert value("a - b - c") == ast.BinOp("-", ast.BinOp("-", a, b), c)
    assert value("a / b / c") == ast.BinOp("/", ast.BinOp("/", a, b), c)
    assert value("a - (b - c)") == ast.BinOp("-", a, ast.BinOp("-", b, c))
    assert value("(a + b) * c") == ast.BinOp("*", ast.BinOp("+", a, b), c)
    assert value("-a * b") == ast.BinOp("*", ast.Neg(a), b)
    assert value("a * -b") == ast.BinOp("*", a, ast.Neg(b))
    assert value("-(a + b)") == ast.Neg(ast.BinOp("+", a, b))
    assert value("--a") == ast.Neg(ast.Neg(a))


def test_lists_syntax():
    one, two = ast.Int(1), ast.Int(2)
    assert value("[1 2]") == ast.ListValue((one, two))
    assert value("[1, 2]") == value("[1 2]") == value("[1, 2,]") == value("[1 2 ,]")
    assert value("[]") == ast.ListValue(())
    assert value("[-1 0 1]") == ast.ListValue((ast.Neg(one), ast.Int(0), one))
    assert value("[1 -2]") == ast.ListValue((one, ast.Neg(two)))  # two items, not 1 - 2
    assert value("[-a 0 a]") == ast.ListValue((ast.Neg(ast.Word("a")), ast.Int(0),
                                               ast.Word("a")))
    assert value("[[1 2] [2 1]]") == ast.ListValue((ast.ListValue((one, two)),
                                                    ast.ListValue((two, one))))
    assert value("[1 2] / 16") == ast.ListValue((one, two), ast.Int(16))
    assert value("[1 2] / (2 * n)") == ast.ListValue(
        (one, two), ast.BinOp("*", two, ast.Word("n")))
    assert value("[1 2] / 2 / n") == value("[1 2] / (2 * n)")
    assert value("[[1 2] / 2 [0 0]]").items[0] == ast.ListValue((one, two), two)


@pytest.mark.parametrize("text", ["[1 + 1]", "[2 * 3]", "[(1)]", "[1] / -2", "[--1]"])
def test_list_items_are_not_expressions(text):
    with pytest.raises(ConvDslError):
        parse(f"f({text})\n")


def test_lists_are_values_not_operands():
    for text in ("[1] + 1", "-[1]", "2 * [1]"):
        with pytest.raises(ConvDslError):
            parse(f"f({text})\n")


def test_arithmetic_evaluation():
    net = load("""
        block b(planes, expansion=4) {
            x = conv(planes * expansion, 1)
            y = conv(planes * expansion / 2, 1)
            z = conv((planes + 2) / 2 - 1, 1) -> leaky_relu(-(-planes / 8))
        }
        input 1x8
        out = b(4)
        output out
    """)
    assert net.shapes["out.x"] == (16, 8)
    assert net.shapes["out.y"] == (8, 8)
    assert net.shapes["out.z.0"] == (2, 8)
    assert net.graph.layer("out.z.1").attrs.act.slope == 0.5


@pytest.mark.parametrize(("call", "fragments"), [
    ("conv(5 / 2, 1)", ("2.5",)),
    ("conv(4 / 0, 1)", ("zero",)),
    ("conv(3x3 * 2, 1)", ("3x3",)),
    ("conv(-same, 1)", ("same",)),
    ("conv(10000000000000000000 * 2, 1)", ("large",)),
    ("filter(1, kernel=[a] / 2)", ("'a'",)),
    ("filter(3, kernel=[1 2 3] / 0)", ("zero",)),
])
def test_arithmetic_errors(call, fragments):
    error(f"input 1x8\nx = {call}\noutput x", *fragments)


def test_scaled_lists_divide_every_item():
    net = load("input 1x8\nx = filter(5, kernel=[1 4 6 4 1] / 16)\noutput x")
    assert net.graph.layer("x").attrs.kernel == (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    net = load("input 1x8\nx = filter(2, kernel=[1 2] / 2 / 2)\noutput x")
    assert net.graph.layer("x").attrs.kernel == (0.25, 0.5)


def test_act_none_is_identity():
    net = load("input 1x8\nx = conv(2, 1, act=none)\noutput x")
    assert net.graph.layer("x").act.kind.value == "identity"
    assert load("input 1x8\nx = conv(2, 1)\noutput x").graph.layer("x").act is None


# --- blocks ---------------------------------------------------------------------------------


def test_block_syntax():
    text = "block b(c, s=1, flag=yes,) {\n    x = conv(c, 3, stride=s)\n}\n"
    assert stmt(text) == ast.BlockDef("b", (
        ast.Param("c"), ast.Param("s", ast.Int(1)), ast.Param("flag", ast.Word("yes"))),
        (ast.Line(ast.LayerStmt("x", (ast.Element(ast.Call("conv", (
            ast.Arg(None, ast.Word("c")), ast.Arg(None, ast.Int(3)),
            ast.Arg("stride", ast.Word("s"))), True)),))),))
    assert stmt("block b() {}\n") == ast.BlockDef("b", (), ())
    assert stmt("block b() { # note\n  relu\n\n\n}  # end\n") == ast.BlockDef("b", (), (
        ast.Line(None, "note"), ast.Line(ast.LayerStmt(None, (ast.Element(ast.Call("relu")),))),
    ))
    assert parse("block b() {\n  relu\n}  # end\n").lines[0].comment == "end"


def test_block_parameters_positional_keyword_and_defaults():
    block = """
        block b(c, window=3, stride=1) {
            x = conv(c, window, stride=stride, pad=same)
        }
        input 1x16
    """
    def shape(call: str) -> tuple[int, ...]:
        return load(block + f"y = {call}\noutput y").shapes["y.x"]

    assert shape("b(4)") == (4, 16)
    assert shape("b(4, 5, 2)") == (4, 8)
    assert shape("b(c=4, stride=4)") == (4, 4)
    assert shape("b(4, stride=2, window=1)") == (4, 8)


@pytest.mark.parametrize(("call", "fragments"), [
    ("b()", ("'c'",)),
    ("b(1, 2, 3)", ("'b'",)),
    ("b(1, d=2)", ("'d'",)),
    ("b(1, c=2)", ("'c'",)),
])
def test_block_call_errors(call, fragments):
    error(f"block b(c, s=1) {{\n  x = conv(c, 1)\n}}\ninput 1x8\ny = {call}\noutput y",
          *fragments)


@pytest.mark.parametrize(("text", "fragments"), [
    ("block b(c, d=c*2) {\n conv(d, 1)\n}\ny = b(1)", ("'c'",)),
    ("block b() {\n y = b\n}\ny = b", ("itself",)),
    ("block a() {\n y = c\n}\nblock c() {\n y = a\n}\ny = a", ("itself",)),
    ("block conv() {\n relu\n}\ny = relu", ("conv",)),
    ("block b() {\n relu\n}\nblock b() {\n tanh\n}\ny = b", ("'b'",)),
    ("block b() {\n input 1x8\n}\ny = b", ("input",)),
    ("block b() {\n relu\n output x\n}\ny = b", ("output",)),
    ("block b() {\n relu\n aux x\n}\ny = b", ("aux",)),
    ("block b() {\n network n\n}\ny = b", ("network",)),
    ("block b() {\n block c() {\n relu\n }\n}\ny = b", ("block",)),
    ("block b() {\n}\ny = b", ("'b'",)),
    ("block b() {\n input = relu\n}\ny = b", ()),
    ("block b() {\n x = y -> relu\n}\ny = b", ("'y'",)),
])
def test_block_definition_errors(text, fragments):
    error("input 1x8\n" + text + "\noutput y", *fragments)


def test_blocks_see_only_their_own_layers_and_input():
    err = error("""
        input 1x8
        outside = relu
        block b() {
            x = add(input, outside)
        }
        y = b
        output y
    """, "'outside'")
    assert err.diagnostics[0].span.line == 4


def test_blocks_may_be_called_before_their_definition_and_return_their_last_layer():
    net = load("""
        input 1x8
        y = b(3) -> relu
        output y
        block b(c) {
            first = conv(c, 1)
            second = input -> conv(c, 3, pad=same)
            last = add(first, second)
        }
    """)
    assert net.graph.layer("y.1").inputs == ("y.0.last",)
    assert net.graph.layer("y.0.second").inputs == ("input",)


def test_block_parameters_in_lists_repeats_and_options():
    net = load("""
        block deriv(a, n, how=convolution) {
            d = filter(3, kernel=[-a 0 a] / n, mode=how)
            r = relu * n
        }
        input 1x16
        y = deriv(2, 4)
        output y
    """)
    attrs = net.graph.layer("y.d").attrs
    assert attrs.kernel == (-0.5, 0.0, 0.5)
    assert attrs.flip is True
    assert [n for n in net.shapes if n.startswith("y.r")] == ["y.r.0", "y.r.1", "y.r.2", "y.r.3"]


def test_a_parameter_and_a_layer_may_share_a_name():
    (block,) = [b for _, b in CNN_BLOCKS if "network resnet_stage" in b]
    net = convdsl.loads(block)
    assert net.graph.layer("layer2.0.out").inputs == ("layer2.0.bn2", "layer2.0.downsample.1")
    assert net.graph.layer("layer1.0.out").inputs == ("layer1.0.bn2", "input")
    assert "layer1.0.downsample.0" not in net.shapes


# --- if / else ---------------------------------------------------------------------------------

IF_BLOCK = """
    block b(flag) {
        if flag {
            yes_branch = conv(2, 1)
        } else {
            no_branch = conv(3, 1)
        }
    }
    input 1x8
"""


@pytest.mark.parametrize(("flag", "taken"), [
    ("yes", "yes_branch"), ("true", "yes_branch"), ("on", "yes_branch"), ("1", "yes_branch"),
    ("no", "no_branch"), ("false", "no_branch"), ("off", "no_branch"), ("0", "no_branch"),
])
def test_if_else_takes_one_branch(flag, taken):
    net = load(IF_BLOCK + f"y = b({flag})\noutput y")
    assert [n for n in net.shapes if n != "input"] == [f"y.{taken}"]


def test_if_syntax():
    text = "if a {\n  relu\n} else {\n  tanh\n}\n"
    relu = ast.Line(ast.LayerStmt(None, (ast.Element(ast.Call("relu")),)))
    tanh = ast.Line(ast.LayerStmt(None, (ast.Element(ast.Call("tanh")),)))
    assert stmt(text) == ast.IfStmt("a", (relu,), (tanh,))
    assert stmt("if a {\n  relu\n}\n") == ast.IfStmt("a", (relu,), None)
    assert stmt("if a {\n} else {\n}\n") == ast.IfStmt("a", (), ())
    with pytest.raises(ConvDslError):
        parse("if a {\n  relu\n}\nelse {\n  tanh\n}\n")  # else belongs on the '}' line


def test_if_without_else_and_nested_ifs():
    block = """
        block b(x, y=no) {
            first = relu
            if x {
                second = tanh
                if y {
                    third = sigmoid
                }
            }
        }
        input 1x8
    """
    assert [n for n in load(block + "z = b(no)\noutput z").shapes] == ["input", "z.first"]
    assert [n for n in load(block + "z = b(yes)\noutput z").shapes] == [
        "input", "z.first", "z.second"]
    assert [n for n in load(block + "z = b(yes, yes)\noutput z").shapes] == [
        "input", "z.first", "z.second", "z.third"]


def test_names_may_be_declared_in_both_branches():
    net = load("""
        block b(proj) {
            body = conv(4, 3, pad=same)
            if proj {
                short = input -> conv(4, 1)
            } else {
                short = input -> relu
            }
            out = add(body, short)
        }
        input 4x8
        y = b(no) -> b(yes)
        output y
    """)
    assert net.graph.layer("y.0.short").op.value == "activation"
    assert net.graph.layer("y.1.short").op.value == "conv"


@pytest.mark.parametrize(("text", "fragments"), [
    ("if flag {\n relu\n}\ny = relu", ("if",)),
    ("block b(c) {\n if d {\n  relu\n }\n}\ny = b(1)", ("'d'",)),
    ("block b(c) {\n if c {\n  relu\n }\n}\ny = b(2)", ("'2'",)),
    ("block b(c) {\n if c {\n  relu\n }\n}\ny = b(maybe)", ("maybe",)),
])
def test_if_errors(text, fragments):
    error("input 1x8\n" + text + "\noutput y", *fragments)


def test_resnet18_names_are_torchvisions_state_dict_names():
    """The documented ResNet-18: its weighted layers carry exactly the names of
    torchvision.models.resnet18()'s state_dict (checked once against torchvision
    0.26, which gives the same parameter and buffer count per layer)."""
    (block,) = [b for _, b in CNN_BLOCKS if "network resnet18" in b]
    net = convdsl.loads(block)
    expected = ["conv1", "bn1"]
    for stage in (1, 2, 3, 4):
        for index in (0, 1):
            prefix = f"layer{stage}.{index}."
            expected += [prefix + n for n in ("conv1", "bn1", "conv2", "bn2")]
            if stage > 1 and index == 0:
                expected += [prefix + "downsample.0", prefix + "downsample.1"]
    expected.append("fc")
    weighted = [layer.name for layer in net.layers if layer.op.value in ("conv", "bn", "dense")]
    assert sorted(weighted) == sorted(expected)
    assert net.counts["layer2.0.downsample.0"].params == 64 * 128
    assert net.counts["layer2.0.downsample.1"].buffers == 2 * 128


def test_sizes_are_list_items():
    module = parse("x = conv(4, 3, pad=[3x3 1x1])\n")
    (element,) = module.statements[0].chain
    (_, _, pad) = element.call.args
    assert pad.value == ast.ListValue((ast.Dims((3, 3)), ast.Dims((1, 1))))


def test_parentheses_on_their_own_line_still_make_a_call():
    (element,) = parse("y = x(\n)\n").statements[0].chain
    assert element.call.parens
