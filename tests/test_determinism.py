"""Same seed, same answer on every machine: the golden case under other BLAS kernels, thread
counts and SIMD levels, and the machine-independent arithmetic it rests on.

Tolerances. Every routing decision (the ids the policy and vanilla give each token, hence the
distinct experts and every integer in the summary) must match the golden file exactly, checked
through a SHA-256 of all ids. Float figures must match to a relative 1e-9: they pass through
torch's and libm's exp/log (softmax weights of the remap, the KL divergence, the fidelity
kernel), whose kernels differ by CPU in the last bits of a float64, and through sums of those;
1e-9 is a million times that rounding and far below any figure's printed precision.
Regenerate the golden file deliberately (tests/golden/README.md) when the generator, a policy
or the cost model changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from determinism_case import every_policy, golden_case
from lynx_sim import numerics

GOLDEN = ROOT / "tests" / "golden" / "lynx_qwen3_b8_12steps.json"
SCRIPT = ROOT / "tests" / "determinism_case.py"
FLOAT_REL = 1e-9

# OpenBLAS kernels this machine kind can run, crossed with thread counts; then the SIMD levels of
# numpy's dispatched loops and torch's kernels turned down to a pre-AVX2 CPU's.
BLAS = [({"OPENBLAS_CORETYPE": core}, threads) for core in ("Haswell", "SkylakeX", "Zen", "Sandybridge")
        for threads in (1, 2)]
def _dispatched_features() -> str:
    """numpy's dispatch targets this CPU has (disabling one it lacks is refused by numpy)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f))


OLD_CPU = {"NPY_DISABLE_CPU_FEATURES": _dispatched_features(), "ATEN_CPU_CAPABILITY": "default"}


def assert_matches(found: dict, golden: dict, path: str = "") -> None:
    """Integers, strings and the digest exactly; floats to FLOAT_REL."""
    if isinstance(golden, dict):
        assert set(found) == set(golden), f"{path}: keys differ: {sorted(set(found) ^ set(golden))}"
        for k in golden:
            assert_matches(found[k], golden[k], f"{path}.{k}")
    elif isinstance(golden, list):
        assert len(found) == len(golden), path
        for i, (a, b) in enumerate(zip(found, golden)):
            assert_matches(a, b, f"{path}[{i}]")
    elif isinstance(golden, float):
        assert isinstance(found, float) and found == pytest.approx(golden, rel=FLOAT_REL, abs=1e-12), \
            f"{path}: {found!r} != {golden!r}"
    else:
        assert type(found) is type(golden) and found == golden, f"{path}: {found!r} != {golden!r}"


def test_golden_summary():
    """The seeded golden run in this process reproduces the recorded summary and decisions."""
    assert_matches(golden_case(), json.loads(GOLDEN.read_text()))


def _run_case(env_extra: dict, threads: int, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS", "OMP_", "MKL_", "NPY_", "ATEN_"))}
    env.update(env_extra)
    env.update({"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "NUMBA_NUM_THREADS": str(threads)})
    out = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env_extra,threads", BLAS + [(OLD_CPU, 1)],
                         ids=[f"{e['OPENBLAS_CORETYPE']}-{t}thr" for e, t in BLAS] + ["pre-AVX2-simd"])
def test_golden_case_on_other_kernels_and_threads(env_extra, threads):
    """The test that would have caught the BLAS-dependent generator: the golden case in a fresh
    process under each OpenBLAS kernel and thread count, and with numpy's and torch's SIMD
    dispatch lowered to a pre-AVX2 CPU's."""
    assert_matches(_run_case(env_extra, threads), json.loads(GOLDEN.read_text()))


def test_every_policy_decides_alike_on_other_kernels():
    """Every registered rule, not only Lynx: the same decisions (digest) and figures in this process
    and under another OpenBLAS kernel, one thread and pre-AVX2 SIMD dispatch. Rules that threshold
    a computed float (top_p's cumulative mass, entropy_k's entropy, sere's similarity) could differ
    only for a value within float64 rounding of its threshold; none does here."""
    here = every_policy()
    there = _run_case({**OLD_CPU, "OPENBLAS_CORETYPE": "Sandybridge"}, 1, "--every-policy")
    assert set(here) == set(there)
    for name in here:
        assert_matches(there[name], here[name], name)


def test_assert_matches_is_strict_on_decisions_and_tolerant_on_rounding():
    golden = {"n": 3, "x": 0.5, "d": "ab"}
    assert_matches({"n": 3, "x": 0.5 * (1 + 1e-12), "d": "ab"}, golden)
    for bad in ({"n": 4, "x": 0.5, "d": "ab"}, {"n": 3, "x": 0.5001, "d": "ab"}, {"n": 3, "x": 0.5, "d": "ac"},
                {"n": 3.0, "x": 0.5, "d": "ab"}):
        with pytest.raises(AssertionError):
            assert_matches(bad, golden)


def test_numerics_elementary_functions_are_accurate():
    rng = np.random.default_rng(0)
    x = np.r_[rng.uniform(-740, 705, 20000), rng.uniform(-30, 5, 20000), 0.0, -1e-300]
    ref = np.exp(x)
    assert (np.abs(numerics.exp(x) - ref) <= 2 * np.spacing(ref)).all()
    y = np.r_[np.exp(rng.uniform(-700, 700, 20000)), rng.uniform(0.25, 4, 20000)]
    ref = np.log(y)
    assert (np.abs(numerics.log(y) - ref) <= 4 * np.spacing(np.abs(ref))).all()
    assert numerics.exp(np.array([710.0, -800.0, np.nan])).tolist()[:2] == [np.inf, 0.0]
    top = np.array([709.781, 709.7827])  # finite up to log(max float64)
    np.testing.assert_allclose(numerics.exp(top), np.exp(top), rtol=4e-16)
    np.testing.assert_allclose(numerics.power(np.array([2.0, 10.0]), np.array([0.5, -1.0])), [2 ** 0.5, 0.1], rtol=1e-15)


def test_fixed_point_product_is_exact_in_any_order():
    rng = np.random.default_rng(1)
    a = numerics.quantize(rng.standard_normal((7, 64)), 14, 2.0 ** 7)
    b = numerics.quantize(rng.standard_normal((64, 5)), 17, 2.0 ** 5)
    exact = np.array([[sum(int(a[i, d]) * int(b[d, j]) for d in range(64)) for j in range(5)] for i in range(7)])
    got = numerics.fixed_point_matmul(a, b, 31)
    assert (np.ldexp(got, 31) == exact).all()  # integer arithmetic in Python: no rounding at all
    reordered = numerics.fixed_point_matmul(a[:, ::-1], b[::-1], 31)
    assert (got == reordered).all()
    with pytest.raises(ValueError, match="2\\*\\*53"):
        numerics.fixed_point_matmul(np.full((1, 4), 2.0 ** 26), np.full((4, 1), 2.0 ** 26 + 1), 0)
    edge = numerics.fixed_point_matmul(np.full((1, 4), 2.0 ** 25), np.full((4, 1), 2.0 ** 26), 0)  # sum = 2**53 exactly
    assert edge[0, 0] == 2.0 ** 53


def test_gram_schmidt_gives_orthonormal_columns():
    q = numerics.orthonormal_columns(np.random.default_rng(2).standard_normal((128, 64)))
    np.testing.assert_allclose(q.T @ q, np.eye(64), atol=1e-13)
    with pytest.raises(ValueError, match="rows >= columns"):
        numerics.orthonormal_columns(np.ones((2, 3)))
