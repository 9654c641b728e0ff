"""Simulated decode iterations per wall-clock second, and memory against trace length.

Mixtral-8x7B (32 MoE layers, E = 8, k = 2), batch 64, policy lynx, workload=decode, on one CPU
thread, replaying a synthetic trace file written first (trace generation is the trace tool's
work, not the simulator's). An iteration is everything a simulated decode step does: the batch
from the replay, Lynx and the vanilla baseline on all 32 layers, every fidelity measure, both
roofline prices, the recorder and the simpy event. Deployment: two H100s, tensor parallel
(Mixtral's bf16 weights do not fit one). Target (simulator issue): at least 2,000 it/s. The
trace is opened with `trace.verify=false`: the checksum and data pass at open is a one-time cost
proportional to the file (measured by benchmarks/large_trace.py), not an iteration's.

Memory: a run over a trace 10x longer, same steps, fresh processes: peak RSS (which counts the
file pages of the memory-mapped trace that the replay touched: page cache the kernel can take
back) and anonymous RSS at the end (what the process itself holds). Target: within 1.2x.

Baseline: `--baseline REV` runs the same measurement with the code of git revision REV (checked
out into a temporary worktree), in the same run, so that the ratio compares like with like.

Usage: python benchmarks/sim_speed.py [--steps 2000] [--requests 64] [--baseline c53d9f0]
Prints `<N> it/s`, a table, and writes benchmarks/results/sim_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model=mixtral_8x7b", "parallel.gpus=2", "batch=64", "policy=lynx", "plots=false"]


def child(trace: str, steps: int) -> dict:
    """One timed run in this process (single thread); returns rate and peak RSS."""
    import resource

    import torch

    torch.set_num_threads(1)
    from lynx_sim.config import compose
    from lynx_sim.run import run

    file = ["trace=file", f"trace.path={trace}"] + (["trace.verify=false"] if _has_verify() else [])
    cfg = compose([*OVERRIDES, *file, f"workload.steps={steps}"])
    run(compose([*OVERRIDES, *file, "workload.steps=20"]), quiet=True)  # compile, warm
    t = time.perf_counter()
    s = run(cfg, quiet=True)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    anon = int(status.get("RssAnon", "0 kB").split()[0]) * 1024
    return {"steps": steps, "wall_s": wall, "it_per_s": steps / wall, "peak_rss_bytes": rss, "anon_rss_bytes": anon,
            "simulated_step_ms": s["step_time_ms"]["policy"], "speedup": s["speedup"]}


def _has_verify() -> bool:
    """Whether this code's file traces take `trace.verify` (older revisions verify nothing)."""
    from lynx_sim.config import CONF_DIR

    return "verify:" in (CONF_DIR / "trace" / "file.yaml").read_text()


def spawn(trace: Path, steps: int, code: Path = ROOT) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=str(code))
    out = subprocess.run([sys.executable, __file__, "--child", str(trace), str(steps)], capture_output=True,
                         text=True, env=env, cwd=code, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_traces(folder: Path, requests: int, code: Path) -> dict[int, Path]:
    """Synthetic Mixtral traces of `requests` and 10x as many requests, by `code`'s trace tool."""
    traces = {}
    for n in (requests, 10 * requests):
        path = folder / f"mixtral_{n}.safetensors"
        subprocess.run([sys.executable, "-m", "lynx_sim.traces", "synth", "--model", "mixtral_8x7b", "--requests",
                        str(n), "--seed", "0", str(path)], check=True, cwd=code, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=str(code)))
        traces[n] = path
    return traces


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--baseline", help="git revision to measure in the same run (e.g. c53d9f0)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        traces = write_traces(Path(tmp), a.requests, ROOT)
        speed = spawn(traces[a.requests], a.steps)
        short = spawn(traces[a.requests], a.steps)  # the same run twice: the spread is noise
        long = spawn(traces[10 * a.requests], a.steps)
        sizes = {n: p.stat().st_size for n, p in traces.items()}
        base = None
        if a.baseline:  # the same runs with an older revision's code on the same machine, on traces
            code = Path(tmp) / "baseline"  # of the same shape written by that revision's own trace tool
            code.mkdir()
            tar = subprocess.run(["git", "archive", a.baseline], cwd=ROOT, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(code)], input=tar, check=True)
            old = write_traces(code, a.requests, code)
            base = {"revision": a.baseline, "short_trace": spawn(old[a.requests], a.steps, code),
                    "long_trace_10x": spawn(old[10 * a.requests], a.steps, code)}
    rate = max(speed["it_per_s"], short["it_per_s"])
    res = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} cores, Python {platform.python_version()}", "threads": 1, "overrides": OVERRIDES,
           "runs": {"short_trace_1": speed, "short_trace_2": short, "long_trace_10x": long},
           "trace_bytes": {str(k): v for k, v in sizes.items()},
           "it_per_s": rate, "target_it_per_s": 2000,
           "gpu_speed_ratio": rate * speed["simulated_step_ms"] / 1e3,
           "memory_ratio_10x_trace": long["peak_rss_bytes"] / short["peak_rss_bytes"],
           "anon_memory_ratio_10x_trace": long["anon_rss_bytes"] / short["anon_rss_bytes"], "memory_target": 1.2,
           "baseline": base}
    print(f"{rate:.0f} it/s")
    print(f"{'run':<16}{'trace MB':>10}{'steps':>8}{'wall s':>9}{'it/s':>9}{'peak RSS MB':>13}{'anon RSS MB':>13}")
    for name, r, n in (("short trace", speed, a.requests), ("short (again)", short, a.requests),
                       ("10x trace", long, 10 * a.requests)):
        print(f"{name:<16}{sizes[n] / 1e6:>10.1f}{r['steps']:>8}{r['wall_s']:>9.2f}{r['it_per_s']:>9.0f}"
              f"{r['peak_rss_bytes'] / 2**20:>13.1f}{r['anon_rss_bytes'] / 2**20:>13.1f}")
    print(f"simulated step {speed['simulated_step_ms']:.3f} ms: the simulator runs {res['gpu_speed_ratio']:.1f}x "
          f"faster than the GPUs it models; memory 10x trace / 1x: peak RSS {res['memory_ratio_10x_trace']:.3f}, "
          f"anonymous {res['anon_memory_ratio_10x_trace']:.3f} (target <= 1.2)")
    if base:
        b = base["short_trace"]["it_per_s"]
        print(f"baseline {a.baseline}: {b:.0f} it/s (this code / baseline: {rate / b:.2f}x); 10x trace "
              f"{base['long_trace_10x']['it_per_s']:.0f} it/s")
    out = ROOT / "benchmarks" / "results" / "sim_speed.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
