"""A fingerprint of what spa does to every committed model, to check that a change of structure
changes no behaviour: per model, the analysis' groups (widths, classes, pinned) and barriers, and
a hash of the bytes of the model pruned at ratio 0.5 with l2 importance (deterministic, no data).

    python scripts/zoo_snapshot.py --out out/zoo_before.json
    ... change spa ...
    python scripts/zoo_snapshot.py --out out/zoo_after.json --compare out/zoo_before.json

With --compare it prints every model whose fingerprint differs and exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import zoo_coverage  # a sibling script

import spa
from spa.errors import SpaError

ROOT = Path(__file__).parent.parent


def fingerprint(path: Path, prune: bool) -> dict:
    shapes = zoo_coverage.input_shapes(path)
    try:
        analysis = spa.analyze(path, input_shapes=shapes)
    except SpaError as e:
        return {"error": str(e)}
    row = {
        "groups": sorted(
            [g.width, len(g.classes), g.pinned, g.heads, g.lossy] for g in analysis.groups
        ),
        "barriers": sorted(f"{b.op}: {b.reason}" for b in analysis.barriers if b.blocked),
    }
    if prune:
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / "pruned.onnx"
            try:
                spa.prune(path, out, ratio=0.5, importance="l2", round_to=1, input_shapes=shapes)
                row["pruned_sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
            except SpaError as e:
                row["pruned_sha256"] = f"error: {e}"
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--compare", type=Path, default=None, help="an earlier snapshot to compare with"
    )
    parser.add_argument("--no-prune", action="store_true", help="groups and barriers only (fast)")
    args = parser.parse_args()
    rows = {}
    for path in sorted(args.models_dir.rglob("*.onnx")):
        name = str(path.relative_to(args.models_dir))
        rows[name] = fingerprint(path, not args.no_prune)
        print(f"{name}: {len(rows[name].get('groups', []))} groups", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1, sort_keys=True))
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    changed = [
        name for name in sorted(set(before) | set(rows)) if before.get(name) != rows.get(name)
    ]
    for name in changed:
        old, new = before.get(name, {}), rows.get(name, {})
        keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        print(f"{name}: {', '.join(keys)} differ")
        for k in keys:
            print(f"  before {k}: {old.get(k)}\n  after  {k}: {new.get(k)}")
    print(f"{len(changed)} of {len(rows)} models differ")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
