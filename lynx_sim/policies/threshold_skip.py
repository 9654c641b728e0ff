"""What `relative_skip` and `absolute_skip` share: a threshold (one number or one per MoE layer),
the renormalise switch, and "never drop the top-1 slot"; each rule says only which slots pass."""

from __future__ import annotations

import torch

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext
from .params import check_bool, parse_threshold, per_layer
from .slots import keep_slots, top1_slots


class ThresholdSkip(Policy):
    needs = ("ids", "weights")
    neutral = {"threshold": 0.0}
    default_threshold = 0.5

    def __init__(self, ctx: PolicyContext | RouterSpec, threshold=None, renormalize: bool = True, backend: str = "auto"):
        super().__init__(ctx, backend)
        self.threshold = parse_threshold(self.name, self.default_threshold if threshold is None else threshold, 0.0, 1.0)
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        t = self.threshold
        return {"threshold": t if isinstance(t, float) else list(t), "renormalize": self.renormalize}

    def passes(self, weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """[L, B, k] bool: the slots the rule keeps; threshold is [L, 1, 1]."""
        raise NotImplementedError

    def route(self, batch: BatchRouting):
        w = batch.weights  # [L, B, k]
        keep = self.passes(w, per_layer(self.name, self.threshold, w.shape[0], w)) | top1_slots(batch)
        return keep_slots(batch.ids, w, keep, self.renormalize)
