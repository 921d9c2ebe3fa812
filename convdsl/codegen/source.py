"""A small writer for generated Python (lines, indented blocks and nested loops), and
the decorator of generated CPU kernels with its choice of threads."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from convdsl.errors import RunError

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
    """The decorator every generated kernel carries. A kernel whose loops may run on
    threads (`prange`) reads its module's PARALLEL, which `parallel_line` sets from the
    kernel's work; `parallel=False` is for helpers that never should."""
    return JIT.format(parallel="PARALLEL" if parallel else "False")


# --- threads only where they pay --------------------------------------------------------

THREADS_VARIABLE = "CONVDSL_THREADS_FROM"
# The least work, in multiply-adds, at which a kernel's prange loops run on Numba's
# threads. Below it they run as plain loops on the calling thread: waking the pool costs
# more than the threads save there, and Numba compiles such a kernel two to three times
# faster, since lowering the parallel loops is most of a kernel's compile time.
THREADS_FROM = 1 << 16
# Kernels that mostly move values (activations, pooling, batch norm, im2col and the
# transforms) count this many values as one multiply-add: their loops wait on memory,
# which threads share, so threads pay only at a larger size. Alone they paid from about
# eight times the size, but after a kernel on threads (a pooling fused behind its
# convolution) the pool is awake and they pay sooner. Both constants were chosen with
# bench/kernel_threads.py and whole networks: docs/kernels.md ("Threads").
VALUES_PER_MAC = 4


def threads_from() -> int:
    """THREADS_FROM, or the work CONVDSL_THREADS_FROM asks for (0: every kernel on
    threads, as the parallel-kernel tests use it)."""
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return THREADS_FROM
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise RunError(f"{THREADS_VARIABLE}={text!r} is not a whole number of "
                       "multiply-adds",
                       f"set it to 0 to run every kernel on threads, or unset it for "
                       f"the default, {THREADS_FROM}")
    return value


def parallel_line(work: int, sized: bool = True) -> str:
    """The generated module's PARALLEL: whether its kernels' prange loops use threads.
    sized=False: a module that serves every size (codegen/cache.py) names neither the
    work nor the threshold, so that all sizes on one side of it share the module."""
    threshold = threads_from()
    if not sized:
        side = "at or above" if work >= threshold else "below"
        return f"PARALLEL = {work >= threshold}  # work {side} the threshold of threads\n"
    return f"PARALLEL = {work >= threshold}  # work {work}, threads from {threshold}\n"


def describe_threads() -> str:
    """Which kernels run on threads, for reports."""
    return f"kernels of {threads_from():,} multiply-adds or more on threads ({THREADS_VARIABLE})"


PRELUDE = "import math\n\nimport numba\nimport numpy as np\nfrom numba import prange\n\n"
