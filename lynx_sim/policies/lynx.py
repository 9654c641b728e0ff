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
compiled kernels (`lynx_cpu.py`), with results equal to the torch path used elsewhere; on a GPU
the same configurations in float32 have the Triton kernels of `kernels/lynx_routing.py`, which
the executor runs. `backend` (auto | torch | compiled) chooses; `compiled_path` says which.

Parameters (checked in the constructor): alpha a finite number in [1e-4, 1e4]: bins are 1/alpha
logits wide, so narrower bins than 1e-4 would resolve float32 rounding of logits (spacing ~1e-6
at |z| ~ 10) rather than gaps, wider ones than 1e4 put every expert of any real router in bin 0
already; alpha stays a normal float32 (the kernels' precision) and alpha x gap cannot be NaN.
beta an int in 0..8: B**-beta stays a normal float32 for every B up to 55,000 (8 x log2(B) <=
126), the per-level tables [L, beta + 1, E] stay small, and the plugin's largest default is 4;
float64 mode refuses batches whose integer keys would round (see above). Router logits must be
finite (traces guarantee it; a NaN or inf logit is refused with its layer and token).

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
from .base import BatchRouting, Policy, PolicyContext, PolicyInputError, device_type
from .params import check_choice, check_int, check_number
from .registry import register

ARITHMETIC = {"float32": torch.float32, "float64": torch.float64}
TIE_BREAKS = ("lowest_index", "own_logit")
ALPHA_MIN, ALPHA_MAX = 1e-4, 1e4  # bin widths 1/alpha from 1e-4 to 1e4 logits (module docstring says why)
BETA_MAX = 8  # B**-beta normal in float32 for B <= 55,000; tables [L, beta + 1, E] small


def nonfinite_logits(layer: int, token: int) -> PolicyInputError:
    """The refusal of a batch with a NaN or infinite logit, naming the first such (layer, token)."""
    return PolicyInputError(f"policy 'lynx': logits: expected finite values, found a NaN or infinite logit "
                            f"at layer {layer}, token {token}")


@register
class Lynx(Policy):
    name = "lynx"
    needs = ("logits",)
    decode_only = True  # LYNX.md observation 3: prefill routing is never changed
    neutral = None  # no parameter makes Lynx the identity: alpha -> inf still ties inside bin 0

    def __init__(self, ctx: PolicyContext | RouterSpec, alpha: float, beta: int | None, arithmetic: str = "float32",
                 tie_break: str = "lowest_index", backend: str = "auto"):
        super().__init__(ctx, backend)
        router = self.router
        self.alpha = check_number(self.name, "alpha", alpha, ALPHA_MIN, ALPHA_MAX)
        sigmoid = router.kind == "sigmoid"  # sigmoid routers bin without a floor (LYNX.md section 3, router variants)
        if beta is not None or not sigmoid:
            beta = check_int(self.name, "beta", beta, 0, BETA_MAX, "" if sigmoid else f" for a {router.kind} router")
        self.beta = None if sigmoid else beta
        self.arithmetic = check_choice(self.name, "arithmetic", arithmetic, tuple(ARITHMETIC))
        self.tie_break = check_choice(self.name, "tie_break", tie_break, TIE_BREAKS)
        # the configurations the compiled kernels implement (numba on the CPU, Triton on a GPU)
        self._kernel_rule = router.kind == "softmax" and self.beta is not None and self.tie_break == "lowest_index"
        if self.backend == "compiled" and not self._kernel_rule:
            raise ValueError(f"policy 'lynx': backend: expected auto or torch for a {router.kind} router with "
                             f"tie_break={self.tie_break} (the compiled kernels cover softmax routers with a beta floor "
                             f"and tie_break=lowest_index), found 'compiled'")

    def compiled_path(self, where) -> bool:
        """Policy.compiled_path, with Lynx's selection kernels: for CPU tensors numba (lynx_cpu.py,
        either arithmetic, for the configurations `_kernel_rule` names; other configurations keep
        the compiled check and measures, and select in torch); for a GPU batch the Triton kernels
        of kernels/lynx_routing.py (float32 only), which the executor launches and checks against
        this policy, while lynx_sim itself runs the torch path there."""
        if device_type(where) != "cpu" and self.backend != "torch" and self._kernel_rule and self.arithmetic == "float32":
            return True
        return super().compiled_path(where)

    def _select_compiled(self, Z: torch.Tensor) -> bool:
        """The numba selection takes this batch: a CPU batch the compiled path takes, a kernel configuration."""
        return self._kernel_rule and device_type(Z) == "cpu" and self.compiled_path(Z)

    def _row_max(self, Z: torch.Tensor) -> torch.Tensor:
        """max_e Z, [L, B, 1], after checking that every logit is finite (a NaN or inf would make
        a bin NaN, and bins index the per-level tables)."""
        hi, lo = Z.amax(-1, keepdim=True), Z.amin(-1, keepdim=True)
        ok = torch.isfinite(hi) & torch.isfinite(lo)  # [L, B, 1]: NaN propagates into both
        if not bool(ok.all()):
            raise nonfinite_logits(*(~ok[..., 0]).nonzero()[0].tolist())
        return hi

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
        bins = torch.ceil(self.alpha * (Z - self._row_max(Z)))
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
        if device_type(bins) == "cpu" and self.compiled_path(bins):  # one compiled pass; counts are integers: exact
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
            key = key.masked_fill(~group_mask(logits, self.router), float("-inf"))
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
        bins = torch.ceil(self.alpha * (Z - self._row_max(Z))).clamp_min_(-self.beta)  # [L, B, E]
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
            score = score.masked_fill(~group_mask(Z, self.router), float("-inf"))
        return score

    def keep_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """KEEP [L, E] bool: the union over tokens of their picks."""
        picks = self.picks(logits)
        L, E = logits.shape[0], logits.shape[-1]
        return torch.zeros(L, E, dtype=torch.bool, device=logits.device).scatter_(-1, picks.reshape(L, -1), True)

    def route(self, batch: BatchRouting):
        Z = batch.logits.to(ARITHMETIC[self.arithmetic])  # [L, B, E]
        if self._select_compiled(Z):
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

    def _route_compiled(self, Z: torch.Tensor):
        from . import lynx_cpu

        z = Z.contiguous().numpy()
        if self.arithmetic == "float32":  # one compiled pass, bit-identical to _rank_tables
            bins, rank, floor_order, bad = lynx_cpu.rank_tables_f32(z, self.alpha, self.beta, self._level_table(Z.shape[1]))
            if bad >= 0:
                raise nonfinite_logits(*divmod(bad, Z.shape[1]))
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
