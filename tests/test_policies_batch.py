"""The batch- and routing-profile-aware expert-reduction rules: prune, capacity, batch_budget, sere, oracle.

For each rule: a hand-computed case with exact ids and weights, its neutral parameters equal
vanilla on random batches, edge cases (B = 1, all tokens on one expert, an unused expert,
traces without weights or logits), parameter checks, its config, and a short simulation.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from lynx_sim.model import ModelSpec
from lynx_sim.policies import POLICIES, BatchRouting, PolicyContext, PolicyInputError, build_policy
from lynx_sim.policies.batch_budget import BatchBudget
from lynx_sim.policies.routing_profile import RoutingProfile
from lynx_sim.policies.capacity import Capacity, capacity_ranks
from lynx_sim.policies.fidelity import DROPPED
from lynx_sim.policies.oracle import Oracle
from lynx_sim.policies.prune import Prune
from lynx_sim.policies.sere import Sere, co_activation_cosine, pearson
from lynx_sim.policies.vanilla import Vanilla
from lynx_sim.routing import RouterSpec, route
from lynx_sim.run import run

RULES = ("prune", "capacity", "batch_budget", "sere", "oracle")


def T(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def ids_w(ids, w):
    """One layer of hand-written routing -> (ids [1, B, k] int64, weights [1, B, k])."""
    return T([ids], torch.int64), T([w])


def random_batch(seed, L=2, B=16, E=12, k=3, renorm=True, kind="softmax", ties=False, **groups):
    spec = RouterSpec(E, k, kind, renorm, **groups)
    g = np.random.default_rng(seed)
    z = g.normal(size=(L, B, E)) * 2
    if ties:
        z = np.round(z * 2) / 2
    Z = torch.from_numpy(z).float()
    ids, w = route(Z, spec)
    return spec, BatchRouting(ids, w, Z)


def random_profile(spec, L, seed=1, N=256, logits=True):
    g = np.random.default_rng(seed)
    z = torch.from_numpy(g.normal(size=(N, L, spec.num_experts)) * 2).float()
    ids, w = route(z, spec)
    return RoutingProfile(ids, w, z if logits else None, spec.num_experts, held_out=True)


def profile_from_ids(ids, E):
    """A RoutingProfile of one layer whose tokens use the given experts (no weights, no logits)."""
    return RoutingProfile(T(ids, torch.int64)[:, None, :], None, None, E, held_out=True)


def built(name, spec, L, **params):
    pol = POLICIES[name](PolicyContext(spec, 5e-6), **params)
    if pol.needs_profile:
        pol.prepare(random_profile(spec, L))
    return pol


def assert_routing(sel, ids, w):
    assert sel.ids.tolist() == ids, sel.ids.tolist()
    torch.testing.assert_close(sel.weights, T(w), rtol=0, atol=1e-6)


# --- every rule: neutral parameters, traces without weights or logits, B = 1, one hot expert ---

NEUTRAL_CASES = [dict(seed=s, renorm=r, ties=t) for s, r, t in itertools.product(range(3), (True, False), (False, True))]


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("case", NEUTRAL_CASES)
def test_neutral_parameters_reproduce_vanilla(name, case):
    spec, batch = random_batch(case["seed"], renorm=case["renorm"], ties=case["ties"])
    pol = built(name, spec, 2, **POLICIES[name].neutral_params(spec))
    for b in (batch, BatchRouting(batch.ids, batch.weights, None), BatchRouting(batch.ids, None, None)):
        sel = pol.select(b)
        assert sel.acted and torch.equal(sel.ids, b.ids)
        assert (sel.weights is None) if b.weights is None else torch.equal(sel.weights, b.weights)


STRONG = {"prune": dict(keep_fraction=0.3), "capacity": dict(capacity_factor=0.5), "batch_budget": dict(budget=2),
          "sere": dict(top_s=1, rho=-1.0), "oracle": dict(lambda_us=5.0)}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "grouped_topk"])
def test_every_field_combination_keeps_the_convention(name, kind):
    groups = {"n_group": 4, "topk_group": 2} if kind == "grouped_topk" else {}
    spec, batch = random_batch(7, L=3, B=24, E=16, k=4, renorm=kind != "sigmoid", kind=kind, **groups)
    pol = built(name, spec, 3, **STRONG[name])
    van = Vanilla(spec).select(batch).fidelity.distinct_experts
    for b in (batch, BatchRouting(batch.ids, batch.weights, None), BatchRouting(batch.ids, None, batch.logits),
              BatchRouting(batch.ids, None, None)):
        sel = pol.select(b)  # the base class checks the output convention
        assert (sel.weights is None) == (b.weights is None)
        if name != "prune":  # pruning may re-route onto experts the batch did not use
            assert (sel.fidelity.distinct_experts <= van).all()
        if sel.weights is not None and pol.renormalize and name != "prune":
            torch.testing.assert_close(sel.weights.sum(-1), b.weights.sum(-1))


@pytest.mark.parametrize("name", RULES)
def test_batch_of_one(name):
    spec, batch = random_batch(3, L=2, B=1, E=8, k=3)
    sel = built(name, spec, 2, **STRONG[name]).select(batch)
    assert ((sel.ids != DROPPED).sum(-1) >= 1).all()
    if name in ("capacity", "batch_budget"):  # C >= B = 1; budget 2 < 3 experts: one slot truncated
        assert (sel.ids[..., :2] == batch.ids[..., :2]).all()
    if name in ("sere", "oracle"):  # a lone token's other slots have no other kept expert / too little mass
        assert sel.ids[..., 0].tolist() == batch.ids[..., 0].tolist()


@pytest.mark.parametrize("name", RULES)
def test_all_tokens_on_one_expert(name):
    """Every token's top-1 is expert 5; the other 7 experts are never used."""
    spec = RouterSpec(8, 1)
    ids = torch.full((1, 10, 1), 5)
    w = torch.ones(1, 10, 1)
    pol = POLICIES[name](spec, **STRONG[name])
    if pol.needs_profile:  # the profile also puts everything on expert 5
        pol.prepare(profile_from_ids([[5]] * 4, 8))
    sel = pol.select(BatchRouting(ids, w))
    assert torch.equal(sel.ids, ids) and torch.equal(sel.weights, w)
    assert sel.fidelity.distinct_experts.tolist() == [1]


@pytest.mark.parametrize("name", RULES)
def test_config_composes_and_builds(name):
    cfg = compose_cfg([f"policy={name}", "model=mixtral_8x7b"])
    pol = build_policy(cfg.policy, ModelSpec.from_cfg(cfg.model), expert_time_s=1e-4)
    assert pol.name == name and type(pol) is POLICIES[name]
    assert set(pol.params()) >= {k for k in cfg.policy if k != "name"}


@pytest.mark.parametrize("name,overrides", [
    ("prune", []), ("capacity", ["policy.capacity_factor=0.5"]), ("batch_budget", ["policy.budget=4"]),
    ("batch_budget", ["policy.budget=4", "policy.fallback=substitute"]), ("sere", []), ("oracle", []),
])
def test_short_simulation(name, overrides):
    s = run(compose_cfg([f"policy={name}", "batch=16", "workload.steps=5", "model=mixtral_8x7b", "hardware=h200", *overrides]), quiet=True)
    d = s["distinct_experts"]
    assert s["steps"] == 5 and s["policy_acted_fraction"] == 1.0
    assert 0 < s["gate_mass_retained"] < 1
    moves = name == "prune" or "policy.fallback=substitute" in overrides  # slots move rather than drop
    assert (s["experts_per_token"] == 2) if moves else (s["experts_per_token"] < 2)
    if name == "capacity":  # it cuts assignments, not experts: every expert is some token's protected top-1
        assert d["policy"] <= d["vanilla"] and s["speedup"] >= 1.0
    else:
        assert d["policy"] < d["vanilla"] and s["speedup"] > 1.0, s
    if name == "batch_budget":
        assert d["policy"] <= 4
    if name in ("capacity", "sere"):
        assert s["top1_retention"] == 1.0  # both keep every token's top-1
    if name == "oracle":
        assert s["policy_params"]["expert_time_us_used"] > 0  # the roofline's expert time reached it


# --- prune ---

def test_prune_hand_case():
    """Profile frequencies 2, 1, 3, 2: keep_fraction 0.5 keeps experts 2 and 0 (0 beats 3 on the tie)."""
    spec = RouterSpec(4, 2)
    pol = Prune(spec, keep_fraction=0.5)
    pol.prepare(profile_from_ids([[2, 0], [2, 3], [2, 1], [0, 3]], 4))
    assert pol.kept.tolist() == [[True, False, True, False]]
    Z = T([[[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 1.0, -5.0], [0.0, 0.0, 0.0, 5.0]]])
    ids, w = route(Z, spec)
    assert ids.tolist() == [[[2, 0], [1, 2], [3, 0]]]
    sel = pol.select(BatchRouting(ids, w, Z))
    e = math.e
    assert_routing(sel, [[[2, 0], [2, 0], [0, 2]]], [[w[0, 0].tolist(), [e / (1 + e), 1 / (1 + e)], [0.5, 0.5]]])
    assert torch.equal(sel.weights[0, 0], w[0, 0])  # untouched token: exactly the model's own
    # without logits: pruned slots dropped; a token left with none keeps its top-1
    ids, w = ids_w([[2, 0], [1, 2], [3, 0], [1, 3]], [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.8, 0.2]])
    sel = pol.select(BatchRouting(ids, w))
    assert_routing(sel, [[[2, 0], [-1, 2], [-1, 0], [1, -1]]], [[[0.7, 0.3], [0, 1], [0, 1], [1, 0]]])
    sel = Prune(spec, 0.5, renormalize=False)
    sel.prepare(profile_from_ids([[2, 0], [2, 3], [2, 1], [0, 3]], 4))
    assert_routing(sel.select(BatchRouting(ids, w)), [[[2, 0], [-1, 2], [-1, 0], [1, -1]]],
                   [[[0.7, 0.3], [0, 0.4], [0, 0.1], [0.8, 0]]])


def test_prune_fewer_kept_than_k():
    """keep_fraction 0.25 of 4 experts keeps 1 (expert 2) with k = 2: every token gets [2, DROPPED]."""
    spec = RouterSpec(4, 2)
    pol = Prune(spec, keep_fraction=0.25)
    pol.prepare(profile_from_ids([[2, 0], [2, 3], [2, 1], [0, 3]], 4))
    Z = T([[[1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 1.0, -5.0]]])
    sel = pol.select(BatchRouting(*route(Z, spec), Z))
    assert_routing(sel, [[[2, -1], [2, -1]]], [[[1, 0], [1, 0]]])


@pytest.mark.parametrize("renorm", [True, False])
def test_prune_reroutes_as_route_with_allowed_mask(renorm):
    """The re-routed tokens get exactly the pruned router's routing: route() of the logits with
    the pruned experts' rows removed (masked to -inf), n >= k."""
    spec, batch = random_batch(11, L=3, B=40, E=16, k=4, renorm=renorm)
    pol = built("prune", spec, 3, keep_fraction=0.5)
    sel = pol.select(batch)
    ref_ids, ref_w = route(batch.logits.masked_fill(~pol.kept[:, None, :], float("-inf")), spec)
    hit = ~pol.kept[:, None, :].expand(3, 40, 16).gather(-1, batch.ids).all(-1)  # [L, B] affected
    assert hit.any() and (~hit).any()
    assert torch.equal(sel.ids[hit], ref_ids[hit]) and torch.equal(sel.ids[~hit], batch.ids[~hit])
    torch.testing.assert_close(sel.weights[hit], ref_w[hit].float(), rtol=1e-6, atol=1e-7)
    assert all(set(sel.ids[l][hit[l]].flatten().tolist()) <= set(pol.kept[l].nonzero().flatten().tolist())
               for l in range(3))


def test_prune_grouped_and_sigmoid_routers():
    spec, batch = random_batch(5, L=2, B=30, E=16, k=4, kind="grouped_topk", n_group=4, topk_group=2)
    pol = built("prune", spec, 2, keep_fraction=0.25)  # 4 kept experts: some tokens get fewer than k
    sel = pol.select(batch)
    for l in range(2):
        kept = set(pol.kept[l].nonzero().flatten().tolist())
        assert set(sel.ids[l].flatten().tolist()) - {DROPPED} <= kept | set(batch.ids[l].flatten().tolist())
    spec, batch = random_batch(5, L=2, B=30, E=16, k=2, kind="sigmoid", renorm=False)
    sel = built("prune", spec, 2, keep_fraction=0.5).select(batch)
    torch.testing.assert_close(sel.weights, torch.sigmoid(batch.logits.gather(-1, sel.ids)))


def test_prune_errors():
    spec = RouterSpec(8, 2)
    for bad in (0, -0.1, 1.5, "half", True, None):
        with pytest.raises(ValueError, match="policy 'prune': keep_fraction: expected"):
            Prune(spec, keep_fraction=bad)
    with pytest.raises(ValueError, match="renormalize"):
        Prune(spec, renormalize="yes")
    _, batch = random_batch(0, L=2, E=8, k=2)
    with pytest.raises(PolicyInputError, match="prepare"):
        Prune(spec).select(batch)
    pol = Prune(spec)
    with pytest.raises(PolicyInputError, match="routing profile has 4 experts"):
        pol.prepare(profile_from_ids([[0, 1]], 4))
    pol.prepare(random_profile(spec, L=3))
    with pytest.raises(PolicyInputError, match="profiled on 3 MoE layers"):
        pol.select(batch)


# --- capacity ---

def test_capacity_hand_case():
    """E=4, k=2, B=4, factor 1: C = 2. Expert 0 has four assignments: keeps its two heaviest."""
    ids, w = ids_w([[0, 1], [0, 2], [3, 0], [1, 0]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    pol = Capacity(RouterSpec(4, 2), capacity_factor=1.0)
    assert pol.capacity(4) == 2
    assert_routing(pol.select(BatchRouting(ids, w)), [[[0, 1], [0, 2], [3, -1], [1, -1]]],
                   [[[0.6, 0.4], [0.7, 0.3], [1, 0], [1, 0]]])
    pol = Capacity(RouterSpec(4, 2), capacity_factor=1.0, renormalize=False)
    assert pol.select(BatchRouting(ids, w)).weights[0, 2].tolist() == pytest.approx([0.8, 0.0])


def test_capacity_keeps_top1_beyond_capacity_and_ties_go_to_earlier_tokens():
    spec = RouterSpec(4, 2)
    ids, w = ids_w([[0, 1], [0, 2], [0, 3], [2, 1]], [[0.6, 0.4], [0.7, 0.3], [0.55, 0.45], [0.5, 0.5]])
    sel = Capacity(spec, 1.0).select(BatchRouting(ids, w))  # expert 0: three top-1 slots > C = 2, all kept
    assert sel.ids.tolist() == ids.tolist() and sel.fidelity.expert_tokens[0, 0] == 3
    # no weights: everything ties; expert 1 gets tokens 0, 1, 2 at slot 1: token 2's is dropped
    ids = T([[[0, 1], [2, 1], [3, 1], [1, 0]]], torch.int64)
    sel = Capacity(spec, 1.0).select(BatchRouting(ids))
    assert sel.ids.tolist() == [[[0, 1], [2, 1], [3, -1], [1, 0]]] and sel.weights is None


@pytest.mark.parametrize("seed", range(5))
def test_capacity_ranks_match_their_definition(seed):
    """The one-sort integer key ranks as the definition: by expert, falling weight, then position."""
    g = np.random.default_rng(seed)
    L, B, E, k = 2, 30, 10, 3
    ids = torch.from_numpy(np.argsort(g.random((L, B, E)), -1)[..., :k])
    w = torch.from_numpy(np.round(g.random((L, B, k)) * 4) / 4).float()  # many ties
    ranks = capacity_ranks(ids, w, E)
    for l in range(L):
        for e in range(E):
            where = [(b, j) for b in range(B) for j in range(k) if ids[l, b, j] == e]
            expected = sorted(where, key=lambda bj: (-w[l, bj[0], bj[1]].item(), bj))
            assert [ranks[l, b, j].item() for b, j in expected] == list(range(len(expected)))


def test_capacity_rounding_and_errors():
    assert Capacity(RouterSpec(10, 1), 1.1).capacity(10) == 2  # 1.1 x 10 x 1 / 10 = 1.1
    assert Capacity(RouterSpec(11, 1), 1.1).capacity(10) == 1  # 1.0000000000000002 does not add a slot
    for bad in (0, -1, float("inf"), float("nan"), "1", True):
        with pytest.raises(ValueError, match="policy 'capacity': capacity_factor: expected"):
            Capacity(RouterSpec(8, 2), capacity_factor=bad)
    with pytest.raises(ValueError, match="renormalize"):
        Capacity(RouterSpec(8, 2), renormalize=1)


# --- batch_budget ---

HAND_IDS, HAND_W = [[0, 1], [0, 2], [3, 1]], [[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]]  # W = 1.3, 0.9, 0.3, 0.5


def test_batch_budget_hand_case_truncate():
    ids, w = ids_w(HAND_IDS, HAND_W)
    spec = RouterSpec(4, 2)
    pol = BatchBudget(spec, budget=2)
    assert pol.keep_mask(BatchRouting(ids, w)).tolist() == [[True, True, False, False]]
    assert_routing(pol.select(BatchRouting(ids, w)), [[[0, 1], [0, -1], [-1, 1]]], [[[0.6, 0.4], [1, 0], [0, 1]]])
    # budget 1 keeps expert 0: token 2 has none of it and moves its top-1 slot there
    assert_routing(BatchBudget(spec, budget=1).select(BatchRouting(ids, w)),
                   [[[0, -1], [0, -1], [0, -1]]], [[[1, 0], [1, 0], [1, 0]]])
    # budget null = B = 3: experts 0, 1, 3 (W 1.3, 0.9, 0.5)
    assert BatchBudget(spec).keep_mask(BatchRouting(ids, w)).tolist() == [[True, True, False, True]]


def test_batch_budget_hand_case_substitute():
    ids, w = ids_w(HAND_IDS, HAND_W)
    spec = RouterSpec(4, 2)
    pol = BatchBudget(spec, budget=2, fallback="substitute")  # by W: token 1's slot -> 1, token 2's -> 0
    assert_routing(pol.select(BatchRouting(ids, w)), [[[0, 1], [0, 1], [0, 1]]], [[[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]]])
    # budget 3 keeps 0, 1, 3; token 1's expert-2 slot: by W expert 1, by its own logit expert 3
    pol = BatchBudget(spec, budget=3, fallback="substitute")
    assert pol.select(BatchRouting(ids, w)).ids[0, 1].tolist() == [0, 1]
    Z = T([[[2.0, 1.0, 0.0, -1.0], [2.0, -1.0, 1.0, 0.5], [-1.0, 1.0, -2.0, 1.0]]])
    assert pol.select(BatchRouting(ids, w, Z)).ids[0, 1].tolist() == [0, 3]


def test_batch_budget_substitute_runs_out_of_candidates_and_ties():
    """budget 2 with k = 3: a token with two dropped slots gets one substitute, the other is dropped.
    Without weights W counts tokens; equal counts go to the lowest index."""
    spec = RouterSpec(6, 3)
    ids = T([[[0, 1, 2], [0, 3, 4], [1, 5, 0]]], torch.int64)  # counts: 0:3, 1:2, others 1
    sel = BatchBudget(spec, budget=2, fallback="substitute").select(BatchRouting(ids))
    assert sel.ids.tolist() == [[[0, 1, -1], [0, 1, -1], [1, -1, 0]]]
    ids, w = ids_w([[0, 1, 2], [0, 3, 4], [1, 5, 0]], [[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    sel = BatchBudget(spec, budget=2, fallback="substitute").select(BatchRouting(ids, w))
    assert sel.ids.tolist() == [[[0, 1, -1], [0, 1, -1], [1, -1, 0]]]
    torch.testing.assert_close(sel.weights, T([[[0.5 / 0.8, 0.3 / 0.8, 0], [0.5 / 0.8, 0.3 / 0.8, 0], [0.5 / 0.7, 0, 0.2 / 0.7]]]))


def test_batch_budget_unused_experts_never_outrank_used_ones():
    """A used expert with zero weight still beats unused experts of equal (zero) mass."""
    spec = RouterSpec(4, 2)
    ids, w = ids_w([[1, 3], [1, 3]], [[1.0, 0.0], [1.0, 0.0]])
    assert BatchBudget(spec, budget=2).keep_mask(BatchRouting(ids, w)).tolist() == [[False, True, False, True]]


def test_batch_budget_errors():
    spec = RouterSpec(8, 2)
    for bad in (0, -3, 2.5, "4", True):
        with pytest.raises(ValueError, match="policy 'batch_budget': budget: expected"):
            BatchBudget(spec, budget=bad)
    with pytest.raises(ValueError, match="fallback: expected one of"):
        BatchBudget(spec, fallback="nearest")
    with pytest.raises(ValueError, match="renormalize"):
        BatchBudget(spec, renormalize=None)


# --- sere ---

def hand_sere(k=2, **params):
    pol = Sere(RouterSpec(4, k), **params)
    pol.prepare(profile_from_ids([[0, 1, 2][:k]], 4))
    return pol


def test_sere_hand_case():
    """KEEP = top-1s = {0, 2}. sim(1, 2) = 0.9, sim(3, 0) = 0.8, sim(3, 2) = 0.1; rho 0.3."""
    pol = hand_sere(rho=0.3)
    sim = torch.zeros(1, 4, 4)
    sim[0, 1, 2], sim[0, 1, 0], sim[0, 3, 0], sim[0, 3, 2] = 0.9, 0.5, 0.8, 0.1
    pol.sim = sim
    ids, w = ids_w([[0, 1], [2, 3], [0, 3]], [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]])
    sel = pol.select(BatchRouting(ids, w))
    assert_routing(sel, [[[0, 2], [2, 0], [0, -1]]], [[[0.6, 0.4], [0.7, 0.3], [1, 0]]])
    pol.rho = 0.05  # now token 2's expert 3 moves to 2 (0 is its own), with its own weight
    assert_routing(pol.select(BatchRouting(ids, w)), [[[0, 2], [2, 0], [0, 2]]], [[[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]])
    pol.renormalize, pol.rho = False, 0.3
    assert pol.select(BatchRouting(ids, w)).weights[0, 2].tolist() == pytest.approx([0.8, 0.0])


def test_sere_stronger_slot_chooses_first_and_top_s():
    """Token 0 = [0, 1, 3] (weights falling); both 1 and 3 are most similar to kept expert 2."""
    pol = hand_sere(k=3, rho=0.0)
    sim = torch.zeros(1, 4, 4)
    sim[0, 1, 2], sim[0, 3, 2], sim[0, 1, 0] = 0.9, 0.95, 0.2
    pol.sim = sim
    ids, w = ids_w([[0, 1, 3], [2, 0, 1]], [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    sel = pol.select(BatchRouting(ids, w))
    assert sel.ids.tolist() == [[[0, 2, -1], [2, 0, -1]]]  # token 0's expert-3 slot: 2 taken, 0 its own
    # slots in unordered positions: the weight order decides, and slots stay where they were
    ids2, w2 = ids_w([[3, 0, 1], [2, 0, 1]], [[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]])
    assert pol.select(BatchRouting(ids2, w2)).ids.tolist() == [[[-1, 0, 2], [2, 0, -1]]]
    pol.sim = torch.zeros(1, 4, 4)  # all similarities tie: the lowest free kept expert wins
    ids3, w3 = ids_w([[0, 3, 2], [2, 1, 3], [1, 0, 3]], [[0.5, 0.3, 0.2]] * 3)  # KEEP = {0, 1, 2}
    assert pol.select(BatchRouting(ids3, w3)).ids.tolist() == [[[0, 1, 2], [2, 1, 0], [1, 0, 2]]]
    pol.sim = sim
    pol.top_s = 2  # KEEP = {0, 1, 2}: token 0 keeps 0 and 1, its expert 3 moves to the free 2
    assert pol.select(BatchRouting(ids, w)).ids.tolist() == [[[0, 1, 2], [2, 0, 1]]]


def test_sere_similarity_from_profile():
    g = np.random.default_rng(0)
    z = g.normal(size=(200, 2, 5))
    z[:, 1, 3] = 1.5  # a constant expert: correlation undefined -> 0
    sim = pearson(torch.from_numpy(z))
    np.testing.assert_allclose(sim[0].numpy(), np.corrcoef(z[:, 0, :].T), atol=1e-12)
    assert (sim[1, 3] == 0).all() and (sim[1, :, 3] == 0).all()
    ids = T([[[0, 1]], [[0, 2]], [[1, 0]], [[3, 2]]], torch.int64)  # [N=4, L=1, k=2]
    cos = co_activation_cosine(ids, 5)[0]
    assert cos[0, 1].item() == pytest.approx(2 / math.sqrt(3 * 2))  # co-count 2, counts 3 and 2
    assert cos[0, 3].item() == 0 and cos[2, 3].item() == pytest.approx(1 / math.sqrt(2))
    assert (cos[4] == 0).all()  # never used
    spec = RouterSpec(5, 2)
    with_logits, ids_only = Sere(spec), Sere(spec)
    with_logits.prepare(random_profile(spec, L=2))
    ids_only.prepare(random_profile(spec, L=2, logits=False))
    assert with_logits.sim_kind == "logit_pearson" and ids_only.sim_kind == "coactivation_cosine"
    assert with_logits.sim.shape == ids_only.sim.shape == (2, 5, 5)


def test_sere_errors():
    spec = RouterSpec(8, 2)
    for bad in (0, 1.5, "1", True):
        with pytest.raises(ValueError, match="policy 'sere': top_s: expected"):
            Sere(spec, top_s=bad)
    for bad in (1.5, -2, float("nan"), "0"):
        with pytest.raises(ValueError, match="policy 'sere': rho: expected"):
            Sere(spec, rho=bad)
    _, batch = random_batch(0, L=2, E=8, k=2)
    with pytest.raises(PolicyInputError, match="prepare"):
        Sere(spec).select(batch)
    pol = Sere(spec)
    pol.prepare(random_profile(spec, L=1))
    with pytest.raises(PolicyInputError, match="profiled on 1 MoE layers"):
        pol.select(batch)


# --- oracle ---

def test_oracle_hand_case():
    """t = 10 us, lambda = 20 us: keep e iff W[e] >= 0.5. W = 1.3, 0.4, 0.3 (expert 3 unused)."""
    spec = RouterSpec(4, 2)
    ids, w = ids_w([[0, 1], [0, 2]], [[0.6, 0.4], [0.7, 0.3]])
    pol = Oracle(spec, lambda_us=20.0, expert_time_us=10.0)
    assert pol.threshold == pytest.approx(0.5)
    assert pol.kept_experts(BatchRouting(ids, w)).tolist() == [[True, False, False, False]]
    assert_routing(pol.select(BatchRouting(ids, w)), [[[0, -1], [0, -1]]], [[[1, 0], [1, 0]]])
    pol = Oracle(spec, lambda_us=20.0, expert_time_us=10.0, renormalize=False)
    assert_routing(pol.select(BatchRouting(ids, w)), [[[0, -1], [0, -1]]], [[[0.6, 0], [0.7, 0]]])
    # unnormalised weights are normalised per token; without weights each slot is 1/k
    ids, w = ids_w([[0, 1], [2, 1]], [[3.0, 1.0], [1.0, 1.0]])  # W = 0.75, 0.75, 0.5
    assert pol.kept_experts(BatchRouting(ids, w)).tolist() == [[True, True, True, False]]
    assert pol.kept_experts(BatchRouting(ids)).tolist() == [[True, True, True, False]]  # 0.5, 1.0, 0.5
    # repair: lambda 5 us -> threshold 2: nothing kept, every token keeps its top-1
    sel = Oracle(spec, lambda_us=5.0, expert_time_us=10.0).select(BatchRouting(ids, w))
    assert sel.ids.tolist() == [[[0, -1], [2, -1]]]


def test_oracle_expert_time_from_context_or_override():
    spec = RouterSpec(4, 2)
    ids, w = ids_w([[0, 1], [0, 2]], [[0.6, 0.4], [0.7, 0.3]])
    ctx = PolicyContext(spec, expert_time_s=10e-6)
    assert Oracle(ctx, lambda_us=20.0).threshold == pytest.approx(0.5)
    assert Oracle(ctx, lambda_us=20.0, expert_time_us=2.0).threshold == pytest.approx(0.1)  # the override wins
    free = Oracle(spec, lambda_us=20.0)  # a bare RouterSpec: t = 0, every expert is free
    assert free.threshold == 0 and torch.equal(free.select(BatchRouting(ids, w)).ids, ids)
    assert Oracle(ctx, lambda_us=0.0).threshold == math.inf


def cost(keep, W, t, lam):
    return keep.sum() * t + lam * W[~keep].sum()


@pytest.mark.parametrize("seed", range(40))
def test_oracle_is_optimal_against_brute_force(seed):
    g = np.random.default_rng(seed)
    E = int(g.integers(2, 9))
    k = int(g.integers(1, min(E, 3) + 1))
    B = int(g.integers(1, 7))
    spec = RouterSpec(E, k, renormalize=bool(g.integers(2)))
    Z = torch.from_numpy(g.normal(size=(1, B, E)) * 2).float()
    ids, w = route(Z, spec)
    t_us, lam_us = float(g.uniform(1, 10)), float(g.uniform(1, 40))
    pol = Oracle(spec, lambda_us=lam_us, expert_time_us=t_us)
    batch = BatchRouting(ids, w, Z)
    W = pol.mass(batch)[0].numpy()
    keep = pol.kept_experts(batch)[0].numpy()
    best = min(cost(np.array(s, bool), W, t_us, lam_us) for s in itertools.product((0, 1), repeat=E))
    assert cost(keep, W, t_us, lam_us) == pytest.approx(best, rel=1e-9, abs=1e-9)
    sel = pol.select(batch)
    used = sel.fidelity.expert_tokens[0].numpy() > 0
    repaired = not keep[ids[0].numpy()].any(-1).all()
    if not repaired:  # the output loads exactly the optimal experts the batch uses
        assert (used == (keep & (W > 0))).all()
    else:
        assert cost(used, W, t_us, lam_us) >= best - 1e-9


def test_oracle_errors():
    spec = RouterSpec(8, 2)
    for bad in (-1, float("nan"), "100", True, None):
        with pytest.raises(ValueError, match="policy 'oracle': lambda_us: expected"):
            Oracle(spec, lambda_us=bad)
    for bad in (-1, float("inf"), "3", False):
        with pytest.raises(ValueError, match="policy 'oracle': expert_time_us: expected"):
            Oracle(spec, expert_time_us=bad)
    with pytest.raises(ValueError, match="renormalize"):
        Oracle(spec, renormalize="no")


# --- inputs every rule refuses, and decode-only gating ---

@pytest.mark.parametrize("name", RULES)
def test_bad_shapes_are_input_errors(name):
    spec, batch = random_batch(0, L=2, E=12, k=3)
    pol = built(name, spec, 2)
    with pytest.raises(PolicyInputError, match="logits: expected"):
        pol.select(BatchRouting(batch.ids, batch.weights, batch.logits[..., :5]))
    with pytest.raises(PolicyInputError, match="ids: expected"):
        pol.select(BatchRouting(batch.ids[..., :2], None, None))


@pytest.mark.parametrize("name", RULES)
def test_decode_gating(name):
    spec, batch = random_batch(2, L=2, B=8, E=12, k=3)
    batch.decode = torch.ones(8, dtype=torch.bool)
    batch.decode[0] = False
    sel = built(name, spec, 2, **STRONG[name]).select(batch)
    assert sel.acted == (not POLICIES[name].decode_only)
    assert POLICIES[name].decode_only == (name in ("batch_budget", "sere", "oracle"))


@pytest.mark.parametrize("shape", [(32, 64, 8, 2), (6, 1, 128, 8), (4, 17, 64, 6)])
def test_compiled_fidelity_equals_torch(shape):
    """fidelity_cpu.py's one-pass kernel against the torch reductions, on fresh random batches
    with ties, dropped and replaced slots, and every combination of missing inputs."""
    from lynx_sim.policies.fidelity import DROPPED, measure, measure_torch
    from lynx_sim.routing import RouterSpec

    L, B, E, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    for trial in range(6):
        z = torch.randn(L, B, E, generator=g)
        if trial % 2:
            z = z.round()  # ties
        ids = torch.topk(z, k, -1).indices
        w = torch.softmax(torch.gather(z, -1, ids), -1)
        new, nw = ids.clone(), w.clone()
        drop = torch.rand(L, B, k, generator=g) < 0.3
        drop[..., 0] = False
        new[drop], nw[drop] = DROPPED, 0
        repl = (torch.rand(L, B, generator=g) < 0.3) & ~drop[..., -1]
        new[..., -1] = torch.where(repl, (ids[..., 0] + 1 + ids[..., -1]) % E, new[..., -1])
        new[..., -1] = torch.where((new[..., -1:] == new[..., :-1]).any(-1) & repl, ids[..., -1], new[..., -1])
        for kind in ("softmax", "sigmoid"):
            router = RouterSpec(num_experts=E, top_k=k, kind=kind)
            for b in (BatchRouting(ids, w, z), BatchRouting(ids, None, z), BatchRouting(ids, None, None),
                      BatchRouting(ids, None, None, ids_ordered=False), BatchRouting(ids, w, None),
                      BatchRouting(ids, w, z, logits_filled=True)):
                for ww in (nw, None):
                    a, r = measure(b, new, ww, router), measure_torch(b, new, ww, router)
                    for f in a.__dataclass_fields__:
                        x, y = getattr(a, f).double(), getattr(r, f).double()
                        assert torch.allclose(x, y, rtol=1e-9, atol=1e-12, equal_nan=True), (f, kind, trial)


def test_compiled_output_check_equals_torch():
    """check_cpu.py's one-pass convention check names the same violation as the torch twin, on
    random outputs broken in each way (alone and combined) and on valid ones."""
    from lynx_sim.policies.base import output_violation
    from lynx_sim.policies.check_cpu import MESSAGES, violation

    g = torch.Generator().manual_seed(7)
    seen = set()
    for trial in range(400):
        L, B, E = 1 + trial % 3, 1 + trial % 9, 4 + trial % 13
        k = 1 + trial % min(E, 4)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(L * B)]).reshape(L, B, k)
        w = torch.rand(L, B, k, generator=g)
        if k > 1:  # drop some slots, keeping one per token
            drop = torch.rand(L, B, k, generator=g) < 0.3
            drop[..., 0] = False
            ids[drop], w[drop] = DROPPED, 0
        for fault in torch.randint(0, 6, (2,), generator=g).tolist():
            l, b, j = (int(torch.randint(0, n, (1,), generator=g)) for n in (L, B, k))
            if fault == 1:
                ids[l, b, j] = E if trial % 2 else -2
            elif fault == 2:
                ids[l, b], w[l, b] = DROPPED, 0
            elif fault == 3 and k > 1:
                ids[l, b, :2] = int(torch.randint(0, E, (1,), generator=g))
            elif fault == 4:
                w[l, b, j] = (float("nan"), -0.5, float("inf"))[trial % 3]
            elif fault == 5 and k > 1:
                ids[l, b, j], w[l, b, j] = DROPPED, 0.25
        for ww in (w, None):
            want = output_violation(ids, ww, E)
            got = MESSAGES.get(violation(ids.numpy(), (ww if ww is not None else w).numpy(), E, ww is not None))
            assert got == want, (trial, ids, ww)
            seen.add(want)
    assert seen == {None, *MESSAGES.values()}  # every kind of violation was exercised
