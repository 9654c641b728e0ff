"""How one model is spread over GPUs, and the collectives that costs (`parallel` in conf/config.yaml).

Two layouts, the common ones for MoE decode:
- tensor parallel (expert_parallel: false): every weight matrix, experts included, is split
  over `gpus` ranks; each layer ends its attention and its MoE block with an all-reduce of the
  batch's hidden states;
- expert parallel (expert_parallel: true), in the DeepSeek-V3 serving style: attention and dense
  layers are data-parallel (each rank holds a replica and ceil(B / gpus) of the tokens); the E
  experts are split into `gpus` contiguous blocks, one per rank; tokens reach their experts by
  an all-to-all dispatch and come back by an all-to-all combine; the slowest rank gates the layer.
Collectives follow the usual bandwidth models: a ring all-reduce moves 2 (g - 1) / g of the
message over each link; an all-to-all (dispatch, then combine) moves each rank's remote share
once each way (roofline.py); both pay a fixed
latency (`collective_latency_us` of the hardware, assumed until measured).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Parallel:
    gpus: int = 1
    expert_parallel: bool = False

    def __post_init__(self):
        if not isinstance(self.gpus, int) or self.gpus < 1:
            raise ValueError(f"parallel.gpus: expected an integer >= 1, found {self.gpus!r}")

    @classmethod
    def from_cfg(cls, p) -> "Parallel":
        return cls(int(p.get("gpus", 1)), bool(p.get("expert_parallel", False))) if p is not None else cls()

    @property
    def tp(self) -> int:
        """Ranks that split each dense and attention weight."""
        return 1 if self.expert_parallel else self.gpus


def allreduce_s(message_bytes: float, gpus: int, link_Bps: float, latency_s: float) -> float:
    """Ring all-reduce of `message_bytes` over `gpus` ranks (0 on one GPU)."""
    if gpus == 1:
        return 0.0
    return 2.0 * (gpus - 1) / gpus * message_bytes / link_Bps + latency_s


@dataclass(frozen=True)
class AllReduceParams:
    """A fitted all-reduce: per group size g (`num_gpus`), a latency and a bus bandwidth.

        t(bytes, g) = latency_us[g] + 2 (g - 1) / g x bytes / bus_Bps[g]

    the ring model of `allreduce_s` with its latency and link bandwidth measured per g (vLLM's
    custom all-reduce under CUDA graphs; lynx_sim/measured/allreduce_fit.py). Keys are str(g) (JSON)."""

    latency_us: dict
    bus_Bps: dict


def allreduce_fitted_s(message_bytes, gpus, p: AllReduceParams):
    """Seconds of one all-reduce of `message_bytes` over `gpus` ranks (arrays broadcast; 0 on one GPU)."""
    import numpy as np

    b, g = np.broadcast_arrays(np.asarray(message_bytes, dtype=np.float64), np.asarray(gpus))
    out = np.zeros(b.shape)
    for gi in np.unique(g):
        if gi == 1:
            continue
        if str(int(gi)) not in p.latency_us:
            raise ValueError(f"all-reduce over {int(gi)} GPUs: not fitted (fitted: {sorted(p.latency_us)})")
        sel = g == gi
        out[sel] = p.latency_us[str(int(gi))] * 1e-6 + 2.0 * (gi - 1) / gi * b[sel] / p.bus_Bps[str(int(gi))]
    return out
