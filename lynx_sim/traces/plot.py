"""Draw a trace's statistics (the dict of `stats.trace_stats`) into one PNG."""

from __future__ import annotations

from pathlib import Path


def plot_stats(stats: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    Bs = [int(b) for b in stats["union_fraction"]]
    ax[0].plot(Bs, list(stats["union_fraction"].values()), "o-", label="trace")
    ax[0].plot(Bs, list(stats["union_fraction_null"].values()), "k--", label="independent uniform 1-(1-k/E)^B")
    ax[0].set(xscale="log", xlabel="batch size B", ylabel="distinct experts / E", title="union fraction", ylim=(0, 1.05))
    ax[0].legend()
    ov = stats["adjacent_overlap"]
    ax[1].plot(ov["per_layer"], "o-")
    ax[1].axhline(ov["chance"], color="k", ls="--", label=f"chance k/E = {ov['chance']:.3f}")
    ax[1].set(xlabel="MoE layer", ylabel="|S_t ∩ S_t+1| / k", title=f"adjacent-token overlap (mean {ov['mean']:.3f})")
    ax[1].legend()
    ax[2].plot(stats["load_cv"]["per_layer"], "o-")
    ax[2].set(xlabel="MoE layer", ylabel="std / mean of expert counts", title=f"load CV (median {stats['load_cv']['median']:.3f})")
    fig.suptitle(f"{stats['model']}  (E={stats['num_experts']}, k={stats['top_k']}, {stats['num_tokens']} "
                 f"{stats['tokens_used']} tokens, {stats['num_sequences']} sequences)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
