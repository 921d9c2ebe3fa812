"""What `convdsl compile` prints and writes: the kernel plan, dumps and emitted source."""

from __future__ import annotations

import shutil
from pathlib import Path

from convdsl.codegen import cache
from convdsl.runtime.executor import CompiledNetwork

DUMPS = ("ast", "graph", "plan", "source")


def plan_lines(net: CompiledNetwork) -> list[str]:
    """One line per layer: op, algorithm and why, kernels, and first-run seconds."""
    rows = [("layer", "op", "algorithm", "kernels", "first run", "why")]
    for report in net.report():
        rows.append((report.layer, report.op, report.algorithm, str(len(report.kernels)),
                     f"{report.seconds:.2f} s", report.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:5], widths)]
        lines.append("  ".join([*cells, row[5]]).rstrip())
    return lines


def kernel_sources(net: CompiledNetwork) -> dict[str, Path]:
    """Every distinct kernel's source file in the cache, by file name."""
    files: dict[str, Path] = {}
    for kernel in net.kernels.values():
        for spec in kernel.specs:
            path = cache.source_path(spec)
            files[path.name] = path
    return files


def emit(net: CompiledNetwork, directory: Path) -> list[Path]:
    """Copy the generated source into `directory`, with an index of which layer uses which."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, path in kernel_sources(net).items():
        target = directory / file_name
        shutil.copyfile(path, target)
        written.append(target)
    index = directory / "kernels.txt"
    lines = [f"{name}: {' '.join(cache.source_path(spec).name for spec in kernel.specs)}"
             for name, kernel in net.kernels.items()]
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [*written, index]
