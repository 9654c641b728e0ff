"""The golden case, run as a script so that tests can run it under other BLAS kernels, thread
counts and SIMD levels: `python tests/determinism_case.py` prints one JSON object.

It holds the run's summary (without wall time) and a SHA-256 of every routing decision the run
made: the ids the policy and the vanilla baseline gave every token of every step. Integers and
the digest must match exactly on every machine; float figures to the tolerance that
tests/test_determinism.py states.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

OVERRIDES = ["workload.steps=12", "batch=8"]


def golden_case(overrides=OVERRIDES) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import compose_cfg
    from lynx_sim.metrics.decode_recorder import StepRecorder
    from lynx_sim.run import run

    digest = hashlib.sha256()
    on_step = StepRecorder.on_step

    def listen(self, now, step, B, context, sel, c, base, cb):  # every recorded step's decisions
        for ids in (sel.ids, base.ids):
            digest.update(ids.contiguous().numpy().astype("<i8").tobytes())
        return on_step(self, now, step, B, context, sel, c, base, cb)

    StepRecorder.on_step = listen
    try:
        summary = run(compose_cfg(list(overrides)), quiet=True)
    finally:
        StepRecorder.on_step = on_step
    summary.pop("wall_s")
    return {"summary": json.loads(json.dumps(summary)), "decisions_sha256": digest.hexdigest()}


def every_policy(overrides=("workload.steps=4", "batch=8", "model=mixtral_8x7b", "hardware=h200")) -> dict:
    """The decisions digest and summary of every registered policy on one small case."""
    from lynx_sim.policies import POLICIES

    return {name: golden_case([*overrides, f"policy={name}"]) for name in sorted(POLICIES)}


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--every-policy"]:
        print(json.dumps(every_policy(), sort_keys=True))
    else:
        print(json.dumps(golden_case(args or OVERRIDES), sort_keys=True))
