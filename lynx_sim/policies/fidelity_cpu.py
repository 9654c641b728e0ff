"""Compiled CPU twin of `fidelity.measure` (numba): every measure in one pass over [L, B, k].

On small decode batches the torch version spends its time dispatching about twenty tiny ops;
this kernel reads each slot once. It computes the same quantities in float64 from the same float32
logits and float64 logsumexp as torch (sums may differ in the last bits);
tests/test_policies_batch.py checks it against the torch version on random batches with
dropped slots, ties and every missing input. Used on CPU tensors; the GPU keeps torch.

Safety: it runs without bounds checks, so it first checks what it will index: shapes agree
(logits and their logsumexp only where it reads them) and every new id lies in -1..E-1 (it
counts tokens per expert by id); ValueError otherwise. Logits and weights are only compared and
summed, never turned into indices, so any values (inf, NaN) are safe.
tests/test_kernel_bounds.py runs it with NUMBA_BOUNDSCHECK=1 on fuzzed inputs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# how each token's original top-1 is known
TOP1_WEIGHTS, TOP1_LOGITS, TOP1_SLOT0, TOP1_NONE = 0, 1, 2, 3


@njit(cache=True, nogil=True, boundscheck=False)
def measure_kernel(orig, w_orig, new, w_new, logits, lse, E, top1_mode, with_kl):
    """orig/new ids [L, B, k] int64 (new may hold -1), w_orig [L, B, k] (ones when the trace has
    none), w_new [L, B, k], logits [L, B, E] (unused unless top1_mode == 1 or with_kl), lse [L, B]
    their float64 logsumexp (torch computes it vectorised, once per batch for the policy and vanilla)."""
    L, B, k = orig.shape
    if new.shape != orig.shape or w_orig.shape != orig.shape or (with_kl and w_new.shape != orig.shape):
        raise ValueError("measure_kernel: expected orig, new, w_orig (and w_new with KL) all [L, B, k]")
    if (top1_mode == TOP1_LOGITS or with_kl) and (logits.shape[0] != L or logits.shape[1] != B or logits.shape[2] != E):
        raise ValueError("measure_kernel: expected logits [L, B, E]")
    if with_kl and (lse.shape[0] != L or lse.shape[1] != B):
        raise ValueError("measure_kernel: expected lse [L, B]")
    if E < 1 or top1_mode < TOP1_WEIGHTS or top1_mode > TOP1_NONE:
        raise ValueError("measure_kernel: expected E >= 1 and a known top1_mode")
    for l in range(L):
        for b in range(B):
            for j in range(k):
                if new[l, b, j] < -1 or new[l, b, j] >= E:
                    raise ValueError("measure_kernel: expected new ids in -1..E-1")
    counts = np.zeros((L, E), np.int64)
    retention = np.empty(L)
    mass = np.empty(L)
    changed = np.empty(L)
    kl = np.empty(L)
    kept_sum = np.empty(L)
    for l in range(L):
        ret = 0.0
        ms = 0.0
        present_n = 0
        kls = 0.0
        kept = 0
        for b in range(B):
            for j in range(k):
                e = new[l, b, j]
                if e >= 0:
                    counts[l, e] += 1
                    kept += 1
            # original slots still present, and the mass they carry
            tot = 0.0
            got = 0.0
            for j in range(k):
                w = w_orig[l, b, j]
                tot += w
                o = orig[l, b, j]
                for i in range(k):
                    if new[l, b, i] == o:
                        got += w
                        present_n += 1
                        break
            ms += got / max(tot, 1e-30)
            if top1_mode != TOP1_NONE:
                if top1_mode == TOP1_WEIGHTS:
                    best = 0
                    for j in range(1, k):
                        if w_orig[l, b, j] > w_orig[l, b, best]:
                            best = j
                    t = orig[l, b, best]
                elif top1_mode == TOP1_LOGITS:
                    t = 0
                    for e in range(1, E):
                        if logits[l, b, e] > logits[l, b, t]:
                            t = e
                else:
                    t = orig[l, b, 0]
                for i in range(k):
                    if new[l, b, i] == t:
                        ret += 1.0
                        break
            if with_kl:
                lz = lse[l, b]
                wsum = 0.0
                for j in range(k):
                    if new[l, b, j] >= 0:
                        wsum += w_new[l, b, j]
                term = 0.0
                for j in range(k):
                    e = new[l, b, j]
                    if e >= 0:
                        q = w_new[l, b, j] / wsum
                        if q > 0:
                            term += q * (np.log(q) - (np.float64(logits[l, b, e]) - lz))  # float64, as the torch path
                kls += term
        retention[l] = ret / B if top1_mode != TOP1_NONE else np.nan
        mass[l] = ms / B
        changed[l] = 1.0 - present_n / (B * k)
        kl[l] = kls / B if with_kl else np.nan
        kept_sum[l] = kept
    return counts, retention, mass, changed, kl, kept_sum
