"""`top_p`: keep the fewest highest-weight experts that carry a share p of the token's top-k mass.

Top-p (cumulative mass) routing as in "Harder Tasks Need More Experts: Dynamic Routing in MoE
Models" (Huang et al., ACL 2024, arXiv 2403.07652); `../shared/LYNX.md` section 5. Per token
and MoE layer, with slots ranked by falling weight (`slots.by_weight`: ties to the lower slot)
and weights normalised over the token's top-k, q_(1) >= q_(2) >= ...:

    keep rank r  iff  q_(1) + ... + q_(r-1) < p      # the smallest prefix whose mass reaches p

Choices: Huang et al. train a router whose cumulative softmax mass over all E experts is
thresholded; a pretrained top-k model is applied post hoc here, so the mass is over the model's
own top-k (the weights it actually mixes), which also makes the rule the same for renormalising
and non-renormalising routers. "Reaches" is >= p, sums are in float64. p = 1 keeps every slot
(neutral) without summing, so rounding in the cumulative sum can never drop a tiny last slot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext
from .params import check_bool, check_number
from .registry import register
from .slots import by_weight, keep_slots


@register
class TopP(Policy):
    name = "top_p"
    needs = ("ids", "weights")
    neutral = {"p": 1.0}

    def __init__(self, ctx: PolicyContext | RouterSpec, p: float = 0.9, renormalize: bool = True, backend: str = "auto"):
        super().__init__(ctx, backend)
        self.p = check_number(self.name, "p", p, 0.0, 1.0, lo_open=True)
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        return {"p": self.p, "renormalize": self.renormalize}

    def route(self, batch: BatchRouting):
        if self.p >= 1.0:
            return batch.ids, batch.weights
        w = batch.weights  # [L, B, k]
        slot = torch.arange(w.shape[-1], device=w.device).expand(w.shape)
        order, ws = by_weight(slot, w.double())  # [L, B, k] slot of rank r, its weight
        cum = ws.cumsum(-1)  # [L, B, k]
        before = F.pad(cum[..., :-1], (1, 0)) / cum[..., -1:].clamp_min(1e-300)  # mass of the ranks above r
        keep = torch.empty_like(slot, dtype=torch.bool).scatter_(-1, order, before < self.p)
        return keep_slots(batch.ids, w, keep, self.renormalize)
