"""Serving metrics: per-iteration and per-request tables, and their summary (docs/metrics.md).

TTFT: arrival to first output token. TPOT: (last token - first token) / (output - 1), per
request with at least two output tokens. E2E: arrival to last token. Throughput: output tokens
of finished requests over the span from the first arrival to the last finish. Goodput: the same
counting only requests that met the SLO (`slo.tpot_ms`, and `slo.ttft_ms` when set).
Memory-bandwidth utilisation: HBM bytes read over what the datasheet bandwidth moves in the
same time; MoE share: MoE time over step time; both summed over iterations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..policies.base import Selection
from .decode_recorder import _finite_or_none

STEP_MEASURES = ("distinct_experts", "top1_retention", "gate_mass_retained", "slots_changed", "experts_per_token")


def percentiles(x) -> dict:
    """p50, mean, p99 of a sample (nulls when empty)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"p50": None, "mean": None, "p99": None}
    return {"p50": float(np.percentile(x, 50)), "mean": float(x.mean()), "p99": float(np.percentile(x, 99))}


class ServingRecorder:
    def __init__(self, num_layers: int, peak_Bps: float):
        self.steps: list[dict] = []
        self.requests: list[dict] = []
        self.peak_Bps = peak_Bps
        self.layer_distinct = np.zeros(num_layers)  # summed over decode-only iterations
        self.decode_only_steps = 0
        self.rejected = 0

    def on_step(self, node: str, start_s: float, cost, sel: Selection, decode_tokens: int, prefill_tokens: int,
                seqs: int, running: int, waiting: int, kv_used: float, preemptions: int) -> None:
        f = sel.fidelity
        row = {"step": len(self.steps), "node": node, "start_ms": start_s * 1e3, "step_time_ms": cost.total_s * 1e3,
               "decode_tokens": decode_tokens, "prefill_tokens": prefill_tokens, "seqs": seqs, "running": running,
               "waiting": waiting, "kv_used": kv_used, "preemptions": preemptions, "policy_acted": sel.acted,
               "attention_time_ms": cost.attention_s * 1e3, "dense_ffn_time_ms": cost.dense_ffn_s * 1e3,
               "moe_time_ms": cost.moe_s * 1e3, "lm_head_time_ms": cost.lm_head_s * 1e3,
               "overhead_time_ms": cost.overhead_s * 1e3, "comm_time_ms": cost.comm_s * 1e3,
               "policy_overhead_ms": cost.policy_s * 1e3, "hbm_bytes": cost.hbm_bytes,
               "bandwidth_utilisation": cost.bandwidth_utilisation(self.peak_Bps)}
        for m in STEP_MEASURES:
            row[m] = float(getattr(f, m).double().mean())
        if prefill_tokens == 0:
            self.layer_distinct += f.distinct_experts.double().numpy()
            self.decode_only_steps += 1
        self.steps.append(row)

    def on_finish(self, req) -> None:
        ttft = req.first_token_s - req.arrival_s
        tpot = (req.finish_s - req.first_token_s) / (req.output - 1) if req.output > 1 else np.nan
        self.requests.append({"request": req.rid, "trace_request": req.trace_request, "arrival_ms": req.arrival_s * 1e3,
                              "first_token_ms": req.first_token_s * 1e3, "finish_ms": req.finish_s * 1e3,
                              "prompt_tokens": req.prompt, "output_tokens": req.output, "preemptions": req.preemptions,
                              "ttft_ms": ttft * 1e3, "tpot_ms": tpot * 1e3, "e2e_ms": (req.finish_s - req.arrival_s) * 1e3})

    def step_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.steps)

    def request_table(self) -> pd.DataFrame:
        cols = ["request", "trace_request", "arrival_ms", "first_token_ms", "finish_ms", "prompt_tokens",
                "output_tokens", "preemptions", "ttft_ms", "tpot_ms", "e2e_ms"]
        return pd.DataFrame(self.requests, columns=cols)

    def summary(self, slo_tpot_ms: float | None, slo_ttft_ms: float | None = None) -> dict:
        for key, v in (("slo.tpot_ms", slo_tpot_ms), ("slo.ttft_ms", slo_ttft_ms)):
            if v is not None and not (np.isfinite(v) and v > 0):  # a NaN SLO would pass every request
                raise ValueError(f"{key}: expected a finite number > 0 or null, found {v!r}")
        s, r = self.step_table(), self.request_table()
        if r.empty:
            raise ValueError("no request finished: nothing to measure (check workload.num_requests and the KV capacity)")
        span_s = (r.finish_ms.max() - r.arrival_ms.min()) / 1e3
        good = np.ones(len(r), dtype=bool)
        if slo_tpot_ms is not None:
            good &= ~(r.tpot_ms > slo_tpot_ms).to_numpy()  # single-token requests have no TPOT: they pass
        if slo_ttft_ms is not None:
            good &= (r.ttft_ms <= slo_ttft_ms).to_numpy()
        decode = s[s.prefill_tokens == 0]
        n_dec = max(self.decode_only_steps, 1)
        return {
            "requests": int(len(r)), "requests_rejected": int(self.rejected), "iterations": int(len(s)),
            "duration_s": float(span_s),
            "ttft_ms": percentiles(r.ttft_ms), "tpot_ms": percentiles(r.tpot_ms), "e2e_ms": percentiles(r.e2e_ms),
            "throughput_tok_s": float(r.output_tokens.sum() / span_s),
            "goodput_tok_s": float(r.output_tokens[good].sum() / span_s),
            "slo": {"tpot_ms": slo_tpot_ms, "ttft_ms": slo_ttft_ms}, "slo_attainment": float(good.mean()),
            "step_time_ms_mean": float(s.step_time_ms.mean()),
            "moe_share": float(s.moe_time_ms.sum() / s.step_time_ms.sum()),
            "bandwidth_utilisation": float(s.hbm_bytes.sum() / (s.step_time_ms.sum() / 1e3 * self.peak_Bps)),
            "decode_only_fraction": float(len(decode) / len(s)), "policy_acted_fraction": float(s.policy_acted.mean()),
            "mean_running": float(s.seqs.mean()), "preemptions": int(r.preemptions.sum()),
            "distinct_experts_decode": _finite_or_none(decode.distinct_experts.mean()) if len(decode) else None,
            "per_layer_distinct_experts_decode": [round(float(x), 4) for x in self.layer_distinct / n_dec],
            **{f"{m}_mean": _finite_or_none(s[m].mean()) for m in STEP_MEASURES[1:]},
        }
