"""Fit the cost model's fused-MoE term to the executor's own measured layer times and write a cost
calibration in the one format the simulator loads (lynx_sim/cost/calibration.py), as
`python -m lynx_sim.measured fit` does from NVIDIA's measured tables.

The executor's rows become rows of the measured-MoE table schema carrying each layer's per-expert
token counts (`expert_counts`): the same fit (lynx_sim/measured) prices them from the counts the
kernels ran, not from a rebuilt routing. A seeded half of the rows is fitted, the other half held
out for the reported error, beside the uncalibrated roofline's error on the same rows. Only rows
launched with the most used tile height (`block_m`) are fitted, since the price pads every expert to
one tile height; the others are counted in `source.rows_of_other_block_m`. Only the
MoE component is fitted (the executor times the routed experts alone); a simulator loading the
file prices the other components uncalibrated and says so.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from lynx_sim.cost.calibration import FORMAT
from lynx_sim.cost.moe_layer import MoEKernelParams, moe_load


def moe_rows(table: pd.DataFrame, hidden: int, inter: int, num_experts: int, topk: int, dtype: str) -> pd.DataFrame:
    """The executor's measurements (measurements.csv) as rows of the measured-MoE table schema,
    each with its checked per-expert token counts."""
    from lynx_sim.measured.moe_fit import parse_counts

    missing = sorted({"batch", "routing", "measured_us", "block_m", "expert_counts"} - set(table.columns))
    if missing:
        raise ValueError(f"measurements.csv: expected columns {missing}, found {list(table.columns)}")
    counts = [parse_counts(c, num_experts, int(b), f"measurements.csv row {i}")
              for i, (c, b) in enumerate(zip(table.expert_counts, table.batch))]
    return pd.DataFrame({
        "num_tokens": table.batch.astype(int), "hidden_size": hidden, "inter_size": inter, "topk": topk,
        "num_experts": num_experts, "moe_tp_size": 1, "moe_ep_size": 1, "dtype": dtype,
        "distribution": "executor:" + table.routing.astype(str), "latency_ms": table.measured_us / 1e3,
        "block_m": table.block_m.astype(int), "expert_counts": counts,
    })


def fit(rows: pd.DataFrame, hw, device: str, seed: int = 0) -> dict:
    """The calibration file (lynx_sim/cost/calibration.py format) fitted on `rows` (moe_rows)."""
    from lynx_sim.measured.fit import errors, fit_moe, price_moe, split

    block_m = int(rows.block_m.mode().iloc[0]) if len(rows) else 0  # the kernel's most used tile rows
    other = int((rows.block_m != block_m).sum())
    rows = rows[rows.block_m == block_m].reset_index(drop=True)  # the price pads to one tile height
    if len(rows) < 8:
        raise ValueError(f"calibration needs 8 or more measured layers of one tile height, found {len(rows)} "
                         "(replay more steps or layers)")
    counts = np.stack(rows.expert_counts.to_list())
    today = MoEKernelParams.from_hardware(hw, 2)
    loads = tuple(np.asarray(a, dtype=float)[:, None] for a in moe_load(counts, block_m))  # [rows, 1 draw]
    uncal_loads = tuple(np.asarray(a, dtype=float)[:, None] for a in moe_load(counts, today.block_m))
    keep = split(len(rows), seed)
    base = replace(today, block_m=block_m, count_activations=True)
    p, _ = fit_moe(rows[keep], base, tuple(a[keep] for a in loads), hw.flops_efficiency)
    meas = rows.latency_ms.to_numpy(float)
    held = ~keep
    heldout = errors(price_moe(rows, p, loads)[held], meas[held])
    uncal = errors(price_moe(rows, today, uncal_loads)[held], meas[held])
    return {"format": FORMAT, "gpu": hw.name, "date": _dt.date.today().isoformat(), "seed": seed,
            "source": {"kind": "executor", "device": device, "rows": int(len(rows)), "block_m": block_m,
                       "rows_of_other_block_m": other},
            "report": None, "params": {"moe": asdict(p)},
            "heldout": {"moe_decode": {k: heldout[k] for k in ("median", "p90", "n")}},
            "uncalibrated": {"moe_decode": {k: uncal[k] for k in ("median", "p90", "n")}}}


def write(path: Path, record: dict) -> Path:
    """Write the calibration file atomically (lynx_sim/measured/record.py's writer)."""
    from lynx_sim.measured.record import write_record

    return write_record(record, path)
