"""The per-token expert-reduction rules (LYNX.md section 5): static_k, layer_k, relative_skip,
absolute_skip, top_p, entropy_k. Each: a hand-computed case, its neutral parameters equal
vanilla, edge cases, bad parameters, its config, and a short simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_cfg
from lynx_sim.model import ModelSpec
from lynx_sim.policies import POLICIES, BatchRouting, PolicyInputError, build_policy
from lynx_sim.policies.routing_profile import RoutingProfile
from lynx_sim.policies.fidelity import DROPPED
from lynx_sim.policies.layer_k import allocate
from lynx_sim.routing import RouterSpec, route
from lynx_sim.run import run

RULES = ("static_k", "layer_k", "relative_skip", "absolute_skip", "top_p", "entropy_k")
X = DROPPED

# Three tokens, k = 4 of E = 8, slots deliberately not sorted by weight:
#   A sums to 1, ranks: slot 1 (1/2), slot 2 (1/4), slot 0 (1/8, tie -> lower slot), slot 3 (1/8)
#   B sums to 1/2 (a non-renormalising router), ranks: slot 1, slot 3, slot 0, slot 2
#   C all tied: ranks follow the slots
HAND_IDS = [[3, 5, 1, 7], [6, 0, 4, 2], [1, 2, 3, 4]]
HAND_W = [[1 / 8, 1 / 2, 1 / 4, 1 / 8], [1 / 16, 1 / 4, 1 / 16, 1 / 8], [1 / 4, 1 / 4, 1 / 4, 1 / 4]]
SPEC = RouterSpec(8, 4)


def hand_batch(layers: int = 1, logits=None) -> BatchRouting:
    ids = torch.tensor([HAND_IDS] * layers, dtype=torch.int64)
    return BatchRouting(ids, torch.tensor([HAND_W] * layers, dtype=torch.float32), logits)


def check(sel, ids, weights):
    assert sel.acted
    assert sel.ids.tolist() == ids
    torch.testing.assert_close(sel.weights, torch.tensor(weights, dtype=torch.float32), rtol=1e-6, atol=1e-7)


def random_batch(seed, L, B, E, k, kind="softmax", renorm=True, shuffle=False, quantum=None):
    """Routing from random logits; `shuffle` permutes each token's slots, `quantum` creates weight ties."""
    g = np.random.default_rng(seed)
    z = g.normal(size=(L, B, E)) * 2.0
    if quantum:
        z = np.round(z / quantum) * quantum
    Z = torch.from_numpy(z).float()
    spec = RouterSpec(E, k, kind, renorm)
    ids, w = route(Z, spec)
    if shuffle:
        perm = torch.from_numpy(np.argsort(g.random(size=(L, B, k)), -1))
        ids, w = ids.gather(-1, perm), w.gather(-1, perm)
    return spec, BatchRouting(ids, w, Z)


def random_profile(spec: RouterSpec, L: int, seed: int = 0, N: int = 64) -> RoutingProfile:
    _, b = random_batch(seed, N, L, spec.num_experts, spec.top_k)  # [N, L, ...] layout: tokens first
    return RoutingProfile(b.ids, b.weights, b.logits, spec.num_experts, held_out=True)


def build(name, spec, L=1, **params):
    pol = POLICIES[name](spec, **params)
    if pol.needs_profile:
        pol.prepare(random_profile(spec, L))
    return pol


# --- static_k -------------------------------------------------------------------------------

@pytest.mark.parametrize("k, renorm, ids, weights", [
    (2, True, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, X, X]]],
     [[[0, 2 / 3, 1 / 3, 0], [0, 1 / 3, 0, 1 / 6], [1 / 2, 1 / 2, 0, 0]]]),
    (2, False, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, X, X]]],
     [[[0, 1 / 2, 1 / 4, 0], [0, 1 / 4, 0, 1 / 8], [1 / 4, 1 / 4, 0, 0]]]),
    (3, True, [[[3, 5, 1, X], [6, 0, X, 2], [1, 2, 3, X]]],
     [[[1 / 7, 4 / 7, 2 / 7, 0], [1 / 14, 2 / 7, 0, 1 / 7], [1 / 3, 1 / 3, 1 / 3, 0]]]),
    (1, True, [[[X, 5, X, X], [X, 0, X, X], [1, X, X, X]]], [[[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1, 0, 0, 0]]]),
])
def test_static_k_by_hand(k, renorm, ids, weights):
    check(POLICIES["static_k"](SPEC, k=k, renormalize=renorm).select(hand_batch()), ids, weights)


def test_static_k_at_model_k_is_a_no_op_and_above_is_refused():
    b = hand_batch()
    sel = POLICIES["static_k"](SPEC, k=4).select(b)
    assert sel.ids is b.ids and sel.weights is b.weights
    with pytest.raises(ValueError, match=r"policy 'static_k': k: expected an int in 1..4 \(the model's top_k\), found 9"):
        POLICIES["static_k"](SPEC, k=9)


# --- layer_k --------------------------------------------------------------------------------

def layer_profile(weights_per_layer, n=5):
    """Every profile token of layer l has the given weights (ids arbitrary but distinct)."""
    w = torch.tensor(weights_per_layer, dtype=torch.float32)[None].expand(n, -1, -1).contiguous()  # [N, L, k]
    ids = torch.arange(w.shape[-1]).expand(w.shape).contiguous()
    return RoutingProfile(ids, w, None, 6, held_out=True)


@pytest.mark.parametrize("mean_k, expected", [(5 / 3, [1, 2, 2]), (2.0, [1, 2, 3]), (1.0, [1, 1, 1]),
                                              (3.0, [3, 3, 3]), (6.0, [3, 3, 3]), (1.5, [1, 2, 2])])
def test_layer_k_allocation_by_hand(mean_k, expected):
    """Marginal gains of slots 2, 3: layer 0: .05 .05, layer 1: .3 .2, layer 2: .35 .25 (weights
    given unsorted). Budget floor(mean_k * 3 + .5): 5 -> +.35, +.3; 6 -> also +.25; 1.5 -> 4.5 -> 5;
    mean_k = E = 6 (its upper bound) clamps to k per layer."""
    profile = layer_profile([[0.05, 0.9, 0.05], [0.3, 0.2, 0.5], [0.25, 0.4, 0.35]])
    pol = POLICIES["layer_k"](RouterSpec(6, 3), mean_k=mean_k)
    pol.prepare(profile)
    assert pol.k_per_layer.tolist() == expected
    assert pol.params()["k_per_layer"] == expected


def test_layer_k_ties_go_to_lower_rank_then_lower_layer():
    gains = torch.full((3, 3), 1 / 3, dtype=torch.float64)  # uniform weights: all gains tie
    assert allocate(gains, 5).tolist() == [2, 2, 1]
    assert allocate(gains, 7).tolist() == [3, 2, 2]
    profile = RoutingProfile(torch.arange(3).expand(4, 3, 3).contiguous(), None, None, 6, held_out=True)
    pol = POLICIES["layer_k"](RouterSpec(6, 3), mean_k=5 / 3)
    pol.prepare(profile)
    assert pol.k_per_layer.tolist() == [2, 2, 1]


@pytest.mark.parametrize("renorm", [True, False])
def test_layer_k_routes_each_layer_as_static_k(renorm):
    """Layers 0, 1, 2 keep 1, 2, 3 slots: each layer equals static_k with that k."""
    pol = POLICIES["layer_k"](SPEC, mean_k=2.0, renormalize=renorm)
    pol.prepare(layer_profile([[0.9, 0.04, 0.03, 0.03], [0.5, 0.3, 0.1, 0.1], [0.3, 0.3, 0.3, 0.1]]))
    assert pol.k_per_layer.tolist() == [1, 2, 3]
    sel = pol.select(hand_batch(layers=3))
    for layer, k in enumerate([1, 2, 3]):
        ref = POLICIES["static_k"](SPEC, k=k, renormalize=renorm).select(hand_batch())
        assert sel.ids[layer].tolist() == ref.ids[0].tolist()
        torch.testing.assert_close(sel.weights[layer], ref.weights[0])


def test_layer_k_needs_prepare_and_matching_layers():
    pol = POLICIES["layer_k"](SPEC, mean_k=2.0)
    with pytest.raises(PolicyInputError, match="prepare"):
        pol.select(hand_batch(layers=3))
    pol.prepare(layer_profile([[0.7, 0.1, 0.1, 0.1]] * 2))
    with pytest.raises(PolicyInputError, match="layer_k.*3 MoE layers, the routing profile had 2"):
        pol.select(hand_batch(layers=3))


# --- relative_skip --------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, renorm, ids, weights", [
    # A: drop w < .25 (slot 2 at exactly .25 stays); B: drop w < .125; C: ties with the top-1 stay
    (0.5, True, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, 4]]],
     [[[0, 2 / 3, 1 / 3, 0], [0, 1 / 3, 0, 1 / 6], [1 / 4] * 4]]),
    (0.5, False, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, 4]]],
     [[[0, 1 / 2, 1 / 4, 0], [0, 1 / 4, 0, 1 / 8], [1 / 4] * 4]]),
    (1.0, True, [[[X, 5, X, X], [X, 0, X, X], [1, 2, 3, 4]]], [[[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1 / 4] * 4]]),
    ([0.5, 0.6], True,  # per layer: layer 1 drops A's 1/4 (< .3) and B's 1/8 (< .15)
     [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, 4]], [[X, 5, X, X], [X, 0, X, X], [1, 2, 3, 4]]],
     [[[0, 2 / 3, 1 / 3, 0], [0, 1 / 3, 0, 1 / 6], [1 / 4] * 4], [[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1 / 4] * 4]]),
])
def test_relative_skip_by_hand(threshold, renorm, ids, weights):
    layers = len(threshold) if isinstance(threshold, list) else 1
    check(POLICIES["relative_skip"](SPEC, threshold=threshold, renormalize=renorm).select(hand_batch(layers)),
          ids, weights)


# --- absolute_skip --------------------------------------------------------------------------

@pytest.mark.parametrize("threshold, renorm, ids, weights", [
    # normalised over the top-k, A and B are both (1/8, 1/2, 1/4, 1/8) in some slot order
    (0.2, True, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, 4]]], [[[0, 2 / 3, 1 / 3, 0], [0, 1 / 3, 0, 1 / 6], [1 / 4] * 4]]),
    (0.2, False, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, 4]]], [[[0, 1 / 2, 1 / 4, 0], [0, 1 / 4, 0, 1 / 8], [1 / 4] * 4]]),
    (0.125, True, [HAND_IDS], [HAND_W]),  # nothing is below 1/8 (C: 1/4 each)
    # .3: only the top-1 survives; C's four tied slots: rank 0 is the lowest slot
    (0.3, True, [[[X, 5, X, X], [X, 0, X, X], [1, X, X, X]]], [[[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1, 0, 0, 0]]]),
    (0.3, False, [[[X, 5, X, X], [X, 0, X, X], [1, X, X, X]]], [[[0, 1 / 2, 0, 0], [0, 1 / 4, 0, 0], [1 / 4, 0, 0, 0]]]),
    ([0.125, 0.3], True, [HAND_IDS, [[X, 5, X, X], [X, 0, X, X], [1, X, X, X]]],
     [HAND_W, [[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1, 0, 0, 0]]]),
])
def test_absolute_skip_by_hand(threshold, renorm, ids, weights):
    layers = len(threshold) if isinstance(threshold, list) else 1
    check(POLICIES["absolute_skip"](SPEC, threshold=threshold, renormalize=renorm).select(hand_batch(layers)),
          ids, weights)


@pytest.mark.parametrize("name", ["relative_skip", "absolute_skip"])
def test_per_layer_threshold_must_match_layers(name):
    pol = POLICIES[name](SPEC, threshold=[0.1, 0.2, 0.3])
    with pytest.raises(PolicyInputError, match=f"policy '{name}': threshold: expected 2 per-layer values"):
        pol.select(hand_batch(layers=2))


# --- top_p ----------------------------------------------------------------------------------

@pytest.mark.parametrize("p, renorm, ids, weights", [
    # sorted normalised mass of A and B: .5 .25 .125 .125 (mass before each rank: 0 .5 .75 .875);
    # C: .25 each (before: 0 .25 .5 .75)
    (0.75, True, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, X]]],
     [[[0, 2 / 3, 1 / 3, 0], [0, 1 / 3, 0, 1 / 6], [1 / 3, 1 / 3, 1 / 3, 0]]]),
    (0.75, False, [[[X, 5, 1, X], [X, 0, X, 2], [1, 2, 3, X]]],
     [[[0, 1 / 2, 1 / 4, 0], [0, 1 / 4, 0, 1 / 8], [1 / 4, 1 / 4, 1 / 4, 0]]]),
    (0.8, True, [[[3, 5, 1, X], [6, 0, X, 2], [1, 2, 3, 4]]],
     [[[1 / 7, 4 / 7, 2 / 7, 0], [1 / 14, 2 / 7, 0, 1 / 7], [1 / 4] * 4]]),
    (0.5, True, [[[X, 5, X, X], [X, 0, X, X], [1, 2, X, X]]], [[[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1 / 2, 1 / 2, 0, 0]]]),
    (0.01, True, [[[X, 5, X, X], [X, 0, X, X], [1, X, X, X]]], [[[0, 1, 0, 0], [0, 1 / 2, 0, 0], [1, 0, 0, 0]]]),
])
def test_top_p_by_hand(p, renorm, ids, weights):
    check(POLICIES["top_p"](SPEC, p=p, renormalize=renorm).select(hand_batch()), ids, weights)


def test_top_p_one_keeps_a_negligible_last_slot():
    ids = torch.tensor([[[0, 1, 2, 3]]])
    w = torch.tensor([[[1.0, 1e-9, 1e-9, 1e-12]]])  # cumulative mass rounds to 1 before the last slot
    sel = POLICIES["top_p"](SPEC, p=1.0).select(BatchRouting(ids, w))
    assert torch.equal(sel.ids, ids) and torch.equal(sel.weights, w)
    assert POLICIES["top_p"](SPEC, p=0.999999).select(BatchRouting(ids, w)).ids.tolist() == [[[0, X, X, X]]]


# --- entropy_k ------------------------------------------------------------------------------

def test_entropy_k_from_logits_by_hand():
    """E = 8, k = 4, k_min = 1: four equal bins of h. Tokens: uniform over 8 (h = 1 -> 4), one
    expert (h ~ 0 -> 1), uniform over 3 (h = log 3 / log 8 = .53 -> 1 + floor(2.11) = 3), uniform
    over 2 (h = 1/3 -> 1 + floor(1.33) = 2)."""
    Z = torch.full((1, 4, 8), -50.0)
    Z[0, 0] = 0.0
    Z[0, 1, 6] = 0.0
    Z[0, 2, [2, 5, 7]] = 0.0
    Z[0, 3, [4, 6]] = 0.0
    ids, w = route(Z, SPEC)
    pol = POLICIES["entropy_k"](SPEC, k_min=1)
    torch.testing.assert_close(pol.entropy(BatchRouting(ids, w, Z)),
                               torch.tensor([[1.0, 0.0, math.log(3) / math.log(8), 1 / 3]]), rtol=0, atol=1e-6)
    sel = pol.select(BatchRouting(ids, w, Z))
    assert sel.ids.tolist() == [[[0, 1, 2, 3], [6, X, X, X], [2, 5, 7, X], [4, 6, X, X]]]
    torch.testing.assert_close(sel.weights, torch.tensor([[[1 / 4] * 4, [1, 0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0],
                                                           [1 / 2, 1 / 2, 0, 0]]]), rtol=1e-6, atol=1e-7)
    two = POLICIES["entropy_k"](SPEC, k_min=2).select(BatchRouting(ids, w, Z))  # 3 bins: 4, 2, 2+1, 2+1
    assert (two.ids != X).sum(-1).tolist() == [[4, 2, 3, 3]]


@pytest.mark.parametrize("gamma, renorm, ids, weights", [
    # normalised entropies over the top-4 weights: D (.97 .01 .01 .01) h = .121; E (.1 .7 .1 .1,
    # ranks: slot 1, then the tied slots 0, 2, 3) h = .678; C (tied) h = 1. k_t = 1 + floor(4 h ** gamma):
    # gamma 1: 1, 3, 4; gamma 2 (h**2 = .015, .460, 1): 1, 2, 4
    (1.0, True, [[[0, X, X, X], [4, 5, 6, X], [1, 2, 3, 4]]],
     [[[1, 0, 0, 0], [1 / 9, 7 / 9, 1 / 9, 0], [1 / 4] * 4]]),
    (1.0, False, [[[0, X, X, X], [4, 5, 6, X], [1, 2, 3, 4]]], [[[0.97, 0, 0, 0], [0.1, 0.7, 0.1, 0], [1 / 4] * 4]]),
    (2.0, True, [[[0, X, X, X], [4, 5, X, X], [1, 2, 3, 4]]], [[[1, 0, 0, 0], [1 / 8, 7 / 8, 0, 0], [1 / 4] * 4]]),
])
def test_entropy_k_from_weights_by_hand(gamma, renorm, ids, weights):
    b = BatchRouting(torch.tensor([[[0, 1, 2, 3], [4, 5, 6, 7], HAND_IDS[2]]]),
                     torch.tensor([[[0.97, 0.01, 0.01, 0.01], [0.1, 0.7, 0.1, 0.1], HAND_W[2]]]))
    check(POLICIES["entropy_k"](SPEC, k_min=1, gamma=gamma, renormalize=renorm).select(b), ids, weights)


def test_entropy_k_sigmoid_router_uses_weights_not_logits():
    spec = RouterSpec(8, 4, "sigmoid", renormalize=False)
    Z = torch.zeros(1, 1, 8)  # uniform logits: h = 1 by softmax, but the weights below are peaked
    b = BatchRouting(torch.tensor([[[0, 1, 2, 3]]]), torch.tensor([[[0.97, 0.01, 0.01, 0.01]]]), Z)
    assert POLICIES["entropy_k"](spec).select(b).ids.tolist() == [[[0, X, X, X]]]
    assert POLICIES["entropy_k"](SPEC).select(b).ids.tolist() == [[[0, 1, 2, 3]]]  # softmax: logits


# --- every rule -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("case", [
    dict(seed=0, L=3, B=17, E=16, k=4), dict(seed=1, L=2, B=1, E=8, k=2, renorm=False),
    dict(seed=2, L=2, B=9, E=64, k=8, shuffle=True), dict(seed=3, L=4, B=33, E=8, k=3, quantum=0.5, shuffle=True),
    dict(seed=4, L=2, B=5, E=16, k=4, kind="sigmoid", renorm=False), dict(seed=5, L=1, B=4, E=8, k=1),
    dict(seed=6, L=2, B=12, E=8, k=8),
])
def test_neutral_parameters_reproduce_vanilla(name, case):
    spec, batch = random_batch(**case)
    sel = build(name, spec, L=case["L"], **POLICIES[name].neutral_params(spec)).select(batch)
    assert torch.equal(sel.ids, batch.ids) and torch.equal(sel.weights, batch.weights)


ACTIVE = {"static_k": {"k": 2}, "layer_k": {"mean_k": 2.0}, "relative_skip": {"threshold": 0.6},
          "absolute_skip": {"threshold": 0.2}, "top_p": {"p": 0.6}, "entropy_k": {"k_min": 1, "gamma": 2.0}}


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("seed, B, shuffle, quantum", [(0, 1, False, None), (1, 40, True, None), (2, 24, True, 0.5)])
def test_invariants(name, renorm, seed, B, shuffle, quantum):
    """Top-1 always kept, kept slots keep their position and id, weights: unchanged or rescaled to
    the token's original sum."""
    spec, batch = random_batch(seed, 3, B, 16, 4, renorm=renorm, shuffle=shuffle, quantum=quantum)
    sel = build(name, spec, L=3, renormalize=renorm, **ACTIVE[name]).select(batch)
    assert (sel.fidelity.top1_retention == 1).all()
    kept = sel.ids != X
    assert torch.equal(sel.ids[kept], batch.ids[kept])
    if renorm:
        torch.testing.assert_close(sel.weights.sum(-1), batch.weights.sum(-1))
    else:
        assert torch.equal(sel.weights[kept], batch.weights[kept])
    assert (sel.fidelity.experts_per_token < 4).any() or B == 1


@pytest.mark.parametrize("name", RULES)
def test_every_token_on_one_expert(name):
    """All tokens share their top-1 (expert 5): each rule keeps it, so at least it stays active."""
    spec, batch = random_batch(7, 2, 16, 16, 4)
    batch.logits[..., 5] += 20.0
    batch.ids, batch.weights = route(batch.logits, spec)
    sel = build(name, spec, L=2, **ACTIVE[name]).select(batch)
    assert (sel.ids == 5).any(-1).all()
    assert (sel.fidelity.expert_tokens[:, 5] == 16).all()
    kept = (sel.ids != X).sum(-1)
    # fixed-k rules keep their 2; the adaptive ones see the top-1 holding nearly all the mass
    assert (kept == (2 if name in ("static_k", "layer_k") else 1)).all()


@pytest.mark.parametrize("name", RULES)
def test_weights_are_required(name):
    spec, batch = random_batch(0, 2, 4, 8, 2)
    with pytest.raises(PolicyInputError, match=f"policy '{name}' needs router weights"):
        build(name, spec, L=2, **ACTIVE[name]).select(BatchRouting(batch.ids, None, batch.logits))
    assert "weights" in POLICIES[name].needs and not POLICIES[name].decode_only
    assert POLICIES[name].needs_profile == (name == "layer_k")


BAD = [("static_k", {"k": 0}, "k"), ("static_k", {"k": 1.5}, "k"), ("static_k", {"k": True}, "k"),
       ("static_k", {"renormalize": "yes"}, "renormalize"),
       ("layer_k", {"mean_k": 0.5}, "mean_k"), ("layer_k", {"mean_k": float("nan")}, "mean_k"),
       ("layer_k", {"mean_k": "2"}, "mean_k"),
       ("relative_skip", {"threshold": -0.1}, "threshold"), ("relative_skip", {"threshold": 1.5}, "threshold"),
       ("relative_skip", {"threshold": []}, "threshold"), ("relative_skip", {"threshold": [0.1, 2.0]}, "threshold"),
       ("relative_skip", {"threshold": "0.5"}, "threshold"),
       ("absolute_skip", {"threshold": 1.01}, "threshold"), ("absolute_skip", {"threshold": [0.1, None]}, "threshold"),
       ("top_p", {"p": 0}, "p"), ("top_p", {"p": 1.5}, "p"), ("top_p", {"p": float("inf")}, "p"),
       ("entropy_k", {"k_min": 0}, "k_min"), ("entropy_k", {"gamma": 0.0}, "gamma"),
       ("entropy_k", {"gamma": -1}, "gamma"), ("entropy_k", {"renormalize": 1}, "renormalize")]


@pytest.mark.parametrize("name, params, param", BAD)
def test_bad_parameters_name_the_parameter(name, params, param):
    with pytest.raises(ValueError, match=f"policy '{name}': {param}: expected"):
        POLICIES[name](SPEC, **params)


def test_bad_parameter_message_says_expected_and_found():
    with pytest.raises(ValueError, match=r"policy 'top_p': p: expected a finite number in \(0, 1\], found 1.5"):
        POLICIES["top_p"](SPEC, p=1.5)


@pytest.mark.parametrize("name", RULES)
def test_config_loads_and_builds(name):
    m = ModelSpec.from_cfg(OmegaConf.load(CONF_DIR / "model" / "mixtral_8x7b.yaml"))
    direct = build_policy(OmegaConf.load(CONF_DIR / "policy" / f"{name}.yaml"), m)
    composed = build_policy(compose_cfg([f"policy={name}", "model=mixtral_8x7b"]).policy, m)
    assert direct.name == composed.name == name and direct.params() == composed.params()
    assert (CONF_DIR / "policy" / f"{name}.yaml").read_text().startswith("# ")
    assert f"python -m lynx_sim policy={name}" in (CONF_DIR / "policy" / f"{name}.yaml").read_text()


def test_per_layer_threshold_from_the_command_line():
    cfg = compose_cfg(["policy=relative_skip", "policy.threshold=[0.1,0.2]", "model=mixtral_8x7b"])
    pol = build_policy(cfg.policy, ModelSpec.from_cfg(cfg.model))
    assert pol.threshold == (0.1, 0.2) and pol.params()["threshold"] == [0.1, 0.2]


def short_run(name, *overrides):
    return run(compose_cfg([f"policy={name}", "batch=8", "workload.steps=5", "model=mixtral_8x7b", "hardware=h200", *overrides]),
               quiet=True)


@pytest.mark.parametrize("name", RULES)
def test_short_simulation(name):
    s = short_run(name)
    assert s["policy"] == name and s["steps"] == 5 and s["policy_acted_fraction"] == 1.0
    assert s["top1_retention"] == 1.0 and s["speedup"] >= 1.0
    assert 1.0 <= s["experts_per_token"] < 2.0  # Mixtral: top-2; every default drops some slots
    assert s["distinct_experts"]["policy"] <= s["distinct_experts"]["vanilla"]
    if name == "static_k":
        assert s["experts_per_token"] == 1.0 and s["speedup"] > 1.0
    if name == "layer_k":  # 32 layers, mean_k 1.5: 48 slots, so exactly 1.5 per token
        assert sum(s["policy_params"]["k_per_layer"]) == 48 and s["experts_per_token"] == pytest.approx(1.5)
    mixtral = RouterSpec(8, 2)  # the short run's router
    neutral = short_run(name, *(f"policy.{k}={v}" for k, v in POLICIES[name].neutral_params(mixtral).items()))
    assert neutral["speedup"] == 1.0 and neutral["experts_per_token"] == 2.0 and neutral["slots_changed"] == 0.0
