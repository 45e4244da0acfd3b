"""The union-find core: fresh labels, unions (broadcast), pinning, compression, keep vectors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spa.labels import LabelSets, axis_keeps, compress, varying_axes


def _partition(count: int, pairs: list[tuple[int, int]]) -> list[int]:
    """The smallest label of each label's class, by repeated relabelling (the slow, obvious way)."""
    root = list(range(count))
    changed = True
    while changed:
        changed = False
        for a, b in pairs:
            low = min(root[a], root[b])
            for label in range(count):
                if root[label] in (root[a], root[b]) and root[label] != low:
                    root[label], changed = low, True
    return root


@given(
    st.integers(2, 40).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=30),
        )
    )
)
def test_unions_give_the_classes_of_the_pairs_rooted_at_their_smallest_label(case):
    count, pairs = case
    sets = LabelSets()
    labels = np.concatenate([[0], sets.new(count - 1)])
    if pairs:
        a, b = np.array(pairs).T
        sets.union(a, b)
    assert sets.find(labels).tolist() == _partition(count, pairs)


def test_new_labels_are_fresh_roots_and_the_store_grows():
    sets = LabelSets()
    first, second = sets.new(3), sets.new(1000)
    assert first.tolist() == [1, 2, 3] and second[0] == 4 and len(sets) == 1004
    assert np.array_equal(sets.find(second), second)


def test_a_label_united_with_zero_is_pinned_and_so_is_its_class():
    sets = LabelSets()
    a = sets.new(4)
    sets.union(a[1], a[2])
    sets.pin(a[2:3])
    assert sets.pinned(a).tolist() == [False, True, True, False]


def test_union_broadcasts_like_numpy():
    sets = LabelSets()
    rows, column = sets.new(3).reshape(3, 1), sets.new(1)
    sets.union(rows, column)  # every row label with the one column label
    assert len(set(sets.find(rows.ravel()).tolist())) == 1


def test_union_along_an_axis_couples_what_differs_only_there():
    sets = LabelSets()
    grid = sets.new(6).reshape(2, 3)
    sets.union_along(grid, [0])  # grid[0, j] with grid[1, j]
    roots = sets.find(grid)
    assert np.array_equal(roots[0], roots[1]) and len(set(roots[0].tolist())) == 3


def test_compress_shrinks_only_the_axes_labels_do_not_vary_along():
    labels = np.broadcast_to(np.arange(4).reshape(1, 4, 1), (2, 4, 5))
    small = compress(labels)
    assert small.shape == (1, 4, 1) and varying_axes(small) == [1]
    assert np.array_equal(np.broadcast_to(small, labels.shape), labels)


@pytest.mark.parametrize(
    ("mask", "keeps"),
    [
        ([[1, 0, 1], [1, 0, 1]], [[1, 1], [1, 0, 1]]),  # a sub-grid: whole column 1 removed
        ([[1, 0, 1], [0, 0, 0]], [[1, 0], [1, 0, 1]]),
        ([[1, 0], [0, 1]], None),  # a diagonal is no sub-grid: the surgery cannot slice it
    ],
)
def test_axis_keeps_are_the_sub_grid_of_a_mask_or_none(mask, keeps):
    found = axis_keeps(np.array(mask, dtype=bool))
    if keeps is None:
        assert found is None
    else:
        assert [k.tolist() for k in found] == [[bool(v) for v in k] for k in keeps]
