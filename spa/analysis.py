"""Find the coupled channels of a normalized model.

Every layer that creates channels (Conv, Gemm, MatMul with a weight, ...) opens a *space*: a fresh
range of labels, one per output channel. The labels flow through the graph in topological order,
each op moving or coupling them by its rule (spa.rules). Coupled labels are united; what ends in one
set is one *class*: channels that must be removed together. Spaces that share classes form a
*group*, the unit that the score and the plan work on.

The parameters that belong to channels are recorded as *members*: an initializer and a label array
that says which class each of its elements belongs to. Removing classes then means slicing every
member, and rewriting the few ops whose constants spell out channel counts.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from spa import rules
from spa.graph import is_default_domain, opset_version
from spa.labels import LabelSets, compress, varying_axes
from spa.shapes import concrete_shapes

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Space:
    """The output channels of one layer."""

    node: str
    op: str
    labels: np.ndarray  # 1-D, one label per channel


@dataclasses.dataclass
class Member:
    """An initializer whose elements belong to channels: `labels` broadcasts to its shape."""

    value: ir.Value
    labels: np.ndarray
    node: str


@dataclasses.dataclass
class Normalization:
    """An op that computes statistics over channels (LayerNorm, a mean over the channel axis):
    those channels stay, unless hidden-size pruning is asked for (lossy)."""

    node: str
    op: str
    channels: int


@dataclasses.dataclass
class Kept:
    """A node whose rule keeps the channels that reach it, and why (they meet a tensor that does
    not follow them, the op works across them, their weight is used elsewhere)."""

    node: str
    op: str
    reason: str


@dataclasses.dataclass
class Barrier:
    node: str
    op: str
    reason: str
    blocked: bool  # whether channels reached it (and were therefore pinned)


@dataclasses.dataclass
class EqualCounts:
    """Blocks of channels that must each lose as many, at positions of their own: a grouped conv's
    groups (the op takes as many channels from each). `blocks` holds, per block, the removable
    classes that lie in that block alone, all of `channels` channels there; classes spread evenly
    over every block are free (each removal takes the same from all)."""

    node: str
    blocks: list[np.ndarray]  # per block, root labels, sorted
    channels: int  # channels of each of those classes in its block
    labels: np.ndarray = dataclasses.field(repr=False)  # blocks x positions, as the rule gave them
    # per block, classes that go only with all of its own (a key/value head and its copies for
    # the query heads); empty: none
    owners: list[np.ndarray] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Group:
    """Channels coupled across one or more layers: the unit of scoring and planning."""

    id: int
    classes: np.ndarray  # root labels of the removable classes, sorted
    pinned: int  # classes of the group's spaces that can never be removed
    spaces: list[int]
    channels_per_class: int = 1  # head dim for attention heads, groups for a grouped conv
    heads: bool = False  # the classes are attention heads
    lossy: bool = False  # removing them changes a normalization's statistics (hidden size)
    # classes that go only with all the classes of a block of theirs (EqualCounts.owners: a
    # key/value head with its query heads); not among `classes`, not counted by the ratio
    owners: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def width(self) -> int:
        return len(self.classes) + self.pinned


@dataclasses.dataclass
class Analysis:
    model: ir.Model
    sets: LabelSets
    spaces: list[Space]
    members: list[Member]
    activations: dict[ir.Value, np.ndarray]  # compressed label arrays of activations
    shapes: dict[ir.Value, tuple[int, ...]]  # concrete shapes used by the analysis
    barriers: list[Barrier]
    normalizations: list[Normalization]
    segments: list[np.ndarray]  # label sets of which at least one class must stay
    kept: list[Kept] = dataclasses.field(default_factory=list)
    # graph inputs and outputs that may lose channels (a key/value cache, --prune-cache)
    cache: list[ir.Value] = dataclasses.field(default_factory=list)
    scaled_dims: list = dataclasses.field(default_factory=list)  # run-time `dim * count` shapes
    equal_counts: list[EqualCounts] = dataclasses.field(default_factory=list)
    # activations whose rows (this axis) keep as many elements each, at positions of their own
    row_axes: dict[ir.Value, int] = dataclasses.field(default_factory=dict)
    groups: list[Group] = dataclasses.field(default_factory=list)
    _by_name: dict[str, list[Member]] | None = dataclasses.field(default=None, repr=False)
    _removed: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)
    _found: dict[int, tuple[np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, repr=False
    )
    _carriers: dict[int, list] | None = dataclasses.field(default=None, repr=False)

    def removed_mask(self, labels: np.ndarray, removed: np.ndarray) -> np.ndarray:
        """True where a label belongs to a removed class."""
        if self._removed is None or self._removed[0] is not removed:
            table = np.zeros(len(self.sets), dtype=bool)  # a lookup per label, not a search
            table[removed] = True
            table[0] = False
            self._removed = (removed, table)
        return self._removed[1][self._roots(labels)]

    def carrying(self, removed: np.ndarray) -> set:
        """The activations and member initializers whose labels hold a class of `removed`: the
        only tensors a plan changes (a sensitivity trial cuts one group; the other thousands of
        tensors of a transformer cost a keep vector each, 18 s of SmolLM2's 360 trials)."""
        if self._carriers is None:
            self._carriers = {}
            labelled = [*self.activations.items(), *((m.value, m.labels) for m in self.members)]
            for value, labels in labelled:
                for root in np.unique(self._roots(labels)).tolist():
                    self._carriers.setdefault(root, []).append(value)
        return {v for c in np.unique(removed).tolist() for v in self._carriers.get(c, ())}

    def _roots(self, labels: np.ndarray) -> np.ndarray:
        """sets.find(labels), kept per label array: a plan, a count of a planned prune and every
        sensitivity trial ask again for the same arrays (the sets no longer change)."""
        cached = self._found.get(id(labels))
        if cached is None or cached[0] is not labels:
            cached = self._found[id(labels)] = (labels, self.sets.find(labels))
        return cached[1]

    def group_of(self) -> dict[int, int]:
        """Group id of every removable class, owners included."""
        return {int(c): g.id for g in self.groups for c in [*g.classes, *g.owners]}

    def member_names(self) -> dict[int, list[str]]:
        """Per group id, the initializers that hold its channels' parameters: one pass over the
        members, however many groups."""
        group_of = self.group_of()
        names: dict[int, dict[str, None]] = {g.id: {} for g in self.groups}
        for m in self.members:
            for root in np.unique(self.sets.find(m.labels)).tolist():
                if root in group_of:
                    names[group_of[root]][m.value.name] = None
        return {g: list(found) for g, found in names.items()}

    def members_named(self, name: str) -> list[Member]:
        """The member records of the initializer called `name`: a layer's identity in every copy
        of the model (`statistics.Consumer`)."""
        if self._by_name is None:
            self._by_name = {}
            for m in self.members:
                self._by_name.setdefault(m.value.name, []).append(m)
        return self._by_name.get(name, [])


class Propagation:
    """The state that op rules read and write while labels flow through the graph."""

    def __init__(
        self,
        model: ir.Model,
        shapes: dict[ir.Value, tuple[int, ...]],
        lossy: bool = False,
        cache: bool = False,
    ):
        self.model = model
        self.lossy = lossy  # let statistics over channels change (hidden-size pruning)
        self.cache = cache  # let key/value cache inputs and outputs lose heads
        self.cache_values: list[ir.Value] = []  # the graph inputs and outputs that may change
        self.lossy_labels: list[np.ndarray] = []
        self.normalizations: list[Normalization] = []
        self.kept: list[Kept] = []
        self._open: set[int] = set()  # open_labels
        self.opset = opset_version(model)
        self.shapes = shapes
        self.sets = LabelSets()
        self.spaces: list[Space] = []
        self.members: list[Member] = []
        self.activations: dict[ir.Value, np.ndarray] = {}
        self.barriers: list[Barrier] = []
        self.segments: list[np.ndarray] = []
        self.heads: list[np.ndarray] = []  # labels of the batch axes of activation matmuls
        # (node, blocks x labels, owner labels per block or None)
        self.equal_count_blocks: list[tuple[ir.Node, np.ndarray, np.ndarray | None]] = []
        self.row_axes: dict[ir.Value, int] = {}  # Analysis.row_axes
        self.scaled_dims: list = []  # (rules.ScaledDim, output value, axis): constants to rewrite
        self._param_uses: dict[ir.Value, set[tuple[ir.Node, int]]] = {}
        self._members_of: dict[ir.Value, list[Member]] = {}
        self._ruled: set[ir.Node] = set()  # nodes whose rule covered them
        self._barrier_nodes: set[ir.Node] = set()

    # -- reading
    def shape(self, value: ir.Value) -> tuple[int, ...] | None:
        return self.shapes.get(value)

    def labels(self, value: ir.Value) -> np.ndarray:
        """The compressed labels of an activation; zeros for constants and unlabelled values."""
        if value in self.activations:
            return self.activations[value]
        shape = self.shapes.get(value, ())
        return np.zeros((1,) * len(shape), dtype=np.int64)

    @staticmethod
    def is_constant(value: ir.Value | None) -> bool:
        return (
            value is not None
            and value.const_value is not None
            and value.is_initializer()
            and not value.is_graph_input()
        )

    # -- writing
    def attention_heads(self, labels: np.ndarray) -> None:
        """`labels` are an activation matmul's output: its batch axes are attention heads, which
        go whole (spa.analysis._groups)."""
        self.heads.append(labels)

    def mark_lossy(self, labels: np.ndarray) -> None:
        """Channels a normalization computes statistics over, pruned anyway (--prune-hidden)."""
        self.lossy_labels.append(labels)

    def equal_counts(
        self, node: ir.Node, blocks: np.ndarray, owners: np.ndarray | None = None
    ) -> None:
        """Each row of `blocks` (labels) must lose as many channels, at positions of its own
        (resolved once every coupling is known: EqualCounts, resolve_equal_counts). owners: per
        row, a label whose class goes only with the whole row, which may then go (else no row
        may lose every channel)."""
        self.equal_count_blocks.append((node, blocks, owners))
        if owners is None:
            for row in blocks:
                self.keep_one_of(row)

    def resolve_equal_counts(self) -> list[EqualCounts]:
        """The equal-count constraints the planner can honour, once every coupling is known.
        Classes that lie in two blocks unevenly stay (a channel shuffle whose unit crosses a group
        boundary: ShuffleNet V1 with 3 groups of 80); where that would leave a block fewer than two
        classes of its own, or the classes differ in size, or a class is bound by two constraints
        that partition it differently, the blocks lose the same positions instead (a union: what
        every grouped conv did before). Each change is looked at again from the start."""
        while True:
            resolved: list[EqualCounts] = []
            bound: dict[int, int] = {}  # class -> index in resolved of the constraint it is in
            for node, blocks, owners in self.equal_count_blocks:
                found, uneven = _local_classes(self.sets, node, blocks)
                if found is not None and len(uneven) and min(map(len, found.blocks)) >= 2:
                    self.keep(
                        uneven,
                        node,
                        "they lie across two of its groups, which must keep as many channels",
                    )
                    break
                if found is not None and owners is not None:
                    found.owners = _owners(self.sets, owners, found)
                if found is None or len(uneven) or found.owners is None:
                    _fall_back(self.sets, blocks, owners)
                    break
                if not any(len(b) for b in found.blocks):
                    continue
                local = [int(c) for b in found.blocks for c in b]
                earlier = {bound[c] for c in local if c in bound}
                if not earlier:
                    bound.update(dict.fromkeys(local, len(resolved)))
                    resolved.append(found)
                    continue
                # the same partition met twice (a residual stream through grouped convs; the keys'
                # and the values' copies of grouped-query attention): one, with both's owners
                if len(earlier) == 1 and _merged(resolved[earlier.pop()], found):
                    continue
                _fall_back(self.sets, blocks, owners)
                break
            else:
                return resolved

    def keep_one_of(self, labels: np.ndarray) -> None:
        """At least one of these classes must stay (a slice of channels must not become empty)."""
        if labels.any():
            self.segments.append(np.unique(labels[labels != 0]))

    def scaled_dim(self, entry, value: ir.Value, axis: int) -> None:
        """A run-time shape element `entry` (rules.ScaledDim) spells `value`'s channel count along
        `axis`: the surgery rewrites its constant factor."""
        self.scaled_dims.append((entry, value, axis))

    def new_space(self, node: ir.Node, width: int) -> np.ndarray:
        labels = self.sets.new(width)
        self.spaces.append(Space(node.name or "", node.op_type, labels))
        self.segments.append(labels)
        return labels

    def set(self, value: ir.Value, labels: np.ndarray) -> None:
        """Record an activation's labels."""
        labels = compress(np.asarray(labels, dtype=np.int64))
        if not varying_axes(labels) and labels.size and labels.flat[0] != 0:
            if value.producer() is not None:
                self.keep(labels, value.producer(), "one channel is the whole tensor")
            else:
                self.sets.pin(labels)
            labels = np.zeros_like(labels)
        if value.is_graph_output() and value.producer() is not None:
            if self._extends_a_cache(value):
                self.cache_values.append(value)
            else:
                self.keep(labels, value.producer(), f"they reach the graph output '{value.name}'")
        self.activations[value] = labels

    def adopt_cache(self, value: ir.Value, labels: np.ndarray) -> None:
        """A graph input that a layer's keys or values are appended to (a past key/value cache)
        takes their channels (--prune-cache)."""
        self.activations[value] = labels
        self.cache_values.append(value)

    def _extends_a_cache(self, value: ir.Value) -> bool:
        """Whether a graph output is a cache input with new keys or values appended."""
        producer = value.producer()
        return (
            self.cache
            and producer is not None
            and producer.op_type == "Concat"
            and any(v in self.cache_values for v in producer.inputs)
        )

    def _keep_sub_grids(self) -> None:
        """Removals must leave every tensor a sub-grid.

        Labels that vary along two or more axes (a channel axis split into groups x channels, heads
        x head dims, a concat along a spatial axis) could lose an arbitrary subset of elements. Once
        all couplings are known, keep the axis with the most distinct classes and unite the labels
        along the others: a channel shuffle prunes the same inner channel in every group; attention,
        whose matmuls made each head one class, keeps heads whole."""
        for value, labels in list(self.activations.items()):
            axes = varying_axes(labels)
            if len(axes) >= 2 and value not in self.row_axes:
                keep = max(reversed(axes), key=lambda a: self._distinct_slices(labels, a))
                self.unite_along(labels, [a for a in axes if a != keep], value.producer())

    def unite_along(self, labels: np.ndarray, axes: list[int], where: ir.Node | None) -> None:
        """Unite the labels that differ only along `axes`; channels that share a slice with
        elements of no channel (a graph input, a constant beside them) are kept, and say why."""
        if not axes:
            return
        others = [a for a in range(labels.ndim) if a not in axes]
        rows = np.transpose(labels, others + list(axes)).reshape(
            int(np.prod([labels.shape[a] for a in others])), -1
        )
        mixed = rows[(rows == 0).any(axis=1) & rows.any(axis=1)]
        if mixed.size and where is not None:
            self.keep(
                mixed,
                where,
                "it holds them beside elements of no channel (a graph input, a constant) along "
                "another axis",
            )
        self.sets.union_along(labels, axes)

    def _distinct_slices(self, labels: np.ndarray, axis: int) -> int:
        roots = self.sets.find(np.moveaxis(labels, axis, 0).reshape(labels.shape[axis], -1))
        return len({tuple(np.unique(row)) for row in roots})

    def member(self, node: ir.Node, index: int, labels: np.ndarray) -> None:
        """Input `index` of `node` is an initializer whose elements belong to `labels`."""
        value = node.inputs[index]
        labels = compress(np.asarray(labels, dtype=np.int64))
        shape = tuple(value.const_value.shape)
        if labels.ndim != len(shape) or any(n not in (1, d) for n, d in zip(labels.shape, shape)):
            raise rules.NotHandled(
                f"parameter '{value.name}' {list(shape)} does not match its channels"
            )
        self._param_uses.setdefault(value, set()).add((node, index))
        if not labels.any():
            return
        same = self._members_of.setdefault(value, [])
        for m in same:
            if varying_axes(m.labels) == varying_axes(labels):
                self.sets.union(m.labels, labels)  # a weight shared by two layers ties them
                return
        same.append(Member(value, labels, node.name or ""))
        self.members.append(same[-1])

    def open_labels(self, width: int) -> np.ndarray:
        """Classes of an axis that constants vary along before any channel reaches it: they
        join the channels they meet (rules._open_a_constant_axis)."""
        labels = self.sets.new(width)
        self._open.update(labels.tolist())
        return labels

    def is_open(self, labels: np.ndarray | None) -> bool:
        """Whether `labels` hold open classes only (by label, whatever they were united with
        since: meet writes a layer's labels where both meet)."""
        if labels is None or not labels.any():
            return False
        return all(int(label) in self._open for label in np.unique(labels[labels != 0]))

    def keep(self, labels: np.ndarray, where: ir.Node | Member, reason: str) -> None:
        """Pin `labels` where a node (or a layer's weight) cannot follow their removal; `spa
        analyze` lists the reason (once, where channels not already kept reach it; open classes
        are no layer's channels)."""
        live = labels[labels != 0]
        if live.size and not self.sets.pinned(live).all() and not self.is_open(labels):
            if isinstance(where, Member):
                self.kept.append(Kept(where.node, "weight", reason))
            else:
                self.kept.append(Kept(where.name or "", _op_name(where), reason))
        self.sets.pin(labels)

    def normalized(self, node: ir.Node, channels: int) -> None:
        """`node` computes statistics over `channels` channels, which therefore stay."""
        self.normalizations.append(Normalization(node.name or "", _op_name(node), int(channels)))

    def barrier(self, node: ir.Node, reason: str) -> None:
        """Leave the node alone: pin every channel that reaches it; its outputs carry none. (The
        channel counts it reads at run time are pinned by _pin_channel_count_reads.)"""
        touched = [self.labels(v) for v in node.inputs if v is not None]
        blocked = any(t.any() for t in touched)
        for t in touched:
            self.sets.pin(t)
        for out in node.outputs:
            if out.name:
                shape = self.shapes.get(out, ())
                self.activations[out] = np.zeros((1,) * len(shape), dtype=np.int64)
        self.barriers.append(Barrier(node.name or "", _op_name(node), reason, blocked))
        self._barrier_nodes.add(node)

    # -- the walk
    def run(self) -> None:
        graph = self.model.graph
        for node in graph:
            rule = rules.op_rule(node)
            inputs = [v for v in node.inputs if v is not None]
            if not any(self.labels(v).any() for v in inputs) and not rules.creates_channels(
                node, self
            ):
                # No channels reach it: nothing to couple, whatever the op.
                for out in node.outputs:
                    if out.name:
                        self.activations[out] = np.zeros(
                            (1,) * len(self.shapes.get(out, ())), dtype=np.int64
                        )
                if rule is None:
                    self.barriers.append(
                        Barrier(node.name or "", _op_name(node), "unsupported op", False)
                    )
                continue
            if rule is None:
                self.barrier(node, "unsupported op")
            elif any(v not in self.shapes for v in inputs) or any(
                out.name and out not in self.shapes
                for out in node.outputs
                if out.uses() or out.is_graph_output()
            ):
                self.barrier(node, "shape unknown")
            else:
                self._apply_rule(rule.analyze, node)
        self._pin_channel_count_reads()
        self._keep_sub_grids()
        self._pin_foreign_uses()
        self._pin_subgraph_captures()

    def _apply_rule(self, rule, node: ir.Node) -> None:
        """Run a rule; if it does not cover the node (or fails on an odd one), the node becomes a
        barrier and whatever the rule recorded for it is pinned: never half-understood."""
        members, spaces = len(self.members), len(self.spaces)
        try:
            rule(self, node)
        except rules.NotHandled as e:
            reason = str(e)
        except Exception as e:  # an odd node (bad attributes, mismatched shapes): leave it alone
            logger.info("rule for %s (%s) failed: %s", node.name, node.op_type, e)
            reason = f"not understood ({type(e).__name__})"
        else:
            self._ruled.add(node)
            return
        for m in self.members[members:]:
            self.sets.pin(m.labels)
        for s in self.spaces[spaces:]:
            self.sets.pin(s.labels)
        self.barrier(node, reason)

    def _pin_channel_count_reads(self) -> None:
        """A Shape or Size read at run time changes when channels go. Through integer shape
        arithmetic it may reach only the shape inputs whose rules checked that they follow the
        pruning (Reshape, Expand, Resize); anything else that computes with it (a Div by
        `x.size(1)`, a ConstantOfShape summed up, a Range, a barrier) would silently change, so the
        channels it reads stay."""
        for node in self.model.graph:
            if node.op_type not in ("Shape", "Size") or not is_default_domain(node):
                continue
            # of the input's rank, or none where its shape is unknown
            labels = self.labels(node.inputs[0])
            if not any(labels.shape[a] > 1 for a in _axes_read(node, labels.ndim)):
                continue
            for user, value in self._unchecked_uses(node.outputs[0]):
                pinned = list(
                    dict.fromkeys(
                        t for t, axis in self._dims_read(value) if self.labels(t).shape[axis] > 1
                    )
                )
                for tensor in pinned:
                    self.sets.pin(self.labels(tensor))
                if pinned and user not in self._barrier_nodes:
                    why = (
                        f"computes with the channel count of '{pinned[0].name}' read at run "
                        f"time ({node.op_type}); those channels stay"
                    )
                    self.barriers.append(Barrier(user.name or "", _op_name(user), why, True))
                    self._barrier_nodes.add(user)

    def _unchecked_uses(self, shape: ir.Value) -> list[tuple[ir.Node, ir.Value]]:
        """The nodes that use the run-time shape vector `shape` other than through shape
        arithmetic into a checked shape input, each with the value it uses."""
        found, stack, seen = [], [shape], set()
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            if value.is_graph_output():
                found.append((value.producer(), value))
            for use in value.uses():
                user = use.node
                if user.graph is not self.model.graph:
                    found.append((user, value))  # a subgraph reads it
                elif use.idx in rules.CHECKED_INPUTS.get(user.op_type, ()) and user in self._ruled:
                    continue
                elif all(self._is_shape_vector(out) for out in user.outputs if out.name):
                    stack.extend(out for out in user.outputs if out.name)
                else:
                    found.append((user, value))
        return found

    def _dims_read(self, value: ir.Value) -> list[tuple[ir.Value, int]]:
        """The (tensor, axis) dims that a run-time shape vector is computed from: exactly those
        its elements pick where rules.dims_of can trace them, else every dim read by the Shape
        and Size nodes the arithmetic starts from."""
        found, stack, seen = [], [value], set()
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            dims = rules.dims_of(self, value)
            producer = value.producer()
            if dims is not None:
                found += [read for d in dims for read in getattr(d, "reads", ())]
            elif producer is not None and producer.op_type == "Size":
                source = producer.inputs[0]
                found += [(source, a) for a in range(len(self.shape(source)))]
            elif producer is not None:
                stack.extend(
                    v for v in producer.inputs if v is not None and self._is_shape_vector(v)
                )
        return found

    def _is_shape_vector(self, value: ir.Value) -> bool:
        shape = self.shapes.get(value, value.shape)
        return value.dtype in _SHAPE_TYPES and shape is not None and len(shape) <= 1

    def _pin_foreign_uses(self) -> None:
        # A weight used anywhere the rules did not account for (a barrier, a second role)
        # stays whole.
        for m in self.members:
            uses = {(u.node, u.idx) for u in m.value.uses()}
            if not uses <= self._param_uses.get(m.value, set()) or m.value.is_graph_output():
                others = sorted({u.node.name or u.node.op_type for u in m.value.uses()} - {m.node})
                self.keep(
                    m.labels,
                    m,
                    f"'{m.value.name}' is also read by {', '.join(others) or 'a graph output'}",
                )

    def _pin_subgraph_captures(self) -> None:
        for node in self.model.graph:
            for attr in node.attributes.values():
                if attr.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    continue
                graphs = attr.value if isinstance(attr.value, list) else [attr.value]
                for sub in graphs:
                    for inner in ir.traversal.RecursiveGraphIterator(sub):
                        for v in inner.inputs:
                            if v in self.activations:
                                self.keep(self.activations[v], node, f"a subgraph reads '{v.name}'")


_SHAPE_TYPES = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL)


def _axes_read(node: ir.Node, rank: int) -> range:
    """The axes of its input whose sizes a Shape or Size node reads."""
    if node.op_type == "Size":
        return range(rank)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    return range(rank)[slice(start, end)]


def _op_name(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if not is_default_domain(node) else node.op_type


def analyze(
    model: ir.Model,
    input_shapes: dict[str, list[int]] | None = None,
    prune_hidden: bool = False,
    prune_cache: bool = False,
) -> Analysis:
    """Analyze a normalized model (see spa.normalize). prune_hidden: let channels go that
    normalizations (LayerNorm, RMSNorm) compute statistics over; lossy, so off by default.
    prune_cache: let a decoder's key/value cache inputs and outputs lose the heads they carry (the
    model's signature changes)."""
    shapes = concrete_shapes(model, input_shapes or {})
    prop = Propagation(model, shapes, lossy=prune_hidden, cache=prune_cache)
    prop.run()
    analysis = Analysis(
        model=model,
        sets=prop.sets,
        spaces=prop.spaces,
        members=prop.members,
        activations=prop.activations,
        shapes=shapes,
        barriers=prop.barriers,
        normalizations=prop.normalizations,
        segments=prop.segments,
        kept=prop.kept,
        scaled_dims=prop.scaled_dims,
        cache=prop.cache_values,
        row_axes=prop.row_axes,
    )
    while True:  # a fallback union in resolve_equal_counts can merge groups: until none does
        analysis.equal_counts = prop.resolve_equal_counts()
        analysis.groups = _groups(analysis, prop.heads, prop.lossy_labels)
        group_of = {int(c): g.id for g in analysis.groups for c in g.classes}
        spread = [
            e
            for e in analysis.equal_counts
            if len({group_of[int(c)] for b in e.blocks for c in b}) > 1
        ]
        if not spread:
            return analysis
        for e in spread:  # blocks in two groups: their plans are not made together
            raw = next(r for r in prop.equal_count_blocks if r[1] is e.labels)
            _fall_back(prop.sets, e.labels, raw[2])


def _local_classes(
    sets: LabelSets, node: ir.Node, blocks: np.ndarray
) -> tuple[EqualCounts | None, np.ndarray]:
    """The constraint's classes by block (None where their sizes differ), and the classes that lie
    in two or more blocks unevenly (a channel shuffle's unit across a group boundary)."""
    roots = sets.find(blocks)
    classes, inverse = np.unique(roots, return_inverse=True)
    counts = np.zeros((len(classes), len(blocks)), dtype=np.int64)
    np.add.at(counts, (inverse.reshape(roots.shape), np.arange(len(blocks))[:, None]), 1)
    local: list[list[int]] = [[] for _ in blocks]
    sizes, uneven = set(), []
    for c, row in zip(classes.tolist(), counts):
        if c == 0 or (row == row[0]).all():
            continue  # pinned, or spread evenly: every removal takes the same from each block
        inside = np.flatnonzero(row)
        if len(inside) > 1:
            uneven.append(c)
            continue
        local[inside[0]].append(c)
        sizes.add(int(row[inside[0]]))
    uneven_classes = np.array(uneven, dtype=np.int64)
    if len(sizes) > 1:
        return None, uneven_classes
    blocks_found = [np.array(b, dtype=np.int64) for b in local]
    return EqualCounts(node.name or "", blocks_found, max(sizes, default=1), blocks), uneven_classes


def _owners(sets: LabelSets, owners: np.ndarray, found: EqualCounts) -> list[np.ndarray] | None:
    """Per block, the classes of its owner labels; None where blocks share one or an owner is
    one of the blocks' own classes."""
    classes = [np.setdiff1d(sets.find(np.atleast_1d(o)), [0]) for o in owners]
    every = np.concatenate(classes + [np.zeros(0, np.int64)])
    local = np.concatenate(found.blocks + [np.zeros(0, np.int64)])
    if len(np.unique(every)) != len(every) or np.isin(every, local).any():
        return None
    return classes


def _merged(a: EqualCounts, b: EqualCounts) -> bool:
    """Whether b partitions a's classes the same way; if so a takes b's owners too."""
    index = {frozenset(x.tolist()): i for i, x in enumerate(a.blocks)}
    if a.channels != b.channels or set(index) != {frozenset(x.tolist()) for x in b.blocks}:
        return False
    if b.owners:
        owners = a.owners or [np.zeros(0, np.int64) for _ in a.blocks]
        for block, extra in zip(b.blocks, b.owners):
            i = index[frozenset(block.tolist())]
            owners[i] = np.union1d(owners[i], extra)
        a.owners = owners
    return True


def _fall_back(sets: LabelSets, blocks: np.ndarray, owners: np.ndarray | None) -> None:
    """Where counts cannot be kept: the blocks lose the same positions, or, with owners, each
    block goes with its owner whole."""
    if owners is None:
        _same_positions(sets, blocks)
    else:
        sets.union(blocks, np.asarray(owners).reshape(len(blocks), -1)[:, :1])


def _same_positions(sets: LabelSets, blocks: np.ndarray) -> None:
    sets.union(blocks, blocks[:1])


def _groups(analysis: Analysis, heads: list[np.ndarray], lossy: list[np.ndarray]) -> list[Group]:
    """Spaces that share a class form one group."""
    sets = analysis.sets
    owner = np.arange(len(analysis.spaces))

    def top(i: int) -> int:
        while owner[i] != i:
            owner[i] = owner[owner[i]]
            i = owner[i]
        return i

    first_space: dict[int, int] = {}
    for s, space in enumerate(analysis.spaces):
        for root in np.unique(sets.find(space.labels)).tolist():
            if root == 0:
                continue
            if root in first_space:
                a, b = top(first_space[root]), top(s)
                owner[max(a, b)] = min(a, b)
            else:
                first_space[root] = s
    for e in analysis.equal_counts:  # an owner is planned with the classes that go before it
        for block, owners in zip(e.blocks, e.owners):
            spaces = [
                first_space[c] for c in [*block.tolist(), *owners.tolist()] if c in first_space
            ]
            for other in spaces[1:]:
                a, b = top(spaces[0]), top(other)
                owner[max(a, b)] = min(a, b)
    by_top: dict[int, list[int]] = {}
    for s in range(len(analysis.spaces)):
        by_top.setdefault(top(s), []).append(s)
    groups = []

    def roots_of(arrays: list[np.ndarray]) -> set[int]:
        return (
            set(np.unique(np.concatenate([sets.find(h.ravel()) for h in arrays])).tolist())
            if arrays
            else set()
        )

    head_roots, lossy_roots = roots_of(heads), roots_of(lossy)
    owner_roots = np.unique(
        np.concatenate([o for e in analysis.equal_counts for o in e.owners] + [np.zeros(0, int)])
    )
    for members in by_top.values():
        roots = np.concatenate([sets.find(analysis.spaces[s].labels) for s in members])
        classes = np.unique(roots[roots != 0])
        owners = classes[np.isin(classes, owner_roots)]
        classes = classes[~np.isin(classes, owner_roots)]
        if len(classes) == 0:
            continue
        first = sets.find(analysis.spaces[members[0]].labels)
        per_class = max(1, len(first) // max(1, len(np.unique(first))))
        pinned = (
            max(int((sets.find(analysis.spaces[s].labels) == 0).sum()) for s in members)
            // per_class
        )
        listed = classes.tolist()
        groups.append(
            Group(
                len(groups),
                classes,
                pinned,
                members,
                per_class,
                bool(head_roots.intersection(listed)),
                bool(lossy_roots.intersection(listed)),
                owners,
            )
        )
    return groups
