"""Padded positions of token batches (an attention mask's 0s) are outputs nobody reads: they give
no rows to the calibration statistics and no loss to the sensitivity trials."""

from __future__ import annotations

import numpy as np

from spa import io, padding, sensitivity, statistics
from spa.normalize import normalize

LENGTHS = (5, 9, 12)


def _sentences():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 100, (1, n)).astype(np.int64) for n in LENGTHS]


def _padded(sentences):
    ids = np.zeros((len(sentences), max(LENGTHS)), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(sentences):
        ids[i, : s.shape[1]], mask[i, : s.shape[1]] = s[0], 1
    return {"input_ids": ids, "attention_mask": mask}


def test_padding_gives_no_rows_to_the_statistics():
    """A BERT's statistics from one padded batch equal those from each sentence run alone."""
    model = io.load("models/transformers/bert_legacy.onnx")
    normalize(model)
    found = statistics.consumers(model)
    sentences = _sentences()
    alone = [{"input_ids": s, "attention_mask": np.ones_like(s)} for s in sentences]
    padded = statistics.collect(model, found, [_padded(sentences)])
    unpadded = statistics.collect(model, found, alone)
    assert len(found) > 8
    for c in found:
        assert padded[c.weight].count == unpadded[c.weight].count == sum(LENGTHS)
        np.testing.assert_allclose(
            padded[c.weight].mean_gram(), unpadded[c.weight].mean_gram(), rtol=1e-4, atol=1e-5
        )


def test_padded_outputs_add_no_loss():
    feed = _padded(_sentences())
    rng = np.random.default_rng(1)
    original = rng.standard_normal((len(LENGTHS), max(LENGTHS), 8)).astype(np.float32)
    moved = np.where(feed["attention_mask"][..., None] == 0, 1e3, original).astype(np.float32)
    expected = sensitivity._expected(["y"], [original], {}, feed)
    assert sensitivity._loss(expected, [moved], feed) == 0.0
    unmasked = {"input_ids": feed["input_ids"]}
    everywhere = sensitivity._expected(["y"], [original], {}, unmasked)
    assert sensitivity._loss(everywhere, [moved], unmasked) > 1.0


def test_only_a_mask_of_zeros_and_ones_marks_padding():
    feed = _padded(_sentences())
    assert padding.real_positions(feed).sum() == sum(LENGTHS)
    assert padding.real_positions({**feed, "attention_mask": feed["attention_mask"] * 2}) is None
    assert padding.real_positions({"input_ids": feed["input_ids"]}) is None
    pads = {"key_padding_mask": feed["attention_mask"] == 0}  # torch's: True at the padding
    np.testing.assert_array_equal(padding.real_positions(pads), feed["attention_mask"] == 1)
    whole = {"attention_mask": np.ones((2, 3), np.int64)}
    assert padding.real_positions(whole) is None  # nothing to leave out
