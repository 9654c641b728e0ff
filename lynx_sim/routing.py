"""What a router is, and the model's own top-k routing from router logits.

One place for the three router kinds of `../shared/LYNX.md` section 3, used by the synthetic
generator (to derive ids and weights from the logits it draws) and by the policies (vanilla
routing and Lynx's remapping). Ties always go to the lowest expert index (stable sort), the
rule the Lynx plugin's repeated argmax follows, so results do not depend on the torch build.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ROUTER_KINDS = ("softmax", "grouped_topk", "sigmoid")


@dataclass(frozen=True)
class RouterSpec:
    """Router settings of one model. E = num_experts, k = top_k."""

    num_experts: int
    top_k: int
    kind: str = "softmax"
    renormalize: bool = True
    n_group: int = 1  # grouped_topk: expert groups, and how many a token may use
    topk_group: int = 1

    def __post_init__(self):
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind: expected one of {ROUTER_KINDS}, found {self.kind!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k: expected 1..num_experts={self.num_experts}, found {self.top_k}")
        if self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"n_group={self.n_group}, topk_group={self.topk_group}: groups must divide "
                             f"num_experts={self.num_experts} and 1 <= topk_group <= n_group")

    @classmethod
    def from_meta(cls, meta) -> "RouterSpec":
        """From a trace's TraceMeta."""
        return cls(meta.num_experts, meta.top_k, meta.router, meta.renormalize, meta.n_group, meta.topk_group)

    @classmethod
    def from_cfg(cls, moe) -> "RouterSpec":
        """From the `moe` section of a `conf/model/*.yaml`."""
        return cls(int(moe.num_experts), int(moe.top_k), str(moe.router), bool(moe.renormalize),
                   int(moe.get("n_group", 1)), int(moe.get("topk_group", 1)))


def _largest(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest values per row, descending (order among equal values unspecified).

    On the CPU numpy's introselect (argpartition) plus a sort of the n chosen is about three
    times faster than torch.topk at the shapes the simulator uses; elsewhere torch.topk."""
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64) or scores.dim() == 0:
        return torch.topk(scores, n, dim=-1, sorted=True)
    x = scores.detach().numpy()
    E = x.shape[-1]
    part = np.argpartition(x, E - n, axis=-1)[..., E - n:] if n < E else np.broadcast_to(np.arange(n), x.shape).copy()
    vals = np.take_along_axis(x, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return (torch.from_numpy(np.take_along_axis(vals, order, -1)),
            torch.from_numpy(np.take_along_axis(part, order, -1).astype(np.int64)))


def topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, descending, ties to the lowest index: (values, indices).

    Fast path: the k+1 largest in any order among equal values; only rows with a tie among
    those k+1 values (the only rows where that order can matter) are redone with a stable
    sort, which orders equal values by index.
    """
    E = scores.shape[-1]
    if k >= E:
        values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        return values[..., :k], order[..., :k]
    values, idx = _largest(scores, k + 1)
    tie = (values[..., 1:] == values[..., :-1]).any(-1)
    values, idx = values[..., :k], idx[..., :k]
    if tie.any():
        v2, o2 = torch.sort(scores[tie], dim=-1, descending=True, stable=True)
        values, idx = values.clone(), idx.clone()
        values[tie], idx[tie] = v2[..., :k], o2[..., :k]
    return values, idx


def topk_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values per row, in no particular order: exact when each row's
    values are distinct (the caller's guarantee). [..., k] int64."""
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64) and k < scores.shape[-1]:
        E = scores.shape[-1]
        return torch.from_numpy(np.argpartition(scores.numpy(), E - k, axis=-1)[..., E - k:].astype(np.int64))
    return torch.topk(scores, k, dim=-1, sorted=False).indices


def group_mask(scores: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Grouped top-k: True for experts in the token's `topk_group` best groups (group score = max).
    `scores` may be the logits or any increasing function of them: the groups are the same."""
    *lead, E = scores.shape
    groups = scores.reshape(*lead, spec.n_group, E // spec.n_group).amax(-1)  # [..., G]
    _, keep = topk_lowest_index(groups, spec.topk_group)
    gmask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return gmask.repeat_interleave(E // spec.n_group, dim=-1)


def scores_from_logits(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The router's per-expert scores: softmax probabilities, or sigmoids for sigmoid routers."""
    if spec.kind == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def route(logits: torch.Tensor, spec: RouterSpec, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's top-k routing. logits: [..., E]; allowed: optional bool mask [..., E] (broadcast).

    Returns ids [..., k] (int64, by falling score) and weights [..., k]: the router's scores
    (softmax over all E experts, or sigmoids) of the chosen experts, renormalised to sum 1 when
    the model does so. Grouped routers (DeepSeek-V2 style) first restrict each token to its
    `topk_group` best groups (group score = its best expert's score), then take the top-k of the
    unmasked scores. `allowed` restricts the choice the same way (softmax over all E).

    Choices are made on the logits, which order experts exactly as the scores do (softmax and
    sigmoid are increasing) without the rounding of an exp: two distinct logits never tie, so a
    choice never depends on the exp kernel the CPU happens to run."""
    scores = scores_from_logits(logits, spec)
    mask = allowed
    if spec.kind == "grouped_topk":
        gm = group_mask(logits, spec)
        mask = gm if mask is None else (mask & gm)
    by = logits if mask is None else logits.masked_fill(~mask, float("-inf"))
    ids = topk_lowest_index(by, spec.top_k)[1]
    w = scores.gather(-1, ids)
    if spec.renormalize:
        w = w / w.sum(-1, keepdim=True)
    return ids, w


def route_exact(logits: np.ndarray, spec: RouterSpec) -> tuple[np.ndarray, np.ndarray]:
    """`route` without a mask, bit-identical on every machine (the synthetic generator's routing):
    ids [..., k] int64 chosen on the logits as `route` does, weights [..., k] float32 computed in
    float64 by `lynx_sim.numerics` (no CPU-dependent exp, sums in a fixed order)."""
    from . import numerics

    z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    by = z.masked_fill(~group_mask(z, spec), float("-inf")) if spec.kind == "grouped_topk" else z
    ids = topk_lowest_index(by, spec.top_k)[1].numpy()
    if spec.kind == "sigmoid":
        w = numerics.sigmoid(np.take_along_axis(z.numpy(), ids, -1))
        if spec.renormalize:
            w = w / numerics.sequential_sum(w)[..., None]
    else:
        w = numerics.softmax_topk_weights(z.numpy(), ids, spec.renormalize)
    return ids, w.astype(np.float32)
