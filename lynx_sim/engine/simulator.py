"""The discrete-event loop: one simpy event per decode iteration (STYLE.md item 4).

Each iteration takes the batch from the replay, applies the policy and the vanilla baseline to
the same routing (vectorised over layers), asks the roofline for both step times, tells the
recorder, and advances simulated time by the policy's step time. In a closed decode loop the
batch sequence does not depend on time, so the vanilla figures of the same steps equal those of
a separate vanilla run.
"""

from __future__ import annotations

import simpy

from ..cost.roofline import Roofline
from ..metrics.recorder import StepRecorder
from ..policies.base import Policy
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
