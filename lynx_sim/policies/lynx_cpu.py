"""Compiled CPU selection for `lynx` (numba): the per-token top-k selections, nothing else.

torch computes everything that carries Lynx's arithmetic (bins, column sums, the per-level rank
tables, see `Lynx._rank_tables`); this kernel, per layer and token:
1. picks: the k largest of the unique integer scores bin x E + (E - 1 - rank[level(bin), e]),
   whose union over tokens is KEEP [L, E];
2. remap: the k largest logits among KEEP, descending, ties to the lowest index, and, for models
   that do not renormalise, the k largest logits of the whole row (for the top-k mass).
Each is one scan of the row into a sorted buffer of k, in index order, so equal values keep the
lower index. It replaces two partitions of every row (numpy argpartition) and halves Lynx's
time on the Mixtral shape; on the 128-expert Qwen3 shape the scans themselves cost about
0.5 us a row (benchmarks/RESULTS.md). Results equal the torch path exactly (tests/test_lynx.py).
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
def lynx_select(bins, rank, logits, k, want_full_top):
    """bins [L, B, E] (0..-beta), rank [L, J, E] int64, logits [L, B, E].

    Returns keep [L, E] bool, ids [L, B, k] int64, kept_top [L, B, k] (their logits, falling)
    and full_top [L, B, k] (the row's k largest logits; empty unless want_full_top)."""
    L, B, E = logits.shape
    keep = np.zeros((L, E), dtype=np.bool_)
    ids = np.empty((L, B, k), dtype=np.int64)
    top = np.empty((L, B, k), dtype=logits.dtype)
    full = np.empty((L, B, k) if want_full_top else (0, 0, 0), dtype=logits.dtype)
    sv = np.empty(k, dtype=np.int64)  # per-token buffers, falling
    si = np.empty(k, dtype=np.int64)
    tv = np.empty(k, dtype=logits.dtype)
    ti = np.empty(k, dtype=np.int64)
    fv = np.empty(k, dtype=logits.dtype)
    fi = np.empty(k, dtype=np.int64)
    for l in range(L):
        for t in range(B):  # picks: top-k of unique integer scores
            n = 0
            for e in range(E):
                b = bins[l, t, e]
                v = np.int64(b) * E + (E - 1) - rank[l, np.int64(-b), e]
                if n < k or v > sv[k - 1]:
                    _insert(sv, si, n, v, e)
                    n = min(n + 1, k)
            for j in range(k):
                keep[l, si[j]] = True
        for t in range(B):  # remap: top-k logits inside KEEP (and of the whole row)
            n = 0
            m = 0
            for e in range(E):
                v = logits[l, t, e]
                if want_full_top and (m < k or v > fv[k - 1]):
                    _insert(fv, fi, m, v, e)
                    m = min(m + 1, k)
                if keep[l, e] and (n < k or v > tv[k - 1]):
                    _insert(tv, ti, n, v, e)
                    n = min(n + 1, k)
            for j in range(k):
                top[l, t, j] = tv[j]
                ids[l, t, j] = ti[j]
                if want_full_top:
                    full[l, t, j] = fv[j]
    return keep, ids, top, full
