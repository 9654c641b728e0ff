"""Fit the attention kernel term (lynx_sim/cost/attention.py) to measured decode and prefill rows
(vLLM's FlashAttention-3, KV-cache update included): least squares on log(predicted / measured),
soft-L1, from ATTN_STARTS; whether the query read and output write are counted is chosen by the
fit-half cost. Leave-one-shape-out over (num_heads, num_kv_heads, head_dim), warm-started from the
full fit (time)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..cost.attention import AttentionParams, attention_decode_s, attention_prefill_s
from .select import ATTN_SHAPE, split

ATTN_X = ("fixed_us", "bandwidth_efficiency", "compute_efficiency", "gamma", "seq_us", "seq_head_us")
ATTN_BOUNDS = ([0.0, 0.05, 0.05, 0.0, 0.0, 0.0], [200.0, 1.0, 1.0, 1.0, 10.0, 10.0])
ATTN_STARTS = ([10.0, 0.8, 0.5, 0.3, 0.01, 0.01], [5.0, 0.5, 0.3, 0.5, 0.05, 0.0])


def attention_phase(df: pd.DataFrame) -> str:
    """'decode' for rows of the generation table (a `kv_len` column, or `step` with isl = 1 as the
    raw table has it), 'prefill' for the context table (`isl` prompt tokens)."""
    cols = set(df.columns)
    if "kv_len" in cols or ("step" in cols and "isl" in cols and (df.isl == 1).all() and (df.step > 0).any()):
        return "decode"
    if "isl" in cols:
        return "prefill"
    raise ValueError(f"attention rows: expected kv_len (decode) or isl (prefill), found {sorted(cols)}")


def price_attention(df: pd.DataFrame, p: AttentionParams, phase: str) -> np.ndarray:
    """Milliseconds per row (bf16 KV: 2 bytes; one GPU, the table's heads). Decode: kv_len cached
    positions per sequence (the new token's included; step + 1 when only `step` is given);
    prefill: isl new tokens after `step` cached ones (0 when absent)."""
    heads, kv_heads, hd = (df[c].to_numpy(float) for c in ATTN_SHAPE)
    b = df.batch_size.to_numpy(float)
    if phase == "decode":
        kv = df.kv_len.to_numpy(float) if "kv_len" in df else df.step.to_numpy(float) + 1
        t = attention_decode_s(b * kv, heads, kv_heads, hd, 2, p, batch=b)
    else:
        cached = df.step.to_numpy(float) if "step" in df else 0.0
        t = attention_prefill_s(df.isl.to_numpy(float), cached, b, heads, kv_heads, hd, 2, p)
    return np.asarray(t, dtype=float) * 1e3


def fit_attention(df: pd.DataFrame, base: AttentionParams, phase: str, starts=ATTN_STARTS) -> tuple[AttentionParams, float]:
    """Least squares on log(pred / meas) over these rows (soft-L1), from `starts`; `base` keeps
    its peaks and `count_queries`. Returns (params, cost)."""
    from scipy.optimize import least_squares

    meas = np.log(df.latency_ms.to_numpy(float))

    def params(x):
        return replace(base, **dict(zip(ATTN_X, map(float, x))))

    fits = [least_squares(lambda x: np.log(price_attention(df, params(x), phase)) - meas, x0=np.asarray(x0, float),
                          bounds=ATTN_BOUNDS, loss="soft_l1", f_scale=0.05) for x0 in starts]
    res = min(fits, key=lambda r: r.cost)
    return params(res.x), float(res.cost)


def shape_name(key) -> str:
    return "h{}_kv{}_d{}".format(*map(int, key))


def attention_component(rows: pd.DataFrame, hw, phase: str, seed: int, loso: bool, errors):
    """(component record, fitted params, plot triple, fit rows, held-out rows) of one phase."""
    fit = split(len(rows), seed)
    held = ~fit
    today = AttentionParams.from_hardware(hw)
    best = None
    for cq in (False, True):  # structural choice by the fit-half cost, as MoE's block_m
        p, cost = fit_attention(rows[fit], replace(today, count_queries=cq), phase)
        if best is None or cost < best[1]:
            best = (p, cost)
    p = best[0]
    meas = rows.latency_ms.to_numpy(float)
    pred, uncal = price_attention(rows, p, phase), price_attention(rows, today, phase)
    comp = {"uncalibrated": errors(uncal[held], meas[held]), "heldout": errors(pred[held], meas[held])}
    if loso:  # refit without each shape, warm-started from the full fit (time), price all its rows
        names = np.array([shape_name(k) for k in rows[ATTN_SHAPE].itertuples(index=False, name=None)])
        lo = np.full(len(rows), np.nan)
        x0 = [getattr(p, n) for n in ATTN_X]
        for name in sorted(set(names)):
            out = names == name
            q, _ = fit_attention(rows[fit & ~out], p, phase, starts=(x0,))
            lo[out] = price_attention(rows[out], q, phase)
        comp["leave_one_shape_out"] = {**errors(lo, meas), "shapes": int(len(set(names)))}
    else:
        comp["leave_one_shape_out"] = None
    return comp, p, (meas[held], pred[held], uncal[held]), int(fit.sum()), int(held.sum())
