"""`run(cfg)`: one simulation from a composed config. The hydra entry point wraps it; tests and
notebooks call it directly (STYLE.md item 8). The run is built from the validated config in one
place (lynx_sim/setup.py, shared with the executor), driven in engine/ (decode.py: the steady
decode batch; serving.py: the serving engine), and its summary composed here. Outputs go to
`out_dir` in one place at the end (lynx_sim/metrics/output.py): `steps.csv`, `requests.csv`
(serving workloads), `trace.json` (Chrome trace, opens in Perfetto), `plots/*.png`,
`config.resolved.yaml`, and `summary.json` last, the mark of a complete run."""

from __future__ import annotations

import time
from pathlib import Path

from .engine.serving import run_serving
from .engine.decode import run_decode
from .metrics.console import print_table
from .metrics.output import write_run
from .setup import prepare


def run(cfg, out_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Simulate the run `cfg` describes; return (and write to `out_dir`) the summary.

    workload=decode: the steady decode batch of B requests (the paper's setting), vanilla priced
    on the same iterations. closed / poisson / trace: the serving engine with prefill, the
    scheduler and the KV cache; vanilla is a second, separate serving run (its batches differ)."""
    t0 = time.perf_counter()
    s = prepare(cfg)
    kind = cfg.workload.kind
    metrics, tables = (run_decode if kind == "decode" else run_serving)(cfg, s, quiet)
    note = cfg.model.moe.get("router_approximation")
    if note:
        s.approximations.append(f"router of {s.model.name}: {note}")
    s.assumptions.extend(s.cost.assumptions())
    if s.policy.overhead_us:
        s.assumptions.append(f"policy overhead {s.policy.overhead_us} us per MoE layer is assumed, not measured")
    hw, parallel = s.hw, s.parallel
    summary = {
        "policy": s.policy.name, "batch": int(cfg.batch), "model": s.model.name, "hardware": hw.name,
        "gpus": parallel.gpus, "expert_parallel": parallel.expert_parallel, "workload": kind,
        "trace": s.source.name, "trace_sha256": s.source.digest.hexdigest(), "seed": int(cfg.seed),
        "policy_params": s.policy.params(),
        "calibration": hw.calibration.describe() if hw.calibration is not None else None,
        **metrics, "memory": s.mem.as_dict(),
        "wall_s": round(time.perf_counter() - t0, 3),
        "exact": not s.approximations,
        "approximations": s.approximations,
        "assumptions": s.assumptions,
    }
    if out_dir is not None:
        write_run(Path(out_dir), cfg, summary, tables, s.model.num_experts)
    if not quiet:
        print_table(summary, out_dir)
    return summary
