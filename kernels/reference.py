"""Plain references for the kernels: float64 on the CPU, a loop over experts.

`moe_reference` is what every kernel test compares against, and what benchmarks/kernels.py
times as the "loop over experts" baseline (in the activation dtype on the GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """x [T, H], w1 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], ids/weights [T, k]
    (id -1: a dropped slot) -> [T, H]: sum over slots of weight x W2 (SiLU(W1g x) * W1u x).
    `dtype`: the arithmetic (float64 for tests; None keeps the inputs' dtype)."""
    dt = dtype or x.dtype
    xs, out = x.to(dt), torch.zeros(x.shape[0], w2.shape[1], dtype=dt, device=x.device)
    I = w2.shape[2]
    for e in torch.unique(topk_ids[topk_ids >= 0]).tolist():
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        w = w1[e].to(dt)
        h = F.silu(xs[tok] @ w[:I].T) * (xs[tok] @ w[I:].T)
        out.index_add_(0, tok, (h @ w2[e].to(dt).T) * topk_weights[tok, slot].to(dt)[:, None])
    return out
