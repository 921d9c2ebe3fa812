"""Kernel specifications: everything a generated kernel bakes in, frozen and hashed.

Two layers with the same spec share one kernel, in this process (a memo) and
across processes (the source file named by the hash, and Numba's machine-code
cache next to it). A spec names its template, the element type, the shapes of
every array it touches (batch included) and the options of the template. A template
that reads its sizes at run time renders the same source for specs that differ only in
shapes, and those share one kernel too (codegen/cache.py, `sized=False`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

# Bumped when generated code changes in a way the spec does not show, so that
# stale cached kernels are never reused.
GENERATOR_VERSION = 1

Option = int | float | str | bool | tuple[Any, ...] | None


@dataclass(frozen=True)
class KernelSpec:
    template: str
    dtype: str  # "float32" or "float64"
    shapes: tuple[tuple[int, ...], ...]
    options: tuple[tuple[str, Option], ...] = ()

    @staticmethod
    def make(template: str, dtype: str, shapes: tuple[tuple[int, ...], ...],
             **options: Option) -> KernelSpec:
        return KernelSpec(template, dtype, tuple(tuple(s) for s in shapes),
                          tuple(sorted(options.items())))

    def option(self, name: str) -> Any:
        for key, value in self.options:
            if key == name:
                return value
        raise KeyError(f"kernel spec {self.template} has no option {name!r}")

    def unsized(self) -> KernelSpec:
        """The spec without its shapes: what the source of a template that reads its
        sizes at run time depends on (codegen/cache.py)."""
        return KernelSpec(self.template, self.dtype, (), self.options)

    def canonical(self) -> str:
        """A stable text form: the same spec always gives the same text."""
        return json.dumps({"version": GENERATOR_VERSION, "template": self.template,
                           "dtype": self.dtype, "shapes": self.shapes,
                           "options": self.options}, sort_keys=True)

    @property
    def key(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:24]
