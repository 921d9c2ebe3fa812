"""Fuzzing the front end: whatever text arrives, `convdsl.loads` either returns a
network or raises ConvDslError, quickly, with a message free of parser internals.

Inputs are random text built from the language's own characters and words, and
random mutations of the zoo files (networks/*.cnn) and of a few seeds below that
use blocks, conditions and merges. To search harder than the default run does:

    CONVDSL_FUZZ_EXAMPLES=20000 pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl import ConvDslError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("CONVDSL_FUZZ_EXAMPLES", "300"))
# A hang guard, not a speed test: every input here loads in well under 0.1 s on an idle
# machine, and a parser that backtracks exponentially takes minutes. A loaded CI
# machine once took 1.2 s for the 2,000-layer chain, so the bound leaves a wide margin.
TIME_LIMIT_S = 10.0

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,  # timing is checked below, per call, with a fixed limit
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=os.environ.get("CONVDSL_FUZZ_RANDOM") is None,
    database=None,
)

# Seeds beyond the zoo, so that mutations reach blocks, conditions and merges.
SEEDS = [
    """\
network tiny_resnet
block basic(c, down=no) {
  if down {
    a = conv(c, 3, stride=2, pad=1, bias=no) -> bn(act=relu)
    short = input -> conv(c, 1, stride=2, bias=no) -> bn
  } else {
    a = conv(c, 3, pad=same, bias=no) -> bn(act=relu)
    short = input -> identity
  }
  b = a -> conv(c, 3, pad=same, bias=no) -> bn
  add(b, short, act=relu)
}
input image: 3x32x32
stem = conv(16, 3, pad=1) -> bn(act=relu)
layer1 = basic(16) * 2
layer2 = basic(32, down=yes) -> basic(32)
pool = global_avgpool -> flatten
fc = dense(10)
output fc loss=cross_entropy
""",
    """\
input signal: 1x128
left = conv(8, 5, pad=same, act=leaky_relu) -> maxpool(2, round=ceil)
right = signal -> conv(8, 3, stride=2, pad=[1 0], dilation=1)
both = concat(left, right) -> dropout(0.25)
smooth = filter(3, kernel=[1 2 1] / 4, pad=1)
head = flatten -> dense(32, act=tanh) -> dense(4, act=softmax)
side = both -> global_maxpool -> dense(2)
output head loss=mse weight=0.5
aux side loss=cross_entropy weight=0.3
""",
    """\
input 1x16x16
edges = filter(3x3, kernel=[[-1 0 1] [-2 0 2] [-1 0 1]] / 8, mode=convolution)
  -> avgpool(2, pad=1, count_pad=no)
  -> softpool(3, stride=1)
  -> conv(4, 1, groups=1, algo=gemm) * 3
fc = flatten -> dense((2 + 3) * 2, bias=false) -> elu(1.0) -> relu6 -> sigmoid
output fc loss=none
""",
]


def _corpus() -> list[str]:
    zoo = [path.read_text("utf-8") for path in sorted((ROOT / "networks").glob("*.cnn"))]
    return zoo + SEEDS


CORPUS = _corpus()

# Lark terminal names and other internals that must never reach a user.
INTERNAL = re.compile(r"__ANON|\b_NL\b|\$END|\b[LR](PAR|SQB|BRACE)\b|Traceback|convdsl\.\w+\.")


def check(text: str) -> None:
    """The property: success or ConvDslError, in time, with clean messages."""
    elapsed = _load(text)
    if elapsed >= TIME_LIMIT_S:
        # A busy machine can stall any call once; a slow input is slow every time.
        elapsed = min(elapsed, _load(text))
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.2f} s"


def _load(text: str) -> float:
    start = time.perf_counter()
    try:
        network = convdsl.loads(text, "fuzz.cnn")
    except ConvDslError as exc:
        rendered = [diagnostic.render() for diagnostic in exc.diagnostics]
        assert rendered, "ConvDslError without diagnostics"
    else:
        rendered = [warning.render() for warning in network.warnings]
    elapsed = time.perf_counter() - start
    for message in rendered:
        assert not INTERNAL.search(message), message
    return elapsed


# --- (a) random text ---------------------------------------------------------

KEYWORDS = [
    "input", "output", "aux", "block", "if", "else", "network", "conv", "filter", "maxpool",
    "avgpool", "softpool", "global_avgpool", "global_maxpool", "relu", "leaky_relu", "softmax",
    "identity", "bn", "dropout", "flatten", "dense", "add", "concat", "pad", "stride", "same",
    "valid", "full", "act", "kernel", "groups", "round", "ceil", "loss", "weight", "mse",
    "cross_entropy", "none", "yes", "no", "relu_1", "x", "a", "b", "c", "c1", "e",
]
PUNCTUATION = ["(", ")", "[", "]", "{", "}", "=", ",", "->", "-", ">", "*", "/", "+", "#",
               ":", "x", ".", "1e400", "0", "-1", "99999999999", "3x3", "1x28x28", "0.5"]
SEPARATORS = ["", " ", " ", "\n", "\r\n", "\t", "\r", "  ", "\n  ", "\n->"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz_0123456789()[]{}=,->*/#:x. \n\r\t+éß€\x00\ufeff"

random_chars = st.text(alphabet=ALPHABET, max_size=200)
random_tokens = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(PUNCTUATION),
                  st.integers(-3, 2**40).map(str)),
        st.sampled_from(SEPARATORS),
    ),
    max_size=80,
).map(lambda pairs: "".join(token + separator for token, separator in pairs))


@FUZZ_SETTINGS
@given(st.one_of(random_chars, random_tokens))
def test_random_text(text: str) -> None:
    check(text)


@FUZZ_SETTINGS
@given(random_tokens)
def test_random_tokens_after_a_valid_prefix(text: str) -> None:
    check("input image: 1x28x28\nc1 = conv(6, 5, pad=2, act=relu)\n" + text + "\noutput c1\n")


# --- (b) mutations of real networks -----------------------------------------

NUMBER = re.compile(r"\d+(\.\d+)?")
HUGE = ["0", "-1", "99999999999", "1e400", str(10**30), "4294967297", "0.0"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        text = draw(_mutation(text))
    return text


def _mutation(text: str) -> st.SearchStrategy[str]:
    lines = text.split("\n")
    n, size = len(lines), max(len(text), 1)
    line_index = st.integers(0, max(n - 1, 0))
    position = st.integers(0, size)
    snippet = st.one_of(st.sampled_from(KEYWORDS + PUNCTUATION + SEPARATORS),
                        st.text(alphabet=ALPHABET, min_size=1, max_size=4))
    numbers = list(NUMBER.finditer(text))

    def join(new_lines: list[str]) -> str:
        return "\n".join(new_lines)

    options: list[st.SearchStrategy[str]] = [
        line_index.map(lambda i: join(lines[:i] + lines[i + 1:])),  # delete a line
        line_index.map(lambda i: join(lines[:i + 1] + lines[i:])),  # duplicate a line
        st.tuples(line_index, line_index).map(  # swap two lines
            lambda ij: join(_swapped(lines, *ij))),
        position.map(lambda p: text[:p] + text[p + 1:]),  # delete a character
        st.tuples(position, snippet).map(lambda ps: text[:ps[0]] + ps[1] + text[ps[0]:]),
        st.tuples(position, snippet).map(lambda ps: text[:ps[0]] + ps[1] + text[ps[0] + 1:]),
        position.map(lambda p: text[:p]),  # truncate
        st.tuples(position, position).map(  # delete a range
            lambda ab: text[:min(ab)] + text[max(ab):]),
    ]
    if numbers:
        options.append(st.tuples(st.sampled_from(numbers), st.sampled_from(HUGE)).map(
            lambda mv: text[:mv[0].start()] + mv[1] + text[mv[0].end():]))
    return st.one_of(options)


def _swapped(lines: list[str], i: int, j: int) -> list[str]:
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


@FUZZ_SETTINGS
@given(mutated())
def test_mutated_networks(text: str) -> None:
    check(text)


@FUZZ_SETTINGS
@given(st.sampled_from(CORPUS), st.sampled_from(["\r\n", "\r", "\t", "\x0c", "\u2028"]))
def test_odd_line_endings_and_whitespace(text: str, odd: str) -> None:
    check(text.replace("\n", odd) if odd in ("\r\n", "\r") else text.replace("  ", odd))


# --- pathological shapes that random search rarely builds -------------------

PATHOLOGICAL = [
    "input 1x8\nc = relu * " + "-" * 3000 + "1\noutput c\n",
    "input 1x8\nc = relu * " + "1+" * 3000 + "1\noutput c\n",
    "input 1x8\nc = leaky_relu(" + "(" * 500 + "1" + ")" * 500 + ")\noutput c\n",
    "input 1x8\nc = filter(1, kernel=" + "[" * 500 + "1" + "]" * 500 + ")\noutput c\n",
    "input 1x8\nc = conv(" + "9" * 5000 + ", 3)\noutput c\n",
    "input 1x8\nc = conv(6, 3, pad=" + "9" * 40 + ")\noutput c\n",
    "input 1x" + "9" * 30 + "\nc = conv(6, 3)\noutput c\n",
    "input 1x8x8\nc = dropout(1e400)\noutput c weight=1e400\n",
    "input 1x8x8\nc = leaky_relu(1 / 1e-320) -> filter(1, kernel=[1] / 1e-320)\noutput c\n",
    "block b() {\n relu * 1000\n}\nblock a() {\n b * 1000\n}\ninput 1x8\nc = a * 1000\noutput c\n",
    "block a(n) {\n if n {\n a(n) \n }\n}\ninput 1x8\nc = a(1)\noutput c\n",
    "input 1x8\n" + "relu\n" * 3000 + "output relu_3000\n",
    "input 1x8\nrelu_1 = relu\nrelu\nrelu_2 = relu_1 -> relu\noutput relu_2\n",
    "block b(if) {\n if if {\n relu\n }\n}\ninput 1x8\nc = b(yes)\noutput c\n",
    "input 1x8\n" + "if" + " c {" * 200 + "\n",
    "input 1x8\nc = relu\n" + "}" * 50 + "\n",
    "\ufeffinput 1x8\nc = relu\noutput c\n",
    "input 1x8\nç = relu\noutput ç\n",
    "input 1x8\r\nc = relu\r\noutput c",
    "input 1x8\n" + "c = relu\n" + "  # comment\n" * 1000 + "output c",
    "\x00\x01\x02",
    "",
    "\n\n\n",
    "input 1x8\nc = " + " -> ".join(["relu"] * 2000) + "\noutput c\n",
]


def test_pathological_inputs() -> None:
    for text in PATHOLOGICAL:
        check(text)
