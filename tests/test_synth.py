"""The synthetic trace generator: determinism, exact top-k, format, and each structural knob."""


from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lynx_sim.model import ModelSpec
from lynx_sim.routing import route, route_exact
from lynx_sim.traces.reader import open_trace
from lynx_sim.traces.stats import trace_stats
from lynx_sim.traces.synth import SynthParams, SyntheticTrace
from lynx_sim.traces.writer import write_trace

CONF = Path(__file__).resolve().parents[1] / "conf"
BASE = dict(prompt_tokens={"dist": "uniform", "min": 3, "max": 9}, output_tokens={"dist": "uniform", "min": 20, "max": 40},
            popularity_skew=0.2, topic_weight=0.2, vocab_weight=0.1, stickiness=0.4, layer_coupling=0.5,
            early_skew=0.5, early_tokens=4, vocab_size=64)


def small_model(E=16, k=4, layers=5, kind="softmax", renormalize=True, n_group=1, topk_group=1) -> ModelSpec:
    """A toy model composed like a conf/model yaml (so it follows ModelSpec.from_cfg)."""
    cfg = OmegaConf.create({
        "name": "toy", "num_layers": layers, "hidden_size": 64, "vocab_size": 100, "weight_bytes": 2,
        "attention": {"kind": "gqa", "num_heads": 4, "num_kv_heads": 4, "head_dim": 16}, "dense_intermediate_size": 0,
        "moe": {"num_experts": E, "top_k": k, "intermediate_size": 32, "shared_experts": 0,
                "shared_intermediate_size": 0, "router": kind, "renormalize": renormalize,
                "n_group": n_group, "topk_group": topk_group},
        "lynx": {"alpha": 1.0, "beta": None}})
    return ModelSpec.from_cfg(cfg)


def params(**kw) -> SynthParams:
    return SynthParams.from_cfg({**BASE, **kw})


def stats(gen: SyntheticTrace, n: int, tmp_path, name="t") -> dict:
    path = write_trace(tmp_path / f"{name}.safetensors", gen.to_arrays(n, logits=False))
    return trace_stats(open_trace(path))


FIELDS = ("request_id", "position", "phase", "ids", "weights", "logits")


def test_same_seed_same_arrays_other_seed_differs():
    m, p = small_model(), params()
    a, b, c = (SyntheticTrace(m, p, s).to_arrays(4) for s in (3, 3, 4))
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.logits[:20], c.logits[:20])


def test_request_independent_of_order_and_shape():
    gen = SyntheticTrace(small_model(), params(), seed=1)
    alone = gen.request(5)  # before any other request
    whole = SyntheticTrace(small_model(), params(), seed=1).to_arrays(6)
    rows = whole.request_id == 5
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(alone, f), getattr(whole, f)[rows])
    T = len(alone.position)
    assert (alone.request_id == 5).all() and (alone.position == np.arange(T)).all()
    P, O = gen.lengths(5)
    assert T == P + O and (alone.phase[:P] == 0).all() and (alone.phase[P:] == 1).all()
    assert alone.ids.shape == (T, 5, 4) and alone.weights.dtype == np.float32 and alone.logits.shape == (T, 5, 16)


@pytest.mark.parametrize("kind,renorm,groups", [("softmax", True, (1, 1)), ("softmax", False, (1, 1)),
                                                ("grouped_topk", True, (4, 2)), ("sigmoid", False, (1, 1))])
def test_ids_and_weights_are_route_of_logits(kind, renorm, groups):
    m = small_model(kind=kind, renormalize=renorm, n_group=groups[0], topk_group=groups[1])
    a = SyntheticTrace(m, params(), seed=2).request(0)
    ids, w = route(torch.from_numpy(a.logits), m.router)
    np.testing.assert_array_equal(a.ids, ids.numpy())
    # the generator's weights are computed in float64 by lynx_sim.numerics (machine-independent);
    # torch's float32 softmax agrees to its own rounding
    np.testing.assert_allclose(a.weights, w.numpy(), rtol=1e-6, atol=0)
    exact = route_exact(a.logits, m.router)
    np.testing.assert_array_equal(a.ids, exact[0])
    np.testing.assert_array_equal(a.weights, exact[1])
    z = a.logits.astype(np.float64)  # float64 reference of the weights
    p = np.exp(z - z.max(-1, keepdims=True)) if kind != "sigmoid" else 1 / (1 + np.exp(-z))
    if kind != "sigmoid":
        p /= p.sum(-1, keepdims=True)
    ref = np.take_along_axis(p, a.ids.astype(np.int64), -1)
    if renorm:
        ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(a.weights, ref, rtol=1e-6)


def test_written_trace_loads_with_validation(tmp_path):
    gen = SyntheticTrace(small_model(), params(), seed=0)
    path = write_trace(tmp_path / "s.safetensors", gen.to_arrays(3), float_dtype="float32")
    t = open_trace(path, validate=True)
    assert t.num_requests == 3 and t.has("logits") and t.meta.missing == ()
    assert t.meta.provenance["generator"] == "lynx_sim.traces.synth" and t.meta.provenance["seed"] == 0
    assert t.meta.provenance["notes"] and t.meta.provenance["params"]["stickiness"] == 0.4
    np.testing.assert_array_equal(t.read("ids"), gen.to_arrays(3).ids)


def test_stickiness_raises_adjacent_overlap(tmp_path):
    m = small_model(E=32, k=4)
    off = dict(stickiness=0.0, topic_weight=0.0, vocab_weight=0.0, popularity_skew=0.0, early_skew=0.0)
    chance = 4 / 32
    none = stats(SyntheticTrace(m, params(**off), 0), 30, tmp_path, "a")["adjacent_overlap"]["mean"]
    sticky = stats(SyntheticTrace(m, params(**{**off, "stickiness": 0.8}), 0), 30, tmp_path, "b")["adjacent_overlap"]["mean"]
    assert abs(none - chance) < 0.02
    assert sticky > chance + 0.15


def test_popularity_skew_raises_load_cv(tmp_path):
    m = small_model(E=32, k=4)
    flat = stats(SyntheticTrace(m, params(popularity_skew=0.0), 0), 30, tmp_path, "a")["load_cv"]["median"]
    skew = stats(SyntheticTrace(m, params(popularity_skew=1.0), 0), 30, tmp_path, "b")["load_cv"]["median"]
    assert skew > flat + 0.3


def test_confidence_raises_top1_weight(tmp_path):
    m = small_model(E=8, k=2)
    low = stats(SyntheticTrace(m, params(confidence=0.5), 0), 10, tmp_path, "a")["top1_weight_mean"]
    high = stats(SyntheticTrace(m, params(confidence=3.0), 0), 10, tmp_path, "b")["top1_weight_mean"]
    assert high > low + 0.1


def test_layer_coupling_links_consecutive_layers():
    """With coupling, the top-1 expert at layer l predicts layer l+1's top-1 (through the fixed permutation)."""
    m = small_model(E=16, k=1, layers=4)

    def predictability(c):
        a = SyntheticTrace(m, params(layer_coupling=c, topic_weight=0, vocab_weight=0, popularity_skew=0,
                                     early_skew=0), 0).to_arrays(20)
        x, y = a.ids[:, 0, 0], a.ids[:, 1, 0]
        joint = np.zeros((16, 16))
        np.add.at(joint, (x, y), 1)
        return joint.max(1).sum() / joint.sum()  # accuracy of the best map from layer-0 to layer-1 expert

    assert predictability(0.9) > predictability(0.0) + 0.25


def test_invalid_params_raise():
    with pytest.raises(ValueError, match="unknown keys"):
        SynthParams.from_cfg({"stickyness": 0.3})
    with pytest.raises(ValueError, match="stickiness"):
        SynthParams.from_cfg({"stickiness": 1.0})
    with pytest.raises(ValueError, match="dist"):
        SynthParams.from_cfg({"prompt_tokens": {"dist": "poisson", "mean": 3}})


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_has_a_preset_that_generates(name):
    preset = CONF / "synth" / f"{name}.yaml"
    assert preset.is_file(), f"no synthetic preset {preset} for conf/model/{name}.yaml"
    model = ModelSpec.from_cfg(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    params = SynthParams.from_cfg(OmegaConf.load(preset))
    gen = SyntheticTrace(model, params, seed=0)
    a = gen.request(0, prompt_tokens=4, output_tokens=8)
    assert a.ids.shape == (12, model.num_moe_layers, model.top_k)
    assert a.logits.shape == (12, model.num_moe_layers, model.num_experts)
    assert gen.meta.model == model.name and gen.meta.router == model.router.kind
    assert (gen.meta.n_group, gen.meta.topk_group) == (model.router.n_group, model.router.topk_group)
    P, O = gen.lengths(0)
    assert 1 <= P + O and O <= 512, "outputs stay a few hundred tokens by default"


def test_blocks_and_phases_equal_the_whole_request():
    """A request drawn whole, by phase, or block by block (the streaming replay) is the same rows:
    the AR(1) states carry across CHUNK_TOKENS blocks and each block has its own seeded stream."""
    from lynx_sim.traces.synth import CHUNK_TOKENS

    p = params(prompt_tokens={"dist": "uniform", "min": 70, "max": 90}, output_tokens={"dist": "uniform", "min": 100, "max": 150})
    gen = SyntheticTrace(small_model(), p, seed=4)
    whole = gen.request(2)
    P, O = gen.lengths(2)
    assert P + O > 2 * CHUNK_TOKENS
    dec = gen.request(2, phase=1)
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(dec, f), getattr(whole, f)[P:])
    parts = list(gen.blocks(2, P, O, lo=P + 5, hi=P + O - 3))
    assert all(len(b.ids) <= CHUNK_TOKENS for b in parts)
    np.testing.assert_array_equal(np.concatenate([b.logits for b in parts]), whole.logits[P + 5:P + O - 3])
    np.testing.assert_array_equal(np.concatenate([b.position for b in parts]), np.arange(P + 5, P + O - 3))


def test_routing_digest_names_the_routing_not_the_order():
    m, p = small_model(), params()
    a, b = SyntheticTrace(m, p, seed=1), SyntheticTrace(m, p, seed=1)
    for r in (0, 1, 2):
        a.request(r, phase=1)
    for r in (2, 0, 1, 0):
        b.request(r, phase=1)
    assert a.digest.hexdigest() == b.digest.hexdigest() and a.digest.blocks == 3
    c = SyntheticTrace(m, p, seed=2)
    for r in (0, 1, 2):
        c.request(r, phase=1)
    assert c.digest.hexdigest() != a.digest.hexdigest()
