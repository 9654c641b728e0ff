"""The roofline against hand arithmetic, and the facts it must reproduce (LYNX.md section 1).

MoE-layer prices go through `Roofline.moe_layers_s`, the one function `step` (what the
simulator calls) prices the MoE layers with; `test_step_prices_moe_layers_with_moe_layers_s`
holds them together."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR
from lynx_sim.cost import HardwareSpec, Roofline
from lynx_sim.model import ModelSpec


def load(model="mixtral_8x7b", hw="h100_sxm"):
    m = ModelSpec.from_cfg(OmegaConf.load(CONF_DIR / "model" / f"{model}.yaml"))
    h = HardwareSpec.from_cfg(OmegaConf.load(CONF_DIR / "hardware" / f"{hw}.yaml"))
    return m, h, Roofline(m, h)


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
    bytes_ = 3 * m.expert_bytes + 4096 * 8 * 2
    flops = 2 * m.expert_params * 16 + 2 * 4096 * 8 * 8
    expect = max(bytes_ / bw, flops / (989.4e12 * 0.752)) + 12e-6
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


def test_calibration_file_overrides_assumed_factors(tmp_path):
    _, h, _ = load()
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"device": "test", "factors": {"bandwidth_efficiency": 0.9, "moe_layer_fixed_us": 20}}))
    c = h.calibrated(path)
    assert c.bandwidth_efficiency == 0.9 and c.moe_layer_fixed_us == 20 and c.calibrated_from == str(path)
    path.write_text(json.dumps({"factors": {"warp_speed": 9}}))
    with pytest.raises(ValueError, match="warp_speed"):
        h.calibrated(path)
    with pytest.raises(ValueError, match="readable JSON"):
        h.calibrated(tmp_path / "absent.json")


def test_moe_bandwidth_factor_and_routed_expert_term(tmp_path):
    """The executor's calibration sets the MoE kernels' own streaming efficiency: it changes the
    MoE term (and routed_experts_s, the executor's comparison) but not attention; unset, both
    use bandwidth_efficiency. routed_experts_s by hand: 3 distinct experts, tile-padded FLOPs."""
    m, h, r = load()
    counts = np.zeros((2, m.num_experts), dtype=np.int64)
    counts[0, :3] = (1, 2, 20)
    counts[1, 0] = 3
    bw = h.hbm_bandwidth_gbps * 1e9 * h.bandwidth_efficiency
    pad = lambda n: -(-n // h.moe_block_m) * h.moe_block_m  # noqa: E731
    want0 = max(3 * m.expert_bytes / bw, 2.0 * m.expert_params * (pad(1) + pad(2) + pad(20)) / h.flops_per_s(m.weight_bytes))
    np.testing.assert_allclose(r.routed_experts_s(counts)[0], want0 + h.moe_layer_fixed_us * 1e-6, rtol=1e-12)
    assert "moe_bandwidth_efficiency" not in h.assumed  # unset: nothing to calibrate yet
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"factors": {"moe_bandwidth_efficiency": h.bandwidth_efficiency / 2}}))
    c = h.calibrated(path)
    rc = Roofline(m, c)
    assert rc.attention_s(8, 4096) == r.attention_s(8, 4096)
    memory_bound = r.routed_experts_s(counts)[1] - h.moe_layer_fixed_us * 1e-6
    assert rc.routed_experts_s(counts)[1] - h.moe_layer_fixed_us * 1e-6 == pytest.approx(2 * memory_bound)
    assert rc.moe_layers_s(counts, 12)[0][1] > r.moe_layers_s(counts, 12)[0][1]
    assert "moe_bandwidth_efficiency" in c.measured


def test_every_hardware_is_complete_and_ordered_by_bandwidth():
    """Datasheet peaks present, efficiency factors in (0, 1], and decode MoE time falls as HBM
    bandwidth rises (memory-bound decode)."""
    from conftest import CONF_DIR as conf

    times, achievable = {}, {}
    for path in sorted((conf / "hardware").glob("*.yaml")):
        h = HardwareSpec.from_cfg(OmegaConf.load(path))
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
    bytes0 = 4 * m.expert_bytes + 4096 * 8 * 2
    t0 = max(bytes0 / h.bandwidth_Bps, (m.expert_flops(4 * 16) + 2 * 4096 * 8 * local_tokens) / h.flops_per_s(2))
    comm0 = 2 * (16 * 0.5 * 4096 * 2 / 900e9 + 10e-6)
    assert ep.moe_layers_s(counts, 8)[0][0] == pytest.approx(t0 + comm0 + 12e-6)
    balanced = np.array([[2, 2, 2, 2, 2, 2, 2, 2]])  # 8 distinct over two ranks: 4 each, less traffic on rank 0
    assert ep.moe_layers_s(balanced, 8)[0][0] < ep.moe_layers_s(counts, 8)[0][0]
    with pytest.raises(ValueError, match="must divide num_experts"):
        Roofline(m, h, Parallel(gpus=3, expert_parallel=True)).moe_layers_s(counts, 8)
    with pytest.raises(ValueError, match="parallel.gpus"):
        Parallel(gpus=0)
