"""`batch_budget`: a batch-wide expert budget per MoE layer (MoE-Spec).

MoE-Spec (McDanel et al. 2026, arXiv 2602.16052) caps the experts a verification batch loads at
a fixed budget per layer, ranked by the routing probability the batch sends them, and handles
the slots left outside by truncation or substitution (`../shared/LYNX.md` section 5). Per MoE
layer and decode batch of B tokens:

    W[e]  = sum over the batch's slots routed to e of their weight     # [L, E]
    KEEP  = the `budget` experts with the largest W (budget null: B)   # ties: more tokens, then lowest index
            budget: null, or an int in 1..E (E keeps every expert: neutral)
    slots on experts outside KEEP:
      fallback=truncate:   dropped (`renormalize`, slots.keep_slots)
      fallback=substitute: each takes the token's best kept expert it does not already use

Choices (ours where the paper leaves room):
- W sums the weights as the trace gives them (normalised for renormalising routers); a trace
  without weights counts each slot as 1 (W = tokens per expert). Equal W goes to the expert with
  more tokens, so an expert the batch uses always outranks one it does not.
- "Best kept expert" of a token, among KEEP minus the experts it was routed to: the largest
  router logit when the batch has logits (equal logits: the better-ranked expert of KEEP), else
  the best rank in KEEP (W, then tokens, then index). Substitution goes in slot order (the
  model's order, falling weight for ordered ids): the first dropped slot gets the best
  candidate. A substituted slot keeps its original weight. When KEEP has fewer candidates than
  the token has dropped slots, the rest are dropped and `renormalize` applies to them.
- truncate: a token with none of its experts in KEEP keeps one slot, its top-1 slot
  (slots.top1_slots), moved to its best kept expert, with the top-1 weight (the whole original
  sum with renormalize). The budget is therefore never exceeded.
- Decode-only, as Lynx: MoE-Spec acts on decode-time (verification) batches.
"""

from __future__ import annotations

import torch

from ..routing import RouterSpec, topk_lowest_index
from .base import BatchRouting, Policy, PolicyContext
from .params import check_bool, check_choice, check_int
from .slots import top1_slots
from .registry import register
from .slots import keep_slots

FALLBACKS = ("truncate", "substitute")
NEG_INF = float("-inf")


def expert_mass(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Batch-summed weight per expert, [L, E] float64 (ids [L, B, k] without DROPPED)."""
    L = ids.shape[0]
    W = torch.zeros(L, num_experts, dtype=torch.float64, device=ids.device)
    return W.scatter_add_(1, ids.reshape(L, -1), weights.reshape(L, -1).double())


def best_candidates(score: torch.Tensor, own: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates of M tokens among n kept experts: score [M, n], own [M, n] (True: the token
    already routes to it, not a candidate). Returns the positions of each token's k best
    candidates [M, k] (ties to the lower position) and whether each exists [M, k]."""
    M, n = score.shape
    s = torch.where(own, NEG_INF, score.clamp_min(torch.finfo(score.dtype).min))
    val, pos = topk_lowest_index(s, min(k, n))
    exists = val > NEG_INF
    if n < k:
        pos = torch.cat([pos, pos.new_zeros(M, k - n)], -1)
        exists = torch.cat([exists, exists.new_zeros(M, k - n)], -1)
    return pos, exists


@register
class BatchBudget(Policy):
    name = "batch_budget"
    needs = ("ids",)  # weights rank experts, logits rank substitutes, when present
    decode_only = True

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict:
        return {"budget": router.num_experts}

    def __init__(self, ctx: PolicyContext | RouterSpec, budget: int | None = None, fallback: str = "truncate",
                 renormalize: bool = True, backend: str = "auto"):
        super().__init__(ctx, backend)
        E = self.router.num_experts
        self.budget = None if budget is None else check_int(
            self.name, "budget", budget, 1, E, f" experts (E={E}), or null for the batch size")
        self.fallback = check_choice(self.name, "fallback", fallback, FALLBACKS)
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        return {"budget": self.budget, "fallback": self.fallback, "renormalize": self.renormalize}

    def ranked(self, batch: BatchRouting) -> tuple[torch.Tensor, int]:
        """Experts by falling W, [L, E] (ties: more tokens, then the lowest index), and n = |KEEP|:
        KEEP is the first n of each row."""
        ids = batch.ids
        E = self.router.num_experts
        ones = torch.ones(ids.shape, device=ids.device)
        W = expert_mass(ids, batch.weights if batch.weights is not None else ones, E)
        count = expert_mass(ids, ones, E)
        by_count = torch.sort(count, dim=-1, descending=True, stable=True).indices
        order = by_count.gather(-1, torch.sort(W.gather(-1, by_count), dim=-1, descending=True, stable=True).indices)
        return order, min(E, batch.num_tokens if self.budget is None else self.budget)

    def keep_mask(self, batch: BatchRouting) -> torch.Tensor:
        """KEEP [L, E] bool."""
        order, n = self.ranked(batch)
        return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(-1, order[:, :n], True)

    def route(self, batch: BatchRouting):
        ids, w = batch.ids, batch.weights  # [L, B, k]
        L, B, k = ids.shape
        order, n = self.ranked(batch)
        keep_list = order[:, :n]  # [L, n] KEEP, best first
        keep = torch.zeros(order.shape, dtype=torch.bool, device=ids.device).scatter_(-1, keep_list, True)
        in_keep = keep[:, None, :].expand(L, B, -1).gather(-1, ids)  # [L, B, k]
        if in_keep.all():
            return ids, w
        dropped = ~in_keep
        substitute = self.fallback == "substitute"
        need = dropped.any(-1) if substitute else dropped.all(-1)  # [L, B]
        l, b = need.nonzero(as_tuple=True)  # tokens that get a substitute
        cand = keep_list[l]  # [M, n] experts, best by W first
        uses = torch.zeros(L, B, self.router.num_experts, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True)
        own = uses[l, b].gather(-1, cand)  # [M, n]
        if batch.logits is not None:
            score = batch.logits[l, b].gather(-1, cand)  # by the token's own router logit
        else:
            score = -torch.arange(n, dtype=torch.float64, device=ids.device).expand(len(l), n)  # by W rank
        pos, exists = best_candidates(score, own, k)  # [M, k]
        sub = cand.gather(-1, pos)  # [M, k] expert ids
        new_ids, kept = ids.clone(), in_keep.clone()
        if substitute:
            d = dropped[l, b]  # [M, k]
            j = (d.long().cumsum(-1) - 1).clamp_min(0)  # each slot's place among the token's dropped ones
            moved = d & exists.gather(-1, j)
            new_ids[l, b] = torch.where(moved, sub.gather(-1, j), ids[l, b])
            kept[l, b] = in_keep[l, b] | moved
        else:  # truncate: a token left with none moves its top-1 slot to its best kept expert
            top1 = top1_slots(batch)[l, b]  # [M, k]
            new_ids[l, b] = torch.where(top1, sub[:, :1], ids[l, b])
            kept[l, b] = top1
        return keep_slots(new_ids, w, kept, self.renormalize)
