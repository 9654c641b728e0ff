"""Traces larger than memory: open, read and verify with flat memory.

Two measurements, each in a fresh process (peak RSS = the child's VmHWM: ru_maxrss would keep the
parent's high-water mark across fork and exec):
1. A sparse 64 GiB trace (valid header, token columns and ids; its float16 logits a hole of the
   file system) opened with verify=False under an address-space limit of the process's size +
   4 GiB (so no memory map of the file can exist), reading its last row. Baseline in the same
   run: safetensors' `safe_open`, which the reader used before, on the same file and limit.
2. A dense trace of --dense-mb MB (random logits) opened with full verification (every tensor's
   SHA-256 and the data checks, streamed in blocks): seconds, GB/s and peak RSS against the file
   size. Baseline in the same run: the same open with verify=False.

Usage: python benchmarks/large_trace.py [--dense-mb 512]
Prints a table and writes benchmarks/results/large_trace.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
from pathlib import Path
path, mode, limit_extra = sys.argv[1], sys.argv[2], int(sys.argv[3])
if limit_extra:
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + limit_extra, vm + limit_extra))
t0 = time.perf_counter()
out = {}
try:
    if mode == "safe_open":
        from safetensors import safe_open
        f = safe_open(path, framework="pt")
        f.get_slice("logits")[-1:]
    else:
        from lynx_sim.traces.reader import Trace
        t = Trace(path, verify=(mode == "verify"))
        t.read("logits", t.num_tokens - 1, t.num_tokens)
    out["ok"] = True
except Exception as e:
    out["ok"], out["error"] = False, f"{type(e).__name__}: {e}"[:200]
out["seconds"] = time.perf_counter() - t0
out["peak_rss_bytes"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps(out))
"""


def child(path: Path, mode: str, limit_extra: int = 0) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(limit_extra)], cwd=ROOT,
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        return {"ok": False, "error": p.stderr[-300:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def sparse_trace(path: Path) -> int:
    """A 64 GiB trace whose logits are a hole: returns its apparent size in bytes."""
    from lynx_sim.traces import TraceMeta
    from lynx_sim.traces.writer import file_header

    N, L, E, k = 16384, 64, 32767, 2
    meta = TraceMeta(model="huge", num_experts=E, top_k=k, moe_layers=tuple(range(L)))
    small = {"request_id": np.zeros(N, np.int32), "position": np.arange(N, dtype=np.int32),
             "phase": np.r_[0, np.ones(N - 1)].astype(np.int8),
             "ids": np.broadcast_to(np.arange(k, dtype=np.int16), (N, L, k)).copy()}
    layout = [(n, {"int32": "I32", "int8": "I8", "int16": "I16"}[str(v.dtype)], v.shape, v.nbytes,
               hashlib.sha256(v.tobytes()).hexdigest()) for n, v in small.items()]
    layout.append(("logits", "F16", (N, L, E), N * L * E * 2, "0" * 64))  # unverified: verify=False trusts it
    with open(path, "wb") as f:
        f.write(file_header(meta, layout))
        for v in small.values():
            f.write(v.tobytes())
        size = f.tell() + N * L * E * 2
    os.truncate(path, size)
    return size


def dense_trace(path: Path, megabytes: int) -> int:
    """A valid trace of about `megabytes` MB of float16 logits (Qwen3-30B-A3B's shape)."""
    from lynx_sim.traces import TraceMeta, TraceWriter
    from lynx_sim.traces.arrays import TraceArrays

    L, E, k, rows = 48, 128, 8, 512
    meta = TraceMeta(model="dense", num_experts=E, top_k=k, moe_layers=tuple(range(L)))
    rng = np.random.default_rng(0)
    parts = max(1, megabytes * 2 ** 20 // (rows * L * E * 2))
    with TraceWriter(path, meta, float_dtype="float16") as w:
        for r in range(parts):
            z = rng.standard_normal((rows, L, E)).astype(np.float16).astype(np.float32)
            ids = np.argsort(-z, axis=-1, kind="stable")[..., :k]
            w.append(TraceArrays(meta=meta, request_id=np.full(rows, r, np.int32), position=np.arange(rows, dtype=np.int32),
                                 phase=np.r_[0, np.ones(rows - 1)].astype(np.int8), ids=ids, logits=z))
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dense-mb", type=int, default=512)
    a = ap.parse_args()
    out = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "python": platform.python_version()}
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        huge = Path(tmp) / "huge.safetensors"
        size = sparse_trace(huge)
        out["sparse"] = {"apparent_bytes": size, "reader_verify_false": child(huge, "open", 4 << 30),
                         "safe_open_baseline": child(huge, "safe_open", 4 << 30)}
        huge.unlink()
        dense = Path(tmp) / "dense.safetensors"
        dsize = dense_trace(dense, a.dense_mb)
        v, nv = child(dense, "verify"), child(dense, "open")
        v["gb_per_s"] = dsize / v["seconds"] / 1e9 if v.get("ok") else None
        out["dense"] = {"bytes": dsize, "verify": v, "no_verify_baseline": nv}
    (ROOT / "benchmarks" / "results" / "large_trace.json").write_text(json.dumps(out, indent=1) + "\n")
    s, d = out["sparse"], out["dense"]
    print(f"{'case':<44} {'ok':>4} {'seconds':>8} {'peak RSS MB':>12}")
    for name, r in (("64 GiB sparse, reader verify=False", s["reader_verify_false"]),
                    ("64 GiB sparse, safe_open (baseline)", s["safe_open_baseline"]),
                    (f"{dsize / 1e6:.0f} MB dense, reader verify=True", d["verify"]),
                    (f"{dsize / 1e6:.0f} MB dense, reader verify=False (baseline)", d["no_verify_baseline"])):
        print(f"{name:<44} {str(r.get('ok')):>4} {r.get('seconds', float('nan')):8.2f} "
              f"{r.get('peak_rss_bytes', 0) / 1e6:12.0f}  {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main()
