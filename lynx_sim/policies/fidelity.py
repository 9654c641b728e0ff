"""Fidelity of a policy's routing against the model's own, per MoE layer (docs/metrics.md).

- top1_retention: fraction of tokens whose original top-1 expert is still among their experts
  (NaN when the trace cannot tell the top-1: ids only, in no particular order).
- gate_mass_retained: per token, the share of its original top-k gate weight whose expert it
  still uses (uniform 1/k weights when the trace has none), averaged over tokens.
- distinct_experts: experts that received at least one token (the weights a decode step reads).
- expert_tokens: token count of every expert, [L, E], what the cost model consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .base import BatchRouting


@dataclass
class Fidelity:
    expert_tokens: torch.Tensor  # [L, E] int64 tokens per expert after the policy
    distinct_experts: torch.Tensor  # [L] int64
    top1_retention: torch.Tensor  # [L] float64
    gate_mass_retained: torch.Tensor  # [L] float64


def expert_token_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids [L, B, k] -> tokens per expert [L, E]."""
    L = ids.shape[0]
    counts = torch.zeros(L, num_experts, dtype=torch.int64, device=ids.device)
    return counts.scatter_add_(1, ids.reshape(L, -1), torch.ones_like(ids.reshape(L, -1)))


def original_top1(batch: "BatchRouting") -> torch.Tensor | None:
    """Each token's original top-1 expert, [L, B]; None when the trace cannot say (unordered ids only)."""
    if batch.weights is not None:
        return batch.ids.gather(-1, batch.weights.argmax(-1, keepdim=True)).squeeze(-1)
    if batch.logits is not None:
        return batch.logits.argmax(-1)
    return batch.ids[..., 0] if batch.ids_ordered else None


def measure(batch: "BatchRouting", ids: torch.Tensor, num_experts: int) -> Fidelity:
    counts = expert_token_counts(ids, num_experts)
    present = (batch.ids[..., :, None] == ids[..., None, :]).any(-1)  # [L, B, k]: original slot kept
    w = batch.weights.double() if batch.weights is not None else torch.ones_like(batch.ids, dtype=torch.float64)
    mass = (w * present).sum(-1) / w.sum(-1).clamp_min(1e-30)  # [L, B]
    top1 = original_top1(batch)
    if top1 is None:
        retention = torch.full((ids.shape[0],), float("nan"), dtype=torch.float64)
    else:
        retention = (ids == top1[..., None]).any(-1).double().mean(-1)  # [L]
    return Fidelity(counts, (counts > 0).sum(-1), retention, mass.mean(-1))
