"""Measure a GPU's two ceilings that the roofline uses: HBM bandwidth and bf16 matrix rate.

Needs a CUDA GPU (exits 2 without one). Measures, with CUDA events, median of many repeats after
warm-up, on random data (never zeros), with inputs rotated so L2 cannot hold them:
- device-to-device copy of 1-4 GiB buffers, counting bytes read plus bytes written;
- a large square bf16 matrix product (8192^3 by default), 2*M*N*K FLOP;
- decode-shaped bf16 products x[M, K] @ W[K, N] with M = 1..256 rows against a weight of
  K x N = 4096 x 14336 (Mixtral's w1), rotated over enough weights to exceed L2: the bandwidth
  an expert GEMM at decode sizes reaches while streaming its weights once.
The ratios measured/datasheet are what `conf/hardware/<gpu>.yaml` records as measured factors.

Usage: python benchmarks/hardware_probe.py [--out results.json] [--datasheet-gbps 3350 --datasheet-tflops 989.4]
Prints a table and writes the JSON (default benchmarks/results/hardware_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch


def _events_median_ms(fn, repeats: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(gib: float, repeats: int) -> dict:
    n = int(gib * 2**30) // 2
    srcs = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    dst = torch.empty_like(srcs[0])
    i = [0]

    def f():
        dst.copy_(srcs[i[0] % 2])
        i[0] += 1

    ms = _events_median_ms(f, repeats)
    moved = 2 * n * 2  # bytes read + bytes written
    assert torch.equal(dst, srcs[(i[0] - 1) % 2])
    return {"gib": gib, "ms": ms, "gbps": moved / ms / 1e6}


def square_gemm(n: int, repeats: int) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    bs = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def f():
        torch.matmul(a, bs[i[0] % 2], out=out)
        i[0] += 1

    ms = _events_median_ms(f, repeats)
    ref = (a[:64].double() @ bs[(i[0] - 1) % 2].double()[:, :64])
    err = float((out[:64, :64].double() - ref).norm() / ref.norm())
    assert err < 1e-2, f"bf16 GEMM relative error {err}"
    return {"n": n, "ms": ms, "tflops": 2 * n**3 / ms / 1e9, "rel_err_vs_fp64": err}


def decode_gemm(m: int, k: int, n: int, repeats: int, l2_bytes: int) -> dict:
    w_bytes = k * n * 2
    copies = max(2, -(-4 * l2_bytes // w_bytes))  # rotate over >= 4x L2 of weights
    ws = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    i = [0]

    def f():
        torch.matmul(x, ws[i[0] % copies], out=out)
        i[0] += 1

    ms = _events_median_ms(f, repeats)
    moved = w_bytes + (m * k + m * n) * 2
    return {"m": m, "k": k, "n": n, "ms": ms, "gbps": moved / ms / 1e6, "tflops": 2 * m * k * n / ms / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--datasheet-gbps", type=float, required=True, help="HBM bandwidth on the datasheet, GB/s")
    ap.add_argument("--datasheet-tflops", type=float, required=True, help="dense bf16 on the datasheet, TFLOP/s")
    ap.add_argument("--gemm-n", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("hardware_probe: no CUDA GPU visible; nothing measured", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        driver = "unknown"
    import triton

    copies = [copy_bandwidth(g, a.repeats) for g in (1.0, 4.0)]  # buffers freed on return
    gemm = square_gemm(a.gemm_n, a.repeats)
    decode = [decode_gemm(m, 4096, 14336, a.repeats, l2) for m in (1, 16, 64, 256)]
    best_copy = max(c["gbps"] for c in copies)
    res = {
        "date": date.today().isoformat(), "device": torch.cuda.get_device_name(0), "driver": driver,
        "multiprocessors": props.multi_processor_count, "l2_bytes": l2, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "repeats": a.repeats,
        "timing": "CUDA events, median after 5 warm-ups, random bf16 data, inputs rotated past L2",
        "datasheet": {"hbm_gbps": a.datasheet_gbps, "bf16_tflops": a.datasheet_tflops},
        "copy": copies, "square_gemm": gemm, "decode_gemm": decode,
        "factors": {"bandwidth_efficiency": round(best_copy / a.datasheet_gbps, 3),
                    "flops_efficiency": round(gemm["tflops"] / a.datasheet_tflops, 3),
                    "decode_gemm_bandwidth_efficiency": {str(d["m"]): round(d["gbps"] / a.datasheet_gbps, 3) for d in decode}},
    }
    print(f"{res['device']}  driver {driver}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"{'measure':<34}{'ms':>10}{'GB/s':>10}{'TFLOP/s':>10}{'vs datasheet':>14}")
    for c in copies:
        print(f"{'copy ' + str(c['gib']) + ' GiB (read+write)':<34}{c['ms']:>10.3f}{c['gbps']:>10.0f}{'':>10}{c['gbps'] / a.datasheet_gbps:>14.3f}")
    print(f"{'bf16 GEMM ' + str(a.gemm_n) + '^3':<34}{gemm['ms']:>10.3f}{'':>10}{gemm['tflops']:>10.1f}{gemm['tflops'] / a.datasheet_tflops:>14.3f}")
    for d in decode:
        print(f"{'bf16 [%d,4096]x[4096,14336]' % d['m']:<34}{d['ms']:>10.4f}{d['gbps']:>10.0f}{d['tflops']:>10.1f}{d['gbps'] / a.datasheet_gbps:>14.3f}")
    out = a.out or Path(__file__).resolve().parent / "results" / f"hardware_{res['device'].replace(' ', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
