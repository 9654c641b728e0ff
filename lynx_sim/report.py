"""Gather a sweep into one table and plots: `python -m lynx_sim.report DIR [--out OUT]`.

DIR is any folder holding run directories (a hydra multirun folder, or several): every
`summary.json` below it becomes one row of `report.csv`. A run directory without one (a run that
failed, was killed or is still running: the summary is written last, lynx_sim/metrics/output.py)
is skipped, and counted. Plots (PNG, in OUT, default DIR):
- `pareto_<measure>.png` (`pareto_<measure>_<model>_<hardware>.png` when the sweep holds several
  models or GPUs): modelled speedup against each fidelity measure, one colour per policy, one
  panel per batch size; the Pareto-optimal points of each panel are ringed (higher speedup and
  better fidelity: higher retention or mass, lower slots changed or KL), never across models;
- `distinct_experts.png`: distinct experts per MoE layer against batch size, one line per policy,
  vanilla dashed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# files that make a folder a run directory (hydra's .hydra/, our first outputs, their temporaries)
RUN_MARKS = {".hydra", "config.resolved.yaml", "steps.csv", ".tmp-config.resolved.yaml", ".tmp-steps.csv"}
# fidelity measure -> True when larger is better
MEASURES = {"top1_retention": True, "gate_mass_retained": True, "slots_changed": False, "kl_to_router_nats": False}


def gather(root: str | Path) -> pd.DataFrame:
    """One row per summary.json under `root`; raises when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    rows = []
    for path in sorted(root.rglob("summary.json")):
        s = json.loads(path.read_text())
        row = {k: s.get(k) for k in ("policy", "model", "hardware", "trace", "batch", "seed", "steps", "speedup",
                                     "moe_speedup", "top1_retention", "gate_mass_retained", "slots_changed",
                                     "experts_per_token", "exact")}
        for k in ("distinct_experts", "kl_to_router_nats", "tokens_per_active_expert", "step_time_ms"):
            for side in ("policy", "vanilla"):
                row[f"{k}_{side}"] = (s.get(k) or {}).get(side)
        row.update({f"param_{k}": v for k, v in (s.get("policy_params") or {}).items()})
        row["run_dir"] = str(path.parent.relative_to(root))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"{root}: no summary.json below this folder (is it a run or multirun directory?)")
    return pd.DataFrame(rows).sort_values(["model", "policy", "batch"], kind="stable").reset_index(drop=True)


def incomplete(root: str | Path) -> list[Path]:
    """Run directories below `root` without a summary.json (failed, killed or still running)."""
    runs = {p.parent for p in Path(root).rglob("*") if p.name in RUN_MARKS}
    return sorted(d for d in runs if not (d / "summary.json").is_file())


def pareto_mask(speedup: np.ndarray, fidelity: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """True for points no other point beats on both speedup and fidelity."""
    f = fidelity if higher_is_better else -fidelity
    ok = np.isfinite(f) & np.isfinite(speedup)
    mask = np.zeros(len(speedup), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (speedup >= speedup[i]) & (f >= f[i]) & ((speedup > speedup[i]) | (f > f[i]))
        mask[i] = not dominated.any()
    return mask


def _pareto_figures(df: pd.DataFrame, out: Path, suffix: str, colours: dict, policies: list, title: str) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    batches = sorted(df.batch.unique())
    for measure, higher in MEASURES.items():
        col = measure if measure in df else f"{measure}_policy"
        if col not in df or df[col].isna().all():
            continue
        fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 3.6), squeeze=False)
        for ax, B in zip(axes[0], batches):
            sub = df[df.batch == B]
            front = pareto_mask(sub.speedup.to_numpy(float), sub[col].to_numpy(float), higher)
            for p in policies:
                sel = sub.policy == p
                ax.scatter(sub[col][sel], sub.speedup[sel], color=colours[p], label=p, s=28)
            ax.scatter(sub[col][front], sub.speedup[front], facecolors="none", edgecolors="k", s=110, linewidths=1.2,
                       label="Pareto front")
            ax.set(title=f"batch {B}", xlabel=measure, ylabel="modelled speedup vs vanilla")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        written.append(out / f"pareto_{measure}{suffix}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def plot(df: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    policies = sorted(df.policy.unique())
    colours = {p: plt.cm.tab20(i % 20) for i, p in enumerate(policies)}
    groups = list(df.groupby(["model", "hardware"]))
    for (model, hardware), part in groups:
        suffix = f"_{model}_{hardware}" if len(groups) > 1 else ""
        written += _pareto_figures(part, out, suffix, colours, policies, f"{model} on {hardware}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (model, p), sub in df.groupby(["model", "policy"]):
        sub = sub.groupby("batch").distinct_experts_policy.mean()
        ax.plot(sub.index, sub.values, "o-", color=colours[p], label=f"{p} ({model})")
    van = df.groupby(["model", "batch"]).distinct_experts_vanilla.mean()
    for model in van.index.get_level_values(0).unique():
        ax.plot(van[model].index, van[model].values, "k--", label=f"vanilla ({model})")
    ax.set(xscale="log", xlabel="batch size", ylabel="distinct experts per MoE layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "distinct_experts.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="a run or multirun directory")
    ap.add_argument("--out", help="where report.csv and the plots go (default: DIR)")
    a = ap.parse_args(argv)
    skipped = incomplete(a.dir) if Path(a.dir).is_dir() else []
    if skipped:
        names = ", ".join(str(d.relative_to(a.dir)) for d in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(f"skipped {len(skipped)} run director{'y' if len(skipped) == 1 else 'ies'} without summary.json "
              f"(failed, killed or still running): {names}", file=sys.stderr)
    try:
        df = gather(a.dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out or a.dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "report.csv", index=False)
    cols = ["model", "policy", "batch", "speedup", "distinct_experts_policy", "distinct_experts_vanilla",
            "top1_retention", "gate_mass_retained", "slots_changed"]
    print(df[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    for p in [out / "report.csv", *plot(df, out)]:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
