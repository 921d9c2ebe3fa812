"""The graph as Graphviz DOT text, and rendering through `dot` when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from convdsl.errors import ConvDslError
from convdsl.ir.ops import Op
from convdsl.network import Network
from convdsl.passes.shapes import format_shape

RENDERED = {".svg": "svg", ".png": "png", ".pdf": "pdf"}
_COLORS = {Op.INPUT: "#dddddd", Op.CONV: "#a6cee3", Op.FILTER: "#b2df8a",
           Op.DENSE: "#fdbf6f", Op.CONCAT: "#cab2d6", Op.ADD: "#fb9a99"}


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_dot(net: Network) -> str:
    lines = [f"digraph {_quote(net.name)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", '
             'fillcolor="#ffffff"];']
    for layer in net.layers:
        counts = net.counts[layer.name]
        label = f"{layer.name}\n{layer.op.value}  {format_shape(net.shapes[layer.name])}"
        if counts.params:
            label += f"\n{counts.params:,} params"
        attrs = [f"label={_quote(label)}"]
        color = _COLORS.get(layer.op)
        if color:
            attrs.append(f'fillcolor="{color}"')
        if counts.aux:
            attrs.append('style="rounded,filled,dashed"')
        lines.append(f"  {_quote(layer.name)} [{', '.join(attrs)}];")
    for layer in net.layers:
        for source in layer.inputs:
            lines.append(f"  {_quote(source)} -> {_quote(layer.name)};")
    for output in net.outputs:
        sink = f"loss:{output.name}"
        kind = "aux loss" if output.aux else "loss"
        label = f"{kind}: {output.loss.value} x {output.weight:g}"
        lines.append(f"  {_quote(sink)} [shape=ellipse, label={_quote(label)}];")
        lines.append(f"  {_quote(output.name)} -> {_quote(sink)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(net: Network, out: Path) -> str:
    """Write DOT text, or a rendered picture when the suffix asks for one. Returns a message."""
    text = to_dot(net)
    fmt = RENDERED.get(out.suffix.lower())
    if fmt is None:
        out.write_text(text, encoding="utf-8")
        return f"wrote {out} (DOT text)"
    dot = shutil.which("dot")
    if dot is None:
        fallback = out.with_suffix(".dot")
        fallback.write_text(text, encoding="utf-8")
        raise ConvDslError.single(
            f"cannot render {out.name}: Graphviz's 'dot' program is not installed; "
            f"wrote the DOT text to {fallback} instead",
            hint="install Graphviz (apt-get install graphviz, brew install graphviz), or "
            "ask for a .dot file")
    result = subprocess.run([dot, f"-T{fmt}", "-o", str(out)], input=text, text=True,
                            capture_output=True, check=False, timeout=120)
    if result.returncode != 0:
        raise ConvDslError.single(f"Graphviz failed to render {out.name}: "
                                  f"{result.stderr.strip()}")
    return f"wrote {out} ({fmt.upper()}, rendered by Graphviz)"
