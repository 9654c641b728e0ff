"""A trace held in memory: `TraceArrays` (one row per token) and `concat_arrays`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .format import TraceMeta


@dataclass
class TraceArrays:
    """A whole trace in memory. Rows are tokens, grouped by request, in generation order."""

    meta: TraceMeta
    request_id: np.ndarray  # [N] int
    position: np.ndarray  # [N] int
    phase: np.ndarray  # [N] 0 = prefill, 1 = decode
    ids: np.ndarray  # [N, L, k] int
    weights: np.ndarray | None = None  # [N, L, k] float
    logits: np.ndarray | None = None  # [N, L, E] float
    arrival_s: np.ndarray | None = None  # [N] float, same value for every token of a request

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])


def concat_arrays(parts: list[TraceArrays]) -> TraceArrays:
    """Requests of one meta, concatenated (optional fields kept where every part has them)."""
    if not parts:
        raise ValueError("concat: no requests")

    def cat(name):
        cols = [getattr(a, name) for a in parts]
        return None if any(c is None for c in cols) else np.concatenate(cols)

    return TraceArrays(meta=parts[0].meta, request_id=cat("request_id"), position=cat("position"), phase=cat("phase"),
                       ids=cat("ids"), weights=cat("weights"), logits=cat("logits"), arrival_s=cat("arrival_s"))
