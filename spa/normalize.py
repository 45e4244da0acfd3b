"""Bring every exporter's graph to one form before the analysis.

Constants become initializers (paddle2onnx keeps weights in Constant nodes, some exporters generate
them with ConstantOfShape), vectors an exporter merged because they were equal are copied apart,
constant subgraphs are folded, and shapes are inferred afresh. Each step is an onnx-ir pass;
`normalize` runs them in order.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from spa.evaluate import run_node
from spa.graph import constant, is_default_domain, opset_version
from spa.names import Names

logger = logging.getLogger(__name__)

# Ops whose output is not a function of their inputs: never fold them.
_NONDETERMINISTIC = {
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
}
# Folding must not blow a small generator into a huge constant that no consumer needs as data.
_MAX_FOLDED_BYTES = 1 << 30
_MAX_FOLD_ROUNDS = 8


class _Step(ir.passes.InPlacePass):
    """A normalize step as an onnx-ir pass: `change` edits the model and says how many changes it
    made; steps that can make shapes static (a folded Shape, a cast constant) infer them again."""

    reinfer = False

    def change(self, model: ir.Model) -> int:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        changed = self.change(model)
        if changed and self.reinfer:
            infer_shapes(model)
        return ir.passes.PassResult(model, modified=bool(changed))


class InitializersOutOfInputs(_Step):
    def change(self, model: ir.Model) -> int:
        """IR < 4 lists initializers among the graph inputs. They are weights, not inputs."""
        if model.ir_version >= 4:
            return 0
        common_passes.RemoveInitializersFromInputsPass()(model)
        model.ir_version = 4
        return 1


class InferShapes(_Step):
    def change(self, model: ir.Model) -> int:
        infer_shapes(model)
        return 1


def normalize(model: ir.Model) -> ir.Model:
    """Normalize in place and return the model."""
    ir.passes.Sequential(
        InitializersOutOfInputs(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        SplitSharedVectors(),
        common_passes.TopologicalSortPass(),
        InferShapes(),
        PushCastsIntoConcats(),
        # Folding a Shape computation can make later shapes static, which lets more fold.
        ir.passes.PassManager([FoldConstants()], steps=_MAX_FOLD_ROUNDS, early_stop=True),
        DropZeroInitialStates(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)
    return model


_INTEGERS = {ir.DataType.INT32, ir.DataType.INT64}


class SplitSharedVectors(_Step):
    def change(self, model: ir.Model) -> int:
        """Give every use of a float vector initializer its own copy. The dynamo exporter merges
        equal constants: the all-zero biases of a freshly initialized model became one tensor read
        by every layer, which tied their channels together (DeiT: 64 channels prunable instead of
        132). A copy computes the same; weights shared in earnest (ALBERT's layers) stay tied by
        their matrices."""
        split = 0
        names = Names(model)
        for value in list(model.graph.initializers.values()):
            uses = list(value.uses())
            if (
                len(uses) < 2
                or value.const_value is None
                or len(value.const_value.shape) != 1
                or value.dtype is None
                or not value.dtype.is_floating_point()
            ):
                continue
            # a default the caller may override
            if value.is_graph_input() or value.is_graph_output():
                continue
            for node, index in uses[1:]:
                name = names.fresh(value.name)
                copy = ir.Value(
                    name=name,
                    shape=value.shape,
                    type=value.type,
                    const_value=ir.tensor(value.const_value.numpy().copy(), name=name),
                )
                model.graph.register_initializer(copy)
                node.replace_input_with(index, copy)
                split += 1
        return split


class PushCastsIntoConcats(_Step):
    reinfer = True

    def change(self, model: ir.Model) -> int:
        """Cast(Concat(pieces)) -> Concat(Cast(piece), ...) for integer vectors. Exporters that
        build shapes in int32 (tf2onnx) cast the finished vector to int64 for Reshape; cast piece
        by piece, the constant pieces fold and the surgery can rewrite the channel counts they
        spell."""
        graph = model.graph
        names = Names(model)
        pushed = 0
        for node in list(graph):
            concat = (
                node.inputs[0].producer()
                if node.op_type == "Cast" and node.inputs and node.inputs[0] is not None
                else None
            )
            if (
                concat is None
                or concat.op_type != "Concat"
                or not is_default_domain(node)
                or not is_default_domain(concat)
            ):
                continue
            out, vector = node.outputs[0], node.inputs[0]
            if (
                out.is_graph_output()
                or vector.type is None
                or vector.type.dtype not in _INTEGERS
                or vector.shape is None
                or len(vector.shape) != 1
            ):
                continue
            to = ir.DataType(node.attributes.get_int("to"))
            if to not in _INTEGERS:
                continue
            base = node.name or node.op_type
            casts = [
                ir.node("Cast", [piece], attributes={"to": to}, name=names.fresh(f"{base}_{i}"))
                for i, piece in enumerate(concat.inputs)
            ]
            joined = ir.node(
                "Concat",
                [c.outputs[0] for c in casts],
                attributes={"axis": 0},
                name=names.fresh(f"{base}_concat"),
            )
            for i, c in enumerate(casts):
                c.outputs[0].name, c.outputs[0].type = (
                    names.fresh(f"{out.name}_{i}"),
                    ir.TensorType(to),
                )
            joined.outputs[0].name, joined.outputs[0].type, joined.outputs[0].shape = (
                names.fresh(f"{out.name}_pieces"),
                ir.TensorType(to),
                out.shape,
            )
            graph.insert_before(node, [*casts, joined])
            out.replace_all_uses_with(joined.outputs[0])
            pushed += 1
        return pushed


# Recurrent ops take initial_h (input 5) and initial_c (input 6); left out, they are zeros.
_RECURRENT_STATES = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
# Ops that keep a tensor all zeros whatever else they do to it.
_ZERO_PRESERVING = {
    "Slice",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Cast",
    "Transpose",
    "Expand",
    "Tile",
    "Concat",
}


class DropZeroInitialStates(_Step):
    def change(self, model: ir.Model) -> int:
        """Exporters build recurrent initial states as zeros at run time (ConstantOfShape or Expand,
        sliced per layer); a zero state is the same as none, and none has no channel count to
        keep."""
        dropped = 0
        for node in model.graph:
            for index in _RECURRENT_STATES.get(node.op_type, ()):
                if (
                    index < len(node.inputs)
                    and node.inputs[index] is not None
                    and _all_zeros(node.inputs[index])
                ):
                    node.replace_input_with(index, None)
                    dropped += 1
        return dropped


def _all_zeros(value: ir.Value) -> bool:
    if value.const_value is not None:
        return not value.const_value.numpy().any()
    producer = value.producer()
    if producer is None:
        return False
    if producer.op_type == "ConstantOfShape":
        fill = producer.attributes.get("value")
        return fill is None or not fill.value.numpy().any()
    if producer.op_type in _ZERO_PRESERVING:
        data = producer.inputs if producer.op_type == "Concat" else producer.inputs[:1]
        return all(_all_zeros(v) for v in data)
    return False


class FoldConstants(_Step):
    reinfer = True

    def change(self, model: ir.Model) -> int:
        """Replace every default-domain node whose inputs are all constant by initializers.

        `Shape` of a tensor whose shape is fully static folds too: that turns the
        Shape/Gather/Concat chains some exporters write in front of Reshape into plain shape
        constants.
        """
        opset = opset_version(model)
        graph = model.graph
        folded = 0
        for node in list(graph):
            if not is_default_domain(node) or node.op_type in _NONDETERMINISTIC:
                continue
            if any(
                isinstance(a.value, (ir.Graph, list))
                and a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                for a in node.attributes.values()
            ):
                continue
            if any(out.is_graph_output() for out in node.outputs):
                continue
            try:
                known = (
                    _static_shape(node)
                    if node.op_type == "Shape"
                    else _picked_static_dims(node, opset)
                )
                values = None if known is not None else _constant_inputs(node)
                if known is None and values is None:
                    continue
                if (
                    node.op_type == "ConstantOfShape"
                    and values
                    and np.prod(values[0]) * 8 > _MAX_FOLDED_BYTES
                ):
                    continue
                results = known if known is not None else run_node(node, values, opset)
            # the reference evaluator lacks a few ops; leave those nodes alone
            except Exception as e:
                logger.debug("not folding %s (%s): %s", node.name, node.op_type, e)
                continue
            if sum(r.nbytes for r in results) > _MAX_FOLDED_BYTES:
                continue
            for out, array in zip(node.outputs, results):
                if not out.name or not out.uses():
                    continue
                const = constant(out.name, array)
                out.replace_all_uses_with(const)
                out.name = None
                graph.register_initializer(const)
            graph.remove(node, safe=True)
            folded += 1
        return folded


def _constant_inputs(node: ir.Node) -> list[np.ndarray | None] | None:
    return _constant_inputs_from(node, 0)


def _constant_inputs_from(node: ir.Node, first: int) -> list[np.ndarray | None] | None:
    arrays = []
    for value in node.inputs[first:]:
        if value is None:
            arrays.append(None)
        elif (
            value.const_value is not None and value.is_initializer() and not value.is_graph_input()
        ):
            arrays.append(value.const_value.numpy())
        else:
            return None
    return arrays


def _static_shape(node: ir.Node) -> list[np.ndarray] | None:
    shape = node.inputs[0].shape
    if shape is None or not all(_static(d) for d in shape):
        return None
    dims = list(shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", len(dims))
    return [np.array(dims[slice(start, end)], dtype=np.int64)]


def _picked_static_dims(node: ir.Node, opset: int) -> list[np.ndarray] | None:
    """Gather or Slice of a Shape that picks only static dims, as in `x.size(1)` under a dynamic
    batch: run the op on the dims' positions and look the picked ones up."""
    if node.op_type not in ("Gather", "Slice") or not node.inputs:
        return None
    source = node.inputs[0].producer()
    if source is None or source.op_type != "Shape" or source.inputs[0].shape is None:
        return None
    others = _constant_inputs_from(node, 1)
    if others is None:
        return None
    dims = list(source.inputs[0].shape)
    dims = dims[
        slice(source.attributes.get_int("start", 0), source.attributes.get_int("end", len(dims)))
    ]
    picked = run_node(node, [np.arange(len(dims), dtype=np.int64), *others], opset)[0]
    values = [dims[int(i)] for i in picked.reshape(-1)]
    if not all(_static(d) for d in values):
        return None
    return [np.array(values, dtype=np.int64).reshape(picked.shape)]


def _static(dim) -> bool:
    return isinstance(dim, int) and dim >= 0  # -1 is some converters' way to say "dynamic"


def infer_shapes(model: ir.Model, keep_signature: bool = True) -> None:
    """Forget every intermediate shape, then infer them again.

    Stale shapes make onnxruntime refuse a pruned model, and constant folding could trust them.
    Inference is partial where an op has no shape function; the analysis treats unknown shapes as
    barriers.
    """
    declared = {}
    for node in model.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                declared[out], out.shape = out.shape, None
    # The signature is the user's contract: inference must not rename or fill symbolic dims.
    signature = (
        [(v, v.shape, v.type) for v in (*model.graph.inputs, *model.graph.outputs)]
        if keep_signature
        else []
    )
    # Some converters write -1 for a dynamic dim; onnx's C++ inference can abort on it (an assertion
    # in a clamp, found by the fuzzer), so it is unknown for the inference's duration.
    negative = [
        (v, v.shape)
        for v in (*model.graph.inputs, *model.graph.outputs)
        if v.shape is not None and any(isinstance(d, int) and d < 0 for d in v.shape)
    ]
    for value, shape in negative:
        value.shape = ir.Shape([None if isinstance(d, int) and d < 0 else d for d in shape])
    common_passes.ShapeInferencePass(strict_mode=False, data_prop=True)(model)
    for value, shape in negative:
        value.shape = shape
    for value, shape, type_ in signature:
        value.shape, value.type = shape, type_
    for value, old in declared.items():
        value.shape = _named_dims(value.shape, old)


def _named_dims(new: ir.Shape | None, old: ir.Shape | None) -> ir.Shape | None:
    """Where inference could only invent a symbol (unk__N) for a dim the file named (batch), keep
    the name: pruning changes channel counts, never symbolic dims."""
    if new is None or old is None or len(new) != len(old):
        return new
    dims = [
        o if _invented(n) and isinstance(o, ir.SymbolicDim) and o.value and not _invented(o) else n
        for n, o in zip(new, old)
    ]
    return ir.Shape(dims) if dims != list(new) else new


def _invented(dim) -> bool:
    return isinstance(dim, ir.SymbolicDim) and (dim.value is None or dim.value.startswith("unk__"))
