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


def concat_lines(net: CompiledNetwork) -> list[str]:
    """Per concatenation that branches write into: which do, and which it copies
    (after a forward; see CompiledNetwork.written_in_place)."""
    in_place = net.written_in_place()
    lines = []
    for concat in dict.fromkeys(write.concat for write in net.concat_writes.values()):
        planned = [stage for stage, write in net.concat_writes.items()
                   if write.concat == concat]
        declined = [stage for stage in planned if stage not in in_place]
        line = f"{concat} <- {', '.join(stage for stage in planned if stage in in_place)}"
        lines.append(line + (f" (copies {', '.join(declined)})" if declined else ""))
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
