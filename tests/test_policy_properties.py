"""Invariants every registered policy must keep, on random logits and batch shapes (hypothesis).

Each policy is built from its own conf/policy/<name>.yaml (the model's Lynx defaults resolved
for Mixtral), on a random router shape; rules that learn from trace statistics are prepared on
a random routing profile of the same shape.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import compose_cfg
from lynx_sim.policies import POLICIES, BatchRouting
from lynx_sim.policies.routing_profile import RoutingProfile
from lynx_sim.policies.fidelity import DROPPED
from lynx_sim.routing import RouterSpec, route

NAMES = sorted(POLICIES)


def config_params(name: str) -> dict:
    cfg = compose_cfg([f"policy={name}", "model=mixtral_8x7b"])
    return {k: v for k, v in OmegaConf.to_container(cfg.policy, resolve=True).items() if k not in ("name", "overhead_us")}


def build(name, spec, L, seed, params=None, expert_time_s=5e-6):
    from lynx_sim.policies.base import PolicyContext

    pol = POLICIES[name](PolicyContext(spec, expert_time_s), **(config_params(name) if params is None else params))
    if pol.needs_profile:
        g = np.random.default_rng(seed + 1)
        z = torch.from_numpy(g.normal(size=(256, L, spec.num_experts)) * 2).float()
        ids, w = route(z, spec)
        pol.prepare(RoutingProfile(ids, w, z, spec.num_experts, held_out=True))
    return pol


shapes = st.fixed_dictionaries({
    "seed": st.integers(0, 10**6), "L": st.integers(1, 3), "B": st.integers(1, 33), "E": st.integers(4, 24),
    "kfrac": st.floats(0, 1), "renorm": st.booleans(), "ties": st.booleans(),
})


def make(c):
    k = 1 + int(c["kfrac"] * (min(c["E"], 8) - 1))
    spec = RouterSpec(c["E"], k, "softmax", c["renorm"])
    g = np.random.default_rng(c["seed"])
    z = g.normal(size=(c["L"], c["B"], c["E"])) * 2
    if c["ties"]:
        z = np.round(z * 2) / 2
    Z = torch.from_numpy(z).float()
    ids, w = route(Z, spec)
    return spec, BatchRouting(ids, w, Z)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(c=shapes)
def test_invariants(name, c):
    spec, batch = make(c)
    pol = build(name, spec, c["L"], c["seed"])
    sel = pol.select(batch)  # the base class asserts the output convention
    ids, w = sel.ids, sel.weights
    kept = ids != DROPPED
    assert kept.any(-1).all() and ((ids >= DROPPED) & (ids < spec.num_experts)).all()
    assert torch.isfinite(w).all() and (w >= 0).all() and (w[~kept] == 0).all()
    f = sel.fidelity
    assert ((f.distinct_experts >= 1) & (f.distinct_experts <= min(spec.num_experts, c["B"] * spec.top_k))).all()
    for m in (f.top1_retention, f.gate_mass_retained, f.slots_changed):
        assert ((m >= 0) & (m <= 1 + 1e-9)).all()
    again = pol.select(batch)
    assert torch.equal(again.ids, ids) and torch.equal(again.weights, w), "same input, same output"


@pytest.mark.parametrize("name", [n for n in NAMES if POLICIES[n].neutral_params(RouterSpec(8, 2)) is not None])
@settings(max_examples=20, deadline=None)
@given(c=shapes)
def test_neutral_parameters_equal_vanilla(name, c):
    spec, batch = make(c)
    params = {**config_params(name), **POLICIES[name].neutral_params(spec)}
    sel = build(name, spec, c["L"], c["seed"], params).select(batch)
    assert torch.equal(sel.ids, batch.ids)
    torch.testing.assert_close(sel.weights, batch.weights, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(c=shapes)
def test_backends_agree(name, c):
    """The same rule on each backend (the policy's own choice, no patching): `compiled` takes the
    numba kernels (output check, fidelity measures, Lynx's selection), `torch` the code a GPU
    batch runs. Same ids and weights; measures equal but for float32 rounding of the logsumexp
    behind KL (fidelity_cpu.py)."""
    spec, batch = make(c)
    params = config_params(name)
    out = {}
    for backend in ("compiled", "torch"):
        pol = build(name, spec, c["L"], c["seed"], {**params, "backend": backend})
        assert pol.compiled_path(batch.ids) == (backend == "compiled")
        out[backend] = pol.select(batch)
    a, b = out["compiled"], out["torch"]
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-7)  # kernels: float64 from float32 logits
    for f in a.fidelity.__dataclass_fields__:
        x, y = getattr(a.fidelity, f).double(), getattr(b.fidelity, f).double()
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6, equal_nan=True), f


@pytest.mark.parametrize("name", [n for n in NAMES if POLICIES[n].decode_only])
def test_decode_only_rules_leave_mixed_batches_alone(name):
    spec, batch = make({"seed": 5, "L": 2, "B": 8, "E": 16, "kfrac": 0.5, "renorm": True, "ties": False})
    batch.decode = torch.ones(8, dtype=torch.bool)
    batch.decode[0] = False
    sel = build(name, spec, 2, 5).select(batch)
    assert not sel.acted and torch.equal(sel.ids, batch.ids)


def test_every_policy_has_a_config_and_declares_its_needs():
    for name, cls in POLICIES.items():
        assert set(cls.needs) <= {"ids", "weights", "logits"}, name
        assert config_params(name) is not None


variants = st.fixed_dictionaries({
    "seed": st.integers(0, 10**6), "L": st.integers(1, 2), "B": st.integers(1, 17), "half_E": st.integers(2, 10),
    "kfrac": st.floats(0, 1), "renorm": st.booleans(), "router": st.sampled_from(["softmax", "sigmoid", "grouped_topk"]),
    "inputs": st.sampled_from(["full", "no_logits", "ids_ordered", "ids_unordered"]),
})


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(c=variants)
def test_router_kinds_and_missing_inputs(name, c):
    """Every rule on every router kind and every input a trace may lack: either a clear
    PolicyInputError naming what is missing, or an answer that keeps the output convention."""
    from lynx_sim.policies import PolicyInputError

    E = 2 * c["half_E"]
    k = 1 + int(c["kfrac"] * (min(E // 2, 6) - 1))
    groups = (2, 1) if c["router"] == "grouped_topk" else (1, 1)
    spec = RouterSpec(E, k, c["router"], c["renorm"], *groups)
    Z = torch.from_numpy(np.random.default_rng(c["seed"]).normal(size=(c["L"], c["B"], E)) * 2).float()
    ids, w = route(Z, spec)
    if c["inputs"] == "ids_unordered":
        ids = ids.flip(-1)
    batch = BatchRouting(ids, None if c["inputs"].startswith("ids") else w, Z if c["inputs"] == "full" else None,
                         ids_ordered=c["inputs"] != "ids_unordered")
    pol = build(name, spec, c["L"], c["seed"])
    try:
        sel = pol.select(batch)
    except PolicyInputError as e:
        missing = [n for n in POLICIES[name].needs if getattr(batch, n) is None]
        assert missing or "order" in str(e), f"refused a batch that has everything it declares: {e}"
        return
    kept = sel.ids != DROPPED
    assert kept.any(-1).all() and (sel.ids < E).all()
    if sel.weights is not None:
        assert torch.isfinite(sel.weights).all() and (sel.weights >= 0).all()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(c=shapes)
def test_layer_by_layer_equals_the_whole_batch(name, c):
    """The closed loop runs one layer at a time (`at_layer`): each layer's answer must equal that
    layer of the answer for all layers at once, per-layer state learned from the routing profile included."""
    spec, batch = make(c)
    pol = build(name, spec, c["L"], c["seed"])
    whole = pol.select(batch)
    for l in range(c["L"]):
        one = pol.at_layer(l).select(BatchRouting(batch.ids[l:l + 1], batch.weights[l:l + 1], batch.logits[l:l + 1]))
        assert torch.equal(one.ids[0], whole.ids[l]), f"layer {l}"
        torch.testing.assert_close(one.weights[0], whole.weights[l], rtol=0, atol=1e-6)
    if pol.layer_state:
        from lynx_sim.policies.base import PolicyInputError

        with pytest.raises(PolicyInputError, match=f"layer: expected an MoE layer index in 0..{c['L'] - 1}"):
            pol.at_layer(c["L"])
