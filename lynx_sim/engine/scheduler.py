"""A continuous-batching scheduler in the style of vLLM (its V1 scheduler, chunked prefill on).

Each iteration, in order:
1. running requests, oldest first: a decoding request takes 1 token of the budget, a prefilling
   one (or one recomputing after preemption) takes min(what is left of its catch-up, budget);
   each must first get the KV blocks for its new tokens; when none are free, the newest running
   request is preempted (recompute: its blocks are freed, it returns to the front of the queue),
   possibly the request itself;
2. if nothing was preempted this iteration, waiting requests in arrival order join while the
   budget, `max_seqs` and free KV blocks allow (the first to be refused stops admission: FCFS).
Without chunked prefill a prompt that does not fit the remaining budget waits whole.
The KV cache is paged in blocks of `block_tokens`; capacity comes from the memory plan.
A request that could never fit the whole cache is rejected at arrival (counted, not simulated),
and so, without chunked prefill, is one whose prompt + output - 1 tokens exceed the budget (a
preempted request recomputes them in one step: it could wait forever; vLLM's max_model_len rule).

Pure state, no simpy (STYLE.md item 4): `schedule()` plans one iteration, `complete()` applies it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .request import Request


@dataclass(frozen=True)
class SchedulerConfig:
    max_seqs: int  # maximum running requests (the decode batch limit, `batch`)
    max_tokens: int  # token budget per iteration (vLLM's max_num_batched_tokens)
    kv_capacity_tokens: int
    block_tokens: int = 16
    chunked_prefill: bool = True

    def __post_init__(self):
        for name, key in (("max_seqs", "batch"), ("max_tokens", "serving.max_num_batched_tokens"),
                          ("block_tokens", "serving.kv_block_tokens")):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{key}: expected an integer >= 1, found {v!r}")
        if self.kv_capacity_tokens < self.block_tokens:
            raise ValueError(f"KV cache capacity {self.kv_capacity_tokens} tokens is less than one block "
                             f"({self.block_tokens}): nothing can run")


class KVCache:
    """Block accounting of the paged KV cache."""

    def __init__(self, capacity_tokens: int, block_tokens: int):
        self.block_tokens = block_tokens
        self.total_blocks = capacity_tokens // block_tokens
        self.free_blocks = self.total_blocks
        self.held: dict[int, int] = {}

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def extra_blocks(self, req: Request, tokens: int) -> int:
        return max(0, self.blocks_for(tokens) - self.held.get(req.rid, 0))

    def grow(self, req: Request, tokens: int) -> bool:
        """Hold blocks for `tokens` cached tokens of `req`; False (nothing changed) if too few are free."""
        need = self.extra_blocks(req, tokens)
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        self.held[req.rid] = self.held.get(req.rid, 0) + need
        return True

    def free(self, req: Request) -> None:
        self.free_blocks += self.held.pop(req.rid, 0)

    @property
    def used_fraction(self) -> float:
        return 1.0 - self.free_blocks / self.total_blocks


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, load=None):
        self.cfg = cfg
        self.kv = KVCache(cfg.kv_capacity_tokens, cfg.block_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.load = load or (lambda req: None)  # loads a request's routing rows when it first runs
        self.preemptions = 0
        self.rejected: list[Request] = []

    def add(self, req: Request) -> bool:
        """Queue an arrival; False (and counted) if it could never fit the KV cache or the budget."""
        longest = req.prompt + req.output - 1
        too_long = longest > self.cfg.max_tokens and not self.cfg.chunked_prefill
        if self.kv.blocks_for(longest) > self.kv.total_blocks or too_long:
            self.rejected.append(req)
            return False
        self.waiting.append(req)
        return True

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _preempt(self, victim: Request) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.preempt()
        self.waiting.appendleft(victim)
        self.preemptions += 1

    def schedule(self) -> list[tuple[Request, int]]:
        """Plan one iteration: (request, rows to compute) in batch order."""
        budget, plan, preempted = self.cfg.max_tokens, [], False
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted earlier in this loop
                continue
            want = req.tokens_wanted()
            n = min(want, budget)
            if n < want and not self.cfg.chunked_prefill:
                continue
            while not self.kv.grow(req, req.computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                plan.append((req, n))
                budget -= n
        if preempted:
            return plan
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_seqs:
            req = self.waiting[0]
            want = req.tokens_wanted()
            n = min(want, budget)
            if n < want and not self.cfg.chunked_prefill:
                break
            if not self.kv.grow(req, req.computed + n):
                break
            self.waiting.popleft()
            if req.rows is None:
                self.load(req)
            self.running.append(req)
            plan.append((req, n))
            budget -= n
        return plan

    def complete(self, plan: list[tuple[Request, int]], now_s: float, leave_after_first: bool = False) -> tuple[int, list[Request]]:
        """Apply a finished iteration: (tokens emitted, requests that leave). `leave_after_first`:
        a prefill node hands each request on once its first token is out."""
        emitted, leaving = 0, []
        for req, n in plan:
            emitted += req.advance(n, now_s)
            if req.finished or (leave_after_first and req.emitted >= 1):
                leaving.append(req)
        for req in leaving:
            self.running.remove(req)
            self.kv.free(req)
        return emitted, leaving
