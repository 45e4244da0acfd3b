"""One rule per ONNX op: how channel labels pass through it and which parameters belong to them.

Four kinds of rule cover the supported ops:

- mixing (Conv, ConvTranspose, Gemm, MatMul with a weight): the input channels are consumed, the
  weight's input axis becomes a member, and a new space of output channels is opened. Grouped and
  depthwise convolutions couple input and output channels.
- elementwise (activations, arithmetic, BatchNormalization, ...): operands that span a channel axis
  carry the same channel there, so their labels are united; constant operands that span it are
  parameters and become members.
- axis-local (pooling, reductions, softmax, padding, resize): the op works along some axes; labels
  that vary along those axes are pinned, the others pass.
- data movement (Reshape, Transpose, Concat, Split, Slice, Gather, ...): the op itself is run on the
  tensor of labels, so concat offsets, flatten blocks and channel shuffles come out of the op's
  own semantics.

Ops without a rule are barriers (spa.analysis).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from spa.evaluate import run_node
from spa.graph import is_default_domain
from spa.labels import compress as compress_labels
from spa.labels import varying_axes

if TYPE_CHECKING:
    from spa.analysis import Propagation


class NotHandled(Exception):
    """The rule does not cover this use of the op; the node becomes a barrier."""


Rule = Callable[["Propagation", ir.Node], None]
# (spa.apply's surgery, node): the node's attributes and shape inputs after a prune
Rewrite = Callable[..., None]
Creates = Callable[[ir.Node, "Propagation"], bool]


@dataclasses.dataclass
class OpRule:
    """All spa knows about one op: how channel labels pass through it (analysis), whether it opens
    a new channel space of its own (a layer with a constant weight), and how the surgery rewrites
    the node itself (attributes, shape inputs) once its tensors are sliced; None where nothing
    beyond the slicing of its parameters."""

    analyze: Rule
    creates_channels: Creates | None = None
    rewrite: Rewrite | None = None


_RULES: dict[tuple[str, str], OpRule] = {}  # (domain, op type) -> its rule; "" is ONNX's own domain


def rule(*ops: str, domain: str = "", creates_channels: Creates | None = None):
    """Register `fn` as the analysis rule of the ops `ops` of `domain`; one rule per op."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            if (domain, op) in _RULES:
                raise ValueError(f"{op} already has a rule: {_RULES[domain, op].analyze.__name__}")
            _RULES[domain, op] = OpRule(fn, creates_channels)
        return fn

    return register


def rewrite(*ops: str, domain: str = ""):
    """Register `fn` as the surgery's rewrite of the ops `ops` (spa.apply), beside their rule."""

    def register(fn: Rewrite) -> Rewrite:
        for op in ops:
            entry = _RULES.get((domain, op))
            if entry is None:
                raise ValueError(f"{op}: no rule to rewrite for")
            if entry.rewrite is not None:
                raise ValueError(f"{op}: already rewritten by {entry.rewrite.__name__}")
            entry.rewrite = fn
        return fn

    return register


def op_rule(node: ir.Node) -> OpRule | None:
    """The node's rule; None for an op without one and for a node with subgraphs (If, Loop,
    Scan)."""
    if any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    ):
        return None
    return _RULES.get(("" if is_default_domain(node) else node.domain, node.op_type))


def creates_channels(node: ir.Node, prop: Propagation) -> bool:
    entry = op_rule(node)
    return (
        entry is not None
        and entry.creates_channels is not None
        and entry.creates_channels(node, prop)
    )


def _constant_weight(node: ir.Node, prop: Propagation) -> bool:
    """A layer (Conv, Gemm, MatMul, an RNN) with a constant weight opens its own output channels."""
    return len(node.inputs) > 1 and prop.is_constant(node.inputs[1])


def _constant_table(node: ir.Node, prop: Propagation) -> bool:
    """A Gather from a constant table by run-time indices (an embedding) opens the table's
    channels."""
    return (
        prop.is_constant(node.inputs[0])
        and len(node.inputs) > 1
        and not prop.is_constant(node.inputs[1])
    )


# ---------------------------------------------------------------------------------------------
# mixing ops


def _channel_vector(prop: Propagation, node: ir.Node, value: ir.Value, axis: int) -> np.ndarray:
    """Labels of the channels along `axis`, one per position. A layer reads each channel across
    all other axes, so labels that also vary along them are united into one class per position."""
    labels = prop.labels(value)
    axis %= labels.ndim
    prop.unite_along(labels, [a for a in varying_axes(labels) if a != axis], node)
    vector = labels
    for a in range(labels.ndim):
        if a != axis:
            vector = vector.take([0], axis=a)
    return np.broadcast_to(vector.reshape(-1), (prop.shape(value)[axis],)).copy()


def _at_axis(vector: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = len(vector)
    return vector.reshape(shape)


@rule("Conv", "ConvTranspose", creates_channels=_constant_weight)
def conv(prop: Propagation, node: ir.Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    if not prop.is_constant(w):
        raise NotHandled("weight is not a constant")
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    groups = node.attributes.get_int("group", 1)
    transposed = node.op_type == "ConvTranspose"
    wshape = w.const_value.shape
    rank = len(wshape)
    inputs = _channel_vector(prop, node, x, 1)
    # Weight layout: Conv (out, in/groups, k...), ConvTranspose (in, out/groups, k...).
    in_axis, out_axis = (0, 1) if transposed else (1, 0)
    out_channels = wshape[1] * groups if transposed else wshape[0]
    outputs = prop.new_space(node, out_channels)
    in_per_group, out_per_group = len(inputs) // groups, out_channels // groups
    in_member, out_member = _at_axis(inputs, in_axis, rank), _at_axis(outputs, out_axis, rank)
    if groups > 1:
        g_in, g_out = inputs.reshape(groups, in_per_group), outputs.reshape(groups, out_per_group)
        # The weight's per-group axis (Conv: its inputs; ConvTranspose: its outputs)
        if min(in_per_group, out_per_group) == 1:
            # Depthwise-like: a group's inputs and outputs go together; whole groups are removed,
            # and the per-group axis carries no channels.
            prop.sets.union(g_in[:, :1], g_out)
            prop.sets.union(g_in, g_in[:, :1])
            per_group = np.zeros((1,) * rank, np.int64)
        else:
            # Every group keeps as many channels, at positions of its own (the planner keeps the
            # counts equal): row r of the weight reads, on that axis, the channels of r's group.
            prop.equal_counts(node, g_in)
            prop.equal_counts(node, g_out)
            rows = np.arange(wshape[0]) // (in_per_group if transposed else out_per_group)
            per_group = (g_out if transposed else g_in)[rows]
            per_group = per_group.reshape(per_group.shape + (1,) * (rank - 2))
        if transposed:
            out_member = per_group
        else:
            in_member = per_group
    prop.member(node, 1, in_member)
    prop.member(node, 1, out_member)
    if bias is not None:
        if not prop.is_constant(bias):
            raise NotHandled("bias is not a constant")
        prop.member(node, 2, outputs)
    out_rank = len(prop.shape(node.outputs[0]))
    prop.set(node.outputs[0], _at_axis(outputs, 1, out_rank))


@rule("Gemm", creates_channels=_constant_weight)
def gemm(prop: Propagation, node: ir.Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if not prop.is_constant(b) or prop.is_constant(a):
        raise NotHandled("only activation x constant weight is supported")
    trans_a = node.attributes.get_int("transA", 0)
    trans_b = node.attributes.get_int("transB", 0)
    inputs = _channel_vector(prop, node, a, 0 if trans_a else 1)
    n = b.const_value.shape[0 if trans_b else 1]
    outputs = prop.new_space(node, n)
    k_axis, n_axis = (1, 0) if trans_b else (0, 1)
    prop.member(node, 1, _at_axis(inputs, k_axis, 2))
    prop.member(node, 1, _at_axis(outputs, n_axis, 2))
    if c is not None:
        if not prop.is_constant(c):
            raise NotHandled("bias is not a constant")
        cshape = c.const_value.shape
        if len(cshape) >= 1 and cshape[-1] == n and n > 1:
            prop.member(node, 2, _at_axis(outputs, len(cshape) - 1, len(cshape)))
    prop.set(node.outputs[0], _at_axis(outputs, 1, 2))


@rule("MatMul", creates_channels=_constant_weight)
def matmul(prop: Propagation, node: ir.Node) -> None:
    a, b = node.inputs
    out_shape = prop.shape(node.outputs[0])
    out_rank = len(out_shape)
    if prop.is_constant(b) and not prop.is_constant(a) and len(b.const_value.shape) == 2:
        inputs = _channel_vector(prop, node, a, len(prop.shape(a)) - 1)
        outputs = prop.new_space(node, b.const_value.shape[1])
        prop.member(node, 1, inputs.reshape(-1, 1))
        prop.member(node, 1, outputs.reshape(1, -1))
        prop.set(node.outputs[0], _at_axis(outputs, out_rank - 1, out_rank))
        return
    if (
        prop.is_constant(a)
        or prop.is_constant(b)
        or min(len(prop.shape(a)), len(prop.shape(b))) < 2
    ):
        raise NotHandled("MatMul with a constant first operand, a batched weight or a vector")
    _contract(prop, node, out_shape)


def _contract(prop: Propagation, node: ir.Node, out_shape: tuple[int, ...]) -> None:
    """MatMul of two activations, (..., M, K) x (..., K, N): attention's scores and context.

    Channel k of A's columns meets channel k of B's rows. Each output element sums over all k, so
    where A's labels also vary along its batch or row axes (heads), every batch slice becomes one
    class: removing a head removes its whole slice of the output. The batch axes meet
    elementwise."""
    rank = len(out_shape)
    la, sa = _at_rank(prop, node.inputs[0], rank)
    lb, sb = _at_rank(prop, node.inputs[1], rank)
    if la.shape[-1] > 1 or lb.shape[-2] > 1:
        prop.sets.union(la[..., :, :, None], lb[..., None, :, :])
    la = _consume(prop, la, rank - 1)
    lb = _consume(prop, lb, rank - 2)
    parts = [(la, sa[:-1] + (1,), None), (lb, sb[:-2] + (1, sb[-1]), None)]
    labels = meet(prop, node, parts, out_shape)
    prop.attention_heads(labels)
    prop.set(node.outputs[0], labels)


def _at_rank(prop: Propagation, value: ir.Value, rank: int) -> tuple[np.ndarray, tuple[int, ...]]:
    labels, shape = prop.labels(value), prop.shape(value)
    pad = rank - len(shape)
    return labels.reshape((1,) * pad + labels.shape), (1,) * pad + tuple(shape)


def _consume(prop: Propagation, labels: np.ndarray, axis: int) -> np.ndarray:
    """Labels left after summing over `axis`: a slice that varies along it becomes one class."""
    if labels.shape[axis] == 1:
        return labels
    reduced = labels.take([0], axis=axis)
    if len(varying_axes(labels)) == 1:
        return np.zeros_like(reduced)  # channels consumed, as by a weight
    prop.sets.union_along(labels, [axis])
    return reduced


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@rule("LSTM", "GRU", "RNN", creates_channels=_constant_weight)
def recurrent(prop: Propagation, node: ir.Node) -> None:
    """The hidden units of a recurrent layer: W, R and B hold one block per gate (and R's columns
    read the units back); both directions share the unit index."""
    x, w, rec = node.inputs[0], node.inputs[1], node.inputs[2]
    optional = list(node.inputs[3:]) + [None] * (8 - len(node.inputs))
    bias, _, initial_h, initial_c, peephole = optional[:5]
    if not (prop.is_constant(w) and prop.is_constant(rec)) or (
        bias is not None and not prop.is_constant(bias)
    ):
        raise NotHandled("weights are not constants")
    gates = _GATES[node.op_type]
    size = node.attributes.get_int("hidden_size", 0)
    if tuple(rec.const_value.shape[1:]) != (gates * size, size):
        raise NotHandled("hidden_size does not match the recurrence weight")
    hidden = prop.new_space(node, size)
    inputs = _channel_vector(prop, node, x, -1)
    rows = np.tile(hidden, gates).reshape(1, -1, 1)
    prop.member(node, 1, rows)
    prop.member(node, 1, inputs.reshape(1, 1, -1))
    prop.member(node, 2, rows)
    prop.member(node, 2, hidden.reshape(1, 1, -1))
    if bias is not None:
        prop.member(node, 3, np.tile(hidden, 2 * gates).reshape(1, -1))
    if peephole is not None:
        if not prop.is_constant(peephole):
            raise NotHandled("peepholes are not constants")
        prop.member(node, 7, np.tile(hidden, 3).reshape(1, -1))
    for index, state in ((5, initial_h), (6, initial_c)):
        if state is None:
            continue
        if prop.is_constant(state):
            prop.member(node, index, hidden.reshape(1, 1, -1))
        else:
            prop.sets.union(_channel_vector(prop, node, state, -1), hidden)
    for out in node.outputs:
        if out.name:
            rank = len(prop.shape(out))
            prop.set(out, _at_axis(hidden, rank - 1, rank))


# ---------------------------------------------------------------------------------------------
# elementwise ops


def elementwise(
    prop: Propagation, node: ir.Node, operands: list[tuple[int, list[int] | None]]
) -> None:
    """Operands meet elementwise. Each is (input index, the output axes its own axes sit at), None
    meaning numpy broadcasting."""
    out_shape = prop.shape(node.outputs[0])
    rank = len(out_shape)
    parts = []
    for index, axes in operands:
        value = node.inputs[index]
        own = prop.shape(value)
        axes = list(range(rank - len(own), rank)) if axes is None else axes
        labels = (
            None
            if prop.is_constant(value)
            else prop.labels(value).reshape(_place(prop.labels(value).shape, axes, rank))
        )

        def follow(result: np.ndarray, value=value, index=index, axes=axes) -> bool:
            own_labels = result.reshape([result.shape[a] for a in axes])
            if prop.is_constant(value):
                prop.member(node, index, own_labels)
                return True
            return _adopt_fill(prop, value, own_labels)

        parts.append((labels, _place(own, axes, rank), follow))
    result = meet(prop, node, parts, out_shape)
    for out in node.outputs:
        if out.name:
            prop.set(out, result)


def meet(prop: Propagation, node: ir.Node, parts: list, out_shape: tuple[int, ...]) -> np.ndarray:
    """Tensors that meet element by element: the output's labels, with the couplings recorded.

    parts: (labels at the output's rank, or None for a constant; real shape at the output's rank;
    `follow(labels)` or None: makes an operand that carries none of the channels it spans follow
    them if it can (a constant becomes a parameter of theirs, a fill takes them), False where it
    cannot, and then they stay). Along a channel axis an operand spans, its element belongs to
    the output's channel there. An operand that spans only some channel axes is shared across the
    others: a labelled one then carries whole slices (a per-head factor makes heads the unit),
    while an unlabelled one or a constant must stay whole, so removals may cut only along the axes
    it does not span (a rotary cos/sin table over head dims keeps whole heads)."""
    rank = len(out_shape)
    parts = _open_parts_that_fit(prop, parts)
    if not any(lab is not None and lab.any() for lab, _, _ in parts):
        parts = _open_a_constant_axis(prop, parts, out_shape)
    channel_axes = {
        a for lab, _, _ in parts if lab is not None for a in varying_axes(lab) if out_shape[a] > 1
    }
    compressed = tuple(out_shape[a] if a in channel_axes else 1 for a in range(rank))
    spans = [{a for a in channel_axes if shape[a] == out_shape[a]} for _, shape, _ in parts]
    result = np.zeros(compressed, dtype=np.int64)
    for (lab, _, _), span in zip(parts, spans):
        if lab is not None and span == channel_axes:
            result = np.where(result == 0, np.broadcast_to(lab, compressed), result)
    for (lab, _, follow), span in zip(parts, spans):
        if not span:
            continue  # broadcast over every channel axis: untouched by removals
        if lab is not None and lab.any():
            prop.sets.union_along(result, sorted(channel_axes - span))
            prop.sets.union(np.broadcast_to(lab, compressed), result)
        elif span != channel_axes:
            prop.sets.union_along(result, sorted(span))
        elif follow is None or not follow(result):
            prop.keep(result, node, "meets a tensor of their extent that does not follow them")
    return result


def _open_a_constant_axis(prop: Propagation, parts: list, out_shape: tuple[int, ...]) -> list:
    """No channels meet here, but constants vary along one axis (tf2onnx's LayerNorm computes
    `rstd * gamma` before it meets x): that axis gets open classes, which the channels it meets
    later take over (the constants then become their parameters); anything else pins them."""
    axis = _constant_axis([(lab is None, shape) for lab, shape, _ in parts], out_shape)
    if axis is None:
        return parts
    opened = _at_axis(prop.open_labels(out_shape[axis]), axis, len(out_shape))
    return [(opened, tuple(out_shape), lambda _: True), *parts]


def _constant_axis(operands: list[tuple[bool, tuple]], out_shape: tuple[int, ...]) -> int | None:
    """operands: (whether a constant, shape at the output's rank). The one axis that constants
    span and no other operand does, or None."""
    axes = {
        a
        for constant, shape in operands
        if constant
        for a in range(len(out_shape))
        if shape[a] == out_shape[a] > 1
    }
    if len(axes) != 1:
        return None
    (axis,) = axes
    spanned = any(not constant and shape[axis] == out_shape[axis] for constant, shape in operands)
    return None if spanned else axis


def _opens_an_axis(node: ir.Node, prop: Propagation) -> bool:
    """Whether an elementwise node that no channels reach opens classes (_open_a_constant_axis)."""
    out = prop.shape(node.outputs[0])
    shapes = [prop.shape(v) for v in node.inputs if v is not None]
    if out is None or any(s is None for s in shapes) or len(shapes) < 2:
        return False
    operands = [
        (prop.is_constant(v), (1,) * (len(out) - len(s)) + tuple(s))
        for v, s in zip([v for v in node.inputs if v is not None], shapes)
    ]
    return _constant_axis(operands, out) is not None


def _open_parts_that_fit(prop: Propagation, parts: list) -> list:
    """Open classes (_open_a_constant_axis) join channels that vary along the very same axes; an
    operand whose open classes vary along other axes than the channels it meets (a rotary table
    over the dims of every head) is pinned and meets them as an unlabelled operand. A layer's
    labels come first, so that the output carries them."""
    labelled = [lab for lab, _, _ in parts if lab is not None and lab.any()]
    real = {a for lab in labelled if not prop.is_open(lab) for a in varying_axes(lab)}
    if not real:
        return parts
    fitted = []
    for lab, shape, follow in parts:
        if prop.is_open(lab) and set(varying_axes(lab)) != real:
            prop.sets.pin(lab)
            lab = np.zeros_like(lab)
        fitted.append((lab, shape, follow))
    return sorted(fitted, key=lambda part: prop.is_open(part[0]))


def _adopt_fill(prop: Propagation, value: ir.Value, labels: np.ndarray) -> bool:
    """`value` carries no channels but meets `labels` (at its own rank): where it holds one value
    along their axes (a ConstantOfShape, or an Expand of data of extent 1 there: torch's
    `new_zeros((n, 32))`, `count.expand(n, 32)`), is used only here and has extents there that the
    surgery rewrites (constants), it takes them; False otherwise."""
    producer = value.producer()
    if (
        producer is None
        or producer.op_type not in ("ConstantOfShape", "Expand")
        or not producer.inputs
        or value.is_graph_output()
        or len(value.uses()) != 1
    ):
        return False
    shape = producer.inputs[SHAPE_INPUTS[producer.op_type]]
    if shape is None or shape_pieces(shape, prop.shapes) is None:
        return False
    rank = labels.ndim
    entries = _shape_entries(prop, shape)
    data = prop.shape(producer.inputs[0]) if producer.op_type == "Expand" else ()
    if not all(
        rank - a <= len(entries)
        and entries[a - rank] is Piece.REWRITTEN
        and (rank - a > len(data) or data[a - rank] == 1)
        for a in varying_axes(labels)
    ):
        return False
    prop.activations[value] = labels
    return True


def _place(own: tuple[int, ...], axes: list[int], rank: int) -> tuple[int, ...]:
    placed = [1] * rank
    for a, d in zip(axes, own):
        placed[a] = d
    return tuple(placed)


_UNARY = """Abs Acos Acosh Asin Asinh Atan Atanh Cast Ceil Celu Cos Cosh Dropout Elu Erf Exp Floor
Gelu HardSigmoid HardSwish Identity IsInf IsNaN LeakyRelu Log Mish Neg Not Reciprocal Relu Round
Selu Shrink Sigmoid Sign Sin Sinh Softplus Softsign Sqrt Swish Tan Tanh ThresholdedRelu""".split()
_NARY = """Add And BitwiseAnd BitwiseOr BitwiseXor Div Equal Greater GreaterOrEqual Less
LessOrEqual Max Mean Min Mod Mul Or Pow PRelu Sub Sum Where Xor Clip CastLike""".split()


@rule(*_UNARY, *_NARY, creates_channels=_opens_an_axis)
def pointwise(prop: Propagation, node: ir.Node) -> None:
    operands = [(i, None) for i, v in enumerate(node.inputs) if v is not None]
    if node.op_type in ("Dropout", "CastLike"):
        operands = operands[:1]  # ratio / training_mode, target type: not data
    elementwise(prop, node, operands)


@rule("BatchNormalization", "InstanceNormalization")
def per_channel(prop: Propagation, node: ir.Node) -> None:
    if len([o for o in node.outputs if o.name and o.uses()]) > 1:
        raise NotHandled("training-mode outputs")
    if node.op_type == "InstanceNormalization":
        # Statistics per (sample, axis-1 row) over the other axes: channels that vary along those
        # axes (GroupNorm as exporters write it: Reshape to (N, groups, -1), InstanceNormalization,
        # Reshape back) go together, one class per row, so that whole rows (groups) go or stay.
        _per_row_norm(prop, node, _channel_vector(prop, node, node.inputs[0], 1))
        return
    elementwise(
        prop,
        node,
        [(0, None)] + [(i, [1]) for i in range(1, len(node.inputs)) if node.inputs[i] is not None],
    )


@rule("LayerNormalization")
def layer_norm(prop: Propagation, node: ir.Node) -> None:
    """Normalizes over the channels: pinned, unless hidden-size pruning (lossy) is asked for."""
    rank = len(prop.shape(node.inputs[0]))
    axis = node.attributes.get_int("axis", -1) % rank
    labels = prop.labels(node.inputs[0])
    if any(labels.shape[a] > 1 for a in range(axis, rank)) and not _statistics_may_change(
        prop, node, labels, range(axis, rank)
    ):
        prop.sets.pin(labels)
    elementwise(prop, node, [(i, None) for i, v in enumerate(node.inputs) if v is not None])


def _statistics_may_change(prop: Propagation, node: ir.Node, labels: np.ndarray, axes) -> bool:
    """A mean or norm over channels changes when channels go: allowed only for lossy hidden-size
    pruning (--prune-hidden), which records the channels it touched; otherwise the node is listed
    among the normalizations that keep their channels."""
    if prop.lossy:
        prop.mark_lossy(labels)
    else:
        # channels along the axes it averages
        prop.normalized(node, math.prod(labels.shape[a] for a in axes))
    return prop.lossy


# ---------------------------------------------------------------------------------------------
# axis-local ops


def _pin_along(prop: Propagation, node: ir.Node, value: ir.Value, axes) -> None:
    """Pin the labels of `value` if they vary along any of `axes`."""
    labels = prop.labels(value)
    if any(labels.shape[a] > 1 for a in axes):
        prop.keep(labels, node, f"works across them (axes {sorted(axes)})")


def axis_local(
    prop: Propagation, node: ir.Node, axes, dropped: tuple[int, ...] = (), statistics: bool = False
) -> None:
    """The op works along `axes` of input 0 (pool, reduce, normalize over them); `dropped` axes
    disappear from the output. Channels along other axes pass through unchanged; channels along
    `axes` are pinned, unless the op computes `statistics` and hidden-size pruning is lossy."""
    x = node.inputs[0]
    labels = prop.labels(x)
    rank = labels.ndim
    axes = {a % rank for a in axes}
    if any(labels.shape[a] > 1 for a in axes):
        if set(varying_axes(labels)) - axes:
            # The channels along `axes` also vary along others (a head's dims): the op works
            # within each slice of those, which then goes whole, its statistics untouched.
            prop.sets.union_along(labels, sorted(axes))
            labels = labels[tuple(slice(0, 1) if a in axes else slice(None) for a in range(rank))]
        else:
            if not statistics:
                prop.keep(labels, node, f"works across them (axes {sorted(axes)})")
            elif not _statistics_may_change(prop, node, labels, axes):
                prop.sets.pin(labels)  # listed among the normalizations
            labels = np.zeros([1 if a in axes else d for a, d in enumerate(labels.shape)], np.int64)
    if dropped:
        labels = labels.reshape(
            [d for a, d in enumerate(labels.shape) if a not in {a % rank for a in dropped}]
        )
    for out in node.outputs:
        if out.name:
            out_rank = len(prop.shape(out))
            prop.set(
                out,
                labels.reshape(labels.shape[:out_rank])
                if labels.ndim == out_rank
                else np.zeros((1,) * out_rank, np.int64),
            )


@rule(
    "MaxPool",
    "AveragePool",
    "LpPool",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "GlobalLpPool",
    "MaxRoiPool",
)
def pool(prop: Propagation, node: ir.Node) -> None:
    if len([o for o in node.outputs if o.name and o.uses()]) > 1:
        raise NotHandled("MaxPool indices encode the channel count")
    # a global mean or norm over channels (tf2onnx's ReduceMean of a LayerNorm, transposed) is a
    # statistic of theirs, like ReduceMean
    statistics = node.op_type in ("GlobalAveragePool", "GlobalLpPool")
    axis_local(prop, node, range(2, len(prop.shape(node.inputs[0]))), statistics=statistics)


@rule("LRN", "MeanVarianceNormalization")
def across_channels(prop: Propagation, node: ir.Node) -> None:
    """Normalizing across channels: removing one would change the others, so they are pinned."""
    axes = (
        node.attributes.get_ints("axes", [0, 2, 3])
        if node.op_type == "MeanVarianceNormalization"
        else [1]
    )
    axis_local(prop, node, axes)


@rule("GroupNormalization")
def group_norm(prop: Propagation, node: ir.Node) -> None:
    """Statistics per group of channels: a whole group goes or stays (the others' statistics do
    not change; the rewrite lowers num_groups). With --prune-hidden, lossy: every group loses as
    many channels, at positions of its own, instead (the groups' statistics change, their count
    stays; channels within a group are what a UNet's blocks have most of). Scale and bias per
    channel, as opset 21 has them (opset 18's per-group form is deprecated: the checker refuses
    it)."""
    x = node.inputs[0]
    rank = len(prop.shape(x))
    _pin_along(prop, node, x, range(2, rank))
    channels = _channel_vector(prop, node, x, 1)
    groups = node.attributes.get_int("num_groups", 1)
    if groups < 1 or len(channels) % groups:
        raise NotHandled(f"{len(channels)} channels in {groups} groups")
    per_group = channels.reshape(groups, -1)
    if prop.lossy:
        prop.equal_counts(node, per_group)
        prop.mark_lossy(channels)
    else:
        prop.sets.union(per_group, per_group[:, :1])
    _per_row_norm(prop, node, channels)


def _per_row_norm(prop: Propagation, node: ir.Node, channels: np.ndarray) -> None:
    """A normalization whose statistics stay within each position of axis 1 (`channels`, its
    labels): scale and bias, one value per position, belong to them; the output carries them."""
    for i in (1, 2):
        value = node.inputs[i] if len(node.inputs) > i else None
        if value is None or not prop.is_constant(value):
            raise NotHandled(f"input {i} is not a constant")
        if tuple(value.const_value.shape) != (len(channels),):
            raise NotHandled(f"input {i} is not one value per channel")
        prop.member(node, i, channels)
    prop.set(node.outputs[0], _at_axis(channels, 1, len(prop.shape(node.inputs[0]))))


@rule("Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "CumSum")
def along_axis(prop: Propagation, node: ir.Node) -> None:
    rank = len(prop.shape(node.inputs[0]))
    if node.op_type == "CumSum":
        axis = int(_const(prop, node, 1).reshape(-1)[0])
        axes = [axis]
    else:
        axis = (
            node.attributes.get_int(
                "axis", -1 if prop.opset >= 13 or node.op_type == "LpNormalization" else 1
            )
            % rank
        )
        # Before opset 13, softmax works on the input flattened from `axis` on.
        axes = (
            [axis]
            if prop.opset >= 13 or node.op_type == "LpNormalization"
            else list(range(axis, rank))
        )
    axis_local(prop, node, axes)


_REDUCE = """ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceSumSquare""".split()


@rule(*_REDUCE, "ArgMax", "ArgMin")
def reduce(prop: Propagation, node: ir.Node) -> None:
    rank = len(prop.shape(node.inputs[0]))
    keepdims = node.attributes.get_int("keepdims", 1)
    if keepdims not in (0, 1):  # ONNX's shape inference keeps only for 1, a kernel may for any
        raise NotHandled(f"keepdims={keepdims} is neither 0 nor 1")
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [node.attributes.get_int("axis", 0)]
    elif "axes" in node.attributes:
        axes = list(node.attributes.get_ints("axes"))
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _const(prop, node, 1).reshape(-1).tolist()
    else:
        axes = [] if node.attributes.get_int("noop_with_empty_axes", 0) else list(range(rank))
    statistics = node.op_type in ("ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2")
    axis_local(prop, node, axes, dropped=() if keepdims else tuple(axes), statistics=statistics)


@rule("Pad")
def pad(prop: Propagation, node: ir.Node) -> None:
    rank = len(prop.shape(node.inputs[0]))
    if "pads" in node.attributes:
        pads = list(node.attributes.get_ints("pads"))
    else:
        pads = _const(prop, node, 1).reshape(-1).tolist()
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes = [a % rank for a in _const(prop, node, 3).reshape(-1).tolist()]
    n = len(axes)
    touched = [axes[i] for i in range(n) if pads[i] != 0 or pads[i + n] != 0]
    axis_local(prop, node, touched)


@rule("Resize", "Upsample")
def resize(prop: Propagation, node: ir.Node) -> None:
    in_shape, out_shape = prop.shape(node.inputs[0]), prop.shape(node.outputs[0])
    axis_local(prop, node, [a for a in range(len(in_shape)) if in_shape[a] != out_shape[a]])
    if node.outputs[0].name and not _runtime_shape_follows(
        prop, node, prop.labels(node.outputs[0])
    ):
        raise NotHandled("the run-time sizes spell out a channel count")


@rule("Shape", "Size")
def shape_of(prop: Propagation, node: ir.Node) -> None:
    """A shape carries no channels; computed at run time, it follows the pruned tensor."""
    prop.set(node.outputs[0], np.zeros((1,) * len(prop.shape(node.outputs[0])), dtype=np.int64))


def _const(prop: Propagation, node: ir.Node, index: int) -> np.ndarray:
    value = node.inputs[index]
    if not prop.is_constant(value):
        raise NotHandled(f"input {index} is not a constant")
    return value.const_value.numpy()


# ---------------------------------------------------------------------------------------------
# data movement: run the op on the labels

# For each op, the inputs that carry data (labels); every other input must be a constant.
_MOVES = {
    "Reshape": [0],
    "Flatten": [0],
    "Transpose": [0],
    "Squeeze": [0],
    "Unsqueeze": [0],
    "Concat": None,  # all inputs
    "Split": [0],
    "Slice": [0],
    "Gather": [0],
    "Expand": [0],
    "Tile": [0],
    "DepthToSpace": [0],
    "SpaceToDepth": [0],
}


def _embedding(prop: Propagation, node: ir.Node) -> None:
    """Gather of rows of a constant table by run-time ids: the table's columns are channels."""
    table = node.inputs[0].const_value
    if node.attributes.get_int("axis", 0) != 0 or len(table.shape) != 2:
        raise NotHandled("Gather from a constant that is not a 2-D table")
    columns = prop.new_space(node, table.shape[1])
    prop.member(node, 0, columns.reshape(1, -1))
    rank = len(prop.shape(node.outputs[0]))
    prop.set(node.outputs[0], _at_axis(columns, rank - 1, rank))


@rule("Gather", creates_channels=_constant_table)
def gather(prop: Propagation, node: ir.Node) -> None:
    if _constant_table(node, prop):
        _embedding(prop, node)
    else:
        move(prop, node)


@rule("Expand", creates_channels=lambda node, prop: _shape_reads_channels(prop, node))
def expand(prop: Propagation, node: ir.Node) -> None:
    """Broadcast: a data axis of size 1 repeats along the output axis, which a run-time shape may
    size by a dim of a channel tensor (torch's `index.expand_as(src)`): the output then carries
    those channels there, every position an equal copy."""
    if prop.labels(node.inputs[0]).any() and _repeat_heads(prop, node):
        return
    if prop.labels(node.inputs[0]).any() or not _shape_reads_channels(prop, node):
        move(prop, node)
        return
    _from_shape_entries(prop, node)


def _repeat_heads(prop: Propagation, node: ir.Node) -> bool:
    """Grouped-query attention's repeat_kv: each key/value head broadcast along a new axis into a
    copy for each of its query heads, the copies then merged into the head axis by a Reshape.
    Copies are equal, so any may go as long as every head keeps as many (the Expand's repeat
    count, a constant, rewritten): each copy is a class of its own, which the query head that
    reads it joins, and its head (whole: the owner) goes only with all of its copies. False,
    having changed nothing, where the pattern is not this one."""
    x, out = node.inputs[0], node.outputs[0]
    labels, in_shape, out_shape = prop.labels(x), prop.shape(x), prop.shape(out)
    rank = len(out_shape)
    repeated = (
        [a for a, (i, o) in enumerate(zip(in_shape, out_shape)) if i == 1 and o > 1]
        if len(in_shape) == rank
        else []
    )
    if len(repeated) != 1 or repeated[0] == 0:
        return False
    axis = repeated[0]
    heads, copies = out_shape[axis - 1], out_shape[axis]
    uses = list(out.uses())
    merged = out_shape[: axis - 1] + (heads * copies,) + out_shape[axis + 1 :]
    vector = node.inputs[1]
    length = prop.shape(vector)[0] if prop.shape(vector) else 0
    if (
        labels.shape[axis - 1] != heads
        or len(uses) != 1
        or uses[0].node.op_type != "Reshape"
        or tuple(prop.shape(uses[0].node.outputs[0]) or ()) != merged
        or not all(
            isinstance(_vector_element(prop, vector, a - rank + length), int)
            for a in (axis - 1, axis)
        )
        # the merged count too: constants the surgery rewrites (a product read at run time from
        # the kv heads' dim would not follow the copies)
        or not isinstance(_vector_element(prop, uses[0].node.inputs[1], axis - 1), int)
    ):
        return False
    copy = prop.sets.new(heads * copies).reshape(heads, copies)
    shape = [1] * rank
    shape[axis - 1], shape[axis] = heads, copies
    if not _runtime_shape_follows(prop, node, copy.reshape(shape)):
        return False
    prop.sets.union_along(labels, [a for a in varying_axes(labels) if a != axis - 1])
    owners = np.moveaxis(labels, axis - 1, 0).reshape(heads, -1)[:, 0]
    prop.equal_counts(node, copy, owners=owners)
    prop.row_axes[out] = axis - 1
    prop.set(out, copy.reshape(shape))
    return True


@rule("ConstantOfShape", creates_channels=lambda node, prop: _shape_reads_channels(prop, node))
def fill(prop: Propagation, node: ir.Node) -> None:
    """One value everywhere (torch's `new_zeros`): removing any positions is exact. Axes sized by
    a dim of a channel tensor read at run time carry its channels; any other axis none, unless
    what the fill meets adopts it (_adopt_fill)."""
    _from_shape_entries(prop, node)


def _shape_reads_channels(prop: Propagation, node: ir.Node) -> bool:
    shape = node.inputs[SHAPE_INPUTS[node.op_type]]
    return (
        shape is not None
        and not prop.is_constant(shape)
        and shape_pieces(shape, prop.shapes) is not None
        and any(_reads_channels(prop, e) for e in _shape_entries(prop, shape))
    )


def _from_shape_entries(prop: Propagation, node: ir.Node) -> None:
    """The output of a node whose data carries no channels, with axes sized by run-time dims of one
    tensor's channel axes: those axes carry its channels (its data, if any, is broadcast along
    them)."""
    rank = len(prop.shape(node.outputs[0]))
    entries = _shape_entries(prop, node.inputs[SHAPE_INPUTS[node.op_type]])
    read = {
        axis: entry
        for axis, entry in zip(range(rank - len(entries), rank), entries)
        if _reads_channels(prop, entry)
    }
    if not all(isinstance(e, RuntimeDim) for e in read.values()):
        raise NotHandled("the run-time shape spells out a channel count")
    sources = {e.source for e in read.values()}
    source = prop.labels(next(iter(sources)))
    picked = [e.axis for e in read.values()]  # the source's axes, in the output's order
    if len(sources) > 1 or sorted(picked) != varying_axes(source):
        raise NotHandled("the run-time shape spells out channel counts of several tensors")
    data = prop.shape(node.inputs[0]) if node.op_type == "Expand" else ()
    if any(rank - axis <= len(data) and data[axis - rank] != 1 for axis in read):
        raise NotHandled("the run-time shape spells out a channel count")
    channels = np.transpose(source, picked + [a for a in range(source.ndim) if a not in picked])
    channels = channels.reshape(channels.shape[: len(picked)])
    labels = np.expand_dims(channels, [a for a in range(rank) if a not in read])
    if not _runtime_shape_follows(prop, node, labels):
        raise NotHandled("the run-time shape spells out a channel count")
    prop.set(node.outputs[0], labels)


@rule("Slice")
def slice_(prop: Propagation, node: ir.Node) -> None:
    if all(prop.is_constant(v) for v in node.inputs[1:3]):
        move(prop, node)
        return
    # Starts and ends computed at run time (torch's `src[: index.size(0)]`): an axis that channels
    # vary along must be taken whole, by an end that keeps up with its pruning by itself.
    x = node.inputs[0]
    labels = prop.labels(x)
    rank = labels.ndim
    count = prop.shape(node.inputs[1])[0]
    axes = _const(prop, node, 3).reshape(-1) if _given(node, 3) else np.arange(count)
    steps = _const(prop, node, 4).reshape(-1) if _given(node, 4) else np.ones(count, np.int64)
    for i, (axis, step) in enumerate(zip(axes % rank, steps)):
        if labels.shape[axis] == 1:
            continue
        start, end = (
            _vector_element(prop, node.inputs[1], i),
            _vector_element(prop, node.inputs[2], i),
        )
        whole_end = (
            isinstance(end, RuntimeDim)
            and _channel_slices(prop, prop.labels(end.source), end.axis)
            == _channel_slices(prop, labels, axis)
        ) or (isinstance(end, int) and end >= prop.shape(x)[axis])
        if step != 1 or start != 0 or not whole_end:
            raise NotHandled("a slice across channels computed at run time")
    prop.set(node.outputs[0], labels)


def _given(node: ir.Node, index: int) -> bool:
    return len(node.inputs) > index and node.inputs[index] is not None


def _vector_element(prop: Propagation, vector: ir.Value, i: int) -> int | ShapeEntry:
    """Element `i` of an integer vector: its value where it is a constant, else what it reads."""
    if prop.is_constant(vector):
        return int(vector.const_value.numpy().reshape(-1)[i])
    for offset, piece in shape_pieces(vector, prop.shapes) or []:
        if offset <= i < offset + prop.shape(piece)[0]:
            if prop.is_constant(piece):
                return int(piece.const_value.numpy().reshape(-1)[i - offset])
            dims = dims_of(prop, piece)
            return None if dims is None else dims[i - offset]
    return None


@rule(*(op for op in _MOVES if op not in ("Gather", "Expand", "Slice")))
def move(prop: Propagation, node: ir.Node) -> None:
    data = _MOVES[node.op_type] or list(range(len(node.inputs)))
    if node.op_type == "Concat" and prop.cache:
        _adopt_cache_inputs(prop, node)
    arrays: list[np.ndarray | None] = []
    for i, value in enumerate(node.inputs):
        if value is None:
            arrays.append(None)
        elif i in data:
            arrays.append(
                np.ascontiguousarray(np.broadcast_to(prop.labels(value), prop.shape(value)))
            )
        elif node.op_type == "Gather" and i == 1 and not prop.is_constant(value):
            arrays.append(_runtime_indices(prop, node))
        else:
            arrays.append(_shape_input(prop, node, i))
    if node.op_type == "Gather" and arrays[1].ndim > 1 and prop.is_constant(node.inputs[1]):
        raise NotHandled("Gather with multi-dimensional indices")
    if node.op_type == "Slice":
        _check_slice_steps(prop, node)
    results = run_node(node, arrays, prop.opset)
    if not _runtime_shape_follows(prop, node, results[0]):
        raise NotHandled("the run-time shape spells out a channel count")
    for out, labels in zip(node.outputs, results):
        if out.name:
            prop.set(out, labels)
            if node.op_type in ("Slice", "Split", "Gather") and labels.any():
                prop.keep_one_of(labels)


def _adopt_cache_inputs(prop: Propagation, node: ir.Node) -> None:
    """A decoder appends new keys or values to a graph input along the sequence axis (the past of
    a key/value cache): with --prune-cache the input carries the same heads as what is appended."""
    axis = node.attributes.get_int("axis", 0) % len(prop.shape(node.outputs[0]))
    labelled = [prop.labels(v) for v in node.inputs if prop.labels(v).any()]
    if len(labelled) != 1 or labelled[0].shape[axis] != 1:
        return
    for value in node.inputs:
        if value.is_graph_input() and not prop.labels(value).any():
            prop.adopt_cache(value, labelled[0])


def _runtime_indices(prop: Propagation, node: ir.Node) -> np.ndarray:
    """Indices known only at run time (a graph's edges, a point cloud's neighbours, chosen tokens)
    along an axis the channel labels do not vary along move whole channel vectors: any index
    gives the same labels, so index 0 stands for all. Along a channel axis they pin."""
    # broadcastable: size 1 along the axes it does not vary along
    labels = prop.labels(node.inputs[0])
    axis = node.attributes.get_int("axis", 0) % labels.ndim
    if axis in varying_axes(labels):
        raise NotHandled("input 1 (indices) is computed at run time and addresses a channel axis")
    shape = prop.shape(node.inputs[1])
    if shape is None:
        raise NotHandled("input 1 (indices) is computed at run time and its shape is unknown")
    return np.zeros(shape, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# elements picked or placed by index: the axes the indices address carry no channels, the others
# pass through position by position


@rule("GatherElements", "ScatterElements")
def by_element(prop: Propagation, node: ir.Node) -> None:
    """out[i][j] = data[indices[i][j]][j] for `axis` 0 (ScatterElements: the other way round, from
    updates): along every other axis data, indices, updates and output match position by position,
    so their channels unite (a graph's messages summed into its nodes)."""
    out_shape = prop.shape(node.outputs[0])
    axis = node.attributes.get_int("axis", 0) % len(out_shape)
    parts = [(v, prop.labels(v), prop.shape(v), True) for v in node.inputs]
    prop.set(node.outputs[0], _meet_indexed(prop, node, parts, out_shape, addressed=[axis]))


@rule("GatherND")
def gather_nd(prop: Propagation, node: ir.Node) -> None:
    """Indices [..., k] pick along data's first k axes; the axes after them pass through."""
    data, indices = (prop.labels(v) for v in node.inputs[:2])
    k = prop.shape(node.inputs[1])[-1]
    if node.attributes.get_int("batch_dims", 0) != 0:
        raise NotHandled("batch_dims")
    if indices.any() or any(data.shape[a] > 1 for a in range(k)):
        raise NotHandled("the indices address a channel axis")
    rank = len(prop.shape(node.outputs[0]))
    prop.set(
        node.outputs[0], data[(0,) * k].reshape((1,) * (rank - data.ndim + k) + data.shape[k:])
    )


@rule("ScatterND")
def scatter_nd(prop: Propagation, node: ir.Node) -> None:
    """Updates [q..., data's axes after k] placed at indices [q..., k] along data's first k axes."""
    data, indices, updates = node.inputs[:3]
    shape = prop.shape(data)
    q, k = len(prop.shape(indices)) - 1, prop.shape(indices)[-1]
    placed = prop.labels(updates)
    if prop.labels(indices).any() or any(placed.shape[a] > 1 for a in range(q)):
        raise NotHandled("the indices address a channel axis")
    parts = [
        (data, prop.labels(data), shape, True),
        (updates, placed[(0,) * q][(None,) * k], (1,) * k + prop.shape(updates)[q:], False),
    ]
    prop.set(node.outputs[0], _meet_indexed(prop, node, parts, shape, addressed=range(k)))


def _meet_indexed(
    prop: Propagation, node: ir.Node, parts: list, out_shape: tuple[int, ...], addressed
) -> np.ndarray:
    """parts: (value, labels, real shape, both at the output's rank; whether the value sits there
    as it is). Channels may not vary along the `addressed` axes; along the others the parts meet
    element by element (meet: a fill the exporter sized by a constant follows them)."""
    for _, labels, _, _ in parts:
        if any(labels.shape[a] > 1 for a in addressed):
            raise NotHandled("the indices address a channel axis")

    def follow(value: ir.Value, as_is: bool):
        def adopt(result: np.ndarray) -> bool:
            if prop.is_constant(value):
                raise NotHandled("a constant operand spans a channel axis")
            return as_is and _adopt_fill(prop, value, result)

        return adopt

    return meet(
        prop,
        node,
        [
            (None if prop.is_constant(v) else labels, shape, follow(v, as_is))
            for v, labels, shape, as_is in parts
        ],
        out_shape,
    )


def _shape_input(prop: Propagation, node: ir.Node, index: int) -> np.ndarray:
    """A non-data input: a constant, or a shape vector computed at run time (its analysis value is
    the output's concrete shape; whether it follows a removal is checked after the op has run)."""
    value = node.inputs[index]
    if prop.is_constant(value):
        return value.const_value.numpy()
    if (
        node.op_type in ("Reshape", "Expand")
        and index == 1
        and shape_pieces(value, prop.shapes) is not None
    ):
        return np.array(prop.shape(node.outputs[0]), dtype=np.int64)
    raise NotHandled(f"input {index} is computed at run time")


# The input of these ops that spells out the output's shape, one entry per output axis.
SHAPE_INPUTS = {"Reshape": 1, "Expand": 1, "Resize": 3, "ConstantOfShape": 0}
# The integer inputs that a rule checks follow the pruning when computed at run time.
CHECKED_INPUTS = {**{op: (index,) for op, index in SHAPE_INPUTS.items()}, "Slice": (1, 2)}


def _runtime_shape_follows(prop: Propagation, node: ir.Node, labels: np.ndarray) -> bool:
    """Every output axis that channels vary along must be spelled, in a shape computed at run time,
    by a constant (rewritten by the surgery) or by a dim read from a tensor axis that carries the
    very same channels (it follows the pruning by itself: torch's `x.size(1)`)."""
    index = SHAPE_INPUTS.get(node.op_type)
    shape = node.inputs[index] if index is not None and index < len(node.inputs) else None
    if shape is None or prop.is_constant(shape):
        return True
    if shape_pieces(shape, prop.shapes) is None:
        return False
    # sizes of some axes only
    if node.op_type == "Resize" and node.attributes.get("axes") is not None:
        return False
    scaled = _entries_follow(prop, _shape_entries(prop, shape), compress_labels(labels))
    if scaled is None:
        return False
    for entry, axis in scaled:
        prop.scaled_dim(entry, node.outputs[0], axis)
    return True


def _entries_follow(prop: Propagation, entries: list[ShapeEntry], out: np.ndarray) -> list | None:
    """The `dim * count` entries to rewrite, or None unless every axis that channels vary along
    follows the pruning (see _runtime_shape_follows) and no other axis is sized by a channel
    count read at run time."""
    scaled = []
    for axis in range(max(0, out.ndim - len(entries)), out.ndim):
        entry = entries[axis - out.ndim + len(entries)]  # Expand aligns shapes right
        if out.shape[axis] == 1:
            if _reads_channels(prop, entry):
                return None  # the pruning would resize an axis that carries no channels
            continue
        if entry is Piece.REWRITTEN:
            continue
        if entry is Piece.FIXED:  # a constant out of the surgery's reach: this axis must not shrink
            prop.sets.union_along(out, [axis])
            continue
        if entry is None:
            return None
        if isinstance(entry, ProductDim):
            if not _product_follows(prop, entry, out, axis):
                return None
        elif isinstance(entry, DividedDim):
            heads = _divided_follows(prop, entry, out, axis)
            if heads is None:
                return None
            scaled.append((entry, heads))
        elif isinstance(entry, ScaledDim):
            how = _scaled_follows(prop, entry, out, axis)
            if how is None:
                return None
            if how == "rewrite":
                scaled.append((entry, axis))
        elif _channel_slices(prop, prop.labels(entry.source), entry.axis) != _channel_slices(
            prop, out, axis
        ):
            return None
    return scaled


def _reads_channels(prop: Propagation, entry) -> bool:
    """Whether a shape entry is computed from a run-time dim of an axis that channels vary along."""
    return any(prop.labels(source).shape[axis] > 1 for source, axis in getattr(entry, "reads", ()))


def _product_follows(prop: Propagation, entry: ProductDim, out: np.ndarray, axis: int) -> bool:
    """Whether `out`'s axis holds the channels of the product's one channel factor, each repeated
    as often as the other factors make (outer or inner): its extent then follows by itself."""
    channel = [f for f in entry.factors if _reads_channels(prop, f)]
    if len(channel) != 1:
        return False
    slices = _channel_slices(prop, prop.labels(channel[0].source), channel[0].axis)
    found = _channel_slices(prop, out, axis)
    repeats = len(found) // len(slices)
    return repeats * len(slices) == len(found) and found in (
        [s for s in slices for _ in range(repeats)],
        slices * repeats,
    )


class Piece(enum.Enum):
    """A shape element that is a constant."""

    REWRITTEN = "rewritten"  # a constant piece of the shape vector: the surgery rewrites it
    FIXED = "fixed"  # a constant deeper in the computation, out of the surgery's reach


@dataclasses.dataclass(frozen=True)
class RuntimeDim:
    """A shape element read at run time: `source`'s dim along `axis`."""

    source: ir.Value
    axis: int

    @property
    def reads(self) -> tuple[tuple[ir.Value, int], ...]:
        """The (tensor, axis) dims it is computed from."""
        return ((self.source, self.axis),)


@dataclasses.dataclass(frozen=True)
class ScaledDim:
    """A run-time dim times a constant, as in `batch * heads` when heads merge into the batch
    axis: the constant is the channel count the surgery rewrites."""

    source: ir.Value
    axis: int
    node: ir.Node  # the Mul
    slot: int  # its input that holds the constant

    @property
    def reads(self) -> tuple[tuple[ir.Value, int], ...]:
        return ((self.source, self.axis),)


@dataclasses.dataclass(frozen=True)
class DividedDim:
    """A run-time dim divided by a constant, as in `hidden / heads` for a head's size: when whole
    heads go, the constant is the head count the surgery rewrites."""

    source: ir.Value
    axis: int
    node: ir.Node  # the Div
    slot: int = 1  # its input that holds the constant

    @property
    def reads(self) -> tuple[tuple[ir.Value, int], ...]:
        return ((self.source, self.axis),)


@dataclasses.dataclass(frozen=True)
class ProductDim:
    """A product of run-time dims, as tf2onnx merges batch and heads into one axis for an einsum
    (`ReduceProd(Gather(Shape(x), [0, 1]))`): it follows a pruning of one factor's channels by
    itself."""

    factors: tuple[RuntimeDim, ...]

    @property
    def reads(self) -> tuple[tuple[ir.Value, int], ...]:
        return tuple(f.reads[0] for f in self.factors)


# What an element of a shape vector is; None where it cannot be traced.
ShapeEntry = Piece | RuntimeDim | ScaledDim | DividedDim | ProductDim | None


def _scaled_follows(prop: Propagation, entry: ScaledDim, out: np.ndarray, axis: int) -> str | None:
    """How `dim * count` keeps up with a removal along `axis`: "rewrite" when the dim carries no
    channels and the channels repeat whole for each of its indices (batch * heads: the count is
    rewritten); "follows" when the dim carries the channels and each repeats `count` times (kv
    heads * repeats in grouped-query attention); None otherwise."""
    source = prop.labels(entry.source)
    count = int(entry.node.inputs[entry.slot].const_value.numpy().reshape(-1)[0])
    if source.shape[entry.axis] == 1:
        per = prop.shape(entry.source)[entry.axis]
        along = np.moveaxis(out, axis, 0)
        blocks = along.reshape(per, along.shape[0] // per, *along.shape[1:])
        return "rewrite" if bool((blocks == blocks[:1]).all()) else None
    slices = _channel_slices(prop, source, entry.axis)
    return (
        "follows"
        if [s for s in slices for _ in range(count)] == _channel_slices(prop, out, axis)
        else None
    )


def _divided_follows(
    prop: Propagation, entry: DividedDim, out: np.ndarray, axis: int
) -> int | None:
    """`hidden / heads` sizes `axis` (a head's dims) of a tensor whose other axis splits the same
    channels into `heads` heads: heads become the unit (their dims united), and the returned axis
    is where the surgery reads the head count its constant becomes; None if the channels do not
    split so."""
    count = int(entry.node.inputs[entry.slot].const_value.numpy().reshape(-1)[0])
    source = _channel_slices(prop, prop.labels(entry.source), entry.axis)
    heads = [a for a in varying_axes(out) if a != axis and out.shape[a] == count]
    if source is None or len(heads) != 1 or count * out.shape[axis] != len(source):
        return None
    split = np.moveaxis(out, (heads[0], axis), (0, 1))
    split = prop.sets.find(split.reshape(count * out.shape[axis], -1))
    if [frozenset(np.unique(row).tolist()) for row in split] != source:
        return None
    prop.sets.union_along(out, [axis])
    return heads[0]


def _channel_slices(prop: Propagation, labels: np.ndarray, axis: int) -> list[frozenset] | None:
    """The classes at each position along `axis` (roots: channels united before are one class)."""
    if labels.shape[axis] == 1:
        return None
    roots = prop.sets.find(labels)
    return [
        frozenset(np.unique(roots.take(k, axis=axis)).tolist()) for k in range(labels.shape[axis])
    ]


def _shape_entries(prop: Propagation, value: ir.Value) -> list[ShapeEntry]:
    """What each element of a shape vector is (ShapeEntry; None where it cannot be traced)."""
    entries = []
    for _, piece in shape_pieces(value, prop.shapes):
        length = prop.shape(piece)[0]
        if prop.is_constant(piece):
            entries += [Piece.REWRITTEN] * length
        else:
            entries += dims_of(prop, piece) or [None] * length
    return entries


def dims_of(prop: Propagation, value: ir.Value) -> list[ShapeEntry] | None:
    """Trace a run-time integer vector back through Shape and the ops that pick its elements."""
    producer = value.producer()
    if producer is None or not is_default_domain(producer):
        return None
    if producer.op_type == "Shape":
        source = producer.inputs[0]
        if prop.shape(source) is None:
            return None
        rank = len(prop.shape(source))
        start = producer.attributes.get_int("start", 0) % (rank + 1)
        end = producer.attributes.get_int("end", rank)
        end = end + rank if end < 0 else min(end, rank)
        return [RuntimeDim(source, a) for a in range(start, end)]
    if producer.op_type in ("Cast", "Identity"):
        return dims_of(prop, producer.inputs[0])
    if producer.op_type == "Mul":
        for slot in (0, 1):
            factor, other = producer.inputs[slot], producer.inputs[1 - slot]
            if prop.is_constant(factor) and factor.const_value.size == 1:
                source = dims_of(prop, other)
                if source is not None and len(source) == 1 and isinstance(source[0], RuntimeDim):
                    return [ScaledDim(source[0].source, source[0].axis, producer, slot)]
        return None
    if producer.op_type == "Div" and prop.is_constant(producer.inputs[1]):
        source = dims_of(prop, producer.inputs[0])
        if (
            source is not None
            and len(source) == 1
            and isinstance(source[0], RuntimeDim)
            and producer.inputs[1].const_value.size == 1
        ):
            return [DividedDim(source[0].source, source[0].axis, producer)]
        return None
    if producer.op_type == "ReduceProd" and len(producer.inputs) == 1:
        factors = dims_of(prop, producer.inputs[0])  # all of them: a vector has one axis
        if factors is None or not all(isinstance(f, RuntimeDim) for f in factors):
            return None
        return [ProductDim(tuple(factors))]
    if producer.op_type in ("Max", "Min") and len(producer.inputs) == 2:
        # an einsum's broadcast batch dims: the same dims read from two tensors
        a, b = (dims_of(prop, v) for v in producer.inputs)
        if a is None or b is None or len(a) != len(b):
            return None
        return a if all(_same_dim(prop, x, y) for x, y in zip(a, b)) else None
    if producer.op_type == "Concat":
        parts = [
            [Piece.FIXED] * int(np.prod(prop.shape(v))) if prop.is_constant(v) else dims_of(prop, v)
            for v in producer.inputs
        ]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]
    if producer.op_type == "Where":
        # torch's expand fix-up, Where(Equal(v, -1), 1, v), keeps v wherever v is a real dim.
        test = producer.inputs[0].producer()
        chosen = producer.inputs[2]
        if (
            test is not None
            and test.op_type == "Equal"
            and chosen in test.inputs
            and prop.is_constant(producer.inputs[1])
        ):
            return dims_of(prop, chosen)
        return None
    if producer.op_type in ("Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape"):
        source = dims_of(prop, producer.inputs[0])
        if source is None or not all(
            prop.is_constant(v) for v in producer.inputs[1:] if v is not None
        ):
            return None
        others = [None if v is None else v.const_value.numpy() for v in producer.inputs[1:]]
        picked = run_node(producer, [np.arange(len(source), dtype=np.int64), *others], prop.opset)[
            0
        ]
        return [source[int(i)] for i in picked.reshape(-1)]
    return None


def _same_dim(prop: Propagation, x: ShapeEntry, y: ShapeEntry) -> bool:
    """Whether two traced dims stay equal under any pruning: run-time dims of axes without
    channels (the batch), or of axes with the very same classes; products of such."""
    if isinstance(x, ProductDim) and isinstance(y, ProductDim):
        return len(x.factors) == len(y.factors) and all(
            _same_dim(prop, f, g) for f, g in zip(x.factors, y.factors)
        )
    if not isinstance(x, RuntimeDim) or not isinstance(y, RuntimeDim):
        return False
    if not _reads_channels(prop, x) and not _reads_channels(prop, y):
        return True
    same = _channel_slices(prop, prop.labels(x.source), x.axis)
    return same is not None and same == _channel_slices(prop, prop.labels(y.source), y.axis)


def shape_pieces(
    value: ir.Value, shapes: dict[ir.Value, tuple[int, ...]] | None = None
) -> list[tuple[int, ir.Value]] | None:
    """A shape vector as (offset, piece) pieces: the inputs of the Concat that builds it, or the
    vector itself; None unless every piece has a known length (in `shapes`, the concrete shapes of
    the analysis, or its own). Constant pieces can be rewritten after pruning; the others are
    computed at run time."""
    producer = value.producer()
    pieces = (
        list(producer.inputs) if producer is not None and producer.op_type == "Concat" else [value]
    )
    result, offset = [], 0
    for piece in pieces:
        shape = None if piece is None else (shapes or {}).get(piece, piece.shape)
        if shape is None or len(shape) != 1 or not isinstance(shape[0], int):
            return None
        result.append((offset, piece))
        offset += shape[0]
    return result


def _check_slice_steps(prop: Propagation, node: ir.Node) -> None:
    if len(node.inputs) < 5 or node.inputs[4] is None:
        return
    labels = prop.labels(node.inputs[0])
    rank = labels.ndim
    axes = (
        _const(prop, node, 3).reshape(-1)
        if len(node.inputs) > 3 and node.inputs[3] is not None
        else np.arange(rank)
    )
    steps = _const(prop, node, 4).reshape(-1)
    for axis, step in zip(axes, steps):
        if step != 1 and labels.shape[axis % rank] > 1:
            raise NotHandled("strided slice across channels")
