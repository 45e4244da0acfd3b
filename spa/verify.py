"""Is the pruned model right? The full checker, an onnxruntime session, the same signature.

Also the zero-channel check: if every parameter of the removed channels is zero, removing them
cannot change the outputs. It proves the couplings, index maps and slicing of a whole architecture
with one comparison.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from spa import padding
from spa.errors import SpaError, first_line
from spa.graph import is_default_domain
from spa.io import is_large, release_pages
from spa.runtime import (
    first_sample,
    fixed_batch,
    isolated,
    lean_session,
    parts,
    random_inputs,
    rows_per_run,
    samples,
    serialize,
    session,
    skeleton,
)


@dataclasses.dataclass
class Deviation:
    """How far the pruned model's outputs moved from the original's on some inputs: the
    verification inputs (random), or calibration samples held out of the fit (real ones)."""

    inputs: str  # what they were
    # per output: relative_error and cosine (floats) or agreement; class scores also top-1
    # agreement and KL
    outputs: dict[str, dict]
    relative_error: float  # the worst output's: max |a - b| / max |a|
    # the worst output's top-1 agreement (class scores on enough rows), else cosine (or, for
    # integer outputs, fraction equal)
    similarity: float
    # the removed channels were all zero, so nothing could move; None: not provable
    exact: bool | None
    held_out: bool = False  # on real samples the fit never saw: a measure of fidelity, not a proxy

    @property
    def likely_broken(self) -> bool:
        return self.similarity < (BROKEN_HELD_OUT if self.held_out else BROKEN_SIMILARITY)

    def describe(self) -> str:
        if self.held_out:
            parts = []
            for name, o in self.outputs.items():
                if "top1_agreement" in o:
                    parts.append(
                        f"'{name}' top-1 agreement {o['top1_agreement']:.3f}, KL {o['kl']:.3g}, "
                        f"cosine {o['cosine']:.4f}"
                    )
                elif "cosine" in o:
                    parts.append(
                        f"'{name}' cosine {o['cosine']:.4f}, relative error "
                        f"{o['relative_error']:.3g}"
                    )
                else:
                    parts.append(f"'{name}' agreement {o['agreement']:.3f}")
            text = (
                f"fidelity on {self.inputs}: "
                + "; ".join(parts[:4])
                + ("; ..." if len(parts) > 4 else "")
            )
            if self.likely_broken:
                text = f"WARNING: the pruned model is likely broken: {text}"
            return text
        text = (
            f"outputs moved by {self.relative_error:.3g} (max relative error), similarity "
            f"{self.similarity:.4f} (worst output's cosine), on {self.inputs}"
        )
        if self.exact:
            text += "; exact, as the removed channels were all zero"
        if self.likely_broken:
            text = (
                f"WARNING: the pruned model may be broken: {text}. Random inputs are a weak "
                "proxy (a calibrated prune fitted to real images can score lower than a worse one "
                "fitted to noise): check its accuracy on real data"
            )
        elif not self.exact:
            text += " (random inputs, a weak proxy: --calibration data gives held-out fidelity)"
        return text


# Below this similarity the outputs have little to do with the original's. Measured on
# EfficientNet-Lite0 (ImageNet) at 0.8-0.9 of the MACs, logits' cosine on one random input against
# top-1 agreement on 400 real images: 0.05-0.06 at agreement 0.00-0.07 (magnitude, no refit), 0.71
# at 0.52 (data-free refit), but 0.12 at 0.785 (calibrated on real crops): random inputs are a weak
# proxy, and the warning says so.
BROKEN_SIMILARITY = 0.5
# On held-out real samples (top-1 agreement, else cosine) the measure is the real thing, and a
# stricter bound separates usable from broken: SmolLM2-135M's next-token agreement was 0.776 at
# 1.15x the perplexity, 0.662 at 1.46x, but 0.500 at 7.4x (data-free); EfficientNet-Lite0's 0.906
# and 0.844 at agreement 0.902 and 0.703 on the evaluation images.
BROKEN_HELD_OUT = 0.6
# Removing all-zero channels leaves float rounding only; deep nets amplify it, but not this far.
EXACT_TOLERANCE = 1e-3
# Top-1 agreement over fewer rows than this is too coarse to judge by (one image: 0 or 1).
MIN_AGREEMENT_ROWS = 16


class Comparison:
    """Accumulates, batch by batch, how one output of the pruned model differs from the
    original's: max relative error, cosine, and for class scores (the last axis holds one score
    per class) top-1 agreement and the mean KL divergence of the softmax, row by row over that axis.
    Batch by batch because an LM's logits over held-out windows do not fit in memory at once, and
    within a batch a chunk of rows at a time (SmolLM2's 16 held-out windows are 100 M logits).

    Elementwise work runs in the outputs' own precision, sums in float64: float64 copies made
    SmolLM2's comparison cost 15 s (an exp in float64 costs 15x one in float32)."""

    def __init__(self, scores: str | None = None):
        self.scores = scores  # None, "logits" or "probabilities"
        self.dot = self.norm_a = self.norm_b = self.worst = self.scale = 0.0
        self.rows = self.agreeing = self.equal = self.elements = 0
        self.kl = 0.0
        self.floating = True

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            self.worst = float("inf")
            return
        self.floating = a.dtype.kind == "f"
        self.elements += a.size
        if not a.size:
            return
        classes = self.scores is not None and a.ndim >= 1 and a.shape[-1] >= 2
        width = a.shape[-1] if a.ndim else 1
        rows_a, rows_b = a.reshape(-1, width), b.reshape(-1, width)
        step = max(1, CHUNK_ELEMENTS // width)
        for start in range(0, len(rows_a), step):
            x, y = (
                _comparable(rows_a[start : start + step]),
                _comparable(rows_b[start : start + step]),
            )
            self.scale = max(self.scale, float(np.max(np.abs(x))))
            with np.errstate(over="ignore"):  # float32's max apart: moved by inf
                self.worst = max(self.worst, float(np.max(np.abs(x - y))))
            self.dot += _dot(x, y)
            self.norm_a += _dot(x, x)
            self.norm_b += _dot(y, y)
            self.equal += int(np.count_nonzero(x == y))
            if classes:
                self.rows += len(x)
                self.agreeing += int(np.count_nonzero(x.argmax(-1) == y.argmax(-1)))
                self.kl += float(np.sum(Expected(x, self.scores == "probabilities").kl(y)))

    def result(self) -> dict:
        error = self.worst / max(self.scale, 1e-12) if self.elements else 0.0
        if not self.floating:
            return {
                "relative_error": error,
                "agreement": self.equal / self.elements if self.elements else 1.0,
            }
        norms = np.sqrt(self.norm_a * self.norm_b)
        cosine = self.dot / norms if norms else float(self.norm_a == self.norm_b == 0.0)
        found = {"relative_error": error, "cosine": float(cosine)}
        if self.rows:
            found.update(
                top1_agreement=self.agreeing / self.rows, kl=self.kl / self.rows, rows=self.rows
            )
        return found

    def similarity(self, found: dict) -> float:
        if found.get("rows", 0) >= MIN_AGREEMENT_ROWS:
            return found["top1_agreement"]
        return found.get("cosine", found.get("agreement"))


CHUNK_ELEMENTS = 1 << 22  # elements of an output compared at a time


def _dot(x: np.ndarray, y: np.ndarray) -> float:
    """sum(x * y), each product and the sum in float64 (float32 products of large activations
    overflow), without a float64 copy."""
    return float(_row_dots(x, y).sum())


def _comparable(x: np.ndarray) -> np.ndarray:
    """Floats in their own precision (float16 as float32); integers and booleans as float64,
    exact for the ids and counts they hold."""
    if x.dtype.kind == "f":
        return x if x.dtype.itemsize >= 4 else x.astype(np.float32)
    return x.astype(np.float64)


class Expected:
    """Rows of class scores as the distributions that others are compared with, computed once
    (a sensitivity trial compares with the same reference every time: SmolLM2's 49,152 logits a
    token cost 22 s of its 130 s of trials when both sides were computed each time).

    KL(p || q) = sum p log p - sum p log q, and for logits log q = b - logsumexp(b): per row one
    logsumexp and one dot with p, in the scores' precision, summed in float64."""

    def __init__(self, a: np.ndarray, probabilities: bool):
        self.probabilities = probabilities
        a = _comparable(a)
        if probabilities:
            self.p = _normalized(a)
            self.total = self.p.sum(-1, dtype=np.float64)  # 1, to rounding
            self.neg_entropy = _row_dots(self.p, np.log(np.clip(self.p, 1e-30, None)))
        else:  # log p = a - logsumexp(a): no log of every score
            top = a.max(-1, keepdims=True)
            e = np.exp(a - top)
            norm = e.sum(-1, dtype=np.float64)
            self.p = e / norm[:, None].astype(a.dtype)
            self.total = self.p.sum(-1, dtype=np.float64)
            self.neg_entropy = _row_dots(self.p, a) - (top[:, 0] + np.log(norm)) * self.total

    def kl(self, b: np.ndarray) -> np.ndarray:
        """KL(self || b) per row, b in the same form (logits or probabilities)."""
        b = _comparable(b)
        if self.probabilities:
            clipped = np.clip(b, 1e-12, None)
            log_norm = np.log(clipped.sum(-1, dtype=np.float64))
            cross = _row_dots(self.p, np.log(clipped))
        else:
            top = b.max(-1, keepdims=True)
            log_norm = np.log(np.exp(b - top).sum(-1, dtype=np.float64)) + top[:, 0]
            cross = _row_dots(self.p, b)
        # never below 0: what rounding leaves of identical distributions
        return np.maximum(self.neg_entropy - cross + log_norm * self.total, 0.0)


def _row_dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum(x * y) per row, in float64, without a float64 copy."""
    return np.einsum("ij,ij->i", x, y, dtype=np.float64)


def _normalized(x: np.ndarray) -> np.ndarray:
    p = np.clip(x, 1e-12, None)
    return p / p.sum(-1, keepdims=True)


# Outputs made by these ops (through data movement) hold one score per class on their last axis.
_SCORE_MAKERS = {
    "Gemm": "logits",
    "MatMul": "logits",
    "LogSoftmax": "logits",
    "Softmax": "probabilities",
}
_PASS_THROUGH = {"Add", "Reshape", "Flatten", "Squeeze", "Identity", "Cast"}
# What a softmax written out in elementwise ops (jax2tf, Keras' exports: exp(z - max) / sum) passes
# its normalizer through on the way to the Div.
_BROADCASTS = _PASS_THROUGH | {"Expand", "Unsqueeze"}


def class_scores(model: ir.Model) -> dict[str, str]:
    """Outputs that look like class scores: made by a classifier head (Gemm, MatMul, Softmax or
    one written out in elementwise ops, LogSoftmax, through bias adds and reshapes) with at least
    two classes on the last axis: output name -> "logits" or "probabilities". Embeddings come out
    of normalizations or activations and are compared by cosine only."""
    found = {}
    for output in model.graph.outputs:
        if (
            output.dtype is None
            or not output.dtype.is_floating_point()
            or output.shape is None
            or len(output.shape) < 2
        ):
            continue
        last = output.shape[-1]
        if not isinstance(last, int) or last < 2:
            continue
        value = _through(output, _PASS_THROUGH)
        producer = value.producer()
        if producer is None or not is_default_domain(producer):
            continue
        if producer.op_type in _SCORE_MAKERS:
            found[output.name] = _SCORE_MAKERS[producer.op_type]
        elif value.shape is not None and _written_out_softmax(producer, len(value.shape)):
            found[output.name] = "probabilities"
    return found


def _through(value: ir.Value, ops: set[str]) -> ir.Value:
    """The value behind `value`'s chain of default-domain `ops` (first inputs)."""
    while (
        value.producer() is not None
        and value.producer().op_type in ops
        and is_default_domain(value.producer())
    ):
        value = value.producer().inputs[0]
    return value


def _written_out_softmax(node: ir.Node, rank: int) -> bool:
    """Div(Exp(z), ReduceSum(that Exp)): a softmax in elementwise ops (magika, exported by jax2tf,
    was compared by cosine where its class agreement moved)."""
    if node.op_type != "Div" or len(node.inputs) != 2 or None in node.inputs:
        return False
    exp = node.inputs[0].producer()
    total = _through(node.inputs[1], _BROADCASTS).producer()
    if not (
        exp is not None
        and exp.op_type == "Exp"
        and total is not None
        and total.op_type == "ReduceSum"
        and is_default_domain(total)
        and total.inputs[0] is node.inputs[0]
    ):
        return False
    if "axes" in total.attributes:
        axes = list(total.attributes.get_ints("axes"))
    elif len(total.inputs) > 1 and total.inputs[1] is not None:
        known = total.inputs[1].const_value
        axes = known.numpy().reshape(-1).tolist() if known is not None else None
    else:
        axes = None  # every axis, or none: not one distribution per row
    return axes is not None and [a % rank for a in axes] == [rank - 1]  # over the classes


def compare(
    names: list[str],
    pairs,
    inputs: str,
    exact: bool,
    scores: dict[str, str] | None = None,
    held_out: bool = False,
) -> Deviation:
    """Deviation over (original outputs, pruned outputs) pairs, one pair per batch."""
    comparisons = {name: Comparison((scores or {}).get(name)) for name in names}
    for expected, actual in pairs:
        for name, a, b in zip(names, expected, actual):
            comparisons[name].add(a, b)
    outputs = {name: c.result() for name, c in comparisons.items()}
    worst_error = max((o["relative_error"] for o in outputs.values()), default=0.0)
    similarity = min((comparisons[n].similarity(o) for n, o in outputs.items()), default=1.0)
    return Deviation(inputs, outputs, worst_error, similarity, True if exact else None, held_out)


def fidelity(
    original: ort.InferenceSession,
    pruned: ort.InferenceSession,
    batches: list[dict],
    scores: dict[str, str],
    exact: bool,
    weights: tuple[list[ir.Value], list[ir.Value]] = ([], []),
) -> Deviation:
    """The pruned model against the original on held-out samples, batch by batch. The pruned model
    runs one sample in a child process first (a native crash is an error line), then every batch
    here: a session forked into a child has lost onnxruntime's worker threads (SmolLM2's 16
    held-out windows ran 2x slower on 2 cores there).
    weights: each model's initializers, whose memory-mapped pages go back after each of its runs
    (sessions that share them touch them all: both models' at once were 1.9x a large model's)."""
    names = [o.name for o in original.get_outputs()]
    count = sum(samples(b) for b in batches)
    inputs = f"{count} held-out calibration sample(s), kept out of the fit"
    first = first_sample(pruned, batches[0])
    try:
        per_sample = isolated(
            lambda: sum(getattr(o, "nbytes", 0) for o in pruned.run(None, first)) // samples(first),
            f"running the pruned model on {inputs}",
        )
        # both models' outputs of a run alive at once (an LM's logits: 25 MB a window each)
        rows = rows_per_run(2 * per_sample) if fixed_batch(pruned) is None else 0

        def runs():
            for batch in batches:
                for part in parts(batch, rows):
                    expected = original.run(None, part)
                    release_pages(weights[0])
                    actual = pruned.run(None, part)
                    release_pages(weights[1])
                    # padded positions are outputs nobody reads (spa.padding)
                    yield (
                        [padding.real(o, part) for o in expected],
                        [padding.real(o, part) for o in actual],
                    )

        return compare(
            names,
            runs(),
            inputs,
            exact,
            scores,
            held_out=True,
        )
    except SpaError:
        raise
    except Exception as e:
        raise SpaError(
            f"the pruned model fails to run on {inputs}, where the original runs: {first_line(e)}"
        ) from None


@dataclasses.dataclass
class Reference:
    """The original model's outputs on the verification inputs."""

    feeds: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    inputs: str  # the inputs, described


@dataclasses.dataclass
class Verdict:
    output_shapes: list[tuple[int, ...]]
    serialized: bytes | None  # the checked model, ready to write (None past protobuf's limit)
    deviation: Deviation | None = None  # on the verification inputs
    fidelity: Deviation | None = None  # on held-out calibration samples, where there are some

    @property
    def measured(self) -> Deviation | None:
        """What to judge the result by: held-out fidelity where there is some."""
        return self.fidelity or self.deviation


def signature(model: ir.Model) -> tuple[list, list]:
    """Names, element types and shapes (symbolic dims by name) of the real inputs and the
    outputs."""

    def describe(v: ir.Value):
        shape = (
            None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape)
        )
        return (v.name, v.dtype, shape)

    inputs = [describe(v) for v in model.graph.inputs if not v.is_initializer()]
    return inputs, [describe(v) for v in model.graph.outputs]


def check(model: ir.Model, serialized: bytes | None = None) -> None:
    """onnx's full checker (with shape inference); raise SpaError on failure."""
    if serialized is None and not is_large(model):
        serialized = serialize(model)
    if serialized is not None:
        _check(serialized)
        return
    with tempfile.TemporaryDirectory(prefix="spa-") as folder:
        path, _ = skeleton(model, Path(folder))
        _check(str(path))


def _check(model: bytes | str) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise SpaError(f"pruned model fails the ONNX checker: {first_line(e)}") from None


def _opened(make) -> ort.InferenceSession:
    try:
        return make()
    except Exception as e:
        raise SpaError(f"onnxruntime cannot open the pruned model: {first_line(e)}") from None


def reference(
    original: ir.Model, input_shapes: dict[str, list[int]] | None = None, lean: bool | None = None
) -> Reference:
    """Run the original model on the verification inputs (random floats, integer inputs as ones),
    in a child process; a model that fails there is blamed, not the pruned one."""
    try:
        sess = session(original, lean=lean)
    except Exception as e:
        raise SpaError(f"onnxruntime cannot open the original model: {first_line(e)}") from None
    feeds = random_inputs(sess, input_shapes)
    inputs = "1 random sample (" + ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items()) + ")"
    try:
        outputs = isolated(lambda: sess.run(None, feeds), f"running the original model on {inputs}")
    except SpaError:
        raise
    except Exception as e:  # onnxruntime's errors are untyped
        raise SpaError(
            f"the original model fails to run on spa's test inputs, {inputs}: {first_line(e)}; "
            "give --input-shapes, or skip the check with --no-verify"
        ) from None
    return Reference(feeds, outputs, inputs)


def sliced(array: np.ndarray, keeps: list[np.ndarray]) -> np.ndarray:
    """An input or output with the channels a pruned signature lost removed (--prune-cache); a
    keep vector of another length than the array's axis (a symbolic dim) keeps that axis whole."""
    for axis, keep in enumerate(keeps):
        if not keep.all() and len(keep) == array.shape[axis]:
            array = np.compress(keep, array, axis=axis)
    return array


def resized(expected: tuple, keeps: dict[str, list[np.ndarray]]) -> tuple:
    """A signature with the dims of the inputs and outputs in `keeps` that lost channels."""

    def entry(name, dtype, shape):
        if name not in keeps or shape is None:
            return (name, dtype, shape)
        return (
            name,
            dtype,
            tuple(d if k.all() else int(k.sum()) for d, k in zip(shape, keeps[name])),
        )

    return tuple([entry(*e) for e in part] for part in expected)


def verify(
    expected_signature: tuple,
    expected_shapes: list,
    pruned: ir.Model,
    expected: Reference,
    exact: bool = False,
    lean: bool | None = None,
    keeps: dict[str, list[np.ndarray]] | None = None,
) -> Verdict:
    """Raise SpaError unless `pruned` keeps the signature, passes the full checker, opens in
    onnxruntime and gives outputs of the expected concrete shapes on the inputs the original ran
    on. The verdict says how far the outputs moved; where `exact` (the removed channels were all
    zero) they must not have moved at all.

    lean (default: for large models): check a skeleton of the model and run it on shared weights
    (`spa.runtime.skeleton`) instead of serializing it; the verdict then carries no serialized
    model. keeps: the inputs and outputs that lose channels (--prune-cache), by name; the pruned
    model gets those inputs sliced and is compared on those outputs' kept channels."""
    keeps = keeps or {}
    expected_signature = resized(expected_signature, keeps)
    if signature(pruned) != expected_signature:
        raise SpaError(
            f"pruned model changed the inputs or outputs: {expected_signature} -> "
            f"{signature(pruned)}"
        )
    serialized = None if (is_large(pruned) if lean is None else lean) else serialize(pruned)
    if serialized is not None:
        _check(serialized)
        sess = _opened(lambda: session(pruned, serialized=serialized))
    else:
        with tempfile.TemporaryDirectory(prefix="spa-") as folder:
            path, shared = skeleton(pruned, Path(folder))
            _check(str(path))
            sess = _opened(lambda: lean_session(path, shared, 1))
    feeds = {k: sliced(v, keeps[k]) if k in keeps else v for k, v in expected.feeds.items()}
    try:
        outputs = isolated(
            lambda: sess.run(None, feeds), f"running the pruned model on {expected.inputs}"
        )
    except SpaError:
        raise
    except Exception as e:
        raise SpaError(
            f"the pruned model fails to run in onnxruntime on {expected.inputs}, where the "
            f"original runs: {first_line(e)}"
        ) from None
    names = [arg.name for arg in sess.get_outputs()]
    originals = [sliced(o, keeps[n]) if n in keeps else o for n, o in zip(names, expected.outputs)]
    for output, original, name, shape in zip(outputs, originals, names, expected_shapes):
        want = original.shape if name in keeps else shape
        if want is not None and output.shape != tuple(want):
            raise SpaError(
                f"pruned model's output '{name}' has shape {output.shape}, the original "
                f"{tuple(want)}"
            )
    moved = compare(names, [(originals, outputs)], expected.inputs, exact)
    if exact and not moved.relative_error <= EXACT_TOLERANCE:
        raise SpaError(
            "spa bug: the removed channels were all zero, yet the outputs moved by "
            f"{moved.relative_error:.3g} (relative error);"
            " nothing written. Please report it with the model; `spa analyze` lists what spa saw"
        )
    return Verdict(output_shapes=[o.shape for o in outputs], serialized=serialized, deviation=moved)


def all_zero(analysis, classes: np.ndarray) -> bool:
    """Whether every parameter element that belongs to one of `classes` is zero: removing them
    then cannot change the outputs (outside lossy groups, whose statistics change)."""
    if any(g.lossy and np.isin(g.classes, classes).any() for g in analysis.groups):
        return False
    for member in analysis.members:
        hit = analysis.removed_mask(member.labels, classes)
        if hit.any() and np.any(
            member.value.const_value.numpy()[np.broadcast_to(hit, member.value.const_value.shape)]
        ):
            return False
    return True


def zero_classes(analysis, classes: np.ndarray) -> None:
    """Zero every parameter element that belongs to one of `classes` (root labels)."""
    for member in analysis.members:
        array = member.value.const_value.numpy()
        hit = np.broadcast_to(analysis.removed_mask(member.labels, classes), array.shape)
        if hit.any():
            array = np.where(hit, np.zeros((), array.dtype), array)
            member.value.const_value = ir.tensor(array, name=member.value.name)


def relative_error(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(expected, actual):
        if a.shape != b.shape:
            return float("inf")
        scale = max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12)
        worst = max(
            worst, float(np.max(np.abs(a.astype(np.float64) - b))) / scale if a.size else 0.0
        )
    return worst
