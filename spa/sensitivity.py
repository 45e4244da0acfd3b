"""Allocation from measured sensitivity: how many channels each group loses, decided by how far
the model's outputs move when that group alone loses its least important ones.

Layers of a real model differ by orders of magnitude in what they can lose (a uniform 20% breaks
EfficientNet-Lite0). With calibration data, spa measures each group's loss curve: the group's
lowest-ranked channels are zeroed, every parameter that belongs to them, which is exactly what
removing them does (the zero-channel test's premise), at fractions 1/8, 2/8, ... of the group, and
the model's outputs on calibration samples are compared with the original's (KL divergence of
class scores, else the relative squared error). A session serves many trials: the parameters are
overridable inputs, each trial feeds the zeroed copies of one group's, and runs the model only
from the first node that reads them (`_Suffixes`).

Groups then compete on loss per MAC saved (per parameter, for a parameter target), one step of
1/8 of a group at a time, the flattest first (spa.sensitivity.order).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from spa import io, padding, runtime, verify
from spa.analysis import Analysis
from spa.apply import pruned_shapes
from spa.calibration import batch_size
from spa.count import Counts, count
from spa.progress import Progress
from spa.statistics import SESSION_THREADS, Forward

# Fractions of a group at which its loss is measured (within max_group_ratio). Finer steps matter
# more than more samples: on EfficientNet-Lite0 at 0.9 of the MACs, 4 steps on 16 samples kept
# top-1 agreement 0.77, 8 steps on 8 samples 0.905 (on 54 samples 0.89).
STEPS = 8
# The trials together run about PASSES passes of the model over the calibration samples, on at
# least MIN_ROWS rows of loss (an image: one row of class scores). The positions of a sequence
# are not independent samples: where a sample gives several rows (an LM's tokens, a text line's
# characters), at least MIN_SEQUENCE_ROWS, an LM window's worth. PP-OCRv4's recognizer (40
# positions a line, half of them the CTC blank) trialled on 1 line at 0.8 of the MACs read 0.734
# of the held-out lines as the original, on 4 lines 0.797, at about the same prune time.
PASSES = 1
MIN_ROWS = 8
MIN_SEQUENCE_ROWS = 128


@dataclasses.dataclass
class Step:
    """One step of a group's curve: to `end` of the group removed."""

    group: int
    end: float  # the fraction of the group removed after this step
    classes: int  # classes this step removes
    saved: float  # MACs (or params) it saves
    loss: float  # what it adds to the output loss


@dataclasses.dataclass
class Curves:
    """Every group's measured loss at each fraction, and the steps they take in order."""

    # group -> (fraction, classes, saved, loss)
    points: dict[int, list[tuple[float, int, float, float]]]
    steps: list[Step]  # flattest first
    total: int  # removable classes over the measured groups
    samples: int  # calibration samples the losses were measured on
    trials: int

    def shares(self, ratio: float) -> dict[int, float]:
        """The fraction of each group to remove for `ratio` of all the measured groups' classes:
        the flattest steps first, the first that would overshoot taken as far as the budget goes
        (monotone in ratio). Stopping short of it wasted up to a step: an eighth of one of
        all-MiniLM-L6-v2's FFNs is 1.4% of its MACs (0.739 of them reached for a target of 0.75)."""
        budget = ratio * self.total + 1e-9
        shares = {g: 0.0 for g in self.points}
        removed = 0
        for step in self.steps:
            if removed + step.classes > budget:
                start = shares[step.group]
                shares[step.group] = start + (budget - removed) / step.classes * (step.end - start)
                break
            removed += step.classes
            shares[step.group] = step.end
        return shares


def measure(
    analysis: Analysis,
    plan_for_group,
    feeds: list[dict],
    before: Counts,
    kind: str,
    max_group_ratio: float,
) -> Curves:
    """The loss curve of every group (lossy ones excepted: zeroing hidden channels is not removing
    them from a normalization). plan_for_group(group id, fraction) gives the classes removed."""
    model = analysis.model
    groups = [g for g in analysis.groups if not g.lossy and len(g.classes)]
    fractions = [k / STEPS for k in range(1, STEPS) if k / STEPS <= max_group_ratio + 1e-9]
    trials = len(groups) * len(fractions)
    members = {
        g.id: [m for m in analysis.members if analysis.removed_mask(m.labels, g.classes).any()]
        for g in groups
    }
    values = {g: list({m.value.name: m.value for m in ms}.values()) for g, ms in members.items()}
    suffixes = _Suffixes(model, values)
    groups.sort(key=lambda g: suffixes.cut[g.id])
    scores = verify.class_scores(model)
    suffixes.open(groups[0].id if groups else None)
    first = suffixes.run(feeds[0])
    feeds = _samples(
        feeds,
        trials,
        _rows(suffixes.names, first, scores) / _count(feeds[0]),
        whole=batch_size(suffixes.session)[1],
    )
    suffixes.feeds = feeds
    points: dict[int, list] = {}
    bar = Progress(trials, "sensitivity")
    done = 0
    reference = None
    for group in groups:
        # each session its own reference (its own optimizations): no change reads 0
        if suffixes.open(group.id) or reference is None:
            reference = [
                _expected(suffixes.names, out, scores, feed)
                for out, feed in zip(suffixes.runs({}), suffixes.feeds)
            ]
        curve, last = [(0.0, 0, 0.0, 0.0)], None
        for fraction in fractions:
            removed = plan_for_group(group.id, fraction)
            if last is not None and len(removed) == last[1]:
                curve.append((fraction, *last[1:]))  # rounding kept the same channels
            else:
                saved = getattr(before, kind) - getattr(
                    count(model, shapes=pruned_shapes(analysis, removed)), kind
                )
                zeroed = {m.value.name: _zeroed(analysis, m, removed) for m in members[group.id]}
                runs = zip(reference, suffixes.runs(zeroed), suffixes.feeds)
                loss = sum(_loss(e, out, feed) for e, out, feed in runs) / len(reference)
                last = (fraction, len(removed), float(saved), float(loss))
                curve.append(last)
            done += 1
            bar.update(done)
        points[group.id] = curve
    bar.close()
    steps = order(points)
    total = sum(len(g.classes) for g in groups)
    return Curves(points, steps, total, sum(_count(f) for f in feeds), trials)


def _count(feed: dict) -> int:
    return runtime.samples(feed)


def _rows(names: list[str], outputs: list[np.ndarray], scores: dict[str, str]) -> int:
    """Rows of loss in outputs: class-score rows (an LM's tokens), else their leading dim."""
    rows = [
        o.size // o.shape[-1]
        for n, o in zip(names, outputs)
        if n in scores and o.ndim >= 1 and o.shape[-1] >= 2
    ]
    return max(rows, default=max((len(o) for o in outputs if o.ndim), default=1))


def _samples(feeds: list[dict], trials: int, rows_per_sample: float, whole: bool) -> list[dict]:
    """The first calibration samples: about PASSES passes over all of them in all, at least
    MIN_ROWS rows of loss (MIN_SEQUENCE_ROWS where a sample gives several); whole feeds where the
    model fixes the batch size."""
    least = MIN_SEQUENCE_ROWS if rows_per_sample > 1 else MIN_ROWS
    allowed = max(
        math.ceil(least / max(rows_per_sample, 1e-9)),
        PASSES * sum(_count(f) for f in feeds) // max(trials, 1),
        1,
    )
    chosen, left = [], allowed
    for f in feeds:
        n = _count(f)
        if left <= 0:
            break
        chosen.append({k: v[:left] for k, v in f.items()} if n > left and not whole else f)
        left -= min(n, left)
    return chosen


class _Suffixes:
    """The sessions trials run in. A trial changes nothing before the first node that reads its
    group's parameters, so it runs the model from a cut there: the values that cross the cut are
    computed once, on the trial samples (statistics.Forward), and fed. The session's parameters of
    its groups are inputs too, so that each trial feeds zeroed copies of them.

    The cuts: for a model with convolutions, one session per group, whose parameters alone are
    fed: onnxruntime re-lays out a convolution's constant weight once for its CPU kernels (NCHWc);
    fed at run time, it cannot, and EfficientNet-Lite0's trials ran 5x slower per sample than a
    plain pass. Otherwise one session for each of up to SUFFIXES runs of consecutive groups: a fed
    matrix product loses little (SmolLM2-135M: 0.27 against 0.25 s), and a session costs an
    opening. The first session runs the whole model (its outputs count the rows of loss). One
    session is kept at a time: a session holds the model's weights. Where a cut does not run on
    its own, the session runs the whole model."""

    def __init__(self, model: ir.Model, values: dict[int, list[ir.Value]]):
        self.model, self.values = model, values
        self.feeds: list[dict] = []  # the trial samples, set once chosen
        position = {n: i for i, n in enumerate(model.graph)}
        start = {
            g: min((position.get(u.node, 0) for v in vs for u in v.uses()), default=0)
            for g, vs in values.items()
        }
        ordered = sorted(values, key=lambda g: (start[g], g))
        convs = {
            v.name
            for n in model.graph
            if n.op_type == "Conv"
            for v in n.inputs[1:2]
            if v is not None
        }
        if any(v.name in convs for vs in values.values() for v in vs):
            runs = [[g] for g in ordered]
        else:
            size = -(-len(ordered) // SUFFIXES)
            runs = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        # group -> the graph position its session starts at (0 for the first: the whole model)
        self.cut = {g: start[run[0]] if i else 0 for i, run in enumerate(runs) for g in run}
        self.run_of = {g: tuple(run) for run in runs for g in run}
        self.forward: Forward | None = None
        self.held: tuple | None = None  # (run, session, inputs per trial sample)

    def open(self, group: int | None) -> bool:
        """Hold the session of the group's trials; whether it is another than the one held. The
        held one goes first: two sessions would hold two copies of the weights."""
        run = self.run_of.get(group, ())
        if self.held is not None and self.held[0] == run:
            return False
        self.held = None
        # A lean session (a large model's) ran on the memory-mapped weights: their pages stay
        # resident after it, beside the copies the next cut's steps make (a 3.4 GB LLaMA-style
        # model peaked at 1.53x its weights here).
        io.release_pages(self.model.graph.initializers.values())
        self.held = (run, *self._open(run))
        return True

    @property
    def session(self):
        return self.held[1]

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict) -> list[np.ndarray]:
        return self.session.run(None, feed)

    def runs(self, fed: dict[str, np.ndarray]):
        """The held session's outputs on each trial sample, with `fed` parameters."""
        inputs = self.feeds if self.held[2] is None else self.held[2]
        return (self.run({**f, **fed}) for f in inputs)

    def _open(self, run: tuple) -> tuple:
        fed = list({v.name: v for g in run for v in self.values[g]}.values())
        cut = self.cut[run[0]] if run else 0
        crossing = self._crossing(cut) if cut else None
        if crossing is not None:
            try:
                return self._suffix(cut, crossing, fed)
            except Exception:  # onnxruntime raises untyped errors
                pass  # not on its own: the whole model, which opened before
        return _overridable(self.model, fed), None

    def _crossing(self, cut: int) -> dict[str, ir.Value] | None:
        """The values made before node `cut` and read from it on, on the trial samples."""
        if self.forward is None:
            self.forward = Forward(self.model, self.feeds)
        if not self.forward.advance(cut):
            return None
        return self.forward.cut

    def _suffix(self, cut: int, crossing: dict[str, ir.Value], fed: list[ir.Value]) -> tuple:
        graph = self.model.graph
        made_before = {v for n in list(graph)[:cut] for v in n.outputs}
        outputs = [v for v in graph.outputs if v not in made_before]
        inputs = [*crossing.values(), *(v for v in graph.inputs if not v.is_initializer()), *fed]
        suffix = ir.convenience.extract(graph, inputs, outputs)
        for value in suffix.inputs:  # a graph output read later keeps its declared shape: drop it
            if value.name in crossing:
                value.shape = None
        sess = runtime.session(
            ir.Model(
                suffix,
                ir_version=self.model.ir_version,
                functions=list(self.model.functions.values()),
            ),
            threads=SESSION_THREADS,
            lean=io.is_large(self.model),
        )
        wanted = {i.name for i in sess.get_inputs()} - {v.name for v in fed}
        kept = self.forward.kept
        return sess, [
            {n: kept[n][i] if n in kept else feed[n] for n in wanted if n in kept or n in feed}
            for i, feed in enumerate(self.feeds)
        ]


# Sessions a model without convolutions runs its trials in. Opening one costs SmolLM2-135M about
# 1.2 s; its 360 trials took 81 s in one session of the whole model, 63 s in 4, 61 s in 8, 65 s
# in 16.
SUFFIXES = 8


def _overridable(model: ir.Model, values: list[ir.Value]):
    """A session in which `values` (initializers) can be fed: listed as graph inputs too."""
    graph = model.graph
    added = [v for v in values if v not in graph.inputs]
    graph.inputs.extend(added)
    try:
        return runtime.session(model, threads=SESSION_THREADS, lean=io.is_large(model))
    finally:
        for v in added:
            graph.inputs.remove(v)


def _zeroed(analysis: Analysis, member, removed: np.ndarray) -> np.ndarray:
    array = member.value.const_value.numpy()
    hit = np.broadcast_to(analysis.removed_mask(member.labels, removed), array.shape)
    return np.where(hit, np.zeros((), array.dtype), array)


def _expected(
    names: list[str], outputs: list[np.ndarray], scores: dict[str, str], feed: dict
) -> list:
    """What every trial's outputs are compared with, per output, computed once: class scores as
    distributions (KL divergence, mean over rows), other float outputs with their squared norm
    (relative squared error); None for outputs that are not compared. Padded positions of the
    feed are left out (spa.padding)."""
    expected = []
    for name, a in zip(names, outputs):
        a = padding.real(np.asarray(a), feed)
        if a.dtype.kind != "f" or not a.size:
            expected.append(None)
        elif name in scores and a.ndim >= 1 and a.shape[-1] >= 2:
            rows = a.reshape(-1, a.shape[-1])
            expected.append(verify.Expected(rows, scores[name] == "probabilities"))
        else:
            expected.append((a, max(float(np.sum(np.square(a, dtype=np.float64))), 1e-30)))
    return expected


def _loss(expected: list, actual: list[np.ndarray], feed: dict) -> float:
    """The trial's outputs against `_expected`'s, summed over the outputs."""
    total = 0.0
    for e, b in zip(expected, actual):
        if e is None:
            continue
        b = padding.real(b, feed)
        if isinstance(e, verify.Expected):
            total += float(np.mean(e.kl(b.reshape(-1, b.shape[-1]))))
        else:
            a, norm = e
            total += float(np.sum(np.square(a - b, dtype=np.float64)) / norm)
    return total


def order(points: dict[int, list[tuple[float, int, float, float]]]) -> list[Step]:
    """Every group's next step (1/STEPS more of it), flattest first. A group's priority is the best
    average slope from where it stands to any later point of its curve, so that a noisy,
    non-convex curve is not stuck behind a bump: greedy with look-ahead, one step at a time."""
    at = {g: 0 for g in points}
    steps = []
    while True:
        best = None
        for g, curve in points.items():
            i = at[g]
            if i + 1 >= len(curve):
                continue
            here = curve[i]
            slope = min(_slope(p[3] - here[3], p[2] - here[2]) for p in curve[i + 1 :])
            if best is None or (slope, g) < best[:2]:
                best = (slope, g)
        if best is None:
            return steps
        g = best[1]
        here, there = points[g][at[g]], points[g][at[g] + 1]
        steps.append(Step(g, there[0], there[1] - here[1], there[2] - here[2], there[3] - here[3]))
        at[g] += 1


def _slope(loss: float, saved: float) -> float:
    if saved > 0:
        return max(loss, 0.0) / saved
    return 0.0 if loss <= 0 else math.inf
