"""Stand-in router logits for traces that lack them (opt-in: `approximate_missing=lowest_bin`).

Experts inside the recorded top-k get log(weight) when weights exist (for a softmax router
with renormalised weights these are the true logits up to a per-token constant, so gaps among
the top-k are exact) or 0 when they do not (all tied); every other expert gets a logit far
below, so Lynx puts it in its lowest bin. What is lost: the true gaps of the experts outside the
top-k, which decide Lynx's deeper bins. Runs that use this say so (`exact: false`).
"""

from __future__ import annotations

import torch

FAR_BELOW = -1.0e4


def fill_logits(ids: torch.Tensor, weights: torch.Tensor | None, num_experts: int) -> torch.Tensor:
    """ids [..., k] (and weights [..., k]) -> logits [..., E]."""
    inside = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device) if weights is None else torch.log(weights.float().clamp_min(1e-30))
    z = torch.full((*ids.shape[:-1], num_experts), FAR_BELOW, dtype=torch.float32, device=ids.device)
    return z.scatter_(-1, ids, inside)
