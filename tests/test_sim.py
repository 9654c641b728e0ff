"""The default run end to end: run(cfg) on composed configs, its outputs, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, compose_cfg, reference_trace
from lynx_sim.policies import PolicyInputError
from lynx_sim.run import run
from lynx_sim.traces import TraceFormatError
from lynx_sim.traces.convert import convert

SUMMARY_KEYS = {"policy", "batch", "model", "hardware", "trace", "seed", "policy_params", "steps", "speedup",
                "step_time_ms", "moe_time_ms", "moe_speedup", "distinct_experts", "top1_retention",
                "gate_mass_retained", "policy_acted_fraction", "per_layer", "simulated_s", "wall_s", "exact",
                "approximations", "assumptions", "trace_sha256", "slots_changed", "kl_to_router_nats", "tokens_per_active_expert", "experts_per_token",
                "gpus", "expert_parallel", "policy_overhead_ms", "comm_time_ms", "warmup_steps", "workload",
                "moe_share", "bandwidth_utilisation", "ttft_ms", "tpot_ms", "throughput_tok_s", "goodput_tok_s", "slo",
                "memory", "calibration"}


def without_wall(s):
    return {k: v for k, v in s.items() if k != "wall_s"}


def test_default_lynx_run(tmp_path):
    cfg = compose_cfg(["workload.steps=30"])
    s = run(cfg, tmp_path, quiet=True)
    assert set(s) == SUMMARY_KEYS
    assert (s["policy"], s["batch"], s["model"], s["hardware"], s["trace"]) == ("lynx", 64, "qwen3_30b_a3b", "h100_sxm", "synth:qwen3_30b_a3b")
    assert s["policy_params"] == {"alpha": 3.0, "beta": 2, "arithmetic": "float32", "tie_break": "lowest_index"}
    assert s["distinct_experts"]["policy"] < s["distinct_experts"]["vanilla"] <= 128
    assert s["speedup"] > 1.0 and s["moe_speedup"] > s["speedup"]
    assert 0.9 <= s["top1_retention"] <= 1.0 and 0.5 < s["gate_mass_retained"] < 1.0
    assert s["exact"] and s["steps"] == 30 and s["policy_acted_fraction"] == 1.0
    assert s["policy_overhead_ms"] == pytest.approx(48 * 8.0e-3)  # 8 us per MoE layer, assumed in conf/policy/lynx.yaml
    assert s["comm_time_ms"] == 0.0 and s["gpus"] == 1
    cal = s["calibration"]  # the default hardware's calibration, named with its source and held-out error
    assert cal["path"] == "conf/calibration/h100_sxm.json" and cal["gpu"] == "h100_sxm" and "aiconfigurator" in cal["source"]
    assert 0 < cal["heldout_error"]["moe_decode"]["median"] < 0.1 and cal["not_fitted"] == []
    assert not any("uncalibrated" in a for a in s["assumptions"])
    assert 0 < s["slots_changed"] < 1 and s["experts_per_token"] == 8.0
    assert s["kl_to_router_nats"]["policy"] > s["kl_to_router_nats"]["vanilla"] > 0
    tpe = s["tokens_per_active_expert"]
    assert tpe["policy"] > tpe["vanilla"] and tpe["vanilla"] * s["distinct_experts"]["vanilla"] == pytest.approx(64 * 8, rel=0.02)
    assert len(s["per_layer"]["distinct_experts"]["policy"]) == 48
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == s
    lines = (tmp_path / "steps.csv").read_text().splitlines()
    assert len(lines) == 31 and lines[0].startswith("step,sim_time_ms,batch")
    # serving-style figures of the steady batch: every request emits one token per iteration
    assert s["ttft_ms"] == {"p50": None, "mean": None, "p99": None}
    assert s["tpot_ms"]["mean"] == pytest.approx(s["step_time_ms"]["policy"])
    assert s["throughput_tok_s"] == pytest.approx(64 / (s["step_time_ms"]["policy"] / 1e3))
    assert s["goodput_tok_s"] == s["throughput_tok_s"]  # 15 ms per token is inside the 50 ms SLO
    assert 0.5 < s["moe_share"] < 1 and 0 < s["bandwidth_utilisation"] <= 0.892 + 1e-9
    # Qwen3-30B-A3B: 30.5 B bf16 weights; 48 layers x 4 KV heads x 128 x (K, V) x 2 bytes per token
    weights = json.loads(json.dumps(s["memory"]))["weights_gib_per_gpu"]
    assert 56.5 < weights < 57.2
    free = 74.5 * 2**30 * 0.9 - weights * 2**30
    assert s["memory"]["fits"] and s["memory"]["kv_capacity_tokens"] == pytest.approx(free / (48 * 4 * 128 * 2 * 2), abs=10)
    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert sum(e["ph"] == "X" and e.get("cat") == "iteration" for e in trace) == 30
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"step_breakdown.png", "experts_per_layer.png"}


def test_same_seed_same_result_and_seed_matters():
    cfg = compose_cfg(["workload.steps=8", "batch=16"])
    a, b = run(cfg, quiet=True), run(cfg, quiet=True)
    assert without_wall(a) == without_wall(b)
    c = run(compose_cfg(["workload.steps=8", "batch=16", "seed=1"]), quiet=True)
    assert c["step_time_ms"] != a["step_time_ms"]


def test_vanilla_run_is_its_own_baseline():
    s = run(compose_cfg(["policy=vanilla", "workload.steps=5", "batch=8"]), quiet=True)
    assert s["speedup"] == 1.0 and s["top1_retention"] == 1.0 and s["gate_mass_retained"] == 1.0
    assert s["distinct_experts"]["policy"] == s["distinct_experts"]["vanilla"]


def test_speedup_grows_then_shrinks_with_batch():
    """LYNX.md section 4's shape on the default model: little to share at B = 1, most at moderate
    B, less again at large B where the pool saturates."""
    sp = {B: run(compose_cfg([f"batch={B}", "workload.steps=6"]), quiet=True)["speedup"] for B in (1, 16, 64)}
    assert sp[16] > sp[64] > 1.0 > sp[1] > 0.8  # at B = 1 nothing is shared: only the rule's overhead remains


@pytest.mark.shared
def test_reference_trace_replay(tmp_path):
    path = convert(reference_trace("mixtral"), tmp_path / "mix.safetensors")
    over = ["trace=file", f"trace.path={path}", "model=mixtral_8x7b", "hardware=h200", "batch=16", "workload.steps=20"]
    s = run(compose_cfg(over + ["policy=vanilla"]), quiet=True)
    assert s["trace"] == "file:mix.safetensors" and not s["exact"]
    assert any("random token offset" in a for a in s["approximations"])
    assert 7.0 < s["distinct_experts"]["vanilla"] <= 8.0  # union fraction 0.98 at B = 16
    with pytest.raises(PolicyInputError, match="needs router logits"):
        run(compose_cfg(over + ["policy=lynx"]), quiet=True)
    approx = run(compose_cfg(over + ["policy=lynx", "approximate_missing=lowest_bin"]), quiet=True)
    assert not approx["exact"] and any("lowest Lynx bin" in a for a in approx["approximations"])
    assert approx["distinct_experts"]["policy"] <= approx["distinct_experts"]["vanilla"]
    assert approx["kl_to_router_nats"]["policy"] is None  # never measured against stand-in logits
    assert approx["top1_retention"] is not None  # from the recorded weights
    with pytest.raises(TraceFormatError, match="num_experts"):
        run(compose_cfg(over[:2] + ["model=qwen3_30b_a3b", "policy=vanilla"]), quiet=True)
    with pytest.raises(TraceFormatError, match="router"):  # same E, k and layers, another router kind
        run(compose_cfg(over[:2] + ["model=mixtral_8x7b", "hardware=h200", "policy=vanilla", "model.moe.router=sigmoid"]), quiet=True)


@pytest.mark.shared
def test_stand_in_logits_need_weights(tmp_path):
    path = convert(reference_trace("llama4"), tmp_path / "ll.safetensors")
    cfg = compose_cfg(["trace=file", f"trace.path={path}", "model=llama4_maverick", "hardware=h200", "parallel.gpus=8", "policy=lynx",
                       "approximate_missing=lowest_bin", "batch=4", "workload.steps=2"])
    with pytest.raises(ValueError, match="needs the trace's gate weights"):
        run(cfg, quiet=True)


@pytest.mark.parametrize("override,key", [("batch=0", "batch"), ("workload.steps=0", "workload.steps"),
                                          ("seed=-1", "seed"), ("batch=2.5", "batch"),
                                          ("workload.warmup_steps=-1", "workload.warmup_steps")])
def test_bad_run_settings_are_named(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run(compose_cfg([override]), quiet=True)


def test_model_router_approximation_is_reported():
    s = run(compose_cfg(["model=deepseek_v3", "hardware=h200", "parallel.gpus=8", "batch=4", "workload.steps=2"]), quiet=True)
    assert not s["exact"] and any("router of deepseek_v3" in a for a in s["approximations"])


def test_file_trace_needs_a_path():
    with pytest.raises(ValueError, match="trace.path"):
        run(compose_cfg(["trace=file"]), quiet=True)


def test_hydra_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lynx_sim", "policy=lynx", "batch=4", "workload.steps=3",
                          f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "speedup" in out.stdout and (tmp_path / "summary.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "lynx_sim", "policy=nonexistent", f"hydra.run.dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("policy: expected one of") and "'nonexistent'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_file_replay_reads_bounded_blocks(tmp_path, monkeypatch):
    """Flat memory: after opening, the replay reads routing rows a bounded block at a time (here
    100 rows' worth), never the whole tensor, and converts only each request's decode rows."""
    from conftest import small_arrays
    from lynx_sim.traces import write_trace
    from lynx_sim.traces.reader import Trace
    from lynx_sim.traces.source import FileSource

    a = small_arrays(E=8, k=2, L=32, lengths=(40,) * 30)
    a.meta = a.meta.__class__(**{**a.meta.__dict__, "model": "mixtral-like"})
    path = write_trace(tmp_path / "t.safetensors", a)
    spans, converted = [], []
    real_read, real_convert = Trace.read_stored, Trace.as_numpy

    def spy(self, name, start=0, stop=None):
        if name in ("ids", "weights", "logits"):
            spans.append((stop if stop is not None else self.num_tokens) - start)
        return real_read(self, name, start, stop)

    def spy_convert(name, t, copy=False):
        if name == "logits":
            converted.append(len(t))
        return real_convert(name, t, copy)

    monkeypatch.setattr(Trace, "read_stored", spy)
    monkeypatch.setattr(Trace, "as_numpy", staticmethod(spy_convert))
    row_bytes = 32 * (8 * 2 + 4 * 8) + 8
    monkeypatch.setattr(FileSource, "BLOCK_BYTES", 100 * row_bytes)
    cfg = compose_cfg(["trace=file", f"trace.path={path}", "model=mixtral_8x7b", "hardware=h200", "batch=4", "workload.steps=200"])
    run(cfg, quiet=True)
    validation = [s for s in spans if s == 1200]
    replay = spans[len(validation):]
    assert len(replay) >= 3 * 3 and max(replay) <= 100, "the replay must read bounded blocks, several of them"
    decode_rows = int((a.phase[:40] == 1).sum())
    replay_converted = [n for n in converted if n != 1200]  # the validation pass converts the whole tensor
    assert decode_rows < 40 and max(replay_converted) == decode_rows, "only decode rows are converted"


def test_committed_sample_replays_with_lynx():
    path = ROOT / "traces" / "samples" / "mixtral_8x7b_synth_small.safetensors"
    s = run(compose_cfg(["trace=file", f"trace.path={path}", "model=mixtral_8x7b", "hardware=h200", "batch=4", "workload.steps=10"]), quiet=True)
    assert s["exact"] and s["trace"] == "file:mixtral_8x7b_synth_small.safetensors"
    assert s["distinct_experts"]["policy"] <= s["distinct_experts"]["vanilla"]


@pytest.mark.parametrize("ep", [False, True])
def test_multi_gpu_run(ep):
    s = run(compose_cfg(["model=mixtral_8x7b", "batch=16", "workload.steps=4", "parallel.gpus=2",
                         f"parallel.expert_parallel={str(ep).lower()}"]), quiet=True)
    one = run(compose_cfg(["model=mixtral_8x7b", "batch=16", "workload.steps=4", "memory_check=warn"]), quiet=True)
    assert s["gpus"] == 2 and s["expert_parallel"] is ep and s["comm_time_ms"] > 0
    assert s["step_time_ms"]["vanilla"] < one["step_time_ms"]["vanilla"]  # two GPUs stream the weights faster


def test_warmup_steps_are_simulated_but_not_measured(tmp_path):
    s = run(compose_cfg(["batch=8", "workload.steps=5", "workload.warmup_steps=7"]), tmp_path, quiet=True)
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    assert s["steps"] == 5 and s["warmup_steps"] == 7 and len(rows) == 6
    assert float(rows[1].split(",")[1]) > 0  # the first measured step starts after 7 simulated ones


# --- outputs: summary.json last, standard JSON ----------------------------------------------------

class Killed(BaseException):
    """The process dies at this instant (a BaseException: no `except Exception` stops it)."""


def _written(tmp_path, monkeypatch, over):
    """Run once, keeping write_run's arguments to replay the writing alone."""
    import lynx_sim.run as run_module

    seen = {}
    real = run_module.write_run

    def spy(*args):
        seen["args"] = args
        return real(*args)

    monkeypatch.setattr(run_module, "write_run", spy)
    s = run(compose_cfg(over), tmp_path, quiet=True)
    monkeypatch.setattr(run_module, "write_run", real)
    return s, seen["args"]


def test_a_run_killed_at_any_moment_leaves_no_summary_or_a_complete_directory(tmp_path, monkeypatch):
    """Kill the writer at every rename and flush, over an older complete run in the same
    directory: afterwards either there is no summary.json, or every file is the new run's."""
    import shutil

    from lynx_sim.metrics import output

    old, _ = _written(tmp_path / "old", monkeypatch, ["workload.steps=3", "batch=4"])
    new, args = _written(tmp_path / "new", monkeypatch, ["workload.steps=3", "batch=4", "seed=1"])
    files = sorted(p.relative_to(tmp_path / "new") for p in (tmp_path / "new").rglob("*") if p.is_file())
    assert len(files) == 6 and files[-1].name == "trace.json"
    real_replace, real_sync = output.os.replace, output._sync
    outcomes = set()
    for at in range(2 * len(files) + 1):  # 6 flushes of files, 6 renames, one flush of the folder
        d = tmp_path / f"kill{at}"
        shutil.copytree(tmp_path / "old", d)
        calls = []

        def event(real, *a):
            calls.append(a)
            if len(calls) == at + 1:
                raise Killed
            return real(*a)

        monkeypatch.setattr(output.os, "replace", lambda *a: event(real_replace, *a))
        monkeypatch.setattr(output, "_sync", lambda *a: event(real_sync, *a))
        try:
            output.write_run(d, *args[1:])
        except Killed:
            pass
        monkeypatch.setattr(output.os, "replace", real_replace)
        monkeypatch.setattr(output, "_sync", real_sync)
        assert not list(d.rglob(".tmp-*")), "temporaries are removed"
        if (d / "summary.json").exists():
            assert json.loads((d / "summary.json").read_text()) == json.loads(json.dumps(new))
            for f in files:
                assert (d / f).read_bytes() == (tmp_path / "new" / f).read_bytes() or f.suffix == ".png", f
            outcomes.add("complete")
        else:
            outcomes.add("no summary")
    assert outcomes == {"complete", "no summary"} and old["seed"] != new["seed"]


def test_a_failed_write_leaves_no_summary_and_no_temporaries(tmp_path, monkeypatch):
    """A full disk while trace.json is half written: OutputError (exit 1 at the command line), no
    summary.json, no temporaries, and no half file in place."""
    import errno

    from lynx_sim.metrics import chrome_trace, output

    def full_disk(steps, path):
        path.write_text('{"traceEvents": [')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chrome_trace, "write", full_disk)
    with pytest.raises(output.OutputError, match="no summary.json"):
        run(compose_cfg(["workload.steps=2", "batch=2"]), tmp_path, quiet=True)
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "trace.json").exists()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_summary_is_standard_json(tmp_path):
    """Never NaN or Infinity: the one writing place refuses them, naming the key."""
    from lynx_sim.metrics.output import summary_json

    with pytest.raises(ValueError, match=r"summary\.tpot_ms\.mean is nan"):
        summary_json({"tpot_ms": {"p50": 1.0, "mean": float("nan")}})
    with pytest.raises(ValueError, match=r"summary\.x\[1\] is inf"):
        summary_json({"x": [1.0, float("inf")]})

    def strict(token):
        raise AssertionError(f"summary.json holds {token}")

    run(compose_cfg(["workload.steps=2", "batch=2", "plots=false"]), tmp_path, quiet=True)
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=strict)
