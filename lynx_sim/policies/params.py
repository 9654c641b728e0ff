"""Validation of policy parameters shared by several rules; errors name policy, parameter,
expected and found."""

from __future__ import annotations

import math
from numbers import Real

import torch

from .base import PolicyInputError


def check_bool(policy: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"policy '{policy}': {name}: expected true or false, found {value!r}")
    return value


def parse_threshold(policy: str, value, lo: float, hi: float) -> float | tuple[float, ...]:
    """One number in [lo, hi], or a non-empty list of them (one per MoE layer)."""
    def ok(x):
        return not isinstance(x, bool) and isinstance(x, Real) and math.isfinite(x) and lo <= x <= hi

    expected = f"a number in [{lo}, {hi}] or a list of them, one per MoE layer"
    if ok(value):
        return float(value)
    try:
        values = tuple(value)
    except TypeError:
        values = ()
    if not values or not all(ok(x) for x in values):
        raise ValueError(f"policy '{policy}': threshold: expected {expected}, found {value!r}")
    return tuple(float(x) for x in values)


def per_layer(policy: str, threshold: float | tuple[float, ...], L: int, like: torch.Tensor) -> torch.Tensor:
    """The threshold as a [L, 1, 1] tensor of `like`'s dtype; a list must have L values."""
    if isinstance(threshold, float):
        return torch.full((L, 1, 1), threshold, dtype=like.dtype, device=like.device)
    if len(threshold) != L:
        raise PolicyInputError(f"policy '{policy}': threshold: expected {L} per-layer values (one per MoE layer "
                               f"of this batch), found {len(threshold)}")
    return torch.tensor(threshold, dtype=like.dtype, device=like.device)[:, None, None]
