"""lynx_sim/measured: the reader of NVIDIA AIConfigurator's tables (on small parquet tables laid
out like the package's folders, and on the installed package when present) and the rebuilt
routing of its MoE rows (hand-computed cases, invariants, torch's bfloat16 as the oracle).

    python -m pytest -q tests/test_measured.py
"""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch

from lynx_sim.measured import (MeasuredDataError, balanced_assignment, balanced_counts, data_root, inventory,
                               local_counts, power_law_counts, power_law_draws, power_law_routing, read_allreduce,
                               read_context_attention, read_gemm, read_generation_attention, read_moe, read_table,
                               routing_faithful, row_counts, versions)
from lynx_sim.measured import aiconfigurator as aic
from lynx_sim.measured.routing import _add_round_robin, _take_round_robin

HEAD = {"framework": "VLLM", "device": "NVIDIA H200"}


# ---------------------------------------------------------------- small tables, same schema

def write(root, gpu, op, fw, version, name, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = root / gpu / op / fw / version
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{**HEAD, "version": version, **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), folder / name)


def moe_row(dtype="bfloat16", T=8, dist="balanced", source="vllm_unquantizedfusedmoe_triton_tritonexperts",
            hidden=2048, E=128, k=8, latency=0.05):
    return {"op_name": "moe", "kernel_source": source, "moe_dtype": dtype, "num_tokens": T, "hidden_size": hidden,
            "inter_size": 768, "topk": k, "num_experts": E, "moe_tp_size": 1, "moe_ep_size": 1,
            "distribution": dist, "latency": latency}


def attn_row(op, isl, step):
    return {"op_name": op, "kernel_source": "vllm_flash_attn_fa3", "batch_size": 4, "isl": isl, "num_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "beam_width": 1, "attn_dtype": "bfloat16",
            "kv_cache_dtype": "bfloat16", "step": step, "window_size": 0, "latency": 0.02}


@pytest.fixture
def fake(tmp_path):
    """h200_sxm with MoE in vLLM 0.9.0, 0.19.0 and 0.24.0 (and sglang), GEMM, both attention
    tables and the custom all-reduce; a100_sxm with GEMM only."""
    for v, lat in (("0.9.0", 9.0), ("0.19.0", 1.9), ("0.24.0", 2.4)):
        write(tmp_path, "h200_sxm", "moe", "vllm", v, "moe_perf.parquet",
              [moe_row(latency=lat), moe_row("fp8", source="vllm_fp8moe_triton_tritonexperts"),
               moe_row("fp8", source="vllm_fp8moe_flashinfer_cutlass_flashinferexperts"),
               moe_row("fp8_block", T=64, hidden=7168, E=256, dist="power_law_1.2")])
    write(tmp_path, "h200_sxm", "moe", "sglang", "0.5.14", "moe_perf.parquet", [moe_row(latency=5.0)])
    (tmp_path / "h200_sxm" / "moe" / "vllm" / "0.30.0").mkdir()  # a version folder without the table
    gemm = {"op_name": "gemm", "kernel_source": "torch.nn.functional.linear", "m": 16, "n": 4096, "k": 4096}
    write(tmp_path, "h200_sxm", "gemm", "vllm", "0.24.0", "gemm_perf.parquet",
          [{**gemm, "gemm_dtype": "bfloat16", "latency": 0.03}, {**gemm, "gemm_dtype": "fp8", "latency": 0.02}])
    write(tmp_path, "h200_sxm", "attention", "vllm", "0.24.0", "generation_attention_perf.parquet",
          [attn_row("generation_attention", 1, 1023)])
    write(tmp_path, "h200_sxm", "attention", "vllm", "0.24.0", "context_attention_perf.parquet",
          [attn_row("context_attention", 512, 0)])
    write(tmp_path, "h200_sxm", "comm", "vllm", "0.24.0", "custom_allreduce_perf.parquet",
          [{"op_name": "all_reduce", "kernel_source": "vLLM_custom_graph", "allreduce_dtype": "bfloat16",
            "num_gpus": 2, "message_size": 4096, "latency": 0.004, "backend": "vllm_graph"}])
    write(tmp_path, "a100_sxm", "gemm", "vllm", "0.14.0", "gemm_perf.parquet",
          [{**gemm, "gemm_dtype": "bfloat16", "latency": 0.05}])
    return tmp_path


def test_newest_version_is_default_in_version_order(fake):
    assert versions("h200", "moe", root=fake) == ["0.9.0", "0.19.0", "0.24.0"]  # not string order
    df = read_moe("h200", root=fake)
    assert df.version.unique().tolist() == ["0.24.0"] and df.latency_ms.tolist() == [2.4]
    assert read_moe("h200", version="0.19.0", root=fake).latency_ms.tolist() == [1.9]
    assert read_moe("h200", framework="sglang", root=fake).latency_ms.tolist() == [5.0]


def test_dtype_and_kernel_source_selection(fake):
    assert read_moe("h200", root=fake).dtype.unique().tolist() == ["bfloat16"]  # the default
    assert len(read_moe("h200", dtype=None, root=fake)) == 4
    assert len(read_moe("h200", dtype="fp8", root=fake)) == 2
    one = read_moe("h200", dtype="fp8", kernel_source="vllm_fp8moe_triton_tritonexperts", root=fake)
    assert one.kernel_source.tolist() == ["vllm_fp8moe_triton_tritonexperts"]
    with pytest.raises(MeasuredDataError, match=r"moe_perf.parquet: no row with dtype == 'int4_wo'.*bfloat16"):
        read_moe("h200", dtype="int4_wo", root=fake)
    with pytest.raises(MeasuredDataError, match="kernel_source == 'nope'"):
        read_moe("h200", kernel_source="nope", root=fake)


def test_routing_flag_column(fake):
    df = read_moe("h200", dtype=None, root=fake)
    dsv3 = df.hidden_size == 7168
    assert not df.routing_faithful[dsv3].any() and df.routing_faithful[~dsv3].all()
    assert df.routing_note[dsv3].str.contains("grouped top-k").all() and (df.routing_note[~dsv3] == "").all()


def test_other_tables_and_our_columns(fake):
    g = read_gemm("h200", root=fake)
    assert set(g.dtype) == {"bfloat16", "fp8"}
    assert read_gemm("h200", dtype="fp8", root=fake).latency_ms.tolist() == [0.02]
    gen = read_generation_attention("h200", root=fake)
    assert gen.kv_len.tolist() == [1024] and "attn_dtype" not in gen and gen.dtype.tolist() == ["bfloat16"]
    assert read_context_attention("h200", root=fake).isl.tolist() == [512]
    ar = read_allreduce("h200", root=fake)
    assert ar.message_elements.tolist() == [4096] and ar.message_bytes.tolist() == [8192]
    assert "latency" not in ar and ar.latency_ms.tolist() == [0.004]
    assert read_gemm("a100_80gb", root=fake).latency_ms.tolist() == [0.05]  # our name -> a100_sxm
    assert read_gemm("a100_sxm", root=fake).latency_ms.tolist() == [0.05]  # theirs as it is


def test_inventory(fake):
    inv = inventory(root=fake)
    h200_moe = inv[(inv.gpu == "h200_sxm") & (inv.table == "moe") & (inv.framework == "vllm")]
    assert sorted(h200_moe.version) == ["0.19.0", "0.24.0", "0.9.0"]
    assert set(inv.table) == {"moe", "gemm", "generation_attention", "context_attention", "allreduce"}


@pytest.mark.parametrize("call, message", [
    (lambda r: read_moe("mi300x", root=r), r"GPU 'mi300x'.*no data at .*mi300x.*present: \['a100_sxm', 'h200_sxm'\]"),
    (lambda r: read_moe("a100_80gb", root=r), r"a100_sxm: no 'moe' data for framework 'vllm' at .*a100_sxm/moe/vllm"),
    (lambda r: read_moe("h200", framework="trtllm", root=r), r"framework 'trtllm'.*present: \['sglang', 'vllm'\]"),
    (lambda r: read_moe("h200", version="0.30.0", root=r),
     r"h200_sxm/moe/vllm: version '0.30.0' has no moe_perf.parquet; versions present: \['0.9.0', '0.19.0', '0.24.0'\]"),
    (lambda r: read_table("h200", "mla", root=r), r"table kind 'mla'"),
    (lambda r: read_moe("h200", root=r / "absent"), r"root .*absent is not a folder"),
])
def test_errors_name_what_is_missing(fake, call, message):
    with pytest.raises(MeasuredDataError, match=message) as e:
        call(fake)
    assert isinstance(e.value, ValueError)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MeasuredDataError, match=r"aiconfigurator-core is not installed: pip install"):
        data_root()


REAL = importlib.util.find_spec("aiconfigurator_core") is not None


@pytest.mark.skipif(not REAL, reason="aiconfigurator-core is not installed (pip install -e '.[measured]')")
def test_installed_package_known_facts():
    pytest.importorskip("pyarrow")
    imported_before = "aiconfigurator_core" in sys.modules
    root = data_root()
    assert root.name == "data" and (root / "h200_sxm").is_dir()
    assert versions("h200", "moe")[-1] == "0.24.0"
    moe = read_moe("h200")
    assert set(moe.dtype) == {"bfloat16"} and (moe.distribution == "balanced").any()
    assert (moe.latency_ms > 0).all() and moe.latency_ms.dtype == np.float64
    dsv3 = read_moe("h200", dtype="fp8_block").query("hidden_size == 7168 and num_experts == 256")
    assert len(dsv3) and not dsv3.routing_faithful.any()
    for gpu in ("h100_sxm", "h200", "a100_80gb", "b200", "l40s"):
        for kind in ("moe", "gemm", "generation_attention", "context_attention", "allreduce"):
            assert (read_table(gpu, kind).latency_ms > 0).all(), (gpu, kind)
    if not imported_before:
        assert "aiconfigurator_core" not in sys.modules  # located and read without importing it


# ---------------------------------------------------------------- balanced routing

def test_balanced_hand_cases():
    # T >= s: E=8, k=2, s=4; token t -> t, t+4 (mod 8): 0:{0,4} 1:{1,5} 2:{2,6} 3:{3,7} 4:{4,0}
    assert balanced_assignment(5, 8, 2).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7], [4, 0]]
    assert balanced_counts(5, 8, 2).tolist() == [2, 1, 1, 1, 2, 1, 1, 1]
    # T < s: E=8, k=2, s=4, T=3: floor(4t/3) = 0, 1, 2 -> {0,4} {1,5} {2,6}
    assert balanced_assignment(3, 8, 2).tolist() == [[0, 4], [1, 5], [2, 6]]
    assert balanced_counts(3, 8, 2).tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    # T < s: E=12, k=3, s=4, T=2: floor(4t/2) = 0, 2 -> {0,4,8} {2,6,10}
    assert balanced_counts(2, 12, 3).tolist() == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert balanced_counts(1, 128, 8).sum() == 8 and balanced_counts(1000, 128, 8).sum() == 8000


def collector_bf16(T, E, k):
    """The collector's T < s expression run by torch itself with bfloat16 as the default dtype."""
    s = math.ceil(E / k)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        t, j = torch.arange(T).unsqueeze(1), torch.arange(k).unsqueeze(0)
        return ((t * s / T + j * s) % E).long().numpy()
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("E, k", [(896, 16), (512, 22), (512, 10), (384, 8), (256, 6), (128, 6), (160, 8), (257, 3)])
def test_balanced_small_T_is_torch_bfloat16(E, k):
    s = math.ceil(E / k)
    for T in range(1, s):
        assert np.array_equal(balanced_assignment(T, E, k), collector_bf16(T, E, k)), (T, E, k)


def test_bfloat16_changes_the_load_where_it_should():
    bf, ex = balanced_counts(32, 896, 16), balanced_counts(32, 896, 16, exact=True)
    assert ex.max() == 1 and (ex > 0).sum() == 512  # the intended spread
    assert (bf > 0).sum() == 370 and bf.max() == 3  # what the GPU got
    assert np.array_equal(balanced_counts(16, 256, 8), balanced_counts(16, 256, 8, exact=True))  # exact there


# ---------------------------------------------------------------- power-law routing

CASES = [(1, 128, 8, 1.01, 1), (4, 128, 8, 1.2, 1), (16, 8, 2, 1.2, 1), (64, 128, 8, 1.01, 4), (256, 128, 8, 1.2, 8),
         (1024, 256, 8, 1.2, 32), (2048, 512, 22, 1.01, 16), (33, 60, 4, 1.2, 3), (8, 16, 1, 1.01, 2)]


@pytest.mark.parametrize("T, E, k, alpha, ep", CASES)
def test_power_law_invariants(T, E, k, alpha, ep):
    rng = np.random.default_rng(7)
    for _ in range(5):
        counts, assign = power_law_routing(T, E, k, alpha, ep, rng=rng)
        assert counts.dtype == np.int64 and counts.shape == (E,) and assign.shape == (T, k)
        assert counts.sum() == T * k and counts.min() >= 0 and counts.max() <= T
        blocks = counts.reshape(ep, -1).sum(axis=1)
        assert blocks[0] == blocks.max()  # rank 0, the timed GPU, holds the heaviest block
        srt = np.sort(assign, axis=1)
        assert (srt[:, 1:] != srt[:, :-1]).all()  # no token meets an expert twice
        assert np.array_equal(np.bincount(assign.ravel(), minlength=E), counts)


def test_power_law_seeded():
    a = power_law_draws(256, 128, 8, 1.2, 4, rng=np.random.default_rng(3))
    b = power_law_draws(256, 128, 8, 1.2, 4, rng=np.random.default_rng(3))
    c = power_law_draws(256, 128, 8, 1.2, 4, rng=np.random.default_rng(4))
    assert a.shape == (5, 128) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({tuple(r) for r in a}) == 5  # the draws of one row differ


def test_alpha_1_2_more_skewed_than_1_01():
    def skew(alpha):
        rng = np.random.default_rng(0)
        c = np.stack([power_law_counts(256, 128, 8, alpha, rng=rng) for _ in range(200)])  # [draws, E]
        return (c.std(axis=1) / c.mean(axis=1)).mean(), (np.sort(c, axis=1)[:, -8:].sum(axis=1) / 2048).mean()
    (cv1, top1), (cv2, top2) = skew(1.01), skew(1.2)
    assert cv2 > cv1 * 1.1 and top2 > top1 * 1.1  # coefficient of variation, top-8 experts' share


def test_power_law_sampling_range(monkeypatch):
    from lynx_sim.measured import routing
    seen, real = [], routing.sample_power_law

    def spy(n, alpha, lo, hi, rng):
        seen.append((lo, hi))
        return real(n, alpha, lo, hi, rng)
    monkeypatch.setattr(routing, "sample_power_law", spy)
    for T in (4, 16, 17, 40):  # T k > E from T = 17 on (k = 8, E = 128)
        power_law_counts(T, 128, 8, 1.2, rng=np.random.default_rng(0))
    assert seen == [(0.01, 2.0), (0.01, 2.0), (1.0, 0.8 * 17), (1.0, 32.0)]


def literal_adjust(counts, ep, units, step, cap):
    """_round_robin_adjust_per_rank step by step, as the collector runs it."""
    blocks = counts.reshape(ep, -1).copy()
    while units > 0:
        progressed = False
        for r in range(ep):
            valid = np.flatnonzero(blocks[r] < cap) if step > 0 else np.flatnonzero(blocks[r] > 0)
            if not len(valid):
                continue
            pick = np.argmin(blocks[r, valid]) if step > 0 else np.argmax(blocks[r, valid])
            blocks[r, valid[pick]] += step
            units -= 1
            progressed = True
            if units == 0:
                break
        if not progressed:
            break
    return blocks.reshape(-1)


def test_round_robin_closed_form_matches_step_by_step():
    rng = np.random.default_rng(11)
    for _ in range(300):
        ep = int(rng.choice([1, 2, 3, 4, 8]))
        E, cap = ep * int(rng.integers(1, 9)), int(rng.integers(1, 12))
        counts = rng.integers(0, cap + 1, size=E)
        room = int((cap - counts).sum())
        units = int(rng.integers(0, room + 1))
        assert np.array_equal(_add_round_robin(counts, ep, units, cap), literal_adjust(counts, ep, units, 1, cap))
        units = int(rng.integers(0, counts.sum() + 1))
        assert np.array_equal(_take_round_robin(counts, ep, units), literal_adjust(counts, ep, units, -1, cap))


# ---------------------------------------------------------------- rank 0's share, flags, rows

def test_local_counts():
    c = np.arange(16)
    assert local_counts(c, ep=4).tolist() == [0, 1, 2, 3]
    assert local_counts(c, tp=8).tolist() == list(range(16))  # TP narrows GEMMs, keeps every expert
    assert local_counts(np.stack([c, c]), ep=2).shape == (2, 8)
    assert local_counts(np.arange(10), ep=4).tolist() == [0, 1, 2]  # vLLM: rank 0 gets ceil(E / ep)
    with pytest.raises(ValueError, match="never combines"):
        local_counts(c, ep=2, tp=2)


def test_routing_faithful():
    ok, why = routing_faithful(64, 7168, 256, 8, "balanced")
    assert not ok and "grouped top-k" in why
    assert routing_faithful(64, 7168, 384, 8, "power_law_1.2") == (True, "")  # Kimi-K2: one group
    assert routing_faithful(16, 2048, 128, 8, "balanced") == (True, "")
    ok, why = routing_faithful(3, 1, 4, 3, "balanced")  # s = 2: j s = 4 = E repeats expert 0
    assert not ok and "repeats an expert" in why


def test_row_counts():
    rng = np.random.default_rng(0)
    p = row_counts(64, 128, 8, "power_law_1.01", ep=4, rng=rng)
    assert p.shape == (5, 32) and (p.sum(axis=1) <= 64 * 8).all()
    b = row_counts(64, 128, 8, "balanced", ep=4, rng=rng)
    assert b.shape == (1, 32) and b.sum() == 64 * 8 // 4
    with pytest.raises(ValueError, match="distribution"):
        row_counts(64, 128, 8, "zipf", rng=rng)


def test_allreduce_of_an_unknown_element_size_is_named(fake):
    """Message bytes need the element size: an unknown dtype is refused by name, not priced as NaN."""
    write(fake, "h200_sxm", "comm", "vllm", "0.25.0", "custom_allreduce_perf.parquet",
          [{"op_name": "all_reduce", "kernel_source": "vLLM_custom_graph", "allreduce_dtype": "float8_e5m2",
            "num_gpus": 2, "message_size": 4096, "latency": 0.004, "backend": "vllm_graph"}])
    with pytest.raises(MeasuredDataError, match="float8_e5m2"):
        read_allreduce("h200", root=fake)
