"""The executor: refusal without a GPU, the CPU check mode end to end, the calibration fit.

The CPU mode runs the real kernels under the Triton interpreter at tiny dimensions: it checks
that the executor replays the simulator's batches (distinct experts per step equal the
simulator's), that Lynx on the kernels equals the torch policy, and that each layer's output
matches the float64 reference. Timings and calibration need a GPU (marked `gpu`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT
from executor import calibrate
from executor.device import NoGPUError, choose
from executor.run import run
from executor.weights import copies_needed
from lynx_sim.run import run as simulate

BASE = ["model=mixtral_8x7b", "hardware=h200", "batch=4", "policy=lynx"]


def compose_cfg(overrides=()):
    """conf/executor.yaml (the simulator's config plus `executor`), as `python -m executor` composes it."""
    from lynx_sim.config import compose

    return compose(overrides, config_name="executor")


def test_without_a_gpu_the_executor_refuses(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGPUError, match="executor.device=cpu"):
        choose("auto")
    with pytest.raises(ValueError, match="executor.device"):
        choose("tpu")
    if torch.cuda.is_available():
        return
    out = subprocess.run([sys.executable, "-m", "executor", *BASE, "hydra.run.dir=" + str(tmp_path / "ex")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr


@pytest.mark.parametrize("override,key", [("executor.dtype=float32", "executor.dtype"), ("executor.steps=0", "executor.steps"),
                                          ("executor.layers=0", "executor.layers"), ("executor.repeats=1.5", "executor.repeats")])
def test_bad_executor_settings_are_named(tmp_path, override, key):
    with pytest.raises(ValueError, match=key):
        run(compose_cfg([*BASE, "executor.device=cpu", override]), tmp_path)


def test_cpu_mode_replays_the_simulators_batches(tmp_path):
    steps = 2
    cfg = compose_cfg([*BASE, "executor.device=cpu", f"executor.steps={steps}", f"workload.steps={steps}"])
    s = run(cfg, tmp_path)
    table = pd.read_csv(tmp_path / "measurements.csv")
    L = 32
    assert len(table) == steps * L * 2 and set(table.routing) == {"policy", "vanilla"}
    assert s["kernel_vs_policy_mismatched_tokens"] == 0 and s["policy_on_kernels"]
    assert s["reference_check_max_rel_error"] < 3e-2  # bf16 kernels against float64
    assert s["simulator_error"] is None and any("not GPU speed" in n for n in s["notes"])
    assert (table.pairs == 4 * 2).all()
    rows = calibrate.moe_rows(table, 64, 64, 8, 2, "bfloat16")  # the fit's schema: the counts the kernels ran
    assert [int(c.sum()) for c in rows.expert_counts] == table.pairs.tolist()
    assert [int((c > 0).sum()) for c in rows.expert_counts] == table.distinct.tolist()
    sim = simulate(cfg, quiet=True)  # the same steps in the simulator: same experts per layer
    per_layer = table.groupby(["routing", "layer"]).distinct.mean()
    np.testing.assert_allclose(per_layer["policy"].to_numpy(), sim["per_layer"]["distinct_experts"]["policy"], atol=1e-6)
    np.testing.assert_allclose(per_layer["vanilla"].to_numpy(), sim["per_layer"]["distinct_experts"]["vanilla"], atol=1e-6)
    assert s["distinct_experts"]["policy"] < s["distinct_experts"]["vanilla"]
    assert json.loads((tmp_path / "summary.json").read_text())["batch"] == 4


def _executor_table(rng, n, true, H=512, I=256, E=64, k=8, noise=0.01):
    """measurements.csv rows of a 64-expert layer whose times follow `true` (MoEKernelParams)."""
    from lynx_sim.cost.moe_layer import moe_layer_s

    B = rng.choice([4, 16, 64, 256], n)
    counts = np.stack([np.bincount(rng.choice(E, (b, k)).ravel(), minlength=E) for b in B])
    t = moe_layer_s(counts, H, I, 2, true) * (1 + noise * rng.standard_normal(n))
    return pd.DataFrame({"batch": B, "routing": "vanilla", "measured_us": t * 1e6, "block_m": true.block_m,
                         "expert_counts": [" ".join(map(str, c)) for c in counts], "distinct": (counts > 0).sum(-1)})


def test_calibration_fit_recovers_the_kernel_and_writes_the_simulators_format(tmp_path):
    """Layer times from known fused-MoE parameters (1% noise) are predicted on held-out layers to
    about the noise; the file is the format the simulator loads, the MoE term priced with it."""
    from dataclasses import replace

    from lynx_sim.cost import HardwareSpec, Roofline
    from lynx_sim.cost.moe_layer import MoEKernelParams, moe_layer_s
    from lynx_sim.model import ModelSpec

    hw = HardwareSpec.from_cfg(compose_cfg(["hardware=h200"]).hardware)
    true = replace(MoEKernelParams.from_hardware(hw, 2), fixed_us=25.0, bandwidth_efficiency=0.7, compute_efficiency=0.5,
                   gamma=0.3, block_m=16, count_activations=True)
    rows = calibrate.moe_rows(_executor_table(np.random.default_rng(0), 400, true), 512, 256, 64, 8, "bfloat16")
    rec = calibrate.fit(rows, hw, "test GPU")
    assert rec["heldout"]["moe_decode"]["median"] < 0.015 < rec["uncalibrated"]["moe_decode"]["median"]
    path = calibrate.write(tmp_path / "calibration.json", rec)
    cal = HardwareSpec.from_cfg(compose_cfg(["hardware=h200", f"hardware.calibration={path}"]).hardware)
    assert cal.calibration.fitted == ("moe",) and cal.calibration.source_line() == "executor (test GPU)"
    model = ModelSpec.from_cfg(compose_cfg(["model=mixtral_8x7b"]).model)
    counts = np.random.default_rng(1).multinomial(32, np.full(8, 1 / 8), size=4)
    r = Roofline(model, cal)
    want = moe_layer_s(counts, model.hidden_size, model.expert_intermediate_size, 2, cal.calibration.moe)
    np.testing.assert_array_equal(r.routed_experts_s(counts), want)
    assert any("attention_decode priced uncalibrated" in a for a in r.assumptions())
    bad = _executor_table(np.random.default_rng(2), 3, true)
    bad.loc[1, "expert_counts"] = "1 x 0"
    with pytest.raises(ValueError, match="measurements.csv row 1: expert_counts: expected a sequence of integers"):
        calibrate.moe_rows(bad, 512, 256, 64, 8, "bfloat16")
    with pytest.raises(ValueError, match=r"measurements.csv: expected columns \['expert_counts'\]"):
        calibrate.moe_rows(bad.drop(columns="expert_counts"), 512, 256, 64, 8, "bfloat16")
    with pytest.raises(ValueError, match="8 or more measured layers of one tile height"):
        calibrate.fit(rows[:5], hw, "test GPU")


def test_weight_copies_defeat_l2():
    assert copies_needed(50 << 20, 352e6) == 1  # a Mixtral expert alone is 7x an H100's L2
    assert copies_needed(50 << 20, 9.4e6) == 8  # Qwen3-30B-A3B experts: capped at 8
    assert copies_needed(0, 1e6) == 1


@pytest.mark.gpu
def test_gpu_run_measures_and_calibrates(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = compose_cfg(["model=qwen3_30b_a3b", "batch=16", "policy=lynx", "executor.steps=2", "executor.layers=4"])
    s = run(cfg, tmp_path)
    assert s["kernel_vs_policy_mismatched_tokens"] == 0 and s["reference_check_max_rel_error"] < 3e-2
    assert s["moe_layer_us"]["vanilla"] > 0 and (tmp_path / "measurements.csv").is_file()


def test_executor_benchmark_script_runs(tmp_path):
    """benchmarks/executor.py --cpu: the GPU benchmark's whole path at tiny sizes."""
    out = tmp_path / "e.json"
    r = subprocess.run([sys.executable, "benchmarks/executor.py", "--cpu", "--models", "qwen3_30b_a3b", "--batches", "4",
                        "--policies", "static_k", "--steps", "1", "--layers", "1", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and rows[0]["distinct_experts"]["policy"] < rows[0]["distinct_experts"]["vanilla"]
