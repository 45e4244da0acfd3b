"""Features and products: the rows the statistics are made of."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from spa import statistics


def _naive_im2col(x, kernel, strides, pads, dilations):
    """Every output position's patch, by loops over a zero-padded input (2-D)."""
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out_h = (padded.shape[2] - (kernel[0] - 1) * dilations[0] - 1) // strides[0] + 1
    out_w = (padded.shape[3] - (kernel[1] - 1) * dilations[1] - 1) // strides[1] + 1
    rows = []
    for n in range(len(x)):
        for i, j in itertools.product(range(out_h), range(out_w)):
            top, left = i * strides[0], j * strides[1]
            patch = padded[
                n,
                :,
                top : top + (kernel[0] - 1) * dilations[0] + 1 : dilations[0],
                left : left + (kernel[1] - 1) * dilations[1] + 1 : dilations[1],
            ]
            rows.append(patch.reshape(-1))
    return np.stack(rows).reshape(len(x), out_h * out_w, -1)


@pytest.mark.parametrize(
    "shape, kernel, strides, pads, dilations",
    [
        ((2, 3, 9, 11), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1]),
        ((2, 4, 10, 10), [3, 3], [2, 2], [0, 1, 0, 1], [1, 1]),
        ((1, 2, 7, 8), [2, 3], [1, 2], [1, 0, 2, 1], [2, 1]),
        ((3, 5, 6, 6), [1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),
    ],
)
def test_conv_patches_are_those_of_the_padded_input_at_the_sampled_positions(
    shape, kernel, strides, pads, dilations
):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    everything = _naive_im2col(x, kernel, strides, pads, dilations)  # (N, positions, C * K)
    assert np.array_equal(
        statistics.im2col(x, kernel, strides, pads, dilations),
        everything.reshape(-1, everything.shape[2]),
    )
    step = -(-everything.shape[1] // 5)
    sampled = everything[:, ::step].reshape(-1, everything.shape[2])
    assert np.array_equal(
        statistics.im2col(x, kernel, strides, pads, dilations, positions=5), sampled
    )


def test_tiled_products_overflow_without_warnings():
    """Overflow is checked on the sums (a CalibrationError there): the tiles, computed in worker
    threads, must not warn on their own (numpy's error state is per thread)."""
    x = np.full((4, 600), 1e30, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isinf(statistics._products(x, x)).all()


def test_tiled_products_do_not_depend_on_the_number_of_workers(monkeypatch):
    rng = np.random.default_rng(0)
    x, y = (
        rng.standard_normal((300, 600)).astype(np.float32),
        rng.standard_normal((300, 520)).astype(np.float32),
    )
    results = []
    for workers in (1, 3):
        monkeypatch.setattr(statistics.os, "cpu_count", lambda workers=workers: workers)
        statistics.pool.cache_clear()
        results.append((statistics._products(x, x), statistics._products(x, y)))
    statistics.pool.cache_clear()
    assert all(np.array_equal(a, b) for a, b in zip(*results))
    gram, cross = results[0]
    assert np.array_equal(gram, gram.T)
    assert np.allclose(gram, x.T.astype(np.float64) @ x, rtol=1e-4, atol=1e-2) and np.allclose(
        cross, x.T.astype(np.float64) @ y, rtol=1e-4, atol=1e-2
    )
