"""The iterations as a Chrome trace (JSON Trace Event Format), which Perfetto and chrome://tracing open.

One process per serving node; thread 1 holds one complete event ("X") per iteration named by its
make-up (decode B=64, or mixed with prefill tokens), thread 2 the same span cut into the cost
model's parts in order (attention, dense FFN, MoE, LM head, step overhead), and a counter track
the running requests and KV-cache use. Times are simulated microseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

PARTS = (("attention", "attention_time_ms"), ("dense FFN", "dense_ffn_time_ms"), ("MoE", "moe_time_ms"),
         ("LM head", "lm_head_time_ms"), ("step overhead", "overhead_time_ms"))


def events(steps: pd.DataFrame) -> list[dict]:
    nodes = {n: i + 1 for i, n in enumerate(dict.fromkeys(steps["node"]))}
    out = []
    for n, pid in nodes.items():
        out.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{n} node"}})
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 1, "args": {"name": "iterations"}})
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 2, "args": {"name": "cost parts"}})
    for r in steps.itertuples(index=False):
        pid, ts = nodes[r.node], r.start_ms * 1e3
        kind = f"decode B={r.decode_tokens}" if r.prefill_tokens == 0 else \
            f"mixed: {r.decode_tokens} decode + {r.prefill_tokens} prefill tokens"
        args = {"step": int(r.step), "policy_acted": bool(r.policy_acted), "distinct_experts": round(r.distinct_experts, 2),
                "bandwidth_utilisation": round(r.bandwidth_utilisation, 3)}
        out.append({"name": kind, "cat": "iteration", "ph": "X", "pid": pid, "tid": 1, "ts": ts,
                    "dur": r.step_time_ms * 1e3, "args": args})
        for name, col in PARTS:
            d = getattr(r, col) * 1e3
            if d > 0:
                out.append({"name": name, "cat": "cost", "ph": "X", "pid": pid, "tid": 2, "ts": ts, "dur": d})
                ts += d
        out.append({"name": "load", "ph": "C", "pid": pid, "ts": r.start_ms * 1e3,
                    "args": {"running": int(r.running), "kv_used_pct": round(100 * r.kv_used, 2)}})
    return out


def write(steps: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events(steps), "displayTimeUnit": "ms"}))
    return path
