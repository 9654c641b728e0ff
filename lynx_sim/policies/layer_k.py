"""`layer_k`: a per-layer top-k k_l under a total budget, learned from trace statistics.

In the spirit of LExI ("LExI: Layer-Adaptive Active Experts for Efficient MoE Model Inference",
Chitty-Venkata et al., 2025, arXiv 2509.02753; `../shared/LYNX.md` section 5): a per-layer top-k
chosen offline under a budget, no retraining. LExI profiles how much each layer's output moves
when its top-k shrinks (synthetic inputs through the real weights) and searches the allocation;
this simulator has routing only, so the sensitivity here is the routing mass a layer loses:

    c[l, j] = mean over routing-profile tokens of the (j+1)-th largest normalised top-k weight
              (profile.sorted_weights(), [N, L, k] -> [L, k]); keeping j+1 experts in layer l
              retains sum_{i<=j} c[l, i] of its mass on average
    budget  = floor(mean_k * L + 0.5) slots over the L layers, clamped to [L, k * L]
    k_l     = 1 for every layer, then greedily add the slot with the largest marginal gain
              c[l, k_l] until the budget is spent

Because each token's sorted weights fall, c[l, :] falls too, so the greedy choice is the
`budget - L` largest entries of c[:, 1:] (the marginal gains of slots 2..k). Ties go to the
lower slot rank, then to the lower layer: with equal gains everywhere (uniform weights) that
spreads the budget evenly, the remainder to the first layers. Per token, layer l then keeps
its k_l highest-weight slots, exactly as `static_k` does with k = k_l.

Choices: `mean_k` is a finite number in [1, E]; >= the model's top-k gives every layer k
(neutral). Its bound is E, not top_k, so that one configured value serves models with
top_k = 1 (a mean of experts per token above E means nothing). The budget rounds half
up; the routing profile comes from `RoutingProfile.from_source` (held-out requests where the
source has them, else in-sample, which the run summary says).
"""

from __future__ import annotations

import math

import torch

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext, PolicyInputError
from .params import check_bool, check_number
from .registry import register
from .slots import keep_slots
from .slots import keep_top_n


def allocate(gains: torch.Tensor, budget: int) -> torch.Tensor:
    """Greedy per-layer k: gains [L, k] (mean j-th sorted weight) and a slot budget -> k_l [L] int64."""
    L, k = gains.shape
    extra = min(max(budget, L), k * L) - L  # slots beyond each layer's top-1
    flat = gains[:, 1:].T.reshape(-1)  # [(k-1) * L], rank-major: ties go to the lower rank, then layer
    order = torch.sort(flat, descending=True, stable=True).indices[:extra]
    k_l = torch.ones(L, dtype=torch.int64, device=gains.device)
    return k_l.scatter_add_(0, order % L, torch.ones_like(order))


@register
class LayerK(Policy):
    name = "layer_k"
    needs = ("ids", "weights")
    needs_profile = True
    layer_state = ("k_per_layer",)

    @classmethod
    def neutral_params(cls, router: RouterSpec) -> dict:
        return {"mean_k": float(router.top_k)}  # every layer keeps k

    def __init__(self, ctx: PolicyContext | RouterSpec, mean_k: float = 1.5, renormalize: bool = True,
                 backend: str = "auto"):
        super().__init__(ctx, backend)
        E = self.router.num_experts
        self.mean_k = check_number(self.name, "mean_k", mean_k, 1.0, E,
                                   why=f" (mean experts per token, at most E={E}; >= top_k={self.router.top_k} changes nothing)")
        self.renormalize = check_bool(self.name, "renormalize", renormalize)
        self.k_per_layer: torch.Tensor | None = None  # [L] int64, set by prepare

    def params(self) -> dict:
        out = {"mean_k": self.mean_k, "renormalize": self.renormalize}
        if self.k_per_layer is not None:
            out["k_per_layer"] = self.k_per_layer.tolist()
        return out

    def prepare(self, profile) -> None:
        k = self.router.top_k
        if profile.ids.shape[-1] != k:
            raise ValueError(f"policy 'layer_k': routing profile has k={profile.ids.shape[-1]}, the model {k}")
        gains = profile.sorted_weights().mean(0)  # [L, k]
        budget = math.floor(self.mean_k * profile.num_layers + 0.5)
        self.k_per_layer = allocate(gains, budget)
        super().prepare(profile)

    def route(self, batch: BatchRouting):
        L = batch.ids.shape[0]
        if L != len(self.k_per_layer):
            raise PolicyInputError(f"policy 'layer_k': the batch has {L} MoE layers, the routing profile had "
                                   f"{len(self.k_per_layer)}")
        if bool((self.k_per_layer >= self.router.top_k).all()):
            return batch.ids, batch.weights
        keep = keep_top_n(batch.weights, self.k_per_layer.to(batch.weights.device)[:, None, None])  # [L, B, k]
        return keep_slots(batch.ids, batch.weights, keep, self.renormalize)
