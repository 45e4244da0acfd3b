"""Export small graph neural networks (torch_geometric) to ONNX with both torch exporters.

Writes, for each model NAME in (gcn, sage), into ``--out`` (default ``models/graph``):

* ``{NAME}_dynamo.onnx`` (+ ``.onnx.data``) -- ``torch.onnx.export(..., dynamo=True)``, opset 18;
* ``{NAME}_legacy.onnx`` -- ``torch.onnx.export(..., dynamo=False)``, opset 17, weights inline.

Both take ``x`` float32 (nodes, 16) and ``edge_index`` int64 (2, edges), both dims dynamic, and
return ``out`` (nodes, 7): two message-passing layers, GCNConv(16, 32) / SAGEConv(16, 32), ReLU,
then a second one to 7 classes. Messages are gathered by run-time indices (Gather) and summed into
the nodes by ScatterElements over buffers the exporters size at run time (ConstantOfShape, Expand),
which is what spa has to follow to prune the 32 hidden channels. Each export is checked with the
full checker and against torch in onnxruntime on a graph of 10 nodes and 40 edges.

GATConv is not exported: its attention softmax subtracts a minimum taken over every head at once
(ReduceMin over all axes), so removing a head could change the other heads' values; spa keeps
them (measured: nothing to prune). Its dynamo export fails in torch.export.

    pip install torch==2.13.0 onnxscript torch_geometric
    python scripts/export_graph_models.py [--out models/graph]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from export_check import difference  # a sibling script
from torch import nn
from torch_geometric.nn import GCNConv, SAGEConv

NODES, EDGES, FEATURES, HIDDEN, CLASSES = 10, 40, 16, 32, 7


class TwoLayers(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.first, self.second = layer(FEATURES, HIDDEN), layer(HIDDEN, CLASSES)

    def forward(self, x, edge_index):
        return self.second(torch.relu(self.first(x, edge_index)), edge_index)


MODELS = {"gcn": GCNConv, "sage": SAGEConv}


def export(name: str, out: Path) -> None:
    torch.manual_seed(0)
    model = TwoLayers(MODELS[name]).eval()
    x = torch.randn(NODES, FEATURES)
    edge_index = torch.randint(0, NODES, (2, EDGES))
    for dynamo in (True, False):
        path = out / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
        if dynamo:
            nodes, edges = torch.export.Dim("nodes"), torch.export.Dim("edges")
            options = {"dynamic_shapes": ({0: nodes}, {1: edges}), "opset_version": 18}
        else:
            axes = {"x": {0: "nodes"}, "edge_index": {1: "edges"}, "out": {0: "nodes"}}
            options = {"dynamic_axes": axes, "opset_version": 17}
        torch.onnx.export(
            model,
            (x, edge_index),
            str(path),
            input_names=["x", "edge_index"],
            output_names=["out"],
            dynamo=dynamo,
            **options,
        )
        x2 = torch.randn(NODES + 3, FEATURES)
        e2 = torch.randint(0, NODES + 3, (2, EDGES + 5))
        with torch.no_grad():
            want = model(x2, e2).numpy()
        error = difference(path, {"x": x2.numpy(), "edge_index": e2.numpy()}, [want])
        assert error < 1e-4, f"{path.name}: onnxruntime differs from torch by {error}"
        print(f"{path}: ok (max abs difference to torch {error:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("models/graph"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    for name in MODELS:
        export(name, args.out)


if __name__ == "__main__":
    main()
