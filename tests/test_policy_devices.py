"""Policies run on the device their batch lives on (the executor runs them on a GPU).

A tensor a rule creates without `device=` lands on the CPU and breaks a CUDA batch. Without a
GPU we catch that with the meta device: inside `torch.device("meta")` every factory call that
names no device makes a meta tensor, and mixing one with the batch's CPU tensors fails. Each
registered policy (built with backend=torch: its torch path, as on a GPU) and the torch fidelity
measures run so, for a softmax, a grouped top-k and a sigmoid router.
"""

from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from lynx_sim.model import ModelSpec
from lynx_sim.policies import POLICIES, BatchRouting, build_policy
from lynx_sim.policies.routing_profile import RoutingProfile
from lynx_sim.policies.fidelity import measure_torch
from lynx_sim.routing import route
from lynx_sim.traces.source import build_source

MODELS = ("mixtral_8x7b", "deepseek_v3", "llama4_maverick")


@pytest.fixture(scope="module")
def setups():
    out = {}
    for name in MODELS:
        cfg = compose_cfg([f"model={name}"])
        model = ModelSpec.from_cfg(cfg.model)
        out[name] = (model, RoutingProfile.from_source(build_source(cfg, model)))
    return out


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_policy_creates_tensors_on_the_batch_device(setups, model_name, policy):
    model, profile = setups[model_name]
    cfg = compose_cfg([f"model={model_name}", f"policy={policy}", "++policy.backend=torch"])  # the GPU's path
    pol = build_policy(cfg.policy, model, 1e-4)
    assert pol.backend == "torch"
    if pol.needs_profile:
        pol.prepare(profile)
    z = torch.randn(model.num_moe_layers, 8, model.num_experts, generator=torch.Generator().manual_seed(0))
    ids, w = route(z, model.router)
    batch = BatchRouting(ids, w.float(), z)
    with torch.device("meta"):
        sel = pol.select(batch)
        measure_torch(batch, sel.ids, sel.weights, model.router)
    assert sel.ids.device.type == "cpu"
