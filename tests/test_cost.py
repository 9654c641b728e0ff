"""The step cost model against hand arithmetic, and the facts it must reproduce (LYNX.md section 1).

Hand arithmetic runs on the uncalibrated roofline (`load(..., calibrated=False)`: datasheet peaks
and the hardware yaml's factors), whose terms are short enough to write out; the calibrated model
(the default, conf/calibration/) is held to the same pricing functions with the fitted parameters
(`test_calibrated_*`). MoE-layer prices go through `Roofline.moe_layers_s`, the one function
`step` (what the simulator calls) prices the MoE layers with."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR
from lynx_sim.cost import HardwareSpec, Roofline
from lynx_sim.model import ModelSpec


def load(model="mixtral_8x7b", hw="h100_sxm", calibrated=False):
    m = ModelSpec.from_cfg(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
    h = HardwareSpec.from_cfg(OmegaConf.load(CONF_DIR / "hardware" / f"{hw}.yaml"))
    h = h if calibrated else replace(h, calibration=None)
    return m, h, Roofline(m, h)


def roofline_gemm(h, m_tokens, n, k, wb=2):
    """One GEMM on the uncalibrated roofline: max(weight bytes / BW, FLOPs / FLOP/s)."""
    return max(n * k * wb / h.bandwidth_Bps, 2.0 * m_tokens * n * k / h.flops_per_s(wb))


def test_model_byte_counts():
    m, _, _ = load()
    assert m.expert_params == 3 * 4096 * 14336
    assert m.expert_bytes == 2 * 3 * 4096 * 14336
    assert m.moe_layers == tuple(range(32))
    ds = load("deepseek_v2_lite")[0]
    assert ds.moe_layers == tuple(range(1, 27)) and ds.num_moe_layers == 26
    assert ds.shared_expert_bytes == 3 * 2048 * 2816 * 2
    ll = load("llama4_maverick")[0]
    assert ll.moe_layers == tuple(range(1, 48, 2)) and ll.num_moe_layers == 24


def test_moe_layer_hand_arithmetic():
    m, h, r = load()
    counts = np.zeros((1, 8), dtype=np.int64)
    counts[0, [0, 3, 5]] = [10, 4, 2]  # 16 assignments = 8 tokens x k=2, 3 distinct experts
    bw = 3350e9 * 0.892  # measured factor of conf/hardware/h100_sxm.yaml
    bytes_ = 3 * m.expert_bytes
    flops = 2 * m.expert_params * 16  # 3 experts, each padded to one 16-row tile
    router = max(4096 * 8 * 2 / bw, 2 * 8 * 4096 * 8 / (989.4e12 * 0.752))  # [8 tokens, 4096] x [4096, 8]
    expect = max(bytes_ / bw, flops / (989.4e12 * 0.752)) + 12e-6 + router
    assert r.moe_layers_s(counts, 8)[0][0] == pytest.approx(expect, rel=1e-12)
    assert bytes_ / bw > flops / (989.4e12 * 0.752), "decode at B=8 is memory-bound"


@pytest.mark.parametrize("gpus, expert_parallel", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("acted", [True, False])
def test_step_prices_moe_layers_with_moe_layers_s(gpus, expert_parallel, acted):
    """The simulator's step takes its MoE term and collectives from moe_layers_s, bit for bit, so
    the hand-arithmetic tests above price what the simulator runs."""
    from lynx_sim.cost import Parallel

    m, h, _ = load()
    r = Roofline(m, h, Parallel(gpus=gpus, expert_parallel=expert_parallel), policy_overhead_us=8.0)
    counts = np.random.default_rng(gpus).multinomial(16 * 2, np.full(8, 1 / 8), size=32)  # [32, 8]: 16 tokens x k=2
    layers, comm = r.moe_layers_s(counts, 16, acted)
    c = r.step(16, 16 * 300, counts, acted=acted)
    assert np.array_equal(c.moe_layer_s, layers) and c.moe_s == float(layers.sum())
    assert c.comm_s == r.comm_s(16, counts, comm)


def test_decode_moe_time_linear_in_distinct_experts():
    """Memory-bound decode: each extra distinct expert costs exactly expert_bytes / bandwidth."""
    m, h, r = load("qwen3_30b_a3b")
    times = []
    for d in range(8, 129, 8):
        counts = np.zeros((1, 128), dtype=np.int64)
        counts[0, :d] = 1
        counts[0, 0] += 64 * 8 - d  # the same 64 tokens x k=8 assignments, spread over d experts
        times.append(r.moe_layers_s(counts, 64)[0][0])
    steps = np.diff(times)
    np.testing.assert_allclose(steps, 8 * m.expert_bytes / h.bandwidth_Bps, rtol=1e-9)


def test_prefill_sized_batches_are_flat_in_distinct_experts():
    """Compute-bound (8k tokens): the MoE time barely moves with the number of distinct experts."""
    _, _, r = load("qwen3_30b_a3b")
    tokens = 8192 * 8
    few = np.zeros((1, 128), dtype=np.int64)
    few[0, :32] = tokens // 32
    many = np.full((1, 128), tokens // 128, dtype=np.int64)
    assert r.moe_layers_s(many, 8192)[0][0] / r.moe_layers_s(few, 8192)[0][0] == pytest.approx(1.0, abs=1e-9)


def test_step_components_and_attention_grows_with_context():
    _, _, r = load()
    counts = np.zeros((32, 8), dtype=np.int64)
    counts[:, :4] = 8
    short, long = r.step(16, 16 * 100, counts), r.step(16, 16 * 4000, counts)
    assert long.attention_s > short.attention_s
    assert short.total_s == pytest.approx(short.attention_s + short.dense_ffn_s + short.moe_s + short.lm_head_s + 300e-6)
    assert short.dense_ffn_s == 0.0  # Mixtral: every layer is MoE
    assert load("deepseek_v2_lite")[2].dense_ffn_s(16) > 0  # its first layer is dense


def test_mla_caches_the_latent():
    _, _, r = load("deepseek_v2_lite")
    assert r.kv_bytes_per_token() == (512 + 64) * 2
    _, _, g = load("qwen3_30b_a3b")
    assert g.kv_bytes_per_token() == 2 * 4 * 128 * 2


def test_weight_only_4bit_runs_on_bf16_mma():
    _, h, _ = load()
    assert h.flops_per_s(1) == h.fp8_tflops * 1e12 * h.flops_efficiency  # fp8 weights, fp8 MMA
    assert h.flops_per_s(2) == h.flops_per_s(0.53125) == h.bf16_tflops * 1e12 * h.flops_efficiency  # MXFP4: w4a16


def test_kv_heads_fewer_than_ranks_are_replicated():
    """Under TP a rank holds num_kv_heads / tp KV heads, but never less than one: with more ranks
    than KV heads each head is replicated, and MLA's latent is on every rank (hand arithmetic)."""
    from lynx_sim.cost import Parallel
    from lynx_sim.cost.memory import plan

    m, h, _ = load("qwen3_30b_a3b", "h200")  # 4 KV heads of 128
    per_rank = {tp: Roofline(m, h, Parallel(tp)).kv_bytes_per_token_rank() for tp in (1, 2, 4, 8)}
    assert per_rank == {1: 2 * 4 * 128 * 2, 2: 2 * 2 * 128 * 2, 4: 2 * 1 * 128 * 2, 8: 2 * 1 * 128 * 2}
    r4, r8 = Roofline(m, h, Parallel(4)), Roofline(m, h, Parallel(8))
    kv_only = lambda r: r.attention_s(1, 100_000) - r.attention_s(1, 0)  # noqa: E731 (the KV term of a long context)
    assert kv_only(r8) == pytest.approx(kv_only(r4), rel=0.05)  # TP 8 reads as many KV bytes per rank as TP 4
    cap4 = plan(m, h, Parallel(4), r4.kv_bytes_per_token_rank()).kv_capacity_tokens
    cap8 = plan(m, h, Parallel(8), r8.kv_bytes_per_token_rank()).kv_capacity_tokens
    assert cap8 < 2 * cap4  # replicated heads: doubling the GPUs frees weight memory only
    d, hd, _ = load("deepseek_v2_lite", "h200")
    assert Roofline(d, hd, Parallel(2)).kv_bytes_per_token_rank() == (512 + 64) * 2  # the latent is replicated
    assert Roofline(d, hd, Parallel(2, expert_parallel=True)).kv_bytes_per_token_rank() == (512 + 64) * 2


def test_routed_expert_term_by_hand():
    """routed_experts_s (what the executor times): 3 distinct experts streamed, tile-padded FLOPs,
    the fixed per-layer cost; no router, shared experts or collectives; tile rows as the kernel ran."""
    m, h, r = load()
    counts = np.zeros((2, m.num_experts), dtype=np.int64)
    counts[0, :3] = (1, 2, 20)
    counts[1, 0] = 3
    pad = lambda n, b=16: -(-n // b) * b  # noqa: E731
    want = lambda b: max(3 * m.expert_bytes / h.bandwidth_Bps,  # noqa: E731
                         2.0 * m.expert_params * (pad(1, b) + pad(2, b) + pad(20, b)) / h.flops_per_s(m.weight_bytes))
    np.testing.assert_allclose(r.routed_experts_s(counts)[0], want(16) + 12e-6, rtol=1e-12)
    np.testing.assert_allclose(r.routed_experts_s(counts, block_m=64)[0], want(64) + 12e-6, rtol=1e-12)


def test_calibrated_model_prices_through_the_fitted_terms():
    """With its calibration (the default for h100_sxm and h200) every term is the pricing
    function of its component with the fitted parameters: the routed experts (moe_layer_s), the
    router GEMM, attention projections and kernel, the LM head, the all-reduce."""
    from lynx_sim.cost import Parallel
    from lynx_sim.cost.attention import attention_decode_s
    from lynx_sim.cost.gemm import gemm_s
    from lynx_sim.cost.moe_layer import moe_layer_s
    from lynx_sim.cost.parallel import allreduce_fitted_s
    from lynx_sim.cost.roofline import expert_stream_s

    m, h, r = load("qwen3_30b_a3b", "h200", calibrated=True)
    cal = h.calibration
    assert cal is not None and cal.gpu == "h200" and set(cal.fitted) == {"moe", "gemm", "attention_decode",
                                                                          "attention_prefill", "allreduce"}
    counts = np.random.default_rng(0).multinomial(64 * 8, np.full(128, 1 / 128), size=48)
    H, I, E = 2048, 768, 128
    g = lambda mt, n, k: float(gemm_s(mt, n, k, 2, cal.gemm, 2.0))  # noqa: E731
    routed = moe_layer_s(counts, H, I, 2, cal.moe)
    np.testing.assert_array_equal(r.routed_experts_s(counts), routed)
    np.testing.assert_allclose(r.moe_layers_s(counts, 64, acted=False)[0], routed + g(64, E, H), rtol=1e-12)
    proj = g(64, (32 + 2 * 4) * 128, H) + g(64, H, 32 * 128)
    kernel = float(attention_decode_s(64 * 1000, 32, 4, 128, 2, cal.attention_decode, batch=64))
    assert r.attention_s(64, 64 * 1000) == pytest.approx(48 * (proj + kernel), rel=1e-12)
    assert r.lm_head_s(64) == pytest.approx(g(64, m.vocab_size, H), rel=1e-12)
    tp2 = Roofline(m, h, Parallel(2))
    ar = float(allreduce_fitted_s(64 * H * 2, 2, cal.allreduce))
    np.testing.assert_allclose(tp2.moe_layers_s(counts, 64)[1], ar, rtol=1e-12)
    assert r.expert_time_s() == expert_stream_s(H, I, 2, cal.moe)


def test_one_more_expert_costs_its_bytes_its_start_up_and_its_blocks():
    """expert_stream_s by hand on a memory-bound kernel without overlap: one more expert holding
    one token adds its weight bytes, its activation bytes, its start-up and its thread blocks."""
    from lynx_sim.cost.moe_layer import MoEKernelParams
    from lynx_sim.cost.roofline import expert_stream_s

    p = MoEKernelParams(1e12, 1e15, 0.5, 0.5, fixed_us=20.0, block_m=16, expert_us=0.3, block_ns=2.0, block_n=64,
                        k_ns=1.5, count_activations=True)
    H, I = 1024, 256
    blocks = -(-2 * I // 64) + -(-H // 64)  # gate+up columns, then down columns, one tile row
    acts = 2 * (3 * H + 2 * 3 * I)
    want = (3 * H * I * 2 + acts) / 0.5e12 + 0.3e-6 + blocks * 2e-9
    assert expert_stream_s(H, I, 2, p) == pytest.approx(want, rel=1e-12)
    assert expert_stream_s(H, I, 1, p) < expert_stream_s(H, I, 2, p)  # fewer bytes per weight


def test_calibrated_decode_is_slower_than_the_roofline():
    """What the measurements said of the uncalibrated roofline: too fast on decode attention, on
    small GEMMs and on the MoE layer (fixed costs, overlap, activation traffic)."""
    counts = np.random.default_rng(1).multinomial(64 * 8, np.full(128, 1 / 128), size=48)
    for hw in ("h100_sxm", "h200"):
        _, _, raw = load("qwen3_30b_a3b", hw)
        _, _, cal = load("qwen3_30b_a3b", hw, calibrated=True)
        a, b = raw.step(64, 64 * 1500, counts), cal.step(64, 64 * 1500, counts)
        assert b.attention_s > a.attention_s and b.moe_s > a.moe_s and b.lm_head_s > a.lm_head_s, hw


def test_serving_step_prices_decode_and_prefill_attention_apart():
    """A mixed step: the decode sequences through the decode kernel, the prefill chunks through
    the prefill kernel with their own pairs, KV reads and query tokens."""
    from lynx_sim.cost.attention import attention_decode_s, attention_s
    from lynx_sim.cost.roofline import PrefillWork

    m, h, r = load("qwen3_30b_a3b", "h200", calibrated=True)
    cal = h.calibration
    chunk = PrefillWork(seqs=2, tokens=256, cached=100, pairs=128 * 50 + 128 * 129 // 2 + 128 * 129 // 2)
    B = 30 + 256  # 30 decode sequences and the chunks' 256 tokens
    mixed = r.attention_s(B, 30 * 500, chunk)
    joined = replace(cal.attention_prefill, fixed_us=0.0)  # one varlen kernel call: the decode fit's floor only
    pre = float(attention_s(356, chunk.pairs, 2, 32, 4, 128, 2, joined, query_tokens=256))
    dec = float(attention_decode_s(30 * 500, 32, 4, 128, 2, cal.attention_decode, batch=30))
    proj = r._batch(B)["projections"]  # all 286 tokens through the projections
    assert mixed == pytest.approx(48 * (proj + dec + pre), rel=1e-12)
    assert r.attention_s(30, 30 * 500) == pytest.approx(48 * (r._batch(30)["projections"] + dec), rel=1e-12)
    alone = float(attention_s(356, chunk.pairs, 2, 32, 4, 128, 2, cal.attention_prefill, query_tokens=256))
    assert r.attention_s(256, 0, chunk) == pytest.approx(48 * (r._batch(256)["projections"] + alone), rel=1e-12)


def test_calibration_file_is_checked_by_field(tmp_path):
    """A calibration is found by name or path, must be of this GPU, and every field is checked:
    one line naming the file and the field, never a traceback from the dataclass."""
    from lynx_sim.cost.calibration import CalibrationError, CostCalibration

    _, h, _ = load()
    good = json.loads((CONF_DIR / "calibration" / "h100_sxm.json").read_text())
    cal = h.calibrated("h100_sxm").calibration
    assert cal.path == "conf/calibration/h100_sxm.json" and h.calibrated("h100_sxm.json").calibration == cal
    assert cal.sha256 == hashlib.sha256((CONF_DIR / "calibration" / "h100_sxm.json").read_bytes()).hexdigest()
    assert cal.describe()["sha256"] == cal.sha256 and cal.describe()["path"] == cal.path  # no absolute paths
    with pytest.raises(ValueError, match="of gpu 'h200', not 'h100_sxm'"):
        h.calibrated("h200")
    with pytest.raises(CalibrationError, match="known names"):
        CostCalibration.load("no_such_gpu")
    cases = [
        (lambda d: d.update(format=7), "'format': expected 1, found 7"),
        (lambda d: d["params"]["moe"].update(warp=1), r"'params.moe': expected keys among .* found \['warp'\]"),
        (lambda d: d["params"]["moe"].update(bandwidth_efficiency=1.5), "'params.moe.bandwidth_efficiency': expected a fraction"),
        (lambda d: d["params"]["gemm"].update(fixed_us="3"), "'params.gemm.fixed_us': expected a finite number"),
        (lambda d: d["params"]["moe"].update(count_activations=1), "'params.moe.count_activations': expected true/false"),
        (lambda d: d["params"]["moe"].update(fixed_us=True), "'params.moe.fixed_us': expected a number"),
        (lambda d: d["params"]["allreduce"]["bus_Bps"].update({"2": 0}), "'params.allreduce.bus_Bps.2'"),
        (lambda d: d.pop("gpu"), "'gpu': expected a str"),
        (lambda d: d.update(heldot={}), r"expected top-level keys among .* found \['heldot'\]"),
        (lambda d: d["heldout"].update(moe_decode=0.04), "'heldout.moe_decode': expected {median, p90, n}"),
        (lambda d: d["params"]["moe"].update(block_m=16.7), "'params.moe.block_m': expected an integer, found 16.7"),
        (lambda d: d["params"]["moe"].pop("compute_efficiency"), r"'params.moe': expected keys \['compute_efficiency'\]"),
        (lambda d: d["params_by_dtype"].update(fp8={"gemm": {}}), "'params_by_dtype': expected"),
    ]
    for mutate, msg in cases:
        d = json.loads(json.dumps(good))
        mutate(d)
        path = tmp_path / "cal.json"
        path.write_text(json.dumps(d))
        with pytest.raises(CalibrationError, match=msg):
            CostCalibration.load(path)
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="readable JSON"):
        CostCalibration.load(path)
    d = json.loads(json.dumps(good))
    d["params"]["moe"]["peak_bandwidth_Bps"] = 1e12
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="expected the peaks of hardware h100_sxm"):
        h.calibrated(path)


def test_a_component_the_calibration_lacks_is_priced_uncalibrated_and_named(tmp_path):
    m, h, raw = load("qwen3_30b_a3b")
    d = json.loads((CONF_DIR / "calibration" / "h100_sxm.json").read_text())
    del d["params"]["attention"]
    path = tmp_path / "partial.json"
    path.write_text(json.dumps(d))
    r = Roofline(m, h.calibrated(path))
    assert r.attn_decode == raw.attn_decode and r.moe_params != raw.moe_params
    notes = r.assumptions()
    assert any("attention_decode priced uncalibrated" in n for n in notes), notes
    assert not any("uncalibrated roofline" in n for n in notes)
    assert any("uncalibrated roofline" in n for n in raw.assumptions())


def test_every_hardware_is_complete_and_ordered_by_bandwidth():
    """Datasheet peaks present, efficiency factors in (0, 1], and decode MoE time falls as HBM
    bandwidth rises (memory-bound decode)."""
    from conftest import CONF_DIR as conf

    times, achievable = {}, {}
    for path in sorted((conf / "hardware").glob("*.yaml")):
        h = replace(HardwareSpec.from_cfg(OmegaConf.load(path)), calibration=None)  # one model for all
        assert h.hbm_bandwidth_gbps > 0 and h.bf16_tflops > 0 and h.fp8_tflops >= h.bf16_tflops and h.memory_gib > 0
        assert 0 < h.bandwidth_efficiency <= 1 and 0 < h.flops_efficiency <= 1
        m = ModelSpec.from_cfg(OmegaConf.load(CONF_DIR / "model" / "mixtral_8x7b.yaml"))
        counts = np.zeros((1, 8), dtype=np.int64)
        counts[0, :6] = 2
        times[h.name] = Roofline(m, h).moe_layers_s(counts, 6)[0][0]
        achievable[h.name] = h.bandwidth_Bps
    by_time = sorted(times, key=times.get)
    assert by_time == sorted(achievable, key=achievable.get, reverse=True), by_time
    assert by_time[0] == "b200" and by_time[-1] == "l40s", by_time


def test_fp8_experts_use_the_fitted_fp8_block_kernel():
    """1-byte experts are priced with the calibration's block-scaled fp8 fit (its own peak and
    efficiencies), and the summary says so; uncalibrated, with the fp8 peak."""
    m, h, _ = load("deepseek_v3", "h200", calibrated=True)
    assert m.weight_bytes == 1
    r = Roofline(m, h)
    assert r.moe_params == h.calibration.moe_by_dtype["fp8_block"] and r.moe_params.peak_flops == 1978.9e12
    assert any("block-scaled fp8" in a for a in r.assumptions())
    _, raw, _ = load("deepseek_v3", "h200")
    assert Roofline(m, raw).moe_params.peak_flops == 1978.9e12


def test_tile_padding_rounds_each_expert_up_to_the_block():
    _, h, r = load("qwen3_30b_a3b")
    counts = np.array([[17, 1, 0, 32]], dtype=np.int64)
    np.testing.assert_array_equal(r.padded(counts), [[32, 16, 0, 32]])
    assert h.moe_block_m == 16


def test_policy_overhead_is_paid_per_moe_layer_when_the_rule_runs():
    m, h, _ = load()
    r = Roofline(m, h, policy_overhead_us=8.0)
    counts = np.zeros((32, 8), dtype=np.int64)
    counts[:, :4] = 4
    ran, gated = r.step(8, 800, counts, acted=True), r.step(8, 800, counts, acted=False)
    assert ran.total_s - gated.total_s == pytest.approx(32 * 8e-6)
    assert ran.policy_s == pytest.approx(32 * 8e-6) and gated.policy_s == 0.0


def test_tensor_parallel_splits_weights_and_adds_allreduces():
    """TP over 2 GPUs: each rank streams half of each distinct expert; the MoE block ends with a
    ring all-reduce of B x H bf16 values: 2 (g-1)/g x bytes / link + latency."""
    from lynx_sim.cost import Parallel

    m, h, one = load()
    two = Roofline(m, h, Parallel(gpus=2))
    counts = np.zeros((1, 8), dtype=np.int64)
    counts[0, :4] = 4  # 8 tokens, k = 2, 4 distinct experts: memory-bound
    B = 8
    allreduce = 2 * 1 / 2 * B * 4096 * 2 / 900e9 + 10e-6
    bytes1 = 4 * m.expert_bytes + 4096 * 8 * 2
    bytes2 = 4 * m.expert_bytes / 2 + 4096 * 8 * 2  # the router is replicated
    assert one.moe_layers_s(counts, B)[0][0] == pytest.approx(bytes1 / h.bandwidth_Bps + 12e-6)
    assert two.moe_layers_s(counts, B)[0][0] == pytest.approx(bytes2 / h.bandwidth_Bps + 12e-6 + allreduce)
    assert two.moe_layers_s(counts, B)[1][0] == pytest.approx(allreduce)
    assert two.expert_time_s() == pytest.approx(one.expert_time_s() / 2)
    assert two.comm_s(B, np.repeat(counts, 32, 0)) == pytest.approx(allreduce * (32 + 32))


def test_expert_parallel_slowest_rank_gates_the_layer():
    """EP over 2 GPUs: rank 0 holds experts 0-3, rank 1 experts 4-7. All tokens go to rank 0's
    experts: rank 0 streams 4 experts and receives half of the 16 assignments from rank 1."""
    from lynx_sim.cost import Parallel

    m, h, _ = load()
    ep = Roofline(m, h, Parallel(gpus=2, expert_parallel=True))
    counts = np.array([[4, 4, 4, 4, 0, 0, 0, 0]])  # 8 tokens x k=2
    local_tokens = 4  # ceil(8 / 2) tokens per rank for router work
    t0 = max(4 * m.expert_bytes / h.bandwidth_Bps, m.expert_flops(4 * 16) / h.flops_per_s(2))
    t0 += roofline_gemm(h, local_tokens, 8, 4096)  # the router on this rank's tokens
    comm0 = 2 * (16 * 0.5 * 4096 * 2 / 900e9 + 10e-6)
    assert ep.moe_layers_s(counts, 8)[0][0] == pytest.approx(t0 + comm0 + 12e-6)
    balanced = np.array([[2, 2, 2, 2, 2, 2, 2, 2]])  # 8 distinct over two ranks: 4 each, less traffic on rank 0
    assert ep.moe_layers_s(balanced, 8)[0][0] < ep.moe_layers_s(counts, 8)[0][0]
    with pytest.raises(ValueError, match="must divide num_experts"):
        Roofline(m, h, Parallel(gpus=3, expert_parallel=True)).moe_layers_s(counts, 8)
    with pytest.raises(ValueError, match="parallel.gpus"):
        Parallel(gpus=0)


def test_tensor_parallel_shapes_by_hand():
    """Uncalibrated, TP 8 on Qwen2-57B-A14B (28 query heads of 128, 4 KV heads, a shared expert of
    20480): each rank's QKV GEMM holds 28/8 query heads and one replicated KV head each of K and
    V; the output GEMM 28/8 heads; the shared expert 1/8 of its width; the router is replicated;
    the LM head holds 1/8 of the vocabulary; an all-reduce ends attention and the MoE block."""
    from lynx_sim.cost import Parallel

    m, h, _ = load("qwen2_57b_a14b", "h200")
    r = Roofline(m, h, Parallel(8))
    H, B = m.hidden_size, 4096  # a batch large enough that every GEMM is compute-bound somewhere
    g = lambda n, k: roofline_gemm(h, B, n, k)  # noqa: E731
    proj = g((28 / 8 + 2 * 1) * 128, H) + g(H, 28 / 8 * 128)
    assert r._batch(B)["projections"] == pytest.approx(proj, rel=1e-12)
    side = g(m.num_experts, H) + g(2 * 20480 / 8, H) + g(H, 20480 / 8)
    assert r._batch(B)["moe_side"] == pytest.approx(side, rel=1e-12)
    assert r.lm_head_s(B) == pytest.approx(g(m.vocab_size / 8, H), rel=1e-12)
    ar = 2 * 7 / 8 * B * H * 2 / h.interconnect_Bps + h.collective_latency_us * 1e-6
    kernel = r.attention_s(B, B * 100) / m.num_layers - proj - ar
    hand = max(B * 100 * 2 * 1 * 128 * 2 / h.bandwidth_Bps, 4 * 28 / 8 * 128 * B * 100 / h.flops_per_s(2)) + 8e-6
    assert kernel == pytest.approx(hand, rel=1e-9)
    counts = np.zeros((m.num_moe_layers, m.num_experts), dtype=np.int64)
    counts[:, :8] = B
    assert r.comm_s(B, counts) == pytest.approx(ar * (m.num_layers + m.num_moe_layers + 2 * (m.num_layers - m.num_moe_layers)))


def test_expert_parallel_attention_and_router_on_the_busiest_rank():
    """EP over 4 GPUs (DeepSeek-V2-Lite, MLA): the busiest rank attends ceil(B / 4) whole decode
    sequences and their share of the KV reads, runs the router on its ceil(B / 4) tokens, and a
    single prefill chunk stays whole on one rank."""
    from lynx_sim.cost import Parallel
    from lynx_sim.cost.roofline import PrefillWork

    m, h, _ = load("deepseek_v2_lite", "h200")
    ep, one = Roofline(m, h, Parallel(4, expert_parallel=True)), Roofline(m, h)
    B = 4098  # 1025 sequences on the busiest rank
    lat = 512 + 64
    kernel = ep.attention_s(B, B * 300) / m.num_layers - ep._batch(B)["projections"]
    hand = max(B * 300 * 1025 / B * lat * 2 / h.bandwidth_Bps, 4 * 16 * lat * B * 300 * 1025 / B / h.flops_per_s(2)) + 8e-6
    assert kernel == pytest.approx(hand, rel=1e-9)
    assert ep._batch(B)["moe_side"] - one._batch(1025)["moe_side"] == pytest.approx(0.0, abs=1e-15)
    chunk = PrefillWork(seqs=1, tokens=2048, cached=0, pairs=2048 * 2049 // 2)
    whole = one.attention_s(2048, 0, chunk) - one._batch(2048)["projections"] * m.num_layers
    on_ep = ep.attention_s(2048, 0, chunk) - ep._batch(2048)["projections"] * m.num_layers
    assert on_ep == pytest.approx(whole, rel=1e-12)  # the chunk is not divided among the ranks


def test_mla_prefill_runs_decompressed_attention():
    """MLA prefill FLOPs are multi-head attention's, 2 h (qk + v) per pair (DeepSeek-V2-Lite:
    16 heads, qk 192, v 128), not the latent kernel's; its KV bytes are the cached latent's."""
    from lynx_sim.cost.roofline import PrefillWork

    m, h, r = load("deepseek_v2_lite", "h200")
    n = 4096
    chunk = PrefillWork(seqs=1, tokens=n, cached=0, pairs=n * (n + 1) // 2)
    kernel = r.attention_s(n, 0, chunk) / m.num_layers - r._batch(n)["projections"]
    flops = 2 * 16 * (192 + 128) * chunk.pairs
    hand = max(n * (512 + 64) * 2 / h.bandwidth_Bps, flops / h.flops_per_s(2)) + 8e-6
    assert kernel == pytest.approx(hand, rel=1e-9)
