"""The closed-loop decode batch: B slots, each replaying one request's decode tokens.

State lives here (STYLE.md item 4); the simpy process only asks for the current batch and
advances it. When the trace runs out of requests it starts over; a replayed copy starts at a
seeded random token offset so that copies do not decode in lock-step (reported in the summary).
A trace with no decode tokens at all (a prefill recording) replays its prompt tokens instead,
also reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..policies.approximate import fill_logits
from ..policies.base import BatchRouting
from ..traces.writer import TraceArrays


@dataclass
class Slot:
    request: int
    rows: TraceArrays  # the tokens this slot replays, in order
    cursor: int = 0


class ClosedLoopReplay:
    def __init__(self, source, batch: int, rng: np.random.Generator, max_empty: int = 1000,
                 fill_missing_logits: bool = False):
        if batch < 1:
            raise ValueError(f"batch: expected an int >= 1, found {batch}")
        self.source, self.rng, self.max_empty = source, rng, max_empty
        self.fill_missing_logits = fill_missing_logits  # stand-in logits for traces without them
        self.next_request = 0
        self.reused = 0  # admissions that replay a request already used
        trace = getattr(source, "trace", None)  # file sources expose their Trace
        self.prefill_as_decode = trace is not None and not (trace.phase == 1).any()
        self.slots = [self._admit() for _ in range(batch)]

    def _admit(self) -> Slot:
        R = self.source.num_requests
        for _ in range(self.max_empty):
            r = self.next_request
            self.next_request += 1
            arr = self.source.request(r % R if R else r)
            idx = np.arange(len(arr.phase)) if self.prefill_as_decode else np.flatnonzero(arr.phase == 1)
            if idx.size == 0:
                continue
            sub = TraceArrays(meta=arr.meta, request_id=arr.request_id[idx], position=arr.position[idx],
                              phase=arr.phase[idx], ids=arr.ids[idx],
                              weights=None if arr.weights is None else arr.weights[idx],
                              logits=None if arr.logits is None else arr.logits[idx])
            start = 0
            if R and r >= R:
                self.reused += 1
                start = int(self.rng.integers(0, idx.size))
            return Slot(r, sub, start)
        raise ValueError(f"{self.max_empty} requests in a row have no decode tokens to replay")

    def batch(self) -> tuple[BatchRouting, int]:
        """The current step: routing of every slot's current token, and total context tokens."""
        cur = [(s.rows, s.cursor) for s in self.slots]
        ids = torch.from_numpy(np.stack([r.ids[c] for r, c in cur], axis=1)).long()  # [L, B, k]
        first = cur[0][0]
        weights = None if first.weights is None else torch.from_numpy(np.stack([r.weights[c] for r, c in cur], axis=1))
        if first.logits is not None:
            logits = torch.from_numpy(np.stack([r.logits[c] for r, c in cur], axis=1))
        elif self.fill_missing_logits:
            logits = fill_logits(ids, weights, first.meta.num_experts)
        else:
            logits = None
        context = int(sum(int(r.position[c]) + 1 for r, c in cur))
        filled = first.logits is None and logits is not None
        return BatchRouting(ids, weights, logits, decode=None, ids_ordered=first.meta.ids_ordered,
                            logits_filled=filled), context

    def advance(self) -> None:
        """Every slot decodes one token; finished requests are replaced by the next ones."""
        for i, s in enumerate(self.slots):
            s.cursor += 1
            if s.cursor >= len(s.rows.ids):
                self.slots[i] = self._admit()
