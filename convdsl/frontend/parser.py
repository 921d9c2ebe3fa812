"""Text to syntax tree: the lark grammar, a small post-lexer, and friendly errors."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from convdsl.errors import ConvDslError, Source, Span
from convdsl.frontend import syntax as ast

GRAMMAR_FILE = "convdsl.lark"
MAX_NESTING = 64  # brackets deeper than this are refused before they reach the parser
_OPENERS = {"(": ")", "[": "]"}
_CLOSERS = {")": "(", "]": "["}


def grammar_text() -> str:
    """The grammar, from the installed package or, in a source tree, from grammars/."""
    try:
        return resources.files("convdsl.grammars").joinpath(GRAMMAR_FILE).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        here = Path(__file__).resolve().parents[2] / "grammars" / GRAMMAR_FILE
        return here.read_text("utf-8")


class _BracketError(Exception):
    def __init__(self, token: Token, message: str, hint: str | None) -> None:
        super().__init__(message)
        self.token, self.message, self.hint = token, message, hint


class _LineJoiner:
    """Drops newlines inside ( ) and [ ] and after "->", so statements can span lines.

    It also checks that brackets balance, which lets it report the opening
    bracket of an unclosed pair instead of a puzzling error further down.
    """

    always_accept = ("_NL",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        open_brackets: list[Token] = []
        previous: Token | None = None
        for token in stream:
            if token.type == "_NL" and (open_brackets or (previous and previous.value == "->")):
                continue
            if token.type != "COMMENT":
                _track_brackets(token, open_brackets)
            previous = token
            yield token
        if open_brackets:
            opener = open_brackets[-1]
            raise _BracketError(opener, f"'{opener.value}' is never closed",
                                f"add the matching '{_OPENERS[opener.value]}'")


def _track_brackets(token: Token, open_brackets: list[Token]) -> None:
    if token.value in _OPENERS:
        open_brackets.append(token)
        if len(open_brackets) > MAX_NESTING:
            raise _BracketError(token, f"brackets nested more than {MAX_NESTING} deep", None)
    elif token.value in _CLOSERS:
        if not open_brackets or open_brackets[-1].value != _CLOSERS[token.value]:
            raise _BracketError(token, f"unmatched '{token.value}'",
                                "remove it, or add the opening bracket it closes")
        open_brackets.pop()


@functools.cache
def _parser() -> lark.Lark:
    return lark.Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_LineJoiner(),
        propagate_positions=True,
        maybe_placeholders=True,
    )


def _token_span(token: Token, source: Source) -> Span:
    line = token.line or 1
    column = token.column or 1
    return Span(source, line, column, token.end_line or line, token.end_column or column + 1)


def _meta_span(meta: Any, source: Source) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(source, meta.line, meta.column, meta.end_line, meta.end_column)


@v_args(meta=True)
class _ToSyntax(Transformer[Token, ast.Module]):
    """Lark parse tree to frozen syntax dataclasses, keeping spans."""

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source

    def _span(self, meta: Any) -> Span | None:
        return _meta_span(meta, self.source)

    def _tspan(self, token: Token) -> Span:
        return _token_span(token, self.source)

    # values
    def integer(self, meta: Any, children: list[Token]) -> ast.Int:
        return ast.Int(int(children[0]), self._span(meta))

    def number(self, meta: Any, children: list[Token]) -> ast.Float:
        return ast.Float(float(children[0]), str(children[0]), self._span(meta))

    def dims(self, meta: Any, children: list[Token]) -> ast.Dims:
        return ast.Dims(tuple(int(v) for v in str(children[0]).split("x")), self._span(meta))

    def word(self, meta: Any, children: list[Token]) -> ast.Word:
        return ast.Word(str(children[0]), self._span(meta))

    def neg(self, meta: Any, children: list[ast.Value]) -> ast.Neg:
        return ast.Neg(children[0], self._span(meta))

    def _binop(self, op: str, meta: Any, children: list[ast.Value]) -> ast.BinOp:
        return ast.BinOp(op, children[0], children[1], self._span(meta))

    def add(self, meta: Any, children: list[ast.Value]) -> ast.BinOp:
        return self._binop("+", meta, children)

    def sub(self, meta: Any, children: list[ast.Value]) -> ast.BinOp:
        return self._binop("-", meta, children)

    def mul(self, meta: Any, children: list[ast.Value]) -> ast.BinOp:
        return self._binop("*", meta, children)

    def div(self, meta: Any, children: list[ast.Value]) -> ast.BinOp:
        return self._binop("/", meta, children)

    def list_value(self, meta: Any, children: list[Any]) -> ast.ListValue:
        return ast.ListValue(tuple(c for c in children if c is not None), None, self._span(meta))

    def scaled_list(self, meta: Any, children: list[Any]) -> ast.ListValue:
        inner, scale = children
        if inner.scale is not None:
            scale = ast.BinOp("*", inner.scale, scale, self._span(meta))
        return ast.ListValue(inner.items, scale, self._span(meta))

    # calls and chains
    def keyword_arg(self, meta: Any, children: list[Any]) -> ast.Arg:
        return ast.Arg(str(children[0]), children[1], self._span(meta))

    def args(self, meta: Any, children: list[Any]) -> tuple[ast.Arg, ...]:
        out = []
        for child in children:
            if child is None:
                continue
            if isinstance(child, ast.Arg):
                out.append(child)
            else:
                out.append(ast.Arg(None, child, getattr(child, "span", None)))
        return tuple(out)

    def call(self, meta: Any, children: list[Any]) -> ast.Call:
        name, args = children[0], children[1] if len(children) > 1 else None
        span = self._span(meta)
        parens = span is not None and span.end_column - span.column > len(str(name))
        parens = parens or args is not None
        return ast.Call(str(name), args or (), parens, span)

    def element(self, meta: Any, children: list[Any]) -> ast.Element:
        return ast.Element(children[0], children[1], self._span(meta))

    def chain(self, meta: Any, children: list[ast.Element]) -> tuple[ast.Element, ...]:
        return tuple(children)

    # statements
    def network_stmt(self, meta: Any, children: list[Token]) -> ast.NetworkStmt:
        return ast.NetworkStmt(str(children[0]), self._span(meta))

    def shape(self, meta: Any, children: list[Token]) -> tuple[int, ...]:
        return tuple(int(v) for v in str(children[0]).split("x"))

    def input_stmt(self, meta: Any, children: list[Any]) -> ast.InputStmt:
        name, dims = children
        return ast.InputStmt(str(name) if name is not None else None, dims, self._span(meta))

    def layer_stmt(self, meta: Any, children: list[Any]) -> ast.LayerStmt:
        name, chain = children
        name_span = self._tspan(name) if name is not None else None
        return ast.LayerStmt(str(name) if name is not None else None, chain,
                             self._span(meta), name_span)

    def option(self, meta: Any, children: list[Any]) -> ast.Arg:
        return ast.Arg(str(children[0]), children[1], self._span(meta))

    def output_kind(self, meta: Any, children: list[Token]) -> bool:
        return str(children[0]) == "aux"

    def output_stmt(self, meta: Any, children: list[Any]) -> ast.OutputStmt:
        aux, name, *options = children
        return ast.OutputStmt(aux, str(name), tuple(options), self._span(meta), self._tspan(name))

    def param(self, meta: Any, children: list[Any]) -> ast.Param:
        return ast.Param(str(children[0]), children[1], self._span(meta))

    def params(self, meta: Any, children: list[Any]) -> tuple[ast.Param, ...]:
        return tuple(c for c in children if c is not None)

    def body(self, meta: Any, children: list[ast.Line]) -> tuple[ast.Line, ...]:
        return _tidy(children)

    def block_def(self, meta: Any, children: list[Any]) -> ast.BlockDef:
        name, params, body = children
        return ast.BlockDef(str(name), params or (), body, self._span(meta))

    def if_stmt(self, meta: Any, children: list[Any]) -> ast.IfStmt:
        condition, then, otherwise = children
        return ast.IfStmt(str(condition), then, otherwise, self._span(meta),
                          self._tspan(condition))

    def line(self, meta: Any, children: list[Any]) -> ast.Line:
        statement, comment = children
        text = str(comment)[1:].strip() if comment is not None else None
        return ast.Line(statement, text)

    def start(self, meta: Any, children: list[ast.Line]) -> ast.Module:
        return ast.Module(_tidy(children))


def _tidy(lines: list[ast.Line]) -> tuple[ast.Line, ...]:
    """Blank lines carry layout only: collapse runs and trim both ends."""
    out: list[ast.Line] = []
    for line in lines:
        blank = line.statement is None and line.comment is None
        if blank and (not out or out[-1] == ast.Line()):
            continue
        out.append(line)
    while out and out[-1] == ast.Line():
        out.pop()
    return tuple(out)


# Human names for the grammar's terminals, for "expected ..." messages.
_TERMINAL_NAMES = {
    "NAME": "a name",
    "INT": "a whole number",
    "FLOAT": "a number",
    "DIMS": "sizes such as 3x3",
    "_NL": "end of line",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "COMMA": "','",
    "EQUAL": "'='",
    "COLON": "':'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "COMMENT": "a comment",
    "$END": "end of file",
}


def _describe_expected(names: set[str]) -> str:
    described = set()
    for name in names:
        if name in _TERMINAL_NAMES:
            described.add(_TERMINAL_NAMES[name])
        elif name.startswith("__ANON") or name.isupper():
            described.add(_anonymous_terminal(name))
    described.discard("")
    return ", ".join(sorted(described))


@functools.cache
def _terminal_patterns() -> dict[str, str]:
    return {t.name: t.pattern.value for t in _parser().terminals}


def _anonymous_terminal(name: str) -> str:
    pattern = _terminal_patterns().get(name)
    return f"'{pattern}'" if isinstance(pattern, str) and pattern.isprintable() else name.lower()


def _token_text(token: Token) -> str:
    if token.type == "_NL":
        return "end of line"
    if token.type == "$END":
        return "end of file"
    return f"'{token.value}'"


def _syntax_error(exc: UnexpectedInput, source: Source) -> ConvDslError:
    line = max(1, exc.line if exc.line and exc.line > 0 else 1)
    column = max(1, exc.column if exc.column and exc.column > 0 else 1)
    span = Span(source, line, column, line, column + 1)
    if isinstance(exc, UnexpectedCharacters):
        position = exc.pos_in_stream or 0
        char = source.text[position] if position < len(source.text) else "?"
        return ConvDslError.single(
            f"unexpected character {char!r}",
            span,
            hint="names use letters, digits and '_'; comments start with '#'",
        )
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.line is not None and token.end_column is not None:
            span = _token_span(token, source)
        expected = _describe_expected(set(exc.expected))
        return ConvDslError.single(
            f"unexpected {_token_text(token)}",
            span,
            hint=f"expected {expected}" if expected else None,
        )
    assert isinstance(exc, UnexpectedEOF)
    return ConvDslError.single("unexpected end of file", span)


def parse(text: str, filename: str = "<input>") -> ast.Module:
    """Parse .cnn text into a syntax tree, or raise ConvDslError."""
    source = Source(filename, text)
    if "\x00" in text:
        raise ConvDslError.single("this is not a .cnn text file (it holds NUL bytes)",
                                  Span(source, 1, 1, 1, 1))
    # A final newline lets every line end the same way; it moves no positions.
    body = text if text.endswith("\n") else text + "\n"
    try:
        tree = _parser().parse(body)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    except _BracketError as exc:
        raise ConvDslError.single(exc.message, _token_span(exc.token, source), exc.hint) from None
    return _ToSyntax(source).transform(tree)
