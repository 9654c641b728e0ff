"""EleutherAI lm-evaluation-harness with a policy inside the model (when lm_eval is installed).

    python -m lynx_sim.evaluate.harness --policy lynx \\
        --model_args pretrained=mistralai/Mixtral-8x7B-Instruct-v0.1,dtype=bfloat16 \\
        --tasks gsm8k --batch_size 16 --device cuda:0 --output_path results/
    HF_ALLOW_CODE_EVAL=1 python -m lynx_sim.evaluate.harness --policy lynx \\
        --model_args pretrained=Qwen/Qwen3-30B-A3B,dtype=bfloat16 \\
        --tasks humaneval --confirm_run_unsafe_code --batch_size 16 --device cuda:0

Everything after our own options (--policy, --conf-model, --set, --hardware, --profile-trace,
--profile-prompts, --profile-tokens: as in `python -m lynx_sim.evaluate`) goes to lm_eval's
command line unchanged; the model is lm_eval's Hugging Face model (`HFLM`) with `PolicyPatch`
applied, registered as `lynx_hf`. Run the same command with `--policy vanilla` for the
baseline. Decode-only rules (Lynx, batch_budget, ...) act only in decode steps: generative
tasks (GSM8K, HumanEval) exercise them; log-likelihood tasks run whole sequences in one forward
(prefill) and leave such rules idle. The harness batches requests with left padding, so
batch-aware rules see real batches. Tested with lm_eval 0.4.13 on a tiny local model and local
tasks (tests/test_evaluate.py); not run here on a real checkpoint.
"""

from __future__ import annotations

import argparse
import sys


def model_class():
    """lm_eval's HFLM with a policy patched into the loaded model."""
    from lm_eval.models.huggingface import HFLM

    from ..traces.record import eos_ids
    from .__main__ import build_policy_for
    from .routing_profile import profile_for
    from .patch import PolicyPatch

    class PolicyHFLM(HFLM):
        def __init__(self, policy: str = "lynx", conf_model: str | None = None, policy_set: tuple = (),
                     hardware: str = "h100_sxm", profile_trace: str | None = None,
                     profile_prompts: str | None = None, profile_tokens: int = 4096, **kwargs):
            super().__init__(**kwargs)
            tok = self.tokenizer
            eos = eos_ids(self.model) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            bs = self.batch_size_per_gpu if isinstance(self.batch_size_per_gpu, int) else 8
            profile, _ = profile_for(policy, self.model, tok, trace=profile_trace, prompts=profile_prompts,
                                     in_sample=False, batch_size=bs, max_new_tokens=PROFILE_NEW_TOKENS, pad=pad,
                                     eos=eos, max_tokens=profile_tokens)
            self.policy = build_policy_for(self.model, policy, conf_model, list(policy_set), profile, hardware)
            self.patch = PolicyPatch(self.model, self.policy, eos).__enter__()

    return PolicyHFLM


PROFILE_NEW_TOKENS = 64  # greedy tokens per profile prompt (the routing rules learn from decode steps)
OPTIONS: dict = {}  # our options of the current run, read by the registered model class
_registered: list = []  # lm_eval's registry refuses a second class under one name: register once


def parser() -> argparse.ArgumentParser:
    from .__main__ import add_policy_options

    ap = argparse.ArgumentParser(prog="python -m lynx_sim.evaluate.harness", add_help=False)
    add_policy_options(ap, "none: give this or --profile-trace")
    return ap


def main(argv: list[str] | None = None) -> int:
    ours, rest = parser().parse_known_args(argv)
    try:
        from lm_eval.__main__ import cli_evaluate
        from lm_eval.api.registry import register_model
    except ImportError:
        print("error: lm-evaluation-harness is not installed (pip install lm_eval)", file=sys.stderr)
        return 2
    from ..policies import POLICIES

    if ours.policy not in POLICIES:
        print(f"error: unknown policy '{ours.policy}': registered policies are {sorted(POLICIES)}", file=sys.stderr)
        return 2
    if POLICIES[ours.policy].needs_profile and not (ours.profile_trace or ours.profile_prompts):
        print(f"error: policy '{ours.policy}' learns per-layer statistics: give --profile-trace or --profile-prompts",
              file=sys.stderr)
        return 2
    OPTIONS.clear()
    OPTIONS.update(policy=ours.policy, conf_model=ours.conf_model, policy_set=tuple(ours.set), hardware=ours.hardware,
                   profile_trace=ours.profile_trace, profile_prompts=ours.profile_prompts,
                   profile_tokens=ours.profile_tokens)
    if not _registered:
        base = model_class()

        class Registered(base):
            def __init__(self, **kwargs):
                super().__init__(**OPTIONS, **kwargs)

        register_model("lynx_hf")(Registered)
        _registered.append(Registered)
    argv0 = sys.argv
    sys.argv = ["lm_eval", "--model", "lynx_hf", *rest]
    try:
        cli_evaluate()
    finally:
        sys.argv = argv0
    return 0


if __name__ == "__main__":
    sys.exit(main())
