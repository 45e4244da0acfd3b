"""Decide which classes each group loses: ratio, rounding, ignore list, the keep-one rules."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from pathlib import Path

import numpy as np

from spa.analysis import Analysis, EqualCounts, Group
from spa.errors import SpaError


@functools.cache
def default_round_to() -> int:
    """Channel multiple that onnxruntime's CPU kernels reward: they pad channels to SIMD blocks
    (16 floats on AVX-512, 8 on AVX2), so 64 -> 56 channels is no faster than 64."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    if " avx512f" in flags:
        return 16
    if " avx2" in flags:
        return 8
    return 4


@dataclasses.dataclass
class Plan:
    removed: np.ndarray  # root labels of the removed classes
    by_group: dict[int, np.ndarray]  # group id -> removed roots


def keep_count(width: int, ratio: float, round_to: int) -> int:
    """Channels a group of `width` keeps: (1 - ratio) of them, rounded up to a multiple of the step,
    so that rounding never removes more than asked (to the nearest multiple, 10% of a 24-wide group
    at round_to 16 was 33%).

    The step is round_to, halved while it is not smaller than the group: a 16-wide group at
    round_to 16 keeps a multiple of 8 (16 -> 15 channels is slower than 16 on a SIMD kernel)."""
    keep = width - math.floor(ratio * width + 1e-9)
    step = round_to
    while step > 1 and step >= width:
        step //= 2
    if step > 1:
        keep = max(step, step * math.ceil(keep / step - 1e-9))
    return min(width, max(1, keep))


def make_plan(
    analysis: Analysis,
    scores: dict[int, float],
    ratio: float,
    round_to: int = 1,
    ignore: list[str] | tuple[str, ...] = (),
    global_ranking: bool = False,
    max_group_ratio: float = 0.8,
    shares: dict[int, float] | None = None,
    fixed: dict[int, float] | None = None,
) -> Plan:
    """Local: every group loses `ratio` of its channels. Global: the lowest-scoring `ratio` of all
    channels go, wherever they are, no group losing more than `max_group_ratio` of its own.
    shares: the fraction each group loses, decided elsewhere (spa.sensitivity); groups it does
    not name lose `ratio`. fixed: groups that lose the fraction given, whatever the allocation
    (--layer-ratio, spa.plan.layer_ratios)."""
    protected = _protected(analysis, ignore)

    ranked: dict[int, list[int]] = {}

    def candidates(group: Group) -> list[int]:
        if group.id not in ranked:
            classes = [c for c in group.classes.tolist() if c not in protected]
            ranked[group.id] = _ranked(classes, scores)
        return ranked[group.id]

    if shares is not None:
        ratios = {g.id: shares.get(g.id, ratio) for g in analysis.groups}
    elif global_ranking:
        everyone = {g.id: candidates(g) for g in analysis.groups}
        counts = _global_counts(analysis, scores, everyone, ratio, max_group_ratio)
        ratios = {g.id: counts[g.id] / g.width for g in analysis.groups}
    else:
        ratios = {g.id: ratio for g in analysis.groups}
    ratios.update(fixed or {})
    by_group = {}
    for group in analysis.groups:
        # round_to counts channels; a class holds channels_per_class of them (a head's dims).
        step = round_to // math.gcd(round_to, group.channels_per_class)
        keep = keep_count(group.width, ratios[group.id], step)
        if keep == group.width:  # ranked only where something goes (a sensitivity trial: one)
            by_group[group.id] = np.zeros(0, dtype=np.int64)
            continue
        order = candidates(group)
        chosen = _choose(
            order, min(group.width - keep, len(order)), analysis.equal_counts, scores, protected
        )
        by_group[group.id] = np.array(chosen, dtype=np.int64)
    removed = np.concatenate(list(by_group.values())) if by_group else np.zeros(0, np.int64)
    removed = _keep_one_per_segment(analysis, scores, removed, by_group)
    removed = _equal_counts(analysis, scores, removed, by_group)
    return Plan(removed=np.sort(removed), by_group=by_group)


def _choose(
    ranked: list[int],
    count: int,
    constraints: list[EqualCounts],
    scores,
    protected: set[int] = frozenset(),
) -> list[int]:
    """At most `count` of the `ranked` classes, lowest scores first, such that the blocks of every
    equal-count constraint lose as many: a block's own classes go in bundles, the r-th lowest of
    every block together (ranked by their mean score), each block keeping one; a block with owners
    may go whole instead, its owners with it (they count for nothing: a key/value head is worth
    its query heads), all but one block at most."""
    candidates = set(ranked)
    rank = {c: i for i, c in enumerate(ranked)}
    relevant = [
        (e, [sorted((c for c in b.tolist() if c in candidates), key=rank.get) for b in e.blocks])
        for e in constraints
    ]
    relevant = [(e, own) for e, own in relevant if any(own)]
    if not relevant:
        return ranked[:count]
    bound = {c for e, own in relevant for block in own for c in block}
    items = [([c], []) for c in ranked if c not in bound]  # (counted classes, owners)
    for e, own in relevant:
        rounds = min(min(len(o) for o in own), min(len(b) for b in e.blocks) - 1)
        items += [([o[r] for o in own], []) for r in range(rounds)]
        whole = [
            (block.tolist(), owners.tolist())
            for block, owners in zip(e.blocks, e.owners)
            if len(owners)
            and candidates.issuperset(block.tolist())
            and protected.isdisjoint(owners.tolist())
        ]
        items += sorted(whole, key=lambda item: _mean(item[0], scores))[: len(e.blocks) - 1]
    chosen: set[int] = set()
    owners_chosen: list[int] = []
    for classes, owners in sorted(
        items, key=lambda item: (_mean(item[0], scores), min(rank[c] for c in item[0]))
    ):
        if len(chosen | set(classes)) <= count:
            chosen.update(classes)
            owners_chosen += owners
    return sorted(chosen, key=rank.get) + owners_chosen


def _mean(classes: list[int], scores) -> float:
    return sum(scores.get(c, 0.0) for c in classes) / len(classes)


def plan_from_report(analysis: Analysis, report: dict) -> Plan:
    """The plan an earlier prune's JSON report describes ("groups" -> "layers" -> "kept"), for this
    model: layers are matched by node name and width, their dropped channels removed. Refused where
    the report names a layer this model lacks, would remove channels that must stay, or keeps
    channels in one layer that a coupled layer drops (what stays must be what the report says)."""
    layers = {
        layer["node"]: layer
        for group in report.get("groups", [])
        for layer in group.get("layers", [])
    }
    spaces = {s.node: s for s in analysis.spaces if s.node}
    missing = sorted(set(layers) - set(spaces))
    if missing:
        raise SpaError(
            f"the plan names {len(missing)} layer(s) this model lacks: "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
        )
    removed = set()
    for name, layer in layers.items():
        labels = spaces[name].labels
        if layer["width"] != len(labels):
            raise SpaError(
                f"the plan's layer {name} has {layer['width']} channels, this model's {len(labels)}"
            )
        dropped = np.setdiff1d(np.arange(len(labels)), np.asarray(layer["kept"], dtype=np.int64))
        removed |= set(analysis.sets.find(labels[dropped]).tolist())
    removable = analysis.group_of()
    if removed - set(removable):
        raise SpaError(
            "the plan removes channels this model must keep (they reach an input, an output or a "
            "barrier; see `spa analyze`)"
        )
    plan_removed = np.array(sorted(removed), dtype=np.int64)
    for name, layer in layers.items():
        kept = np.flatnonzero(~analysis.removed_mask(spaces[name].labels, plan_removed))
        if kept.tolist() != sorted(layer["kept"]):
            raise SpaError(
                f"the plan keeps channels of {name} that a layer coupled with it drops: coupled "
                "layers keep the same channels"
            )
    removed_set = set(plan_removed.tolist())
    for constraint in analysis.equal_counts:
        left, orphaned = _blocks_left(constraint, removed_set)
        if orphaned:
            raise SpaError(
                f"the plan removes a head that {constraint.node} copies but keeps heads that read "
                "it: a key/value head goes only with all of its query heads"
            )
        if len({len(removed_set.intersection(b.tolist())) for b in left}) > 1:
            raise SpaError(
                f"the plan removes more channels from some groups of {constraint.node} than from "
                "others: a grouped layer's groups keep as many channels each"
            )
    by_group = {
        g.id: np.array([c for c in plan_removed if removable[int(c)] == g.id], dtype=np.int64)
        for g in analysis.groups
    }
    return Plan(removed=plan_removed, by_group=by_group)


def _ranked(classes: list[int], scores: dict[int, float]) -> list[int]:
    return sorted(classes, key=lambda c: (scores.get(c, 0.0), c))


def _global_counts(
    analysis: Analysis, scores, candidates: dict[int, list[int]], ratio: float, cap: float
) -> dict[int, int]:
    """How many classes each group loses when all groups compete on their normalized scores."""
    budget = math.floor(ratio * sum(g.width for g in analysis.groups) + 1e-9)
    limit = {g.id: g.width - keep_count(g.width, cap, 1) for g in analysis.groups}
    ranked = sorted(
        (scores.get(c, 0.0), c, gid) for gid, classes in candidates.items() for c in classes
    )
    counts = {g.id: 0 for g in analysis.groups}
    for _, _, gid in ranked:
        if budget == 0:
            break
        if counts[gid] < limit[gid]:
            counts[gid] += 1
            budget -= 1
    return counts


def layer_ratios(
    analysis: Analysis, patterns: dict[str, float]
) -> tuple[dict[int, float], list[str]]:
    """Per group id, the ratio of the first pattern that matches the node name of a layer whose
    output channels the group holds, in the order given; and the patterns that match no group.
    (Output channels only: a layer's weight also carries the channels it reads, another group's.)"""
    group_of = analysis.group_of()
    fixed, unmatched = {}, []
    for pattern, ratio in patterns.items():
        labels = [s.labels for s in analysis.spaces if fnmatch.fnmatchcase(s.node, pattern)]
        groups = {
            group_of[c]
            for lab in labels
            for c in np.unique(analysis.sets.find(lab)).tolist()
            if c in group_of
        }
        if not groups:
            unmatched.append(pattern)
        for gid in groups:
            fixed.setdefault(gid, ratio)
    return fixed, unmatched


def _protected(analysis: Analysis, patterns) -> set[int]:
    """The classes of the layers and parameters whose names match a pattern."""
    if not patterns:
        return set()

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    labels = [m.labels for m in analysis.members if matches(m.value.name or "") or matches(m.node)]
    labels += [s.labels for s in analysis.spaces if matches(s.node)]
    return {int(r) for lab in labels for r in np.unique(analysis.sets.find(lab))}


def _keep_one_per_segment(
    analysis: Analysis, scores, removed: np.ndarray, by_group: dict
) -> np.ndarray:
    """A layer, or a slice of one, must keep at least one channel: give back its best class."""
    removed_set = set(removed.tolist())
    for segment in analysis.segments:
        roots = set(analysis.sets.find(segment).tolist())
        if 0 in roots or not roots <= removed_set:
            continue
        best = max(roots, key=lambda c: (scores.get(c, 0.0), c))
        removed_set.discard(best)
        for gid, chosen in by_group.items():
            by_group[gid] = chosen[chosen != best]
    return np.array(sorted(removed_set), dtype=np.int64)


def _equal_counts(analysis: Analysis, scores, removed: np.ndarray, by_group: dict) -> np.ndarray:
    """Give back, in blocks of an equal-count constraint that lose more than another, their
    best-scoring removed classes (a class kept for a segment's sake, a plan made by hand); a
    block's owners go only with the whole block (else they are given back)."""
    removed_set = set(removed.tolist())
    for constraint in analysis.equal_counts:
        left, orphaned = _blocks_left(constraint, removed_set)
        for block, owners in orphaned:
            removed_set.difference_update(owners.tolist())
            left.append(block)
        gone = [[c for c in b.tolist() if c in removed_set] for b in left]
        fewest = min((len(g) for g in gone), default=0)
        for g in gone:
            for c in sorted(g, key=lambda c: (scores.get(c, 0.0), c))[fewest:]:
                removed_set.discard(c)
    back = set(removed.tolist()) - removed_set
    for gid, chosen in by_group.items():
        by_group[gid] = np.array([c for c in chosen.tolist() if c not in back], dtype=np.int64)
    return np.array(sorted(removed_set), dtype=np.int64)


def _blocks_left(constraint: EqualCounts, removed: set[int]) -> tuple[list, list]:
    """The blocks of a constraint that stay (their owners do), and the (block, owners) whose owners
    go without the whole block (a plan that cannot be carried out as it is)."""
    owners = constraint.owners or [np.zeros(0, np.int64)] * len(constraint.blocks)
    left, orphaned = [], []
    for block, own in zip(constraint.blocks, owners):
        if removed.isdisjoint(own.tolist()):
            left.append(block)
        elif not removed.issuperset([*own.tolist(), *block.tolist()]):
            orphaned.append((block, own))
    return left, orphaned
