"""Price one attention layer's kernel on one GPU: the KV-cache update and the attention kernel
(vLLM's FlashAttention-3), no QKV or output projection, no RoPE.

    t = fixed + max(mem, comp) + gamma * min(mem, comp) + sequences x (seq_us + kv_heads x seq_head_us)

    mem  = (kv_tokens x 2 x kv_heads x head_dim x kv_bytes
            + [count_queries] query_tokens x 2 x heads x head_dim x 2) / (peak_BW x bandwidth_efficiency)
    comp = 4 x heads x head_dim x pairs / (peak_FLOPS x compute_efficiency)

Decode (`attention_decode_s`): one query token per sequence; kv_tokens = the sum over the batch
of each sequence's cached positions (the new token's included), pairs = kv_tokens. Prefill
(`attention_prefill_s`): n query tokens per sequence after c cached ones (causal):
pairs = n c + n (n + 1) / 2 per sequence, kv_tokens = c + n per sequence (the cached KV read
and the new KV written to the cache). `count_queries` adds the bf16 query read and output write
(query_tokens = batch at decode, batch x n at prefill): negligible at decode, what the measured
prefill rows' memory side is made of (the fit picks it by the fit-half cost). heads and
kv_heads are those on this GPU (under tensor parallelism num_heads / tp and max(num_kv_heads / tp, 1): replicated KV heads, as
`Roofline.kv_bytes_per_token_rank`).

`fixed` is the kernel floor (launch, the split-KV combine); `seq_us` a cost per sequence of the
batch (per-sequence metadata, page-table walk and the split-KV reduction grow with the batch even
when every sequence is short); gamma in [0, 1] how little memory and compute overlap (0: the
roofline's max, 1: they add). With fixed = attention_layer_fixed_us, seq_us = seq_head_us =
gamma = 0, no query bytes and the hardware's factors (`AttentionParams.from_hardware`) this is the uncalibrated roofline's attention kernel term
without the projection weights. `lynx_sim/measured/attention_fit.py` fits the parameters to NVIDIA
AIConfigurator's measured vLLM attention tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACT_BYTES = 2  # bf16 queries and outputs


@dataclass(frozen=True)
class AttentionParams:
    peak_bandwidth_Bps: float  # datasheet HBM bytes/s
    peak_flops: float  # datasheet dense bf16 FLOP/s
    bandwidth_efficiency: float
    compute_efficiency: float
    fixed_us: float = 0.0  # per layer call: the kernel floor
    gamma: float = 0.0  # overlap: 0 max(mem, comp), 1 mem + comp
    seq_us: float = 0.0  # per sequence of the batch
    seq_head_us: float = 0.0  # per sequence and KV head (one work unit of the kernel's grid)
    count_queries: bool = False  # add the query read and output write (2 x heads x head_dim x 2 bytes a query token)

    @classmethod
    def from_hardware(cls, hw) -> "AttentionParams":
        """The uncalibrated roofline: bandwidth_efficiency, flops_efficiency on the bf16 peak,
        attention_layer_fixed_us, no overlap or per-sequence term."""
        return cls(hw.hbm_bandwidth_gbps * 1e9, hw.bf16_tflops * 1e12, hw.bandwidth_efficiency,
                   hw.flops_efficiency, fixed_us=hw.attention_layer_fixed_us)


def attention_s(kv_tokens, pairs, sequences, heads, kv_heads, head_dim, kv_bytes, p: AttentionParams,
                query_tokens=0.0) -> np.ndarray:
    """Seconds of one attention layer's kernel (module docstring); arrays broadcast. Plain numbers
    give a plain float (the simulator prices a step with them: numpy's per-call cost would dominate),
    bit-identical to the array result."""
    args = (kv_tokens, pairs, sequences, heads, kv_heads, head_dim, query_tokens)
    if all(isinstance(v, (int, float)) for v in args):
        kv_tokens, pairs, sequences, heads, kv_heads, head_dim, query_tokens = map(float, args)
        hi, lo = max, min
    else:
        kv_tokens, pairs, sequences, heads, kv_heads, head_dim, query_tokens = (
            np.asarray(v, dtype=np.float64) for v in args)
        hi, lo = np.maximum, np.minimum
    bytes_ = kv_tokens * (2.0 * kv_heads * head_dim * kv_bytes)
    if p.count_queries:
        bytes_ = bytes_ + query_tokens * (2.0 * heads * head_dim * ACT_BYTES)
    mem = bytes_ / (p.peak_bandwidth_Bps * p.bandwidth_efficiency)
    comp = 4.0 * heads * head_dim * pairs / (p.peak_flops * p.compute_efficiency)
    t = hi(mem, comp) + p.gamma * lo(mem, comp)
    return t + (p.fixed_us + sequences * (p.seq_us + kv_heads * p.seq_head_us)) * 1e-6


def attention_decode_s(kv_lens, heads, kv_heads, head_dim, kv_bytes, p: AttentionParams, batch=None) -> np.ndarray:
    """One decode step (one query token per sequence). `batch=None`: `kv_lens` [..., B] are each
    sequence's cached positions (the new token included), summed over the last axis, B
    sequences; else `kv_lens` is already that sum over `batch` sequences (arrays broadcast)."""
    if batch is None:
        kv = np.asarray(kv_lens, dtype=np.float64)
        kv, batch = kv.sum(-1), kv.shape[-1]
    else:
        kv = kv_lens if isinstance(kv_lens, (int, float)) else np.asarray(kv_lens, dtype=np.float64)
    return attention_s(kv, kv, batch, heads, kv_heads, head_dim, kv_bytes, p, query_tokens=batch)


def attention_prefill_s(query_tokens, cached, batch, heads, kv_heads, head_dim, kv_bytes,
                        p: AttentionParams) -> np.ndarray:
    """`batch` sequences of `query_tokens` new tokens each after `cached` ones (causal)."""
    n, c = np.asarray(query_tokens, dtype=np.float64), np.asarray(cached, dtype=np.float64)
    b = np.asarray(batch, dtype=np.float64)
    pairs = n * c + n * (n + 1) / 2
    return attention_s(b * (c + n), b * pairs, b, heads, kv_heads, head_dim, kv_bytes, p, query_tokens=b * n)
