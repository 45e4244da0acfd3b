"""Importance of every class: how much of the model's parameters its channels hold."""

from __future__ import annotations

import numpy as np

from spa.analysis import Analysis

CRITERIA = ("l2", "l1", "random")
DATA_CRITERIA = ("wanda", "obs")  # need calibration statistics


def score(analysis: Analysis, criterion: str = "l2", seed: int = 0) -> dict[int, float]:
    """Score each removable class (root label -> importance, higher is more important).

    Magnitude: for every member, the L1 or L2 norm of the elements that belong to each class, divided
    by the member's mean over its classes, so that a conv weight and a bias vote with equal voice;
    the class score is the sum over members, normalized by the group's mean score.
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
        flat = tuple(a for a, size in enumerate(member.labels.shape) if size == 1 and weight.shape[a] > 1)
        weight = weight.astype(np.float32, copy=False)
        magnitude = np.square(weight) if criterion == "l2" else np.abs(weight)
        magnitude = magnitude.sum(axis=flat, keepdims=True, dtype=np.float64)
        roots = analysis.sets.find(np.broadcast_to(member.labels, magnitude.shape)).ravel()
        per_class = np.bincount(roots, weights=magnitude.ravel(), minlength=len(totals))
        if criterion == "l2":
            per_class = np.sqrt(per_class)
        present = np.unique(roots[roots != 0])
        mean = per_class[present].mean() if len(present) else 0.0
        if mean > 0:
            totals += per_class / mean
    return _per_group(analysis, totals)


def _per_group(analysis: Analysis, totals: np.ndarray) -> dict[int, float]:
    scores: dict[int, float] = {}
    for group in analysis.groups:
        values = totals[group.classes]
        mean = values.mean()
        values = values / mean if mean > 0 else values
        scores.update(zip(group.classes.tolist(), values.tolist()))
    return scores


def score_with_statistics(analysis: Analysis, criterion: str, moments: dict, found: list, damping: float = 0.01) -> dict[int, float]:
    """Data-aware importance from the consumers' input statistics (spa.statistics).

    wanda: sum over a class's input features of |W| times the feature's RMS (Wanda, on channels).
    obs: the increase of each consumer's output error when the class's features are removed and the
    rest are optimally compensated (Optimal Brain Surgeon, for a group of features):
    tr(W_R ([H^-1]_RR)^-1 W_R^T), summed over the consumers of the class, each consumer normalized
    by its mean. Classes that no consumer reads keep their magnitude score, scaled down."""
    from spa.statistics import feature_classes

    totals = np.zeros(len(analysis.sets), dtype=np.float64)
    for consumer in found:
        weight = next((m.value.const_value.numpy() for m in analysis.members if m.value.name == consumer.weight), None)
        if weight is None:
            continue
        classes = feature_classes(analysis, consumer, weight.shape)
        if not classes.any():
            continue
        matrix = consumer.matrix(weight.astype(np.float64))
        gram = moments[consumer.weight].mean_gram()
        per_class = np.zeros(len(totals))
        present = np.unique(classes[classes != 0])
        if criterion == "wanda":
            rms = np.sqrt(np.maximum(np.diag(gram)[:-1], 0))
            per_class += np.bincount(classes, weights=np.abs(matrix).sum(axis=0) * rms, minlength=len(totals))
        else:
            damp = damping * float(np.mean(np.diag(gram))) or damping
            inverse = np.linalg.inv(gram + damp * np.eye(len(gram)))
            for c in present:
                rows = np.flatnonzero(classes == c)
                block = np.linalg.inv(inverse[np.ix_(rows, rows)])
                w = matrix[:, rows]
                per_class[c] = float(np.einsum("oi,ij,oj->", w, block, w))
        mean = per_class[present].mean()
        if mean > 0:
            totals += per_class / mean
    fallback = np.zeros(len(totals))
    for c, v in score(analysis, "l2").items():
        fallback[c] = v
    totals = np.where(totals > 0, totals, 1e-3 * fallback)
    return _per_group(analysis, totals)
