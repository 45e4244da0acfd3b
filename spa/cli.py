"""The command line: `spa prune`, `spa analyze`. A thin layer over spa.api."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from spa import __version__
from spa.errors import SpaError
from spa.plan import default_round_to
from spa.score import CRITERIA
from spa.shapes import parse_input_shapes

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spa", description="Structural pruning for ONNX models.")
    parser.add_argument("--version", action="version", version=f"spa {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = sub.add_parser("prune", help="remove the least important channels and write a smaller model")
    prune.add_argument("input", type=Path, help="the model to prune (.onnx)")
    prune.add_argument("output", type=Path, help="where to write the pruned model")
    prune.add_argument("--ratio", type=float, default=0.5, help="fraction of each group's channels to remove (default 0.5)")
    prune.add_argument("--round-to", type=int, default=None, help=f"keep channel counts multiples of N (default here: {default_round_to()}, from the CPU's SIMD width)")
    prune.add_argument("--ignore", action="append", default=[], metavar="PATTERN", help="glob of node or initializer names to leave alone (repeatable)")
    prune.add_argument("--importance", choices=CRITERIA, default="l2", help="channel importance criterion (default l2)")
    prune.add_argument("--seed", type=int, default=0, help="seed for --importance random")
    _common(prune)
    prune.add_argument("--no-verify", action="store_true", help="skip the checker and onnxruntime checks of the result")

    analyze = sub.add_parser("analyze", help="list the groups of coupled channels and the barriers")
    analyze.add_argument("input", type=Path, help="the model to analyze (.onnx)")
    _common(analyze)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shapes", default="", metavar="SHAPES", help="fix symbolic input dims for the analysis: x:1,3,224,224 [y:...]")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log each stage; show tracebacks")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    try:
        return _run(args)
    except SpaError as e:
        print(f"spa: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
    except Exception as e:  # a bug: still one line unless the user asked for details
        if args.verbose:
            traceback.print_exc()
        print(f"spa: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (run with -v for details)", file=sys.stderr)
    return EXIT_BAD_INPUT


def _run(args) -> int:
    from spa import api, report

    shapes = parse_input_shapes(args.input_shapes)
    if args.json is not None and not args.json.parent.is_dir():
        raise SpaError(f"--json {args.json}: folder '{args.json.parent}' does not exist")
    if args.command == "analyze":
        analysis = api.analyze(args.input, input_shapes=shapes)
        print(report.analysis_listing(analysis, str(args.input)))
        data = report.analysis_report(analysis)
    else:
        result = api.prune(
            args.input,
            args.output,
            ratio=args.ratio,
            round_to=args.round_to,
            ignore=args.ignore,
            importance=args.importance,
            input_shapes=shapes,
            verify=not args.no_verify,
            seed=args.seed,
        )
        groups = result.analysis.groups
        print(f"{args.input} -> {args.output}: {len(groups)} groups pruned at ratio {args.ratio}, {len(result.plan.removed)} channel classes removed in {result.seconds:.2f} s")
        print(report.table(result.before, result.after))
        blocked = [b for b in result.analysis.barriers if b.blocked]
        if blocked:
            print(f"left alone: {len(blocked)} barrier op(s) ({', '.join(sorted({b.op for b in blocked}))}); see `spa analyze`")
        data = result.report()
        data.update(input=str(args.input), output=str(args.output), ratio=args.ratio)
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=1))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
