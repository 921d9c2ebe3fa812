"""A small writer for generated Python: lines, indented blocks and nested loops."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

INDENT = "    "


class Code:
    def __init__(self) -> None:
        self._lines: list[str] = []
        self._depth = 0

    def line(self, text: str = "") -> None:
        self._lines.append(INDENT * self._depth + text if text else "")

    def lines(self, texts: Sequence[str]) -> None:
        for text in texts:
            self.line(text)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        """`header:` followed by an indented body."""
        self.line(header + ":")
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    @contextmanager
    def loops(self, ranges: Sequence[tuple[str, str]]) -> Iterator[None]:
        """Nested `for name in range_expression:` loops, outermost first."""
        for name, extent in ranges:
            self.line(f"for {name} in {extent}:")
            self._depth += 1
        try:
            yield
        finally:
            self._depth -= len(ranges)

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def index(names: Sequence[str]) -> str:
    """`a, b, c` for subscripts: x[index(...)]."""
    return ", ".join(names)


JIT = "@numba.njit(cache=True, parallel={parallel}, fastmath=False, nogil=True)"


def jit(parallel: bool = True) -> str:
    """The decorator every generated kernel carries."""
    return JIT.format(parallel=parallel)


PRELUDE = "import math\n\nimport numba\nimport numpy as np\nfrom numba import prange\n\n"
