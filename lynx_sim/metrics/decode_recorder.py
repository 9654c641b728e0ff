"""Listens to the decode loop and turns steps into the per-step table and `summary.json`.

Metric names carry their units and are defined once in docs/metrics.md; `summary()` uses
exactly those names.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..cost.roofline import StepCost
from ..policies.base import Selection

# fidelity measures recorded per step and per layer: (name, for the vanilla baseline too)
MEASURES = (("distinct_experts", True), ("top1_retention", False), ("gate_mass_retained", False),
            ("slots_changed", False), ("kl_to_router_nats", True), ("tokens_per_active_expert", True),
            ("experts_per_token", False))


class StepRecorder:
    def __init__(self, num_layers: int, peak_Bps: float = 0.0, kv_capacity_tokens: int = 0):
        self.rows: list[dict] = []
        self.peak_Bps, self.kv_capacity = peak_Bps, kv_capacity_tokens
        self._names = [(p, m) for m, both in MEASURES for p in (("", "vanilla_") if both else ("",))]
        self._layer_sum = np.zeros((len(self._names), num_layers))  # per-layer sums of every measure, in _names order

    @property
    def _layer(self) -> dict:
        return {p + m: self._layer_sum[i] for i, (p, m) in enumerate(self._names)}

    def on_step(self, now_s: float, step: int, batch: int, context_tokens: int,
                sel: Selection, cost: StepCost, base: Selection, base_cost: StepCost) -> None:
        row = {"step": step, "sim_time_ms": now_s * 1e3, "batch": batch, "context_tokens": context_tokens,
               "policy_acted": sel.acted,
               "step_time_ms": cost.total_s * 1e3, "vanilla_step_time_ms": base_cost.total_s * 1e3,
               "moe_time_ms": cost.moe_s * 1e3, "vanilla_moe_time_ms": base_cost.moe_s * 1e3,
               "attention_time_ms": cost.attention_s * 1e3, "comm_time_ms": cost.comm_s * 1e3,
               "policy_overhead_ms": cost.policy_s * 1e3,
               # the serving tables' columns, so that plots and the Chrome trace read both
               "node": "decode", "start_ms": now_s * 1e3, "decode_tokens": batch, "prefill_tokens": 0, "running": batch,
               "kv_used": context_tokens / self.kv_capacity if self.kv_capacity else float("nan"),
               "dense_ffn_time_ms": cost.dense_ffn_s * 1e3, "lm_head_time_ms": cost.lm_head_s * 1e3,
               "overhead_time_ms": cost.overhead_s * 1e3, "hbm_bytes": cost.hbm_bytes,
               "bandwidth_utilisation": cost.bandwidth_utilisation(self.peak_Bps) if self.peak_Bps else float("nan")}
        per_layer = torch.stack([getattr(sel.fidelity if p == "" else base.fidelity, m).double()
                                 for p, m in self._names]).numpy()  # [measures, L]: one conversion, one mean
        self._layer_sum += per_layer
        row.update(zip((p + m for p, m in self._names), per_layer.mean(1).tolist()))
        self.rows.append(row)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def summary(self) -> dict:
        """The metric part of summary.json (run.py adds the run's identity)."""
        t = self.table()
        n = max(len(t), 1)
        layer = {k: [_finite_or_none(x) for x in np.round(v / n, 6)] for k, v in self._layer.items()}
        step_p, step_v = t.step_time_ms.mean(), t.vanilla_step_time_ms.mean()
        out = {
            "steps": int(len(t)),
            "speedup": float(step_v / step_p),
            "step_time_ms": {"policy": float(step_p), "vanilla": float(step_v)},
            "moe_time_ms": {"policy": float(t.moe_time_ms.mean()), "vanilla": float(t.vanilla_moe_time_ms.mean())},
            "moe_speedup": float(t.vanilla_moe_time_ms.mean() / t.moe_time_ms.mean()),
            "policy_acted_fraction": float(t.policy_acted.mean()),
            "policy_overhead_ms": float(t.policy_overhead_ms.mean()),
            "comm_time_ms": float(t.comm_time_ms.mean()),
            "moe_share": float(t.moe_time_ms.sum() / t.step_time_ms.sum()),
            "bandwidth_utilisation": _finite_or_none(t.hbm_bytes.sum() / (t.step_time_ms.sum() / 1e3 * self.peak_Bps))
            if self.peak_Bps else None,
            "per_layer": {},
        }
        for m, both in MEASURES:
            if both:
                out[m] = {"policy": _finite_or_none(t[m].mean()), "vanilla": _finite_or_none(t["vanilla_" + m].mean())}
                out["per_layer"][m] = {"policy": layer[m], "vanilla": layer["vanilla_" + m]}
            else:
                out[m] = _finite_or_none(t[m].mean())
                out["per_layer"][m] = layer[m]
        return out


def _finite_or_none(x) -> float | None:
    """JSON has no NaN: a measure the trace cannot support is written as null."""
    return float(x) if np.isfinite(x) else None
