"""Pictures (matplotlib, optional): a sweep's latency against MACs, and a prune's layers by
depth."""

from __future__ import annotations

from pathlib import Path

from spa.errors import SpaError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpaError("plotting needs matplotlib: pip install 'spa-onnx[plot]'") from None
    return plt


def sweep_plot(rows: list[dict], path: str | Path, title: str) -> None:
    plt = _pyplot()
    base = rows[0]
    macs = [r["macs"] / base["macs"] for r in rows]
    params = [r["params"] / base["params"] for r in rows]
    latency = [r["latency_ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.8", linestyle="--", label="latency = MACs (ideal)")
    ax.plot(macs, latency, "o-", color="tab:blue", label="latency (onnxruntime, CPU)")
    ax.plot(macs, params, "s:", color="tab:orange", label="params")
    for r, x, y in zip(rows, macs, latency):
        ax.annotate(
            f"{r['ratio']:g}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8
        )
    ax.set_xlabel("MACs after / before")
    ax.set_ylabel("after / before")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, max(1.05, max(latency) + 0.1))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def layers_plot(groups: list[dict], path: str | Path, title: str) -> None:
    """Every layer's output channels before (light) and after (dark), in graph order: where the
    model got thinner. `groups` as in the JSON report's "groups"."""
    plt = _pyplot()
    layers = sorted(
        (layer["position"], layer["node"], layer["width"], len(layer["kept"]))
        for g in groups
        for layer in g["layers"]
    )
    if not layers:
        raise SpaError("--plot: no prunable layer to draw")
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(min(16, 4 + 0.12 * len(layers)), 4.2), dpi=120)
    ax.bar(x, [w for _, _, w, _ in layers], color="0.82", width=0.85, label="before")
    ax.bar(x, [k for _, _, _, k in layers], color="tab:blue", width=0.85, label="after")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("output channels")
    step = max(1, len(layers) // 12)
    ax.set_xticks(
        list(x)[::step],
        [n[:18] for _, n, _, _ in layers][::step],
        rotation=45,
        ha="right",
        fontsize=7,
    )
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
