"""Checks shared by the trace writer and reader. Each failure names file, field, expected, found.

Data checks run on blocks of rows so that a reader can stream a trace larger than memory
through them; `row0` is the block's first row, so messages give absolute row numbers. Floats
are checked as stored (the writer rounds them to the stored dtype first), so a file we write
always loads.

Ordering tolerance (`traces/FORMAT.md`, "Validation"): two stored values a >= b "agree" when
a >= b - 4 * eps * m, with eps the stored dtype's relative precision (float16 2^-10, bfloat16
2^-7, float32 2^-23) and m = max(|a|, |b|) for weights, max(1, |a|, |b|) for logits (the
router's softmax ties logits that differ by about its own precision, absolutely). Rounding to the
stored dtype never reverses an order (it is monotone); the tolerance absorbs a producer that
ordered on scores of a slightly different precision than it stored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import TraceFormatError
from .format import FLOAT_DTYPES, FLOAT_EPS, PHASE_DECODE, PHASE_PREFILL, TraceMeta, json_found

if TYPE_CHECKING:
    from .arrays import TraceArrays

INT32 = np.iinfo(np.int32)


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _slack(eps: float, a: np.ndarray, b: np.ndarray, floor: float) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return 4 * eps * np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)


def check_shape(file: str, name: str, shape: tuple[int, ...], expected: tuple[int, ...], symbols: tuple[str, ...]) -> None:
    if tuple(shape) != tuple(expected):
        want = "[" + ", ".join(f"{s}={v}" for s, v in zip(symbols, expected)) + "]"
        raise TraceFormatError(file, name, f"shape {want}", f"shape {list(shape)}")


def check_routing_block(file: str, meta: TraceMeta, row0: int, ids: np.ndarray, weights: np.ndarray | None = None,
                        logits: np.ndarray | None = None, eps: float = FLOAT_EPS["F16"]) -> None:
    """Ids in range and distinct per token-layer; weights and logits finite (weights >= 0); slots
    by falling weight when `ids_ordered`; ids = the router's top-k of the logits when stored.
    ids [n, L, k] int; weights [n, L, k], logits [n, L, E] float32 (stored values); eps: the
    stored float dtype's relative precision."""
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
    if meta.ids_ordered and ids.shape[-1] > 1:
        _check_slot_order(file, meta, row0, ids, weights, logits, eps)
    if logits is not None and meta.ids_follow_logits:
        _check_topk_of_logits(file, meta, row0, ids, logits, eps)


def _check_slot_order(file, meta, row0, ids, weights, logits, eps) -> None:
    """`ids_ordered`: slot j's weight (else its logit) >= slot j+1's, within the tolerance."""
    for name, vals, floor in (("weights", weights, 0.0), ("logits", logits if meta.ids_follow_logits else None, 1.0)):
        if vals is None:
            continue
        v = vals if name == "weights" else np.take_along_axis(vals, ids, -1)  # [n, L, k]
        a, b = v[..., :-1], v[..., 1:]
        rise = b > a + _slack(eps, a, b, floor)
        if rise.any():
            t, l, j = _first_bad(rise)
            raise TraceFormatError(file, "ids_ordered", f"slots by falling {name[:-1]} (ids_ordered=true: "
                                   f"{name}[..., j] >= {name}[..., j+1])",
                                   f"{name[:-1]}s {v[t, l].tolist()} of ids {ids[t, l].tolist()} at row {row0 + t}, layer {l}")


def _check_topk_of_logits(file, meta, row0, ids, z, eps) -> None:
    """The ids are a top-k of the stored logits as the router defines it, ties allowed: softmax
    and sigmoid routers rank experts by logit (both maps are increasing); grouped_topk first keeps
    the `topk_group` groups with the largest best logit. Checked: no expert left out has a logit
    above the smallest chosen one (beyond the tolerance), among the experts the router could pick."""
    n, L, E = z.shape
    chosen = np.take_along_axis(z, ids, -1)  # [n, L, k]
    cmin = chosen.min(-1)  # [n, L]
    rest = z.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    rule = "the k largest logits"
    if meta.router == "grouped_topk" and meta.n_group > 1:
        G, size = meta.n_group, E // meta.n_group
        gmax = z.reshape(n, L, G, size).max(-1)  # [n, L, G] a group's score: its best expert
        thr = np.partition(gmax, G - meta.topk_group, axis=-1)[..., G - meta.topk_group]  # [n, L]
        cg = ids // size  # [n, L, k] groups of the chosen experts
        cgmax = np.take_along_axis(gmax, cg, -1)
        low = cgmax < thr[..., None] - _slack(eps, cgmax, thr[..., None], 1.0)
        if low.any():
            t, l, j = _first_bad(low)
            raise TraceFormatError(file, "ids", f"experts of the topk_group={meta.topk_group} groups with the largest "
                                   f"best logit (grouped_topk router, n_group={G})",
                                   f"expert {int(ids[t, l, j])} of group {int(cg[t, l, j])} (best logit "
                                   f"{float(cgmax[t, l, j]):.5g} < {float(thr[t, l]):.5g}) at row {row0 + t}, layer {l}")
        kept = gmax > thr[..., None] + _slack(eps, gmax, thr[..., None], 1.0)  # kept whatever the tie rule
        np.put_along_axis(kept, cg, True, -1)
        rest[~np.repeat(kept, size, axis=-1)] = -np.inf
        rule = "the k largest logits inside the kept groups"
    omax = rest.max(-1)  # [n, L]
    with np.errstate(invalid="ignore"):
        left_out = omax > cmin + _slack(eps, omax, cmin, 1.0)
    if left_out.any():
        t, l = _first_bad(left_out)
        e_out = int(np.argmax(rest[t, l]))
        e_in = int(ids[t, l][np.argmin(chosen[t, l])])
        raise TraceFormatError(file, "ids", f"the router's top-k of the stored logits ({meta.router}: {rule}, "
                               f"ties within 4 eps allowed)",
                               f"expert {e_out} (logit {float(omax[t, l]):.5g}) left out for expert {e_in} "
                               f"(logit {float(cmin[t, l]):.5g}) at row {row0 + t}, layer {l}")


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
            (t,) = _first_bad(~(np.isfinite(arrival_s) & (arrival_s >= 0)))
            raise TraceFormatError(file, "arrival_s", "finite arrival times >= 0", f"{arrival_s[t]} at row {t}")
        changed = same & (arrival_s[1:] != arrival_s[:-1])
        if changed.any():
            (t,) = _first_bad(changed)
            raise TraceFormatError(file, "arrival_s", "one arrival time per request",
                                   f"{arrival_s[t]} then {arrival_s[t + 1]} inside request {int(request_id[t])}")


def _check_dtype(file: str, name: str, arr, kinds: str, what: str) -> np.ndarray:
    """`arr` as an ndarray whose dtype kind is among `kinds` (numpy kind letters)."""
    a = np.asarray(arr)
    if a.dtype.kind not in kinds:
        raise TraceFormatError(file, name, what, f"dtype {a.dtype}")
    return a


def check_arrays(a: "TraceArrays", file: str = "<memory>", float_dtype: str = "float16") -> None:
    """Full check of an in-memory trace before it is written, floats rounded as they will be stored."""
    meta = a.meta
    meta.check(file)
    ids = _check_dtype(file, "ids", a.ids, "iu", "an integer dtype")
    if ids.ndim != 3:
        raise TraceFormatError(file, "ids", "3 dimensions [N, L, k]", f"shape {list(ids.shape)}")
    N = ids.shape[0]
    check_shape(file, "ids", ids.shape, (N, meta.num_layers, meta.top_k), ("N", "L", "k"))
    cols = {}
    for name in ("request_id", "position", "phase"):
        if getattr(a, name) is None:
            raise TraceFormatError(file, name, "an array [N]", "nothing")
    for name in ("weights", "logits", "arrival_s"):
        if name in meta.missing and getattr(a, name) is not None:
            raise TraceFormatError(file, "missing", f"only what the trace lacks ('{name}' is given)", json_found(list(meta.missing)))
    for name, kinds, what in (("request_id", "iu", "an integer dtype"), ("position", "iu", "an integer dtype"),
                              ("phase", "iu", "an integer dtype"), ("arrival_s", "iuf", "a real dtype")):
        col = getattr(a, name)
        if col is None:
            continue
        col = cols[name] = _check_dtype(file, name, col, kinds, what)
        check_shape(file, name, col.shape, (N,), ("N",))
        if name in ("request_id", "position") and col.size and (col.min() < INT32.min or col.max() > INT32.max):
            raise TraceFormatError(file, name, "values that fit int32", f"{col.min()}..{col.max()}")
    floats = {}
    for name, last, sym in (("weights", meta.top_k, "k"), ("logits", meta.num_experts, "E")):
        v = getattr(a, name)
        if v is None:
            continue
        v = _check_dtype(file, name, v, "f", "a float dtype")
        check_shape(file, name, v.shape, (N, meta.num_layers, last), ("N", "L", sym))
        floats[name] = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(_TORCH[float_dtype]).float().numpy()
    check_token_columns(file, cols["request_id"], cols["position"], cols["phase"], cols.get("arrival_s"))
    check_routing_block(file, meta, 0, ids, floats.get("weights"), floats.get("logits"), FLOAT_EPS[FLOAT_DTYPES[float_dtype]])


_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
