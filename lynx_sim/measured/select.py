"""Which measured rows the fit uses, and the seeded split into a fit half and a held-out half.

MoE rows (`select_moe`): bf16, one kernel, EP = 1, TP <= MAX_TP, local expert weights >= L2_RESIDENT_BYTES
(smaller ones stay in the 50 MB L2 between CUDA-graph replays and measure L2, not HBM), and a
routing we can rebuild (`routing_faithful`, or explicit `expert_counts`). Attention rows
(`select_attention`): bf16 KV cache, no sliding window, head_dim 64 or 128, FlashAttention-3, then a
seeded subsample. All-reduce rows (`select_allreduce`): the CUDA-graph backend. Each selector
returns (rows, {reason: rows left out}), the first reason that applies counting a row. MoE and
attention rows are of one kernel, the one vLLM ran for most of the kept rows on that GPU
(`main_kernel`; H100/H200: Triton fused MoE and FlashAttention-3, the only bf16 kernels there).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DECODE_TOKENS = 256
MAX_TP = 8
L2_RESIDENT_BYTES = 50e6  # H100/H200 L2: 50 MB
WEIGHT_BYTES = {"bfloat16": 2, "fp8": 1, "fp8_block": 1}  # MoE weight dtypes fitted (each its own parameter set)
# (hidden, inter, E, k) of MoE shapes without a gate (ReLU^2: two matrices per expert). Source: the
# packaged model configs of nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B, -Super-120B-A12B (latent 1024),
# -Ultra-550B-A55B (latent 2048), mlp_hidden_act relu2. Every other shape in the tables is gated.
NON_GATED_SHAPES = {(2688, 1856, 128, 6), (1024, 2688, 512, 22), (2048, 5120, 512, 22)}
SHAPE = ["hidden_size", "inter_size", "num_experts", "topk"]
ATTN_SHAPE = ["num_heads", "num_key_value_heads", "head_dim"]
ATTN_HEAD_DIMS = (64, 128)
ATTN_MAX_ROWS = 4000  # seeded subsample of each attention table after selection (fit time)
ALLREDUCE_BACKEND = "vllm_graph"


def split(n: int, seed: int) -> np.ndarray:
    """Boolean [n]: True for the fit half, from a seeded permutation (the rest is held out)."""
    fit = np.zeros(n, dtype=bool)
    fit[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    return fit


def gated(df: pd.DataFrame) -> np.ndarray:
    keys = df[SHAPE].itertuples(index=False, name=None)
    return np.array([tuple(map(int, key)) not in NON_GATED_SHAPES for key in keys], dtype=bool)


def expert_weight_bytes(df: pd.DataFrame) -> np.ndarray:
    """Bytes of all local expert weights on the timed GPU (E / ep experts, I / tp wide)."""
    mats = np.where(gated(df), 3, 2)
    return (df.num_experts / df.moe_ep_size * mats * df.hidden_size * df.inter_size / df.moe_tp_size
            * df.dtype.map(WEIGHT_BYTES).fillna(2)).to_numpy(float)


def has_counts(df: pd.DataFrame) -> np.ndarray:
    """Boolean [rows]: the row carries explicit per-expert token counts (`expert_counts`)."""
    if "expert_counts" not in df:
        return np.zeros(len(df), dtype=bool)
    return np.array([v is not None and not (np.isscalar(v) and pd.isna(v)) for v in df.expert_counts], dtype=bool)


def column(df: pd.DataFrame, name: str, default) -> pd.Series:
    """df[name], or `default` on every row for a table without that column (older versions)."""
    return df[name] if name in df else pd.Series(default, index=df.index)


def attention_shape_ok(df: pd.DataFrame) -> pd.Series:
    """Attention rows of the kind the term is fitted on: bf16 KV cache, no sliding window, head_dim 64 or 128."""
    return ((column(df, "kv_cache_dtype", "bfloat16") == "bfloat16") & (column(df, "window_size", 0) == 0)
            & df.head_dim.isin(ATTN_HEAD_DIMS))


def main_kernel(df: pd.DataFrame) -> str | None:
    """The kernel_source of most of these rows (ties: the first by name): the kernel vLLM selects
    on this GPU for them; one kernel is fitted at a time. None without the column or rows."""
    if "kernel_source" not in df or not len(df):
        return None
    counts = df.kernel_source.value_counts()
    return str(sorted(counts[counts == counts.max()].index)[0])


def _kernel_reason(df: pd.DataFrame, kernel: str | None) -> dict:
    """{"kernel_source not <kernel>": rows of another kernel}; {} for a table without kernels."""
    if kernel is None or "kernel_source" not in df:
        return {}
    return {f"kernel_source not {kernel}": df.kernel_source != kernel}


def _first_reason(df: pd.DataFrame, reasons: dict, prefix: str = "") -> tuple[pd.DataFrame, dict]:
    keep, excluded = pd.Series(True, index=df.index), {}
    for reason, out in reasons.items():
        excluded[prefix + reason] = int((keep & out).sum())
        keep &= ~out
    return df[keep].reset_index(drop=True), excluded


def select_moe(df: pd.DataFrame, dtype: str = "bfloat16", prefix: str = "") -> tuple[pd.DataFrame, dict]:
    """The MoE rows of one weight dtype fitted and evaluated, and {reason: rows left out} (first
    reason that applies; keys start with `prefix`). A row with `expert_counts` needs no rebuilt
    routing, so `routing_faithful` does not drop it."""
    faithful = df.get("routing_faithful", pd.Series(True, index=df.index)).astype(bool) | has_counts(df)
    same = df.dtype == dtype
    rules = {
        "expert parallel (moe_ep_size > 1)": df.moe_ep_size > 1,
        f"moe_tp_size > {MAX_TP}": df.moe_tp_size > MAX_TP,
        "routing_faithful == False": ~faithful,
        f"local expert weights < {L2_RESIDENT_BYTES / 1e6:.0f} MB (L2-resident)":
            pd.Series(expert_weight_bytes(df) < L2_RESIDENT_BYTES, index=df.index),
    }
    kept = same.copy()
    for out in rules.values():
        kept &= ~out
    kernel = main_kernel(df[kept])  # the kernel of most rows the other rules keep (EP rows may run another)
    return _first_reason(df, {f"dtype not {dtype}": ~same, **_kernel_reason(df, kernel), **rules}, prefix)


def select_gemm(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    return _first_reason(df, {"dtype not bfloat16": df.dtype != "bfloat16"}, "gemm: ")


def select_attention(df: pd.DataFrame, phase: str, seed: int = 0,
                     max_rows: int | None = ATTN_MAX_ROWS) -> tuple[pd.DataFrame, dict]:
    """Attention rows fitted and evaluated ({reason: rows left out}, first reason that applies):
    bf16 KV cache, no sliding window, head_dim 64 or 128 (the dense models we simulate; 192/256/512
    are MLA-like or rare and run other kernel paths), the kernel vLLM ran for most of those rows
    (`main_kernel`: FlashAttention-3 on H100/H200, FlashAttention-2 on A100, FlashInfer TRT-LLM on
    B200), then a seeded subsample of at most `max_rows` rows. A table without `kv_cache_dtype` or
    `window_size` (older versions) is taken as bf16 KV without a window."""
    kernel = main_kernel(df[attention_shape_ok(df)])
    rows, excluded = _first_reason(df, {
        "kv_cache_dtype not bfloat16": column(df, "kv_cache_dtype", "bfloat16") != "bfloat16",
        "window_size != 0 (sliding window)": column(df, "window_size", 0) != 0,
        f"head_dim not in {ATTN_HEAD_DIMS}": ~df.head_dim.isin(ATTN_HEAD_DIMS),
        **_kernel_reason(df, kernel),
    }, f"attention_{phase}: ")
    if max_rows is not None and len(rows) > max_rows:
        pick = np.sort(np.random.default_rng([seed, 1 if phase == "decode" else 2]).permutation(len(rows))[:max_rows])
        excluded[f"attention_{phase}: not in the seeded subsample of {max_rows}"] = int(len(rows) - max_rows)
        rows = rows.iloc[pick].reset_index(drop=True)
    return rows, excluded


def select_allreduce(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    return _first_reason(df, {f"backend not {ALLREDUCE_BACKEND}": df.backend != ALLREDUCE_BACKEND}, "allreduce: ")
