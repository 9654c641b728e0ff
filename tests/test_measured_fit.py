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
from lynx_sim.cost.gemm import GemmParams, gemm_s
from lynx_sim.cost.moe_layer import MoEKernelParams, moe_layer_s
from lynx_sim.cost.parallel import Parallel
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
    """Roofline._moe_rank_s (which now calls moe_layer_s) equals the formula it had before, and
    routed_experts_s equals moe_layer_s with from_hardware (fixed cost included), exactly."""
    m, h = _load(model)
    r = Roofline(m, h, Parallel(gpus=tp))
    counts = np.random.default_rng(tp).multinomial(64 * m.top_k, np.full(m.num_experts, 1 / m.num_experts), size=6)
    old_distinct = np.count_nonzero(counts, axis=-1)
    old_padded = r.padded(counts).sum(-1)
    old_bytes = old_distinct * (m.expert_bytes / tp) + r._moe_const_bytes
    old_flops = old_padded * (2.0 * m.expert_params / tp) + r._moe_flops_per_token * 64
    old = np.maximum(old_bytes / r.moe_bw, old_flops / r.expert_fps)
    assert np.array_equal(r._moe_rank_s(counts, 64), old)
    if tp == 1:
        p = MoEKernelParams.from_hardware(h, m.weight_bytes)
        assert np.array_equal(moe_layer_s(counts, m.hidden_size, m.expert_intermediate_size, m.weight_bytes, p),
                              r.routed_experts_s(counts))
    assert p_matches_hardware(h, m.weight_bytes)


def p_matches_hardware(h, wb) -> bool:
    p = MoEKernelParams.from_hardware(h, wb)
    return (p.peak_flops * p.compute_efficiency == h.flops_per_s(wb)
            and p.peak_bandwidth_Bps * p.bandwidth_efficiency == h.moe_bandwidth_Bps and p.block_m == h.moe_block_m)


def test_gemm_hand_arithmetic_and_today():
    p = GemmParams(1e9, 1e12, 0.5, 0.5, fixed_us=1.0, gamma=0.5, k_ns=0.0)
    mem = (8 * 4 * 2 + (2 * 4 + 2 * 8) * 2) / 0.5e9
    comp = 2 * 2 * 8 * 4 / 0.5e12
    assert float(gemm_s(2, 8, 4, 2, p)) == pytest.approx(1e-6 + max(mem, comp) + 0.5 * min(mem, comp), rel=1e-12)
    assert float(gemm_s(2, 8, 4, 2, replace(p, k_ns=1e6))) == pytest.approx(1e-6 + 4e-3 + 0.5 * min(mem, comp))
    m, h = _load("mixtral_8x7b")
    r = Roofline(m, h)
    today = GemmParams.from_hardware(h, 2)
    assert float(gemm_s(3, 4096, 1024, 2, today, act_bytes=0.0)) == r._time1(4096 * 1024 * 2, 2.0 * 3 * 4096 * 1024,
                                                                            h.flops_per_s(2))


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
    json.dumps(rec, allow_nan=False)
