"""`train` lines: training settings written in a .cnn file.

    train epochs=20 batch=100 optimizer=adam lr=0.01

They are parsed like `output` options, checked by convdsl.ir.training, merged
over every `train` line of the file into `Network.training`, and kept by `fmt`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convdsl
from convdsl import ConvDslError
from convdsl.cli import main
from convdsl.frontend import syntax as ast
from convdsl.frontend.parser import parse
from convdsl.frontend.printer import format_module
from convdsl.ir import training
from convdsl.ir.training import TrainSettings

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "networks" / "lenet5.cnn"

# A tiny valid network; `{}` is where the train lines go.
NETWORK = "input 1x8\n{}\nc = relu\noutput c\n"


def load(train_lines: str) -> convdsl.Network:
    return convdsl.loads(NETWORK.format(train_lines), "net.cnn")


def error_of(train_lines: str) -> str:
    """The rendered error of the tiny network with these lines (they start at line 2)."""
    with pytest.raises(ConvDslError) as caught:
        load(train_lines)
    return str(caught.value)


# --- parsing and merging ------------------------------------------------------------


def test_a_train_line_gives_checked_typed_settings() -> None:
    net = load("train epochs=20 batch=100 optimizer=adam lr=0.01 nesterov=yes")
    assert net.training == {"epochs": 20, "batch": 100, "optimizer": "adam", "lr": 0.01,
                            "nesterov": True}
    assert type(net.training["lr"]) is float and type(net.training["epochs"]) is int


def test_without_train_lines_the_settings_are_empty() -> None:
    assert load("").training == {}
    assert convdsl.load(LENET).training == {}


def test_several_lines_merge_wherever_they_are() -> None:
    text = ("train epochs=5  # first\ninput 1x8\ntrain lr=0.1 seed=3\nc = relu\noutput c\n"
            "train schedule=cosine\n")
    net = convdsl.loads(text, "net.cnn")
    assert net.training == {"epochs": 5, "lr": 0.1, "seed": 3, "schedule": "cosine"}


def test_values_are_evaluated_like_other_options() -> None:
    net = load("train lr=0.1 / 4 min_lr=1e-5 momentum=0 weight_decay=5 * 1e-4 nesterov=1")
    assert net.training == {"lr": 0.025, "min_lr": 1e-5, "momentum": 0.0,
                            "weight_decay": pytest.approx(5e-4), "nesterov": True}
    assert type(net.training["momentum"]) is float  # a whole number for a real setting


# One valid value, as written in a file, and its converted value, for every setting.
VALID = {
    "epochs": ("3", 3), "batch": ("16", 16), "optimizer": ("adamw", "adamw"),
    "lr": ("1e-3", 1e-3), "momentum": ("0.5", 0.5), "nesterov": ("true", True),
    "weight_decay": ("0", 0.0), "beta1": ("0.8", 0.8), "beta2": ("0.99", 0.99),
    "eps": ("1e-6", 1e-6), "schedule": ("step", "step"), "step_size": ("2", 2),
    "gamma": ("1", 1.0), "min_lr": ("0.001", 0.001), "warmup": ("0", 0), "seed": ("42", 42),
    "val_split": ("0", 0.0), "dtype": ("float64", "float64"), "init": ("he", "he"),
}


def test_every_setting_can_be_given_and_resolves_to_train_settings() -> None:
    assert set(VALID) == set(training.CONVERTERS)
    line = "train " + " ".join(f"{key}={text}" for key, (text, _) in VALID.items())
    net = load(line)
    assert net.training == {key: value for key, (_, value) in VALID.items()}
    resolved = training.resolve(net.training, {"epochs": 7})
    assert resolved == TrainSettings(**{**net.training, "epochs": 7})


def test_train_lines_change_nothing_about_the_network() -> None:
    text = LENET.read_text("utf-8")
    plain = convdsl.loads(text, "lenet5.cnn")
    trained = convdsl.loads("train epochs=2 batch=8 optimizer=adam\n" + text, "lenet5.cnn")
    assert trained.training == {"epochs": 2, "batch": 8, "optimizer": "adam"}
    assert trained.graph.name == plain.graph.name
    assert [layer.name for layer in trained.layers] == [layer.name for layer in plain.layers]
    assert trained.shapes == plain.shapes and trained.counts == plain.counts
    assert trained.warnings == plain.warnings
    with_training = trained.to_dict()
    assert with_training.pop("training") == trained.training
    assert plain.to_dict().pop("training") == {}
    without = plain.to_dict()
    del without["training"]
    assert with_training == without


def test_summary_json_reports_the_settings(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "net.cnn"
    path.write_text(NETWORK.format("train lr=0.5 nesterov=on"), "utf-8")
    assert main(["summary", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["training"] == {"lr": 0.5, "nesterov": True}


def test_train_is_a_keyword_only_at_the_start_of_a_line() -> None:
    net = convdsl.loads("input 1x8\ntrainer = relu\ntrain_1 = trainer -> relu\n"
                        "output train_1 loss=mse\n", "net.cnn")
    assert net.training == {} and "trainer" in net.shapes


# --- errors -------------------------------------------------------------------------


def test_an_unknown_setting_suggests_the_closest_and_lists_them_all() -> None:
    message = error_of("train epochs=3 lrr=0.1")
    assert message.startswith("net.cnn:2:16: error: unknown training setting 'lrr'\n")
    assert "  hint: did you mean 'lr'?" in message
    listed = re.search(r"note: known training settings: (.*)", message)
    assert listed is not None
    assert set(listed.group(1).split(", ")) == set(training.CONVERTERS)


def test_an_unknown_setting_far_from_any_lists_them_all_in_the_hint() -> None:
    message = error_of("train colour=red")
    assert message.startswith("net.cnn:2:7: error: unknown training setting 'colour'\n")
    assert "  hint: known training settings: batch, beta1," in message


@pytest.mark.parametrize(("option", "expected"), [
    ("lr=0", "invalid value '0' for 'lr': expected a positive number"),
    ("lr=-0.1", "invalid value '-0.1' for 'lr': expected a positive number"),
    ("lr=fast", "invalid value 'fast' for 'lr': expected a positive number"),
    ("lr=[1 2]", "invalid value '[1 2]' for 'lr': expected a positive number"),
    ("epochs=2.5", "invalid value '2.5' for 'epochs': expected a whole number of at least 1"),
    ("batch=0", "invalid value '0' for 'batch': expected a whole number of at least 1"),
    ("batch=3x3", "invalid value '3x3' for 'batch': expected a whole number of at least 1"),
    ("seed=-1", "invalid value '-1' for 'seed': expected a whole number of at least 0"),
    ("momentum=1", "invalid value '1' for 'momentum': expected a number from 0 up to"),
    ("val_split=1.5", "invalid value '1.5' for 'val_split': expected a number from 0 up to"),
    ("gamma=2", "invalid value '2' for 'gamma': expected a number above 0 and at most 1"),
    ("nesterov=maybe", "invalid value 'maybe' for 'nesterov': expected yes or no"),
    ("optimizer=adma", "invalid value 'adma' for 'optimizer': expected one of sgd, adam, adamw"),
    ("schedule=linear", "invalid value 'linear' for 'schedule': expected one of constant,"),
    ("dtype=float16", "invalid value 'float16' for 'dtype': expected one of float32, float64"),
    ("init=zeros", "invalid value 'zeros' for 'init': expected one of pytorch, he, glorot"),
])
def test_a_bad_value_is_located_at_its_setting(option: str, expected: str) -> None:
    # The bad setting follows a good one, so its column is 16 on line 2.
    message = error_of(f"train warmup=3 {option}")
    assert message.startswith(f"net.cnn:2:16: error: {expected}"), message
    assert f"    2 | train warmup=3 {option}\n" in message
    assert "      |                " + "^" * len(option) in message


def test_a_misspelt_word_value_gets_a_hint() -> None:
    assert "hint: did you mean 'adam'?" in error_of("train optimizer=adma")


def test_arithmetic_errors_in_values_are_located() -> None:
    assert error_of("train lr=1 / 0").startswith("net.cnn:2:10: error: division by zero")
    assert error_of("train lr=-adam").startswith("net.cnn:2:11: error: 'adam' is not a number")


def test_a_setting_given_twice_on_one_line_names_both_places() -> None:
    message = error_of("train lr=0.1 lr=0.2")
    assert message.startswith("net.cnn:2:14: error: training setting 'lr' is given twice\n")
    assert "  note: first given at net.cnn:2:7" in message


def test_a_setting_given_twice_on_two_lines_names_both_places() -> None:
    message = error_of("train lr=0.1 epochs=3\n\ntrain batch=8\n  train epochs=4")
    assert message.startswith("net.cnn:5:9: error: training setting 'epochs' is given twice\n")
    assert "  note: first given at net.cnn:2:14" in message
    assert "a later 'train' line does not override an earlier one" in message


def test_a_train_line_inside_a_block_is_refused() -> None:
    text = "block b() {\n    train lr=0.1\n    relu\n}\ninput 1x8\nc = b\noutput c\n"
    with pytest.raises(ConvDslError) as caught:
        convdsl.loads(text, "net.cnn")
    message = str(caught.value)
    assert message.startswith("net.cnn:2:5: error: 'train' cannot appear inside a block\n")
    assert "note: in block 'b', called as 'c' at line 6" in message
    assert "hint: move the 'train' line out of the block" in message


def test_a_train_line_needs_a_setting() -> None:
    message = error_of("train  # nothing yet")
    assert message.startswith("net.cnn:2:1: error: a 'train' line needs at least one setting")
    assert "hint: write settings as key=value" in message


@pytest.mark.parametrize(("line", "column", "hint"), [
    ("train 20", 7, "write each setting as key=value, as in 'train epochs=20 lr=0.01'"),
    ("train epochs=20 adam", 21, "expected '='"),
    ("train epochs=20, lr=1", 16, "write each setting as key=value"),
    ("train = conv(6, 3)", 7, "'train' starts a line of training settings, so it cannot "
     "name a layer"),
])
def test_syntax_errors_in_a_train_line(line: str, column: int, hint: str) -> None:
    message = error_of(line)
    assert message.startswith(f"net.cnn:2:{column}: error: unexpected "), message
    assert f"hint: {hint}" in message


# --- the documentation --------------------------------------------------------------


def test_the_documentation_lists_every_setting_with_its_default() -> None:
    text = (ROOT / "docs" / "language.md").read_text("utf-8")
    for field in dataclasses.fields(TrainSettings):
        row = re.search(rf"^\| `{field.name}` \|.*\| `([^`]*)` \|$", text, re.M)
        assert row is not None, field.name
        shown, default = row.group(1), field.default
        if isinstance(default, bool):
            assert shown == ("yes" if default else "no"), field.name
        elif isinstance(default, (int, float)):
            assert float(shown) == default, field.name
        else:
            assert shown == default, field.name


# --- fmt ----------------------------------------------------------------------------


def test_fmt_writes_train_lines_canonically() -> None:
    messy = "train   epochs = 20   lr=1e-3 optimizer=adam#fast\ninput 1x8\nc = relu\noutput c\n"
    canonical = "train epochs=20 lr=1e-3 optimizer=adam  # fast\ninput 1x8\nc = relu\noutput c\n"
    assert format_module(parse(messy)) == canonical
    assert format_module(parse(canonical)) == canonical
    assert convdsl.loads(canonical).training == convdsl.loads(messy).training


def test_fmt_keeps_train_lines_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "net.cnn"
    path.write_text(NETWORK.format("train  schedule=cosine   min_lr=1e-5 warmup=2"), "utf-8")
    assert main(["fmt", str(path)]) == 0
    assert "\ntrain schedule=cosine min_lr=1e-5 warmup=2\n" in path.read_text("utf-8")
    assert main(["fmt", "--check", str(path)]) == 0


_words = st.sampled_from([*training.CONVERTERS, "adam", "yes", "cosine", "train", "output"])
_values: st.SearchStrategy[Any] = st.one_of(
    st.integers(0, 10**6).map(ast.Int),
    st.floats(0, 1e6, allow_nan=False).map(lambda f: ast.Float(f, repr(f))),
    _words.map(ast.Word),
    st.builds(ast.BinOp, st.just("/"), st.integers(0, 9).map(ast.Int),
              st.integers(1, 9).map(ast.Int)),
)
_train_statements = st.builds(
    ast.TrainStmt, st.lists(st.builds(ast.Arg, _words, _values), max_size=4).map(tuple))


@settings(max_examples=200, deadline=None)
@given(st.lists(_train_statements, min_size=1, max_size=4))
def test_format_then_parse_gives_the_same_train_lines(statements: list[ast.TrainStmt]) -> None:
    module = ast.Module(tuple(ast.Line(statement) for statement in statements))
    text = format_module(module)
    assert parse(text) == module
    assert format_module(parse(text)) == text
