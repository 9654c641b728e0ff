"""Shared fixtures: a small valid trace, the repository's conf/, and the reference traces."""

from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run under the CPU interpreter unless a GPU run asks for the device
# (LYNX_KERNELS_ON_GPU=1); set before anything imports triton.
if os.environ.get("LYNX_KERNELS_ON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from lynx_sim.traces import TraceArrays, TraceMeta

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"  # == lynx_sim.config.CONF_DIR
SHARED_TRACES = ROOT.parent / "shared" / "traces"
REFERENCE = {
    "mixtral": "mixtral8x7b_instruct_fp8_vllm_decode_humaneval_gsm8k.npz",
    "deepseek": "deepseek_v2_lite_chat_8bit_hf_prefill_puffin_prompts.npz",
    "llama4": "llama4_maverick_128e_sglang_mmlu_prefill_decode.npz",
}


def reference_trace(name: str) -> Path:
    """Path of a reference trace, or skip the test with the reason."""
    path = SHARED_TRACES / REFERENCE[name]
    if not path.is_file():
        pytest.skip(f"reference trace {path} is absent (../shared/traces is not beside the repository)")
    return path


def small_arrays(seed: int = 0, E: int = 8, k: int = 2, L: int = 3, lengths=(5, 3, 4), logits=True) -> TraceArrays:
    """A valid trace: requests of the given lengths, first token of each a prefill token."""
    rng = np.random.default_rng(seed)
    N = sum(lengths)
    z = rng.normal(size=(N, L, E)).astype(np.float32)
    ids = np.argsort(-z, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(np.exp(z), ids, -1)
    w /= w.sum(-1, keepdims=True)
    rid = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    phase = (pos > 0).astype(np.int8)
    meta = TraceMeta(model="test-model", num_experts=E, top_k=k, moe_layers=tuple(range(L)),
                     weights_kind="renormalised top-k softmax", provenance={"test": True})
    return TraceArrays(meta=meta, request_id=rid, position=pos, phase=phase, ids=ids, weights=w.astype(np.float32),
                       logits=z if logits else None, arrival_s=np.repeat(np.arange(len(lengths), dtype=np.float64), lengths))


@pytest.fixture
def arrays() -> TraceArrays:
    return small_arrays()


def compose_cfg(overrides=()):
    """Compose conf/config.yaml with overrides, as `python -m lynx_sim` would."""
    from lynx_sim.config import compose

    return compose(overrides)
