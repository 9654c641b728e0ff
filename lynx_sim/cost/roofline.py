"""Roofline cost of one decode step (a walking skeleton; the serving-simulator issue extends it).

Each term is max(bytes / achievable bandwidth, FLOPs / achievable FLOP/s) plus a named fixed
cost. The MoE term is the one policies change: a decode MoE layer streams the weights of every
distinct expert that received at least one token (LYNX.md section 1), so

    moe_layer_s = max((distinct x expert_bytes + shared + router bytes) / BW,
                      2 x expert_params x assigned_tokens / FLOPS) + moe_layer_fixed

Not modelled yet (named so that results say so): tile padding to the kernel's block size,
tensor/expert parallelism, prefill iterations, CPU scheduling beyond a fixed per-step cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import ModelSpec
from .hardware import HardwareSpec

KV_CACHE_BYTES = 2  # bf16 KV cache


@dataclass
class StepCost:
    """Seconds spent in each part of one decode step."""

    attention_s: float
    dense_ffn_s: float
    moe_s: float
    lm_head_s: float
    overhead_s: float
    moe_layer_s: np.ndarray  # [L_moe]

    @property
    def total_s(self) -> float:
        return self.attention_s + self.dense_ffn_s + self.moe_s + self.lm_head_s + self.overhead_s


class Roofline:
    """Decode-step cost model of one model on one GPU."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec):
        self.model, self.hw = model, hw
        self.bw = hw.bandwidth_Bps
        self.expert_fps = hw.flops_per_s(model.weight_bytes)
        self.dense_fps = hw.flops_per_s(model.dense_weight_bytes)

    def _time(self, bytes_, flops, fps) -> np.ndarray:
        return np.maximum(np.asarray(bytes_, dtype=np.float64) / self.bw, np.asarray(flops, dtype=np.float64) / fps)

    def moe_layers_s(self, expert_tokens: np.ndarray, batch: int | None = None) -> np.ndarray:
        """expert_tokens [L, E] (tokens each expert got) -> seconds per MoE layer [L]. `batch`:
        tokens in the step (router and shared experts see all of them, whatever a policy dropped);
        default: assignments / k, exact when no slot was dropped."""
        m = self.model
        distinct = (expert_tokens > 0).sum(-1)
        assigned = expert_tokens.sum(-1)
        tokens = assigned / m.top_k if batch is None else batch
        router_params = m.hidden_size * m.num_experts
        bytes_ = distinct * m.expert_bytes + m.shared_expert_bytes + router_params * m.dense_weight_bytes
        shared_params = 3 * m.hidden_size * m.shared_intermediate_size
        flops = m.expert_flops(assigned) + 2.0 * (shared_params + router_params) * tokens
        return self._time(bytes_, flops, self.expert_fps) + self.hw.moe_layer_fixed_us * 1e-6

    def expert_time_s(self) -> float:
        """Memory-bound time of one more distinct expert in a decode MoE layer."""
        return self.model.expert_bytes / self.bw

    def attention_params(self) -> int:
        """Attention projection weights of one layer."""
        a, H = self.model.attention, self.model.hidden_size
        nh = a["num_heads"]
        if a["kind"] == "mla":
            q = H * nh * a["head_dim"] if not a.get("q_lora_rank") else H * a["q_lora_rank"] + a["q_lora_rank"] * nh * a["head_dim"]
            nope = a["head_dim"] - a["qk_rope_head_dim"]
            kv = H * (a["kv_lora_rank"] + a["qk_rope_head_dim"]) + a["kv_lora_rank"] * nh * (nope + a["v_head_dim"])
            return q + kv + nh * a["v_head_dim"] * H
        hd, nkv = a["head_dim"], a["num_kv_heads"]
        return H * nh * hd + 2 * H * nkv * hd + nh * hd * H

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one cached token costs one layer (MLA caches the compressed latent)."""
        a = self.model.attention
        if a["kind"] == "mla":
            return (a["kv_lora_rank"] + a["qk_rope_head_dim"]) * KV_CACHE_BYTES
        return 2 * a["num_kv_heads"] * a["head_dim"] * KV_CACHE_BYTES

    def attention_s(self, batch: int, context_tokens: int) -> float:
        """All layers' attention for `batch` decode tokens attending to `context_tokens` in total."""
        m, a = self.model, self.model.attention
        params = self.attention_params()
        bytes_ = params * m.dense_weight_bytes + context_tokens * self.kv_bytes_per_token()
        width = a["kv_lora_rank"] + a["qk_rope_head_dim"] if a["kind"] == "mla" else a["head_dim"]
        flops = 2.0 * params * batch + 4.0 * a["num_heads"] * width * context_tokens
        per_layer = float(self._time(bytes_, flops, self.dense_fps)) + self.hw.attention_layer_fixed_us * 1e-6
        return per_layer * m.num_layers

    def dense_ffn_s(self, batch: int) -> float:
        """The non-MoE layers' FFNs."""
        m = self.model
        n = m.num_layers - m.num_moe_layers
        params = 3 * m.hidden_size * m.dense_intermediate_size
        return n * float(self._time(params * m.dense_weight_bytes, 2.0 * params * batch, self.dense_fps))

    def lm_head_s(self, batch: int) -> float:
        m = self.model
        params = m.hidden_size * m.vocab_size
        return float(self._time(params * m.dense_weight_bytes, 2.0 * params * batch, self.dense_fps))

    def step(self, batch: int, context_tokens: int, expert_tokens: np.ndarray) -> StepCost:
        """Cost of one decode step of `batch` tokens whose MoE layers received `expert_tokens` [L, E]."""
        moe = self.moe_layers_s(expert_tokens, batch)
        return StepCost(self.attention_s(batch, context_tokens), self.dense_ffn_s(batch), float(moe.sum()),
                        self.lm_head_s(batch), self.hw.step_overhead_us * 1e-6, moe)
