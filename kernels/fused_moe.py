"""Fused MoE layer in Triton: align, grouped gate/up GEMM with SiLU-and-multiply, grouped down
GEMM scaled by the routing weight, and the sum over each token's k experts.

    x [T, H] --align by expert--> h[p] = SiLU(W1g[e] x_t) * (W1u[e] x_t)      (kernel 1, [T k, I])
                                  y[p] = weight_p * W2[e] h[p]               (kernel 2, [T k, H] fp32)
                                  out[t] = sum over the token's live slots of y (torch sum)

Every program owns BLOCK_M rows of one expert (align.py) and a BLOCK_N slice of the output
columns, so a decode batch reads each active expert's weights once and an expert without tokens
none. Accumulation is float32; the intermediate h is stored in the activation dtype (bf16 or
fp16), as serving engines do. Under TRITON_INTERPRET=1 (the tests' CPU mode) bf16 tiles are
upcast before `tl.dot`, because the interpreter's bf16 dot is wrong; fp16 runs the GPU path as is.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .align import Alignment, align_block_size
from .configs import LayerShape, MoEConfig, select_config

DTYPES = (torch.bfloat16, torch.float16)


@triton.jit
def _gate_up_kernel(x_ptr, w1_ptr, h_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                    num_pairs, H, I, top_k,
                    stride_xt, stride_xh, stride_we, stride_wn, stride_wh, stride_hp, stride_hi,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's padded run: no loads
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < num_pairs
    tok = pairs // top_k
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    w_base = w1_ptr + e * stride_we
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(H, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
        wu = tl.load(w_base + (offs_n[None, :] + I) * stride_wn + offs_k[:, None] * stride_wh, mask=w_mask, other=0.0)
        if UPCAST:
            a, wg, wu = a.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g += tl.dot(a, wg)
        acc_u += tl.dot(a, wu)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + pairs[:, None] * stride_hp + offs_n[None, :] * stride_hi, h.to(h_ptr.dtype.element_ty),
             mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w2_ptr, y_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, weight_ptr,
                 num_pairs, H, I,
                 stride_hp, stride_hi, stride_we, stride_wn, stride_wi, stride_yp, stride_yh,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    valid = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < H
    w_base = w2_ptr + e * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(I, BLOCK_K)):
        offs_k = k0 * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = tl.load(h_ptr + pairs[:, None] * stride_hp + offs_k[None, :] * stride_hi,
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wi,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w)
    acc *= tl.load(weight_ptr + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + pairs[:, None] * stride_yp + offs_n[None, :] * stride_yh, acc, mask=valid[:, None] & n_ok[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_inputs(x, w1, w2, topk_ids, topk_weights) -> None:
    """Shapes and dtypes, named (a wrong stride would otherwise read the wrong expert silently)."""
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"fused_moe: expected x [T, H], w1 [E, 2I, H], w2 [E, H, I]; found x {list(x.shape)}, "
                         f"w1 {list(w1.shape)}, w2 {list(w2.shape)}")
    T, H = x.shape
    E, I2, H1 = w1.shape
    if H1 != H or I2 % 2 or tuple(w2.shape) != (E, H, I2 // 2):
        raise ValueError(f"fused_moe: w1: expected [E, 2I, H={H}] and w2 [E, H={H}, I]; found w1 {list(w1.shape)}, "
                         f"w2 {list(w2.shape)}")
    if x.dtype not in DTYPES or w1.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"fused_moe: dtypes: expected x, w1, w2 all bfloat16 or all float16; found {x.dtype}, "
                         f"{w1.dtype}, {w2.dtype}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"fused_moe: topk_ids and topk_weights: expected [T={T}, k] each; found "
                         f"{list(topk_ids.shape)} and {list(topk_weights.shape)}")
    if x.stride(-1) != 1 or w1.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe: x, w1 and w2 must be contiguous in their last dimension")


def fused_moe(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, config: MoEConfig | None = None, alignment: Alignment | None = None,
              out: torch.Tensor | None = None, workspace: dict | None = None) -> torch.Tensor:
    """One MoE layer: x [T, H] (bf16/fp16), w1 [E, 2I, H], w2 [E, H, I], topk_ids [T, k] (-1 =
    dropped slot), topk_weights [T, k] -> [T, H] in x's dtype (written into `out` when given).
    `config`: launch configuration (default: configs.select_config from the shape, which reads
    the ids on the host once; pass one for graph capture). `alignment`: a precomputed align step.
    `workspace`: {"h": [T k, I], "y": [T k, H] fp32} buffers to reuse (the executor's repeats)."""
    check_inputs(x, w1, w2, topk_ids, topk_weights)
    T, H = x.shape
    E, I = w1.shape[0], w2.shape[2]
    k = topk_ids.shape[1]
    P = T * k
    if config is None:
        live = topk_ids[topk_ids >= 0]
        distinct = int(torch.unique(live).numel()) if live.numel() else 1
        config = select_config(T, distinct, LayerShape(E, k, H, I), pairs=int(live.numel()))
    al = alignment or align_block_size(topk_ids, E, config.block_m)
    if al.block_m != config.block_m:
        raise ValueError(f"fused_moe: alignment block_m {al.block_m} != config block_m {config.block_m}")
    ws = workspace if workspace is not None else {}
    h = ws.get("h")
    if h is None or h.shape != (P, I) or h.dtype != x.dtype:
        h = ws["h"] = torch.empty(P, I, dtype=x.dtype, device=x.device)
    y = ws.get("y")
    if y is None or y.shape != (P, H):
        y = ws["y"] = torch.empty(P, H, dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    upcast = _interpreting() and x.dtype == torch.bfloat16
    c = config
    grid1 = (al.max_blocks, triton.cdiv(I, c.block_n))
    _gate_up_kernel[grid1](x, w1, h, al.sorted_pairs, al.block_expert, al.num_padded, P, H, I, k,
                           x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0), h.stride(1),
                           BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, UPCAST=upcast,
                           num_warps=c.num_warps, num_stages=c.num_stages)
    grid2 = (al.max_blocks, triton.cdiv(H, c.block_n))
    _down_kernel[grid2](h, w2, y, al.sorted_pairs, al.block_expert, al.num_padded, weights, P, H, I,
                        h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0), y.stride(1),
                        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, UPCAST=upcast,
                        num_warps=c.num_warps, num_stages=c.num_stages)
    live = (topk_ids >= 0).reshape(T, k, 1)
    total = torch.where(live, y.view(T, k, H), 0.0).sum(1)  # dropped slots' rows were never written
    if out is None:
        return total.to(x.dtype)
    return out.copy_(total)
