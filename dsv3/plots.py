"""PNG plots of a run: loss curves and per-router expert load (matplotlib, Agg backend)."""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

from dsv3.config import ModelConfig
from dsv3.fileio import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_fig(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def plot_losses(records: Sequence[dict], path: str, title: str = "") -> None:
    """Train (main, MTP) and validation (main, MTP) loss in nats per byte over steps."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if train:
        s = np.array([r["step"] for r in train])
        for key, label, color in (("main_loss", "train main", "C0"), ("mtp_depth_loss", "train MTP (depth 1)", "C1")):
            y = np.array([r.get(key, np.nan) for r in train], dtype=float)
            if np.isfinite(y).any():
                ax.plot(s, y, color=color, alpha=0.25, lw=0.8)
                k = max(1, len(y) // 50)
                if k > 1:
                    sm = np.convolve(y, np.ones(k) / k, mode="valid")
                    ax.plot(s[k - 1:], sm, color=color, lw=1.6, label=label + f" ({k}-step mean)")
                else:
                    ax.plot(s, y, color=color, lw=1.6, label=label)
    if evals:
        s = [r["step"] for r in evals]
        ax.plot(s, [r["val_loss"] for r in evals], "o-", color="C3", label="validation main")
        if any("val_mtp_loss" in r for r in evals):
            ax.plot(s, [r.get("val_mtp_loss", np.nan) for r in evals], "s--", color="C2", label="validation MTP")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_fig(fig, path)
    plt.close(fig)


def plot_expert_load(records: Sequence[dict], path: str, router_names: Optional[Sequence[str]] = None,
                     max_columns: int = 200) -> None:
    """Heat map per router layer: tokens routed to each expert / mean, over training."""
    plt = _pyplot()
    train = [r for r in records if r.get("kind") == "train" and r.get("counts") is not None]
    if not train:
        return
    counts = np.array([r["counts"] for r in train], dtype=np.float64)  # [S, R, E]
    steps = np.array([r["step"] for r in train])
    S, R, E = counts.shape
    bins = np.array_split(np.arange(S), min(S, max_columns))
    binned = np.stack([counts[b].sum(0) for b in bins])  # [S', R, E]
    rel = binned / np.maximum(binned.mean(-1, keepdims=True), 1e-30)
    edges = [steps[b[0]] for b in bins] + [steps[bins[-1][-1]] + 1]
    fig, axes = plt.subplots(R, 1, figsize=(8, 1.2 + 1.6 * R), squeeze=False, sharex=True)
    vmax = max(2.0, float(np.percentile(rel, 99)))
    for r in range(R):
        ax = axes[r, 0]
        im = ax.pcolormesh(edges, np.arange(E + 1), rel[:, r, :].T, cmap="magma", vmin=0.0, vmax=vmax,
                           shading="flat")
        name = router_names[r] if router_names else f"router {r}"
        ratio = rel[-1, r].max()
        ax.set_ylabel(f"{name}\nexpert", fontsize=8)
        ax.set_title(f"{name}: last max/mean = {ratio:.2f}", fontsize=8, loc="left")
        fig.colorbar(im, ax=ax, pad=0.01, label="load / mean")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.suptitle("expert load (tokens per expert / mean); 1 = balanced", fontsize=10)
    _save_fig(fig, path)
    plt.close(fig)


def router_names(cfg: ModelConfig) -> list[str]:
    names = [f"layers.{i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    return names + [f"mtp.{k}" for k in range(cfg.num_nextn_predict_layers)]
