"""Validation of policy parameters: every rule checks each of its parameters in its constructor
with these, so nonsense (a float where an int is meant, inf, NaN, a bool for a number, a value
outside what the rule means) is refused before a run starts. Errors read
`policy '<name>': <param>: expected X, found Y`."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch


def _error(policy: str, name: str, expected: str, value) -> ValueError:
    return ValueError(f"policy '{policy}': {name}: expected {expected}, found {value!r}")


def check_bool(policy: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise _error(policy, name, "true or false", value)
    return value


def check_int(policy: str, name: str, value, lo: int, hi: int, why: str = "") -> int:
    """A real int (not a bool, not a float such as 2.0 or 2.5) in lo..hi."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not lo <= value <= hi:
        raise _error(policy, name, f"an int in {lo}..{hi}{why}", value)
    return int(value)


def check_number(policy: str, name: str, value, lo: float, hi: float, lo_open: bool = False, why: str = "") -> float:
    """A finite real number (not a bool) in [lo, hi], or (lo, hi] with lo_open."""
    ok = (not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
          and (lo < value if lo_open else lo <= value) and value <= hi)
    if not ok:
        raise _error(policy, name, f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]{why}", value)
    return float(value)


def check_choice(policy: str, name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise _error(policy, name, f"one of {', '.join(choices)}", value)
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
        from .base import PolicyInputError

        raise PolicyInputError(f"policy '{policy}': threshold: expected {L} per-layer values (one per MoE layer "
                               f"of this batch), found {len(threshold)}")
    return torch.tensor(threshold, dtype=like.dtype, device=like.device)[:, None, None]
