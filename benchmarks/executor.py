"""Measured MoE-layer speedup of each policy over vanilla, through the executor on a GPU.

For each model shape and decode batch size, `python -m executor`'s run (executor/run.py) with
each policy: the same trace steps through the Triton kernels under the policy's and vanilla's
routing, timed in the same run; the ratio of their summed layer times is the measured speedup,
printed beside the simulator's prediction for the same layers. Mixtral replays its reference
trace (../shared/traces, converted on the fly; when absent, the synthetic one, said so); Qwen3
and DeepSeek-V2-Lite replay their synthetic traces (the reference DeepSeek trace is prefill only).
Needs a CUDA GPU (exits 2 without one); `--cpu` checks the script at tiny sizes (measures nothing).

Usage: python benchmarks/executor.py [--batches 1,16,64] [--policies lynx,static_k,batch_budget]
       [--steps 4] [--layers 4] [--cpu]
Prints a table and writes benchmarks/results/executor_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)  # this file is named like the executor package it drives: import that one
MODELS = ("mixtral_8x7b", "qwen3_30b_a3b", "deepseek_v2_lite")
MIXTRAL_REF = ROOT.parent / "shared" / "traces" / "mixtral8x7b_instruct_fp8_vllm_decode_humaneval_gsm8k.npz"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--policies", default="lynx,static_k,batch_budget")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes under the Triton interpreter: checks the script only")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("benchmarks/executor.py: no CUDA GPU here (use --cpu to check the script at tiny sizes)", file=sys.stderr)
        return 2
    from executor.run import run
    from lynx_sim.config import compose
    from lynx_sim.traces.convert import convert

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        traces = {}
        if "mixtral_8x7b" in a.models and MIXTRAL_REF.is_file():
            traces["mixtral_8x7b"] = ["trace=file", f"trace.path={convert(MIXTRAL_REF, Path(tmp) / 'mix.safetensors')}",
                                      "approximate_missing=lowest_bin"]  # ids and weights only: stand-in logits
            notes.append("Mixtral's reference trace has no router logits: logit-reading policies use the documented "
                         "stand-in (approximate_missing=lowest_bin)")
        elif "mixtral_8x7b" in a.models:
            notes.append(f"{MIXTRAL_REF} absent: Mixtral replays its synthetic trace")
        for model in a.models.split(","):
            for B in (int(b) for b in a.batches.split(",")):
                for pol in a.policies.split(","):
                    over = [f"model={model}", f"batch={B}", f"policy={pol}", f"executor.steps={a.steps}",
                            f"executor.layers={a.layers}", f"executor.repeats={a.repeats}", *traces.get(model, [])]
                    if a.cpu:
                        over.append("executor.device=cpu")
                    s = run(compose(over, config_name="executor"), Path(tmp) / f"{model}_{B}_{pol}")
                    rows.append({"model": model, "batch": B, "policy": pol, "trace": "reference" if model in traces else "synthetic",
                                 "measured_speedup": s["measured_moe_speedup"], "predicted_speedup": s["predicted_moe_speedup"],
                                 "moe_layer_us": s["moe_layer_us"], "distinct_experts": s["distinct_experts"],
                                 "policy_us_per_layer": s["policy_us_per_layer"],
                                 "policy_share_of_moe_layer": s["policy_share_of_moe_layer"],
                                 "simulator_error": s["simulator_error"], "device": s["device"]})
    print(f"{'model':<18}{'B':>5}{'policy':>14}{'measured':>10}{'predicted':>10}{'distinct':>14}{'policy us':>11}")
    for r in rows:
        dist = f"{r['distinct_experts']['policy']:.1f}/{r['distinct_experts']['vanilla']:.1f}"
        pu = r["policy_us_per_layer"]
        print(f"{r['model']:<18}{r['batch']:>5}{r['policy']:>14}{r['measured_speedup']:>10.3f}{r['predicted_speedup']:>10.3f}"
              f"{dist:>14}{(f'{pu:.1f}' if pu is not None else '-'):>11}")
    for n in notes:
        print("note:", n)
    device = rows[0]["device"]["device"] if rows else "none"
    out = {"benchmark": "executor", "date": date.today().isoformat(), "interpreted": a.cpu, "notes": notes, "rows": rows}
    safe = "".join(c if c.isalnum() else "_" for c in device).strip("_").lower()
    dst = a.out or ROOT / "benchmarks" / "results" / f"executor_{safe}.json"
    if not a.cpu or a.out:
        dst.write_text(json.dumps(out, indent=2, default=float) + "\n")
        print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
