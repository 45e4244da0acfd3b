"""The sweep as a picture: latency against MACs, one point per ratio (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

from spa.errors import SpaError


def sweep_plot(rows: list[dict], path: str | Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpaError("plotting needs matplotlib: pip install 'spa-onnx[plot]'") from None
    base = rows[0]
    macs = [r["macs"] / base["macs"] for r in rows]
    params = [r["params"] / base["params"] for r in rows]
    latency = [r["latency_ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    ax.plot([0, 1], [0, 1], color="0.8", linestyle="--", label="latency = MACs (ideal)")
    ax.plot(macs, latency, "o-", color="tab:blue", label="latency (onnxruntime, CPU)")
    ax.plot(macs, params, "s:", color="tab:orange", label="params")
    for r, x, y in zip(rows, macs, latency):
        ax.annotate(f"{r['ratio']:g}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
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
