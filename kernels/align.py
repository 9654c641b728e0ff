"""Align a batch's token-expert pairs by expert, padded to the GEMM's block rows.

The grouped GEMMs (fused_moe.py) give each program BLOCK_M rows of one expert. This step sorts
the T x k pairs (pair p = token p // k, slot p % k) by expert, pads every expert's run to a
multiple of BLOCK_M with a sentinel (T x k), and names the expert of every block. Shapes are
static (the worst case T k + E (BLOCK_M - 1) rows) and nothing reads a value back to the host,
so CUDA graphs can capture it; `num_padded` stays on the device and tells the GEMM programs
past the end to exit before they load anything. An expert that received no pair owns no block,
so no program reads its weights. Slots a policy dropped (id -1) join no expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Alignment:
    sorted_pairs: torch.Tensor  # [max_rows] int32: pair index per row, sentinel T*k on padding
    block_expert: torch.Tensor  # [max_blocks] int32: expert of each block (-1 past the end)
    num_padded: torch.Tensor  # [1] int32: rows in use (a multiple of block_m)
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.numel()


def max_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows the padded layout can need: every expert's run rounded up, over all experts."""
    return -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """topk_ids [T, k] (int, -1 = dropped) -> the padded, expert-sorted layout."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected [T, k], found shape {list(topk_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two, found {block_m}")
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    P = flat.numel()
    E = num_experts
    live = flat >= 0
    key = torch.where(live, flat, E)  # dropped pairs sort last, into a bin no block reads
    counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    start = torch.cumsum(padded, 0) - padded  # [E] first row of each expert's run
    first = torch.cumsum(counts, 0) - counts  # [E] first pair of each expert in sorted order
    order = torch.sort(key, stable=True).indices  # pairs by expert, in pair order inside one
    sorted_key = key[order]
    rank = torch.arange(P, device=dev) - first.gather(0, sorted_key.clamp_max(E - 1))  # place inside its expert
    rows = max_rows(P, E, block_m)
    dest = torch.where(sorted_key < E, start.gather(0, sorted_key.clamp_max(E - 1)) + rank, rows)  # dropped: off the end
    sorted_pairs = torch.full((rows + 1,), P, dtype=torch.int32, device=dev)
    sorted_pairs.scatter_(0, dest, order.to(torch.int32))
    total = padded.sum()
    blocks = rows // block_m
    block_start = torch.arange(blocks, device=dev) * block_m
    ends = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    block_expert = torch.where(block_start < total, block_expert, -1)
    return Alignment(sorted_pairs[:rows], block_expert, total.reshape(1).to(torch.int32), block_m)
