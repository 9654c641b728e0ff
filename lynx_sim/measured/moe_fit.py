"""Fit the fused-MoE layer term (lynx_sim/cost/moe_layer.py) to measured MoE rows.

Each row is priced from per-expert token counts: the row's own `expert_counts` when it carries
them (one sequence of ints per row, the E / ep experts on the timed GPU: what an executor that
records its routing writes), else the collector's routing rebuilt by `row_counts`
(COLLECTOR_DRAWS seeded draws for power law, the row's latency being the mean over as many
routings; balanced is deterministic). The fit is least squares on log(predicted / measured) over
the given rows (soft-L1 so that a few odd rows do not steer it), from a few cold starts.
"""

from __future__ import annotations

import ast
import zlib
from dataclasses import replace

import numpy as np
import pandas as pd

from ..cost.moe_layer import MoEKernelParams, moe_layer_s, moe_load
from .routing import COLLECTOR_DRAWS, row_counts
from .select import WEIGHT_BYTES, gated, has_counts

BLOCK_M_GRID = (16, 32, 64)
MOE_X = ("fixed_us", "bandwidth_efficiency", "compute_efficiency", "gamma", "rho", "misaligned", "expert_us",
         "block_ns", "k_ns")
MOE_STARTS = [dict(zip(MOE_X, x0)) for x0 in ((20.0, 0.8, 0.5, 0.3, 0.3, 1.5, 0.2, 1.0, 1.0),
                                              (10.0, 0.5, 0.5, 0.5, 0.5, 2.0, 0.5, 0.5, 0.5))]
MOE_BOUNDS = ([0.0, 0.05, 0.05, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [200.0, 1.0, 1.0, 1.0, 1.0, 10.0, 20.0, 1000.0, 100.0])


def _row_rng(seed: int, T: int, E: int, k: int, dist: str) -> np.random.Generator:
    return np.random.default_rng([seed, T, E, k, zlib.crc32(dist.encode())])


def parse_counts(value, n_local: int, tokens: int, where: str) -> np.ndarray:
    """One row's `expert_counts` (a sequence of ints, or its text as a CSV stores it: '[3, 0, 1]'
    or '3 0 1') -> int64 [n_local], checked: n_local entries, each in [0, tokens]."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = (ast.literal_eval(text) if text.startswith(("[", "("))
                     else [int(v) for v in text.replace(",", " ").split()])
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{where}: expert_counts: expected a sequence of integers, found {text[:60]!r}") from e
    arr = np.asarray(value)
    if arr.ndim != 1 or arr.size != n_local:
        raise ValueError(f"{where}: expert_counts: expected {n_local} counts (num_experts / moe_ep_size), "
                         f"found shape {arr.shape}")
    if arr.size and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"{where}: expert_counts: expected integers")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > tokens):
        raise ValueError(f"{where}: expert_counts: expected each count in [0, num_tokens = {tokens}], "
                         f"found {int(arr.min())}..{int(arr.max())}")
    return arr


def moe_loads(df: pd.DataFrame, block_m: int, seed: int = 0, cache: dict | None = None):
    """(distinct, tiles, pairs), each [rows, draws], for every row: from the row's `expert_counts`
    when present (repeated over the draws), else the collector's routing rebuilt by row_counts
    (COLLECTOR_DRAWS draws for power law; balanced repeated). Rebuilt counts are shared by rows with
    the same (T, E, k, distribution, ep)."""
    cache = {} if cache is None else cache
    cols = ["num_tokens", "num_experts", "topk", "distribution"]
    ep = df["moe_ep_size"].to_numpy(int) if "moe_ep_size" in df else np.ones(len(df), int)
    explicit = has_counts(df)
    keys = list(df[cols].itertuples(index=False, name=None))
    out = np.zeros((3, len(keys), COLLECTOR_DRAWS))
    for i, (T, E, k, dist) in enumerate(keys):
        if explicit[i]:
            n_local = -(-int(E) // int(ep[i]))
            counts = parse_counts(df["expert_counts"].iloc[i], n_local, int(T), f"row {i}")
            out[:, i] = np.stack(moe_load(counts, block_m))[:, None]
            continue
        key = (int(T), int(E), int(k), str(dist), int(ep[i]), block_m)
        if key not in cache:
            ck = key[:5]
            if ck not in cache:
                cache[ck] = row_counts(*ck[:4], ep=ck[4], rng=_row_rng(seed, *ck[:4]))  # [draws, E/ep]
            cache[key] = np.stack(moe_load(cache[ck], block_m))  # [3, draws]
        load = cache[key]
        out[:, i] = load if load.shape[1] == COLLECTOR_DRAWS else np.repeat(load, COLLECTOR_DRAWS, axis=1)
    return out[0], out[1], out[2]


class MoERows:
    """The per-row arrays the price needs, computed once (the fit prices the rows many times)."""

    def __init__(self, df: pd.DataFrame):
        self.hidden = df.hidden_size.to_numpy(float)[:, None]
        tp = df.moe_tp_size.to_numpy(float) if "moe_tp_size" in df else np.ones(len(df))
        self.inter = (df.inter_size.to_numpy(float) / tp)[:, None]
        self.gated = gated(df)[:, None]
        dt = df["dtype"] if "dtype" in df else pd.Series("bfloat16", index=df.index)
        self.weight_bytes = dt.map(WEIGHT_BYTES).fillna(2).to_numpy(float)[:, None]
        self.log_meas = np.log(df.latency_ms.to_numpy(float)) if "latency_ms" in df else None

    def take(self, sel) -> "MoERows":
        out = object.__new__(MoERows)
        out.hidden, out.inter, out.gated = self.hidden[sel], self.inter[sel], self.gated[sel]
        out.weight_bytes = self.weight_bytes[sel]
        out.log_meas = None if self.log_meas is None else self.log_meas[sel]
        return out

    def price(self, p: MoEKernelParams, loads) -> np.ndarray:
        """Milliseconds per row: moe_layer_s averaged over the row's draws."""
        t = moe_layer_s(None, self.hidden, self.inter, self.weight_bytes, p, gated=self.gated, load=loads)  # [rows, draws]
        return t.mean(-1) * 1e3


def price_moe(df: pd.DataFrame, p: MoEKernelParams, loads) -> np.ndarray:
    """Milliseconds per row: moe_layer_s averaged over the row's draws."""
    return MoERows(df).price(p, loads)


def fit_moe(df, base: MoEKernelParams, loads, compute_cap: float = 1.0,
            starts=None) -> tuple[MoEKernelParams, float]:
    """Least squares on log(pred / meas) over these rows (a DataFrame or MoERows), starting from
    `base` (whose block_m, block_n and count_activations stay); compute efficiency at most
    `compute_cap`; `misaligned` stays 1 when no row has a misaligned shard (nothing could set it).
    `starts`: starting points ({name: value}; default MOE_STARTS); the lowest cost wins (the max()
    kinks leave local minima). Returns (params, cost)."""
    from scipy.optimize import least_squares

    rows = df if isinstance(df, MoERows) else MoERows(df)
    meas = rows.log_meas
    free = [n for n in MOE_X if n != "misaligned" or (np.remainder(rows.inter, base.align) != 0).any()]
    lo = [MOE_BOUNDS[0][MOE_X.index(n)] for n in free]
    hi = [compute_cap if n == "compute_efficiency" else MOE_BOUNDS[1][MOE_X.index(n)] for n in free]
    fixed = {} if "misaligned" in free else {"misaligned": 1.0}

    def params(x):
        return replace(base, **fixed, **dict(zip(free, map(float, x))))

    best = None
    for start in starts or MOE_STARTS:
        x0 = np.clip([start[n] for n in free], lo, np.array(hi) - 1e-9)
        res = least_squares(lambda x: np.log(rows.price(params(x), loads)) - meas,
                            x0=x0, bounds=(lo, hi), loss="soft_l1", f_scale=0.05)
        if best is None or res.cost < best.cost:
            best = res
    return params(best.x), float(best.cost)


def shape_name(key) -> str:
    return "H{}_I{}_E{}_k{}".format(*map(int, key))


def fit_moe_structure(rows: pd.DataFrame, fit: np.ndarray, today: MoEKernelParams, seed: int, cap: float,
                      block_m_grid=BLOCK_M_GRID, cache: dict | None = None):
    """The tile rows block_m and whether activation traffic is counted, chosen by the fit-half
    cost over the grid (never by held-out error), with the fit at the chosen ones.
    Returns (params, loads of every row for the chosen block_m)."""
    cache = {} if cache is None else cache
    arr = MoERows(rows)
    train = arr.take(fit)
    best = None
    for bm in block_m_grid:
        loads = moe_loads(rows, bm, seed, cache)
        for acts in (False, True):
            p, cost = fit_moe(train, replace(today, block_m=bm, count_activations=acts), tuple(a[fit] for a in loads), cap)
            if best is None or cost < best[1]:
                best = (p, cost, loads)
    return best[0], best[2]


def leave_one_shape_out(rows: pd.DataFrame, fit: np.ndarray, chosen: MoEKernelParams, today: MoEKernelParams,
                        loads, cap: float) -> np.ndarray:
    """Milliseconds per row, each MoE shape (H, I, E, k) priced by a refit on the fit half
    without it (cold starts; block_m and the activation choice kept from the full fit)."""
    arr = MoERows(rows)
    names = np.array([shape_name(key) for key in rows[["hidden_size", "inter_size", "num_experts", "topk"]]
                      .itertuples(index=False, name=None)])
    lo = np.full(len(rows), np.nan)
    base = replace(today, block_m=chosen.block_m, count_activations=chosen.count_activations, block_n=chosen.block_n)
    for name in sorted(set(names)):
        out = names == name
        train = fit & ~out
        p, _ = fit_moe(arr.take(train), base, tuple(a[train] for a in loads), cap)
        lo[out] = arr.take(out).price(p, tuple(a[out] for a in loads))
    return lo
