"""Price rows given in the measured tables' schema with a calibration record, writing
`predicted_ms` beside them (so anyone can check the model against new measurements).

The kind of table is told by its columns: MoE (num_tokens, num_experts, topk, hidden_size,
inter_size[, moe_tp_size, moe_ep_size, distribution | expert_counts]), GEMM (m, n, k), attention
(num_heads, num_key_value_heads, head_dim, batch_size and kv_len or step for decode, isl for
prefill), all-reduce (num_gpus and message_bytes, or message_elements and dtype). Rows outside
what the calibration covers get NaN: MoE of a weight dtype without a fitted set (bf16: `params.moe`;
fp8, fp8_block: `params_by_dtype`), or EP > 1 without explicit `expert_counts`;
a component the calibration does not fit; GEMM not bf16; attention with a KV cache not bf16, a sliding window or head_dim not 64/128;
all-reduce on a backend other than vllm_graph or a GPU count not fitted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..cost.attention import AttentionParams
from ..cost.gemm import GemmParams
from ..cost.moe_layer import MoEKernelParams
from ..cost.parallel import AllReduceParams
from .aiconfigurator import DTYPE_BYTES
from .allreduce_fit import price_allreduce
from .attention_fit import attention_phase, price_attention
from .gemm_fit import price_gemm
from .moe_fit import moe_loads, price_moe
from .select import ALLREDUCE_BACKEND, attention_shape_ok, column, has_counts


def table_kind(df: pd.DataFrame) -> str:
    cols = set(df.columns)
    if {"num_experts", "topk", "num_tokens"} <= cols:
        return "moe"
    if {"m", "n", "k"} <= cols:
        return "gemm"
    if {"num_heads", "num_key_value_heads", "head_dim", "batch_size"} <= cols:
        return "attention_" + attention_phase(df)
    if "num_gpus" in cols and ("message_bytes" in cols or {"message_elements", "dtype"} <= cols):
        return "allreduce"
    raise ValueError("rows: expected MoE columns (num_tokens, num_experts, topk, ...), GEMM columns (m, n, k), "
                     "attention columns (num_heads, num_key_value_heads, head_dim, batch_size, kv_len or isl) or "
                     f"all-reduce columns (num_gpus, message_bytes), found {list(df.columns)}")


def predict(rows: pd.DataFrame, record: dict, seed: int = 0) -> pd.DataFrame:
    """`rows` with `predicted_ms` beside them (module docstring)."""
    out = rows.copy()
    kind = table_kind(out)
    pred = np.full(len(out), np.nan)
    params = record["params"]
    if kind == "moe":
        sets = {**({"bfloat16": params["moe"]} if params.get("moe") else {}),
                **{dt: v["moe"] for dt, v in (record.get("params_by_dtype") or {}).items()}}
        dtype = column(out, "dtype", "bfloat16")
        for dt, fitted in sets.items():
            p = MoEKernelParams(**fitted)
            ok = ((dtype == dt) & ((column(out, "moe_ep_size", 1) == 1) | has_counts(out))).to_numpy()
            sub = out[ok].reset_index(drop=True)
            for col, default in (("moe_tp_size", 1), ("moe_ep_size", 1), ("distribution", "balanced"), ("dtype", dt)):
                if col not in sub:
                    sub[col] = default
            if len(sub):
                pred[ok] = price_moe(sub, p, moe_loads(sub, p.block_m, seed))
    elif kind == "gemm":
        ok = (column(out, "dtype", "bfloat16") == "bfloat16").to_numpy()
        if ok.any() and params.get("gemm") is not None:
            pred[ok] = price_gemm(out[ok], GemmParams(**params["gemm"]))
    elif kind.startswith("attention_"):
        phase = kind[len("attention_"):]
        ok = attention_shape_ok(out).to_numpy()
        if ok.any() and params.get("attention", {}).get(phase) is not None:
            pred[ok] = price_attention(out[ok], AttentionParams(**params["attention"][phase]), phase)
    elif params.get("allreduce") is not None:
        p = AllReduceParams(**params["allreduce"])
        b = (out.message_bytes if "message_bytes" in out
             else out.message_elements * out["dtype"].map(DTYPE_BYTES)).to_numpy(float)
        g = out.num_gpus.to_numpy(int)
        ok = ((column(out, "backend", ALLREDUCE_BACKEND) == ALLREDUCE_BACKEND).to_numpy() & ~np.isnan(b)
              & np.array([gi == 1 or str(gi) in p.latency_us for gi in g], dtype=bool))
        if ok.any():
            pred[ok] = price_allreduce(pd.DataFrame({"message_bytes": b[ok], "num_gpus": g[ok]}), p)
    out["predicted_ms"] = pred
    return out
