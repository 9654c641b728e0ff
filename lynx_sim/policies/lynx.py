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

On the CPU, softmax routers with a beta floor and the plugin's tie-break run the selection in
compiled kernels (`lynx_cpu.py`), with results equal to the torch path used elsewhere.

Router kinds: softmax (as above); sigmoid (bins on raw logits, no beta floor, sigmoid of the
chosen logits as weights); grouped top-k (DeepSeek-V2/V3): bins and batch scores on the raw
logits over all E experts, but each token picks only inside its own `topk_group` best groups
(keys outside them masked), and the remap takes the top-k of the group-processed scores masked
by KEEP. Our choice where LYNX.md is terse: the mass of a non-renormalising grouped router is the
sum of the token's original (group-restricted) top-k weights.
"""

from __future__ import annotations

import torch

from ..routing import RouterSpec, group_mask, route, topk_lowest_index, topk_set
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
            scale = self._exact_scale(B)
            w = torch.pow(torch.tensor(float(B), dtype=Z.dtype, device=Z.device), bins + self.beta)  # integers
            return bins * scale + (w.sum(-2, keepdim=True) - w), bins
        w = torch.pow(torch.tensor(float(B), dtype=Z.dtype, device=Z.device), bins)  # [L, B, E]
        S = self._column_sums(bins, B, Z.dtype)[:, None, :] if self.beta is not None else w.sum(-2, keepdim=True)
        return bins + (S - w) / B, bins

    def _column_sums(self, bins: torch.Tensor, B: int, dtype) -> torch.Tensor:
        """S[l, e] = sum over tokens of B**bin, [L, E], summed per level in a fixed order:
        sum_j n_j[e] x B**-j (n_j: tokens with e in bin -j). Mathematically the column sum; in
        float32 its rounding is fixed by this order (the plugin's atomic adds have none), and it
        is exact for power-of-two B. In float64 mode the caller scales it to integers."""
        dev = bins.device
        levels = -torch.arange(self.beta + 1, dtype=dtype, device=dev)
        table = torch.pow(torch.tensor(float(B), dtype=dtype, device=dev), levels)  # [J]
        if bins.device.type == "cpu":  # one compiled pass; counts are integers, so exact either way
            from .lynx_cpu import level_counts

            n = torch.from_numpy(level_counts(bins.contiguous().numpy(), self.beta + 1)).to(dtype)  # [L, J, E]
        else:
            n = torch.stack([(bins == -j).sum(-2) for j in range(self.beta + 1)], 1).to(dtype)
        S = torch.zeros(bins.shape[0], bins.shape[-1], dtype=dtype, device=dev)
        for j in range(self.beta + 1):
            S += n[:, j] * table[j]
        return S

    def _exact_scale(self, B: int) -> float:
        """B**(beta+1), the float64 key scale; refuses batches where integers would round."""
        scale = float(B) ** (self.beta + 1)
        if (self.beta + 1) * scale >= 2.0 ** 53:
            raise ValueError(f"policy 'lynx': float64 keys are exact only while (beta+1) * B**(beta+1) < 2**53; "
                             f"B={B}, beta={self.beta} exceeds it (use arithmetic=float32 or a smaller beta)")
        return scale

    def picks(self, logits: torch.Tensor) -> torch.Tensor:
        """Pruning, per token: the k experts with the largest keys, [L, B, k] (order not meaningful)."""
        if self.beta is not None and self.tie_break == "lowest_index":
            return self._picks_ranked(logits)
        key, _ = self.keys(logits)
        return self._picks_sorted(logits, key)

    def _picks_sorted(self, logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Plain top-k of the key with the configured tie-break (the reference path)."""
        k = self.router.top_k
        if self.router.kind == "grouped_topk":  # a token may pick only inside its own groups
            key = key.masked_fill(~group_mask(torch.softmax(logits, dim=-1), self.router), float("-inf"))
        if self.tie_break == "own_logit":
            by_logit = torch.sort(logits, dim=-1, descending=True, stable=True).indices
            order = torch.sort(key.gather(-1, by_logit), dim=-1, descending=True, stable=True).indices
            return by_logit.gather(-1, order[..., :k])
        return topk_lowest_index(key, k)[1]

    def _picks_ranked(self, logits: torch.Tensor) -> torch.Tensor:
        """The same picks without sorting every row (fast path, bins with a floor)."""
        return topk_set(self._ranked_scores(logits), self.router.top_k)

    def _rank_tables(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bins [L, B, E] and each expert's rank inside every bin level, rank [L, J, E] (0 = first).

        Inside one bin level j every token adds the same B**j to its own count, so experts of
        that level rank by a per-layer value v_j[e] = j + (S[e] - B**j) / B, computed with the
        very operations the per-element key uses (bit-identical in either arithmetic)."""
        L, B, E = Z.shape
        bins = torch.ceil(self.alpha * (Z - Z.amax(-1, keepdim=True))).clamp_min_(-self.beta)  # [L, B, E]
        base = torch.tensor(float(B), dtype=Z.dtype, device=Z.device)
        levels = -torch.arange(self.beta + 1, dtype=Z.dtype, device=Z.device)  # [J]: 0, -1, ..., -beta
        if self.arithmetic == "float64":  # integer-scaled, as keys(): exact
            scale = self._exact_scale(B)
            S = torch.pow(base, bins + self.beta).sum(-2)  # [L, E]
            v = levels[:, None] * scale + (S[:, None, :] - torch.pow(base, levels + self.beta)[:, None])
        else:
            S = self._column_sums(bins, B, Z.dtype)  # [L, E]
            v = levels[:, None] + (S[:, None, :] - torch.pow(base, levels)[:, None]) / B  # [L, J, E]
        order = torch.sort(v, dim=-1, descending=True, stable=True).indices  # [L, J, E]
        self._floor_order = order[:, -1, :]  # [L, E]: experts by rank inside the floor level
        return bins, torch.empty_like(order).scatter_(-1, order, torch.arange(E, device=Z.device).expand_as(order))

    def _ranked_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Unique integer scores [L, B, E] whose per-token top-k are the picks: bin x E + (E - 1
        - rank of the expert inside the token's own level); their order is the key's order with
        ties to the lowest index."""
        Z = logits.to(ARITHMETIC[self.arithmetic])
        E = Z.shape[-1]
        bins, rank = self._rank_tables(Z)
        own = torch.gather(rank, 1, (-bins).long()).to(Z.dtype)  # [L, B, E]
        score = bins * E + (E - 1) - own
        if self.router.kind == "grouped_topk":
            score = score.masked_fill(~group_mask(torch.softmax(Z, dim=-1), self.router), float("-inf"))
        return score

    def keep_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """KEEP [L, E] bool: the union over tokens of their picks."""
        picks = self.picks(logits)
        L, E = logits.shape[0], logits.shape[-1]
        return torch.zeros(L, E, dtype=torch.bool, device=logits.device).scatter_(-1, picks.reshape(L, -1), True)

    def route(self, batch: BatchRouting):
        Z = batch.logits.to(ARITHMETIC[self.arithmetic])  # [L, B, E]
        if self._compiled_path(Z):
            return self._route_compiled(Z)
        keep = self.keep_mask(Z)
        if self.router.kind != "softmax":
            ids, w = route(Z, self.router, allowed=keep[:, None, :])  # remapping
            if self.router.kind == "grouped_topk" and not self.router.renormalize:
                mass = route(Z, self.router)[1].sum(-1, keepdim=True)  # the token's original top-k mass
                w = w / w.sum(-1, keepdim=True) * mass
            return ids, w.float()
        # softmax: the top-k of softmax(Z) over KEEP are the top-k of the masked logits, and their
        # renormalised weights are the softmax of those k logits alone
        top, ids = topk_lowest_index(Z.masked_fill(~keep[:, None, :], float("-inf")), self.router.top_k)
        w = torch.softmax(top, dim=-1)
        if not self.router.renormalize:
            w = w * self._topk_mass(Z, batch)
        return ids, w.float()

    def _compiled_path(self, Z: torch.Tensor) -> bool:
        """The numba selection serves softmax routers with a beta floor and the plugin's tie-break, on the CPU."""
        return (Z.device.type == "cpu" and self.router.kind == "softmax" and self.beta is not None
                and self.tie_break == "lowest_index")

    def _route_compiled(self, Z: torch.Tensor):
        from . import lynx_cpu

        z = Z.contiguous().numpy()
        if self.arithmetic == "float32":  # one compiled pass, bit-identical to _rank_tables
            bins, rank, floor_order = lynx_cpu.rank_tables_f32(z, self.alpha, self.beta, self._level_table(Z.shape[1]))
        else:
            bins, rank = (t.numpy() for t in self._rank_tables(Z))
            floor_order = self._floor_order.contiguous().numpy()
        batched = z.shape[-1] * z.shape[-2] <= lynx_cpu.BATCHED_MAX
        select = lynx_cpu.lynx_select_batched if batched else lynx_cpu.lynx_select
        _, ids, w = select(bins, rank, floor_order, z, self.router.top_k, not self.router.renormalize)
        return torch.from_numpy(ids), torch.from_numpy(w).float()

    def _level_table(self, B: int):
        """B**-j for j = 0..beta in float32, as torch computes it (the kernels' column-sum terms)."""
        cache = self.__dict__.setdefault("_tables", {})
        if B not in cache:
            levels = -torch.arange(self.beta + 1, dtype=torch.float32)
            cache[B] = torch.pow(torch.tensor(float(B), dtype=torch.float32), levels).numpy()
        return cache[B]

    def _topk_mass(self, Z: torch.Tensor, batch: BatchRouting) -> torch.Tensor:
        """mass_t: the sum of the k largest full-softmax probabilities, [L, B, 1]."""
        top = torch.topk(Z, self.router.top_k, dim=-1).values
        return torch.exp(torch.logsumexp(top, -1, keepdim=True) - torch.logsumexp(Z, -1, keepdim=True))
