"""The steady decode batch: B slots, replayed step by step as one simpy event per iteration
(STYLE.md item 4), vanilla priced on the same iterations.

Each iteration takes the batch from the replay, applies the policy and the vanilla baseline to
the same routing (vectorised over layers), asks the roofline for both step times, tells the
recorder, and advances simulated time by the policy's step time. In a closed decode loop the
batch sequence does not depend on time, so the vanilla figures of the same steps equal those of
a separate vanilla run. `run_decode` is the driver lynx_sim/run.py calls for workload=decode.
"""

from __future__ import annotations

import numpy as np
import simpy

from ..cost.roofline import Roofline
from ..metrics.console import progress
from ..metrics.decode_recorder import StepRecorder
from ..metrics.serving_recorder import percentiles
from ..policies.base import Policy
from ..policies.vanilla import Vanilla
from .replay import ClosedLoopReplay


def decode_loop(env: simpy.Environment, replay: ClosedLoopReplay, policy: Policy, baseline: Policy,
                cost: Roofline, base_cost: Roofline, recorder: StepRecorder, steps: int, warmup: int = 0, progress=None):
    for step in range(-warmup, steps):  # negative steps are warm-up: simulated, not recorded
        batch, context = replay.batch()
        sel, base = policy.select(batch), baseline.select(batch)
        B = batch.num_tokens
        c = cost.step(B, context, sel.fidelity.expert_tokens.numpy(), acted=sel.acted)
        cb = base_cost.step(B, context, base.fidelity.expert_tokens.numpy(), acted=False)
        if step >= 0:
            recorder.on_step(env.now, step, B, context, sel, c, base, cb)
        yield env.timeout(c.total_s)
        replay.advance()
        if progress is not None:
            progress.update(1)


def simulate(replay, policy, baseline, cost, base_cost, recorder, steps: int, warmup: int = 0, progress=None) -> float:
    """Run `warmup` unrecorded then `steps` recorded decode iterations; returns the simulated
    seconds. `cost` prices the policy's steps (its own overhead included), `base_cost` the
    vanilla baseline's."""
    env = simpy.Environment()
    env.process(decode_loop(env, replay, policy, baseline, cost, base_cost, recorder, steps, warmup, progress))
    env.run()
    return float(env.now)


def run_decode(cfg, s, quiet: bool = False) -> tuple[dict, dict]:
    """workload=decode from a RunSetup `s` (lynx_sim/setup.py): the summary's figures and the
    output tables; the run's approximations and assumptions are added to `s`'s lists."""
    warmup, steps, B = cfg.workload.get("warmup_steps", 0), int(cfg.workload.steps), int(cfg.batch)
    replay = ClosedLoopReplay(s.source, B, np.random.default_rng(int(cfg.seed)), fill_missing_logits=s.fill,
                              horizon=steps + warmup)
    recorder = StepRecorder(s.model.num_moe_layers, s.hw.hbm_bandwidth_gbps * 1e9, s.mem.kv_capacity_tokens)
    with progress(quiet, steps + warmup, "decode steps") as bar:
        sim_s = simulate(replay, s.policy, Vanilla(s.model.router), s.cost, s.base_cost, recorder, steps, warmup, bar)
    if replay.prefill_as_decode:
        s.approximations.append("trace has no decode tokens: its prompt tokens are replayed as decode steps")
    if replay.reused:
        s.approximations.append(f"trace ran out of requests: {replay.reused} admissions replay a used request "
                                "from a random token offset")
    s.assumptions.append("workload=decode: the steady decode batch; prefill, arrivals and the KV limit are not "
                         "modelled (workload=closed|poisson|trace for those); TTFT is undefined")
    m, t = recorder.summary(), recorder.table()
    slo = (cfg.get("slo") or {}).get("tpot_ms")
    tpot = t.step_time_ms  # every request in the batch emits one token per iteration
    thr = B / (tpot.mean() / 1e3)
    m.update({"warmup_steps": warmup, "simulated_s": sim_s, "ttft_ms": percentiles([]), "tpot_ms": percentiles(tpot),
              "throughput_tok_s": float(thr),
              "goodput_tok_s": float(thr * (tpot <= slo).mean()) if slo is not None else float(thr),
              "slo": {"tpot_ms": slo, "ttft_ms": None}})
    per_layer = m["per_layer"]["distinct_experts"]
    return m, {"steps": t, "per_layer": {s.policy.name: per_layer["policy"], "vanilla": per_layer["vanilla"]}}
