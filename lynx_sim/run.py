"""`run(cfg)`: one simulation from a composed config. The hydra entry point wraps it; tests and
notebooks call it directly (STYLE.md item 8). Outputs go to `out_dir` in one place at the end:
`summary.json` and `steps.csv`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from .cost import HardwareSpec, Parallel, Roofline
from .engine.replay import ClosedLoopReplay
from .engine.simulator import simulate
from .metrics.recorder import StepRecorder
from .model import ModelSpec
from .policies import build_policy
from .policies.calibration import Calibration
from .policies.vanilla import Vanilla
from .traces.source import build_source


def run(cfg, out_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Simulate `cfg.workload.steps` closed-loop decode steps; return (and write) the summary."""
    t0 = time.perf_counter()
    if cfg.workload.kind != "closed":
        raise ValueError(f"workload.kind: only 'closed' is implemented, found {cfg.workload.kind!r}")
    warmup = cfg.workload.get("warmup_steps", 0)
    for key, value, low in (("batch", cfg.batch, 1), ("workload.steps", cfg.workload.steps, 1), ("seed", cfg.seed, 0),
                            ("workload.warmup_steps", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key}: expected an integer >= {low}, found {value!r}")
    model = ModelSpec.from_cfg(cfg.model)
    hw = HardwareSpec.from_cfg(cfg.hardware)
    source = build_source(cfg, model)
    parallel = Parallel.from_cfg(cfg.get("parallel"))
    policy = build_policy(cfg.policy, model, expert_time_s=Roofline(model, hw, parallel).expert_time_s())
    cost = Roofline(model, hw, parallel, policy_overhead_us=policy.overhead_us)
    approximations = []
    fill = _missing_logits(cfg, policy, source, approximations)
    policy.check_available(source.fields | ({"logits"} if fill else set()), source.name)
    if policy.needs_calibration:
        calib = Calibration.from_source(source)
        policy.prepare(calib)
        if not calib.held_out:
            approximations.append(f"policy '{policy.name}' learned its statistics from the replayed trace itself (in-sample)")
    replay = ClosedLoopReplay(source, int(cfg.batch), np.random.default_rng(int(cfg.seed)), fill_missing_logits=fill)
    recorder = StepRecorder(model.num_moe_layers)
    sim_s = simulate(replay, policy, Vanilla(model.router), cost, Roofline(model, hw, parallel), recorder,
                     int(cfg.workload.steps), warmup)

    if replay.prefill_as_decode:
        approximations.append("trace has no decode tokens: its prompt tokens are replayed as decode steps")
    if replay.reused:
        approximations.append(f"trace ran out of requests: {replay.reused} admissions replay a used request "
                              "from a random token offset")
    note = cfg.model.moe.get("router_approximation")
    if note:
        approximations.append(f"router of {model.name}: {note}")
    if hw.calibrated_from is None:
        approximations.append("cost model efficiency factors are assumed, not calibrated on this GPU")
    approximations.append("closed-loop decode only: prefill of new requests is not modelled")
    if policy.overhead_us:
        approximations.append(f"policy overhead {policy.overhead_us} us per MoE layer is assumed, not measured")
    summary = {
        "policy": policy.name, "batch": int(cfg.batch), "model": model.name, "hardware": hw.name,
        "gpus": parallel.gpus, "expert_parallel": parallel.expert_parallel,
        "trace": source.name, "seed": int(cfg.seed), "policy_params": policy.params(),
        **recorder.summary(), "warmup_steps": warmup,
        "simulated_s": sim_s, "wall_s": round(time.perf_counter() - t0, 3),
        "exact": not (replay.prefill_as_decode or replay.reused or fill or note),
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


def _missing_logits(cfg, policy, source, approximations: list) -> bool:
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
