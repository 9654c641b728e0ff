"""The Triton Lynx routing kernels against the torch `lynx` policy in float32 mode.

Same inputs, same answers: bins, KEEP and ids exactly (the kernels avoid FMA contraction and use
IEEE division, see kernels/lynx_routing.py), weights to float32 rounding. Fresh random logits,
quantised in some cases so that keys and logits tie; B = 1, non-power-of-two B and E, k = 1
and k = 8, several alpha and beta, renormalising and not. On the CPU the kernels run under
TRITON_INTERPRET=1 (tests/conftest.py); LYNX_KERNELS_ON_GPU=1 runs them compiled on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from kernels.lynx_routing import lynx_route
from lynx_sim.policies.base import BatchRouting
from lynx_sim.policies.lynx import Lynx
from lynx_sim.routing import RouterSpec

DEVICE = "cuda" if os.environ.get("LYNX_KERNELS_ON_GPU") == "1" else "cpu"
RTOL = 1e-5 if DEVICE == "cuda" else 1e-6  # weights: Triton's GPU exp is not libm's (ids stay exact)

CASES = [  # (L, B, E, k, alpha, beta, renormalize, quantum)
    (2, 1, 8, 2, 0.7, 1, True, None),
    (3, 16, 8, 2, 0.7, 1, True, 0.5),
    (2, 13, 60, 4, 1.0, 2, False, None),
    (2, 64, 128, 8, 3.0, 2, True, 0.25),
    (1, 7, 5, 1, 0.5, 0, False, None),
    (2, 40, 32, 8, 1.0, 4, False, 0.5),
]


def torch_policy(Z, E, k, alpha, beta, renorm):
    spec = RouterSpec(E, k, "softmax", renorm)
    pol = Lynx(spec, alpha, beta, arithmetic="float32", backend="torch")  # the torch path (what the policy runs on a GPU)
    ids = torch.topk(Z, k, -1).indices
    sel_ids, sel_w = pol.route(BatchRouting(ids, None, Z))
    return pol, sel_ids, sel_w


@pytest.mark.parametrize("case", range(len(CASES)))
def test_lynx_kernels_equal_the_torch_policy(case):
    L, B, E, k, alpha, beta, renorm, quantum = CASES[case]
    g = torch.Generator().manual_seed(50 + case)
    for trial in range(3):
        Z = torch.randn(L, B, E, generator=g) * 2
        if quantum:
            Z = (Z / quantum).round() * quantum
        pol, ids_ref, w_ref = torch_policy(Z, E, k, alpha, beta, renorm)
        buf = {}
        ids, w, keep = lynx_route(Z.to(DEVICE), alpha, beta, k, renorm, out=buf, store_keys=True)
        ids, w, keep = ids.cpu(), w.cpu(), keep.cpu()
        key, bins = pol.keys(Z)  # the policy's own float32 bins and column sums, bit for bit
        assert torch.equal(buf["bins"].cpu(), bins), "bins"
        assert torch.equal(buf["s"].cpu(), pol._column_sums(bins, B, torch.float32)), "column sums"
        assert torch.equal(buf["key"].cpu(), key), "keys"
        assert torch.equal(keep, pol.keep_mask(Z)), "KEEP"
        assert torch.equal(ids, ids_ref), "ids"
        torch.testing.assert_close(w, w_ref, rtol=RTOL, atol=RTOL / 10)


def test_lynx_kernels_reject_bad_inputs():
    with pytest.raises(ValueError, match="float32"):
        lynx_route(torch.zeros(1, 2, 4, dtype=torch.float64), 1.0, 1, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        lynx_route(torch.zeros(1, 2, 4), 1.0, 1, 5, True)
