"""Compiled CPU kernels for `lynx` (numba): level counts and the per-token selections.

torch computes what carries Lynx's arithmetic (bins, the float sums of B**-j, the per-level rank
tables, see `Lynx._rank_tables`); these kernels do the integer and selection work:
- `level_counts`: tokens per expert in each bin level (exact integers, order-free);
- `lynx_select`, per layer and token: the picks (experts above the floor bin by score, then the
  layer's floor order, which ranks floor experts the same for every token: together exactly
  the top-k of the unique scores), KEEP as their union, then the remap: the k largest logits
  inside KEEP (branch-free mask, ties to the lowest index) and their weights.
On the CPU they are several times faster than sorting or partitioning every row
(benchmarks/RESULTS.md); results equal the torch path, which the GPU uses (tests/test_lynx.py
checks it on random inputs with ties, in both arithmetics).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _insert(vals, idx, n, v, e):
    """Put (v, e) into the falling buffer holding n entries (n < capacity: it grows; else the
    last entry falls out). Placed after equal values, so a scan in index order keeps ties stable."""
    j = n if n < vals.shape[0] else n - 1
    while j > 0 and vals[j - 1] < v:
        vals[j] = vals[j - 1]
        idx[j] = idx[j - 1]
        j -= 1
    vals[j] = v
    idx[j] = e


@njit(cache=True, nogil=True, boundscheck=False)
def lynx_select(bins, rank, floor_order, logits, k, with_mass):
    """bins [L, B, E] (0..-beta), rank [L, J, E] int64 (rank of each expert inside each level),
    floor_order [L, E] (experts by rank inside the floor level -beta), logits [L, B, E].

    Returns keep [L, E] bool, ids [L, B, k] int64 (falling logit) and their weights [L, B, k]:
    the softmax of the k chosen logits, times the row's top-k softmax mass when with_mass (for
    models that do not renormalise)."""
    L, B, E = logits.shape
    J = rank.shape[1]
    floor = -(J - 1)
    keep = np.zeros((L, E), dtype=np.bool_)
    ids = np.empty((L, B, k), dtype=np.int64)
    weights = np.empty((L, B, k), dtype=np.float64)
    masked = np.empty(E, dtype=logits.dtype)
    sv = np.empty(k, dtype=np.int64)  # per-token buffers, falling
    si = np.empty(k, dtype=np.int64)
    tv = np.empty(k, dtype=logits.dtype)  # remap buffer; fv: the whole row's top-k (for the mass)
    ti = np.empty(k, dtype=np.int64)
    fv = np.empty(k, dtype=logits.dtype)
    fi = np.empty(k, dtype=np.int64)
    for l in range(L):
        for t in range(B):
            # picks: experts above the floor bin (few) by score, then floor experts in the
            # layer's floor order (the same for every token): the top-k of the scores
            n = 0
            for e in range(E):
                b = np.int64(bins[l, t, e])
                if b > floor:
                    v = b * E + (E - 1) - rank[l, -b, e]
                    if n < k or v > sv[k - 1]:
                        _insert(sv, si, n, v, e)
                        n = min(n + 1, k)
            r = 0
            while n < k:
                e = floor_order[l, r]
                r += 1
                if np.int64(bins[l, t, e]) == floor:
                    si[n] = e
                    n += 1
            for j in range(k):
                keep[l, si[j]] = True
        for e in range(E):
            masked[e] = 0.0 if keep[l, e] else -np.inf
        for t in range(B):  # remap: top-k logits inside KEEP (and of the whole row)
            n = 0
            m = 0
            for e in range(E):
                z = logits[l, t, e]
                v = z + masked[e]
                if n < k or v > tv[k - 1]:
                    _insert(tv, ti, n, v, e)
                    n = min(n + 1, k)
                if with_mass and (m < k or z > fv[k - 1]):
                    _insert(fv, fi, m, z, e)
                    m = min(m + 1, k)
            den = 0.0
            for j in range(k):
                ids[l, t, j] = ti[j]
                weights[l, t, j] = np.exp(np.float64(tv[j]) - tv[0])
                den += weights[l, t, j]
            scale = 1.0 / den
            if with_mass:  # sum_j exp(full_j - zmax) / sum_e exp(z_e - zmax)
                zmax = np.float64(fv[0])
                top_mass = 0.0
                for j in range(k):
                    top_mass += np.exp(np.float64(fv[j]) - zmax)
                row = 0.0
                for e in range(E):
                    row += np.exp(np.float64(logits[l, t, e]) - zmax)
                scale *= top_mass / row
            for j in range(k):
                weights[l, t, j] *= scale
    return keep, ids, weights


@njit(cache=True, nogil=True, boundscheck=False)
def level_counts(bins, levels):
    """n[l, j, e]: tokens with expert e in bin -j, [L, J, E] int64 (exact: integers)."""
    L, B, E = bins.shape
    n = np.zeros((L, levels, E), dtype=np.int64)
    for l in range(L):
        for t in range(B):
            for e in range(E):
                n[l, -np.int64(bins[l, t, e]), e] += 1
    return n
