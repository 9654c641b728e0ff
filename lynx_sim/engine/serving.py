"""The serving engine as simpy processes: arrivals, one engine loop per node, KV transfer.

An engine node loops: ask the scheduler for an iteration, assemble the routing of every token
in it (prefill chunks and decode tokens, phase-marked so that a policy gates itself: Lynx acts
only on iterations made entirely of decode tokens), apply the policy, price the iteration with
the roofline, let simulated time pass, then apply it (tokens out, requests done). An idle node
sleeps on an event that the next arrival triggers.

Disaggregated mode: a prefill node runs prompts only (all-prefill iterations, same hardware and
parallel layout as the decode node) and hands each request on after its first token; its KV
cache crosses a link of `serving.kv_transfer_gbps` (transfers do not contend: not modelled)
and the decode node admits it as a decoding request.

`run_serving` is the driver lynx_sim/run.py calls for workload=closed|poisson|trace.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import simpy
import torch

from ..cost.roofline import PrefillWork, Roofline
from ..metrics.console import progress
from ..metrics.serving_recorder import ServingRecorder
from ..policies.approximate import fill_logits
from ..policies.base import BatchRouting, Policy
from ..policies.vanilla import Vanilla
from ..schema import validate
from .request import Request
from .scheduler import Scheduler, SchedulerConfig
from .workload import RequestFactory, arrival_times


def attention_work(plan: list[tuple[Request, int]]) -> tuple[int, PrefillWork | None]:
    """What one iteration's attention reads: the KV entries of its decode sequences (each reads its
    cached rows and the new one), and its prefill chunks (n new rows after c cached ones each)."""
    chunks = [(req, n) for req, n in plan if req.in_prefill]
    prefill = PrefillWork(len(chunks), sum(n for _, n in chunks), sum(req.computed for req, _ in chunks),
                          sum(req.attention_pairs(n) for req, n in chunks)) if chunks else None
    return sum(req.computed + n for req, n in plan if not req.in_prefill), prefill


def assemble_iteration(plan: list[tuple[Request, int]], fill_missing_logits: bool, num_experts: int):
    """Routing of one iteration's tokens [L, T, ...] and what the roofline needs besides."""
    idx = [(req, req.segment(n)) for req, n in plan]
    first = plan[0][0].rows
    ids = np.concatenate([req.rows.ids[i] for req, i in idx])  # [T, L, k]
    weights = None if first.weights is None else np.concatenate([req.rows.weights[i] for req, i in idx])
    logits = None if first.logits is None else np.concatenate([req.rows.logits[i] for req, i in idx])
    decode = np.concatenate([np.full(n, not req.in_prefill) for req, n in plan])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(1, 0, 2)))  # noqa: E731
    ids_t = t(ids).long()
    w_t = None if weights is None else t(weights)
    filled = logits is None and fill_missing_logits
    z_t = t(logits) if logits is not None else (fill_logits(ids_t, w_t, num_experts) if filled else None)
    batch = BatchRouting(ids_t, w_t, z_t, decode=torch.from_numpy(decode), ids_ordered=first.meta.ids_ordered,
                         logits_filled=filled)
    decode_kv, prefill = attention_work(plan)
    info = {"decode_kv": decode_kv, "prefill": prefill,
            "lm_tokens": sum(1 for req, n in plan if req.computed + n - req.prompt + 1 > req.emitted),
            "decode_tokens": int(decode.sum()), "prefill_tokens": int((~decode).sum())}
    return batch, info


class EngineNode:
    """One serving node: a scheduler, a policy and a cost model, driven by a simpy process."""

    def __init__(self, env: simpy.Environment, name: str, scheduler: Scheduler, policy: Policy, cost: Roofline,
                 recorder: ServingRecorder, on_leave: Callable[[Request], None], fill_missing_logits: bool = False,
                 leave_after_first: bool = False, progress=None):
        self.env, self.name, self.sched, self.policy, self.cost = env, name, scheduler, policy, cost
        self.recorder, self.on_leave, self.fill = recorder, on_leave, fill_missing_logits
        self.leave_after_first, self.progress = leave_after_first, progress
        self._wake = env.event()
        env.process(self.loop())

    def submit(self, req: Request) -> None:
        if not self.sched.add(req):
            self.recorder.rejected += 1
        if not self._wake.triggered:
            self._wake.succeed()

    def loop(self):
        E = self.policy.router.num_experts
        while True:
            if self.sched.idle:
                self._wake = self.env.event()
                yield self._wake
                continue
            plan = self.sched.schedule()
            if not plan:
                raise RuntimeError(f"{self.name} node: requests waiting but none schedulable (scheduler bug)")
            batch, info = assemble_iteration(plan, self.fill, E)
            sel = self.policy.select(batch)
            c = self.cost.step(batch.num_tokens, info["decode_kv"], sel.fidelity.expert_tokens.numpy(),
                               acted=sel.acted, lm_tokens=info["lm_tokens"], prefill=info["prefill"])
            start = self.env.now
            yield self.env.timeout(c.total_s)
            emitted, leaving = self.sched.complete(plan, self.env.now, self.leave_after_first)
            self.recorder.on_step(self.name, start, c, sel, info["decode_tokens"], info["prefill_tokens"], len(plan),
                                  len(self.sched.running), len(self.sched.waiting), self.sched.kv.used_fraction,
                                  self.sched.preemptions)
            for req in leaving:
                self.on_leave(req)


class Cluster:
    """Arrivals feeding one node, or a prefill node then a decode node (disaggregated); the
    cluster builds its nodes from one scheduler config, policy and cost model."""

    def __init__(self, env, factory: RequestFactory, policy: Policy, cost: Roofline, sched: SchedulerConfig,
                 recorder: ServingRecorder, arrivals, requests, total: int, concurrency: int, fill_missing_logits=False,
                 disaggregated: bool = False, transfer_s=None, progress=None):
        self.env, self.recorder, self.total, self.progress = env, recorder, total, progress
        self.make, self.submitted, self.finished = factory.make, 0, 0

        def node(name, on_leave, sc, prefill_only=False):
            return EngineNode(env, name, Scheduler(sc, factory.load), policy, cost, recorder, on_leave,
                              fill_missing_logits, leave_after_first=prefill_only)

        self.decode = node("decode", self._finish, sched)
        # the prefill node's sequences leave after their first token: its limit is the token budget
        self.prefill = (node("prefill", self._handoff, replace(sched, max_seqs=max(sched.max_tokens, 1)), True)
                        if disaggregated else None)
        self.transfer_s = transfer_s
        self.entry = self.prefill or self.decode
        self.closed = arrivals is None
        if self.closed:  # closed loop: `concurrency` clients, each sends again when served
            for _ in range(min(concurrency, total)):
                self._send(0.0)
        else:
            env.process(self._open(arrivals, requests))

    def _send(self, t: float, r: int | None = None) -> None:
        while self.submitted < self.total:
            rid = self.submitted
            self.submitted += 1
            req = self.make(rid, t, r)
            if req is not None:
                self.entry.submit(req)
                return
            r = None  # a trace request with no output: the next one takes its place

    def _open(self, arrivals: np.ndarray, requests):
        for i, t in enumerate(arrivals):
            yield self.env.timeout(max(0.0, float(t) - self.env.now))
            self._send(float(t), None if requests is None else int(requests[i]))

    def _finish(self, req: Request) -> None:
        self.recorder.on_finish(req)
        req.rows = None  # memory stays flat: a finished request's routing is dropped
        self.finished += 1
        if self.progress is not None:
            self.progress.update(1)
        if self.closed:
            self._send(self.env.now)

    def _handoff(self, req: Request) -> None:
        if req.finished:  # a one-token request is done at the prefill node
            self._finish(req)
            return
        self.env.process(self._transfer(req))

    def _transfer(self, req: Request):
        yield self.env.timeout(self.transfer_s(req))
        self.decode.submit(req)


def run_serving(cfg, s, quiet: bool = False) -> tuple[dict, dict]:
    """workload=closed|poisson|trace from a RunSetup `s` (lynx_sim/setup.py): the serving engine once
    with the policy and once with vanilla (unless serving.compare_vanilla=false; its batches
    differ); the summary's figures and the output tables, approximations and assumptions added to `s`."""
    sv, policy = cfg.serving, s.policy
    factory = RequestFactory(s.source)
    if not s.source.decode_routing:
        raise ValueError(f"{s.source.name}: workload={cfg.workload.kind} needs output (decode) tokens to serve, and "
                         f"this trace has only prompt tokens; use workload=decode to replay them as decode steps")
    if factory.num_requests is not None and not sv.chunked_prefill:
        validate(cfg, longest_request=factory.longest_request())  # the token budget against the file's requests
    capacity = int(sv.kv_capacity_tokens) if sv.get("kv_capacity_tokens") else s.mem.kv_capacity_tokens
    sched = SchedulerConfig(max_seqs=int(cfg.batch), max_tokens=int(sv.max_num_batched_tokens),
                            kv_capacity_tokens=capacity, block_tokens=int(sv.kv_block_tokens),
                            chunked_prefill=bool(sv.chunked_prefill))
    slo = cfg.get("slo") or {}
    runs = [(policy, s.cost)]
    if sv.get("compare_vanilla", True) and policy.name != "vanilla":
        runs.append((Vanilla(s.model.router), s.base_cost))
    out, tables = {}, {"per_layer": {}, "requests": {}}
    for pol, cost in runs:
        rec = serve(cfg, s.model, s.hw, factory, pol, cost, sched, s.fill, quiet)
        summ = rec.summary(slo.get("tpot_ms"), slo.get("ttft_ms"))
        label = "vanilla" if pol is not policy else policy.name
        tables["requests"][label] = rec.request_table()
        tables["per_layer"][label] = summ["per_layer_distinct_experts_decode"]
        if pol is policy:
            out.update(summ)
            tables["steps"], tables["requests_main"] = rec.step_table(), rec.request_table()
        else:
            out["vanilla_run"] = {k: summ[k] for k in ("ttft_ms", "tpot_ms", "e2e_ms", "throughput_tok_s", "goodput_tok_s",
                                                       "slo_attainment", "step_time_ms_mean", "distinct_experts_decode",
                                                       "preemptions", "duration_s")}
    if "vanilla_run" in out:
        v = out["vanilla_run"]
        out["tpot_speedup"] = _ratio(v["tpot_ms"]["mean"], out["tpot_ms"]["mean"])
        out["throughput_speedup"] = _ratio(out["throughput_tok_s"], v["throughput_tok_s"])
    if factory.stand_in_prompts:
        s.approximations.append(f"{factory.stand_in_prompts} requests have no recorded prompt routing: their decode "
                                "rows stand in for the prompt's")
    if factory.reused:
        s.approximations.append(f"trace ran out of requests: {factory.reused} arrivals replay a used one")
    if sv.get("kv_capacity_tokens"):
        s.assumptions.append(f"KV capacity set by hand: {capacity} tokens (memory plan: {s.mem.kv_capacity_tokens})")
    if sv.disaggregated:
        s.assumptions.append("disaggregated: KV transfers do not contend for the link")
    return out, tables


def _ratio(a, b):
    return float(a / b) if a and b else None


def serve(cfg, model, hw, factory, policy, cost, sched: SchedulerConfig, fill: bool, quiet: bool) -> ServingRecorder:
    """One serving simulation; returns its recorder."""
    w, sv = cfg.workload, cfg.serving
    times, requests = arrival_times(w, factory, np.random.default_rng([int(cfg.seed), 2]))
    env = simpy.Environment()
    rec = ServingRecorder(model.num_moe_layers, hw.hbm_bandwidth_gbps * 1e9)
    kv_link, kv_token = float(sv.kv_transfer_gbps) * 1e9, cost.kv_bytes_per_token() * model.num_layers
    with progress(quiet, int(w.num_requests), f"requests ({policy.name})") as bar:
        Cluster(env, factory, policy, cost, sched, rec, times, requests, int(w.num_requests),
                int(w.get("concurrency") or cfg.batch), fill, disaggregated=bool(sv.disaggregated),
                transfer_s=lambda req: req.computed * kv_token / kv_link, progress=bar)
        env.run()
    return rec
