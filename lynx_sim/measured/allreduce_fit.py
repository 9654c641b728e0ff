"""Fit the all-reduce term (`AllReduceParams` / `allreduce_fitted_s` in lynx_sim/cost/parallel.py)
to vLLM's custom all-reduce rows: per num_gpus one latency and one bus bandwidth, least squares on
log(predicted / measured), soft-L1."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..cost.parallel import AllReduceParams, allreduce_fitted_s, allreduce_s


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
    """Milliseconds per row (message_bytes, num_gpus); raises on a num_gpus that was not fitted."""
    return allreduce_fitted_s(df.message_bytes.to_numpy(float), df.num_gpus.to_numpy(), p) * 1e3


def price_allreduce_today(df: pd.DataFrame, hw) -> np.ndarray:
    """`allreduce_s` with the hardware's interconnect and collective latency, milliseconds."""
    return np.array([allreduce_s(b, int(g), hw.interconnect_Bps, hw.collective_latency_us * 1e-6) * 1e3
                     for b, g in zip(df.message_bytes.to_numpy(float), df.num_gpus)])
