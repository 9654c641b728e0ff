"""Price one dense GEMM (a linear layer, y[m, n] = x[m, k] W[n, k]^T) on one GPU.

    t = fixed + max(mem, comp, serial) + gamma * min(mem, comp)
    mem    = (n k x weight bytes + (m k + m n) x act bytes) / (peak_BW x bandwidth_efficiency)
    comp   = 2 m n k / (peak_FLOPS x compute_efficiency)
    serial = k_ns x min(k, k_split) + k_tail_ns x max(k - k_split, 0)      (k_split = 0: k x k_ns)

m are the tokens. `serial` is the latency of one thread block walking the whole reduction
dimension: a narrow GEMM (few output tiles, n <= ~2048 at decode) has too few blocks to reach the
HBM bandwidth, and its time grows with k, not with the bytes (H200 table: n = 32 costs as much
per k as n = 1024). Beyond k_split the chain stops growing at k_ns: the library splits the
reduction over more thread blocks (split-K) whose partial sums are added at the end, and only a
small k_tail_ns per element of k remains (H200 table, n <= 256, m <= 256: 2.5 us at k = 32, +1.3
ns per k up to k ~ 2560, then ~6 us flat to k = 16384). The uncalibrated roofline
(`GemmParams.from_hardware`) is the case fixed = gamma = k_ns = 0 with the activations left out
(`act_bytes=0`). `lynx_sim/measured/gemm_fit.py` fits the parameters to NVIDIA
AIConfigurator's measured vLLM GEMM table (bf16 F.linear under CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GemmParams:
    peak_bandwidth_Bps: float  # datasheet HBM bytes/s
    peak_flops: float  # datasheet dense FLOP/s for the weight width
    bandwidth_efficiency: float
    compute_efficiency: float
    fixed_us: float = 0.0  # per GEMM call: launch and the kernel's prologue/epilogue
    gamma: float = 0.0  # overlap: 0 max(mem, comp), 1 mem + comp
    k_ns: float = 0.0  # serial time per element of k (latency-bound narrow GEMMs)
    k_split: int = 0  # k beyond which the reduction is split over blocks (0: never)
    k_tail_ns: float = 0.0  # serial time per element of k beyond k_split

    @classmethod
    def from_hardware(cls, hw, weight_bytes: float) -> "GemmParams":
        """The uncalibrated roofline for dense layers: bandwidth_efficiency, flops_efficiency, no fixed cost."""
        peak = hw.fp8_tflops if weight_bytes == 1 else hw.bf16_tflops
        return cls(hw.hbm_bandwidth_gbps * 1e9, peak * 1e12, hw.bandwidth_efficiency, hw.flops_efficiency)


def gemm_s(m, n, k, weight_bytes: float, p: GemmParams, act_bytes: float = 2.0) -> np.ndarray:
    """Seconds of one [m, k] x [k, n] GEMM (arrays broadcast)."""
    m, n, k = (np.asarray(v, dtype=np.float64) for v in (m, n, k))
    mem = (n * k * weight_bytes + (m * k + m * n) * act_bytes) / (p.peak_bandwidth_Bps * p.bandwidth_efficiency)
    comp = 2.0 * m * n * k / (p.peak_flops * p.compute_efficiency)
    if p.k_split:
        serial = np.minimum(k, p.k_split) * (p.k_ns * 1e-9) + np.maximum(k - p.k_split, 0.0) * (p.k_tail_ns * 1e-9)
    else:
        serial = k * (p.k_ns * 1e-9)
    t = np.maximum(np.maximum(mem, comp), serial)
    return p.fixed_us * 1e-6 + t + p.gamma * np.minimum(mem, comp)
