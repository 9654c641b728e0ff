"""The routing each measured MoE row of NVIDIA AIConfigurator ran with, rebuilt as per-expert
token counts, so that a cost model can be priced on the same load the GPU timed.

Source (read, then re-implemented here in numpy; no code copied): github ai-dynamo/aiconfigurator
(Apache-2.0), `collector/helper.py`: `balanced_logits`, `sample_power_law`,
`_generate_power_law_distribution`, `_round_robin_adjust_per_rank`,
`_assign_experts_from_counts`; and `collector/vllm/collect_moe.py`: `run_moe_torch`. Read at
commit 095f58a5 (2026-08-21). The power-law algorithm is unchanged since 13dadba3 (2026-04-19)
apart from CPU-placement edits (d317417b, 2026-07-25: a Conv1d block sum became a reshape-sum,
same result), so it is the one behind the vLLM 0.24.0 tables (collected from 2026-07-13).

How the collector turns a routing into a measurement: it builds the token -> expert choice
[T, k], one-hot sums it into a [T, E] map, takes softmax of that map as the router logits and
hands them to vLLM's FusedMoE, whose own top-k then picks the k experts with the larger logit.
Where a token's k choices are distinct that reproduces the choice exactly; `routing_faithful`
names the rows where it does not.

* balanced (`balanced_counts`): stride s = ceil(E / k). If T >= s token t takes experts
  (t + j s) mod E, j = 0..k-1 (integer arithmetic). If T < s it takes (t s / T + j s) mod E
  truncated, and that expression runs in bfloat16 (run_moe_torch sets the default dtype to
  bfloat16 before calling balanced_logits, and an integer tensor divided by an int takes the
  default dtype), on CUDA, where dividing by a host scalar is a multiplication by its float32
  reciprocal. In 26 (T, E, k) cases of the 0.24.0 tables (all with T <= 80) that rounding
  moves experts away from the exact formula, sometimes only relabelling them, sometimes piling
  tokens up (T=32, E=896, k=16: 370 distinct experts instead of 512). We reproduce the
  bfloat16 result, checked against torch's own bfloat16 arithmetic; `exact=True` gives the
  intended one.
* power_law_<alpha> (`power_law_routing`): E weights drawn by inverse CDF from a power law with
  exponent alpha on [1, 0.8 T] (T k > E) or [0.01, 2] (otherwise); scaled to sum T k and
  rounded (half to even); capped at T per expert; the capped overflow, then the rounding
  remainder, handed out one token at a time round-robin over the EP ranks (each rank's turn:
  +1 to its smallest expert below T, lowest index on ties; or, for a negative remainder, -1
  from its largest non-empty expert); the EP rank with the largest total swapped into rank 0's
  block (vLLM gives rank 0 the first E/ep experts, so the one GPU timed carries the heaviest
  block); tokens assigned by listing experts in decreasing count, each repeated by its count,
  reshaped to (k, T) and transposed (an expert's run is at most T long, so no token meets an
  expert twice).

Approximations, named: no seed is set in the collector, so a power-law row is one unseeded
outcome; the collector's row latency is the MEAN over 5 independent draws replayed in one CUDA
graph (`num_iter = 5` in run_moe_torch), not one draw, so
`power_law_draws` returns 5 draws from our seeded generator: a sample of the same distribution,
not the collector's draws. We sample in float64 (the collector in float32). Experts with equal
counts are ordered by index (stable sort; the collector's numpy argsort does not fix that
order), which changes which tokens meet which of those experts, never the counts.
"""

from __future__ import annotations

import math

import numpy as np

COLLECTOR_DRAWS = 5  # power-law logits per measured row (run_moe_torch: num_iter = 5)
# Shapes (hidden_size, num_experts, topk) whose vLLM router is grouped top-k with fewer groups
# allowed than exist: the synthetic logits tie across groups and the group choice collapses the
# load (balanced: a token's 8 experts sit one per group, all 8 groups tie, 4 are kept by index
# and the 4 empty slots are filled with tied zero-score experts, expected to be experts 0-3 for
# nearly every token; the exact tie-break is the GPU kernel's). Source: the packaged model
# configs of deepseek-ai/DeepSeek-V3, -R1, -V3.1, -V3.2 (n_group 8, topk_group 4, noaux_tc);
# no other vLLM MoE shape in the 0.12.0 tables has more than one group.
GROUPED_TOPK_SHAPES = {(7168, 256, 8): "DeepSeek-V3/R1/V3.1/V3.2 (8 groups, 4 allowed)"}


def _bf16(x) -> np.ndarray:
    """Round float32 values to bfloat16 (to nearest, ties to even), kept as float32."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def balanced_assignment(T: int, E: int, k: int, exact: bool = False) -> np.ndarray:
    """The collector's balanced choice: token t -> k expert ids, [T, k] int64 (see the module
    docstring). `exact=True` computes the T < s branch in exact arithmetic instead of bfloat16."""
    _check(T, E, k)
    s = math.ceil(E / k)
    t = np.arange(T, dtype=np.int64)[:, None]  # [T, 1]
    js = np.arange(k, dtype=np.int64)[None, :] * s  # [1, k]
    if T >= s:
        return (t + js) % E
    if exact:
        return (t * s // T + js) % E
    inv = np.float32(1.0) / np.float32(T)  # CUDA divides by a host scalar as a float32 reciprocal product
    q = _bf16(_bf16(t * s) * inv)  # [T, 1] t s / T, the numerator first cast to bfloat16
    a = _bf16(q + _bf16(js))  # [T, k]
    return np.fmod(a, _bf16(E)).astype(np.int64)  # truncation, as .long()


def balanced_counts(T: int, E: int, k: int, ep: int = 1, exact: bool = False) -> np.ndarray:
    """Tokens per expert [E] int64 under the collector's balanced routing. The routing does not
    depend on EP (`ep` is only checked); take `local_counts` for the timed GPU's share. A token
    whose choice repeats an expert counts once there (`routing_faithful` flags such rows)."""
    _check(T, E, k, ep)
    a = balanced_assignment(T, E, k, exact)  # [T, k]
    first = np.ones_like(a, dtype=bool)
    srt = np.sort(a, axis=1)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]  # distinct experts per token
    return np.bincount(srt[first], minlength=E).astype(np.int64)


def sample_power_law(n: int, alpha: float, xmin: float, xmax: float, rng: np.random.Generator) -> np.ndarray:
    """n draws from p(x) ~ x^-alpha on [xmin, xmax] by the inverse CDF (alpha != 1)."""
    if alpha == 1:
        raise ValueError("power law: alpha = 1 has no inverse CDF of this form")
    e = 1.0 - alpha
    u = rng.random(n)
    return ((xmax ** e - xmin ** e) * u + xmin ** e) ** (1.0 / e)


def _round_robin_units(capacity: np.ndarray, units: int) -> np.ndarray:
    """How many of `units` single steps each rank takes when the steps go round-robin over the
    ranks (rank 0 first each pass), skipping ranks with no capacity left: [ep]."""
    units = min(units, int(capacity.sum()))
    lo, hi = 0, int(capacity.max(initial=0))  # passes completed in full: largest P with sum min(cap, P) <= units
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(capacity, mid).sum() <= units else (lo, mid - 1)
    got = np.minimum(capacity, lo)
    rest = units - int(got.sum())
    open_ranks = np.flatnonzero(capacity > lo)[:rest]  # the last, partial pass
    got[open_ranks] += 1
    return got


def _fill_lowest(block: np.ndarray, units: int, cap: int) -> np.ndarray:
    """`units` times: +1 to the smallest expert below `cap` (lowest index on ties). Closed form:
    raise everything below a level L to L, then +1 to the first experts at L in index order."""
    lo, hi = int(block.min()), cap
    while lo < hi:  # largest L <= cap with sum(max(0, L - c)) <= units
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.maximum(0, mid - block).sum() <= units else (lo, mid - 1)
    out = np.maximum(block, lo)
    rest = units - int(np.maximum(0, lo - block).sum())
    out[np.flatnonzero(out == lo)[:rest]] += 1
    return out


def _add_round_robin(counts: np.ndarray, ep: int, units: int, cap: int) -> np.ndarray:
    """_round_robin_adjust_per_rank with step +1 (is_valid: count < cap; pick: argmin)."""
    blocks = counts.reshape(ep, -1).copy()  # [ep, E/ep]
    for r, u in enumerate(_round_robin_units((cap - blocks).sum(axis=1), units)):
        if u:
            blocks[r] = _fill_lowest(blocks[r], int(u), cap)
    return blocks.reshape(-1)


def _take_round_robin(counts: np.ndarray, ep: int, units: int) -> np.ndarray:
    """_round_robin_adjust_per_rank with step -1 (is_valid: count > 0; pick: argmax), one step at
    a time: the rounding remainder is at most about E / 2 steps."""
    blocks = counts.reshape(ep, -1).copy()
    while units > 0:
        progressed = False
        for r in range(ep):
            if units == 0:
                break
            if blocks[r].max() > 0:
                blocks[r, int(np.argmax(blocks[r]))] -= 1  # first of the largest: all valid ones are > 0
                units -= 1
                progressed = True
        if not progressed:
            break
    return blocks.reshape(-1)


def assign_from_counts(counts: np.ndarray, T: int, k: int) -> np.ndarray:
    """Token -> experts [T, k] from counts [E] summing to T k, each <= T: experts in decreasing
    count (index order on ties), each repeated by its count, read as (k, T) and transposed."""
    order = np.argsort(-counts, kind="stable")
    return np.repeat(order, counts[order]).reshape(k, T).T.copy()


def power_law_routing(T: int, E: int, k: int, alpha: float, ep: int = 1, *,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One draw of the collector's power-law routing: (counts [E] int64, assignment [T, k])."""
    _check(T, E, k, ep)
    target = T * k
    xmin, xmax = (1.0, 0.8 * T) if target > E else (0.01, 2.0)
    w = sample_power_law(E, alpha, xmin, xmax, rng)  # [E]
    counts = np.round(w / w.sum() * target).astype(np.int64)  # half to even, as torch.round
    overflow = int(np.maximum(counts - T, 0).sum())
    counts = np.minimum(counts, T)
    if overflow:
        counts = _add_round_robin(counts, ep, overflow, T)
    delta = target - int(counts.sum())
    if delta > 0:
        counts = _add_round_robin(counts, ep, delta, T)
    elif delta < 0:
        counts = _take_round_robin(counts, ep, -delta)
    blocks = counts.reshape(ep, -1)  # [ep, E/ep]
    top = int(np.argmax(blocks.sum(axis=1)))
    if top:
        blocks[[0, top]] = blocks[[top, 0]]
    counts = blocks.reshape(-1)
    return counts, assign_from_counts(counts, T, k)


def power_law_counts(T: int, E: int, k: int, alpha: float, ep: int = 1, *, rng: np.random.Generator) -> np.ndarray:
    """Tokens per expert [E] int64 of one power-law draw (see power_law_routing)."""
    return power_law_routing(T, E, k, alpha, ep, rng=rng)[0]


def power_law_draws(T: int, E: int, k: int, alpha: float, ep: int = 1, *, rng: np.random.Generator,
                    draws: int = COLLECTOR_DRAWS) -> np.ndarray:
    """[draws, E] counts: as many independent draws as a measured row averages over."""
    return np.stack([power_law_counts(T, E, k, alpha, ep, rng=rng) for _ in range(draws)])


def distribution_alpha(distribution: str) -> float | None:
    """'power_law_1.2' -> 1.2; 'balanced' -> None."""
    if distribution == "balanced":
        return None
    if distribution.startswith("power_law_"):
        return float(distribution[len("power_law_"):])
    raise ValueError(f"distribution: expected 'balanced' or 'power_law_<alpha>', found {distribution!r}")


def row_counts(num_tokens: int, num_experts: int, topk: int, distribution: str, ep: int = 1, tp: int = 1, *,
               rng: np.random.Generator, draws: int = COLLECTOR_DRAWS) -> np.ndarray:
    """Counts of the experts on the timed GPU for one measured row: [draws, E/ep] for power law
    (the row's latency is the mean over such draws), [1, E/ep] for balanced (deterministic)."""
    alpha = distribution_alpha(distribution)
    if alpha is None:
        c = balanced_counts(num_tokens, num_experts, topk, ep)[None]
    else:
        c = power_law_draws(num_tokens, num_experts, topk, alpha, ep, rng=rng, draws=draws)
    return local_counts(c, ep, tp)


def local_counts(counts: np.ndarray, ep: int = 1, tp: int = 1) -> np.ndarray:
    """The counts [..., E_local] of the experts on rank 0, the GPU the collector timed. EP: vLLM's
    linear placement gives rank 0 the first ceil(E / ep) experts (E / ep when it divides); tokens
    bound elsewhere are masked out of its GEMMs. TP: every rank holds a 1/tp slice of every expert,
    so all counts stay (the slice narrows each GEMM, not the routing)."""
    counts = np.asarray(counts)
    if ep < 1 or tp < 1:
        raise ValueError(f"ep, tp: expected >= 1, found ep={ep}, tp={tp}")
    if ep > 1 and tp > 1:
        raise ValueError("the vLLM collector never combines MoE TP and EP (one of them is 1)")
    E = counts.shape[-1]
    return counts[..., :-(-E // ep)]


def routing_faithful(num_tokens: int, hidden_size: int, num_experts: int, topk: int,
                     distribution: str) -> tuple[bool, str]:
    """Whether our counts are what vLLM actually routed in this row, and why not: (ok, reason)."""
    shape = GROUPED_TOPK_SHAPES.get((hidden_size, num_experts, topk))
    if shape:
        return False, (f"grouped top-k ({shape}): the synthetic logits tie across groups and vLLM's group "
                       "choice collapses the load; the measured routing is not the intended one")
    if distribution == "balanced":
        a = balanced_assignment(num_tokens, num_experts, topk)
        srt = np.sort(a, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            return False, ("balanced: some token's choice repeats an expert, so vLLM's top-k fills the "
                           "slot with a tied zero-logit expert we cannot name")
    return True, ""


def _check(T: int, E: int, k: int, ep: int = 1):
    if T < 1 or not 1 <= k <= E:
        raise ValueError(f"T={T}, E={E}, k={k}: expected T >= 1 and 1 <= k <= E")
    if ep < 1 or E % ep:
        raise ValueError(f"ep={ep}: expected a divisor of E={E} (the collector splits experts into equal blocks)")
