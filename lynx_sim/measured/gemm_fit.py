"""Fit the dense GEMM term (lynx_sim/cost/gemm.py) to measured GEMM rows (bf16 F.linear under
CUDA graphs): least squares on log(predicted / measured), soft-L1, a few cold starts. The k at
which the library splits the reduction (`k_split`, split-K) is a structural choice made by the
fit-half cost over K_SPLIT_GRID (0: never), like the MoE tile rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ..cost.gemm import GemmParams, gemm_s

GEMM_X = ("fixed_us", "bandwidth_efficiency", "compute_efficiency", "gamma", "k_ns", "k_tail_ns")
GEMM_BOUNDS = ([0.0, 0.05, 0.05, 0.0, 0.0, 0.0], [200.0, 1.0, 1.0, 1.0, 100.0, 100.0])
GEMM_STARTS = ([3.0, 0.8, 0.6, 0.3, 1.0, 0.05], [1.0, 0.5, 0.5, 0.5, 0.5, 0.0])
K_SPLIT_GRID = (0, 2048, 2560, 3072, 4096)


def price_gemm(df: pd.DataFrame, p: GemmParams, act_bytes: float = 2.0) -> np.ndarray:
    """Milliseconds per row (columns m, n, k)."""
    return gemm_s(df.m.to_numpy(float), df.n.to_numpy(float), df.k.to_numpy(float), 2, p, act_bytes) * 1e3


def fit_gemm(df: pd.DataFrame, base: GemmParams) -> tuple[GemmParams, float]:
    """Returns (params, cost); `base` keeps its peaks and k_split (k_tail_ns is free only with a split)."""
    from scipy.optimize import least_squares

    meas = np.log(df.latency_ms.to_numpy(float))
    m, n, k = (df[c].to_numpy(float) for c in "mnk")
    free = [x for x in GEMM_X if x != "k_tail_ns" or base.k_split]
    idx = [GEMM_X.index(x) for x in free]
    bounds = ([GEMM_BOUNDS[0][i] for i in idx], [GEMM_BOUNDS[1][i] for i in idx])

    def params(x):
        return replace(base, **dict(zip(free, map(float, x))))

    fits = [least_squares(lambda x: np.log(gemm_s(m, n, k, 2, params(x)) * 1e3) - meas,
                          x0=[x0[i] for i in idx], bounds=bounds, loss="soft_l1", f_scale=0.05)
            for x0 in GEMM_STARTS]
    res = min(fits, key=lambda r: r.cost)
    return params(res.x), float(res.cost)


def fit_gemm_structure(df: pd.DataFrame, base: GemmParams, grid=K_SPLIT_GRID) -> GemmParams:
    """The fit at the k_split of least fit-half cost (`df` is the fit half)."""
    best = None
    for ks in grid:
        p, cost = fit_gemm(df, replace(base, k_split=int(ks)))
        if best is None or cost < best[1]:
            best = (p, cost)
    return best[0]
