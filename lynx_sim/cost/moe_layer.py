"""Price one fused-MoE layer on one GPU from the tokens each of its experts received.

    t = fixed + (H + I) x k_ns + s x (max(mem, comp) + gamma * min(mem, comp))

    mem  = (streams x expert_bytes + pairs x act_bytes + extra_bytes) / (peak_BW x bandwidth_efficiency)
           + distinct x expert_us + blocks x block_ns
    comp = (2 x expert_params x block_m x tiles + extra_flops)      / (peak_FLOPS x compute_efficiency)

with, over the experts e on the GPU, n_e their tokens [..., E_local] and tiles_e = ceil(n_e / block_m):

    distinct = #{e : n_e > 0}                    an expert with no token reads nothing
    tiles    = sum_e tiles_e                     tile rows of the grouped GEMMs
    streams  = distinct + rho x (tiles - distinct)
               an expert whose tokens span several tiles streams its weights 1 + rho (tiles_e - 1)
               times (rho = 0: once, the weights stay in L2 across its tiles; rho = 1: once per tile)
    pairs    = sum_e n_e                         token-expert pairs
    expert_us     start-up of streaming one expert (a few small thread blocks per expert cannot
                  reach the HBM bandwidth at once)
    blocks   = tiles x (ceil((m - 1) I / block_n) + ceil(H / block_n))
               the thread blocks (output tiles) of the two grouped GEMMs: each tile row of an expert
               runs ceil(N / block_n) blocks in the first GEMM (N = (m - 1) I: gate and up, or up) and
               in the second (N = H); block_ns is the cost of one block that bytes do not explain
               (its prologue, the gather of its token rows, the epilogue writing its output tile),
               spread over the SMs. It does not shrink with the TP shard as the bytes do: a TP 8 shard
               of a small expert is mostly blocks, which is where a bytes-only term is too fast
    expert_params = m x H x I                    m = 3 gated (gate, up, down), 2 not (ReLU^2 rows)
    expert_bytes  = expert_params x weight bytes per element
    act_bytes     = 2 bytes x (3 H + 2 m I) per token-expert pair when `count_activations`: the
                    activation traffic of vLLM's fused MoE (x read by the first GEMM, its output
                    written and read by the activation, whose output is written and read by the
                    second GEMM, that one's output written and read by the sum over k); 0 otherwise

(H + I) x k_ns is the reduction walk of one thread block in each grouped GEMM (K = H in the first,
K = I in the second) that no other block's streaming hides: the kernels' pipeline fill and drain.
It is what makes one large expert at one token slower than its bytes (Llama-4 at TP 8: 31 MB in
40 us) while eight small ones take little more than the fixed cost (24-25 us); ~1.9 ns per
element of K on H100 and H200.

s = `misaligned` when I is not a multiple of `align` (16), else 1: vLLM's Triton fused MoE runs
several times slower per byte on such shards (H200 table: Nemotron-3-Nano I = 1856 at TP 8, I / TP
= 232, takes 1.5x the time of TP 4 at 16-256 tokens with half the bytes).

H and I are the expert's hidden and intermediate sizes on this GPU (I already divided by TP).
gamma in [0, 1] says how little the memory and compute parts overlap (0: the roofline's max;
1: they add). `extra_bytes` / `extra_flops` are work that does not depend on routing (shared
experts, router) which the roofline prices in the same max.

With `MoEKernelParams.from_hardware(hw, weight_bytes)` (gamma = rho = expert_us = block_ns = k_ns = 0,
no activations) this is exactly the uncalibrated roofline's MoE term (`Roofline.routed_experts_s`
calls it).
`lynx_sim/measured/moe_fit.py` fits the parameters to NVIDIA AIConfigurator's measured vLLM tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ACT_BYTES = 2  # bf16 activations


@dataclass(frozen=True)
class MoEKernelParams:
    """Peaks (datasheet) and the factors, fixed cost and tile shape of one fused-MoE kernel."""

    peak_bandwidth_Bps: float  # datasheet HBM bytes/s
    peak_flops: float  # datasheet dense FLOP/s for the weight width
    bandwidth_efficiency: float
    compute_efficiency: float
    fixed_us: float = 0.0  # per layer call: routing, align/sort, launches
    gamma: float = 0.0  # overlap: 0 max(mem, comp), 1 mem + comp
    block_m: int = 16  # tile rows: each expert's tokens are padded to it
    rho: float = 0.0  # re-streaming of an expert's weights per extra tile
    count_activations: bool = False  # add the activation traffic (act_bytes) to mem
    expert_us: float = 0.0  # per distinct expert, added to mem: the start-up of streaming one expert
    misaligned: float = 1.0  # slowdown of mem and comp when I on the GPU is not a multiple of `align`
    align: int = 16
    block_ns: float = 0.0  # per thread block (output tile) of the two grouped GEMMs, added to mem
    block_n: int = 64  # output columns of one thread block
    k_ns: float = 0.0  # per element of K (H in the first GEMM, I in the second): one block's reduction walk, added

    @classmethod
    def from_hardware(cls, hw, weight_bytes: float, fixed_us: float | None = None) -> "MoEKernelParams":
        """The uncalibrated roofline's parameters from a HardwareSpec: its bandwidth factor, the
        dense compute factor on the peak for this weight width (as `HardwareSpec.flops_per_s`),
        tile rows `moe_block_m`, gamma = rho = 0; fixed cost `moe_layer_fixed_us` unless given."""
        eff = hw.bandwidth_efficiency
        peak = hw.fp8_tflops if weight_bytes == 1 else hw.bf16_tflops
        return cls(peak_bandwidth_Bps=hw.hbm_bandwidth_gbps * 1e9, peak_flops=peak * 1e12,
                   bandwidth_efficiency=eff, compute_efficiency=hw.flops_efficiency,
                   fixed_us=hw.moe_layer_fixed_us if fixed_us is None else fixed_us, block_m=hw.moe_block_m)


def moe_load(counts: np.ndarray, block_m: int, pairs: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the price needs of the routing: (distinct, tiles, pairs) [...] from counts [..., E_local]
    (`pairs=False`: 0 for pairs, which only the activation traffic needs)."""
    counts = np.asarray(counts)
    distinct = np.count_nonzero(counts, axis=-1)
    tiles = (-(-counts // block_m)).sum(-1)
    return distinct, tiles, counts.sum(-1) if pairs else 0


def moe_blocks(tiles, hidden, inter, mats, block_n: int):
    """Thread blocks of the two grouped GEMMs: tiles x (ceil((mats - 1) I / block_n) + ceil(H / block_n))."""
    if all(isinstance(v, (int, float)) for v in (hidden, inter, mats)):  # plain numbers: no numpy call
        return tiles * float(math.ceil((mats - 1) * float(inter) / block_n) + math.ceil(float(hidden) / block_n))
    return tiles * (np.ceil((mats - 1) * np.asarray(inter, dtype=np.float64) / block_n)
                    + np.ceil(np.asarray(hidden, dtype=np.float64) / block_n))


def moe_layer_s(counts: np.ndarray, hidden: float, inter: float, weight_bytes: float, p: MoEKernelParams, *,
                gated: bool = True, extra_bytes=0.0, extra_flops=0.0, load=None) -> np.ndarray:
    """Seconds of one MoE layer on one GPU: counts [..., E_local] tokens per expert -> [...]
    (module docstring). `load`: (distinct, tiles, pairs) from `moe_load` when already computed
    (the fit prices thousands of rows many times over). `gated` may be a boolean array
    broadcasting with the result."""
    distinct, tiles, pairs = moe_load(counts, p.block_m, p.count_activations) if load is None else load
    mats = np.where(gated, 3, 2) if isinstance(gated, np.ndarray) else (3 if gated else 2)
    params = mats * hidden * inter  # weights of one expert on this GPU
    bytes_ = (distinct + p.rho * (tiles - distinct)) * (params * weight_bytes) + extra_bytes
    if p.count_activations:
        bytes_ = bytes_ + pairs * (ACT_BYTES * (3 * hidden + 2 * mats * inter))
    flops = (tiles * p.block_m) * (2.0 * params) + extra_flops
    mem = bytes_ / (p.peak_bandwidth_Bps * p.bandwidth_efficiency)
    if p.expert_us:
        mem = mem + distinct * (p.expert_us * 1e-6)
    if p.block_ns:
        mem = mem + moe_blocks(tiles, hidden, inter, mats, p.block_n) * (p.block_ns * 1e-9)
    comp = flops / (p.peak_flops * p.compute_efficiency)
    t = np.maximum(mem, comp)
    if p.gamma:
        t = t + p.gamma * np.minimum(mem, comp)
    plain = isinstance(hidden, (int, float)) and isinstance(inter, (int, float))
    if p.misaligned != 1.0:
        if plain:
            t = t * (p.misaligned if float(inter) % p.align != 0 else 1.0)
        else:
            t = t * np.where(np.remainder(inter, p.align) != 0, p.misaligned, 1.0)
    if p.k_ns:
        t = t + ((float(hidden) if plain else np.asarray(hidden, dtype=np.float64)) + inter) * (p.k_ns * 1e-9)
    return t + p.fixed_us * 1e-6 if p.fixed_us else t
