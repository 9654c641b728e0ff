"""The fitted MoE-layer and GEMM terms (lynx_sim/cost/moe_layer.py, gemm.py) and their fit to
measured tables (lynx_sim/measured/fit.py): hand arithmetic, today's roofline reproduced bit for
bit, parameters recovered from a synthetic table the function itself generated, a seeded
disjoint split whose held-out half never enters the fit, and the predict CLI.

    python -m pytest -q tests/test_measured_fit.py
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR
from lynx_sim.cost import HardwareSpec, Roofline
from lynx_sim.cost.attention import AttentionParams, attention_decode_s, attention_prefill_s, attention_s
from lynx_sim.cost.gemm import GemmParams, gemm_s
from lynx_sim.cost.moe_layer import MoEKernelParams, moe_layer_s
from lynx_sim.cost.parallel import AllReduceParams, Parallel, allreduce_fitted_s, allreduce_s
from lynx_sim.measured import fit as F
from lynx_sim.model import ModelSpec

SIMPLE = MoEKernelParams(peak_bandwidth_Bps=1e9, peak_flops=1e12, bandwidth_efficiency=0.5, compute_efficiency=0.5)


# ---------------------------------------------------------------- the MoE function by hand

def test_moe_layer_hand_arithmetic_tiles_restreaming_overlap():
    """H=4, I=8, gated: 96 weights, 192 bytes an expert. counts [0, 1, 17, 40], block_m 16:
    distinct 3, tiles 0 + 1 + 2 + 3 = 6, padded rows 96."""
    counts = np.array([0, 1, 17, 40])
    p = replace(SIMPLE, rho=0.5, gamma=0.5, fixed_us=2.0)
    mem = (3 + 0.5 * (6 - 3)) * 192 / 0.5e9  # 4.5 streams of 192 bytes
    comp = 6 * 16 * 2 * 96 / 0.5e12
    assert moe_layer_s(counts, 4, 8, 2, p) == pytest.approx(2e-6 + max(mem, comp) + 0.5 * min(mem, comp), rel=1e-12)
    # rho = 0: each distinct expert streamed once; gamma = 0: the roofline's max
    p0 = replace(SIMPLE, fixed_us=2.0)
    assert moe_layer_s(counts, 4, 8, 2, p0) == pytest.approx(2e-6 + max(3 * 192 / 0.5e9, comp), rel=1e-12)
    # not gated: 2 matrices, 64 weights
    assert moe_layer_s(counts, 4, 8, 2, SIMPLE, gated=False) == pytest.approx(
        max(3 * 128 / 0.5e9, 6 * 16 * 2 * 64 / 0.5e12), rel=1e-12)
    # activations: 58 pairs x 2 bytes x (3 H + 2 x 3 I) = 58 x 120 bytes
    pa = replace(SIMPLE, count_activations=True)
    assert moe_layer_s(counts, 4, 8, 2, pa) == pytest.approx((3 * 192 + 58 * 120) / 0.5e9, rel=1e-12)
    # per-expert start-up and the misaligned-shard slowdown (8 is not a multiple of 16)
    pe = replace(SIMPLE, expert_us=1.0, misaligned=2.0)
    assert moe_layer_s(counts, 4, 8, 2, pe) == pytest.approx(2 * (3 * 192 / 0.5e9 + 3e-6), rel=1e-12)
    assert moe_layer_s(counts, 4, 32, 2, replace(pe, expert_us=0.0)) == pytest.approx(
        max(3 * 768 / 0.5e9, 6 * 16 * 2 * 384 / 0.5e12), rel=1e-12)  # 32 is aligned: no slowdown


def test_moe_layer_tile_padding_and_empty_experts():
    """Compute-bound: 1 and 16 tokens fill one tile (same price), 17 take two; an expert with no
    token costs nothing; counts [L, E] -> [L]."""
    p = replace(SIMPLE, bandwidth_efficiency=1e6)  # memory free: compute alone
    one, sixteen, seventeen = (float(moe_layer_s(np.array([n, 0]), 4, 8, 2, p)) for n in (1, 16, 17))
    assert one == sixteen and seventeen == pytest.approx(2 * one)
    out = moe_layer_s(np.array([[0, 0], [3, 0], [3, 3]]), 4, 8, 2, SIMPLE)
    assert out.shape == (3,) and out[0] == 0 and out[2] == pytest.approx(2 * out[1])


def test_restreaming_counts_each_extra_tile():
    """An expert of 40 tokens spans 3 tiles of 16: rho = 1 streams it 3 times, rho = 0 once."""
    p = replace(SIMPLE, peak_flops=1e30)
    once = float(moe_layer_s(np.array([40]), 4, 8, 2, p))
    assert float(moe_layer_s(np.array([40]), 4, 8, 2, replace(p, rho=1.0))) == pytest.approx(3 * once)
    assert float(moe_layer_s(np.array([40]), 4, 8, 2, replace(p, rho=0.5))) == pytest.approx(2 * once)


# ---------------------------------------------------------------- today's roofline

def _load(model, hw="h100_sxm"):
    m = ModelSpec.from_cfg(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
    h = HardwareSpec.from_cfg(OmegaConf.load(CONF_DIR / "hardware" / f"{hw}.yaml"))
    return m, h


@pytest.mark.parametrize("model, tp", [("mixtral_8x7b", 1), ("qwen3_30b_a3b", 2), ("deepseek_v2_lite", 1),
                                       ("gpt_oss_120b", 4)])
def test_today_params_reproduce_the_roofline_moe_term_bit_for_bit(model, tp):
    """Uncalibrated, the routed experts cost max(distinct x expert bytes / BW, padded rows x 2
    expert params / FLOP/s) + the fixed cost, the roofline's formula, exactly; the new fields
    (per-block cost, per-expert start-up, ...) are off, and the roofline prices through moe_layer_s."""
    m, h = _load(model)
    h = replace(h, calibration=None)
    r = Roofline(m, h, Parallel(gpus=tp))
    counts = np.random.default_rng(tp).multinomial(64 * m.top_k, np.full(m.num_experts, 1 / m.num_experts), size=6)
    p = MoEKernelParams.from_hardware(h, m.weight_bytes)
    assert p.block_ns == 0 and p.k_ns == 0 and p.expert_us == 0 and p.rho == 0 and p.gamma == 0
    assert not p.count_activations and p.misaligned == 1
    distinct = np.count_nonzero(counts, axis=-1)
    padded = (-(-counts // h.moe_block_m) * h.moe_block_m).sum(-1)
    old = np.maximum(distinct * (m.expert_bytes / tp) / h.bandwidth_Bps,
                     padded * (2.0 * m.expert_params / tp) / h.flops_per_s(m.weight_bytes)) + h.moe_layer_fixed_us * 1e-6
    got = moe_layer_s(counts, m.hidden_size, m.expert_intermediate_size / tp, m.weight_bytes, p)
    assert np.array_equal(got, old)
    assert np.array_equal(r.routed_experts_s(counts), got)
    assert p_matches_hardware(h, m.weight_bytes)


def p_matches_hardware(h, wb) -> bool:
    p = MoEKernelParams.from_hardware(h, wb)
    return (p.peak_flops * p.compute_efficiency == h.flops_per_s(wb)
            and p.peak_bandwidth_Bps * p.bandwidth_efficiency == h.bandwidth_Bps and p.block_m == h.moe_block_m)


def test_gemm_hand_arithmetic_and_today():
    p = GemmParams(1e9, 1e12, 0.5, 0.5, fixed_us=1.0, gamma=0.5, k_ns=0.0)
    mem = (8 * 4 * 2 + (2 * 4 + 2 * 8) * 2) / 0.5e9
    comp = 2 * 2 * 8 * 4 / 0.5e12
    assert float(gemm_s(2, 8, 4, 2, p)) == pytest.approx(1e-6 + max(mem, comp) + 0.5 * min(mem, comp), rel=1e-12)
    assert float(gemm_s(2, 8, 4, 2, replace(p, k_ns=1e6))) == pytest.approx(1e-6 + 4e-3 + 0.5 * min(mem, comp))
    # split-K: the serial chain stops at k_split, then k_tail_ns per element of k
    ps = replace(p, k_ns=1e6, k_split=3, k_tail_ns=1e5)
    assert float(gemm_s(2, 8, 4, 2, ps)) == pytest.approx(1e-6 + 3e-3 + 1e-4 + 0.5 * min(mem, comp))
    assert float(gemm_s(2, 8, 2, 2, ps)) == pytest.approx(1e-6 + 2e-3 + 0.5 * min(
        (8 * 2 * 2 + (2 * 2 + 2 * 8) * 2) / 0.5e9, 2 * 2 * 8 * 2 / 0.5e12))  # k below the split: k x k_ns
    m, h = _load("mixtral_8x7b")
    today = GemmParams.from_hardware(h, 2)
    assert today.k_split == 0 and today.k_ns == 0 and today.fixed_us == 0
    want = max(4096 * 1024 * 2 / h.bandwidth_Bps, 2.0 * 3 * 4096 * 1024 / h.flops_per_s(2))  # weights / BW vs FLOPs
    assert float(gemm_s(3, 4096, 1024, 2, today, act_bytes=0.0)) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- the fit on synthetic tables

TRUE_MOE = dict(fixed_us=22.0, bandwidth_efficiency=0.85, compute_efficiency=0.55, gamma=0.3, rho=0.0,
                misaligned=1.0, expert_us=0.0)
TRUE_GEMM = dict(fixed_us=3.0, bandwidth_efficiency=0.8, compute_efficiency=0.6, gamma=0.2, k_ns=0.3)


def _hw():
    return _load("mixtral_8x7b", "h200")[1]


def synthetic_tables(noise=0.02, seed=1):
    """MoE and GEMM tables in the reader's schema priced by the functions themselves with known
    parameters, times lognormal noise; every row passes select_moe."""
    hw = _hw()
    rows = [dict(num_tokens=T, hidden_size=H, inter_size=I, topk=k, num_experts=E, moe_tp_size=tp, moe_ep_size=1,
                 distribution=d, dtype="bfloat16", routing_faithful=True, routing_note="")
            for H, I, E, k in ((2048, 768, 128, 8), (4096, 1536, 64, 4), (3072, 1024, 32, 2))
            for tp in (1, 2, 4) for d in ("balanced", "power_law_1.2")
            for T in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)]
    moe = pd.DataFrame(rows)
    base = replace(MoEKernelParams.from_hardware(hw, 2), block_m=16, **TRUE_MOE)
    rng = np.random.default_rng(seed)
    moe["latency_ms"] = F.price_moe(moe, base, F.moe_loads(moe, 16, 0)) * np.exp(noise * rng.standard_normal(len(moe)))
    mnk = np.array([(m, n, k) for m in (1, 4, 16, 64, 256, 1024, 4096) for n in (256, 1024, 4096, 14336)
                    for k in (256, 1024, 4096, 8192)])
    gemm = pd.DataFrame(mnk, columns=["m", "n", "k"]).assign(dtype="bfloat16")
    gp = replace(GemmParams.from_hardware(hw, 2), **TRUE_GEMM)
    gemm["latency_ms"] = F.price_gemm(gemm, gp) * np.exp(noise * rng.standard_normal(len(gemm)))
    return moe, gemm, hw


def _fit(moe, gemm, hw, **kw):
    if "decode_attention" not in kw:  # synthetic attention and all-reduce tables too (never the package's)
        kw.update(zip(("decode_attention", "prefill_attention", "allreduce"), synthetic_attention_tables(hw)))
    return F.run_fit("h200", 0, moe=moe, gemm=gemm, hw=hw, loso=kw.pop("loso", False), block_m_grid=(16,), **kw)


def test_fit_recovers_known_parameters_and_small_heldout_error():
    moe, gemm, hw = synthetic_tables()
    rec = _fit(moe, gemm, hw)
    p, g = rec["params"]["moe"], rec["params"]["gemm"]
    assert p["count_activations"] is False and p["block_m"] == 16
    for name in ("fixed_us", "bandwidth_efficiency", "compute_efficiency"):
        assert p[name] == pytest.approx(TRUE_MOE[name], rel=0.05), name
    for name in ("fixed_us", "bandwidth_efficiency", "compute_efficiency"):
        assert g[name] == pytest.approx(TRUE_GEMM[name], rel=0.1), name
    for comp in ("moe_decode", "moe_larger", "gemm_decode", "gemm_larger"):
        assert rec["components"][comp]["heldout"]["median"] < 0.03, comp  # noise 2%
    assert rec["heldout_error"]["median"] == rec["components"]["moe_decode"]["heldout"]["median"]
    assert rec["fit_rows"]["moe"] + rec["heldout_rows"]["moe"] == len(moe)


def test_leave_one_shape_out_refits_without_the_shape():
    moe, gemm, hw = synthetic_tables()
    rec = _fit(moe, gemm, hw, loso=True)
    lo = rec["components"]["moe_decode"]["leave_one_shape_out"]
    assert set(lo["by_shape"]) == {"H2048_I768_E128_k8", "H4096_I1536_E64_k4", "H3072_I1024_E32_k2"}
    assert lo["median"] < 0.05 and lo["n"] == int((moe.num_tokens <= F.DECODE_TOKENS).sum())


def test_split_is_seeded_and_disjoint():
    a, b = F.split(101, 0), F.split(101, 0)
    assert np.array_equal(a, b) and a.sum() == 50 and (~a).sum() == 51
    assert not np.array_equal(a, F.split(101, 1))


def test_heldout_half_never_enters_the_fit():
    """Corrupting every held-out latency (x10) leaves the fitted parameters unchanged; corrupting
    fit rows changes them."""
    moe, gemm, hw = synthetic_tables()
    rec = _fit(moe, gemm, hw)
    held_m, held_g = ~F.split(len(moe), 0), ~F.split(len(gemm), 0)
    bad_m, bad_g = moe.copy(), gemm.copy()
    bad_m.loc[held_m, "latency_ms"] *= 10
    bad_g.loc[held_g, "latency_ms"] *= 10
    rec2 = _fit(bad_m, bad_g, hw)
    assert rec2["params"] == rec["params"]
    assert rec2["components"]["moe_decode"]["heldout"]["median"] > 0.85  # the error sees it: 1/10 - 1
    worse = moe.copy()
    worse.loc[~held_m, "latency_ms"] *= 3
    assert _fit(worse, gemm, hw)["params"]["moe"] != rec["params"]["moe"]


def test_selection_excludes_ep_tp_unfaithful_and_l2_resident_rows():
    base = dict(num_tokens=8, hidden_size=2048, inter_size=768, topk=8, num_experts=128, moe_tp_size=1, moe_ep_size=1,
                distribution="balanced", dtype="bfloat16", routing_faithful=True, latency_ms=0.1)
    df = pd.DataFrame([base, {**base, "moe_ep_size": 2}, {**base, "moe_tp_size": 16},
                       {**base, "routing_faithful": False}, {**base, "num_experts": 8, "topk": 2},
                       {**base, "dtype": "fp8"}])
    rows, excluded = F.select_moe(df)
    assert len(rows) == 2  # the first, and 8 experts x 9.4 MB = 75 MB (not L2-resident)
    assert excluded["expert parallel (moe_ep_size > 1)"] == 1 and excluded["moe_tp_size > 8"] == 1
    assert excluded["routing_faithful == False"] == 1 and excluded["dtype not bfloat16"] == 1
    small = pd.DataFrame([{**base, "num_experts": 4, "topk": 2}])  # 4 x 9.4 MB = 38 MB: L2-resident
    assert len(F.select_moe(small)[0]) == 0
    assert not F.gated(pd.DataFrame([{**base, "hidden_size": 2688, "inter_size": 1856, "num_experts": 128,
                                      "topk": 6}]))[0]


def test_predict_cli_writes_a_column_beside_the_rows(tmp_path):
    from lynx_sim.measured.__main__ import main

    moe, gemm, hw = synthetic_tables()
    rec = _fit(moe, gemm, hw)
    cal = F.write_record(rec, tmp_path / "cal.json")
    for name, table in (("moe", moe), ("gemm", gemm)):
        src, out = tmp_path / f"{name}.csv", tmp_path / f"{name}_pred.csv"
        table.head(20).to_csv(src, index=False)
        assert main(["predict", "--gpu", "h200", str(src), str(out), "--calibration", str(cal)]) == 0
        got = pd.read_csv(out)
        assert list(got.columns) == list(table.columns) + ["predicted_ms"]
        assert got.predicted_ms.notna().all()
        np.testing.assert_allclose(got.predicted_ms / got.latency_ms, 1, atol=0.1)
    assert main(["predict", "--gpu", "h100_sxm", str(src), str(out), "--calibration", str(cal)]) == 2


# ---------------------------------------------------------------- the real tables

HAVE_AIC = importlib.util.find_spec("aiconfigurator_core") is not None


@pytest.mark.skipif(not HAVE_AIC, reason="aiconfigurator-core is not installed (pip install -e '.[measured]')")
def test_real_h200_fit_beats_the_uncalibrated_roofline(tmp_path):
    rec = F.run_fit("h200", 0, loso=False)
    c = rec["components"]
    assert rec["excluded"]["expert parallel (moe_ep_size > 1)"] > 0
    for name in ("moe_decode", "moe_larger", "gemm_decode", "gemm_larger"):
        assert c[name]["heldout"]["median"] < c[name]["uncalibrated"]["median"], name
    assert c["moe_decode"]["heldout"]["median"] <= 0.05
    for name in ("attention_decode", "attention_prefill", "allreduce"):
        assert c[name]["heldout"]["median"] < c[name]["uncalibrated"]["median"], name
    assert c["attention_decode"]["heldout"]["median"] <= 0.10  # the target
    json.dumps(rec, allow_nan=False)


# ---------------------------------------------------------------- attention and all-reduce

ATT = AttentionParams(peak_bandwidth_Bps=1e9, peak_flops=1e12, bandwidth_efficiency=0.5, compute_efficiency=0.5)
TRUE_DECODE = dict(fixed_us=11.0, bandwidth_efficiency=0.9, compute_efficiency=0.5, gamma=0.4, seq_us=0.01,
                   seq_head_us=0.02)
TRUE_PREFILL = dict(fixed_us=12.0, bandwidth_efficiency=0.3, compute_efficiency=0.6, gamma=0.8, seq_us=0.05,
                    seq_head_us=0.02)
TRUE_AR = AllReduceParams(latency_us={"2": 4.4, "4": 4.7, "8": 5.0}, bus_Bps={"2": 2.7e11, "4": 3.3e11, "8": 4.1e11})


def test_attention_hand_arithmetic():
    """8 heads, 2 KV heads, head_dim 4, bf16 KV: 32 bytes of KV a token, 64 FLOPs a pair."""
    p = replace(ATT, fixed_us=2.0, gamma=0.5, seq_us=1.0, seq_head_us=0.5)
    # decode, 3 sequences of 10, 20, 30 cached positions: 60 KV tokens, 60 pairs
    mem, comp = 60 * 32 / 0.5e9, 4 * 8 * 4 * 60 / 0.5e12
    want = max(mem, comp) + 0.5 * min(mem, comp) + (2.0 + 3 * (1.0 + 2 * 0.5)) * 1e-6
    assert float(attention_decode_s(np.array([10, 20, 30]), 8, 2, 4, 2, p)) == pytest.approx(want, rel=1e-12)
    assert float(attention_decode_s(60, 8, 2, 4, 2, p, batch=3)) == pytest.approx(want, rel=1e-12)  # the sum
    # prefill: 2 sequences of 5 new tokens after 3 cached: KV 2 x 8 tokens, pairs 2 x (15 + 15) = 60
    mem, comp = 16 * 32 / 0.5e9, 4 * 8 * 4 * 60 / 0.5e12
    want = max(mem, comp) + 0.5 * min(mem, comp) + (2.0 + 2 * (1.0 + 2 * 0.5)) * 1e-6
    assert float(attention_prefill_s(5, 3, 2, 8, 2, 4, 2, p)) == pytest.approx(want, rel=1e-12)
    # the query read and output write: 10 query tokens x 2 x 8 heads x 4 x 2 bytes = 1280 bytes
    q = replace(ATT, count_queries=True, peak_flops=1e30)
    assert float(attention_prefill_s(5, 3, 2, 8, 2, 4, 2, q)) == pytest.approx((16 * 32 + 1280) / 0.5e9, rel=1e-12)
    # fp8 KV halves the KV bytes
    assert float(attention_s(100, 0, 0, 8, 2, 4, 1, ATT)) == pytest.approx(100 * 16 / 0.5e9, rel=1e-12)


def test_attention_today_is_the_roofline_kv_and_flops_terms():
    """from_hardware: the hardware's factors and attention_layer_fixed_us, nothing else; one decode
    layer is max(KV bytes / BW, 4 h d pairs / FLOP/s) + fixed, the roofline's attention term
    without the projection weights."""
    m, h = _load("mixtral_8x7b", "h200")
    p = AttentionParams.from_hardware(h)
    a = m.attention
    r = Roofline(m, h)
    kv, b = 64 * 4096, 64
    want = max(kv * r.kv_bytes_per_token_rank() / h.bandwidth_Bps,
               4.0 * a["num_heads"] * a["head_dim"] * kv / h.flops_per_s(2)) + h.attention_layer_fixed_us * 1e-6
    got = attention_decode_s(kv, a["num_heads"], a["num_kv_heads"], a["head_dim"], 2, p, batch=b)
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_allreduce_fitted_hand_arithmetic():
    p = AllReduceParams(latency_us={"2": 3.0, "4": 5.0}, bus_Bps={"2": 1e9, "4": 2e9})
    got = allreduce_fitted_s(np.array([1e6, 1e6, 1e6]), np.array([1, 2, 4]), p)
    np.testing.assert_allclose(got, [0.0, 3e-6 + 1.0 * 1e6 / 1e9, 5e-6 + 1.5 * 1e6 / 2e9], rtol=1e-12)
    with pytest.raises(ValueError, match="8 GPUs"):
        allreduce_fitted_s(1e6, 8, p)
    # today's price through the fit's helper is allreduce_s with the hardware's link and latency
    hw = _hw()
    df = pd.DataFrame({"message_bytes": [256.0, 1e8], "num_gpus": [2, 8]})
    want = [allreduce_s(256.0, 2, hw.interconnect_Bps, hw.collective_latency_us * 1e-6) * 1e3,
            allreduce_s(1e8, 8, hw.interconnect_Bps, hw.collective_latency_us * 1e-6) * 1e3]
    np.testing.assert_allclose(F.price_allreduce_today(df, hw), want, rtol=1e-12)


def synthetic_attention_tables(hw, noise=0.02, seed=2):
    """Decode and prefill attention and all-reduce tables in the reader's schema, priced by the
    functions themselves with TRUE_* parameters (times lognormal noise), with a few rows that
    select_attention / the backend filter leave out."""
    rng = np.random.default_rng(seed)
    shapes = ((8, 1, 128), (32, 8, 128), (16, 2, 64), (64, 8, 64), (4, 4, 128))
    common = dict(kv_cache_dtype="bfloat16", window_size=0, kernel_source="vllm_flash_attn_fa3", dtype="bfloat16")
    dec = pd.DataFrame([dict(batch_size=b, isl=1, num_heads=h, num_key_value_heads=kv, head_dim=d, kv_len=n,
                             step=n - 1, **common)
                        for h, kv, d in shapes for b in (1, 4, 16, 64, 256, 1024, 2048)
                        for n in (2, 16, 128, 1024, 8192, 65536)])
    pre = pd.DataFrame([dict(batch_size=b, isl=n, num_heads=h, num_key_value_heads=kv, head_dim=d, step=0, **common)
                        for h, kv, d in shapes for b in (1, 4, 16, 64, 256) for n in (1, 16, 128, 1024, 4096, 16384)])
    base = AttentionParams.from_hardware(hw)
    dec["latency_ms"] = F.price_attention(dec, replace(base, **TRUE_DECODE), "decode") * np.exp(
        noise * rng.standard_normal(len(dec)))
    pre["latency_ms"] = F.price_attention(pre, replace(base, count_queries=True, **TRUE_PREFILL), "prefill") * np.exp(
        noise * rng.standard_normal(len(pre)))
    odd = dict(window_size=128), dict(kv_cache_dtype="fp8"), dict(head_dim=256)
    dec = pd.concat([dec, pd.DataFrame([{**dec.iloc[0].to_dict(), **o} for o in odd])], ignore_index=True)
    pre = pd.concat([pre, pd.DataFrame([{**pre.iloc[0].to_dict(), **o} for o in odd])], ignore_index=True)
    ar = pd.DataFrame([dict(num_gpus=g, message_bytes=float(2 ** e), backend=be)
                       for g in (2, 4, 8) for e in range(8, 31) for be in ("vllm_graph", "vllm_eager")])
    ar["latency_ms"] = F.price_allreduce(ar, TRUE_AR) * np.exp(noise * rng.standard_normal(len(ar)))
    ar.loc[ar.backend == "vllm_eager", "latency_ms"] *= 5
    return dec, pre, ar


def test_select_attention_and_subsample():
    dec, _, _ = synthetic_attention_tables(_hw())
    rows, ex = F.select_attention(dec, "decode", 0, max_rows=None)
    assert len(rows) == len(dec) - 3
    assert ex["attention_decode: window_size != 0 (sliding window)"] == 1
    assert ex["attention_decode: kv_cache_dtype not bfloat16"] == 1
    assert ex["attention_decode: head_dim not in (64, 128)"] == 1
    sub, ex2 = F.select_attention(dec, "decode", 0, max_rows=50)
    assert len(sub) == 50 and ex2["attention_decode: not in the seeded subsample of 50"] == len(rows) - 50
    assert sub.equals(F.select_attention(dec, "decode", 0, max_rows=50)[0])  # seeded


def test_fit_recovers_attention_and_allreduce_parameters():
    moe, gemm, hw = synthetic_tables()
    rec = _fit(moe, gemm, hw, loso=False)
    d, pf = rec["params"]["attention"]["decode"], rec["params"]["attention"]["prefill"]
    for name in ("fixed_us", "bandwidth_efficiency", "seq_head_us"):
        assert d[name] == pytest.approx(TRUE_DECODE[name], rel=0.1), name
    for name in ("fixed_us", "compute_efficiency", "bandwidth_efficiency"):
        assert pf[name] == pytest.approx(TRUE_PREFILL[name], rel=0.1), name
    assert pf["count_queries"] is True
    ar = rec["params"]["allreduce"]
    for g in ("2", "4", "8"):
        assert ar["latency_us"][g] == pytest.approx(TRUE_AR.latency_us[g], rel=0.05)
        assert ar["bus_Bps"][g] == pytest.approx(TRUE_AR.bus_Bps[g], rel=0.05)
    for comp in ("attention_decode", "attention_prefill", "allreduce"):
        assert rec["components"][comp]["heldout"]["median"] < 0.03, comp  # noise 2%
        assert rec["components"][comp]["uncalibrated"]["n"] == rec["components"][comp]["heldout"]["n"]
    assert rec["excluded"]["allreduce: backend not vllm_graph"] == 69
    assert rec["fit_rows"]["allreduce"] + rec["heldout_rows"]["allreduce"] == 69
    assert rec["fit_rows"]["attention_decode"] + rec["heldout_rows"]["attention_decode"] == 5 * 7 * 6


def test_attention_and_allreduce_heldout_never_enter_the_fit():
    moe, gemm, hw = synthetic_tables()
    dec, pre, ar = synthetic_attention_tables(hw)
    rec = _fit(moe, gemm, hw, decode_attention=dec, prefill_attention=pre, allreduce=ar)
    bad = []
    for phase, t in (("decode", dec), ("prefill", pre)):
        rows, _ = F.select_attention(t, phase, 0)
        held = ~F.split(len(rows), 0)
        rows.loc[held, "latency_ms"] *= 10
        bad.append(rows)
    ar_bad = ar[ar.backend == "vllm_graph"].reset_index(drop=True)
    ar_bad.loc[~F.split(len(ar_bad), 0), "latency_ms"] *= 10
    rec2 = _fit(moe, gemm, hw, decode_attention=bad[0], prefill_attention=bad[1], allreduce=ar_bad)
    assert rec2["params"] == rec["params"]
    for comp in ("attention_decode", "attention_prefill", "allreduce"):
        assert rec2["components"][comp]["heldout"]["median"] > 0.85, comp
    fit_bad = ar[ar.backend == "vllm_graph"].reset_index(drop=True)
    fit_bad.loc[F.split(len(fit_bad), 0), "latency_ms"] *= 3
    rec3 = _fit(moe, gemm, hw, decode_attention=dec, prefill_attention=pre, allreduce=fit_bad)
    assert rec3["params"]["allreduce"] != rec["params"]["allreduce"]


def test_attention_leave_one_shape_out():
    moe, gemm, hw = synthetic_tables()
    dec, pre, ar = synthetic_attention_tables(hw)
    rec = _fit(moe, gemm, hw, decode_attention=dec, prefill_attention=pre, allreduce=ar, loso=True)
    lo = rec["components"]["attention_decode"]["leave_one_shape_out"]
    assert lo["shapes"] == 5 and lo["n"] == 5 * 7 * 6 and lo["median"] < 0.05
    assert rec["components"]["allreduce"]["leave_one_shape_out"] is None
