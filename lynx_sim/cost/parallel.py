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
