"""Listens to the decode loop and turns steps into the per-step table and `summary.json`.

Metric names carry their units and are defined once in docs/metrics.md; `summary()` uses
exactly those names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..cost.roofline import StepCost
from ..policies.base import Selection


class StepRecorder:
    def __init__(self, num_layers: int):
        self.rows: list[dict] = []
        self._layer = {k: np.zeros(num_layers) for k in
                       ("distinct_policy", "distinct_vanilla", "top1_retention", "gate_mass_retained")}

    def on_step(self, now_s: float, step: int, batch: int, context_tokens: int,
                sel: Selection, cost: StepCost, base: Selection, base_cost: StepCost) -> None:
        f, fb = sel.fidelity, base.fidelity
        self._layer["distinct_policy"] += f.distinct_experts.numpy()
        self._layer["distinct_vanilla"] += fb.distinct_experts.numpy()
        self._layer["top1_retention"] += f.top1_retention.numpy()
        self._layer["gate_mass_retained"] += f.gate_mass_retained.numpy()
        self.rows.append({
            "step": step, "sim_time_ms": now_s * 1e3, "batch": batch, "context_tokens": context_tokens,
            "policy_acted": sel.acted,
            "step_time_ms": cost.total_s * 1e3, "vanilla_step_time_ms": base_cost.total_s * 1e3,
            "moe_time_ms": cost.moe_s * 1e3, "vanilla_moe_time_ms": base_cost.moe_s * 1e3,
            "attention_time_ms": cost.attention_s * 1e3,
            "distinct_experts": float(f.distinct_experts.double().mean()),
            "vanilla_distinct_experts": float(fb.distinct_experts.double().mean()),
            "top1_retention": float(f.top1_retention.mean()),
            "gate_mass_retained": float(f.gate_mass_retained.mean()),
        })

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def summary(self) -> dict:
        """The metric part of summary.json (run.py adds the run's identity)."""
        t = self.table()
        n = max(len(t), 1)
        layer = {k: (v / n).round(6).tolist() for k, v in self._layer.items()}
        step_p, step_v = t.step_time_ms.mean(), t.vanilla_step_time_ms.mean()
        return {
            "steps": int(len(t)),
            "speedup": float(step_v / step_p),
            "step_time_ms": {"policy": float(step_p), "vanilla": float(step_v)},
            "moe_time_ms": {"policy": float(t.moe_time_ms.mean()), "vanilla": float(t.vanilla_moe_time_ms.mean())},
            "moe_speedup": float(t.vanilla_moe_time_ms.mean() / t.moe_time_ms.mean()),
            "distinct_experts": {"policy": float(t.distinct_experts.mean()), "vanilla": float(t.vanilla_distinct_experts.mean())},
            "top1_retention": _finite_or_none(t.top1_retention.mean()),
            "gate_mass_retained": float(t.gate_mass_retained.mean()),
            "policy_acted_fraction": float(t.policy_acted.mean()),
            "per_layer": {"distinct_experts": {"policy": layer["distinct_policy"], "vanilla": layer["distinct_vanilla"]},
                          "top1_retention": [_finite_or_none(x) for x in layer["top1_retention"]],
                          "gate_mass_retained": layer["gate_mass_retained"]},
        }


def _finite_or_none(x) -> float | None:
    """JSON has no NaN: a measure the trace cannot support is written as null."""
    return float(x) if np.isfinite(x) else None
