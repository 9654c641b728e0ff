"""Arithmetic that gives the same bits on every machine, for everything a seed decides.

numpy, torch and libm choose their exp/log/pow kernels by CPU (SVML on AVX-512, Sleef on AVX2,
scalar libm elsewhere), and BLAS chooses its GEMM kernel, blocking and summation order by CPU and
thread count. Each choice moves the last bits of a float, and a last bit is enough to flip a
Lynx bin (`ceil(alpha * gap)`) or a top-k choice. The synthetic generator therefore draws its
routing with this module only:

- `exp`, `log`, `power`: elementwise float64 from IEEE-754 +, -, *, /, rint and ldexp alone
  (each correctly rounded by the standard, evaluated as separate numpy ufuncs, so never fused
  into an FMA): identical on every IEEE machine, within 3 ulp of numpy's own (tested);
- `fixed_point_matmul`: a matrix product of values rounded to a fixed-point grid, computed by
  BLAS on integer-valued float64 whose every partial sum is an integer of at most 2**53, so it is
  exact in any order, with any kernel and any thread count;
- `sequential_sum`: a reduction in one fixed order (numpy's own reductions may change order
  with the array's layout);
- `orthonormal_columns`: Gram-Schmidt with correctly rounded dot products (`math.fsum`), in
  place of LAPACK's QR.
Random draws come from numpy's `Generator`, whose streams are the same on every platform for a
given numpy version (NEP 19: they may change between versions, which is why summaries name it).
"""

from __future__ import annotations

import math

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that n * _LN2_HI is exact for |n| < 2**11
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP_MAX = 709.782712893384  # log of the largest float64: above it e**x overflows
_EXP_TERMS = [1.0 / math.factorial(i) for i in range(14)]  # Taylor series of exp on |r| <= ln2/2
_ATANH_TERMS = [1.0 / (2 * j + 1) for j in range(13)]  # log m = 2 atanh(s), |s| <= 0.1716


def exp(x) -> np.ndarray:
    """e**x, float64, elementwise; overflow gives inf, underflow 0, NaN stays NaN."""
    x = np.asarray(x, dtype=np.float64)
    xc = np.clip(np.where(np.isnan(x), 0.0, x), -746.0, _EXP_MAX)
    n = np.rint(xc * _INV_LN2)
    r = (xc - n * _LN2_HI) - n * _LN2_LO  # |r| <= 0.347
    p = np.full_like(r, _EXP_TERMS[-1])
    for c in reversed(_EXP_TERMS[:-1]):  # Horner
        p = p * r + c
    with np.errstate(over="ignore"):
        out = np.ldexp(p, n.astype(np.int64))  # rounds once into the subnormal range, as IEEE says
    out = np.where(x > _EXP_MAX, np.inf, out)
    out = np.where(x < -745.2, 0.0, out)
    return np.where(np.isnan(x), np.nan, out)


def log(x) -> np.ndarray:
    """Natural logarithm, float64, elementwise, for x > 0 (0 gives -inf; x < 0 and NaN give NaN)."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x) & (x > 0)
    m, e = np.frexp(np.where(ok, x, 1.0))  # m in [0.5, 1)
    low = m < math.sqrt(0.5)
    m = np.where(low, m * 2.0, m)  # [0.707, 1.414): exact doubling
    e = (e - low).astype(np.float64)
    f = m - 1.0
    s = f / (2.0 + f)
    s2 = s * s
    p = np.full_like(s, _ATANH_TERMS[-1])
    for c in reversed(_ATANH_TERMS[:-1]):
        p = p * s2 + c
    out = e * _LN2_HI + (2.0 * s * p + e * _LN2_LO)
    out = np.where(x == 0, -np.inf, out)
    out = np.where(x == np.inf, np.inf, out)
    return np.where(ok | (x == 0) | (x == np.inf), out, np.nan)


def power(base, exponent) -> np.ndarray:
    """base**exponent for base > 0, as exp(exponent * log(base)) (a few ulp, identical everywhere)."""
    return exp(np.asarray(exponent, dtype=np.float64) * log(base))


def sequential_sum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum along `axis`, adding the slices one after another from index 0 (float64)."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    out = np.zeros(x.shape[1:], dtype=np.float64)
    for row in x:
        out = out + row
    return out


def quantize(x: np.ndarray, frac_bits: int, bound: float) -> np.ndarray:
    """x on the grid 2**-frac_bits, clipped to |x| <= bound, as integer-valued float64 (units of
    the grid). Rounding to nearest (ties to even) is exact IEEE arithmetic."""
    x = np.clip(np.asarray(x, dtype=np.float64), -bound, bound)
    return np.rint(np.ldexp(x, frac_bits))


def fixed_point_matmul(a_units: np.ndarray, b_units: np.ndarray, frac_bits: int) -> np.ndarray:
    """(a @ b) for integer-valued float64 operands in grid units; the result is scaled back by
    2**-frac_bits (the two grids' bits together). Exact when every |partial sum| <= 2**53,
    which the caller's bounds guarantee and this function checks."""
    inner = a_units.shape[-1]
    worst = float(np.abs(a_units).max(initial=0.0)) * float(np.abs(b_units).max(initial=0.0)) * inner
    if worst > 2.0 ** 53:  # integers up to 2**53 are exact in float64
        raise ValueError(f"fixed_point_matmul: |partial sums| may reach {worst:.3g} > 2**53: the product would round")
    return np.ldexp(np.matmul(a_units, b_units), -frac_bits)


def orthonormal_columns(a: np.ndarray) -> np.ndarray:
    """Q [n, d] with orthonormal columns spanning a's (n >= d), by modified Gram-Schmidt applied
    twice ("twice is enough"); dot products and norms are correctly rounded sums (math.fsum), so
    the result does not depend on the machine. Columns have R's diagonal positive (a Haar draw
    for Gaussian a)."""
    a = np.array(a, dtype=np.float64)
    n, d = a.shape
    if d > n:
        raise ValueError(f"orthonormal_columns: expected rows >= columns, found {a.shape}")
    q = np.empty_like(a)
    for j in range(d):
        v = a[:, j].copy()
        for _ in range(2):
            for i in range(j):
                v = v - math.fsum(q[:, i] * v) * q[:, i]
        norm = math.sqrt(math.fsum(v * v))
        if not norm > 0:
            raise ValueError("orthonormal_columns: columns are linearly dependent")
        q[:, j] = v / norm
    return q


def softmax_topk_weights(logits: np.ndarray, ids: np.ndarray, renormalize: bool) -> np.ndarray:
    """Softmax probabilities of the chosen experts, float64 [..., k]: renormalised to sum 1, or
    as shares of the full softmax over all E experts. Sums in a fixed order."""
    z = np.asarray(logits, dtype=np.float64)
    zmax = z.max(-1, keepdims=True)  # max is exact in any order
    chosen = exp(np.take_along_axis(z, ids, -1) - zmax)
    den = sequential_sum(chosen) if renormalize else sequential_sum(exp(z - zmax))
    return chosen / den[..., None]


def sigmoid(x) -> np.ndarray:
    """1 / (1 + e**-x), float64, elementwise."""
    return 1.0 / (1.0 + exp(-np.asarray(x, dtype=np.float64)))
