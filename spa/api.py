"""The pipeline end to end: load, normalize, analyze, score, plan, apply, verify, save."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob
import json
import logging
import os
import time
from pathlib import Path

import onnx
import onnx_ir as ir

from spa import calibration as calibration_source
from spa import io, progress, runtime, sensitivity, statistics
from spa import verify as verification
from spa.analysis import Analysis
from spa.analysis import analyze as analyze_model
from spa.apply import apply, pruned_shapes, signature_keeps, weight_keeps
from spa.calibration import Source
from spa.compensate import mean_shifts, refit, shift_biases
from spa.count import Counts, count
from spa.errors import CalibrationError, SpaError, first_line
from spa.graph import quantized_ops
from spa.normalize import normalize
from spa.options import DAMPING, PruneOptions
from spa.plan import Plan, default_round_to, layer_ratios, make_plan, plan_from_report
from spa.score import DATA_CRITERIA, dead_first, reading_classes, score, score_with_statistics

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneResult:
    model: ir.Model  # the pruned model
    # The analysis of the model before pruning: its groups, labels and shapes describe the
    # original (the surgery worked in place, so analysis.model is the same object as `model`).
    analysis: Analysis
    plan: Plan
    before: Counts
    after: Counts
    verdict: verification.Verdict | None
    seconds: float
    ratio: float  # the ratio used: given, or found for a target
    # {"kind", "target", "reached", "met"} when pruned to a target; with min_fidelity also
    # "fidelity": {"bound", "reached", "met", "ratio", "steps"}
    target: dict | None = None
    method: Method | None = None
    # every option, as given and as resolved
    options: dict = dataclasses.field(default_factory=dict)
    # the inputs and outputs whose shapes changed (--prune-cache): name -> (before, after)
    signature_changes: dict = dataclasses.field(default_factory=dict)

    def report(self) -> dict:
        from spa.report import prune_report

        return prune_report(self)

    def __repr__(self) -> str:
        macs = self.after.macs / self.before.macs if self.before.macs else float("nan")
        params = self.after.params / self.before.params if self.before.params else float("nan")
        moved = self.verdict.measured if self.verdict is not None else None
        return (
            f"PruneResult(ratio={self.ratio:.4g}, macs={macs:.3f}x, params={params:.3f}x, "
            f"groups={len(self.analysis.groups)}, "
            f"removed={len(self.plan.removed)}, "
            f"similarity={'-' if moved is None else f'{moved.similarity:.4f}'}, "
            f"seconds={self.seconds:.1f})"
        )


@dataclasses.dataclass
class Method:
    """How the channels were chosen and the layers repaired."""

    importance: str
    calibration: calibration_source.Source | None  # None: no data, no repair from data
    compensated: bool
    note: str | None = None  # why the data-free default was not used
    # layers over statistics.MAX_WIDTH inputs
    too_wide: list[str] = dataclasses.field(default_factory=list)
    # how many channels each group loses: "uniform", "global" or "sensitivity"
    allocation: str = "uniform"
    sensitivity: dict | None = None  # {"samples", "trials", "seconds"} where measured
    damping: float = DAMPING  # the ridge of the data-aware scores and the refit

    def describe(self) -> str:
        source = {
            Source.DATA: "calibration data",
            Source.SYNTHETIC: "synthetic calibration (data-free)",
            Source.GENERATED: "calibration on text the model generated itself (data-free)",
            Source.BATCHNORM: "BatchNormalization statistics (data-free)",
            None: "no data",
        }[self.calibration]
        repair = (
            "biases absorb the removed channels' means"
            if self.calibration is Source.BATCHNORM
            else "layers refit"
        )
        text = f"importance {self.importance}, {source}, " + (
            repair if self.compensated else "no refit"
        )
        if self.damping != DAMPING and self.calibration in (
            Source.DATA,
            Source.SYNTHETIC,
            Source.GENERATED,
        ):
            text += f" (damping {self.damping:g})"
        text += {
            "uniform": ", every group by the same ratio",
            "global": ", channels ranked across groups",
            "sensitivity": ", groups allocated by measured sensitivity"
            + (
                f" ({self.sensitivity['trials']} trials on {self.sensitivity['samples']} samples, "
                f"{self.sensitivity['seconds']:.0f} s)"
                if self.sensitivity
                else ""
            ),
        }[self.allocation]
        if self.too_wide:
            names = ", ".join(self.too_wide[:3]) + (", ..." if len(self.too_wide) > 3 else "")
            text += (
                f"; {len(self.too_wide)} layer(s) with over {statistics.MAX_WIDTH:,} input "
                f"features ({names}): scored as if their inputs were uncorrelated"
                + (", only their biases refit (for the mean)" if self.compensated else "")
            )
        return text + (f"; data-free refit skipped: {self.note}" if self.note else "")


def _corrupt_model_errors(fn):
    """A model that loads and passes the checker can still hold tensors onnx-ir cannot write back
    (a flipped byte): say so in one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ir.serde.SerdeError as e:
            raise SpaError(
                f"the model cannot be serialized again, is it corrupt? ({first_line(e, 160)})"
            ) from None

    return wrapper


def _load(model) -> tuple[ir.Model, Path | None]:
    if isinstance(model, (str, os.PathLike)):
        return io.load(model), Path(model)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), None
    if isinstance(model, ir.Model):
        return io.clone(model), None
    raise SpaError(
        f"expected a path, an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}"
    )


@_corrupt_model_errors
def analyze(
    model,
    input_shapes: dict[str, list[int]] | None = None,
    prune_hidden: bool = False,
    prune_cache: bool = False,
) -> Analysis:
    """Groups of coupled channels and the barriers of a model (a path, ModelProto or
    onnx_ir.Model)."""
    work, _ = _load(model)
    normalize(work)
    return analyze_model(work, input_shapes, prune_hidden, prune_cache)


@_corrupt_model_errors
def prune(model, output: str | os.PathLike | None = None, **options) -> PruneResult:
    """Prune `model` (a path, onnx.ModelProto or onnx_ir.Model) and, if `output` is given, write
    the result there. The options (ratio, target_macs, calibration, importance, allocation, ...)
    are spa.options.PruneOptions' fields, each documented there."""
    start = time.perf_counter()
    o = PruneOptions.of(options)
    if o.prune_cache and o.calibration is not None:
        raise SpaError(
            "--prune-cache prunes by magnitude for now: calibration data would need the cache "
            "inputs sliced in every statistics pass"
        )
    record = o.record(calibration_source.describe)
    work, source, large = _read(model, output)
    expected_signature = verification.signature(work)
    progress.step("normalizing")
    normalize(work)
    ignore = _ignore_patterns(work, o.ignore, o.exclude_ops)
    progress.step("running the original on the verification inputs")
    reference = verification.reference(work, o.input_shapes, lean=large) if o.verify else None
    io.release_pages(work.graph.initializers.values())
    progress.step("finding the coupled channels")
    analysis = analyze_model(work, o.input_shapes, o.prune_hidden, o.prune_cache)
    before = count(work, shapes=analysis.shapes)
    consumers = statistics.consumers(work)
    method, data, means, scores = _method_and_scores(work, analysis, consumers, large, o)
    planner = _Planner(analysis, method, data, scores, before, ignore, o)
    io.release_pages(work.graph.initializers.values())  # the sensitivity trials read them all
    progress.step("planning")
    ratio, plan, target = _plan(analysis, planner, before, o)
    record["resolved"] = {
        "round_to": planner.step,  # where a target made the default finer, the step used
        "importance": method.importance,
        "allocation": method.allocation,
        "calibration": method.calibration,
    }
    if o.min_fidelity is not None:
        ratio, target = _fidelity_bound(work, planner, method, data, means, ratio, target, o, large)
        plan = planner(ratio)
    expected_shapes = [analysis.shapes.get(v) for v in work.graph.outputs]
    planned_shapes = pruned_shapes(analysis, plan.removed)
    keeps = signature_keeps(analysis, plan.removed)
    exact = o.verify and verification.all_zero(analysis, plan.removed)
    progress.step("removing channels" + (" and refitting" if method.compensated else ""))
    repair = data if method.compensated else None
    with io.spilled(work) as spill:  # a large model's pruned weights wait on disk
        shifted = _remove_and_repair(analysis, plan.removed, consumers, repair, means, spill)
        if not shifted and method.calibration is Source.BATCHNORM:
            method.calibration, method.compensated = (
                None,
                False,
            )  # no removed channel came from a BN
        after = count(work, shapes=planned_shapes)
        if target is not None and "kind" in target:  # the fidelity bound may have cut less
            kind = target["kind"]
            target["reached"] = getattr(after, kind) / max(getattr(before, kind), 1)
            target["met"] = target["reached"] <= target["target"]
        _record_provenance(work, record, before, after)
        verdict = None
        if o.verify:
            progress.step("verifying the pruned model")
            verdict = verification.verify(
                expected_signature, expected_shapes, work, reference, exact, lean=large, keeps=keeps
            )
            if data is not None and data.held_out:
                progress.step("measuring fidelity on held-out samples")
                verdict.fidelity = data.fidelity(work, exact, verdict.serialized, large)
        if source is not None:
            before.file_bytes = io.file_bytes(source)
        if output is not None:
            progress.step("writing the pruned model")
            after.file_bytes = io.save(
                work,
                output,
                serialized=verdict.serialized if verdict else None,
                external=large or None,
            )
    seconds = time.perf_counter() - start
    changes = _signature_changes(expected_signature, keeps)
    return PruneResult(
        work,
        analysis,
        plan,
        before,
        after,
        verdict,
        seconds,
        ratio,
        target,
        method,
        record,
        changes,
    )


def _signature_changes(expected: tuple, keeps: dict) -> dict[str, tuple[list, list]]:
    """name -> (shape before, shape after) of the inputs and outputs that lost channels."""
    after = {
        name: shape for part in verification.resized(expected, keeps) for name, _, shape in part
    }
    return {
        name: (list(shape), list(after[name]))
        for part in expected
        for name, _, shape in part
        if name in keeps
    }


def _read(model, output) -> tuple[ir.Model, Path | None, bool]:
    """The model to prune, the file it came from (None for an in-memory model) and whether it is
    large (then verified on shared weights and written with external data). Quantized models and
    an output that would overwrite an input are refused here, before any work."""
    progress.step("reading the model")
    work, source = _load(model)
    if output is not None:
        io.check_output_path(source, Path(output))
    if quantized := quantized_ops(work):
        raise SpaError(
            f"the model is quantized ({', '.join(quantized)}): spa prunes float models. Prune the "
            "float model, then quantize the pruned one (onnxruntime's quantization keeps the "
            "speed-up)"
        )
    return work, source, io.is_large(work)


def _method_and_scores(
    work: ir.Model,
    analysis: Analysis,
    consumers: list[statistics.Consumer],
    large: bool,
    o: PruneOptions,
) -> tuple[Method, _Calibrated | None, dict, dict[int, float]]:
    """The method (choose_method) and the channels' scores by it. A data-free source spa chose
    that the model fails on (NaN from a Log of noise, float32 overflow) falls back to none."""
    progress.step("choosing the method (and reading or making calibration data)")
    choice = dict(
        calibration=o.calibration,
        importance=o.importance,
        allocation="global" if o.global_ranking else o.allocation,
        compensate=o.compensate,
        input_shapes=o.input_shapes,
        seed=o.seed,
        damping=o.damping,
    )
    method, data, means = choose_method(work, analysis, consumers, large, **choice)
    progress.step(f"scoring channels ({method.importance})")
    try:
        return method, data, means, _scores(analysis, method, data, o.seed)
    except CalibrationError as e:
        if o.calibration is not None:
            raise  # the user's own data: the error is theirs to see
        failed = f"the model fails on {method.calibration} data ({e})"
        method, data, means = choose_method(
            work, analysis, consumers, large, **choice, failed=failed
        )
        return method, data, means, _scores(analysis, method, data, o.seed)


class _Planner:
    """The plan for any ratio, as the options ask: the allocation (uniform, global, or the shares
    that each group's measured sensitivity gives), fixed layer ratios, rounding and the ignore
    list. With sensitivity allocation, the sensitivity is measured here, once."""

    def __init__(self, analysis, method, data, scores, before, ignore, o: PruneOptions):
        self.analysis, self.scores, self.ignore, self.o = analysis, scores, ignore, o
        self.step = default_round_to() if o.round_to is None else o.round_to
        self.by_score = method.allocation == "global"
        self.fixed, unmatched = layer_ratios(analysis, o.layer_ratios)
        for pattern in unmatched:
            logger.warning("layer ratio pattern %r matches no layer of a prunable group", pattern)
        self.kind = "macs" if o.target_params is None else "params"
        self.curves = None
        if method.allocation == "sensitivity" and o.plan is None:
            progress.step("measuring each group's sensitivity")
            measuring = time.perf_counter()

            # One group cut, the others whole; by the fraction itself: rounded, a narrow group's
            # first steps removed nothing and read as free (magika's 64 channels by 16s: an eighth).
            def alone(gid: int, fraction: float):
                return make_plan(analysis, scores, 0.0, 1, ignore, shares={gid: fraction})

            self.curves = sensitivity.measure(
                analysis,
                lambda gid, fraction: alone(gid, fraction).removed,
                data.feeds,
                before,
                self.kind,
                o.max_group_ratio,
            )
            method.sensitivity = {
                "samples": self.curves.samples,
                "trials": self.curves.trials,
                "seconds": time.perf_counter() - measuring,
            }

    def __call__(self, ratio: float, on: Analysis | None = None) -> Plan:
        """The plan at `ratio`, of the analysis it was made with or of `on` (a copy's)."""
        shares = self.curves.shares(ratio) if self.curves is not None else None
        return make_plan(
            on or self.analysis,
            self.scores,
            ratio,
            self.step,
            self.ignore,
            self.by_score,
            self.o.max_group_ratio,
            shares,
            self.fixed,
        )


def _plan(
    analysis: Analysis, planner: _Planner, before: Counts, o: PruneOptions
) -> tuple[float, Plan, dict | None]:
    """The ratio, the plan and the target record: an earlier report's plan, the smallest ratio
    that meets a MACs or params target, or the ratio given."""
    if o.plan is not None:
        report = o.plan
        if isinstance(report, (str, os.PathLike)):
            report = io.load_json(report, "--plan")
        plan = plan_from_report(analysis, report)
        # the fraction of units the report removes
        return len(plan.removed) / max(1, sum(g.width for g in analysis.groups)), plan, None
    goal = o.target_macs if o.target_params is None else o.target_params
    if goal is None:
        return o.ratio, planner(o.ratio), None
    ratio, plan, reached = _search_ratio(analysis, before, planner, planner.kind, goal)
    # The default round-to is for speed, not for the cut: where its steps jump past the target
    # (PP-OCR's detector at 0.8 of the MACs reached 0.49 by 16s, magika at 0.9 reached 0.75),
    # finer steps come closer. A round-to the user gave is kept, and the report says it cut deeper.
    while o.round_to is None and planner.step > 1 and reached < goal - TARGET_SLACK:
        planner.step //= 2
        ratio, plan, reached = _search_ratio(analysis, before, planner, planner.kind, goal)
    target = {"kind": planner.kind, "target": goal, "reached": reached, "met": reached <= goal}
    if reached < goal - TARGET_SLACK and planner.step > 1:
        target["rounded_past"] = planner.step
    return ratio, plan, target


def _fidelity_bound(
    work: ir.Model,
    planner: _Planner,
    method: Method,
    data: _Calibrated | None,
    means: dict,
    ratio: float,
    target: dict | None,
    o: PruneOptions,
    large: bool,
) -> tuple[float, dict]:
    """The largest ratio up to `ratio` whose pruned and refit model keeps the held-out fidelity
    at least o.min_fidelity (_fidelity_search), each step a prune of a copy."""
    if data is None or not data.held_out:
        raise SpaError(
            "min_fidelity needs calibration data: real samples held out of the fit measure the "
            "fidelity"
        )
    pristine = io.clone(work)

    def fidelity_at(r: float) -> float:
        trial = io.clone(pristine)
        on = analyze_model(trial, o.input_shapes, o.prune_hidden, o.prune_cache)
        repair = data if method.compensated else None
        with io.spilled(trial, outlives=False) as spill:
            removed = planner(r, on).removed
            _remove_and_repair(on, removed, statistics.consumers(trial), repair, means, spill)
            return data.fidelity(trial, False, None, large).similarity

    progress.step(f"searching the cut that keeps fidelity >= {o.min_fidelity:g}")
    return _fidelity_search(fidelity_at, ratio, o.min_fidelity, target)


def _ignore_patterns(model: ir.Model, patterns, exclude_ops) -> list[str]:
    """The name patterns to leave alone: the given ones (a note for each that matches nothing) and
    the names of the nodes of the excluded op types."""
    names = [n.name for n in model.graph if n.name] + list(model.graph.initializers)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            logger.warning("ignore pattern %r matches no node or initializer name", pattern)
    excluded = [n.name for n in model.graph if n.op_type in set(exclude_ops) and n.name]
    for op in sorted(set(exclude_ops) - {n.op_type for n in model.graph}):
        logger.warning("excluded op type %r: the model has no such node", op)
    return [*patterns, *(glob.escape(name) for name in excluded)]


def _record_provenance(model: ir.Model, options: dict, before: Counts, after: Counts) -> None:
    """The pruned model says what made it (metadata_props, which every ONNX tool keeps)."""
    from spa import __version__

    model.metadata_props["spa.version"] = __version__
    model.metadata_props["spa.options"] = json.dumps(options, sort_keys=True, default=str)
    model.metadata_props["spa.ratios"] = json.dumps(
        {
            k: getattr(after, k) / getattr(before, k)
            for k in ("macs", "params")
            if getattr(before, k)
        }
    )


def choose_method(
    work: ir.Model,
    analysis: Analysis,
    consumers: list[statistics.Consumer],
    large: bool,
    *,
    calibration,
    importance: str,
    allocation: str,
    compensate: bool | None,
    input_shapes,
    seed: int,
    damping: float = DAMPING,
    failed: str | None = None,
) -> tuple[Method, _Calibrated | None, dict]:
    """How channels are chosen and layers repaired, from the options and the model: the criterion,
    the calibration source (the user's data; else text a causal LM generates, or synthetic data
    where that is cheap enough; else none), the allocation and the repair. Returns the method, the
    calibration (None without data) and, for the data-free repair, BatchNormalization means.
    failed: why a data-free source spa chose did not work (then none is tried)."""
    note, data, source = failed, None, calibration
    if calibration is None and importance == "auto" and failed is None:
        if calibration_source.token_input(work) is not None:
            source = Source.GENERATED  # a causal language model writes its own calibration text
        else:
            note = calibration_source.why_not_data_free(
                work, analysis.shapes, consumers, large, input_shapes
            )
            source = Source.SYNTHETIC if note is None else None
            if note is not None:  # said up front, before the steps that take long
                logger.warning("no data-free refit: %s; channels by magnitude", note)
    if source is not None:
        try:
            data = _Calibrated(work, source, input_shapes, seed, damping)
        except CalibrationError as e:
            if calibration is not None:
                raise
            note = (
                f"no generated calibration text ({e})"
                if source is Source.GENERATED
                else f"the model fails on synthetic data ({e})"
            )
    if data is None and damping != DAMPING:
        logger.warning("damping %g is ignored: no calibration data, no refit", damping)
    importance = ("obs" if data else "l2") if importance == "auto" else importance
    if allocation == "auto":
        # Measured on text the model wrote itself, sensitivity misallocates for real text:
        # SmolLM2 at 0.85 of the MACs 2.42x the original's perplexity, uniform 2.00x.
        users = data is not None and Source.made_by_spa(source) is None
        allocation = "sensitivity" if users else "uniform"
    if allocation == "sensitivity" and data is None:
        raise SpaError("--allocation sensitivity needs --calibration data")
    if importance in DATA_CRITERIA and data is None:
        raise SpaError(
            f"--importance {importance} needs --calibration data (or --calibration synthetic)"
        )
    compensating = compensate if compensate is not None else True
    means = statistics.batchnorm_means(work, consumers) if data is None and compensating else {}
    if data is not None:
        used = Source.made_by_spa(source) or Source.DATA
    else:
        used = Source.BATCHNORM if means else None
    too_wide = [c.node or c.weight for c in consumers if c.wide] if data is not None else []
    return (
        Method(
            importance,
            used,
            compensating and used is not None,
            note,
            too_wide,
            allocation,
            damping=damping,
        ),
        data,
        means,
    )


def _scores(
    analysis: Analysis, method: Method, data: _Calibrated | None, seed: int
) -> dict[int, float]:
    scores = (
        data.scores(analysis, method.importance)
        if method.importance in DATA_CRITERIA
        else score(analysis, method.importance, seed)
    )
    return scores if method.importance == "random" else dead_first(analysis, scores)


def _remove_and_repair(
    analysis: Analysis,
    removed,
    consumers: list[statistics.Consumer],
    data: _Calibrated | None,
    means: dict,
    spill: io.Spill | None = None,
) -> int:
    """The surgery, then the repair: a refit from calibration data, or the removed channels'
    BatchNormalization means moved into the biases (computed before the surgery removes them).
    Returns how many biases took BN means. `spill`: where the cut and refit weights go instead
    of memory."""
    model = analysis.model
    keeps = weight_keeps(analysis, removed)
    shifts = mean_shifts(model, consumers, means, keeps)
    apply(analysis, removed, spill)
    # the surgery read every weight it cut: the original's pages go back (the refit reads a
    # layer's at a time)
    for m in (model, data.original if data is not None else None):
        if m is not None:
            io.release_pages(m.graph.initializers.values())
    if data is not None and len(removed):
        data.compensate(model, keeps, spill)
    return shift_biases(model, consumers, shifts)


class _Calibrated:
    """Calibration feeds, the consumers of the normalized model before surgery, and what they
    see."""

    def __init__(self, model: ir.Model, source, input_shapes, seed: int, damping: float = DAMPING):
        self.original = io.clone(model)
        self.damping = damping  # the ridge of the OBS scores and of the refit
        try:
            sess = runtime.session(self.original, threads=statistics.SESSION_THREADS)
        except Exception as e:  # onnxruntime raises untyped errors
            raise CalibrationError(
                f"onnxruntime cannot open the model for calibration: {first_line(e)}"
            ) from None
        made = Source.made_by_spa(source)
        self.synthetic = made is Source.SYNTHETIC
        if made is Source.GENERATED and calibration_source.token_input(model) is None:
            raise CalibrationError(
                "--calibration generated needs a causal language model: token ids [batch, "
                "sequence] in, logits [batch, sequence, vocabulary] from an LM head out"
            )
        feeds = calibration_source.batches(source, sess, input_shapes, seed)
        # Real samples the fit never sees measure the result (noise would measure nothing).
        self.feeds, self.held_out = (
            (feeds, []) if self.synthetic else calibration_source.hold_out(feeds, sess)
        )
        self.session = sess
        # Once in a child process: a native crash there is an error line, not the end of spa.
        # One sample where the model takes any batch (SmolLM2: a batch of 32 windows took 5 s).
        first = runtime.first_sample(sess, self.feeds[0])
        try:
            runtime.isolated(
                lambda: sess.run(None, first) and None,
                "running the model on the calibration data",
            )
        except RuntimeError as e:
            raise CalibrationError(
                f"onnxruntime fails to run the model on the calibration data: {e}"
            ) from None
        self.consumers = statistics.consumers(self.original)

    def scores(self, analysis: Analysis, criterion: str) -> dict[int, float]:
        # A depthwise conv loses its outputs with its inputs: no error to weigh, only a refit.
        readers = reading_classes(
            analysis, [c for c in self.consumers if c.kind != statistics.Kind.DEPTHWISE]
        )
        moments = statistics.collect(self.original, readers, self.feeds)
        return score_with_statistics(analysis, criterion, moments, readers, self.damping)

    def fidelity(self, pruned: ir.Model, exact: bool, serialized, large: bool):
        """How closely `pruned` follows the original on the held-out samples
        (verify.fidelity); `serialized`: the pruned model's bytes where already made."""
        session = runtime.session(
            pruned, threads=statistics.SESSION_THREADS, serialized=serialized, lean=large
        )
        scores = verification.class_scores(pruned)
        weights = tuple(list(m.graph.initializers.values()) for m in (self.original, pruned))
        return verification.fidelity(self.session, session, self.held_out, scores, exact, weights)

    def compensate(self, pruned: ir.Model, keeps, spill: io.Spill | None) -> None:
        refit(
            self.original,
            pruned,
            self.consumers,
            self.feeds,
            keeps,
            self.damping,
            cross_validate=not self.synthetic,
            spill=spill,
        )


def _search_ratio(
    analysis: Analysis, before: Counts, plan_for, kind: str, goal: float
) -> tuple[float, Plan, float]:
    """The smallest ratio whose plan keeps at most `goal` of the MACs (params): bisection on the
    counts of the planned shapes, no surgery until the answer is known."""

    def fraction(r: float) -> tuple[float, Plan]:
        plan = plan_for(r)
        estimate = count(analysis.model, shapes=pruned_shapes(analysis, plan.removed))
        return getattr(estimate, kind) / max(getattr(before, kind), 1), plan

    lo, hi = 0.0, _MAX_RATIO
    reached, plan = fraction(hi)
    best = (hi, plan, reached)
    if reached > goal:
        return best  # unreachable: the report says how close it got
    for _ in range(_SEARCH_STEPS):
        mid = (lo + hi) / 2
        reached, plan = fraction(mid)
        if reached <= goal:
            hi, best = mid, (mid, plan, reached)
        else:
            lo = mid
    return best


def _fidelity_search(
    fidelity_at, ratio: float, bound: float, target: dict | None
) -> tuple[float, dict]:
    """The largest ratio up to `ratio` whose held-out fidelity is at least `bound`, by bisection
    (fidelity falls as the cut grows). Returns it and the target record, which keeps the MACs or
    params target the ratio came from and adds the fidelity steps."""
    probes = [(ratio, fidelity_at(ratio))]
    lo, hi, best = 0.0, ratio, None
    if probes[0][1] >= bound:
        best = ratio
    else:
        for _ in range(_FIDELITY_STEPS):
            mid = (lo + hi) / 2
            probes.append((mid, fidelity_at(mid)))
            lo, hi = (mid, hi) if probes[-1][1] >= bound else (lo, mid)
            best = lo if lo > 0 else None
    chosen = best if best is not None else 0.0
    reached = dict(probes).get(chosen, 1.0)
    record = dict(
        target or {},
        fidelity={
            "bound": bound,
            "reached": reached,
            "met": reached >= bound,
            "ratio": chosen,
            "steps": [{"ratio": r, "fidelity": f} for r, f in probes],
        },
    )
    return chosen, record


_FIDELITY_STEPS = 5  # the ratio to within 1/32 of the cut asked for
_MAX_RATIO = 0.99
TARGET_SLACK = 0.02  # how far under a MACs or params target rounding may take the cut
_SEARCH_STEPS = 14  # ratio to within 1e-4


def sweep(model, ratios: list[float], threads: int = 1, on_result=None, **options) -> list[dict]:
    """Prune at each ratio (the other options as for prune), then time the original and every
    pruned model in one interleaved loop. on_result(ratio, PruneResult) is called after each
    prune."""
    from spa.bench import benchmark
    from spa.progress import Progress

    original, _ = _load(model)
    results = []
    bar = Progress(len(ratios), "prune")
    for i, r in enumerate(ratios):
        results.append(prune(model, **{**options, "ratio": r}))
        bar.update(i + 1)
        if on_result is not None:
            on_result(r, results[-1])
    bar.close()
    names = ["original"] + [f"ratio {r}" for r in ratios]
    timings = benchmark(
        [original] + [r.model for r in results],
        names=names,
        threads=threads,
        input_shapes=options.get("input_shapes"),
        own_inputs=bool(options.get("prune_cache")),
    )
    rows = [
        {
            "ratio": 0.0,
            "macs": results[0].before.macs,
            "params": results[0].before.params,
            "latency_ms": timings[0].median_ms,
            "latency_ratio": 1.0,
        }
    ]
    for r, result, timing in zip(ratios, results, timings[1:]):
        rows.append(
            {
                "ratio": r,
                "macs": result.after.macs,
                "params": result.after.params,
                "latency_ms": timing.median_ms,
                "latency_ratio": timing.ratio,
                "units_removed": len(result.plan.removed),
            }
        )
    return rows


def zero_channel_check(
    model,
    ratio: float = 0.5,
    seed: int = 0,
    input_shapes: dict[str, list[int]] | None = None,
    select: str = "all",
    calibration=None,
    prune_cache: bool = False,
) -> tuple[float, int]:
    """Zero the parameters of randomly chosen coupled channels, prune exactly those, and return the
    relative output error against the zeroed, unpruned model (and how many classes were removed).
    Exact surgery gives float rounding only. select: "all" groups, only "heads", or only "channels".
    calibration: also compensate (which must then change nothing); without it, the biases absorb
    the means that surviving BatchNormalizations give (nothing either: their parameters are
    zero). prune_cache: the key/value cache loses heads too (the pruned model gets the cache inputs
    sliced and is compared on the outputs' kept heads)."""
    work, _ = _load(model)
    normalize(work)
    analysis = analyze_model(work, input_shapes, prune_cache=prune_cache)
    chosen = {"all": lambda g: True, "heads": lambda g: g.heads, "channels": lambda g: not g.heads}[
        select
    ]
    analysis.groups = [g for g in analysis.groups if chosen(g)]
    plan = make_plan(analysis, score(analysis, "random", seed), ratio, round_to=1)
    verification.zero_classes(analysis, plan.removed)
    reference = runtime.session(io.clone(work))
    data = _Calibrated(work, calibration, input_shapes, seed) if calibration is not None else None
    consumers = statistics.consumers(work)
    _remove_and_repair(
        analysis,
        plan.removed,
        consumers,
        data,
        statistics.batchnorm_means(work, consumers) if data is None else {},
    )
    keeps = signature_keeps(analysis, plan.removed)
    pruned = runtime.session(work)
    feeds = runtime.random_inputs(reference, input_shapes, seed)
    expected = reference.run(None, feeds)
    names = [o.name for o in reference.get_outputs()]
    expected = [
        verification.sliced(e, keeps[n]) if n in keeps else e for n, e in zip(names, expected)
    ]
    for name in feeds.keys() & keeps.keys():
        feeds[name] = verification.sliced(feeds[name], keeps[name])
    error = verification.relative_error(expected, pruned.run(None, feeds))
    return error, len(plan.removed)


__all__ = ["prune", "analyze", "sweep", "zero_channel_check", "PruneResult"]
