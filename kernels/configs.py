"""Launch configurations of the fused MoE GEMMs, keyed on the batch's shape.

A configuration is BLOCK_M (rows of one expert per program: also the padding unit of the align
step and the roofline's `moe_block_m`), BLOCK_N, BLOCK_K, num_warps and num_stages. They come
from a tuned table (JSON written by `benchmarks/kernels.py --tune` on a GPU: one entry per
(device, dtype, H, I) and bucket of pairs per expert) when one exists for the device, else from
the heuristic below. The heuristic is ours and NOT measured: it follows the usual shape of such
tables (small BLOCK_M for decode, where an expert sees a few tokens; larger tiles for prefill).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parent / "tuned"


@dataclass(frozen=True)
class MoEConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


def bucket(pairs_per_expert: float) -> int:
    """The table key for the mean pairs per active expert: the next power of two (1..4096)."""
    b = 1
    while b < pairs_per_expert and b < 4096:
        b *= 2
    return b


def heuristic(pairs_per_expert: float) -> MoEConfig:
    """Untuned defaults by pairs per active expert (decode: a few; prefill: hundreds)."""
    if pairs_per_expert <= 16:
        return MoEConfig(16, 64, 128, 4, 4)
    if pairs_per_expert <= 64:
        return MoEConfig(32, 64, 64, 4, 4)
    if pairs_per_expert <= 256:
        return MoEConfig(64, 128, 64, 8, 3)
    return MoEConfig(128, 128, 64, 8, 3)


def table_path(device_name: str, dtype_name: str, H: int, I: int) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in device_name)
    return TABLE_DIR / f"{safe}_{dtype_name}_H{H}_I{I}.json"


def load_table(path: Path) -> dict[int, MoEConfig]:
    """A tuned table: {"configs": {"<bucket>": {block_m: ..., ...}}}; clear errors on bad files."""
    try:
        data = json.loads(path.read_text())
        return {int(b): MoEConfig(**c) for b, c in data["configs"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tuned MoE config table ({e})") from None


def select_config(num_pairs: int, distinct_experts: int, H: int, I: int, device_name: str = "",
                  dtype_name: str = "bfloat16") -> MoEConfig:
    """The configuration for one call: tuned entry for the nearest bucket, else the heuristic.
    `distinct_experts` is known on the host where the caller has it (the executor computes it
    from the trace); the kernels themselves never need it."""
    ppe = num_pairs / max(distinct_experts, 1)
    path = table_path(device_name, dtype_name, H, I) if device_name else None
    if path is not None and path.is_file():
        table = load_table(path)
        b = bucket(ppe)
        best = min(table, key=lambda k: (abs(k.bit_length() - b.bit_length()), k))
        if abs(best.bit_length() - b.bit_length()) <= 1:  # a tuned neighbour; far from every entry: heuristic
            return table[best]
    return heuristic(ppe)
