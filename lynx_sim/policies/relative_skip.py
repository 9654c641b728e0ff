"""`relative_skip`: dynamic expert skipping relative to the top-1 weight.

"Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large
Language Models" (Lu et al., ACL 2024, arXiv 2402.14800), its dynamic skipping;
`../shared/LYNX.md` section 5. Per token and MoE layer l, with its slots ranked by falling weight w_1 >= w_2 >= ...:

    drop slot i (rank >= 1)  if  w_i < beta_l * w_1        # the top-1 is always kept

Choices: the paper states the rule for Mixtral's top-2 and sets beta_l per layer to the median
of w_2 / w_1 on profiling data; here `threshold` is either one beta for every layer or a list
of L per-layer values (checked against the batch's layer count at select time), applied to
every lower-ranked slot of any top-k. A slot tied with the top-1 weight is never dropped
(w_i = w_1 is not below beta * w_1 for beta <= 1). threshold 0 drops nothing (neutral).
`renormalize` true rescales the kept weights to the token's original sum (the paper's Mixtral
renormalises), false leaves them as they were.

"""

from __future__ import annotations

import torch

from .registry import register
from .threshold_skip import ThresholdSkip


@register
class RelativeSkip(ThresholdSkip):
    name = "relative_skip"
    default_threshold = 0.5

    def passes(self, weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return weights >= threshold * weights.amax(-1, keepdim=True)
