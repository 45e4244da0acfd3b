"""Importance of every class: how much of the model's parameters its channels hold."""

from __future__ import annotations

import collections

import numpy as np

from spa.analysis import Analysis
from spa.io import release_pages

# Declared with the options; DATA_CRITERIA need calibration statistics.
from spa.options import CRITERIA, DAMPING, DATA_CRITERIA  # noqa: F401
from spa.statistics import feature_classes, one_blas_thread


def score(analysis: Analysis, criterion: str = "l2", seed: int = 0) -> dict[int, float]:
    """Score each removable class (root label -> importance, higher is more important).

    Magnitude: for every member, the L1 or L2 norm of the elements that belong to each class,
    divided by the member's mean over its classes, so that a conv weight and a bias vote with equal
    voice; the class score is the sum over members, normalized by the group's mean score.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown importance criterion {criterion!r}; choose from {CRITERIA}")
    rng = np.random.default_rng(seed)
    scores: dict[int, float] = {}
    if criterion == "random":
        for group in analysis.groups:
            scores.update(zip(group.classes.tolist(), rng.random(len(group.classes)).tolist()))
        return scores
    totals = np.zeros(len(analysis.sets), dtype=np.float64)
    for member in analysis.members:
        weight = member.value.const_value.numpy()
        # Sum the magnitudes over the axes the labels do not vary along, then per class.
        flat = tuple(
            a for a, size in enumerate(member.labels.shape) if size == 1 and weight.shape[a] > 1
        )
        weight = weight.astype(np.float32, copy=False)
        magnitude = np.square(weight) if criterion == "l2" else np.abs(weight)
        magnitude = magnitude.sum(axis=flat, keepdims=True, dtype=np.float64)
        roots = analysis.sets.find(np.broadcast_to(member.labels, magnitude.shape)).ravel()
        present, where = np.unique(roots, return_inverse=True)  # only this member's classes: linear
        per_class = np.bincount(where, weights=magnitude.ravel())
        if criterion == "l2":
            per_class = np.sqrt(per_class)
        live = present != 0
        mean = per_class[live].mean() if live.any() else 0.0
        if mean > 0:
            totals[present[live]] += per_class[live] / mean
    return _per_group(analysis, totals)


def dead_first(analysis: Analysis, scores: dict[int, float]) -> dict[int, float]:
    """Classes whose parameters are all zero cost nothing to remove: they rank below every live
    one, whatever the criterion (data-free OBS ranked live channels that noise never reaches
    first)."""
    dead = [c for c, magnitude in score(analysis, "l1").items() if magnitude == 0.0]
    if not dead:
        return scores
    floor = min(scores.values(), default=0.0) - 1.0
    return {**scores, **dict.fromkeys(dead, floor)}


def _per_group(analysis: Analysis, totals: np.ndarray) -> dict[int, float]:
    scores: dict[int, float] = {}
    for group in analysis.groups:
        values = totals[group.classes]
        mean = values.mean()
        values = values / mean if mean > 0 else values
        scores.update(zip(group.classes.tolist(), values.tolist()))
    return scores


def reading_classes(analysis: Analysis, found: list) -> list:
    """The consumers whose input features carry removable classes: the only ones data-aware
    scores read statistics of (a transformer's Q, K, V, gate, up and LM head read the hidden size,
    which is kept unless --prune-hidden: their statistics were a third of SmolLM2's scoring)."""
    readers = []
    for consumer in found:
        members = analysis.members_named(consumer.weight)
        shape = tuple(members[0].value.const_value.shape) if members else ()
        if members and feature_classes(analysis, consumer, shape).any():
            readers.append(consumer)
    return readers


@one_blas_thread  # the same scores whatever the thread count (spa.statistics.one_blas_thread)
def score_with_statistics(
    analysis: Analysis, criterion: str, moments: dict, found: list, damping: float = DAMPING
) -> dict[int, float]:
    """Data-aware importance from the consumers' input statistics (spa.statistics).

    wanda: sum over a class's input features of |W| times the feature's RMS (Wanda, on channels).
    obs: Optimal Brain Surgeon on whole channels, greedy: a group's classes are removed one chunk at
    a time, each time the chunk whose removal (with the rest optimally compensated) adds the least
    output error, tr(W_R ([H^-1]_RR)^-1 W_R^T), as a fraction of the consumer's output energy
    tr(W H W^T), summed over the group's consumers; then the consumers' weights and inverse Hessians
    are updated as if the chunk were gone. A class scores the error accumulated when it was
    removed, so the lowest scores are the channels that are best removed together, not one by one.
    Fractions of output energy compare across layers, so obs scores are not rescaled per group:
    global ranking weighs them as they are. A consumer too wide for its Hessian (Consumer.wide) is
    taken as diagonal: a class's error is that of its features alone, their variance (the refit
    keeps their mean) times their weights squared, and classes accumulate in ascending order.
    Classes that no consumer reads keep their magnitude score, scaled down."""
    totals = np.zeros(len(analysis.sets), dtype=np.float64)
    # group id -> (consumer, weight, feature classes) for greedy OBS
    pending: dict[int, list[tuple]] = {}
    direct: list[tuple] = []  # (position, consumer, weight, feature classes) scored alone
    group_of = {int(c): g.id for g in analysis.groups for c in g.classes}
    last = {}  # group id -> the position of its last consumer
    for position, consumer in enumerate(found):
        members = analysis.members_named(consumer.weight)
        if not members:
            continue
        weight = members[0].value.const_value.numpy()
        classes = feature_classes(analysis, consumer, weight.shape)
        if not classes.any():
            continue
        if criterion == "obs" and not consumer.wide:
            for gid in {group_of[c] for c in np.unique(classes) if c in group_of}:
                pending.setdefault(gid, []).append((consumer, weight, classes))
                last[gid] = position
        else:
            direct.append((position, consumer, weight, classes))
    # Scored in the graph order of the statistics they need (collected layer by layer, where
    # they are: statistics.Along); each group's greedy result is added after the direct scores.
    grouped = np.zeros_like(totals)
    by_id = {g.id: g for g in analysis.groups}
    readers = _Readers(moments, damping, pending)
    jobs = [(p, 0, i) for i, (p, *_) in enumerate(direct)] + [(p, 1, g) for g, p in last.items()]
    for _, kind, which in sorted(jobs):
        if kind == 1:
            classes = by_id[which].classes
            grouped[classes] = _greedy_obs(classes, [readers.of(*r) for r in pending[which]])
            for consumer, _, _ in pending[which]:
                readers.done(consumer)
                release_pages(m.value for m in analysis.members_named(consumer.weight))
            continue
        _, consumer, weight, classes = direct[which]
        matrix = consumer.matrix(weight.astype(np.float64))
        stats = moments[consumer.weight]
        squares = stats.mean_square()[:-1] if consumer.wide else np.diag(stats.mean_gram())[:-1]
        if criterion == "wanda":
            rms = np.sqrt(np.maximum(squares, 0))
            per_class = np.bincount(
                classes, weights=np.abs(matrix).sum(axis=0) * rms, minlength=len(totals)
            )
            mean = per_class[np.unique(classes[classes != 0])].mean()
            if mean > 0:
                totals += per_class / mean
            continue
        weights = np.square(matrix).sum(axis=0)
        variances = np.maximum(squares - np.square(stats.mean()[:-1]), 0)
        errors = np.bincount(classes, weights=weights * variances, minlength=len(totals))
        totals += _accumulated(analysis, errors / max(float(weights @ squares), 1e-30))
    totals += grouped
    fallback = np.zeros(len(totals))
    for c, v in score(analysis, "l2").items():
        fallback[c] = v
    if criterion == "wanda":
        return _per_group(analysis, np.where(totals > 0, totals, 1e-3 * fallback))
    # Unread classes go first, in magnitude order, below every read class of their group.
    floor = min(
        (totals[c] for g in analysis.groups for c in g.classes if totals[c] > 0), default=1.0
    )
    totals = np.where(totals > 0, totals, 1e-3 * floor * fallback / max(fallback.max(), 1e-30))
    return {int(c): float(totals[c]) for g in analysis.groups for c in g.classes}


class _Readers:
    """What greedy OBS needs of each consumer of a group, (weights, inverse Hessian, feature
    classes, output energy), made when the first of its groups is scored and dropped after the
    last, its moments with it: one group's matrices alive at a time (a 3.4 GB LLaMA-style model's,
    made all at once, passed 16 GB). Consumers that share their moments (Q, K and V) share the
    inverse."""

    def __init__(self, moments, damping: float, pending: dict[int, list[tuple]]):
        self.moments, self.damping = moments, damping
        uses = [c for readers in pending.values() for c, _, _ in readers]
        # groups still to score, per consumer and per set of moments (Consumer.reads)
        self.left = collections.Counter(c.weight for c in uses)
        self.shared = collections.Counter(c.reads for c in uses)
        self.made: dict[str, tuple] = {}
        self.inverses: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # (gram, inverse)

    def of(self, consumer, weight: np.ndarray, classes: np.ndarray) -> tuple:
        if consumer.weight not in self.made:
            if consumer.reads not in self.inverses:
                gram = self.moments[consumer.weight].mean_gram()
                damp = self.damping * float(np.mean(np.diag(gram))) or self.damping
                self.inverses[consumer.reads] = gram, np.linalg.inv(gram + damp * np.eye(len(gram)))
            gram, inverse = self.inverses[consumer.reads]
            matrix = consumer.matrix(weight.astype(np.float64))
            # its weight: the bias
            matrix = np.concatenate([matrix, np.zeros((len(matrix), 1))], axis=1)
            energy = max(float(np.sum((matrix @ gram) * matrix)), 1e-30)  # tr(W H W^T)
            # the constant feature: no class
            self.made[consumer.weight] = (matrix, inverse, np.append(classes, 0), energy)
        return self.made[consumer.weight]

    def done(self, consumer) -> None:
        """One of the consumer's groups is scored."""
        self.left[consumer.weight] -= 1
        if not self.left[consumer.weight]:
            del self.made[consumer.weight]
        self.shared[consumer.reads] -= 1
        if not self.shared[consumer.reads]:
            del self.inverses[consumer.reads]
            self.moments[consumer.weight].release()


def _accumulated(analysis: Analysis, errors: np.ndarray) -> np.ndarray:
    """Per group, each class's error plus those of the classes below it: greedy removal in
    ascending order, with nothing updated as classes go."""
    result = np.zeros_like(errors)
    for group in analysis.groups:
        values = errors[group.classes]
        order = np.argsort(values, kind="stable")
        result[group.classes[order]] = np.cumsum(values[order])
    return result


GREEDY_STEPS = 32  # chunks per group: bounds the cost at a few inverse-sized updates per consumer


def _greedy_obs(classes: np.ndarray, readers: list[tuple]) -> np.ndarray:
    """Accumulated error at which each class of a group is removed, as a fraction of each
    consumer's output energy (0 for classes no consumer reads)."""
    state = [(w, h, f) for w, h, f, _ in readers]
    norms = [energy for *_, energy in readers]
    read = np.zeros(len(classes), dtype=bool)
    for _, _, f in state:
        read |= np.isin(classes, f)
    remaining = list(classes[read])
    accumulated, result = 0.0, {}
    chunk = max(1, -(-len(remaining) // GREEDY_STEPS))
    while remaining:
        errors = np.zeros(len(remaining))
        per_consumer = [_removal_errors(w, h, f, remaining) for w, h, f in state]
        for e, n in zip(per_consumer, norms):
            errors += e / n
        order = np.argsort(errors, kind="stable")[:chunk]
        removed = [remaining[i] for i in order]
        accumulated += float(errors[order].sum())
        for c in removed:
            result[c] = accumulated
        gone = set(removed)
        remaining = [c for c in remaining if c not in gone]
        for i, (w, h, f) in enumerate(state):
            rows = np.flatnonzero(np.isin(f, removed))
            if len(rows):
                state[i] = _remove_features(w, h, f, rows)
    return np.array([result.get(int(c), 0.0) for c in classes])


def _removal_errors(
    w: np.ndarray, h: np.ndarray, features: np.ndarray, candidates: list[int]
) -> np.ndarray:
    """tr(W_R ([H^-1]_RR)^-1 W_R^T) for each candidate class's features R, batched over the
    candidates that hold the same number of features (a conv's kernel, a head's dims)."""
    errors = np.zeros(len(candidates))
    rows = [np.flatnonzero(features == c) for c in candidates]
    for size in {len(r) for r in rows} - {0}:
        which = [i for i, r in enumerate(rows) if len(r) == size]
        index = np.array([rows[i] for i in which])  # (candidates, size)
        blocks = np.linalg.inv(h[index[:, :, None], index[:, None, :]])
        parts = np.moveaxis(w[:, index], 1, 0)  # (candidates, outputs, size)
        errors[which] = np.sum((parts @ blocks) * parts, axis=(1, 2))
    return errors


def _remove_features(
    w: np.ndarray, h: np.ndarray, features: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OBS update: the weights compensated for removing `rows`, and the inverse Hessian of the
    features that remain (Schur complement); returns both, and the remaining features' classes, for
    the remaining features only: the matrices shrink as channels go (AlexNet's 9,216-input layer
    spent 36 s updating full-size ones)."""
    block = np.linalg.inv(h[np.ix_(rows, rows)])
    keep = np.ones(len(features), dtype=bool)
    keep[rows] = False
    across = np.compress(keep, h[rows], axis=1)  # (removed, kept); h is symmetric
    w = np.compress(keep, w, axis=1) - (w[:, rows] @ block) @ across
    # compress, one axis at a time: a third of the time of fancy indexing both at once
    kept = np.compress(keep, np.compress(keep, h, axis=0), axis=1)
    kept -= across.T @ (block @ across)
    return w, kept, features[keep]
