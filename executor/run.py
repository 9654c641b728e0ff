"""The executor: the simulator's decode steps, replayed through the Triton kernels on a GPU.

Same config as the simulator (conf/), same trace and seed, so the replay yields the same
batches as `python -m lynx_sim` with workload=decode. Per step the policy and vanilla select
experts on the device (Lynx through kernels/lynx_routing.py when it applies, checked against
the torch policy every step); per MoE layer both selections go through kernels/fused_moe.py on
a layer with the model's real dimensions and seeded random weights, timed as CUDA-graph replays
(median of `executor.repeats`, weight copies rotated against the L2 cache). Beside each
measurement: the simulator's prediction of the same layer (Roofline.routed_experts_s), the
error, the policy's own time. Outputs: measurements.csv (with each layer's per-expert token
counts), summary.json and, on a GPU, calibration.json (executor/calibrate.py): a cost calibration
in the format the simulator loads (`hardware.calibration=<path>`).
"""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from lynx_sim.engine.replay import ClosedLoopReplay
from lynx_sim.policies import BatchRouting
from lynx_sim.policies.vanilla import Vanilla
from lynx_sim.setup import prepare

from . import calibrate
from .device import choose, versions
from .timing import median_time_s
from .weights import copies_needed, make_layers


def _lynx_on_kernels(policy) -> bool:
    """Lynx runs on the Triton kernels where the policy says its compiled path takes a GPU batch
    (`Lynx.compiled_path`: the configurations they reproduce exactly, unless backend=torch); the
    CPU check mode runs the same kernels under the interpreter, standing in for the GPU."""
    return policy.name == "lynx" and policy.compiled_path("cuda")


def run(cfg, out_dir: str | Path) -> dict:
    t0 = time.perf_counter()
    ex = cfg.executor
    _check(cfg)
    dev = choose(str(ex.device))
    import torch

    from kernels import LayerShape, align_block_size, fused_moe, moe_reference, select_config
    from kernels.lynx_routing import lynx_route

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare(cfg, check=False)  # as the simulator builds it: trace, policy (profile learned), stand-in logits
    model, hw, cost, source, policy, fill = setup.model, setup.hw, setup.base_cost, setup.source, setup.policy, setup.fill
    vanilla = Vanilla(model.router)
    B, E, k, L = int(cfg.batch), model.num_experts, model.top_k, model.num_moe_layers
    steps = int(ex.steps)
    cpu = dev.interpreted
    H, I = (int(ex.cpu_hidden), int(ex.cpu_intermediate)) if cpu else (model.hidden_size, model.expert_intermediate_size)
    layers = list(range(L)) if ex.layers is None else list(range(min(int(ex.layers), L)))
    dtype = getattr(torch, str(ex.dtype))
    expert_bytes = 3 * H * I * dtype.itemsize
    copies = 1 if cpu else copies_needed(dev.l2_bytes, expert_bytes)
    weights = make_layers(E, H, I, B, copies, dtype, dev.kind, int(cfg.seed))
    replay = ClosedLoopReplay(source, B, np.random.default_rng(int(cfg.seed)), horizon=steps, fill_missing_logits=fill)
    on_kernels = _lynx_on_kernels(policy)
    repeats, warmup = (1, 0) if cpu else (int(ex.repeats), int(ex.warmup))
    rows, mismatches, check_err = [], 0, 0.0
    lynx_buf: dict = {}
    for step in range(steps):
        batch, _ = replay.batch()
        replay.advance()
        d = lambda t: None if t is None else t.to(dev.kind)  # noqa: E731
        b = BatchRouting(d(batch.ids), d(batch.weights), d(batch.logits), ids_ordered=batch.ids_ordered,
                         logits_filled=batch.logits_filled)
        sel, base = policy.select(b), vanilla.select(b)
        policy_layer_s = float("nan")
        if on_kernels and sel.acted:
            ids_k, w_k, _ = lynx_route(b.logits.float(), policy.alpha, policy.beta, k, model.router.renormalize, out=lynx_buf)
            mismatches += int((ids_k != sel.ids).any(-1).sum())
            z = b.logits.float()
            per_layer = [lambda z=z, l=l, buf={}: lynx_route(z[l:l + 1], policy.alpha, policy.beta, k,  # noqa: B008
                                                            model.router.renormalize, out=buf) for l in layers]
            policy_layer_s = median_time_s(per_layer, repeats, warmup, dev.kind, bool(ex.cuda_graphs))
        elif sel.acted and policy.name != "vanilla":
            policy_layer_s = median_time_s([lambda: policy.route(b)], repeats, warmup, dev.kind, False) / L
        for l in layers:
            for who, s in (("policy", sel), ("vanilla", base)):
                ids_l = s.ids[l].contiguous()
                w_l = (s.weights[l] if s.weights is not None else torch.full(ids_l.shape, 1.0 / k, device=dev.kind))
                w_l = w_l.float().contiguous()
                counts = torch.bincount(ids_l[ids_l >= 0].flatten().cpu(), minlength=E).numpy()
                distinct = int(np.count_nonzero(counts))
                conf = select_config(B, distinct, LayerShape(E, k, H, I), dev.name if not cpu else "", str(ex.dtype),
                                     pairs=int(counts.sum()))
                ws, out = {}, torch.empty(B, H, dtype=dtype, device=dev.kind)
                fns = [lambda w=w, ws=ws: fused_moe(w.x, w.w1, w.w2, ids_l, w_l, config=conf, out=out, workspace=ws)
                       for w in weights]
                t = median_time_s(fns, repeats, warmup, dev.kind, bool(ex.cuda_graphs))
                t_align = (median_time_s([lambda: align_block_size(ids_l, E, conf.block_m)], repeats, warmup, dev.kind,
                                         bool(ex.cuda_graphs)) if l == layers[0] else float("nan"))  # a share, once per step
                if bool(ex.check) and step == 0 and l == layers[0]:  # the measured kernels computed the right layer
                    got = fused_moe(weights[0].x, weights[0].w1, weights[0].w2, ids_l, w_l, config=conf).double().cpu()
                    ref = moe_reference(weights[0].x.cpu(), weights[0].w1.cpu(), weights[0].w2.cpu(), ids_l.cpu(), w_l.cpu())
                    check_err = max(check_err, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
                mp = cost.moe_params
                mem_s = distinct * model.expert_bytes / (mp.peak_bandwidth_Bps * mp.bandwidth_efficiency)
                flop_s = model.expert_flops(cost.padded(counts, conf.block_m).sum()) / (mp.peak_flops * mp.compute_efficiency)
                pred = float(cost.routed_experts_s(counts[None], conf.block_m)[0])  # padded as the kernel ran
                rows.append({"step": step, "layer": l, "routing": who, "batch": B, "pairs": int(counts.sum()),
                             "distinct": distinct, "block_m": conf.block_m, "measured_us": t * 1e6, "predicted_us": pred * 1e6,
                             "error": (pred - t) / t, "memory_bound": bool(mem_s >= flop_s), "align_us": t_align * 1e6,
                             "policy_us": policy_layer_s * 1e6 if who == "policy" else float("nan"),
                             "expert_counts": " ".join(map(str, counts.tolist()))})
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "measurements.csv", index=False)
    summary = _summary(cfg, dev, model, policy, table, H, I, copies, layers, mismatches, check_err, on_kernels)
    summary["notes"] += setup.approximations
    family = hw.name.split("_")[0].lower()
    if not cpu and family not in dev.name.lower().replace(" ", ""):
        summary["notes"].append(f"hardware={hw.name} but the GPU is {dev.name}: predictions and the calibration use "
                                f"{hw.name}'s datasheet figures (choose the matching hardware=...)")
    if not cpu:
        summary["calibration"] = _calibrate(calibrate.moe_rows(table, H, I, E, k, str(ex.dtype)), hw, dev, out_dir)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def _check(cfg) -> None:
    """The executor's settings, named when wrong (before a GPU minute is spent)."""
    ex = cfg.executor
    if (cfg.get("parallel") or {}).get("gpus", 1) != 1:
        raise ValueError(f"parallel.gpus: expected 1 (the executor times each layer on one GPU), found {cfg.parallel.gpus!r}")
    if str(ex.dtype) not in ("bfloat16", "float16"):
        raise ValueError(f"executor.dtype: expected bfloat16 or float16 (the kernels' dtypes), found {ex.dtype!r}")
    for key, low in (("steps", 1), ("repeats", 1), ("warmup", 0), ("cpu_hidden", 1), ("cpu_intermediate", 1)):
        v = ex[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"executor.{key}: expected an integer >= {low}, found {v!r}")
    if ex.layers is not None and (not isinstance(ex.layers, int) or ex.layers < 1):
        raise ValueError(f"executor.layers: expected null (all) or an integer >= 1, found {ex.layers!r}")


def _summary(cfg, dev, model, policy, table, H, I, copies, layers, mismatches, check_err, on_kernels) -> dict:
    pol, van = table[table.routing == "policy"], table[table.routing == "vanilla"]
    err = table.error.abs()
    notes = []
    if dev.interpreted:
        notes.append("executor.device=cpu: tiny dimensions under the Triton interpreter; the timings check the "
                     "plumbing and are not GPU speed")
    if H != model.hidden_size:
        notes.append(f"dimensions H={H}, I={I} instead of the model's {model.hidden_size}, "
                     f"{model.expert_intermediate_size}: predictions (for the real dimensions) are not comparable")
    policy_us = pol.policy_us.dropna()
    return {
        "device": versions(dev), "date": date.today().isoformat(), "model": model.name, "policy": policy.name,
        "batch": int(cfg.batch), "steps": int(cfg.executor.steps), "layers_timed": len(layers), "hidden": H,
        "intermediate": I, "weight_copies": copies, "dtype": str(cfg.executor.dtype),
        "moe_layer_us": {"policy": float(pol.measured_us.median()), "vanilla": float(van.measured_us.median())},
        "measured_moe_speedup": float(van.measured_us.sum() / pol.measured_us.sum()),
        "predicted_moe_speedup": float(van.predicted_us.sum() / pol.predicted_us.sum()),
        "distinct_experts": {"policy": float(pol.distinct.mean()), "vanilla": float(van.distinct.mean())},
        "policy_us_per_layer": float(policy_us.median()) if len(policy_us) else None,
        "align_us": float(table.align_us.median()),  # the align step alone (inside moe_layer_us)
        "policy_share_of_moe_layer": float(policy_us.median() / pol.measured_us.median()) if len(policy_us) else None,
        "policy_on_kernels": on_kernels, "kernel_vs_policy_mismatched_tokens": int(mismatches),
        "reference_check_max_rel_error": check_err,
        "simulator_error": None if dev.interpreted else {"median": float(err.median()), "p90": float(err.quantile(0.9))},
        "notes": notes,
    }


def _calibrate(rows, hw, dev, out_dir: Path) -> dict:
    """Fit the fused-MoE term on this run's layers (both routings) and write calibration.json in
    the simulator's calibration format (`hardware.calibration=<path>` loads it)."""
    try:
        record = calibrate.fit(rows, hw, dev.name)
    except ValueError as e:
        return {"skipped": str(e)}
    path = calibrate.write(out_dir / "calibration.json", record)
    return {"path": str(path), "heldout": record["heldout"], "uncalibrated": record["uncalibrated"],
            "params": record["params"]}