"""Checks shared by the trace writer and reader. Each failure names file, field, expected, found.

Data checks run on blocks of rows so that a reader can stream a trace larger than memory
through them; `row0` is the block's first row, so messages give absolute row numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import TraceFormatError
from .format import PHASE_DECODE, PHASE_PREFILL, TraceMeta

if TYPE_CHECKING:
    from .writer import TraceArrays


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def check_shape(file: str, name: str, shape: tuple[int, ...], expected: tuple[int, ...], symbols: tuple[str, ...]) -> None:
    if tuple(shape) != tuple(expected):
        want = "[" + ", ".join(f"{s}={v}" for s, v in zip(symbols, expected)) + "]"
        raise TraceFormatError(file, name, f"shape {want}", f"shape {list(shape)}")


def check_routing_block(file: str, meta: TraceMeta, row0: int, ids: np.ndarray,
                        weights: np.ndarray | None = None, logits: np.ndarray | None = None) -> None:
    """Ids in range and distinct per token-layer; weights and logits finite (weights >= 0)."""
    E = meta.num_experts
    bad = (ids < 0) | (ids >= E)
    if bad.any():
        t, l, j = _first_bad(bad)
        raise TraceFormatError(file, "ids", f"expert ids in 0..{E - 1} (num_experts={E})",
                               f"{int(ids[t, l, j])} at row {row0 + t}, layer {l}, slot {j}")
    if ids.shape[-1] > 1:
        s = np.sort(ids, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]).any(-1)
        if dup.any():
            t, l = _first_bad(dup)
            raise TraceFormatError(file, "ids", "k distinct expert ids per token and layer",
                                   f"repeated id in {ids[t, l].tolist()} at row {row0 + t}, layer {l}")
    for name, arr in (("weights", weights), ("logits", logits)):
        if arr is None:
            continue
        nonfinite = ~np.isfinite(arr)
        if nonfinite.any():
            t, l, j = _first_bad(nonfinite)
            raise TraceFormatError(file, name, "finite values", f"{arr[t, l, j]} at row {row0 + t}, layer {l}, index {j}")
    if weights is not None and (weights < 0).any():
        t, l, j = _first_bad(weights < 0)
        raise TraceFormatError(file, "weights", "gate weights >= 0", f"{weights[t, l, j]} at row {row0 + t}, layer {l}")


def check_token_columns(file: str, request_id: np.ndarray, position: np.ndarray, phase: np.ndarray,
                        arrival_s: np.ndarray | None = None) -> None:
    """Requests contiguous, positions increasing inside a request, phases known, arrivals per request."""
    if request_id.size == 0:
        raise TraceFormatError(file, "request_id", "at least one token", "an empty trace")
    bad_phase = (phase != PHASE_PREFILL) & (phase != PHASE_DECODE)
    if bad_phase.any():
        (t,) = _first_bad(bad_phase)
        raise TraceFormatError(file, "phase", "0 (prefill) or 1 (decode)", f"{int(phase[t])} at row {t}")
    starts = np.flatnonzero(np.r_[True, request_id[1:] != request_id[:-1]])
    firsts = request_id[starts]
    if np.unique(firsts).size != firsts.size:
        vals, counts = np.unique(firsts, return_counts=True)
        raise TraceFormatError(file, "request_id", "the tokens of each request in one contiguous run",
                               f"request {int(vals[counts > 1][0])} split into several runs")
    same = request_id[1:] == request_id[:-1]
    back = same & (position[1:] <= position[:-1])
    if back.any():
        (t,) = _first_bad(back)
        raise TraceFormatError(file, "position", "strictly increasing positions inside a request",
                               f"{int(position[t])} then {int(position[t + 1])} at rows {t}-{t + 1}")
    if arrival_s is not None:
        if not np.isfinite(arrival_s).all() or (arrival_s < 0).any():
            raise TraceFormatError(file, "arrival_s", "finite arrival times >= 0", "a negative or non-finite value")
        changed = same & (arrival_s[1:] != arrival_s[:-1])
        if changed.any():
            (t,) = _first_bad(changed)
            raise TraceFormatError(file, "arrival_s", "one arrival time per request",
                                   f"{arrival_s[t]} then {arrival_s[t + 1]} inside request {int(request_id[t])}")


def check_arrays(a: "TraceArrays", file: str = "<memory>") -> None:
    """Full check of an in-memory trace before it is written."""
    meta = a.meta
    meta.check(file)
    if a.ids.ndim != 3:
        raise TraceFormatError(file, "ids", "3 dimensions [N, L, k]", f"shape {list(a.ids.shape)}")
    N = a.ids.shape[0]
    check_shape(file, "ids", a.ids.shape, (N, meta.num_layers, meta.top_k), ("N", "L", "k"))
    if not np.issubdtype(a.ids.dtype, np.integer):
        raise TraceFormatError(file, "ids", "an integer dtype", str(a.ids.dtype))
    for name in ("request_id", "position", "phase", "arrival_s"):
        col = getattr(a, name)
        if col is not None:
            check_shape(file, name, np.shape(col), (N,), ("N",))
    if a.weights is not None:
        check_shape(file, "weights", a.weights.shape, (N, meta.num_layers, meta.top_k), ("N", "L", "k"))
    if a.logits is not None:
        check_shape(file, "logits", a.logits.shape, (N, meta.num_layers, meta.num_experts), ("N", "L", "E"))
    check_token_columns(file, np.asarray(a.request_id), np.asarray(a.position), np.asarray(a.phase),
                        None if a.arrival_s is None else np.asarray(a.arrival_s))
    check_routing_block(file, meta, 0, np.asarray(a.ids), a.weights, a.logits)
