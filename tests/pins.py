"""Which channels an analysis keeps without saying why.

Every pin of labels is recorded with whether a reason was written down with it (spa analyze's
barriers, kept ops, normalizations), and every other union of labels; a pinned channel of a layer
is explained when the labels it was united with, pins aside, include some pinned with a reason."""

from __future__ import annotations

import contextlib
import inspect

import numpy as np

import spa
from spa import labels as label_sets

# The functions that pin channels (call LabelSets.pin) and record why (spa.analysis.Propagation
# and spa.rules).
REASONED = {
    "keep",  # Kept: an op keeps them
    "barrier",  # Barrier: an op spa leaves alone
    "_apply_rule",  # Barrier: a rule that does not cover the node
    "_pin_channel_count_reads",  # Barrier: a channel count read at run time
    "layer_norm",  # Normalization
    "axis_local",  # Normalization (statistics over channels; the other pins go through keep)
}


@contextlib.contextmanager
def _recorded():
    pins: list[tuple[np.ndarray, bool]] = []
    edges: list[tuple[np.ndarray, np.ndarray]] = []
    union, pin = label_sets.LabelSets.union, label_sets.LabelSets.pin
    inside_pin = [False]

    def recording_union(self, a, b):
        if not inside_pin[0]:  # a union with class 0 pins silently: not an edge
            a, b = (x.ravel() for x in np.broadcast_arrays(np.asarray(a), np.asarray(b)))
            real = (a != 0) & (b != 0)
            edges.append((a[real].copy(), b[real].copy()))
        union(self, a, b)

    def recording_pin(self, labels):
        caller = inspect.stack()[1].function
        pins.append((np.unique(labels).copy(), caller in REASONED))
        inside_pin[0] = True
        try:
            pin(self, labels)
        finally:
            inside_pin[0] = False

    label_sets.LabelSets.union, label_sets.LabelSets.pin = recording_union, recording_pin
    try:
        yield pins, edges
    finally:
        label_sets.LabelSets.union, label_sets.LabelSets.pin = union, pin


def unexplained(model, **analyze) -> list[str]:
    """The layers with channels kept that no barrier, kept op or normalization explains."""
    with _recorded() as (pins, edges):
        analysis = spa.analyze(model, **analyze)
    components = label_sets.LabelSets()
    components.new(len(analysis.sets) - 1)
    for a, b in edges:
        components.union(a, b)
    explained = {
        int(root)
        for labels, reasoned in pins
        if reasoned
        for root in components.find(labels[labels != 0])
    }
    found = []
    for space in analysis.spaces:
        pinned = space.labels[analysis.sets.pinned(space.labels)]
        if set(components.find(pinned).tolist()) - explained:
            found.append(space.node)
    return found
