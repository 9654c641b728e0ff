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
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import simpy
import torch

from ..cost.roofline import PrefillWork, Roofline
from ..policies.approximate import fill_logits
from ..policies.base import BatchRouting, Policy
from ..metrics.serving import ServingRecorder
from .request import Request
from .scheduler import Scheduler


def attention_work(plan: list[tuple[Request, int]]) -> tuple[int, PrefillWork | None]:
    """What one iteration's attention reads: the KV entries of its decode sequences (each reads its
    cached rows and the new one), and its prefill chunks (n new rows after c cached ones each)."""
    chunks = [(req, n) for req, n in plan if req.in_prefill]
    prefill = PrefillWork(len(chunks), sum(n for _, n in chunks), sum(req.computed for req, _ in chunks),
                          sum(req.attention_pairs(n) for req, n in chunks)) if chunks else None
    return sum(req.computed + n for req, n in plan if not req.in_prefill), prefill


def assemble(plan: list[tuple[Request, int]], fill_missing_logits: bool, num_experts: int):
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
            batch, info = assemble(plan, self.fill, E)
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
    """Arrivals feeding one node, or a prefill node then a decode node (disaggregated)."""

    def __init__(self, env, make_node, factory_make, arrivals, requests, total: int, concurrency: int,
                 recorder: ServingRecorder, disaggregated: bool = False, transfer_s=None, progress=None):
        self.env, self.recorder, self.total, self.progress = env, recorder, total, progress
        self.make, self.submitted, self.finished = factory_make, 0, 0
        self.decode = make_node("decode", self._finish, False)
        self.prefill = make_node("prefill", self._handoff, True) if disaggregated else None
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
