"""One request's life in the serving engine: its routing rows, its progress and its timestamps.

Token bookkeeping (the same as a real engine with chunked prefill): a request of P prompt tokens
and O output tokens needs forward passes over its rows 0 .. P + O - 2 (the prompt, then each
generated token fed back except the last). `computed` rows hold KV cache. The pass over row i
(i >= P - 1) emits output token i - P + 2, so the pass that completes the prompt emits the first
token (TTFT). After a preemption (recompute, vLLM's default) `computed` drops to 0 and the
request prefills its prompt and its `emitted` tokens again in one catch-up, which emits the next
token when it completes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..traces.arrays import TraceArrays


@dataclass
class Request:
    rid: int  # the engine's request number (arrival order)
    trace_request: int  # which of the trace's requests it replays
    arrival_s: float
    prompt: int  # P
    output: int  # O >= 1
    rows: TraceArrays | None = None  # routing of rows 0 .. P + O - 1, loaded on admission, freed at the end
    computed: int = 0  # rows with KV in the cache
    emitted: int = 0  # output tokens produced
    preemptions: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None

    @property
    def catch_up_target(self) -> int:
        """Rows the request must have computed before it decodes one token per step again."""
        return self.prompt + self.emitted

    @property
    def in_prefill(self) -> bool:
        """Prefilling (or recomputing after preemption) rather than decoding one token."""
        return self.emitted == 0 or self.computed < self.catch_up_target - 1

    def tokens_wanted(self) -> int:
        """Rows this request would compute in the next step without a budget."""
        return self.catch_up_target - self.computed if self.in_prefill else 1

    @property
    def finished(self) -> bool:
        return self.emitted >= self.output

    def advance(self, n: int, now_s: float) -> int:
        """`n` more rows computed at `now_s`; returns the output tokens this emitted (0 or 1)."""
        self.computed += n
        can = max(0, min(self.computed - self.prompt + 1, self.output))
        new = max(0, can - self.emitted)
        if new:
            self.emitted = can
            if self.first_token_s is None:
                self.first_token_s = now_s
            if self.finished:
                self.finish_s = now_s
        return new

    def preempt(self) -> None:
        """Recompute preemption: the KV cache is dropped, the progress in tokens is kept."""
        self.computed = 0
        self.preemptions += 1

    def segment(self, n: int) -> np.ndarray:
        """Row indices of the next `n` rows to compute."""
        return np.arange(self.computed, self.computed + n)

    def attention_pairs(self, n: int) -> int:
        """Query-key pairs of computing the next n rows: each attends to every earlier row and itself."""
        c = self.computed
        return n * c + n * (n + 1) // 2
