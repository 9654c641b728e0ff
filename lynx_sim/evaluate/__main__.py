"""`python -m lynx_sim.evaluate --model DIR|HUB_ID --prompts FILE --policy lynx [--text FILE]`:
a policy inside a Hugging Face MoE model against the model's own routing (compare.py).

Policy parameters come from conf/policy/<name>.yaml, with the model-dependent defaults (Lynx's
alpha and beta) of the conf/model/ entry of the same family (`--conf-model`, guessed from the
model type); `--set key=value` overrides any of them. The router's shape comes from the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

CONF_MODEL = {"mixtral": "mixtral_8x7b", "qwen2_moe": "qwen2_57b_a14b", "qwen3_moe": "qwen3_30b_a3b",
              "olmoe": "olmoe_1b_7b", "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss_120b"}


def build_policy_for(model, name: str, conf_model: str | None = None, sets: list[str] = ()):
    """A registry policy for a transformers model: router shape from the model, parameters from conf/."""
    from ..config import compose
    from ..policies import build_policy
    from ..routing import RouterSpec
    from ..traces.record import meta_for

    meta = meta_for(model, "model")
    conf_model = conf_model or CONF_MODEL.get(model.config.model_type)
    if conf_model is None:
        raise ValueError(f"--conf-model: no default for model_type {model.config.model_type!r}; name a conf/model entry")
    cfg = compose([f"model={conf_model}", f"policy={name}", *[f"policy.{kv}" for kv in sets]])
    spec = RouterSpec(meta.num_experts, meta.top_k, meta.router, meta.renormalize, meta.n_group, meta.topk_group)
    policy = build_policy(cfg.policy, SimpleNamespace(router=spec))
    if policy.needs_calibration:
        raise ValueError(f"policy '{name}' learns per-layer statistics from a trace; the closed loop does not feed "
                         f"them yet (use a rule without calibration)")
    return policy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lynx_sim.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model directory or hub id (HF_HUB_OFFLINE=1 stays offline)")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line, or .jsonl with 'prompt' or 'text'")
    ap.add_argument("--policy", default="lynx")
    ap.add_argument("--conf-model", help="conf/model entry for the policy's model-dependent defaults")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a policy parameter")
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
    from .compare import compare

    try:
        prompts = read_prompts(a.prompts)[: a.limit] if a.limit else read_prompts(a.prompts)
        model, tok = load_model(a.model, a.device, a.dtype)
        policy = build_policy_for(model, a.policy, a.conf_model, a.set)
        text = tok(Path(a.text).read_text(encoding="utf-8"))["input_ids"] if a.text else None
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    res = compare(model, policy, tokenize(tok, prompts, a.chat), batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                  pad=pad, eos=eos_ids(model), text=text)
    res.update({"model": a.model, "policy_params": policy.params()})
    print(json.dumps(res, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
