"""Seeded random weights of one MoE layer with a model's real dimensions, in several copies.

Decode time is weight streaming, and random values stream like trained ones. Repeats rotate
through the copies so that the L2 cache (50 MB on an H100) cannot hold one call's expert
weights for the next: enough copies that consecutive calls touch at least 4x the L2 size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerWeights:
    w1: torch.Tensor  # [E, 2I, H]: gate rows, then up rows
    w2: torch.Tensor  # [E, H, I]
    x: torch.Tensor  # [B, H] the layer's input activations for this copy


def copies_needed(l2_bytes: int, min_active_bytes: float, cap: int = 8) -> int:
    """Weight sets to rotate so that a call never finds the previous calls' weights in L2."""
    if l2_bytes <= 0 or min_active_bytes <= 0:
        return 1
    return max(1, min(cap, int(-(-4 * l2_bytes // min_active_bytes))))


def make_layers(num_experts: int, hidden: int, intermediate: int, batch: int, copies: int, dtype: torch.dtype,
                device: str, seed: int) -> list[LayerWeights]:
    """`copies` independent layers, N(0, 1/fan_in) weights (unit-scale outputs), seeded."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(copies):
        w1 = torch.empty(num_experts, 2 * intermediate, hidden, dtype=dtype, device=device)
        w2 = torch.empty(num_experts, hidden, intermediate, dtype=dtype, device=device)
        for e in range(num_experts):  # expert by expert: the float32 staging stays small
            w1[e] = (torch.randn(2 * intermediate, hidden, generator=g) / hidden ** 0.5).to(dtype)
            w2[e] = (torch.randn(hidden, intermediate, generator=g) / intermediate ** 0.5).to(dtype)
        x = torch.randn(batch, hidden, generator=g).to(dtype).to(device)
        out.append(LayerWeights(w1, w2, x))
    return out
