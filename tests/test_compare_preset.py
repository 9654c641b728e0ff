"""The fitted synthetic presets reproduce the reference traces' routing statistics.

Both sides go through the same `trace_stats`. The synthetic trace has the reference's shape:
Mixtral-8x7B: 4 requests with the reference's decode lengths (81/252/166/78); with 4 sequences the
load CV is mostly sampling noise, so its figures are averaged over 8 seeds. DeepSeek-V2-Lite:
prompt-only requests with the first 400 reference prompt lengths (the load CV at 400 prompts was
within 0.005 of that at all 1,999 when fitting the preset, see conf/synth/deepseek_v2_lite.yaml).
"""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from lynx_sim.model import ModelSpec
from lynx_sim.traces.compare_preset import mean_stats, reference_stats, summary, synth_stats
from lynx_sim.traces.synth import SynthParams

SHARED = Path(__file__).resolve().parents[2] / "shared" / "traces"
CONF = Path(__file__).resolve().parents[1] / "conf"
UNION_TOL, OVERLAP_TOL, CV_TOL, TOP1_TOL = 0.03, 0.05, 0.05, 0.05

pytestmark = pytest.mark.shared


def _reference(file: str, tmp_path):
    src = SHARED / file
    if not src.is_file():
        pytest.skip(f"reference trace {src} absent (../shared/traces is not part of the repository)")
    return reference_stats(src, tmp_path)


def _load(name: str):
    model = ModelSpec.from_cfg(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    return model, SynthParams.from_cfg(OmegaConf.load(CONF / "synth" / f"{name}.yaml"))


def _compare(ref: dict, syn: dict) -> None:
    report = f"reference {ref}\nsynthetic {syn}"
    du = np.abs(np.subtract(ref["union_fraction"], syn["union_fraction"]))
    assert du.max() <= UNION_TOL, f"union fraction off by {du.round(3).tolist()}\n{report}"
    assert abs(ref["adjacent_overlap"] - syn["adjacent_overlap"]) <= OVERLAP_TOL, report
    assert abs(ref["load_cv"] - syn["load_cv"]) <= CV_TOL, report
    if "top1_weight_mean" in ref:
        assert abs(ref["top1_weight_mean"] - syn["top1_weight_mean"]) <= TOP1_TOL, report


def test_mixtral_8x7b_preset_matches_reference(tmp_path):
    ref, lengths, phase = _reference("mixtral8x7b_instruct_fp8_vllm_decode_humaneval_gsm8k.npz", tmp_path)
    assert phase == "decode" and lengths.tolist() == [81, 252, 166, 78]
    model, params = _load("mixtral_8x7b")
    syn = mean_stats([summary(synth_stats(model, params, seed, lengths, phase, tmp_path)) for seed in range(8)])
    _compare(summary(ref), syn)


def test_deepseek_v2_lite_preset_matches_reference(tmp_path):
    ref, lengths, phase = _reference("deepseek_v2_lite_chat_8bit_hf_prefill_puffin_prompts.npz", tmp_path)
    assert phase == "prefill" and len(lengths) == 1999
    model, params = _load("deepseek_v2_lite")
    syn = summary(synth_stats(model, params, 0, lengths[:400], phase, tmp_path))
    _compare(summary(ref), syn)
