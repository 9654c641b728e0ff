"""Launch configurations of the fused MoE GEMMs, keyed on the batch's tokens and distinct experts.

A configuration is BLOCK_M (rows of one expert per program: also the padding unit of the align
step and the roofline's `moe_block_m`), BLOCK_N, BLOCK_K, num_warps and num_stages. The number
of tokens and the number of distinct experts decide the best one together: their ratio is the
rows an expert's tiles hold (BLOCK_M), and the distinct experts times the column tiles are the
programs that must fill the GPU (BLOCK_N, warps). So a tuned table (JSON written by
`benchmarks/kernels.py --tune` on a GPU, one file per device, dtype and layer shape E, k, H, I)
holds one entry per (tokens, distinct experts) pair of power-of-two buckets, and a call takes
the nearest entry within one bucket on both axes. Without a near entry (no table for the GPU, or
a prefill-sized batch far from the tuned decode batches) the heuristic below is used: ours, NOT
measured, it follows the usual shape of such tables (small BLOCK_M for decode, where an expert
sees a few tokens; larger tiles for prefill).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

TABLE_DIR = Path(__file__).resolve().parent / "tuned"
MAX_BUCKET = 1 << 16


@dataclass(frozen=True)
class MoEConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LayerShape:
    """What a tuned table is specific to: experts, experts per token, hidden and expert width."""

    E: int
    k: int
    H: int
    I: int


def bucket(n: float) -> int:
    """A table key: the next power of two of `n` (1 .. 65536)."""
    b = 1
    while b < n and b < MAX_BUCKET:
        b *= 2
    return b


def heuristic(pairs_per_expert: float) -> MoEConfig:
    """Untuned defaults by token-expert pairs per active expert (decode: a few; prefill: hundreds)."""
    if pairs_per_expert <= 16:
        return MoEConfig(16, 64, 128, 4, 4)
    if pairs_per_expert <= 64:
        return MoEConfig(32, 64, 64, 4, 4)
    if pairs_per_expert <= 256:
        return MoEConfig(64, 128, 64, 8, 3)
    return MoEConfig(128, 64, 64, 8, 3)  # 128 x 128 spills registers on sm_90 (python -m executor.aot)


def table_path(device_name: str, dtype_name: str, shape: LayerShape) -> Path:
    safe = "".join(c if c.isalnum() else "_" for c in device_name)
    return TABLE_DIR / f"{safe}_{dtype_name}_E{shape.E}_k{shape.k}_H{shape.H}_I{shape.I}.json"


def load_table(path: Path) -> dict[tuple[int, int], MoEConfig]:
    """A tuned table, {(tokens bucket, distinct bucket): config}, from
    {"entries": [{"tokens": 16, "distinct": 8, "config": {block_m: ..., ...}}, ...]}; bad files
    get an error naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a tuned MoE config table ({e})") from None
    names = {f.name for f in fields(MoEConfig)}
    table = {}
    for i, entry in enumerate(data.get("entries", []) if isinstance(data, dict) else []):
        where = f"{path}: entries[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise ValueError(f"{where}: expected {{tokens, distinct, config}}, found {entry!r}")
        t, d, c = entry.get("tokens"), entry.get("distinct"), entry["config"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v == bucket(v) for v in (t, d)):
            raise ValueError(f"{where}: tokens and distinct: expected powers of two >= 1, found {t!r} and {d!r}")
        if set(c) != names or not all(isinstance(v, int) and v >= 1 for v in c.values()):
            raise ValueError(f"{where}: config: expected positive ints {sorted(names)}, found {c!r}")
        table[(t, d)] = MoEConfig(**c)
    if not table:
        raise ValueError(f"{path}: not a tuned MoE config table (no 'entries')")
    return table


def nearest(table: dict[tuple[int, int], MoEConfig], tokens: int, distinct: int) -> MoEConfig | None:
    """The entry within one power of two of (tokens, distinct) on both axes, nearest first (ties:
    the smaller batch); None when there is none."""
    tb, db = bucket(tokens).bit_length(), bucket(distinct).bit_length()

    def dist(key):
        dt, dd = abs(key[0].bit_length() - tb), abs(key[1].bit_length() - db)
        return max(dt, dd), dt + dd, key

    best = min(table, key=dist)
    return table[best] if dist(best)[0] <= 1 else None


@lru_cache(maxsize=64)
def _cached_table(path: str, mtime_ns: int) -> dict[tuple[int, int], MoEConfig]:
    return load_table(Path(path))


def select_config(tokens: int, distinct_experts: int, shape: LayerShape, device_name: str = "",
                  dtype_name: str = "bfloat16", pairs: int | None = None) -> MoEConfig:
    """The configuration for one call. `tokens`: the batch's tokens; `distinct_experts`: the
    experts that received at least one of them (known on the host where the caller has it; the
    executor takes it from the trace; the kernels themselves never need it); `pairs`: the live
    token-expert pairs when a policy dropped slots (default tokens x k), for the heuristic."""
    path = table_path(device_name, dtype_name, shape) if device_name else None
    if path is not None and path.is_file():
        hit = nearest(_cached_table(str(path), path.stat().st_mtime_ns), tokens, distinct_experts)
        if hit is not None:
            return hit
    return heuristic((tokens * shape.k if pairs is None else pairs) / max(distinct_experts, 1))
