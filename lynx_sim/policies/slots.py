"""Shared mechanics of rules that drop or move a token's slots (one place, used by many rules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .fidelity import DROPPED, original_top1

if TYPE_CHECKING:
    from .base import BatchRouting


def by_weight(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each token's slots by falling weight, ties to the lower slot: (ids, weights) [..., k]."""
    order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    return ids.gather(-1, order), weights.gather(-1, order)


def keep_slots(ids: torch.Tensor, weights: torch.Tensor | None, keep: torch.Tensor,
               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop the slots where `keep` [..., k] is False: id DROPPED, weight 0.

    renormalize=True rescales the kept weights so that each token's weights keep their original
    sum (1 for a renormalising model, the top-k mass otherwise); False leaves them as they were,
    so the token's output shrinks with the dropped mass.
    """
    if not keep.any(-1).all():
        raise ValueError("keep_slots: every token must keep at least one slot")
    out_ids = torch.where(keep, ids, torch.full_like(ids, DROPPED))
    if weights is None:
        return out_ids, None
    w = torch.where(keep, weights, torch.zeros_like(weights))
    if renormalize:
        w = w * (weights.sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp_min(1e-30))
    return out_ids, w


def keep_top_n(weights: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """keep [L, B, k] bool, in slot positions: each token's n highest-weight slots.

    weights [L, B, k]; n an int or an int tensor broadcasting to [L, B, 1] (per layer, per token).
    """
    k = weights.shape[-1]
    slot = torch.arange(k, device=weights.device).expand(weights.shape)  # [L, B, k]
    order, _ = by_weight(slot, weights)  # [L, B, k] slot index of rank r
    ranked = (slot < n)  # [L, B, k]: rank r is kept
    return torch.empty_like(ranked).scatter_(-1, order, ranked)


def top1_slots(batch: "BatchRouting") -> torch.Tensor:
    """[L, B, k] bool: each token's top-1 slot (fidelity.original_top1: by weight, else logit,
    else slot 0 of ordered ids); slot 0 where the trace cannot tell or the top-1 is not among ids."""
    first = torch.zeros_like(batch.ids, dtype=torch.bool)
    first[..., 0] = True
    top1 = original_top1(batch)  # [L, B] or None
    if top1 is None:
        return first
    m = batch.ids == top1[..., None]
    return m | (first & ~m.any(-1, keepdim=True))
