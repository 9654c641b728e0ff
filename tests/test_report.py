"""Sweeps: hydra multirun through the joblib launcher, gathered by `python -m lynx_sim.report`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from lynx_sim.report import gather, main, pareto_mask


def test_pareto_mask_by_hand():
    speed = np.array([1.0, 1.3, 1.2, 1.1, 1.3])
    fid = np.array([1.0, 0.8, 0.9, 0.85, 0.7])
    assert pareto_mask(speed, fid, True).tolist() == [True, True, True, False, False]
    # lower is better: (1.3, 0.7) now dominates (1.3, 0.8)
    assert pareto_mask(speed, fid, False).tolist() == [False, False, False, False, True]
    assert not pareto_mask(np.array([1.0]), np.array([np.nan]), True).any()


@pytest.mark.slow  # ~23 s cold
def test_multirun_sweep_and_report(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "lynx_sim", "-m", "policy=vanilla,lynx", "batch=2,8", "workload.steps=3",
                          "model=mixtral_8x7b", "hardware=h200", f"hydra.sweep.dir={sweep}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Joblib" in out.stdout + out.stderr  # the sweep ran through the joblib launcher
    df = gather(sweep)
    assert len(df) == 4 and set(df.policy) == {"vanilla", "lynx"} and set(df.batch) == {2, 8}
    assert (df[df.policy == "vanilla"].speedup == 1.0).all()
    assert main([str(sweep), "--out", str(tmp_path / "rep")]) == 0
    table = pd.read_csv(tmp_path / "rep" / "report.csv")
    assert len(table) == 4 and "param_alpha" in table
    for name in ("pareto_top1_retention.png", "pareto_gate_mass_retained.png", "distinct_experts.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 5000
    assert "lynx" in capsys.readouterr().out


def test_report_on_an_empty_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert main([str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_report_skips_and_counts_runs_without_a_summary(tmp_path, capsys):
    """A run directory without summary.json (failed, killed, still running) is left out and
    counted; one with a summary is a row."""
    import json

    done, failed, killed = tmp_path / "0", tmp_path / "1", tmp_path / "2"
    for d in (done, failed, killed):
        (d / ".hydra").mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"policy": "vanilla", "model": "m", "hardware": "h", "batch": 8,
                                                   "speedup": 1.0, "distinct_experts": {"policy": 4, "vanilla": 4}}))
    (killed / ".tmp-steps.csv").write_text("step,sim_time_ms\n0,")
    assert main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    assert "skipped 2 run directories without summary.json" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "rep" / "report.csv")) == 1
    (done / "summary.json").unlink()
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "skipped 3 run directories" in err and "no summary.json" in err


def test_pareto_front_never_spans_models(tmp_path):
    """Two models in one sweep: one set of figures each, fronts computed within a model."""
    import json

    from lynx_sim.report import plot

    for i, (model, speed) in enumerate((("m1", 1.5), ("m2", 3.0), ("m1", 1.0), ("m2", 1.0))):
        d = tmp_path / str(i)
        d.mkdir()
        pol = "lynx" if speed > 1 else "vanilla"
        (d / "summary.json").write_text(json.dumps({
            "policy": pol, "model": model, "hardware": "h100_sxm", "batch": 8, "speedup": speed,
            "top1_retention": 0.9 if pol == "lynx" else 1.0, "gate_mass_retained": 0.9 if pol == "lynx" else 1.0,
            "slots_changed": 0.1 if pol == "lynx" else 0.0, "distinct_experts": {"policy": 4, "vanilla": 6}}))
    written = {p.name for p in plot(gather(tmp_path), tmp_path / "out")}
    assert {"pareto_top1_retention_m1_h100_sxm.png", "pareto_top1_retention_m2_h100_sxm.png"} <= written


@pytest.mark.parametrize("study", ["policy_pareto", "lynx_alpha_beta"])
def test_study_files_compose(study):
    from lynx_sim.config import compose

    cfg = compose([f"+study={study}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert "batch" in params and cfg.workload.steps == 100
    if study == "policy_pareto":
        from lynx_sim.policies import POLICIES

        assert set(params.policy.split(",")) == set(POLICIES), "the Pareto study must sweep every registered policy"


def test_submitit_launcher_runs_a_sweep(tmp_path):
    """The cluster path: the same sweep through hydra-submitit-launcher. `submitit_local` runs
    the jobs as local submitit processes, which exercises everything a SLURM run does except the
    scheduler; the shipped SLURM config composes to submitit's SLURM launcher."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    sweep = tmp_path / "sweep"
    out = subprocess.run([sys.executable, "-m", "lynx_sim", "-m", "hydra/launcher=submitit_local", "policy=vanilla,lynx",
                          "batch=8", "workload.steps=3", "model=mixtral_8x7b", "hardware=h200",
                          "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Submitit" in out.stdout + out.stderr  # the sweep ran through the submitit launcher
    assert any((sweep / ".submitit").glob("*")), "submitit's job folder"
    df = gather(sweep)
    assert len(df) == 2 and set(df.policy) == {"vanilla", "lynx"}

    from lynx_sim.config import compose

    cfg = compose(["hydra/launcher=slurm_cpu", "hydra.launcher.partition=cpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "cpu"
    assert launcher.gpus_per_node == 0 and launcher.cpus_per_task == 1
