"""Routing statistics of a trace: the quantities the synthetic presets are fitted to.

Definitions (also in docs/metrics.md). Tokens used: decode tokens when the trace has any, else
all tokens. S_t(l) is the set of expert ids of token t at layer l.
- union_fraction[B]: mean over layers and `draws` random draws of |U_t S_t(l)| / E, where a draw
  takes one random token from each of B distinct random sequences (sequences repeat only when
  fewer than B exist).
- adjacent_overlap: mean over consecutive token pairs of one sequence of |S_t ∩ S_t+1| / k,
  per layer and its mean over layers.
- load_cv: per layer, std / mean (population std) of the per-expert assignment counts; median.
- top1_weight_mean: mean of max_j w_j / sum_j w_j (the top-1 share of top-k weight).
"""

from __future__ import annotations

import numpy as np

from .reader import Trace

UNION_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_CELLS = 1 << 24  # elements of the largest temporary array; with E, k and L bounded (format.py), every
# statistic's memory is O(MAX_CELLS + the ids it reads), whatever sizes the metadata announces


def _eligible(trace: Trace) -> tuple[np.ndarray, str]:
    decode = trace.phase == 1
    return (decode, "decode") if decode.any() else (np.ones_like(decode), "all")


def _load_ids(trace: Trace, mask: np.ndarray) -> np.ndarray:
    """ids of the rows where `mask` holds, as int16 (int32 above E = 32767) to keep large traces small: [n, L, k]."""
    dtype = np.int16 if trace.meta.num_experts <= np.iinfo(np.int16).max else np.int32
    parts = [block["ids"][mask[a:a + len(block["ids"])]].astype(dtype)
             for a, block in trace.iter_blocks(("ids",))]
    return np.concatenate(parts)


def union_fraction(ids: np.ndarray, seq_start: np.ndarray, seq_count: np.ndarray, num_experts: int,
                   batches=UNION_BATCHES, draws: int = 400, seed: int = 0, chunk: int = 50) -> dict[str, float]:
    """ids: [n, L, k] of eligible tokens grouped by sequence; sequence s owns rows
    seq_start[s] : seq_start[s] + seq_count[s]. Returns {str(B): mean union fraction}."""
    rng = np.random.default_rng(seed)
    R, L = len(seq_start), ids.shape[1]
    out = {}
    for B in batches:
        total = 0.0
        chunk = max(1, min(chunk, MAX_CELLS // (B * L * ids.shape[2])))  # [D, B, L, k] stays bounded
        for d0 in range(0, draws, chunk):
            D = min(chunk, draws - d0)
            if R >= B:
                seqs = np.argsort(rng.random((D, R)), axis=1)[:, :B]  # [D, B] distinct
            else:
                seqs = rng.integers(0, R, size=(D, B))
            rows = seq_start[seqs] + (rng.random((D, B)) * seq_count[seqs]).astype(np.int64)
            sel = np.sort(ids[rows].transpose(0, 2, 1, 3).reshape(D, L, -1), axis=-1)  # [D, L, B*k]
            distinct = 1 + (sel[..., 1:] != sel[..., :-1]).sum(-1)  # [D, L] |U_t S_t(l)|: O(B k), not O(E)
            total += distinct.mean(-1).sum() / num_experts
        out[str(B)] = float(total / draws)
    return out


def adjacent_overlap(ids: np.ndarray, pair_first: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Per layer mean of |S_t ∩ S_t+1| / k over the pairs (t, t+1) listed by `pair_first`: [L]."""
    k, L = ids.shape[2], ids.shape[1]
    chunk = max(1, min(chunk, MAX_CELLS // (L * k * k)))  # the [P, L, k, k] comparison stays bounded
    acc = np.zeros(L)
    for a in range(0, len(pair_first), chunk):
        t = pair_first[a:a + chunk]
        same = ids[t][..., :, None] == ids[t + 1][..., None, :]  # [P, L, k, k]
        acc += same.sum(axis=(-1, -2)).sum(0)
    return acc / max(len(pair_first), 1) / k


def load_cv(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Per layer coefficient of variation of expert assignment counts: [L]."""
    cv = np.empty(ids.shape[1])
    for l in range(ids.shape[1]):  # one layer's counts at a time: O(E) memory, not O(L E)
        counts = np.bincount(ids[:, l].ravel(), minlength=num_experts)
        mean = counts.mean()
        cv[l] = counts.std() / (mean if mean > 0 else 1)
    return cv


def trace_stats(trace: Trace, draws: int = 400, seed: int = 0, batches=UNION_BATCHES) -> dict:
    """All statistics of one trace as a JSON-ready dict."""
    meta = trace.meta
    mask, used = _eligible(trace)
    rows = np.flatnonzero(mask)
    ids = _load_ids(trace, mask)  # [n, L, k]
    seq_of_row = np.searchsorted(trace.request_offsets, rows, side="right") - 1
    seqs, seq_start, seq_count = np.unique(seq_of_row, return_index=True, return_counts=True)
    # consecutive eligible rows of one sequence whose positions differ by one
    pos = trace.position[rows]
    adj = (seq_of_row[1:] == seq_of_row[:-1]) & (pos[1:] == pos[:-1] + 1)
    per_layer_overlap = adjacent_overlap(ids, np.flatnonzero(adj))
    cv = load_cv(ids, meta.num_experts)
    out = {
        "model": meta.model,
        "num_experts": meta.num_experts,
        "top_k": meta.top_k,
        "num_layers": meta.num_layers,
        "tokens_used": used,
        "num_tokens": int(len(rows)),
        "num_sequences": int(len(seqs)),
        "union_draws": draws,
        "union_fraction": union_fraction(ids, seq_start, seq_count, meta.num_experts, batches, draws, seed),
        "union_fraction_null": {str(B): float(1 - (1 - meta.top_k / meta.num_experts) ** B) for B in batches},
        "adjacent_overlap": {"mean": float(per_layer_overlap.mean()), "chance": meta.top_k / meta.num_experts,
                             "pairs": int(adj.sum()), "per_layer": [round(float(x), 6) for x in per_layer_overlap]},
        "load_cv": {"median": float(np.median(cv)), "per_layer": [round(float(x), 6) for x in cv]},
    }
    if trace.has("weights"):
        num = den = 0.0
        for row0, block in trace.iter_blocks(("weights",)):
            w = block["weights"][mask[row0:row0 + len(block["weights"])]]
            s = w.sum(-1)
            share = w.max(-1) / np.where(s > 0, s, 1)
            num, den = num + share.sum(), den + share.size
        out["top1_weight_mean"] = float(num / max(den, 1))
    return out
