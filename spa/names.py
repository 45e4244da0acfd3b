"""Fresh names for what spa adds to a model: nodes, values and initializers.

ONNX wants node names unique among nodes and value names unique among values, across the main
graph and its subgraphs. Names built from a user's name ("{node}_bias") collide when the user left
names empty (onnx.helper's default) or already used the built one, so every name spa creates comes
from one Names: it collects every name in the model once, and hands out a base itself or, where
that is taken, the base with the first free numeric suffix. Nodes and values share one namespace:
a generated name is then unique against both.
"""

from __future__ import annotations

import onnx_ir as ir


class Names:
    def __init__(self, model: ir.Model):
        self._taken: set[str] = set()
        self._suffix: dict[str, int] = {}  # per base, the last suffix tried: n copies cost O(n)
        for graph in (model.graph, *model.functions.values()):
            self._collect_graph(graph)
            for node in ir.traversal.RecursiveGraphIterator(graph, enter_graph=self._collect_graph):
                self._taken.add(node.name or "")
                self._collect_values((*node.inputs, *node.outputs))
        self._taken.discard("")

    def _collect_graph(self, graph) -> None:
        initializers = graph.initializers.values() if isinstance(graph, ir.Graph) else ()
        self._collect_values((*graph.inputs, *graph.outputs, *initializers))

    def _collect_values(self, values) -> None:
        self._taken.update(v.name for v in values if v is not None and v.name)

    def fresh(self, base: str) -> str:
        """`base` if no node or value has that name yet, else `base_1`, `base_2`, ...; reserved."""
        name, n = base, self._suffix.get(base, 0)
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._suffix[base] = n
        self._taken.add(name)
        return name
