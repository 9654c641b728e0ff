"""Calibrate the cost model against NVIDIA AIConfigurator's measured tables (lynx_sim/measured/fit.py).

    python -m lynx_sim.measured fit --gpu h200 [--out benchmarks/results/calibration_h200.json] [--seed 0]
    python -m lynx_sim.measured predict --gpu h200 ROWS.csv|parquet OUT.csv|parquet [--calibration PATH]

`fit` writes the full fit record (benchmarks/results/calibration_<gpu>.json) with predicted-vs-measured
PNGs (benchmarks/results/calibration/ beside it), and the simulator's calibration file
conf/calibration/<gpu>.json (parameters, source, date, held-out errors: lynx_sim/cost/calibration.py),
which `hardware=<gpu>` loads by default; it prints the per-component errors and its wall time; `predict` prices rows given
in a table's schema (MoE, GEMM, decode or prefill attention, all-reduce: lynx_sim/measured/predict.py)
and writes them with a `predicted_ms` column (default calibration:
benchmarks/results/calibration_<gpu>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from ..cost.calibration import CONF_CALIBRATIONS, CalibrationError, CostCalibration, conf_record
from . import fit as F

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _pair(e: dict) -> str:  # a component without rows has None figures
    return "/".join("-" if e[q] is None else f"{e[q]:.3f}" for q in ("median", "p90"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.measured", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the MoE, GEMM, attention and all-reduce terms, write the calibration JSON "
                       "and plots")
    f.add_argument("--gpu", required=True)
    f.add_argument("--out", type=Path, default=None, help="default benchmarks/results/calibration_<gpu>.json")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-loso", action="store_true", help="skip leave-one-shape-out refits")
    f.add_argument("--conf-out", type=Path, default=None,
                   help="the calibration file the simulator loads (default conf/calibration/<gpu>.json)")
    f.add_argument("--no-conf", action="store_true", help="write the report only, not the simulator's calibration file")
    p = sub.add_parser("predict", help="price MoE, GEMM, attention or all-reduce rows in the table schema with a "
                       "calibration")
    p.add_argument("--gpu", required=True)
    p.add_argument("rows", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--calibration", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    return ap


def fit_command(a) -> tuple[dict, Path]:
    """Run the fit, write the JSON and plots, print the summary; returns (record, path written)."""
    out = a.out or RESULTS / f"calibration_{a.gpu}.json"
    t0 = time.perf_counter()
    record = F.run_fit(a.gpu, a.seed, loso=not a.no_loso, plot_dir=out.parent / "calibration")
    F.write_record(record, out)
    if not a.no_conf:
        conf = a.conf_out or CONF_CALIBRATIONS / f"{a.gpu}.json"
        try:
            report = str(out.resolve().relative_to(RESULTS.parents[1]))
        except ValueError:
            report = str(out)
        F.write_record(conf_record(record, report), conf)
        print(f"wrote {conf} (the simulator's calibration for hardware={a.gpu})")
    for name, c in record["components"].items():
        lo = c.get("leave_one_shape_out")
        print(f"{name:12s} uncalibrated {_pair(c['uncalibrated'])}  held-out {_pair(c['heldout'])}"
              + (f"  leave-one-shape-out {_pair(lo)}" if lo else "")
              + f"  (median/p90 of |pred/meas - 1|, n={c['heldout']['n']})")
    print(json.dumps(record["params"]))
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return record, out


def predict_command(a) -> int:
    cal = a.calibration or RESULTS / f"calibration_{a.gpu}.json"
    try:  # a fit record or a conf/calibration file; every parameter checked by name before pricing
        record = json.loads(cal.read_text())
        CostCalibration.from_dict(conf_record(record), str(cal))
    except (OSError, ValueError) as e:
        print(f"--calibration: {cal}: {e}" if not isinstance(e, CalibrationError) else f"--calibration: {e}",
              file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as e:
        print(f"--calibration: {cal}: expected a calibration record with gpu, date, source and params, "
              f"found none of {e}", file=sys.stderr)
        return 2
    if record["gpu"] != a.gpu:
        print(f"--calibration: expected a calibration of {a.gpu}, found one of {record['gpu']} ({cal})",
              file=sys.stderr)
        return 2
    try:
        out = F.predict(_read(a.rows), record, a.seed)
    except ValueError as e:
        print(f"{a.rows}: {e}", file=sys.stderr)
        return 2
    a.out.parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(a.out, index=False) if a.out.suffix == ".parquet" else out.to_csv(a.out, index=False)
    print(f"wrote {a.out}: {int(out.predicted_ms.notna().sum())} of {len(out)} rows priced")
    return 0


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.cmd == "fit":
        fit_command(a)
        return 0
    return predict_command(a)


if __name__ == "__main__":
    sys.exit(main())
