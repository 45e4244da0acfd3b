"""Bring every exporter's graph to one form before the analysis.

Constants become initializers (paddle2onnx keeps weights in Constant nodes, some exporters generate
them with ConstantOfShape), constant subgraphs are folded, and shapes are inferred afresh.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from spa.evaluate import run_node

logger = logging.getLogger(__name__)

# Ops whose output is not a function of their inputs: never fold them.
_NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli"}
# Folding must not blow a small generator into a huge constant that no consumer needs as data.
_MAX_FOLDED_BYTES = 1 << 30


def normalize(model: ir.Model) -> ir.Model:
    """Normalize in place and return the model."""
    if model.ir_version < 4:
        # IR < 4 lists initializers among the graph inputs. They are weights, not inputs.
        common_passes.RemoveInitializersFromInputsPass()(model)
        model.ir_version = 4
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.TopologicalSortPass()(model)
    infer_shapes(model)
    fold_constants(model)
    common_passes.RemoveUnusedNodesPass()(model)
    infer_shapes(model)
    return model


def opset_version(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def fold_constants(model: ir.Model) -> int:
    """Replace every default-domain node whose inputs are all constant by initializers.

    `Shape` of a tensor whose shape is fully static folds too: that turns the Shape/Gather/Concat
    chains some exporters write in front of Reshape into plain shape constants.
    """
    opset = opset_version(model)
    graph = model.graph
    folded = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC:
            continue
        if any(isinstance(a.value, (ir.Graph, list)) and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            continue
        if any(out.is_graph_output() for out in node.outputs):
            continue
        values = _static_shape(node) if node.op_type == "Shape" else _constant_inputs(node)
        if values is None:
            continue
        try:
            results = values if node.op_type == "Shape" else run_node(node, values, opset)
        except Exception as e:  # the reference evaluator lacks a few ops; leave those nodes alone
            logger.debug("not folding %s (%s): %s", node.name, node.op_type, e)
            continue
        if sum(r.nbytes for r in results) > _MAX_FOLDED_BYTES:
            continue
        for out, array in zip(node.outputs, results):
            if not out.name or not out.uses():
                continue
            const = ir.Value(name=out.name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), const_value=ir.tensor(array, name=out.name))
            out.replace_all_uses_with(const)
            out.name = None
            graph.register_initializer(const)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def _constant_inputs(node: ir.Node) -> list[np.ndarray | None] | None:
    arrays = []
    for value in node.inputs:
        if value is None:
            arrays.append(None)
        elif value.const_value is not None and value.is_initializer() and not value.is_graph_input():
            arrays.append(value.const_value.numpy())
        else:
            return None
    return arrays


def _static_shape(node: ir.Node) -> list[np.ndarray] | None:
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    dims = list(shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return [np.array(dims[slice(start, end)], dtype=np.int64)]


def infer_shapes(model: ir.Model) -> None:
    """Forget every intermediate shape, then infer them again.

    Stale shapes make onnxruntime refuse a pruned model, and constant folding could trust them.
    Inference is partial where an op has no shape function; the analysis treats unknown shapes as
    barriers.
    """
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.shape = None
    common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
