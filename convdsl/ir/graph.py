"""The network graph: networkx underneath, typed layers on top.

Each networkx node carries exactly one attribute, `layer`, holding a frozen
`Layer`; edges run from producer to consumer. The order of a layer's inputs
(which matters for concatenation) lives in `Layer.inputs`, not in the edges.
"""

from __future__ import annotations

from collections.abc import Iterator

import networkx as nx

from convdsl.ir.ops import Layer, Op, Output


class Graph:
    def __init__(self, name: str) -> None:
        self.name = name
        self._g: nx.DiGraph = nx.DiGraph()
        self.outputs: list[Output] = []

    def add(self, layer: Layer) -> None:
        self._g.add_node(layer.name, layer=layer)

    def connect(self) -> None:
        """Add an edge for every input of every layer (after all layers exist)."""
        for layer in self.layers():
            for source in layer.inputs:
                self._g.add_edge(source, layer.name)

    def __contains__(self, name: object) -> bool:
        return name in self._g

    def __len__(self) -> int:
        return len(self._g)

    def layer(self, name: str) -> Layer:
        layer: Layer = self._g.nodes[name]["layer"]
        return layer

    def layers(self) -> Iterator[Layer]:
        """Layers in the order they were written."""
        for name in self._g.nodes:
            yield self.layer(name)

    def inputs(self) -> list[Layer]:
        return [layer for layer in self.layers() if layer.op is Op.INPUT]

    def consumers(self, name: str) -> list[str]:
        return list(self._g.successors(name))

    def find_cycle(self) -> list[str] | None:
        try:
            edges = nx.find_cycle(self._g)
        except nx.NetworkXNoCycle:
            return None
        return [source for source, _ in edges]

    def topological_order(self) -> list[Layer]:
        """Layers so that each comes after its inputs, ties broken by source order."""
        position = {name: index for index, name in enumerate(self._g.nodes)}
        order = nx.lexicographical_topological_sort(self._g, key=position.__getitem__)
        return [self.layer(name) for name in order]

    def ancestors(self, name: str) -> set[str]:
        return set(nx.ancestors(self._g, name)) | {name}
