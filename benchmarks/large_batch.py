"""Large decode batches: peak memory and seconds per simulated step at batch 256, 1024 and 4096.

Qwen3-30B-A3B (48 MoE layers, E = 128, k = 8) on one H100, policy lynx, workload=decode, the
synthetic trace generated on the fly (the default run but for the batch), one CPU thread. Each
batch runs in a fresh process; peak RSS is that process's ru_maxrss, in GB of 1e9 bytes (Python,
torch and numba imports included, about 0.5 GB of it). A slot reads a new block of synth.CHUNK_TOKENS (8) rows
every 8 steps, so seconds per step is averaged over 16 steps after the first (two block cycles;
wall and process CPU time, the second less sensitive to a shared machine's load). The first step
also admits every slot (the generator's AR state over the request's prompt: about 10 ms a
request), reported apart as startup. Targets (large-batch issue): batch 4096 within 2 GB of peak
RSS, batch 1024 under 1 s per simulated step.

Baseline: the replay before streaming (commit c53d9f0, each slot held its whole request), loaded
from git and run in the same way at the batches of --baseline-batches (default 256); both
replays' routing decisions are hashed, so equal digests show the same results. At 1024 and 4096
the issue reported 9.6 GB and 19 s per step, and death at 13.8 GB during admission: not rerun
here (they would crowd a shared machine).

Usage: python benchmarks/large_batch.py [--batches 256,1024,4096] [--steps 16] [--baseline-batches 256]
Prints a table and writes benchmarks/results/large_batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "c53d9f0"  # the last commit whose replay held whole requests
ISSUE = {"1024": {"peak_rss_bytes": 9.6e9, "step_s": 19.0}, "4096": {"died_at_rss_bytes": 13.8e9},
         "source": "large-batch issue (replay before streaming, Qwen3-30B-A3B, policy lynx, workload=decode)"}


def replay_before():
    """ClosedLoopReplay as it was at BEFORE, loaded from git beside the current package."""
    src = subprocess.run(["git", "show", f"{BEFORE}:lynx_sim/engine/replay.py"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    mod = types.ModuleType("lynx_sim.engine.replay_before")
    mod.__package__ = "lynx_sim.engine"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{BEFORE}:lynx_sim/engine/replay.py", "exec"), mod.__dict__)
    return mod.ClosedLoopReplay


def child(batch: int, steps: int, before: bool) -> dict:
    """One timed run in this process (single thread): startup, seconds per step after the first,
    peak RSS, and a SHA-256 of every routing decision (policy and vanilla ids of every step)."""
    import hashlib
    import resource

    import torch

    torch.set_num_threads(1)
    from lynx_sim import run as run_module
    from lynx_sim.config import compose
    from lynx_sim.engine import decode
    from lynx_sim.metrics.decode_recorder import StepRecorder

    if before:
        decode.ClosedLoopReplay = replay_before()  # the decode driver's replay
    stamps, digest, on_step = [], hashlib.sha256(), StepRecorder.on_step

    def timed(self, now, step, B, context, sel, c, base, cb):
        stamps.append((time.perf_counter(), time.process_time()))
        for ids in (sel.ids, base.ids):
            digest.update(ids.contiguous().numpy().astype("<i8").tobytes())
        return on_step(self, now, step, B, context, sel, c, base, cb)

    StepRecorder.on_step = timed
    t0 = time.perf_counter()
    s = run_module.run(compose([f"batch={batch}", f"workload.steps={steps + 1}", "plots=false"]), quiet=True)
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    return {"replay": "before streaming" if before else "streaming", "batch": batch, "steps_timed": steps,
            "startup_s": w0 - t0, "step_s": (w1 - w0) / steps, "step_cpu_s": (c1 - c0) / steps,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "simulated_step_ms": s["step_time_ms"]["policy"], "decisions_sha256": digest.hexdigest()}


def spawn(batch: int, steps: int, before: bool) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(batch), str(steps), str(int(before))],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        return {"replay": "before streaming" if before else "streaming", "batch": batch,
                "error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=16, help="steps timed after the first")
    ap.add_argument("--baseline-batches", default="256", help="batches to run the replay before streaming at ('' none)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(int(a.child[0]), int(a.child[1]), a.child[2] == "1")))
        return 0
    batches = [int(b) for b in a.batches.split(",") if b]
    runs = [spawn(b, a.steps, True) for b in (int(b) for b in a.baseline_batches.split(",") if b)]
    runs += [spawn(b, a.steps, False) for b in batches]
    res = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, Python {platform.python_version()}", "threads": 1,
           "overrides": ["batch=<B>", f"workload.steps={a.steps + 1}", "plots=false"], "runs": runs,
           "targets": {"peak_rss_bytes_at_4096": 2e9, "step_s_at_1024": 1.0}, "issue_before_streaming": ISSUE}
    print(f"{'replay':<18}{'batch':>6}{'startup s':>11}{'s/step':>9}{'cpu s/step':>12}{'peak RSS GB':>13}  decisions")
    for r in runs:
        if "error" in r:
            print(f"{r['replay']:<18}{r['batch']:>6}  failed: {r['error']}")
            continue
        print(f"{r['replay']:<18}{r['batch']:>6}{r['startup_s']:>11.1f}{r['step_s']:>9.3f}{r['step_cpu_s']:>12.3f}"
              f"{r['peak_rss_bytes'] / 1e9:>13.2f}  {r['decisions_sha256'][:12]}")
    print(f"issue, before streaming: batch 1024 {ISSUE['1024']['peak_rss_bytes'] / 1e9:.1f} GB, "
          f"{ISSUE['1024']['step_s']:.0f} s/step; batch 4096 died at {ISSUE['4096']['died_at_rss_bytes'] / 1e9:.1f} GB")
    out = ROOT / "benchmarks" / "results" / "large_batch.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
