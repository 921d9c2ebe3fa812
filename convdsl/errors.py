"""Located, typed diagnostics: every mistake a user can make ends up here.

A diagnostic knows where it happened (a `Span`), what went wrong, and how to
fix it. It renders in the compiler style users know from gcc and rustc:

    net.cnn:4:7: error: unknown layer type 'cnov'
        4 | c1 = cnov(6, 5)
          |      ^^^^
      hint: did you mean 'conv'?
"""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum


@dataclass(frozen=True)
class Source:
    """The text of one input file, kept so that errors can quote it."""

    name: str
    text: str

    def line(self, number: int) -> str:
        # Only "\n" ends a line, as in the grammar; str.splitlines would also split
        # at form feeds and other separators and so quote the wrong line.
        lines = self.text.split("\n")
        if 1 <= number <= len(lines):
            return lines[number - 1].removesuffix("\r")
        return ""


@dataclass(frozen=True)
class Span:
    """A region of a source file: 1-based line and column, end exclusive."""

    source: Source | None
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def file(self) -> str:
        return self.source.name if self.source else "<input>"


class Severity(Enum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Diagnostic:
    severity: Severity
    message: str
    span: Span | None = None
    hint: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def render(self) -> str:
        where = "convdsl"
        if self.span is not None:
            where = f"{self.span.file}:{self.span.line}:{self.span.column}"
        lines = [f"{where}: {self.severity.value}: {self.message}"]
        lines.extend(_quote(self.span))
        lines.extend(f"  note: {note}" for note in self.notes)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


QUOTE_WIDTH = 100  # characters of a source line shown at most


def _quote(span: Span | None) -> list[str]:
    """The offending source line with a caret under the offending text.

    Columns count characters, as the parser does; the quote shows tabs as four
    spaces and wide characters as two cells, and the caret follows suit.
    """
    if span is None or span.source is None:
        return []
    text = span.source.line(span.line)
    if not text.strip() or "\x00" in text:
        return []
    end = span.column + 1
    if span.end_line == span.line and span.end_column > span.column:
        end = span.end_column
    elif span.end_line > span.line:
        end = len(text.rstrip()) + 1  # underline the first line of a longer span
    end = max(span.column + 1, min(end, len(text) + 1))
    # A very long line is cut to a window around the caret, marked with "...".
    first = max(0, min(span.column - 1 - QUOTE_WIDTH // 3, len(text) - QUOTE_WIDTH))
    last = first + QUOTE_WIDTH
    lead = "..." if first > 0 else ""
    shown, _ = _display(text[first:last])
    _, before = _display(text[first:span.column - 1])
    _, under = _display(text[first:min(end - 1, last)])
    gutter = f"{span.line:5d}"
    return [
        f"{gutter} | {lead}{shown.rstrip()}{'...' if last < len(text.rstrip()) else ''}",
        f"{' ' * len(gutter)} | {' ' * (len(lead) + before)}{'^' * max(1, under - before)}",
    ]


def _display(text: str) -> tuple[str, int]:
    """Text as a terminal shows it, and the number of cells it takes there."""
    shown: list[str] = []
    width = 0
    for char in text:
        if char == "\t":
            shown.append(" " * (4 - width % 4))
            width += 4 - width % 4
        elif not char.isprintable():
            shown.append(" ")  # a stray carriage return or form feed would garble the line
            width += 1
        else:
            shown.append(char)
            width += 2 if unicodedata.east_asian_width(char) in "WF" else 1
    return "".join(shown), width


class ConvDslError(Exception):
    """One or more errors in a user's network; the only exception users see."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

    def with_note(self, note: str) -> ConvDslError:
        """The same errors, each with one more note (such as the block call it came from)."""
        return ConvDslError([replace(d, notes=(*d.notes, note)) for d in self.diagnostics])

    @classmethod
    def single(
        cls,
        message: str,
        span: Span | None = None,
        hint: str | None = None,
        notes: Iterable[str] = (),
    ) -> ConvDslError:
        return cls([Diagnostic(Severity.ERROR, message, span, hint, tuple(notes))])


def error(message: str, span: Span | None = None, hint: str | None = None,
          notes: Iterable[str] = ()) -> Diagnostic:
    return Diagnostic(Severity.ERROR, message, span, hint, tuple(notes))


def warning(message: str, span: Span | None = None, hint: str | None = None) -> Diagnostic:
    return Diagnostic(Severity.WARNING, message, span, hint)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest known word, if any is close enough."""
    close = difflib.get_close_matches(word, sorted(set(choices) - {word}), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def known_list(kind: str, choices: Iterable[str]) -> str:
    return f"known {kind}: " + ", ".join(sorted(set(choices)))


class RunError(ValueError):
    """A mistake in how a compiled network is called (an array of the wrong shape, a
    checkpoint for another network): a message and a hint, never a kernel traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")
        self.message = message
        self.hint = hint
