"""Where a run's routing comes from: a trace file, or the synthetic generator on the fly.

Both answer `request(r) -> TraceArrays` for one request, so the replay does not care which.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import TraceFormatError
from .reader import Trace
from .writer import TraceArrays

FIELDS = ("ids", "weights", "logits", "arrival_s")


class FileSource:
    """Requests read from a native trace file, a bounded block of rows at a time (flat memory).

    Replays admit requests in file order, so one read of a block of `block_bytes` serves the
    next requests too (a read per request and tensor cost more than the rows themselves). The
    block stays in the stored dtypes; a request converts only its own rows, into fresh arrays,
    so that no request keeps a block alive."""

    BLOCK_BYTES = 8 << 20

    def __init__(self, trace: Trace, block_bytes: int | None = None):
        self.trace, self.meta = trace, trace.meta
        self.num_requests: int | None = trace.num_requests
        self.name = f"file:{trace.path.name}"
        self.fields = set(trace.fields)
        m = trace.meta
        self._row_bytes = m.num_layers * (8 * m.top_k + 4 * m.num_experts) + 8  # widest stored row
        self.block_bytes = self.BLOCK_BYTES if block_bytes is None else block_bytes
        self._block: tuple[int, int, dict] | None = None  # (first row, end row, {name: rows})

    def _read(self, a: int, b: int) -> dict:
        """Routing rows [a, b) of every stored tensor, as fresh arrays."""
        blk = self._block
        if blk is None or not (blk[0] <= a and b <= blk[1]):
            end = min(self.trace.num_tokens, a + max(b - a, self.block_bytes // self._row_bytes))
            self._block = blk = (a, end, self.trace.read_block(FIELDS, a, end))
        return {f: self.trace.as_numpy(f, rows[a - blk[0]:b - blk[0]], copy=True) for f, rows in blk[2].items()}

    def request(self, r: int, phase: int | None = None) -> TraceArrays:
        """Request r's rows; with `phase`, only the rows of that phase (read alone when they are
        contiguous, as recorded traces keep them: prompt, then output)."""
        a, b = int(self.trace.request_offsets[r]), int(self.trace.request_offsets[r + 1])
        keep = None
        if phase is not None:
            idx = np.flatnonzero(self.trace.phase[a:b] == phase)
            if idx.size and idx[-1] - idx[0] + 1 == idx.size:
                a, b = a + int(idx[0]), a + int(idx[-1]) + 1
            elif idx.size == 0:
                a = b
            else:
                keep = idx
        cols = self._read(a, b)
        arr = TraceArrays(meta=self.meta, request_id=self.trace.request_id[a:b], position=self.trace.position[a:b],
                          phase=self.trace.phase[a:b], **cols)
        return arr if keep is None else take_rows(arr, keep)


def phase_rows(source, r: int, phase: int) -> TraceArrays:
    """The rows of one phase of request r from any source (files read only those rows)."""
    if isinstance(source, FileSource):
        return source.request(r, phase=phase)
    arr = source.request(r)
    idx = np.flatnonzero(arr.phase == phase)
    return arr if idx.size == len(arr.phase) else take_rows(arr, idx)


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


def build_source(cfg, model):
    """The source a run's `trace` config group names."""
    kind = cfg.trace.kind
    if kind == "synth":
        from .synth import SynthParams, SyntheticTrace

        src = SyntheticTrace(model, SynthParams.from_cfg(cfg.synth), int(cfg.seed))
        src.num_requests, src.name = None, f"synth:{model.name}"
        src.fields = {"request_id", "position", "phase", "ids", "weights", "logits"}
        return src
    if kind == "file":
        path = cfg.trace.get("path")
        if not path:
            raise ValueError("trace=file needs trace.path=<native trace file> (see `python -m lynx_sim.traces`)")
        src = FileSource(Trace(Path(path)))
        check_matches_model(src.meta, model, str(path))
        return src
    raise ValueError(f"trace.kind: expected 'synth' or 'file', found {kind!r}")
