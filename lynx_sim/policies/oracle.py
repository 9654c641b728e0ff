"""`oracle`: the cost-aware bound, per MoE layer and decode batch (`../shared/LYNX.md` section 5).

Chooses the expert set S minimising modelled MoE time plus a price on the routing mass it loses:

    J(S) = |S| x t  +  lambda x sum_{e not in S} W[e]
    t    = seconds of one more distinct expert in a memory-bound decode layer (ctx.expert_time_s,
           the roofline's expert bytes / bandwidth; LYNX.md section 1)
    W[e] = batch-summed normalised weight of e: sum over tokens of w[t, e] / sum_j w[t, j]

Slots on experts outside S are truncated (dropped), so J is separable per expert and the
optimum is exact and greedy:

    keep e  iff  W[e] >= t / lambda                 # lambda = lambda_us x 1e-6 s per unit of mass

No routing-only rule that truncates can reach a lower J on the same batch; the tests check this
against brute force over all subsets. Choices:
- Ties (lambda W[e] = t) are kept; an expert the batch does not use has W = 0 and is never
  needed. lambda_us is a finite number in [0, 1e9]: at 1e9 (1000 s of layer time per unit of
  mass) the threshold t / lambda is below 1e-9 for any expert time under 1 ms, so every expert
  carrying more than that share of one token's weight is kept (the neutral value); lambda_us = 0
  keeps none, so every token falls back to its top-1. expert_time_us: null or a finite number in
  [0, 1e6] (a second per expert already exceeds any GPU's by three orders of magnitude).
- Repair: a token left with no expert keeps its top-1 slot (slots.top1_slots). This adds
  experts the optimum dropped, so the output can cost more than min J: the bound is exact only
  where the repair does not trigger.
- `expert_time_us` (null: use the context) overrides t when given; with neither, t = 0 (a bare
  RouterSpec, as in unit tests): every expert is free and the rule keeps everything (vanilla).
- Weights without a trace's weights: uniform 1/k per slot. `renormalize` rescales the kept
  weights as slots.keep_slots. Decode-only, as Lynx: the cost model is decode's.
"""

from __future__ import annotations

import math

import torch

from ..routing import RouterSpec
from .base import BatchRouting, Policy, PolicyContext
from .batch_budget import expert_mass
from .params import check_bool, check_number
from .slots import top1_slots
from .registry import register
from .slots import keep_slots


@register
class Oracle(Policy):
    name = "oracle"
    needs = ("ids",)  # weights price the lost mass when present
    decode_only = True
    LAMBDA_MAX_US, EXPERT_TIME_MAX_US = 1e9, 1e6  # see the module docstring
    neutral = {"lambda_us": LAMBDA_MAX_US}

    def __init__(self, ctx: PolicyContext | RouterSpec, lambda_us: float = 100.0, expert_time_us: float | None = None,
                 renormalize: bool = True, backend: str = "auto"):
        super().__init__(ctx, backend)
        self.lambda_us = check_number(self.name, "lambda_us", lambda_us, 0.0, self.LAMBDA_MAX_US)
        self.expert_time_us = None if expert_time_us is None else check_number(
            self.name, "expert_time_us", expert_time_us, 0.0, self.EXPERT_TIME_MAX_US,
            why=", or null for the cost model's")
        self.renormalize = check_bool(self.name, "renormalize", renormalize)

    def params(self) -> dict:
        return {"lambda_us": self.lambda_us, "expert_time_us": self.expert_time_us, "renormalize": self.renormalize,
                "expert_time_us_used": self.expert_time_s * 1e6}

    @property
    def expert_time_s(self) -> float:
        return self.ctx.expert_time_s if self.expert_time_us is None else self.expert_time_us * 1e-6

    @property
    def threshold(self) -> float:
        """t / lambda: the least batch mass for which loading an expert pays."""
        t, lam = self.expert_time_s, self.lambda_us * 1e-6
        if t == 0:
            return 0.0
        return t / lam if lam > 0 else math.inf

    def mass(self, batch: BatchRouting) -> torch.Tensor:
        """W [L, E] float64: batch-summed normalised weight of every expert."""
        ids = batch.ids
        if batch.weights is None:
            w = torch.full(ids.shape, 1.0 / ids.shape[-1], dtype=torch.float64, device=ids.device)
        else:
            w = batch.weights.double()
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-300)
        return expert_mass(ids, w, self.router.num_experts)

    def kept_experts(self, batch: BatchRouting) -> torch.Tensor:
        """The optimal set S, [L, E] bool (before the repair)."""
        return self.mass(batch) >= self.threshold

    def route(self, batch: BatchRouting):
        ids, w = batch.ids, batch.weights  # [L, B, k]
        L, B, _ = ids.shape
        keep = self.kept_experts(batch)  # [L, E]
        in_keep = keep[:, None, :].expand(L, B, -1).gather(-1, ids)  # [L, B, k]
        if in_keep.all():
            return ids, w
        repair = top1_slots(batch) & ~in_keep.any(-1, keepdim=True)
        return keep_slots(ids, w, in_keep | repair, self.renormalize)
