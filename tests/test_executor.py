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
    sim = simulate(cfg, quiet=True)  # the same steps in the simulator: same experts per layer
    per_layer = table.groupby(["routing", "layer"]).distinct.mean()
    np.testing.assert_allclose(per_layer["policy"].to_numpy(), sim["per_layer"]["distinct_experts"]["policy"], atol=1e-6)
    np.testing.assert_allclose(per_layer["vanilla"].to_numpy(), sim["per_layer"]["distinct_experts"]["vanilla"], atol=1e-6)
    assert s["distinct_experts"]["policy"] < s["distinct_experts"]["vanilla"]
    assert json.loads((tmp_path / "summary.json").read_text())["batch"] == 4


def test_calibration_fit_recovers_known_factors():
    """Synthetic layer times from known efficiency and fixed cost (plus 1% noise) come back."""
    rng = np.random.default_rng(0)
    expert_bytes, peak = 352e6, 3.35e12
    distinct = rng.integers(1, 9, 200)
    t = distinct * expert_bytes / (peak * 0.81) * 1e6 + 14.0
    table = pd.DataFrame({"distinct": distinct, "measured_us": t * (1 + 0.01 * rng.standard_normal(200)),
                          "memory_bound": True, "block_m": np.where(distinct > 4, 32, 16)})
    r = calibrate.fit(table, expert_bytes, peak)
    assert r["factors"]["moe_bandwidth_efficiency"] == pytest.approx(0.81, rel=0.01)
    assert r["factors"]["moe_layer_fixed_us"] == pytest.approx(14.0, abs=10.0)
    assert r["fit_relative_error"]["median"] < 0.01 and set(r["block_m_factors"]) == {"16", "32"}
    with pytest.raises(ValueError, match="2 or more distinct-expert counts"):
        calibrate.fit(table[table.distinct == 3], expert_bytes, peak)


def test_calibration_file_loads_into_the_cost_model(tmp_path):
    """What the executor writes, the hardware config loads (the loop the GPU issue closes)."""
    from lynx_sim.cost import HardwareSpec

    path = calibrate.write(tmp_path / "cal.json", {"factors": {"moe_bandwidth_efficiency": 0.7, "moe_layer_fixed_us": 9.0}},
                           {"device": "test"})
    hw = HardwareSpec.from_cfg(compose_cfg(["hardware=h100_sxm", f"hardware.calibration={path}"]).hardware)
    assert hw.moe_bandwidth_efficiency == 0.7 and hw.moe_layer_fixed_us == 9.0 and "moe_layer_fixed_us" not in hw.assumed


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
