"""Channel labels: every channel of every layer output gets an integer id.

A tensor's labels are an integer array that broadcasts to the tensor's shape: element [n, c, h, w]
of a conv output carries the label of channel c. Label 0 marks elements that can never be removed
(graph inputs, constants, barriers). Coupling two channels is a union of their labels; a label
united with 0 is pinned. Arrays are kept compressed: an axis along which the labels do not vary
has size 1.
"""

from __future__ import annotations

import numpy as np


class LabelSets:
    """Union-find over labels. The root of a set is its smallest label, so 0 stays the pinned
    root."""

    def __init__(self) -> None:
        self._store = np.zeros(1, dtype=np.int64)  # grows by doubling: linear in the labels made
        self._size = 1

    @property
    def _parent(self) -> np.ndarray:
        return self._store[: self._size]

    def __len__(self) -> int:
        return self._size

    def new(self, count: int) -> np.ndarray:
        start = self._size
        if start + count > len(self._store):
            grown = np.zeros(max(2 * len(self._store), start + count), dtype=np.int64)
            grown[:start] = self._parent
            self._store = grown
        labels = np.arange(start, start + count, dtype=np.int64)
        self._store[start : start + count] = labels
        self._size += count
        return labels

    def find(self, labels: np.ndarray) -> np.ndarray:
        labels = np.asarray(labels, dtype=np.int64)
        roots = labels
        while True:
            up = self._parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self._parent[labels] = roots  # path compression
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Unite a[i] with b[i] for every position of the broadcast of a and b."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
        a, b = pairs[:, 0], pairs[:, 1]
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            lo = np.minimum(ra[differ], rb[differ])
            hi = np.maximum(ra[differ], rb[differ])
            np.minimum.at(self._parent, hi, lo)

    def pin(self, labels: np.ndarray) -> None:
        labels = np.unique(labels)
        self.union(labels, np.zeros_like(labels))

    def union_along(self, labels: np.ndarray, axes: list[int]) -> None:
        """Unite all labels that differ only in their index along `axes`."""
        for axis in axes:
            if labels.shape[axis] > 1:
                self.union(labels, labels.take([0], axis=axis))

    def pinned(self, labels: np.ndarray) -> np.ndarray:
        return self.find(labels) == 0


def compress(labels: np.ndarray) -> np.ndarray:
    """Shrink every axis along which the labels are constant to size 1."""
    for axis in range(labels.ndim):
        if labels.shape[axis] > 1:
            first = labels.take([0], axis=axis)
            if np.array_equal(np.broadcast_to(first, labels.shape), labels):
                labels = first
    return np.ascontiguousarray(labels)


def varying_axes(labels: np.ndarray) -> list[int]:
    return [axis for axis, size in enumerate(labels.shape) if size > 1]


def axis_keeps(mask: np.ndarray) -> list[np.ndarray] | None:
    """Per-axis keep vectors of a boolean mask, or None when the kept elements are not a
    sub-grid."""
    keeps = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        keeps.append(mask.any(axis=others) if others else mask.copy())
    grid = np.ones(mask.shape, dtype=bool)
    for axis, keep in enumerate(keeps):
        shape = [1] * mask.ndim
        shape[axis] = len(keep)
        grid = grid & keep.reshape(shape)
    return keeps if np.array_equal(grid, mask) else None


def row_keeps(mask: np.ndarray, axis: int = 0) -> list[np.ndarray] | None:
    """Per-axis keep vectors of a mask whose rows (along `axis`) each keep a sub-grid of one size,
    at positions of their own (a grouped conv's weight: each group keeps its own input channels):
    the kept rows, and the first kept row's vectors on the other axes. None where the rows differ
    in size or one keeps no sub-grid; where they agree along axis 0, mask[mask] row by row is the
    compacted tensor."""
    rows_first = np.moveaxis(mask, axis, 0)
    rows = rows_first.reshape(len(rows_first), -1).any(axis=1)
    kept = [axis_keeps(row) for row in rows_first[rows]]
    if not kept or any(k is None for k in kept):
        return None
    sizes = {tuple(int(a.sum()) for a in k) for k in kept}
    if len(sizes) != 1:
        return None
    others = list(kept[0])
    return [*others[:axis], rows, *others[axis:]]
