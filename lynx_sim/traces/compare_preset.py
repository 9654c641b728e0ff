"""Compare a synthetic preset with a reference trace on the statistics of `stats.trace_stats`.

Run: python -m lynx_sim.traces.compare_preset mixtral_8x7b ../shared/traces/mixtral8x7b_instruct_fp8_vllm_decode_humaneval_gsm8k.npz
It converts the reference, generates synthetic requests of the reference's shape (same number of
sequences; the reference's own lengths, in the reference's phase), and prints both sets of
figures. The presets' values were set by hand-guided sweeps with this comparison (see the
comments in `conf/synth/mixtral_8x7b.yaml` and `deepseek_v2_lite.yaml`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..model import ModelSpec
from .convert import convert
from .reader import open_trace
from .stats import trace_stats
from .synth import SynthParams, SyntheticTrace, concat
from .writer import write_trace

KEYS = ("union_fraction", "adjacent_overlap", "load_cv", "top1_weight_mean")


def summary(stats: dict, batches=("1", "2", "4", "8", "16", "32", "64")) -> dict:
    """The compared figures (those a preset is fitted to) of one trace_stats dict."""
    out = {"union_fraction": [round(stats["union_fraction"][b], 4) for b in batches],
           "adjacent_overlap": round(stats["adjacent_overlap"]["mean"], 4),
           "load_cv": round(stats["load_cv"]["median"], 4)}
    if "top1_weight_mean" in stats:
        out["top1_weight_mean"] = round(stats["top1_weight_mean"], 4)
    return out


def synth_stats(model: ModelSpec, params: SynthParams, seed: int, lengths, phase: str, workdir) -> dict:
    """trace_stats of synthetic requests with the given token counts.

    lengths: one count per request; phase "decode" puts them all in the output (after a prompt of the
    preset's length), "prefill" makes prompt-only requests (what trace_stats then uses: all tokens)."""
    gen = SyntheticTrace(model, params, seed)
    if phase == "decode":
        parts = [gen.request(r, output_tokens=int(n)) for r, n in enumerate(lengths)]
    else:
        parts = [gen.request(r, prompt_tokens=int(n), output_tokens=0) for r, n in enumerate(lengths)]
    path = Path(workdir) / f"synth_{model.name}_{seed}.safetensors"
    write_trace(path, concat(parts, logits=False))
    return trace_stats(open_trace(path))


def mean_stats(stats: list[dict]) -> dict:
    """Element-wise mean of several `summary` dicts."""
    return {k: (np.mean([s[k] for s in stats], axis=0).round(4).tolist()) for k in stats[0]}


def reference_stats(src_npz, workdir) -> tuple[dict, np.ndarray, str]:
    """(trace_stats, per-sequence lengths of the used tokens, "decode"|"prefill") of a reference .npz."""
    path = convert(src_npz, Path(workdir) / (Path(src_npz).stem + ".safetensors"))
    trace = open_trace(path)
    stats = trace_stats(trace)
    phase = "decode" if stats["tokens_used"] == "decode" else "prefill"
    return stats, np.diff(trace.request_offsets), phase


def main() -> None:
    from omegaconf import OmegaConf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("reference")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=0, help="synthetic requests (default: as many as the reference)")
    ap.add_argument("--set", nargs="*", default=[], help="override preset keys, e.g. stickiness=0.5")
    a = ap.parse_args()
    model = ModelSpec.from_cfg(OmegaConf.load(f"conf/model/{a.model}.yaml"))
    params = SynthParams.from_cfg(OmegaConf.load(f"conf/synth/{a.model}.yaml"))
    params = replace(params, **{k: type(getattr(params, k))(v) for k, v in (s.split("=") for s in a.set)})
    with tempfile.TemporaryDirectory() as tmp:
        ref, lengths, phase = reference_stats(a.reference, tmp)
        n = a.requests or len(lengths)
        lengths = np.resize(lengths, n)
        runs = [summary(synth_stats(model, params, seed, lengths, phase, tmp)) for seed in range(a.seeds)]
    print(json.dumps({"reference": summary(ref), "synthetic_mean": mean_stats(runs), "synthetic_runs": runs}, indent=1))


if __name__ == "__main__":
    main()
