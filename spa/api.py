"""The pipeline end to end: load, normalize, analyze, score, plan, apply, verify, save."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import onnx
import onnx_ir as ir

from spa import io, verify as verification
from spa.analysis import Analysis, analyze as analyze_model, require_prunable
from spa.apply import apply
from spa.count import Counts, count
from spa.errors import SpaError
from spa.normalize import normalize
from spa.plan import Plan, default_round_to, make_plan
from spa.score import CRITERIA, score

@dataclasses.dataclass
class PruneResult:
    model: ir.Model  # the pruned model
    analysis: Analysis
    plan: Plan
    before: Counts
    after: Counts
    verdict: verification.Verdict | None
    seconds: float

    def report(self) -> dict:
        from spa.report import prune_report

        return prune_report(self)


def _load(model) -> tuple[ir.Model, Path | None]:
    if isinstance(model, (str, os.PathLike)):
        return io.load(model), Path(model)
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model), None
    if isinstance(model, ir.Model):
        return io.clone(model), None
    raise SpaError(f"expected a path, an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}")


def analyze(model, input_shapes: dict[str, list[int]] | None = None) -> Analysis:
    """Groups of coupled channels and the barriers of a model (a path, ModelProto or onnx_ir.Model)."""
    work, _ = _load(model)
    normalize(work)
    return analyze_model(work, input_shapes)


def prune(
    model,
    output: str | os.PathLike | None = None,
    *,
    ratio: float = 0.5,
    round_to: int | None = None,
    ignore: list[str] | tuple[str, ...] = (),
    importance: str = "l2",
    input_shapes: dict[str, list[int]] | None = None,
    verify: bool = True,
    seed: int = 0,
) -> PruneResult:
    """Prune `model` and, if `output` is given, write the result there.

    ratio: fraction of the channels of every prunable group to remove, in [0, 1).
    round_to: keep channel counts multiples of this (default: what the CPU's SIMD width rewards).
    ignore: glob patterns of node or initializer names to leave alone.
    importance: "l2", "l1" (group magnitude) or "random".
    input_shapes: concrete shapes for symbolic input dims, used for the analysis only.
    verify: check the result (checker, onnxruntime, same signature) before writing it.
    """
    start = time.perf_counter()
    if not 0.0 <= ratio < 1.0:
        raise SpaError(f"--ratio must be in [0, 1), got {ratio}")
    if importance not in CRITERIA:
        raise SpaError(f"--importance must be one of {', '.join(CRITERIA)}, got {importance!r}")
    if round_to is not None and round_to < 1:
        raise SpaError(f"--round-to must be a positive integer, got {round_to}")
    original, source = _load(model)
    if output is not None:
        _check_output_path(source, Path(output))
    work, _ = _load(source if source is not None else original)
    normalize(work)
    analysis = analyze_model(work, input_shapes)
    before = count(work, shapes=analysis.shapes)
    scores = score(analysis, importance, seed)
    plan = make_plan(analysis, scores, ratio, default_round_to() if round_to is None else round_to, ignore)
    apply(analysis, plan.removed)
    after = count(work, input_shapes)
    verdict = verification.verify(original, work, input_shapes) if verify else None
    if source is not None:
        before.file_bytes = _file_bytes(source)
    if output is not None:
        io.save(work, output)
        after.file_bytes = _file_bytes(Path(output))
    return PruneResult(work, analysis, plan, before, after, verdict, time.perf_counter() - start)


def _check_output_path(source: Path | None, output: Path) -> None:
    if source is not None and output.resolve() == source.resolve():
        raise SpaError(f"{output}: output path is the input path; spa never overwrites its input")


def _file_bytes(path: Path) -> int:
    """The model file plus the external data files it references."""
    total = path.stat().st_size
    proto = onnx.load(path, load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def zero_channel_check(model, ratio: float = 0.5, seed: int = 0, input_shapes: dict[str, list[int]] | None = None) -> tuple[float, int]:
    """Zero the parameters of randomly chosen coupled channels, prune exactly those, and return the
    relative output error against the zeroed, unpruned model (and how many classes were removed).
    Exact surgery gives float rounding only."""
    work, _ = _load(model)
    normalize(work)
    analysis = analyze_model(work, input_shapes)
    plan = make_plan(analysis, score(analysis, "random", seed), ratio, round_to=1)
    verification.zero_classes(analysis, plan.removed)
    reference = verification.session(io.clone(work))
    apply(analysis, plan.removed)
    pruned = verification.session(work)
    feeds = verification.random_inputs(reference, input_shapes, seed)
    error = verification.relative_error(reference.run(None, feeds), pruned.run(None, feeds))
    return error, len(plan.removed)


__all__ = ["prune", "analyze", "zero_channel_check", "PruneResult"]
