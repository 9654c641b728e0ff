"""Fused MoE kernel speed against baselines measured in the same run, and Lynx routing overhead.

Needs a CUDA GPU (exits 2 without one; `--cpu` runs every path at tiny sizes under the Triton
interpreter, to check the script, measuring nothing). For the Mixtral-8x7B, Qwen3-30B-A3B and
DeepSeek-V2-Lite expert shapes, bf16, decode batches of 1-256 tokens taken from each model's
synthetic trace (realistic distinct-expert counts):
- ours: kernels.fused_moe, CUDA-graph replays, weight copies rotated against L2, median;
- torch loop: a plain per-expert loop in bf16 (kernels.reference, eager: it syncs on the host);
- torch._grouped_mm where the installed torch has it: the same two grouped GEMMs on the same
  expert-sorted inputs (a sort and a scatter around them, timed with them), CUDA-graph replays
  like ours (eager only if capture fails; `grouped_mm_timing` says which);
- the HBM roofline of the distinct experts' bytes at the datasheet bandwidth: fraction reached.
Prefill at 2k-8k tokens against the dense bf16 peak. Lynx routing (kernels/lynx_routing.py, one
layer) as a fraction of the MoE layer it selects for, at B = 16, 64, 256.
Targets (kernels issue): decode at B = 16-64 at >= 85% of the roofline; ours at least as fast as
torch._grouped_mm; Lynx routing <= 3% of the MoE layer at B = 64.

`--tune` first times candidate launch configurations per shape and decode batch and writes the
fastest per (tokens, distinct experts) bucket to kernels/tuned/<device>_bfloat16_E<E>_k<k>_H<H>_I<I>.json,
the table kernels/configs.py reads (then the benchmark runs with it).

Usage: python benchmarks/kernels.py [--repeats 50] [--datasheet-gbps 3350 --datasheet-tflops 989.4] [--tune] [--cpu]
Prints tables and writes benchmarks/results/kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import statistics
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)  # this file is named like the kernels package it benchmarks: import that one
SHAPES = {"mixtral_8x7b": (4096, 14336, 8, 2), "qwen3_30b_a3b": (2048, 768, 128, 8),
          "deepseek_v2_lite": (2048, 1408, 64, 6)}  # H, I, E, k (config/model/*.yaml)
DECODE = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL = (2048, 4096, 8192)


def trace_ids(model_name: str, B: int, seed: int = 0):
    """ids and weights [B, k] of one decode step of layer 0, from the model's synthetic trace."""
    import numpy as np
    import torch

    from lynx_sim.config import compose
    from lynx_sim.engine.replay import ClosedLoopReplay
    from lynx_sim.model import ModelSpec
    from lynx_sim.traces.source import build_source

    cfg = compose([f"model={model_name}"])
    src = build_source(cfg, ModelSpec.from_cfg(cfg.model))
    batch, _ = ClosedLoopReplay(src, B, np.random.default_rng(seed), horizon=1).batch()
    return batch.ids[0].contiguous(), (batch.weights[0] if batch.weights is not None else
                                       torch.full(batch.ids[0].shape, 1.0 / batch.ids.shape[-1])).float().contiguous()


def grouped_mm_moe(x, w1, w2, ids, w):
    """The same layer through torch._grouped_mm: tokens sorted by expert, two grouped GEMMs."""
    import torch
    import torch.nn.functional as F

    T, k = ids.shape
    E, I = w1.shape[0], w2.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (not bincount: it syncs on the host, graphs cannot hold it)
    xs = x[order // k]
    gu = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs) * w.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, order // k, y.float()).to(x.dtype)


def candidates(limit: int | None = None):
    """Launch configurations to try: tile rows, columns, depth, warps, pipeline stages."""
    from kernels import MoEConfig

    out = [MoEConfig(m, n, k, w, st) for m in (16, 32, 64) for n in (64, 128) for k in (64, 128)
           for w in (4, 8) for st in (3, 4)]
    return out[:limit] if limit else out


def tune(dev, shapes: dict, batches, reps: int, warm: int, limit: int | None, out_dir: Path | None) -> list[Path]:
    """Fastest candidate per (shape, tokens bucket, distinct-experts bucket); one JSON table per shape."""
    import torch

    from executor.timing import median_time_s
    from executor.weights import copies_needed, make_layers
    from kernels import LayerShape, fused_moe
    from kernels.configs import bucket, table_path
    from triton.runtime.errors import OutOfResources

    written = []
    for name, (H, I, E, k) in shapes.items():
        layers = make_layers(E, H, I, max(batches), 1 if dev.interpreted else copies_needed(dev.l2_bytes, 6 * H * I),
                             torch.bfloat16, dev.kind, 0)
        times: dict[tuple, dict[int, dict]] = {}  # (tokens bucket, distinct bucket) -> batch -> {config: seconds}
        for B in batches:
            ids, w = (t.to(dev.kind) for t in trace_ids(name, B))
            key = (bucket(B), bucket(int(torch.unique(ids).numel())))
            for c in candidates(limit):
                outs = [torch.empty(B, H, dtype=torch.bfloat16, device=dev.kind) for _ in layers]
                try:
                    t = median_time_s([lambda L=L, o=o, ws={}: fused_moe(L.x[:B], L.w1, L.w2, ids, w, config=c, out=o,
                                                                         workspace=ws) for L, o in zip(layers, outs)],
                                      reps, warm, dev.kind)
                except OutOfResources as e:  # tiles that need more shared memory than the GPU has
                    print(f"  {name} B={B} {c}: skipped ({e})", file=sys.stderr)
                    continue
                times.setdefault(key, {}).setdefault(B, {})[c] = t
        best: dict[tuple, tuple[float, object]] = {}
        for key, per_batch in times.items():  # batches sharing a key: rank configs by time relative
            common = set.intersection(*(set(ts) for ts in per_batch.values()))  # to each batch's own best
            if common:
                score = {c: statistics.mean(ts[c] / min(ts.values()) for ts in per_batch.values()) for c in common}
                c = min(score, key=score.get)
                best[key] = (statistics.median(ts[c] for ts in per_batch.values()), c)
        if not best:
            print(f"tuning {name}: no candidate ran; no table written", file=sys.stderr)
            continue
        path = table_path(dev.name, "bfloat16", LayerShape(E, k, H, I))
        if out_dir is not None:
            path = out_dir / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = [{"tokens": t, "distinct": d, "config": c.as_dict(), "median_us": us * 1e6}
                   for (t, d), (us, c) in sorted(best.items())]
        path.write_text(json.dumps({"device": dev.name, "date": date.today().isoformat(), "shape": name,
                                    "E": E, "k": k, "H": H, "I": I, "entries": entries}, indent=2) + "\n")
        written.append(path)
        print(f"tuned {name}: {len(best)} (tokens, distinct experts) buckets -> {path}")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--datasheet-gbps", type=float, default=3350.0)
    ap.add_argument("--datasheet-tflops", type=float, default=989.4)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes under the Triton interpreter: checks the script only")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tune", action="store_true", help="time candidate configs and write kernels/tuned/ tables first")
    ap.add_argument("--candidates", type=int, help="try only the first N candidate configs (with --tune)")
    ap.add_argument("--tune-dir", type=Path, help="write tuned tables here instead of kernels/tuned/")
    a = ap.parse_args(argv)
    if a.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA GPU here (use --cpu to check the script at tiny sizes)", file=sys.stderr)
        return 2
    from executor.device import choose, versions
    from executor.timing import median_time_s
    from executor.weights import copies_needed, make_layers
    from kernels import LayerShape, fused_moe, moe_reference, select_config
    from kernels.lynx_routing import lynx_route
    from lynx_sim.config import compose

    dev = choose("cpu" if a.cpu else "cuda")
    d = dev.kind
    reps, warm = (1, 0) if a.cpu else (a.repeats, 5)
    peak_Bps, peak_flops = a.datasheet_gbps * 1e9, a.datasheet_tflops * 1e12
    has_grouped = hasattr(torch, "_grouped_mm")
    if a.tune:
        shapes = {n: ((64, 32, E, k) if a.cpu else (H, I, E, k)) for n, (H, I, E, k) in SHAPES.items()}
        tune(dev, shapes, DECODE[:2] if a.cpu else DECODE, reps, warm, a.candidates, a.tune_dir)
        if a.cpu:
            return 0
    decode_rows, prefill_rows, lynx_rows = [], [], []
    for name, (H, I, E, k) in SHAPES.items():
        if a.cpu:
            H, I = 64, 32
        expert_bytes = 3 * H * I * 2
        copies = 1 if a.cpu else copies_needed(dev.l2_bytes, expert_bytes)
        layers = make_layers(E, H, I, max(max(DECODE), 4), copies, torch.bfloat16, d, 0)
        model = compose([f"model={name}"]).model
        for B in (DECODE[:2] if a.cpu else DECODE):
            ids, w = (t.to(d) for t in trace_ids(name, B))
            distinct = int(torch.unique(ids).numel())
            cfg = select_config(B, distinct, LayerShape(E, k, H, I), "" if a.cpu else dev.name)
            outs = [torch.empty(B, H, dtype=torch.bfloat16, device=d) for _ in layers]
            ours = median_time_s([lambda L=L, o=o, ws={}: fused_moe(L.x[:B], L.w1, L.w2, ids, w, config=cfg, out=o, workspace=ws)
                                  for L, o in zip(layers, outs)], reps, warm, d)
            loop = median_time_s([lambda L=L: moe_reference(L.x[:B], L.w1, L.w2, ids, w, dtype=None) for L in layers],
                                 reps, warm, d, use_graphs=False)
            grouped, grouped_timing = None, None
            if has_grouped:  # CUDA graphs like ours, so launch overhead favours neither; eager if capture fails
                for grouped_timing in ("cuda_graph", "eager"):
                    try:
                        grouped = median_time_s([lambda L=L: grouped_mm_moe(L.x[:B], L.w1, L.w2, ids, w) for L in layers],
                                                reps, warm, d, use_graphs=grouped_timing == "cuda_graph")
                        break
                    except RuntimeError as e:
                        grouped = f"failed: {str(e).splitlines()[0][:120]}"
                grouped_timing = "cpu_check" if a.cpu else grouped_timing
            roof = distinct * expert_bytes / peak_Bps
            decode_rows.append({"shape": name, "batch": B, "distinct": distinct, "block_m": cfg.block_m,
                                "ours_us": ours * 1e6, "torch_loop_us": loop * 1e6,
                                "grouped_mm_us": grouped * 1e6 if isinstance(grouped, float) else grouped,
                                "grouped_mm_timing": grouped_timing,
                                "roofline_us": roof * 1e6, "roofline_fraction": roof / ours,
                                "vs_grouped_mm": grouped / ours if isinstance(grouped, float) else None})
            if B in (16, 64, 256) or a.cpu:  # Lynx routing of one layer against the layer it feeds
                z = torch.randn(1, B, E, device=d) * 2
                renorm = bool(model.moe.get("renormalize", True))
                lt = median_time_s([lambda z=z, buf={}: lynx_route(z, model.lynx.alpha, model.lynx.beta, k, renorm, out=buf)],
                                   reps, warm, d)
                lynx_rows.append({"shape": name, "batch": B, "lynx_us": lt * 1e6, "moe_layer_us": ours * 1e6,
                                  "fraction": lt / ours})
        if not a.cpu:
            for T in PREFILL:
                g = torch.Generator().manual_seed(T)
                ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(d)
                w = torch.rand(T, k, generator=g).to(d)
                x = torch.randn(T, H, device=d).to(torch.bfloat16)
                cfg = select_config(T, E, LayerShape(E, k, H, I), dev.name)
                o = torch.empty(T, H, dtype=torch.bfloat16, device=d)
                t = median_time_s([lambda L0=layers[0]: fused_moe(x, L0.w1, L0.w2, ids, w, config=cfg, out=o, workspace={})],
                                  max(reps // 5, 5), 2, d)
                flops = 2.0 * T * k * 3 * H * I
                prefill_rows.append({"shape": name, "tokens": T, "us": t * 1e6, "tflops": flops / t / 1e12,
                                     "peak_fraction": flops / t / peak_flops})
        ids4, w4 = trace_ids(name, 4)
        ref = moe_reference(layers[0].x[:4].cpu(), layers[0].w1.cpu(), layers[0].w2.cpu(), ids4, w4)
        for label, fn in (("fused_moe", fused_moe), ("torch._grouped_mm", grouped_mm_moe if has_grouped else None)):
            if fn is not None:  # every timed path computes the right layer
                got = fn(layers[0].x[:4], layers[0].w1, layers[0].w2, ids4.to(d), w4.to(d)).double().cpu()
                assert (got - ref).abs().max() <= 3e-2 * ref.abs().max(), f"{name}: {label} disagrees with the reference"
        del layers
    print(f"decode, bf16, {dev.name}: us per MoE layer (median of {reps})")
    print(f"{'shape':<18}{'B':>5}{'distinct':>9}{'ours':>10}{'loop':>10}{'grouped':>10}{'roofline':>10}{'of roof':>9}")
    for r in decode_rows:
        g = r["grouped_mm_us"]
        print(f"{r['shape']:<18}{r['batch']:>5}{r['distinct']:>9}{r['ours_us']:>10.1f}{r['torch_loop_us']:>10.1f}"
              f"{(f'{g:.1f}' if isinstance(g, float) else '-'):>10}{r['roofline_us']:>10.1f}{r['roofline_fraction']:>9.2f}")
    for r in prefill_rows:
        print(f"prefill {r['shape']:<18} T={r['tokens']:>5}: {r['us']:.0f} us, {r['tflops']:.0f} TFLOP/s "
              f"({r['peak_fraction']:.2f} of peak)")
    for r in lynx_rows:
        print(f"lynx routing {r['shape']:<18} B={r['batch']:>4}: {r['lynx_us']:.1f} us = {r['fraction']:.1%} of the MoE layer")
    out = {"benchmark": "kernels", "date": date.today().isoformat(), **versions(dev), "interpreted": a.cpu,
           "datasheet_gbps": a.datasheet_gbps, "datasheet_tflops": a.datasheet_tflops, "repeats": reps,
           "decode": decode_rows, "prefill": prefill_rows, "lynx_routing": lynx_rows}
    safe = "".join(c if c.isalnum() else "_" for c in dev.name).strip("_").lower()
    dst = a.out or ROOT / "benchmarks" / "results" / f"kernels_{'cpu_check' if a.cpu else safe}.json"
    if not a.cpu or a.out:
        dst.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main()
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    sys.exit(rc)
