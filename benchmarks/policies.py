"""Token-layer decisions per second of every registered policy, on one CPU core.

For the Mixtral-8x7B and Qwen3-30B-A3B shapes at B = 16 and 64: a batch of B decode tokens from
the model's synthetic trace (real logits structure), all MoE layers at once, as the simulator
calls it. `route` is the rule alone; `select` adds the input and output checks and the fidelity
measures (what one simulator step pays). Baseline in the same run: vanilla's select time.
Target (policies issue): lynx and vanilla at least 1,000,000 decisions/s.

Usage: python benchmarks/policies.py [--repeats 30] [--policies lynx,vanilla]
Prints a table and writes benchmarks/results/policies.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from lynx_sim.config import compose as compose_cfg
from lynx_sim.cost import HardwareSpec, Roofline
from lynx_sim.model import ModelSpec
from lynx_sim.policies import POLICIES, BatchRouting, build_policy
from lynx_sim.policies.routing_profile import RoutingProfile
from lynx_sim.traces.source import build_source

ROOT = Path(__file__).resolve().parents[1]

SHAPES = ("mixtral_8x7b", "qwen3_30b_a3b")
BATCHES = (16, 64)


def decode_batch(source, B: int) -> BatchRouting:
    """B decode tokens, one from each of B synthetic requests: [L, B, ...]."""
    rows = []
    for r in range(B):
        a = source.request(r)
        i = int(np.flatnonzero(a.phase == 1)[len(a.phase[a.phase == 1]) // 2])
        rows.append((a.ids[i], a.weights[i], a.logits[i]))
    ids, w, z = (torch.from_numpy(np.stack(x, axis=1)) for x in zip(*rows))
    return BatchRouting(ids.long(), w, z)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--policies", default=",".join(sorted(POLICIES)))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for model_name in SHAPES:
        cfg = compose_cfg([f"model={model_name}"])
        model = ModelSpec.from_cfg(cfg.model)
        source = build_source(cfg, model)
        cost = Roofline(model, HardwareSpec.from_cfg(cfg.hardware))
        profile = None
        for B in BATCHES:
            batch = decode_batch(source, B)
            base = None
            for name in a.policies.split(","):
                pol = build_policy(compose_cfg([f"model={model_name}", f"policy={name}"]).policy, model, cost.expert_time_s())
                if pol.needs_profile:
                    profile = profile or RoutingProfile.from_source(source)
                    pol.prepare(profile)
                t_route = timed(lambda: pol.route(batch), a.repeats)
                t_select = timed(lambda: pol.select(batch), a.repeats)
                if name == "vanilla":
                    base = t_select
                decisions = model.num_moe_layers * B
                rows.append({"policy": name, "shape": model_name, "batch": B, "layers": model.num_moe_layers,
                             "experts": model.num_experts, "top_k": model.top_k,
                             "route_ms": t_route * 1e3, "select_ms": t_select * 1e3,
                             "route_decisions_per_s": decisions / t_route, "select_decisions_per_s": decisions / t_select})
            for r in rows:
                if r["shape"] == model_name and r["batch"] == B and base:
                    r["select_vs_vanilla"] = r["select_ms"] / (base * 1e3)
    print(f"{'policy':<15}{'shape':<15}{'B':>4}{'route ms':>10}{'route dec/s':>16}{'select ms':>11}{'select dec/s':>16}{'vs vanilla':>12}")
    for r in rows:  # vanilla's route returns its input: its select is the meaningful figure
        print(f"{r['policy']:<15}{r['shape']:<15}{r['batch']:>4}{r['route_ms']:>10.3f}{r['route_decisions_per_s']:>16,.0f}"
              f"{r['select_ms']:>11.3f}{r['select_decisions_per_s']:>16,.0f}{r.get('select_vs_vanilla', float('nan')):>12.2f}")
    out = {"benchmark": "policies", "date": date.today().isoformat(), "machine": platform.node(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": 1,
           "torch": torch.__version__, "target_decisions_per_s": 1_000_000, "rows": rows}
    dst = ROOT / "benchmarks" / "results" / "policies.json"
    dst.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dst.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
