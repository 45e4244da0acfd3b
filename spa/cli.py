# PYTHON_ARGCOMPLETE_OK (argcomplete completes the flags where it is installed: see the README)
"""The command line: `spa prune`, `spa analyze`. A thin layer over spa.api."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from spa import __version__, progress
from spa.errors import Interrupted, SpaError, describe_os_error, first_line

# Exit codes (README, "Robust by default"). An interrupt exits 128 + the signal's number, as a
# shell reports a process that a signal ended: 130 for SIGINT (Ctrl-C), 143 for SIGTERM.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _parser() -> argparse.ArgumentParser:
    # Imported here, not at the top: main() catches an interrupt during the imports.
    from spa.options import PruneOptions

    parser = argparse.ArgumentParser(prog="spa", description="Structural pruning for ONNX models.")
    parser.add_argument("--version", action="version", version=f"spa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = sub.add_parser(
        "prune", help="remove the least important channels and write a smaller model"
    )
    prune.add_argument("input", type=Path, help="the model to prune (.onnx)")
    prune.add_argument("output", type=Path, help="where to write the pruned model")
    PruneOptions.add_arguments(prune)
    prune.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="draw every layer's channels before and after, in graph order (needs matplotlib: pip "
        "install 'spa-onnx[plot]')",
    )
    prune.add_argument(
        "--dry-run",
        action="store_true",
        help="plan, verify and report, but write no model (--json still writes the report)",
    )
    _common(prune)
    prune.add_argument(
        "--bench",
        action="store_true",
        help="time the original and the pruned model (interleaved) and add the latency to the "
        "table",
    )
    _threads(prune)

    bench = sub.add_parser(
        "bench", help="time models in onnxruntime, interleaved, and compare them to the first"
    )
    bench.add_argument("models", type=Path, nargs="+", help="models with the same inputs (.onnx)")
    bench.add_argument(
        "--runs",
        type=int,
        default=None,
        help="rounds of the interleaved loop (default: about 4 s worth)",
    )
    bench.add_argument(
        "--warmup", type=int, default=5, help="untimed runs per model first (default 5)"
    )
    bench.add_argument(
        "--inputs",
        type=Path,
        default=None,
        metavar="FILE",
        help="inputs: .npz keyed by input name, or .npy for one input (default: random)",
    )
    _common(bench)
    _threads(bench)

    sweep = sub.add_parser(
        "sweep", help="prune at several ratios; print MACs, params and latency; plot them"
    )
    sweep.add_argument("input", type=Path, help="the model (.onnx)")
    sweep.add_argument(
        "--ratios",
        default="0.1,0.3,0.5,0.7",
        help="comma-separated ratios (default 0.1,0.3,0.5,0.7)",
    )
    sweep.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="write the plot here (needs matplotlib: pip install 'spa-onnx[plot]')",
    )
    sweep.add_argument(
        "--save-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write each pruned model there, as NAME_ratioR.onnx",
    )
    PruneOptions.add_arguments(sweep, sweep=True)
    _common(sweep)
    _threads(sweep)

    analyze = sub.add_parser("analyze", help="list the groups of coupled channels and the barriers")
    analyze.add_argument("input", type=Path, help="the model to analyze (.onnx)")
    _prune_hidden(analyze)
    analyze.add_argument(
        "--prune-cache",
        action="store_true",
        help="let a decoder's key/value cache inputs and outputs lose heads (the signature "
        "changes)",
    )
    _common(analyze)
    return parser


def _prune_hidden(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prune-hidden",
        action="store_true",
        help="also prune channels that LayerNorm/RMSNorm normalize over (a transformer's hidden "
        "size): lossy",
    )


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads for timing (default 1)"
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shapes",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="fix symbolic input dims for the analysis: x:1,3,224,224 (repeatable, or several in "
        "one quoted argument)",
    )
    p.add_argument(
        "--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each stage; show tracebacks")


def main(argv: list[str] | None = None) -> int:
    with _interrupts():
        try:
            return _main(argv)
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the clean-ups have run on the way out
            progress.clear()
            print("spa: interrupted", file=sys.stderr)
            return 128 + (e.signum if isinstance(e, Interrupted) else signal.SIGINT)


@contextlib.contextmanager
def _interrupts():
    """SIGINT and SIGTERM (what `timeout`, `docker stop` and CI send) raise Interrupted: the same
    clean-up as Ctrl-C instead of dying with temporary files left behind. The handlers are put
    back afterwards (main() also runs in-process: tests, scripts/fuzz.py)."""
    # only the main thread has signals
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupted) for s in _SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion of commands and flags, with argcomplete where it is installed (the
    `completion` extra): asked by the shell, it answers and exits; otherwise it does nothing."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _interrupted(signum: int, frame) -> None:
    for s in _SIGNALS:  # a second signal must not cut the clean-up short
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    _complete(parser)
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # file names that are not UTF-8 print as escapes
        sys.stdout.reconfigure(errors="backslashreplace")
    if not args.verbose:
        warnings.simplefilter("ignore")  # library warnings would break the one-line errors
    with _logging(args.verbose):
        try:
            with progress.watchdog(args.command):
                return _run(args)
        except SpaError as e:
            line = f"error: {e}"
        except BrokenPipeError:  # `spa ... | head`: the reader has what it wanted; the work is done
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        # disk full, a name too long, permission denied: the file and the problem
        except OSError as e:
            line = f"error: {describe_os_error(e)}"
        except Exception as e:  # a bug: still one line unless the user asked for details
            if args.verbose:
                traceback.print_exc()
            line = f"internal error: {type(e).__name__}: {first_line(e)} (run with -v for details)"
    progress.clear()
    print(f"spa: {line}", file=sys.stderr)
    return EXIT_ERROR


@contextlib.contextmanager
def _logging(verbose: bool):
    """With -v, every stage on stderr. Without, only spa's warnings: notes on stdout about what it
    changed in the input (stale shapes dropped), so that stderr stays one line on an error."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.ERROR, format="%(name)s: %(message)s"
    )
    if verbose:
        yield
        return
    seen: set[str] = set()

    def once(record: logging.LogRecord) -> bool:  # a prune that retries loads the model again
        new = record.getMessage() not in seen
        seen.add(record.getMessage())
        return new

    logger, notes = logging.getLogger("spa"), logging.StreamHandler(sys.stdout)
    notes.setFormatter(logging.Formatter("note: %(message)s"))
    notes.addFilter(once)
    logger.addHandler(notes)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(notes)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SpaError(f"--ratios: expected numbers like 0.1,0.3,0.5 but got '{text}'") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise SpaError(f"--ratios: every ratio must be in (0, 1), got '{text}'")
    return ratios


def _files(args) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """What the command reads and what it writes, for spa.io.check_targets."""
    from spa import io
    from spa.calibration import Source

    reads = [
        f
        for model in (args.models if args.command == "bench" else [args.input])
        for f in io.model_files(model)
    ]
    calibration = getattr(args, "calibration", None)
    if calibration is not None and Source.made_by_spa(calibration) is None:
        reads.append((Path(calibration), "the calibration data"))
    if getattr(args, "plan", None) is not None:
        reads.append((Path(args.plan), "the --plan report"))
    if getattr(args, "inputs", None) is not None:
        reads.append((args.inputs, "the --inputs file"))
    writes = []
    if args.command == "prune" and not args.dry_run:
        writes += [
            (args.output, "output"),
            (args.output.with_name(args.output.name + ".data"), "the output's external data"),
        ]
    writes += [
        (getattr(args, flag), f"--{flag}")
        for flag in ("json", "plot")
        if getattr(args, flag, None) is not None
    ]
    if getattr(args, "save_dir", None) is not None:
        for ratio in _ratios(args.ratios):
            path = args.save_dir / f"{args.input.stem}_ratio{ratio:g}.onnx"
            writes += [
                (path, "--save-dir's model"),
                (path.with_name(path.name + ".data"), "--save-dir's external data"),
            ]
    return reads, writes


def _run(args) -> int:
    from spa import io, runtime

    runtime.quiet()
    # the folder the user asked for; its files are checked next
    if getattr(args, "save_dir", None) is not None:
        args.save_dir.mkdir(parents=True, exist_ok=True)
    io.check_targets(*_files(args))
    with io.all_or_nothing():  # the model, the JSON, the plot: all written, or none
        data = _command(args)
        if args.json is not None:
            io.write_text(args.json, json.dumps(data, indent=1))
    return EXIT_OK


def _command(args) -> dict:
    """Run the command, print its report, and return the report for --json."""
    from spa import api, bench, io, report
    from spa.options import PruneOptions
    from spa.shapes import parse_input_shapes

    shapes = parse_input_shapes(" ".join(args.input_shapes))
    if args.command == "analyze":
        analysis = api.analyze(
            args.input,
            input_shapes=shapes,
            prune_hidden=args.prune_hidden,
            prune_cache=args.prune_cache,
        )
        print(report.analysis_listing(analysis, str(args.input)))
        data = report.analysis_report(analysis)
    elif args.command == "bench":
        timings = bench.benchmark(
            args.models,
            [str(m) for m in args.models],
            args.threads,
            args.warmup,
            args.runs,
            input_shapes=shapes,
            inputs=args.inputs,
        )
        print(bench.table(timings, args.threads))
        data = {"threads": args.threads, "models": [dataclasses.asdict(t) for t in timings]}
    elif args.command == "sweep":
        ratios = _ratios(args.ratios)
        options = PruneOptions.from_args(args, input_shapes=shapes)

        def done(ratio: float, result) -> None:  # a line per step as it goes, and its model saved
            removed = len(result.plan.removed)
            line = (
                f"ratio {ratio:g}: MACs x{result.after.macs / max(result.before.macs, 1):.3f}, "
                f"params x{result.after.params / max(result.before.params, 1):.3f}, {removed} "
                f"units removed in {result.seconds:.1f} s"
            )
            if not removed:
                line += (
                    " (nothing removed: at this ratio every group rounds to all its "
                    f"channels; round-to {result.options['resolved']['round_to']})"
                )
            if args.save_dir is not None:
                # as _files checked it
                path = args.save_dir / f"{args.input.stem}_ratio{ratio:g}.onnx"
                io.save(result.model, path)
                line += f"; {path}"
            print(line, flush=True)

        rows = api.sweep(
            args.input, ratios, threads=args.threads, on_result=done, **options.as_kwargs()
        )
        print(report.sweep_table(rows, args.threads))
        if args.plot is not None:
            from spa.plot import sweep_plot

            io.write_file(
                args.plot,
                lambda tmp: sweep_plot(
                    rows, tmp, f"{args.input.name}: spa sweep ({args.threads} thread(s))"
                ),
            )
            print(f"plot: {args.plot}")
        data = {"threads": args.threads, "rows": rows}
    else:
        if args.ratio is not None and (
            args.target_macs is not None or args.target_params is not None
        ):
            print(f"note: --ratio {args.ratio:g} is ignored: the target decides the ratio")
        options = PruneOptions.from_args(args, input_shapes=shapes)
        result = api.prune(args.input, None if args.dry_run else args.output, **options.as_kwargs())
        latency, timings = None, None
        if args.bench:
            progress.step("timing the original and the pruned model")
            # Both from memory: the output is not in place until the command ends (all or nothing).
            timings = bench.benchmark(
                [io.load(args.input), result.model],
                ["before", "after"],
                args.threads,
                input_shapes=shapes,
            )
            latency = (timings[0].median_ms, timings[1].median_ms)
        groups = result.analysis.groups
        if not groups:
            print(
                "nothing to prune: every channel reaches an input, an output or a barrier (see "
                "`spa analyze`); the model is written unchanged in structure"
            )
        print(
            f"{args.input} -> {'(dry run, nothing written)' if args.dry_run else args.output}: "
            f"{len(groups)} groups pruned at ratio {result.ratio:.4g}, {len(result.plan.removed)} "
            f"units (channels or heads) removed in {result.seconds:.2f} s"
        )
        t = result.target or {}
        bound = t.get("fidelity")
        if "kind" in t:
            verdict = (
                "met"
                if t["met"]
                else "NOT met ("
                + ("--min-fidelity stopped the cut" if bound else "the most spa can remove")
                + ")"
            )
            if "rounded_past" in t:
                verdict += (
                    f" (--round-to {t['rounded_past']} cut deeper than asked: a smaller one comes "
                    "closer)"
                )
            print(
                f"target: {t['kind']} <= {t['target']:g} of the original; reached "
                f"{t['reached']:.3f}, {verdict}"
            )
        if bound:
            steps = ", ".join(f"{s['ratio']:.3g}: {s['fidelity']:.3f}" for s in bound["steps"])
            verdict = (
                f"kept at ratio {bound['ratio']:.3g}"
                if bound["ratio"]
                else "NOT met by any cut tried: nothing removed"
            )
            print(
                f"fidelity bound: held-out fidelity >= {bound['bound']:g}, {verdict} (ratio: "
                f"fidelity tried: {steps})"
            )
        print(f"method: {result.method.describe()}")
        print(report.table(result.before, result.after, latency))
        symbolic = [
            f"{v.name}[{i}] {d}"
            for v in result.model.graph.inputs
            if v.name not in shapes
            for i, d in enumerate(v.shape or ())
            if not isinstance(d, int)
        ]
        if symbolic:
            print(
                "note: MACs and FLOPs count the symbolic input dims as 1 "
                f"({', '.join(symbolic[:4])}); --input-shapes counts other sizes"
            )
        if latency is not None:
            print(
                f"speed-up: {latency[0] / latency[1]:.2f}x ({args.threads} thread(s), interleaved, "
                "median)"
            )
        if result.verdict is not None and result.verdict.measured is not None:
            moved = result.verdict.measured
            print(moved.describe(), file=sys.stderr if moved.likely_broken else sys.stdout)
        lossy = [g for g in groups if g.lossy and len(result.plan.by_group[g.id])]
        if lossy:
            print(
                f"lossy: {len(lossy)} group(s) pruned across a normalization (--prune-hidden); "
                "outputs change, check accuracy"
            )
        kept = report.normalizations_line(result.analysis)
        if kept and not args.prune_hidden:
            print(kept)
        if result.signature_changes:
            changes = "; ".join(
                f"{name} {before} -> {after}"
                for name, (before, after) in result.signature_changes.items()
            )
            print(
                f"signature changed (--prune-cache): {changes}. Tell the runtime the new head "
                "counts (its config's key/value heads)"
            )
        blocked = [b for b in result.analysis.barriers if b.blocked]
        if blocked:
            print(
                f"left alone: {len(blocked)} barrier op(s) "
                f"({', '.join(sorted({b.op for b in blocked}))}); see `spa analyze`"
            )
        data = result.report()
        data.update(input=str(args.input), output=str(args.output))
        if args.plot is not None:
            from spa.plot import layers_plot

            title = (
                f"{args.input.name}: MACs "
                f"x{result.after.macs / max(result.before.macs, 1):.3f}, params "
                f"x{result.after.params / max(result.before.params, 1):.3f}"
            )
            io.write_file(args.plot, lambda tmp: layers_plot(data["groups"], tmp, title))
            print(f"plot: {args.plot}")
        if latency is not None:
            data["latency_ms"] = {
                "before": latency[0],
                "after": latency[1],
                "threads": args.threads,
                "runs": timings[0].runs,
                "p10_p90": {
                    "before": [timings[0].p10_ms, timings[0].p90_ms],
                    "after": [timings[1].p10_ms, timings[1].p90_ms],
                },
            }
    return data


if __name__ == "__main__":
    sys.exit(main())
