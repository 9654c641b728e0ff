"""Policy registry: one name, one class, one `conf/policy/<name>.yaml` (STYLE.md item 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Policy

POLICIES: dict[str, type["Policy"]] = {}
OVERHEAD_MAX_US = 1e6  # a second per MoE layer: far beyond any routing kernel, yet finite


def register(cls: type["Policy"]) -> type["Policy"]:
    """Class decorator: register a policy under its `name`; a second class of that name raises."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a policy needs a non-empty `name`")
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"policy name '{cls.name}' registered twice ({POLICIES[cls.name].__qualname__}, {cls.__qualname__})")
    POLICIES[cls.name] = cls
    return cls


def build_policy(cfg, model, expert_time_s: float = 0.0) -> "Policy":
    """Instantiate the policy a `conf/policy/*.yaml` node describes, for a ModelSpec.

    Every key but `name` and `overhead_us` goes to the policy's constructor, which checks it
    (`backend` too, where a config sets it: `++policy.backend=torch`). `overhead_us`, the rule's
    own GPU time per MoE layer for the cost model, is checked here: a finite number in [0, 1e6].
    `expert_time_s`: the cost model's time for one more distinct expert in a decode MoE layer
    (only cost-aware rules read it)."""
    from .base import PolicyContext
    from .params import check_number

    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "overhead_us")}
    name = cfg["name"]
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}': registered policies are {sorted(POLICIES)}")
    overhead = check_number(name, "overhead_us", cfg.get("overhead_us", 0.0), 0.0, OVERHEAD_MAX_US)
    try:
        policy = POLICIES[name](PolicyContext(model.router, expert_time_s), **params)
    except TypeError as e:
        raise ValueError(f"policy '{name}': bad parameters {params}: {e}") from None
    policy.overhead_us = overhead
    return policy
