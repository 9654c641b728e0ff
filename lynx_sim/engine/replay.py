"""The closed-loop decode batch: B slots, each replaying one request's decode tokens.

State lives here (STYLE.md item 4); the simpy process only asks for the current batch and
advances it. When the trace runs out of requests it starts over; a replayed copy starts at a
seeded random token offset so that copies do not decode in lock-step (reported in the summary).

Memory: a slot streams its request's decode rows (`RowStream`) a block at a time, read when the
slot reaches it and copied into the slot's part of one buffer of batch x `block_rows` rows,
allocated once (`held_bytes`); admission reads nothing but the request's length. So memory is
bounded by the batch's current rows whatever the requests' lengths, and does not fragment:
Qwen3-30B at batch 4096 holds 8-row blocks (0.9 GB) where whole requests took over 13 GB.
`block_rows`: the generator's block (synth.CHUNK_TOKENS) for synthetic traces; for files, what
`stream_bytes` allows per slot (at least CHUNK_TOKENS), so small batches read a file's
requests whole, in one read each.

Speed: batches are assembled a window of steps at a time (one copy per slot and block segment
instead of one per slot and step), admitting the next requests in exactly the order and with
exactly the random draws of stepping one at a time; `horizon` (the steps the run will take)
keeps the window from admitting or reading past the run's end. The window is bounded by
`window_bytes` (at large batches a single step). Each window gets fresh buffers, so a batch
handed out earlier is never overwritten.
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
from ..traces.source import RowStream, Source
from ..traces.synth import CHUNK_TOKENS

ROWS = ("ids", "weights", "logits", "position")  # what a step takes of each row


@dataclass
class Slot:
    request: int
    stream: RowStream  # the request's rows this slot replays, in order, a block at a time
    cursor: int = 0  # the next row to replay
    held: int = 0  # the slot's part of the buffer holds rows held .. held + count - 1
    count: int = 0

    @property
    def remaining(self) -> int:
        return self.stream.length - self.cursor


class ClosedLoopReplay:
    def __init__(self, source: Source, batch: int, rng: np.random.Generator, max_empty: int = 1000,
                 fill_missing_logits: bool = False, horizon: int | None = None, window_bytes: int = 4194304,
                 stream_bytes: int = 67108864):
        if batch < 1:
            raise ValueError(f"batch: expected an int >= 1, found {batch}")
        self.source, self.rng, self.max_empty = source, rng, max_empty
        self.meta = m = source.meta
        self.fill_missing_logits = fill_missing_logits  # stand-in logits for traces without them
        self.next_request = 0
        self.reused = 0  # admissions that replay a request already used
        self.prefill_as_decode = not source.decode_routing  # a prefill recording: its prompt rows are replayed
        row_bytes = m.num_layers * (12 * m.top_k + 4 * m.num_experts)  # ids, weights and logits as replayed
        self._read_rows = max(CHUNK_TOKENS, stream_bytes // (batch * row_bytes))
        self.slots = [self._admit() for _ in range(batch)]
        self.block_rows = self.slots[0].stream.max_rows  # the most rows a slot holds
        self.horizon, self.window_bytes = horizon, window_bytes
        self.steps_taken = 0
        self._held: dict | None = None  # {field: [B, block_rows, ...] rows the slots hold}, on the first read
        self._load(0)
        self._win: dict | None = None  # the current window's buffers; "at": the step inside it

    def _admit(self) -> Slot:
        """The next request with rows to replay; a reused one starts at a seeded random offset.
        Nothing is read yet but its length."""
        R = self.source.num_requests
        for _ in range(self.max_empty):
            r = self.next_request
            self.next_request += 1
            stream = RowStream(self.source, r % R if R else r, None if self.prefill_as_decode else 1, self._read_rows)
            if stream.length == 0:
                continue
            start = 0
            if R and r >= R:
                self.reused += 1
                start = int(self.rng.integers(0, stream.length))
                stream.seek(start, hashed=False)  # a copy: the digest names first passes only
            return Slot(r, stream, start)
        raise ValueError(f"{self.max_empty} requests in a row have no decode tokens to replay")

    def _load(self, i: int) -> None:
        """Slot i's next block of rows, copied into its part of the buffer (the block read is
        dropped at once, so nothing else the stream made outlives the copy)."""
        s = self.slots[i]
        rows = s.stream.read()
        if self._held is None:  # one buffer for every slot, allocated once: fixed size, no fragments
            B, R = len(self.slots), self.block_rows
            self._held = {f: None if getattr(rows, f) is None else
                          np.empty((B, R, *getattr(rows, f).shape[1:]), getattr(rows, f).dtype) for f in ROWS}
        n = len(rows.ids)
        for f, buf in self._held.items():
            if buf is not None:
                buf[i, :n] = getattr(rows, f)
        s.held, s.count = s.cursor, n

    def held_bytes(self) -> int:
        """Bytes of rows the slots hold: batch x block_rows rows, whatever the requests' lengths."""
        return sum(buf.nbytes for buf in self._held.values() if buf is not None)

    def batch(self) -> tuple[BatchRouting, int]:
        """The current step: routing of every slot's current token, and total context tokens."""
        if self._win is None or self._win["at"] >= self._win["steps"]:
            self._win = self._fill()
        win, w = self._win, self._win["at"]
        ids = torch.from_numpy(win["ids"][w])  # [L, B, k]
        weights = None if win["weights"] is None else torch.from_numpy(win["weights"][w])
        if win["logits"] is not None:
            logits = torch.from_numpy(win["logits"][w])
        elif self.fill_missing_logits:
            logits = fill_logits(ids, weights, self.meta.num_experts)
        else:
            logits = None
        filled = win["logits"] is None and logits is not None
        return BatchRouting(ids, weights, logits, decode=None, ids_ordered=self.meta.ids_ordered,
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
        held, B = self._held, len(self.slots)
        (L, k), E = held["ids"].shape[2:], self.meta.num_experts
        per_step = L * B * (8 * k + (4 * k if held["weights"] is not None else 0)
                            + (held["logits"].itemsize * E if held["logits"] is not None else 0))
        W = max(1, self.window_bytes // max(per_step, 1))
        if self.horizon is not None:
            W = max(1, min(W, self.horizon - self.steps_taken))
        win = {"steps": W, "at": 0, "ids": np.empty((W, L, B, k), np.int64), "context": np.zeros(W, np.int64),
               "weights": None if held["weights"] is None else np.empty((W, L, B, k), np.float32),
               "logits": None if held["logits"] is None else np.empty((W, L, B, E), held["logits"].dtype)}
        start = [0] * B
        heap = [(s.remaining, i) for i, s in enumerate(self.slots)]  # step of each slot's next admission
        heapq.heapify(heap)
        while heap and heap[0][0] <= W:  # admissions inside the window, in (step, slot) order
            end, i = heapq.heappop(heap)
            self._copy(win, i, start[i], end)
            self.slots[i] = self._admit()
            start[i] = end
            heapq.heappush(heap, (end + self.slots[i].remaining, i))
        for _, i in heap:
            self._copy(win, i, start[i], W)
        return win

    def _copy(self, win: dict, i: int, a: int, b: int) -> None:
        """Steps a..b-1 of slot i come from its request's next b - a rows, read a block at a time."""
        s, held = self.slots[i], self._held
        while a < b:
            if s.cursor >= s.held + s.count:
                self._load(i)
            o = s.cursor - s.held
            n = min(b - a, s.count - o)
            for f in ROWS[:3]:
                if win[f] is not None:
                    win[f][a:a + n, :, i] = held[f][i, o:o + n]
            win["context"][a:a + n] += held["position"][i, o:o + n] + 1
            s.cursor += n
            a += n
