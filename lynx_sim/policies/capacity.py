"""`capacity`: capacity-factor dropping, per MoE layer and per batch (GShard/Switch-style).

GShard (Lepikhin et al. 2020, arXiv 2006.16668) and the Switch Transformer (Fedus et al. 2021,
arXiv 2101.03961) give each expert a buffer of C token slots per group of tokens; assignments
that overflow it are dropped. Here the group is one layer of one batch of B tokens:

    C    = ceil(capacity_factor * B * k / E)          # tokens per expert
    rank = position of (t, e) among e's assignments, by falling weight   # [L, B, k]
    keep = rank < C  or  (t, e) is t's top-1 slot

Choices (ours where the papers leave room):
- Overflow is dropped lowest weight first; equal weights (and traces without weights, ranked as
  all equal) go to the lower token index, then the lower slot: Switch's "first come" order.
- A token never loses its top-1 slot, even beyond capacity: this deviates from GShard/Switch,
  where an overflowing token passes through the residual connection only and the MoE layer adds
  nothing; the simulator's output convention requires at least one expert per token. Protected
  top-1 slots that overflow are kept on top of the C ranked ones, so an expert can exceed C
  only by top-1 assignments.
- capacity_factor is a finite number in (0, E]: at E / k (<= E) every expert can hold the whole
  batch, so larger values mean the same (the neutral value); E bounds it for every top-k and
  keeps C an ordinary integer.
- C is computed with a 1e-9 tolerance (a float product that lands 1e-16 above an integer does
  not add a slot).
- Dropped slots follow `renormalize` (slots.keep_slots): true keeps each token's weight sum
  (the house default; GShard itself does not renormalise after dropping, which is false).
- Not decode-only: capacity is a dispatch limit applied to every forward pass (prefill too).

"""

from __future__ import annotations

import math

import torch

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext
from .fidelity import expert_token_counts
from .params import check_bool, check_number
from .registry import register
from .slots import keep_slots, top1_slots


def capacity_ranks(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rank of every assignment among its expert's assignments in the layer, [L, B, k] int64:
    0 for the highest weight; equal weights by token index, then slot (flat index order).

    One stable integer sort on key = expert x 2**32 + (2**31 - 1 - bits(w)): the bit pattern of a
    non-negative float32 orders like its value, so the key orders by expert, then falling weight,
    and stability orders equal keys by position. (Weights are compared in float32.)"""
    L, B, k = ids.shape
    flat_e = ids.reshape(L, -1)  # [L, N], N = B k
    bits = (weights.float().reshape(L, -1) + 0.0).contiguous().view(torch.int32).long()  # + 0.0: no -0.0
    key = flat_e * 2**32 + (2**31 - 1 - bits)
    perm = torch.sort(key, dim=-1, stable=True).indices  # flat positions by (expert, weight desc, position)
    counts = expert_token_counts(ids, num_experts)  # [L, E]
    starts = counts.cumsum(-1) - counts  # first sorted position of each expert
    pos = torch.arange(B * k, device=ids.device).expand(L, -1)
    rank_sorted = pos - starts.gather(-1, flat_e.gather(-1, perm))
    return torch.empty_like(flat_e).scatter_(-1, perm, rank_sorted).reshape(L, B, k)


@register
class Capacity(Policy):
    name = "capacity"
    needs = ("ids",)  # weights rank the overflow when present
    decode_only = False

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict:
        return {"capacity_factor": float(router.num_experts)}  # C >= B whenever capacity_factor >= E / k

    def __init__(self, ctx: PolicyContext | RouterSpec, capacity_factor: float = 1.25, renormalize: bool = True,
                 backend: str = "auto"):
        super().__init__(ctx, backend)
        E = self.router.num_experts
        self.capacity_factor = check_number(self.name, "capacity_factor", capacity_factor, 0.0, E, lo_open=True,
                                            why=f" (E={E}; from E / k on nothing is dropped)")
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        return {"capacity_factor": self.capacity_factor, "renormalize": self.renormalize}

    def capacity(self, B: int) -> int:
        """C, tokens per expert for a batch of B tokens."""
        r = self.router
        return max(1, math.ceil(self.capacity_factor * B * r.top_k / r.num_experts - 1e-9))

    def route(self, batch: BatchRouting):
        ids = batch.ids  # [L, B, k]
        w = batch.weights if batch.weights is not None else torch.ones(ids.shape, device=ids.device)
        C = self.capacity(batch.num_tokens)
        if C >= batch.num_tokens:  # no expert can overflow
            return ids, batch.weights
        keep = (capacity_ranks(ids, w, self.router.num_experts) < C) | top1_slots(batch)
        return keep_slots(ids, batch.weights, keep, self.renormalize)
