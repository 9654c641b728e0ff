"""Lynx (LYNX.md section 3) against a plain float64 reference, and its stated properties.

Tests that compare with the reference run on both backends: `compiled` (the numba kernels of
lynx_cpu.py, check_cpu.py, fidelity_cpu.py) and `torch` (the code a GPU batch runs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lynx_sim.policies import BatchRouting, PolicyInputError
from lynx_sim.policies.lynx import Lynx
from lynx_sim.policies.vanilla import Vanilla
from lynx_sim.routing import RouterSpec, route
from reference_lynx import lexicographic_picks, lynx_reference


def make_batch(Z: torch.Tensor, spec: RouterSpec, decode=None) -> BatchRouting:
    ids, w = route(Z, spec)
    return BatchRouting(ids, w, Z, decode=decode)


def random_logits(seed, L, B, E, scale=2.0, quantum=None, dtype=torch.float64):
    g = np.random.default_rng(seed)
    z = g.normal(size=(L, B, E)) * scale
    if quantum:  # coarse logits create ties in bins and keys
        z = np.round(z / quantum) * quantum
    return torch.from_numpy(z).to(dtype)


case = st.fixed_dictionaries({
    "seed": st.integers(0, 10**6), "L": st.integers(1, 3), "B": st.integers(1, 40), "E": st.integers(2, 40),
    "kfrac": st.floats(0, 1), "alpha": st.sampled_from([0.5, 0.7, 1.0, 3.0]), "beta": st.integers(0, 4),
    "renorm": st.booleans(), "quantum": st.sampled_from([None, 0.25, 0.5]),
})


BACKENDS = ("compiled", "torch")


def _k(c):
    return 1 + int(c["kfrac"] * (min(c["E"], 8) - 1))


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(c=case)
def test_float64_matches_reference(backend, c):
    k = _k(c)
    spec = RouterSpec(c["E"], k, "softmax", c["renorm"])
    Z = random_logits(c["seed"], c["L"], c["B"], c["E"], quantum=c["quantum"])
    pol = Lynx(spec, c["alpha"], c["beta"], arithmetic="float64", backend=backend)
    sel = pol.select(make_batch(Z, spec))
    keep = pol.keep_mask(Z)
    for l in range(c["L"]):
        ids, w, kept = lynx_reference(Z[l].numpy(), k, c["alpha"], c["beta"], c["renorm"])
        np.testing.assert_array_equal(sel.ids[l].numpy(), ids)
        np.testing.assert_allclose(sel.weights[l].numpy(), w, rtol=1e-5, atol=1e-7)
        assert torch.nonzero(keep[l]).flatten().tolist() == kept


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=60, deadline=None)
@given(c=case)
def test_invariants(backend, c):
    k = _k(c)
    spec = RouterSpec(c["E"], k, "softmax", c["renorm"])
    Z = random_logits(c["seed"], c["L"], c["B"], c["E"], quantum=c["quantum"], dtype=torch.float32)
    pol = Lynx(spec, c["alpha"], c["beta"], backend=backend)  # float32, as the plugin
    sel = pol.select(make_batch(Z, spec))
    keep = pol.keep_mask(Z)
    B, E = c["B"], c["E"]
    ids = sel.ids
    assert ids.shape == (c["L"], B, k)
    assert (torch.sort(ids, -1).values.diff(dim=-1) > 0).all(), "ids must be k distinct experts"
    assert keep.gather(1, ids.reshape(c["L"], -1)).all(), "every id must be in KEEP"
    size = keep.sum(-1)
    assert (size >= k).all() and (size <= min(E, B * k)).all()
    assert torch.equal(sel.fidelity.distinct_experts, (sel.fidelity.expert_tokens > 0).sum(-1))
    assert (sel.fidelity.distinct_experts <= size).all()
    sums = sel.weights.double().sum(-1)
    if c["renorm"]:
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-5, atol=1e-5)
    else:
        mass = torch.softmax(Z.double(), -1).topk(k, -1).values.sum(-1)
        torch.testing.assert_close(sums, mass, rtol=1e-5, atol=1e-5)
    assert (sel.weights > 0).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 12), st.integers(2, 12), st.sampled_from([0.7, 1.0, 3.0]), st.integers(0, 3))
def test_float64_key_is_lexicographic(seed, B, E, alpha, beta):
    k = min(2, E)
    Z = random_logits(seed, 1, B, E, scale=1.5, quantum=0.5)
    pol = Lynx(RouterSpec(E, k), alpha, beta, arithmetic="float64")
    expected = lexicographic_picks(Z[0].numpy(), k, alpha, beta)
    got = torch.sort(pol.picks(Z)[0], -1).values.tolist()
    assert got == [sorted(p) for p in expected], "each token's picks, not only their union"


def test_float32_can_drop_deep_levels_float64_cannot():
    """LYNX.md: float32 keys lose the deepest popularity levels at large B; float64 keeps them.

    Token 0 must choose between experts 0 and 1, both in its own bin -3, both in bin 0 of token 1;
    only token 2 separates them, with expert 1 in its bin -3 (weight B**-3, far below float32's
    resolution of a key near -3)."""
    B, E = 64, 4
    spec = RouterSpec(E, 2)
    Z = torch.full((1, B, E), -100.0)
    Z[0, :, 2] = 0.0  # every other token's top expert: 2
    Z[0, 0] = torch.tensor([-3.0, -3.0, -100.0, 0.0])
    Z[0, 1] = torch.tensor([0.0, 0.0, -100.0, -100.0])
    Z[0, 2, 1] = -3.0
    p32, p64 = Lynx(spec, 1.0, 4, "float32"), Lynx(spec, 1.0, 4, "float64")
    k32 = p32.keys(Z)[0][0, 0]
    assert k32[0] == k32[1], "float32 cannot see the bin -3 difference"
    assert sorted(p32.picks(Z)[0, 0].tolist()) == [0, 3]  # tie -> lowest index
    assert sorted(p64.picks(Z)[0, 0].tolist()) == [1, 3]  # exact: token 2's bin -3 vote decides
    assert lexicographic_picks(Z[0].double().numpy(), 2, 1.0, 4)[0] == [3, 1]


def test_batch_one_tie_falls_to_lowest_index():
    """B = 1: popularity is 0, so inside bin 0 the lowest index wins and the true top-1 can be lost."""
    spec = RouterSpec(8, 1)
    Z = torch.full((1, 1, 8), -5.0, dtype=torch.float64)
    Z[0, 0, 5] = 1.0  # true top-1
    Z[0, 0, 2] = 0.5  # gap -0.5: ceil(0.7 * -0.5) = 0, the same bin as the top-1
    batch = make_batch(Z, spec)
    plugin = Lynx(spec, 0.7, 1).select(batch)
    assert plugin.ids.item() == 2 and plugin.fidelity.top1_retention.item() == 0.0
    own = Lynx(spec, 0.7, 1, tie_break="own_logit").select(batch)
    assert own.ids.item() == 5 and own.fidelity.top1_retention.item() == 1.0
    wide = Lynx(spec, 3.0, 1).select(batch)  # alpha 3: bin(-0.5) = ceil(-1.5) = -1, no tie
    assert wide.ids.item() == 5


def test_shared_experts_shrink_the_union():
    """Token 0's second choice sits in a bin with an expert token 1 uses: popularity moves it there."""
    spec = RouterSpec(4, 2)
    Z = torch.tensor([[[0.0, -1.5, -1.2, -9.0], [-0.3, 0.0, -9.0, -9.0]]], dtype=torch.float64)
    sel = Lynx(spec, 1.0, 2, arithmetic="float64").select(make_batch(Z, spec))
    van = Vanilla(spec).select(make_batch(Z, spec))
    assert van.fidelity.distinct_experts.item() == 3
    assert sel.fidelity.distinct_experts.item() == 2
    assert set(sel.ids.flatten().tolist()) == {0, 1}
    assert sel.ids[0, 0].tolist() == [0, 1] and sel.fidelity.top1_retention.item() == 1.0


def test_prefill_in_batch_means_plain_topk():
    spec = RouterSpec(16, 4)
    Z = random_logits(3, 2, 8, 16)
    decode = torch.ones(8, dtype=torch.bool)
    decode[3] = False
    batch = make_batch(Z, spec, decode)
    sel = Lynx(spec, 1.0, 2).select(batch)
    assert not sel.acted and torch.equal(sel.ids, batch.ids) and torch.equal(sel.weights, batch.weights)
    batch.decode[:] = True
    assert Lynx(spec, 1.0, 2).select(batch).acted


@settings(max_examples=30, deadline=None)
@given(case)
def test_vanilla_is_identity(c):
    k = _k(c)
    spec = RouterSpec(c["E"], k, "softmax", c["renorm"])
    batch = make_batch(random_logits(c["seed"], c["L"], c["B"], c["E"]), spec)
    sel = Vanilla(spec).select(batch)
    assert torch.equal(sel.ids, batch.ids) and torch.equal(sel.weights, batch.weights)
    assert (sel.fidelity.top1_retention == 1).all() and (sel.fidelity.gate_mass_retained == 1).all()


def test_sigmoid_router_bins_without_floor():
    spec = RouterSpec(8, 1, "sigmoid", renormalize=False)
    pol = Lynx(spec, 1.0, 5)
    assert pol.beta is None
    Z = random_logits(1, 2, 6, 8, dtype=torch.float32)
    sel = pol.select(make_batch(Z, spec))
    torch.testing.assert_close(sel.weights, torch.sigmoid(Z.gather(-1, sel.ids)))


def test_bad_parameters_and_missing_logits():
    spec = RouterSpec(8, 2)
    with pytest.raises(ValueError, match="alpha"):
        Lynx(spec, 0.0, 1)
    with pytest.raises(ValueError, match="beta"):
        Lynx(spec, 1.0, None)
    with pytest.raises(ValueError, match="arithmetic"):
        Lynx(spec, 1.0, 1, arithmetic="float16")
    with pytest.raises(ValueError, match="backend: expected auto or torch for a sigmoid router"):
        Lynx(RouterSpec(8, 2, "sigmoid"), 1.0, None, backend="compiled")
    with pytest.raises(ValueError, match="backend: expected auto or torch"):
        Lynx(spec, 1.0, 1, tie_break="own_logit", backend="compiled")
    with pytest.raises(ValueError, match="2\\*\\*53"):
        Lynx(spec, 1.0, 8, arithmetic="float64").keys(torch.zeros(1, 100, 8))
    Z = random_logits(0, 1, 4, 8)
    ids, w = route(Z, spec)
    with pytest.raises(PolicyInputError, match="needs router logits"):
        Lynx(spec, 1.0, 1).select(BatchRouting(ids, w, None))
    with pytest.raises(PolicyInputError, match="logits: expected"):
        Lynx(spec, 1.0, 1).select(BatchRouting(ids, w, Z[..., :5]))


def test_grouped_router_hand_case():
    """DeepSeek-style groups: bins on raw logits over all experts, picks only inside own groups."""
    spec = RouterSpec(8, 2, "grouped_topk", renormalize=True, n_group=4, topk_group=2)
    # token 0 uses groups {0, 1} (experts 0-3); token 1 uses groups {1, 3} (experts 2, 3, 6, 7)
    Z = torch.tensor([[[2.0, 1.6, 1.5, -5.0, -5.0, -5.0, -5.0, -5.0],
                       [-5.0, -5.0, 1.9, 0.0, -5.0, -5.0, 2.0, -5.0]]], dtype=torch.float64)
    van = Vanilla(spec).select(make_batch(Z, spec))
    assert van.ids[0].tolist() == [[0, 1], [6, 2]] and van.fidelity.distinct_experts.item() == 4
    sel = Lynx(spec, 1.0, 2, arithmetic="float64").select(make_batch(Z, spec))
    # token 0: experts 1 and 2 share its bin 0 behind expert 0; token 1 votes for 2 -> token 0 takes 2
    assert sel.ids[0].tolist() == [[0, 2], [6, 2]] and sel.fidelity.distinct_experts.item() == 3
    p = torch.softmax(Z[0, 0], -1)[[0, 2]]
    torch.testing.assert_close(sel.weights[0, 0].double(), p / p.sum(), rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(case, st.sampled_from([(2, 1), (4, 2), (8, 3)]))
def test_grouped_invariants(c, groups):
    n_group, topk_group = groups
    E = n_group * max(2, c["E"] // n_group)
    k = min(_k(c), topk_group * (E // n_group))
    spec = RouterSpec(E, k, "grouped_topk", c["renorm"], n_group, topk_group)
    Z = random_logits(c["seed"], c["L"], c["B"], E, quantum=c["quantum"], dtype=torch.float32)
    batch = make_batch(Z, spec)
    sel = Lynx(spec, c["alpha"], c["beta"]).select(batch)
    from lynx_sim.routing import group_mask
    inside = group_mask(Z, spec).gather(-1, sel.ids)
    assert inside.all(), "every expert must lie inside the token's own groups"
    keep = Lynx(spec, c["alpha"], c["beta"]).keep_mask(Z)
    assert (keep.sum(-1) >= k).all() and (keep.sum(-1) <= min(E, c["B"] * k)).all()
    assert keep.gather(1, sel.ids.reshape(c["L"], -1)).all(), "every expert must be in KEEP"
    sums = sel.weights.double().sum(-1)
    target = torch.ones_like(sums) if c["renorm"] else batch.weights.double().sum(-1)
    torch.testing.assert_close(sums, target, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(case, st.sampled_from(["float32", "float64"]), st.booleans())
def test_ranked_fast_path_equals_sorted_key(c, arithmetic, grouped):
    """The rank-table picks equal the plain sort of the per-element key, in both arithmetics."""
    k = _k(c)
    E = c["E"] - c["E"] % 2 if grouped else c["E"]
    E = max(E, 2)
    k = min(k, E // 2) if grouped else min(k, E)
    spec = RouterSpec(E, k, "grouped_topk", True, 2, 1) if grouped else RouterSpec(E, k)
    Z = random_logits(c["seed"], c["L"], c["B"], E, quantum=c["quantum"], dtype=torch.float32)
    pol = Lynx(spec, c["alpha"], c["beta"], arithmetic=arithmetic)
    fast = torch.sort(pol.picks(Z), -1).values
    slow = torch.sort(pol._picks_sorted(Z.to(pol.keys(Z)[0].dtype), pol.keys(Z)[0]), -1).values
    assert torch.equal(fast, slow)


def test_sigmoid_hand_case():
    """Llama-4 style: bins on raw logits with no floor, weights = sigmoid of the chosen logits.

    B = 2, alpha = 1: token 0 bins [0, 0, -3, -5], token 1 bins [-3, 0, 0, -5]; weights 2**bin;
    S = [1.125, 2, 1.125, 0.0625]. Each token's key puts expert 1 first (popular with the other
    token), so KEEP = {1} and both tokens move there; vanilla used experts 0 and 2."""
    spec = RouterSpec(4, 1, "sigmoid", renormalize=False)
    Z = torch.tensor([[[2.0, 1.5, -1.0, -3.0], [-2.0, 0.5, 1.0, -4.0]]], dtype=torch.float64)
    batch = make_batch(Z, spec)
    assert batch.ids[0].flatten().tolist() == [0, 2]
    sel = Lynx(spec, 1.0, None, arithmetic="float64").select(batch)
    assert sel.ids[0].flatten().tolist() == [1, 1] and sel.fidelity.distinct_experts.item() == 1
    torch.testing.assert_close(sel.weights[0].flatten().double(), torch.sigmoid(torch.tensor([1.5, 0.5], dtype=torch.float64)))


@settings(max_examples=60, deadline=None)
@given(case, st.sampled_from(["float32", "float64"]), st.sampled_from([0, 10**9]))
def test_compiled_cpu_selection_equals_torch_path(c, arithmetic, batched_max):
    """The numba selection (backend=compiled; both kernels: BATCHED_MAX = 0 forces the
    per-token one) and the torch path (backend=torch) give the same ids and weights."""
    from unittest import mock

    from lynx_sim.policies import lynx_cpu

    k = _k(c)
    spec = RouterSpec(c["E"], k, "softmax", c["renorm"])
    Z = random_logits(c["seed"], c["L"], c["B"], c["E"], quantum=c["quantum"], dtype=torch.float32)
    fast, slow = (Lynx(spec, c["alpha"], c["beta"], arithmetic=arithmetic, backend=b) for b in ("compiled", "torch"))
    batch = make_batch(Z, spec)
    assert fast.compiled_path(Z) and not slow.compiled_path(Z)
    assert Lynx(spec, c["alpha"], c["beta"], arithmetic=arithmetic).compiled_path(Z), "auto takes the kernels on the CPU"
    with mock.patch.object(lynx_cpu, "BATCHED_MAX", batched_max):
        fast_ids, fast_w = fast.route(batch)
    slow_ids, slow_w = slow.route(batch)
    assert torch.equal(fast_ids, slow_ids)
    torch.testing.assert_close(fast_w, slow_w, rtol=1e-6, atol=1e-7)


def test_backend_choice_is_one_place():
    """compiled_path reads backend and device; a GPU batch's compiled path is the Triton kernels,
    float32 configurations only; backend=compiled refuses a batch it cannot serve."""
    spec = RouterSpec(8, 2)
    assert Lynx(spec, 1.0, 1).compiled_path("cpu") and Lynx(spec, 1.0, 1).compiled_path("cuda")
    assert not Lynx(spec, 1.0, 1, "float64").compiled_path("cuda")
    assert not Lynx(spec, 1.0, 1, backend="torch").compiled_path("cuda")
    assert not Lynx(spec, 1.0, 1, tie_break="own_logit").compiled_path("cuda")
    assert Vanilla(spec).compiled_path("cpu") and not Vanilla(spec).compiled_path("cuda")
    with pytest.raises(PolicyInputError, match="backend=compiled: its compiled kernels run on CPU tensors"):
        Vanilla(spec, backend="compiled").compiled_path("cuda")
    with pytest.raises(ValueError, match="policy 'vanilla': backend: expected one of auto, torch, compiled"):
        Vanilla(spec, backend="numba")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arithmetic", ["float32", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_are_refused_by_name(backend, arithmetic, bad):
    """A NaN or infinite logit would make a bin NaN, and bins index the compiled kernels' tables:
    every path refuses the batch, naming the layer and token."""
    spec = RouterSpec(8, 2)
    Z = random_logits(0, 2, 5, 8, dtype=torch.float32)
    ids, w = route(Z, spec)
    Z[1, 3, 6] = bad
    with pytest.raises(PolicyInputError, match="logits: expected finite values, found a NaN or infinite logit at layer 1, token 3"):
        Lynx(spec, 0.7, 1, arithmetic=arithmetic, backend=backend).select(BatchRouting(ids, w, Z))


def test_float64_exactness_is_checked_on_every_path():
    """select() (CPU kernels) refuses a batch whose float64 keys would round, as keys() does."""
    spec = RouterSpec(8, 2)
    pol = Lynx(spec, 1.0, 4, arithmetic="float64")
    Z = random_logits(0, 1, 2048, 8)
    with pytest.raises(ValueError, match="2\\*\\*53"):
        pol.select(make_batch(Z, spec))
    assert pol.select(make_batch(Z[:, :64], spec)).acted  # B = 64 is fine
