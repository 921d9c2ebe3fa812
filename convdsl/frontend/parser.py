"""Text to syntax tree: the lark grammar, a small post-lexer, and friendly errors."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import lark
from lark import Token, Transformer, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)

from convdsl.errors import ConvDslError, Source, Span
from convdsl.frontend import syntax as ast

GRAMMAR_FILE = "convdsl.lark"
MAX_NESTING = 64  # brackets deeper than this are refused before they reach the parser
# Deeper syntax trees (long sums, runs of '-', nested ifs) would exhaust Python's
# stack in the recursive passes that follow; real networks stay far below this.
MAX_TREE_DEPTH = 100
MAX_DIGITS = 30  # longer literals are never sizes, and int() refuses very long ones
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

    always_accept = ("_NL", "COMMENT")

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        open_brackets: list[Token] = []
        previous: Token | None = None
        comments: list[Token] = []  # held until the statement ends
        for token in stream:
            if token.type == "_NL" and (open_brackets or (previous and previous.value == "->")):
                continue
            if token.type == "COMMENT":
                comments.append(token)
                continue
            if token.type == "_NL" and comments:
                yield _merge_comments(comments)
                comments = []
            _track_brackets(token, open_brackets)
            previous = token
            yield token
        if open_brackets:
            opener = open_brackets[-1]
            raise _BracketError(opener, f"'{opener.value}' is never closed",
                                f"add the matching '{_OPENERS[opener.value]}'")


def _merge_comments(comments: list[Token]) -> Token:
    """Comments written inside a multi-line statement, as one comment at its end."""
    if len(comments) == 1:
        return comments[0]
    text = "  ".join(str(c).rstrip() for c in comments)
    return Token.new_borrow_pos("COMMENT", text, comments[0])


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
        return ast.Int(_whole(children[0], self.source), self._span(meta))

    def number(self, meta: Any, children: list[Token]) -> ast.Float:
        return ast.Float(_real(children[0], self.source), str(children[0]), self._span(meta))

    def dims(self, meta: Any, children: list[Token]) -> ast.Dims:
        return ast.Dims(_sizes(children[0], self.source), self._span(meta))

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
        out: list[ast.Arg] = []
        for child in children:
            if child is None:
                continue
            if isinstance(child, ast.Arg):
                out.append(child)
                continue
            argument = ast.Arg(None, child, getattr(child, "span", None))
            if out and out[-1].key is not None:
                raise ConvDslError.single(
                    "a positional value cannot follow a named option", argument.span,
                    hint=f"put it before '{out[-1].key}=', or name it too")
            out.append(argument)
        return tuple(out)

    def call_args(self, meta: Any, children: list[Any]) -> tuple[ast.Arg, ...]:
        return children[0] or ()

    def call(self, meta: Any, children: list[Any]) -> ast.Call:
        name, args = children
        return ast.Call(str(name), args or (), args is not None, self._span(meta))

    def element(self, meta: Any, children: list[Any]) -> ast.Element:
        return ast.Element(children[0], children[1], self._span(meta))

    def chain(self, meta: Any, children: list[ast.Element]) -> tuple[ast.Element, ...]:
        return tuple(children)

    # statements
    def network_stmt(self, meta: Any, children: list[Token]) -> ast.NetworkStmt:
        return ast.NetworkStmt(str(children[0]), self._span(meta))

    def shape(self, meta: Any, children: list[Token]) -> tuple[int, ...]:
        return _sizes(children[0], self.source)

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

    def train_stmt(self, meta: Any, children: list[ast.Arg]) -> ast.TrainStmt:
        return ast.TrainStmt(tuple(children), self._span(meta))

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


def _whole(token: Token, source: Source, text: str | None = None) -> int:
    """A whole-number literal; absurdly long ones are refused before int() sees them."""
    text = str(token) if text is None else text
    if len(text.lstrip("0")) > MAX_DIGITS:
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise ConvDslError.single(f"number too large: {shown}", _token_span(token, source),
                                  hint=f"numbers have at most {MAX_DIGITS} digits")
    return int(text)


def _sizes(token: Token, source: Source) -> tuple[int, ...]:
    return tuple(_whole(token, source, part) for part in str(token).split("x"))


def _real(token: Token, source: Source) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise ConvDslError.single(f"number too large: {token}", _token_span(token, source))
    mantissa = str(token).lower().split("e")[0]
    if value == 0 and any(digit in "123456789" for digit in mantissa):
        raise ConvDslError.single(f"number too small: {token} rounds to 0",
                                  _token_span(token, source))
    return value


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


# Human names for the grammar's terminals, for "expected ..." messages; they are
# listed in this order, keywords after the values. Comments are never what a
# user is missing, so they are not listed.
_TERMINAL_NAMES = {
    "NAME": "a name",
    "INT": "a whole number",
    "FLOAT": "a number",
    "DIMS": "sizes such as 3x3",
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
    "_NL": "end of line",
    "$END": "end of file",
}
_VALUE_STARTS = {"NAME", "INT", "FLOAT", "DIMS", "LSQB"}
_CLOSER_OF = {"(": ")", "[": "]", "{": "}"}
_OPENER_OF = {")": "(", "]": "[", "}": "{"}
_BRACKET_OR_COMMENT = re.compile(r"[()\[\]{}]|#[^\n]*")
_KEY_BEFORE_EQUALS = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)[ \t\f\r]*=$")
_TRAIN_LINE = re.compile(r"[ \t\f\r]*train(?![A-Za-z0-9_])")


def _describe_expected(names: set[str], inside_brackets: bool = False) -> str:
    """"a name, '(' or end of line" for a set of terminal names."""
    names = set(names) - {"COMMENT"}
    if "FLOAT" in names:
        names.discard("INT")
    if inside_brackets:
        names.discard("_NL")  # newlines inside brackets are skipped, so never expected
    order = list(_TERMINAL_NAMES)
    known = sorted(names & set(order), key=order.index)
    values = [n for n in known if n in _VALUE_STARTS - {"LSQB"}]
    ends = [n for n in known if n in ("_NL", "$END")]
    marks = [n for n in known if n not in values and n not in ends]
    keywords = sorted(_anonymous_terminal(n) for n in names - set(order))  # also '->'
    items = [*(_TERMINAL_NAMES[n] for n in values), *keywords,
             *(_TERMINAL_NAMES[n] for n in marks + ends)]
    items = [item for item in dict.fromkeys(items) if item]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


@functools.cache
def _terminal_patterns() -> dict[str, str]:
    return {t.name: t.pattern.value for t in _parser().terminals}


def _anonymous_terminal(name: str) -> str:
    pattern = _terminal_patterns().get(name)
    return f"'{pattern}'" if isinstance(pattern, str) and pattern.isprintable() else ""


def _token_text(token: Token) -> str:
    if token.type == "_NL":
        return "end of line"
    if token.type == "$END":
        return "end of file"
    value = str(token.value)
    return f"'{value}'" if len(value) <= 30 else f"'{value[:27]}...'"


def _position(text: str, offset: int) -> tuple[int, int]:
    """1-based line and column of an offset, counted as lark counts them."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _offset_span(source: Source, offset: int, length: int = 1) -> Span:
    line, column = _position(source.text, offset)
    return Span(source, line, column, line, column + length)


def _scan_brackets(text: str, end: int) -> tuple[list[int], int | None]:
    """Offsets of the brackets open at `end`, and of the first closer before `end`
    that does not close the innermost open bracket (None when all fit)."""
    open_at: list[int] = []
    for match in _BRACKET_OR_COMMENT.finditer(text, 0, end):
        char = match.group()
        if char in _CLOSER_OF:
            open_at.append(match.start())
        elif char in _OPENER_OF:
            if not open_at or text[open_at[-1]] != _OPENER_OF[char]:
                return open_at, match.start()
            open_at.pop()
    return open_at, None


def _unclosed(source: Source, offset: int, notes: tuple[str, ...] = (),
              hint: str | None = None) -> ConvDslError:
    char = source.text[offset]
    return ConvDslError.single(f"'{char}' is never closed", _offset_span(source, offset),
                               hint=hint or f"add the matching '{_CLOSER_OF[char]}'",
                               notes=notes)


def _bad_closer(source: Source, open_at: list[int], offset: int) -> ConvDslError:
    """An error for a closing bracket that closes nothing, or the wrong bracket."""
    text, char = source.text, source.text[offset]
    if not open_at:
        return ConvDslError.single(f"unmatched '{char}'", _offset_span(source, offset),
                                   hint=f"remove it, or add the '{_OPENER_OF[char]}' it closes")
    inner = open_at[-1]
    line, column = _position(text, offset)
    if _OPENER_OF[char] in (text[i] for i in open_at):
        # It closes an outer bracket, so the inner one was left open.
        return _unclosed(source, inner, hint=f"add '{_CLOSER_OF[text[inner]]}' before the "
                         f"'{char}' at line {line}, column {column}")
    inner_line, inner_column = _position(text, inner)
    return ConvDslError.single(
        f"'{char}' does not match the '{text[inner]}' at line {inner_line}, column "
        f"{inner_column}", _offset_span(source, offset),
        hint=f"write '{_CLOSER_OF[text[inner]]}' here")


def _last_statement_line(source: Source, before: int) -> int:
    """The last line before `before` that holds more than a comment."""
    for number in range(before - 1, 0, -1):
        if source.line(number).split("#", 1)[0].strip():
            return number
    return max(1, before - 1)


def _syntax_error(exc: UnexpectedInput, source: Source) -> ConvDslError:
    text = source.text
    line = max(1, exc.line if exc.line and exc.line > 0 else 1)
    column = max(1, exc.column if exc.column and exc.column > 0 else 1)
    span = Span(source, line, column, line, column + 1)
    parser = getattr(exc, "interactive_parser", None)
    accepts: set[str] = set(parser.accepts()) if parser is not None else set()
    if isinstance(exc, UnexpectedCharacters):
        position = exc.pos_in_stream or 0
        char = text[position] if position < len(text) else "?"
        open_at, _ = _scan_brackets(text, position)
        hint: str | None
        if char.isalpha():
            hint = "names use the letters a-z and A-Z, digits and '_'"
        elif text.startswith("//", position):
            hint = "comments start with '#'"
        else:
            expected = _describe_expected(accepts, _in_brackets(text, open_at))
            hint = f"expected {expected}" if expected else None
        return ConvDslError.single(f"unexpected character {char!r}", span, hint=hint)
    if not isinstance(exc, UnexpectedToken):
        return ConvDslError.single("unexpected end of file", span)
    token = exc.token
    accepts = accepts or set(exc.expected)
    at_end = token.type == "$END"
    start = len(text) if at_end or token.start_pos is None else token.start_pos
    if not at_end and token.line is not None and token.end_column is not None:
        span = _token_span(token, source)
    open_at, bad = _scan_brackets(text, start + (len(token) if not at_end else 0))
    if bad is not None:
        return _bad_closer(source, open_at, bad)
    if at_end and open_at:
        return _unclosed(source, open_at[-1])
    starts_line = not text[text.rfind("\n", 0, start) + 1:start].strip()
    if (open_at and text[open_at[-1]] in "([" and starts_line and not at_end
            and _position(text, open_at[-1])[0] < line):
        # A bracket left open on an earlier line swallowed the newlines since.
        closer = _CLOSER_OF[text[open_at[-1]]]
        previous = _last_statement_line(source, line)
        hint = f"add '{closer}' at the end of line {previous}"
        if "COMMA" in accepts:
            hint += f", or a ',' there if line {line} continues it"
        return _unclosed(source, open_at[-1], hint=hint, notes=(
            f"it is still open where line {line} starts with {_token_text(token)}",))
    before = text[:start].rstrip(" \t\f\r")
    key = _KEY_BEFORE_EQUALS.search(before)
    if key is not None and accepts and accepts <= _VALUE_STARTS | {"LPAR", "MINUS"}:
        key_span = _offset_span(source, key.start(), key.end() - key.start())
        if accepts == {"NAME"}:
            usage = f"write a layer, as in {key.group(1)} = conv(16, 3)"
            if token.type in ("_NL", "COMMENT"):
                return ConvDslError.single(f"missing layer after '{key.group(1)} ='",
                                           key_span, hint=usage)
            return ConvDslError.single(
                f"expected a layer after '{key.group(1)} =', not {_token_text(token)}", span,
                hint=usage)
        return ConvDslError.single(
            f"missing value after '{key.group(1)}='", key_span,
            hint="a value is a number (2, 0.5), sizes (3x3), a word (same, relu) "
            "or a list ([1 2 1])")
    if "BLOCK" in accepts:
        return ConvDslError.single(
            f"a line cannot start with {_token_text(token)}", span,
            hint="a line starts with a layer name (c1 = conv(6, 5)), a layer type (relu), "
            "input, output, aux, train, block, if or network")
    expected = _describe_expected(accepts, _in_brackets(text, open_at))
    hint = f"expected {expected}" if expected else ""
    if text.startswith("//", start):
        hint = "comments start with '#'"
    elif (token.type != "NAME" and {"NAME", "_NL"} <= accepts and not _in_brackets(text, open_at)
          and _TRAIN_LINE.match(text, text.rfind("\n", 0, start) + 1)):
        hint = ("'train' starts a line of training settings, so it cannot name a layer"
                if token.type == "EQUAL"
                else "write each setting as key=value, as in 'train epochs=20 lr=0.01'")
    elif token.type == "RBRACE" and "_NL" in accepts:
        hint = "put each '}' on a line of its own"
    elif token.type == "SLASH" and "RSQB" in accepts:
        hint = "close the list before dividing it, as in [1 2 1] / 4"
    elif hint and token.type == "NAME" and any(
            _terminal_patterns().get(name) == "->" for name in accepts):
        hint += "; join layers with '->'"
    elif hint and token.type in _VALUE_STARTS and "COMMA" in accepts:
        hint += "; separate arguments with ','"
    return ConvDslError.single(f"unexpected {_token_text(token)}", span, hint=hint or None)


def _in_brackets(text: str, open_at: list[int]) -> bool:
    return any(text[i] in "([" for i in open_at)


def _too_deep(tree: lark.Tree[Token], source: Source) -> ConvDslError | None:
    """An error for a syntax tree deeper than MAX_TREE_DEPTH, found without recursion."""
    stack: list[tuple[lark.Tree[Token], int, Span | None]] = [(tree, 1, None)]
    while stack:
        node, depth, where = stack.pop()
        where = _meta_span(node.meta, source) or where
        if depth > MAX_TREE_DEPTH:
            return ConvDslError.single(
                f"nested too deeply: more than {MAX_TREE_DEPTH} levels of operators, "
                "lists or blocks", where or Span(source, 1, 1, 1, 1),
                hint="split long expressions, or nest fewer 'if' blocks")
        stack.extend((child, depth + 1, where) for child in node.children
                     if isinstance(child, lark.Tree))
    return None


def parse(text: str, filename: str = "<input>") -> ast.Module:
    """Parse .cnn text into a syntax tree, or raise ConvDslError."""
    source = Source(filename, text)
    if "\x00" in text:
        where = _offset_span(source, text.index("\x00"))
        raise ConvDslError.single(
            "this is not a .cnn text file: it holds NUL bytes", where,
            hint="a .cnn file is plain UTF-8 text; was it saved as UTF-16, or is it binary?")
    # A final newline lets every line end the same way; it moves no positions.
    body = text if text.endswith("\n") else text + "\n"
    try:
        tree = _parser().parse(body)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, source) from None
    except _BracketError as exc:
        start = exc.token.start_pos
        if exc.token.value in _CLOSERS and start is not None:
            open_at, bad = _scan_brackets(text, start + 1)
            if bad is not None:
                raise _bad_closer(source, open_at, bad) from None
        raise ConvDslError.single(exc.message, _token_span(exc.token, source), exc.hint) from None
    deep = _too_deep(tree, source)
    if deep is not None:
        raise deep
    try:
        return _ToSyntax(source).transform(tree)
    except VisitError as exc:  # the transformer refused a literal
        if isinstance(exc.orig_exc, ConvDslError):
            raise exc.orig_exc from None
        raise
