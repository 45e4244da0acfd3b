"""Importance of every class: how much of the model's parameters its channels hold."""

from __future__ import annotations

import numpy as np

from spa.analysis import Analysis

CRITERIA = ("l2", "l1", "random")


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
    for group in analysis.groups:
        values = totals[group.classes]
        mean = values.mean()
        values = values / mean if mean > 0 else values
        scores.update(zip(group.classes.tolist(), values.tolist()))
    return scores
