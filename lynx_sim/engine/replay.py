"""The closed-loop decode batch: B slots, each replaying one request's decode tokens.

State lives here (STYLE.md item 4); the simpy process only asks for the current batch and
advances it. When the trace runs out of requests it starts over; a replayed copy starts at a
seeded random token offset so that copies do not decode in lock-step (reported in the summary).

Speed: batches are assembled a window of steps at a time (one copy per slot and request
segment instead of one per slot and step), admitting the next requests in exactly the order
and with exactly the random draws of stepping one at a time; `horizon` (the steps the run will
take) keeps the window from admitting requests past the run's end. Each window gets fresh
buffers, so a batch handed out earlier is never overwritten.
A trace with no decode tokens at all (a prefill recording) replays its prompt tokens instead,
also reported.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ..policies.approximate import fill_logits
from ..policies.base import BatchRouting
from ..traces.source import phase_rows
from ..traces.writer import TraceArrays


@dataclass
class Slot:
    request: int
    rows: TraceArrays  # the tokens this slot replays, in order
    cursor: int = 0


class ClosedLoopReplay:
    def __init__(self, source, batch: int, rng: np.random.Generator, max_empty: int = 1000,
                 fill_missing_logits: bool = False, horizon: int | None = None, window_bytes: int = 4194304):
        if batch < 1:
            raise ValueError(f"batch: expected an int >= 1, found {batch}")
        self.source, self.rng, self.max_empty = source, rng, max_empty
        self.fill_missing_logits = fill_missing_logits  # stand-in logits for traces without them
        self.next_request = 0
        self.reused = 0  # admissions that replay a request already used
        trace = getattr(source, "trace", None)  # file sources expose their Trace
        self.prefill_as_decode = trace is not None and not (trace.phase == 1).any()
        self.slots = [self._admit() for _ in range(batch)]
        self.horizon, self.window_bytes = horizon, window_bytes
        self.steps_taken = 0
        self._win: dict | None = None  # the current window's buffers; "at": the step inside it

    def _admit(self) -> Slot:
        R = self.source.num_requests
        for _ in range(self.max_empty):
            r = self.next_request
            self.next_request += 1
            arr = (self.source.request(r % R if R else r) if self.prefill_as_decode
                   else phase_rows(self.source, r % R if R else r, phase=1))
            if len(arr.phase) == 0:
                continue
            start = 0
            if R and r >= R:
                self.reused += 1
                start = int(self.rng.integers(0, len(arr.phase)))
            return Slot(r, arr, start)
        raise ValueError(f"{self.max_empty} requests in a row have no decode tokens to replay")

    def batch(self) -> tuple[BatchRouting, int]:
        """The current step: routing of every slot's current token, and total context tokens."""
        if self._win is None or self._win["at"] >= self._win["steps"]:
            self._win = self._fill()
        win, w = self._win, self._win["at"]
        first = self.slots[0].rows
        ids = torch.from_numpy(win["ids"][w])  # [L, B, k]
        weights = None if win["weights"] is None else torch.from_numpy(win["weights"][w])
        if win["logits"] is not None:
            logits = torch.from_numpy(win["logits"][w])
        elif self.fill_missing_logits:
            logits = fill_logits(ids, weights, first.meta.num_experts)
        else:
            logits = None
        filled = win["logits"] is None and logits is not None
        return BatchRouting(ids, weights, logits, decode=None, ids_ordered=first.meta.ids_ordered,
                            logits_filled=filled), int(win["context"][w])

    def advance(self) -> None:
        """Every slot decodes one token; finished requests are replaced by the next ones (the
        window admitted them already, at this step's place in the order)."""
        if self._win is None:  # advancing before any batch: assemble the window, then step past it
            self._win = self._fill()
        self._win["at"] += 1
        self.steps_taken += 1

    def _fill(self) -> dict:
        """Assemble the next window of steps, advancing the slots to its end."""
        first = self.slots[0].rows
        B, (L, k) = len(self.slots), first.ids.shape[1:]
        E = first.meta.num_experts
        per_step = L * B * (8 * k + (4 * k if first.weights is not None else 0)
                            + (first.logits.itemsize * E if first.logits is not None else 0))
        W = max(1, self.window_bytes // max(per_step, 1))
        if self.horizon is not None:
            W = max(1, min(W, self.horizon - self.steps_taken))
        win = {"steps": W, "at": 0, "ids": np.empty((W, L, B, k), np.int64), "context": np.zeros(W, np.int64),
               "weights": None if first.weights is None else np.empty((W, L, B, k), np.float32),
               "logits": None if first.logits is None else np.empty((W, L, B, E), first.logits.dtype)}
        start = [0] * B
        heap = [(len(s.rows.ids) - s.cursor, i) for i, s in enumerate(self.slots)]  # step of each slot's next admission
        heapq.heapify(heap)
        while heap and heap[0][0] <= W:  # admissions inside the window, in (step, slot) order
            end, i = heapq.heappop(heap)
            self._copy(win, i, start[i], end)
            self.slots[i] = self._admit()
            start[i] = end
            s = self.slots[i]
            heapq.heappush(heap, (end + len(s.rows.ids) - s.cursor, i))
        for _, i in heap:
            self._copy(win, i, start[i], W)
        return win

    def _copy(self, win: dict, i: int, a: int, b: int) -> None:
        """Steps a..b-1 of slot i come from its request's next b - a tokens."""
        if b <= a:
            return
        s = self.slots[i]
        rows, c = s.rows, s.cursor
        win["ids"][a:b, :, i] = rows.ids[c:c + b - a]
        if win["weights"] is not None:
            win["weights"][a:b, :, i] = rows.weights[c:c + b - a]
        if win["logits"] is not None:
            win["logits"][a:b, :, i] = rows.logits[c:c + b - a]
        win["context"][a:b] += rows.position[c:c + b - a] + 1
        s.cursor += b - a
