"""What a user reads: the before/after table, the JSON report, the analysis listing."""

from __future__ import annotations

import dataclasses

import numpy as np

from spa.analysis import Analysis
from spa.count import Counts


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def counts_dict(c: Counts) -> dict:
    return {
        "params": c.params,
        "macs": c.macs,
        "flops": c.flops,
        "file_bytes": c.file_bytes,
        "ops": c.ops,
    }


def table(before: Counts, after: Counts, latency: tuple[float, float] | None = None) -> str:
    rows = [
        ("params", human(before.params), human(after.params), _ratio(after.params, before.params)),
        ("MACs", human(before.macs), human(after.macs), _ratio(after.macs, before.macs)),
        ("FLOPs", human(before.flops), human(after.flops), _ratio(after.flops, before.flops)),
        (
            "file size",
            human(before.file_bytes, "B"),
            human(after.file_bytes, "B"),
            _ratio(after.file_bytes, before.file_bytes),
        ),
    ]
    if latency is not None:
        rows.append(
            (
                "latency",
                f"{latency[0]:.3f} ms",
                f"{latency[1]:.3f} ms",
                _ratio(latency[1], latency[0]),
            )
        )
    ops = sorted(set(before.ops) | set(after.ops))
    if len(ops) > _MAX_OP_ROWS:  # long graphs: the ops that changed and the ones that do the MACs
        ops = [op for op in ops if before.ops.get(op) != after.ops.get(op) or op in _COMPUTE_OPS]
    for op in ops:
        rows.append((f"  {op}", str(before.ops.get(op, 0)), str(after.ops.get(op, 0)), ""))
    header = ("", "before", "after", "after/before")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    hidden = len(set(before.ops) | set(after.ops)) - len(ops)
    lines.insert(
        6 + (latency is not None),
        "ops" + (f" ({hidden} other op types unchanged)" if hidden else ""),
    )
    return "\n".join(lines)


_MAX_OP_ROWS = 12
_COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"}


def _ratio(new: float | None, old: float | None) -> str:
    return f"{new / old:.3f}" if new is not None and old else "-"


def kept_channels(analysis: Analysis, removed: np.ndarray) -> list[dict]:
    """Per group: its layers and which of their output channels stay."""
    groups = []
    params = analysis.member_names()
    for group in analysis.groups:
        spaces = []
        for s in group.spaces:
            space = analysis.spaces[s]
            keep = ~analysis.removed_mask(space.labels, removed)
            spaces.append(
                {
                    "node": space.node,
                    "op": space.op,
                    "position": s,
                    "width": len(space.labels),
                    "kept": np.flatnonzero(keep).tolist(),
                }
            )
        lost = int(np.isin(group.classes, removed).sum())
        groups.append(
            {
                "id": group.id,
                "width": group.width,
                "unit": unit_name(group),
                "channels_per_unit": group.channels_per_class,
                "lossy": group.lossy,
                "pinned": group.pinned,
                "removed": lost,
                "layers": spaces,
                "params": params[group.id],
            }
        )
    return groups


def unit_name(group) -> str:
    return (
        "heads"
        if group.heads
        else "channels"
        if group.channels_per_class == 1
        else "channel groups"
    )


def width_text(group) -> str:
    if group.channels_per_class == 1:
        return str(group.width)
    return (
        f"{group.width} heads x {group.channels_per_class}"
        if group.heads
        else f"{group.width} x {group.channels_per_class}"
    )


def equal_counts(analysis: Analysis) -> list[dict]:
    """The layers whose groups lose as many channels each: per group, how many units of its own."""
    return [
        {
            "node": e.node,
            "units_per_group": [len(b) for b in e.blocks],
            "owners_per_group": [len(o) for o in e.owners],
        }
        for e in analysis.equal_counts
    ]


def barriers(analysis: Analysis) -> list[dict]:
    return [
        {"node": b.node, "op": b.op, "reason": b.reason, "blocked_channels": b.blocked}
        for b in analysis.barriers
    ]


def kept(analysis: Analysis) -> list[dict]:
    return [{"node": k.node, "op": k.op, "reason": k.reason} for k in analysis.kept]


def normalizations(analysis: Analysis) -> list[dict]:
    return [{"node": n.node, "op": n.op, "channels": n.channels} for n in analysis.normalizations]


def normalizations_line(analysis: Analysis) -> str | None:
    """One line on the channels kept because normalizations average over them, or None."""
    if not analysis.normalizations:
        return None
    ops = sorted({n.op for n in analysis.normalizations})
    return (
        f"kept: channels that {len(analysis.normalizations)} normalization(s) "
        f"({', '.join(ops)}) average over; --prune-hidden prunes them (lossy)"
    )


# 2: schema, versions, options, ratio and target added; the same from the API and the CLI
REPORT_SCHEMA = 2


def versions() -> dict:
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime

    from spa import __version__

    return {
        "spa": __version__,
        "onnx": onnx.__version__,
        "onnx_ir": onnx_ir.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }


def prune_report(result) -> dict:
    return {
        "schema": REPORT_SCHEMA,
        "versions": versions(),
        "options": result.options,
        "ratio": result.ratio,
        "target": result.target,
        "before": counts_dict(result.before),
        "after": counts_dict(result.after),
        "ratios": {
            "params": result.after.params / result.before.params if result.before.params else None,
            "macs": result.after.macs / result.before.macs if result.before.macs else None,
        },
        "seconds": round(result.seconds, 3),
        "method": None if result.method is None else dataclasses.asdict(result.method),
        "verify": None if result.verdict is None else verify_report(result.verdict),
        "groups": kept_channels(result.analysis, result.plan.removed),
        "equal_counts": equal_counts(result.analysis),
        "barriers": barriers(result.analysis),
        "kept": kept(result.analysis),
        "normalizations": normalizations(result.analysis),
        "signature_changes": {
            name: {"before": before, "after": after}
            for name, (before, after) in result.signature_changes.items()
        },
    }


def verify_report(verdict) -> dict:
    def described(moved) -> dict | None:
        return (
            None
            if moved is None
            else {**dataclasses.asdict(moved), "likely_broken": moved.likely_broken}
        )

    return {
        "checker": "passed",
        "onnxruntime_output_shapes": [list(s) for s in verdict.output_shapes],
        "deviation": described(verdict.deviation),
        "fidelity": described(verdict.fidelity),
        "likely_broken": verdict.measured is not None and verdict.measured.likely_broken,
    }


def analysis_listing(analysis: Analysis, name: str) -> str:
    groups = analysis.groups
    prunable = sum(len(g.classes) for g in groups)
    blocking = sum(b.blocked for b in analysis.barriers)
    lines = [
        f"{name}: {len(groups)} prunable groups, {prunable} removable units (channels or heads), "
        f"{len(analysis.barriers)} barriers ({blocking} blocking channels)",
        "",
    ]
    widths = [width_text(g) for g in groups]
    w = max([5, *map(len, widths)])
    lines.append(f"{'group':>5}  {'width':>{w}}  {'pinned':>6}  {'params':>6}  layers")
    params = analysis.member_names()
    for g, width in zip(groups, widths):
        layers = ", ".join(f"{analysis.spaces[s].node} ({analysis.spaces[s].op})" for s in g.spaces)
        lines.append(f"{g.id:>5}  {width:>{w}}  {g.pinned:>6}  {len(params[g.id]):>6}  {layers}")
    if analysis.barriers:
        lines += ["", "barriers (left alone):"]
        for b in analysis.barriers:
            blocked = "channels pinned" if b.blocked else "no channels reach it"
            lines.append(f"  {b.node or '(unnamed)'} [{b.op}]: {b.reason}; {blocked}")
    if analysis.equal_counts:
        lines += ["", "as many from every group (their units go r-th weakest of each together):"]
        lines += [
            f"  {e.node or '(unnamed)'}: {len(e.blocks)} groups of "
            f"{', '.join(sorted({str(len(b)) for b in e.blocks}))} unit(s) of their own"
            + (", or a group whole with the head it copies" if e.owners else "")
            for e in analysis.equal_counts
        ]
    if analysis.kept:
        lines += ["", "kept by their ops (the channels that reach them stay):"]
        lines += [f"  {k.node or '(unnamed)'} [{k.op}]: {k.reason}" for k in analysis.kept]
    if analysis.normalizations:
        lines += ["", "normalizations (their channels stay; --prune-hidden prunes them, lossy):"]
        lines += [
            f"  {n.node or '(unnamed)'} [{n.op}]: averages over {n.channels} channel(s)"
            for n in analysis.normalizations
        ]
    return "\n".join(lines)


def analysis_report(analysis: Analysis) -> dict:
    return {
        "groups": kept_channels(analysis, np.zeros(0, np.int64)),
        "equal_counts": equal_counts(analysis),
        "barriers": barriers(analysis),
        "kept": kept(analysis),
        "normalizations": normalizations(analysis),
    }


def sweep_table(rows: list[dict], threads: int) -> str:
    base = rows[0]
    lines = [
        f"{'ratio':>6}  {'MACs':>10}  {'MACs x':>7}  {'params':>10}  {'params x':>8}  "
        f"{'latency ms':>10}  {'latency x':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['ratio']:>6.2f}  {human(r['macs']):>10}  {r['macs'] / base['macs']:>7.3f}  "
            f"{human(r['params']):>10}  "
            f"{r['params'] / base['params']:>8.3f}  {r['latency_ms']:>10.3f}  "
            f"{r['latency_ratio']:>9.3f}"
        )
    lines.append(
        f"latency: onnxruntime CPU, {threads} intra-op thread(s), all models interleaved in one "
        "loop; x = after/before"
    )
    return "\n".join(lines)
