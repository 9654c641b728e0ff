"""Lynx routing on the GPU in four Triton kernels (../shared/LYNX.md section 3), softmax routers
with a beta floor, float32 arithmetic, the plugin's lowest-index tie-break:

1. `_bin_kernel`, per token: bin = max(-beta, ceil(alpha (z - max z))), and the token's top-k
   softmax mass (for models that do not renormalise);
2. `_colsum_kernel`, per layer and expert block: S[e] = sum_j n_j[e] x B**-j, tokens per level
   counted exactly and summed level by level (the order the torch policy uses);
3. `_pick_kernel`, per token: key = bin + (S - B**bin) / B, k argmaxes (ties to the lowest index),
   and an integer count per picked expert (KEEP = count > 0);
4. `_remap_kernel`, per token: the k largest logits inside KEEP and their softmax (times the
   mass when the router does not renormalise).

No host synchronisation and static shapes ([L, B, E] in, [L, B, k] out), so a CUDA graph can
capture the four launches. Exactness against the torch policy (`lynx_sim.policies.lynx.Lynx`,
arithmetic float32): bins, S, keys, picks, KEEP and ids are bit-identical: B**-j comes from the
same torch.pow, division is IEEE (`div_rn`, not Triton's approximate `/`), and the kernels are
compiled without FMA contraction, so each multiply and add rounds as torch's separate kernels
do. Weights use Triton's exp and reductions: equal to float32 rounding (tested to 1e-6).
Sigmoid and grouped top-k routers are not covered here (the executor runs the torch policy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_moe import _interpreting


@triton.jit
def _first_max(x, offs, BLOCK_E: tl.constexpr):
    """The lowest index holding the maximum of x (the plugin's tie-break, spelled out rather
    than left to tl.argmax's tie rule)."""
    return tl.min(tl.where(x == tl.max(x, 0), offs, BLOCK_E), 0)


@triton.jit
def _bin_kernel(z_ptr, bins_ptr, mass_ptr, E, alpha, beta,
                K: tl.constexpr, BLOCK_E: tl.constexpr, WITH_MASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    z = tl.load(z_ptr + row * E + offs, mask=m, other=float("-inf"))
    zmax = tl.max(z, 0)
    b = tl.maximum(tl.math.ceil(alpha * (z - zmax)), -beta)
    tl.store(bins_ptr + row * E + offs, b, mask=m)
    if WITH_MASS:
        top = 0.0
        rest = z
        for _ in tl.static_range(K):
            v = tl.max(rest, 0)
            top += tl.exp(v - zmax)
            rest = tl.where(offs == _first_max(rest, offs, BLOCK_E), float("-inf"), rest)
        total = tl.sum(tl.where(m, tl.exp(z - zmax), 0.0), 0)
        tl.store(mass_ptr + row, top / total)


@triton.jit
def _colsum_kernel(bins_ptr, table_ptr, s_ptr, B, E,
                   J: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    s = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for j in tl.static_range(J):
        n = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for t0 in range(0, tl.cdiv(B, BLOCK_B)):
            offs_t = t0 * BLOCK_B + tl.arange(0, BLOCK_B)
            ok = (offs_t < B)[:, None] & e_ok[None, :]
            b = tl.load(bins_ptr + (layer * B + offs_t[:, None]) * E + offs_e[None, :], mask=ok, other=1.0)
            n += tl.sum((b == -j).to(tl.int32), 0)
        s = s + n.to(tl.float32) * tl.load(table_ptr + j)  # two roundings: no FMA (enable_fp_fusion=False)
    tl.store(s_ptr + layer * E + offs_e, s, mask=e_ok)


@triton.jit
def _pick_kernel(bins_ptr, s_ptr, table_ptr, count_ptr, key_ptr, B, E, b_float,
                 K: tl.constexpr, BLOCK_E: tl.constexpr, STORE_KEY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    layer = row // B
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    b = tl.load(bins_ptr + row * E + offs, mask=m, other=0.0)
    w = tl.load(table_ptr + (-b).to(tl.int32), mask=m, other=1.0)  # B**bin, the same float32 values as torch.pow
    s = tl.load(s_ptr + layer * E + offs, mask=m, other=0.0)
    key = tl.where(m, b + tl.math.div_rn(s - w, b_float), float("-inf"))
    if STORE_KEY:  # for tests: the keys themselves, compared bit for bit with the policy's
        tl.store(key_ptr + row * E + offs, key, mask=m)
    for _ in tl.static_range(K):
        i = _first_max(key, offs, BLOCK_E)
        tl.atomic_add(count_ptr + layer * E + i, 1)
        key = tl.where(offs == i, float("-inf"), key)


@triton.jit
def _remap_kernel(z_ptr, count_ptr, mass_ptr, ids_ptr, w_ptr, B, E,
                  K: tl.constexpr, BLOCK_E: tl.constexpr, WITH_MASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    layer = row // B
    offs = tl.arange(0, BLOCK_E)
    m = offs < E
    z = tl.load(z_ptr + row * E + offs, mask=m, other=0.0)
    keep = tl.load(count_ptr + layer * E + offs, mask=m, other=0) > 0
    zz = tl.where(keep & m, z, float("-inf"))
    top = tl.max(zz, 0)
    chosen = offs < 0
    rest = zz
    for j in tl.static_range(K):
        i = _first_max(rest, offs, BLOCK_E)
        tl.store(ids_ptr + row * K + j, i.to(tl.int64))
        chosen = chosen | (offs == i)
        rest = tl.where(offs == i, float("-inf"), rest)
    ex = tl.where(chosen, tl.exp(zz - top), 0.0)
    wv = ex / tl.sum(ex, 0)
    if WITH_MASS:
        wv = wv * tl.load(mass_ptr + row)
    rest = zz
    for j in tl.static_range(K):  # the same argmax order again, to write each slot's weight
        i = _first_max(rest, offs, BLOCK_E)
        tl.store(w_ptr + row * K + j, tl.sum(tl.where(offs == i, wv, 0.0), 0))
        rest = tl.where(offs == i, float("-inf"), rest)


def level_table(B: int, beta: int, device) -> torch.Tensor:
    """B**-j for j = 0..beta, float32, by the torch.pow the policy uses (bit-identical terms)."""
    levels = -torch.arange(beta + 1, dtype=torch.float32)
    return torch.pow(torch.tensor(float(B), dtype=torch.float32), levels).to(device)


def lynx_route(logits: torch.Tensor, alpha: float, beta: int, top_k: int, renormalize: bool,
               out: dict | None = None, store_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [L, B, E] float32 -> (ids [L, B, k] int64, weights [L, B, k] float32, KEEP [L, E]
    bool) for an all-decode batch. `out`: preallocated buffers to reuse (graph capture); it also
    holds the intermediates (bins, s, count, and the keys when `store_keys`)."""
    if logits.dim() != 3 or logits.dtype != torch.float32:
        raise ValueError(f"lynx_route: logits: expected [L, B, E] float32, found {list(logits.shape)} {logits.dtype}")
    L, B, E = logits.shape
    if not 1 <= top_k <= E or beta < 0 or not alpha > 0:
        raise ValueError(f"lynx_route: expected 1 <= top_k <= E={E}, beta >= 0, alpha > 0; found top_k={top_k}, "
                         f"beta={beta}, alpha={alpha}")
    z = logits.contiguous()
    dev = z.device
    o = out if out is not None else {}
    shapes = {"bins": ((L, B, E), torch.float32), "mass": ((L, B), torch.float32), "s": ((L, E), torch.float32),
              "count": ((L, E), torch.int32), "ids": ((L, B, top_k), torch.int64), "w": ((L, B, top_k), torch.float32),
              "key": ((L, B, E) if store_keys else (1,), torch.float32)}
    for name, (shape, dtype) in shapes.items():
        if name not in o or tuple(o[name].shape) != shape:
            o[name] = torch.empty(shape, dtype=dtype, device=dev)
    if "table" not in o or o["table"].numel() != beta + 1 or o.get("table_B") != B:
        o["table"], o["table_B"] = level_table(B, beta, dev), B
    o["count"].zero_()
    be = triton.next_power_of_2(E)
    opts = {} if _interpreting() else {"enable_fp_fusion": False}
    mass = not renormalize
    rows = (L * B,)
    _bin_kernel[rows](z, o["bins"], o["mass"], E, float(alpha), float(beta), K=top_k, BLOCK_E=be, WITH_MASS=mass, **opts)
    blk = min(be, 128)
    _colsum_kernel[(L, triton.cdiv(E, blk))](o["bins"], o["table"], o["s"], B, E, J=beta + 1,
                                            BLOCK_B=min(triton.next_power_of_2(B), 64), BLOCK_E=blk, **opts)
    _pick_kernel[rows](o["bins"], o["s"], o["table"], o["count"], o["key"], B, E, float(B), K=top_k, BLOCK_E=be,
                       STORE_KEY=store_keys, **opts)
    _remap_kernel[rows](z, o["count"], o["mass"], o["ids"], o["w"], B, E, K=top_k, BLOCK_E=be, WITH_MASS=mass, **opts)
    return o["ids"], o["w"], o["count"] > 0
