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
    Mixtral defaults; a rule that learns a routing profile learns it from the model's own
    routing (in-sample by default, held out with --profile-prompts) or from a recorded trace, whose
    shape must match."""
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
    base = ["--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.txt"), "--batch-size", "3",
            "--max-new-tokens", "4", "--out", str(out)]
    assert main([*base, "--policy", "prune", "--set", "keep_fraction=0.5"]) == 0
    r = json.loads(out.read_text())
    assert r["routing_profile"]["in_sample"] is True and r["routing_profile"]["tokens"] > 0
    assert r["distinct_experts"]["policy"] <= 4  # half of 8 experts kept per layer
    (tmp_path / "c.txt").write_text("w10 w11 w12\nw13 w14\n")
    assert main([*base, "--policy", "layer_k", "--profile-prompts", str(tmp_path / "c.txt")]) == 0
    assert json.loads(out.read_text())["routing_profile"]["in_sample"] is False
    from lynx_sim.traces.__main__ import main as traces_main

    assert traces_main(["record", str(tmp_path / "t.safetensors"), "--model", str(tmp_path / "m"), "--prompts",
                        str(tmp_path / "c.txt"), "--max-new-tokens", "4"]) == 0
    assert main([*base, "--policy", "sere", "--profile-trace", str(tmp_path / "t.safetensors")]) == 0
    assert json.loads(out.read_text())["routing_profile"]["source"].startswith("trace:")
    save_tiny("deepseek_v3", tmp_path / "q")  # another router (grouped_topk)
    assert traces_main(["record", str(tmp_path / "q.safetensors"), "--model", str(tmp_path / "q"), "--prompts",
                        str(tmp_path / "c.txt"), "--max-new-tokens", "2"]) == 0
    assert main([*base, "--policy", "sere", "--profile-trace", str(tmp_path / "q.safetensors")]) == 2


def test_harness_adapter_without_lm_eval_says_so(monkeypatch, capsys):
    """Without lm-evaluation-harness installed the adapter refuses clearly."""
    import builtins

    from lynx_sim.evaluate.harness import main

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["--policy", "lynx", "--tasks", "gsm8k"]) == 2
    assert "not installed" in capsys.readouterr().err


TINY_TASKS = {
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/gen.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["</s>"], max_gen_toks: 5, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
""",
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {dir}/mc.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
"""}


@pytest.mark.slow  # ~26 s
def test_harness_adapter_runs_lm_eval_tasks(tmp_path, monkeypatch):
    """`python -m lynx_sim.evaluate.harness` through lm-evaluation-harness on a saved tiny model
    and two local tasks (generation, log-likelihood), offline: with `vanilla` every response
    equals lm_eval's own `hf` model; a rule that changes routing (static_k k=1, which also acts
    in prefill) changes the log-likelihoods and the generations; Lynx acts in decode only, so it
    leaves log-likelihoods alone."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (the dev extra installs it)")
    import glob
    import json

    from test_record import save_tiny

    from lynx_sim.evaluate.harness import main

    save_tiny("mixtral", tmp_path / "m")
    model = type(build("mixtral")).from_pretrained(tmp_path / "m")
    for _, mod in model.named_modules():  # make the experts matter to the output (random init is tiny)
        if type(mod).__name__.endswith("Experts"):
            for prm in mod.parameters():
                prm.data *= 20
    model.save_pretrained(tmp_path / "m")
    with open(tmp_path / "gen.jsonl", "w") as f, open(tmp_path / "mc.jsonl", "w") as g:
        for i in range(6):
            f.write(json.dumps({"question": f"w{i} w{i + 1} w{i + 2}", "answer": f"w{i + 3}"}) + "\n")
            g.write(json.dumps({"question": f"w{i} w{i + 1}", "choices": [f"w{i + 2}", f"w{i + 9}"], "label": 0}) + "\n")
    (tmp_path / "tasks").mkdir()
    for name, text in TINY_TASKS.items():
        (tmp_path / "tasks" / f"{name}.yaml").write_text(text.format(dir=tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    common = ["--tasks", "tiny_gen,tiny_mc", "--include_path", str(tmp_path / "tasks"), "--batch_size", "3",
              "--device", "cpu", "--log_samples", "--model_args", f"pretrained={tmp_path / 'm'},dtype=float32"]

    def run(tag, *ours, model="lynx_hf"):
        out = tmp_path / tag
        if model == "hf":
            import sys

            from lm_eval.__main__ import cli_evaluate

            monkeypatch.setattr(sys, "argv", ["lm_eval", "--model", "hf", *common, "--output_path", str(out)])
            cli_evaluate()
        else:
            assert main([*ours, *common, "--output_path", str(out)]) == 0
        resps = {}
        for task in TINY_TASKS:
            (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
            resps[task] = [json.loads(line)["resps"] for line in open(path)]
        return resps

    plain = run("hf", model="hf")
    assert run("vanilla", "--policy", "vanilla") == plain
    one = run("k1", "--policy", "static_k", "--set", "k=1")
    assert one["tiny_mc"] != plain["tiny_mc"] and one["tiny_gen"] != plain["tiny_gen"]
    lynx = run("lynx", "--policy", "lynx")
    assert lynx["tiny_mc"] == plain["tiny_mc"]  # decode-only: log-likelihoods are one prefill forward
    assert main(["--policy", "prune", *common]) == 2  # a rule that learns a routing profile, given none
    (tmp_path / "profile.txt").write_text("w20 w21 w22\nw23 w24\nw25 w26 w27 w28\n")
    pruned = run("prune", "--policy", "prune", "--set", "keep_fraction=0.25", "--profile-prompts",
                 str(tmp_path / "profile.txt"))  # learns from the model's own routing; acts in prefill too
    assert pruned["tiny_mc"] != plain["tiny_mc"]


class Spy(Vanilla):
    """Vanilla that records the rows of every batch it is given."""

    def __init__(self, spec):
        super().__init__(spec)
        self.rows = []

    def route(self, batch):
        self.rows.append(int(batch.ids.shape[1]))
        return super().route(batch)


def test_the_policy_sees_live_rows_only():
    """Left padding never enters a prefill batch; a sequence that has produced its end token
    leaves the decode batches (generate() keeps computing it; a server would not)."""
    model = build("mixtral")
    ids, mask = pad_left(PROMPTS, 0)
    seq, _ = _generate(model, ids, mask, 0, 4)
    stop = int(seq[0, 1])  # sequence 0's second new token: make it the end token
    assert all(stop not in seq[j, :2].tolist() for j in range(1, len(PROMPTS))), "pick another sample"
    spy = Spy(RouterSpec(8, 2))
    with PolicyPatch(model, spy, eos={stop}) as p, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                       eos_token_id=stop)
    L, B = 2, len(PROMPTS)
    assert spy.rows[:L] == [int(mask.sum())] * L  # prefill: the prompt tokens only (mask.numel() rows ran)
    assert spy.rows[L:2 * L] == [B] * L  # decode step 1 processes new token 0: all run
    assert spy.rows[2 * L:] and set(spy.rows[2 * L:]) == {B - 1}  # sequence 0 sampled its end token: gone
    assert p.stats[0].rows == [B] + [B - 1] * (len(spy.rows[2 * L:]) // L)


def test_profiled_rules_act_per_layer_in_the_closed_loop():
    """prune learns its kept experts per layer from the model's own routing; inside the model
    every token of every layer then uses kept experts only (seen by a tap after the patch)."""
    from lynx_sim.evaluate.__main__ import build_policy_for
    from lynx_sim.evaluate.routing_profile import from_model
    from lynx_sim.traces.record import RouterTap

    model = build("mixtral")
    profile = from_model(model, PROMPTS, batch_size=2, max_new_tokens=6, pad=0, eos={1}, held_out=False)
    assert profile.num_layers == 2 and profile.ids.shape[0] > 0
    pol = build_policy_for(model, "prune", sets=["keep_fraction=0.25"], profile=profile)
    kept = pol.kept  # [L, E]
    assert not torch.equal(kept[0], kept[1]), "pick a seed whose layers keep different experts"
    ids, mask = pad_left(PROMPTS, 0)
    with PolicyPatch(model, pol, {1}), RouterTap(model) as tap, torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for l in range(2):
        live = mask.reshape(-1).bool()
        used = torch.cat([tap.calls[l][0][2][live]] + [c[2] for c in tap.calls[l][1:]]).flatten()
        used = used[used < 8]  # index E: a dropped slot
        assert kept[l][used].all(), f"layer {l} used an expert prune removed"
    with pytest.raises(ValueError, match="learns per-layer statistics"):
        build_policy_for(model, "prune")


def test_cost_aware_rules_price_this_models_experts():
    """oracle's expert time in the closed loop: one more expert of this model's shape and weight
    width (float64 here) in the named hardware's calibrated MoE kernel (expert_stream_s)."""
    from lynx_sim.config import compose
    from lynx_sim.cost.hardware import HardwareSpec
    from lynx_sim.cost.roofline import expert_stream_s
    from lynx_sim.evaluate.__main__ import build_policy_for, expert_bytes

    model = build("mixtral")
    assert expert_bytes(model) == 3 * 32 * 48 * 8  # gate, up, down of H=32, I=48
    for hw in ("h100_sxm", "h200"):
        pol = build_policy_for(model, "oracle", hardware=hw)
        p = HardwareSpec.from_cfg(compose([f"hardware={hw}"]).hardware).calibration.moe
        assert pol.expert_time_s == pytest.approx(expert_stream_s(32, 48, 8, p), rel=1e-12)  # H=32, I=48, float64


@pytest.mark.parametrize("impl", ["grouped_mm", "batched_mm"])
def test_dropped_slots_are_exact_zeros_in_every_experts_implementation(impl):
    """A dropped slot must add nothing whichever experts kernel transformers runs (index E was
    left uninitialised by grouped_mm outside expert parallelism: NaN on some runs)."""
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm") and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    model = build("mixtral").float()
    for _, mod in model.named_modules():
        if type(mod).__name__.endswith("Experts"):
            for prm in mod.parameters():
                prm.data *= 20
    ids, mask = pad_left(PROMPTS, 0)
    with PolicyPatch(model, StaticK(RouterSpec(8, 2), k=1)):
        ref_seq, ref = _generate(model, ids, mask, 0, 6)
    model.set_experts_implementation(impl)
    for _ in range(3):
        with PolicyPatch(model, StaticK(RouterSpec(8, 2), k=1)):
            seq, logits = _generate(model, ids, mask, 0, 6)
        assert torch.isfinite(logits).all() and torch.equal(seq, ref_seq)
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_every_registry_policy_runs_in_the_closed_loop():
    """Each policy of the registry, with its conf/ parameters (Mixtral defaults), inside the model:
    tokens come out, every decode step is measured, and the rule's own routing is what the experts got."""
    from lynx_sim.evaluate.__main__ import build_policy_for
    from lynx_sim.evaluate.routing_profile import from_model
    from lynx_sim.policies import POLICIES

    model = build("mixtral")
    profile = from_model(model, PROMPTS, batch_size=4, max_new_tokens=4, pad=0, eos={1}, held_out=False)
    for name in sorted(POLICIES):
        pol = build_policy_for(model, name, profile=profile)
        r = compare(model, pol, PROMPTS, batch_size=4, max_new_tokens=3, pad=0, eos={1})
        assert r["policy"] == name and r["generated_tokens"] > 0, name
        assert 0 <= r["greedy_token_agreement"] <= 1 and r["next_token_kl_nats"] >= -1e-9, name
        assert r["decode_batch_rows_mean"] > 0 and 1 <= r["distinct_experts"]["policy"] <= 8, name
        if name == "vanilla":
            assert r["greedy_token_agreement"] == 1.0 and r["fidelity"]["slots_changed"] == 0.0
