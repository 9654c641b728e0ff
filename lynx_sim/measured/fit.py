"""Fit the MoE-layer, GEMM, attention and all-reduce cost terms (lynx_sim/cost/moe_layer.py,
gemm.py, attention.py, parallel.py) to NVIDIA AIConfigurator's measured vLLM tables, and say how
well they predict rows they never saw: `run_fit` puts the parts together into one record.

    python -m lynx_sim.measured fit --gpu h200 --out benchmarks/results/calibration_h200.json --seed 0

The parts, one job each: `select` (which rows, the seeded split), `moe_fit`, `gemm_fit`,
`attention_fit`, `allreduce_fit` (price and fit one term), `record` (errors, source, plots, the
JSON), `predict` (price new rows with a record).

Each table's rows are split by a seeded permutation into a fit half and a held-out half; only the
fit half enters `scipy.optimize.least_squares` (residual log(predicted / measured), soft-L1 loss).
Errors are |predicted / measured - 1| on the held-out half, per component (MoE decode: <=
DECODE_TOKENS tokens; MoE larger; GEMM decode: m <= DECODE_TOKENS; GEMM larger; attention decode
and prefill; all-reduce), beside the uncalibrated roofline (conf/hardware/<gpu>.yaml) on the
same rows. Structural choices (MoE tile rows and activation traffic, GEMM split-K point, attention
query bytes) are made by the fit-half cost, never by held-out error. Leave-one-shape-out: for each
MoE shape (H, I, E, k) refit on the fit half without it and price all its rows; likewise for
attention (num_heads, num_kv_heads, head_dim).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..cost.attention import AttentionParams
from ..cost.gemm import GemmParams
from ..cost.moe_layer import MoEKernelParams
from .allreduce_fit import fit_allreduce, price_allreduce, price_allreduce_today
from .attention_fit import ATTN_BOUNDS, ATTN_STARTS, ATTN_X, attention_component, fit_attention, price_attention
from .gemm_fit import GEMM_BOUNDS, GEMM_STARTS, GEMM_X, K_SPLIT_GRID, fit_gemm, fit_gemm_structure, price_gemm
from .moe_fit import (BLOCK_M_GRID, MOE_BOUNDS, MOE_STARTS, MOE_X, MoERows, fit_moe, fit_moe_structure,
                      leave_one_shape_out, moe_loads, parse_counts, price_moe, shape_name)
from .predict import predict
from .record import errors, hardware, plot, source, write_record
from .select import (ALLREDUCE_BACKEND, ATTN_HEAD_DIMS, ATTN_MAX_ROWS, ATTN_SHAPE, DECODE_TOKENS, L2_RESIDENT_BYTES,
                     MAX_TP, NON_GATED_SHAPES, SHAPE, WEIGHT_BYTES, expert_weight_bytes, gated, select_allreduce,
                     select_attention, select_gemm, select_moe, split)

MIN_DTYPE_ROWS = 40  # an fp8 parameter set is fitted only from this many rows of that dtype

__all__ = ["run_fit", "predict", "write_record", "errors", "hardware", "split", "select_moe", "select_gemm",
           "select_attention", "select_allreduce", "gated", "expert_weight_bytes", "moe_loads", "price_moe", "fit_moe",
           "price_gemm", "fit_gemm", "price_attention", "fit_attention", "fit_allreduce", "price_allreduce",
           "price_allreduce_today", "parse_counts", "DECODE_TOKENS", "MAX_TP", "L2_RESIDENT_BYTES", "WEIGHT_BYTES",
           "NON_GATED_SHAPES", "SHAPE", "BLOCK_M_GRID", "MOE_X", "MOE_STARTS", "MOE_BOUNDS", "GEMM_X", "GEMM_BOUNDS",
           "GEMM_STARTS", "K_SPLIT_GRID", "ATTN_SHAPE", "ATTN_HEAD_DIMS", "ATTN_MAX_ROWS", "ATTN_X", "ATTN_BOUNDS",
           "ATTN_STARTS", "ALLREDUCE_BACKEND", "MoERows"]


def _pair(pred, uncal, meas, sel) -> dict:
    return {"uncalibrated": errors(uncal[sel], meas[sel]), "heldout": errors(pred[sel], meas[sel])}


def moe_components(rows: pd.DataFrame, hw, seed: int, loso: bool, block_m_grid=BLOCK_M_GRID, dtype: str = "bfloat16",
                   suffix: str = ""):
    """(moe_decode<suffix> and moe_larger<suffix> records, fitted params, uncalibrated params, plot
    triples, fit mask) of the rows of one weight dtype (uncalibrated: the hardware's peak for that
    width, as the roofline prices it)."""
    fit = split(len(rows), seed)
    held, decode = ~fit, (rows.num_tokens <= DECODE_TOKENS).to_numpy()
    today = MoEKernelParams.from_hardware(hw, WEIGHT_BYTES[dtype])
    cap = hw.flops_efficiency  # the fused MoE stays below cuBLAS's measured 8192^3 efficiency (conf/hardware)
    cache = {}
    p, loads = fit_moe_structure(rows, fit, today, seed, cap, block_m_grid, cache)
    arr = MoERows(rows)
    pred = arr.price(p, loads)
    uncal = arr.price(today, moe_loads(rows, today.block_m, seed, cache))
    meas = rows.latency_ms.to_numpy(float)
    dec, lar = "moe_decode" + suffix, "moe_larger" + suffix
    comps = {dec: _pair(pred, uncal, meas, held & decode), lar: _pair(pred, uncal, meas, held & ~decode)}
    for col, name in ((SHAPE, "by_shape"), (["moe_tp_size"], "by_tp")):  # where the held-out error sits
        keys = rows[col].itertuples(index=False, name=None)
        labels = np.array([shape_name(key) if name == "by_shape" else f"tp{key[0]}" for key in keys])
        comps[dec][name] = {lab: _pair(pred, uncal, meas, held & decode & (labels == lab)) for lab in sorted(set(labels))}
    if loso:
        lo = leave_one_shape_out(rows, fit, p, today, loads, cap)
        names = np.array([shape_name(key) for key in rows[SHAPE].itertuples(index=False, name=None)])
        comps[dec]["leave_one_shape_out"] = {
            **errors(lo[decode], meas[decode]),
            "by_shape": {n: errors(lo[(names == n) & decode], meas[(names == n) & decode]) for n in sorted(set(names))}}
        comps[lar]["leave_one_shape_out"] = errors(lo[~decode], meas[~decode])
    plots = {dec: (meas[held & decode], pred[held & decode], uncal[held & decode]),
             lar: (meas[held & ~decode], pred[held & ~decode], uncal[held & ~decode])}
    return comps, p, today, plots, fit


def gemm_components(g: pd.DataFrame, hw, seed: int, k_split_grid=K_SPLIT_GRID):
    fit = split(len(g), seed)
    held, decode = ~fit, (g.m <= DECODE_TOKENS).to_numpy()
    today = GemmParams.from_hardware(hw, 2)
    p = fit_gemm_structure(g[fit], today, k_split_grid)
    pred, uncal, meas = price_gemm(g, p), price_gemm(g, today, act_bytes=0.0), g.latency_ms.to_numpy(float)
    comps = {"gemm_decode": _pair(pred, uncal, meas, held & decode),
             "gemm_larger": _pair(pred, uncal, meas, held & ~decode)}
    for c in comps.values():
        c["leave_one_shape_out"] = None  # not computed (22 x 22 GEMM shapes)
    plots = {"gemm_decode": (meas[held & decode], pred[held & decode], uncal[held & decode]),
             "gemm_larger": (meas[held & ~decode], pred[held & ~decode], uncal[held & ~decode])}
    return comps, p, today, plots, fit


def allreduce_component(ar: pd.DataFrame, hw, seed: int):
    fit = split(len(ar), seed)
    p = fit_allreduce(ar[fit])
    pred, uncal, meas = price_allreduce(ar, p), price_allreduce_today(ar, hw), ar.latency_ms.to_numpy(float)
    comp = {**_pair(pred, uncal, meas, ~fit),
            "leave_one_shape_out": None}  # one (latency, bandwidth) per num_gpus: no shape to leave out
    return comp, p, (meas[~fit], pred[~fit], uncal[~fit]), fit


def run_fit(gpu: str, seed: int = 0, moe: pd.DataFrame | None = None, gemm: pd.DataFrame | None = None,
            hw=None, loso: bool = True, block_m_grid=BLOCK_M_GRID, plot_dir: str | Path | None = None,
            decode_attention: pd.DataFrame | None = None, prefill_attention: pd.DataFrame | None = None,
            allreduce: pd.DataFrame | None = None, attention_rows: int | None = ATTN_MAX_ROWS,
            k_split_grid=K_SPLIT_GRID) -> dict:
    """Select, split, fit, evaluate; returns the calibration record (module docstring). `moe` /
    `gemm` / `decode_attention` / `prefill_attention` / `allreduce`: tables in the reader's schema
    (default: read from the installed package)."""
    from . import read_allreduce, read_context_attention, read_gemm, read_generation_attention, read_moe

    hw = hardware(gpu) if hw is None else hw
    moe_all = read_moe(gpu, dtype=None) if moe is None else moe
    gemm_all = read_gemm(gpu, dtype="bfloat16") if gemm is None else gemm
    rows, excluded = select_moe(moe_all)
    g, ex = select_gemm(gemm_all)
    excluded.update(ex)

    comps, moe_p, moe_today, plots, mfit = moe_components(rows, hw, seed, loso, block_m_grid)
    # fp8 weights (per-tensor and block-scaled): their own kernels, their own parameter sets
    by_dtype, dtype_rows = {}, {}
    for dt in (d for d in WEIGHT_BYTES if d != "bfloat16"):
        drows, ex = select_moe(moe_all, dt, prefix=f"moe {dt}: ")
        if len(drows) < MIN_DTYPE_ROWS:
            continue
        excluded.update(ex)
        c, p_dt, _, pl, dfit = moe_components(drows, hw, seed, loso, block_m_grid, dt, "_" + dt)
        comps.update(c)
        plots.update(pl)
        by_dtype[dt] = {"moe": asdict(p_dt)}
        dtype_rows[dt] = (int(dfit.sum()), int((~dfit).sum()))
    gcomps, gemm_p, gemm_today, gplots, gfit = gemm_components(g, hw, seed, k_split_grid)
    comps.update(gcomps)
    plots.update(gplots)

    # attention (decode, prefill) and all-reduce: own tables, own seeded splits
    tables = {"decode": read_generation_attention(gpu) if decode_attention is None else decode_attention,
              "prefill": read_context_attention(gpu) if prefill_attention is None else prefill_attention}
    attn_p, attn_n = {}, {}
    for phase, table in tables.items():
        arows, ex = select_attention(table, phase, seed, attention_rows)
        excluded.update(ex)
        comps[f"attention_{phase}"], attn_p[phase], plots[f"attention_{phase}"], nf, nh = \
            attention_component(arows, hw, phase, seed, loso, errors)
        attn_n[phase] = (nf, nh)
    ar_all = read_allreduce(gpu) if allreduce is None else allreduce
    ar, ex = select_allreduce(ar_all)
    excluded.update(ex)
    comps["allreduce"], ar_p, plots["allreduce"], afit = allreduce_component(ar, hw, seed)

    record = {
        "gpu": gpu,
        "source": source({"moe": moe_all, "gemm": gemm_all, "attention_decode": tables["decode"],
                          "attention_prefill": tables["prefill"], "allreduce": ar_all}),
        "date": _dt.date.today().isoformat(),
        "seed": seed,
        "fit_rows": {"moe": int(mfit.sum()), "gemm": int(gfit.sum()), "attention_decode": attn_n["decode"][0],
                     "attention_prefill": attn_n["prefill"][0], "allreduce": int(afit.sum())},
        "heldout_rows": {"moe": int((~mfit).sum()), "gemm": int((~gfit).sum()), "attention_decode": attn_n["decode"][1],
                         "attention_prefill": attn_n["prefill"][1], "allreduce": int((~afit).sum())},
        "params": {"moe": asdict(moe_p), "gemm": asdict(gemm_p),
                   "attention": {k: asdict(v) for k, v in attn_p.items()}, "allreduce": asdict(ar_p)},
        "uncalibrated_params": {"moe": asdict(moe_today), "gemm": asdict(gemm_today),
                                "attention": asdict(AttentionParams.from_hardware(hw)),
                                "allreduce": {"link_Bps": hw.interconnect_Bps,
                                              "latency_us": hw.collective_latency_us}},
        "params_by_dtype": by_dtype,
        "rows_by_dtype": {dt: {"fit": n[0], "heldout": n[1]} for dt, n in dtype_rows.items()},
        "heldout_error": {k: comps["moe_decode"]["heldout"][k] for k in ("median", "p90")},
        "components": comps,
        "excluded": excluded,
        "notes": ("MoE rows: bf16 (params.moe; fp8 and fp8_block weights: params_by_dtype, components "
                  "moe_*_fp8 / moe_*_fp8_block, each its own kernel and fit), EP = 1, TP <= 8, local expert "
                  "weights >= 50 MB, routing_faithful (or explicit "
                  "expert_counts); uncalibrated = conf/hardware yaml through the same functions (MoE: gamma = rho = 0, "
                  "no activation bytes, no per-block cost; GEMM: weights only, no fixed cost, no split-K). Power-law "
                  "rows priced as the mean over 5 seeded draws of the collector's routing, not its own (unseeded) "
                  f"draws. Attention: bf16 KV, window 0, head_dim 64/128, FA3, a seeded subsample of {attention_rows} "
                  "rows per phase; uncalibrated = the roofline attention term without projection weights "
                  "(KV bytes / BW vs FLOPs / FLOP/s, + attention_layer_fixed_us); leave-one-shape-out over "
                  "(num_heads, num_kv_heads, head_dim), warm-started from the full fit. All-reduce: vllm_graph "
                  "rows, (latency, bus bandwidth) per num_gpus; uncalibrated = allreduce_s with "
                  "interconnect_gbps and collective_latency_us."),
    }
    if plot_dir is not None:
        record["plots"] = plot(gpu, Path(plot_dir), plots)
    return record
