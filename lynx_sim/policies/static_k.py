"""`static_k`: every token keeps its k highest-weight experts, the simplest expert reduction.

The baseline every adaptive rule should beat (`../shared/LYNX.md` section 5, "static smaller
k"): run the model with a smaller top-k at inference, no retraining. Per token, of the model's
k slots ranked by falling weight (`slots.by_weight`: ties to the lower slot), keep the first
`k`; the others become DROPPED.

Choices (no paper fixes them):
- `k` is an int in 1..top_k (k = top_k is the model's own routing, the neutral value); larger
  values are refused as meaningless rather than read as top_k.
- Reads weights: slots are ranked by them, and a trace without weights has unordered ids
  (lynx_sim/traces/convert.py), so there is nothing to rank by; select() refuses such a batch.
- Kept slots stay in their original positions (only the dropped ones change), so a neutral k
  returns the model's routing exactly even in traces whose slots are not sorted by weight.

"""

from __future__ import annotations

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext
from .params import check_bool, check_int
from .registry import register
from .slots import keep_slots, keep_top_n


@register
class StaticK(Policy):
    name = "static_k"
    needs = ("ids", "weights")

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict:
        return {"k": router.top_k}

    def __init__(self, ctx: PolicyContext | RouterSpec, k: int = 1, renormalize: bool = True, backend: str = "auto"):
        super().__init__(ctx, backend)
        self.k = check_int(self.name, "k", k, 1, self.router.top_k, " (the model's top_k)")
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        return {"k": self.k, "renormalize": self.renormalize}

    def route(self, batch: BatchRouting):
        if self.k >= self.router.top_k:
            return batch.ids, batch.weights
        keep = keep_top_n(batch.weights, self.k)  # [L, B, k]
        return keep_slots(batch.ids, batch.weights, keep, self.renormalize)
