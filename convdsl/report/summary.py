"""The `convdsl summary` table, in the style of Keras's summary() and torchinfo."""

from __future__ import annotations

from typing import Any

from convdsl.network import Network
from convdsl.passes.memory import MemoryPlan, plan_memory
from convdsl.passes.shapes import format_shape

_COLUMNS = ("Layer (type)", "Output shape", "Params", "MACs", "Receptive field")
_MAX_NAME = 40


def summary_table(net: Network, batch: int = 1, dtype: str = "float32") -> str:
    """The table; its footer ends with the memory plan for `batch` examples of `dtype`."""
    plans = _plans(net, batch, dtype)  # first, so that a bad batch or dtype prints nothing
    rows = [_row(net, layer.name) for layer in net.layers]
    widths = [max(len(column), *(len(row[i]) for row in rows))
              for i, column in enumerate(_COLUMNS)]
    width = sum(widths) + 2 * (len(widths) - 1)
    lines = [f"Network: {net.name}", "=" * width, _join(_COLUMNS, widths), "=" * width]
    lines.extend(_join(row, widths) for row in rows)
    lines.append("=" * width)
    lines.extend(_footer(net))
    lines.append("-" * 20)
    lines.extend(_memory_lines(plans))
    lines.append("=" * width)
    return "\n".join(lines)


def summary_dict(net: Network, batch: int = 1, dtype: str = "float32") -> dict[str, Any]:
    """What `convdsl summary --json` prints: the network's figures and the memory plan."""
    plans = _plans(net, batch, dtype)
    return {**net.to_dict(), "memory": {"batch": batch, "dtype": dtype,
                                        **{mode: plan.to_dict() for mode, plan in plans.items()}}}


def _plans(net: Network, batch: int, dtype: str) -> dict[str, MemoryPlan]:
    return {mode: plan_memory(net, batch, dtype, training=mode == "training")
            for mode in ("inference", "training")}


def _memory_lines(plans: dict[str, MemoryPlan]) -> list[str]:
    batch, dtype = plans["inference"].batch, plans["inference"].dtype
    lines = [f"Memory plan (batch {batch}, {dtype}; buffers shared by values "
             "whose lifetimes do not overlap):"]
    for mode, plan in plans.items():
        lines.append(f"  {mode.capitalize()} peak (MB): {_mb(plan.peak_bytes)}"
                     f" (without reuse: {_mb(plan.unplanned_bytes)};"
                     f" busiest step alone: {_mb(plan.live_bytes)})")
    lines += ["(parameters, and in training their gradients, with no optimizer state;",
              " kernel workspaces not included)"]
    return lines


def _row(net: Network, name: str) -> tuple[str, ...]:
    layer = net.graph.layer(name)
    counts = net.counts[name]
    label = name if len(name) <= _MAX_NAME else "..." + name[-_MAX_NAME + 3:]
    kind = layer.op.value
    if layer.act is not None:
        kind += f"+{layer.act.kind.value}"
    marker = " [aux]" if counts.aux else ""
    field = counts.receptive_field
    receptive = (f"{format_shape(field.size)} / {format_shape(field.jump)}"
                 if field.size else "-")
    return (f"{label} ({kind}){marker}", format_shape(net.shapes[name]),
            f"{counts.params:,}", f"{counts.macs:,}", receptive)


def _join(cells: tuple[str, ...], widths: list[int]) -> str:
    first = cells[0].ljust(widths[0])
    rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
    return "  ".join([first, *rest]).rstrip()


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.2f}"


def _footer(net: Network) -> list[str]:
    lines = [
        f"Trainable params: {net.params:,}",
        f"Non-trainable buffers (batch-norm statistics): {net.buffers:,}",
    ]
    if net.fixed:
        lines.append(f"Fixed weights (never trained): {net.fixed:,}")
    lines.append(f"Total params + buffers: {net.params + net.buffers + net.fixed:,}")
    if net.params != net.params_without_aux:
        lines += [
            f"Params without auxiliary heads: {net.params_without_aux:,}",
            f"Buffers without auxiliary heads: {net.buffers_without_aux:,}",
            f"MACs without auxiliary heads: {net.macs_without_aux:,}"
            f" ({_scaled(net.macs_without_aux)})",
        ]
    input_bytes, param_bytes = net.input_bytes, net.param_bytes
    lines += [
        f"Units (output elements, one example): {net.units:,}",
        f"MACs (multiply-accumulates, one example): {net.macs:,} ({_scaled(net.macs)})",
        f"FLOPs (2 x MACs): {net.flops:,} ({_scaled(net.flops)})",
        "-" * 20,
        f"Input size (MB): {_mb(input_bytes)}",
        f"Forward/backward pass size (MB): {_mb(2 * net.activation_bytes)}",
        f"Params size (MB): {_mb(param_bytes)}",
        f"Estimated total size (MB): {_mb(input_bytes + 2 * net.activation_bytes + param_bytes)}",
        "(one example, float32; the backward pass keeps a gradient per activation)",
    ]
    return lines


def _scaled(count: int) -> str:
    """3 decimals in G, as torchvision tabulates GMACs, or in M for small networks."""
    return f"{count / 1e9:.3f} G" if count >= 10**7 else f"{count / 1e6:.3f} M"
