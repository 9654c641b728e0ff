"""`absolute_skip`: skip a lower-ranked expert whose normalised gate weight is small.

AdapMoE's adaptive sensitivity-based gating ("AdapMoE: Adaptive Sensitivity-based Expert Gating
and Management for Efficient MoE Inference", Zhong et al., ICCAD 2024);
`../shared/LYNX.md` section 5. Per token and MoE layer l, with its top-k weights normalised to
sum 1, q_i = w_i / sum_j w_j, and slots ranked by falling weight:

    drop slot i (rank >= 1)  if  q_i < threshold_l          # the top-1 is always kept

Choices: AdapMoE derives its thresholds from a per-layer sensitivity estimate for Mixtral's
top-2; this simulator has no layer outputs to measure sensitivity on, so
`threshold` is given: one value for every layer or a list of L per-layer values (checked
against the batch's layer count at select time), applied to every lower-ranked slot of any
top-k. Normalising over the top-k makes the rule the same for renormalising and
non-renormalising routers. Rank 0 is the largest weight, ties to the lower slot, so with
threshold above a tie the lower slot survives. threshold 0 drops nothing (neutral).
"""

from __future__ import annotations

import torch

from .registry import register
from .threshold_skip import ThresholdSkip


@register
class AbsoluteSkip(ThresholdSkip):
    name = "absolute_skip"
    default_threshold = 0.2

    def passes(self, weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        q = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)  # normalised over the top-k
        return q >= threshold
