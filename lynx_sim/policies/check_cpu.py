"""Compiled CPU twin of `Policy._check_output` (numba): the output convention in one pass.

The torch check dispatches about a dozen small ops per call, which on a decode batch cost more
than the rule itself; this kernel reads each slot once and returns the first violation found
(0 when none). tests/test_policies_batch.py checks that both versions flag the same outputs.
It runs without bounds checks: weights must have the ids' shape when read (ValueError otherwise);
ids are compared, never used as indices. tests/test_kernel_bounds.py runs it with
NUMBA_BOUNDSCHECK=1 on fuzzed inputs.
"""

from __future__ import annotations

import numpy as np
from numba import njit

OK, OUT_OF_RANGE, NO_EXPERT, REPEATED, BAD_WEIGHT = 0, 1, 2, 3, 4
MESSAGES = {OUT_OF_RANGE: "ids outside -1..E-1", NO_EXPERT: "a token left with no expert",
            REPEATED: "an expert repeated within a token",
            BAD_WEIGHT: "weights not finite and >= 0, or non-zero on a dropped slot"}


@njit(cache=True, nogil=True, boundscheck=False)
def violation(ids, weights, E, with_weights):
    """ids [L, B, k] int64, weights [L, B, k] float (read when with_weights) -> a code above.
    Where several rules are broken, the one the torch check tests first (the lowest code)."""
    L, B, k = ids.shape
    if with_weights and weights.shape != ids.shape:
        raise ValueError("violation: expected weights with the ids' shape [L, B, k]")
    found = BAD_WEIGHT + 1
    for l in range(L):
        for t in range(B):
            kept = 0
            for j in range(k):
                e = ids[l, t, j]
                if e < -1 or e >= E:
                    return OUT_OF_RANGE
                if e >= 0:
                    kept += 1
                    for i in range(j):
                        if ids[l, t, i] == e:
                            found = min(found, REPEATED)
                if with_weights:
                    w = weights[l, t, j]
                    if not np.isfinite(w) or w < 0 or (e < 0 and w != 0):
                        found = min(found, BAD_WEIGHT)
            if kept == 0:
                found = min(found, NO_EXPERT)
    return OK if found > BAD_WEIGHT else found
