"""The routing profile: the routing that rules learning from trace statistics (layer_k, prune, sere) learn from.

Taken from requests the run does not replay where the source allows it: the synthetic
generator's requests 1,000,000 onwards (held out), else the first requests of the trace file
(in-sample, which the summary says). Decode tokens when the trace has any, else all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..traces.source import Source

HELD_OUT_OFFSET = 1_000_000


@dataclass
class RoutingProfile:
    ids: torch.Tensor  # [N, L, k] int64
    weights: torch.Tensor | None  # [N, L, k]
    logits: torch.Tensor | None  # [N, L, E]
    num_experts: int
    held_out: bool  # False: drawn from the requests the run also replays

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    def expert_frequency(self) -> torch.Tensor:
        """Fraction of tokens that use each expert, [L, E]."""
        L, E = self.num_layers, self.num_experts
        counts = torch.zeros(L, E, dtype=torch.float64)
        counts.scatter_add_(1, self.ids.permute(1, 0, 2).reshape(L, -1), torch.ones(L, self.ids.numel() // L, dtype=torch.float64))
        return counts / self.ids.shape[0]

    def sorted_weights(self) -> torch.Tensor:
        """Each token's top-k weights normalised to sum 1, falling, [N, L, k] (uniform without weights)."""
        if self.weights is None:
            k = self.ids.shape[-1]
            return torch.full(self.ids.shape, 1.0 / k, dtype=torch.float64)
        w = self.weights.double().sort(-1, descending=True).values
        return w / w.sum(-1, keepdim=True).clamp_min(1e-30)

    @classmethod
    def from_source(cls, source: Source, max_tokens: int = 4096) -> "RoutingProfile":
        """From `source`'s requests (`Source.request`): held out, past HELD_OUT_OFFSET, when the
        source is endless (num_requests None: the generator), else its first requests."""
        R = source.num_requests
        held_out = R is None
        parts, total, r = [], 0, 0
        while total < max_tokens and (R is None or r < R):
            a = source.request(HELD_OUT_OFFSET + r if held_out else r)
            rows = np.flatnonzero(a.phase == 1) if (a.phase == 1).any() or held_out else np.arange(len(a.phase))
            if rows.size:
                parts.append((a, rows))
                total += rows.size
            r += 1
        return cls._from_parts(parts, held_out, max_tokens)

    @classmethod
    def from_arrays(cls, arrays, held_out: bool, max_tokens: int = 4096) -> "RoutingProfile":
        """From routing in memory (TraceArrays, e.g. just recorded from a model): their decode
        rows when any has some, else all rows."""
        decode = any((a.phase == 1).any() for a in arrays)
        parts = [(a, np.flatnonzero(a.phase == 1) if decode else np.arange(len(a.phase))) for a in arrays]
        return cls._from_parts([(a, rows) for a, rows in parts if rows.size], held_out, max_tokens)

    @classmethod
    def _from_parts(cls, parts, held_out: bool, max_tokens: int) -> "RoutingProfile":
        if not parts:
            raise ValueError("routing profile: the trace has no tokens to learn from")

        def cat(name):
            if getattr(parts[0][0], name) is None:
                return None
            return torch.from_numpy(np.concatenate([getattr(a, name)[rows] for a, rows in parts])[:max_tokens])

        ids = cat("ids").long()
        return cls(ids, cat("weights"), cat("logits"), parts[0][0].meta.num_experts, held_out)
