"""Fidelity of a policy's routing against the model's own, per MoE layer (docs/metrics.md).

- top1_retention: fraction of tokens whose original top-1 expert is still among their experts
  (NaN when the trace cannot tell the top-1: ids only, in no particular order).
- gate_mass_retained: per token, the share of its original top-k gate weight whose expert it
  still uses (uniform 1/k weights when the trace has none), averaged over tokens.
- slots_changed: fraction of the original token-expert assignments that are gone.
- kl_to_router_nats: KL(q || p) of the mixture weights actually used (q, normalised to sum 1)
  against the router's full softmax over all E experts (p); softmax and grouped routers with
  recorded logits only (not stand-ins), else NaN. Vanilla's value is the cost of top-k
  truncation itself.
- distinct_experts: experts that received at least one token (the weights a decode step reads);
  tokens_per_active_expert: assignments / distinct experts; experts_per_token: kept slots.
- expert_tokens: token count of every expert, [L, E], what the cost model consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..routing import RouterSpec
    from .base import BatchRouting

DROPPED = -1  # id of a slot a policy left empty (its weight is 0)


@dataclass
class Fidelity:
    expert_tokens: torch.Tensor  # [L, E] int64 tokens per expert after the policy
    distinct_experts: torch.Tensor  # [L] int64
    top1_retention: torch.Tensor  # [L] float64
    gate_mass_retained: torch.Tensor  # [L] float64
    slots_changed: torch.Tensor  # [L] float64
    kl_to_router_nats: torch.Tensor  # [L] float64 (NaN without logits)
    tokens_per_active_expert: torch.Tensor  # [L] float64
    experts_per_token: torch.Tensor  # [L] float64


def expert_token_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [L, B, k] (DROPPED allowed) -> tokens per expert [L, E]."""
    L = ids.shape[0]
    flat = ids.reshape(L, -1)
    counts = torch.zeros(L, num_experts + 1, dtype=torch.int64, device=ids.device)  # last column: dropped
    counts.scatter_add_(1, torch.where(flat == DROPPED, num_experts, flat), torch.ones_like(flat))
    return counts[:, :num_experts]


def original_top1(batch: "BatchRouting") -> torch.Tensor | None:
    """Each token's original top-1 expert, [L, B]; None when the trace cannot say (unordered ids only)."""
    if batch.weights is not None:
        return batch.ids.gather(-1, batch.weights.argmax(-1, keepdim=True)).squeeze(-1)
    if batch.logits is not None and not batch.logits_filled:
        return batch.logits.argmax(-1)
    return batch.ids[..., 0] if batch.ids_ordered else None


def kl_to_router(batch: "BatchRouting", ids: torch.Tensor, weights: torch.Tensor | None, router: "RouterSpec") -> torch.Tensor:
    """Mean over tokens of KL(q || softmax(logits)), [L]; NaN where it is not defined."""
    L = ids.shape[0]
    if batch.logits is None or batch.logits_filled or weights is None or router.kind == "sigmoid":
        return torch.full((L,), float("nan"), dtype=torch.float64, device=ids.device)
    z = batch.logits
    logp = z.gather(-1, ids.clamp_min(0)).double() - _logsumexp(batch).unsqueeze(-1)  # [L, B, k], float64
    w = weights.double() * (ids != DROPPED)
    q = w / w.sum(-1, keepdim=True)
    term = torch.where(q > 0, q * (torch.log(q.clamp_min(1e-300)) - logp), torch.zeros_like(q))
    return term.sum(-1).mean(-1)


def measure(batch: "BatchRouting", ids: torch.Tensor, weights: torch.Tensor | None, router: "RouterSpec",
            compiled: bool | None = None) -> Fidelity:
    """All measures of one selection: the compiled one-pass kernel (fidelity_cpu.py) when
    `compiled` (the caller's backend choice, Policy.compiled_path; None: for CPU tensors), else
    torch reductions (measure_torch, the GPU's path)."""
    on_cpu = ids.device.type == "cpu" and batch.ids.device.type == "cpu"
    if compiled is None:
        compiled = on_cpu
    if compiled:
        if not on_cpu:
            raise ValueError(f"fidelity: the compiled measures take CPU tensors, found {ids.device} and {batch.ids.device}")
        return _measure_cpu(batch, ids, weights, router)
    return measure_torch(batch, ids, weights, router)


def _measure_cpu(batch, ids, weights, router) -> Fidelity:
    from .fidelity_cpu import TOP1_LOGITS, TOP1_NONE, TOP1_SLOT0, TOP1_WEIGHTS, measure_kernel

    orig = batch.ids.numpy()
    w_orig = batch.weights.numpy() if batch.weights is not None else np.ones(orig.shape, np.float32)
    real_logits = batch.logits is not None and not batch.logits_filled
    if batch.weights is not None:
        mode = TOP1_WEIGHTS
    elif real_logits:
        mode = TOP1_LOGITS
    else:
        mode = TOP1_SLOT0 if batch.ids_ordered else TOP1_NONE
    with_kl = real_logits and weights is not None and router.kind != "sigmoid"
    z = batch.logits.numpy() if real_logits else np.zeros((1, 1, 1), np.float32)
    lse = _logsumexp(batch).cpu().numpy() if with_kl else np.zeros((1, 1), np.float64)
    w_new = weights.numpy() if weights is not None else np.zeros((1, 1, 1), np.float32)
    counts, ret, mass, changed, kl, kept = measure_kernel(orig, w_orig, ids.numpy(), w_new, z, lse,
                                                          router.num_experts, mode, with_kl)
    distinct = np.count_nonzero(counts, axis=-1)
    t = torch.from_numpy
    return Fidelity(t(counts), t(distinct), t(ret), t(mass), t(changed), t(kl),
                    t(kept / np.maximum(distinct, 1)), t(kept / orig.shape[1]))


def _logsumexp(batch) -> torch.Tensor:
    """logsumexp of the batch's logits over experts in float64, [L, B]; computed once per batch
    (policy and baseline). Float64 because float32's exp differs in the last bit between CPUs
    (found: Intel and AMD under the same torch), which moved the mean KL by 2e-9 relative; in
    float64 such differences stay near 1e-16. With few experts, reduced over an expert-major
    copy: torch's reduction along a short last dimension is slow, across rows it vectorises."""
    cached = getattr(batch, "_lse", None)
    if cached is None:
        z = batch.logits.double()
        cached = torch.logsumexp(z.permute(2, 0, 1).contiguous(), 0) if z.shape[-1] <= 32 else torch.logsumexp(z, -1)
        batch._lse = cached
    return cached


def measure_torch(batch: "BatchRouting", ids: torch.Tensor, weights: torch.Tensor | None, router: "RouterSpec") -> Fidelity:
    """The reference (and GPU) version: plain torch reductions."""
    counts = expert_token_counts(ids, router.num_experts)
    distinct = (counts > 0).sum(-1)
    present = (batch.ids[..., :, None] == ids[..., None, :]).any(-1)  # [L, B, k]: original slot kept
    w = batch.weights.double() if batch.weights is not None else torch.ones_like(batch.ids, dtype=torch.float64)
    mass = (w * present).sum(-1) / w.sum(-1).clamp_min(1e-30)  # [L, B]
    top1 = original_top1(batch)
    if top1 is None:
        retention = torch.full((ids.shape[0],), float("nan"), dtype=torch.float64, device=ids.device)
    else:
        retention = (ids == top1[..., None]).any(-1).double().mean(-1)  # [L]
    kept = (ids != DROPPED).double()
    return Fidelity(counts, distinct, retention, mass.mean(-1), 1.0 - present.double().mean((-1, -2)),
                    kl_to_router(batch, ids, weights, router), kept.sum((-1, -2)) / distinct.clamp_min(1).double(),
                    kept.sum(-1).mean(-1))
