"""A run's figures (PNG, in `<run dir>/plots/`): latency CDFs, step-time breakdown, experts per layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .chrome_trace import PARTS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(requests: dict[str, pd.DataFrame], path: Path, slo_tpot_ms: float | None = None) -> Path:
    """TTFT, TPOT and end-to-end latency CDFs, one line per run (policy, vanilla)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, col, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("TTFT", "TPOT", "end-to-end latency")):
        for label, r in requests.items():
            x = np.sort(r[col].dropna().to_numpy())
            if x.size:
                ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=label,
                        linestyle="--" if label == "vanilla" else "-")
        if col == "tpot_ms" and slo_tpot_ms is not None:
            ax.axvline(slo_tpot_ms, color="grey", lw=0.8, ls=":", label=f"SLO {slo_tpot_ms} ms")
        ax.set(xlabel=f"{title} (ms)", ylabel="fraction of requests", title=title)
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def step_breakdown(steps: pd.DataFrame, path: Path, max_bars: int = 400) -> Path:
    """Each iteration's time cut into the cost model's parts (stacked), in order."""
    plt = _plt()
    s = steps.iloc[:: max(1, len(steps) // max_bars)]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    bottom = np.zeros(len(s))
    for name, col in PARTS:
        v = s[col].to_numpy()
        ax.bar(np.arange(len(s)), v, bottom=bottom, width=1.0, label=name)
        bottom += v
    if "prefill_tokens" in s and (s.prefill_tokens > 0).any():
        mixed = np.flatnonzero(s.prefill_tokens.to_numpy() > 0)
        ax.plot(mixed, bottom[mixed], "k.", ms=2, label="iteration with prefill")
    ax.set(xlabel="iteration" + (" (sampled)" if len(s) < len(steps) else ""), ylabel="ms", title="step-time breakdown")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def experts_per_layer(per_layer: dict[str, list], path: Path, num_experts: int) -> Path:
    """Distinct experts per MoE layer (decode iterations), one line per run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for label, y in per_layer.items():
        ax.plot(np.arange(len(y)), y, marker=".", label=label, linestyle="--" if label == "vanilla" else "-")
    ax.axhline(num_experts, color="grey", lw=0.8, ls=":", label=f"E = {num_experts}")
    ax.set(xlabel="MoE layer", ylabel="distinct experts per decode step", title="experts loaded per layer")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
