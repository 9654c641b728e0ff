"""Where a run's routing comes from: a trace file, or the synthetic generator on the fly.

`Source` is the contract the engine and the policies read a source through; `FileSource` and
`SynthSource` implement it (declared members only: nothing is set on a source from outside, and
the engine probes for nothing). `RowStream` reads one phase of a request a block of rows at a
time from any source (the decode replay: memory bounded by the batch's current rows, not by the
requests' lengths), so the replay does not care which.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .digest import RoutingDigest
from .errors import TraceFormatError
from .format import TraceMeta
from .reader import Trace
from .synth import CHUNK_TOKENS, SynthParams, SyntheticTrace
from .arrays import TraceArrays

FIELDS = ("ids", "weights", "logits", "arrival_s")


@runtime_checkable
class Source(Protocol):
    """A run's routing source: what the engine (replay, serving workload) and the policies
    (routing profile) read of it, and all they read. Phases: 0 prompt (prefill), 1 output
    (decode); `phase=None` means all of a request's rows, prompt first."""

    name: str
    """How the run summary names the source: "file:<file name>" or "synth:<model>"."""
    meta: TraceMeta
    """The routing's shape and provenance (experts, top-k, layers, router)."""
    fields: frozenset[str]
    """The stored fields rows carry ("ids", "weights", "logits", "arrival_s", ...): what a policy may read."""
    num_requests: int | None
    """Requests the source holds; None: endless (the generator draws any request number)."""
    digest: RoutingDigest
    """Hash of every row handed out (the summary's trace_sha256), fed by `request` and `RowStream`."""
    prompt_routing: bool
    """Whether any request has prompt (prefill, phase 0) rows; False: a decode-only recording."""
    decode_routing: bool
    """Whether any request has output (decode, phase 1) rows; False: a prefill recording (the decode
    replay replays its prompt rows instead)."""

    def lengths(self, r: int) -> tuple[int, int]:
        """(prompt tokens, output tokens) of request r: what serving it costs. A request whose
        prompt routing was not recorded has the prompt length where its decode starts."""
        ...

    def num_rows(self, r: int, phase: int | None = None) -> int:
        """How many routing rows request r has of `phase` (of every phase when None)."""
        ...

    def request(self, r: int, phase: int | None = None) -> TraceArrays:
        """Request r's rows (only those of `phase` when given), hashed into `digest`."""
        ...

    def read_blocks(self, r: int, phase: int | None, start: int, block_rows: int) -> Iterator[TraceArrays]:
        """Request r's `phase` rows from row `start` to its end, in order, in blocks of at most
        `max_block_rows(block_rows)` rows, each read when asked for. Not hashed: `RowStream` is."""
        ...

    def max_block_rows(self, block_rows: int) -> int:
        """The most rows one block of `read_blocks(..., block_rows)` holds."""
        ...

    def request_arrivals(self) -> np.ndarray | None:
        """Arrival time in seconds of each request (its first row's `arrival_s`), float64 [num_requests];
        None when the source records none."""
        ...


class FileSource:
    """A `Source`: requests read from a native trace file, a bounded block of rows at a time (flat memory).

    Replays admit requests in file order, so one read of a block of `block_bytes` serves the
    next requests too (a read per request and tensor cost more than the rows themselves). The
    block stays in the stored dtypes; a request converts only its own rows, into fresh arrays,
    so that no request keeps a block alive."""

    BLOCK_BYTES = 8 << 20

    def __init__(self, trace: Trace, block_bytes: int | None = None):
        self.trace = trace  # the open file (this class's own: the engine reads only `Source` members)
        self.meta: TraceMeta = trace.meta
        self.num_requests: int | None = trace.num_requests
        self.name: str = f"file:{trace.path.name}"
        self.fields: frozenset[str] = frozenset(trace.fields)
        self.prompt_routing: bool = bool((trace.phase == 0).any())
        self.decode_routing: bool = bool((trace.phase == 1).any())
        m = trace.meta
        self._row_bytes = m.num_layers * (8 * m.top_k + 4 * m.num_experts) + 8  # widest stored row
        self.block_bytes = self.BLOCK_BYTES if block_bytes is None else block_bytes
        self._block: tuple[int, int, dict] | None = None  # (first row, end row, {name: rows})
        self.digest: RoutingDigest = RoutingDigest()  # of every row handed out (the summary's trace_sha256)

    def _read(self, a: int, b: int, read_ahead: bool = True) -> dict:
        """Routing rows [a, b) of every stored tensor, as fresh arrays; `read_ahead`: a miss reads a
        whole block (the next requests' rows too) and keeps it, else only these rows."""
        blk = self._block
        if blk is None or not (blk[0] <= a and b <= blk[1]):
            if not read_ahead:
                return {f: self.trace.as_numpy(f, rows) for f, rows in self.trace.read_block(FIELDS, a, b).items()}
            end = min(self.trace.num_tokens, a + max(b - a, self.block_bytes // self._row_bytes))
            self._block = blk = (a, end, self.trace.read_block(FIELDS, a, end))
        return {f: self.trace.as_numpy(f, rows[a - blk[0]:b - blk[0]], copy=True) for f, rows in blk[2].items()}

    def span(self, r: int, phase: int | None) -> tuple[int, int, np.ndarray | None]:
        """File rows of request r's `phase` rows (all its rows when phase is None): [a, b), and
        their offsets from a when they are not contiguous (recorded traces keep them contiguous:
        prompt, then output)."""
        a, b = int(self.trace.request_offsets[r]), int(self.trace.request_offsets[r + 1])
        if phase is None:
            return a, b, None
        idx = np.flatnonzero(self.trace.phase[a:b] == phase)
        if idx.size == 0:
            return b, b, None
        if idx[-1] - idx[0] + 1 == idx.size:
            return a + int(idx[0]), a + int(idx[-1]) + 1, None
        return a, b, idx

    def num_rows(self, r: int, phase: int | None = None) -> int:
        """How many rows request r has of `phase` (of every phase when None)."""
        a, b, keep = self.span(r, phase)
        return b - a if keep is None else len(keep)

    def lengths(self, r: int) -> tuple[int, int]:
        """(prompt tokens, output tokens) of request r: its phase-0 and phase-1 rows; a request
        without prompt rows (a decode-only recording) has the prompt length where its decode
        starts (its first decode row's position)."""
        a, b = int(self.trace.request_offsets[r]), int(self.trace.request_offsets[r + 1])
        phase, pos = self.trace.phase[a:b], self.trace.position[a:b]
        out, prompt = int((phase == 1).sum()), int((phase == 0).sum())
        if prompt == 0 and out:
            prompt = int(pos[phase == 1][0])
        return prompt, out

    def request_arrivals(self) -> np.ndarray | None:
        """Each request's first row's `arrival_s`, or None when the file records no arrival times."""
        t = self.trace
        return None if t.arrival_s is None else np.asarray(t.arrival_s[t.request_offsets[:-1]], dtype=np.float64)

    def max_block_rows(self, block_rows: int) -> int:
        """A file is read `block_rows` rows at a time."""
        return int(block_rows)

    def read_blocks(self, r: int, phase: int | None, start: int, block_rows: int) -> Iterator[TraceArrays]:
        """Request r's `phase` rows from `start` on, `block_rows` at a time (positioned reads of
        those rows alone: `read_rows`)."""
        n = self.num_rows(r, phase)
        for lo in range(start, n, block_rows):
            yield self.read_rows(r, phase, lo, min(lo + block_rows, n))

    def request(self, r: int, phase: int | None = None) -> TraceArrays:
        """Request r's rows; with `phase`, only the rows of that phase (read alone when they are
        contiguous)."""
        a, b, keep = self.span(r, phase)
        arr = self._rows(a, b, keep, read_ahead=True)
        self.digest.add(r, phase, arr)
        return arr

    def read_rows(self, r: int, phase: int | None, lo: int, hi: int) -> TraceArrays:
        """Rows lo..hi-1 of request r's `phase` rows (of all its rows when phase is None), read
        alone (positioned reads of those rows only, unless the block read last holds them): a
        streaming replay reads each slot's request a block at a time. Not hashed: `RowStream`
        feeds the digest with what it streams."""
        a, b, keep = self.span(r, phase)
        n = b - a if keep is None else len(keep)
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"request {r}: rows [{lo}, {hi}) outside its {n} rows of phase {phase}")
        if keep is None:
            arr = self._rows(a + lo, a + hi, None, read_ahead=False)
        elif lo == hi:
            arr = self._rows(b, b, None, read_ahead=False)
        else:
            idx = keep[lo:hi]
            arr = self._rows(a + int(idx[0]), a + int(idx[-1]) + 1, idx - idx[0], read_ahead=False)
        return arr

    def _rows(self, a: int, b: int, keep: np.ndarray | None, read_ahead: bool) -> TraceArrays:
        """File rows [a, b) (of them, the offsets `keep` when given)."""
        cols = self._read(a, b, read_ahead)
        arr = TraceArrays(meta=self.meta, request_id=self.trace.request_id[a:b], position=self.trace.position[a:b],
                          phase=self.trace.phase[a:b], **cols)
        return arr if keep is None else take_rows(arr, keep)


class SynthSource(SyntheticTrace):
    """A `Source`: the synthetic generator, each request drawn when asked for (deterministic in
    (seed, r)). Endless unless `num_requests` (then requests past it are replayed copies, as a
    file's). Every request has prompt and output rows of the preset's lengths."""

    FIELDS = frozenset({"request_id", "position", "phase", "ids", "weights", "logits"})

    def __init__(self, model, params, seed: int, num_requests: int | None = None):
        super().__init__(model, params, seed)
        self.name: str = f"synth:{model.name}"
        self.fields: frozenset[str] = self.FIELDS
        self.num_requests: int | None = num_requests
        self.prompt_routing: bool = True
        self.decode_routing: bool = True  # the replay steps over requests the preset gives no output

    def num_rows(self, r: int, phase: int | None = None) -> int:
        """How many rows request r has of `phase` (of every phase when None): its drawn lengths."""
        P, O = self.lengths(r)
        return {None: P + O, 0: P, 1: O}[phase]

    def request(self, r: int, phase: int | None = None) -> TraceArrays:
        """Request r at the preset's lengths (only the rows of `phase` when given), hashed."""
        return super().request(r, phase=phase)

    def read_blocks(self, r: int, phase: int | None, start: int, block_rows: int) -> Iterator[TraceArrays]:
        """Request r's `phase` rows from `start` on, in the generator's own blocks of CHUNK_TOKENS
        rows (`block_rows` does not apply), its AR state carried inside the suspended generator."""
        P, O = self.lengths(r)
        first, n = {None: (0, P + O), 0: (0, P), 1: (P, O)}[phase]
        return self.blocks(r, P, O, first + start, first + n)

    def max_block_rows(self, block_rows: int) -> int:
        """The generator's block, CHUNK_TOKENS rows, whatever `block_rows`."""
        return CHUNK_TOKENS

    def request_arrivals(self) -> None:
        """The generator draws no arrival times."""
        return None


def phase_rows(source: Source, r: int, phase: int) -> TraceArrays:
    """The rows of one phase of request r (files read, and the generator computes, only those rows)."""
    return source.request(r, phase=phase)


class RowStream:
    """One phase of request r (all its rows when phase is None) read in order from any row on, a
    block at a time: what a replay slot holds in place of the whole request. `length` is known
    before any row is read (a replayed copy starts at a random offset). A read returns at most
    `max_rows` rows: `block_rows` from a file (positioned reads of those rows alone), or the
    generator's own block of CHUNK_TOKENS rows, its AR state carried inside the suspended
    generator (`Source.read_blocks`). A stream from row 0 feeds the source's digest with every
    block, so a request streamed to its end hashes as `source.request(r, phase)` would; a stream
    from an offset (a replayed copy) feeds nothing, so the digest names each request's rows up to
    where its first pass got, whatever the order of reads and the window sizes."""

    def __init__(self, source: Source, r: int, phase: int | None, block_rows: int, start: int = 0):
        if block_rows < 1:
            raise ValueError(f"block_rows: expected an int >= 1, found {block_rows}")
        self.source, self.request, self.phase, self.block_rows = source, int(r), phase, int(block_rows)
        self.max_rows = source.max_block_rows(self.block_rows)  # the most rows one read returns
        self.length = source.num_rows(self.request, phase)
        self.seek(start)

    def seek(self, row: int, hashed: bool | None = None) -> None:
        """Start (over) at `row`; the generator's state is rebuilt from the request's first block.
        `hashed`: whether the rows read feed the digest (default: only a first pass, from row 0;
        a replayed copy passes False even when its random offset is 0)."""
        if not 0 <= row <= self.length:
            raise ValueError(f"request {self.request}: row {row} outside its {self.length} rows")
        self.next_row, self._blocks = int(row), None
        self._hashed = row == 0 if hashed is None else bool(hashed)

    def read(self) -> TraceArrays:
        """The next block of rows, from `next_row` on (at least one row; at most `max_rows`)."""
        lo = self.next_row
        if lo >= self.length:
            raise ValueError(f"request {self.request}: all {self.length} rows of phase {self.phase} read")
        if self._blocks is None:
            self._blocks = self.source.read_blocks(self.request, self.phase, lo, self.block_rows)
        arr = next(self._blocks)
        if self._hashed:
            self.source.digest.feed(self.request, self.phase, lo, arr, total=self.length)
        self.next_row += len(arr.ids)
        if self.next_row >= self.length:
            self._blocks = None  # the generator's frame and its last chunk go with it
        return arr


def take_rows(arr: TraceArrays, idx: np.ndarray) -> TraceArrays:
    """A TraceArrays of the rows `idx` (a slice, without copies, when they are contiguous)."""
    if idx.size and idx[-1] - idx[0] + 1 == idx.size:
        idx = slice(int(idx[0]), int(idx[-1]) + 1)
    pick = lambda a: None if a is None else a[idx]  # noqa: E731
    return TraceArrays(meta=arr.meta, request_id=arr.request_id[idx], position=arr.position[idx],
                       phase=arr.phase[idx], ids=arr.ids[idx], weights=pick(arr.weights), logits=pick(arr.logits),
                       arrival_s=pick(arr.arrival_s))


def check_matches_model(meta, model, where: str) -> None:
    """A trace replayed for a model must have that model's router shape."""
    r = model.router
    for field, have, want in (("num_experts", meta.num_experts, model.num_experts), ("top_k", meta.top_k, model.top_k),
                              ("moe layers", meta.num_layers, model.num_moe_layers), ("router", meta.router, r.kind),
                              ("renormalize", meta.renormalize, r.renormalize),
                              ("n_group/topk_group", (meta.n_group, meta.topk_group), (r.n_group, r.topk_group))):
        if have != want:
            raise TraceFormatError(where, field, f"{want} (model={model.name})",
                                   f"{have} (trace recorded from {meta.model!r}); choose the matching model=...")


def build_source(cfg, model) -> Source:
    """The source a run's `trace` config group names."""
    kind = cfg.trace.kind
    if kind == "synth":
        return SynthSource(model, SynthParams.from_cfg(cfg.synth), int(cfg.seed))
    if kind == "file":
        path = cfg.trace.get("path")
        if not path:
            raise ValueError("trace=file needs trace.path=<native trace file> (see `python -m lynx_sim.traces`)")
        src = FileSource(Trace(Path(path), verify=bool(cfg.trace.get("verify", True))))
        check_matches_model(src.meta, model, str(path))
        return src
    raise ValueError(f"trace.kind: expected 'synth' or 'file', found {kind!r}")
