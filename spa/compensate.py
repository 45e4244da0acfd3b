"""Repair the layers that lost inputs, so that a pruned model keeps its accuracy without training.

Every consumer (spa.statistics) is refit, in graph order, so that on the calibration inputs its
outputs match the original model's: least squares from the features it now reads (in the pruned
model, upstream layers already refit) to the outputs it gave in the original model. A constant 1
among the features makes the bias part of the fit, so the mean of a removed channel moves into the
bias (a bias is added where the layer had none). The ridge term pulls towards the original weights
of the kept inputs:

    W' = (W C^T + lambda W_S) (P + lambda I)^-1,  P = E[x_p x_p^T],  C = E[x_p x_o^T]

so where the removed inputs were zero and nothing upstream changed, W' = W_S exactly.

Where the layer's output is added to a residual branch (a block's last layer: a projection conv,
an attention or FFN output projection), it reproduces the original sum instead: its target gains
r_o - r_p, what the branch lost upstream, so that every block ends where the original did and
error does not pile up through depth (SmolLM2-135M at 0.85 of the MACs: perplexity 1.158x ->
1.140x the original's). Lambda is chosen per layer by cross-validation between two halves of the
calibration rows (real ones, not synthetic): how far a fit carries beyond its samples is a
property of the data, not of the row count (a conv's rows are patches of few images). A layer
too wide for these matrices (statistics.MAX_WIDTH) keeps W_S, and its bias moves so that its mean
output matches the original's: b' = b + W m_o - W_S m_p.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from spa.graph import constant
from spa.io import Spill, release_pages
from spa.names import Names
from spa.options import DAMPING
from spa.progress import Progress
from spa.statistics import Consumer, Forward, Kind, Means, Moments, one_blas_thread, pool

# Cross-validate lambda (damping times 1, 10, 100, 1000) on every layer of at most CV_FEATURES
# features (the solves stay cheap). Measured: a random-weight MobileNetV3-Small whose
# squeeze-excite convs and head see 256 rows for up to 512 features fit the calibration inputs to
# 0.2 relative error but held-out ones to 2.9, worse than no refit (1.0); EfficientNet-Lite0 refit
# from 224 crops of 10 photos (7,168 rows for its 1x1 convs, 6 per feature and more) kept top-1
# agreement 0.703 on ImageNet images at 0.8 of the MACs with the least ridge, 0.752 with the
# ridge cross-validated on every layer.
CV_FEATURES = 2048
CV_OUTPUTS = 64  # outputs the cross-validation judges by (_cross_validated)


class _Halves:
    """A consumer's Moments over two halves of the calibration rows: pooled for the fit, apart to
    cross-validate the ridge. Every batch is split (its first and last rows: whole samples, rows
    being sample-major), so that one batch of calibration data still cross-validates: with whole
    batches alternating, a single one left a half empty and the ridge at its least, and a refit
    from 28 sequences of 48 tokens made SmolLM2 worse than no refit (1.66x against 1.52x the
    original's perplexity at 0.85 of the MACs)."""

    def __init__(self) -> None:
        self.halves = (Moments(), Moments())

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        middle = len(x) // 2
        if middle:
            self.halves[0].add(x[:middle], y[:middle])
        self.halves[1].add(x[middle:], y[middle:])

    @property
    def count(self) -> int:
        return sum(h.count for h in self.halves)

    def mean_gram(self) -> np.ndarray:
        return self._pooled(Moments.mean_gram)

    def mean_cross(self) -> np.ndarray:
        return self._pooled(Moments.mean_cross)

    def _pooled(self, mean) -> np.ndarray:
        """The halves' means weighed by their rows, summed in place: a 5,632-wide layer's
        temporaries were 250 MB each."""
        parts = [h for h in self.halves if h.count]
        total = mean(parts[0]) * parts[0].count
        for h in parts[1:]:
            total += mean(h) * h.count
        total /= max(self.count, 1)
        return total


@one_blas_thread
def refit(
    original: ir.Model,
    pruned: ir.Model,
    found: list[Consumer],
    feeds: list[dict],
    keeps: dict[str, list[np.ndarray]],
    damping: float = DAMPING,
    cross_validate: bool = True,
    spill: Spill | None = None,
) -> int:
    """Refit the consumers of `pruned` (in place) towards `original`; returns how many were refit.

    keeps: per weight name, the per-axis keep vectors the surgery applied. Consumers that read the
    same value (a transformer's Q, K and V) are refit from one pass: none of them changes it.
    cross_validate: the ridge of each layer (off for synthetic data: a held-out half of
    noise says how a fit carries to more noise, not to real inputs; it cost the data-free MNIST
    CNNs 1 to 5 points at ratios 0.3 to 0.7).
    spill: where each refit weight goes once written, instead of memory."""
    weights = {v.name: v for v in original.graph.initializers.values()}
    readers: dict[str, list[Consumer]] = {}
    for consumer in found:  # in graph order of the first reader, so upstream refits come first
        if consumer.node_in(pruned) is not None:
            readers.setdefault(consumer.input, []).append(consumer)
    bar = Progress(len(readers), "compensate")
    refit_count = 0
    original_run, pruned_run = Forward(original, feeds), Forward(pruned, feeds)
    names = Names(pruned)
    for i, (value, group) in enumerate(readers.items()):
        # A refit MatMul upstream may have gained a bias Add since: read what the layer reads now.
        now = group[0].node_in(pruned).inputs[0].name
        partners = {
            c.weight: _residual_partner(original, pruned, c) if c.kind != Kind.DEPTHWISE else None
            for c in group
        }
        streams = {
            w: zip(original_run.values(p[0]), pruned_run.values(p[1]))
            for w, p in partners.items()
            if p is not None
        }
        # Consumers that fit the same features to the same targets (Q, K and V; gate and up) share
        # one set of moments; a residual target or a depthwise conv's kept channels are its own.
        key = {
            c.weight: c.reads if c.weight not in streams and c.kind != Kind.DEPTHWISE else c.weight
            for c in group
        }
        owners: dict = {}  # one consumer per set of moments
        for c in group:
            owners.setdefault(key[c.weight], c)
        moments = {k: Means() if c.wide else _Halves() for k, c in owners.items()}
        for x_p, x_o, feed in zip(pruned_run.values(now), original_run.values(value), feeds):
            features = {}
            for k, c in owners.items():
                if c.reads not in features:
                    features[c.reads] = c.features(x_p, feed), c.features(x_o, feed)
                features_p, features_o = features[c.reads]
                kept_channels = _kept_channels(c, keeps.get(c.weight))
                other = features_o[:, kept_channels] if kept_channels is not None else features_o
                # what the residual branch lost upstream, to be made up here
                if c.weight in streams:
                    r_o, r_p = next(streams[c.weight])
                    keep = keeps.get(c.weight)
                    if keep is not None:
                        r_o = np.compress(
                            keep[c.out_axis], r_o, axis=1 if c.kind != Kind.DENSE else -1
                        )
                    other = np.concatenate([other, c.output_rows(r_o - r_p, feed)], axis=1)
                moments[k].add(features_p, other)
        for c in group:
            _write(
                pruned,
                names,
                c.node_in(pruned),
                c,
                _solve(
                    c,
                    moments[key[c.weight]],
                    c.node_in(original),
                    weights,
                    keeps.get(c.weight),
                    damping,
                    cross_validate,
                    partners[c.weight] is not None,
                ),
            )
            release_pages([weights[c.weight]])  # the original's, read for the target
            if spill is not None:
                spill.hold([c.node_in(pruned).inputs[1]])
            refit_count += 1
        bar.update(i + 1)
    bar.close()
    return refit_count


def _solve(
    consumer: Consumer,
    moments: _Halves | Means,
    original_node: ir.Node,
    weights: dict[str, ir.Value],
    keep: list[np.ndarray] | None,
    damping: float,
    cross_validate: bool,
    residual: bool = False,
) -> np.ndarray:
    """The consumer's new (outputs, features + 1) matrix, bias last."""
    target = _with_bias(consumer, original_node, weights)  # (outputs, features + 1)
    if keep is not None:
        target = target[keep[consumer.out_axis]]
    if residual:
        target = np.concatenate([target, np.eye(len(target))], axis=1)
    if consumer.kind == Kind.DEPTHWISE:
        return _solve_depthwise(moments, target, consumer, keep, damping)
    width = target.shape[1] - (len(target) if residual else 0)
    prior = target[:, :width][:, _kept_features(consumer, keep, width - 1)]
    if consumer.wide:
        solved = prior.copy()  # the means end in the constant 1: the biases are included
        solved[:, -1] += target @ moments.mean_other() - prior @ moments.mean()
        return solved
    features = prior.shape[1]
    halves = all(h.count for h in moments.halves)
    dampings = [damping]
    if cross_validate and features <= CV_FEATURES:
        dampings = [damping * 10**k for k in range(4)]
    targets = [target]
    if residual and cross_validate:  # or its own output only, where that carries better
        targets.insert(
            0, np.concatenate([target[:, :width], np.zeros_like(target[:, width:])], axis=1)
        )
    if halves and len(dampings) * len(targets) > 1:
        target, damping = _cross_validated(moments.halves, targets, prior.T, dampings)
    cross = moments.mean_cross() @ target.T
    return _ridge(moments.mean_gram(), cross, prior.T, damping, overwrite=True).T


def _cross_validated(
    halves: tuple[Moments, Moments],
    targets: list[np.ndarray],
    prior: np.ndarray,
    dampings: list[float],
) -> tuple[np.ndarray, float]:
    """The target and ridge whose fit on one half of the rows best predicts the other's outputs
    (those of the last target), both ways: E|W x_p - T x_o|^2 = tr(W P W^T) - 2 tr(W C T^T) +
    const. Judged on at most CV_OUTPUTS evenly spaced outputs, every target in one solve per
    ridge: the choice is one of a few, and a layer's 576 to 1536 outputs made the cross-validation
    cost more than the rest of SmolLM2's refit."""
    rows = np.unique(np.linspace(0, len(targets[0]) - 1, CV_OUTPUTS).astype(int))
    full, targets, prior = targets, [t[rows] for t in targets], prior[:, rows]
    grams = [h.mean_gram() for h in halves]
    rights = [np.concatenate([h.mean_cross() @ t.T for t in targets], axis=1) for h in halves]
    tested = [h.mean_cross() @ targets[-1].T for h in halves]
    priors = np.tile(prior, len(targets))

    def held_out(task: tuple[int, float]) -> list[float]:
        """Per target, the error on the other half of the fit on one half with one ridge."""
        fit, damping = task
        test = 1 - fit
        # (features, outputs) per target
        fits = np.split(_ridge(grams[fit], rights[fit], priors, damping), len(targets), axis=1)
        return [float(np.sum((grams[test] @ x) * x) - 2 * np.sum(tested[test] * x)) for x in fits]

    # the solves on every core: each on one BLAS thread (one_blas_thread), so the same bits
    tasks = [(fit, damping) for fit in (0, 1) for damping in dampings]
    errors = np.zeros((len(targets), len(dampings)))
    for (_, damping), found in zip(tasks, pool().map(held_out, tasks)):
        errors[:, dampings.index(damping)] += found
    i, j = np.unravel_index(np.argmin(errors), errors.shape)
    return full[i], dampings[j]


def _ridge(
    gram: np.ndarray, cross: np.ndarray, prior: np.ndarray, damping: float, overwrite: bool = False
) -> np.ndarray:
    """Solve (gram + lambda I) x = cross + lambda prior, lambda relative to gram's mean diagonal;
    batched over leading axes. overwrite: gram is the caller's to spend (damped in place)."""
    size = gram.shape[-1]
    damp = damping * np.trace(gram, axis1=-2, axis2=-1)[..., None, None] / size
    damp = np.where(damp > 0, damp, damping)
    damped = gram if overwrite else gram.copy()  # lambda I on the diagonal: no identity matrix
    np.einsum("...ii->...i", damped)[...] += damp[..., 0]
    return np.linalg.solve(damped, cross + damp * prior)


def _kept_channels(consumer: Consumer, keep: list[np.ndarray] | None) -> np.ndarray | None:
    """A depthwise conv's kept input channels, which its moments pair with the pruned model's."""
    if consumer.kind != Kind.DEPTHWISE or keep is None:
        return None
    return keep[consumer.out_axis].reshape(consumer.groups, -1).any(axis=1)


def _solve_depthwise(
    moments: Moments,
    target: np.ndarray,
    consumer: Consumer,
    keep: list[np.ndarray] | None,
    damping: float,
) -> np.ndarray:
    """Each output channel refit from its own input channel's patch: one small ridge per channel."""
    gram, cross = moments.mean_gram(), moments.mean_cross()  # (kept channels, patch + 1, patch + 1)
    outputs = (
        np.flatnonzero(keep[consumer.out_axis]) if keep is not None else np.arange(len(target))
    )
    channels = outputs // (
        len(keep[consumer.out_axis]) // consumer.groups
        if keep is not None
        else len(target) // len(gram)
    )
    kept = (
        np.flatnonzero(_kept_channels(consumer, keep)) if keep is not None else np.arange(len(gram))
    )
    position = np.searchsorted(kept, channels)
    prior = target[:, :, None]
    return _ridge(gram[position], cross[position] @ prior, prior, damping, overwrite=True)[:, :, 0]


def _with_bias(consumer: Consumer, node: ir.Node, weights: dict[str, ir.Value]) -> np.ndarray:
    matrix = consumer.matrix(weights[consumer.weight].const_value.numpy().astype(np.float64))
    alpha = node.attributes.get_float("alpha", 1.0) if node.op_type == "Gemm" else 1.0
    bias = _bias(node, matrix.shape[0])
    return np.concatenate([alpha * matrix, bias[:, None]], axis=1)


def _bias(node: ir.Node, outputs: int) -> np.ndarray:
    if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        beta = node.attributes.get_float("beta", 1.0) if node.op_type == "Gemm" else 1.0
        return beta * np.broadcast_to(
            node.inputs[2].const_value.numpy().astype(np.float64).reshape(-1), (outputs,)
        )
    return np.zeros(outputs)


def _kept_features(consumer: Consumer, keep: list[np.ndarray] | None, features: int) -> np.ndarray:
    if keep is None:
        kept = np.ones(features, dtype=bool)
    else:
        per_channel = keep[consumer.in_axis]
        kept = np.repeat(per_channel, consumer.columns_per_channel)
    return np.append(kept, True)


def _write(
    model: ir.Model, names: Names, node: ir.Node, consumer: Consumer, solved: np.ndarray
) -> None:
    weight = node.inputs[1]
    old = weight.const_value.numpy()
    matrix, bias = solved[:, :-1], solved[:, -1]
    if node.op_type == "Gemm":
        matrix = matrix / node.attributes.get_float("alpha", 1.0)
    weight.const_value = ir.tensor(
        consumer.unmatrix(matrix, old.shape).astype(old.dtype), name=weight.name
    )
    bias = bias.astype(old.dtype)
    if node.op_type in ("Conv", "Gemm"):
        if node.op_type == "Gemm":
            bias = (
                bias / node.attributes.get_float("beta", 1.0)
                if len(node.inputs) > 2 and node.inputs[2] is not None
                else bias
            )
            if len(node.inputs) <= 2 or node.inputs[2] is None:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
        _set_bias(model, names, node, bias)
    elif np.any(bias):
        _add_after(model, names, node, bias)


def _set_bias(model: ir.Model, names: Names, node: ir.Node, bias: np.ndarray) -> None:
    current = node.inputs[2] if len(node.inputs) > 2 else None
    if current is not None and len(current.uses()) == 1:
        current.const_value = ir.tensor(bias, name=current.name)
        current.shape = ir.Shape(bias.shape)
        return
    name = names.fresh(f"{node.inputs[1].name}_bias")
    value = constant(name, bias)
    model.graph.register_initializer(value)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)


def _add_after(model: ir.Model, names: Names, node: ir.Node, bias: np.ndarray) -> None:
    """A MatMul has no bias input: add one after it."""
    out = node.outputs[0]
    name = names.fresh(f"{node.inputs[1].name}_bias")
    value = constant(name, bias)
    model.graph.register_initializer(value)
    add = ir.node("Add", [out, value], name=names.fresh(f"{node.name or node.op_type}_bias"))
    model.graph.insert_after(node, add)
    users = [u for u in out.uses() if u.node is not add]
    for use in users:
        use.node.replace_input_with(use.idx, add.outputs[0])
    result = add.outputs[0]
    result.type, result.shape = out.type, out.shape
    if out.is_graph_output():  # the output keeps its name
        index = list(model.graph.outputs).index(out)
        name = out.name
        out.name = names.fresh(f"{name}_before_bias")
        result.name = name
        model.graph.outputs[index] = result
    else:
        result.name = names.fresh(f"{out.name}_biased")


@one_blas_thread
def mean_shifts(
    model: ir.Model,
    found: list[Consumer],
    means: dict[str, np.ndarray],
    keeps: dict[str, list[np.ndarray]],
) -> dict[str, np.ndarray]:
    """Data-free compensation, before the surgery: what each consumer's bias must gain for the input
    channels it will lose, W_R m_R, where their means are known (statistics.batchnorm_means)."""
    weights = {v.name: v for v in model.graph.initializers.values()}
    shifts = {}
    for c in found:
        keep, node = keeps.get(c.weight), c.node_in(model)
        if (
            c.weight not in means
            or keep is None
            or node is None
            or keep[c.in_axis].all()
            or len(means[c.weight]) != len(keep[c.in_axis])
        ):
            continue
        matrix = _with_bias(c, node, weights)[:, :-1]
        removed = ~_kept_features(c, keep, matrix.shape[1])[:-1]
        shifts[c.weight] = (
            matrix[:, removed] @ np.repeat(means[c.weight], c.columns_per_channel)[removed]
        )[keep[c.out_axis]]
    return shifts


def shift_biases(model: ir.Model, found: list[Consumer], shifts: dict[str, np.ndarray]) -> int:
    """After the surgery: add the shifts to the consumers' biases; returns how many changed."""
    weights = {v.name: v for v in model.graph.initializers.values()}
    names = Names(model)
    changed = 0
    for c in found:
        node = c.node_in(model)
        if c.weight in shifts and node is not None:
            solved = _with_bias(c, node, weights)
            solved[:, -1] += shifts[c.weight]
            _write(model, names, node, c, solved)
            changed += 1
    return changed


def _residual_partner(
    original: ir.Model, pruned: ir.Model, consumer: Consumer
) -> tuple[str, str] | None:
    """Where the consumer's output is added to another activation (a residual branch), the names of
    that activation in the original and the pruned model: the refit then reproduces the sum."""
    names = []
    for model in (original, pruned):
        node = consumer.node_in(model)
        if node is None:
            return None
        out = node.outputs[0]
        uses = out.uses()
        while (
            len(uses) == 1
            and uses[0].node.op_type == "Add"
            and any(v is not None and v.const_value is not None for v in uses[0].node.inputs)
        ):
            out = uses[0].node.outputs[0]  # a bias added after a MatMul
            uses = out.uses()
        if len(uses) != 1 or uses[0].node.op_type != "Add" or out.is_graph_output():
            return None
        other = uses[0].node.inputs[1 - uses[0].idx]
        if other is None or other.const_value is not None:
            return None
        if model is original and (other.shape is None or other.shape != out.shape):
            return None  # a broadcast: not a residual branch
        names.append(other.name)
    return tuple(names)
