"""Align a batch's token-expert pairs by expert, padded to the GEMM's block rows.

The grouped GEMMs (fused_moe.py) give each program BLOCK_M rows of one expert. This step sorts
the T x k pairs (pair p = token p // k, slot p % k) by expert, pads every expert's run to a
multiple of BLOCK_M with a sentinel (T x k), and names the expert of every block. Shapes are
static (the worst case T k + E (BLOCK_M - 1) rows) and nothing reads a value back to the host,
so CUDA graphs can capture it; `num_padded` stays on the device and tells the GEMM programs
past the end to exit before they load anything. An expert that received no pair owns no block,
so no program reads its weights. Slots a policy dropped (id -1) join no expert.

Two implementations with the same output (tested bit for bit): one Triton program for decode
batches (up to MAX_FUSED_PAIRS pairs: one launch), and torch ops (any size; a dozen launches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_FUSED_PAIRS = 4096  # up to this many pairs (decode batches) the align step is one Triton program


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


@triton.jit
def _align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, scratch_ptr, P, E, rows, blocks,
                  BM: tl.constexpr, BP: tl.constexpr, NB: tl.constexpr, MAXB: tl.constexpr, CH: tl.constexpr):
    """The whole align step in one program (P <= BP pairs): per-expert counts, padded runs, a
    sort of (expert, pair) keys for the stable order inside each expert, the scatter, and each
    block's expert; one launch instead of a dozen small torch kernels."""
    p = tl.arange(0, BP)
    ids = tl.load(ids_ptr + p, mask=p < P, other=NB - 1)
    ids = tl.where(ids < 0, E, ids)  # dropped slots: bin E, no block reads it
    e = tl.arange(0, NB)
    live_e = e < E
    cnt = tl.where(live_e, tl.histogram(ids, NB), 0)
    padded = (cnt + BM - 1) // BM * BM
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(num_padded_ptr, total)
    tl.store(scratch_ptr + e, ends - padded)  # first row of each expert's run
    tl.store(scratch_ptr + NB + e, tl.cumsum(cnt, 0) - cnt)  # first pair of each expert in sorted order
    tl.store(scratch_ptr + 2 * NB + e, ends)
    for r0 in range(0, tl.cdiv(rows, BP)):  # every row starts as padding
        r = r0 * BP + p
        tl.store(sorted_ptr + r, P, mask=r < rows)
    tl.debug_barrier()
    s = tl.sort(ids * BP + p)  # by expert, then by pair
    se = s // BP
    live = se < E
    safe = tl.where(live, se, 0)
    dest = tl.load(scratch_ptr + safe) + p - tl.load(scratch_ptr + NB + safe)
    tl.store(sorted_ptr + dest, s % BP, mask=live)
    b = tl.arange(0, MAXB)
    start = b * BM
    owner = tl.zeros((MAXB,), dtype=tl.int32)
    for e0 in range(0, tl.cdiv(E, CH)):  # block b belongs to the number of runs that end at or before it
        ec = e0 * CH + tl.arange(0, CH)
        end_c = tl.load(scratch_ptr + 2 * NB + ec, mask=ec < E, other=2147483647)
        owner += tl.sum((end_c[None, :] <= start[:, None]).to(tl.int32), 1)
    tl.store(block_expert_ptr + b, tl.where(start < total, owner, -1), mask=b < blocks)


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int, fused: bool | None = None) -> Alignment:
    """topk_ids [T, k] (int, -1 = dropped) -> the padded, expert-sorted layout. `fused`: one
    Triton program (default where it fits: up to MAX_FUSED_PAIRS pairs, on a GPU or under the
    interpreter) or the torch ops below; both give the same layout (tested)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids: expected [T, k], found shape {list(topk_ids.shape)}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m: expected a power of two, found {block_m}")
    P = topk_ids.numel()
    if fused is None:
        import os

        fused = 0 < P <= MAX_FUSED_PAIRS and (topk_ids.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if fused:
        return _align_fused(topk_ids, num_experts, block_m)
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


def _align_fused(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    P, E = topk_ids.numel(), num_experts
    if P > MAX_FUSED_PAIRS:
        raise ValueError(f"align: the fused kernel takes up to {MAX_FUSED_PAIRS} pairs, found {P}")
    dev = topk_ids.device
    rows = max_rows(P, E, block_m)
    blocks = rows // block_m
    nb = triton.next_power_of_2(E + 1)
    sorted_pairs = torch.empty(rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    scratch = torch.empty(3 * nb, dtype=torch.int32, device=dev)
    _align_kernel[(1,)](topk_ids.reshape(-1).to(torch.int32), sorted_pairs, block_expert, num_padded, scratch, P, E,
                        rows, blocks, BM=block_m, BP=max(triton.next_power_of_2(P), 16), NB=nb,
                        MAXB=triton.next_power_of_2(blocks), CH=min(nb, 64), num_warps=8)
    return Alignment(sorted_pairs, block_expert, num_padded, block_m)
