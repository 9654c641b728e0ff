"""Policy registry: one name, one class, one `conf/policy/<name>.yaml` (STYLE.md item 2)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Policy

POLICIES: dict[str, type["Policy"]] = {}


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

    `expert_time_s`: the cost model's time for one more distinct expert in a decode MoE layer
    (only cost-aware rules read it)."""
    from .base import PolicyContext

    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "overhead_us")}
    name = cfg["name"]
    if name not in POLICIES:
        raise ValueError(f"unknown policy '{name}': registered policies are {sorted(POLICIES)}")
    try:
        policy = POLICIES[name](PolicyContext(model.router, expert_time_s), **params)
    except TypeError as e:
        raise ValueError(f"policy '{name}': bad parameters {params}: {e}") from None
    overhead = cfg.get("overhead_us", 0.0) or 0.0
    if not overhead >= 0:
        raise ValueError(f"policy '{name}': overhead_us: expected a number >= 0, found {overhead!r}")
    policy.overhead_us = float(overhead)  # the rule's own GPU time per MoE layer, for the cost model
    return policy
