"""Shared mechanics of rules that drop or move a token's slots (one place, used by many rules)."""

from __future__ import annotations

import torch

from .fidelity import DROPPED


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
