"""The syntax tree of a .cnn file: frozen dataclasses that remember their spans.

Spans never take part in equality, so two trees that say the same thing in
different layouts compare equal (the printer's round-trip property relies on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from convdsl.errors import Span


def _span() -> Span | None:
    """A span field: kept for error messages, ignored by equality and repr."""
    span: Span | None = field(default=None, compare=False, repr=False)
    return span


# --- values -----------------------------------------------------------------


@dataclass(frozen=True)
class Int:
    value: int
    span: Span | None = _span()


@dataclass(frozen=True)
class Float:
    value: float
    text: str  # as written, so that the printer keeps "1e-5" rather than "1e-05"
    span: Span | None = _span()


@dataclass(frozen=True)
class Dims:
    """A size per spatial dimension, written 3x3 or 3x224x224."""

    values: tuple[int, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Word:
    """A bare identifier: a keyword value (relu, same), a block parameter or a layer."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Neg:
    operand: Value
    span: Span | None = _span()


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * /
    left: Value
    right: Value
    span: Span | None = _span()


@dataclass(frozen=True)
class ListValue:
    """A bracketed list such as a fixed kernel, optionally divided by a scale."""

    items: tuple[Value, ...]
    scale: Value | None = None
    span: Span | None = _span()


Value = Int | Float | Dims | Word | Neg | BinOp | ListValue


# --- statements -------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """A call argument: positional when `key` is None, else `key=value`."""

    key: str | None
    value: Value
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    """A layer or block call. `parens` records `relu` versus `relu()`."""

    op: str
    args: tuple[Arg, ...] = ()
    parens: bool = False
    span: Span | None = _span()


@dataclass(frozen=True)
class Element:
    """One link of a chain, optionally repeated (`basic(64) * 2`)."""

    call: Call
    repeat: Value | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class NetworkStmt:
    name: str
    span: Span | None = _span()


@dataclass(frozen=True)
class InputStmt:
    name: str | None
    dims: tuple[int, ...]  # channels first, then 1 to 3 spatial sizes
    span: Span | None = _span()


@dataclass(frozen=True)
class LayerStmt:
    name: str | None
    chain: tuple[Element, ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class OutputStmt:
    aux: bool
    name: str
    options: tuple[Arg, ...] = ()
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class TrainStmt:
    """Training settings (`train epochs=20 lr=0.01`), checked when the network is built."""

    options: tuple[Arg, ...] = ()
    span: Span | None = _span()


@dataclass(frozen=True)
class Param:
    name: str
    default: Value | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class BlockDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Line, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class IfStmt:
    condition: str
    then: tuple[Line, ...]
    otherwise: tuple[Line, ...] | None = None
    span: Span | None = _span()
    condition_span: Span | None = _span()


Statement = NetworkStmt | InputStmt | LayerStmt | OutputStmt | TrainStmt | BlockDef | IfStmt


@dataclass(frozen=True)
class Line:
    """A source line: a statement, a comment, both, or neither (a blank line)."""

    statement: Statement | None = None
    comment: str | None = None


@dataclass(frozen=True)
class Module:
    lines: tuple[Line, ...]

    @property
    def statements(self) -> tuple[Statement, ...]:
        return statements_of(self.lines)


def statements_of(lines: tuple[Line, ...]) -> tuple[Statement, ...]:
    return tuple(line.statement for line in lines if line.statement is not None)
