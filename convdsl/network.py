"""The checked network: the front end's result, and the Python API to get one.

    >>> net = convdsl.loads("input 1x28x28\\nconv(6, 5)\\nflatten\\nfc = dense(10)\\noutput fc")
    >>> net.params
    36070
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convdsl.errors import ConvDslError, Diagnostic, Source, Span
from convdsl.frontend.parser import parse
from convdsl.frontend.syntax import Module
from convdsl.ir.build import build_graph
from convdsl.ir.graph import Graph
from convdsl.ir.ops import Layer, Output
from convdsl.passes.counts import BYTES_PER_VALUE, LayerCounts, count_layers
from convdsl.passes.shapes import Shape, Window, infer_shapes

MAX_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Network:
    name: str
    source: Source
    module: Module
    graph: Graph
    shapes: dict[str, Shape]
    windows: dict[str, Window]
    counts: dict[str, LayerCounts]
    warnings: tuple[Diagnostic, ...]
    # The settings the file's `train` lines give, checked and converted; the
    # defaults are not filled in (convdsl.ir.training.resolve does that).
    training: dict[str, Any] = field(default_factory=dict)

    # --- the layers -------------------------------------------------------

    @property
    def layers(self) -> list[Layer]:
        """Every layer, each after its inputs."""
        return self.graph.topological_order()

    @property
    def outputs(self) -> list[Output]:
        return self.graph.outputs

    @property
    def input_shapes(self) -> dict[str, Shape]:
        return {layer.name: self.shapes[layer.name] for layer in self.graph.inputs()}

    @property
    def input_shape(self) -> Shape:
        return next(iter(self.input_shapes.values()))

    @property
    def output_shape(self) -> Shape:
        main = next(output for output in self.outputs if not output.aux)
        return self.shapes[main.name]

    # --- totals -----------------------------------------------------------

    def _total(self, field: str, with_aux: bool = True) -> int:
        return sum(getattr(c, field) for c in self.counts.values() if with_aux or not c.aux)

    @property
    def params(self) -> int:
        return self._total("params")

    @property
    def params_without_aux(self) -> int:
        return self._total("params", with_aux=False)

    @property
    def buffers(self) -> int:
        return self._total("buffers")

    @property
    def buffers_without_aux(self) -> int:
        return self._total("buffers", with_aux=False)

    @property
    def fixed(self) -> int:
        return self._total("fixed")

    @property
    def macs(self) -> int:
        return self._total("macs")

    @property
    def macs_without_aux(self) -> int:
        return self._total("macs", with_aux=False)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def units(self) -> int:
        """Output elements of all layers except the inputs."""
        inputs = {layer.name for layer in self.graph.inputs()}
        return sum(c.units for name, c in self.counts.items() if name not in inputs)

    @property
    def activation_bytes(self) -> int:
        """Memory for every layer's output, one example, float32."""
        return BYTES_PER_VALUE * self.units

    @property
    def input_bytes(self) -> int:
        return BYTES_PER_VALUE * sum(math.prod(s) for s in self.input_shapes.values())

    @property
    def param_bytes(self) -> int:
        """Memory for parameters, buffers and fixed weights, float32."""
        return BYTES_PER_VALUE * (self.params + self.buffers + self.fixed)

    def to_dict(self) -> dict[str, Any]:
        """Everything `convdsl summary --json` prints."""
        return {
            "name": self.name,
            "inputs": {name: list(shape) for name, shape in self.input_shapes.items()},
            "outputs": [{"name": o.name, "loss": o.loss.value, "weight": o.weight,
                         "aux": o.aux, "shape": list(self.shapes[o.name])}
                        for o in self.outputs],
            "training": dict(self.training),
            "params": self.params,
            "params_without_aux": self.params_without_aux,
            "buffers": self.buffers,
            "buffers_without_aux": self.buffers_without_aux,
            "fixed": self.fixed,
            "macs": self.macs,
            "macs_without_aux": self.macs_without_aux,
            "flops": self.flops,
            "units": self.units,
            "activation_bytes": self.activation_bytes,
            "param_bytes": self.param_bytes,
            "layers": [self._layer_dict(layer) for layer in self.layers],
        }

    def _layer_dict(self, layer: Layer) -> dict[str, Any]:
        counts = self.counts[layer.name]
        return {
            "name": layer.name,
            "op": layer.op.value,
            "inputs": list(layer.inputs),
            "output_shape": list(self.shapes[layer.name]),
            "params": counts.params,
            "buffers": counts.buffers,
            "fixed": counts.fixed,
            "units": counts.units,
            "macs": counts.macs,
            "flops": counts.flops,
            "receptive_field": list(counts.receptive_field.size),
            "jump": list(counts.receptive_field.jump),
            "activation_bytes": counts.activation_bytes,
            "aux": counts.aux,
        }



def loads(text: str, filename: str = "<string>") -> Network:
    """Parse, build and check a network written as text; raise ConvDslError if it is wrong."""
    source = Source(filename, text)
    module = parse(text, filename)
    built = build_graph(module, source)
    shapes, windows = infer_shapes(built.graph)
    counts = count_layers(built.graph, shapes, windows)
    return Network(built.graph.name, source, module, built.graph, shapes, windows, counts,
                   tuple(built.warnings), dict(built.training))


def read_source(path: str | Path) -> str:
    """A .cnn file's text, or a clear error for a missing, huge or binary file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConvDslError.single(f"'{path}' is a folder, not a .cnn file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConvDslError.single(f"'{path}' is larger than {MAX_FILE_BYTES} bytes; "
                                      "is it really a .cnn file?")
        data = path.read_bytes()
    except OSError as exc:
        raise ConvDslError.single(f"cannot read '{path}': {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> ConvDslError:
    """Point at the first byte that is not UTF-8, quoting the line it is on."""
    before = data[:exc.start].decode("utf-8-sig", errors="replace")
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    source = Source(str(path), data.decode("utf-8-sig", errors="replace"))
    return ConvDslError.single(
        f"this file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
        Span(source, line, column, line, column + 1),
        hint="a .cnn file is plain text; save it as UTF-8")


def load(path: str | Path) -> Network:
    """Load and check a .cnn file."""
    return loads(read_source(path), str(path))



__all__ = ["Network", "load", "loads", "read_source"]
