"""The surgery: remove the planned classes from every member and rewrite channel-count constants.

Weights are sliced in place, never wrapped in Gather/Slice nodes on activations, so onnxruntime's
fusions (Conv+BN, Conv+activation, Gemm+bias) still apply to the smaller model.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from spa import rules
from spa.analysis import Analysis, Propagation
from spa.graph import constant, opset_version
from spa.io import Spill, release_pages
from spa.labels import axis_keeps, row_keeps, varying_axes
from spa.names import Names
from spa.normalize import infer_shapes
from spa.rules import rewrite, shape_pieces


def pruned_shapes(analysis: Analysis, removed: np.ndarray) -> dict[ir.Value, tuple[int, ...]]:
    """The shape every tensor will have once `removed` is applied, without touching the model."""
    surgery = _Surgery(analysis, np.asarray(removed, dtype=np.int64))
    shapes = dict(analysis.shapes)
    for value in analysis.carrying(surgery.removed) & analysis.activations.keys():
        if value in shapes:
            shapes[value] = tuple(surgery.dims(value))
    for value, keep in surgery.initializer_keeps().items():
        shapes[value] = tuple(int(k.sum()) for k in keep)
    return shapes


def signature_keeps(analysis: Analysis, removed: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Per-axis keep vectors of the graph inputs and outputs that lose channels (a key/value
    cache, --prune-cache), by name."""
    surgery = _Surgery(analysis, np.asarray(removed, dtype=np.int64))
    keeps = {value.name: surgery.activation_keeps(value) for value in analysis.cache}
    return {name: k for name, k in keeps.items() if not all(axis.all() for axis in k)}


def weight_keeps(analysis: Analysis, removed: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Per initializer name, the per-axis keep vectors the surgery will apply."""
    surgery = _Surgery(analysis, np.asarray(removed, dtype=np.int64))
    return {value.name: keep for value, keep in surgery.initializer_keeps().items()}


class SurgeryError(RuntimeError):
    """The plan cannot be carried out exactly. Always a bug in a rule: never written out."""


def apply(analysis: Analysis, removed: np.ndarray, spill: Spill | None = None) -> None:
    """Remove the classes `removed` (root labels) from `analysis.model`, in place. `spill`: where
    the cut weights go, one at a time, instead of memory."""
    if len(removed) == 0:
        return
    surgery = _Surgery(analysis, np.asarray(removed, dtype=np.int64))
    surgery.slice_members(spill)
    for node in list(analysis.model.graph):
        entry = rules.op_rule(node)
        if entry is not None and entry.rewrite is not None:
            entry.rewrite(surgery, node)
    surgery.rewrite_scaled_dims()
    for value in analysis.cache:  # --prune-cache: the key/value inputs and outputs lose heads
        keeps = surgery.activation_keeps(value)
        value.shape = ir.Shape(
            [d if k.all() else int(k.sum()) for d, k in zip(value.shape or (), keeps)]
        )
    common_passes.RemoveUnusedNodesPass()(analysis.model)
    infer_shapes(analysis.model)


class _Surgery:
    def __init__(self, analysis: Analysis, removed: np.ndarray):
        self.analysis = analysis
        self.removed = removed

    @functools.cached_property
    def names(self) -> Names:
        """Collected when the first name is needed: the planner builds a _Surgery per ratio
        tried."""
        return Names(self.analysis.model)

    def keeps(self, labels: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Per-axis keep vectors of a tensor whose elements carry `labels`."""
        return self.keeps_of(~self.analysis.removed_mask(labels, self.removed), shape)

    @staticmethod
    def keeps_of(mask: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
        """Per-axis keep vectors of a tensor of `shape` whose kept elements `mask` broadcasts
        to."""
        if mask.all():  # untouched (most tensors, for a plan that prunes one group)
            return [np.ones(size, dtype=bool) for size in shape]
        keeps = axis_keeps(mask)
        if keeps is None:
            raise SurgeryError("removal would not leave a sub-grid of a tensor")
        return [
            k if len(k) == size else np.full(size, bool(k.all())) for k, size in zip(keeps, shape)
        ]

    def activation_keeps(self, value: ir.Value) -> list[np.ndarray]:
        shape = self.analysis.shapes.get(value)
        if shape is None:
            raise SurgeryError(f"no shape known for '{value.name}'")
        labels = self.analysis.activations.get(value)
        if labels is None:
            return [np.ones(d, dtype=bool) for d in shape]
        if value in self.analysis.row_axes:  # copies of heads: as many from each, own positions
            mask = ~self.analysis.removed_mask(labels, self.removed)
            keeps = row_keeps(mask, self.analysis.row_axes[value])
            if keeps is None:
                raise SurgeryError(f"removal would leave the rows of '{value.name}' uneven")
            return [k if len(k) == d else np.full(d, bool(k.all())) for k, d in zip(keeps, shape)]
        return self.keeps(labels, shape)

    def dims(self, value: ir.Value) -> list[int]:
        return [int(k.sum()) for k in self.activation_keeps(value)]

    def initializer_keeps(self) -> dict[ir.Value, list[np.ndarray]]:
        """Per-axis keep vectors of every member initializer, all its roles combined (where its
        rows keep channels of their own, the first kept row's: see _compacted)."""
        return {value: keep for value, (keep, _) in self._initializers.items()}

    @functools.cached_property
    def _initializers(self) -> dict[ir.Value, tuple[list[np.ndarray], np.ndarray | None]]:
        """Per member initializer, its keep vectors and, where its rows keep channels at positions
        of their own (a grouped conv's weight), the mask that compacts it row by row."""
        members: dict[ir.Value, list] = {}
        for member in self.analysis.members:
            if varying_axes(member.labels):
                members.setdefault(member.value, []).append(member)
            else:
                members.setdefault(member.value, [])
        found = {}
        touched = self.analysis.carrying(self.removed)
        for value, own in members.items():
            shape = tuple(value.const_value.shape)
            if value not in touched:
                found[value] = ([np.ones(d, dtype=bool) for d in shape], None)
                continue
            masks = [~self.analysis.removed_mask(m.labels, self.removed) for m in own]
            keep = [np.ones(d, dtype=bool) for d in shape]
            grids = [axis_keeps(mask) for mask in masks]
            if all(g is not None for g in grids):
                for mask in masks:
                    for axis, k in enumerate(self.keeps_of(mask, shape)):
                        keep[axis] &= k
                found[value] = (keep, None)
                continue
            mask = np.ones(shape, dtype=bool)
            for m in masks:
                mask &= m
            keep = row_keeps(mask)
            if keep is None:
                raise SurgeryError(f"removal would leave the rows of '{value.name}' uneven")
            found[value] = (keep, mask)
        return found

    def slice_members(self, spill: Spill | None) -> None:
        for value, (keep, mask) in self._initializers.items():
            array = value.const_value.numpy()
            if mask is not None:  # row by row, C order: each row's kept elements in place
                array = array[mask].reshape([int(k.sum()) for k in keep])
            else:
                for axis, k in enumerate(keep):
                    if not k.all():
                        array = np.compress(k, array, axis=axis)
            if array.shape != tuple(value.const_value.shape):
                cut = ir.tensor(np.ascontiguousarray(array), name=value.name)
                release_pages([value])  # the original's weights, read for the cut
                value.const_value = cut
                value.shape = ir.Shape(array.shape)
                if spill is not None:
                    spill.hold([value])

    def set_constant(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Give `node` a new constant input: the old one may be shared with other nodes."""
        old = node.inputs[index] if index < len(node.inputs) else None
        if old is not None and np.array_equal(old.const_value.numpy(), array):
            return
        name = self.names.fresh(
            f"{old.name}_pruned"
            if old is not None and old.name
            else f"{node.name or node.op_type}_input{index}"
        )
        value = constant(name, array)
        self.analysis.model.graph.register_initializer(value)
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, value)

    def rewrite_scaled_dims(self) -> None:
        """`batch * count` shapes: the constant count becomes the pruned extent over the batch;
        `hidden / heads`: the head count left."""
        counts: dict[tuple[ir.Node, int], int] = {}
        for entry, value, axis in self.analysis.scaled_dims:
            extent = self.dims(value)[axis]
            if isinstance(entry, rules.DividedDim):
                count, per = extent, 1
            else:
                per = self.analysis.shapes[entry.source][entry.axis]
                count = extent // per
            if counts.setdefault((entry.node, entry.slot), count) != count or count * per != extent:
                raise SurgeryError(
                    f"a shared shape constant in {entry.node.name} would need two values"
                )
        for (node, slot), count in counts.items():
            old = node.inputs[slot].const_value.numpy()
            self.set_constant(node, slot, np.full_like(old, count))

    def changed(self, value: ir.Value) -> bool:
        return (
            value in self.analysis.activations
            and self.analysis.activations[value].any()
            and self.dims(value) != list(self.analysis.shapes[value])
        )


@rewrite("Conv", "ConvTranspose")
def _conv(s: _Surgery, node: ir.Node) -> None:
    groups = node.attributes.get_int("group", 1)
    weight = (
        node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    )
    if groups == 1 or weight is None or len(weight.shape) < 3 or not s.changed(node.inputs[0]):
        return
    if node.op_type == "Conv":
        new_groups = s.dims(node.inputs[0])[1] // weight.shape[1]
    else:
        new_groups = s.dims(node.outputs[0])[1] // weight.shape[1]
    if new_groups != groups:
        node.attributes["group"] = ir.AttrInt64("group", new_groups)


@rewrite("GroupNormalization")
def _group_norm(s: _Surgery, node: ir.Node) -> None:
    """Whole groups went (the analysis unites each group's channels): fewer groups, as wide; or,
    with --prune-hidden, as many channels from every group: as many groups, narrower."""
    groups = node.attributes.get_int("num_groups", 1)
    keep = s.activation_keeps(node.inputs[0])[1].reshape(groups, -1)
    if keep.all() or not keep.all(axis=1).any() and keep.any(axis=1).all():
        return  # nothing went, or as many from every group
    node.attributes["num_groups"] = ir.AttrInt64("num_groups", int(keep.all(axis=1).sum()))


@rewrite("Reshape")
def _reshape(s: _Surgery, node: ir.Node) -> None:
    out = node.outputs[0]
    if not s.changed(out):
        return
    old_out, new_out = s.analysis.shapes[out], s.dims(out)
    new_in = s.dims(node.inputs[0])
    allowzero = node.attributes.get_int("allowzero", 0)

    def entry(axis: int, old: int) -> int:
        if new_out[axis] == old_out[axis] or old == -1:
            return old
        if old == 0 and not allowzero and axis < len(new_in) and new_in[axis] == new_out[axis]:
            return old
        return new_out[axis]

    _rewrite_shape_vector(s, node, 1, entry, len(old_out))


@rewrite("Expand", "ConstantOfShape")
def _broadcast(s: _Surgery, node: ir.Node) -> None:
    """The shape's extents along the pruned axes (an Expand's 1s stay: they broadcast)."""
    out = node.outputs[0]
    if not s.changed(out):
        return
    old_out, new_out = s.analysis.shapes[out], s.dims(out)
    _rewrite_shape_vector(
        s,
        node,
        rules.SHAPE_INPUTS[node.op_type],
        lambda axis, old: old if old == 1 or new_out[axis] == old_out[axis] else new_out[axis],
        len(old_out),
    )


def _rewrite_shape_vector(s: _Surgery, node: ir.Node, index: int, entry, rank: int) -> None:
    """Rewrite a shape input entry by entry: a constant, or the constant pieces of a Concat.

    Entries align right with the output's axes (Reshape's shape has the output's rank anyway)."""
    value = node.inputs[index]
    if value.const_value is not None and value.is_initializer():
        old = value.const_value.numpy()
        s.set_constant(node, index, _rewritten(old, entry, rank - old.shape[0]))
        return
    concat = value.producer()
    pieces = shape_pieces(value, s.analysis.shapes)
    if concat is None or concat.op_type != "Concat":
        return  # a run-time vector that follows the pruning by itself
    length = sum(s.analysis.shapes.get(p, p.shape)[0] for _, p in pieces)
    new_inputs = list(concat.inputs)
    for slot, (offset, piece) in enumerate(pieces):  # by position: one constant may fill two slots
        if piece.const_value is not None:
            new_inputs[slot] = _rewritten(piece.const_value.numpy(), entry, rank - length + offset)
    if all(
        not isinstance(n, np.ndarray) or np.array_equal(n, p.const_value.numpy())
        for n, p in zip(new_inputs, concat.inputs)
    ):
        return
    # The Concat may feed other reshapes (torch shares one per layer): this node gets its own.
    own = ir.node(
        "Concat",
        list(concat.inputs),
        attributes={"axis": concat.attributes.get_int("axis", 0)},
        name=s.names.fresh(f"{concat.name or 'Concat'}_{node.name or node.op_type}"),
    )
    own.outputs[0].name = s.names.fresh(f"{value.name}_{node.name or node.op_type}")
    s.analysis.model.graph.insert_after(concat, own)
    node.replace_input_with(index, own.outputs[0])
    for slot, new in enumerate(new_inputs):
        if isinstance(new, np.ndarray):
            s.set_constant(own, slot, new)


def _rewritten(old: np.ndarray, entry, first_axis: int) -> np.ndarray:
    flat = [entry(first_axis + i, int(v)) for i, v in enumerate(old.reshape(-1))]
    return np.array(flat, dtype=old.dtype).reshape(old.shape)


@rewrite("Split")
def _split(s: _Surgery, node: ir.Node) -> None:
    x = node.inputs[0]
    if not s.changed(x):
        return
    rank = len(s.analysis.shapes[x])
    axis = node.attributes.get_int("axis", 0) % rank
    sizes = np.array([s.dims(o)[axis] for o in node.outputs], dtype=np.int64)
    if opset_version(s.analysis.model) >= 13:
        node.attributes.pop("num_outputs", None)
        s.set_constant(node, 1, sizes)
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())


@rewrite("Slice")
def _slice(s: _Surgery, node: ir.Node) -> None:
    x = node.inputs[0]
    if not s.changed(x) or not all(Propagation.is_constant(v) for v in node.inputs[1:3]):
        return  # starts and ends computed at run time take whole channel axes (rules.slice_)
    keeps = s.activation_keeps(x)
    rank = len(keeps)
    starts = node.inputs[1].const_value.numpy().copy()
    ends = node.inputs[2].const_value.numpy().copy()
    axes = (
        node.inputs[3].const_value.numpy()
        if len(node.inputs) > 3 and node.inputs[3] is not None
        else np.arange(len(starts))
    )
    for i, axis in enumerate(axes.reshape(-1)):
        keep = keeps[int(axis) % rank]
        if keep.all():
            continue
        size = len(keep)
        start, end = (int(v) + size if v < 0 else int(v) for v in (starts[i], ends[i]))
        start, end = min(max(start, 0), size), min(max(end, 0), size)
        starts[i] = keep[:start].sum()
        ends[i] = starts[i] + keep[start:end].sum()
    s.set_constant(node, 1, starts)
    s.set_constant(node, 2, ends)


@rewrite("Gather")
def _gather(s: _Surgery, node: ir.Node) -> None:
    x = node.inputs[0]
    if not s.changed(x):
        return
    keep = s.activation_keeps(x)[node.attributes.get_int("axis", 0) % len(s.analysis.shapes[x])]
    if keep.all():
        return
    indices = node.inputs[1].const_value.numpy()
    positions = np.where(indices < 0, indices + len(keep), indices)
    new_position = np.cumsum(keep) - 1
    kept = positions[keep[positions]] if positions.ndim else positions
    s.set_constant(node, 1, new_position[kept].astype(indices.dtype))


@rewrite("Resize")
def _resize(s: _Surgery, node: ir.Node) -> None:
    """Sizes, given as a constant or built at run time (a Concat of Shape pieces: SegFormer)."""
    out = node.outputs[0]
    if len(node.inputs) > 3 and node.inputs[3] is not None and s.changed(out):
        old_out, new_out = s.analysis.shapes[out], s.dims(out)
        _rewrite_shape_vector(
            s,
            node,
            3,
            lambda axis, old: new_out[axis] if new_out[axis] != old_out[axis] else old,
            len(old_out),
        )


@rewrite("LSTM", "GRU", "RNN")
def _recurrent(s: _Surgery, node: ir.Node) -> None:
    outputs = [o for o in node.outputs if o.name and o in s.analysis.activations]
    if outputs and s.changed(outputs[0]):
        node.attributes["hidden_size"] = ir.AttrInt64("hidden_size", s.dims(outputs[0])[-1])
