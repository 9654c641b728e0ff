"""Configs: every group option composes; every policy yaml maps to a registered class and back."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_cfg
from lynx_sim.cost import HardwareSpec
from lynx_sim.model import ModelSpec
from lynx_sim.policies import POLICIES, build_policy
from lynx_sim.policies.registry import register
from lynx_sim.policies.vanilla import Vanilla

GROUPS = ("policy", "model", "hardware", "trace", "workload", "synth")


def options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_policy_files_and_registry_agree():
    assert set(options("policy")) == set(POLICIES)
    for name in options("policy"):
        assert OmegaConf.load(CONF_DIR / "policy" / f"{name}.yaml").name == name


def test_duplicate_policy_name_raises():
    class Impostor(Vanilla):
        name = "vanilla"

    with pytest.raises(ValueError, match="registered twice"):
        register(Impostor)
    assert POLICIES["vanilla"] is Vanilla


def test_every_model_has_a_synth_preset():
    assert options("model") == options("synth")


@pytest.mark.parametrize("model", options("model"))
def test_every_model_composes_and_builds(model):
    cfg = compose_cfg([f"model={model}"])
    m = ModelSpec.from_cfg(cfg.model)
    assert m.name == model and m.num_moe_layers >= 1
    for policy in options("policy"):
        pcfg = compose_cfg([f"model={model}", f"policy={policy}"]).policy
        assert build_policy(pcfg, m).name == policy


@pytest.mark.parametrize("group", ["hardware", "trace", "workload", "policy"])
def test_every_group_option_composes(group):
    for opt in options(group):
        cfg = compose_cfg([f"{group}={opt}"])
        assert OmegaConf.to_container(cfg, resolve=True)[group] is not None
        if group == "hardware":
            assert HardwareSpec.from_cfg(cfg.hardware).hbm_bandwidth_gbps > 0


def test_lynx_defaults_follow_the_model():
    assert compose_cfg(["model=mixtral_8x7b"]).policy.alpha == 0.7
    assert compose_cfg(["model=qwen2_57b_a14b"]).policy.beta == 4
    assert compose_cfg(["model=qwen3_30b_a3b", "policy.alpha=5"]).policy.alpha == 5


def test_unknown_policy_and_bad_parameter_are_clear():
    m = ModelSpec.from_cfg(compose_cfg().model)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        build_policy({"name": "nope"}, m)
    with pytest.raises(ValueError, match="bad parameters"):
        build_policy({"name": "vanilla", "alpha": 1}, m)


def test_policy_catalogue_lists_every_policy():
    text = (CONF_DIR.parent / "docs" / "policies.md").read_text()
    for name in POLICIES:
        assert f"| `{name}` |" in text, f"docs/policies.md has no row for policy '{name}'"


def test_the_schema_types_every_key_and_each_option():
    """conf/config.yaml and every workload and trace option compose onto their schema
    (lynx_sim/schema.py) and pass validation as shipped."""
    from lynx_sim import schema
    from lynx_sim.config import load

    cfg = compose_cfg()
    assert OmegaConf.get_type(cfg) is schema.SimConfig and OmegaConf.get_type(cfg.serving) is schema.ServingConf
    sample = CONF_DIR.parent / "traces" / "samples" / "mixtral_8x7b_synth_small.safetensors"
    for group in ("workload", "trace"):
        for opt in options(group):
            c = load([f"{group}={opt}", f"trace.path={sample}" if opt == "file" else "seed=0"])
            assert OmegaConf.get_type(c[group]).__name__.lower().startswith(opt) and c[group].kind == opt


def test_executor_settings_have_their_own_root():
    """conf/config.yaml has no executor keys; conf/executor.yaml is it plus the `executor` node."""
    from lynx_sim.config import compose

    sim, ex = compose(), compose(["batch=4"], config_name="executor")
    assert "executor" not in sim and ex.executor.steps == 8 and ex.batch == 4
    assert OmegaConf.to_container(ex, resolve=True) == {**OmegaConf.to_container(compose(["batch=4"]), resolve=True),
                                                        "executor": OmegaConf.to_container(ex.executor)}
    with pytest.raises(ValueError, match="^executor: expected one of the keys"):
        compose(["executor.steps=3"])
    with pytest.raises(ValueError, match="^executor.steps: expected an integer, found 'abc'"):
        compose(["executor.steps=abc"], config_name="executor")
