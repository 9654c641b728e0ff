"""Fit the MoE-layer, GEMM, attention and all-reduce cost terms (lynx_sim/cost/moe_layer.py,
gemm.py, attention.py, parallel.py) to NVIDIA AIConfigurator's measured vLLM tables, and say how
well they predict rows they never saw.

    python -m lynx_sim.measured fit --gpu h200 --out benchmarks/results/calibration_h200.json --seed 0

Rows (bf16, vLLM's newest table): MoE rows with EP = 1 and TP <= 8 only. Left out, and counted
under `excluded`: EP > 1 (vLLM's logical EP, rank 0 masking the other ranks' tokens, is not our
all-to-all layout), TP > 8, rows whose local expert weights are under L2_RESIDENT_BYTES (they stay
in the 50 MB L2 between CUDA-graph replays, so they measure L2, not HBM), and rows whose routing we
cannot rebuild (`routing_faithful == False`). GEMM rows: all bf16 rows.

Each table's rows are split by a seeded permutation into a fit half and a held-out half; only the
fit half enters `scipy.optimize.least_squares` (residual log(predicted / measured), soft-L1 loss so
that a few odd rows do not steer it). Errors are |predicted / measured - 1| on the held-out half,
per component (MoE decode: <= DECODE_TOKENS tokens; MoE larger; GEMM decode: m <= DECODE_TOKENS;
GEMM larger), beside today's uncalibrated roofline (conf/hardware/<gpu>.yaml) on the same rows.
Leave-one-shape-out: for each MoE shape (H, I, E, k) refit on the fit half without it (from the
same cold starts; only block_m and the activation choice are kept from the full fit) and price
all its rows. The tile rows block_m and whether activation traffic is counted are chosen by the
fit-half cost over a small grid (not by held-out error).

Attention (decode, prefill; `attention.py`) and all-reduce (`AllReduceParams`): see
`select_attention`, `attention_component` and `fit_allreduce`; each table has its own seeded
split (the same `split`), the MoE and GEMM rows and numbers are untouched by them.

A measured MoE power-law row is the mean over 5 routings (lynx_sim/measured/routing.py); we
price 5 draws of our own (seeded by the row's T, E, k and distribution) and average the times.
"""

from __future__ import annotations

import datetime as _dt
import json
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..cost.attention import AttentionParams, attention_decode_s, attention_prefill_s
from ..cost.gemm import GemmParams, gemm_s
from ..cost.parallel import AllReduceParams, allreduce_fitted_s, allreduce_s
from ..cost.moe_layer import MoEKernelParams, moe_layer_s, moe_load
from .routing import COLLECTOR_DRAWS, row_counts

DECODE_TOKENS = 256
MAX_TP = 8
L2_RESIDENT_BYTES = 50e6  # H100/H200 L2: 50 MB
WEIGHT_BYTES = {"bfloat16": 2}
# (hidden, inter, E, k) of MoE shapes without a gate (ReLU^2: two matrices per expert). Source: the
# packaged model configs of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B, -Super-120B-A12B (latent 1024),
# -Ultra-550B-A55B (latent 2048), mlp_hidden_act relu2. Every other shape in the tables is gated.
NON_GATED_SHAPES = {(2688, 1856, 128, 6), (1024, 2688, 512, 22), (2048, 5120, 512, 22)}
SHAPE = ["hidden_size", "inter_size", "num_experts", "topk"]
BLOCK_M_GRID = (16, 32, 64)
MOE_X = ("fixed_us", "bandwidth_efficiency", "compute_efficiency", "gamma", "rho", "misaligned", "expert_us")
MOE_STARTS = [dict(zip(MOE_X, x0)) for x0 in ((20.0, 0.8, 0.5, 0.3, 0.3, 1.5, 0.2),
                                              (10.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.5))]
MOE_BOUNDS = ([0.0, 0.05, 0.05, 0.0, 0.0, 1.0, 0.0], [200.0, 1.0, 1.0, 1.0, 1.0, 10.0, 20.0])
GEMM_X = ("fixed_us", "bandwidth_efficiency", "compute_efficiency", "gamma", "k_ns")
GEMM_BOUNDS = ([0.0, 0.05, 0.05, 0.0, 0.0], [200.0, 1.0, 1.0, 1.0, 100.0])
GEMM_STARTS = ([3.0, 0.8, 0.6, 0.3, 0.5], [1.0, 0.5, 0.5, 0.5, 0.5])


# ---------------------------------------------------------------- rows

def gated(df: pd.DataFrame) -> np.ndarray:
    keys = df[SHAPE].itertuples(index=False, name=None)
    return np.array([tuple(map(int, key)) not in NON_GATED_SHAPES for key in keys])


def expert_weight_bytes(df: pd.DataFrame) -> np.ndarray:
    """Bytes of all local expert weights on the timed GPU (E / ep experts, I / tp wide)."""
    mats = np.where(gated(df), 3, 2)
    return (df.num_experts / df.moe_ep_size * mats * df.hidden_size * df.inter_size / df.moe_tp_size
            * df.dtype.map(WEIGHT_BYTES).fillna(2)).to_numpy(float)


def select_moe(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The MoE rows fitted and evaluated, and {reason: rows left out} (first reason that applies)."""
    reasons = {
        "dtype not bfloat16": df.dtype != "bfloat16",
        "expert parallel (moe_ep_size > 1)": df.moe_ep_size > 1,
        f"moe_tp_size > {MAX_TP}": df.moe_tp_size > MAX_TP,
        "routing_faithful == False": ~df.get("routing_faithful", pd.Series(True, index=df.index)).astype(bool),
        f"local expert weights < {L2_RESIDENT_BYTES / 1e6:.0f} MB (L2-resident)":
            pd.Series(expert_weight_bytes(df) < L2_RESIDENT_BYTES, index=df.index),
    }
    keep, excluded = pd.Series(True, index=df.index), {}
    for reason, out in reasons.items():
        excluded[reason] = int((keep & out).sum())
        keep &= ~out
    return df[keep].reset_index(drop=True), excluded


def split(n: int, seed: int) -> np.ndarray:
    """Boolean [n]: True for the fit half, from a seeded permutation (the rest is held out)."""
    fit = np.zeros(n, dtype=bool)
    fit[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return fit


# ---------------------------------------------------------------- MoE: routing -> load

def _row_rng(seed: int, T: int, E: int, k: int, dist: str) -> np.random.Generator:
    return np.random.default_rng([seed, T, E, k, zlib.crc32(dist.encode())])


def moe_loads(df: pd.DataFrame, block_m: int, seed: int = 0, cache: dict | None = None):
    """(distinct, tiles, pairs), each [rows, draws], for every row: the collector's routing rebuilt
    by row_counts (COLLECTOR_DRAWS draws for power law; balanced repeated). Counts are shared by rows with the
    same (T, E, k, distribution): EP = 1 and TP leaves every expert on the GPU."""
    cache = {} if cache is None else cache
    keys = list(df[["num_tokens", "num_experts", "topk", "distribution"]].itertuples(index=False, name=None))
    out = np.zeros((3, len(keys), COLLECTOR_DRAWS))
    for i, (T, E, k, dist) in enumerate(keys):
        key = (int(T), int(E), int(k), str(dist), block_m)
        if key not in cache:
            ck = key[:4]
            if ck not in cache:
                cache[ck] = row_counts(*ck, rng=_row_rng(seed, *ck))  # [draws, E]
            cache[key] = np.stack(moe_load(cache[ck], block_m))  # [3, draws]
        load = cache[key]
        out[:, i] = load if load.shape[1] == COLLECTOR_DRAWS else np.repeat(load, COLLECTOR_DRAWS, axis=1)
    return out[0], out[1], out[2]


def price_moe(df: pd.DataFrame, p: MoEKernelParams, loads) -> np.ndarray:
    """Milliseconds per row: moe_layer_s averaged over the row's draws."""
    H = df.hidden_size.to_numpy(float)[:, None]
    inter = (df.inter_size / df.moe_tp_size).to_numpy(float)[:, None]
    t = moe_layer_s(None, H, inter, 2, p, gated=gated(df)[:, None], load=loads)  # [rows, draws]
    return t.mean(-1) * 1e3


def fit_moe(df: pd.DataFrame, base: MoEKernelParams, loads, compute_cap: float = 1.0,
            starts=None) -> tuple[MoEKernelParams, float]:
    """Least squares on log(pred / meas) over these rows, starting from `base` (whose block_m and
    count_activations stay); compute efficiency at most `compute_cap`; `misaligned` stays 1 when
    no row has a misaligned shard (nothing could set it). `starts`: starting points ({name:
    value}; default MOE_STARTS); the lowest cost wins (the max() kinks leave local minima).
    Returns (params, cost)."""
    from scipy.optimize import least_squares

    meas = np.log(df.latency_ms.to_numpy(float))
    shard = (df.inter_size / df.moe_tp_size).to_numpy(float)
    free = [n for n in MOE_X if n != "misaligned" or (np.remainder(shard, base.align) != 0).any()]
    lo = [MOE_BOUNDS[0][MOE_X.index(n)] for n in free]
    hi = [compute_cap if n == "compute_efficiency" else MOE_BOUNDS[1][MOE_X.index(n)] for n in free]
    fixed = {} if "misaligned" in free else {"misaligned": 1.0}

    def params(x):
        return replace(base, **fixed, **dict(zip(free, map(float, x))))

    best = None
    for start in starts or MOE_STARTS:
        x0 = np.clip([start[n] for n in free], lo, np.array(hi) - 1e-9)
        res = least_squares(lambda x: np.log(price_moe(df, params(x), loads)) - meas,
                            x0=x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05)
        if best is None or res.cost < best.cost:
            best = res
    return params(best.x), float(best.cost)


def fit_gemm(df: pd.DataFrame, base: GemmParams) -> tuple[GemmParams, float]:
    from scipy.optimize import least_squares

    meas = np.log(df.latency_ms.to_numpy(float))

    def params(x):
        return replace(base, **dict(zip(GEMM_X, map(float, x))))

    fits = [least_squares(lambda x: np.log(price_gemm(df, params(x))) - meas, x0=x0, bounds=GEMM_BOUNDS,
                          loss="soft_l1", f_scale=0.05) for x0 in GEMM_STARTS]
    res = min(fits, key=lambda r: r.cost)
    return params(res.x), float(res.cost)


def price_gemm(df: pd.DataFrame, p: GemmParams, act_bytes: float = 2.0) -> np.ndarray:
    return gemm_s(df.m, df.n, df.k, 2, p, act_bytes) * 1e3


# ---------------------------------------------------------------- attention and all-reduce

ATTN_SHAPE = ["num_heads", "num_key_value_heads", "head_dim"]
ATTN_HEAD_DIMS = (64, 128)
ATTN_MAX_ROWS = 4000  # seeded subsample of each attention table after selection (fit time)
ATTN_X = ("fixed_us", "bandwidth_efficiency", "compute_efficiency", "gamma", "seq_us", "seq_head_us")
ATTN_BOUNDS = ([0.0, 0.05, 0.05, 0.0, 0.0, 0.0], [200.0, 1.0, 1.0, 1.0, 10.0, 10.0])
ATTN_STARTS = ([10.0, 0.8, 0.5, 0.3, 0.01, 0.01], [5.0, 0.5, 0.3, 0.5, 0.05, 0.0])
ALLREDUCE_BACKEND = "vllm_graph"


def select_attention(df: pd.DataFrame, phase: str, seed: int = 0,
                     max_rows: int | None = ATTN_MAX_ROWS) -> tuple[pd.DataFrame, dict]:
    """Attention rows fitted and evaluated ({reason: rows left out}, first reason that applies):
    bf16 KV cache, no sliding window, head_dim 64 or 128 (the dense models we simulate; 192/256/512
    are MLA-like or rare and run other kernel paths), FlashAttention-3 (FA4 rows are a few
    Blackwell-style ones), then a seeded subsample of at most `max_rows` rows."""
    reasons = {
        "kv_cache_dtype not bfloat16": df.kv_cache_dtype != "bfloat16",
        "window_size != 0 (sliding window)": df.window_size != 0,
        f"head_dim not in {ATTN_HEAD_DIMS}": ~df.head_dim.isin(ATTN_HEAD_DIMS),
        "kernel_source not vllm_flash_attn_fa3": df.kernel_source != "vllm_flash_attn_fa3",
    }
    keep, excluded = pd.Series(True, index=df.index), {}
    for reason, out in reasons.items():
        excluded[f"attention_{phase}: {reason}"] = int((keep & out).sum())
        keep &= ~out
    rows = df[keep].reset_index(drop=True)
    if max_rows is not None and len(rows) > max_rows:
        pick = np.sort(np.random.default_rng([seed, 1 if phase == "decode" else 2]).permutation(len(rows))[:max_rows])
        excluded[f"attention_{phase}: not in the seeded subsample of {max_rows}"] = int(len(rows) - max_rows)
        rows = rows.iloc[pick].reset_index(drop=True)
    return rows, excluded


def price_attention(df: pd.DataFrame, p: AttentionParams, phase: str) -> np.ndarray:
    """Milliseconds per row (bf16 KV: 2 bytes; one GPU, the table's heads)."""
    heads, kv_heads, hd = df.num_heads, df.num_key_value_heads, df.head_dim
    if phase == "decode":
        t = attention_decode_s(df.batch_size * df.kv_len, heads, kv_heads, hd, 2, p, batch=df.batch_size)
    else:
        t = attention_prefill_s(df.isl, 0, df.batch_size, heads, kv_heads, hd, 2, p)
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


def fit_allreduce(df: pd.DataFrame) -> AllReduceParams:
    """Per num_gpus: (latency, bus bandwidth) by least squares on log(pred / meas) (soft-L1)."""
    from scipy.optimize import least_squares

    lat, bw = {}, {}
    for g, part in df.groupby("num_gpus"):
        g = int(g)
        b, meas = part.message_bytes.to_numpy(float), np.log(part.latency_ms.to_numpy(float))
        ring = 2.0 * (g - 1) / g * b

        def resid(x):
            return np.log(x[0] * 1e-3 + ring / (x[1] * 1e9) * 1e3) - meas

        res = least_squares(resid, x0=[5.0, 300.0], bounds=([0.0, 1.0], [1000.0, 10000.0]), loss="soft_l1", f_scale=0.05)
        lat[str(g)], bw[str(g)] = float(res.x[0]), float(res.x[1]) * 1e9
    return AllReduceParams(latency_us=lat, bus_Bps=bw)


def price_allreduce(df: pd.DataFrame, p: AllReduceParams) -> np.ndarray:
    return allreduce_fitted_s(df.message_bytes.to_numpy(float), df.num_gpus.to_numpy(), p) * 1e3


def price_allreduce_today(df: pd.DataFrame, hw) -> np.ndarray:
    """`allreduce_s` with the hardware's interconnect and collective latency, milliseconds."""
    return np.array([allreduce_s(b, int(g), hw.interconnect_Bps, hw.collective_latency_us * 1e-6) * 1e3
                     for b, g in zip(df.message_bytes.to_numpy(float), df.num_gpus)])


def _attn_shape_name(key) -> str:
    return "h{}_kv{}_d{}".format(*map(int, key))


def attention_component(rows: pd.DataFrame, hw, phase: str, seed: int, loso: bool):
    """(component record, fitted params, plot triple) of one attention phase."""
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
        names = np.array([_attn_shape_name(k) for k in rows[ATTN_SHAPE].itertuples(index=False, name=None)])
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


# ---------------------------------------------------------------- errors

def errors(pred_ms, meas_ms) -> dict:
    """median and p90 of |pred / meas - 1|, the bias median(pred / meas) - 1 (negative: too fast), n."""
    pred, meas = np.asarray(pred_ms, float), np.asarray(meas_ms, float)
    if len(pred) == 0:
        return {"median": None, "p90": None, "bias": None, "n": 0}
    e = np.abs(pred / meas - 1)
    return {"median": round(float(np.median(e)), 4), "p90": round(float(np.quantile(e, 0.9)), 4),
            "bias": round(float(np.median(pred / meas) - 1), 4), "n": int(len(e))}


def hardware(gpu: str):
    from omegaconf import OmegaConf

    from ..config import CONF_DIR
    from ..cost.hardware import HardwareSpec

    return HardwareSpec.from_cfg(OmegaConf.load(CONF_DIR / "hardware" / f"{gpu}.yaml"))


def _shape_name(key) -> str:
    return "H{}_I{}_E{}_k{}".format(*map(int, key))


# ---------------------------------------------------------------- the whole fit

def run_fit(gpu: str, seed: int = 0, moe: pd.DataFrame | None = None, gemm: pd.DataFrame | None = None,
            hw=None, loso: bool = True, block_m_grid=BLOCK_M_GRID, plot_dir: str | Path | None = None,
            decode_attention: pd.DataFrame | None = None, prefill_attention: pd.DataFrame | None = None,
            allreduce: pd.DataFrame | None = None, attention_rows: int | None = ATTN_MAX_ROWS) -> dict:
    """Select, split, fit, evaluate; returns the calibration record (module docstring). `moe` /
    `gemm` / `decode_attention` / `prefill_attention` / `allreduce`: tables in the reader's schema
    (default: read from the installed package)."""
    from . import read_allreduce, read_context_attention, read_gemm, read_generation_attention, read_moe

    hw = hardware(gpu) if hw is None else hw
    moe_all = read_moe(gpu) if moe is None else moe
    gemm_all = read_gemm(gpu, dtype="bfloat16") if gemm is None else gemm
    rows, excluded = select_moe(moe_all)
    g = gemm_all[gemm_all.dtype == "bfloat16"].reset_index(drop=True)
    excluded["gemm: dtype not bfloat16"] = int(len(gemm_all) - len(g))
    mfit, gfit = split(len(rows), seed), split(len(g), seed)
    decode = (rows.num_tokens <= DECODE_TOKENS).to_numpy()
    gdecode = (g.m <= DECODE_TOKENS).to_numpy()

    # MoE: structural choices (tile rows, activation traffic) by the fit-half cost, then the fit
    today = MoEKernelParams.from_hardware(hw, 2)
    cap = hw.flops_efficiency  # the fused MoE stays below cuBLAS's measured 8192^3 efficiency (conf/hardware);
    # the GEMM fit is not capped (its fitted efficiency trades off against its overlap term)
    cache, best = {}, None
    for bm in block_m_grid:
        loads = moe_loads(rows, bm, seed, cache)
        for acts in (False, True):
            base = replace(today, block_m=bm, count_activations=acts)
            p, cost = fit_moe(rows[mfit], base, tuple(a[mfit] for a in loads), cap)
            if best is None or cost < best[1]:
                best = (p, cost, loads)
    moe_p, _, loads = best
    pred = price_moe(rows, moe_p, loads)
    uncal = price_moe(rows, today, moe_loads(rows, today.block_m, seed, cache))
    meas = rows.latency_ms.to_numpy(float)

    gemm_today = GemmParams.from_hardware(hw, 2)
    gemm_p, _ = fit_gemm(g[gfit], gemm_today)
    gpred, guncal, gmeas = price_gemm(g, gemm_p), price_gemm(g, gemm_today, act_bytes=0.0), g.latency_ms.to_numpy(float)

    held, gheld = ~mfit, ~gfit
    comps = {
        "moe_decode": {"uncalibrated": errors(uncal[held & decode], meas[held & decode]),
                       "heldout": errors(pred[held & decode], meas[held & decode])},
        "moe_larger": {"uncalibrated": errors(uncal[held & ~decode], meas[held & ~decode]),
                       "heldout": errors(pred[held & ~decode], meas[held & ~decode])},
        "gemm_decode": {"uncalibrated": errors(guncal[gheld & gdecode], gmeas[gheld & gdecode]),
                        "heldout": errors(gpred[gheld & gdecode], gmeas[gheld & gdecode])},
        "gemm_larger": {"uncalibrated": errors(guncal[gheld & ~gdecode], gmeas[gheld & ~gdecode]),
                        "heldout": errors(gpred[gheld & ~gdecode], gmeas[gheld & ~gdecode])},
    }
    # where the held-out error sits: per MoE shape and TP (decode rows)
    by = {}
    for col, name in ((SHAPE, "by_shape"), (["moe_tp_size"], "by_tp")):
        keys = rows[col].itertuples(index=False, name=None)
        labels = np.array([_shape_name(key) if name == "by_shape" else f"tp{key[0]}" for key in keys])
        by[name] = {lab: {"uncalibrated": errors(uncal[s], meas[s]), "heldout": errors(pred[s], meas[s])}
                    for lab in sorted(set(labels)) for s in [held & decode & (labels == lab)]}
    comps["moe_decode"].update(by)

    if loso:
        shape_keys = np.array([_shape_name(key) for key in rows[SHAPE].itertuples(index=False, name=None)])
        lo = np.full(len(rows), np.nan)
        per_shape = {}
        for name in sorted(set(shape_keys)):
            out = shape_keys == name
            train = mfit & ~out
            base = replace(today, block_m=moe_p.block_m, count_activations=moe_p.count_activations)
            p, _ = fit_moe(rows[train], base, tuple(a[train] for a in loads), cap)  # cold starts
            lo[out] = price_moe(rows[out], p, tuple(a[out] for a in loads))
            per_shape[name] = errors(lo[out & decode], meas[out & decode])
        comps["moe_decode"]["leave_one_shape_out"] = {**errors(lo[decode], meas[decode]), "by_shape": per_shape}
        comps["moe_larger"]["leave_one_shape_out"] = errors(lo[~decode], meas[~decode])
    for c in ("gemm_decode", "gemm_larger"):
        comps[c]["leave_one_shape_out"] = None  # not computed (22 x 22 GEMM shapes)

    # attention (decode, prefill) and all-reduce: own tables, own seeded splits
    dec_all = read_generation_attention(gpu) if decode_attention is None else decode_attention
    pre_all = read_context_attention(gpu) if prefill_attention is None else prefill_attention
    ar_all = read_allreduce(gpu) if allreduce is None else allreduce
    attn_p, attn_plots, attn_n = {}, {}, {}
    for phase, table in (("decode", dec_all), ("prefill", pre_all)):
        arows, ex = select_attention(table, phase, seed, attention_rows)
        excluded.update(ex)
        comps[f"attention_{phase}"], attn_p[phase], attn_plots[f"attention_{phase}"], nf, nh = \
            attention_component(arows, hw, phase, seed, loso)
        attn_n[phase] = (nf, nh)
    ar = ar_all[ar_all.backend == ALLREDUCE_BACKEND].reset_index(drop=True)
    excluded[f"allreduce: backend not {ALLREDUCE_BACKEND}"] = int(len(ar_all) - len(ar))
    afit = split(len(ar), seed)
    ar_p = fit_allreduce(ar[afit])
    apred, auncal, ameas = price_allreduce(ar, ar_p), price_allreduce_today(ar, hw), ar.latency_ms.to_numpy(float)
    comps["allreduce"] = {"uncalibrated": errors(auncal[~afit], ameas[~afit]),
                          "heldout": errors(apred[~afit], ameas[~afit]),
                          "leave_one_shape_out": None}  # one (latency, bandwidth) per num_gpus: no shape to leave out

    record = {
        "gpu": gpu,
        "source": _source(moe_all, gemm_all),
        "date": _dt.date.today().isoformat(),
        "seed": seed,
        "fit_rows": {"moe": int(mfit.sum()), "gemm": int(gfit.sum()), "attention_decode": attn_n["decode"][0],
                     "attention_prefill": attn_n["prefill"][0], "allreduce": int(afit.sum())},
        "heldout_rows": {"moe": int(held.sum()), "gemm": int(gheld.sum()), "attention_decode": attn_n["decode"][1],
                         "attention_prefill": attn_n["prefill"][1], "allreduce": int((~afit).sum())},
        "params": {"moe": asdict(moe_p), "gemm": asdict(gemm_p),
                   "attention": {k: asdict(v) for k, v in attn_p.items()}, "allreduce": asdict(ar_p)},
        "uncalibrated_params": {"moe": asdict(today), "gemm": asdict(gemm_today),
                                "attention": asdict(AttentionParams.from_hardware(hw)),
                                "allreduce": {"link_Bps": hw.interconnect_Bps,
                                              "latency_us": hw.collective_latency_us}},
        "heldout_error": {k: comps["moe_decode"]["heldout"][k] for k in ("median", "p90")},
        "components": comps,
        "excluded": excluded,
        "notes": ("MoE rows: bf16, EP = 1, TP <= 8, local expert weights >= 50 MB, routing_faithful; "
                  "uncalibrated = conf/hardware yaml through the same functions (MoE: gamma = rho = 0, "
                  "no activation bytes; GEMM: weights only, no fixed cost). Power-law rows priced as the "
                  "mean over 5 seeded draws of the collector's routing, not its own (unseeded) draws. "
                  f"Attention: bf16 KV, window 0, head_dim 64/128, FA3, a seeded subsample of {attention_rows} rows "
                  "per phase; uncalibrated = today's roofline attention term without projection weights "
                  "(KV bytes / BW vs FLOPs / FLOP/s, + attention_layer_fixed_us); leave-one-shape-out over "
                  "(num_heads, num_kv_heads, head_dim), warm-started from the full fit. All-reduce: vllm_graph "
                  "rows, (latency, bus bandwidth) per num_gpus; uncalibrated = allreduce_s with "
                  "interconnect_gbps and collective_latency_us."),
    }
    if plot_dir is not None:
        record["plots"] = plot(gpu, Path(plot_dir), {
            "moe_decode": (meas[held & decode], pred[held & decode], uncal[held & decode]),
            "moe_larger": (meas[held & ~decode], pred[held & ~decode], uncal[held & ~decode]),
            "gemm_decode": (gmeas[gheld & gdecode], gpred[gheld & gdecode], guncal[gheld & gdecode]),
            "gemm_larger": (gmeas[gheld & ~gdecode], gpred[gheld & ~gdecode], guncal[gheld & ~gdecode]),
            **attn_plots, "allreduce": (ameas[~afit], apred[~afit], auncal[~afit])})
    return record


def _source(moe: pd.DataFrame, gemm: pd.DataFrame) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg_version = version("aiconfigurator-core")
    except PackageNotFoundError:
        pkg_version = None
    return {"package": "aiconfigurator-core", "version": pkg_version, "framework": "vllm",
            "tables": {"moe": _table_note(moe), "gemm": _table_note(gemm)}}


def _table_note(df: pd.DataFrame) -> dict:
    src = df.attrs.get("source", "")
    marker = "aiconfigurator_core/"
    return {"path": src[src.find(marker):] if marker in src else src,
            "version": sorted(map(str, df.version.unique())) if "version" in df else None}


def plot(gpu: str, folder: Path, parts: dict) -> dict:
    """Predicted vs measured (held-out rows), log-log, one PNG per component; returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (meas, pred, uncal) in parts.items():
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.loglog(meas, uncal, ".", ms=2, alpha=0.4, color="0.6", label="uncalibrated")
        ax.loglog(meas, pred, ".", ms=2, alpha=0.6, label="fitted (held-out rows)")
        lo, hi = float(min(meas.min(), pred.min())), float(max(meas.max(), pred.max()))
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.set(xlabel="measured ms", ylabel="predicted ms", title=f"{gpu} {name}")
        ax.legend(loc="upper left", fontsize=8)
        path = folder / f"{gpu}_{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[name] = str(path.relative_to(folder.parent))  # beside the JSON
    return paths


# ---------------------------------------------------------------- predict

def predict(rows: pd.DataFrame, record: dict, seed: int = 0) -> pd.DataFrame:
    """Rows in the table schema (MoE: num_tokens, hidden_size, inter_size, topk, num_experts,
    moe_tp_size, moe_ep_size, distribution; GEMM: m, n, k) with `predicted_ms` beside them. Only
    bfloat16 rows with EP = 1 are priced (what the fit covers); the others get NaN."""
    out = rows.copy()
    dtype = out["dtype"] if "dtype" in out else pd.Series("bfloat16", index=out.index)
    pred = np.full(len(out), np.nan)
    if {"num_experts", "topk", "num_tokens"} <= set(out.columns):
        p = MoEKernelParams(**record["params"]["moe"])
        ok = ((dtype == "bfloat16") & (out.get("moe_ep_size", 1) == 1)).to_numpy()
        sub = out[ok].reset_index(drop=True)
        for col, default in (("moe_tp_size", 1), ("moe_ep_size", 1)):
            if col not in sub:
                sub[col] = default
        if len(sub):
            pred[ok] = price_moe(sub, p, moe_loads(sub, p.block_m, seed))
    elif {"m", "n", "k"} <= set(out.columns):
        ok = (dtype == "bfloat16").to_numpy()
        pred[ok] = price_gemm(out[ok], GemmParams(**record["params"]["gemm"]))
    else:
        raise ValueError("rows: expected MoE columns (num_tokens, num_experts, topk, ...) or GEMM columns (m, n, k), "
                         f"found {list(out.columns)}")
    out["predicted_ms"] = pred
    return out


def write_record(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path
