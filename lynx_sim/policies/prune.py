"""`prune`: static expert pruning by routing-profile frequency: pruned experts are not loaded.

Static pruning removes experts from the model once, offline: "Not All Experts are Equal"
(Lu et al., ACL 2024, arXiv 2402.14800) chooses which by searching expert subsets for the least
reconstruction loss, which needs hidden states a routing trace does not have; here the
criterion is the simplest one, frequency (`../shared/LYNX.md` section 5). Per MoE layer l:

    n       = ceil(keep_fraction * E)    # at least 1; a 1e-9 tolerance absorbs float rounding
    KEPT[l] = the n experts with the largest routing-profile frequency (ties to the lowest index)

Tokens whose experts are all kept are left exactly as the model routed them. The others:
- with router logits: re-routed as the pruned model would route them, the router's rows of the
  pruned experts removed, i.e. `route(logits, router, allowed=KEPT)`: softmax over the kept
  experts (renormalised if the model renormalises; a sigmoid router's own sigmoids), a grouped
  router choosing its groups among the kept experts. Softmax and sigmoid routers compute this
  on the n kept columns alone (the same result, tested, for less work). Each token gets k kept
  experts, or all n when n < k (the other slots DROPPED);
- without logits: their pruned slots are dropped (`renormalize`, slots.keep_slots), and a token
  left with none keeps its top-1 slot (slots.top1_slots) although that expert is pruned: a
  trace without logits cannot say which kept expert the router would pick instead. This
  fallback loads a pruned expert, so the rule is then not strictly static.
Only the affected tokens are re-routed, so keep_fraction = 1 returns the model's own routing
bit for bit (neutral) even where a recorded trace's ids differ from `route(logits)` in rounding.

Not decode-only: a pruned model routes prefill and decode tokens alike. Learns from
`RoutingProfile.expert_frequency()` in `prepare`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..routing import RouterSpec, group_mask, route, topk_lowest_index
from .base import BatchRouting, Policy, PolicyContext, PolicyInputError
from .params import check_bool, check_number
from .slots import top1_slots
from .fidelity import DROPPED
from .registry import register
from .slots import keep_slots


def route_among(logits: torch.Tensor, router: RouterSpec, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned router's top-k: logits [M, E] of M tokens, kept [M, n] the kept experts of each
    token's layer (ascending). Returns (ids, weights) [M, k]; slots beyond the kept experts the
    token may use are DROPPED with weight 0.

    Softmax and sigmoid routers route on the n kept columns alone (the pruned router; same result
    as masking the others to -inf, less work); grouped routers mask, then choose their groups
    among the kept experts as `route` does."""
    M, n = kept.shape
    k = router.top_k
    if router.kind != "grouped_topk":
        sub = RouterSpec(n, min(k, n), router.kind, router.renormalize)
        cols, w = route(logits.gather(-1, kept), sub)  # [M, min(k, n)]
        ids = kept.gather(-1, cols)
        if n < k:  # fewer kept experts than slots: the rest are DROPPED
            ids = torch.cat([ids, torch.full((M, k - n), DROPPED, dtype=ids.dtype, device=ids.device)], -1)
            w = torch.cat([w, torch.zeros(M, k - n, dtype=w.dtype, device=w.device)], -1)
        return ids, w
    allowed = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)  # [M, E]
    z = logits.masked_fill(~allowed, float("-inf"))  # the pruned router: those rows are gone
    ids, raw = route(z, dataclasses.replace(router, renormalize=False), allowed=allowed)
    allowed = allowed & group_mask(z, router)  # as route() chooses the groups: on the logits
    valid = allowed.gather(-1, ids)  # [M, k]
    w = torch.where(valid, raw, torch.zeros_like(raw))
    if router.renormalize:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.where(valid, ids, torch.full_like(ids, DROPPED)), w


@register
class Prune(Policy):
    name = "prune"
    needs = ("ids",)  # logits re-route the affected tokens when present
    decode_only = False
    needs_profile = True
    layer_state = ("kept", "kept_list")
    neutral = {"keep_fraction": 1.0}

    def __init__(self, ctx: PolicyContext | RouterSpec, keep_fraction: float = 0.75, renormalize: bool = True,
                 backend: str = "auto"):
        super().__init__(ctx, backend)
        self.keep_fraction = check_number(self.name, "keep_fraction", keep_fraction, 0.0, 1.0, lo_open=True)
        self.renormalize = check_bool(self.name, "renormalize", renormalize)
        self.kept: torch.Tensor | None = None  # [L, E] bool, set by prepare
        self.kept_list: torch.Tensor | None = None  # [L, n] the kept experts, ascending

    def params(self) -> dict:
        return {"keep_fraction": self.keep_fraction, "renormalize": self.renormalize}

    @property
    def num_kept(self) -> int:
        E = self.router.num_experts
        return min(E, max(1, math.ceil(self.keep_fraction * E - 1e-9)))

    def prepare(self, profile) -> None:
        E = self.router.num_experts
        if profile.num_experts != E:
            raise PolicyInputError(f"policy '{self.name}': routing profile has {profile.num_experts} experts, "
                                   f"the router {E}")
        freq = profile.expert_frequency()  # [L, E]
        _, top = topk_lowest_index(freq, self.num_kept)  # [L, n]
        self.kept = torch.zeros(freq.shape, dtype=torch.bool).scatter_(-1, top, True)
        self.kept_list = top.sort(-1).values
        super().prepare(profile)

    def route(self, batch: BatchRouting):
        ids, w = batch.ids, batch.weights  # [L, B, k]
        L, B, k = ids.shape
        if self.kept.shape[0] != L:
            raise PolicyInputError(f"policy '{self.name}': profiled on {self.kept.shape[0]} MoE layers, "
                                   f"the batch has {L}")
        kept = self.kept.to(ids.device)[:, None, :]  # [L, 1, E]
        in_kept = kept.expand(L, B, -1).gather(-1, ids)  # [L, B, k]
        if in_kept.all():
            return ids, w
        if batch.logits is None:
            keep = in_kept | (top1_slots(batch) & ~in_kept.any(-1, keepdim=True))
            return keep_slots(ids, w, keep, self.renormalize)
        l, b = (~in_kept.all(-1)).nonzero(as_tuple=True)  # the affected tokens
        new_ids, new_w = route_among(batch.logits[l, b], self.router, self.kept_list.to(ids.device)[l])
        out_ids = ids.clone()
        out_ids[l, b] = new_ids
        if w is None:
            return out_ids, None
        out_w = w.clone()
        out_w[l, b] = new_w.to(w.dtype)
        return out_ids, out_w
