"""Compiled CPU kernels for `lynx` (numba): level counts and the per-token selections.

- `rank_tables_f32`: float32 mode's bins, column sums and per-level rank tables (see
  `Lynx._rank_tables`) in one pass, with torch's operation order, so that they are
  bit-identical to the torch path (float64 mode keeps torch: its integer keys need no kernel);
- `level_counts`: tokens per expert in each bin level (exact integers, order-free);
- `lynx_select` and `lynx_select_batched` (the same results; the second vectorised across
  tokens, faster while E x B <= BATCHED_MAX), per layer and token: the picks (the top-k of the
  unique scores), KEEP as their union, then the remap: the k largest logits inside KEEP (ties
  to the lowest index) and their weights.
On the CPU they are several times faster than sorting or partitioning every row
(benchmarks/RESULTS.md); results equal the torch path, which the GPU uses (tests/test_lynx.py
checks it on random inputs with ties, in both arithmetics).

Safety: the kernels run without bounds checks, so every index derived from data is checked
first: shapes agree, 1 <= k <= E, bins lie in {-beta..0} (a NaN bin would otherwise become an
index), and a non-finite logit makes `rank_tables_f32` report its row instead of binning it.
A violated check raises ValueError (a caller's bug; Lynx validates its inputs before).
tests/test_kernel_bounds.py runs every kernel with NUMBA_BOUNDSCHECK=1 on fuzzed inputs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

BATCHED_MAX = 8192  # batches with E x B up to this take lynx_select_batched (faster there; measured in RESULTS.md)


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


@njit(cache=True, nogil=True)
def _check_select(bins, rank, floor_order, logits, k):
    """The selections' preconditions (see Safety above)."""
    L, B, E = logits.shape
    if bins.shape != logits.shape or rank.shape[0] != L or rank.shape[2] != E or rank.shape[1] < 1:
        raise ValueError("lynx_cpu: expected bins [L, B, E] as logits and rank [L, J >= 1, E]")
    if floor_order.shape[0] != L or floor_order.shape[1] != E:
        raise ValueError("lynx_cpu: expected floor_order [L, E]")
    if k < 1 or k > E:
        raise ValueError("lynx_cpu: expected 1 <= k <= E")
    floor = -(rank.shape[1] - 1)
    for l in range(L):
        for t in range(B):
            for e in range(E):
                b = bins[l, t, e]
                if not (b >= floor and b <= 0):  # also false for NaN
                    raise ValueError("lynx_cpu: expected bins in -beta..0 (finite logits)")
        for e in range(E):
            if floor_order[l, e] < 0 or floor_order[l, e] >= E:
                raise ValueError("lynx_cpu: expected floor_order to hold expert ids 0..E-1")


@njit(cache=True, nogil=True, boundscheck=False)
def lynx_select(bins, rank, floor_order, logits, k, with_mass):
    """bins [L, B, E] (0..-beta), rank [L, J, E] int64 (rank of each expert inside each level),
    floor_order [L, E] (experts by rank inside the floor level -beta), logits [L, B, E].

    Returns keep [L, E] bool, ids [L, B, k] int64 (falling logit) and their weights [L, B, k]:
    the softmax of the k chosen logits, times the row's top-k softmax mass when with_mass (for
    models that do not renormalise)."""
    _check_select(bins, rank, floor_order, logits, k)
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
                if r >= E:  # fewer experts in the floor level than slots left: rank tables inconsistent
                    raise ValueError("lynx_cpu: floor_order does not complete the picks")
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
def _argmax_pass(vals, n, B, best, bv):
    """Per token t, the first row i < n holding the largest vals[i, t]: best[t], and its value
    bv[t]. Tokens are the inner loop, so the compares vectorise across them instead of forming
    one long dependency chain per token."""
    for t in range(B):
        best[t] = 0
        bv[t] = vals[0, t]
    for i in range(1, n):
        for t in range(B):
            x = vals[i, t]
            gt = x > bv[t]
            best[t] = i if gt else best[t]
            bv[t] = x if gt else bv[t]


@njit(cache=True, nogil=True, boundscheck=False)
def lynx_select_batched(bins, rank, floor_order, logits, k, with_mass):
    """`lynx_select` by k argmax passes over expert-major [E, B] buffers, vectorised across the
    batch's tokens: 1.6-3.6x faster than the per-token buffer insertions while E x B <= 8192
    (Mixtral B=64: 56 vs 204 us), slower beyond (E=128, B=256: its buffers leave the cache).
    `floor_order` is unused: the scores of one token are unique integers, so the passes need no
    tie-break; in the remap, strict > keeps the lowest expert index among equal logits."""
    _check_select(bins, rank, floor_order, logits, k)
    L, B, E = logits.shape
    keep = np.zeros((L, E), dtype=np.bool_)
    ids = np.empty((L, B, k), dtype=np.int64)
    weights = np.empty((L, B, k), dtype=np.float64)
    sc = np.empty((E, B), dtype=np.int64)
    buf = np.empty((E, B), dtype=np.float64)
    kept = np.empty(E, dtype=np.int64)  # the layer's KEEP, ascending
    best = np.empty(B, dtype=np.int64)
    iv = np.empty(B, dtype=np.int64)
    fv = np.empty(B, dtype=np.float64)
    tv = np.empty((k, B), dtype=np.float64)
    mass = np.ones(B, dtype=np.float64)  # stays 1 for renormalising routers
    zmax = np.empty(B, dtype=np.float64)
    low = np.iinfo(np.int64).min
    for l in range(L):
        for t in range(B):  # picks: the k largest scores (bin x E + E - 1 - rank inside the bin)
            for e in range(E):
                b = np.int64(bins[l, t, e])
                sc[e, t] = b * E + (E - 1) - rank[l, -b, e]
        for j in range(k):
            _argmax_pass(sc, E, B, best, iv)
            for t in range(B):
                keep[l, best[t]] = True
                sc[best[t], t] = low
        K = 0
        for e in range(E):
            if keep[l, e]:
                kept[K] = e
                K += 1
        for t in range(B):  # remap: the k largest logits inside KEEP (finite stand-in for -inf
            for i in range(K):  # inputs, so that a taken slot, set to -inf, never wins again)
                buf[i, t] = max(np.float64(logits[l, t, kept[i]]), -1.7e308)
        for j in range(k):
            _argmax_pass(buf, K, B, best, fv)
            for t in range(B):
                ids[l, t, j] = kept[best[t]]
                tv[j, t] = fv[t]
                buf[best[t], t] = -np.inf
        if with_mass:  # each token's own top-k softmax mass, by the same passes over all E
            for t in range(B):
                for e in range(E):
                    buf[e, t] = max(np.float64(logits[l, t, e]), -1.7e308)
            for j in range(k):
                _argmax_pass(buf, E, B, best, fv)
                for t in range(B):
                    if j == 0:
                        zmax[t] = fv[t]
                        mass[t] = 0.0
                    mass[t] += np.exp(fv[t] - zmax[t])
                    buf[best[t], t] = -np.inf
            for t in range(B):  # sum_j exp(top_j - zmax) / sum_e exp(z_e - zmax)
                row = 0.0
                for e in range(E):
                    row += np.exp(np.float64(logits[l, t, e]) - zmax[t])
                mass[t] /= row
        for t in range(B):
            den = 0.0
            for j in range(k):
                weights[l, t, j] = np.exp(tv[j, t] - tv[0, t])
                den += weights[l, t, j]
            scale = mass[t] / den
            for j in range(k):
                weights[l, t, j] *= scale
    return keep, ids, weights


@njit(cache=True, nogil=True, boundscheck=False)
def rank_tables_f32(Z, alpha, beta, table):
    """Z [L, B, E] float32 logits -> bins [L, B, E] float32, rank [L, J, E] int64 (the expert's
    place inside level -j, 0 = first), floor_order [L, E] (experts by rank in the floor level).

    Same float32 operations, in the same order, as the torch path: bin = max(-beta,
    ceil(alpha x (z - max z))); S[e] = sum_j n_j[e] x table[j] (table[j] = B**-j, float32,
    computed by torch); v_j[e] = -j + (S[e] - table[j]) / B; ranks by a stable descending sort.

    The fourth result is -1, or the flat row l x B + t of the first row holding a non-finite
    logit, where the kernel stops (the other results are then incomplete)."""
    L, B, E = Z.shape
    J = beta + 1
    if beta < 0 or table.shape[0] < J or E < 1 or not alpha > 0:
        raise ValueError("lynx_cpu: expected beta >= 0, alpha > 0, E >= 1 and table [beta + 1]")
    a = np.float32(alpha)
    floor = np.float32(-beta)
    Bf = np.float32(B)
    bins = np.empty((L, B, E), np.float32)
    rank = np.empty((L, J, E), np.int64)
    floor_order = np.empty((L, E), np.int64)
    n = np.zeros((J, E), np.int64)
    v = np.empty(E, np.float32)
    S = np.empty(E, np.float32)
    for l in range(L):
        n[:, :] = 0
        for t in range(B):
            zmax = Z[l, t, 0]
            finite = np.isfinite(zmax)
            for e in range(1, E):
                finite &= np.isfinite(Z[l, t, e])
                if Z[l, t, e] > zmax:
                    zmax = Z[l, t, e]
            if not finite:
                return bins, rank, floor_order, l * B + t
            for e in range(E):
                b = np.float32(np.ceil(a * (Z[l, t, e] - zmax)))
                if b < floor:
                    b = floor
                if not b <= 0:  # finite logits and alpha > 0 make this impossible; never index with it
                    raise ValueError("lynx_cpu: a bin above 0")
                bins[l, t, e] = b
                n[-np.int64(b), e] += 1
        for e in range(E):
            s = np.float32(0.0)
            for i in range(J):
                s = s + np.float32(n[i, e]) * table[i]
            S[e] = s
        for j in range(J):
            for e in range(E):
                v[e] = -(np.float32(-j) + (S[e] - table[j]) / Bf)  # negated: ascending = descending v
            order = np.argsort(v, kind="mergesort")  # stable: ties keep the lower index first
            for r in range(E):
                rank[l, j, order[r]] = r
            if j == J - 1:
                floor_order[l, :] = order
    return bins, rank, floor_order, -1


@njit(cache=True, nogil=True, boundscheck=False)
def level_counts(bins, levels):
    """n[l, j, e]: tokens with expert e in bin -j, [L, J, E] int64 (exact: integers); bins
    must lie in {-(levels - 1)..0} (ValueError otherwise, NaN included)."""
    L, B, E = bins.shape
    n = np.zeros((L, levels, E), dtype=np.int64)
    floor = -(levels - 1)
    for l in range(L):
        for t in range(B):
            for e in range(E):
                b = bins[l, t, e]
                if not (b >= floor and b <= 0):
                    raise ValueError("lynx_cpu: expected bins in -(levels - 1)..0")
                n[l, -np.int64(b), e] += 1
    return n
