"""Export tiny transformer / sequence models to ONNX with both torch exporters.

Writes, for each model NAME (see ``MODELS``), into ``--out`` (default
``models/transformers``):

* ``{NAME}_dynamo.onnx`` (+ ``{NAME}_dynamo.onnx.data`` when the exporter
  puts the weights in an external file) -- ``torch.onnx.export(...,
  dynamo=True)``, opset 18;
* ``{NAME}_legacy.onnx`` -- ``torch.onnx.export(..., dynamo=False)``,
  opset 17, weights inline.

Models (all tiny: hidden 64, 4 heads of 16, 2 layers, FFN 128, vocab 256,
max positions 64; random weights, nothing is downloaded -- ``HF_HUB_OFFLINE``
is set to 1):

* ``bert``  -- ``transformers.BertModel`` (no pooler, SDPA attention);
  inputs ``input_ids``, ``attention_mask`` int64 (batch, seq);
* ``gpt2``  -- ``transformers.GPT2Model`` (``use_cache=False``, n_inner 128);
  input ``input_ids``;
* ``llama`` -- ``transformers.LlamaModel`` (grouped-query attention with 4
  query / 2 key-value heads, SwiGLU MLP, RMSNorm, rotary embeddings,
  ``use_cache=False``); input ``input_ids``;
* ``llama_lm`` -- ``transformers.LlamaForCausalLM``, the same with its LM head: input
  ``input_ids``, output ``logits`` (batch, seq, 256): the causal LM that generates its own
  calibration text;
* ``vit``   -- ``transformers.ViTModel`` (32x32 image, 8x8 patches, no
  pooler); input ``pixel_values`` float32 (batch, 3, 32, 32);
* ``deit``  -- ``transformers.DeiTModel`` (as ``vit``, plus a distillation token), kept as
  transformers initializes it (zero biases, unit norms; not randomized): the dynamo exporter
  merges equal constants, so one all-zero bias tensor is read by 15 layers;
* ``segformer`` -- ``transformers.SegformerForSemanticSegmentation`` (4 stages of one
  block, widths 16/32/48/64, efficient attention with spatial reduction, Mix-FFN with a
  depthwise conv, all-MLP decoder whose Resize sizes are computed at run time from the
  input's shape); input ``pixel_values`` (batch, 3, 64, 64), output ``logits`` (batch, 5, 16, 16);
* ``mha``   -- plain torch: ``nn.MultiheadAttention(64, 4, batch_first=True)``
  self-attention + residual, LayerNorm, FFN 64->128->64 (GELU) + residual;
  input ``x`` (batch, seq, 64), output ``y``;
* ``lstm``  -- plain torch: 2-layer ``nn.LSTM(16, 48)`` + per-step
  Linear(48, 10); input ``x`` (batch, seq, 16), output ``y``;
* ``gru``   -- plain torch: bidirectional ``nn.GRU(16, 48)`` + per-step
  Linear(96, 10); input ``x`` (batch, seq, 16), output ``y``;
* ``conv1d`` -- plain torch: Conv1d 16->64 k3, ReLU, depthwise Conv1d 64->64
  k3, ReLU, Conv1d 64->32 k1, mean over time, Linear(32, 10); input ``x``
  (batch, 16, seq), output ``y`` (batch, 10).

The ``transformers`` models are wrapped so that the graph's only output
is ``last_hidden_state`` (batch, seq, 64), segformer's ``logits``.

Batch and sequence dimensions are dynamic in both exporters
(``dynamic_shapes`` with ``torch.export.Dim`` / ``dynamic_axes``); ViT's
image size is fixed, its batch dynamic. Models are exported with batch 3 and
sequence length 8. An export "works" with a set of dynamic dims when the
exporter succeeds, the graph's inputs and output keep those dims symbolic,
and onnxruntime reproduces torch at other sizes; otherwise the script says so
and falls back to a dynamic batch only, then to static shapes. With torch
2.13 this happens for:

* ``lstm``/``gru`` with dynamo: torch.export specializes the time axis of
  ``nn.LSTM``/``nn.GRU`` (pytorch/pytorch#115092) and the output is declared
  with length 8 -> exported with a dynamic batch, static sequence;
* ``mha`` with legacy: tracing ``nn.MultiheadAttention`` bakes the sequence
  length into its Reshape shapes -> dynamic batch, static sequence.

The decoder-only wrappers (``gpt2``, ``llama``) pass an all-ones
``attention_mask`` built from ``input_ids`` (see ``HFTokens``).

Weights are seeded and then re-randomized (torch-default uniform init for
Linear/Conv, N(0, 0.5) embeddings, random norm scales and biases) so that
attention is not near-uniform and every weight is non-trivial. The dynamo
exporter's per-node stack traces (absolute paths) are stripped, so re-running
the script reproduces byte-identical files.

After each export the file is checked with ``onnx.checker.check_model(path,
full_check=True)`` and run in onnxruntime with batch 2 and sequence length 5
(where those dims are dynamic; else the export sizes 3 and 8) (random token ids in [0, 256); the
BERT attention mask is all ones with a few zeros); the max abs difference to torch must be < 1e-4.

Usage::

    pip install torch==2.13.0 onnxscript transformers
    python scripts/export_transformers.py [--out models/transformers] [--only NAME] [--ops]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torch_models import _quiet, op_counts, strip_stack_traces  # noqa: E402

SEED = 0
TOL = 1e-4
VOCAB = 256
HIDDEN = 64
HEADS = 4
LAYERS = 2
FFN = 128
MAX_POS = 64
EXPORT_BATCH, EXPORT_SEQ = 3, 8
CHECK_BATCH, CHECK_SEQ = 2, 5


# --------------------------------------------------------------------------
# transformers models
# --------------------------------------------------------------------------


class HFTokensMask(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class HFTokens(nn.Module):
    """input_ids -> last_hidden_state (decoder-only models).

    Passes an all-ones ``attention_mask``: with ``attention_mask=None``
    transformers' mask code runs its packed-sequence detection on the
    position ids (``torch.diff`` + ``cumsum``), which the legacy exporter
    cannot export (``aten::diff``) and which adds a pointless subgraph.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state


class HFLogits(HFTokens):
    """input_ids -> logits (a causal LM with its head)."""

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask).logits


class HFPixels(nn.Module):
    """pixel_values -> last_hidden_state (or another output)."""

    def __init__(self, model, output: str = "last_hidden_state"):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, pixel_values):
        return getattr(self.model(pixel_values=pixel_values), self.output)


def build_bert():
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=MAX_POS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return HFTokensMask(transformers.BertModel(cfg, add_pooling_layer=False))


def build_gpt2():
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=MAX_POS,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=FFN,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return HFTokens(transformers.GPT2Model(cfg))


def build_llama():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return HFTokens(transformers.LlamaModel(cfg))


def build_llama_lm():
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return HFLogits(transformers.LlamaForCausalLM(cfg))


def _vit_like(config: str, model: str):
    """A ViT-style encoder of the given transformers classes: 32x32 image, 8x8 patches, no
    pooler."""
    import transformers

    cfg = getattr(transformers, config)(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return HFPixels(getattr(transformers, model)(cfg, add_pooling_layer=False))


def build_vit():
    return _vit_like("ViTConfig", "ViTModel")


def build_deit():
    return _vit_like("DeiTConfig", "DeiTModel")


def build_segformer():
    import transformers

    cfg = transformers.SegformerConfig(
        num_encoder_blocks=4,
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 48, HIDDEN],
        num_attention_heads=[1, 2, 2, HEADS],
        decoder_hidden_size=HIDDEN,
        num_labels=5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )
    return HFPixels(transformers.SegformerForSemanticSegmentation(cfg), "logits")


# --------------------------------------------------------------------------
# plain torch models
# --------------------------------------------------------------------------


class MHABlock(nn.Module):
    """h = LayerNorm(x + MHA(x, x, x)); y = h + FFN(h)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.ffn = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        h = self.norm(x + a)
        return h + self.ffn(h)


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(input_size=16, hidden_size=48, num_layers=2, batch_first=True)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out)


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(16, 48, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(16, 64, 3, padding=1)
        self.conv2 = nn.Conv1d(64, 64, 3, padding=1, groups=64)
        self.conv3 = nn.Conv1d(64, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.conv3(x).mean(dim=2)
        return self.fc(x)


# --------------------------------------------------------------------------
# model table
# --------------------------------------------------------------------------


def _ids(gen, b, s):
    return torch.randint(0, VOCAB, (b, s), generator=gen, dtype=torch.int64)


def _mask(gen, b, s):
    """All ones except a few trailing (padded) positions in some rows."""
    m = torch.ones(b, s, dtype=torch.int64)
    m[0, -2:] = 0
    if b > 1:
        m[1, -1] = 0
    return m


@dataclass
class Input:
    name: str
    make: Callable  # (gen, batch, seq) -> tensor
    dims: dict = field(default_factory=dict)  # axis -> "batch" / "seq"


@dataclass
class Spec:
    build: Callable
    inputs: list
    output: str
    out_dims: dict
    fresh: bool = False  # keep the library's own init (zero biases): not randomized


_BS = {0: "batch", 1: "seq"}
MODELS = {
    "bert": Spec(
        build_bert,
        [Input("input_ids", _ids, _BS), Input("attention_mask", _mask, _BS)],
        "last_hidden_state",
        _BS,
    ),
    "gpt2": Spec(build_gpt2, [Input("input_ids", _ids, _BS)], "last_hidden_state", _BS),
    "llama": Spec(build_llama, [Input("input_ids", _ids, _BS)], "last_hidden_state", _BS),
    "llama_lm": Spec(build_llama_lm, [Input("input_ids", _ids, _BS)], "logits", _BS),
    "vit": Spec(
        build_vit,
        [
            Input(
                "pixel_values", lambda g, b, s: torch.randn(b, 3, 32, 32, generator=g), {0: "batch"}
            )
        ],
        "last_hidden_state",
        {0: "batch"},
    ),
    "deit": Spec(
        build_deit,
        [
            Input(
                "pixel_values", lambda g, b, s: torch.randn(b, 3, 32, 32, generator=g), {0: "batch"}
            )
        ],
        "last_hidden_state",
        {0: "batch"},
        fresh=True,
    ),
    "segformer": Spec(
        build_segformer,
        [
            Input(
                "pixel_values", lambda g, b, s: torch.randn(b, 3, 64, 64, generator=g), {0: "batch"}
            )
        ],
        "logits",
        {0: "batch"},
    ),
    "mha": Spec(
        MHABlock,
        [Input("x", lambda g, b, s: torch.randn(b, s, HIDDEN, generator=g), _BS)],
        "y",
        _BS,
    ),
    "lstm": Spec(
        LSTMNet, [Input("x", lambda g, b, s: torch.randn(b, s, 16, generator=g), _BS)], "y", _BS
    ),
    "gru": Spec(
        GRUNet, [Input("x", lambda g, b, s: torch.randn(b, s, 16, generator=g), _BS)], "y", _BS
    ),
    "conv1d": Spec(
        Conv1dNet,
        [Input("x", lambda g, b, s: torch.randn(b, 16, s, generator=g), {0: "batch", 2: "seq"})],
        "y",
        {0: "batch"},
    ),
}


def randomize(model: nn.Module) -> None:
    """Deterministically re-randomize every parameter (and norm affine).

    HF's default init (N(0, 0.02), unit norms, zero biases) makes attention
    nearly uniform and many tensors constant; this gives every weight a
    non-trivial value.
    """
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for mod in model.modules():
            cls = type(mod).__name__
            own = dict(mod.named_parameters(recurse=False))
            if not own:
                continue
            if cls.endswith(("LayerNorm", "RMSNorm")):
                if "weight" in own:
                    own["weight"].uniform_(0.5, 1.5, generator=gen)
                if "bias" in own and own["bias"] is not None:
                    own["bias"].uniform_(-0.2, 0.2, generator=gen)
                continue
            if isinstance(mod, (nn.LSTM, nn.GRU)):
                bound = 1.0 / mod.hidden_size**0.5
                for p in own.values():
                    p.uniform_(-bound, bound, generator=gen)
                continue
            if isinstance(mod, nn.Embedding):
                own["weight"].normal_(0.0, 0.5, generator=gen)
                continue
            if cls == "ViTEmbeddings":  # cls_token (1, 1, H), position_embeddings (1, P+1, H)
                for p in own.values():
                    p.normal_(0.0, 0.5, generator=gen)
                continue
            for p in own.values():
                if p.dim() >= 2:  # Linear / Conv / Conv1D (GPT-2, transposed) / MHA in_proj
                    fan_in = p.shape[0] if cls == "Conv1D" else p[0].numel()
                    bound = 1.0 / fan_in**0.5
                    p.uniform_(-bound, bound, generator=gen)
                else:  # biases
                    p.uniform_(-0.1, 0.1, generator=gen)


def build(name: str) -> nn.Module:
    torch.manual_seed(SEED)
    model = MODELS[name].build()
    if not MODELS[name].fresh:
        randomize(model)
    return model.eval()


def example(spec: Spec, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return tuple(inp.make(gen, batch, seq) for inp in spec.inputs)


# --------------------------------------------------------------------------
# export / verify
# --------------------------------------------------------------------------


def modes_for(spec: Spec) -> list[tuple[str, ...]]:
    """Dynamic-dim sets to try, most dynamic first: (batch, seq), (batch,), ()."""
    names = []
    for inp in spec.inputs:
        for d in inp.dims.values():
            if d not in names:
                names.append(d)
    modes = [tuple(names), ("batch",), ()]
    return [m for i, m in enumerate(modes) if m not in modes[:i]]


def export_dynamo(model, spec: Spec, args, path, mode) -> None:
    dims = {
        "batch": torch.export.Dim("batch", min=1, max=1024),
        "seq": torch.export.Dim("seq", min=1, max=MAX_POS),
    }
    kw = {}
    if mode:
        kw["dynamic_shapes"] = {
            inp.name: {ax: dims[d] for ax, d in inp.dims.items() if d in mode}
            for inp in spec.inputs
        }
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            model,
            args,
            path,
            dynamo=True,
            opset_version=18,
            input_names=[i.name for i in spec.inputs],
            output_names=[spec.output],
            external_data=True,
            optimize=True,
            verify=False,
            **kw,
        )


def export_legacy(model, spec: Spec, args, path, mode) -> None:
    kw = {}
    if mode:
        axes = {inp.name: {ax: d for ax, d in inp.dims.items() if d in mode} for inp in spec.inputs}
        axes[spec.output] = {ax: d for ax, d in spec.out_dims.items() if d in mode}
        kw["dynamic_axes"] = axes
    # nn.MultiheadAttention's inference fast path (torch._native_multi_head_attention)
    # has no ONNX symbolic; turn it off so the legacy tracer sees the composite ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                model,
                args,
                path,
                dynamo=False,
                opset_version=17,
                input_names=[i.name for i in spec.inputs],
                output_names=[spec.output],
                do_constant_folding=True,
                **kw,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def check_declared_dims(spec: Spec, path, mode) -> None:
    """The graph's inputs/output must keep every dim of ``mode`` symbolic.

    Catches silent specialization: e.g. for nn.LSTM/GRU torch.export
    specializes the time axis (pytorch/pytorch#115092); torch.onnx.export then
    falls back to a draft export that still names the input dim ``seq`` but
    declares the output with the example length.
    """
    g = onnx.load(path, load_external_data=False).graph
    vals = {v.name: v for v in list(g.input) + list(g.output)}
    wanted = [(inp.name, inp.dims) for inp in spec.inputs] + [(spec.output, spec.out_dims)]
    for name, axes in wanted:
        shape = vals[name].type.tensor_type.shape.dim
        for ax, d in axes.items():
            if d in mode and not shape[ax].dim_param:
                raise ValueError(f"{name} axis {ax} ({d}) exported as {shape[ax].dim_value}")


def verify(model, spec: Spec, path, mode) -> float:
    """check_model(full_check=True); onnxruntime vs torch at batch 2 / seq 5 (dynamic dims)."""
    onnx.checker.check_model(path, full_check=True)
    batch = CHECK_BATCH if "batch" in mode else EXPORT_BATCH
    seq = CHECK_SEQ if "seq" in mode else EXPORT_SEQ
    args = example(spec, batch, seq, SEED + 2)
    with torch.no_grad():
        ref = model(*args).numpy()
    so = ort.SessionOptions()
    so.log_severity_level = 4  # the fallback attempts fail on purpose; errors still raise
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {inp.name: a.numpy() for inp, a in zip(spec.inputs, args)}
    (got,) = sess.run([spec.output], feeds)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max())


def export_and_verify(model, spec: Spec, args, path, kind, keep_stack_traces=False):
    """Export with the most dynamic mode that works; returns (mode, max_abs_diff).

    A mode "works" when the exporter succeeds, keeps the dims symbolic in the
    graph's inputs/output, and the file runs in onnxruntime at other sizes.
    """
    modes = modes_for(spec)
    for i, mode in enumerate(modes):
        data = path + ".data"
        if os.path.exists(data):  # don't leave a stale external-data file
            os.remove(data)
        try:
            if kind == "dynamo":
                export_dynamo(model, spec, args, path, mode)
                if not keep_stack_traces:
                    strip_stack_traces(path)
            else:
                export_legacy(model, spec, args, path, mode)
            check_declared_dims(spec, path, mode)
            return mode, verify(model, spec, path, mode)
        except Exception as e:  # noqa: BLE001
            if i == len(modes) - 1:
                raise
            nxt = ", ".join(modes[i + 1]) or "none (static shapes)"
            msg = str(e).strip().splitlines()[0][:240] if str(e).strip() else ""
            print(
                f"  {kind}: export with dynamic ({', '.join(mode)}) failed "
                f"({type(e).__name__}: {msg}); falling back to dynamic: {nxt}",
                file=sys.stderr,
            )
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="models/transformers", help="output directory")
    ap.add_argument("--only", choices=sorted(MODELS), help="export just this model")
    ap.add_argument("--ops", action="store_true", help="also print op-type counts")
    ap.add_argument(
        "--keep-stack-traces",
        action="store_true",
        help="keep the dynamo exporter's per-node stack traces (machine-specific paths)",
    )
    args = ap.parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)

    os.makedirs(args.out, exist_ok=True)
    names = [args.only] if args.only else list(MODELS)
    failed = False
    for name in names:
        spec = MODELS[name]
        model = build(name)
        x = example(spec, EXPORT_BATCH, EXPORT_SEQ, SEED)
        nparams = sum(p.numel() for p in model.parameters())
        for kind in ("dynamo", "legacy"):
            path = os.path.join(args.out, f"{name}_{kind}.onnx")
            mode, diff = export_and_verify(model, spec, x, path, kind, args.keep_stack_traces)
            ok = diff < TOL
            failed |= not ok
            data = path + ".data"
            size = os.path.getsize(path) + (os.path.getsize(data) if os.path.exists(data) else 0)
            shapes = ("dynamic " + "+".join(mode)) if mode else "static"
            print(
                f"{'ok  ' if ok else 'FAIL'} {name:7s} {kind:6s} params={nparams:6d} "
                f"{shapes:21s} size={size / 1024:6.1f}KiB "
                f"max_abs_diff={diff:.2e}  {path}"
            )
            if args.ops:
                print("     ", dict(sorted(op_counts(path).items(), key=lambda kv: -kv[1])))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
