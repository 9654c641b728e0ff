"""`lynx`: batch-aware expert selection by AffinityBinning (`../shared/LYNX.md` section 3).

Per MoE layer and per all-decode batch of B rows, with router logits Z [L, B, E]:

    gap  = Z - max_e Z                                  # [L, B, E], <= 0
    bin  = max(-beta, ceil(alpha * gap))                # integers in {-beta..0}; top expert in 0
    w    = B ** bin                                     # [L, B, E]
    mass = sum of the k largest softmax(Z) per row      # [L, B]
    S    = sum_t w                                      # [L, 1, E], over all E experts
    key  = bin + (S - w) / B                            # own bin, then popularity among others
    KEEP = union over tokens of top-k(key)              # ties -> lowest expert index
    ids, weights = top-k of the router restricted to KEEP; weights renormalised to 1 if the
                   model renormalises, else scaled to sum to mass

Arithmetic: `float32` reproduces the public plugin's precision (its deepest popularity levels
can vanish in rounding); `float64` computes the key scaled by B ** (beta + 1), all in integers,
which makes it exactly lexicographic (own bin, then the count of other tokens with e in bin 0,
then in bin -1, ...) while (beta + 1) * B ** (beta + 1) < 2 ** 53. Sigmoid routers have no beta
floor, so their float64 key is the plain formula in float64 (not guaranteed exact).
Tie-break: `lowest_index` as the plugin's repeated argmax; `own_logit` orders equal keys by the
token's own logit first, so a confident token keeps its top-1 even at B = 1.

Router kinds: softmax (as above) and sigmoid (bins on raw logits, no beta floor, sigmoid of the
chosen logits as weights). Grouped top-k routers arrive with the policies issue and raise here.
"""

from __future__ import annotations

import torch

from ..routing import RouterSpec, route, topk_lowest_index
from .base import BatchRouting, Policy, PolicyContext
from .registry import register

ARITHMETIC = {"float32": torch.float32, "float64": torch.float64}
TIE_BREAKS = ("lowest_index", "own_logit")


@register
class Lynx(Policy):
    name = "lynx"
    needs = ("logits",)
    decode_only = True  # LYNX.md observation 3: prefill routing is never changed
    neutral = None  # no parameter makes Lynx the identity: alpha -> inf still ties inside bin 0

    def __init__(self, ctx: PolicyContext | RouterSpec, alpha: float, beta: int | None, arithmetic: str = "float32",
                 tie_break: str = "lowest_index"):
        super().__init__(ctx)
        router = self.router
        if router.kind == "grouped_topk":
            raise ValueError("policy 'lynx': grouped top-k routers are not supported yet (softmax and sigmoid are)")
        if not alpha > 0:
            raise ValueError(f"policy 'lynx': alpha: expected > 0, found {alpha}")
        if router.kind == "sigmoid":
            beta = None  # sigmoid routers bin without a floor (LYNX.md section 3, router variants)
        elif beta is None or int(beta) < 0:
            raise ValueError(f"policy 'lynx': beta: expected an int >= 0 for a {router.kind} router, found {beta}")
        if arithmetic not in ARITHMETIC:
            raise ValueError(f"policy 'lynx': arithmetic: expected one of {sorted(ARITHMETIC)}, found {arithmetic!r}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"policy 'lynx': tie_break: expected one of {TIE_BREAKS}, found {tie_break!r}")
        self.alpha, self.beta = float(alpha), None if beta is None else int(beta)
        self.arithmetic, self.tie_break = arithmetic, tie_break

    def params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "arithmetic": self.arithmetic, "tie_break": self.tie_break}

    def keys(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Binning and batch scoring: (key [L, B, E], bin [L, B, E]) in the chosen arithmetic.

        float64 with a beta floor computes key x B**(beta+1), in which every term is an integer
        (w x B**beta = B**(bin+beta)), so sums are exact in any order and ties stay ties; the
        scaling is monotone, so the order is the key's own.
        """
        Z = logits.to(ARITHMETIC[self.arithmetic])
        B = Z.shape[-2]
        bins = torch.ceil(self.alpha * (Z - Z.amax(-1, keepdim=True)))
        if self.beta is not None:
            bins = bins.clamp_min(-self.beta)
        if self.arithmetic == "float64" and self.beta is not None:
            scale = float(B) ** (self.beta + 1)
            if (self.beta + 1) * scale >= 2.0 ** 53:
                raise ValueError(f"policy 'lynx': float64 keys are exact only while (beta+1) * B**(beta+1) < 2**53; "
                                 f"B={B}, beta={self.beta} exceeds it")
            w = torch.pow(torch.tensor(float(B), dtype=Z.dtype), bins + self.beta)  # integers
            return bins * scale + (w.sum(-2, keepdim=True) - w), bins
        w = torch.pow(torch.tensor(float(B), dtype=Z.dtype), bins)  # [L, B, E]
        S = w.sum(-2, keepdim=True)  # [L, 1, E]
        return bins + (S - w) / B, bins

    def picks(self, logits: torch.Tensor) -> torch.Tensor:
        """Pruning, per token: the k experts with the largest keys, [L, B, k]."""
        key, _ = self.keys(logits)
        k = self.router.top_k
        if self.tie_break == "own_logit":
            by_logit = torch.sort(logits, dim=-1, descending=True, stable=True).indices
            order = torch.sort(key.gather(-1, by_logit), dim=-1, descending=True, stable=True).indices
            return by_logit.gather(-1, order[..., :k])
        return topk_lowest_index(key, k)[1]

    def keep_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """KEEP [L, E] bool: the union over tokens of their picks."""
        picks = self.picks(logits)
        L, E = logits.shape[0], logits.shape[-1]
        return torch.zeros(L, E, dtype=torch.bool, device=logits.device).scatter_(-1, picks.reshape(L, -1), True)

    def route(self, batch: BatchRouting):
        Z = batch.logits.to(ARITHMETIC[self.arithmetic])  # [L, B, E]
        keep = self.keep_mask(Z)
        ids, w = route(Z, self.router, allowed=keep[:, None, :])  # remapping
        if self.router.kind == "softmax" and not self.router.renormalize:
            mass = topk_lowest_index(torch.softmax(Z, dim=-1), self.router.top_k)[0].sum(-1, keepdim=True)
            w = w / w.sum(-1, keepdim=True) * mass
        return ids, w.float()
