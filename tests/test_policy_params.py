"""Every parameter of every policy is checked in its constructor: a table of nonsense values per
parameter, each refused with `policy '<name>': <param>: expected X, found Y`.

The table must name every constructor parameter of every registered policy (so a new parameter
cannot arrive unchecked), plus `overhead_us`, which `build_policy` checks for every policy. The
configs are Mixtral's (E = 8, top_k = 2), so ranges that depend on the router read 8 and 2.
"""

from __future__ import annotations

import inspect

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from lynx_sim.model import ModelSpec
from lynx_sim.policies import POLICIES, build_policy

INF, NAN = float("inf"), float("nan")
RENORM = ["yes", 1, 0, None]
THRESHOLD = [-0.1, 1.5, INF, NAN, [], [0.1, 2.0], [0.1, None], "0.5", True]  # None: the rule's default
COMMON = {  # every policy
    "backend": ["numba", "", None, True, 1],
    "overhead_us": [INF, -INF, NAN, -1.0, 1e7, True, "8", None],
}
BAD = {
    "vanilla": {},
    "lynx": {
        "alpha": [0, 0.0, -1, 1e-5, 2e4, 1e30, 1e39, INF, NAN, True, "0.7", None],
        "beta": [2.5, 1.0, -1, 9, 10**9, NAN, INF, True, "1", None],
        "arithmetic": ["float16", "FLOAT32", None, 32],
        "tie_break": ["random", None, 0],
    },
    "static_k": {"k": [0, -1, 3, 10**9, 1.5, 1.0, NAN, True, "1", None], "renormalize": RENORM},
    "layer_k": {"mean_k": [0.5, 0, -1, 8.5, 1e9, INF, NAN, True, "2", None], "renormalize": RENORM},
    "relative_skip": {"threshold": THRESHOLD, "renormalize": RENORM},
    "absolute_skip": {"threshold": THRESHOLD, "renormalize": RENORM},
    "top_p": {"p": [0, -0.5, 1.5, INF, NAN, True, "0.9", None], "renormalize": RENORM},
    "entropy_k": {"k_min": [0, 3, 10**6, 1.5, 2.0, True, "1", None], "gamma": [0, -1, 101, INF, NAN, True, "1", None],
                  "renormalize": RENORM},
    "prune": {"keep_fraction": [0, -0.1, 1.5, INF, NAN, True, "0.5", None], "renormalize": RENORM},
    "capacity": {"capacity_factor": [0, -1, 8.5, 1e9, INF, NAN, True, "1.25", None], "renormalize": RENORM},
    "batch_budget": {"budget": [0, -3, 9, 10**9, 2.5, 4.0, NAN, True, "4"], "fallback": ["nearest", None, 1],
                     "renormalize": RENORM},
    "sere": {"top_s": [0, 3, 10**9, 1.5, True, "1", None], "rho": [1.5, -2, INF, NAN, True, "0", None],
             "renormalize": RENORM},
    "oracle": {"lambda_us": [-1, 2e9, INF, NAN, True, "100", None], "expert_time_us": [-1, 2e6, INF, NAN, False, "3"],
               "renormalize": RENORM},
}

CASES = [(name, param, value) for name, table in BAD.items() for param, values in {**table, **COMMON}.items()
         for value in values]


@pytest.fixture(scope="module")
def mixtral():
    """Each policy's resolved config for Mixtral, and the model."""
    cfgs = {name: OmegaConf.to_container(compose_cfg([f"policy={name}", "model=mixtral_8x7b"]).policy, resolve=True)
            for name in POLICIES}
    return cfgs, ModelSpec.from_cfg(compose_cfg(["model=mixtral_8x7b"]).model)


def test_the_table_names_every_parameter_of_every_policy():
    assert set(BAD) == set(POLICIES)
    for name, cls in POLICIES.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "ctx"}
        assert params <= set(BAD[name]) | set(COMMON), f"policy '{name}': no bad values for {params - set(BAD[name])}"


def test_the_configs_build(mixtral):
    cfgs, model = mixtral
    for name, cfg in cfgs.items():
        assert build_policy(cfg, model, 1e-4).name == name


@pytest.mark.parametrize("name, param, value", CASES, ids=[f"{n}-{p}-{v!r}" for n, p, v in CASES])
def test_nonsense_is_refused_naming_the_parameter(mixtral, name, param, value):
    cfgs, model = mixtral
    with pytest.raises(ValueError, match=f"^policy '{name}': {param}: expected .+, found "):
        build_policy({**cfgs[name], param: value}, model, 1e-4)


@pytest.mark.parametrize("overrides, param", [
    (["policy.beta=2.5"], "beta"), (["policy.beta=1000000000"], "beta"), (["policy.alpha=1e30"], "alpha"),
    (["policy.alpha=inf"], "alpha"), (["policy.overhead_us=inf"], "overhead_us"),
    (["policy=static_k", "policy.k=1000000000"], "k"), (["policy=oracle", "policy.lambda_us=inf"], "lambda_us"),
    (["++policy.backend=gpu"], "backend"),
])
def test_the_probes_from_the_command_line(overrides, param):
    """The values a probe found accepted, as command-line overrides compose them."""
    cfg = compose_cfg(["model=mixtral_8x7b", "hardware=h200", *overrides])
    name = cfg.policy.name
    with pytest.raises(ValueError, match=f"policy '{name}': {param}: expected"):
        build_policy(cfg.policy, ModelSpec.from_cfg(cfg.model))


def test_range_bounds_themselves_are_accepted(mixtral):
    """The documented caps are inclusive, and the neutral values sit inside the ranges."""
    from lynx_sim.policies.lynx import ALPHA_MAX, ALPHA_MIN, BETA_MAX
    from lynx_sim.policies.oracle import Oracle

    cfgs, model = mixtral
    for params in ({"alpha": ALPHA_MIN, "beta": 0}, {"alpha": ALPHA_MAX, "beta": BETA_MAX}):
        build_policy({**cfgs["lynx"], **params}, model)
    build_policy({**cfgs["static_k"], "k": 2}, model)
    build_policy({**cfgs["oracle"], "lambda_us": Oracle.LAMBDA_MAX_US, "expert_time_us": 0.0}, model)
    build_policy({**cfgs["lynx"], "overhead_us": 0.0, "backend": "torch"}, model)
    for name, cls in POLICIES.items():
        neutral = cls.neutral_params(model.router)
        if neutral is not None:
            build_policy({**cfgs[name], **neutral}, model)
