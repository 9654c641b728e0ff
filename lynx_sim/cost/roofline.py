"""Roofline cost of one decode step, term by term (each testable alone).

Each term is max(bytes / achievable bandwidth, FLOPs / achievable FLOP/s) plus a named fixed
cost. The MoE term is the one policies change: a decode MoE layer streams the weights of every
distinct expert that received at least one token (LYNX.md section 1), so on one GPU

    moe_layer_s = max((distinct x expert_bytes + shared + router bytes) / BW,
                      2 x expert_params x padded_tokens / FLOPS) + moe_layer_fixed + policy overhead

where padded_tokens rounds each expert's tokens up to the kernel's tile rows (`moe_block_m`).
Over several GPUs (`parallel.py`): tensor parallelism splits every matrix and adds an
all-reduce after attention and after the MoE block; expert parallelism gives each rank a block
of experts, adds the all-to-all dispatch and combine, and the slowest rank gates the layer.

Prefill chunks enter through `attn_pairs` and `lm_tokens` of `step` (the serving engine's
mixed batches). Not modelled (named so that results say so): pipeline parallelism,
overlap of communication with compute, CPU scheduling beyond a fixed per-step cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import ModelSpec
from .hardware import HardwareSpec
from .moe_layer import MoEKernelParams, moe_layer_s
from .parallel import Parallel, allreduce_s

KV_CACHE_BYTES = 2  # bf16 KV cache


@dataclass
class StepCost:
    """Seconds spent in each part of one decode step."""

    attention_s: float
    dense_ffn_s: float
    moe_s: float
    lm_head_s: float
    overhead_s: float
    moe_layer_s: np.ndarray  # [L_moe], communication and policy overhead included
    comm_s: float = 0.0  # all-reduces and all-to-alls of the step (inside the terms above: a breakdown)
    policy_s: float = 0.0  # the policy's own routing work (inside moe_s: a breakdown)
    hbm_bytes: float = 0.0  # HBM bytes one GPU reads in the step (weights + KV): bandwidth utilisation

    def bandwidth_utilisation(self, peak_Bps: float) -> float:
        """Bytes read over what the datasheet bandwidth could move in the step's time."""
        return self.hbm_bytes / (self.total_s * peak_Bps)

    @property
    def total_s(self) -> float:
        return self.attention_s + self.dense_ffn_s + self.moe_s + self.lm_head_s + self.overhead_s


class Roofline:
    """Decode-step cost model of one model on `parallel.gpus` GPUs of one kind."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, parallel: Parallel | None = None,
                 policy_overhead_us: float = 0.0):
        self.model, self.hw = model, hw
        self.par = parallel or Parallel()
        self.bw = hw.bandwidth_Bps
        self.moe_bw = hw.moe_bandwidth_Bps  # the MoE kernels' streaming rate (calibrated by the executor)
        self.expert_fps = hw.flops_per_s(model.weight_bytes)
        self.dense_fps = hw.flops_per_s(model.dense_weight_bytes)
        self.link, self.lat = hw.interconnect_Bps, hw.collective_latency_us * 1e-6
        self.policy_overhead_s = policy_overhead_us * 1e-6
        m, tp = model, self.par.tp
        router_params = m.hidden_size * m.num_experts
        shared_params = 3 * m.hidden_size * m.shared_intermediate_size
        # per MoE layer and rank: bytes that do not depend on routing, FLOPs per token of the step
        self._moe_const_bytes = m.shared_expert_bytes / tp + router_params * m.dense_weight_bytes
        self._moe_flops_per_token = 2.0 * shared_params / tp + 2.0 * router_params
        self._moe_params = MoEKernelParams.from_hardware(hw, m.weight_bytes, fixed_us=0.0)  # fixed cost: moe_layers_s

    def _time1(self, bytes_: float, flops: float, fps: float) -> float:
        """One term's roofline, max(bytes / bandwidth, FLOPs / FLOP/s), in plain floats (a step
        prices several; numpy's per-call cost would dominate)."""
        return max(bytes_ / self.bw, flops / fps)

    def _tokens_per_rank(self, batch: int) -> int:
        """Tokens one rank runs attention for: all of them under TP, ceil(B / gpus) under EP's data parallelism."""
        return -(-batch // self.par.gpus) if self.par.expert_parallel else batch

    def _hidden_allreduce_s(self, batch: int) -> float:
        return allreduce_s(batch * self.model.hidden_size * 2, self.par.tp, self.link, self.lat)

    def expert_time_s(self) -> float:
        """Memory-bound time of one more distinct expert in a decode MoE layer (on one rank)."""
        return self.model.expert_bytes / self.par.tp / self.moe_bw

    def padded(self, expert_tokens: np.ndarray, block_m: int | None = None) -> np.ndarray:
        """Each expert's tokens rounded up to the tile rows (`block_m`, default the hardware's
        moe_block_m); an expert with none stays at 0."""
        m = block_m or self.hw.moe_block_m
        return -(-expert_tokens // m) * m

    def _moe_rank_s(self, counts: np.ndarray, tokens) -> np.ndarray:
        """Expert, shared-expert and router work of one rank: counts [L, E_rank] -> [L] seconds."""
        m = self.model
        return moe_layer_s(counts, m.hidden_size, m.expert_intermediate_size / self.par.tp, m.weight_bytes,
                           self._moe_params, extra_bytes=self._moe_const_bytes,
                           extra_flops=self._moe_flops_per_token * tokens)

    def routed_experts_s(self, counts: np.ndarray, block_m: int | None = None) -> np.ndarray:
        """The routed experts alone, per MoE layer on one GPU: what the executor times (align,
        the two grouped GEMMs, the sum over k), counts [L, E] -> [L] seconds: weights of every
        distinct expert streamed once, tile-padded FLOPs, plus the fixed per-layer cost."""
        m = self.model
        distinct = np.count_nonzero(counts, axis=-1)
        flops = m.expert_flops(self.padded(counts, block_m).sum(-1))
        return np.maximum(distinct * m.expert_bytes / self.moe_bw, flops / self.expert_fps) + self.hw.moe_layer_fixed_us * 1e-6

    def _moe_parts(self, expert_tokens: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per MoE layer: (compute seconds, collective seconds) of the rank that gates it, [L] each."""
        m = self.model
        L = expert_tokens.shape[0]
        if not self.par.expert_parallel:  # tensor parallel: one all-reduce of the step's B x H values
            comm = np.full(L, self._hidden_allreduce_s(int(batch)))
            return self._moe_rank_s(expert_tokens, batch), comm
        whole = np.floor(np.full(L, batch))  # tokens in the layer's dispatch messages
        g = self.par.gpus
        if m.num_experts % g:
            raise ValueError(f"parallel.gpus={g} must divide num_experts={m.num_experts} under expert parallelism")
        per_rank = expert_tokens.reshape(expert_tokens.shape[0], g, m.num_experts // g)  # [L, g, E/g]
        local = -(-whole // g)  # _tokens_per_rank, per layer
        compute = np.stack([self._moe_rank_s(per_rank[:, r], local) for r in range(g)], -1)  # [L, g]
        received = per_rank.sum(-1) * (g - 1) / g * m.hidden_size * 2  # [L, g] bytes from other ranks
        comm = 2 * (received / self.link + self.lat)  # dispatch + combine all-to-alls
        gate = (compute + comm).argmax(-1)  # the slowest rank of each layer
        rows = np.arange(len(gate))
        return compute[rows, gate], comm[rows, gate]

    def moe_layers_s(self, expert_tokens: np.ndarray, batch: int, acted: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The price of the step's MoE layers, the one function that sets it (`step` calls it):
        expert_tokens [L, E] (tokens each expert got), `batch` the step's tokens (router and
        shared experts see all of them whatever a policy dropped), `acted`: the policy's rule ran
        (its overhead is paid). Returns (seconds per MoE layer [L], collectives, policy overhead
        and the fixed per-layer cost included; of which collectives [L])."""
        compute, comm = self._moe_parts(expert_tokens, batch)
        return compute + comm + self.hw.moe_layer_fixed_us * 1e-6 + (self.policy_overhead_s if acted else 0.0), comm

    def attention_params(self) -> int:
        """Attention projection weights of one layer (model.py holds the count)."""
        return self.model.attention_params

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one cached token costs one layer (MLA caches the compressed latent)."""
        a = self.model.attention
        if a["kind"] == "mla":
            return (a["kv_lora_rank"] + a["qk_rope_head_dim"]) * KV_CACHE_BYTES
        return 2 * a["num_kv_heads"] * a["head_dim"] * KV_CACHE_BYTES

    def kv_bytes_per_token_rank(self) -> float:
        """KV-cache bytes one cached token costs one layer on one tensor-parallel rank. GQA's KV
        heads are split over the ranks down to one head each: with more ranks than KV heads
        every head is replicated (vLLM's layout), so a rank still holds one. MLA caches one
        latent per token that every rank needs: it is replicated on all of them."""
        a = self.model.attention
        if a["kind"] == "mla":
            return float(self.kv_bytes_per_token())
        return 2 * max(a["num_kv_heads"] / self.par.tp, 1.0) * a["head_dim"] * KV_CACHE_BYTES

    def attention_s(self, batch: int, context_tokens: int, attn_pairs: int | None = None) -> float:
        """All layers' attention for `batch` tokens that read `context_tokens` cached KV entries in
        total and form `attn_pairs` query-key pairs (decode: one pair per cached token, the
        default; a prefill chunk of n tokens after c cached ones: n c + n (n + 1) / 2 pairs, and it
        reads c). Per rank: 1/tp of the weights and query heads and its KV heads
        (`kv_bytes_per_token_rank`), or under EP 1/gpus of the tokens."""
        m, a = self.model, self.model.attention
        tp, share = self.par.tp, self._tokens_per_rank(batch) / batch
        pairs = context_tokens if attn_pairs is None else attn_pairs
        params = self.attention_params()
        bytes_ = params * m.dense_weight_bytes / tp + context_tokens * share * self.kv_bytes_per_token_rank()
        width = a["kv_lora_rank"] + a["qk_rope_head_dim"] if a["kind"] == "mla" else a["head_dim"]
        flops = (2.0 * params * batch * share + 4.0 * a["num_heads"] * width * pairs * share) / tp
        per_layer = self._time1(bytes_, flops, self.dense_fps) + self.hw.attention_layer_fixed_us * 1e-6
        return (per_layer + self._hidden_allreduce_s(batch)) * m.num_layers

    def dense_ffn_s(self, batch: int) -> float:
        """The non-MoE layers' FFNs (split over tp ranks, or data-parallel under EP)."""
        m, tp = self.model, self.par.tp
        n = m.num_layers - m.num_moe_layers
        if n == 0:
            return 0.0
        params = 3 * m.hidden_size * m.dense_intermediate_size
        local = self._tokens_per_rank(batch)
        t = self._time1(params * m.dense_weight_bytes / tp, 2.0 * params * local / tp, self.dense_fps)
        return n * (t + self._hidden_allreduce_s(batch))

    def lm_head_s(self, batch: int) -> float:
        """Vocabulary projection (vocab-parallel under TP; its small gather is not modelled)."""
        m, tp = self.model, self.par.tp
        params = m.hidden_size * m.vocab_size
        local = self._tokens_per_rank(batch)
        return self._time1(params * m.dense_weight_bytes / tp, 2.0 * params * local / tp, self.dense_fps)

    def comm_s(self, batch: int, expert_tokens: np.ndarray, moe_comm: np.ndarray | None = None) -> float:
        """The step's collectives alone (a breakdown: already inside the other terms).
        `moe_comm`: the MoE layers' collective seconds when the caller has them already."""
        m = self.model
        dense_layers = m.num_layers - m.num_moe_layers
        if moe_comm is None:
            moe_comm = self._moe_parts(expert_tokens, batch)[1]
        return float(self._hidden_allreduce_s(batch) * (m.num_layers + dense_layers) + moe_comm.sum())

    def hbm_bytes(self, batch: int, context_tokens: int, expert_tokens: np.ndarray) -> float:
        """Bytes one GPU reads from HBM in the step (weights once each, cached KV), averaged over
        ranks: the numerator of memory-bandwidth utilisation. Activations are left out."""
        m, g, tp = self.model, self.par.gpus, self.par.tp
        distinct = float(np.count_nonzero(expert_tokens))
        experts = (distinct * m.expert_bytes + m.num_moe_layers * m.shared_expert_bytes) / g
        router = m.num_moe_layers * m.hidden_size * m.num_experts * m.dense_weight_bytes
        dense = (m.num_layers * self.attention_params() + (m.num_layers - m.num_moe_layers) * 3 * m.hidden_size
                 * m.dense_intermediate_size + m.hidden_size * m.vocab_size) * m.dense_weight_bytes / tp
        kv = context_tokens * m.num_layers * self.kv_bytes_per_token_rank() / (g if self.par.expert_parallel else 1)
        return experts + router + dense + kv

    def step(self, batch: int, context_tokens: int, expert_tokens: np.ndarray, acted: bool = True,
             attn_pairs: int | None = None, lm_tokens: int | None = None) -> StepCost:
        """Cost of one step of `batch` tokens whose MoE layers received `expert_tokens` [L, E];
        `acted`: the policy's rule ran this step (its overhead is paid). A decode step needs only
        these; a step with prefill chunks also gives `attn_pairs` (attention_s) and `lm_tokens`,
        the sequences whose last token goes through the LM head (default: every token)."""
        moe, comm = self.moe_layers_s(expert_tokens, batch, acted)
        policy = self.policy_overhead_s * self.model.num_moe_layers if acted else 0.0
        return StepCost(self.attention_s(batch, context_tokens, attn_pairs), self.dense_ffn_s(batch), float(moe.sum()),
                        self.lm_head_s(batch if lm_tokens is None else lm_tokens), self.hw.step_overhead_us * 1e-6, moe,
                        comm_s=self.comm_s(batch, expert_tokens, comm), policy_s=policy,
                        hbm_bytes=self.hbm_bytes(batch, context_tokens, expert_tokens))
