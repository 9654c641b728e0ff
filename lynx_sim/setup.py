"""`prepare(cfg)`: what a run is built from, in one place for the simulator (lynx_sim/run.py) and
the executor (executor/run.py): the model, hardware, parallel layout and memory plan, the trace
source, the policy (its routing profile learned), the two cost models, the stand-in-logits
decision, and the lists of approximations and assumptions the run's summary names."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cost import HardwareSpec, Parallel, Roofline
from .cost.memory import DoesNotFitError, MemoryPlan
from .cost.memory import plan as memory_plan
from .model import ModelSpec
from .policies import build_policy
from .policies.base import Policy
from .policies.routing_profile import RoutingProfile
from .schema import validate
from .traces.source import Source, build_source


@dataclass
class RunSetup:
    model: ModelSpec
    hw: HardwareSpec
    parallel: Parallel
    mem: MemoryPlan
    source: Source  # traces/source.py: the routing a run replays
    policy: Policy
    cost: Roofline  # prices the policy's steps, its overhead included
    base_cost: Roofline  # prices vanilla's
    fill: bool  # stand-in logits for a trace without them (approximate_missing=lowest_bin)
    approximations: list[str] = field(default_factory=list)  # make a run inexact
    assumptions: list[str] = field(default_factory=list)  # hold for every run


def prepare(cfg, check: bool = True) -> RunSetup:
    """Build a run's pieces from `cfg`. `check` (the simulator): validate the config first and
    refuse a model that does not fit (memory_check=warn names it instead). The executor passes
    False: it has its own settings and times one layer at a time."""
    if check:
        validate(cfg)
    model, hw = ModelSpec.from_cfg(cfg.model), HardwareSpec.from_cfg(cfg.hardware)
    parallel = Parallel.from_cfg(cfg.get("parallel"))
    base_cost = Roofline(model, hw, parallel)
    mem = memory_plan(model, hw, parallel, base_cost.kv_bytes_per_token_rank(),
                      float((cfg.get("serving") or {}).get("gpu_memory_utilization", 0.9)))
    approximations = []
    if check and not mem.fits:
        msg = mem.explain(model.name, hw.name, parallel)
        if cfg.get("memory_check", "error") == "error":
            raise DoesNotFitError(msg)
        approximations.append("DOES NOT FIT: " + msg.split(": choose")[0])
    source = build_source(cfg, model)
    policy = build_policy(cfg.policy, model, expert_time_s=base_cost.expert_time_s())
    cost = Roofline(model, hw, parallel, policy_overhead_us=policy.overhead_us)
    fill = missing_logits(cfg, policy, source, approximations)
    policy.check_available(source.fields | ({"logits"} if fill else set()), source.name)
    if policy.needs_profile:
        profile = RoutingProfile.from_source(source)
        policy.prepare(profile)
        if not profile.held_out:
            approximations.append(f"policy '{policy.name}' learned its statistics from the replayed trace itself (in-sample)")
    return RunSetup(model, hw, parallel, mem, source, policy, cost, base_cost, fill, approximations)


def missing_logits(cfg, policy, source, approximations: list) -> bool:
    """Opt-in stand-in logits (`approximate_missing=lowest_bin`) for a policy that reads logits."""
    mode = cfg.get("approximate_missing")
    if mode not in (None, "lowest_bin"):
        raise ValueError(f"approximate_missing: expected null or 'lowest_bin', found {mode!r}")
    if mode is None or "logits" not in policy.needs or "logits" in source.fields:
        return False
    if "weights" not in source.fields:
        raise ValueError(f"{source.name}: approximate_missing=lowest_bin needs the trace's gate weights: with ids "
                         f"alone every recorded expert would share bin 0 and every other expert the lowest bin, so "
                         f"'{policy.name}' could never change a token's experts (a meaningless 1.0x)")
    approximations.append("trace has no router logits: experts outside each token's recorded top-k take the "
                          "lowest Lynx bin (logits = log weights inside the top-k, far below outside)")
    return True
