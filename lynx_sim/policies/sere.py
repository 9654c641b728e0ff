"""`sere`: similarity-based expert re-routing per MoE layer and decode batch.

SERE (Wu, Cheng et al., ICLR 2026, arXiv 2602.07616; `../shared/LYNX.md` section 5) keeps the
experts that matter to some token and moves the batch's other assignments onto similar kept
experts. Per MoE layer l and decode batch:

    KEEP   = union over tokens of their top-S experts               # S = top_s, [L, E]
    a slot on an expert e outside KEEP (falling weight order):
        c  = argmax over experts in KEEP the token does not use yet of sim[l, e, c]
        if sim[l, e, c] >= rho: the slot moves to c, with its original weight
        else:                   the slot is dropped (`renormalize`, slots.keep_slots)

Choices (ours where the paper leaves room; the paper measures similarity between experts on
profiling data, which a routing-only simulator cannot recompute):
- Similarity, learned in `prepare` per layer, [L, E, E]: the Pearson correlation of two
  experts' router logits across profile tokens when the routing profile has logits; else the
  cosine similarity of their co-activation (indicator columns of the top-k over tokens:
  co-count / sqrt(count_a count_b)). Undefined entries (an expert constant or never used in
  the profile) are 0.
- A token's top-S: its S largest-weight slots (ties to the lower slot); by logit without
  weights; slots 0..S-1 with ids only (ordered ids assumed). top_s is an int in 1..k; top_s = k
  keeps every slot (neutral). rho is a finite number in [-1, 1] (a correlation or cosine). Slots on experts outside KEEP are re-routed one rank at a time, strongest first, so
  a token's re-routed slots never collide; ties in similarity go to the lowest expert index.
- A re-routed slot keeps its original weight (the paper re-routes the assignment, not the gate).
- Every token keeps its top-1 (it is in KEEP). Decode-only, as Lynx: SERE targets batch decoding.
"""

from __future__ import annotations

import torch

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext, PolicyInputError
from .params import check_bool, check_int, check_number
from .registry import register
from .slots import keep_slots


def pearson(logits: torch.Tensor) -> torch.Tensor:
    """Profile logits [N, L, E] -> correlation of experts across tokens [L, E, E] (0 where undefined)."""
    x = logits.double().permute(1, 0, 2)  # [L, N, E]
    x = x - x.mean(1, keepdim=True)
    cov = x.transpose(1, 2) @ x  # [L, E, E]
    sd = cov.diagonal(dim1=1, dim2=2).sqrt()  # [L, E]
    return torch.nan_to_num(cov / (sd[:, :, None] * sd[:, None, :]), nan=0.0, posinf=0.0, neginf=0.0).clamp(-1, 1)


def co_activation_cosine(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Profile ids [N, L, k] -> cosine similarity of expert indicator columns [L, E, E]."""
    N, L, _ = ids.shape
    a = torch.zeros(L, N, num_experts, dtype=torch.float64).scatter_(-1, ids.permute(1, 0, 2), 1.0)
    co = a.transpose(1, 2) @ a  # [L, E, E] co-counts
    n = co.diagonal(dim1=1, dim2=2).sqrt()
    return torch.nan_to_num(co / (n[:, :, None] * n[:, None, :]), nan=0.0)


def slot_order(batch: BatchRouting) -> torch.Tensor:
    """Each token's slots from strongest to weakest, [L, B, k] (slot indices)."""
    ids = batch.ids
    if batch.weights is not None:
        strength = batch.weights
    elif batch.logits is not None:
        strength = batch.logits.gather(-1, ids)
    elif batch.ids_ordered:
        return torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    else:
        raise PolicyInputError("policy 'sere' needs each token's slot order (its top-S), and this trace has "
                               "neither weights nor logits and its ids are in no particular order")
    return torch.sort(strength, dim=-1, descending=True, stable=True).indices


@register
class Sere(Policy):
    name = "sere"
    needs = ("ids",)  # weights (or logits) order a token's slots when present
    decode_only = True
    needs_profile = True
    layer_state = ("sim",)

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict:
        return {"top_s": router.top_k}

    def __init__(self, ctx: PolicyContext | RouterSpec, top_s: int = 1, rho: float = 0.0, renormalize: bool = True,
                 backend: str = "auto"):
        super().__init__(ctx, backend)
        self.top_s = check_int(self.name, "top_s", top_s, 1, self.router.top_k, " (the model's top_k)")
        self.rho = check_number(self.name, "rho", rho, -1.0, 1.0)
        self.renormalize = check_bool(self.name, "renormalize", renormalize)
        self.sim: torch.Tensor | None = None  # [L, E, E], set by prepare
        self.sim_kind = None  # "logit_pearson" or "coactivation_cosine"

    def params(self) -> dict:
        return {"top_s": self.top_s, "rho": self.rho, "renormalize": self.renormalize}

    def prepare(self, profile) -> None:
        E = self.router.num_experts
        if profile.num_experts != E:
            raise PolicyInputError(f"policy '{self.name}': routing profile has {profile.num_experts} experts, "
                                   f"the router {E}")
        if profile.logits is not None:
            self.sim, self.sim_kind = pearson(profile.logits), "logit_pearson"
        else:
            self.sim, self.sim_kind = co_activation_cosine(profile.ids, E), "coactivation_cosine"
        self.sim = self.sim.float()
        super().prepare(profile)

    def route(self, batch: BatchRouting):
        ids, w = batch.ids, batch.weights  # [L, B, k]
        L, B, k = ids.shape
        E = self.router.num_experts
        if self.sim.shape[0] != L:
            raise PolicyInputError(f"policy '{self.name}': profiled on {self.sim.shape[0]} MoE layers, "
                                   f"the batch has {L}")
        if self.top_s >= k:
            return ids, w
        order = slot_order(batch)  # [L, B, k]
        by_rank = ids.gather(-1, order)  # the token's experts, strongest first
        keep = torch.zeros(L, E, dtype=torch.bool, device=ids.device)
        keep.scatter_(-1, by_rank[..., :self.top_s].reshape(L, -1), True)  # KEEP [L, E]
        in_keep = keep[:, None, :].expand(L, B, E).gather(-1, by_rank)  # [L, B, k], rank order
        if in_keep.all():
            return ids, w
        # compact KEEP per layer: kl [L, K] its experts ascending (padded), K = the largest |KEEP|
        size = keep.sum(-1, keepdim=True)  # [L, 1]
        K = int(size.max())
        kl = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :K]  # [L, K]
        col_ok = torch.arange(K, device=ids.device) < size  # [L, K] False on padding
        uses = torch.zeros(L, B, E, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True)
        free = col_ok[:, None, :] & ~uses.gather(-1, kl[:, None, :].expand(L, B, K))  # [L, B, K] candidates
        # flat over (layer, token) rows t = l B + b, so each rank is a few index_selects
        bias = torch.zeros(L * B, K, dtype=self.sim.dtype, device=ids.device)
        bias.masked_fill_(~free.reshape(L * B, K), float("-inf"))  # -inf: not a candidate
        sim_k = self.sim.to(ids.device).gather(2, kl[:, None, :].expand(L, E, K)).reshape(L * E, K)  # sim[l, e, KEEP]
        layer = torch.arange(L, device=ids.device).repeat_interleave(B)  # [L B]
        experts = by_rank.reshape(L * B, k)
        new, ok = experts.clone(), in_keep.reshape(L * B, k).clone()
        for r in range(self.top_s, k):  # a loop over ranks, not tokens
            t = (~ok[:, r]).nonzero().squeeze(1)  # rows whose rank-r slot must move
            if t.numel() == 0:
                continue
            lt = layer[t]
            rows = sim_k.index_select(0, lt * E + experts[t, r]) + bias.index_select(0, t)  # [M, K]
            val, c = rows.max(-1)  # first max: the lowest expert index (kl is ascending)
            m = val >= self.rho
            t, c = t[m], c[m]
            new[t, r] = kl.reshape(-1)[lt[m] * K + c]
            ok[t, r] = True
            bias[t, c] = float("-inf")  # taken: the token now uses it
        new, ok = new.reshape(L, B, k), ok.reshape(L, B, k)
        # back to the model's slot order: slot order[r] holds rank r
        ids_out = torch.empty_like(ids).scatter_(-1, order, new)
        keep_out = torch.empty_like(ok).scatter_(-1, order, ok)
        return keep_slots(ids_out, w, keep_out, self.renormalize)
