"""`vanilla`: the model's own top-k routing, unchanged. The baseline every speedup divides by."""

from __future__ import annotations

from .base import BatchRouting, Policy
from .registry import register


@register
class Vanilla(Policy):
    name = "vanilla"
    needs = ("ids",)

    def route(self, batch: BatchRouting):
        return batch.ids, batch.weights
