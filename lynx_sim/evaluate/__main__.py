"""`python -m lynx_sim.evaluate --model DIR|HUB_ID --prompts FILE --policy lynx [--text FILE]`:
a policy inside a Hugging Face MoE model against the model's own routing (compare.py).

Policy parameters come from conf/policy/<name>.yaml, with the model-dependent defaults (Lynx's
alpha and beta) of the conf/model/ entry of the same family (`--conf-model`, guessed from the
model type); `--set key=value` overrides any of them. The router's shape comes from the model.
Rules that learn per-layer statistics (prune, sere, layer_k) take them from a routing profile:
`--profile-trace` (a trace recorded from the same model) or the model's own routing recorded on
`--profile-prompts` (default: the evaluation prompts, reported as in-sample). Output keys:
docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

CONF_MODEL = {"mixtral": "mixtral_8x7b", "qwen2_moe": "qwen2_57b_a14b", "qwen3_moe": "qwen3_30b_a3b",
              "olmoe": "olmoe_1b_7b", "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss_120b"}


def _experts_module(model):
    """The routed-experts module of a transformers MoE model (its class name ends in Experts)."""
    for _, mod in model.named_modules():
        if type(mod).__name__.endswith("Experts"):
            return mod
    raise ValueError(f"{type(model).__name__}: no experts module (*Experts) found")


def expert_bytes(model) -> int:
    """Bytes of one routed expert of a transformers MoE model (its experts module's parameters / E)."""
    from ..traces.record import meta_for

    E = meta_for(model, "model").num_experts
    return sum(p.numel() * p.element_size() for p in _experts_module(model).parameters()) // E


def build_policy_for(model, name: str, conf_model: str | None = None, sets: list[str] = (), profile=None,
                     hardware: str = "h100_sxm"):
    """A registry policy for a transformers model: router shape from the model, parameters from
    conf/, the cost of one more expert (for cost-aware rules such as oracle) from this model's
    expert bytes streamed by the MoE kernel of conf/hardware/<hardware> (its calibration's fit), per-layer statistics from
    `profile` (a RoutingProfile: routing_profile.py) for rules that learn them."""
    from ..config import compose
    from ..cost.hardware import HardwareSpec
    from ..cost.roofline import expert_stream_s, moe_params
    from ..policies import build_policy
    from ..routing import RouterSpec
    from ..traces.record import meta_for

    meta = meta_for(model, "model")
    conf_model = conf_model or CONF_MODEL.get(model.config.model_type)
    if conf_model is None:
        raise ValueError(f"--conf-model: no default for model_type {model.config.model_type!r}; name a conf/model entry")
    cfg = compose([f"model={conf_model}", f"policy={name}", f"hardware={hardware}", *[f"policy.{kv}" for kv in sets]])
    spec = RouterSpec.from_meta(meta)
    H = model.config.hidden_size
    wb = next(_experts_module(model).parameters()).element_size()  # bytes per expert weight
    inter = expert_bytes(model) / (3 * H * wb)  # gate, up and down projections [H, I] each
    expert_time_s = expert_stream_s(H, inter, wb, moe_params(HardwareSpec.from_cfg(cfg.hardware), wb))
    policy = build_policy(cfg.policy, SimpleNamespace(router=spec), expert_time_s=expert_time_s)
    if policy.needs_profile:
        if profile is None:
            raise ValueError(f"policy '{name}' learns per-layer statistics: give it a routing profile "
                             f"(--profile-trace or --profile-prompts)")
        if profile.num_layers != meta.num_layers:
            raise ValueError(f"routing profile: expected routing of {meta.num_layers} MoE layers (the model's), "
                             f"found {profile.num_layers}")
        policy.prepare(profile)
    return policy


def add_policy_options(ap: argparse.ArgumentParser, profile_prompts_default: str) -> None:
    """The options that choose and prepare the policy (shared with the lm-eval adapter)."""
    ap.add_argument("--policy", default="lynx")
    ap.add_argument("--conf-model", help="conf/model entry for the policy's model-dependent defaults")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a policy parameter")
    ap.add_argument("--hardware", default="h100_sxm", help="conf/hardware entry pricing one expert (cost-aware rules)")
    ap.add_argument("--profile-trace", help="rules that learn a routing profile: a trace recorded from this model")
    ap.add_argument("--profile-prompts", help=f"rules that learn a routing profile: prompts to record the model's "
                                              f"own routing on (default: {profile_prompts_default})")
    ap.add_argument("--profile-tokens", type=int, default=4096, help="decode tokens of the routing profile")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory or hub id (HF_HUB_OFFLINE=1 stays offline)")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line, or .jsonl with 'prompt' or 'text'")
    add_policy_options(ap, "--prompts, which makes the statistics in-sample")
    ap.add_argument("--text", help="a text file for perplexity")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args(argv)
    from ..traces.record import eos_ids, load_model, read_prompts, tokenize
    from .routing_profile import profile_for
    from .compare import compare

    try:
        prompts = read_prompts(a.prompts)[: a.limit] if a.limit else read_prompts(a.prompts)
        model, tok = load_model(a.model, a.device, a.dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        profile, profile_info = profile_for(
            a.policy, model, tok, trace=a.profile_trace, prompts=a.profile_prompts or a.prompts,
            in_sample=a.profile_prompts is None, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, pad=pad,
            eos=eos_ids(model), max_tokens=a.profile_tokens, chat=a.chat)
        policy = build_policy_for(model, a.policy, a.conf_model, a.set, profile, a.hardware)
        text = tok(Path(a.text).read_text(encoding="utf-8"))["input_ids"] if a.text else None
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = compare(model, policy, tokenize(tok, prompts, a.chat), batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                  pad=pad, eos=eos_ids(model), text=text)
    res.update({"model": a.model, "policy_params": policy.params(), "routing_profile": profile_info})
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
