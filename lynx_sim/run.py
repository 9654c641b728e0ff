"""`run(cfg)`: one simulation from a composed config. The hydra entry point wraps it; tests and
notebooks call it directly (STYLE.md item 8). Outputs go to `out_dir` in one place at the end:
`summary.json` and `steps.csv`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from .cost import HardwareSpec, Roofline
from .engine.replay import ClosedLoopReplay
from .engine.simulator import simulate
from .metrics.recorder import StepRecorder
from .model import ModelSpec
from .policies import build_policy
from .policies.vanilla import Vanilla
from .traces.source import build_source


def run(cfg, out_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Simulate `cfg.workload.steps` closed-loop decode steps; return (and write) the summary."""
    t0 = time.perf_counter()
    if cfg.workload.kind != "closed":
        raise ValueError(f"workload.kind: only 'closed' is implemented, found {cfg.workload.kind!r}")
    model = ModelSpec.from_cfg(cfg.model)
    hw = HardwareSpec.from_cfg(cfg.hardware)
    source = build_source(cfg, model)
    policy = build_policy(cfg.policy, model)
    policy.check_available(source.fields, source.name)
    replay = ClosedLoopReplay(source, int(cfg.batch), np.random.default_rng(int(cfg.seed)))
    recorder = StepRecorder(model.num_moe_layers)
    sim_s = simulate(replay, policy, Vanilla(model.router), Roofline(model, hw), recorder, int(cfg.workload.steps))

    approximations = []
    if replay.prefill_as_decode:
        approximations.append("trace has no decode tokens: its prompt tokens are replayed as decode steps")
    if replay.reused:
        approximations.append(f"trace ran out of requests: {replay.reused} admissions replay a used request "
                              "from a random token offset")
    if hw.calibrated_from is None:
        approximations.append("cost model efficiency factors are assumed, not calibrated on this GPU")
    approximations.append("closed-loop decode only: prefill of new requests is not modelled")
    summary = {
        "policy": policy.name, "batch": int(cfg.batch), "model": model.name, "hardware": hw.name,
        "trace": source.name, "seed": int(cfg.seed), "policy_params": policy.params(),
        **recorder.summary(),
        "simulated_s": sim_s, "wall_s": round(time.perf_counter() - t0, 3),
        "exact": not replay.prefill_as_decode and not replay.reused,
        "approximations": approximations,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        recorder.table().to_csv(out / "steps.csv", index=False)
        (out / "config.resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if not quiet:
        print_table(summary, out_dir)
    return summary


def print_table(s: dict, out_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{s['policy']} vs vanilla: {s['model']} on {s['hardware']}, batch {s['batch']}, "
                    f"{s['steps']} decode steps, trace {s['trace']}")
    for col in ("metric", "vanilla", s["policy"], "policy / vanilla"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    for name, key in (("decode step time (ms)", "step_time_ms"), ("MoE time per step (ms)", "moe_time_ms"),
                      ("distinct experts per layer", "distinct_experts")):
        v, p = s[key]["vanilla"], s[key]["policy"]
        t.add_row(name, f"{v:.3f}", f"{p:.3f}", f"{p / v:.3f}")
    top1 = "n/a (trace has unordered ids only)" if s["top1_retention"] is None else f"{s['top1_retention']:.3f}"
    t.add_row("top-1 expert retained", "1.000", top1, "")
    t.add_row("gate mass retained", "1.000", f"{s['gate_mass_retained']:.3f}", "")
    console = Console()
    console.print(t)
    console.print(f"speedup (vanilla step time / {s['policy']} step time): [bold]{s['speedup']:.3f}x[/bold]"
                  f"   exact: {s['exact']}")
    if out_dir is not None:
        console.print(f"outputs: {out_dir}/summary.json, steps.csv")
