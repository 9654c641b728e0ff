"""A plain reference of LYNX.md section 3, written as loops for reading, not speed: keys in exact
rational arithmetic (fractions), probabilities in float64."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def _argmax_first(values, banned):
    best, arg = -math.inf, -1
    for e, v in enumerate(values):
        if e not in banned and v > best:
            best, arg = v, e
    return arg


def lynx_reference(Z: np.ndarray, k: int, alpha: float, beta: int, renormalize: bool):
    """Z: [B, E] logits of one layer. Returns (ids [B, k], weights [B, k], keep: sorted list)."""
    Z = np.asarray(Z, dtype=np.float64)
    B, E = Z.shape
    bins = [[max(-beta, math.ceil(alpha * (Z[t, e] - Z[t].max()))) for e in range(E)] for t in range(B)]
    w = [[Fraction(B) ** bins[t][e] for e in range(E)] for t in range(B)]  # exact rationals
    S = [sum(w[t][e] for t in range(B)) for e in range(E)]
    keep = set()
    for t in range(B):
        key = [bins[t][e] + (S[e] - w[t][e]) / B for e in range(E)]
        picked = set()
        for _ in range(k):  # repeated argmax, ties to the lowest index
            picked.add(_argmax_first(key, picked))
        keep |= picked
    ids = np.zeros((B, k), dtype=np.int64)
    weights = np.zeros((B, k))
    for t in range(B):
        full = np.exp(Z[t] - Z[t].max())
        full /= full.sum()
        mass = sum(sorted(full, reverse=True)[:k])
        p = [full[e] if e in keep else -math.inf for e in range(E)]
        chosen = set()
        for j in range(k):
            e = _argmax_first(p, chosen)
            chosen.add(e)
            ids[t, j] = e
        sel = np.array([full[e] for e in ids[t]])
        weights[t] = sel / sel.sum() * (1.0 if renormalize else mass)
    return ids, weights, sorted(keep)


def lexicographic_picks(Z: np.ndarray, k: int, alpha: float, beta: int):
    """Each token's k picks under the pure lexicographic order LYNX.md states for float64:
    own bin, then the count of other tokens with e in bin 0, then in bin -1, ..., ties to lowest index."""
    Z = np.asarray(Z, dtype=np.float64)
    B, E = Z.shape
    bins = np.maximum(-beta, np.ceil(alpha * (Z - Z.max(1, keepdims=True)))).astype(int)
    picks = []
    for t in range(B):
        def key(e):
            others = [bins[u, e] for u in range(B) if u != t]
            return (bins[t, e], *[sum(1 for b in others if b == lvl) for lvl in range(0, -beta - 1, -1)], -e)
        picks.append(sorted(range(E), key=key, reverse=True)[:k])
    return picks
