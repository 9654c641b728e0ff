"""The terms added to the fitted cost model and the calibration format's explicit routing:
per-thread-block MoE cost (hand arithmetic, and recovered by the fit), GEMM split-K (hand
arithmetic in test_measured_fit.py; chosen by the fit-half cost here), MoE rows priced from their
own `expert_counts`, and `predict` on attention and all-reduce rows.

    python -m pytest -q tests/test_measured_terms.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from lynx_sim.cost.gemm import GemmParams
from lynx_sim.cost.moe_layer import MoEKernelParams, moe_blocks, moe_layer_s, moe_load
from lynx_sim.measured import fit as F
from lynx_sim.measured.__main__ import main
from lynx_sim.measured.gemm_fit import fit_gemm_structure

from test_measured_fit import _fit, _hw, synthetic_attention_tables, synthetic_tables

SIMPLE = MoEKernelParams(peak_bandwidth_Bps=1e9, peak_flops=1e30, bandwidth_efficiency=0.5, compute_efficiency=0.5)


def test_moe_block_cost_hand_arithmetic():
    """H = 128, I = 96, gated, block_n 64: a tile runs ceil(2 x 96 / 64) = 3 blocks in the first
    GEMM and ceil(128 / 64) = 2 in the second. counts [0, 1, 17, 40], block_m 16: 6 tiles, 30 blocks."""
    counts = np.array([0, 1, 17, 40])
    assert moe_blocks(6, 128, 96, 3, 64) == 30
    assert moe_blocks(6, 128, 96, 2, 64) == 6 * (2 + 2)  # not gated: N = I in the first GEMM
    base = float(moe_layer_s(counts, 128, 96, 2, SIMPLE))
    assert base == pytest.approx(3 * 3 * 128 * 96 * 2 / 0.5e9, rel=1e-12)  # 3 distinct experts streamed once
    p = replace(SIMPLE, block_ns=100.0)
    assert float(moe_layer_s(counts, 128, 96, 2, p)) == pytest.approx(base + 30 * 100e-9, rel=1e-12)
    # a TP shard halves the bytes, not the blocks of the second GEMM: 6 x (ceil(96 / 64) + 2) = 24 blocks
    assert float(moe_layer_s(counts, 128, 48, 2, p)) == pytest.approx(base / 2 + 24 * 100e-9, rel=1e-12)
    # inside mem: compute-bound rows do not see it
    q = replace(p, peak_flops=1.0, compute_efficiency=1.0)
    assert float(moe_layer_s(counts, 128, 96, 2, q)) == float(moe_layer_s(counts, 128, 96, 2, replace(q, block_ns=0.0)))
    # one block's reduction walk per grouped GEMM: (H + I) x k_ns, added outside the max and
    # not scaled by the misaligned-shard slowdown (I = 8 is misaligned: only mem doubles)
    k = replace(SIMPLE, k_ns=10.0)
    assert float(moe_layer_s(counts, 128, 96, 2, k)) == pytest.approx(base + (128 + 96) * 10e-9, rel=1e-12)
    km = replace(k, misaligned=2.0)
    small = float(moe_layer_s(counts, 128, 8, 2, SIMPLE))
    assert float(moe_layer_s(counts, 128, 8, 2, km)) == pytest.approx(2 * small + (128 + 8) * 10e-9, rel=1e-12)
    # the precomputed load gives the same price
    load = moe_load(counts, 16)
    assert float(moe_layer_s(None, 128, 96, 2, p, load=load)) == float(moe_layer_s(counts, 128, 96, 2, p))


def test_fit_recovers_a_block_cost_and_a_reduction_walk():
    moe, gemm, hw = synthetic_tables()
    true = dict(fixed_us=22.0, bandwidth_efficiency=0.85, compute_efficiency=0.55, gamma=0.3, block_ns=3.0, k_ns=2.0)
    base = replace(MoEKernelParams.from_hardware(hw, 2), block_m=16, **true)
    moe = moe.assign(latency_ms=F.price_moe(moe, base, F.moe_loads(moe, 16, 0))
                     * np.exp(0.01 * np.random.default_rng(3).standard_normal(len(moe))))
    p = _fit(moe, gemm, hw)["params"]["moe"]
    assert p["block_ns"] == pytest.approx(3.0, rel=0.2)
    assert p["k_ns"] == pytest.approx(2.0, rel=0.2)
    assert p["fixed_us"] == pytest.approx(22.0, rel=0.1)


def _gemm_table(k_split, k_ns=1.3, k_tail_ns=0.04, seed=4):
    hw = _hw()
    mnk = np.array([(m, n, k) for m in (1, 8, 64, 256, 2048) for n in (32, 256, 1024, 4096, 16384)
                    for k in (64, 256, 1024, 2048, 3072, 4096, 8192, 16384, 51200)])
    g = pd.DataFrame(mnk, columns=["m", "n", "k"]).assign(dtype="bfloat16")
    p = replace(GemmParams.from_hardware(hw, 2), fixed_us=2.5, bandwidth_efficiency=0.82, compute_efficiency=0.8,
                gamma=0.3, k_ns=k_ns, k_split=k_split, k_tail_ns=k_tail_ns)
    g["latency_ms"] = F.price_gemm(g, p) * np.exp(0.01 * np.random.default_rng(seed).standard_normal(len(g)))
    return g, hw


def test_gemm_split_k_is_chosen_by_the_fit_half_cost():
    g, hw = _gemm_table(3072)
    fit = F.split(len(g), 0)
    p = fit_gemm_structure(g[fit], GemmParams.from_hardware(hw, 2))
    assert p.k_split == 3072
    assert p.k_ns == pytest.approx(1.3, rel=0.05) and p.k_tail_ns == pytest.approx(0.04, rel=0.3)
    q = fit_gemm_structure(g[fit], GemmParams.from_hardware(hw, 2), grid=(0,))  # without the split: a worse fit
    assert q.k_split == 0
    err = lambda params: np.median(np.abs(F.price_gemm(g[~fit], params) / g[~fit].latency_ms - 1))  # noqa: E731
    assert err(p) < 0.02 < err(q)


# ---------------------------------------------------------------- explicit per-expert counts

def _moe_rows():
    base = dict(num_tokens=8, hidden_size=2048, inter_size=768, topk=8, num_experts=16, moe_tp_size=1,
                moe_ep_size=1, distribution="power_law_1.2", dtype="bfloat16", routing_faithful=True)
    return pd.DataFrame([base, {**base, "num_tokens": 64}])


def test_rows_with_expert_counts_are_priced_from_them():
    rows = _moe_rows()
    counts = [np.r_[8, 8, 8, 8, 8, 8, 8, 8, np.zeros(8, int)], np.full(16, 32)]
    rows["expert_counts"] = counts
    p = replace(MoEKernelParams.from_hardware(_hw(), 2), block_ns=2.0, expert_us=0.1, fixed_us=20.0)
    got = F.price_moe(rows, p, F.moe_loads(rows, p.block_m, 0))
    want = [float(moe_layer_s(np.asarray(c), 2048, 768, 2, p)) * 1e3 for c in counts]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    rebuilt = F.price_moe(rows.drop(columns="expert_counts"), p, F.moe_loads(rows.drop(columns="expert_counts"),
                                                                             p.block_m, 0))
    assert not np.allclose(got, rebuilt)  # the collector's routing would have priced them otherwise
    # mixed: a row without counts (None) is rebuilt as before
    mixed = rows.copy()
    mixed["expert_counts"] = [counts[0], None]
    np.testing.assert_allclose(F.price_moe(mixed, p, F.moe_loads(mixed, p.block_m, 0)), [got[0], rebuilt[1]],
                               rtol=1e-12)
    # a CSV stores the sequence as text
    text = rows.assign(expert_counts=["[8, 8, 8, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0]", " ".join(["32"] * 16)])
    np.testing.assert_allclose(F.price_moe(text, p, F.moe_loads(text, p.block_m, 0)), got, rtol=1e-12)


def test_expert_counts_are_checked_and_keep_unfaithful_rows():
    rows = _moe_rows().head(1)
    with pytest.raises(ValueError, match="expected 16 counts"):
        F.moe_loads(rows.assign(expert_counts=[[1, 2, 3]]), 16, 0)
    with pytest.raises(ValueError, match=r"in \[0, num_tokens = 8\]"):
        F.moe_loads(rows.assign(expert_counts=[[9] + [0] * 15]), 16, 0)
    with pytest.raises(ValueError, match="sequence of integers"):
        F.moe_loads(rows.assign(expert_counts=["[1, 2"]), 16, 0)
    # EP: the counts are those of the E / ep experts on the timed GPU
    ep = rows.assign(moe_ep_size=2, expert_counts=[[8] * 8])
    d, t, pairs = F.moe_loads(ep, 16, 0)
    assert d[0, 0] == 8 and pairs[0, 0] == 64
    # a row whose routing we could not rebuild is kept when it brings its own counts
    big = pd.DataFrame([{**rows.iloc[0].to_dict(), "num_experts": 128, "routing_faithful": False}] * 2)
    big["expert_counts"] = [None, [1] * 64 + [0] * 64]
    kept, excluded = F.select_moe(big)
    assert len(kept) == 1 and excluded["routing_faithful == False"] == 1


def test_predict_cli_prices_rows_with_expert_counts(tmp_path):
    moe, gemm, hw = synthetic_tables()
    cal = F.write_record(_fit(moe, gemm, hw), tmp_path / "cal.json")
    rows = _moe_rows().assign(expert_counts=["[8, 8, 8, 8, 8, 8, 8, 8, 0, 0, 0, 0, 0, 0, 0, 0]", " ".join(["32"] * 16)],
                              moe_ep_size=[1, 2])
    rows.loc[1, "expert_counts"] = " ".join(["64"] * 8)  # EP 2: the 8 local experts
    src, out = tmp_path / "moe.csv", tmp_path / "moe_pred.csv"
    rows.to_csv(src, index=False)
    assert main(["predict", "--gpu", "h200", str(src), str(out), "--calibration", str(cal)]) == 0
    got = pd.read_csv(out)
    p = MoEKernelParams(**json.loads(cal.read_text())["params"]["moe"])
    want = [float(moe_layer_s(np.r_[[8] * 8, [0] * 8], 2048, 768, 2, p)) * 1e3,
            float(moe_layer_s(np.full(8, 64), 2048, 768, 2, p)) * 1e3]
    np.testing.assert_allclose(got.predicted_ms, want, rtol=1e-9)
    # EP 2 without its own counts: vLLM's logical EP is not our layout, so the row is not priced
    rows.loc[1, "expert_counts"] = None
    rows.to_csv(src, index=False)
    assert main(["predict", "--gpu", "h200", str(src), str(out), "--calibration", str(cal)]) == 0
    got = pd.read_csv(out)
    assert np.isfinite(got.predicted_ms[0]) and np.isnan(got.predicted_ms[1])


def test_predict_refuses_a_bad_calibration_in_one_line(tmp_path, capsys):
    """A missing file, a record without params, an unknown parameter: exit 2, one line naming it."""
    moe, gemm, hw = synthetic_tables()
    rec = _fit(moe, gemm, hw)
    src = tmp_path / "moe.csv"
    _moe_rows().to_csv(src, index=False)
    bad = json.loads(json.dumps(rec))
    bad["params"]["gemm"]["bogus"] = 1
    broken = {"gpu": "h200"}
    for i, (record, msg) in enumerate([(None, "No such file"), (bad, "'params.gemm': expected keys among"),
                                       (broken, "expected a calibration record")]):
        cal = tmp_path / f"cal{i}.json"
        if record is not None:
            cal.write_text(json.dumps(record))
        assert main(["predict", "--gpu", "h200", str(src), str(tmp_path / "o.csv"), "--calibration", str(cal)]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------- predict: attention and all-reduce

def test_predict_prices_attention_and_allreduce_rows(tmp_path):
    moe, gemm, hw = synthetic_tables()
    dec, pre, ar = synthetic_attention_tables(hw)
    cal = F.write_record(_fit(moe, gemm, hw, decode_attention=dec, prefill_attention=pre, allreduce=ar),
                         tmp_path / "cal.json")
    for name, table, covered in (("decode", dec, (dec.kv_cache_dtype == "bfloat16") & (dec.window_size == 0)
                                  & dec.head_dim.isin((64, 128))),
                                 ("prefill", pre, (pre.kv_cache_dtype == "bfloat16") & (pre.window_size == 0)
                                  & pre.head_dim.isin((64, 128))),
                                 ("allreduce", ar, ar.backend == "vllm_graph")):
        src, out = tmp_path / f"{name}.csv", tmp_path / f"{name}_pred.csv"
        table.to_csv(src, index=False)
        assert main(["predict", "--gpu", "h200", str(src), str(out), "--calibration", str(cal)]) == 0
        got = pd.read_csv(out)
        ok = covered.to_numpy()
        assert got.predicted_ms[ok].notna().all() and got.predicted_ms[~ok].isna().all(), name
        assert ok.sum() < len(ok), name  # the table has rows outside the calibration
        np.testing.assert_allclose(got.predicted_ms[ok] / got.latency_ms[ok], 1, atol=0.1, err_msg=name)
    # the raw decode table (step, no kv_len) is told apart from prefill by isl = 1 and step > 0
    raw = dec.drop(columns="kv_len")
    rec = json.loads(cal.read_text())
    np.testing.assert_allclose(F.predict(raw, rec).predicted_ms, F.predict(dec, rec).predicted_ms, rtol=1e-12)
    # a GPU count that was not fitted is NaN, one GPU costs nothing
    one = pd.DataFrame({"num_gpus": [1, 16, 2], "message_bytes": [1e6, 1e6, 1e6]})
    got = F.predict(one, rec).predicted_ms.to_numpy()
    assert got[0] == 0 and np.isnan(got[1]) and got[2] > 0
    src = tmp_path / "odd.csv"
    pd.DataFrame({"a": [1]}).to_csv(src, index=False)
    assert main(["predict", "--gpu", "h200", str(src), str(tmp_path / "o.csv"), "--calibration", str(cal)]) == 2


def test_one_kernel_is_fitted_the_one_most_rows_ran():
    """B200's bf16 MoE rows come from two kernels and its attention from FlashInfer, A100's from
    FlashAttention-2 without a window_size column: the majority kernel of the kept rows is fitted."""
    dec, _, _ = synthetic_attention_tables(_hw())
    fi = dec.assign(kernel_source="vllm_flashinfer_trtllmdecode")
    mixed = pd.concat([fi, dec.head(5)], ignore_index=True)
    rows, ex = F.select_attention(mixed, "decode", 0, max_rows=None)
    assert (rows.kernel_source == "vllm_flashinfer_trtllmdecode").all()
    assert ex["attention_decode: kernel_source not vllm_flashinfer_trtllmdecode"] == 5
    old = dec.drop(columns=["window_size", "kv_cache_dtype"]).assign(kernel_source="vllm_flash_attn")
    rows, ex = F.select_attention(old, "decode", 0, max_rows=None)
    assert len(rows) == len(old) - 1  # only the head_dim 256 row goes
    moe = _moe_rows().assign(num_experts=128, latency_ms=0.1, kernel_source="a")
    moe = pd.concat([moe, moe.head(1).assign(kernel_source="b")], ignore_index=True)
    kept, ex = F.select_moe(moe)
    assert len(kept) == 2 and ex["kernel_source not a"] == 1


def test_fp8_rows_get_their_own_parameter_set_and_prices(tmp_path):
    """fp8 MoE rows (1-byte weights, the fp8 peak) are fitted apart from bf16: a synthetic fp8
    table priced with other parameters is recovered, `params.moe` (bf16) is what it was, and
    predict prices each dtype with its own set."""
    moe, gemm, hw = synthetic_tables()
    fp8 = moe.assign(dtype="fp8")
    true = replace(MoEKernelParams.from_hardware(hw, 1), block_m=16, fixed_us=15.0, bandwidth_efficiency=0.7,
                   compute_efficiency=0.4, gamma=0.2)
    assert true.peak_flops == hw.fp8_tflops * 1e12
    t = moe_layer_s(None, fp8.hidden_size.to_numpy(float)[:, None],
                    (fp8.inter_size / fp8.moe_tp_size).to_numpy(float)[:, None], 1, true,
                    gated=F.gated(fp8)[:, None], load=F.moe_loads(fp8, 16, 0))  # 1-byte weights, by hand
    fp8["latency_ms"] = t.mean(-1) * 1e3 * np.exp(0.01 * np.random.default_rng(5).standard_normal(len(fp8)))
    alone = _fit(moe, gemm, hw)
    rec = _fit(pd.concat([moe, fp8], ignore_index=True), gemm, hw)
    assert rec["params"]["moe"] == alone["params"]["moe"]  # bf16 untouched by the fp8 rows
    got = rec["params_by_dtype"]["fp8"]["moe"]
    assert got["peak_flops"] == hw.fp8_tflops * 1e12
    for name in ("fixed_us", "bandwidth_efficiency"):
        assert got[name] == pytest.approx(getattr(true, name), rel=0.05), name
    assert rec["components"]["moe_decode_fp8"]["heldout"]["median"] < 0.02
    assert rec["excluded"]["moe fp8: dtype not fp8"] == len(moe)
    assert "fp8_block" not in rec["params_by_dtype"]  # no rows of it
    cal = F.write_record(rec, tmp_path / "cal.json")
    mixed = pd.concat([moe.head(3), fp8.head(3), fp8.head(1).assign(dtype="int4_wo")], ignore_index=True)
    out = F.predict(mixed, json.loads(cal.read_text()))
    np.testing.assert_allclose(out.predicted_ms[:6] / out.latency_ms[:6], 1, atol=0.05)
    assert np.isnan(out.predicted_ms[6])
