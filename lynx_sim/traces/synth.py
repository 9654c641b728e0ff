"""Seeded synthetic routing traces with full router logits, fitted per model in `conf/synth/`.

Usage:
    params = SynthParams.from_cfg(OmegaConf.load("conf/synth/qwen3_30b_a3b.yaml"))
    gen = SyntheticTrace(ModelSpec.from_cfg(OmegaConf.load("conf/model/qwen3_30b_a3b.yaml")), params, seed=0)
    one = gen.request(7)            # TraceArrays of request 7: prompt (phase 0) then output (phase 1)
    write_trace("synth.safetensors", gen.to_arrays(64))

What it models. Real router logits are W_l . h_{t,l}: a fixed matrix per layer applied to the
token's hidden state, which changes slowly along the residual stream and along the text. The
generator draws a D-dimensional stand-in for that hidden state (D = min(E, latent_dim)) and one
fixed "router" W_l [D, E] per layer, and writes
logits[t, l] = confidence * (b_l + exp(-t / early_tokens) * c_l + h_{t,l} @ W_l):
- popularity skew: b_l [E] ~ N(0, popularity_skew^2 * s_l^2), fixed per layer (s_l spreads the skew
  across layers, log-normal with `skew_layer_spread`): some experts are chosen more than others;
- topical drift: h carries a request-level topic g_t, drawn per request and drifting as an AR(1)
  along tokens with half-life `topic_halflife` tokens; share `topic_weight` of the variance;
- early tokens: c_l [E] ~ N(0, early_skew^2) adds a shared bias that fades with position t, because
  tokens with little context crowd onto the same experts (DeepSeek-V2-Lite's load CV is 0.78 at
  positions 1-7 and 0.18 beyond 128); position 0 (the begin-of-sequence word) has no context at
  all, so its latent is the word's embedding alone and it routes alike in every request;
- token identity: each token is a word drawn from a Zipf(`vocab_zipf`) vocabulary of `vocab_size`
  words with a fixed embedding, shared by every request (frequent words route alike everywhere);
  the first prompt token is always word 0 (a begin-of-sequence token); share `vocab_weight`;
- stickiness: the rest of h is an AR(1) along tokens with coefficient `stickiness` (the
  correlation of consecutive tokens' latents), so consecutive tokens share experts above chance;
- cross-layer coupling: that part is also an AR(1) along layers with coefficient `layer_coupling`,
  and W_l = W_{l-1} with its columns permuted by a fixed random permutation, so expert e at layer
  l-1 predicts expert perm_l(e) at layer l;
- confidence: the logit scale (an inverse temperature); it sets how much of the top-k weight the
  top-1 expert takes, and changes no expert choice.
ids and weights are the model's own top-k of these logits (`lynx_sim.routing.route`).

Request shape: `prompt_tokens` and `output_tokens` are each a distribution, either
{dist: uniform, min, max} (integers, both ends included) or {dist: lognormal, median, sigma, min,
max} (rounded, clipped). A request's randomness comes from numpy.random.default_rng([seed, 1, r])
and the per-layer structure from default_rng([seed, 0]), so request r is the same whatever else
was generated.

What real traces have that this lacks (STYLE.md item 12): the latent is Gaussian and
low-dimensional (rank D <= 64 logits, where a real router sees a hidden state of thousands of
dimensions); stickiness, coupling and topic strength are the same at every layer (real overlap is
lowest at the first layer and highest in the middle ones); prompt and generated tokens follow one
process (real prefill and decode routing differ in content, e.g. chat templates and repeated
phrases); position acts only through the early-token bias (no long-context drift); popularity is fixed in time;
words are not real text (no syntax, no repetition of phrases or code identifiers); DeepSeek-V3's
correction bias and grouped routing see only these logits (grouped routers route on them as any
model would, but the groups carry no structure of their own); the weights of models without a
recorded weight distribution (all but Mixtral) rest on an unfitted confidence; the fitted
statistics do not measure cross-layer coupling, so `layer_coupling` is a guess in every preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .. import numerics
from ..model import ModelSpec
from ..routing import route_exact
from .digest import RoutingDigest
from .format import PHASE_DECODE, PHASE_PREFILL, TraceMeta
from .arrays import TraceArrays, concat_arrays

_DIST_KEYS = {"uniform": ("min", "max"), "lognormal": ("median", "sigma", "min", "max")}


def _length_dist(name: str, d) -> dict:
    d = dict(d)
    kind = d.get("dist", "uniform")
    if kind not in _DIST_KEYS:
        raise ValueError(f"{name}.dist: expected one of {sorted(_DIST_KEYS)}, found {kind!r}")
    missing = [k for k in _DIST_KEYS[kind] if k not in d]
    if missing:
        raise ValueError(f"{name}: a {kind} length needs keys {_DIST_KEYS[kind]}, missing {missing}")
    out = {"dist": kind, **{k: float(d[k]) if k in ("median", "sigma") else int(d[k]) for k in _DIST_KEYS[kind]}}
    if not 0 <= out["min"] <= out["max"]:
        raise ValueError(f"{name}: expected 0 <= min <= max, found min={out['min']}, max={out['max']}")
    return out


def _draw_length(d: dict, rng: np.random.Generator) -> int:
    if d["dist"] == "uniform":
        return int(rng.integers(d["min"], d["max"] + 1))
    x = d["median"] * np.exp(d["sigma"] * rng.standard_normal())
    return int(np.clip(round(x), d["min"], d["max"]))


@dataclass(frozen=True)
class SynthParams:
    """One preset of `conf/synth/<model>.yaml`. Shares are fractions of the latent's variance."""

    prompt_tokens: dict = field(default_factory=lambda: {"dist": "uniform", "min": 32, "max": 256})
    output_tokens: dict = field(default_factory=lambda: {"dist": "uniform", "min": 64, "max": 256})
    latent_dim: int = 64  # D, capped at E
    popularity_skew: float = 0.3  # std of the per-layer expert bias, in units of the latent logit std
    skew_layer_spread: float = 0.0  # log-normal spread of the skew across layers
    topic_weight: float = 0.2
    topic_halflife: float = 200.0  # tokens
    vocab_weight: float = 0.2
    vocab_size: int = 4096
    vocab_zipf: float = 1.0
    stickiness: float = 0.3  # AR(1) coefficient of the latent between consecutive tokens
    layer_coupling: float = 0.5  # AR(1) coefficient of the latent between consecutive layers
    early_skew: float = 0.0  # std of an extra per-layer expert bias at position 0, decaying with position
    early_tokens: float = 16.0  # its decay length in tokens
    confidence: float = 1.0  # logit scale (inverse temperature)

    def __post_init__(self):
        object.__setattr__(self, "prompt_tokens", _length_dist("prompt_tokens", self.prompt_tokens))
        object.__setattr__(self, "output_tokens", _length_dist("output_tokens", self.output_tokens))
        checks = [("latent_dim", self.latent_dim >= 1), ("vocab_size", self.vocab_size >= 1),
                  ("popularity_skew", self.popularity_skew >= 0), ("skew_layer_spread", self.skew_layer_spread >= 0),
                  ("topic_weight", 0 <= self.topic_weight <= 1), ("vocab_weight", 0 <= self.vocab_weight <= 1),
                  ("topic_weight + vocab_weight", self.topic_weight + self.vocab_weight <= 1),
                  ("topic_halflife", self.topic_halflife > 0), ("vocab_zipf", self.vocab_zipf >= 0),
                  ("stickiness", 0 <= self.stickiness < 1), ("layer_coupling", 0 <= self.layer_coupling < 1),
                  ("confidence", self.confidence > 0),
                  ("early_skew", self.early_skew >= 0), ("early_tokens", self.early_tokens > 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"synth preset: {name} out of range in {self}")

    @classmethod
    def from_cfg(cls, cfg) -> "SynthParams":
        """From an OmegaConf node or a plain dict; unknown keys are an error."""
        try:
            from omegaconf import DictConfig, OmegaConf
            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # plain dicts need no omegaconf
            pass
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"synth preset: unknown keys {unknown} (known: {sorted(cls.__dataclass_fields__)})")
        return cls(**cfg)


# Fixed-point grids of the exact logit product (numerics.fixed_point_matmul): latent values on
# 2**-14 within +-2**7 and router entries on 2**-17 within +-2**5 make every partial sum of a
# latent dimension D <= 1024 an integer of at most 2**53 (exact in float64). The grids are far finer than anything a
# statistic can see (latent std 1, router entries ~1).
H_BITS, H_BOUND = 14, 2.0 ** 7
W_BITS, W_BOUND = 17, 2.0 ** 5
MAX_LATENT_DIM = 1024
CHUNK_TOKENS = 8  # a request is drawn in blocks of this many tokens, each from its own seeded stream: a
# streaming replay holds one block per slot (batch 4096 x 8 rows of Qwen3-30B logits: under 1 GB)


class SyntheticTrace:
    """Requests of a synthetic trace for one model, drawn on demand and deterministic in (seed, r):
    bit-identical on every machine, BLAS build and thread count (`lynx_sim.numerics`)."""

    VERSION = 2  # of the drawing procedure: 2 = machine-independent arithmetic, blocks of CHUNK_TOKENS

    def __init__(self, model: ModelSpec, params: SynthParams, seed: int):
        self.model, self.params, self.seed = model, params, int(seed)
        p, E, L = params, model.num_experts, model.num_moe_layers
        self.D = D = min(E, p.latent_dim)
        if D > MAX_LATENT_DIM:
            raise ValueError(f"synth preset: latent_dim: expected at most {MAX_LATENT_DIM} (exact logits), found {D}")
        rng = np.random.default_rng([self.seed, 0])
        # routers: W_0 a tight frame (orthonormal columns when D = E), W_l = W_{l-1}[:, perm_l]
        q = numerics.orthonormal_columns(rng.standard_normal((E, D)))  # [E, D]
        w = numerics.quantize(np.sqrt(E / D) * q.T, W_BITS, W_BOUND)  # [D, E], grid units
        routers = [w]
        for _ in range(1, L):
            routers.append(routers[-1][:, rng.permutation(E)])
        self._W = np.stack(routers)  # [L, D, E] integer-valued float64 (grid units)
        spread = numerics.exp(p.skew_layer_spread * rng.standard_normal(L) - p.skew_layer_spread ** 2 / 2)
        self._bias = p.confidence * (p.popularity_skew * spread[:, None] * rng.standard_normal((L, E)))  # [L, E]
        self._early = p.confidence * (p.early_skew * rng.standard_normal((L, E)))  # [L, E]
        self._vocab = rng.standard_normal((p.vocab_size, D))  # [V, D]
        cdf = np.cumsum(numerics.power(np.arange(1, p.vocab_size + 1, dtype=np.float64), -p.vocab_zipf))  # in order
        self._vocab_cdf = cdf / cdf[-1]
        self._rho_topic = float(numerics.power(0.5, 1.0 / p.topic_halflife))
        self.digest = RoutingDigest()  # of every request handed out (the summary's trace_sha256)
        self.meta = TraceMeta(
            model=model.name, num_experts=E, top_k=model.top_k, moe_layers=tuple(model.moe_layers),
            router=model.router.kind, renormalize=model.router.renormalize, shared_experts=model.shared_experts,
            n_group=model.router.n_group, topk_group=model.router.topk_group,
            weights_kind=("top-k gate weights of the synthetic logits (lynx_sim.routing.route_exact)"
                          + (", renormalised to sum 1" if model.router.renormalize else ", not renormalised")),
            missing=(),
            provenance={"generator": "lynx_sim.traces.synth", "generator_version": self.VERSION, "seed": self.seed,
                        "numpy": np.__version__, "params": asdict(params),
                        "notes": [
                            "synthetic: Gaussian low-rank latent (rank %d) in place of real hidden states" % D,
                            "stickiness, layer coupling and topic strength are equal at every layer",
                            "prompt and generated tokens follow the same process; no position effects",
                            "words are Zipf draws, not text: no repeated phrases or identifiers",
                        ]},
        )

    def lengths(self, r: int) -> tuple[int, int]:
        """(prompt tokens, output tokens) of request r."""
        rng = np.random.default_rng([self.seed, 1, int(r)])
        return _draw_length(self.params.prompt_tokens, rng), _draw_length(self.params.output_tokens, rng)

    def request(self, r: int, prompt_tokens: int | None = None, output_tokens: int | None = None,
                phase: int | None = None) -> TraceArrays:
        """Request r: prompt (phase 0) then output (phase 1). Lengths come from the preset unless
        given; `phase` keeps only that phase's rows (the others' logits are never computed)."""
        P, O = self.lengths(r)
        P = P if prompt_tokens is None else int(prompt_tokens)
        O = O if output_tokens is None else int(output_tokens)
        if P + O < 1:
            raise ValueError(f"request {r}: needs at least one token (prompt {P}, output {O})")
        lo, hi = {None: (0, P + O), PHASE_PREFILL: (0, P), PHASE_DECODE: (P, P + O)}[phase]
        parts = list(self.blocks(r, P, O, lo, hi))
        if not parts:
            return self._rows(r, P, np.empty((0, self.model.num_moe_layers, self.model.num_experts), np.float32), lo)
        out = concat_arrays(parts)
        if prompt_tokens is None and output_tokens is None:
            self.digest.add(r, phase, out)
        return out

    def blocks(self, r: int, P: int, O: int, lo: int = 0, hi: int | None = None):
        """Rows [lo, hi) of request r (P prompt then O output tokens), yielded in blocks of at most
        CHUNK_TOKENS rows. The latent's AR(1) state is carried across blocks, so memory holds one
        block whatever the request's length (a paused generator keeps only the states); logits
        are computed only for the rows asked for."""
        T = P + O
        hi = T if hi is None else hi
        if not 0 <= lo <= hi <= T:
            raise ValueError(f"request {r}: rows [{lo}, {hi}) outside its {T} tokens")
        state = (None, None)  # AR(1) states: topic [D], contextual part [L, D]
        for c0 in range(0, min(hi, T), CHUNK_TOKENS):
            out = self._chunk(r, P, c0, min(CHUNK_TOKENS, T - c0), state, lo, hi)
            state = out[1]
            if out[0] is not None:
                yield out.pop(0)  # the paused generator keeps no reference to the rows it handed out

    def _chunk(self, r: int, P: int, c0: int, n: int, state: tuple, lo: int, hi: int):
        """Block c0 // CHUNK_TOKENS of request r: (its rows inside [lo, hi), or None; the new states)."""
        p, D, L = self.params, self.D, self.model.num_moe_layers
        g, x = state
        rng = np.random.default_rng([self.seed, 2, int(r), c0 // CHUNK_TOKENS])
        topic = rng.standard_normal((n, D))  # [n, D]
        words = np.searchsorted(self._vocab_cdf, rng.random(n)).clip(max=p.vocab_size - 1)
        ctx = rng.standard_normal((n, L, D))  # [n, L, D]
        gs, g = ar1_steps(topic, g, self._rho_topic, np.sqrt(1 - self._rho_topic ** 2))  # AR(1) along tokens
        xs, x = ar1_steps(ctx, x, p.stickiness, np.sqrt(1 - p.stickiness ** 2))
        if c0 + n <= lo:  # before the rows asked for: only the states move on
            return [None, (g, x)]
        couple = np.sqrt(1 - p.layer_coupling ** 2)
        for l in range(1, L):  # AR(1) along layers (cross-layer coupling), per token
            xs[:, l] = p.layer_coupling * xs[:, l - 1] + couple * xs[:, l]
        if c0 == 0 and P > 0:
            words[0] = 0  # the first prompt token is the begin-of-sequence word
        shared = np.sqrt(p.topic_weight) * gs + np.sqrt(p.vocab_weight) * self._vocab[words]  # [n, D]
        h = np.sqrt(1.0 - p.topic_weight - p.vocab_weight) * xs + shared[:, None, :]  # [n, L, D]
        if c0 == 0 and P > 0:  # the begin-of-sequence token sees no context: its embedding alone
            h[0] = self._vocab[0]
        a, b = max(lo - c0, 0), min(hi - c0, n)
        return [self._rows(r, P, self._logits(h[a:b], c0 + a), c0 + a), (g, x)]

    def _logits(self, h: np.ndarray, t0: int) -> np.ndarray:
        """float32 logits [n, L, E] of latents h [n, L, D] at positions t0.. (exact product, then
        elementwise float64 terms in a fixed order, rounded once)."""
        p = self.params
        hq = numerics.quantize(h, H_BITS, H_BOUND).transpose(1, 0, 2)  # [L, n, D] grid units
        z = numerics.fixed_point_matmul(hq, self._W, H_BITS + W_BITS)  # [L, n, E], exact
        z = p.confidence * z + self._bias[:, None, :]
        if p.early_skew > 0:  # early tokens have little context and crowd onto the same experts
            decay = numerics.exp(-np.arange(t0, t0 + h.shape[0], dtype=np.float64) / p.early_tokens)  # [n]
            z = z + self._early[:, None, :] * decay[None, :, None]
        return np.ascontiguousarray(z.transpose(1, 0, 2)).astype(np.float32)  # [n, L, E]

    def _rows(self, r: int, P: int, logits: np.ndarray, t0: int) -> TraceArrays:
        n = logits.shape[0]
        ids, w = route_exact(logits, self.model.router)
        pos = np.arange(t0, t0 + n, dtype=np.int32)
        return TraceArrays(meta=self.meta, request_id=np.full(n, r, np.int32), position=pos,
                           phase=np.where(pos < P, PHASE_PREFILL, PHASE_DECODE).astype(np.int8),
                           ids=ids.astype(np.int32), weights=w, logits=logits)

    def to_arrays(self, num_requests: int, logits: bool = True) -> TraceArrays:
        """Requests 0..num_requests-1 concatenated; logits=False drops them (smaller, for statistics)."""
        return concat([self.request(r) for r in range(num_requests)], logits=logits)


def ar1_steps(drives: np.ndarray, state, rho: float, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """Stationary unit-variance AR(1) along axis 0 driven by unit normals, continuing from `state`
    (None: the first row starts the process as is); float64 elementwise steps, so the same bits
    everywhere. Returns (the series, its last row)."""
    out = np.empty_like(drives)
    for t in range(drives.shape[0]):
        state = drives[t] if state is None else rho * state + gain * drives[t]
        out[t] = state
    return out, state


def concat(parts: list[TraceArrays], logits: bool = True) -> TraceArrays:
    """Concatenate requests of one generator (same meta) into one TraceArrays."""
    out = concat_arrays(parts)
    if not logits:
        out.logits = None
    return out
