"""Decide which classes each group loses: ratio, rounding, ignore list, the keep-one rules."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from pathlib import Path

import numpy as np

from spa.analysis import Analysis, Group


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
    """Channels a group of `width` keeps: (1 - ratio) of them, to the nearest multiple of round_to."""
    keep = width - math.floor(ratio * width + 1e-9)
    if round_to > 1 and width > round_to:
        keep = max(round_to, round_to * math.floor(keep / round_to + 0.5 - 1e-9))
    return min(width, max(1, keep))


def make_plan(
    analysis: Analysis,
    scores: dict[int, float],
    ratio: float,
    round_to: int = 1,
    ignore: list[str] | tuple[str, ...] = (),
) -> Plan:
    protected = _protected(analysis, ignore)
    by_group = {}
    for group in analysis.groups:
        by_group[group.id] = _choose(group, scores, ratio, round_to, protected)
    removed = np.concatenate(list(by_group.values())) if by_group else np.zeros(0, np.int64)
    removed = _keep_one_per_segment(analysis, scores, removed, by_group)
    return Plan(removed=np.sort(removed), by_group=by_group)


def _choose(group: Group, scores: dict[int, float], ratio: float, round_to: int, protected: set[int]) -> np.ndarray:
    keep = keep_count(group.width, ratio, round_to)
    candidates = [c for c in group.classes.tolist() if c not in protected]
    count = min(group.width - keep, len(candidates))
    candidates.sort(key=lambda c: (scores.get(c, 0.0), c))
    return np.array(candidates[:count], dtype=np.int64)


def _protected(analysis: Analysis, patterns) -> set[int]:
    if not patterns:
        return set()

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in patterns)

    labels = [m.labels for m in analysis.members if matches(m.value.name or "") or matches(m.node)]
    labels += [s.labels for s in analysis.spaces if matches(s.node)]
    return {int(r) for lab in labels for r in np.unique(analysis.sets.find(lab))}


def _keep_one_per_segment(analysis: Analysis, scores, removed: np.ndarray, by_group: dict) -> np.ndarray:
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
