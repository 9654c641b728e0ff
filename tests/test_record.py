"""The Hugging Face recorder on tiny randomly initialised models of each supported family.

Offline: configs built here, no hub access. Models run in float64 so that batching with left
padding cannot flip a near tie. Checked: the recorded ids and weights are exactly what each
layer's experts module received (an independent hook on the experts), recording in padded
batches gives the same rows as one request at a time, DeepSeek-V3's bias-corrected group
selection is the model's own (not the plain top-k of its logits), the prefill/decode rows and
positions, and that a recorded trace replays in the simulator.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed")

from conftest import compose_cfg  # noqa: E402
from lynx_sim.traces import open_trace  # noqa: E402
from lynx_sim.traces.record import RouterTap, assemble_rows, record  # noqa: E402
from lynx_sim.traces.format import TraceMeta  # noqa: E402

COMMON = dict(experts_implementation="eager", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, eos_token_id=1, pad_token_id=0, bos_token_id=2)


def build(family: str):
    t = transformers
    if family == "mixtral":
        cfg = t.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
        cls = t.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg = t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                               num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                               norm_topk_prob=False)
        cls = t.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        cfg = t.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
                               num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
        cls = t.Qwen3MoeForCausalLM
    elif family == "olmoe":
        cfg = t.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)
        cls = t.OlmoeForCausalLM
    elif family == "deepseek_v3":
        cfg = t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
                                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                 first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=8, norm_topk_prob=True, routed_scaling_factor=2.5)
        cls = t.DeepseekV3ForCausalLM
    else:
        cfg = t.GptOssConfig(**COMMON, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                             sliding_window=16, layer_types=["sliding_attention", "full_attention"])
        cls = t.GptOssForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    for name, mod in model.named_modules():  # distinct routing: random router weights (some init to zeros)
        if re.search(r"Top[Kk]Router$", type(mod).__name__):
            mod.weight.data = torch.randn(mod.weight.shape, generator=g, dtype=torch.float64)
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.data = torch.randn(mod.e_score_correction_bias.shape, generator=g,
                                                               dtype=torch.float64) * 0.5
    return model


def save_tiny(family: str, path):
    """A tiny float32 model of `family` and an offline word-level tokenizer ("w0".."w60"), saved
    to `path` as a local model directory; returns the path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<s>"] + [f"w{i}" for i in range(61)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    build(family).float().save_pretrained(path)
    tok.save_pretrained(path)
    return path


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
PROMPTS = [[2, 5, 6, 7], [2, 9], [2, 3, 4, 5, 6, 7, 8], [2, 11, 12]]


class ExpertsTap:
    """What every layer's experts module received: calls[layer] = [(ids, weights), ...]."""

    def __init__(self, model):
        self.mods = [m for _, m in model.named_modules() if type(m).__name__.endswith("Experts")]
        self.calls = [[] for _ in self.mods]

    def __enter__(self):
        self.h = [m.register_forward_hook(lambda mod, args, out, i=i: self.calls[i].append(
            (args[1].detach().reshape(-1, args[1].shape[-1]).clone(), args[2].detach().reshape(-1, args[2].shape[-1]).clone())))
            for i, m in enumerate(self.mods)]
        return self

    def __exit__(self, *exc):
        for h in self.h:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_is_what_the_experts_received(tmp_path, family):
    model = build(family)
    with ExpertsTap(model) as tap:  # one request at a time: call 0 = its prompt, then one row per new token
        one = open_trace(record(model, PROMPTS, tmp_path / "one.safetensors", name=family, batch_size=1,
                                max_new_tokens=4, progress=False, float_dtype="float32"))
    ids, w = one.read("ids"), one.read("weights")
    call = 0
    for r in range(one.num_requests):
        a, b = int(one.request_offsets[r]), int(one.request_offsets[r + 1])
        P = int((one.phase[a:b] == 0).sum())
        assert P == len(PROMPTS[r]) and list(one.position[a:b]) == list(range(b - a))
        n_calls = 1 + (b - a - P)  # forwards of this request: the prefill, then one per processed new token
        for layer in range(len(tap.mods)):
            got = torch.cat([tap.calls[layer][c][0] for c in range(call, call + n_calls)]).numpy()
            got_w = torch.cat([tap.calls[layer][c][1] for c in range(call, call + n_calls)]).numpy()
            np.testing.assert_array_equal(ids[a:b, layer], got)
            np.testing.assert_allclose(w[a:b, layer], got_w, rtol=1e-6)
        call += n_calls
    # the same requests in padded batches of 3: the same rows
    many = open_trace(record(model, PROMPTS, tmp_path / "many.safetensors", name=family, batch_size=3,
                             max_new_tokens=4, progress=False, float_dtype="float32", chunk_tokens=5))
    np.testing.assert_array_equal(many.request_offsets, one.request_offsets)
    np.testing.assert_array_equal(many.read("ids"), ids)
    np.testing.assert_allclose(many.read("logits"), one.read("logits"), rtol=1e-5, atol=1e-5)
    if family == "deepseek_v3":  # the model's own choice, not the plain top-k of the logits
        plain = np.sort(np.argsort(-one.read("logits"), -1)[..., :2], -1)
        assert (np.sort(ids, -1) != plain).any(-1).mean() > 0.1
        assert one.meta.router == "grouped_topk" and one.meta.n_group == 4 and not one.meta.ids_ordered
    else:
        z = one.read("logits")
        top = np.take_along_axis(z, ids, -1)
        assert (top[..., :1] >= z.max(-1, keepdims=True) - 1e-6).all(), "slot 0 is the top-1 logit"


def test_assemble_rows_drops_padding_and_stops_at_end_of_sequence():
    """Two requests, left-padded prompts of 2 and 3 tokens, new tokens [5, 1(eos), 7] and [6, 8, 9]:
    request 0 keeps its prompt and the one new token processed before its EOS; request 1 two."""
    meta = TraceMeta(model="t", num_experts=4, top_k=1, moe_layers=(0,))
    tap = RouterTap(model=None)
    row = lambda v: (torch.full((1, 4), float(v)), torch.ones(1, 1), torch.tensor([[v % 4]]))  # noqa: E731
    prefill = [torch.cat(x) for x in zip(*[row(v) for v in (90, 10, 11, 20, 21, 22)])]  # [b x S] rows, pad first
    tap.calls = [[tuple(prefill), *[tuple(torch.cat(x) for x in zip(row(30 + c), row(40 + c))) for c in range(2)]]]
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    a = assemble_rows(tap, mask, torch.tensor([[5, 1, 7], [6, 8, 9]]), {1}, meta, first_request=7)
    assert a.request_id.tolist() == [7, 7, 7, 8, 8, 8, 8, 8]
    assert a.phase.tolist() == [0, 0, 1, 0, 0, 0, 1, 1] and a.position.tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert a.logits[:, 0, 0].tolist() == [10, 11, 30, 20, 21, 22, 40, 41]


def test_recorded_trace_replays_in_the_simulator(tmp_path):
    from lynx_sim.run import run

    path = record(build("mixtral"), PROMPTS, tmp_path / "mix.safetensors", name="tiny-mixtral", batch_size=2,
                  max_new_tokens=6, progress=False)
    cfg = compose_cfg(["model=mixtral_8x7b", "model.num_layers=2", "hardware=h200", "trace=file", f"trace.path={path}",
                       "policy=lynx", "batch=2", "workload.steps=5"])
    s = run(cfg, quiet=True)
    assert s["steps"] == 5 and s["distinct_experts"]["policy"] <= s["distinct_experts"]["vanilla"]


def test_unsupported_model_is_named():
    from lynx_sim.traces.record import router_modules

    with pytest.raises(ValueError, match="no router module"):
        router_modules(torch.nn.Linear(2, 2))


def test_record_cli_from_a_local_model_directory(tmp_path, monkeypatch):
    """`python -m lynx_sim.traces record` on a saved tiny model with an offline word-level
    tokenizer, prompts as JSONL, offline mode on."""
    from lynx_sim.traces.__main__ import main

    save_tiny("qwen3_moe", tmp_path / "m")
    (tmp_path / "p.jsonl").write_text('{"prompt": "w1 w2 w3"}\n{"text": "w4 w5"}\n\n{"prompt": "w6"}\n')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "t.safetensors"
    assert main(["record", str(out), "--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.jsonl"),
                 "--batch-size", "2", "--max-new-tokens", "3", "--chunk-tokens", "4"]) == 0
    tr = open_trace(out)
    assert tr.num_requests == 3 and tr.meta.model == "m" and tr.meta.provenance["max_new_tokens"] == 3
    assert [int((tr.phase[a:b] == 0).sum()) for a, b in zip(tr.request_offsets[:-1], tr.request_offsets[1:])] == [3, 2, 1]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    assert main(["record", str(out), "--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
