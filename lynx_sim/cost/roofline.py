"""Cost of one model step on `parallel.gpus` GPUs, term by term (each testable alone).

Every term goes through one pricing function in this package, with one parameter set per term:

    attention   per layer: QKV and output projections (gemm.py) + the attention kernel
                (attention.py: decode sequences, and prefill chunks in a serving step)
    MoE         per MoE layer: the fused routed-expert kernel from each expert's token count
                (moe_layer.py: LYNX.md section 1, weights of every distinct expert streamed)
                + router and shared-expert GEMMs (gemm.py)
    dense FFN   gate/up and down GEMMs of the non-MoE layers (gemm.py)
    LM head     one vocabulary-parallel GEMM (gemm.py)
    collectives tensor parallelism: an all-reduce after attention and after each FFN/MoE block
                (parallel.py); expert parallelism: all-to-all dispatch and combine, the slowest
                rank gates the layer
    overhead    a fixed per-step cost (CPU scheduling; assumed)

The parameter sets come from the hardware's cost calibration (`CostCalibration`, fitted to
measured kernel times: conf/calibration/<gpu>.json) where it has one, else from the datasheet
peaks with the hardware yaml's efficiency factors and fixed costs (the uncalibrated roofline,
its terms assumed). `assumptions()` names what the prices rest on. Not modelled (named so that
results say so): pipeline parallelism, overlap of communication with compute, of shared experts
with routed ones, CPU scheduling beyond a fixed per-step cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..model import ModelSpec
from .attention import AttentionParams, attention_decode_s
from .attention import attention_s as attention_kernel_s
from .gemm import GemmParams, gemm_s
from .hardware import HardwareSpec
from .moe_layer import MoEKernelParams, moe_layer_s
from .parallel import Parallel, allreduce_fitted_s, allreduce_s

KV_CACHE_BYTES = 2  # bf16 KV cache
FIT_WEIGHT_BYTES = 2  # the calibrations are fitted on bf16 kernels


@dataclass(frozen=True)
class PrefillWork:
    """The prefill chunks of a serving step: `seqs` sequences computing `tokens` new tokens in
    all after `cached` cached ones in all, forming `pairs` causal query-key pairs."""

    seqs: int
    tokens: int
    cached: int
    pairs: int


@dataclass
class StepCost:
    """Seconds spent in each part of one step."""

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


def _for_width(p, weight_bytes: float, hw: HardwareSpec):
    """A bf16-fitted parameter set for weights of another width: the peak of the MMA that width
    runs on (fp8 tensor cores for 1-byte weights; bf16 for 2-byte and 4-bit weight-only formats,
    dequantised before a bf16 MMA), the fitted efficiencies kept (an assumption `assumptions` names).
    The bf16 Triton MoE kernel's slowdown on shards not a multiple of 16 (`misaligned`) is not
    carried over: other formats' kernels pad each partition."""
    peak = (hw.fp8_tflops if weight_bytes == 1 else hw.bf16_tflops) * 1e12
    if p.peak_flops != peak:
        p = replace(p, peak_flops=peak)
    if weight_bytes != FIT_WEIGHT_BYTES and getattr(p, "misaligned", 1.0) != 1.0:
        p = replace(p, misaligned=1.0)
    return p


def moe_params(hw: HardwareSpec, weight_bytes: float) -> MoEKernelParams:
    """The fused-MoE parameters for this hardware and expert weight width: its calibration's fit
    (1-byte experts: the fit of the block-scaled fp8 kernel where the calibration has one) where it
    has one, else the uncalibrated roofline's."""
    cal = hw.calibration
    if cal is not None and weight_bytes == 1 and "fp8_block" in cal.moe_by_dtype:
        return cal.moe_by_dtype["fp8_block"]
    p = cal.moe if cal is not None and cal.moe is not None else MoEKernelParams.from_hardware(hw, weight_bytes)
    return _for_width(p, weight_bytes, hw)


def expert_stream_s(hidden: float, inter: float, weight_bytes: float, p: MoEKernelParams) -> float:
    """Time of one more distinct expert (holding one token) in a decode MoE layer: the layer's
    price with two such experts minus its price with one (moe_layer.py prices both)."""
    one, two = np.array([[1, 0]]), np.array([[1, 1]])
    return float(moe_layer_s(two, hidden, inter, weight_bytes, p)[0] - moe_layer_s(one, hidden, inter, weight_bytes, p)[0])


class Roofline:
    """Step cost model of one model on `parallel.gpus` GPUs of one kind (module docstring)."""

    def __init__(self, model: ModelSpec, hw: HardwareSpec, parallel: Parallel | None = None,
                 policy_overhead_us: float = 0.0):
        self.model, self.hw = model, hw
        self.par = parallel or Parallel()
        self.cal = hw.calibration
        self.link, self.lat = hw.interconnect_Bps, hw.collective_latency_us * 1e-6
        self.policy_overhead_s = policy_overhead_us * 1e-6
        m, cal = model, self.cal
        self.moe_params = moe_params(hw, m.weight_bytes)
        gemm = cal.gemm if cal is not None and cal.gemm is not None else None
        # uncalibrated GEMMs: weights only (act_bytes 0), as the roofline always priced them
        self.gemm_params = _for_width(gemm, m.dense_weight_bytes, hw) if gemm else GemmParams.from_hardware(
            hw, m.dense_weight_bytes)
        self._act_bytes = 2.0 if gemm else 0.0
        today = AttentionParams.from_hardware(hw)
        self.attn_decode = cal.attention_decode if cal is not None and cal.attention_decode is not None else today
        self.attn_prefill = cal.attention_prefill if cal is not None and cal.attention_prefill is not None else today
        # a mixed serving step runs decode and prefill in one varlen kernel call: one floor per layer
        self._attn_prefill_joined = replace(self.attn_prefill, fixed_us=0.0)
        self._batch_terms: dict = {}

    # ------------------------------------------------------------ building blocks

    def _gemm(self, m: float, n: float, k: float, weight_bytes: float | None = None) -> float:
        """One dense GEMM of m tokens through an [k -> n] weight on one rank (default width: the dense weights')."""
        wb = self.model.dense_weight_bytes if weight_bytes is None else weight_bytes
        return float(gemm_s(m, n, k, wb, self.gemm_params, self._act_bytes))

    def _allreduce(self, message_bytes: float, gpus: int) -> float:
        """One all-reduce over `gpus` ranks: the calibration's fit for that group size, else the ring model."""
        if gpus == 1:
            return 0.0
        ar = self.cal.allreduce if self.cal is not None else None
        if ar is not None and str(gpus) in ar.latency_us:
            return float(allreduce_fitted_s(message_bytes, gpus, ar))
        return allreduce_s(message_bytes, gpus, self.link, self.lat)

    def _tokens_per_rank(self, batch: int) -> int:
        """Tokens one rank runs attention for: all of them under TP, ceil(B / gpus) under EP's data parallelism."""
        return -(-batch // self.par.gpus) if self.par.expert_parallel else batch

    def _hidden_allreduce_s(self, batch: int) -> float:
        """The all-reduce of the step's B x H bf16 hidden states over the tensor-parallel ranks."""
        return self._batch(batch)["allreduce"]

    def expert_time_s(self) -> float:
        """Time of one more distinct expert in a decode MoE layer on one rank (`expert_stream_s`)."""
        m = self.model
        return expert_stream_s(m.hidden_size, m.expert_intermediate_size / self.par.tp, m.weight_bytes, self.moe_params)

    def padded(self, expert_tokens: np.ndarray, block_m: int | None = None) -> np.ndarray:
        """Each expert's tokens rounded up to the tile rows (`block_m`, default the MoE kernel's);
        an expert with none stays at 0."""
        m = block_m or self.moe_params.block_m
        return -(-expert_tokens // m) * m

    # ------------------------------------------------------------ MoE

    def routed_experts_s(self, counts: np.ndarray, block_m: int | None = None) -> np.ndarray:
        """The routed experts alone, per MoE layer on one GPU: what the executor times (align,
        the two grouped GEMMs, the sum over k), counts [L, E] -> [L] seconds (moe_layer.py; tile
        rows `block_m` as the kernel ran, default the calibration's)."""
        m = self.model
        p = self.moe_params if block_m is None else replace(self.moe_params, block_m=int(block_m))
        return moe_layer_s(counts, m.hidden_size, m.expert_intermediate_size / self.par.tp, m.weight_bytes, p)

    def _moe_side_s(self, tokens: int) -> float:
        """Router and shared-expert GEMMs of one MoE layer on one rank (not overlapped with the routed experts)."""
        m, tp = self.model, self.par.tp
        t = self._gemm(tokens, m.num_experts, m.hidden_size)  # the router, replicated
        if m.shared_intermediate_size:  # at the experts' weight width (ModelSpec.shared_expert_bytes)
            t += self._gemm(tokens, 2 * m.shared_intermediate_size / tp, m.hidden_size, m.weight_bytes)
            t += self._gemm(tokens, m.hidden_size, m.shared_intermediate_size / tp, m.weight_bytes)
        return t

    def _moe_parts(self, expert_tokens: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Per MoE layer: (compute seconds, collective seconds) of the rank that gates it, [L] each."""
        m = self.model
        L = expert_tokens.shape[0]
        if not self.par.expert_parallel:  # tensor parallel: one all-reduce of the step's B x H values
            comm = np.full(L, self._hidden_allreduce_s(int(batch)))
            return self.routed_experts_s(expert_tokens) + self._batch(batch)["moe_side"], comm
        g = self.par.gpus
        if m.num_experts % g:
            raise ValueError(f"parallel.gpus={g} must divide num_experts={m.num_experts} under expert parallelism")
        per_rank = expert_tokens.reshape(L, g, m.num_experts // g)  # [L, g, E/g]
        compute = self.routed_experts_s(per_rank)  # [L, g]: each rank's experts
        compute = compute + self._batch(batch)["moe_side"]
        received = per_rank.sum(-1) * (g - 1) / g * m.hidden_size * 2  # [L, g] bytes from other ranks
        comm = 2 * (received / self.link + self.lat)  # dispatch + combine all-to-alls
        gate = (compute + comm).argmax(-1)  # the slowest rank of each layer
        rows = np.arange(len(gate))
        return compute[rows, gate], comm[rows, gate]

    def moe_layers_s(self, expert_tokens: np.ndarray, batch: int, acted: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The price of the step's MoE layers, the one function that sets it (`step` calls it):
        expert_tokens [L, E] (tokens each expert got), `batch` the step's tokens (router and
        shared experts see all of them whatever a policy dropped), `acted`: the policy's rule ran
        (its overhead is paid). Returns (seconds per MoE layer [L], collectives and policy
        overhead included; of which collectives [L])."""
        compute, comm = self._moe_parts(expert_tokens, batch)
        return compute + comm + (self.policy_overhead_s if acted else 0.0), comm

    # ------------------------------------------------------------ attention and dense layers

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

    def _kernel_heads(self) -> tuple[float, float, float]:
        """(query heads, KV heads, head width) of the attention kernel on one rank. MLA attends over
        its latent (kv_lora_rank + rope dims), cached once per token: half a 'KV head' of that width
        prices its bytes (the kernel's K and V are the same latent)."""
        a, tp = self.model.attention, self.par.tp
        if a["kind"] == "mla":
            return a["num_heads"] / tp, 0.5, a["kv_lora_rank"] + a["qk_rope_head_dim"]
        return a["num_heads"] / tp, max(a["num_kv_heads"] / tp, 1.0), a["head_dim"]

    def _projections_s(self, tokens: int) -> float:
        """One layer's attention projections on one rank. GQA: the fused QKV GEMM and the output
        GEMM; MLA: its low-rank projections as one GEMM from the hidden size (an approximation)."""
        m, a, tp = self.model, self.model.attention, self.par.tp
        H = m.hidden_size
        if a["kind"] == "mla":
            return self._gemm(tokens, m.attention_params / (H * tp), H)
        heads, kv_heads, hd = self._kernel_heads()
        return self._gemm(tokens, (heads + 2 * kv_heads) * hd, H) + self._gemm(tokens, H, heads * hd)

    def _prefill_heads(self) -> tuple[float, float, float]:
        """(query heads, KV heads, head width) of the prefill kernel on one rank: GQA's as decode.
        MLA's prefill decompresses the latent and runs multi-head attention, qk width head_dim and
        v width v_head_dim: 2 h (qk + v) FLOPs per pair, a width of (qk + v) / 2, over the cached
        latent (KV heads chosen so that the KV bytes are the latent's)."""
        a, tp = self.model.attention, self.par.tp
        if a["kind"] != "mla":
            return self._kernel_heads()
        width = (a["head_dim"] + a["v_head_dim"]) / 2
        return a["num_heads"] / tp, (a["kv_lora_rank"] + a["qk_rope_head_dim"]) / (2 * width), width

    def _on_rank(self, seqs: int) -> float:
        """Sequences of `seqs` that the busiest rank attends for: all under TP, ceil(seqs / gpus)
        under EP's data-parallel attention (a sequence stays whole on one rank)."""
        return float(-(-seqs // self.par.gpus)) if self.par.expert_parallel else float(seqs)

    def attention_s(self, batch: int, context_tokens: int, prefill: PrefillWork | None = None) -> float:
        """All layers' attention for a step of `batch` tokens: the decode sequences (batch minus
        the prefill tokens) read `context_tokens` cached KV entries in total; `prefill`, a serving
        step's chunks. Per rank: 1/tp of the weights and query heads and its KV heads
        (`kv_bytes_per_token_rank`), or under EP the busiest rank's share of whole sequences
        (their average sizes). A mixed step is one kernel call: one floor per layer."""
        m = self.model
        decode_seqs = batch - (prefill.tokens if prefill else 0)
        t = self._batch(batch)["projections"]
        if decode_seqs:
            heads, kv_heads, width = self._kernel_heads()
            seqs = self._on_rank(decode_seqs)
            t += float(attention_decode_s(context_tokens * (seqs / decode_seqs), heads, kv_heads, width,
                                          KV_CACHE_BYTES, self.attn_decode, batch=seqs))
        if prefill is not None and prefill.tokens:
            heads, kv_heads, width = self._prefill_heads()
            share = self._on_rank(prefill.seqs) / prefill.seqs
            p = self._attn_prefill_joined if decode_seqs else self.attn_prefill
            t += float(attention_kernel_s((prefill.cached + prefill.tokens) * share, prefill.pairs * share,
                                          prefill.seqs * share, heads, kv_heads, width, KV_CACHE_BYTES,
                                          p, query_tokens=prefill.tokens * share))
        return (t + self._hidden_allreduce_s(batch)) * m.num_layers

    def _batch(self, batch: int) -> dict:
        """The terms that depend on the step's token count alone (cached: a decode batch repeats)."""
        got = self._batch_terms.get(batch)
        if got is None:
            m, tp = self.model, self.par.tp
            local = self._tokens_per_rank(batch)
            dense = 0.0
            if m.num_layers > m.num_moe_layers:
                I = m.dense_intermediate_size / tp
                dense = self._gemm(local, 2 * I, m.hidden_size) + self._gemm(local, m.hidden_size, I)
            got = {"projections": self._projections_s(local), "dense_ffn": dense,
                   "allreduce": self._allreduce(batch * m.hidden_size * 2, tp),
                   "lm_head": self._gemm(local, m.vocab_size / tp, m.hidden_size),
                   "moe_side": self._moe_side_s(batch if not self.par.expert_parallel else local)}
            if len(self._batch_terms) > 4096:
                self._batch_terms.clear()
            self._batch_terms[batch] = got
        return got

    def dense_ffn_s(self, batch: int) -> float:
        """The non-MoE layers' FFNs (split over tp ranks, or data-parallel under EP)."""
        m = self.model
        n = m.num_layers - m.num_moe_layers
        return n * (self._batch(batch)["dense_ffn"] + self._hidden_allreduce_s(batch)) if n else 0.0

    def lm_head_s(self, tokens: int) -> float:
        """Vocabulary projection of `tokens` sequences (vocab-parallel under TP; its small gather is not modelled)."""
        return self._batch(tokens)["lm_head"]

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
        dense = (m.num_layers * m.attention_params + (m.num_layers - m.num_moe_layers) * 3 * m.hidden_size
                 * m.dense_intermediate_size + m.hidden_size * m.vocab_size) * m.dense_weight_bytes / tp
        kv = context_tokens * m.num_layers * self.kv_bytes_per_token_rank() / (g if self.par.expert_parallel else 1)
        return experts + router + dense + kv

    def step(self, batch: int, context_tokens: int, expert_tokens: np.ndarray, acted: bool = True,
             lm_tokens: int | None = None, prefill: PrefillWork | None = None) -> StepCost:
        """Cost of one step of `batch` tokens whose MoE layers received `expert_tokens` [L, E];
        `acted`: the policy's rule ran this step (its overhead is paid). A decode step needs only
        these; a serving step with prefill chunks also gives `prefill` (attention_s) and
        `lm_tokens`, the sequences whose last token goes through the LM head (default: every token)."""
        moe, comm = self.moe_layers_s(expert_tokens, batch, acted)
        policy = self.policy_overhead_s * self.model.num_moe_layers if acted else 0.0
        return StepCost(self.attention_s(batch, context_tokens, prefill), self.dense_ffn_s(batch), float(moe.sum()),
                        self.lm_head_s(batch if lm_tokens is None else lm_tokens), self.hw.step_overhead_us * 1e-6, moe,
                        comm_s=self.comm_s(batch, expert_tokens, comm), policy_s=policy,
                        hbm_bytes=self.hbm_bytes(batch, context_tokens + (prefill.cached if prefill else 0),
                                                 expert_tokens))

    # ------------------------------------------------------------ what the prices rest on

    def assumptions(self) -> list[str]:
        """Every term of this model that is assumed or approximated rather than fitted to
        measurements of this GPU, one line each (summaries list them)."""
        hw, m, cal, out = self.hw, self.model, self.cal, []
        if cal is None:
            out.append(f"uncalibrated roofline on {hw.name}: efficiency factors and fixed costs from the hardware "
                       f"yaml, assumed unless measured ({', '.join(hw.assumed) or 'none'} assumed)")
        else:
            out += [f"{c} priced uncalibrated (calibration {cal.path} does not fit it)" for c in cal.missing]
            if m.weight_bytes == 1 and "fp8_block" in cal.moe_by_dtype:
                out.append("fp8 experts priced with the fitted block-scaled fp8 MoE kernel (per-tensor fp8 runs "
                           "another kernel)")
            elif m.weight_bytes != FIT_WEIGHT_BYTES:
                out.append(f"experts of {m.weight_bytes:g} bytes per weight priced with the bf16 MoE fit's "
                           "efficiencies on the peak of the MMA they run on (no fit for that format)")
            if m.dense_weight_bytes != FIT_WEIGHT_BYTES:
                out.append(f"dense weights of {m.dense_weight_bytes:g} bytes priced with the bf16 GEMM fit's "
                           "efficiencies on the peak of the MMA they run on")
            if self.par.tp > 1 and cal.allreduce is not None and str(self.par.tp) not in cal.allreduce.latency_us:
                out.append(f"all-reduce over {self.par.tp} GPUs: not fitted, ring model with interconnect_gbps and "
                           "collective_latency_us (assumed)")
        if m.attention["kind"] == "mla":
            out.append("MLA attention priced as a GQA kernel over its latent, its projections as one GEMM")
        if self.par.expert_parallel:
            out.append("expert-parallel all-to-all: interconnect_gbps (datasheet) and collective_latency_us (assumed)")
        if self.par.tp > 1 and cal is None:
            out.append("tensor-parallel all-reduce: ring model with interconnect_gbps and collective_latency_us (assumed)")
        out.append(f"step overhead {hw.step_overhead_us:g} us (CPU scheduling) assumed")
        out.append("not modelled: overlap of communication, or of shared experts and router, with the routed experts")
        return out
