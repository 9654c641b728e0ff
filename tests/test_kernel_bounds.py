"""Every numba kernel, with bounds checking ON, over fuzzed inputs, against the torch path.

The kernels (lynx_cpu.py, fidelity_cpu.py, check_cpu.py) run with `boundscheck=False`; an index
derived from bad data then reads or writes outside an array (alpha=inf once made a NaN bin an
index and the process died with "double free or corruption"). This test runs them in a
subprocess with NUMBA_BOUNDSCHECK=1, which overrides the decorators, and a fresh
NUMBA_CACHE_DIR (numba's cache key ignores the flag, so a cached unchecked build would be
reused, and a checked build must not land in the repository's cache). Any out-of-bounds access
is then an IndexError. Inputs: random shapes with B = 1 and E = k, ties, huge logits (whose
gaps overflow float32 to -inf), -inf logits where the input allows them (fidelity), dropped
slots, every missing input; results must equal the torch path (backend=torch). Inputs a kernel
must refuse (non-finite logits for Lynx, out-of-range ids, mismatched shapes) must give a
ValueError, never an IndexError.

Run alone: `NUMBA_BOUNDSCHECK=1 NUMBA_CACHE_DIR=$(mktemp -d) python tests/test_kernel_bounds.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


@pytest.mark.slow
def test_every_kernel_in_bounds_on_fuzzed_inputs(tmp_path):
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    out = subprocess.run([sys.executable, str(HERE)], cwd=HERE.parents[1], env=env, capture_output=True, text=True,
                         timeout=1200)
    log = out.stdout + out.stderr
    assert "IndexError" not in log, log[-4000:]
    assert out.returncode == 0, log[-4000:]
    assert "fuzz: ok" in out.stdout, log[-4000:]


# --- the fuzz itself, run as a script in the subprocess above --------------------------------

def _check_boundscheck_is_on():
    """The environment really turned bounds checks on (and no unchecked cached build is used)."""
    import numba
    import numpy as np

    assert numba.config.BOUNDSCHECK, "run with NUMBA_BOUNDSCHECK=1"

    @numba.njit(boundscheck=False, cache=False)
    def read(a, i):
        return a[i]

    try:
        read(np.zeros(3), 7)
    except IndexError:
        return
    raise AssertionError("NUMBA_BOUNDSCHECK=1 did not turn bounds checks on")


def _logits(g, L, B, E):
    import numpy as np

    z = g.normal(size=(L, B, E)) * g.choice([0.5, 2.0, 8.0])
    style = g.integers(0, 5)
    if style == 1:  # ties in bins, keys and logits
        z = np.round(z * 2) / 2
    elif style == 2:  # constant rows: everything tied
        z[:, g.integers(0, B)] = 1.5
    elif style == 3:  # huge finite logits: z - max z overflows float32 to -inf
        z[g.random(size=z.shape) < 0.2] = -3e38
        z[:, :, 0] = np.where(g.random(size=(L, B)) < 0.5, 3e38, z[:, :, 0])
    elif style == 4:  # far below: the stand-in logits of approximate.py
        z[g.random(size=z.shape) < 0.5] = -1.0e4
    return z.astype(np.float32)


def _same_selection(a, b, what):
    import torch

    assert torch.equal(a.ids, b.ids), what
    # weights: the kernels compute in float64 from float32 logits, torch in float32 (mass via logsumexp)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-7, equal_nan=True, msg=str(what))
    for f in a.fidelity.__dataclass_fields__:
        x, y = getattr(a.fidelity, f).double(), getattr(b.fidelity, f).double()
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True), (what, f)  # KL: float32 logsumexp


def fuzz_lynx(g, cases: int) -> int:
    """lynx_cpu.py's kernels (rank tables, level counts, both selections) through the policy,
    backend=compiled against backend=torch."""
    from unittest import mock

    import numpy as np
    import torch

    from lynx_sim.policies import BatchRouting, PolicyInputError
    from lynx_sim.policies import lynx_cpu
    from lynx_sim.policies.lynx import ALPHA_MAX, ALPHA_MIN, BETA_MAX, Lynx
    from lynx_sim.routing import RouterSpec, route

    for case in range(cases):
        L, E = int(g.integers(1, 4)), int(g.integers(1, 41))
        B = 1 if case % 4 == 0 else int(g.integers(1, 70))
        k = E if case % 5 == 0 else int(g.integers(1, min(E, 8) + 1))
        alpha = float(g.choice([ALPHA_MIN, 0.7, 1.0, 3.0, 97.0, ALPHA_MAX]))
        beta = int(g.integers(0, BETA_MAX + 1))
        spec = RouterSpec(E, k, "softmax", bool(g.integers(0, 2)))
        Z = torch.from_numpy(_logits(g, L, B, E))
        ids, w = route(Z, spec)
        batch = BatchRouting(ids, w.float(), Z)
        for arithmetic in ("float32", "float64"):
            pols = {be: Lynx(spec, alpha, beta, arithmetic, backend=be) for be in ("compiled", "torch")}
            exact = (beta + 1) * float(B) ** (beta + 1) < 2.0 ** 53
            if arithmetic == "float64" and not exact:
                for pol in pols.values():  # both refuse, by name
                    try:
                        pol.select(batch)
                    except ValueError as e:
                        assert "2**53" in str(e)
                    else:
                        raise AssertionError("float64 beyond 2**53 was not refused")
                continue
            ref = pols["torch"].select(batch)
            for batched_max in (0, 10**9):  # the per-token and the batched selection
                with mock.patch.object(lynx_cpu, "BATCHED_MAX", batched_max):
                    _same_selection(pols["compiled"].select(batch), ref, (case, arithmetic, batched_max))
            key_c, bins_c = pols["compiled"].keys(Z)  # level_counts on the compiled path
            key_t, bins_t = pols["torch"].keys(Z)
            assert torch.equal(bins_c, bins_t) and torch.equal(key_c, key_t), (case, arithmetic)
        if case % 3 == 0:  # a non-finite logit: refused by every path, never binned
            bad = Z.clone()
            bad[int(g.integers(0, L)), int(g.integers(0, B)), int(g.integers(0, E))] = float(g.choice([np.nan, np.inf, -np.inf]))
            for be in ("compiled", "torch"):
                for arithmetic in ("float32", "float64"):
                    try:
                        Lynx(spec, alpha, min(beta, 2), arithmetic, backend=be).select(BatchRouting(ids, w.float(), bad))
                    except PolicyInputError as e:
                        assert "expected finite values" in str(e)
                    else:
                        raise AssertionError("a non-finite logit was accepted")
    return cases


def fuzz_lynx_kernels_refuse(g) -> int:
    """Direct calls with inputs the policy never passes: ValueError, not an out-of-bounds access."""
    import numpy as np

    from lynx_sim.policies import lynx_cpu

    n = 0
    L, B, E, J, k = 2, 5, 6, 3, 2
    z = g.normal(size=(L, B, E)).astype(np.float32)
    table = np.array([1.0, 0.2, 0.04], np.float32)
    bins, rank, floor_order, bad = lynx_cpu.rank_tables_f32(z, 1.0, J - 1, table)
    assert bad == -1
    for breakage in ("nan_bin", "deep_bin", "k0", "k_big", "order", "shape"):
        b, r, f, kk = bins.copy(), rank.copy(), floor_order.copy(), k
        if breakage == "nan_bin":
            b[1, 2, 3] = np.nan
        elif breakage == "deep_bin":
            b[0, 0, 0] = -J
        elif breakage == "k0":
            kk = 0
        elif breakage == "k_big":
            kk = E + 1
        elif breakage == "order":
            f[0, 0] = E
        else:
            r = r[:, :, :-1]
        for select in (lynx_cpu.lynx_select, lynx_cpu.lynx_select_batched):
            try:
                select(b, r, f, z, kk, True)
            except ValueError:
                n += 1
            else:
                raise AssertionError(f"{select.__name__} accepted {breakage}")
    for value in (np.nan, 1.0, -J):
        b = bins.copy()
        b[0, 1, 2] = value
        try:
            lynx_cpu.level_counts(b, J)
        except ValueError:
            n += 1
        else:
            raise AssertionError(f"level_counts accepted bin {value}")
    for value in (np.nan, np.inf, -np.inf):
        zz = z.copy()
        zz[1, 3, 4] = value
        assert lynx_cpu.rank_tables_f32(zz, 1.0, J - 1, table)[3] == 1 * B + 3
        n += 1
    try:
        lynx_cpu.rank_tables_f32(z, 1.0, J, table)  # table shorter than beta + 1
    except ValueError:
        n += 1
    else:
        raise AssertionError("rank_tables_f32 accepted a short table")
    return n


def fuzz_fidelity_and_check(g, cases: int) -> int:
    """fidelity_cpu.measure_kernel against measure_torch, check_cpu.violation against
    output_violation, on random selections; refusals of inputs they cannot index."""
    import numpy as np
    import torch

    from lynx_sim.policies import BatchRouting
    from lynx_sim.policies.base import output_violation
    from lynx_sim.policies.check_cpu import MESSAGES, violation
    from lynx_sim.policies.fidelity import DROPPED, measure, measure_torch
    from lynx_sim.policies.fidelity_cpu import TOP1_LOGITS, measure_kernel
    from lynx_sim.routing import RouterSpec

    for case in range(cases):
        L, E = int(g.integers(1, 4)), int(g.integers(1, 40))
        B = 1 if case % 4 == 0 else int(g.integers(1, 50))
        k = E if case % 5 == 0 else int(g.integers(1, min(E, 8) + 1))
        z = _logits(g, L, B, E)
        if case % 3 == 1:  # -inf logits: the fidelity kernel only compares and sums them
            z[g.random(size=z.shape) < 0.2] = -np.inf
            z[..., 0] = 0.0
        Z = torch.from_numpy(z)
        ids = torch.topk(Z, k, -1).indices
        w = torch.softmax(torch.gather(Z, -1, ids), -1)
        new, nw = ids.clone(), w.clone()
        if k > 1:
            drop = torch.from_numpy(g.random(size=(L, B, k)) < 0.3)
            drop[..., 0] = False
            new[drop], nw[drop] = DROPPED, 0
        if E > k:  # move some last slots onto an unused expert
            unused = torch.topk(-Z, 1, -1).indices[..., 0]
            move = torch.from_numpy(g.random(size=(L, B)) < 0.3) & (new[..., -1] != DROPPED)
            new[..., -1] = torch.where(move, unused, new[..., -1])
        for kind in ("softmax", "sigmoid"):
            router = RouterSpec(E, k, kind)
            for b in (BatchRouting(ids, w, Z), BatchRouting(ids, None, Z), BatchRouting(ids, None, None),
                      BatchRouting(ids, None, None, ids_ordered=False), BatchRouting(ids, w, None),
                      BatchRouting(ids, w, Z, logits_filled=True)):
                for ww in (nw, None):
                    a, r = measure(b, new, ww, router, compiled=True), measure_torch(b, new, ww, router)
                    for f in a.__dataclass_fields__:
                        x, y = getattr(a, f).double(), getattr(r, f).double()
                        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True), (case, kind, f)
        for ww in (nw, None):
            got = MESSAGES.get(violation(new.numpy(), nw.numpy(), E, ww is not None))
            assert got == output_violation(new, ww, E), case
        # refusals: an id the counts cannot hold, weights of another shape
        bad = new.clone()
        bad[0, 0, 0] = E + int(g.integers(0, 3))
        for args in ((bad, nw), (new, nw[..., :1] if k > 1 else nw[:, :0])):
            try:
                measure_kernel(ids.numpy(), w.numpy(), args[0].numpy(), args[1].contiguous().numpy(), z,
                               torch.logsumexp(Z, -1).numpy(), E, TOP1_LOGITS, True)
            except ValueError:
                pass
            else:
                raise AssertionError("measure_kernel accepted an id >= E or a weight shape mismatch")
        try:
            violation(new.numpy(), nw[..., :0].contiguous().numpy(), E, True)
        except ValueError:
            pass
        else:
            raise AssertionError("violation accepted weights of another shape")
    return cases


def main(cases: int = 60) -> None:
    import numpy as np

    _check_boundscheck_is_on()
    g = np.random.default_rng(int(os.environ.get("FUZZ_SEED", "0")))
    n = fuzz_lynx(g, cases) + fuzz_lynx_kernels_refuse(g) + fuzz_fidelity_and_check(g, cases)
    print(f"fuzz: ok ({n} cases, bounds checks on)")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    main()
