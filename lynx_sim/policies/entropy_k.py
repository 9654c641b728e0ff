"""`entropy_k`: each token's k from its router entropy: confident tokens use fewer experts.

Entropy-based adaptive k (`../shared/LYNX.md` section 5). The idea (router uncertainty as a
token's difficulty) runs through the dynamic-routing literature, e.g. the confidence threshold
and entropy loss of "Harder Tasks Need More Experts" (Huang et al., ACL 2024); no one paper
fixes a post-hoc mapping from entropy to k for a pretrained top-k model, so the mapping below
is ours. Per token and MoE layer:

    h   = H(softmax(z)) / log E          with router logits z [E] (softmax-scored routers)
    h   = H(w / sum w) / log k           without logits, or for sigmoid routers, over the top-k
    n   = k - k_min + 1                  the possible values k_min..k
    k_t = min(k, k_min + floor(n * h ** gamma))
    keep the token's k_t highest-weight slots (`slots.keep_top_n`)

Choices:
- Equal bins of h ** gamma, one per value of k_t, instead of ceil(k_min + (k - k_min) * h):
  the ceil form reaches k_min only at h = 0 exactly, which a softmax router never produces,
  so it would almost never go below k_min + 1.
- gamma (sharpness, > 0, default 1): above 1 pushes middling entropies toward k_min, below 1
  toward k.
- Sigmoid routers score experts independently, so a softmax of their logits is not their
  distribution; they use the top-k weights' entropy.
- `k_min` is an int in 1..top_k; k_min = top_k keeps every token's k slots (neutral), as do
  models with k = 1. gamma is a finite number in (0, 100]: at 100, h ** gamma < 0.006 for every
  h < 0.95, so larger values mean the same (every token short of near-uniform routing at k_min).
- Reads weights always (ranking, and the entropy without logits); logits when present.
"""

from __future__ import annotations

import math

import torch

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext
from .params import check_bool, check_int, check_number
from .registry import register
from .slots import keep_slots
from .slots import keep_top_n


@register
class EntropyK(Policy):
    name = "entropy_k"
    needs = ("ids", "weights")
    GAMMA_MAX = 100.0  # see the module docstring

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict:
        return {"k_min": router.top_k}

    def __init__(self, ctx: PolicyContext | RouterSpec, k_min: int = 1, gamma: float = 1.0, renormalize: bool = True,
                 backend: str = "auto"):
        super().__init__(ctx, backend)
        self.k_min = check_int(self.name, "k_min", k_min, 1, self.router.top_k, " (the model's top_k)")
        self.gamma = check_number(self.name, "gamma", gamma, 0.0, self.GAMMA_MAX, lo_open=True)
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        return {"k_min": self.k_min, "gamma": self.gamma, "renormalize": self.renormalize}

    def entropy(self, batch: BatchRouting) -> torch.Tensor:
        """Normalised router entropy h in [0, 1], [L, B]."""
        if batch.logits is not None and self.router.kind != "sigmoid":
            p = torch.softmax(batch.logits.float(), -1)  # [L, B, E]
            return torch.special.entr(p).sum(-1) / math.log(p.shape[-1])
        w = batch.weights.float()
        q = w / w.sum(-1, keepdim=True).clamp_min(1e-30)  # [L, B, k]
        return torch.special.entr(q).sum(-1) / math.log(q.shape[-1])

    def route(self, batch: BatchRouting):
        k = self.router.top_k
        if self.k_min >= k:
            return batch.ids, batch.weights
        h = self.entropy(batch).clamp(0.0, 1.0)  # [L, B]
        if self.gamma != 1.0:
            h = h ** self.gamma
        n = k - self.k_min + 1
        k_t = (self.k_min + torch.floor(n * h)).clamp_max(k)  # [L, B]
        keep = keep_top_n(batch.weights, k_t[..., None])  # [L, B, k]
        return keep_slots(batch.ids, batch.weights, keep, self.renormalize)
