"""The serving engine: request bookkeeping, the scheduler's rules, and whole runs checked against
hand arithmetic on their own tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import compose_cfg
from lynx_sim.cost.memory import DoesNotFitError
from lynx_sim.engine.request import Request
from lynx_sim.engine.scheduler import Scheduler, SchedulerConfig
from lynx_sim.run import run

SMALL = ["model=olmoe_1b_7b", "batch=4", "plots=false"]


# --- request bookkeeping -------------------------------------------------------------------------

def test_request_emits_first_token_when_prompt_completes_then_one_per_decode():
    r = Request(rid=0, trace_request=0, arrival_s=0.0, prompt=5, output=3)
    assert r.in_prefill and r.tokens_wanted() == 5
    assert r.advance(3, 1.0) == 0 and r.first_token_s is None and r.tokens_wanted() == 2  # chunk of 3 of 5
    assert r.advance(2, 2.0) == 1 and r.first_token_s == 2.0 and not r.in_prefill
    assert r.tokens_wanted() == 1 and r.advance(1, 3.0) == 1 and r.advance(1, 4.0) == 1
    assert r.finished and r.finish_s == 4.0 and r.computed == 5 + 3 - 1  # the last token is never fed back


def test_preempted_request_recomputes_prompt_and_its_tokens_then_emits_the_next():
    r = Request(rid=0, trace_request=0, arrival_s=0.0, prompt=4, output=5)
    r.advance(4, 1.0)
    r.advance(1, 2.0)
    assert r.emitted == 2 and r.computed == 5
    r.preempt()
    assert r.in_prefill and r.tokens_wanted() == 4 + 2  # prompt + both emitted tokens, in one catch-up
    assert r.advance(6, 3.0) == 1 and r.emitted == 3 and not r.in_prefill and r.preemptions == 1


def test_attention_pairs_of_a_chunk():
    r = Request(rid=0, trace_request=0, arrival_s=0.0, prompt=10, output=2)
    assert r.attention_pairs(4) == 4 * 5 // 2
    r.advance(4, 0.0)
    assert r.attention_pairs(6) == 6 * 4 + 6 * 7 // 2


# --- the scheduler -------------------------------------------------------------------------------

def req(i, P, O=4):
    r = Request(rid=i, trace_request=i, arrival_s=0.0, prompt=P, output=O)
    r.rows = object()  # not loaded by the scheduler when present
    return r


def drive(s: Scheduler, steps: int):
    plans = []
    for t in range(steps):
        if s.idle:
            break
        plan = s.schedule()
        assert sum(n for _, n in plan) <= s.cfg.max_tokens and len(s.running) <= s.cfg.max_seqs
        assert 0 <= s.kv.free_blocks <= s.kv.total_blocks
        assert sum(s.kv.held.values()) + s.kv.free_blocks == s.kv.total_blocks
        s.complete(plan, float(t))
        plans.append([(r.rid, n) for r, n in plan])
    return plans


def test_attention_work_of_a_mixed_iteration_by_hand():
    """Two decoding requests (cached 10 and 20 rows) and two chunks (a fresh prompt's first 8 rows;
    4 rows after 6 cached): the decode KV reads include each new row; the chunks' pairs are causal."""
    from lynx_sim.cost.roofline import PrefillWork
    from lynx_sim.engine.serving import attention_work

    a = Request(0, 0, 0.0, prompt=5, output=9, computed=10, emitted=6)
    b = Request(1, 1, 0.0, prompt=15, output=9, computed=20, emitted=6)
    c = Request(2, 2, 0.0, prompt=16, output=4)
    d = Request(3, 3, 0.0, prompt=16, output=4, computed=6)
    assert not a.in_prefill and not b.in_prefill and c.in_prefill and d.in_prefill
    kv, pre = attention_work([(a, 1), (b, 1), (c, 8), (d, 4)])
    assert kv == 11 + 21
    assert pre == PrefillWork(seqs=2, tokens=12, cached=6, pairs=8 * 9 // 2 + (4 * 6 + 4 * 5 // 2))
    assert attention_work([(a, 1)]) == (11, None)


def test_chunked_prefill_shares_the_budget_with_decodes():
    s = Scheduler(SchedulerConfig(max_seqs=8, max_tokens=10, kv_capacity_tokens=1024, block_tokens=4))
    s.add(req(0, 3, 3))
    s.add(req(1, 25, 2))
    plans = drive(s, 50)
    assert plans[0] == [(0, 3), (1, 7)]  # FCFS: request 0's whole prompt, then a chunk of 1
    assert plans[1] == [(0, 1), (1, 9)]  # 0 decodes, 1 continues its prompt in what is left
    assert plans[2] == [(0, 1), (1, 9)] and plans[3] == [(1, 1)]
    assert s.idle and s.kv.free_blocks == s.kv.total_blocks


def test_without_chunking_a_long_prompt_waits_whole():
    s = Scheduler(SchedulerConfig(max_seqs=8, max_tokens=10, kv_capacity_tokens=1024, block_tokens=4,
                                  chunked_prefill=False))
    s.add(req(0, 3, 3))
    s.add(req(1, 8, 2))
    plans = drive(s, 50)
    assert plans[0] == [(0, 3)]  # 8 tokens do not fit the 7 left
    assert plans[1] == [(0, 1), (1, 8)]


def test_without_chunking_a_request_longer_than_the_budget_is_rejected_not_stuck():
    """It could never be scheduled (its prompt), or after a late preemption never again (its
    recompute of prompt + output - 1): the engine used to stop with "scheduler bug"."""
    s = Scheduler(SchedulerConfig(max_seqs=4, max_tokens=10, kv_capacity_tokens=1024, block_tokens=4,
                                  chunked_prefill=False))
    assert not s.add(req(0, 30, 4)) and not s.add(req(1, 8, 4))  # 30 > 10; 8 + 4 - 1 = 11 > 10
    assert s.add(req(2, 8, 3)) and len(s.rejected) == 2
    drive(s, 50)
    assert s.idle


def test_max_seqs_caps_the_running_set():
    s = Scheduler(SchedulerConfig(max_seqs=2, max_tokens=100, kv_capacity_tokens=1024, block_tokens=4))
    for i in range(5):
        s.add(req(i, 2, 3))
    plans = drive(s, 100)
    assert all(len(p) <= 2 for p in plans) and s.idle
    assert [rid for rid, _ in plans[0]] == [0, 1]


def test_kv_pressure_preempts_the_newest_and_everything_still_finishes():
    # 4 requests of 8 + 12 tokens in 48 token slots: they cannot all hold their KV to the end
    s = Scheduler(SchedulerConfig(max_seqs=4, max_tokens=64, kv_capacity_tokens=48, block_tokens=4))
    reqs = [req(i, 8, 12) for i in range(4)]
    for r in reqs:
        assert s.add(r)
    drive(s, 1000)
    assert s.idle and all(r.finished for r in reqs)
    assert s.preemptions > 0 and reqs[0].preemptions == 0  # the oldest is never the victim
    assert max(r.preemptions for r in reqs[1:]) > 0


def test_a_request_larger_than_the_cache_is_rejected():
    s = Scheduler(SchedulerConfig(max_seqs=4, max_tokens=64, kv_capacity_tokens=32, block_tokens=16))
    assert not s.add(req(0, 30, 10)) and len(s.rejected) == 1 and s.idle


def test_bad_scheduler_settings_are_named():
    with pytest.raises(ValueError, match="serving.max_num_batched_tokens"):
        SchedulerConfig(max_seqs=4, max_tokens=0, kv_capacity_tokens=64)
    with pytest.raises(ValueError, match="less than one block"):
        SchedulerConfig(max_seqs=4, max_tokens=8, kv_capacity_tokens=8, block_tokens=16)


# --- whole runs ----------------------------------------------------------------------------------

def serve(tmp_path, *over):
    s = run(compose_cfg([*SMALL, *over]), tmp_path, quiet=True)
    return s, pd.read_csv(tmp_path / "steps.csv"), pd.read_csv(tmp_path / "requests.csv")


def test_one_request_alone_matches_its_own_iterations(tmp_path):
    """TTFT = the prefill iterations' time; E2E = TTFT + (O - 1) decode iterations."""
    s, steps, reqs = serve(tmp_path, "workload=closed", "workload.num_requests=1", "serving.max_num_batched_tokens=32",
                           "policy=vanilla")
    (r,) = reqs.itertuples()
    chunks = -(-r.prompt_tokens // 32)
    assert len(steps) == chunks + r.output_tokens - 1
    assert (steps.prefill_tokens.iloc[:chunks].sum(), steps.decode_tokens.iloc[chunks:].sum()) == (r.prompt_tokens, r.output_tokens - 1)
    assert r.ttft_ms == pytest.approx(steps.step_time_ms.iloc[:chunks].sum())
    assert r.e2e_ms == pytest.approx(steps.step_time_ms.sum())
    assert r.tpot_ms == pytest.approx(steps.step_time_ms.iloc[chunks:].mean())
    assert s["throughput_tok_s"] == pytest.approx(r.output_tokens / (r.e2e_ms / 1e3))
    assert "vanilla_run" not in s


def test_closed_loop_serves_every_request_and_lynx_gates_on_mixed_batches(tmp_path):
    s, steps, reqs = serve(tmp_path, "workload=closed", "workload.num_requests=12")
    assert s["requests"] == 12 and len(reqs) == 12 and reqs.request.nunique() == 12
    assert (reqs.ttft_ms > 0).all() and (reqs.e2e_ms >= reqs.ttft_ms).all()
    assert steps.running.max() <= 4 and steps.seqs.max() <= 4
    assert steps.decode_tokens.sum() == (reqs.output_tokens - 1).sum()  # every token but each first one
    assert steps.prefill_tokens.sum() == reqs.prompt_tokens.sum()  # no preemption: each prompt once
    # Lynx declares decode-only gating: it acts on exactly the iterations without prefill tokens
    assert (steps.policy_acted == (steps.prefill_tokens == 0)).all()
    assert 0 < s["policy_acted_fraction"] < 1 and s["policy_acted_fraction"] == pytest.approx(s["decode_only_fraction"])
    v = s["vanilla_run"]
    assert s["tpot_ms"]["mean"] < v["tpot_ms"]["mean"] and s["tpot_speedup"] > 1
    assert s["distinct_experts_decode"] < v["distinct_experts_decode"]
    assert s["tpot_ms"]["p50"] <= s["tpot_ms"]["p99"]
    span = (reqs.finish_ms.max() - reqs.arrival_ms.min()) / 1e3
    assert s["throughput_tok_s"] == pytest.approx(reqs.output_tokens.sum() / span)
    assert 0 < s["moe_share"] < 1 and 0 < s["bandwidth_utilisation"] < 1
    ev = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert sum(e.get("cat") == "iteration" for e in ev) == len(steps)


def test_goodput_counts_only_requests_inside_the_slo(tmp_path):
    s, _, reqs = serve(tmp_path, "workload=closed", "workload.num_requests=8", "policy=vanilla")
    cut = float(reqs.tpot_ms.median())
    t, _, _ = serve(tmp_path / "slo", "workload=closed", "workload.num_requests=8", "policy=vanilla", f"slo.tpot_ms={cut}")
    good = reqs[reqs.tpot_ms <= cut]
    span = (reqs.finish_ms.max() - reqs.arrival_ms.min()) / 1e3
    assert t["goodput_tok_s"] == pytest.approx(good.output_tokens.sum() / span)
    assert t["goodput_tok_s"] < t["throughput_tok_s"] == s["throughput_tok_s"] == s["goodput_tok_s"]
    assert t["slo_attainment"] == pytest.approx(len(good) / len(reqs))


def test_poisson_is_seeded_and_load_raises_latency(tmp_path):
    a, _, ra = serve(tmp_path / "a", "workload=poisson", "workload.num_requests=10", "workload.rate_rps=2", "policy=vanilla")
    b, _, rb = serve(tmp_path / "b", "workload=poisson", "workload.num_requests=10", "workload.rate_rps=2", "policy=vanilla")
    assert ra.arrival_ms.tolist() == rb.arrival_ms.tolist() and a["tpot_ms"] == b["tpot_ms"]
    gaps = np.diff(np.sort(ra.arrival_ms.to_numpy()))
    assert 50 < gaps.mean() < 2000  # mean gap 500 ms at 2 requests/s (10 draws)
    hot, _, _ = serve(tmp_path / "c", "workload=poisson", "workload.num_requests=10", "workload.rate_rps=2000",
                      "policy=vanilla")
    assert hot["ttft_ms"]["mean"] > a["ttft_ms"]["mean"] and hot["mean_running"] > a["mean_running"]


def test_small_kv_cache_preempts_and_still_serves_everything(tmp_path):
    s, steps, reqs = serve(tmp_path, "workload=closed", "workload.num_requests=8", "serving.kv_capacity_tokens=700",
                           "policy=vanilla")
    assert s["preemptions"] > 0 and len(reqs) == 8 and steps.kv_used.max() <= 1.0
    assert steps.prefill_tokens.sum() > reqs.prompt_tokens.sum()  # recomputation after preemption
    assert any("KV capacity set by hand" in a for a in s["assumptions"])


def test_disaggregated_decode_node_sees_only_decode_tokens(tmp_path):
    s, steps, reqs = serve(tmp_path, "workload=closed", "workload.num_requests=8", "serving.disaggregated=true")
    dec, pre = steps[steps.node == "decode"], steps[steps.node == "prefill"]
    assert len(pre) and (pre.decode_tokens == 0).all() and pre.prefill_tokens.sum() == reqs.prompt_tokens.sum()
    assert (dec.prefill_tokens == 0).all() and dec.policy_acted.all()  # Lynx acts on every decode-node iteration
    assert dec.decode_tokens.sum() == (reqs.output_tokens - 1).sum()
    # the decode node's first iteration waits for the first prefill iteration and a KV transfer:
    # >= prompt x KV bytes per token / 50 GB/s (serving.kv_transfer_gbps) of the shortest prompt
    transfer_ms = reqs.prompt_tokens.min() * s["memory"]["kv_bytes_per_token"] / 50e9 * 1e3
    first_prefill_end = pre.start_ms.iloc[0] + pre.step_time_ms.iloc[0]
    assert dec.start_ms.min() >= first_prefill_end + transfer_ms - 1e-9
    assert (reqs.ttft_ms > 0).all() and (reqs.e2e_ms > reqs.ttft_ms).all()


def test_trace_workload_needs_arrival_times():
    with pytest.raises(ValueError, match="no field 'arrival_s'"):
        run(compose_cfg([*SMALL, "workload=trace", "workload.num_requests=2"]), quiet=True)


def test_trace_workload_uses_recorded_arrivals(tmp_path):
    from conftest import small_arrays
    from lynx_sim.traces import write_trace

    a = small_arrays(E=64, k=8, L=16, lengths=(6, 5, 7), logits=False)
    starts = {0: 0.3, 1: 0.0, 2: 0.1}
    a.arrival_s = np.array([starts[int(r)] for r in a.request_id])
    path = write_trace(tmp_path / "t.safetensors", a)
    over = [f"trace.path={path}", "trace=file", "workload=trace", "workload.num_requests=3", "policy=vanilla",
            "model.moe.renormalize=true"]
    s, _, reqs = serve(tmp_path / "run", *over)
    got = dict(zip(reqs.trace_request, reqs.arrival_ms))
    assert got == pytest.approx({0: 300.0, 1: 0.0, 2: 100.0})


def test_weights_that_do_not_fit_are_refused_or_flagged():
    with pytest.raises(DoesNotFitError, match=r"qwen3_235b_a22b needs 4\d\d\.\d GiB of weights per GPU"):
        run(compose_cfg(["model=qwen3_235b_a22b", "workload.steps=1"]), quiet=True)
    s = run(compose_cfg(["model=qwen3_235b_a22b", "workload.steps=1", "batch=2", "memory_check=warn"]), quiet=True)
    assert not s["exact"] and not s["memory"]["fits"] and s["approximations"][0].startswith("DOES NOT FIT")
    ok = run(compose_cfg(["model=qwen3_235b_a22b", "workload.steps=1", "batch=2", "parallel.gpus=8"]), quiet=True)
    assert ok["memory"]["fits"] and ok["memory"]["weights_gib_per_gpu"] < 60


# --- refusals and crashes of the issue ------------------------------------------------------------

@pytest.mark.parametrize("over,key", [
    (["serving.chunked_prefill=false", "serving.max_num_batched_tokens=8"], "serving.max_num_batched_tokens"),  # was "scheduler bug"
    (["serving.disaggregated=true", "serving.kv_transfer_gbps=0"], "serving.kv_transfer_gbps"),  # was ZeroDivisionError
    (["slo.tpot_ms=nan"], "slo.tpot_ms"),  # goodput was throughput
])
def test_serving_reproducers_are_refused_before_serving(over, key):
    with pytest.raises(ValueError, match=rf"^{key}: expected"):
        run(compose_cfg([*SMALL, "workload=closed", "workload.num_requests=2", *over]), quiet=True)


def test_a_nan_slo_cannot_pass_every_request():
    from lynx_sim.metrics.serving_recorder import ServingRecorder

    with pytest.raises(ValueError, match="slo.tpot_ms"):
        ServingRecorder(2, 1e12).summary(float("nan"))


def test_without_chunking_the_budget_must_hold_the_longest_request(tmp_path):
    """The synthetic preset's longest request is known from the config (2048 + 256 - 1 for
    OLMoE's), a file's once it is open; with that budget every request is served."""
    from conftest import small_arrays
    from lynx_sim.traces import write_trace

    with pytest.raises(ValueError, match=r"at least 2303 without chunked prefill"):
        run(compose_cfg([*SMALL, "workload=closed", "serving.chunked_prefill=false"]), quiet=True)
    s, _, reqs = serve(tmp_path / "ok", "workload=closed", "workload.num_requests=3", "policy=vanilla",
                       "serving.chunked_prefill=false", "serving.max_num_batched_tokens=2303")
    assert len(reqs) == 3 and s["requests_rejected"] == 0
    a = small_arrays(E=64, k=8, L=16, lengths=(6, 5, 7), logits=False)  # prompt 1 + output 6 - 1 = 6 at most
    path = write_trace(tmp_path / "t.safetensors", a)
    over = ["trace=file", f"trace.path={path}", "workload=closed", "workload.num_requests=3", "policy=vanilla",
            "model.moe.renormalize=true", "serving.chunked_prefill=false"]
    with pytest.raises(ValueError, match=r"at least 6 without chunked prefill \(the longest request of the trace"):
        run(compose_cfg([*SMALL, *over, "serving.max_num_batched_tokens=5"]), quiet=True)
    s, _, reqs = serve(tmp_path / "file", *over, "serving.max_num_batched_tokens=6")
    assert len(reqs) == 3
