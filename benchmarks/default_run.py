"""Time the default run (`python -m lynx_sim policy=lynx batch=64`) as a new user meets it: a
fresh process each time, imports included. Baseline measured in the same run: the same command
with policy=vanilla. Prints a table and writes benchmarks/results/default_run.json.

Usage: python benchmarks/default_run.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_run(args: list[str]) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lynx_sim", *args, f"hydra.run.dir={tmp}"], cwd=ROOT, check=True,
                       capture_output=True)
        wall = time.perf_counter() - t0
        return wall, json.loads((Path(tmp) / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for name, args in (("lynx (default)", ["policy=lynx", "batch=64"]), ("vanilla (baseline)", ["policy=vanilla", "batch=64"])):
        walls, inner = [], []
        for _ in range(a.repeats):
            wall, s = time_run(args)
            walls.append(wall)
            inner.append(s["wall_s"])
        rows.append({"run": name, "args": args, "steps": s["steps"], "wall_s_median": statistics.median(walls),
                     "wall_s_max": max(walls), "in_process_s_median": statistics.median(inner),
                     "speedup_modelled": s["speedup"]})
    base = rows[1]["wall_s_median"]
    for r in rows:
        r["wall_vs_baseline"] = r["wall_s_median"] / base
    print(f"{'run':<20}{'steps':>6}{'wall s (median)':>17}{'wall s (max)':>14}{'in-process s':>14}{'vs vanilla':>12}")
    for r in rows:
        print(f"{r['run']:<20}{r['steps']:>6}{r['wall_s_median']:>17.2f}{r['wall_s_max']:>14.2f}"
              f"{r['in_process_s_median']:>14.2f}{r['wall_vs_baseline']:>12.2f}")
    out = {"benchmark": "default_run", "date": date.today().isoformat(), "machine": platform.node(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "budget_s": 30, "rows": rows}
    dst = ROOT / "benchmarks" / "results" / "default_run.json"
    dst.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dst.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
