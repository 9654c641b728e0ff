"""Fit the cost model's MoE terms to measured layer times, and write the calibration JSON that
`conf/hardware/<gpu>.yaml: calibration` loads (lynx_sim/cost/hardware.py).

Model (lynx_sim/cost/roofline.py, routed_experts_s): a memory-bound decode MoE layer takes
    t = distinct x expert_bytes / (peak_bandwidth x eff) + fixed,
linear in x = distinct x expert_bytes / peak_bandwidth with slope 1 / eff and intercept fixed;
least squares over the memory-bound points gives both. What remains per kernel tile height
(BLOCK_M) is reported as the median measured / fitted ratio per block size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd


def fit(table: pd.DataFrame, expert_bytes: float, peak_Bps: float) -> dict:
    """table: rows with `distinct`, `measured_us`, `memory_bound` (bool) and `block_m`."""
    pts = table[table.memory_bound]
    if len(pts) < 2 or pts.distinct.nunique() < 2:
        raise ValueError(f"calibration needs memory-bound points at 2 or more distinct-expert counts; found "
                         f"{len(pts)} points at {pts.distinct.nunique()} counts (replay more steps or batch sizes)")
    x = pts.distinct.to_numpy(float) * expert_bytes / peak_Bps * 1e6  # microseconds at datasheet bandwidth
    slope, intercept = np.polyfit(x, pts.measured_us.to_numpy(float), 1)
    if not slope > 0:
        raise ValueError(f"calibration: time does not grow with distinct experts (slope {slope:.3g}): "
                         "the points are noise, not a memory-bound layer")
    fitted = table.distinct.to_numpy(float) * expert_bytes / peak_Bps * 1e6 * slope + max(intercept, 0.0)
    ratio = table.measured_us.to_numpy(float) / fitted
    per_block = {str(int(b)): float(np.median(ratio[(table.block_m == b).to_numpy()])) for b in sorted(table.block_m.unique())}
    resid = np.abs(ratio[table.memory_bound.to_numpy()] - 1.0)
    return {"factors": {"moe_bandwidth_efficiency": float(1.0 / slope), "moe_layer_fixed_us": float(max(intercept, 0.0))},
            "block_m_factors": per_block, "points": int(len(pts)),
            "fit_relative_error": {"median": float(np.median(resid)), "p90": float(np.quantile(resid, 0.9))}}


def write(path: Path, result: dict, meta: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    return path
