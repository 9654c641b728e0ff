"""`run(cfg)`: one simulation from a composed config. The hydra entry point wraps it; tests and
notebooks call it directly (STYLE.md item 8). The config is validated first (lynx_sim/schema.py).
Outputs go to `out_dir` in one place at the end (lynx_sim/metrics/output.py): `steps.csv`,
`requests.csv` (serving workloads), `trace.json` (Chrome trace, opens in Perfetto), `plots/*.png`,
`config.resolved.yaml`, and `summary.json` last, the mark of a complete run."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .cost import HardwareSpec, Parallel, Roofline
from .cost.memory import DoesNotFitError
from .cost.memory import plan as memory_plan
from .engine.replay import ClosedLoopReplay
from .engine.scheduler import Scheduler, SchedulerConfig
from .engine.serving import Cluster, EngineNode
from .engine.simulator import simulate
from .engine.workload import RequestFactory, arrival_times
from .metrics.output import write_run
from .metrics.recorder import StepRecorder
from .metrics.serving import ServingRecorder, percentiles
from .model import ModelSpec
from .policies import build_policy
from .policies.routing_profile import RoutingProfile
from .policies.vanilla import Vanilla
from .schema import validate
from .traces.source import build_source


def run(cfg, out_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Simulate the run `cfg` describes; return (and write to `out_dir`) the summary.

    workload=decode: the steady decode batch of B requests (the paper's setting), vanilla priced
    on the same iterations. closed / poisson / trace: the serving engine with prefill, the
    scheduler and the KV cache; vanilla is a second, separate serving run (its batches differ)."""
    t0 = time.perf_counter()
    validate(cfg)
    kind = cfg.workload.kind
    model = ModelSpec.from_cfg(cfg.model)
    hw = HardwareSpec.from_cfg(cfg.hardware)
    parallel = Parallel.from_cfg(cfg.get("parallel"))
    serving = cfg.get("serving") or {}
    base_cost = Roofline(model, hw, parallel)
    mem = memory_plan(model, hw, parallel, base_cost.kv_bytes_per_token_rank(), float(serving.get("gpu_memory_utilization", 0.9)))
    approximations, assumptions = [], []  # approximations make a run inexact; assumptions hold for every run
    if not mem.fits:
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
    ctx = dict(cfg=cfg, model=model, hw=hw, source=source, policy=policy, cost=cost, base_cost=base_cost, mem=mem,
               fill=fill, approximations=approximations, assumptions=assumptions, quiet=quiet)
    metrics, tables = (_decode(**ctx) if kind == "decode" else _serve(**ctx))
    note = cfg.model.moe.get("router_approximation")
    if note:
        approximations.append(f"router of {model.name}: {note}")
    assumptions.extend(cost.assumptions())
    if policy.overhead_us:
        assumptions.append(f"policy overhead {policy.overhead_us} us per MoE layer is assumed, not measured")
    summary = {
        "policy": policy.name, "batch": int(cfg.batch), "model": model.name, "hardware": hw.name,
        "gpus": parallel.gpus, "expert_parallel": parallel.expert_parallel, "workload": kind,
        "trace": source.name, "trace_sha256": source.digest.hexdigest(), "seed": int(cfg.seed),
        "policy_params": policy.params(),
        "calibration": hw.calibration.describe() if hw.calibration is not None else None,
        **metrics, "memory": mem.as_dict(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "exact": not approximations,
        "approximations": approximations,
        "assumptions": assumptions,
    }
    if out_dir is not None:
        write_run(Path(out_dir), cfg, summary, tables, model.num_experts)
    if not quiet:
        print_table(summary, out_dir)
    return summary


def _decode(cfg, model, hw, source, policy, cost, base_cost, mem, fill, approximations, assumptions, quiet):
    """The steady decode batch: B slots, vanilla priced on the same iterations."""
    warmup = cfg.workload.get("warmup_steps", 0)
    replay = ClosedLoopReplay(source, int(cfg.batch), np.random.default_rng(int(cfg.seed)), fill_missing_logits=fill,
                              horizon=int(cfg.workload.steps) + warmup)
    recorder = StepRecorder(model.num_moe_layers, hw.hbm_bandwidth_gbps * 1e9, mem.kv_capacity_tokens)
    with _progress(quiet, int(cfg.workload.steps) + warmup, "decode steps") as bar:
        sim_s = simulate(replay, policy, Vanilla(model.router), cost, base_cost, recorder,
                         int(cfg.workload.steps), warmup, progress=bar)
    if replay.prefill_as_decode:
        approximations.append("trace has no decode tokens: its prompt tokens are replayed as decode steps")
    if replay.reused:
        approximations.append(f"trace ran out of requests: {replay.reused} admissions replay a used request "
                              "from a random token offset")
    assumptions.append("workload=decode: the steady decode batch; prefill, arrivals and the KV limit are not "
                          "modelled (workload=closed|poisson|trace for those); TTFT is undefined")
    m = recorder.summary()
    t = recorder.table()
    B, slo = int(cfg.batch), (cfg.get("slo") or {}).get("tpot_ms")
    tpot = t.step_time_ms  # every request in the batch emits one token per iteration
    thr = B / (tpot.mean() / 1e3)
    m.update({"warmup_steps": warmup, "simulated_s": sim_s, "ttft_ms": percentiles([]), "tpot_ms": percentiles(tpot),
              "throughput_tok_s": float(thr),
              "goodput_tok_s": float(thr * (tpot <= slo).mean()) if slo is not None else float(thr),
              "slo": {"tpot_ms": slo, "ttft_ms": None}})
    per_layer = m["per_layer"]["distinct_experts"]
    tables = {"steps": t, "per_layer": {policy.name: per_layer["policy"], "vanilla": per_layer["vanilla"]}}
    return m, tables


def _serve(cfg, model, hw, source, policy, cost, base_cost, mem, fill, approximations, assumptions, quiet):
    """The serving engine, once with the policy and once with vanilla (unless serving.compare_vanilla=false)."""
    s = cfg.serving
    factory = RequestFactory(source)
    if factory.num_requests is not None and not (source.trace.phase == 1).any():
        raise ValueError(f"{source.name}: workload={cfg.workload.kind} needs output (decode) tokens to serve, and "
                         f"this trace has only prompt tokens; use workload=decode to replay them as decode steps")
    if factory.num_requests is not None and not s.chunked_prefill:
        validate(cfg, longest_request=factory.longest_request())  # the token budget against the file's requests
    capacity = int(s.kv_capacity_tokens) if s.get("kv_capacity_tokens") else mem.kv_capacity_tokens
    sched_cfg = SchedulerConfig(max_seqs=int(cfg.batch), max_tokens=int(s.max_num_batched_tokens),
                                kv_capacity_tokens=capacity, block_tokens=int(s.kv_block_tokens),
                                chunked_prefill=bool(s.chunked_prefill))
    slo = cfg.get("slo") or {}
    runs = [(policy, cost)]
    if s.get("compare_vanilla", True) and policy.name != "vanilla":
        runs.append((Vanilla(model.router), base_cost))
    out, tables = {}, {"per_layer": {}, "requests": {}}
    for pol, c in runs:
        rec = serve(cfg, model, hw, factory, pol, c, sched_cfg, fill, quiet)
        summ = rec.summary(slo.get("tpot_ms"), slo.get("ttft_ms"))
        label = "vanilla" if pol is not policy else policy.name
        tables["requests"][label] = rec.request_table()
        tables["per_layer"][label] = summ["per_layer_distinct_experts_decode"]
        if pol is policy:
            out.update(summ)
            tables["steps"], tables["requests_main"] = rec.step_table(), rec.request_table()
        else:
            out["vanilla_run"] = {k: summ[k] for k in ("ttft_ms", "tpot_ms", "e2e_ms", "throughput_tok_s", "goodput_tok_s",
                                                       "slo_attainment", "step_time_ms_mean", "distinct_experts_decode",
                                                       "preemptions", "duration_s")}
    if "vanilla_run" in out:
        v = out["vanilla_run"]
        out["tpot_speedup"] = _ratio(v["tpot_ms"]["mean"], out["tpot_ms"]["mean"])
        out["throughput_speedup"] = _ratio(out["throughput_tok_s"], v["throughput_tok_s"])
    if factory.stand_in_prompts:
        approximations.append(f"{factory.stand_in_prompts} requests have no recorded prompt routing: their decode "
                              "rows stand in for the prompt's")
    if factory.reused:
        approximations.append(f"trace ran out of requests: {factory.reused} arrivals replay a used one")
    if s.get("kv_capacity_tokens"):
        assumptions.append(f"KV capacity set by hand: {capacity} tokens (memory plan: {mem.kv_capacity_tokens})")
    if s.disaggregated:
        assumptions.append("disaggregated: KV transfers do not contend for the link")
    return out, tables


def _ratio(a, b):
    return float(a / b) if a and b else None


def serve(cfg, model, hw, factory, policy, cost, sched_cfg, fill, quiet) -> ServingRecorder:
    """One serving simulation; returns its recorder."""
    import simpy

    w, s = cfg.workload, cfg.serving
    rng = np.random.default_rng([int(cfg.seed), 2])
    times, requests = arrival_times(w, factory, rng)
    env = simpy.Environment()
    rec = ServingRecorder(model.num_moe_layers, hw.hbm_bandwidth_gbps * 1e9)
    kv_link = float(s.kv_transfer_gbps) * 1e9
    kv_token = cost.kv_bytes_per_token() * model.num_layers

    with _progress(quiet, int(w.num_requests), f"requests ({policy.name})") as bar:
        def make_node(name, on_leave, prefill_only):
            sc = sched_cfg if not prefill_only else SchedulerConfig(
                max_seqs=max(sched_cfg.max_tokens, 1), max_tokens=sched_cfg.max_tokens,
                kv_capacity_tokens=sched_cfg.kv_capacity_tokens, block_tokens=sched_cfg.block_tokens,
                chunked_prefill=sched_cfg.chunked_prefill)
            return EngineNode(env, name, Scheduler(sc, factory.load), policy, cost, rec, on_leave, fill,
                              leave_after_first=prefill_only)

        Cluster(env, make_node, factory.make, times, requests, int(w.num_requests),
                int(w.get("concurrency") or cfg.batch), rec, disaggregated=bool(s.disaggregated),
                transfer_s=lambda req: req.computed * kv_token / kv_link, progress=bar)
        env.run()
    return rec


class _Bar:
    def __init__(self, progress, task):
        self.p, self.task = progress, task

    def update(self, n: int = 1) -> None:
        if self.p is not None:
            self.p.update(self.task, advance=n)


@contextmanager
def _progress(quiet: bool, total: int, what: str):
    """A progress bar on long runs (rich; off when quiet or when the output is not a terminal)."""
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield _Bar(None, None)
        return
    with Progress(console=console, transient=True) as p:
        yield _Bar(p, p.add_task(what, total=total))


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


def print_table(s: dict, out_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    serving = s["workload"] != "decode"
    what = f"{s['requests']} requests, {s['workload']} workload" if serving else f"{s['steps']} decode steps"
    t = Table(title=f"{s['policy']} vs vanilla: {s['model']} on {s['hardware']}, batch {s['batch']}, {what}, "
                    f"trace {s['trace']}")
    for col in ("metric", "vanilla", s["policy"], "policy / vanilla"):
        t.add_column(col, justify="right" if col != "metric" else "left")

    def row(name, v, p, fmt="{:.3f}"):
        ok = v is not None and p is not None
        t.add_row(name, "-" if v is None else fmt.format(v), "-" if p is None else fmt.format(p),
                  f"{p / v:.3f}" if ok and v else "")

    if serving:
        v = s.get("vanilla_run") or {}
        for name, key in (("TTFT p50 (ms)", "ttft_ms"), ("TPOT p50 (ms)", "tpot_ms"), ("TPOT p99 (ms)", "tpot_ms")):
            q = "p99" if "p99" in name else "p50"
            row(name, (v.get(key) or {}).get(q), s[key][q])
        row("output throughput (tok/s)", v.get("throughput_tok_s"), s["throughput_tok_s"], "{:.0f}")
        row(f"goodput, TPOT <= {s['slo']['tpot_ms']} ms (tok/s)", v.get("goodput_tok_s"), s["goodput_tok_s"], "{:.0f}")
        row("distinct experts per layer (decode steps)", v.get("distinct_experts_decode"), s["distinct_experts_decode"])
        t.add_row("policy acted on (fraction of iterations)", "", f"{s['policy_acted_fraction']:.3f}", "")
    else:
        for name, key in (("decode step time (ms)", "step_time_ms"), ("MoE time per step (ms)", "moe_time_ms"),
                          ("distinct experts per layer", "distinct_experts")):
            row(name, s[key]["vanilla"], s[key]["policy"])
        top1 = "n/a (trace has unordered ids only)" if s["top1_retention"] is None else f"{s['top1_retention']:.3f}"
        t.add_row("top-1 expert retained", "1.000", top1, "")
        t.add_row("gate mass retained", "1.000", f"{s['gate_mass_retained']:.3f}", "")
    console = Console()
    console.print(t)
    if serving:
        console.print(f"TPOT speedup (vanilla / {s['policy']}): [bold]{s.get('tpot_speedup') or float('nan'):.3f}x[/bold]"
                      f"   MoE share {s['moe_share']:.2f}   bandwidth utilisation {s['bandwidth_utilisation']:.2f}"
                      f"   preemptions {s['preemptions']}   exact: {s['exact']}")
    else:
        console.print(f"speedup (vanilla step time / {s['policy']} step time): [bold]{s['speedup']:.3f}x[/bold]"
                      f"   exact: {s['exact']}")
    cal = s.get("calibration")
    if cal:
        moe = (cal["heldout_error"].get("moe_decode") or {}).get("median")
        console.print(f"cost model: calibration {cal['name']} ({cal['source']}, {cal['date']}"
                      + (f"; MoE decode held-out median error {moe:.1%}" if moe is not None else "") + ")")
    else:
        console.print(f"cost model: uncalibrated roofline on {s['hardware']} (assumed factors: see summary 'assumptions')")
    if out_dir is not None:
        console.print(f"outputs: {out_dir}/summary.json, steps.csv{', requests.csv' if serving else ''}, trace.json, plots/")
