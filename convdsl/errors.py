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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum


@dataclass(frozen=True)
class Source:
    """The text of one input file, kept so that errors can quote it."""

    name: str
    text: str

    def line(self, number: int) -> str:
        lines = self.text.splitlines()
        if 1 <= number <= len(lines):
            return lines[number - 1]
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


def _quote(span: Span | None) -> list[str]:
    """The offending source line with a caret under the offending text."""
    if span is None or span.source is None:
        return []
    text = span.source.line(span.line).expandtabs(1)
    if not text.strip():
        return []
    width = 1
    if span.end_line == span.line and span.end_column > span.column:
        width = span.end_column - span.column
    width = max(1, min(width, len(text) - span.column + 1))
    gutter = f"{span.line:5d}"
    return [
        f"{gutter} | {text.rstrip()}",
        f"{' ' * len(gutter)} | {' ' * (span.column - 1)}{'^' * width}",
    ]


class ConvDslError(Exception):
    """One or more errors in a user's network; the only exception users see."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.render() for d in self.diagnostics))

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
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


def known_list(kind: str, choices: Iterable[str]) -> str:
    return f"known {kind}: " + ", ".join(sorted(set(choices)))
