"""Calibrate the cost model against NVIDIA AIConfigurator's measured tables (lynx_sim/measured/fit.py).

    python -m lynx_sim.measured fit --gpu h200 [--out benchmarks/results/calibration_h200.json] [--seed 0]
    python -m lynx_sim.measured predict --gpu h200 ROWS.csv|parquet OUT.csv|parquet [--calibration PATH]

`fit` writes the calibration JSON and predicted-vs-measured PNGs (benchmarks/results/calibration/
beside the JSON); `predict` prices rows given in the table schema and writes them with a
`predicted_ms` column (MoE and GEMM rows; default calibration: benchmarks/results/calibration_<gpu>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from . import fit as F

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.measured", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the MoE, GEMM, attention and all-reduce terms, write the calibration JSON and plots")
    f.add_argument("--gpu", required=True)
    f.add_argument("--out", type=Path, default=None, help="default benchmarks/results/calibration_<gpu>.json")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-loso", action="store_true", help="skip leave-one-shape-out refits")
    p = sub.add_parser("predict", help="price MoE or GEMM rows in the table schema with a calibration (not attention or all-reduce yet)")
    p.add_argument("--gpu", required=True)
    p.add_argument("rows", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calibration", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "fit":
        out = a.out or RESULTS / f"calibration_{a.gpu}.json"
        record = F.run_fit(a.gpu, a.seed, loso=not a.no_loso, plot_dir=out.parent / "calibration")
        F.write_record(record, out)
        def pair(e: dict) -> str:  # a component without rows has None figures
            return "/".join("-" if e[q] is None else f"{e[q]:.3f}" for q in ("median", "p90"))

        for name, c in record["components"].items():
            lo = c.get("leave_one_shape_out")
            print(f"{name:12s} uncalibrated {pair(c['uncalibrated'])}  held-out {pair(c['heldout'])}"
                  + (f"  leave-one-shape-out {pair(lo)}" if lo else "")
                  + f"  (median/p90 of |pred/meas - 1|, n={c['heldout']['n']})")
        print(json.dumps(record["params"]))
        print(f"wrote {out}")
        return 0
    cal = a.calibration or RESULTS / f"calibration_{a.gpu}.json"
    record = json.loads(cal.read_text())
    if record["gpu"] != a.gpu:
        print(f"--calibration: expected a calibration of {a.gpu}, found one of {record['gpu']} ({cal})",
              file=sys.stderr)
        return 2
    out = F.predict(_read(a.rows), record, a.seed)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(a.out, index=False) if a.out.suffix == ".parquet" else out.to_csv(a.out, index=False)
    print(f"wrote {a.out}: {int(out.predicted_ms.notna().sum())} of {len(out)} rows priced")
    return 0


if __name__ == "__main__":
    sys.exit(main())
