"""Closed-loop evaluation on tiny random models: vanilla through the patch reproduces the
unpatched model bit for bit; a policy that changes routing changes outputs, and the measures
say so (lower agreement, positive KL, fewer distinct experts)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers not installed")

from test_record import PROMPTS, build  # noqa: E402

from lynx_sim.evaluate.compare import _generate, compare  # noqa: E402
from lynx_sim.evaluate.patch import PolicyPatch  # noqa: E402
from lynx_sim.policies.static_k import StaticK  # noqa: E402
from lynx_sim.policies.vanilla import Vanilla  # noqa: E402
from lynx_sim.routing import RouterSpec  # noqa: E402
from lynx_sim.traces.record import pad_left  # noqa: E402


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_vanilla_through_the_patch_is_the_unpatched_model(family):
    model = build(family)
    ids, mask = pad_left(PROMPTS, 0)
    seq, logits = _generate(model, ids, mask, 0, 5)
    E = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else model.config.num_experts
    with PolicyPatch(model, Vanilla(RouterSpec(E, 2))) as p:
        seq_p, logits_p = _generate(model, ids, mask, 0, 5)
    assert torch.equal(seq, seq_p) and torch.equal(logits, logits_p)
    assert p.stats[0].calls > 0 and p.stats[0].distinct  # the hooks ran, in decode steps too


def test_a_routing_change_shows_in_every_measure():
    model = build("mixtral")
    for _, mod in model.named_modules():  # make the experts matter to the output (random init is tiny)
        if type(mod).__name__.endswith("Experts"):
            for prm in mod.parameters():
                prm.data *= 20
    spec = RouterSpec(8, 2)
    prompts = PROMPTS * 2
    same = compare(model, Vanilla(spec), prompts, batch_size=4, max_new_tokens=6, text=list(range(3, 40)), text_chunk=16)
    assert same["greedy_token_agreement"] == 1.0 and same["next_token_kl_nats"] == pytest.approx(0.0, abs=1e-12)
    assert same["perplexity"]["policy"] == pytest.approx(same["perplexity"]["vanilla"], rel=1e-12)
    one = compare(model, StaticK(spec, k=1), prompts, batch_size=4, max_new_tokens=6, text=list(range(3, 40)),
                  text_chunk=16)
    assert one["next_token_kl_nats"] > 1e-4 and one["next_token_top1_agreement"] < 1.0
    assert one["greedy_token_agreement"] < 1.0
    assert one["perplexity"]["policy"] != pytest.approx(one["perplexity"]["vanilla"], rel=1e-6)
    assert one["distinct_experts"]["policy"] < one["distinct_experts"]["vanilla"]
    assert one["fidelity"]["slots_changed"] == pytest.approx(0.5)  # k=1 of 2: half the slots dropped


def test_evaluate_cli_on_a_local_model(tmp_path, monkeypatch):
    """`python -m lynx_sim.evaluate` end to end on a saved tiny model (offline), Lynx with its
    Mixtral defaults; a calibrated rule is refused with a clear message."""
    import json

    from test_record import save_tiny

    from lynx_sim.evaluate.__main__ import main

    save_tiny("mixtral", tmp_path / "m")
    (tmp_path / "p.txt").write_text("w1 w2 w3\nw4 w5\nw6 w7 w8 w9\n")
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 50}" for i in range(40)))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r.json"
    assert main(["--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.txt"), "--policy", "lynx",
                 "--text", str(tmp_path / "t.txt"), "--batch-size", "3", "--max-new-tokens", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["policy"] == "lynx" and r["policy_params"]["alpha"] == 0.7 and 0 <= r["greedy_token_agreement"] <= 1
    assert set(r["perplexity"]) == {"vanilla", "policy"}
    assert main(["--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.txt"), "--policy", "prune"]) == 2


def test_harness_adapter_without_lm_eval_says_so(monkeypatch, capsys):
    """Without lm-evaluation-harness installed the adapter refuses clearly (with it, it registers
    `lynx_hf`; that path is not exercised here)."""
    import importlib.util

    from lynx_sim.evaluate.harness import main

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm_eval is installed")
    assert main(["--policy", "lynx", "--tasks", "gsm8k"]) == 2
    assert "not installed" in capsys.readouterr().err
